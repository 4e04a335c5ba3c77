//! The agency console end to end, in a real browser: Debian's headless Chromium driven by
//! `playwright-core` (`tests/console/story.mjs`, pinned by its package-lock.json; pointed at the
//! system browser, nothing downloads one), each page checked with `axe-core` (no serious or
//! critical violations), against a real relay process, with a Rust test peer as the nurse's
//! phone.
//!
//! The story: an admin sets her password from the CLI's one-time link, signs in, creates a
//! patient and a nurse, assigns her, schedules her visit for today and enrolls her phone by
//! reading the code from the QR page; the phone (here) redeems the code, charts and signs a visit
//! with vitals and syncs; the case manager, watching the Today board, sees the visit turn signed
//! and received without reloading (Server-Sent Events), opens the chart (vitals chart) and the
//! note (signature Valid); she adds a problem and a goal to the care plan, and sets the goal
//! "on hold" while the phone, which fetched the chart, sets it "met" offline; the phone syncs,
//! the conflict appears in the review queue with both values and their authors, she keeps the
//! nurse's value, and the phone's store receives the resolution; the admin's
//! audit search lists the case manager's views. Screenshots of every step go to
//! `target/console-e2e/` (not committed).
//!
//! Needs `chromium` (Debian package; or `FIELDCHART_CHROMIUM=/path`), Node.js 20+ and npm; runs
//! `npm ci` in `tests/console` when its packages are missing. Without them the test fails and
//! says what is missing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use automerge::{AutoCommit, Automerge};
use fieldchart_core::model::signing::{self, DeviceKey};
use fieldchart_core::model::{Actor, Allergy, NoteText, Role, VisitStart, VitalReading, VitalType};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};
use fieldchart_mobile::TlsConfig;
use fieldchart_tests::relay_process::{Admin, RelayProcess, SyncOutcome, TestPeer, now_ms};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The browser story's own bound on each wait (`TIMEOUT_MS`).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the test waits for the next line from the story (its step bound plus slack).
const LINE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `npm ci` may take on a cold cache.
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(300);
/// Versions the story runs (package.json pins them; a stale node_modules is reinstalled).
const PINNED: [(&str, &str); 2] = [("playwright-core", "1.49.1"), ("axe-core", "4.10.3")];
const PASSWORD: &str = "a long office password";

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("console")
}

fn installed_version(package: &str) -> Option<String> {
    let text = std::fs::read_to_string(
        console_dir()
            .join("node_modules")
            .join(package)
            .join("package.json"),
    )
    .ok()?;
    serde_json::from_str::<Value>(&text).ok()?["version"]
        .as_str()
        .map(str::to_owned)
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("FIELDCHART_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "the console end-to-end test needs headless Chromium at {} (Debian: `apt-get install chromium`, \
         or set FIELDCHART_CHROMIUM)",
        path.display()
    );
    path
}

async fn ensure_packages() {
    let current = PINNED
        .iter()
        .all(|(p, v)| installed_version(p).as_deref() == Some(*v));
    if current {
        return;
    }
    let mut ci = tokio::process::Command::new("npm");
    ci.args(["ci", "--no-audit", "--no-fund"])
        .current_dir(console_dir())
        .kill_on_drop(true);
    let out = tokio::time::timeout(NPM_CI_TIMEOUT, ci.output())
        .await
        .expect("`npm ci` in tests/console did not finish in time")
        .expect("the console end-to-end test needs Node.js 20+ and npm on PATH");
    assert!(
        out.status.success(),
        "`npm ci` in tests/console failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (package, version) in PINNED {
        assert_eq!(
            installed_version(package).as_deref(),
            Some(version),
            "{package}"
        );
    }
}

/// The next JSON line from the story, skipping progress lines until `step`.
async fn next_step(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    step: &str,
    checked: &mut Vec<Value>,
) -> Value {
    loop {
        let line = tokio::time::timeout(LINE_TIMEOUT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no `{step}` from the browser story in time"))
            .expect("story stdout")
            .unwrap_or_else(|| panic!("the browser story ended before `{step}` (see its stderr)"));
        let event: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("story printed {line:?}: {e}"));
        match event["step"].as_str() {
            Some(s) if s == step => return event,
            Some("checked") => checked.push(event),
            _ => panic!("unexpected story line {line}"),
        }
    }
}

/// The nurse's phone after its first sync: its store, its token and the signed note's id.
struct Phone {
    store: std::sync::Arc<Store>,
    token: String,
    note: String,
}

/// The nurse's phone: enroll with the code read from the QR page, chart and sign a visit with
/// vitals on a real device store, sync it to the relay.
async fn phone_charts_and_signs(relay: &RelayProcess, dir: &Path, enroll: &Value) -> Phone {
    let code = enroll["code"].as_str().expect("code");
    let patient = enroll["patientId"].as_str().expect("patient");
    let key = DeviceKey::generate();
    let done = fieldchart_mobile::enroll(
        &relay.http_base(),
        code,
        Some("Ana's phone"),
        key.public_key(),
        &TlsConfig::default(),
    )
    .await
    .expect("the code from the QR page enrolls the phone");
    let actor = Actor {
        user_id: done.user_id.clone(),
        device_id: done.device_id.clone(),
    };
    let store = Store::open(StoreConfig {
        path: dir.join("ana-phone.db"),
        key: StoreKey::random(),
        actor: actor.clone(),
        role: Role::Clinician,
        keystroke_journal: true,
    })
    .expect("device store");
    let store = std::sync::Arc::new(store);
    // Its first sync (the real client) brings the chart and the schedule the admin made in the
    // browser: the phone lists today's visit.
    let pass = fieldchart_mobile::SyncClient::new(
        store.clone(),
        fieldchart_mobile::RelayConfig {
            base_url: relay.http_base(),
            token: done.token.clone(),
        },
    )
    .expect("sync client")
    .run_pass(fieldchart_mobile::PassOptions::default())
    .await;
    assert_eq!(
        pass.status,
        fieldchart_mobile::PassStatus::Complete,
        "{pass:?}"
    );
    let today = enroll["date"].as_str().expect("date");
    let visits = store
        .scheduled_visits(today, today, Some(&done.user_id))
        .expect("the phone reads its schedule");
    assert_eq!(
        visits
            .iter()
            .map(|v| (
                v.patient_id.as_str(),
                v.window_start.as_str(),
                v.window_end.as_str()
            ))
            .collect::<Vec<_>>(),
        [(patient, "00:00", "23:59")],
        "the visit scheduled in the browser is on the phone"
    );
    let note = store
        .start_visit(&VisitStart {
            agency_id: done.agency_id.clone(),
            patient_id: patient.to_owned(),
            service_type: "skilled-nursing".into(),
            date: enroll["date"].as_str().expect("date").to_owned(),
            location: "12 Elm St".into(),
            started_at_ms: now_ms() - 3_600_000,
            start_monotonic_ms: 1,
        })
        .expect("start visit");
    store
        .update_text(
            note,
            NoteText::Assessment,
            "Sacral wound 2x3 cm, clean, dressing changed.",
        )
        .expect("assessment");
    for (vital, value, unit, ago) in [
        (VitalType::BloodPressure, "142/90", "mmHg", 3_000_000),
        (VitalType::BloodPressure, "128/82", "mmHg", 1_800_000),
        (VitalType::Pulse, "88", "/min", 3_000_000),
        (VitalType::Pulse, "76", "/min", 1_800_000),
        (VitalType::Pain, "4", "/10", 2_000_000),
    ] {
        store
            .record_vital(
                note,
                &VitalReading {
                    id: String::new(),
                    vital,
                    value: value.into(),
                    unit: unit.into(),
                    taken_at_ms: now_ms() - ago,
                    recorded_by: String::new(),
                    supersedes: None,
                },
            )
            .expect("vital");
    }
    // Signed with the enrolled key through the model API (the test holds the secret).
    let mut doc = AutoCommit::load(&store.export_changes(note).expect("export")).expect("load");
    doc.set_actor(automerge::ActorId::random());
    doc.set_author(Some(actor.author()));
    signing::sign(&mut doc, note, &key, &actor, Role::Clinician, now_ms()).expect("sign");
    doc.commit();
    let signed = Automerge::load(&doc.save()).expect("reload");
    let mut peer = TestPeer::connect(&relay.ws_url(&done.token), None)
        .await
        .expect("connect");
    peer.create_with_id(note, signed.clone());
    assert_eq!(
        peer.sync(note).await,
        SyncOutcome::InSync(signed.get_heads()),
        "the relay accepts the signed note"
    );
    peer.close().await;
    Phone {
        store,
        token: done.token.clone(),
        note: note.to_string(),
    }
}

/// Fetch the chart from the relay into a fresh peer and import it into the phone's store (what
/// the phone's sync pass does); returns the peer holding it.
async fn phone_pulls(relay: &RelayProcess, phone: &Phone, chart: DocumentId) -> TestPeer {
    let mut peer = TestPeer::connect(&relay.ws_url(&phone.token), None)
        .await
        .expect("connect");
    assert!(
        matches!(peer.fetch(chart).await, SyncOutcome::InSync(_)),
        "the phone may fetch its patient's chart"
    );
    phone
        .store
        .import(chart, &peer.doc(chart).expect("fetched").save())
        .expect("import the chart");
    peer
}

async fn answer(stdin: &mut tokio::process::ChildStdin, value: Value) {
    stdin
        .write_all(format!("{value}\n").as_bytes())
        .await
        .expect("answer the story");
    stdin.flush().await.expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_and_a_case_manager_work_in_chromium() {
    let chromium = chromium();
    ensure_packages().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(dir.path());
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside Home Health");
    let base = relay.http_base();
    let office_user = |name: &str, role: &str, login: &str| {
        admin.run(&[
            "create-office-user",
            "--agency",
            &agency,
            "--name",
            name,
            "--role",
            role,
            "--login",
            login,
            "--relay-url",
            &base,
        ])
    };
    let ada = office_user("Ada Admin", "admin", "ada");
    let carl = office_user("Carl Case", "office", "carl");
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("console-e2e");

    let mut story = tokio::process::Command::new("node");
    story
        .arg(console_dir().join("story.mjs"))
        .current_dir(console_dir())
        .env("BASE", &base)
        .env("ADMIN_LINK", ada["setPasswordLink"].as_str().expect("link"))
        .env(
            "MANAGER_LINK",
            carl["setPasswordLink"].as_str().expect("link"),
        )
        .env("MANAGER_ID", carl["userId"].as_str().expect("id"))
        .env("PASSWORD", PASSWORD)
        .env("ARTIFACTS", &artifacts)
        .env("CHROMIUM", &chromium)
        .env("TIMEOUT_MS", STEP_TIMEOUT.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = story
        .spawn()
        .expect("the console end-to-end test needs Node.js 20+ on PATH");
    let stderr = child.stderr.take().expect("stderr");
    let stderr_text = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut checked = Vec::new();

    let enroll = next_step(&mut lines, "enroll", &mut checked).await;
    let phone = phone_charts_and_signs(&relay, dir.path(), &enroll).await;
    answer(&mut stdin, serde_json::json!({ "noteId": phone.note })).await;

    // The case manager added a problem and a goal; the phone fetches the chart and sets the
    // goal's status offline while she sets it in the browser.
    next_step(&mut lines, "plan", &mut checked).await;
    let (feed, _) = relay.all_changes(&phone.token, None).await;
    let chart: DocumentId = feed
        .iter()
        .find(|e| e["kind"] == "patient")
        .and_then(|e| e["documentId"].as_str())
        .expect("the chart is in the phone's feed")
        .parse()
        .expect("document id");
    let mut peer = phone_pulls(&relay, &phone, chart).await;
    let plan = phone.store.patient_chart(chart).expect("chart").care_plan;
    let problem = plan
        .iter()
        .find(|p| p.description == "Impaired mobility")
        .expect("the case manager's problem reached the phone");
    let goal = problem
        .children
        .iter()
        .find(|g| g.description == "Walks 50 m with a frame")
        .expect("and her goal");
    let path = [problem.id.clone(), goal.id.clone()];
    phone
        .store
        .set_care_plan_status(chart, &path, "met")
        .expect("the nurse's offline edit");
    answer(&mut stdin, serde_json::json!({ "goal": path.join("/") })).await;
    next_step(&mut lines, "edited", &mut checked).await;

    // The phone comes back online and syncs its edit: both values now stand side by side.
    let mut offline = Automerge::load(&phone.store.export_changes(chart).expect("export"))
        .expect("load the phone's chart");
    peer.doc_mut(chart)
        .expect("held")
        .merge(&mut offline)
        .expect("merge");
    assert!(
        matches!(peer.sync(chart).await, SyncOutcome::InSync(_)),
        "the relay accepts the nurse's edit"
    );
    peer.close().await;
    drop(phone_pulls(&relay, &phone, chart).await);
    assert_eq!(
        phone.store.conflicts(chart).expect("conflicts").len(),
        1,
        "the phone sees the conflict too"
    );
    answer(&mut stdin, serde_json::json!({ "synced": true })).await;

    // She resolves it in the browser; the phone receives the resolution.
    let resolved = next_step(&mut lines, "resolved", &mut checked).await;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        drop(phone_pulls(&relay, &phone, chart).await);
        if phone.store.conflicts(chart).expect("conflicts").is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the resolution never reached the phone"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let plan = phone.store.patient_chart(chart).expect("chart").care_plan;
    let goal = &plan
        .iter()
        .find(|p| p.id == path[0])
        .expect("problem")
        .children
        .iter()
        .find(|g| g.id == path[1])
        .expect("goal")
        .status;
    assert_eq!(
        Some(goal.as_str()),
        resolved["kept"].as_str(),
        "the phone holds the value she kept"
    );

    // She records a phone number and an allergy in the browser; the phone, offline, makes the
    // allergy severe while she makes it mild; the conflict is shown, she keeps the nurse's
    // value and the phone receives the resolution.
    next_step(&mut lines, "allergy", &mut checked).await;
    let mut peer = phone_pulls(&relay, &phone, chart).await;
    let read = phone.store.patient_chart(chart).expect("chart");
    assert_eq!(
        read.demographics.get("phone").map(String::as_str),
        Some("555-0100"),
        "the browser's demographic edit reached the phone"
    );
    let allergy = read
        .allergies
        .iter()
        .find(|a| a.substance == "Penicillin")
        .expect("the browser's allergy reached the phone")
        .clone();
    assert_eq!(allergy.severity, "moderate");
    phone
        .store
        .upsert_allergy(
            chart,
            Some(&allergy),
            &Allergy {
                severity: "severe".into(),
                ..allergy.clone()
            },
        )
        .expect("the nurse's offline edit");
    answer(&mut stdin, serde_json::json!({ "allergyId": allergy.id })).await;
    next_step(&mut lines, "allergy-edited", &mut checked).await;
    let mut offline = Automerge::load(&phone.store.export_changes(chart).expect("export"))
        .expect("load the phone's chart");
    peer.doc_mut(chart)
        .expect("held")
        .merge(&mut offline)
        .expect("merge");
    assert!(
        matches!(peer.sync(chart).await, SyncOutcome::InSync(_)),
        "the relay accepts the nurse's allergy edit"
    );
    peer.close().await;
    drop(phone_pulls(&relay, &phone, chart).await);
    let severity = format!("allergies/{}/severity", allergy.id);
    assert!(
        phone
            .store
            .conflicts(chart)
            .expect("conflicts")
            .iter()
            .any(|c| c.path == severity),
        "the phone sees the allergy conflict too; never auto-resolved"
    );
    answer(&mut stdin, serde_json::json!({ "synced": true })).await;
    let kept = next_step(&mut lines, "allergy-resolved", &mut checked).await;
    drop(stdin);
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        drop(phone_pulls(&relay, &phone, chart).await);
        if phone.store.conflicts(chart).expect("conflicts").is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the allergy resolution never reached the phone"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read = phone.store.patient_chart(chart).expect("chart");
    let severity = read
        .allergies
        .iter()
        .find(|a| a.id == allergy.id)
        .map(|a| a.severity.clone());
    assert_eq!(
        severity.as_deref(),
        kept["kept"].as_str(),
        "the phone holds the severity she kept"
    );

    let done = tokio::time::timeout(LINE_TIMEOUT, async {
        let mut checked_late = Vec::new();
        let done = next_step(&mut lines, "done", &mut checked_late).await;
        (done, checked_late)
    })
    .await;
    let status = tokio::time::timeout(LINE_TIMEOUT, child.wait()).await;
    let stderr = stderr_text.await.unwrap_or_default();
    let (done, late) = done.unwrap_or_else(|_| panic!("the story never finished:\n{stderr}"));
    checked.extend(late);
    assert!(
        matches!(status, Ok(Ok(s)) if s.success()),
        "the browser story failed: {status:?}\n{stderr}"
    );
    assert_eq!(
        done["violations"],
        serde_json::json!([]),
        "axe-core found serious or critical violations"
    );
    assert!(done["auditRows"].as_u64().unwrap_or(0) >= 2, "{done}");
    assert!(
        done["csvLines"].as_u64().unwrap_or(0) >= 3,
        "header + rows: {done}"
    );
    let pages: Vec<&str> = checked.iter().filter_map(|c| c["page"].as_str()).collect();
    for page in [
        "sign-in",
        "users",
        "enroll-qr",
        "board",
        "chart",
        "note",
        "care-plan",
        "review-conflict",
        "review-resolved",
        "chart-edit",
        "allergy-conflict",
        "allergy-resolved",
        "audit",
    ] {
        assert!(pages.contains(&page), "{page} checked: {pages:?}");
    }
    for c in &checked {
        let shot = c["screenshot"].as_str().expect("screenshot path");
        assert!(
            std::fs::metadata(shot).is_ok_and(|m| m.len() > 1_000),
            "{shot} written"
        );
    }
}

/// A console user's browser, without a browser: cookies and form tokens by hand, redirects
/// not followed (each answer is checked).
struct FormClient {
    base: String,
    http: reqwest::Client,
    cookies: std::collections::BTreeMap<String, String>,
}

/// The value of the first hidden field `name` in `body`.
fn hidden_field(body: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = body
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} field in {body}"))
        + marker.len();
    body[start..]
        .split('"')
        .next()
        .expect("field value")
        .to_owned()
}

impl FormClient {
    fn new(base: &str) -> FormClient {
        FormClient {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("http client"),
            cookies: Default::default(),
        }
    }

    async fn absorb(&mut self, response: reqwest::Response) -> (u16, String) {
        for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let text = value.to_str().expect("cookie");
            let pair = text.split(';').next().expect("cookie pair");
            if let Some((k, v)) = pair.split_once('=') {
                self.cookies.insert(k.to_owned(), v.to_owned());
            }
        }
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn get(&mut self, url: &str) -> (u16, String) {
        let url = if url.starts_with("http") {
            url.to_owned()
        } else {
            format!("{}{url}", self.base)
        };
        let response = self
            .http
            .get(url)
            .header(reqwest::header::COOKIE, self.cookie_header())
            .send()
            .await
            .expect("GET");
        self.absorb(response).await
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let body = fields
            .iter()
            .map(|(k, v)| {
                let enc: String = v
                    .bytes()
                    .map(|b| match b {
                        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                            (b as char).to_string()
                        }
                        _ => format!("%{b:02X}"),
                    })
                    .collect();
                format!("{k}={enc}")
            })
            .collect::<Vec<_>>()
            .join("&");
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookie_header())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .expect("POST");
        self.absorb(response).await
    }

    /// Set the password through the one-time link, sign in; returns the session's CSRF token.
    async fn sign_in_with_link(&mut self, link: &str, login: &str) -> String {
        let (status, page) = self.get(link).await;
        assert_eq!(status, 200, "{page}");
        let token = hidden_field(&page, "token");
        let csrf = hidden_field(&page, "csrf");
        let (status, page) = self
            .post(
                "/console/set-password",
                &[
                    ("token", &token),
                    ("password", PASSWORD),
                    ("confirm", PASSWORD),
                    ("csrf", &csrf),
                ],
            )
            .await;
        assert!(status == 303 || status == 200, "{status}: {page}");
        let (_, page) = self.get("/console/sign-in").await;
        let csrf = hidden_field(&page, "csrf");
        let (status, page) = self
            .post(
                "/console/sign-in",
                &[("login", login), ("password", PASSWORD), ("csrf", &csrf)],
            )
            .await;
        assert_eq!(status, 303, "{page}");
        let (status, home) = self.get("/console/").await;
        assert_eq!(status, 200, "{home}");
        hidden_field(&home, "csrf")
    }
}

/// The scheduler plans a visit in the console; the nurse's phone (a real device store and the
/// real sync client) syncs and lists it. The phone starts a note for a patient who is not on
/// its care team: the relay refuses it, the phone reports the failure after its pass and the
/// office sees it in the review queue, linked to the patient; once the nurse is assigned and
/// the phone syncs again, the report clears and so does the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_lists_its_schedule_and_reports_what_it_cannot_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(dir.path());
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside Home Health");
    let base = relay.http_base();
    let carl = admin.run(&[
        "create-office-user",
        "--agency",
        &agency,
        "--name",
        "Carl Case",
        "--role",
        "office",
        "--login",
        "carl",
        "--relay-url",
        &base,
    ]);
    let ana = admin.create_user(&agency, "Ana Ruiz", "clinician");
    let (grace, _) = admin.create_patient(&agency, "Grace Hopper");
    let (hal, _) = admin.create_patient(&agency, "Hal Jordan");
    admin.assign(&ana, &grace);

    // Carl schedules Ana's visit to Grace.
    let mut carl_browser = FormClient::new(&base);
    let csrf = carl_browser
        .sign_in_with_link(carl["setPasswordLink"].as_str().expect("link"), "carl")
        .await;
    let (status, page) = carl_browser
        .post(
            "/console/schedule",
            &[
                ("patient", &grace),
                ("clinician", &ana),
                ("date", "2026-12-02"),
                ("start", "09:00"),
                ("end", "10:30"),
                ("service", "skilled-nursing"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(status, 303, "{page}");

    // Ana's phone enrolls and syncs with the real client.
    let key = DeviceKey::generate();
    let done = fieldchart_mobile::enroll(
        &base,
        &admin.enroll(&ana, "Ana's phone"),
        Some("Ana's phone"),
        key.public_key(),
        &TlsConfig::default(),
    )
    .await
    .expect("enroll");
    let store = std::sync::Arc::new(
        Store::open(StoreConfig {
            path: dir.path().join("ana-phone.db"),
            key: StoreKey::random(),
            actor: Actor {
                user_id: done.user_id.clone(),
                device_id: done.device_id.clone(),
            },
            role: Role::Clinician,
            keystroke_journal: false,
        })
        .expect("device store"),
    );
    let client = fieldchart_mobile::SyncClient::new(
        store.clone(),
        fieldchart_mobile::RelayConfig {
            base_url: base.clone(),
            token: done.token.clone(),
        },
    )
    .expect("sync client");
    let pass = client
        .run_pass(fieldchart_mobile::PassOptions::default())
        .await;
    assert_eq!(
        pass.status,
        fieldchart_mobile::PassStatus::Complete,
        "{pass:?}"
    );
    let visits = store
        .scheduled_visits("2026-12-01", "2026-12-03", Some(&done.user_id))
        .expect("the phone reads its schedule");
    assert_eq!(visits.len(), 1, "{visits:?}");
    let visit = &visits[0];
    assert_eq!(
        (
            visit.patient_id.as_str(),
            visit.patient_name.as_deref(),
            visit.date.as_str(),
            visit.window_start.as_str(),
            visit.window_end.as_str(),
            visit.service_type.as_str(),
            visit.status.as_str(),
        ),
        (
            grace.as_str(),
            Some("Grace Hopper"),
            "2026-12-02",
            "09:00",
            "10:30",
            "skilled-nursing",
            "scheduled"
        )
    );

    // A note for Hal, whose care team Ana is not on: the relay refuses it.
    let note = store
        .start_visit(&VisitStart {
            agency_id: agency.clone(),
            patient_id: hal.clone(),
            service_type: "skilled-nursing".into(),
            date: "2026-12-02".into(),
            location: "4 Oak Rd".into(),
            started_at_ms: now_ms() - 60_000,
            start_monotonic_ms: 1,
        })
        .expect("start visit");
    store
        .update_text(note, NoteText::Assessment, "Private clinical words.")
        .expect("assessment");
    let pass = client
        .run_pass(fieldchart_mobile::PassOptions::default())
        .await;
    assert_eq!(
        pass.status,
        fieldchart_mobile::PassStatus::Complete,
        "{pass:?}"
    );
    let failures = store.sync_failures().expect("failures");
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].document_id, note);
    // The pass reported it before returning: the review queue lists it.
    let (status, queue) = carl_browser.get("/console/review").await;
    assert_eq!(status, 200, "{queue}");
    for shown in [
        note.to_string().as_str(),
        "Hal Jordan",
        &format!("Ana Ruiz on {}", done.device_id),
        "the relay refused the device",
        &format!("/console/patients/{hal}"),
    ] {
        assert!(queue.contains(shown), "{shown} in {queue}");
    }
    assert!(
        !queue.contains("Private clinical words"),
        "never the note's content"
    );

    // Ana is assigned to Hal; the phone retries and syncs the note: the queue clears.
    admin.assign(&ana, &hal);
    store.retry_failed_document(note).expect("retry");
    let pass = client
        .run_pass(fieldchart_mobile::PassOptions::default())
        .await;
    assert_eq!(
        pass.status,
        fieldchart_mobile::PassStatus::Complete,
        "{pass:?}"
    );
    assert!(store.sync_failures().expect("failures").is_empty());
    let (_, queue) = carl_browser.get("/console/review").await;
    assert!(!queue.contains(&note.to_string()), "{queue}");
    assert!(queue.contains("Every device reports its documents in sync"));
}
