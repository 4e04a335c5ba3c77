//! The randomized fault run: several devices edit offline and sync through the
//! [`FaultProxy`] while faults fire — frames dropped, delayed, duplicated, reordered and
//! truncated, connections reset, the relay SIGKILLed and restarted (between rounds, and in
//! the middle of a device's pass: at a progress report while its sync frames flow and
//! documents are still open), once restarted from an older copy of its data directory, device
//! passes cut off mid-way with the store reopened from disk — then, faults off, every device syncs until nothing changes. Then:
//! - all replicas are identical (same documents, same heads, the relay's too);
//! - every edit whose call returned on a device is present on every device and on the relay;
//! - every receipt a device shows names heads the relay's store holds.
//!
//! One seed decides everything the run chooses; a failure names its seed. Used by
//! `tests/tests/fault_schedule.rs` (20+ seeds) and `fieldchart-bench soak --runs N`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use automerge::{ChangeHash, ReadDoc};
use fieldchart_core::model::{NoteText, Role, VisitStart};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreKey};
use fieldchart_mobile::{
    PassOptions, PassStatus, Progress, ProgressCallback, RelayConfig, SyncClient,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::fault_proxy::{FaultProxy, FaultRates};
use crate::reconnect::open_store;
use crate::relay_process::{Admin, RelayProcess, SyncOutcome, TestPeer};

/// Devices per run.
const DEVICES: usize = 3;
/// Rounds of offline edits and faulty syncs.
const ROUNDS: usize = 5;
/// Quiet-phase cycles (every device syncs once per cycle) before giving up on convergence.
const QUIET_CYCLES: usize = 8;

struct Phone {
    path: PathBuf,
    key: [u8; 32],
    user: String,
    token: String,
    store: Arc<Store>,
    notes: Vec<DocumentId>,
}

impl Phone {
    /// Close the store and open the file again, as the app does after being killed.
    fn reopen(&mut self) {
        let _ = self.store.close();
        self.store = Arc::new(open_store(
            &self.path,
            &StoreKey::from_bytes(self.key),
            &self.user,
            &self.user,
            Role::Clinician,
        ));
    }

    fn client(&self, base_url: &str) -> SyncClient {
        SyncClient::new(
            Arc::clone(&self.store),
            RelayConfig {
                base_url: base_url.into(),
                token: self.token.clone(),
            },
        )
        .expect("sync client")
    }
}

/// What one run saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// The seed.
    pub seed: u64,
    /// Edits whose call returned (each checked everywhere at the end).
    pub edits: usize,
    /// Faults the proxy injected, and connections it reset.
    pub faults: u64,
    /// Connections the proxy reset.
    pub resets: u64,
    /// Relay SIGKILLs between rounds (each followed by a restart).
    pub relay_kills: usize,
    /// Relay SIGKILLs in the middle of a device's pass, observed there: sent from the pass's
    /// own progress report while its frames flowed and documents were open (each followed by a
    /// restart once the pass returned).
    pub relay_kills_mid_pass: usize,
    /// Restarts from an older copy of the data directory.
    pub restores: usize,
    /// Device passes cut off mid-way in this process (store reopened from disk after).
    pub cut_passes: usize,
    /// Device processes SIGKILLed, observed mid-pass.
    pub device_kills: usize,
    /// Quiet-phase cycles it took to converge.
    pub quiet_cycles: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl SoakReport {
    /// One JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "seed": self.seed,
            "edits": self.edits,
            "faults": self.faults,
            "resets": self.resets,
            "relayKills": self.relay_kills,
            "relayKillsMidPass": self.relay_kills_mid_pass,
            "restores": self.restores,
            "cutPasses": self.cut_passes,
            "deviceKills": self.device_kills,
            "quietCycles": self.quiet_cycles,
            "elapsedS": self.elapsed.as_secs_f64(),
        })
    }
}

fn copy_files(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(to).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_file() {
            std::fs::remove_file(&path).map_err(|e| e.to_string())?;
        }
    }
    for entry in std::fs::read_dir(from).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if let (true, Some(name)) = (path.is_file(), path.file_name()) {
            std::fs::copy(&path, to.join(name)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The relay's data directory after the administrative setup every run shares (an agency, a
/// patient, an office user and [`DEVICES`] nurses assigned to the patient, with tokens), made
/// once per process: each run starts its relay on a copy. The admin CLI is a process per
/// command, a dozen per setup — most of a run's fixed cost before it was shared.
struct Cast {
    dir: tempfile::TempDir,
    agency: String,
    patient: String,
    office_token: String,
    /// Per nurse: user id and token.
    nurses: Vec<(String, String)>,
}

impl Cast {
    fn get() -> &'static Cast {
        static CAST: std::sync::OnceLock<Cast> = std::sync::OnceLock::new();
        CAST.get_or_init(|| {
            let dir = tempfile::tempdir().expect("a directory for the shared relay setup");
            let admin = Admin::new(dir.path());
            let agency = admin.create_agency("Riverside");
            let (patient, _) = admin.create_patient(&agency, "Ada");
            let office = admin.create_user(&agency, "Olive", "office");
            let office_token = admin.issue_token(&office, "desk").token;
            let nurses = (0..DEVICES)
                .map(|i| {
                    let user = admin.create_user(&agency, &format!("Nurse {i}"), "clinician");
                    admin.assign(&user, &patient);
                    let token = admin.issue_token(&user, "phone").token;
                    (user, token)
                })
                .collect();
            Cast {
                dir,
                agency,
                patient,
                office_token,
                nurses,
            }
        })
    }
}

/// The relay process, shared with a pass's progress callback that may SIGKILL it.
type SharedRelay = Arc<Mutex<RelayProcess>>;

fn lock(relay: &SharedRelay) -> MutexGuard<'_, RelayProcess> {
    relay.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A progress callback that SIGKILLs the relay at the `kill_at`-th report showing the pass in
/// the middle of its work: sync messages sent and fewer documents settled than planned. The
/// kill runs inside the pass's own callback, so it is mid-pass by construction; `killed` says
/// whether it happened (a pass with nothing to exchange never qualifies).
fn kill_relay_mid_pass(
    relay: &SharedRelay,
    kill_at: usize,
    killed: &Arc<AtomicBool>,
) -> ProgressCallback {
    let relay = Arc::clone(relay);
    let killed = Arc::clone(killed);
    let seen = AtomicUsize::new(0);
    Arc::new(move |p: &Progress| {
        if killed.load(Ordering::SeqCst) || p.messages_sent == 0 || p.docs_done >= p.docs_total {
            return;
        }
        if seen.fetch_add(1, Ordering::SeqCst) + 1 < kill_at {
            return;
        }
        // SIGKILL and reap: a few milliseconds on the pass's thread.
        lock(&relay).kill();
        killed.store(true, Ordering::SeqCst);
    })
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort();
    heads
}

/// One sync pass in this process, as the device child of [`run`] does it
/// (`fieldchart-bench device-pass`): prints `progress` per report and `done <status>` at the end.
pub fn device_pass(db: &Path, key_hex: &str, user: &str, base_url: &str, token: &str) {
    let key: [u8; 32] = hex::decode(key_hex)
        .ok()
        .and_then(|k| k.try_into().ok())
        .unwrap_or_else(|| panic!("--key must be 64 hex digits"));
    let store = Arc::new(open_store(
        db,
        &StoreKey::from_bytes(key),
        user,
        user,
        Role::Clinician,
    ));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = SyncClient::new(
        Arc::clone(&store),
        RelayConfig {
            base_url: base_url.into(),
            token: token.into(),
        },
    )
    .expect("sync client");
    let progress: fieldchart_mobile::ProgressCallback = Arc::new(|p| {
        println!("progress {}", p.docs_done);
    });
    let report = runtime.block_on(client.run_pass(PassOptions {
        time_budget: Some(Duration::from_secs(4)),
        reply_timeout: Duration::from_secs(1),
        max_docs_in_flight: 2,
        progress: Some(progress),
        ..PassOptions::default()
    }));
    println!("done {:?}", report.status);
}

/// Run `device` (the `fieldchart-bench` binary) for one pass of `phone` and SIGKILL it after
/// `kill_after` progress reports. Returns whether this was observed mid-pass: the child died
/// of the signal and never reported the end of its pass.
fn killed_device_pass(
    device: &Path,
    phone: &Phone,
    base_url: &str,
    kill_after: usize,
) -> Result<bool, String> {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let mut child = Command::new(device)
        .args(["device-pass", "--db"])
        .arg(&phone.path)
        .args([
            "--key",
            &hex::encode(phone.key),
            "--user",
            &phone.user,
            "--base-url",
            base_url,
            "--token",
            &phone.token,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn the device process: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = 0;
    let mut at_progress = false;
    let mut done = false;
    // Bounded: the child's pass has a 4 s budget; 30 s is reached only if it hangs.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(30)) {
        if line.starts_with("done") {
            done = true;
            break;
        }
        if line.starts_with("progress") {
            seen += 1;
            if seen >= kill_after {
                at_progress = true;
                break;
            }
        }
    }
    child
        .kill()
        .map_err(|e| format!("SIGKILL the device: {e}"))?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let rest: Vec<String> = lines.try_iter().collect();
    done |= rest.iter().any(|l| l.starts_with("done"));
    Ok(at_progress && !done && status.signal() == Some(9))
}

/// Run one seeded schedule. `Err` names the seed and what did not hold. `device` is the
/// `fieldchart-bench` binary, run as a device process to be SIGKILLed mid-pass.
pub async fn run(seed: u64, device: &Path) -> Result<SoakReport, String> {
    let started = Instant::now();
    let fail = |what: String| format!("seed {seed}: {what}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = SoakReport {
        seed,
        ..SoakReport::default()
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let relay_dir = dir.path().join("relay");
    let backup_dir = dir.path().join("backup");
    std::fs::create_dir_all(&relay_dir).map_err(|e| e.to_string())?;
    let cast = Cast::get();
    copy_files(cast.dir.path(), &relay_dir).map_err(&fail)?;
    let (agency, patient) = (&cast.agency, &cast.patient);
    let office_token = cast.office_token.clone();
    let mut phones = Vec::new();
    for (i, (user, token)) in cast.nurses.iter().cloned().enumerate() {
        let path = dir.path().join(format!("phone{i}.db"));
        let key: [u8; 32] = rng.random();
        let store = Arc::new(open_store(
            &path,
            &StoreKey::from_bytes(key),
            &user,
            &user,
            Role::Clinician,
        ));
        phones.push(Phone {
            path,
            key,
            user,
            token,
            store,
            notes: Vec::new(),
        });
    }
    let relay: SharedRelay = Arc::new(Mutex::new(RelayProcess::start(&relay_dir)));
    let relay_addr = lock(&relay).addr();
    let proxy = FaultProxy::start(relay_addr, FaultRates::ROUGH, seed).await;
    // Every change hash an edit call returned, per device.
    let mut returned: Vec<ChangeHash> = Vec::new();
    let restore_round = rng.random_range(1..ROUNDS);
    for round in 0..ROUNDS {
        // Offline edits.
        for (i, phone) in phones.iter_mut().enumerate() {
            for _ in 0..rng.random_range(1..=2) {
                let note = if phone.notes.is_empty() || rng.random_bool(0.4) {
                    let note = phone
                        .store
                        .start_visit(&VisitStart {
                            agency_id: agency.to_string(),
                            patient_id: patient.to_string(),
                            service_type: "skilled-nursing".into(),
                            date: "2026-11-30".into(),
                            location: format!("{round}-{i} Elm St"),
                            started_at_ms: 1_764_460_800_000 + (round * 10 + i) as i64,
                            start_monotonic_ms: 1 + (round * 10 + i) as i64,
                        })
                        .map_err(|e| fail(format!("start_visit: {e}")))?;
                    phone.notes.push(note);
                    note
                } else {
                    phone.notes[rng.random_range(0..phone.notes.len())]
                };
                let len = phone
                    .store
                    .visit_note(note)
                    .map_err(|e| fail(format!("read note: {e}")))?
                    .assessment
                    .encode_utf16()
                    .count();
                phone
                    .store
                    .splice_text(
                        note,
                        NoteText::Assessment,
                        len,
                        0,
                        &format!(" r{round}d{i}#{}.", rng.random::<u16>()),
                    )
                    .map_err(|e| fail(format!("type: {e}")))?;
                report.edits += 1;
                returned.extend(phone.store.heads(note).map_err(|e| fail(e.to_string()))?);
            }
        }
        // Faulty syncs; some passes cut off mid-way (the app killed), the store reopened. In
        // half the rounds the relay is killed in the middle of one device's ordinary pass.
        let mid_pass = rng.random_bool(0.5).then(|| rng.random_range(0..DEVICES));
        let mut killed_mid_pass = false;
        for (index, phone) in phones.iter_mut().enumerate() {
            let client = phone.client(&proxy.http_base());
            let options = PassOptions {
                time_budget: Some(Duration::from_secs(4)),
                reply_timeout: Duration::from_secs(1),
                max_docs_in_flight: 2,
                ..PassOptions::default()
            };
            let roll = rng.random_range(0..10);
            if roll < 2 {
                // The app's process is killed mid-pass (SIGKILL at an observed progress report).
                drop(client);
                let _ = phone.store.close();
                let kill_after = rng.random_range(1..=4);
                let base = proxy.http_base();
                let killed = tokio::task::block_in_place(|| {
                    killed_device_pass(device, phone, &base, kill_after)
                })
                .map_err(&fail)?;
                if killed {
                    report.device_kills += 1;
                }
                phone.reopen();
            } else if roll < 4 {
                let cut = Duration::from_millis(rng.random_range(0..200));
                if tokio::time::timeout(cut, client.run_pass(options))
                    .await
                    .is_err()
                {
                    report.cut_passes += 1;
                }
                drop(client);
                phone.reopen();
            } else if mid_pass == Some(index) {
                let killed = Arc::new(AtomicBool::new(false));
                let kill_at = rng.random_range(1..=3);
                let options = PassOptions {
                    progress: Some(kill_relay_mid_pass(&relay, kill_at, &killed)),
                    ..options
                };
                let _ = client.run_pass(options).await;
                if killed.load(Ordering::SeqCst) {
                    let mut relay = lock(&relay);
                    relay.restart();
                    proxy.set_upstream(relay.addr());
                    report.relay_kills_mid_pass += 1;
                    killed_mid_pass = true;
                }
            } else {
                let _ = client.run_pass(options).await;
            }
        }
        // The relay: killed and restarted, or (once) restarted from last round's copy.
        // A round whose relay was killed mid-pass is not killed again (same number of
        // restarts as before mid-pass kills, so the same run time).
        let between = rng.random_bool(0.5);
        let mut relay = lock(&relay);
        if round == restore_round.saturating_sub(1) {
            relay.kill();
            copy_files(&relay_dir, &backup_dir).map_err(&fail)?;
            *relay = RelayProcess::start(&relay_dir);
            proxy.set_upstream(relay.addr());
        } else if round == restore_round {
            relay.kill();
            copy_files(&backup_dir, &relay_dir).map_err(&fail)?;
            *relay = RelayProcess::start(&relay_dir);
            proxy.set_upstream(relay.addr());
            report.restores += 1;
        } else if between && !killed_mid_pass {
            relay.restart();
            proxy.set_upstream(relay.addr());
            report.relay_kills += 1;
        }
    }

    // The relay stays up (held by `relay`) to the end; only its URL is needed from here on.
    let office_url = lock(&relay).ws_url(&office_token);
    // Faults off: sync until every device holds the same documents with the same heads.
    proxy.set_rates(FaultRates::NONE);
    let mut converged = false;
    let mut last = Vec::new();
    for cycle in 0..QUIET_CYCLES {
        report.quiet_cycles = cycle + 1;
        let mut all_complete = true;
        last.clear();
        for phone in &phones {
            let pass = phone
                .client(&proxy.http_base())
                .run_pass(PassOptions::default())
                .await;
            all_complete &= pass.status == PassStatus::Complete;
            last.push(format!("{:?} {:?}", pass.status, pass.stats));
        }
        if all_complete && same_everywhere(&phones)? {
            converged = true;
            break;
        }
    }
    if !converged {
        let mut state = Vec::new();
        for (i, phone) in phones.iter().enumerate() {
            state.push(format!(
                "device {i}: {} documents, unsynced {:?}, failures {:?}, last pass {}",
                phone.store.document_ids().map_or(0, |d| d.len()),
                phone.store.unsynced_documents(),
                phone.store.sync_failures(),
                last.get(i).map_or("", String::as_str),
            ));
        }
        // Every document any device holds: who holds it with which heads and receipt, and
        // what the relay answers for it.
        let mut all = std::collections::BTreeSet::new();
        for phone in &phones {
            all.extend(phone.store.document_ids().unwrap_or_default());
        }
        if let Ok(mut reader) = TestPeer::connect(&office_url, None).await {
            for id in all {
                let relay_says = match reader.fetch(id).await {
                    SyncOutcome::InSync(h) => format!("relay {:?}", sorted(h)),
                    SyncOutcome::Unavailable => "relay: unavailable".into(),
                };
                let mut line = format!("{id}: {relay_says}");
                for (i, phone) in phones.iter().enumerate() {
                    let heads = phone.store.heads(id).ok().map(sorted);
                    let receipt = phone.store.receipt(id).ok().flatten().map(|r| r.heads);
                    line.push_str(&format!("; device {i} heads {heads:?} receipt {receipt:?}"));
                }
                state.push(line);
            }
        }
        return Err(fail(format!(
            "the devices did not converge in {QUIET_CYCLES} quiet cycles\n{}",
            state.join("\n")
        )));
    }

    // The relay holds the same, every returned edit is everywhere, every receipt is backed.
    let ids = phones[0]
        .store
        .document_ids()
        .map_err(|e| fail(e.to_string()))?;
    let mut reader = TestPeer::connect(&office_url, None)
        .await
        .map_err(|e| fail(format!("reader: {e:?}")))?;
    let mut relay_heads = BTreeMap::new();
    for id in &ids {
        match reader.fetch(*id).await {
            SyncOutcome::InSync(heads) => {
                relay_heads.insert(*id, sorted(heads));
            }
            SyncOutcome::Unavailable => return Err(fail(format!("{id} is not on the relay"))),
        }
        let ours = sorted(
            phones[0]
                .store
                .heads(*id)
                .map_err(|e| fail(e.to_string()))?,
        );
        if relay_heads[id] != ours {
            return Err(fail(format!(
                "{id}: the relay's heads differ from the devices'"
            )));
        }
    }
    for hash in &returned {
        for (i, phone) in phones.iter().enumerate() {
            let mut found = false;
            for id in &ids {
                found |= phone
                    .store
                    .with_document(*id, |doc| doc.get_change_by_hash(hash).is_some())
                    .map_err(|e| fail(e.to_string()))?;
            }
            if !found {
                return Err(fail(format!("edit {hash} is missing on device {i}")));
            }
        }
        let on_relay = ids.iter().any(|id| {
            reader
                .doc(*id)
                .is_some_and(|doc| doc.get_change_by_hash(hash).is_some())
        });
        if !on_relay {
            return Err(fail(format!("edit {hash} is missing on the relay")));
        }
    }
    for (i, phone) in phones.iter().enumerate() {
        for id in phone
            .store
            .document_ids()
            .map_err(|e| fail(e.to_string()))?
        {
            let Some(receipt) = phone.store.receipt(id).map_err(|e| fail(e.to_string()))? else {
                continue;
            };
            let Some(doc) = reader.doc(id) else {
                return Err(fail(format!(
                    "device {i} holds a receipt for {id}, not on the relay"
                )));
            };
            if receipt
                .heads
                .iter()
                .any(|h| doc.get_change_by_hash(h).is_none())
            {
                return Err(fail(format!(
                    "device {i}'s receipt for {id} names a change the relay lacks"
                )));
            }
        }
    }
    report.faults = proxy
        .counts()
        .injected
        .load(std::sync::atomic::Ordering::Relaxed);
    report.resets = proxy
        .counts()
        .resets
        .load(std::sync::atomic::Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Whether every device holds the same documents with the same heads.
fn same_everywhere(phones: &[Phone]) -> Result<bool, String> {
    let mut first: Option<BTreeMap<DocumentId, Vec<ChangeHash>>> = None;
    for phone in phones {
        let mut docs = BTreeMap::new();
        for id in phone.store.document_ids().map_err(|e| e.to_string())? {
            docs.insert(
                id,
                sorted(phone.store.heads(id).map_err(|e| e.to_string())?),
            );
        }
        match &first {
            None => first = Some(docs),
            Some(f) if *f != docs => return Ok(false),
            Some(_) => {}
        }
    }
    Ok(true)
}
