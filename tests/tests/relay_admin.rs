//! The relay as an agency's security officer runs it, through the real binary: the database
//! encrypted at rest, offboarding from the CLI while a session is live, the CLI's admin log,
//! and a device enrolling with a code through `fieldchart-mobile`.
//!
//! Build the relay first when running only this file: `cargo build -p fieldchart-server`.

use std::path::Path;
use std::time::{Duration, Instant};

use fieldchart_mobile::{DriverError, TlsConfig, enroll, fetch_device_keys};
use fieldchart_tests::relay_process::{
    Admin, RelayProcess, SyncOutcome, TestPeer, set, visit_note,
};
use serde_json::Value;

/// A name no chart would have by chance.
const PATIENT_NAME: &str = "Zebulon Quixotic-Marchbanks";

/// A narrative no note would have by chance.
const NARRATIVE: &str = "Wound on the left heel of Mr Quixotic-Marchbanks measured 2.3 cm";

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

#[tokio::test]
async fn patient_data_is_in_neither_the_database_nor_its_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Ana", "clinician");
    let (patient, chart) = admin.create_patient(&agency, PATIENT_NAME);
    admin.assign(&nurse, &patient);
    let token = admin.issue_token(&nurse, "phone").token;

    // The key was generated beside the database, readable by its owner only.
    let key_file = dir.path().join("relay.key");
    let key_text = std::fs::read_to_string(&key_file).expect("generated key file");
    assert_eq!(key_text.trim().len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "key file mode {mode:o}");
    }

    let mut relay = RelayProcess::start(dir.path());
    let mut peer = TestPeer::connect(&relay.ws_url(&token), Some("phone"))
        .await
        .expect("connect");
    let fetched = peer.fetch(chart).await;
    assert!(matches!(fetched, SyncOutcome::InSync(_)), "{fetched:?}");
    // The stored form is plain enough that an unencrypted file would show the name: what
    // makes this test able to fail.
    let saved = peer.doc(chart).expect("chart").save();
    assert!(
        contains(&saved, PATIENT_NAME),
        "the chart's bytes carry the name in clear"
    );
    let mut note = visit_note(&agency, &patient, &nurse);
    set(&mut note, "narrative", NARRATIVE);
    assert!(contains(&note.save(), NARRATIVE));
    let id = peer.create(note);
    assert!(matches!(peer.sync(id).await, SyncOutcome::InSync(_)));

    // While the relay runs (the WAL holds the latest writes) and after it dies.
    let db = dir.path().join("relay.sqlite3");
    let wal = dir.path().join("relay.sqlite3-wal");
    for moment in ["running", "killed"] {
        if moment == "killed" {
            relay.kill();
        }
        let (db_bytes, wal_bytes) = (file_bytes(&db), file_bytes(&wal));
        assert!(!db_bytes.is_empty(), "{moment}: database missing");
        for needle in [PATIENT_NAME, NARRATIVE, "Quixotic", "SQLite format 3"] {
            assert!(
                !contains(&db_bytes, needle),
                "{moment}: {needle:?} in the database"
            );
            assert!(
                !contains(&wal_bytes, needle),
                "{moment}: {needle:?} in the WAL"
            );
        }
    }

    // A wrong key is a clear error at start (and the data stays readable with the right one:
    // checked after the rotation below).
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "ab".repeat(32)).expect("write key");
    let err = RelayProcess::try_start_with(
        dir.path(),
        &["--key-file".to_owned(), wrong.display().to_string()],
    )
    .expect_err("a wrong key must not start");
    assert!(err.contains("cannot be decrypted"), "{err}");

    // Rotation: rekey with the relay stopped, then it starts with the new key only.
    let new_key = dir.path().join("new.key");
    std::fs::write(&new_key, "cd".repeat(32)).expect("write key");
    let out = admin.run(&["rekey", "--new-key-file", &new_key.display().to_string()]);
    assert_eq!(out["rekeyed"], true, "{out}");
    assert_eq!(out["defaultKeyFileReplaced"], true, "{out}");
    assert_eq!(
        std::fs::read_to_string(&key_file).expect("key").trim(),
        "cd".repeat(32)
    );
    let old = dir.path().join("old.key");
    std::fs::write(&old, key_text).expect("write key");
    let err = RelayProcess::try_start_with(
        dir.path(),
        &["--key-file".to_owned(), old.display().to_string()],
    )
    .expect_err("the old key no longer opens it");
    assert!(err.contains("cannot be decrypted"), "{err}");
    let relay = RelayProcess::start(dir.path());
    let mut peer = TestPeer::connect(&relay.ws_url(&token), Some("phone2"))
        .await
        .expect("connect after rekey");
    assert!(matches!(peer.fetch(id).await, SyncOutcome::InSync(_)));
}

#[tokio::test]
async fn disabling_a_user_on_the_cli_closes_her_live_session_and_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Leaving", "clinician");
    let issued = admin.issue_token(&nurse, "phone");
    let relay = RelayProcess::start(dir.path());
    let mut peer = TestPeer::connect(&relay.ws_url(&issued.token), Some("phone"))
        .await
        .expect("connect");

    let out = admin.run(&["--actor", "dana", "disable-user", "--user", &nurse]);
    let disabled_at = Instant::now();
    assert_eq!(
        out["devicesRevoked"],
        serde_json::json!([issued.device_id]),
        "{out}"
    );
    // A bounded wait only (reached only on failure); the timing claim is the assertion below.
    let reason = tokio::time::timeout(Duration::from_secs(30), peer.closed())
        .await
        .expect("the session closed");
    // The relay polls for the CLI's revocations every 250 ms; a second on a quiet machine,
    // with room for a loaded one.
    assert!(
        disabled_at.elapsed() < Duration::from_secs(3),
        "closed after {:?} ({reason:?})",
        disabled_at.elapsed()
    );
    assert!(
        TestPeer::connect(&relay.ws_url(&issued.token), None)
            .await
            .is_err()
    );
    let refused = RelayProcess::try_admin(
        dir.path(),
        &["issue-token", "--user", &nurse, "--device", "new"],
    );
    assert!(refused.is_err(), "{refused:?}");
    let refused =
        RelayProcess::try_admin(dir.path(), &["enroll", "--user", &nurse, "--device", "new"]);
    assert!(refused.is_err(), "{refused:?}");

    let listed = admin.run(&["list-devices", "--user", &nurse]);
    assert!(listed["disabledAt"].is_string(), "{listed}");
    assert!(listed["devices"][0]["revokedAt"].is_string(), "{listed}");
    assert!(
        listed["devices"][0]["lastSeenAt"].is_string(),
        "seen when it connected: {listed}"
    );

    let rows = admin.admin_log();
    let row = rows
        .iter()
        .find(|r| r["action"] == "disable-user")
        .expect("a disable-user row");
    assert_eq!(row["actor"], "cli:dana");
    assert_eq!(row["source"], "cli");
    assert_eq!(row["target"], Value::String(nurse.clone()));
    assert_eq!(row["agencyId"], Value::String(agency.clone()));
    assert!(row["atMs"].as_i64().unwrap_or(0) > 0);
    for action in [
        "create-agency",
        "create-user",
        "issue-token",
        "list-devices",
    ] {
        assert!(
            rows.iter().any(|r| r["action"] == action),
            "no {action} row in {rows:#?}"
        );
    }
}

#[tokio::test]
async fn a_device_enrolls_with_a_code_and_reads_its_agencys_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Ana", "clinician");
    let code = admin.enroll(&nurse, "Ana's phone");
    let relay = RelayProcess::start(dir.path());
    let tls = TlsConfig::default();
    let key = [42u8; 32];

    let enrolled = enroll(&relay.http_base(), &code, Some("Pixel"), key, &tls)
        .await
        .expect("enrolled");
    assert_eq!(
        (enrolled.user_id.as_str(), enrolled.agency_id.as_str()),
        (nurse.as_str(), agency.as_str())
    );
    assert_eq!(enrolled.role, "clinician");
    match enroll(&relay.http_base(), &code, None, [43; 32], &tls).await {
        Err(DriverError::Refused { status: 409, .. }) => {}
        other => panic!("a used code must be refused: {other:?}"),
    }

    let keys: Value = serde_json::from_str(
        &fetch_device_keys(&relay.http_base(), &enrolled.token, &tls)
            .await
            .expect("keys"),
    )
    .expect("json");
    assert_eq!(keys["agencyId"], Value::String(agency.clone()));
    assert_eq!(
        keys["keys"][0]["deviceId"],
        Value::String(enrolled.device_id.clone())
    );
    assert_eq!(keys["keys"][0]["publicKey"], Value::String("2a".repeat(32)));
    assert_eq!(keys["keys"][0]["revokedAtMs"], Value::Null);

    // The enrolled token syncs like any other.
    let mut peer = TestPeer::connect(&relay.ws_url(&enrolled.token), Some("pixel"))
        .await
        .expect("connect with the enrolled token");
    let id = peer.create(visit_note(&agency, "pat_unknown", &nurse));
    let _ = peer.sync(id).await;
    admin.run(&["revoke-device", "--device", &enrolled.device_id]);
    let office = admin.create_user(&agency, "Office", "office");
    let office_token = admin.issue_token(&office, "desk").token;
    let keys: Value = serde_json::from_str(
        &fetch_device_keys(&relay.http_base(), &office_token, &tls)
            .await
            .expect("keys"),
    )
    .expect("json");
    assert!(keys["keys"][0]["revokedAtMs"].as_i64().is_some(), "{keys}");
}
