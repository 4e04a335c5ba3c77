//! Deterministic multi-replica stories: several devices' stores, no sockets; "sync" is
//! exporting every document from one store and importing it into another.

#![allow(clippy::unwrap_used)]

use fieldchart_core::model::{Actor, Medication, NoteText, Role, SignatureCheck, VisitStart};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};

struct Replica {
    store: Store,
    _dir: tempfile::TempDir,
}

fn replica(user: &str, role: Role) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig {
        path: dir.path().join("device.db"),
        key: StoreKey::random(),
        actor: Actor {
            user_id: user.into(),
            device_id: format!("{user}-phone"),
        },
        role,
        keystroke_journal: true,
    })
    .unwrap();
    Replica { store, _dir: dir }
}

/// Copy every document of `from` into `to`.
fn push(from: &Replica, to: &Replica) {
    for id in from.store.document_ids().unwrap() {
        to.store
            .import(id, &from.store.export_changes(id).unwrap())
            .unwrap();
    }
}

fn sync(a: &Replica, b: &Replica) {
    push(a, b);
    push(b, a);
}

fn visit(patient: &str) -> VisitStart {
    VisitStart {
        agency_id: "agency".into(),
        patient_id: patient.into(),
        service_type: "skilled-nursing".into(),
        date: "2026-11-27".into(),
        location: "home".into(),
        started_at_ms: 1_764_230_400_000,
        start_monotonic_ms: 1,
    }
}

fn chart(office: &Replica) -> DocumentId {
    office
        .store
        .create_patient("agency", "p1", "Grace Hopper")
        .unwrap()
}

#[test]
fn nurse_and_office_edit_the_care_plan_offline_and_both_edits_survive() {
    let office = replica("office", Role::Office);
    let nurse = replica("nurse", Role::Clinician);
    let id = chart(&office);
    let problem = office
        .store
        .add_care_plan_item(id, &[], "Impaired mobility", "active")
        .unwrap();
    sync(&office, &nurse);

    // Offline: the office adds a goal, the nurse adds another goal and rewords the problem.
    let office_goal = office
        .store
        .add_care_plan_item(
            id,
            std::slice::from_ref(&problem),
            "Walks 50 ft with walker",
            "active",
        )
        .unwrap();
    let nurse_goal = nurse
        .store
        .add_care_plan_item(
            id,
            std::slice::from_ref(&problem),
            "Transfers independently",
            "active",
        )
        .unwrap();
    nurse
        .store
        .update_care_plan_description(
            id,
            std::slice::from_ref(&problem),
            "Impaired physical mobility",
        )
        .unwrap();
    office
        .store
        .set_care_plan_status(id, &[problem.clone(), office_goal.clone()], "in-progress")
        .unwrap();
    sync(&office, &nurse);

    for r in [&office, &nurse] {
        let c = r.store.patient_chart(id).unwrap();
        let p = &c.care_plan[0];
        assert_eq!(p.description, "Impaired physical mobility");
        let goals: Vec<&str> = p.children.iter().map(|g| g.id.as_str()).collect();
        assert!(goals.contains(&office_goal.as_str()) && goals.contains(&nurse_goal.as_str()));
        assert!(p.children.iter().any(|g| g.status == "in-progress"));
        assert!(r.store.open_conflicts().unwrap().is_empty());
    }
    assert_eq!(
        office.store.index_snapshot().unwrap(),
        nurse.store.index_snapshot().unwrap()
    );
}

#[test]
fn two_nurses_edit_the_same_medication_and_both_values_are_listed() {
    let office = replica("office", Role::Office);
    let ana = replica("ana", Role::Clinician);
    let ben = replica("ben", Role::Clinician);
    let id = chart(&office);
    let med = office
        .store
        .upsert_medication(
            id,
            None,
            &Medication {
                name: "Furosemide".into(),
                dose: "20 mg".into(),
                route: "oral".into(),
                frequency: "daily".into(),
                status: "active".into(),
                id: String::new(),
            },
        )
        .unwrap();
    sync(&office, &ana);
    sync(&office, &ben);
    let read = ana.store.patient_chart(id).unwrap().medications[0].clone();
    let mut m = read.clone();
    m.dose = "40 mg".into();
    ana.store.upsert_medication(id, Some(&read), &m).unwrap();
    let read = ben.store.patient_chart(id).unwrap().medications[0].clone();
    let mut m = read.clone();
    m.dose = "10 mg".into();
    m.frequency = "twice daily".into();
    ben.store.upsert_medication(id, Some(&read), &m).unwrap();
    sync(&ana, &ben);
    sync(&ana, &office);

    for r in [&office, &ana, &ben] {
        let conflicts = r.store.conflicts(id).unwrap();
        assert_eq!(conflicts.len(), 1, "only the dose conflicts: {conflicts:?}");
        let c = &conflicts[0];
        assert_eq!(c.path, format!("medications/{med}/dose"));
        let mut values: Vec<(String, String)> = c
            .values
            .iter()
            .map(|v| {
                (
                    v.value.as_str().unwrap().to_owned(),
                    v.author.as_ref().unwrap().user_id.clone(),
                )
            })
            .collect();
        values.sort();
        assert_eq!(
            values,
            vec![
                ("10 mg".into(), "ben".into()),
                ("40 mg".into(), "ana".into())
            ]
        );
        // Ben's frequency change did not conflict and is simply there.
        assert_eq!(
            r.store.patient_chart(id).unwrap().medications[0].frequency,
            "twice daily"
        );
    }

    // A person resolves it; the resolution syncs and the conflict closes everywhere.
    let listed = ana.store.conflicts(id).unwrap().remove(0);
    assert_eq!(listed.path, format!("medications/{med}/dose"));
    let choice = listed
        .values
        .iter()
        .find(|v| v.value == "40 mg")
        .unwrap()
        .id
        .clone();
    ana.store.resolve_conflict(id, &listed, &choice).unwrap();
    sync(&ana, &ben);
    sync(&ana, &office);
    for r in [&office, &ana, &ben] {
        assert!(r.store.open_conflicts().unwrap().is_empty());
        assert_eq!(
            r.store.patient_chart(id).unwrap().medications[0].dose,
            "40 mg"
        );
    }
    assert!(
        ana.store
            .audit_log()
            .unwrap()
            .iter()
            .any(|a| a.action == "conflict-resolved")
    );
}

#[test]
fn signing_while_another_edits_offline_keeps_the_signed_version_and_lists_the_edit() {
    let ana = replica("ana", Role::Clinician);
    let ben = replica("ben", Role::Clinician);
    let note = ana.store.start_visit(&visit("p1")).unwrap();
    ana.store
        .update_text(note, NoteText::Assessment, "Wound clean, dry.")
        .unwrap();
    sync(&ana, &ben);

    // Ben, offline, edits the assessment; Ana signs without having seen it.
    ben.store
        .splice_text(note, NoteText::Assessment, 17, 0, " Mild erythema.")
        .unwrap();
    let sig = ana.store.sign(note).unwrap();
    let SignatureCheck::Valid { rendering: signed } = ana.store.verify_signature(note).unwrap()
    else {
        panic!()
    };
    sync(&ana, &ben);

    for r in [&ana, &ben] {
        let SignatureCheck::Valid { rendering } = r.store.verify_signature(note).unwrap() else {
            panic!("signature must verify")
        };
        assert_eq!(rendering, signed, "the signed rendering never changes");
        assert!(!rendering.contains("erythema"));
        // The current state carries Ben's text, and it is listed for review.
        assert!(
            r.store
                .visit_note(note)
                .unwrap()
                .assessment
                .contains("Mild erythema")
        );
        let review = r.store.post_signature_changes(note).unwrap();
        assert_eq!(review.len(), 1, "{review:?}");
        assert_eq!(review[0].author.as_ref().unwrap().user_id, "ben");
        assert_eq!(review[0].fields, vec!["assessment".to_string()]);
        assert_eq!(
            r.store
                .visit_note(note)
                .unwrap()
                .signature
                .unwrap()
                .content_hash,
            sig.content_hash
        );
        // And a signed note refuses edits on every replica that knows it is signed.
        assert!(r.store.update_text(note, NoteText::Plan, "x").is_err());
    }
}
