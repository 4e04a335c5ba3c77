//! Two devices of one care team chart the same visit note through the real relay process,
//! which is killed (SIGKILL) and restarted in between: everything it acknowledged is still
//! there, and both devices converge.

use fieldchart_core::protocol::encode_heads;
use fieldchart_tests::relay_process::{
    Admin, RelayProcess, SyncOutcome, TestPeer, get, set, visit_note,
};

#[tokio::test]
async fn two_devices_converge_on_a_visit_note_across_relay_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside Home Health");
    let maria = admin.create_user(&agency, "Maria", "clinician");
    let jo = admin.create_user(&agency, "Jo", "clinician");
    let (patient, chart) = admin.create_patient(&agency, "Ada Lovelace");
    admin.assign(&maria, &patient);
    admin.assign(&jo, &patient);
    let maria_token = admin.issue_token(&maria, "maria-phone").token;
    let jo_token = admin.issue_token(&jo, "jo-tablet").token;
    let mut relay = RelayProcess::start(dir.path());
    let storage_id = relay.storage_id().to_owned();

    // Maria charts a visit; the relay acknowledges it.
    let mut phone = TestPeer::connect(&relay.ws_url(&maria_token), Some("maria-phone-storage"))
        .await
        .expect("connect");
    assert_eq!(
        phone
            .relay_metadata()
            .storage_id
            .as_ref()
            .map(|s| s.as_str()),
        Some(storage_id.as_str())
    );
    assert!(!phone.relay_metadata().is_ephemeral);
    let note = phone.create(visit_note(&agency, &patient, &maria));
    set(
        phone.doc_mut(note).expect("note"),
        "assessment",
        "Alert and oriented. Lungs clear.",
    );
    let SyncOutcome::InSync(acknowledged) = phone.sync(note).await else {
        panic!("the note was refused")
    };

    // Power cut at the agency.
    relay.restart();
    assert_eq!(
        relay.storage_id(),
        storage_id,
        "the storage id is stable across restarts"
    );

    // Jo finds the note in her change feed, with the heads Maria's phone was told.
    let (entries, _) = relay.all_changes(&jo_token, None).await;
    let entry = entries
        .iter()
        .find(|e| e["documentId"] == note.to_string())
        .unwrap_or_else(|| panic!("the note is in Jo's feed: {entries:?}"));
    assert_eq!(
        entry["heads"],
        serde_json::json!(encode_heads(&acknowledged))
    );
    assert_eq!(entry["kind"], "visit-note");
    assert_eq!(entry["patientId"], patient.as_str());
    assert!(
        entries.iter().any(|e| e["documentId"] == chart.to_string()),
        "the chart is in the caseload too"
    );

    // Jo opens and edits it.
    let mut tablet = TestPeer::connect(&relay.ws_url(&jo_token), Some("jo-tablet-storage"))
        .await
        .expect("connect");
    assert_eq!(
        tablet.fetch(note).await,
        SyncOutcome::InSync(acknowledged.clone())
    );
    set(
        tablet.doc_mut(note).expect("note"),
        "plan",
        "Weekly visits; recheck BP.",
    );
    assert!(matches!(tablet.sync(note).await, SyncOutcome::InSync(_)));

    // Maria's phone reconnects (its socket died with the relay) with a concurrent edit of her own.
    phone
        .reconnect(&relay.ws_url(&maria_token))
        .await
        .expect("reconnect");
    set(phone.doc_mut(note).expect("note"), "status", "signed");
    let SyncOutcome::InSync(merged) = phone.sync(note).await else {
        panic!("refused")
    };
    assert_eq!(merged.len(), 2, "two concurrent edits: two heads");

    // The relay forwards Maria's edit to Jo's open session without being asked.
    tablet.wait_for_heads(note, &merged).await;
    for peer in [&phone, &tablet] {
        let doc = peer.doc(note).expect("note");
        assert_eq!(
            get(doc, "assessment").as_deref(),
            Some("Alert and oriented. Lungs clear.")
        );
        assert_eq!(
            get(doc, "plan").as_deref(),
            Some("Weekly visits; recheck BP.")
        );
        assert_eq!(get(doc, "status").as_deref(), Some("signed"));
    }

    // Another crash: a fresh device still gets everything that was acknowledged.
    relay.restart();
    let mut laptop = TestPeer::connect(&relay.ws_url(&jo_token), None)
        .await
        .expect("connect");
    assert_eq!(
        laptop.fetch(note).await,
        SyncOutcome::InSync(merged.clone())
    );
    assert_eq!(
        get(laptop.doc(note).expect("note"), "plan").as_deref(),
        Some("Weekly visits; recheck BP.")
    );

    // Every write was audited, by the device that made it.
    let rows = admin.audit_for_patient(&patient);
    let writes: Vec<_> = rows
        .iter()
        .filter(|r| r["action"] == "write" && r["documentId"] == note.to_string())
        .collect();
    let writers: Vec<_> = writes
        .iter()
        .map(|r| r["userId"].as_str().unwrap_or_default())
        .collect();
    assert!(
        writers.contains(&maria.as_str()) && writers.contains(&jo.as_str()),
        "{writes:?}"
    );
}

#[tokio::test]
async fn a_device_reconnecting_with_nothing_changed_is_sent_no_document_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let office = admin.create_user(&agency, "Sam", "office");
    let (patient, _) = admin.create_patient(&agency, "Ada");
    let token = admin.issue_token(&office, "desk").token;
    let mut relay = RelayProcess::start(dir.path());

    let mut desk = TestPeer::connect(&relay.ws_url(&token), Some("desk-storage"))
        .await
        .expect("connect");
    let notes: Vec<_> = (0..20)
        .map(|_| desk.create(visit_note(&agency, &patient, &office)))
        .collect();
    let first = desk.sync_all(&notes).await;
    assert!(
        first.iter().all(|o| matches!(o, SyncOutcome::InSync(_))),
        "{first:?}"
    );

    relay.restart();
    desk.reconnect(&relay.ws_url(&token))
        .await
        .expect("reconnect");
    let again = desk.sync_all(&notes).await;
    assert_eq!(again, first, "the same heads, confirmed again");
    // Sending a note back to the device that wrote it would be a `read`; none happened.
    let reads = admin
        .audit_for_patient(&patient)
        .into_iter()
        .filter(|r| r["action"] == "read")
        .count();
    assert_eq!(reads, 0);
}
