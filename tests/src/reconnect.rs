//! The `reconnect` workload: a device holding K synced documents reconnects with nothing
//! changed (and then with N documents changed on the relay); what does it cost?
//!
//! Used by `fieldchart-bench reconnect` and by the reconnect-cost test. The relay is the real
//! `fieldchart-server` binary of the same build profile, run as a child process on a temporary
//! data directory; [`server_binary`] finds it next to the running executable whether that is a
//! test (`target/<profile>/deps/…`) or the benchmark binary (`target/<profile>/…`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldchart_core::model::{Actor, Role};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};
use fieldchart_mobile::{PassOptions, PassReport, PassStatus, RelayConfig, SyncClient, SyncEvent};
use serde_json::{Value, json};

use crate::relay_process::{SyncOutcome, TestPeer, set, visit_note};
use crate::relay_stats::{BenchRelay, ProcSample};

/// How long a live session may take to report it is up to date.
const LIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Documents one seeding device pushes: its messages (two per new document) stay within the
/// relay's per-token burst allowance.
const DOCS_PER_SEEDER: usize = 2_000;

/// Documents a seeder sends in one batch.
const SEED_BATCH: usize = 500;

/// Documents per batch fetch for the benchmarks' first syncs: `$FIELDCHART_BENCH_FETCH_BATCH_DOCS`
/// (0: no batch fetches, one `request` exchange per document over the WebSocket, as before
/// they existed; for before/after figures from one build), else the device's default.
pub fn fetch_batch_docs() -> usize {
    std::env::var("FIELDCHART_BENCH_FETCH_BATCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(fieldchart_core::sync::DEFAULT_FETCH_BATCH_DOCS)
}

/// The `fieldchart-server` binary: `$FIELDCHART_SERVER_BIN`, or next to the running
/// executable, or one directory up (test executables live in `deps/`).
pub fn server_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("FIELDCHART_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let name = format!("fieldchart-server{}", std::env::consts::EXE_SUFFIX);
    let dir = exe.parent();
    for candidate in [dir, dir.and_then(Path::parent)].into_iter().flatten() {
        let binary = candidate.join(&name);
        if binary.is_file() {
            return Ok(binary);
        }
    }
    Err(format!(
        "the relay binary {name} is not next to {}: build it with `cargo build [--release] -p fieldchart-server`",
        exe.display()
    ))
}

/// Open (or create) a device store at `path` for `user` on `device`.
pub fn open_store(path: &Path, key: &StoreKey, user: &str, device: &str, role: Role) -> Store {
    Store::open(StoreConfig {
        path: path.to_owned(),
        key: key.clone(),
        actor: Actor {
            user_id: user.into(),
            device_id: device.into(),
        },
        role,
        keystroke_journal: false,
    })
    .unwrap_or_else(|e| panic!("open store {}: {e}", path.display()))
}

/// A TCP proxy on 127.0.0.1 that counts every byte both ways (HTTP request and response
/// heads and bodies, the WebSocket upgrade, WebSocket frame headers and payloads) and every
/// connection, so a pass's cost is what crosses the wire, not only the payloads.
#[derive(Debug)]
pub struct WireCounter {
    addr: std::net::SocketAddr,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    connections: Arc<std::sync::atomic::AtomicU64>,
    open: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WireCounter {
    /// Listen on a free port of 127.0.0.1 and forward every connection to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> Result<WireCounter, String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("bind the wire counter: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (b, c) = (Arc::clone(&bytes), Arc::clone(&connections));
        let open = Arc::new(std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let o = Arc::clone(&open);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                let b = Arc::clone(&b);
                let connection = tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    // Counted as forwarded, chunk by chunk: once the device has an answer,
                    // every byte of the exchange so far is counted.
                    tokio::join!(
                        counted_copy(ri, wo, Arc::clone(&b)),
                        counted_copy(ro, wi, b)
                    );
                });
                o.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(connection.abort_handle());
            }
        });
        Ok(WireCounter {
            addr,
            bytes,
            connections,
            open,
            task,
        })
    }

    /// `http://<proxy>`.
    pub fn http_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Close every connection open through the proxy (both sockets dropped), as a network
    /// change does: a client's pooled keep-alive connection is gone and its next request
    /// opens a fresh one.
    pub fn sever(&self) {
        for handle in self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            handle.abort();
        }
    }

    /// Bytes forwarded both ways so far, and connections accepted (both reset to zero).
    pub fn take(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.bytes.swap(0, Ordering::Relaxed),
            self.connections.swap(0, Ordering::Relaxed),
        )
    }
}

async fn counted_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for WireCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one reconnect measurement saw.
#[derive(Debug)]
pub struct ReconnectRun {
    /// Documents the device holds.
    pub docs: usize,
    /// Documents changed on the relay before the last pass.
    pub changed: usize,
    /// The first pass (fetching every document).
    pub bootstrap: PassReport,
    /// Bytes on the wire of the first pass (as `idle_wire_bytes`).
    pub bootstrap_wire_bytes: u64,
    /// Sum of the documents' `save()` sizes on the device after the first pass.
    pub save_bytes: u64,
    /// CPU seconds the relay process spent during the first pass.
    pub bootstrap_relay_cpu_s: Option<f64>,
    /// CPU seconds this process (the device: pass, store, HTTP client, and the byte-counting
    /// proxy) spent during the first pass.
    pub bootstrap_device_cpu_s: Option<f64>,
    /// Documents per batch fetch in the first pass (0: none, WebSocket only).
    pub fetch_batch_docs: usize,
    /// Reconnect with nothing changed (a one-off pass).
    pub idle: PassReport,
    /// Reconnect with nothing changed in live mode (stopped once up to date).
    pub idle_live: PassReport,
    /// The pass after `changed` documents changed on the relay.
    pub after_change: Option<PassReport>,
    /// Whether the device ended with exactly the relay's heads for the changed documents.
    pub converged: bool,
    /// Bytes on the wire of the one-off idle pass (TCP payload both ways: HTTP heads and
    /// bodies, WebSocket upgrade and frames), on fresh connections.
    pub idle_wire_bytes: u64,
    /// TCP connections the one-off idle pass opened (fresh: a new client, no pooled
    /// keep-alive, as a phone coming back online).
    pub idle_wire_connections: u64,
}

impl ReconnectRun {
    /// Whether every pass ended as it should.
    pub fn ok(&self) -> bool {
        let complete = |r: &PassReport| r.status == PassStatus::Complete;
        complete(&self.bootstrap)
            && complete(&self.idle)
            && self.idle_live.status == PassStatus::Stopped
            && self.bootstrap.stats.docs_fetched == self.docs
            && self.idle.messages() == 0
            && self.converged
            && self.after_change.as_ref().is_none_or(|r| {
                complete(r)
                    && r.stats.docs_synced == self.changed
                    && r.stats.docs_changed == self.changed
            })
    }

    /// The benchmark's JSON line.
    pub fn to_json(&self) -> Value {
        let mut out = json!({
            "workload": "reconnect",
            "ok": self.ok(),
            "docs": self.docs,
            "changed": self.changed,
            "messages": self.idle.messages(),
            "round_trips": self.idle.round_trips,
            "bytes": self.idle_wire_bytes,
            "bytes_note": "TCP payload both ways on fresh connections: HTTP request and response heads and bodies, WebSocket upgrade, frame headers and payloads",
            "tcp_connections": self.idle_wire_connections,
            "payload_bytes": self.idle.bytes(),
            "pass_s": self.idle.elapsed_s,
            "http_requests": self.idle.http_requests,
            "feed_s": self.idle.http_s,
            "live_messages": self.idle_live.messages(),
            "live_round_trips": self.idle_live.round_trips,
            "live_bytes": self.idle_live.bytes(),
            "bootstrap_s": self.bootstrap.elapsed_s,
            "bootstrap_messages": self.bootstrap.messages(),
            "bootstrap_http_requests": self.bootstrap.http_requests,
            "bootstrap_fetch_requests": self.bootstrap.fetch_requests,
            "bootstrap_docs_batch_fetched": self.bootstrap.stats.docs_batch_fetched,
            "bootstrap_messages_per_doc": (self.bootstrap.messages() + 2 * self.bootstrap.http_requests) as f64 / self.docs as f64,
            "bootstrap_messages_per_doc_note": "WebSocket messages plus two per HTTP exchange (request and answer), over the documents",
            "bootstrap_bytes": self.bootstrap.bytes(),
            "bootstrap_wire_bytes": self.bootstrap_wire_bytes,
            "save_bytes": self.save_bytes,
            "bootstrap_wire_over_save": self.bootstrap_wire_bytes as f64 / self.save_bytes.max(1) as f64,
            "bootstrap_round_trips": self.bootstrap.round_trips,
            "bootstrap_relay_cpu_s": self.bootstrap_relay_cpu_s,
            "bootstrap_device_cpu_s": self.bootstrap_device_cpu_s,
            "bootstrap_device_cpu_note": "this process: the device's pass and store, its HTTP client, and the proxy counting bytes",
            "fetch_batch_docs": self.fetch_batch_docs,
        });
        if let Some(r) = &self.after_change {
            out["changed_docs_synced"] = json!(r.stats.docs_synced);
            out["changed_messages"] = json!(r.messages());
            out["changed_round_trips"] = json!(r.round_trips);
            out["changed_bytes"] = json!(r.bytes());
            out["changed_pass_s"] = json!(r.elapsed_s);
        }
        out
    }
}

/// Run the workload: a relay with `docs` documents in a nurse's caseload (patient charts and
/// visit notes), her device fetches them all, then reconnects with nothing changed (once as a
/// one-off pass, once live), then `changed` of them change on the relay and it syncs again.
pub async fn measure(docs: usize, changed: usize) -> Result<ReconnectRun, String> {
    if docs == 0 || changed > docs {
        return Err("need docs >= 1 and changed <= docs".into());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data = dir.path().join("relay");
    let binary = server_binary()?;
    let admin = |args: &[&str], field: &str| -> Result<String, String> {
        let out = BenchRelay::admin(&binary, &data, args)?;
        out[field]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("`{field}` missing in {out}"))
    };
    let agency = admin(&["create-agency", "--name", "Riverside"], "agencyId")?;
    let nurse = admin(
        &[
            "create-user",
            "--agency",
            &agency,
            "--name",
            "Maria",
            "--role",
            "clinician",
        ],
        "userId",
    )?;
    let office = admin(
        &[
            "create-user",
            "--agency",
            &agency,
            "--name",
            "Sam",
            "--role",
            "office",
        ],
        "userId",
    )?;
    let patient_count = (docs / 100).clamp(1, 20);
    let mut patients = Vec::new();
    for i in 0..patient_count {
        let out = BenchRelay::admin(
            &binary,
            &data,
            &[
                "create-patient",
                "--agency",
                &agency,
                "--name",
                &format!("Patient {i}"),
            ],
        )?;
        let patient = out["patientId"].as_str().ok_or("patientId")?.to_owned();
        admin(
            &["assign", "--user", &nurse, "--patient", &patient],
            "userId",
        )?;
        patients.push(patient);
    }
    let nurse_token = admin(
        &["issue-token", "--user", &nurse, "--device", "phone"],
        "token",
    )?;
    let relay = BenchRelay::start(&binary, &data)?;

    // The office's desks create the visit notes (a desk per 2,000 notes: rate limits are per
    // device).
    let notes = docs - patient_count;
    let mut seeders: Vec<(TestPeer, Vec<DocumentId>)> = Vec::new();
    for chunk in 0..notes.div_ceil(DOCS_PER_SEEDER) {
        let token = admin(
            &[
                "issue-token",
                "--user",
                &office,
                "--device",
                &format!("desk-{chunk}"),
            ],
            "token",
        )?;
        let mut peer = TestPeer::connect(&relay.ws_url(&token), Some(&format!("desk-{chunk}")))
            .await
            .map_err(|e| format!("seeder connect: {e:?}"))?;
        let count = DOCS_PER_SEEDER.min(notes - chunk * DOCS_PER_SEEDER);
        let ids: Vec<DocumentId> = (0..count)
            .map(|i| {
                let patient = &patients[(chunk * DOCS_PER_SEEDER + i) % patients.len()];
                peer.create(visit_note(&agency, patient, &nurse))
            })
            .collect();
        for batch in ids.chunks(SEED_BATCH) {
            let outcomes = peer.sync_all(batch).await;
            if !outcomes.iter().all(|o| matches!(o, SyncOutcome::InSync(_))) {
                return Err("the relay refused a seeded note".into());
            }
        }
        seeders.push((peer, ids));
    }

    // The device reaches the relay through a proxy that counts every byte on the wire.
    let wire = WireCounter::start(
        relay
            .http_base()
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| format!("relay address: {e}"))?,
    )
    .await?;
    let key = StoreKey::random();
    let store = Arc::new(open_store(
        &dir.path().join("phone.db"),
        &key,
        &nurse,
        "phone",
        Role::Clinician,
    ));
    let client = Arc::new(
        SyncClient::new(
            Arc::clone(&store),
            RelayConfig {
                base_url: wire.http_base(),
                token: nurse_token,
            },
        )
        .map_err(|e| e.to_string())?,
    );
    let fetch_batch_docs = fetch_batch_docs();
    let _ = wire.take();
    let relay_before = ProcSample::read(relay.pid()).ok();
    let device_before = ProcSample::read(std::process::id()).ok();
    let bootstrap = client
        .run_pass(PassOptions {
            fetch_batch_docs,
            ..PassOptions::default()
        })
        .await;
    let (bootstrap_wire_bytes, _) = wire.take();
    let cpu = |pid: u32, before: Option<ProcSample>| {
        let after = ProcSample::read(pid).ok()?;
        Some(after.since(&before?).cpu_s)
    };
    let bootstrap_relay_cpu_s = cpu(relay.pid(), relay_before);
    let bootstrap_device_cpu_s = cpu(std::process::id(), device_before);
    let held_ids = store.document_ids().map_err(|e| e.to_string())?;
    let held = held_ids.len();
    let mut save_bytes = 0u64;
    for id in &held_ids {
        save_bytes += store.export_changes(*id).map_err(|e| e.to_string())?.len() as u64;
    }
    if held != docs {
        return Err(format!(
            "the device holds {held} documents after the first pass, expected {docs}: {:?}",
            bootstrap.status
        ));
    }

    // The quiet reconnect on a fresh connection: every connection through the proxy is cut
    // first (no pooled keep-alive survives, as when a phone comes back online), and every
    // byte both ways is counted.
    wire.sever();
    let _ = wire.take();
    let idle = client.run_pass(PassOptions::default()).await;
    let (idle_wire_bytes, idle_wire_connections) = wire.take();
    let idle_live = live_until_up_to_date(&client).await?;

    let mut after_change = None;
    let mut converged = true;
    if changed > 0 {
        let (peer, ids) = seeders
            .first_mut()
            .ok_or("no seeded notes to change (docs too small)")?;
        if ids.len() < changed {
            return Err("not enough seeded notes to change".into());
        }
        let targets: Vec<DocumentId> = ids
            .iter()
            .step_by(ids.len() / changed)
            .take(changed)
            .copied()
            .collect();
        for id in &targets {
            set(
                peer.doc_mut(*id).ok_or("seeded note")?,
                "nextVisit",
                "Tuesday 10:00",
            );
        }
        let outcomes = peer.sync_all(&targets).await;
        let relay_heads: Vec<_> = outcomes
            .into_iter()
            .map(|o| match o {
                SyncOutcome::InSync(heads) => Ok(heads),
                SyncOutcome::Unavailable => Err("the relay refused an edit".to_owned()),
            })
            .collect::<Result<_, _>>()?;
        let report = client.run_pass(PassOptions::default()).await;
        for (id, heads) in targets.iter().zip(&relay_heads) {
            let mut ours = store.heads(*id).map_err(|e| e.to_string())?;
            ours.sort();
            let mut theirs = heads.clone();
            theirs.sort();
            converged &= ours == theirs;
        }
        after_change = Some(report);
    }
    Ok(ReconnectRun {
        docs,
        changed,
        bootstrap,
        bootstrap_wire_bytes,
        save_bytes,
        bootstrap_relay_cpu_s,
        bootstrap_device_cpu_s,
        fetch_batch_docs,
        idle,
        idle_live,
        after_change,
        converged,
        idle_wire_bytes,
        idle_wire_connections,
    })
}

/// Run a live pass until it reports it is up to date, then stop it.
async fn live_until_up_to_date(client: &Arc<SyncClient>) -> Result<PassReport, String> {
    let mut events = client.subscribe();
    let running = {
        let client = Arc::clone(client);
        tokio::spawn(async move {
            client
                .run_pass(PassOptions {
                    live: true,
                    ..PassOptions::default()
                })
                .await
        })
    };
    let waited = tokio::time::timeout(LIVE_TIMEOUT, async {
        loop {
            match events.recv().await {
                Ok(SyncEvent::UpToDate) => return Ok(()),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    client.stop();
    let report = running.await.map_err(|e| e.to_string())?;
    match waited {
        Ok(Ok(())) => Ok(report),
        Ok(Err(e)) => Err(format!("live session events: {e}")),
        Err(_) => Err(format!(
            "the live session did not get up to date within {LIVE_TIMEOUT:?}: {:?}",
            report.status
        )),
    }
}
