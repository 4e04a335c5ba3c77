//! The tamper catalogue against the real relay: a nurse signs a note and it reaches the relay;
//! then a device on the same care team (a modified client speaking raw automerge) tries to
//! delete, rewrite, forge or move it. Each case: the relay refuses the changes (the sender gets
//! `doc-unavailable`), writes a `tamper` audit row naming the sender, and keeps serving the
//! unchanged note to everyone else; a second device fetching the note sees it signed and Valid.
//! A legitimate late edit (made offline, concurrent with the signing) is accepted and listed
//! for review on the second device. A new note whose first upload already edits its body after
//! the signature is refused whole.

#![allow(clippy::unwrap_used)]

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ChangeHash, ObjType, ROOT, ReadDoc};
use fieldchart_core::model::signing::{self, ReviewReason};
use fieldchart_core::model::{
    Actor, DeviceKey, NoteStatus, NoteText, Role, SignatureCheck, VisitStart,
};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};
use fieldchart_mobile::TlsConfig;
use fieldchart_tests::relay_process::{Admin, RelayProcess, SyncOutcome, TestPeer};
use serde_json::Value;

const SIGNED_TEXT: &str = "Sacral wound 2x3 cm, clean, dressing changed.";

struct Enrolled {
    user: String,
    device: String,
    token: String,
    key: DeviceKey,
}

async fn enroll(admin: &Admin, relay: &RelayProcess, user: &str, name: &str) -> Enrolled {
    let code = admin.enroll(user, name);
    let key = DeviceKey::generate();
    let done = fieldchart_mobile::enroll(
        &relay.http_base(),
        &code,
        Some(name),
        key.public_key(),
        &TlsConfig::default(),
    )
    .await
    .expect("enroll");
    Enrolled {
        user: user.into(),
        device: done.device_id,
        token: done.token,
        key,
    }
}

struct Scene {
    _dir: tempfile::TempDir,
    admin: Admin,
    relay: RelayProcess,
    agency: String,
    patient: String,
    ana: Enrolled,
    ben: Enrolled,
    office: Enrolled,
    note: DocumentId,
    /// The note as signed (what the relay holds after Ana's sync).
    signed: Automerge,
    /// The heads just before Ana signed.
    before_signing: Vec<ChangeHash>,
}

fn open_store(dir: &std::path::Path, who: &Enrolled, role: Role) -> Store {
    Store::open(StoreConfig {
        path: dir.join(format!("{}.db", who.device)),
        key: StoreKey::random(),
        actor: Actor {
            user_id: who.user.clone(),
            device_id: who.device.clone(),
        },
        role,
        keystroke_journal: true,
    })
    .unwrap()
}

/// Ana (on the care team) charts and signs a note and syncs it; Ben is on the care team too;
/// an office user reads.
async fn scene() -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let ana_id = admin.create_user(&agency, "Ana", "clinician");
    let ben_id = admin.create_user(&agency, "Ben", "clinician");
    let office_id = admin.create_user(&agency, "Olga", "office");
    let (patient, _) = admin.create_patient(&agency, "Grace");
    admin.assign(&ana_id, &patient);
    admin.assign(&ben_id, &patient);
    let relay = RelayProcess::start(dir.path());
    let ana = enroll(&admin, &relay, &ana_id, "ana-phone").await;
    let ben = enroll(&admin, &relay, &ben_id, "ben-phone").await;
    let office = enroll(&admin, &relay, &office_id, "olga-desk").await;

    // Ana's device: a real store, with its key (the store makes its own; here the enrolled
    // key signs through the model API so the test holds the secret).
    let store = open_store(dir.path(), &ana, Role::Clinician);
    let note = store
        .start_visit(&VisitStart {
            agency_id: agency.clone(),
            patient_id: patient.clone(),
            service_type: "skilled-nursing".into(),
            date: "2026-11-29".into(),
            location: "12 Elm St".into(),
            started_at_ms: fieldchart_tests::relay_process::now_ms(),
            start_monotonic_ms: 1,
        })
        .unwrap();
    store
        .update_text(note, NoteText::Assessment, SIGNED_TEXT)
        .unwrap();
    let mut doc = AutoCommit::load(&store.export_changes(note).unwrap()).unwrap();
    doc.set_actor(automerge::ActorId::random());
    doc.set_author(Some(actor(&ana).author()));
    let before_signing = doc.get_heads();
    signing::sign(
        &mut doc,
        note,
        &ana.key,
        &actor(&ana),
        Role::Clinician,
        fieldchart_tests::relay_process::now_ms(),
    )
    .unwrap();
    doc.commit();
    let signed = Automerge::load(&doc.save()).unwrap();
    let mut peer = TestPeer::connect(&relay.ws_url(&ana.token), None)
        .await
        .unwrap();
    peer.create_with_id(note, signed.clone());
    assert_eq!(
        peer.sync(note).await,
        SyncOutcome::InSync(signed.get_heads()),
        "the relay accepts Ana's signed note"
    );
    peer.close().await;
    Scene {
        _dir: dir,
        admin,
        relay,
        agency,
        patient,
        ana,
        ben,
        office,
        note,
        signed,
        before_signing,
    }
}

fn actor(who: &Enrolled) -> Actor {
    Actor {
        user_id: who.user.clone(),
        device_id: who.device.clone(),
    }
}

impl Scene {
    /// Ben's modified client: fetch the note, let `tamper` change it, sync.
    async fn attack(&self, tamper: impl FnOnce(&mut AutoCommit)) -> SyncOutcome {
        let mut peer = TestPeer::connect(&self.relay.ws_url(&self.ben.token), None)
            .await
            .unwrap();
        assert!(matches!(
            peer.fetch(self.note).await,
            SyncOutcome::InSync(_)
        ));
        let mut doc = AutoCommit::load(&peer.doc(self.note).unwrap().save()).unwrap();
        doc.set_actor(automerge::ActorId::random());
        doc.set_author(Some(actor(&self.ben).author()));
        let before = doc.get_heads();
        tamper(&mut doc);
        doc.commit();
        let changes = doc.get_changes(&before);
        assert!(!changes.is_empty(), "the tamper made a change");
        peer.doc_mut(self.note)
            .unwrap()
            .apply_changes(changes)
            .unwrap();
        let outcome = peer.sync(self.note).await;
        peer.close().await;
        outcome
    }

    /// Ben's client appends a signature made now with `signer`'s enrolled key.
    async fn attack_with_signature_by(&self, signer: Enrolled) -> SyncOutcome {
        let note = self.note;
        self.attack(move |doc| {
            signing::sign(
                doc,
                note,
                &signer.key,
                &actor(&signer),
                Role::Clinician,
                fieldchart_tests::relay_process::now_ms(),
            )
            .unwrap();
        })
        .await
    }

    /// The office reads the note from the relay: still exactly what Ana signed (plus, for the
    /// legitimate case, the accepted edit).
    async fn relay_copy(&self) -> Automerge {
        let mut peer = TestPeer::connect(&self.relay.ws_url(&self.office.token), None)
            .await
            .unwrap();
        assert!(matches!(
            peer.fetch(self.note).await,
            SyncOutcome::InSync(_)
        ));
        let doc = peer.doc(self.note).unwrap().clone();
        peer.close().await;
        doc
    }

    /// A second device (the office's store) with the agency's keys from `GET /v1/keys`.
    async fn second_device(&self, dir: &std::path::Path) -> Store {
        let store = open_store(dir, &self.office, Role::Office);
        let keys = fieldchart_mobile::fetch_device_keys(
            &self.relay.http_base(),
            &self.office.token,
            &TlsConfig::default(),
        )
        .await
        .unwrap();
        store.set_key_directory(&keys).unwrap();
        store
            .import(self.note, &self.relay_copy().await.save())
            .unwrap();
        store
    }

    fn tamper_rows(&self) -> Vec<Value> {
        self.admin
            .audit_for_patient(&self.patient)
            .into_iter()
            .filter(|r| r["action"] == "tamper")
            .collect()
    }

    /// Every refused case ends the same way.
    async fn assert_refused(&self, outcome: SyncOutcome) {
        assert_eq!(
            outcome,
            SyncOutcome::Unavailable,
            "the relay refuses the changes"
        );
        let rows = self.tamper_rows();
        assert_eq!(
            rows.len(),
            1,
            "one tamper row: {rows:#?}\n{}",
            self.relay.logs()
        );
        assert_eq!(rows[0]["userId"], self.ben.user.as_str());
        assert_eq!(rows[0]["deviceId"], self.ben.device.as_str());
        assert_eq!(rows[0]["agencyId"], self.agency.as_str());
        assert_eq!(
            self.relay_copy().await.get_heads(),
            self.signed.get_heads(),
            "the relay still serves the note exactly as signed"
        );
        let dir = tempfile::tempdir().unwrap();
        let second = self.second_device(dir.path()).await;
        let SignatureCheck::Valid { signature, .. } = second.verify_signature(self.note).unwrap()
        else {
            panic!("the second device verifies the signature")
        };
        assert_eq!(signature.signed_by, self.ana.user);
        let view = second.visit_note(self.note).unwrap();
        assert_eq!(view.status, NoteStatus::Signed);
        assert_eq!(view.assessment, SIGNED_TEXT);
        assert!(second.post_signature_changes(self.note).unwrap().is_empty());
    }
}

fn signatures(doc: &AutoCommit) -> automerge::ObjId {
    match doc.get(ROOT, "signatures").unwrap() {
        Some((automerge::Value::Object(ObjType::List), id)) => id,
        other => panic!("no signature list: {other:?}"),
    }
}

#[tokio::test]
async fn deleting_the_signature_is_refused() {
    let s = scene().await;
    let outcome = s
        .attack(|doc| {
            let list = signatures(doc);
            doc.delete(&list, 0).unwrap();
            doc.put(ROOT, "status", "draft").unwrap();
        })
        .await;
    s.assert_refused(outcome).await;
}

#[tokio::test]
async fn rewriting_the_signer_and_time_is_refused() {
    let s = scene().await;
    let ben = s.ben.user.clone();
    let ana = s.ana.user.clone();
    let outcome = s
        .attack(move |doc| {
            let list = signatures(doc);
            let (_, entry) = doc.get(&list, 0).unwrap().unwrap();
            let payload: String = doc.get(&entry, "payload").unwrap().unwrap().0.to_string();
            let forged = payload
                .trim_matches('"')
                .replace('\\', "")
                .replace(&ana, &ben)
                .replace("\"signedAtMs\":", "\"signedAtMs\":9");
            doc.put(&entry, "payload", forged).unwrap();
        })
        .await;
    s.assert_refused(outcome).await;
}

#[tokio::test]
async fn re_signing_with_a_key_that_was_never_enrolled_is_refused() {
    let s = scene().await;
    let (note, ben) = (s.note, actor(&s.ben));
    let outcome = s
        .attack(move |doc| {
            let text = doc.get(ROOT, "assessment").unwrap().unwrap().1;
            doc.splice_text(&text, 0, 5, "Healed").unwrap();
            doc.commit();
            let rogue = DeviceKey::generate();
            signing::sign(doc, note, &rogue, &ben, Role::Clinician, 1).unwrap();
        })
        .await;
    s.assert_refused(outcome).await;
}

#[tokio::test]
async fn a_signature_by_a_revoked_device_dated_after_revocation_is_refused() {
    let s = scene().await;
    // Ben's old tablet was lost and revoked; its key signs a note afterwards.
    let tablet = enroll(&s.admin, &s.relay, &s.ben.user, "ben-tablet").await;
    s.admin.run(&["revoke-device", "--device", &tablet.device]);
    let outcome = s.attack_with_signature_by(tablet).await;
    s.assert_refused(outcome).await;
}

#[tokio::test]
async fn a_signature_by_a_clinician_off_the_care_team_is_refused() {
    let s = scene().await;
    let carl_id = s.admin.create_user(&s.agency, "Carl", "clinician");
    let carl = enroll(&s.admin, &s.relay, &carl_id, "carl-phone").await;
    let outcome = s.attack_with_signature_by(carl).await;
    s.assert_refused(outcome).await;
}

#[tokio::test]
async fn moving_the_patient_by_a_concurrent_value_is_refused() {
    for field in ["patientId", "agencyId"] {
        let s = scene().await;
        let before = s.before_signing.clone();
        let outcome = s
            .attack(move |doc| {
                // Made on the draft, concurrently: the relay's value wins the merge, so the
                // current value does not move, but the losing value is still tampering.
                let mut offline = doc.fork_at(&before).unwrap();
                offline.set_actor(automerge::ActorId::random());
                offline.put(ROOT, field, "pat_somebody_else").unwrap();
                offline.commit();
                doc.merge(&mut offline).unwrap();
            })
            .await;
        s.assert_refused(outcome).await;
    }
}

#[tokio::test]
async fn a_legitimate_concurrent_edit_is_accepted_and_listed_for_review() {
    let s = scene().await;
    let before = s.before_signing.clone();
    let ben = actor(&s.ben);
    let outcome = s
        .attack(move |doc| {
            // Ben typed into the plan offline, before he could have seen the signature.
            let mut offline = doc.fork_at(&before).unwrap();
            offline.set_actor(automerge::ActorId::random());
            offline.set_author(Some(ben.author()));
            let plan = offline.get(ROOT, "plan").unwrap().unwrap().1;
            offline
                .splice_text(&plan, 0, 0, "Recheck in 2 days")
                .unwrap();
            offline.commit();
            doc.merge(&mut offline).unwrap();
        })
        .await;
    assert!(matches!(outcome, SyncOutcome::InSync(_)), "{outcome:?}");
    assert!(s.tamper_rows().is_empty());
    let dir = tempfile::tempdir().unwrap();
    let second = s.second_device(dir.path()).await;
    assert!(matches!(
        second.verify_signature(s.note).unwrap(),
        SignatureCheck::Valid { .. }
    ));
    let view = second.visit_note(s.note).unwrap();
    assert_eq!(
        view.plan, "",
        "the signed version is what is shown as signed"
    );
    let review = second.post_signature_changes(s.note).unwrap();
    assert_eq!(review.len(), 1, "{review:#?}");
    assert_eq!(review[0].reason, ReviewReason::ConcurrentWithSignature);
    assert_eq!(review[0].author.as_ref().unwrap().user_id, s.ben.user);
    assert_eq!(review[0].fields, vec!["plan".to_string()]);
}

/// A note charted, signed and then edited in its body before it ever reached the relay — a
/// device's store refuses such an edit, so only a modified client makes one — is refused on
/// its first upload, exactly as the same edit is one message after the signature: nothing of
/// it is stored, and the sender's attempt is on record.
#[tokio::test]
async fn a_new_note_edited_after_its_signature_is_refused_on_its_first_upload() {
    let s = scene().await;
    let note = DocumentId::random();
    // The same charted draft, as a new note of Ana's (its own id; never sent before).
    let mut doc = AutoCommit::load(&s.signed.save())
        .unwrap()
        .fork_at(&s.before_signing)
        .unwrap()
        .with_actor(automerge::ActorId::random());
    doc.set_author(Some(actor(&s.ana).author()));
    let now = fieldchart_tests::relay_process::now_ms();
    signing::sign(
        &mut doc,
        note,
        &s.ana.key,
        &actor(&s.ana),
        Role::Clinician,
        now,
    )
    .unwrap();
    doc.commit();
    let assessment = doc.get(ROOT, "assessment").unwrap().unwrap().1;
    doc.splice_text(&assessment, 0, 0, "Amended: ").unwrap();
    doc.commit();
    let edited = Automerge::load(&doc.save()).unwrap();

    let mut peer = TestPeer::connect(&s.relay.ws_url(&s.ana.token), None)
        .await
        .unwrap();
    peer.create_with_id(note, edited);
    assert_eq!(peer.sync(note).await, SyncOutcome::Unavailable);
    peer.close().await;
    let rows = s.tamper_rows();
    assert_eq!(rows.len(), 1, "one tamper row: {rows:#?}");
    assert_eq!(rows[0]["documentId"], note.to_string());
    assert_eq!(rows[0]["userId"], s.ana.user.as_str());

    // Nothing of it was stored: the office cannot fetch it.
    let mut office = TestPeer::connect(&s.relay.ws_url(&s.office.token), None)
        .await
        .unwrap();
    assert_eq!(office.fetch(note).await, SyncOutcome::Unavailable);
    office.close().await;
}
