//! The stock JS client against the real relay: `@automerge/automerge-repo` 2.5.6 and
//! `@automerge/automerge-repo-network-websocket` 2.5.6, unmodified and pinned by
//! `tests/js/package-lock.json`, driven by `tests/js/client.mjs`. DESIGN §4 promises that any JS
//! automerge-repo client can sync with the relay; these tests hold the relay to it.
//!
//! Needs Node 20+ and npm on `PATH`. When `tests/js/node_modules` is missing (or holds other
//! versions) the tests run `npm ci` there first; without node or npm they fail and say so.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT, ReadDoc, ScalarValue};
use fieldchart_core::protocol::{DocumentId, encode_heads};
use fieldchart_tests::relay_process::{RelayProcess, SyncOutcome, TestPeer};
use serde_json::Value;

/// How long `npm ci` may take on a cold cache.
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(300);
/// Each JS client's own bound on everything it waits for (`--timeout-ms`).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the test waits for one line from a JS client: its own timeout plus slack, so a
/// client that times out reports why before the test gives up on it.
const EVENT_TIMEOUT: Duration = Duration::from_secs(40);
/// How long `node --version` / `npm --version` may take.
const TOOL_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Oldest Node.js major version the pinned packages support (`engines` in tests/js/package.json).
const MIN_NODE_MAJOR: u32 = 20;
/// Versions the JS side must run (package.json pins them; a stale node_modules is reinstalled).
const PINNED: [(&str, &str); 3] = [
    ("@automerge/automerge-repo", "2.5.6"),
    ("@automerge/automerge-repo-network-websocket", "2.5.6"),
    ("@automerge/automerge", "3.5.0"),
];

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("js")
}

// --- child processes with deadlines -----------------------------------------------------------

/// A child process that is killed when dropped, so a failing assertion never leaks one.
#[derive(Debug)]
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects a pipe on a thread, so a chatty child never blocks on a full pipe.
fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&out);
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock().expect("pipe buffer lock").push_str(&chunk);
        }
    });
    out
}

fn text_of(buffer: &Arc<Mutex<String>>) -> String {
    buffer.lock().expect("pipe buffer lock").clone()
}

/// Waits for `child` until `timeout`, killing it on expiry.
fn wait_bounded(child: &mut Killed, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.0.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.0.kill();
                let _ = child.0.wait();
                return None;
            }
        }
    }
}

/// Runs a command to completion within `timeout`; returns (success, stdout, stderr), or an
/// explanation when it could not start or did not finish.
fn run_bounded(mut command: Command, timeout: Duration) -> Result<(bool, String, String), String> {
    let shown = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    let mut child = Killed(child);
    let collect = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = collect(Box::new(child.0.stdout.take().expect("piped stdout")));
    let stderr = collect(Box::new(child.0.stderr.take().expect("piped stderr")));
    let status = wait_bounded(&mut child, timeout)
        .ok_or_else(|| format!("{shown} did not finish within {timeout:?}"))?;
    // The readers see end-of-file once the child (and anything holding its pipes) is gone.
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok((status.success(), stdout, stderr))
}

// --- the JS side ------------------------------------------------------------------------------

fn installed_version(package: &str) -> Option<String> {
    let manifest = js_dir()
        .join("node_modules")
        .join(package)
        .join("package.json");
    let text = std::fs::read_to_string(manifest).ok()?;
    let json: Value = serde_json::from_str(&text).ok()?;
    json["version"].as_str().map(str::to_owned)
}

/// Checks node and npm, and runs `npm ci` in `tests/js` when the pinned packages are not
/// installed. Once per test binary.
fn ensure_js_client() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        for tool in ["node", "npm"] {
            let mut probe = Command::new(tool);
            probe.arg("--version");
            match run_bounded(probe, TOOL_PROBE_TIMEOUT) {
                Ok((true, version, _)) if tool == "node" => {
                    // `v20.20.2`
                    let major = version.trim().trim_start_matches('v').split('.').next();
                    let major: u32 = major.and_then(|m| m.parse().ok()).unwrap_or(0);
                    if major < MIN_NODE_MAJOR {
                        return Err(format!(
                            "node {} is too old: the JS interop test needs Node.js {MIN_NODE_MAJOR}+",
                            version.trim()
                        ));
                    }
                }
                Ok((true, _, _)) => {}
                Ok((false, out, err)) => {
                    return Err(format!("`{tool} --version` failed: {out}{err}"));
                }
                Err(e) => {
                    return Err(format!(
                        "{e}\nthe JS interop test needs Node.js 20+ and npm on PATH \
                         (then `npm ci --prefix tests/js`)"
                    ));
                }
            }
        }
        let current = PINNED
            .iter()
            .all(|(package, version)| installed_version(package).as_deref() == Some(*version));
        if !current {
            let mut ci = Command::new("npm");
            ci.args(["ci", "--no-audit", "--no-fund"])
                .current_dir(js_dir());
            match run_bounded(ci, NPM_CI_TIMEOUT)? {
                (true, _, _) => {}
                (false, out, err) => {
                    return Err(format!("`npm ci` in tests/js failed:\n{out}\n{err}"));
                }
            }
        }
        for (package, version) in PINNED {
            let found = installed_version(package);
            if found.as_deref() != Some(version) {
                return Err(format!(
                    "tests/js has {package} {found:?} after npm ci, expected {version}"
                ));
            }
        }
        Ok(())
    });
    if let Err(why) = ready {
        panic!("JS client unavailable: {why}");
    }
}

/// One run of `tests/js/client.mjs`: its stdout events arrive on a channel, its stderr (a trace
/// of every frame) is kept for failure messages, and it is killed if dropped early.
#[derive(Debug)]
struct JsClient {
    name: String,
    child: Killed,
    events: Receiver<Value>,
    stderr: Arc<Mutex<String>>,
    seen: Vec<Value>,
}

impl JsClient {
    fn spawn(name: &str, ws_url: &str, token: &str, mode: &str, args: &[&str]) -> JsClient {
        ensure_js_client();
        let mut command = Command::new("node");
        command
            .arg("client.mjs")
            .arg(mode)
            .args(["--relay", ws_url])
            .args(["--timeout-ms", &CLIENT_TIMEOUT.as_millis().to_string()])
            .args(args)
            .env("FIELDCHART_TOKEN", token)
            .current_dir(js_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node for {name}: {e}"));
        let mut child = Killed(child);
        let stdout = child.0.stdout.take().expect("piped stdout");
        let stderr: ChildStderr = child.0.stderr.take().expect("piped stderr");
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        JsClient {
            name: name.to_owned(),
            child,
            events,
            stderr: drain(stderr),
            seen: Vec::new(),
        }
    }

    fn diagnostics(&self) -> String {
        let trace = text_of(&self.stderr);
        let tail: Vec<&str> = trace.lines().rev().take(80).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "JS client {}:\nevents so far: {:#?}\nstderr (last 80 lines):\n{}",
            self.name,
            self.seen,
            tail.join("\n")
        )
    }

    /// The next event, which must be `event`.
    #[track_caller]
    fn expect(&mut self, event: &str) -> Value {
        let got = match self.events.recv_timeout(EVENT_TIMEOUT) {
            Ok(value) => value,
            Err(RecvTimeoutError::Timeout) => panic!(
                "no `{event}` from the JS client within {EVENT_TIMEOUT:?}\n{}",
                self.diagnostics()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "the JS client exited before `{event}`\n{}",
                    self.diagnostics()
                )
            }
        };
        self.seen.push(got.clone());
        if got["event"] != event {
            thread::sleep(Duration::from_millis(100));
            panic!(
                "expected `{event}` from the JS client, got {got}\n{}",
                self.diagnostics()
            );
        }
        got
    }

    /// Expects `done` and a zero exit status.
    #[track_caller]
    fn finish(mut self) {
        self.expect("done");
        let status = wait_bounded(&mut self.child, EVENT_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "JS client exited with {status:?}\n{}",
            self.diagnostics()
        );
    }

    /// Expects the client to fail: an `error` event and a non-zero exit. Returns the message.
    #[track_caller]
    fn expect_failure(mut self) -> String {
        let error = self.expect("error");
        let status = wait_bounded(&mut self.child, EVENT_TIMEOUT);
        assert!(
            status.is_some_and(|s| !s.success()),
            "JS client reported an error but exited with {status:?}\n{}",
            self.diagnostics()
        );
        error["message"].as_str().unwrap_or_default().to_owned()
    }
}

#[track_caller]
fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` missing or not a string in {value}"))
}

// --- the agency the stories run in ------------------------------------------------------------

/// A user's device token.
#[derive(Debug)]
struct Device {
    user_id: String,
    device_id: String,
    token: String,
}

/// A relay on a fresh data directory with one agency, two patients and three clinicians: Ana
/// and Ben on Pat's care team, Cy on Quinn's.
#[derive(Debug)]
struct Agency {
    relay: RelayProcess,
    agency_id: String,
    /// Pat: `patientId`, `documentId` (the chart) as printed by `admin create-patient`.
    pat: Value,
    ana: Device,
    ben: Device,
    cy: Device,
    _dir: tempfile::TempDir,
}

impl Drop for Agency {
    fn drop(&mut self) {
        // A failing story shows the relay's side too (the JS side is in the panic message).
        if thread::panicking() {
            eprintln!("relay log:\n{}", self.relay.logs());
        }
    }
}

impl Agency {
    fn start() -> Agency {
        ensure_js_client();
        let dir = tempfile::tempdir().expect("temp data dir");
        let admin = |args: &[&str]| RelayProcess::admin(dir.path(), args);
        let agency = admin(&["create-agency", "--name", "Riverside Home Health"]);
        let agency_id = str_of(&agency, "agencyId").to_owned();
        let patient =
            |name: &str| admin(&["create-patient", "--agency", &agency_id, "--name", name]);
        let pat = patient("Pat Doe");
        let quinn = patient("Quinn Roe");
        let clinician = |name: &str, patient: &Value| {
            let user = admin(&[
                "create-user",
                "--agency",
                &agency_id,
                "--name",
                name,
                "--role",
                "clinician",
            ]);
            let user_id = str_of(&user, "userId").to_owned();
            admin(&[
                "assign",
                "--user",
                &user_id,
                "--patient",
                str_of(patient, "patientId"),
            ]);
            let token = admin(&[
                "issue-token",
                "--user",
                &user_id,
                "--device",
                &format!("{name}'s tablet"),
            ]);
            Device {
                user_id,
                device_id: str_of(&token, "deviceId").to_owned(),
                token: str_of(&token, "token").to_owned(),
            }
        };
        let ana = clinician("Ana", &pat);
        let ben = clinician("Ben", &pat);
        let cy = clinician("Cy", &quinn);
        let relay = RelayProcess::start(dir.path());
        Agency {
            relay,
            agency_id,
            pat,
            ana,
            ben,
            cy,
            _dir: dir,
        }
    }

    fn pat_id(&self) -> &str {
        str_of(&self.pat, "patientId")
    }

    /// The relay's URL without a token: the JS client adds `?token=` itself.
    fn sync_url(&self) -> String {
        format!("ws://{}/v1/sync", self.relay.addr())
    }

    fn js(&self, name: &str, device: &Device, mode: &str, args: &[&str]) -> JsClient {
        JsClient::spawn(name, &self.sync_url(), &device.token, mode, args)
    }

    /// A Rust peer (a Fieldchart device) on `device`'s token, advertising a storage id.
    async fn rust_peer(&self, device: &Device) -> TestPeer {
        TestPeer::connect(
            &self.relay.ws_url(&device.token),
            Some(&format!("store-{}", device.device_id)),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the Rust peer cannot connect: {e:?}\nrelay log:\n{}",
                self.relay.logs()
            )
        })
    }

    /// Audit rows of Pat's documents.
    fn audit_of_pat(&self) -> Vec<Value> {
        let out = RelayProcess::admin(
            self.relay.data_dir(),
            &["audit", "--patient", self.pat_id()],
        );
        out["rows"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("audit printed {out}"))
    }
}

/// Checks the JS client's `connected` event: the relay advertised the storage id it printed at
/// start, as a non-ephemeral peer (what lets JS clients learn which heads the relay holds).
#[track_caller]
fn assert_relay_identity(connected: &Value, relay: &RelayProcess) {
    assert_eq!(
        connected["relayStorageId"],
        relay.storage_id(),
        "relay storageId as the JS client saw it: {connected}"
    );
    assert_eq!(
        connected["relayIsEphemeral"], false,
        "relay isEphemeral as the JS client saw it: {connected}"
    );
}

/// A root field of a document as (value, whether it is Text rather than a scalar string).
fn root_string(doc: &Automerge, key: &str) -> (String, bool) {
    match doc.get(ROOT, key).expect("read the document") {
        Some((automerge::Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Str(text) => (text.to_string(), false),
            other => panic!("`{key}` is the scalar {other:?}, expected a string"),
        },
        Some((automerge::Value::Object(ObjType::Text), id)) => {
            (doc.text(&id).expect("read text"), true)
        }
        other => panic!("`{key}` is {other:?}, expected a string"),
    }
}

fn root_int(doc: &Automerge, key: &str) -> i64 {
    match doc.get(ROOT, key).expect("read the document") {
        Some((automerge::Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Int(n) => *n,
            other => panic!("`{key}` is the scalar {other:?}, expected an int"),
        },
        other => panic!("`{key}` is {other:?}, expected an int scalar"),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of strings, got {value}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"))
                .to_owned()
        })
        .collect()
}

fn sorted(mut heads: Vec<String>) -> Vec<String> {
    heads.sort();
    heads
}

/// An event's `heads` (bs58check strings), sorted.
fn heads_of(event: &Value) -> Vec<String> {
    sorted(strings(&event["heads"]))
}

fn document_id(event: &Value) -> DocumentId {
    DocumentId::from_url(str_of(event, "documentId"))
        .unwrap_or_else(|e| panic!("the JS client's document id does not parse: {e:?} in {event}"))
}

/// A denied document and a never-created one get the same answer, and promptly.
#[track_caller]
fn assert_denial_looks_like_absence(agency: &Agency, device: &Device, denied: &str) {
    let mut asked = agency.js(
        "denied",
        device,
        "find-expect-unavailable",
        &["--storage", "none", "--document", denied],
    );
    asked.expect("connected");
    let refused = asked.expect("unavailable");
    asked.finish();
    let mut asked = agency.js(
        "absent",
        device,
        "find-expect-unavailable",
        &["--storage", "none", "--document", "random"],
    );
    asked.expect("connected");
    let absent = asked.expect("unavailable");
    asked.finish();
    assert_eq!(refused["documentId"], denied);
    assert_eq!(
        refused["framesFromRelay"], absent["framesFromRelay"],
        "a denied document must look exactly like an absent one (DESIGN §5)"
    );
    // Far below the JS client's own 60 s request timeout (DocHandle.ts `#timeoutDelay`).
    for answer in [&refused, &absent] {
        let ms = answer["elapsedMs"].as_u64().unwrap_or(u64::MAX);
        assert!(ms < 5_000, "doc-unavailable took {ms} ms: {answer}");
    }
}

// --- stories ----------------------------------------------------------------------------------

/// Ana's JS app writes a visit note; Ben's Rust device reads it and edits it; Ana's app sees the
/// edit live, a fresh JS app loads the merged note from the relay, and Cy (another patient's
/// nurse) cannot get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_and_rust_clients_share_a_visit_note_through_the_relay() {
    let agency = Agency::start();
    let marker = "Wound healing well, no signs of infection. ";

    // Ana's JS app creates the note; the relay confirms it holds the note's heads.
    let mut ana = agency.js(
        "ana-create",
        &agency.ana,
        "create",
        &[
            "--agency",
            &agency.agency_id,
            "--patient",
            agency.pat_id(),
            "--created-by",
            &agency.ana.user_id,
            "--assessment",
            "Patient alert and oriented.",
            "--then-field",
            "assessment",
            "--then-contains",
            marker,
        ],
    );
    assert_relay_identity(&ana.expect("connected"), &agency.relay);
    let created = ana.expect("created");
    let stored = ana.expect("stored");
    assert_eq!(
        sorted(strings(&stored["relayHeads"])),
        heads_of(&created),
        "the relay confirmed other heads than the note's"
    );
    let note = document_id(&stored);

    // Ben's Rust device fetches it and reads what the JS app wrote.
    let mut ben = agency.rust_peer(&agency.ben).await;
    match ben.fetch(note).await {
        SyncOutcome::InSync(heads) => assert_eq!(
            sorted(encode_heads(&heads)),
            heads_of(&created),
            "Ben got other heads than the ones Ana's app created"
        ),
        SyncOutcome::Unavailable => panic!(
            "the relay hid Ana's note from Ben, on Pat's care team\nrelay log:\n{}",
            agency.relay.logs()
        ),
    }
    let doc = ben.doc(note).expect("Ben holds the note");
    assert_eq!(
        root_string(doc, "schema"),
        ("fieldchart/visit-note@1".into(), false)
    );
    assert_eq!(root_string(doc, "kind"), ("visit-note".into(), false));
    assert_eq!(
        root_string(doc, "patientId"),
        (agency.pat_id().into(), false)
    );
    assert_eq!(
        root_string(doc, "agencyId"),
        (agency.agency_id.clone(), false)
    );
    assert_eq!(
        root_string(doc, "createdBy"),
        (agency.ana.user_id.clone(), false)
    );
    assert_eq!(
        root_int(doc, "createdAt"),
        stored["doc"]["createdAt"]
            .as_i64()
            .expect("createdAt in the JS doc")
    );
    assert_eq!(
        root_string(doc, "assessment"),
        ("Patient alert and oriented.".into(), true)
    );

    // Ben adds to the assessment (Text) and records a scalar, then syncs.
    let edited = ben.doc_mut(note).expect("Ben holds the note");
    edited
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            let (_, text) = tx.get(ROOT, "assessment")?.expect("assessment exists");
            tx.splice_text(&text, 0, 0, marker)?;
            tx.put(ROOT, "reviewedBy", agency.ben.user_id.as_str())?;
            Ok(())
        })
        .expect("Ben's edit");
    let ben_heads = match ben.sync(note).await {
        SyncOutcome::InSync(heads) => encode_heads(&heads),
        SyncOutcome::Unavailable => panic!(
            "the relay refused Ben's edit\nrelay log:\n{}",
            agency.relay.logs()
        ),
    };

    // Ana's app, still connected, receives Ben's edit without asking.
    let seen = ana.expect("seen");
    assert_eq!(
        seen["value"],
        format!("{marker}Patient alert and oriented.")
    );
    assert_eq!(seen["doc"]["reviewedBy"], agency.ben.user_id.as_str());
    assert_eq!(
        heads_of(&seen),
        sorted(ben_heads),
        "Ana's app and Ben's device did not converge"
    );
    ana.finish();

    // A fresh, ephemeral JS app (no storage: it joins with storageId undefined) loads the merged
    // note from the relay.
    let mut reader = agency.js(
        "ana-read",
        &agency.ana,
        "watch",
        &[
            "--storage",
            "none",
            "--document",
            &note.to_string(),
            "--field",
            "reviewedBy",
            "--value",
            &agency.ben.user_id,
        ],
    );
    assert_relay_identity(&reader.expect("connected"), &agency.relay);
    let read = reader.expect("seen");
    assert_eq!(
        read["doc"]["assessment"],
        format!("{marker}Patient alert and oriented.")
    );
    assert_eq!(read["doc"]["patientId"], agency.pat_id());
    reader.finish();

    // Cy, on another patient's care team, gets doc-unavailable, exactly as for a missing note.
    assert_denial_looks_like_absence(&agency, &agency.cy, &note.to_string());

    // The audit log tells the story: Ana's write, Ben's read and write, Cy's denial.
    let audit = agency.audit_of_pat();
    let has = |device: &Device, action: &str| {
        audit.iter().any(|row| {
            row["documentId"] == note.to_string().as_str()
                && row["deviceId"] == device.device_id.as_str()
                && row["action"] == action
        })
    };
    assert!(
        has(&agency.ana, "write"),
        "no write by Ana's JS app in the audit log: {audit:#?}"
    );
    assert!(
        has(&agency.ben, "read"),
        "no read by Ben's device in the audit log: {audit:#?}"
    );
    assert!(
        has(&agency.ben, "write"),
        "no write by Ben's device in the audit log: {audit:#?}"
    );
    assert!(
        has(&agency.cy, "deny"),
        "no denial of Cy in the audit log: {audit:#?}"
    );
}

/// A stock JS app creates an empty document (announced to the relay at once) and fills in the
/// root fields afterwards, as plain JS strings (Text): the relay still classifies it, stores it
/// and shares it with the care team only. And a chart the relay's CLI wrote with the Rust core
/// reads fine in JS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_document_filled_in_after_creation_is_classified_and_shared() {
    let agency = Agency::start();

    let mut ana = agency.js(
        "ana-create-later",
        &agency.ana,
        "create",
        &[
            "--agency",
            &agency.agency_id,
            "--patient",
            agency.pat_id(),
            "--created-by",
            &agency.ana.user_id,
            "--create-style",
            "later",
            "--root-strings",
            "text",
        ],
    );
    assert_relay_identity(&ana.expect("connected"), &agency.relay);
    ana.expect("created");
    let stored = ana.expect("stored");
    ana.finish();
    let note = document_id(&stored);

    let mut ben = agency.rust_peer(&agency.ben).await;
    assert!(
        matches!(ben.fetch(note).await, SyncOutcome::InSync(_)),
        "Ben cannot fetch a note Ana's JS app filled in after creating it\nrelay log:\n{}",
        agency.relay.logs()
    );
    let doc = ben.doc(note).expect("Ben holds the note");
    assert_eq!(
        root_string(doc, "patientId"),
        (agency.pat_id().into(), true)
    );
    assert_eq!(
        root_string(doc, "agencyId"),
        (agency.agency_id.clone(), true)
    );
    assert_eq!(root_string(doc, "kind"), ("visit-note".into(), true));

    assert_denial_looks_like_absence(&agency, &agency.cy, &note.to_string());

    // Pat's chart, written by the Rust core through `admin create-patient`, in a JS app.
    let chart = str_of(&agency.pat, "documentId");
    let mut reader = agency.js(
        "ana-chart",
        &agency.ana,
        "watch",
        &["--document", chart, "--field", "kind", "--value", "patient"],
    );
    reader.expect("connected");
    let seen = reader.expect("seen");
    assert_eq!(seen["doc"]["patientId"], agency.pat_id());
    assert_eq!(seen["doc"]["demographics"]["name"], "Pat Doe");
    reader.finish();
    assert_denial_looks_like_absence(&agency, &agency.cy, chart);
}

/// Cy's JS app writes a note for Pat, whose care team Cy is not on: the relay refuses it with
/// `doc-unavailable`, stores nothing (Ben, on Pat's team, cannot fetch it) and audits the denial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_note_for_a_patient_off_the_care_team_is_refused() {
    let agency = Agency::start();
    let mut cy = agency.js(
        "cy-create",
        &agency.cy,
        "create",
        &[
            "--agency",
            &agency.agency_id,
            "--patient",
            agency.pat_id(),
            "--created-by",
            &agency.cy.user_id,
            "--expect-refused",
        ],
    );
    cy.expect("connected");
    cy.expect("created");
    let refused = cy.expect("refused");
    cy.finish();
    let note = document_id(&refused);

    let mut ben = agency.rust_peer(&agency.ben).await;
    assert_eq!(
        ben.fetch(note).await,
        SyncOutcome::Unavailable,
        "the relay stored a note written by a clinician off Pat's care team"
    );
    let audit = agency.audit_of_pat();
    assert!(
        audit
            .iter()
            .any(|row| row["documentId"] == note.to_string().as_str()
                && row["deviceId"] == agency.cy.device_id.as_str()
                && row["action"] == "deny"),
        "no denial of Cy's write in Pat's audit log: {audit:#?}"
    );
    assert!(
        !audit
            .iter()
            .any(|row| row["documentId"] == note.to_string().as_str() && row["action"] != "deny"),
        "the refused note was read or written: {audit:#?}"
    );
}

/// The relay is killed (SIGKILL, as in a crash) right after it gave Ana's JS app its receipt for
/// a note: after a restart the note is there (a receipt means durable), and Ana's app, which
/// stayed open, reconnects by itself and receives Ben's later edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_receipt_survives_a_relay_crash_and_the_app_reconnects() {
    let mut agency = Agency::start();
    let marker = "Dressing changed after the outage. ";
    let mut ana = agency.js(
        "ana-create",
        &agency.ana,
        "create",
        &[
            "--agency",
            &agency.agency_id,
            "--patient",
            agency.pat_id(),
            "--created-by",
            &agency.ana.user_id,
            "--then-field",
            "assessment",
            "--then-contains",
            marker,
        ],
    );
    ana.expect("connected");
    ana.expect("created");
    let stored = ana.expect("stored");
    let note = document_id(&stored);

    let port = agency.relay.addr().port();
    agency.relay.restart();
    assert_eq!(
        agency.relay.addr().port(),
        port,
        "the relay came back on another port, so the open JS app cannot reconnect"
    );

    let mut ben = agency.rust_peer(&agency.ben).await;
    assert!(
        matches!(ben.fetch(note).await, SyncOutcome::InSync(_)),
        "the note the relay gave a receipt for is gone after a crash\nrelay log:\n{}",
        agency.relay.logs()
    );
    ben.doc_mut(note)
        .expect("Ben holds the note")
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            let (_, text) = tx.get(ROOT, "assessment")?.expect("assessment exists");
            tx.splice_text(&text, 0, 0, marker)?;
            Ok(())
        })
        .expect("Ben's edit");
    assert!(
        matches!(ben.sync(note).await, SyncOutcome::InSync(_)),
        "the relay refused Ben's edit"
    );

    // automerge-repo's WebSocket adapter retries every 5 s (WebSocketClientAdapter retryInterval).
    let seen = ana.expect("seen");
    assert_eq!(seen["doc"]["patientId"], agency.pat_id());
    ana.finish();
}

/// A JS app with a token the relay never issued cannot connect, and says so.
#[test]
fn js_client_with_an_unknown_token_is_refused() {
    let agency = Agency::start();
    let stranger = Device {
        user_id: "nobody".into(),
        device_id: "none".into(),
        token: "not-a-token".into(),
    };
    let client = agency.js(
        "stranger",
        &stranger,
        "create",
        &[
            "--agency",
            &agency.agency_id,
            "--patient",
            agency.pat_id(),
            "--created-by",
            "nobody",
        ],
    );
    let message = client.expect_failure();
    assert!(
        message.contains("401") || message.contains("relay sent an error frame"),
        "unexpected failure for an unknown token: {message}"
    );
}
