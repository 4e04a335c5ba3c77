//! Who may see a patient's note, through the real relay process: every outcome of the access
//! matrix, and the audit row each one leaves, read back through the admin CLI and the admin
//! HTTP API; which kinds of document each role may create; and a device that still holds a
//! note it may no longer see.
//!
//! `deny` rows are written just after the device has its answer, so tests read them back with
//! a bounded number of CLI runs ([`audit_until`]).

use std::time::{Duration, Instant};

use fieldchart_tests::relay_process::{
    Admin, ConnectError, RelayProcess, SyncOutcome, TestPeer, set, visit_note,
};
use serde_json::Value;

/// Revoking a device must close its open session within a second (DESIGN §5, DOMAIN "lost
/// devices"): the relay polls for the CLI's revocations every 250 ms. The assertion adds a
/// 2 s margin for a loaded 2-core machine (two compilers and the CLI process competing with the
/// relay); the measured time is printed.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(1);
const LOAD_MARGIN: Duration = Duration::from_secs(2);

/// The `audit` CLI's rows for `args`, re-run (a bounded number of times) until `done` holds.
fn audit_until(admin: &Admin, args: &[&str], done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    for _ in 0..100 {
        let rows = admin.run(args)["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if done(&rows) {
            return rows;
        }
    }
    panic!("the expected audit rows never appeared");
}

fn rows_of<'a>(rows: &'a [Value], user: &str, action: &str) -> Vec<&'a Value> {
    rows.iter()
        .filter(|r| r["userId"] == user && r["action"] == action)
        .collect()
}

#[tokio::test]
async fn the_access_matrix_with_its_audit_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let other_agency = admin.create_agency("Hillside");
    let nurse = admin.create_user(&agency, "On the team", "clinician");
    let outsider = admin.create_user(&agency, "Off the team", "clinician");
    let office = admin.create_user(&agency, "Case manager", "office");
    let agency_admin = admin.create_user(&agency, "Administrator", "admin");
    let stranger = admin.create_user(&other_agency, "Other agency", "office");
    let late = admin.create_user(&agency, "Expired", "clinician");
    let (patient, _) = admin.create_patient(&agency, "Ada");
    admin.assign(&nurse, &patient);
    admin.assign(&late, &patient);
    let tokens: Vec<String> = [&nurse, &outsider, &office, &agency_admin, &stranger]
        .iter()
        .map(|u| admin.issue_token(u, "device").token)
        .collect();
    let expired = admin.run(&[
        "issue-token",
        "--user",
        &late,
        "--device",
        "old",
        "--expires-at",
        "2000-01-01T00:00:00Z",
    ]);
    let relay = RelayProcess::start(dir.path());

    // The nurse on the care team writes a note.
    let mut phone = TestPeer::connect(&relay.ws_url(&tokens[0]), Some("phone"))
        .await
        .expect("connect");
    let note = phone.create(visit_note(&agency, &patient, &nurse));
    let SyncOutcome::InSync(heads) = phone.sync(note).await else {
        panic!("the care team's nurse was refused")
    };

    // Everyone else asks for it.
    for (token, may_read) in [
        (&tokens[1], false),
        (&tokens[2], true),
        (&tokens[3], true),
        (&tokens[4], false),
    ] {
        let mut peer = TestPeer::connect(&relay.ws_url(token), None)
            .await
            .expect("connect");
        let expected = if may_read {
            SyncOutcome::InSync(heads.clone())
        } else {
            SyncOutcome::Unavailable
        };
        assert_eq!(peer.fetch(note).await, expected);
        peer.close().await;
    }
    // The expired token never gets to speak the protocol.
    let url = relay.ws_url(expired["token"].as_str().expect("token"));
    assert_eq!(
        TestPeer::connect(&url, None).await.err(),
        Some(ConnectError::Status(401))
    );

    let note_id = note.to_string();
    let rows = audit_until(&admin, &["audit", "--patient", &patient], |rows| {
        rows.iter()
            .any(|r| r["userId"] == outsider.as_str() && r["action"] == "deny")
    });
    let about_note: Vec<Value> = rows
        .into_iter()
        .filter(|r| r["documentId"] == note_id)
        .collect();
    assert_eq!(
        rows_of(&about_note, &nurse, "write").len(),
        1,
        "{about_note:#?}"
    );
    assert!(rows_of(&about_note, &nurse, "deny").is_empty());
    for reader in [&office, &agency_admin] {
        let reads = rows_of(&about_note, reader, "read");
        assert_eq!(reads.len(), 1, "{reader}: {about_note:#?}");
        assert_eq!(
            reads[0]["heads"],
            serde_json::json!(fieldchart_core::protocol::encode_heads(&heads))
        );
        assert_eq!(reads[0]["patientId"], patient.as_str());
    }
    assert_eq!(
        rows_of(&about_note, &outsider, "deny").len(),
        1,
        "{about_note:#?}"
    );
    // A user of another agency is denied in *their* agency's trail, naming no patient of ours.
    assert!(
        about_note.iter().all(|r| r["userId"] != stranger.as_str()),
        "{about_note:#?}"
    );
    let theirs = audit_until(&admin, &["audit", "--user", &stranger], |rows| {
        rows.iter().any(|r| r["documentId"] == note_id.as_str())
    });
    let denial = theirs
        .iter()
        .find(|r| r["documentId"] == note_id.as_str())
        .expect("the stranger's deny row");
    assert_eq!(denial["action"], "deny");
    assert_eq!(denial["agencyId"], other_agency.as_str());
    assert_eq!(denial["patientId"], Value::Null);
    assert!(
        about_note.iter().all(|r| r["userId"] != late.as_str()),
        "a refused token leaves no document row"
    );

    // The same rows, by user and as CSV, through the CLI.
    let by_user = admin.run(&["audit", "--user", &outsider, "--format", "csv"]);
    let csv = by_user["rows"].as_str().expect("csv text");
    assert!(
        csv.lines()
            .any(|l| l.contains(&note_id) && l.contains(",deny,")),
        "{csv}"
    );

    // And through the admin HTTP API, scoped to the admin's agency.
    let admin_token = &tokens[3];
    let url = format!("{}/v1/admin/audit?patient={patient}", relay.http_base());
    let (status, body) = relay.get(&url, admin_token).await;
    assert_eq!(status, 200, "{body}");
    let api_rows = body["rows"].as_array().expect("rows");
    assert!(api_rows.iter().any(|r| r["documentId"] == note_id
        && r["userId"] == outsider.as_str()
        && r["action"] == "deny"));
    assert!(api_rows.iter().all(|r| r["userId"] != stranger.as_str()));
    let (status, _) = relay.get(&url, &tokens[4]).await;
    assert_eq!(
        status, 403,
        "an office user of another agency is not an admin"
    );
}

#[tokio::test]
async fn revoking_a_device_from_the_cli_closes_its_open_session_within_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let (patient, _) = admin.create_patient(&agency, "Ada");
    admin.assign(&nurse, &patient);
    let lost_phone = admin.issue_token(&nurse, "lost phone");
    let new_phone = admin.issue_token(&nurse, "new phone");
    let relay = RelayProcess::start(dir.path());

    let mut phone = TestPeer::connect(&relay.ws_url(&lost_phone.token), Some("lost"))
        .await
        .expect("connect");
    let note = phone.create(visit_note(&agency, &patient, &nurse));
    assert!(matches!(phone.sync(note).await, SyncOutcome::InSync(_)));
    let mut other = TestPeer::connect(&relay.ws_url(&new_phone.token), Some("new"))
        .await
        .expect("connect");

    // The admin CLI is another process on the same database, while the relay runs.
    let revoked = admin.run(&["revoke-device", "--device", &lost_phone.device_id]);
    assert_eq!(revoked["revoked"], true);
    let since = Instant::now();
    let reason = phone.closed().await;
    let took = since.elapsed();
    println!("revocation closed the session after {took:?}");
    assert!(
        took < REVOCATION_DEADLINE + LOAD_MARGIN,
        "the session closed after {took:?}"
    );
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("revoked")),
        "{reason:?}"
    );

    // The token is dead for new connections too; the user's other device is untouched.
    assert_eq!(
        TestPeer::connect(&relay.ws_url(&lost_phone.token), None)
            .await
            .err(),
        Some(ConnectError::Status(401))
    );
    assert!(matches!(other.fetch(note).await, SyncOutcome::InSync(_)));
}

#[tokio::test]
async fn a_new_note_for_a_patient_off_the_care_team_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let office = admin.create_user(&agency, "Sam", "office");
    let (mine, _) = admin.create_patient(&agency, "Ada");
    let (not_mine, _) = admin.create_patient(&agency, "Grace");
    admin.assign(&nurse, &mine);
    let nurse_token = admin.issue_token(&nurse, "phone").token;
    let office_token = admin.issue_token(&office, "desk").token;
    let relay = RelayProcess::start(dir.path());

    let mut phone = TestPeer::connect(&relay.ws_url(&nurse_token), Some("phone"))
        .await
        .expect("connect");
    let refused = phone.create(visit_note(&agency, &not_mine, &nurse));
    assert_eq!(phone.sync(refused).await, SyncOutcome::Unavailable);

    // Nothing of it is stored: the office, who sees the whole agency, cannot find it.
    let (entries, _) = relay.all_changes(&office_token, None).await;
    assert!(
        entries
            .iter()
            .all(|e| e["documentId"] != refused.to_string())
    );
    let mut desk = TestPeer::connect(&relay.ws_url(&office_token), None)
        .await
        .expect("connect");
    assert_eq!(desk.fetch(refused).await, SyncOutcome::Unavailable);

    let rows = audit_until(&admin, &["audit", "--patient", &not_mine], |rows| {
        !rows_of(rows, &nurse, "deny").is_empty()
    });
    let denials = rows_of(&rows, &nurse, "deny");
    assert_eq!(denials.len(), 1, "{rows:#?}");
    assert_eq!(denials[0]["documentId"], refused.to_string());
    assert!(rows.iter().all(|r| r["action"] != "write"));
}

#[tokio::test]
async fn each_role_creates_only_the_kinds_it_may() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let office = admin.create_user(&agency, "Sam", "office");
    let agency_admin = admin.create_user(&agency, "Alex", "admin");
    let (patient, _) = admin.create_patient(&agency, "Ada");
    admin.assign(&nurse, &patient);
    let tokens: Vec<String> = [&nurse, &office, &agency_admin]
        .iter()
        .map(|u| admin.issue_token(u, "device").token)
        .collect();
    let relay = RelayProcess::start(dir.path());

    // (who, kind, may create): patient charts come only with their patient (admin CLI/API).
    let cases = [
        (0, "patient", false),
        (0, "schedule", false),
        (0, "visit-note", true),
        (1, "patient", false),
        (1, "schedule", true),
        (1, "visit-note", true),
        (2, "patient", false),
        (2, "visit-note", true),
    ];
    for (who, kind, allowed) in cases {
        let mut peer = TestPeer::connect(&relay.ws_url(&tokens[who]), None)
            .await
            .expect("connect");
        let mut doc = visit_note(&agency, &patient, "someone");
        set(&mut doc, "kind", kind);
        let id = peer.create(doc);
        let outcome = peer.sync(id).await;
        assert_eq!(
            matches!(outcome, SyncOutcome::InSync(_)),
            allowed,
            "user {who} creating {kind}: {outcome:?}"
        );
        peer.close().await;
    }
}

#[tokio::test]
async fn a_device_holding_a_note_it_may_no_longer_see_gets_what_an_unknown_id_gets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let leaver = admin.create_user(&agency, "Jo", "clinician");
    let (patient, _) = admin.create_patient(&agency, "Ada");
    admin.assign(&nurse, &patient);
    admin.assign(&leaver, &patient);
    let nurse_token = admin.issue_token(&nurse, "phone").token;
    let leaver_token = admin.issue_token(&leaver, "phone").token;
    let relay = RelayProcess::start(dir.path());

    let mut phone = TestPeer::connect(&relay.ws_url(&nurse_token), None)
        .await
        .expect("connect");
    let note = phone.create(visit_note(&agency, &patient, &nurse));
    let SyncOutcome::InSync(heads) = phone.sync(note).await else {
        panic!("refused")
    };
    let mut old_phone = TestPeer::connect(&relay.ws_url(&leaver_token), Some("old"))
        .await
        .expect("connect");
    assert_eq!(
        old_phone.fetch(note).await,
        SyncOutcome::InSync(heads.clone())
    );

    // Taken off the care team; she edits her copy offline and syncs it.
    admin.run(&["unassign", "--user", &leaver, "--patient", &patient]);
    set(
        old_phone.doc_mut(note).expect("copy"),
        "assessment",
        "written after losing access",
    );
    assert_eq!(old_phone.sync(note).await, SyncOutcome::Unavailable);
    // The stored note is untouched.
    assert!(matches!(phone.fetch(note).await, SyncOutcome::InSync(h) if h == heads));
    let rows = audit_until(&admin, &["audit", "--patient", &patient], |rows| {
        !rows_of(rows, &leaver, "deny").is_empty()
    });
    assert!(rows_of(&rows, &leaver, "write").is_empty(), "{rows:#?}");
}
