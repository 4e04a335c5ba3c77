//! The change feed through the real relay process: a reconnecting device learns exactly which
//! documents changed, and a new assignment brings a patient's existing documents into a
//! clinician's feed.

use std::collections::BTreeSet;

use fieldchart_core::protocol::encode_heads;
use fieldchart_tests::relay_process::{
    Admin, RelayProcess, SyncOutcome, TestPeer, set, visit_note,
};

fn ids(entries: &[serde_json::Value]) -> BTreeSet<String> {
    entries
        .iter()
        .map(|e| e["documentId"].as_str().expect("documentId").to_owned())
        .collect()
}

#[tokio::test]
async fn after_edits_to_3_of_200_documents_the_feed_since_the_cursor_lists_exactly_those_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let office = admin.create_user(&agency, "Sam", "office");
    let patients: Vec<_> = (0..4)
        .map(|i| admin.create_patient(&agency, &format!("Patient {i}")).0)
        .collect();
    for patient in &patients {
        admin.assign(&nurse, patient);
    }
    let nurse_token = admin.issue_token(&nurse, "phone").token;
    let office_token = admin.issue_token(&office, "desk").token;
    let relay = RelayProcess::start(dir.path());

    // 200 notes (plus the 4 charts) across the nurse's caseload.
    let mut phone = TestPeer::connect(&relay.ws_url(&nurse_token), Some("phone"))
        .await
        .expect("connect");
    let notes: Vec<_> = (0..200)
        .map(|i| phone.create(visit_note(&agency, &patients[i % 4], &nurse)))
        .collect();
    let outcomes = phone.sync_all(&notes).await;
    assert!(outcomes.iter().all(|o| matches!(o, SyncOutcome::InSync(_))));

    // A device that has seen everything holds a cursor.
    let (caseload, nurse_cursor) = relay.all_changes(&nurse_token, None).await;
    assert_eq!(caseload.len(), 204, "200 notes and 4 charts");
    let (agency_wide, office_cursor) = relay.all_changes(&office_token, None).await;
    assert_eq!(ids(&agency_wide), ids(&caseload));

    // Three notes change.
    let edited = [notes[7], notes[100], notes[199]];
    for id in edited {
        set(
            phone.doc_mut(id).expect("note"),
            "assessment",
            "Wound healing; no signs of infection.",
        );
    }
    let outcomes = phone.sync_all(&edited).await;
    let new_heads: Vec<_> = outcomes
        .into_iter()
        .map(|o| match o {
            SyncOutcome::InSync(heads) => heads,
            SyncOutcome::Unavailable => panic!("an edit was refused"),
        })
        .collect();

    for (token, cursor) in [
        (&nurse_token, &nurse_cursor),
        (&office_token, &office_cursor),
    ] {
        let (changed, _) = relay.all_changes(token, Some(cursor)).await;
        assert_eq!(
            ids(&changed),
            edited.iter().map(ToString::to_string).collect(),
            "{changed:#?}"
        );
        for (id, heads) in edited.iter().zip(&new_heads) {
            let entry = changed
                .iter()
                .find(|e| e["documentId"] == id.to_string())
                .expect("listed");
            assert_eq!(
                entry["heads"],
                serde_json::json!(encode_heads(heads)),
                "the feed reports the stored heads"
            );
        }
    }

    // Nothing changed since: the feed is empty, and paging it in small steps loses nothing.
    let (_, latest) = relay.all_changes(&nurse_token, Some(&nurse_cursor)).await;
    assert!(
        relay
            .all_changes(&nurse_token, Some(&latest))
            .await
            .0
            .is_empty()
    );
    let mut cursor: Option<String> = None;
    let mut paged = BTreeSet::new();
    for _ in 0..100 {
        let mut url = format!("{}/v1/changes?limit=7", relay.http_base());
        if let Some(c) = &cursor {
            url.push_str(&format!("&since={c}"));
        }
        let (status, page) = relay.get(&url, &nurse_token).await;
        assert_eq!(status, 200);
        let entries = page["changes"].as_array().expect("changes");
        assert!(entries.len() <= 7);
        paged.extend(ids(entries));
        cursor = page["next"].as_str().map(str::to_owned);
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(paged, ids(&caseload));
}

#[tokio::test]
async fn a_new_assignment_brings_the_patients_existing_documents_into_the_feed_after_the_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let office = admin.create_user(&agency, "Sam", "office");
    let (mine, _) = admin.create_patient(&agency, "Ada");
    let (new_patient, new_chart) = admin.create_patient(&agency, "Grace");
    admin.assign(&nurse, &mine);
    let nurse_token = admin.issue_token(&nurse, "phone").token;
    let office_token = admin.issue_token(&office, "desk").token;
    let relay = RelayProcess::start(dir.path());

    // The office has already charted for the new patient.
    let mut desk = TestPeer::connect(&relay.ws_url(&office_token), Some("desk"))
        .await
        .expect("connect");
    let existing: Vec<_> = (0..3)
        .map(|_| desk.create(visit_note(&agency, &new_patient, &office)))
        .collect();
    assert!(
        desk.sync_all(&existing)
            .await
            .iter()
            .all(|o| matches!(o, SyncOutcome::InSync(_)))
    );

    let (before, cursor) = relay.all_changes(&nurse_token, None).await;
    assert!(
        before.iter().all(|e| e["patientId"] == mine.as_str()),
        "not her patient yet: {before:#?}"
    );

    admin.assign(&nurse, &new_patient);
    let (added, _) = relay.all_changes(&nurse_token, Some(&cursor)).await;
    let mut expected: BTreeSet<String> = existing.iter().map(ToString::to_string).collect();
    expected.insert(new_chart.to_string());
    assert_eq!(
        ids(&added),
        expected,
        "the chart and all three older notes, after her cursor"
    );
    assert!(added.iter().all(|e| e["patientId"] == new_patient.as_str()));

    // And she may now open them.
    let mut phone = TestPeer::connect(&relay.ws_url(&nurse_token), Some("phone"))
        .await
        .expect("connect");
    for id in &existing {
        assert!(matches!(phone.fetch(*id).await, SyncOutcome::InSync(_)));
    }
}
