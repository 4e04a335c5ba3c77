//! Two real relay processes on one PostgreSQL database (issue 12): devices split across them,
//! as behind a load balancer without sticky sessions.
//!
//! Needs PostgreSQL (see `fieldchart_tests::postgres`): each test makes a database of its own
//! and drops it at the end; an unreachable server fails the test and says so.

use automerge::{Automerge, ChangeHash};
use fieldchart_core::protocol::DocumentId;
use fieldchart_tests::postgres::TestDatabase;
use fieldchart_tests::relay_process::{
    Admin, IssuedToken, RelayProcess, SyncOutcome, TestPeer, get, set, visit_note,
};
use serde_json::Value;

/// An agency with a nurse on one patient's care team, and `devices` tokens of that nurse.
struct Agency {
    agency_id: String,
    patient_id: String,
    chart: DocumentId,
    nurse: String,
    tokens: Vec<IssuedToken>,
}

fn agency(admin: &Admin, devices: usize) -> Agency {
    let agency_id = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency_id, "Ana", "clinician");
    let (patient_id, chart) = admin.create_patient(&agency_id, "Pat");
    admin.assign(&nurse, &patient_id);
    let tokens = (0..devices)
        .map(|i| admin.issue_token(&nurse, &format!("phone {i}")))
        .collect();
    Agency {
        agency_id,
        patient_id,
        chart,
        nurse,
        tokens,
    }
}

async fn peer(relay: &RelayProcess, token: &IssuedToken, storage: &str) -> TestPeer {
    TestPeer::connect(&relay.ws_url(&token.token), Some(storage))
        .await
        .expect("connect")
}

fn in_sync(outcome: SyncOutcome) -> Vec<ChangeHash> {
    match outcome {
        SyncOutcome::InSync(heads) => heads,
        other => panic!("expected the document in sync, got {other:?}"),
    }
}

/// A live edit through relay 1 reaches a device connected to relay 2 while both stay
/// connected (relay 2 learns of it through LISTEN/NOTIFY), and a change-feed cursor issued by
/// relay 1 is good on relay 2 (one epoch for the database, one sequence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_edit_through_one_relay_reaches_a_device_on_the_other() {
    let db = TestDatabase::create();
    let admin = Admin::postgres(db.url());
    let a = agency(&admin, 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let one = RelayProcess::start_postgres(dir.path(), db.url());
    let two = RelayProcess::start_postgres(dir.path(), db.url());
    assert_eq!(
        one.storage_id(),
        two.storage_id(),
        "one database, one storage id"
    );

    let mut writer = peer(&one, &a.tokens[0], "writer-phone").await;
    let mut reader = peer(&two, &a.tokens[1], "reader-phone").await;
    in_sync(writer.fetch(a.chart).await);
    in_sync(reader.fetch(a.chart).await);

    // A visit note made on relay 1 and a live edit of the chart.
    let note = writer.create(visit_note(&a.agency_id, &a.patient_id, &a.nurse));
    in_sync(writer.sync(note).await);
    set(
        writer.doc_mut(a.chart).expect("chart"),
        "allergies",
        "penicillin",
    );
    let heads = in_sync(writer.sync(a.chart).await);
    // Relay 2 pushes it to its device unasked (bounded by the peer's message timeout).
    reader.wait_for_heads(a.chart, &heads).await;
    assert_eq!(
        get(reader.doc(a.chart).expect("chart"), "allergies").as_deref(),
        Some("penicillin")
    );
    // The note, fetched through relay 2, is what relay 1 stored.
    let note_heads = writer.doc(note).expect("note").get_heads();
    assert_eq!(in_sync(reader.fetch(note).await), note_heads);

    // A cursor of relay 1 continues on relay 2: no reset, and the next edit appears after it.
    let (first, cursor) = one.all_changes(&a.tokens[0].token, None).await;
    assert!(first.len() >= 2, "chart and note in the feed: {first:?}");
    set(reader.doc_mut(a.chart).expect("chart"), "pulse", "72");
    in_sync(reader.sync(a.chart).await);
    let (status, page) = two.changes(&a.tokens[1].token, Some(&cursor)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["reset"], Value::Bool(false), "{page}");
    let changed: Vec<&str> = page["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .filter_map(|c| c["documentId"].as_str())
        .collect();
    assert_eq!(changed, vec![a.chart.to_string().as_str()], "{page}");
    drop(reader);
    drop(writer);
}

/// Devices split across two relays edit their notes pass after pass; relay 2 is killed
/// (SIGKILL) once every device has completed a pass through it. Its devices reconnect to
/// relay 1 and carry on; in the end every device, and a fresh device reading everything
/// through relay 1, holds every edit: nothing acknowledged was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_relay_mid_storm_moves_its_devices_and_loses_nothing() {
    const DEVICES: usize = 6;
    const PASSES_BEFORE: usize = 3;
    const PASSES_AFTER: usize = 3;
    let db = TestDatabase::create();
    let admin = Admin::postgres(db.url());
    let a = agency(&admin, DEVICES + 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let one = RelayProcess::start_postgres(dir.path(), db.url());
    let mut two = RelayProcess::start_postgres(dir.path(), db.url());

    // Even devices on relay 1, odd on relay 2. Each has its own note and edits the shared chart.
    let mut peers = Vec::new();
    let mut notes = Vec::new();
    for (i, token) in a.tokens.iter().take(DEVICES).enumerate() {
        let relay = if i % 2 == 0 { &one } else { &two };
        let mut p = peer(relay, token, &format!("phone-{i}")).await;
        in_sync(p.fetch(a.chart).await);
        let note = p.create(visit_note(&a.agency_id, &a.patient_id, &a.nurse));
        in_sync(p.sync(note).await);
        notes.push(note);
        peers.push(p);
    }

    let edit_pass = |p: &mut TestPeer, i: usize, pass: usize, note: DocumentId| {
        set(
            p.doc_mut(note).expect("note"),
            &format!("pass-{pass}"),
            &format!("device {i}"),
        );
        set(
            p.doc_mut(a.chart).expect("chart"),
            &format!("device-{i}-pass-{pass}"),
            "done",
        );
    };
    for pass in 0..PASSES_BEFORE {
        for (i, p) in peers.iter_mut().enumerate() {
            edit_pass(p, i, pass, notes[i]);
            for outcome in p.sync_all(&[notes[i], a.chart]).await {
                in_sync(outcome);
            }
        }
    }
    // Mid-storm: every device has completed PASSES_BEFORE acknowledged passes; relay 2 dies
    // with its devices connected.
    two.kill();
    for pass in PASSES_BEFORE..PASSES_BEFORE + PASSES_AFTER {
        for (i, p) in peers.iter_mut().enumerate() {
            edit_pass(p, i, pass, notes[i]);
            if i % 2 == 1 && pass == PASSES_BEFORE {
                // Its relay is gone: the device reconnects through the load balancer, which now
                // sends it to relay 1.
                p.reconnect(&one.ws_url(&a.tokens[i].token))
                    .await
                    .expect("reconnect to relay 1");
            }
            for outcome in p.sync_all(&[notes[i], a.chart]).await {
                in_sync(outcome);
            }
        }
    }
    // Everyone converges on the chart: a final round of syncs.
    for p in peers.iter_mut() {
        in_sync(p.sync(a.chart).await);
    }
    let mut fresh = peer(&one, &a.tokens[DEVICES], "fresh-phone").await;
    let chart_heads = in_sync(fresh.fetch(a.chart).await);
    let chart = fresh.doc(a.chart).expect("chart").clone();
    for i in 0..DEVICES {
        for pass in 0..PASSES_BEFORE + PASSES_AFTER {
            assert_eq!(
                get(&chart, &format!("device-{i}-pass-{pass}")).as_deref(),
                Some("done"),
                "device {i} pass {pass} lost from the chart"
            );
        }
        let heads = in_sync(fresh.fetch(notes[i]).await);
        assert_eq!(
            heads,
            peers[i].doc(notes[i]).expect("note").get_heads(),
            "device {i}'s note"
        );
        let note: &Automerge = fresh.doc(notes[i]).expect("note");
        for pass in 0..PASSES_BEFORE + PASSES_AFTER {
            assert_eq!(
                get(note, &format!("pass-{pass}")).as_deref(),
                Some(format!("device {i}").as_str())
            );
        }
    }
    for p in peers.iter_mut() {
        p.wait_for_heads(a.chart, &chart_heads).await;
    }
}
