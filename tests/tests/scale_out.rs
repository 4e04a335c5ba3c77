//! Two real relay processes on one PostgreSQL database (issue 12): devices split across them,
//! as behind a load balancer without sticky sessions.
//!
//! Needs PostgreSQL (see `fieldchart_tests::postgres`): each test makes a database of its own
//! and drops it at the end; an unreachable server fails the test and says so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use automerge::{Automerge, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue};
use fieldchart_core::protocol::{DocumentId, encode_heads};
use fieldchart_tests::day_in_the_field::day_in_the_field;
use fieldchart_tests::postgres::TestDatabase;
use fieldchart_tests::relay_process::{
    Admin, IssuedToken, RelayProcess, SyncOutcome, TestPeer, get, set, visit_note,
};
use serde_json::{Value, json};

/// How long `npm ci` in `tests/js` may take on a cold cache.
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(300);
/// The JS run's own bound on everything it waits for (`--timeout-ms`).
const JS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the test waits for the JS run to exit: its own bound plus slack, so a run that
/// times out reports why first.
const JS_EXIT_TIMEOUT: Duration = Duration::from_secs(75);
/// The JS packages `tests/js/package.json` pins; a missing or stale install is reinstalled.
const JS_PINNED: [(&str, &str); 3] = [
    ("@automerge/automerge-repo", "2.5.6"),
    ("@automerge/automerge-repo-network-websocket", "2.5.6"),
    ("@automerge/automerge", "3.5.0"),
];

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

/// The day-in-the-field story of `device_sync.rs` ([`day_in_the_field`]) with two relay
/// processes on one PostgreSQL database: no device meets the same relay on two passes in a row,
/// as behind a load balancer without sticky sessions. Everyone still ends with identical
/// documents, every concurrent edit, the draft a draft, signatures verifying and receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_in_the_field_split_across_two_relays_converges() {
    let db = TestDatabase::create();
    let admin = Admin::postgres(db.url());
    let dir = tempfile::tempdir().expect("tempdir");
    day_in_the_field(dir.path(), &admin, || {
        let one = RelayProcess::start_postgres(dir.path(), db.url());
        let two = RelayProcess::start_postgres(dir.path(), db.url());
        assert_eq!(one.storage_id(), two.storage_id());
        vec![one, two]
    })
    .await;
}

// --- the stock JS client across relays -----------------------------------------------------------

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("js")
}

fn js_installed(package: &str) -> Option<String> {
    let manifest = js_dir()
        .join("node_modules")
        .join(package)
        .join("package.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(manifest).ok()?).ok()?;
    json["version"].as_str().map(str::to_owned)
}

/// Run `command` to its end within `timeout`: `(success, stdout, stderr)`; panics with a clear
/// message when it cannot start or does not finish (it is killed then).
async fn run_bounded(
    mut command: tokio::process::Command,
    timeout: Duration,
) -> (bool, String, String) {
    let shown = format!("{:?}", command.as_std());
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {shown}: {e} (the JS tests need Node.js 20+ and npm on PATH)")
        });
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `npm ci` in `tests/js` unless the pinned packages are installed.
async fn ensure_js_packages() {
    let current = JS_PINNED
        .iter()
        .all(|(package, version)| js_installed(package).as_deref() == Some(*version));
    if !current {
        let mut ci = tokio::process::Command::new("npm");
        ci.args(["ci", "--no-audit", "--no-fund"])
            .current_dir(js_dir());
        let (ok, out, err) = run_bounded(ci, NPM_CI_TIMEOUT).await;
        assert!(ok, "`npm ci` in tests/js failed:\n{out}\n{err}");
    }
    for (package, version) in JS_PINNED {
        assert_eq!(
            js_installed(package).as_deref(),
            Some(version),
            "tests/js/node_modules holds another {package}"
        );
    }
}

/// A document as JSON, the way `two_relays.mjs` prints one: maps as objects, lists as
/// arrays, Text and scalar strings as strings, numbers as numbers.
fn json_of(doc: &Automerge, obj: &ObjId) -> Value {
    let value = |v: automerge::Value<'_>, id: ObjId| match v {
        automerge::Value::Object(_) => json_of(doc, &id),
        automerge::Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => Value::String(s.to_string()),
            ScalarValue::Int(n) => json!(n),
            ScalarValue::Uint(n) => json!(n),
            ScalarValue::F64(n) => json!(n),
            ScalarValue::Boolean(b) => json!(b),
            ScalarValue::Null => Value::Null,
            other => panic!("no JSON form for the scalar {other:?}"),
        },
    };
    match doc.object_type(obj).expect("an object") {
        ObjType::Map | ObjType::Table => Value::Object(
            doc.keys(obj)
                .map(|key| {
                    let (v, id) = doc
                        .get(obj, key.as_str())
                        .expect("read")
                        .expect("a listed key");
                    (key, value(v, id))
                })
                .collect(),
        ),
        ObjType::List => Value::Array(
            (0..doc.length(obj))
                .map(|i| {
                    let (v, id) = doc.get(obj, i).expect("read").expect("an element");
                    value(v, id)
                })
                .collect(),
        ),
        ObjType::Text => Value::String(doc.text(obj).expect("text")),
    }
}

/// Heads as the JS client prints them (bs58check strings), sorted.
fn js_heads(heads: &Value) -> Vec<String> {
    let mut heads: Vec<String> = heads
        .as_array()
        .unwrap_or_else(|| panic!("not a list of heads: {heads}"))
        .iter()
        .map(|h| h.as_str().expect("a head").to_owned())
        .collect();
    heads.sort();
    heads
}

/// The unmodified JS automerge-repo client writes a visit note through relay 1; a fresh JS
/// client on relay 2 reads it back with the same heads and content, and then receives a later
/// edit made through relay 1 live. A Rust device on relay 2 holds the same heads and content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_js_client_writing_through_one_relay_is_read_back_identical_through_the_other() {
    ensure_js_packages().await;
    let db = TestDatabase::create();
    let admin = Admin::postgres(db.url());
    let a = agency(&admin, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let one = RelayProcess::start_postgres(dir.path(), db.url());
    let two = RelayProcess::start_postgres(dir.path(), db.url());

    let mut node = tokio::process::Command::new("node");
    node.arg("two_relays.mjs")
        .args(["--relay1", &format!("ws://{}/v1/sync", one.addr())])
        .args(["--relay2", &format!("ws://{}/v1/sync", two.addr())])
        .args(["--agency", &a.agency_id, "--patient", &a.patient_id])
        .args(["--created-by", &a.nurse])
        .args(["--timeout-ms", &JS_TIMEOUT.as_millis().to_string()])
        .env("FIELDCHART_WRITER_TOKEN", &a.tokens[0].token)
        .env("FIELDCHART_READER_TOKEN", &a.tokens[1].token)
        .current_dir(js_dir());
    let (ok, stdout, stderr) = run_bounded(node, JS_EXIT_TIMEOUT).await;
    let events: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.into())))
        .collect();
    let event = |name: &str| {
        events
            .iter()
            .find(|e| e["event"] == name)
            .unwrap_or_else(|| {
                panic!(
                    "no `{name}` from two_relays.mjs: {events:#?}\nstderr:\n{stderr}\n\
                     relay 1:\n{}\nrelay 2:\n{}",
                    one.logs(),
                    two.logs()
                )
            })
            .clone()
    };
    let (stored, read, live) = (event("stored"), event("read"), event("live"));
    event("done");
    assert!(ok, "two_relays.mjs failed: {events:#?}\n{stderr}");

    // Both relays are one storage (the JS client keys what a relay holds by its storage id).
    assert_eq!(stored["relayStorageId"], one.storage_id());
    assert_eq!(read["relayStorageId"], two.storage_id());
    // Read back through relay 2: the same document, heads and content as written.
    assert_eq!(read["documentId"], stored["documentId"]);
    assert_eq!(js_heads(&read["heads"]), js_heads(&stored["heads"]));
    assert_eq!(read["doc"], stored["doc"]);
    assert_eq!(
        read["doc"]["assessment"], "Patient alert and oriented. Lungs clear.",
        "{read}"
    );
    // The later edit through relay 1 reached the reader on relay 2 whole.
    assert_eq!(js_heads(&live["heads"]), js_heads(&live["writerHeads"]));
    assert_eq!(
        live["doc"]["plan"], "Continue wound care; recheck Friday.",
        "{live}"
    );

    // A Rust device on relay 2 reads the same note: the same heads, the same content.
    let note = DocumentId::from_url(stored["documentId"].as_str().expect("documentId"))
        .expect("a document id");
    let mut device = peer(&two, &a.tokens[2], "rust-phone").await;
    let heads = in_sync(device.fetch(note).await);
    let mut heads = encode_heads(&heads);
    heads.sort();
    assert_eq!(
        heads,
        js_heads(&live["heads"]),
        "the Rust device's heads on relay 2"
    );
    let doc = device.doc(note).expect("note");
    assert_eq!(
        json_of(doc, &ROOT),
        live["doc"],
        "the Rust device's note on relay 2"
    );
    // The schema's root strings arrived as scalars, as written (not turned into Text).
    assert!(matches!(
        doc.get(ROOT, "kind").expect("read"),
        Some((automerge::Value::Scalar(_), _))
    ));
}
