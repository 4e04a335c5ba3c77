//! The day-in-the-field story, told once and run against any set of relays: one relay on
//! SQLite (`tests/tests/device_sync.rs`) or several relay processes on one PostgreSQL database
//! (`tests/tests/scale_out.rs`).
//!
//! Two nurses and an office clerk enroll and fetch three charts in the morning; offline all
//! day, Ana charts six visits and signs five, the office revises every care plan and Ben edits
//! one; in the evening everyone syncs in a random order, then once more. Every device must end
//! with the same documents, heads and content, every concurrent edit, the draft still a draft,
//! every signed note verifying as signed, and receipts covering Ana's notes.
//!
//! With several relays no pass is sticky: each device's consecutive passes go to different
//! relays (round robin from a random start), as a load balancer without sticky sessions may
//! send them, so a change stored through one relay must be served by another.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use automerge::ChangeHash;
use fieldchart_core::model::{
    CarePlanItem, NoteStatus, NoteText, Role, SignatureCheck, VisitStart, VitalReading, VitalType,
};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreKey};
use fieldchart_mobile::{PassOptions, PassReport, PassStatus, RelayConfig, TlsConfig};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::reconnect::open_store;
use crate::relay_process::{Admin, RelayProcess};

/// A visit of the day: the `i`-th, one hour after the previous.
pub fn visit(agency: &str, patient: &str, i: usize) -> VisitStart {
    VisitStart {
        agency_id: agency.into(),
        patient_id: patient.into(),
        service_type: "skilled-nursing".into(),
        date: "2026-11-27".into(),
        location: format!("{} Elm St", 10 + i),
        started_at_ms: 1_764_230_400_000 + i as i64 * 3_600_000,
        start_monotonic_ms: 50_000 + i as i64 * 3_600_000,
    }
}

/// Type `text` at the end of a narrative a few characters at a time, as a keyboard does.
pub fn type_text(store: &Store, note: DocumentId, field: NoteText, text: &str) {
    let mut len = {
        let n = store.visit_note(note).expect("note");
        match field {
            NoteText::Assessment => n.assessment.encode_utf16().count(),
            NoteText::Plan => n.plan.encode_utf16().count(),
        }
    };
    let chars: Vec<char> = text.chars().collect();
    for chunk in chars.chunks(3) {
        let piece: String = chunk.iter().collect();
        store
            .splice_text(note, field, len, 0, &piece)
            .expect("type");
        len += piece.encode_utf16().count();
    }
}

/// A reading of `vital` taken during the first visit.
pub fn vital(vital: VitalType, value: &str, unit: &str) -> VitalReading {
    VitalReading {
        id: String::new(),
        vital,
        value: value.into(),
        unit: unit.into(),
        taken_at_ms: 1_764_230_500_000,
        recorded_by: String::new(),
        supersedes: None,
    }
}

/// Every description in a care-plan tree.
pub fn descriptions(items: &[CarePlanItem], out: &mut BTreeSet<String>) {
    for item in items {
        out.insert(item.description.clone());
        descriptions(&item.children, out);
    }
}

/// An enrolled device of the story: its encrypted store and its token. It holds no sync
/// client: every pass names the relay it goes to.
struct Phone {
    name: String,
    store: Arc<Store>,
    token: String,
}

impl Phone {
    /// Join as the app does: the store makes the key pair, the admin's one-time code is
    /// redeemed (through `base`) with the public key, and the store is opened as the enrolled
    /// device.
    async fn enroll(
        dir: &Path,
        name: &str,
        user: &str,
        role: Role,
        base: &str,
        admin: &Admin,
    ) -> Phone {
        let path = dir.join(format!("{name}.db"));
        let key = StoreKey::from_bytes(rand::random());
        let public = {
            let store = open_store(&path, &key, user, "unenrolled", role);
            let public = store.device_public_key().expect("device key");
            store.close().expect("close");
            public
        };
        let code = admin.enroll(user, name);
        let enrolled =
            fieldchart_mobile::enroll(base, &code, Some(name), public, &TlsConfig::default())
                .await
                .expect("enroll");
        Phone {
            name: name.into(),
            store: Arc::new(open_store(&path, &key, user, &enrolled.device_id, role)),
            token: enrolled.token,
        }
    }

    /// Fetch the agency's device keys (`GET /v1/keys` through `base`) into the store.
    async fn fetch_keys(&self, base: &str) {
        let keys = fieldchart_mobile::fetch_device_keys(base, &self.token, &TlsConfig::default())
            .await
            .expect("keys");
        self.store.set_key_directory(&keys).expect("store keys");
    }

    /// One pass through the relay at `base`, which must complete.
    async fn sync_via(&self, base: &str) -> PassReport {
        let report = fieldchart_mobile::run_pass(
            Arc::clone(&self.store),
            RelayConfig {
                base_url: base.into(),
                token: self.token.clone(),
            },
            PassOptions::default(),
        )
        .await;
        assert_eq!(
            report.status,
            PassStatus::Complete,
            "{} through {base}: {report:?}",
            self.name
        );
        report
    }

    fn heads(&self, id: DocumentId) -> Vec<ChangeHash> {
        let mut heads = self.store.heads(id).expect("heads");
        heads.sort();
        heads
    }
}

/// Which relay each pass goes to: device `d`'s `k`-th pass to relay `(start + d + k) % n`, so
/// with several relays no device meets the same relay twice in a row.
struct Balancer {
    bases: Vec<String>,
    start: usize,
    passes: Vec<usize>,
}

impl Balancer {
    fn base(&mut self, device: usize) -> String {
        let pass = self.passes[device];
        self.passes[device] += 1;
        self.bases[(self.start + device + pass) % self.bases.len()].clone()
    }
}

/// Run the story. `start_relays` is called once the agency, its users and patients exist (the
/// admin CLI on the relays' database) and returns the relays devices are balanced across.
pub async fn day_in_the_field(
    dir: &Path,
    admin: &Admin,
    start_relays: impl FnOnce() -> Vec<RelayProcess>,
) {
    let agency = admin.create_agency("Riverside Home Health");
    let ana = admin.create_user(&agency, "Ana", "clinician");
    let ben = admin.create_user(&agency, "Ben", "clinician");
    let sam = admin.create_user(&agency, "Sam", "office");
    let patients: Vec<(String, DocumentId)> = (0..3)
        .map(|i| admin.create_patient(&agency, &format!("Patient {i}")))
        .collect();
    for (patient, _) in &patients {
        admin.assign(&ana, patient);
        admin.assign(&ben, patient);
    }
    let relays = start_relays();
    assert!(!relays.is_empty(), "the story needs a relay");
    let seed: u64 = rand::rng().random();
    println!(
        "sync order seed {seed}, {} relay(s): {:?}",
        relays.len(),
        relays
            .iter()
            .map(RelayProcess::http_base)
            .collect::<Vec<_>>()
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lb = Balancer {
        bases: relays.iter().map(RelayProcess::http_base).collect(),
        start: rng.random_range(0..relays.len()),
        passes: vec![0; 3],
    };
    let people = [
        ("ana-phone", &ana, Role::Clinician),
        ("ben-phone", &ben, Role::Clinician),
        ("sam-desk", &sam, Role::Office),
    ];
    let mut devices = Vec::new();
    for (i, (name, user, role)) in people.into_iter().enumerate() {
        let base = lb.base(i);
        let phone = Phone::enroll(dir, name, user, role, &base, admin).await;
        phone.fetch_keys(&base).await;
        devices.push(phone);
    }
    let [a, b, office] = &devices[..] else {
        unreachable!("three devices")
    };

    // Morning, in coverage: every device fetches the charts.
    for (i, d) in devices.iter().enumerate() {
        let report = d.sync_via(&lb.base(i)).await;
        assert_eq!(report.stats.docs_fetched, 3, "{}", d.name);
        assert_eq!(d.store.patients().expect("patients").len(), 3);
    }

    // Offline all day. Ana charts six visits and signs five.
    let narrative = "Pt alert and oriented x3. Lungs clear bilaterally. \
                     Sacral wound 2x3 cm, dressing changed, no drainage. Temp 99.1°F.";
    let mut notes = Vec::new();
    let mut signed_renderings = BTreeMap::new();
    for i in 0..6 {
        let (patient, _) = &patients[i % 3];
        let note = a
            .store
            .start_visit(&visit(&agency, patient, i))
            .expect("start");
        a.store
            .record_vital(note, &vital(VitalType::BloodPressure, "128/82", "mmHg"))
            .expect("bp");
        a.store
            .record_vital(
                note,
                &vital(VitalType::Pulse, &format!("{}", 70 + i), "bpm"),
            )
            .expect("pulse");
        type_text(&a.store, note, NoteText::Assessment, narrative);
        // A typo fixed: "Pt" → "Patient".
        a.store
            .splice_text(note, NoteText::Assessment, 0, 2, "Patient")
            .expect("correct");
        type_text(
            &a.store,
            note,
            NoteText::Plan,
            &format!("Visit {i}: continue plan."),
        );
        a.store
            .finish_visit(note, 1_764_234_000_000 + i as i64 * 3_600_000, 3_650_000)
            .expect("finish");
        if i < 5 {
            a.store.sign(note).expect("sign");
            let SignatureCheck::Valid { rendering, .. } =
                a.store.verify_signature(note).expect("verify")
            else {
                panic!("a note just signed verifies")
            };
            signed_renderings.insert(note, rendering);
        }
        notes.push(note);
    }
    let draft = notes[5];

    // The office revises all three care plans; Ben, offline too, edits one of them.
    let mut expected_plan: BTreeMap<DocumentId, BTreeSet<String>> = BTreeMap::new();
    for (i, (_, chart)) in patients.iter().enumerate() {
        let problem = format!("Impaired skin integrity ({i})");
        let goal = format!("Wound closed by 12/15 ({i})");
        let id = office
            .store
            .add_care_plan_item(*chart, &[], &problem, "active")
            .expect("office problem");
        office
            .store
            .add_care_plan_item(*chart, &[id], &goal, "active")
            .expect("office goal");
        expected_plan
            .entry(*chart)
            .or_default()
            .extend([problem, goal]);
    }
    let ben_item = "Fall risk: night-time toileting".to_owned();
    b.store
        .add_care_plan_item(patients[0].1, &[], &ben_item, "active")
        .expect("ben problem");
    expected_plan
        .entry(patients[0].1)
        .or_default()
        .insert(ben_item.clone());

    // Evening: everyone syncs, in a random order, then once more so all have all.
    let mut order = [0usize, 1, 2];
    order.shuffle(&mut rng);
    for &i in &order {
        devices[i].sync_via(&lb.base(i)).await;
    }
    for (i, d) in devices.iter().enumerate() {
        d.sync_via(&lb.base(i)).await;
    }

    // Every device holds the same documents with the same heads and the same content.
    let ids: BTreeSet<DocumentId> = a.store.document_ids().expect("ids").into_iter().collect();
    assert_eq!(ids.len(), 9, "3 charts and 6 notes");
    for d in &devices {
        let theirs: BTreeSet<_> = d.store.document_ids().expect("ids").into_iter().collect();
        assert_eq!(theirs, ids, "{} holds a different set of documents", d.name);
        for id in &ids {
            assert_eq!(d.heads(*id), a.heads(*id), "{} differs on {id}", d.name);
        }
        for (_, chart) in &patients {
            assert_eq!(
                d.store.patient_chart(*chart).expect("chart"),
                a.store.patient_chart(*chart).expect("chart"),
                "{}",
                d.name
            );
        }
        for note in &notes {
            assert_eq!(
                d.store.visit_note(*note).expect("note"),
                a.store.visit_note(*note).expect("note"),
                "{}",
                d.name
            );
        }
        // Every concurrent care-plan edit is there.
        for (chart, expected) in &expected_plan {
            let mut got = BTreeSet::new();
            descriptions(
                &d.store.patient_chart(*chart).expect("chart").care_plan,
                &mut got,
            );
            assert!(
                expected.is_subset(&got),
                "{} lost care-plan edits: {expected:?} vs {got:?}",
                d.name
            );
        }
        // The unsigned note is still a draft; signed notes verify exactly as signed.
        assert_eq!(
            d.store.visit_note(draft).expect("draft").status,
            NoteStatus::Draft
        );
        for (note, rendering) in &signed_renderings {
            match d.store.verify_signature(*note).expect("verify") {
                SignatureCheck::Valid {
                    rendering: here, ..
                } => {
                    assert_eq!(&here, rendering, "{} renders {note} differently", d.name);
                }
                other => panic!("{}: {note} does not verify: {other:?}", d.name),
            }
        }
        assert!(d.store.unsynced_documents().expect("unsynced").is_empty());
        assert!(d.store.sync_failures().expect("failures").is_empty());
    }
    // Ana sees, per note, that the agency has it.
    for note in &notes {
        let receipt = a.store.receipt(*note).expect("receipt").expect("a receipt");
        assert!(receipt.covers_current, "{note}");
        assert_eq!(receipt.heads, a.heads(*note));
        assert!(receipt.confirmed_at_ms > 0);
    }
    assert!(a.store.unconfirmed_documents().expect("list").is_empty());
    drop(relays);
}
