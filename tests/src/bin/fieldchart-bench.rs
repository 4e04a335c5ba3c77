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

#[derive(Subcommand)]
enum Workload {
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

fn trace_workload(file: &std::path::Path) -> Result<serde_json::Value, String> {
    let trace = Trace::load(file)?;
    let agents = trace.num_agents.max(1);
    let seed = {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        seed_note(open_store(dir.path(), 0, false), &trace.start_content).1
    };
    // Same process, one after the other; each side's time counts only the edit calls.
    let mut bare: Vec<BareReplica> = (0..agents)
        .map(|_| BareReplica::from_saved(&seed))
        .collect();
    let bare_run = replay(&trace, &mut bare)?;
    let (store_run, db_bytes) = store_replay(&trace, true)?;
    let (unbatched_run, unbatched_db_bytes) = store_replay(&trace, false)?;

    let ok = store_run
        .texts
        .iter()
        .chain(&unbatched_run.texts)
        .chain(&bare_run.texts)
        .all(|t| *t == trace.end_content);
    let mut unbatched_lat = unbatched_run.latencies.clone();
    unbatched_lat.sort();
    let unbatched_s = unbatched_run.edit_time.as_secs_f64();
    let mut lat = store_run.latencies.clone();
    lat.sort();
    let bare_s = bare_run.edit_time.as_secs_f64();
    let store_s = store_run.edit_time.as_secs_f64();
    Ok(serde_json::json!({
        "workload": "trace",
        "file": file.file_name().map(|f| f.to_string_lossy().into_owned()),
        "ok": ok,
        "agents": agents,
        "edits": trace.edits(),
        "store_s": store_s,
        "bare_automerge_s": bare_s,
        "ratio": store_s / bare_s,
        "db_bytes": db_bytes,
        "p50_edit_us": percentile(&lat, 0.50),
        "p99_edit_us": percentile(&lat, 0.99),
        "durability": "each splice returns after its encrypted keystroke-journal record is written (survives a process kill); the journal is committed to SQLite every 1024 records or at the next structural edit",
        "unbatched_store_s": unbatched_s,
        "unbatched_ratio": unbatched_s / bare_s,
        "unbatched_db_bytes": unbatched_db_bytes,
        "unbatched_p50_edit_us": percentile(&unbatched_lat, 0.50),
        "unbatched_p99_edit_us": percentile(&unbatched_lat, 0.99),
        "unbatched_durability": "each splice commits its own SQLite transaction (WAL, synchronous=NORMAL)",
    }))
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.workload {
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
