//! The 5 pm sync storm (`fieldchart-bench storm`, `reconnect-storm`): N devices, each with its
//! own store on disk (a real SQLCipher file), chart M visit notes offline through the core
//! store API — EVV start and end, vitals, a narrative typed in bursts, most notes signed — then
//! all connect at once and sync. Afterwards an observer reads every note back from the relay
//! and compares its heads with what the device wrote (`ok`), a second device of the first
//! nurse fetches her notes (the caseload fetch), and, for `reconnect-storm`, every device
//! reconnects at once with nothing changed.
//!
//! Against Fieldchart (the default: `fieldchart-server` started on a temp dir, agency, users,
//! patients and devices provisioned through its admin CLI and admin API, devices enrolled
//! with their stores' signing keys) devices sync with the real device stack
//! (`fieldchart-mobile`'s driver), or with `plain` through [`PlainClient`] like any other
//! relay. Against `--relay URL` (any automerge-repo protocol v1 relay without auth) the same
//! notes, charted the same way, are pushed and fetched by id through [`PlainClient`].
//!
//! Deterministic from the seed: store keys, every typed word, vital and timestamp (document
//! ids and automerge actor ids are random, as on phones).
//!
//! Scale-out ([`Deployment`]): Fieldchart may also run as N relay processes on one fresh
//! PostgreSQL database (created for the run on the server of
//! [`crate::postgres::server`] and dropped after it; relays started with `serve --database`,
//! provisioning through the admin CLI with the same `--database`). Devices are spread over the
//! relays round-robin (device i on relay i mod N, enrollment included), the observer reads
//! back through the relays in turn and the caseload fetch goes through another relay than the
//! nurse's first phone. Relay CPU, RSS and bytes are summed over every relay process; the CPU
//! of the database's PostgreSQL backends is reported beside them. Each relay may run under a
//! CPU budget of its own ([`CpuBudget`]), the same for every relay of every configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::{Automerge, ChangeHash};
use fieldchart_core::model::{Actor, NoteText, Role, VisitStart, VitalReading, VitalType};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};
use fieldchart_mobile::{PassOptions, PassReport, PassStatus, RelayConfig, SyncClient, TlsConfig};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::plain_client::{PlainClient, Settled, Traffic};
use crate::postgres::TestDatabase;
use crate::relay_stats::{
    BenchRelay, CpuBudget, PgBackends, ProcSample, Throttling, dir_size, percentile, raise_fd_limit,
};

/// Notes one observer connection reads back (Fieldchart's rate limits are per device token).
const OBSERVER_BATCH: usize = 500;

/// Provisioning requests in flight at once.
const PROVISION_CONCURRENCY: usize = 8;

/// Where the devices sync.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start `fieldchart-server` (`server_bin`, else this build's) on a temp dir.
    Fieldchart {
        /// Another relay binary (compare two builds in one run).
        server_bin: Option<PathBuf>,
        /// Sync through the plain protocol client instead of the device stack.
        plain: bool,
    },
    /// Any automerge-repo protocol v1 relay without auth, already running.
    External {
        /// `ws://HOST:PORT/PATH`.
        url: String,
        /// Its process id, for CPU, memory and I/O figures.
        pid: Option<u32>,
        /// Its data directory, for the final size.
        data_dir: Option<PathBuf>,
    },
}

impl Target {
    /// Short name for reports.
    pub fn name(&self) -> String {
        match self {
            Target::Fieldchart { plain: false, .. } => "fieldchart".into(),
            Target::Fieldchart { plain: true, .. } => "fieldchart-plain".into(),
            Target::External { url, .. } => url.clone(),
        }
    }

    fn plain(&self) -> bool {
        !matches!(self, Target::Fieldchart { plain: false, .. })
    }
}

/// A storm run.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// Devices (nurses, one phone each).
    pub devices: usize,
    /// Visit notes each device charts offline.
    pub visits: usize,
    /// Seed.
    pub seed: u64,
    /// Where to sync.
    pub target: Target,
    /// After the storm, every device reconnects at once with nothing changed.
    pub reconnect: bool,
    /// Progress bars on stderr.
    pub progress: bool,
    /// Limit for each timed phase; a relay that does not finish in it fails the run.
    pub phase_timeout: Duration,
    /// How Fieldchart's relays run (ignored for [`Target::External`]).
    pub deployment: Deployment,
}

/// How many Fieldchart relay processes, on what storage, with what CPU each.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// PostgreSQL (a fresh database per run) instead of the SQLite file.
    pub postgres: bool,
    /// Relay processes (more than one needs `postgres`).
    pub relays: usize,
    /// CPUs each relay process may use (a cgroup CFS quota); `None`: unlimited.
    pub cpu_per_relay: Option<f64>,
    /// `--database-pool` of each relay (PostgreSQL); `None`: the relay's default.
    pub pool: Option<usize>,
}

impl Default for Deployment {
    /// One relay on SQLite, no CPU budget: the plain storm.
    fn default() -> Self {
        Deployment {
            postgres: false,
            relays: 1,
            cpu_per_relay: None,
            pool: None,
        }
    }
}

impl Deployment {
    /// Short name for reports: `sqlite x1`, `postgres x2`.
    pub fn name(&self) -> String {
        let backend = if self.postgres { "postgres" } else { "sqlite" };
        format!("{backend} x{}", self.relays)
    }

    fn check(&self) -> Result<(), String> {
        if self.relays == 0 {
            return Err("need at least one relay".into());
        }
        if self.relays > 1 && !self.postgres {
            return Err("several relays need PostgreSQL (one relay owns a SQLite file)".into());
        }
        if self.pool == Some(0) {
            return Err("a database pool needs at least one connection".into());
        }
        Ok(())
    }
}

/// One enrolled nurse with her phone.
struct Device {
    user: String,
    token: Option<String>,
    store: Arc<Store>,
    /// The notes she charted, with their heads when she finished.
    notes: Vec<(DocumentId, Vec<ChangeHash>)>,
}

/// The relays under test and how to reach them.
struct Relay {
    /// Our child processes (Fieldchart); empty for an external relay. Killed (dropped) before
    /// the database is dropped.
    processes: Vec<BenchRelay>,
    pids: Vec<u32>,
    data_dir: Option<PathBuf>,
    /// Observer tokens (Fieldchart: an office user's desks).
    observer_tokens: Vec<String>,
    /// The run's PostgreSQL database, dropped at the end.
    database: Option<TestDatabase>,
}

/// Everything sampled before and after a phase.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Every relay process's counters, summed (RSS and peak RSS: sums of the processes').
    relays: Option<ProcSample>,
    /// Each relay process's counters.
    each: Vec<ProcSample>,
    /// Each relay's CPU budget throttling.
    throttling: Vec<Option<Throttling>>,
    /// The PostgreSQL backends of the run's database.
    postgres: Option<PgBackends>,
    /// The machine's count of connections dropped because a listening socket's queue was full.
    listen_overflows: Option<u64>,
}

impl Relay {
    /// The relay device (or connection) `i` uses: round-robin.
    fn process(&self, i: usize) -> Option<&BenchRelay> {
        (!self.processes.is_empty()).then(|| &self.processes[i % self.processes.len()])
    }

    fn ws_url(&self, target: &Target, token: Option<&str>, i: usize) -> String {
        match (target, self.process(i), token) {
            (_, Some(process), Some(token)) => process.ws_url(token),
            (Target::External { url, .. }, _, _) => url.clone(),
            _ => String::new(),
        }
    }

    fn http_base(&self, i: usize) -> Option<String> {
        self.process(i).map(BenchRelay::http_base)
    }

    fn sample(&self) -> Sample {
        let mut relays: Option<ProcSample> = None;
        let mut each = Vec::new();
        for pid in &self.pids {
            let Ok(s) = ProcSample::read(*pid) else {
                relays = None;
                break;
            };
            each.push(s);
            let sum = relays.unwrap_or_default();
            relays = Some(ProcSample {
                cpu_s: sum.cpu_s + s.cpu_s,
                peak_rss: sum.peak_rss + s.peak_rss,
                rss: sum.rss + s.rss,
                wchar: sum.wchar + s.wchar,
                write_bytes: sum.write_bytes + s.write_bytes,
            });
        }
        Sample {
            relays,
            each,
            throttling: self.processes.iter().map(BenchRelay::throttling).collect(),
            postgres: self.database.as_ref().map(|db| PgBackends::read(db.name())),
            listen_overflows: listen_overflows(),
        }
    }
}

/// `TcpExt: ListenOverflows` of `/proc/net/netstat`: handshakes the kernel dropped, machine-wide,
/// because a listening socket's accept queue was full (each costs the client a one-second
/// retransmission). `None` where it cannot be read.
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let at = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(at)?.parse().ok();
    }
    None
}

fn progress_bar(progress: bool, len: usize, what: &str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed_precise}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// An HTTP call to Fieldchart's admin API (or enrollment) with a bearer token.
async fn post(
    http: &reqwest::Client,
    url: String,
    token: &str,
    body: Value,
) -> Result<Value, String> {
    let response = http
        .post(&url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("POST {url}: {status} {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("POST {url}: {e}: {text}"))
}

fn field(v: &Value, key: &str) -> Result<String, String> {
    v[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("`{key}` missing in {v}"))
}

/// Fieldchart's agency with an admin, an observer (office) user with `observers` desk tokens,
/// and the relay running. Returns the relay, the agency id and an admin token.
pub async fn fieldchart_relay(
    server_bin: Option<&Path>,
    data_dir: &Path,
    observers: usize,
) -> Result<(BenchRelay, String, String, String), String> {
    let mut relays =
        fieldchart_relays(server_bin, data_dir, observers, &Deployment::default()).await?;
    let relay = relays.processes.pop().ok_or("no relay started")?;
    Ok((
        relay,
        relays.agency,
        relays.admin_token,
        relays.observer_tokens,
    ))
}

/// Fieldchart's relays as `deployment` says, with the agency of [`fieldchart_relay`].
#[derive(Debug)]
pub struct Relays {
    /// The relay processes (on one PostgreSQL database when several).
    pub processes: Vec<BenchRelay>,
    /// The run's PostgreSQL database (dropped with this; drop the processes first).
    pub database: Option<TestDatabase>,
    /// The agency's id.
    pub agency: String,
    /// An admin's token.
    pub admin_token: String,
    /// Observer desk tokens, space-separated.
    pub observer_tokens: String,
}

/// Start Fieldchart's relays as `deployment` says (a fresh PostgreSQL database when it says
/// PostgreSQL) and provision the agency, its admin and observer desks (through relay 0).
pub async fn fieldchart_relays(
    server_bin: Option<&Path>,
    data_dir: &Path,
    observers: usize,
    deployment: &Deployment,
) -> Result<Relays, String> {
    deployment.check()?;
    let binary = BenchRelay::binary(server_bin)?;
    std::fs::create_dir_all(data_dir).map_err(|e| e.to_string())?;
    let database = if deployment.postgres {
        Some(TestDatabase::try_create()?)
    } else {
        None
    };
    let url = database.as_ref().map(|db| db.url().to_owned());
    let admin = |args: &[&str], key: &str| {
        BenchRelay::admin_on(&binary, data_dir, url.as_deref(), args).and_then(|v| field(&v, key))
    };
    let agency = admin(&["create-agency", "--name", "Riverside"], "agencyId")?;
    let boss = admin(
        &[
            "create-user",
            "--agency",
            &agency,
            "--name",
            "Bench Admin",
            "--role",
            "admin",
        ],
        "userId",
    )?;
    let admin_token = admin(
        &["issue-token", "--user", &boss, "--device", "bench-admin"],
        "token",
    )?;
    let office = admin(
        &[
            "create-user",
            "--agency",
            &agency,
            "--name",
            "Observer",
            "--role",
            "office",
        ],
        "userId",
    )?;
    let mut serve_args = Vec::new();
    if let Some(url) = &url {
        serve_args.extend(["--database".to_owned(), url.clone()]);
        if let Some(pool) = deployment.pool {
            serve_args.extend(["--database-pool".to_owned(), pool.to_string()]);
        }
    }
    let mut processes = Vec::new();
    for i in 0..deployment.relays {
        let budget = match deployment.cpu_per_relay {
            Some(cpus) => Some(CpuBudget::new(
                &format!("fieldchart-bench-{}-{i}", std::process::id()),
                cpus,
            )?),
            None => None,
        };
        processes.push(BenchRelay::start_with(
            &binary,
            data_dir,
            &serve_args,
            budget,
        )?);
    }
    let http = reqwest::Client::new();
    let mut tokens = Vec::new();
    for i in 0..observers.max(1) {
        let out = post(
            &http,
            format!("{}/v1/admin/tokens", processes[0].http_base()),
            &admin_token,
            json!({ "userId": office, "deviceName": format!("observer-{i}") }),
        )
        .await?;
        tokens.push(field(&out, "token")?);
    }
    Ok(Relays {
        processes,
        database,
        agency,
        admin_token,
        observer_tokens: tokens.join(" "),
    })
}

/// A nurse provisioned on Fieldchart: user, her own patient, and enrollment codes.
struct Nurse {
    user: String,
    patient: String,
    codes: Vec<String>,
}

async fn provision_nurse(
    http: &reqwest::Client,
    base: &str,
    admin_token: &str,
    i: usize,
    devices: usize,
) -> Result<Nurse, String> {
    let user = field(
        &post(
            http,
            format!("{base}/v1/admin/users"),
            admin_token,
            json!({ "name": format!("Nurse {i}"), "role": "clinician" }),
        )
        .await?,
        "userId",
    )?;
    let patient = field(
        &post(
            http,
            format!("{base}/v1/admin/patients"),
            admin_token,
            json!({ "name": format!("Patient {i}") }),
        )
        .await?,
        "patientId",
    )?;
    post(
        http,
        format!("{base}/v1/admin/assign"),
        admin_token,
        json!({ "userId": user, "patientId": patient }),
    )
    .await?;
    let mut codes = Vec::new();
    for d in 0..devices {
        codes.push(field(
            &post(
                http,
                format!("{base}/v1/admin/enrollments"),
                admin_token,
                json!({ "userId": user, "deviceName": format!("phone-{i}-{d}") }),
            )
            .await?,
            "code",
        )?);
    }
    Ok(Nurse {
        user,
        patient,
        codes,
    })
}

fn open_store(path: &Path, key: [u8; 32], user: &str, device: &str) -> Result<Store, String> {
    Store::open(StoreConfig {
        path: path.to_owned(),
        key: StoreKey::from_bytes(key),
        actor: Actor {
            user_id: user.into(),
            device_id: device.into(),
        },
        role: Role::Clinician,
        keystroke_journal: false,
    })
    .map_err(|e| format!("open store {}: {e}", path.display()))
}

/// Open a phone's store and, on Fieldchart, enroll it with the store's signing key (the store
/// is reopened under the device id the relay assigned). Returns the store and its token.
async fn phone(
    path: &Path,
    key: [u8; 32],
    user: &str,
    enroll: Option<(&str, &str)>,
    fallback_device: &str,
) -> Result<(Store, Option<String>), String> {
    let Some((base, code)) = enroll else {
        return Ok((open_store(path, key, user, fallback_device)?, None));
    };
    let store = open_store(path, key, user, "enrolling")?;
    let public = store.device_public_key().map_err(|e| e.to_string())?;
    store.close().map_err(|e| e.to_string())?;
    let done = fieldchart_mobile::enroll(base, code, None, public, &TlsConfig::default())
        .await
        .map_err(|e| format!("enroll: {e}"))?;
    Ok((
        open_store(path, key, user, &done.device_id)?,
        Some(done.token),
    ))
}

const WORDS: &[&str] = &[
    "patient",
    "alert",
    "oriented",
    "wound",
    "sacral",
    "dressing",
    "changed",
    "clean",
    "dry",
    "intact",
    "no",
    "signs",
    "of",
    "infection",
    "edema",
    "bilateral",
    "lower",
    "extremities",
    "tolerated",
    "ambulation",
    "with",
    "walker",
    "medications",
    "reviewed",
    "taught",
    "caregiver",
    "fall",
    "precautions",
    "lungs",
    "clear",
    "appetite",
    "fair",
    "pain",
    "controlled",
    "plan",
    "continue",
];

fn words(rng: &mut StdRng, chars: usize) -> String {
    let mut out = String::new();
    while out.len() < chars {
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        out.push(if rng.random_bool(0.1) { '.' } else { ' ' });
    }
    out
}

/// Chart one visit: EVV start, three vitals, a ~1 KB narrative typed in bursts, EVV end, and
/// (four in five) a signature. Every call is a durable store transaction, as on a phone.
fn chart_visit(
    store: &Store,
    rng: &mut StdRng,
    agency: &str,
    patient: &str,
    device: usize,
    visit: usize,
) -> Result<DocumentId, String> {
    let e = |e: fieldchart_core::Error| e.to_string();
    let started = 1_764_522_000_000 + (device * 1_000 + visit) as i64 * 60_000;
    let note = store
        .start_visit(&VisitStart {
            agency_id: agency.into(),
            patient_id: patient.into(),
            service_type: "skilled-nursing".into(),
            date: "2026-11-30".into(),
            location: format!("{} Elm St", rng.random_range(1..999)),
            started_at_ms: started,
            start_monotonic_ms: 1 + visit as i64,
        })
        .map_err(e)?;
    let vitals = [
        (
            VitalType::BloodPressure,
            format!(
                "{}/{}",
                rng.random_range(100..160),
                rng.random_range(60..95)
            ),
            "mmHg",
        ),
        (
            VitalType::Pulse,
            rng.random_range(55..110).to_string(),
            "/min",
        ),
        (
            VitalType::Temperature,
            format!("{:.1}", 97.0 + rng.random_range(0..30) as f64 / 10.0),
            "F",
        ),
    ];
    for (i, (vital, value, unit)) in vitals.into_iter().enumerate() {
        store
            .record_vital(
                note,
                &VitalReading {
                    id: String::new(),
                    vital,
                    value,
                    unit: unit.into(),
                    taken_at_ms: started + 60_000 * (i as i64 + 1),
                    recorded_by: String::new(),
                    supersedes: None,
                },
            )
            .map_err(e)?;
    }
    let mut len = 0;
    for _ in 0..rng.random_range(4..=7) {
        let chars = rng.random_range(120..220);
        let burst = words(rng, chars);
        store
            .splice_text(note, NoteText::Assessment, len, 0, &burst)
            .map_err(e)?;
        len += burst.encode_utf16().count();
    }
    store
        .finish_visit(note, started + 45 * 60_000, 45 * 60_000)
        .map_err(e)?;
    if rng.random_bool(0.8) {
        store.sign(note).map_err(e)?;
    }
    Ok(note)
}

/// Per-device outcome of one sync phase.
#[derive(Debug, Clone, Default)]
struct PassFigures {
    elapsed_s: f64,
    bytes_up: u64,
    bytes_down: u64,
    messages: u64,
    passes: u32,
    error: Option<String>,
}

fn from_report(report: &PassReport) -> PassFigures {
    PassFigures {
        elapsed_s: report.elapsed_s,
        bytes_up: report.ws_bytes_sent,
        bytes_down: report.ws_bytes_received + report.http_bytes_received,
        messages: report.messages(),
        passes: 1,
        error: None,
    }
}

fn from_traffic(t: Traffic, elapsed: Duration) -> PassFigures {
    PassFigures {
        elapsed_s: elapsed.as_secs_f64(),
        bytes_up: t.bytes_sent,
        bytes_down: t.bytes_received,
        messages: t.messages(),
        passes: 1,
        error: None,
    }
}

/// Passes a device may take in one phase before it counts as failed (a pass cut short by a
/// reply timeout under load continues where it stopped, as on a phone).
const MAX_PASSES: u32 = 5;

/// One device's sync with the device stack, repeated until complete (at most [`MAX_PASSES`]).
async fn device_stack_sync(client: &SyncClient, expect_unsynced_none: &Store) -> PassFigures {
    let started = Instant::now();
    let mut total = PassFigures::default();
    for _ in 0..MAX_PASSES {
        let report = client.run_pass(PassOptions::default()).await;
        let f = from_report(&report);
        total.bytes_up += f.bytes_up;
        total.bytes_down += f.bytes_down;
        total.messages += f.messages;
        total.passes += 1;
        let clean = report.status == PassStatus::Complete
            && report.stats.docs_failed == 0
            && expect_unsynced_none
                .unsynced_documents()
                .is_ok_and(|u| u.is_empty());
        if clean {
            total.elapsed_s = started.elapsed().as_secs_f64();
            return total;
        }
        total.error = Some(format!("{:?} {:?}", report.status, report.stats));
    }
    total.elapsed_s = started.elapsed().as_secs_f64();
    total
}

/// Every device syncs at once (released together by a barrier); per-device figures and the
/// wall time from release to the last device done.
async fn sync_phase(
    devices: &[Device],
    relay: &Relay,
    config: &StormConfig,
    what: &str,
) -> Result<(Vec<PassFigures>, Duration), String> {
    let barrier = Arc::new(tokio::sync::Barrier::new(devices.len() + 1));
    let bar = progress_bar(config.progress, devices.len(), what);
    let deadline_after = config.phase_timeout;
    let mut tasks = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let barrier = Arc::clone(&barrier);
        let store = Arc::clone(&device.store);
        let bar = bar.clone();
        let plain = config.target.plain();
        let url = relay.ws_url(&config.target, device.token.as_deref(), i);
        let base_url = relay.http_base(i);
        let client = match (plain, base_url, &device.token) {
            (false, Some(base), Some(token)) => Some(
                SyncClient::new(
                    Arc::clone(&store),
                    RelayConfig {
                        base_url: base,
                        token: token.clone(),
                    },
                )
                .map_err(|e| e.to_string())?,
            ),
            _ => None,
        };
        // The plain client's documents, loaded from the store before the clock starts.
        let mut docs = Vec::new();
        if plain {
            for (id, _) in &device.notes {
                let bytes = store.export_changes(*id).map_err(|e| e.to_string())?;
                docs.push((
                    *id,
                    Automerge::load(&bytes).map_err(|e| format!("load {id}: {e}"))?,
                ));
            }
        }
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            let figures = match client {
                Some(client) => {
                    match tokio::time::timeout(deadline_after, device_stack_sync(&client, &store))
                        .await
                    {
                        Ok(f) => f,
                        Err(_) => PassFigures {
                            error: Some(format!("not done within {deadline_after:?}")),
                            ..PassFigures::default()
                        },
                    }
                }
                None => {
                    let deadline = started + deadline_after;
                    let ids: Vec<DocumentId> = docs.iter().map(|(id, _)| *id).collect();
                    let run = async {
                        let mut client = PlainClient::connect(&url, None, deadline).await?;
                        for (id, doc) in docs {
                            client.hold(id, doc);
                        }
                        let settled = client.push(&ids, deadline).await?;
                        let traffic = client.traffic();
                        client.close().await;
                        if settled.iter().all(|s| matches!(s, Settled::InSync(_))) {
                            Ok(traffic)
                        } else {
                            Err(format!(
                                "{} of {} notes refused",
                                settled
                                    .iter()
                                    .filter(|s| **s == Settled::Unavailable)
                                    .count(),
                                ids.len()
                            ))
                        }
                    };
                    match run.await {
                        Ok(traffic) => from_traffic(traffic, started.elapsed()),
                        Err(e) => PassFigures {
                            elapsed_s: started.elapsed().as_secs_f64(),
                            error: Some(e),
                            ..PassFigures::default()
                        },
                    }
                }
            };
            bar.inc(1);
            (figures, started, Instant::now())
        }));
    }
    barrier.wait().await;
    let mut figures = Vec::new();
    let (mut first_start, mut last_end): (Option<Instant>, Option<Instant>) = (None, None);
    for task in tasks {
        let (f, started, ended) = task.await.map_err(|e| format!("device task: {e}"))?;
        first_start = Some(first_start.map_or(started, |s| s.min(started)));
        last_end = Some(last_end.map_or(ended, |e| e.max(ended)));
        figures.push(f);
    }
    // From the first device's start to the last device's end.
    let wall = match (first_start, last_end) {
        (Some(s), Some(e)) => e.saturating_duration_since(s),
        _ => Duration::ZERO,
    };
    bar.finish_and_clear();
    Ok((figures, wall))
}

/// Read every note back through fresh connections and compare heads with the devices'.
async fn observe(
    devices: &[Device],
    relay: &Relay,
    target: &Target,
    timeout: Duration,
) -> Result<(usize, Vec<String>), String> {
    let expected: Vec<(DocumentId, Vec<ChangeHash>)> = devices
        .iter()
        .flat_map(|d| d.notes.iter().cloned())
        .collect();
    let deadline = Instant::now() + timeout;
    let mut problems = Vec::new();
    let mut matched = 0;
    for (i, batch) in expected.chunks(OBSERVER_BATCH).enumerate() {
        let token = if relay.observer_tokens.is_empty() {
            None
        } else {
            Some(relay.observer_tokens[i % relay.observer_tokens.len()].as_str())
        };
        // Batch i through relay i + 1 (mod N): most notes are read back through another relay
        // than the one their device wrote through.
        let url = relay.ws_url(target, token, i + 1);
        let mut client = PlainClient::connect(&url, None, deadline).await?;
        let ids: Vec<DocumentId> = batch.iter().map(|(id, _)| *id).collect();
        let settled = client.fetch(&ids, deadline).await?;
        for ((id, heads), outcome) in batch.iter().zip(settled) {
            let mut ours = heads.clone();
            ours.sort();
            match outcome {
                Settled::InSync(mut theirs) => {
                    theirs.sort();
                    if theirs == ours {
                        matched += 1;
                    } else {
                        problems.push(format!("{id}: the relay's heads differ"));
                    }
                }
                Settled::Unavailable => problems.push(format!("{id}: not on the relay")),
            }
        }
        client.close().await;
    }
    Ok((matched, problems))
}

/// What the relay processes (summed), their CPU budgets and the database's PostgreSQL
/// backends did during a phase.
fn relay_figures(before: &Sample, after: &Sample) -> Value {
    let mut out = match (before.relays, after.relays) {
        (Some(b), Some(a)) => a.since(&b).to_json(),
        _ => json!({ "relay_stats": "unavailable (no relay pid)" }),
    };
    let throttling: Vec<Value> = before
        .throttling
        .iter()
        .zip(&after.throttling)
        .filter_map(|(b, a)| {
            let d = a.as_ref()?.since(b.as_ref()?);
            Some(json!({
                "periods": d.periods,
                "throttled_periods": d.throttled_periods,
                "throttled_s": d.throttled_s,
            }))
        })
        .collect();
    if after.each.len() > 1 && after.each.len() == before.each.len() {
        let each: Vec<f64> = after
            .each
            .iter()
            .zip(&before.each)
            .map(|(a, b)| a.since(b).cpu_s)
            .collect();
        out["relay_cpu_s_each"] = json!(each);
    }
    if !throttling.is_empty() {
        out["relay_throttling"] = json!(throttling);
    }
    if let (Some(b), Some(a)) = (before.listen_overflows, after.listen_overflows) {
        // Machine-wide: on the bench's machine the relays are the only busy listeners.
        out["listen_overflows"] = json!(a.saturating_sub(b));
    }
    if let (Some(b), Some(a)) = (&before.postgres, &after.postgres) {
        out["postgres_backends"] = json!(a.count());
        out["postgres_backend_cpu_s"] = json!(a.cpu_since(b));
    }
    out
}

fn summary(figures: &[PassFigures], wall: Duration, docs: usize) -> Value {
    let mut times: Vec<f64> = figures.iter().map(|f| f.elapsed_s).collect();
    times.sort_by(f64::total_cmp);
    let n = figures.len().max(1) as f64;
    let failed: Vec<&String> = figures.iter().filter_map(|f| f.error.as_ref()).collect();
    json!({
        "wall_s": wall.as_secs_f64(),
        "docs_per_s": docs as f64 / wall.as_secs_f64().max(1e-9),
        "device_p50_s": percentile(&times, 0.50),
        "device_p99_s": percentile(&times, 0.99),
        "bytes_up_per_device": figures.iter().map(|f| f.bytes_up).sum::<u64>() as f64 / n,
        "bytes_down_per_device": figures.iter().map(|f| f.bytes_down).sum::<u64>() as f64 / n,
        "messages_per_device": figures.iter().map(|f| f.messages).sum::<u64>() as f64 / n,
        "passes": figures.iter().map(|f| u64::from(f.passes)).sum::<u64>(),
        "devices_failed": failed.len(),
        "first_failure": failed.first().map(|s| s.as_str()),
    })
}

/// Run a storm; one JSON object.
pub async fn run(config: StormConfig) -> Result<Value, String> {
    if config.devices == 0 || config.visits == 0 {
        return Err("need --devices >= 1 and --visits >= 1".into());
    }
    if matches!(config.target, Target::External { .. })
        && config.deployment != Deployment::default()
    {
        return Err(
            "--relay (an external relay) takes no PostgreSQL, relay count or CPU budget".into(),
        );
    }
    let fd_limit = raise_fd_limit()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let total_docs = config.devices * config.visits;
    let mut rng = StdRng::seed_from_u64(config.seed);

    // The relay, and who the nurses are.
    let (relay, agency, nurses) = match &config.target {
        Target::Fieldchart { server_bin, .. } => {
            let data = dir.path().join("relay");
            let relays = fieldchart_relays(
                server_bin.as_deref(),
                &data,
                total_docs.div_ceil(OBSERVER_BATCH),
                &config.deployment,
            )
            .await?;
            let (agency, admin_token) = (relays.agency, relays.admin_token);
            let base = relays.processes[0].http_base();
            let http = reqwest::Client::new();
            let bar = progress_bar(config.progress, config.devices, "provision");
            let nurses: Vec<Nurse> = futures::stream::iter(0..config.devices)
                .map(|i| {
                    let (http, base, token, bar) = (&http, &base, &admin_token, &bar);
                    async move {
                        let nurse = provision_nurse(http, base, token, i, 2).await;
                        bar.inc(1);
                        nurse
                    }
                })
                .buffered(PROVISION_CONCURRENCY)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            bar.finish_and_clear();
            let relay = Relay {
                pids: relays.processes.iter().map(BenchRelay::pid).collect(),
                // The SQLite relay's files; a PostgreSQL relay keeps none there.
                data_dir: (!config.deployment.postgres).then_some(data),
                observer_tokens: relays
                    .observer_tokens
                    .split(' ')
                    .map(str::to_owned)
                    .collect(),
                processes: relays.processes,
                database: relays.database,
            };
            (relay, agency, nurses)
        }
        Target::External { pid, data_dir, .. } => {
            let nurses = (0..config.devices)
                .map(|i| Nurse {
                    user: format!("usr_nurse{i}"),
                    patient: format!("pat_{i}"),
                    codes: Vec::new(),
                })
                .collect();
            let relay = Relay {
                processes: Vec::new(),
                pids: pid.iter().copied().collect(),
                data_dir: data_dir.clone(),
                observer_tokens: Vec::new(),
                database: None,
            };
            (relay, "agency_bench".to_owned(), nurses)
        }
    };

    // Phones: a store per device, enrolled on Fieldchart.
    let mut devices = Vec::new();
    let mut keys = Vec::new();
    let bar = progress_bar(config.progress, config.devices, "phones");
    for (i, nurse) in nurses.iter().enumerate() {
        let key: [u8; 32] = rng.random();
        keys.push(key);
        let base_url = relay.http_base(i);
        let enroll = base_url
            .as_deref()
            .zip(nurse.codes.first().map(String::as_str));
        let (store, token) = phone(
            &dir.path().join(format!("phone{i}.db")),
            key,
            &nurse.user,
            enroll,
            &format!("dev_phone{i}"),
        )
        .await?;
        devices.push(Device {
            user: nurse.user.clone(),
            token,
            store: Arc::new(store),
            notes: Vec::new(),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Offline charting, a few devices at a time (2 cores; not timed).
    let charting = progress_bar(config.progress, total_docs, "charting");
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let seeds: Vec<u64> = (0..config.devices).map(|_| rng.random()).collect();
    let jobs = devices.iter().enumerate().map(|(i, device)| {
        let store = Arc::clone(&device.store);
        let (agency, patient) = (agency.clone(), nurses[i].patient.clone());
        let (seed, visits, charting) = (seeds[i], config.visits, charting.clone());
        tokio::task::spawn_blocking(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut notes = Vec::new();
            for v in 0..visits {
                let id = chart_visit(&store, &mut rng, &agency, &patient, i, v)?;
                let heads = store.heads(id).map_err(|e| e.to_string())?;
                notes.push((id, heads));
                charting.inc(1);
            }
            Ok::<_, String>(notes)
        })
    });
    let charted: Vec<_> = futures::stream::iter(jobs)
        .buffered(parallel)
        .collect::<Vec<_>>()
        .await;
    for (device, notes) in devices.iter_mut().zip(charted) {
        device.notes = notes.map_err(|e| format!("charting task: {e}"))??;
    }
    charting.finish_and_clear();
    let save_bytes: u64 = devices
        .iter()
        .flat_map(|d| d.notes.iter().map(|(id, _)| (Arc::clone(&d.store), *id)))
        .map(|(store, id)| store.export_changes(id).map_or(0, |b| b.len() as u64))
        .sum();

    // The storm.
    let before = relay.sample();
    let (figures, wall) = sync_phase(&devices, &relay, &config, "storm").await?;
    let after = relay.sample();
    let data_dir_bytes = relay.data_dir.as_deref().map(dir_size);
    let storm = summary(&figures, wall, total_docs);
    let mut out = json!({
        "workload": if config.reconnect { "reconnect-storm" } else { "storm" },
        "relay": config.target.name(),
        "deployment": match config.target {
            Target::Fieldchart { .. } => json!({
                "backend": if config.deployment.postgres { "postgres" } else { "sqlite" },
                "relays": config.deployment.relays,
                "cpu_per_relay": config.deployment.cpu_per_relay,
                "database_pool": config.deployment.pool,
            }),
            Target::External { .. } => Value::Null,
        },
        "client": if config.target.plain() { "plain-v1" } else { "device-stack" },
        "devices": config.devices,
        "visits": config.visits,
        "docs": total_docs,
        "seed": config.seed,
        "fd_limit": fd_limit,
        "notes_save_bytes": save_bytes,
        "storm": storm,
        "relay_storm": relay_figures(&before, &after),
        "relay_data_dir_bytes": data_dir_bytes,
    });
    if let (Some(b), Some(a)) = (before.relays, after.relays) {
        let d = a.since(&b);
        out["relay_cpu_ms_per_doc"] = json!(d.cpu_s * 1e3 / total_docs as f64);
        if let Some(size) = data_dir_bytes.filter(|s| *s > 0) {
            out["wchar_over_data_dir"] = json!(d.wchar as f64 / size as f64);
            out["write_bytes_over_data_dir"] = json!(d.write_bytes as f64 / size as f64);
        }
    }
    let mut ok = figures.iter().all(|f| f.error.is_none());

    // The observer.
    let (matched, problems) = observe(&devices, &relay, &config.target, config.phase_timeout)
        .await
        .unwrap_or_else(|e| (0, vec![format!("observer: {e}")]));
    ok &= matched == total_docs && problems.is_empty();
    out["observer_matched"] = json!(matched);
    out["observer_problems"] = json!(problems.iter().take(5).collect::<Vec<_>>());

    // The caseload fetch: a second device of nurse 0 fetches her notes.
    let caseload = caseload_fetch(&devices[0], &nurses[0], &relay, &config, &dir).await;
    match caseload {
        Ok(v) => {
            ok &= v["ok"] == Value::Bool(true);
            out["caseload_fetch"] = v;
        }
        Err(e) => {
            ok = false;
            out["caseload_fetch"] = json!({ "ok": false, "error": e });
        }
    }

    // Everyone reconnects at once, nothing changed.
    if config.reconnect {
        let before = relay.sample();
        let (figures, wall) = sync_phase(&devices, &relay, &config, "reconnect").await?;
        let after = relay.sample();
        ok &= figures.iter().all(|f| f.error.is_none());
        out["reconnect"] = summary(&figures, wall, total_docs);
        out["relay_reconnect"] = relay_figures(&before, &after);
    }
    if let Some(s) = relay.sample().relays {
        // Summed over the relay processes.
        out["relay_peak_rss_bytes"] = json!(s.peak_rss);
    }
    // The data directory again at the end: a relay that acknowledges before it writes shows
    // a smaller size right after the storm than here.
    out["relay_data_dir_bytes_end"] = json!(relay.data_dir.as_deref().map(dir_size));
    out["ok"] = json!(ok);
    for device in &devices {
        let _ = device.store.close();
    }
    drop(relay);
    Ok(out)
}

/// A second device of `device`'s nurse fetches her notes; time, messages, bytes, and whether
/// it holds exactly what she wrote.
async fn caseload_fetch(
    device: &Device,
    nurse: &Nurse,
    relay: &Relay,
    config: &StormConfig,
    dir: &tempfile::TempDir,
) -> Result<Value, String> {
    let ids: Vec<DocumentId> = device.notes.iter().map(|(id, _)| *id).collect();
    // The second phone goes through the next relay (her first phone used relay 0).
    let base_url = relay.http_base(1);
    let base_url = base_url.as_deref();
    let enroll = base_url.zip(nurse.codes.get(1).map(String::as_str));
    let (store, token) = phone(
        &dir.path().join("second-phone.db"),
        [7; 32],
        &device.user,
        enroll,
        "dev_second_phone",
    )
    .await?;
    let store = Arc::new(store);
    let deadline = Instant::now() + config.phase_timeout;
    let (figures, held): (PassFigures, Vec<(DocumentId, Vec<ChangeHash>)>) =
        if config.target.plain() {
            let url = relay.ws_url(&config.target, token.as_deref(), 1);
            let started = Instant::now();
            let mut client = PlainClient::connect(&url, None, deadline).await?;
            let settled = client.fetch(&ids, deadline).await?;
            let f = from_traffic(client.traffic(), started.elapsed());
            client.close().await;
            let held = ids
                .iter()
                .zip(settled)
                .filter_map(|(id, s)| match s {
                    Settled::InSync(h) => Some((*id, h)),
                    Settled::Unavailable => None,
                })
                .collect();
            (f, held)
        } else {
            let (Some(base), Some(token)) = (base_url, token) else {
                return Err("no relay URL or token for the second device".into());
            };
            let client = SyncClient::new(
                Arc::clone(&store),
                RelayConfig {
                    base_url: base.to_owned(),
                    token,
                },
            )
            .map_err(|e| e.to_string())?;
            let f = tokio::time::timeout(config.phase_timeout, device_stack_sync(&client, &store))
                .await
                .map_err(|_| "the caseload fetch did not finish in time".to_owned())?;
            let held = ids
                .iter()
                .filter_map(|id| store.heads(*id).ok().map(|h| (*id, h)))
                .collect();
            (f, held)
        };
    let sorted = |mut h: Vec<ChangeHash>| {
        h.sort();
        h
    };
    let same = held.len() == device.notes.len()
        && held
            .iter()
            .zip(&device.notes)
            .all(|((a, ha), (b, hb))| a == b && sorted(ha.clone()) == sorted(hb.clone()));
    let _ = store.close();
    Ok(json!({
        "ok": same && figures.error.is_none(),
        "notes": ids.len(),
        "elapsed_s": figures.elapsed_s,
        "messages": figures.messages,
        "bytes_down": figures.bytes_down,
        "bytes_up": figures.bytes_up,
        "error": figures.error,
    }))
}

/// The scale-out comparison: the storm against 1 relay on SQLite, 1 relay on PostgreSQL and 2
/// relays on PostgreSQL, in that order, `rounds` times (alternating, so a noisy neighbour
/// hits every configuration alike), every relay process under the same CPU budget.
#[derive(Debug, Clone)]
pub struct ScaleOutConfig {
    /// Devices (enough to saturate one relay under its budget).
    pub devices: usize,
    /// Visit notes per device.
    pub visits: usize,
    /// Seed (the same for every run).
    pub seed: u64,
    /// Fieldchart, device stack or plain client.
    pub target: Target,
    /// CPUs each relay process may use.
    pub cpu_per_relay: Option<f64>,
    /// `--database-pool` of each PostgreSQL relay.
    pub pool: Option<usize>,
    /// Rounds of the three configurations.
    pub rounds: usize,
    /// Progress bars on stderr.
    pub progress: bool,
    /// Limit for each timed phase.
    pub phase_timeout: Duration,
}

/// The three configurations of [`scale_out`].
fn scale_out_deployments(config: &ScaleOutConfig) -> [Deployment; 3] {
    let with = |postgres: bool, relays: usize| Deployment {
        postgres,
        relays,
        cpu_per_relay: config.cpu_per_relay,
        pool: if postgres { config.pool } else { None },
    };
    [with(false, 1), with(true, 1), with(true, 2)]
}

/// One storm's line of the scale-out table.
fn scale_out_row(round: usize, deployment: &Deployment, out: &Value) -> Value {
    let storm = &out["relay_storm"];
    // The busiest relay's share of CFS periods in which its budget ran out.
    let throttled = storm["relay_throttling"].as_array().map(|relays| {
        relays
            .iter()
            .filter_map(|t| {
                let periods = t["periods"].as_f64()?;
                Some(t["throttled_periods"].as_f64()? / periods.max(1.0))
            })
            .fold(0.0, f64::max)
    });
    json!({
        "round": round,
        "config": deployment.name(),
        "ok": out["ok"],
        "docs_per_s": out["storm"]["docs_per_s"],
        "wall_s": out["storm"]["wall_s"],
        "device_p50_s": out["storm"]["device_p50_s"],
        "device_p99_s": out["storm"]["device_p99_s"],
        "devices_failed": out["storm"]["devices_failed"],
        "relay_cpu_s": storm["relay_cpu_s"],
        "relay_cpu_ms_per_doc": out["relay_cpu_ms_per_doc"],
        "relay_throttled_share": throttled,
        "postgres_backend_cpu_s": storm["postgres_backend_cpu_s"],
        "relay_peak_rss_bytes": out["relay_peak_rss_bytes"],
        "observer_matched": out["observer_matched"],
        "error": out["error"],
    })
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Run the three configurations `rounds` times; one JSON object with every run, the mean
/// docs/s of each configuration, the ratios (per round and of the means) and a Markdown table.
pub async fn scale_out(config: ScaleOutConfig) -> Result<Value, String> {
    if config.rounds == 0 {
        return Err("need --rounds >= 1".into());
    }
    let Target::Fieldchart { .. } = config.target else {
        return Err("scale-out starts Fieldchart relays; --relay does not apply".into());
    };
    let deployments = scale_out_deployments(&config);
    let mut rows = Vec::new();
    for round in 1..=config.rounds {
        for deployment in &deployments {
            if config.progress {
                eprintln!(
                    "scale-out round {round}/{}: {}",
                    config.rounds,
                    deployment.name()
                );
            }
            let out = run(StormConfig {
                devices: config.devices,
                visits: config.visits,
                seed: config.seed,
                target: config.target.clone(),
                reconnect: false,
                progress: config.progress,
                phase_timeout: config.phase_timeout,
                deployment: deployment.clone(),
            })
            .await
            .unwrap_or_else(|e| json!({ "ok": false, "error": e }));
            rows.push(scale_out_row(round, deployment, &out));
        }
    }
    let docs_per_s = |name: &str, round: Option<usize>| -> Vec<f64> {
        rows.iter()
            .filter(|r| r["config"] == name && r["ok"] == Value::Bool(true))
            .filter(|r| round.is_none_or(|n| r["round"] == n))
            .filter_map(|r| r["docs_per_s"].as_f64())
            .collect()
    };
    let [sqlite, pg1, pg2] = deployments.map(|d| d.name());
    let ratios = |round: Option<usize>| {
        let m = |name: &str| mean(&docs_per_s(name, round));
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        json!({
            "postgres_x2_over_postgres_x1": ratio(m(&pg2), m(&pg1)),
            "postgres_x1_over_sqlite_x1": ratio(m(&pg1), m(&sqlite)),
            "postgres_x2_over_sqlite_x1": ratio(m(&pg2), m(&sqlite)),
        })
    };
    let per_round: Vec<Value> = (1..=config.rounds).map(|n| ratios(Some(n))).collect();
    let overall = ratios(None);
    let means = json!({
        "sqlite_x1": mean(&docs_per_s(&sqlite, None)),
        "postgres_x1": mean(&docs_per_s(&pg1, None)),
        "postgres_x2": mean(&docs_per_s(&pg2, None)),
    });
    let ok = rows.iter().all(|r| r["ok"] == Value::Bool(true));
    let target_met = overall["postgres_x2_over_postgres_x1"]
        .as_f64()
        .map(|r| r >= 1.6);
    let table = scale_out_table(&rows, &per_round);
    Ok(json!({
        "workload": "scale-out",
        "client": if config.target.plain() { "plain-v1" } else { "device-stack" },
        "devices": config.devices,
        "visits": config.visits,
        "docs": config.devices * config.visits,
        "seed": config.seed,
        "cpu_per_relay": config.cpu_per_relay,
        "database_pool": config.pool,
        "rounds": config.rounds,
        "runs": rows,
        "mean_docs_per_s": means,
        "ratios_per_round": per_round,
        "ratios": overall,
        "target_2x_over_1x_ge_1_6": target_met,
        "table": table,
        "ok": ok,
    }))
}

/// A Markdown table of the runs, each with its ratio to the same round's 1-relay PostgreSQL
/// and SQLite figures.
fn scale_out_table(rows: &[Value], per_round: &[Value]) -> String {
    let num = |v: &Value, scale: f64, digits: usize| {
        v.as_f64()
            .map_or("—".to_owned(), |x| format!("{:.digits$}", x * scale))
    };
    let mut out = String::from(
        "| round | relays | docs/s | vs 1 PG relay | vs SQLite | device p50 / p99 s | relay CPU s (sum) | CPU ms/doc | busiest relay throttled | PG backends CPU s | ok |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let round = row["round"].as_u64().unwrap_or(0) as usize;
        let same_round = |name: &str| {
            rows.iter()
                .find(|r| r["round"] == round && r["config"] == name)
                .and_then(|r| r["docs_per_s"].as_f64())
        };
        let mine = row["docs_per_s"].as_f64();
        let vs = |name: &str| match (mine, same_round(name)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "—".into(),
        };
        out.push_str(&format!(
            "| {round} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |\n",
            row["config"].as_str().unwrap_or("?"),
            num(&row["docs_per_s"], 1.0, 0),
            vs("postgres x1"),
            vs("sqlite x1"),
            num(&row["device_p50_s"], 1.0, 2),
            num(&row["device_p99_s"], 1.0, 2),
            num(&row["relay_cpu_s"], 1.0, 1),
            num(&row["relay_cpu_ms_per_doc"], 1.0, 2),
            num(&row["relay_throttled_share"], 100.0, 0) + "%",
            num(&row["postgres_backend_cpu_s"], 1.0, 1),
            if row["ok"] == Value::Bool(true) {
                "yes"
            } else {
                "**no**"
            },
        ));
    }
    for (i, r) in per_round.iter().enumerate() {
        out.push_str(&format!(
            "\nround {}: 2 PG relays / 1 PG relay {}, 1 PG relay / SQLite {}",
            i + 1,
            num(&r["postgres_x2_over_postgres_x1"], 1.0, 2),
            num(&r["postgres_x1_over_sqlite_x1"], 1.0, 2),
        ));
    }
    out
}
