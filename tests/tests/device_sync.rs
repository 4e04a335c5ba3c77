//! Device sync end to end: real `Store` files in temp dirs, the sync driver
//! (`fieldchart-mobile`), and the real relay process on 127.0.0.1.
//!
//! Build the relay first when running only this file: `cargo build -p fieldchart-server`.
//! Every wait is bounded; nothing sleeps to wait for readiness.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use automerge::{ChangeHash, ReadDoc};
use fieldchart_core::model::{NoteStatus, NoteText, Role};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreKey};
use fieldchart_core::sync::FailureKind;
use fieldchart_mobile::{PassOptions, PassReport, PassStatus, RelayConfig, SyncClient, SyncEvent};
use fieldchart_tests::day_in_the_field::{day_in_the_field, descriptions, type_text, visit};
use fieldchart_tests::reconnect::{self, open_store};
use fieldchart_tests::relay_process::{Admin, RelayProcess, SyncOutcome, TestPeer, set};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long any one awaited event may take before the test fails.
const WAIT: Duration = Duration::from_secs(60);

/// A device: its encrypted store file and its sync client.
struct Device {
    name: String,
    /// The relay's id of this device (the store's actor device).
    device_id: String,
    path: PathBuf,
    /// The raw key (the native shell keeps it in the Keychain; the kill test hands it to the
    /// device process).
    key: [u8; 32],
    user: String,
    role: Role,
    base_url: String,
    token: String,
    store: Arc<Store>,
    client: Arc<SyncClient>,
}

impl Device {
    fn open(
        dir: &Path,
        name: &str,
        user: &str,
        role: Role,
        relay: &RelayProcess,
        token: &str,
    ) -> Device {
        let path = dir.join(format!("{name}.db"));
        let key: [u8; 32] = rand::random();
        let store = Arc::new(open_store(
            &path,
            &StoreKey::from_bytes(key),
            user,
            name,
            role,
        ));
        let client = client_for(&store, &relay.http_base(), token);
        Device {
            name: name.into(),
            device_id: name.into(),
            path,
            key,
            user: user.into(),
            role,
            base_url: relay.http_base(),
            token: token.into(),
            store,
            client,
        }
    }

    /// Close the store (another process is about to use the file).
    fn close(&mut self) {
        self.store.close().expect("close the store");
    }

    /// Open the store again (as the app does after a restart).
    fn reopen(&mut self) {
        self.store = Arc::new(open_store(
            &self.path,
            &StoreKey::from_bytes(self.key),
            &self.user,
            &self.device_id,
            self.role,
        ));
        self.client = client_for(&self.store, &self.base_url, &self.token);
    }

    async fn sync(&self) -> PassReport {
        self.client.run_pass(PassOptions::default()).await
    }

    async fn sync_ok(&self) -> PassReport {
        let report = self.sync().await;
        assert_eq!(
            report.status,
            PassStatus::Complete,
            "{}: {report:?}",
            self.name
        );
        report
    }

    fn heads(&self, id: DocumentId) -> Vec<ChangeHash> {
        let mut heads = self.store.heads(id).expect("heads");
        heads.sort();
        heads
    }
}

fn client_for(store: &Arc<Store>, base_url: &str, token: &str) -> Arc<SyncClient> {
    Arc::new(
        SyncClient::new(
            Arc::clone(store),
            RelayConfig {
                base_url: base_url.into(),
                token: token.into(),
            },
        )
        .expect("sync client"),
    )
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort();
    heads
}

// --- 1. a day in the field ------------------------------------------------------------------

/// The story of [`day_in_the_field`] against one relay on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_offline_charting_reaches_the_agency_and_the_agencys_changes_reach_the_phones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    day_in_the_field(dir.path(), &admin, || vec![RelayProcess::start(dir.path())]).await;
}

// --- 2. reconnect cost ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_costs_the_same_for_20_and_2000_documents_and_syncs_only_what_changed() {
    let small = reconnect::measure(20, 5).await.expect("20 documents");
    let large = reconnect::measure(2_000, 5).await.expect("2,000 documents");
    for run in [&small, &large] {
        assert!(run.ok(), "{:#?}", run.to_json());
        assert_eq!(run.bootstrap.stats.docs_fetched, run.docs);
        // Nothing changed: one empty feed page, no WebSocket at all.
        assert_eq!(run.idle.stats.feed_entries, 0);
        assert_eq!(run.idle.connections, 0);
        assert!(run.idle.bytes() < 2_048, "{}", run.idle.bytes());
        // Live: the handshake only.
        assert_eq!(run.idle_live.messages(), 2, "join and peer");
        let changed = run.after_change.as_ref().expect("changed pass");
        assert_eq!(changed.stats.docs_synced, 5);
        assert_eq!(changed.stats.docs_changed, 5);
        assert_eq!(changed.stats.feed_entries, 5);
    }
    assert_eq!(small.idle.messages(), large.idle.messages());
    assert_eq!(small.idle.round_trips, large.idle.round_trips);
    assert_eq!(small.idle_live.messages(), large.idle_live.messages());
    let changed = |r: &reconnect::ReconnectRun| r.after_change.as_ref().map(PassReport::messages);
    assert_eq!(
        changed(&small),
        changed(&large),
        "five changed documents cost the same whatever the caseload"
    );
    // Only the cursor's digits differ between the two feed answers.
    assert!(small.idle.bytes().abs_diff(large.idle.bytes()) <= 8);
}

// --- 3. cut and killed passes ---------------------------------------------------------------

const CHILD_ENV: &str = "FIELDCHART_DEVICE_SYNC_CHILD";
/// SIGKILL's number on Linux (and every Unix this test runs on).
const SIGKILL: i32 = 9;

/// The device process of the kill test: runs one pass and reports progress on stdout.
#[test]
fn kill_child_pass() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [path, key, user, base_url, token] = parts[..] else {
        panic!("bad child spec");
    };
    let key = StoreKey::from_bytes(hex_decode(key).try_into().expect("32-byte key"));
    let store = Arc::new(open_store(
        Path::new(path),
        &key,
        user,
        "phone",
        Role::Clinician,
    ));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let report = runtime.block_on(async move {
        let client = client_for(&store, base_url, token);
        let progress: fieldchart_mobile::ProgressCallback = Arc::new(|p| {
            println!(
                "progress {} {}",
                p.docs_done,
                p.messages_sent + p.messages_received
            );
        });
        client
            .run_pass(PassOptions {
                progress: Some(progress),
                // Small batches in flight: more message boundaries to die at.
                max_docs_in_flight: 4,
                ..PassOptions::default()
            })
            .await
    });
    println!("done {:?}", report.status);
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every receipt on the device names heads the relay really holds (read back from the relay).
async fn assert_receipts_are_on_the_relay(store: &Store, reader: &mut TestPeer) {
    for id in store.document_ids().expect("ids") {
        let Some(receipt) = store.receipt(id).expect("receipt") else {
            continue;
        };
        match reader.fetch(id).await {
            SyncOutcome::InSync(_) => {}
            SyncOutcome::Unavailable => panic!("a receipt for {id}, which the relay lacks"),
        }
        let relay_doc = reader.doc(id).expect("fetched");
        for head in &receipt.heads {
            assert!(
                relay_doc.get_change_by_hash(head).is_some(),
                "the receipt of {id} names a change the relay does not hold"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_cut_or_killed_at_random_points_resume_without_loss_or_false_receipts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Ana", "clinician");
    let office = admin.create_user(&agency, "Sam", "office");
    let patients: Vec<(String, DocumentId)> = (0..2)
        .map(|i| admin.create_patient(&agency, &format!("Patient {i}")))
        .collect();
    for (patient, _) in &patients {
        admin.assign(&nurse, patient);
    }
    let phone_token = admin.issue_token(&nurse, "phone").token;
    let office_token = admin.issue_token(&office, "desk").token;
    let relay = RelayProcess::start(dir.path());
    let mut phone = Device::open(
        dir.path(),
        "phone",
        &nurse,
        Role::Clinician,
        &relay,
        &phone_token,
    );
    phone.sync_ok().await;

    // The office edits the charts between passes, straight on the relay.
    let mut desk = TestPeer::connect(&relay.ws_url(&office_token), Some("desk"))
        .await
        .expect("desk");
    for (_, chart) in &patients {
        assert!(matches!(desk.fetch(*chart).await, SyncOutcome::InSync(_)));
    }
    let mut reader = TestPeer::connect(&relay.ws_url(&office_token), None)
        .await
        .expect("reader");

    let seed: u64 = rand::rng().random();
    println!("cut points seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut notes: Vec<DocumentId> = Vec::new();
    let mut statuses = BTreeMap::<String, usize>::new();

    // 20 passes cut by dropping the connection after a random number of messages.
    for round in 0..20 {
        for k in 0..3 {
            let (patient, _) = &patients[(round + k) % 2];
            let note = phone
                .store
                .start_visit(&visit(&agency, patient, round * 3 + k))
                .expect("start");
            type_text(
                &phone.store,
                note,
                NoteText::Assessment,
                &format!("Round {round}, visit {k}. Stable."),
            );
            notes.push(note);
        }
        if let Some(old) = notes.get(round)
            && phone.store.visit_note(*old).expect("note").status == NoteStatus::Draft
        {
            type_text(&phone.store, *old, NoteText::Plan, &format!(" r{round}"));
        }
        if round % 2 == 0 {
            let chart = patients[round % 2].1;
            set(
                desk.doc_mut(chart).expect("chart"),
                "officeNote",
                &format!("call family, round {round}"),
            );
            assert!(matches!(desk.sync(chart).await, SyncOutcome::InSync(_)));
        }
        let cut_after = rng.random_range(1..=30u64);
        let report = phone
            .client
            .run_pass(PassOptions {
                drop_connection_after_messages: Some(cut_after),
                max_docs_in_flight: 4,
                ..PassOptions::default()
            })
            .await;
        assert!(
            matches!(
                report.status,
                PassStatus::Interrupted(_) | PassStatus::Complete
            ),
            "round {round}: {:?}",
            report.status
        );
        let name = if report.status == PassStatus::Complete {
            "complete"
        } else {
            "interrupted"
        };
        *statuses.entry(name.to_owned()).or_default() += 1;
        assert_receipts_are_on_the_relay(&phone.store, &mut reader).await;
    }

    // Passes killed mid-way: the device is a child process, SIGKILLed after a random number
    // of progress reports.
    let mut killed = 0;
    for round in 0..8 {
        for k in 0..8 {
            let note = phone
                .store
                .start_visit(&visit(&agency, &patients[k % 2].0, 100 + round * 8 + k))
                .expect("start");
            type_text(
                &phone.store,
                note,
                NoteText::Assessment,
                "Killed-pass round. Wound clean, dry, intact.",
            );
            notes.push(note);
        }
        phone.close();
        let spec = format!(
            "{}|{}|{}|{}|{}",
            phone.path.display(),
            hex_encode(&phone.key),
            nurse,
            relay.http_base(),
            phone_token
        );
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "kill_child_pass",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the device process");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let kill_after = rng.random_range(1..=12usize);
        let mut seen = 0;
        let mut finished = false;
        let mut killed_at_progress = false;
        loop {
            let line = lines
                .recv_timeout(WAIT)
                .expect("the device process neither reported progress nor finished in time");
            if line.starts_with("done") {
                finished = true;
                break;
            }
            if line.starts_with("progress") {
                seen += 1;
                if seen >= kill_after {
                    killed_at_progress = true;
                    break;
                }
            }
        }
        child.kill().expect("SIGKILL the device");
        let status = child.wait().expect("reap the device process");
        // A kill counts as mid-pass only if this test observed it: the process was still
        // running when the SIGKILL arrived (it died of the signal, not by exiting) and it never
        // reported the end of its pass (lines it printed before dying are drained here).
        let rest: Vec<String> = lines.iter().collect();
        let reported_done = finished || rest.iter().any(|l| l.starts_with("done"));
        if killed_at_progress && !reported_done && status.signal() == Some(SIGKILL) {
            killed += 1;
        }
        phone.reopen();
        assert_receipts_are_on_the_relay(&phone.store, &mut reader).await;
    }
    assert!(
        killed >= 4,
        "only {killed} of 8 device processes were observed to die mid-pass"
    );
    println!("cut statuses {statuses:?}, killed {killed}");

    // Every pass afterwards completes, and the device and the relay agree exactly.
    for _ in 0..2 {
        phone.sync_ok().await;
    }
    let ids = phone.store.document_ids().expect("ids");
    assert_eq!(ids.len(), notes.len() + patients.len());
    for id in &ids {
        match reader.fetch(*id).await {
            SyncOutcome::InSync(heads) => {
                assert_eq!(
                    sorted(heads),
                    phone.heads(*id),
                    "{id} differs from the relay"
                );
            }
            SyncOutcome::Unavailable => panic!("{id} never reached the relay"),
        }
        let receipt = phone.store.receipt(*id).expect("receipt").expect("receipt");
        assert!(receipt.covers_current, "{id}");
    }
    // The office's edits reached the phone.
    for (_, chart) in &patients {
        let desk_heads = desk.doc(*chart).expect("chart").get_heads();
        let phone_chart = phone.store.with_document(*chart, |doc| {
            desk_heads
                .iter()
                .all(|h| doc.get_change_by_hash(h).is_some())
        });
        assert!(
            phone_chart.expect("chart"),
            "the office's last edit of {chart} is missing"
        );
    }
    let mut listed = Vec::new();
    for (patient, _) in &patients {
        listed.extend(
            phone
                .store
                .notes_for_patient(patient)
                .expect("notes")
                .into_iter()
                .map(|n| n.document_id),
        );
    }
    let unique: HashSet<_> = listed.iter().collect();
    assert_eq!(listed.len(), unique.len(), "duplicate list entries");
    assert_eq!(listed.len(), notes.len(), "a note is missing from the list");
    assert!(
        phone
            .store
            .unsynced_documents()
            .expect("unsynced")
            .is_empty()
    );
    assert!(phone.store.sync_failures().expect("failures").is_empty());
}

// --- 4. revocation mid-pass -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_device_mid_pass_stops_it_with_a_clear_status_and_keeps_local_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Ana", "clinician");
    let (patient, _) = admin.create_patient(&agency, "Patient 0");
    admin.assign(&nurse, &patient);
    let issued = admin.issue_token(&nurse, "lost-phone");
    let relay = Arc::new(RelayProcess::start(dir.path()));
    let phone = Device::open(
        dir.path(),
        "lost-phone",
        &nurse,
        Role::Clinician,
        &relay,
        &issued.token,
    );
    phone.sync_ok().await;

    let mut notes = BTreeMap::new();
    for i in 0..300 {
        let note = phone
            .store
            .start_visit(&visit(&agency, &patient, i))
            .expect("start");
        let text = format!("Visit {i}: vitals stable, teaching on fall prevention given.");
        phone
            .store
            .update_text(note, NoteText::Assessment, &text)
            .expect("text");
        notes.insert(note, text);
    }

    // After the first few documents are through, an administrator revokes the phone; the
    // pass waits until the relay has closed its session, then carries on as if nothing
    // happened, which is when it must find out.
    let revoked = Arc::new(AtomicBool::new(false));
    let progress: fieldchart_mobile::ProgressCallback = {
        let revoked = Arc::clone(&revoked);
        let relay = Arc::clone(&relay);
        let data_dir = dir.path().to_owned();
        let device = issued.device_id.clone();
        Arc::new(move |p| {
            if p.docs_done < 5 || revoked.swap(true, Ordering::SeqCst) {
                return;
            }
            RelayProcess::admin(&data_dir, &["revoke-device", "--device", &device]);
            for _ in 0..1_000 {
                if relay.logs().contains("sessions closed") {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("the relay did not close the revoked device's session");
        })
    };
    let report = phone
        .client
        .run_pass(PassOptions {
            progress: Some(progress),
            max_docs_in_flight: 4,
            ..PassOptions::default()
        })
        .await;
    assert!(
        revoked.load(Ordering::SeqCst),
        "the pass ended before the revocation"
    );
    assert_eq!(report.status, PassStatus::Revoked, "{report:?}");
    assert!(report.stats.docs_done < notes.len());

    // Nothing is lost, and what did not reach the agency is listed.
    for (note, text) in &notes {
        assert_eq!(
            &phone.store.visit_note(*note).expect("note").assessment,
            text
        );
    }
    let unsynced = phone.store.unsynced_documents().expect("unsynced");
    assert!(!unsynced.is_empty());
    let unconfirmed: BTreeSet<_> = phone
        .store
        .unconfirmed_documents()
        .expect("list")
        .into_iter()
        .map(|u| u.document_id)
        .collect();
    for id in &unsynced {
        assert!(notes.contains_key(id));
        assert!(unconfirmed.contains(id));
        assert!(
            phone
                .store
                .receipt(*id)
                .expect("receipt")
                .is_none_or(|r| !r.covers_current)
        );
    }
    let failures = phone.store.sync_failures().expect("failures");
    assert_eq!(failures.len(), unsynced.len());
    assert!(
        failures
            .iter()
            .all(|f| f.failure == FailureKind::Unauthorized)
    );

    // The next pass is refused at once, with the same clear answer, and still loses nothing.
    let again = phone.sync().await;
    assert_eq!(again.status, PassStatus::Unauthorized);
    assert_eq!(again.messages(), 0);
    assert_eq!(
        phone.store.unsynced_documents().expect("unsynced"),
        unsynced
    );
}

// --- 5. a new assignment --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newly_assigned_patients_chart_arrives_with_the_next_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let ben = admin.create_user(&agency, "Ben", "clinician");
    let sam = admin.create_user(&agency, "Sam", "office");
    let (old_patient, old_chart) = admin.create_patient(&agency, "Known Patient");
    let (new_patient, new_chart) = admin.create_patient(&agency, "New Patient");
    admin.assign(&ben, &old_patient);
    let ben_token = admin.issue_token(&ben, "ben-phone").token;
    let sam_token = admin.issue_token(&sam, "sam-desk").token;
    let relay = RelayProcess::start(dir.path());
    let ben_phone = Device::open(
        dir.path(),
        "ben-phone",
        &ben,
        Role::Clinician,
        &relay,
        &ben_token,
    );
    let desk = Device::open(
        dir.path(),
        "sam-desk",
        &sam,
        Role::Office,
        &relay,
        &sam_token,
    );

    ben_phone.sync_ok().await;
    let held: Vec<_> = ben_phone.store.patients().expect("patients");
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].document_id, old_chart);

    // The office prepares the new patient's care plan, then assigns Ben.
    desk.sync_ok().await;
    desk.store
        .add_care_plan_item(new_chart, &[], "Medication management", "active")
        .expect("care plan");
    desk.sync_ok().await;
    admin.assign(&ben, &new_patient);

    let report = ben_phone.sync_ok().await;
    assert_eq!(report.stats.docs_fetched, 1);
    let held: BTreeSet<_> = ben_phone
        .store
        .patients()
        .expect("patients")
        .into_iter()
        .map(|p| p.patient_id)
        .collect();
    assert_eq!(held, BTreeSet::from([old_patient, new_patient]));
    assert_eq!(ben_phone.heads(new_chart), desk.heads(new_chart));
    assert_eq!(
        ben_phone.store.patient_chart(new_chart).expect("chart"),
        desk.store.patient_chart(new_chart).expect("chart")
    );
}

// --- live mode ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sessions_carry_an_edit_to_another_connected_device_without_a_new_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let ana = admin.create_user(&agency, "Ana", "clinician");
    let ben = admin.create_user(&agency, "Ben", "clinician");
    let (patient, chart) = admin.create_patient(&agency, "Shared Patient");
    admin.assign(&ana, &patient);
    admin.assign(&ben, &patient);
    let ana_token = admin.issue_token(&ana, "ana-phone").token;
    let ben_token = admin.issue_token(&ben, "ben-phone").token;
    let relay = RelayProcess::start(dir.path());
    let a = Device::open(
        dir.path(),
        "ana-phone",
        &ana,
        Role::Clinician,
        &relay,
        &ana_token,
    );
    let b = Device::open(
        dir.path(),
        "ben-phone",
        &ben,
        Role::Clinician,
        &relay,
        &ben_token,
    );

    // Both phones go live; each session syncs the chart first.
    let live = |d: &Device| {
        let client = Arc::clone(&d.client);
        tokio::spawn(async move {
            client
                .run_pass(PassOptions {
                    live: true,
                    ..PassOptions::default()
                })
                .await
        })
    };
    let mut a_events = a.client.subscribe();
    let mut b_events = b.client.subscribe();
    let a_live = live(&a);
    let b_live = live(&b);
    for events in [&mut a_events, &mut b_events] {
        wait_for(events, |e| *e == SyncEvent::UpToDate).await;
    }

    // Ana edits the care plan; her session sends it; Ben's session receives it.
    a.store
        .add_care_plan_item(chart, &[], "Pain management", "active")
        .expect("edit");
    a.client.notify_local_change(chart);
    wait_for(&mut b_events, |e| *e == SyncEvent::DocumentChanged(chart)).await;
    assert_eq!(b.heads(chart), a.heads(chart));
    let mut got = BTreeSet::new();
    descriptions(
        &b.store.patient_chart(chart).expect("chart").care_plan,
        &mut got,
    );
    assert!(got.contains("Pain management"));

    a.client.stop();
    b.client.stop();
    let a_report = a_live.await.expect("a");
    let b_report = b_live.await.expect("b");
    assert_eq!(a_report.status, PassStatus::Stopped);
    assert_eq!(b_report.status, PassStatus::Stopped);
    assert_eq!(b_report.connections, 1, "no new connection");
    // A live pass syncs the chart on its socket (no batch fetch), so the relay forwards
    // Ana's edit: one change-feed read at the start, none after.
    assert_eq!(b_report.fetch_requests, 0, "no batch fetch in a live pass");
    assert_eq!(
        b_report.http_requests, 1,
        "no new feed read: the relay forwarded it ({b_report:?})"
    );
    assert!(
        a.store
            .receipt(chart)
            .expect("receipt")
            .expect("receipt")
            .covers_current
    );
}

async fn wait_for(
    events: &mut tokio::sync::broadcast::Receiver<SyncEvent>,
    wanted: impl Fn(&SyncEvent) -> bool,
) {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(event) if wanted(&event) => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("sync events ended: {e}"),
            }
        }
    })
    .await
    .expect("the awaited sync event did not come");
}

// --- time budget and backoff ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_out_of_time_stops_cleanly_and_the_next_pass_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Ana", "clinician");
    let office = admin.create_user(&agency, "Sam", "office");
    let (patient, _) = admin.create_patient(&agency, "Patient 0");
    admin.assign(&nurse, &patient);
    let token = admin.issue_token(&nurse, "phone").token;
    let office_token = admin.issue_token(&office, "desk").token;
    let relay = RelayProcess::start(dir.path());
    let phone = Device::open(dir.path(), "phone", &nurse, Role::Clinician, &relay, &token);
    phone.sync_ok().await;
    for i in 0..200 {
        let note = phone
            .store
            .start_visit(&visit(&agency, &patient, i))
            .expect("start");
        type_text(
            &phone.store,
            note,
            NoteText::Assessment,
            "Stable; no changes.",
        );
    }

    // The app is busy (the callback stands in for it) until the budget is gone. The budget
    // must let the pass finish a few documents before that; 3 s leaves a loaded 2-core
    // machine room (a quiet one needs well under 1 s for the first three).
    let budget = Duration::from_secs(3);
    let stalled = Arc::new(AtomicBool::new(false));
    let progress: fieldchart_mobile::ProgressCallback = {
        let stalled = Arc::clone(&stalled);
        Arc::new(move |p| {
            if p.docs_done >= 3 && !stalled.swap(true, Ordering::SeqCst) {
                std::thread::sleep(budget + Duration::from_millis(200));
            }
        })
    };
    let report = phone
        .client
        .run_pass(PassOptions {
            time_budget: Some(budget),
            progress: Some(progress),
            max_docs_in_flight: 4,
            ..PassOptions::default()
        })
        .await;
    assert_eq!(report.status, PassStatus::BudgetExhausted, "{report:?}");
    assert!(report.stats.docs_done < 200);
    assert!(
        report.elapsed_s < 10.0,
        "stopped promptly: {}",
        report.elapsed_s
    );
    let left = phone.store.unsynced_documents().expect("unsynced").len();
    assert!(left > 0 && left < 200, "{left}");
    let mut reader = TestPeer::connect(&relay.ws_url(&office_token), None)
        .await
        .expect("reader");
    assert_receipts_are_on_the_relay(&phone.store, &mut reader).await;

    let next = phone.sync_ok().await;
    // A document whose last message the relay committed just as the budget ran out is
    // confirmed from the feed alone.
    assert_eq!(
        next.stats.docs_synced + next.stats.confirmed_from_feed,
        left
    );
    assert!(
        phone
            .store
            .unsynced_documents()
            .expect("unsynced")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_rides_out_a_relay_restart_with_backoff() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Ana", "clinician");
    let (patient, _) = admin.create_patient(&agency, "Patient 0");
    admin.assign(&nurse, &patient);
    let token = admin.issue_token(&nurse, "phone").token;
    let mut relay = RelayProcess::start(dir.path());
    let phone = Device::open(dir.path(), "phone", &nurse, Role::Clinician, &relay, &token);

    let mut events = phone.client.subscribe();
    let running = {
        let client = Arc::clone(&phone.client);
        tokio::spawn(async move {
            client
                .run_live(
                    PassOptions::default(),
                    fieldchart_mobile::Backoff::new(
                        Duration::from_millis(50),
                        Duration::from_millis(500),
                    ),
                )
                .await
        })
    };
    wait_for(&mut events, |e| *e == SyncEvent::UpToDate).await;

    // A note made without telling the session (so only a new pass can carry it); then the
    // relay dies and comes back on the same port, and the phone reconnects by itself.
    let note = phone
        .store
        .start_visit(&visit(&agency, &patient, 0))
        .expect("start");
    relay.restart();
    wait_for(&mut events, |e| *e == SyncEvent::UpToDate).await;
    phone.client.stop();
    let report = running.await.expect("live task");
    assert_eq!(report.status, PassStatus::Stopped, "{report:?}");
    // The note went up with the reconnecting pass.
    assert!(
        phone
            .store
            .receipt(note)
            .expect("receipt")
            .expect("receipt")
            .covers_current
    );
}
