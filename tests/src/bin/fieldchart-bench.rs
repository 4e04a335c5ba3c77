//! Fieldchart's benchmark binary. Each workload prints one JSON object.
//!
//! `fieldchart-bench trace --file PATH` replays an editing trace (sequential or concurrent, any
//! number of agents) through the store — every edit a durable store call — and, in the same
//! run, through bare in-memory automerge documents committing one change per edit.
//!
//! `fieldchart-bench review [--changes N]` measures one more write's cost as a signed note
//! collects post-signature changes (it must stay flat).
//!
//! `fieldchart-bench reconnect --docs K [--changed N]` measures a device holding K synced
//! documents reconnecting with nothing changed (and with N changed on the relay): WebSocket
//! messages, round trips, bytes (WebSocket payloads and change-feed bodies) and time.
//!
//! `fieldchart-bench soak --runs N [--seed S]` runs N seeded fault schedules
//! (`fieldchart_tests::soak`: devices syncing through the fault-injecting proxy, relay kills
//! and a restore from an older copy) and prints the count of clean runs and every failing seed.
//!
//! `fieldchart-bench storm --devices N --visits M` is the 5 pm sync storm
//! (`fieldchart_tests::storm`): N devices chart M notes offline, then all sync at once;
//! `reconnect-storm --devices N --docs K` adds every device reconnecting at once with nothing
//! changed; `bootstrap --patients P --visits V` is a new device's first sync of a caseload
//! (`fieldchart_tests::bootstrap`); `sessions --count N` holds N idle authenticated sessions
//! (`fieldchart_tests::sessions`). `--relay ws://HOST:PORT/PATH` points them at any
//! automerge-repo protocol v1 relay without auth; `--plain` syncs with the plain v1 client
//! against Fieldchart too. `storm --postgres --relays N [--cpu-per-relay C]` runs the storm
//! against N relay processes on one fresh PostgreSQL database, devices spread round-robin.
//!
//! `fieldchart-bench scale-out --devices N --visits M [--cpu-per-relay C] [--rounds R]` runs
//! the storm against 1 relay on SQLite, 1 relay on PostgreSQL and 2 relays on PostgreSQL, one
//! after another, R rounds alternating, every relay under the same CPU budget, and prints a
//! table (stderr) and the ratios (JSON). Progress goes to stderr, the JSON line to stdout.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fieldchart_tests::trace::{BareReplica, StoreReplica, Trace, open_store, replay, seed_note};

#[derive(Parser)]
#[command(about = "Fieldchart benchmarks; each prints one JSON line")]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

/// Where a throughput workload syncs.
#[derive(clap::Args, Debug, Clone)]
struct RelayArgs {
    /// Any automerge-repo protocol v1 relay without auth (default: start fieldchart-server).
    #[arg(long)]
    relay: Option<String>,
    /// The `--relay`'s process id (CPU, memory and I/O from /proc).
    #[arg(long, requires = "relay")]
    relay_pid: Option<u32>,
    /// The `--relay`'s data directory (its final size).
    #[arg(long, requires = "relay")]
    relay_data_dir: Option<PathBuf>,
    /// The fieldchart-server binary to start (default: this build's).
    #[arg(long, conflicts_with = "relay")]
    server_bin: Option<PathBuf>,
    /// Sync through the plain protocol v1 client instead of the device stack (Fieldchart).
    #[arg(long)]
    plain: bool,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Limit of each timed phase, seconds; a relay that does not finish fails the run.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

impl RelayArgs {
    fn target(&self) -> fieldchart_tests::storm::Target {
        match &self.relay {
            Some(url) => fieldchart_tests::storm::Target::External {
                url: url.clone(),
                pid: self.relay_pid,
                data_dir: self.relay_data_dir.clone(),
            },
            None => fieldchart_tests::storm::Target::Fieldchart {
                server_bin: self.server_bin.clone(),
                plain: self.plain,
            },
        }
    }
}

/// How Fieldchart's relays run in a storm.
#[derive(clap::Args, Debug, Clone)]
struct DeploymentArgs {
    /// Run the relays on a fresh PostgreSQL database (made on the server of
    /// FIELDCHART_TEST_POSTGRES, default 127.0.0.1:5432 user postgres; dropped at the end).
    #[arg(long, conflicts_with = "relay")]
    postgres: bool,
    /// Relay processes (more than one needs --postgres); devices are spread round-robin.
    #[arg(long, default_value_t = 1, requires = "postgres")]
    relays: usize,
    /// CPUs each relay process may use (a cgroup CFS quota; needs a writable cgroup tree).
    #[arg(long, conflicts_with = "relay")]
    cpu_per_relay: Option<f64>,
    /// `--database-pool` of each relay (default: the relay's).
    #[arg(long, requires = "postgres")]
    database_pool: Option<usize>,
}

impl DeploymentArgs {
    fn deployment(&self) -> fieldchart_tests::storm::Deployment {
        fieldchart_tests::storm::Deployment {
            postgres: self.postgres,
            relays: self.relays,
            cpu_per_relay: self.cpu_per_relay,
            pool: self.database_pool,
        }
    }
}

#[derive(Subcommand)]
enum Workload {
    /// The 5 pm sync storm: N devices chart M visit notes offline, then all sync at once.
    Storm {
        /// Devices.
        #[arg(long, default_value_t = 50)]
        devices: usize,
        /// Visit notes per device.
        #[arg(long, default_value_t = 50)]
        visits: usize,
        #[command(flatten)]
        relay: RelayArgs,
        #[command(flatten)]
        deployment: DeploymentArgs,
    },
    /// The storm against 1 relay on SQLite, 1 relay on PostgreSQL and 2 relays on PostgreSQL,
    /// in turn (R rounds), every relay under the same CPU budget: docs/s and ratios.
    ScaleOut {
        /// Devices (enough to saturate one relay).
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Visit notes per device.
        #[arg(long, default_value_t = 10)]
        visits: usize,
        /// CPUs each relay process may use (cgroup CFS quota); 0: no budget.
        #[arg(long, default_value_t = 0.5)]
        cpu_per_relay: f64,
        /// Rounds of the three configurations, alternating.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// `--database-pool` of each PostgreSQL relay (default: the relay's).
        #[arg(long)]
        database_pool: Option<usize>,
        #[command(flatten)]
        relay: RelayArgs,
    },
    /// N devices holding K synced notes each reconnect at once with nothing changed.
    ReconnectStorm {
        /// Devices.
        #[arg(long, default_value_t = 1_000)]
        devices: usize,
        /// Notes per device.
        #[arg(long, default_value_t = 8)]
        docs: usize,
        #[command(flatten)]
        relay: RelayArgs,
    },
    /// A new device's first sync of a caseload of P patients x V visit notes.
    Bootstrap {
        /// Patients.
        #[arg(long, default_value_t = 50)]
        patients: usize,
        /// Visit notes per patient.
        #[arg(long, default_value_t = 100)]
        visits: usize,
        #[command(flatten)]
        relay: RelayArgs,
    },
    /// N idle authenticated sessions (joined, keep-alive): relay RSS per session, handshakes/s.
    Sessions {
        /// Sessions.
        #[arg(long, default_value_t = 1_000)]
        count: usize,
        #[command(flatten)]
        relay: RelayArgs,
    },
    /// Replay an editing trace through the store and through bare automerge.
    Trace {
        /// Trace file (`.json` or `.json.gz`).
        #[arg(long)]
        file: PathBuf,
    },
    /// Per-write cost as a signed note collects post-signature changes (imports and the review
    /// ledger alone), at 1, 1,000 and 10,000 changes.
    Review {
        /// Post-signature changes to collect.
        #[arg(long, default_value_t = 10_000)]
        changes: usize,
        /// Writes per median at each checkpoint.
        #[arg(long, default_value_t = 100)]
        window: usize,
    },
    /// A device holding K synced documents reconnects with nothing changed, then with N
    /// changed on the relay (real relay binary of this build profile, on a temp dir).
    /// N randomized fault schedules (seeds S, S+1, ...); a failure names its seed.
    Soak {
        /// Runs.
        #[arg(long, default_value_t = 100)]
        runs: u64,
        /// First seed.
        #[arg(long, default_value_t = 1_000)]
        seed: u64,
    },
    /// (Used by `soak`.) One sync pass of a device store, reporting progress on stdout, so
    /// the soak can SIGKILL a device process mid-pass.
    #[command(hide = true)]
    DevicePass {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        key: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        base_url: String,
        #[arg(long)]
        token: String,
    },
    Reconnect {
        /// Documents the device holds.
        #[arg(long)]
        docs: usize,
        /// Documents changed on the relay before the last pass.
        #[arg(long, default_value_t = 0)]
        changed: usize,
    },
}

fn soak_workload(runs: u64, first_seed: u64) -> Result<serde_json::Value, String> {
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let (mut clean, mut failed) = (0u64, Vec::new());
    let (mut faults, mut resets, mut kills, mut restores, mut edits) = (0, 0, 0, 0, 0);
    let device = std::env::current_exe().map_err(|e| e.to_string())?;
    let (mut device_kills, mut cut_passes, mut mid_pass_kills) = (0, 0, 0);
    for seed in first_seed..first_seed.saturating_add(runs) {
        match runtime.block_on(fieldchart_tests::soak::run(seed, &device)) {
            Ok(report) => {
                clean += 1;
                faults += report.faults;
                resets += report.resets;
                kills += report.relay_kills;
                mid_pass_kills += report.relay_kills_mid_pass;
                restores += report.restores;
                edits += report.edits;
                device_kills += report.device_kills;
                cut_passes += report.cut_passes;
            }
            Err(e) => {
                eprintln!("{e}");
                failed.push(seed);
            }
        }
    }
    let out = serde_json::json!({
        "workload": "soak",
        "runs": runs,
        "clean": clean,
        "failedSeeds": failed,
        "edits": edits,
        "faultsInjected": faults,
        "connectionsReset": resets,
        "relayKills": kills,
        "relayKillsMidPass": mid_pass_kills,
        "restores": restores,
        "deviceKillsMidPass": device_kills,
        "passesCutInProcess": cut_passes,
        "elapsedS": started.elapsed().as_secs_f64(),
    });
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(out.to_string())
    }
}

fn reconnect_workload(docs: usize, changed: usize) -> Result<serde_json::Value, String> {
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let run = runtime.block_on(fieldchart_tests::reconnect::measure(docs, changed))?;
    Ok(run.to_json())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Replay `trace` through one store per agent; returns the replay and the bytes on disk.
fn store_replay(
    trace: &Trace,
    journal: bool,
) -> Result<(fieldchart_tests::trace::Replay, u64), String> {
    let agents = trace.num_agents.max(1);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (first, seed) = seed_note(open_store(dir.path(), 0, journal), &trace.start_content);
    let note = first.note;
    let mut stores = vec![first];
    for agent in 1..agents {
        let store = open_store(dir.path(), agent, journal);
        store.import(note, &seed).map_err(|e| e.to_string())?;
        stores.push(StoreReplica { store, note });
    }
    let run = replay(trace, &mut stores)?;
    for s in &stores {
        s.store.close().map_err(|e| e.to_string())?;
    }
    Ok((run, dir_bytes(dir.path())))
}

/// Figures of one mode over its runs.
struct ModeRuns {
    runs: Vec<fieldchart_tests::trace::Replay>,
    db_bytes: u64,
}

impl ModeRuns {
    /// Best (least) edit time over the runs, seconds.
    fn edit_s(&self) -> f64 {
        self.runs
            .iter()
            .map(|r| r.edit_time.as_secs_f64())
            .fold(f64::INFINITY, f64::min)
    }

    /// Best (least) edit + merge time over the runs, seconds.
    fn total_s(&self) -> f64 {
        self.runs
            .iter()
            .map(|r| (r.edit_time + r.merge_time).as_secs_f64())
            .fold(f64::INFINITY, f64::min)
    }

    /// Every run's edit latencies, sorted.
    fn latencies(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = self.runs.iter().flat_map(|r| r.latencies.clone()).collect();
        all.sort();
        all
    }

    fn ok(&self, end: &str) -> bool {
        self.runs.iter().all(|r| r.texts.iter().all(|t| t == end))
    }

    fn json(&self, prefix: &str) -> serde_json::Value {
        let lat = self.latencies();
        serde_json::json!({
            format!("{prefix}edit_s_runs"): self.runs.iter().map(|r| r.edit_time.as_secs_f64()).collect::<Vec<_>>(),
            format!("{prefix}merge_s_runs"): self.runs.iter().map(|r| r.merge_time.as_secs_f64()).collect::<Vec<_>>(),
            format!("{prefix}p50_edit_us"): percentile(&lat, 0.50),
            format!("{prefix}p99_edit_us"): percentile(&lat, 0.99),
        })
    }
}

fn trace_workload(file: &std::path::Path) -> Result<serde_json::Value, String> {
    let trace = Trace::load(file)?;
    let agents = trace.num_agents.max(1);
    let seed = {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        seed_note(open_store(dir.path(), 0, false), &trace.start_content).1
    };
    // Same process, each mode twice, alternating (bare, store, unbatched, bare, ...), so a
    // noisy neighbour hits every mode alike. Edit time counts only the edit calls; merge time
    // the imports of other agents' changes (concurrent traces), each a durable transaction on
    // a store. Figures are the better of the two runs.
    let mut bare = ModeRuns {
        runs: Vec::new(),
        db_bytes: 0,
    };
    let mut store = ModeRuns {
        runs: Vec::new(),
        db_bytes: 0,
    };
    let mut unbatched = ModeRuns {
        runs: Vec::new(),
        db_bytes: 0,
    };
    for _ in 0..2 {
        let mut replicas: Vec<BareReplica> = (0..agents)
            .map(|_| BareReplica::from_saved(&seed))
            .collect();
        bare.runs.push(replay(&trace, &mut replicas)?);
        let (run, bytes) = store_replay(&trace, true)?;
        store.runs.push(run);
        store.db_bytes = bytes;
        let (run, bytes) = store_replay(&trace, false)?;
        unbatched.runs.push(run);
        unbatched.db_bytes = bytes;
    }
    let end = &trace.end_content;
    let ok = bare.ok(end) && store.ok(end) && unbatched.ok(end);
    let (bare_s, store_s, unbatched_s) = (bare.edit_s(), store.edit_s(), unbatched.edit_s());
    let (bare_total, store_total, unbatched_total) =
        (bare.total_s(), store.total_s(), unbatched.total_s());
    let mut out = serde_json::json!({
        "workload": "trace",
        "file": file.file_name().map(|f| f.to_string_lossy().into_owned()),
        "ok": ok,
        "agents": agents,
        "edits": trace.edits(),
        "runs_per_mode": 2,
        "store_s": store_s,
        "bare_automerge_s": bare_s,
        "ratio": store_s / bare_s,
        "store_with_merges_s": store_total,
        "bare_automerge_with_merges_s": bare_total,
        "ratio_with_merges": store_total / bare_total,
        "db_bytes": store.db_bytes,
        "durability": "each splice returns after its encrypted keystroke-journal record is written (survives a process kill); the journal is committed to SQLite every 1024 records or at the next structural edit; each merge (import) is its own durable transaction",
        "unbatched_store_s": unbatched_s,
        "unbatched_ratio": unbatched_s / bare_s,
        "unbatched_with_merges_s": unbatched_total,
        "unbatched_ratio_with_merges": unbatched_total / bare_total,
        "unbatched_db_bytes": unbatched.db_bytes,
        "unbatched_durability": "each splice commits its own SQLite transaction (WAL, synchronous=NORMAL)",
    });
    for (prefix, mode) in [("", &store), ("bare_", &bare), ("unbatched_", &unbatched)] {
        if let (Some(o), serde_json::Value::Object(extra)) =
            (out.as_object_mut(), mode.json(prefix))
        {
            o.extend(extra);
        }
    }
    Ok(out)
}

fn storm_workload(
    devices: usize,
    visits: usize,
    relay: &RelayArgs,
    reconnect: bool,
    deployment: fieldchart_tests::storm::Deployment,
) -> Result<serde_json::Value, String> {
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(fieldchart_tests::storm::run(
        fieldchart_tests::storm::StormConfig {
            devices,
            visits,
            seed: relay.seed,
            target: relay.target(),
            reconnect,
            progress: true,
            phase_timeout: Duration::from_secs(relay.timeout_s),
            deployment,
        },
    ))
}

/// The scale-out comparison: see `fieldchart_tests::storm::scale_out`.
fn scale_out_workload(
    devices: usize,
    visits: usize,
    cpu_per_relay: f64,
    rounds: usize,
    pool: Option<usize>,
    relay: &RelayArgs,
) -> Result<serde_json::Value, String> {
    if relay.relay.is_some() {
        return Err("scale-out starts its own relays; --relay does not apply".into());
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let out = runtime.block_on(fieldchart_tests::storm::scale_out(
        fieldchart_tests::storm::ScaleOutConfig {
            devices,
            visits,
            seed: relay.seed,
            target: relay.target(),
            cpu_per_relay: (cpu_per_relay > 0.0).then_some(cpu_per_relay),
            pool,
            rounds,
            progress: true,
            phase_timeout: Duration::from_secs(relay.timeout_s),
        },
    ))?;
    if let Some(table) = out["table"].as_str() {
        eprintln!("{table}");
    }
    Ok(out)
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.workload {
        Workload::Storm {
            devices,
            visits,
            relay,
            deployment,
        } => storm_workload(devices, visits, &relay, false, deployment.deployment()),
        Workload::ScaleOut {
            devices,
            visits,
            cpu_per_relay,
            rounds,
            database_pool,
            relay,
        } => scale_out_workload(
            devices,
            visits,
            cpu_per_relay,
            rounds,
            database_pool,
            &relay,
        ),
        Workload::ReconnectStorm {
            devices,
            docs,
            relay,
        } => storm_workload(
            devices,
            docs,
            &relay,
            true,
            fieldchart_tests::storm::Deployment::default(),
        ),
        Workload::Bootstrap {
            patients,
            visits,
            relay,
        } => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(fieldchart_tests::bootstrap::run(
                    fieldchart_tests::bootstrap::BootstrapConfig {
                        patients,
                        visits,
                        seed: relay.seed,
                        target: relay.target(),
                        phase_timeout: Duration::from_secs(relay.timeout_s),
                    },
                ))
            }),
        Workload::Sessions { count, relay } => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(fieldchart_tests::sessions::run(
                    count,
                    &relay.target(),
                    true,
                    Duration::from_secs(relay.timeout_s),
                ))
            }),
        Workload::Trace { file } => trace_workload(&file),
        Workload::Reconnect { docs, changed } => reconnect_workload(docs, changed),
        Workload::Soak { runs, seed } => soak_workload(runs, seed),
        Workload::DevicePass {
            db,
            key,
            user,
            base_url,
            token,
        } => {
            fieldchart_tests::soak::device_pass(&db, &key, &user, &base_url, &token);
            return;
        }
        Workload::Review { changes, window } => fieldchart_tests::review::measure(changes, window),
    };
    let result = result.and_then(|v| {
        if v["ok"] == serde_json::Value::Bool(false) {
            Err(format!("workload reported ok=false: {v}"))
        } else {
            Ok(v)
        }
    });
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", serde_json::json!({ "ok": false, "error": e }));
            std::process::exit(1);
        }
    }
}
