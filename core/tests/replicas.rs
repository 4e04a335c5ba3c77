//! Deterministic multi-replica stories: several devices' stores, no sockets; "sync" is
//! exporting every document from one store and importing it into another.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Replica, publish_all, replica, sync, visit};
use fieldchart_core::Error;
use fieldchart_core::model::{Medication, NoteText, Role, SignatureCheck};
use fieldchart_core::protocol::DocumentId;

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
    publish_all(&[&ana, &ben]);
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
    let SignatureCheck::Valid {
        rendering: signed, ..
    } = ana.store.verify_signature(note).unwrap()
    else {
        panic!()
    };
    sync(&ana, &ben);

    for r in [&ana, &ben] {
        let SignatureCheck::Valid { rendering, .. } = r.store.verify_signature(note).unwrap()
        else {
            panic!("signature must verify")
        };
        assert_eq!(rendering, signed, "the signed rendering never changes");
        assert!(!rendering.contains("erythema"));
        // The note reads as signed (Ben's text is not under the Signed status); his change
        // is listed for review instead.
        let view = r.store.visit_note(note).unwrap();
        assert_eq!(view.assessment, "Wound clean, dry.");
        assert_eq!(view.status, fieldchart_core::model::NoteStatus::Signed);
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

/// Office, Ana and Ben hold the chart with one medication; Ana and Ben then set different
/// doses offline and everyone syncs: the dose is in conflict everywhere.
fn dose_conflict() -> (Replica, Replica, Replica, DocumentId, String) {
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
    set_dose(&ana, id, "40 mg");
    set_dose(&ben, id, "10 mg");
    sync(&ana, &ben);
    sync(&ana, &office);
    (office, ana, ben, id, med)
}

fn set_dose(r: &Replica, id: DocumentId, dose: &str) {
    let read = r.store.patient_chart(id).unwrap().medications[0].clone();
    let mut m = read.clone();
    m.dose = dose.into();
    r.store.upsert_medication(id, Some(&read), &m).unwrap();
}

#[test]
fn changing_another_field_of_a_medication_keeps_its_dose_conflict_open() {
    let (office, ana, _ben, id, med) = dose_conflict();
    let before = office.store.conflicts(id).unwrap();
    assert_eq!(before.len(), 1);
    // The office changes the frequency of the medication whose dose is in conflict; its
    // record carries the displayed dose, unchanged.
    let read = office.store.patient_chart(id).unwrap().medications[0].clone();
    let mut m = read.clone();
    m.frequency = "twice daily".into();
    office.store.upsert_medication(id, Some(&read), &m).unwrap();
    sync(&office, &ana);
    for r in [&office, &ana] {
        assert_eq!(
            r.store.conflicts(id).unwrap(),
            before,
            "the dose conflict is still open with both values"
        );
        let chart = r.store.patient_chart(id).unwrap();
        assert_eq!(chart.medications[0].frequency, "twice daily");
    }
    // Changing the conflicted dose itself is refused (resolve first), and writes nothing.
    let heads = office.store.heads(id).unwrap();
    let read = office.store.patient_chart(id).unwrap().medications[0].clone();
    let mut m = read.clone();
    m.dose = "80 mg".into();
    let err = office
        .store
        .upsert_medication(id, Some(&read), &m)
        .unwrap_err();
    assert!(
        matches!(&err, Error::FieldInConflict { path } if *path == format!("medications/{med}/dose")),
        "{err}"
    );
    assert_eq!(office.store.heads(id).unwrap(), heads);
    // An update that changes nothing writes nothing.
    office
        .store
        .upsert_medication(id, Some(&read), &read)
        .unwrap();
    assert_eq!(office.store.heads(id).unwrap(), heads);
}

#[test]
fn an_update_from_a_stale_read_is_refused() {
    let office = replica("office", Role::Office);
    let ana = replica("ana", Role::Clinician);
    let id = chart(&office);
    office
        .store
        .upsert_medication(
            id,
            None,
            &Medication {
                name: "Metformin".into(),
                dose: "500 mg".into(),
                status: "active".into(),
                ..Default::default()
            },
        )
        .unwrap();
    sync(&office, &ana);
    let read = ana.store.patient_chart(id).unwrap().medications[0].clone();
    set_dose(&office, id, "1000 mg");
    sync(&office, &ana);
    // Ana changes the dose from what she read (500 mg), but it is 1000 mg by now.
    let mut m = read.clone();
    m.dose = "750 mg".into();
    let err = ana
        .store
        .upsert_medication(id, Some(&read), &m)
        .unwrap_err();
    assert!(matches!(err, Error::StaleRead { .. }), "{err}");
    assert_eq!(
        ana.store.patient_chart(id).unwrap().medications[0].dose,
        "1000 mg"
    );
}

#[test]
fn resolving_after_a_sync_added_a_value_fails_and_writes_nothing() {
    let (_office, ana, _ben, id, med) = dose_conflict();
    // Ana lists the conflict...
    let listed = ana.store.conflicts(id).unwrap().remove(0);
    let forty = listed
        .values
        .iter()
        .find(|v| v.value == "40 mg")
        .unwrap()
        .id
        .clone();
    // ...meanwhile a sync brings a third device's concurrent value.
    let heads = ana.store.heads(id).unwrap();
    let third = third_concurrent_dose(&ana, id, "30 mg");
    ana.store.import(id, &third).unwrap();
    assert_ne!(ana.store.heads(id).unwrap(), heads);
    assert_eq!(ana.store.conflicts(id).unwrap()[0].values.len(), 3);

    let heads = ana.store.heads(id).unwrap();
    let err = ana.store.resolve_conflict(id, &listed, &forty).unwrap_err();
    assert!(
        matches!(&err, Error::ConflictChanged { path } if *path == format!("medications/{med}/dose")),
        "{err}"
    );
    assert_eq!(ana.store.heads(id).unwrap(), heads, "nothing written");
    // Listing again and choosing again works; the record says who decided.
    let listed = ana.store.conflicts(id).unwrap().remove(0);
    let thirty = listed
        .values
        .iter()
        .find(|v| v.value == "30 mg")
        .unwrap()
        .id
        .clone();
    ana.store.resolve_conflict(id, &listed, &thirty).unwrap();
    assert!(ana.store.conflicts(id).unwrap().is_empty());
    assert_eq!(
        ana.store.patient_chart(id).unwrap().medications[0].dose,
        "30 mg"
    );
    let resolved = ana
        .store
        .audit_log()
        .unwrap()
        .iter()
        .filter(|a| a.action == "conflict-resolved")
        .count();
    assert_eq!(resolved, 1, "the refused attempt left no audit row");
}

/// A change setting the dose concurrently with everything after the medication was created:
/// made on a fork of the chart at the heads where the dose was still single-valued.
fn third_concurrent_dose(r: &Replica, id: DocumentId, dose: &str) -> Vec<u8> {
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;
    r.store
        .with_document(id, |doc| {
            let history = doc.get_changes(&[]);
            // The medication was added by the second change (after the chart's creation).
            let at = [history[1].hash()];
            let mut fork = doc.fork_at(&at).unwrap();
            fork.set_actor(automerge::ActorId::random());
            let meds = match fork.get(automerge::ROOT, "medications").unwrap() {
                Some((_, obj)) => obj,
                None => panic!("no medications"),
            };
            let med = fork.keys(&meds).next().unwrap();
            let entry = match fork.get(&meds, med.as_str()).unwrap() {
                Some((_, obj)) => obj,
                None => panic!("no entry"),
            };
            fork.put(&entry, "dose", dose).unwrap();
            fork.commit();
            fork.save_after(&at)
        })
        .unwrap()
}

#[test]
fn identical_concurrent_values_are_one_value_not_a_conflict() {
    let office = replica("office", Role::Office);
    let ana = replica("ana", Role::Clinician);
    let ben = replica("ben", Role::Clinician);
    let id = chart(&office);
    office
        .store
        .upsert_medication(
            id,
            None,
            &Medication {
                name: "Lisinopril".into(),
                dose: "10 mg".into(),
                status: "active".into(),
                ..Default::default()
            },
        )
        .unwrap();
    sync(&office, &ana);
    sync(&office, &ben);
    // Both nurses, offline, correct the dose to the same value.
    set_dose(&ana, id, "20 mg");
    set_dose(&ben, id, "20 mg");
    sync(&ana, &ben);
    sync(&ana, &office);
    for r in [&office, &ana, &ben] {
        assert!(r.store.open_conflicts().unwrap().is_empty());
        assert_eq!(
            r.store.patient_chart(id).unwrap().medications[0].dose,
            "20 mg"
        );
    }
    // Both writes are in the document (two concurrent values), listed as none.
    let values = ana
        .store
        .with_document(id, |doc| {
            use automerge::ReadDoc;
            let meds = doc.get(automerge::ROOT, "medications").unwrap().unwrap().1;
            let med = doc.keys(&meds).next().unwrap();
            let entry = doc.get(&meds, med.as_str()).unwrap().unwrap().1;
            doc.get_all(&entry, "dose").unwrap().len()
        })
        .unwrap();
    assert_eq!(values, 2);
}

#[test]
fn signing_is_refused_while_the_note_has_open_conflicts() {
    let ana = replica("ana", Role::Clinician);
    let ben = replica("ben", Role::Clinician);
    let note = ana.store.start_visit(&visit("p1")).unwrap();
    sync(&ana, &ben);
    ana.store
        .set_next_visit(note, "2026-12-01 visit A")
        .unwrap();
    ben.store
        .set_next_visit(note, "2026-12-02 visit B")
        .unwrap();
    sync(&ana, &ben);

    let err = ana.store.sign(note).unwrap_err();
    let Error::ConflictsOpen { paths } = &err else {
        panic!("expected ConflictsOpen, got {err}");
    };
    assert_eq!(paths, &vec!["nextVisit".to_string()]);
    let message = err.to_string();
    assert!(message.contains("nextVisit"), "{message}");
    assert!(
        !message.contains("visit A") && !message.contains("visit B"),
        "no clinical values in the message: {message}"
    );
    assert!(ana.store.visit_note(note).unwrap().signature.is_none());
    assert!(
        !ana.store
            .audit_log()
            .unwrap()
            .iter()
            .any(|a| a.action == "signed")
    );

    let listed = ana.store.conflicts(note).unwrap().remove(0);
    let choice = listed.values[0].id.clone();
    ana.store.resolve_conflict(note, &listed, &choice).unwrap();
    ana.store.sign(note).unwrap();
    assert!(
        ana.store
            .audit_log()
            .unwrap()
            .iter()
            .any(|a| a.action == "signed" && a.document_id == Some(note))
    );
}
