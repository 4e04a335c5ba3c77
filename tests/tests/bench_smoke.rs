//! The throughput benchmarks' code paths, tiny, against the real relay binary: `storm` with the
//! device stack and with the plain v1 client (3 devices x 2 visits, then everyone reconnecting),
//! `bootstrap` both ways (2 patients x 3 notes), `sessions` (5 idle sessions), and `scale-out`
//! (the storm on 1 SQLite relay, 1 PostgreSQL relay and 2 PostgreSQL relays on one fresh
//! database, 4 devices x 2 visits; needs PostgreSQL, see `fieldchart_tests::postgres`). Each must
//! report `ok` — every note read back from the relay with the heads its device wrote — so a
//! broken path fails here, not in a benchmark run. Seconds, not minutes; the phase limit (120
//! s) is reached only if something hangs.

use std::time::Duration;

use fieldchart_tests::bootstrap::{self, BootstrapConfig};
use fieldchart_tests::storm::{self, Deployment, ScaleOutConfig, StormConfig, Target};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

fn target(plain: bool) -> Target {
    Target::Fieldchart {
        server_bin: None,
        plain,
    }
}

fn assert_ok(out: &Value) {
    assert_eq!(out["ok"], Value::Bool(true), "{out:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_device_stack_and_reconnect() {
    let out = storm::run(StormConfig {
        devices: 3,
        visits: 2,
        seed: 7,
        target: target(false),
        reconnect: true,
        progress: false,
        phase_timeout: LIMIT,
        deployment: Deployment::default(),
    })
    .await
    .expect("storm runs");
    assert_ok(&out);
    assert_eq!(out["observer_matched"], 6, "{out:#}");
    assert_eq!(out["caseload_fetch"]["notes"], 2, "{out:#}");
    assert!(out["storm"]["bytes_up_per_device"].as_f64().expect("bytes") > 0.0);
    assert!(
        out["relay_storm"]["relay_cpu_s"].as_f64().is_some(),
        "{out:#}"
    );
    // Reconnecting with nothing changed uploads nothing.
    assert_eq!(out["reconnect"]["devices_failed"], 0, "{out:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_plain_client() {
    let out = storm::run(StormConfig {
        devices: 3,
        visits: 2,
        seed: 8,
        target: target(true),
        reconnect: false,
        progress: false,
        phase_timeout: LIMIT,
        deployment: Deployment::default(),
    })
    .await
    .expect("storm runs");
    assert_ok(&out);
    assert_eq!(out["client"], "plain-v1");
    assert_eq!(out["observer_matched"], 6, "{out:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_both_clients() {
    for plain in [false, true] {
        let out = bootstrap::run(BootstrapConfig {
            patients: 2,
            visits: 3,
            seed: 9,
            target: target(plain),
            phase_timeout: LIMIT,
        })
        .await
        .expect("bootstrap runs");
        assert_ok(&out);
        assert_eq!(out["held_matching"], 6, "{out:#}");
        assert!(out["bytes_over_save"].as_f64().expect("ratio") > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions() {
    let out = fieldchart_tests::sessions::run(5, &target(false), false, LIMIT)
        .await
        .expect("sessions run");
    assert_ok(&out);
    assert_eq!(out["joined"], 5, "{out:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_on_sqlite_and_one_and_two_postgres_relays() {
    let out = storm::scale_out(ScaleOutConfig {
        devices: 4,
        visits: 2,
        seed: 10,
        target: target(false),
        cpu_per_relay: None,
        pool: Some(4),
        rounds: 1,
        progress: false,
        phase_timeout: LIMIT,
    })
    .await
    .expect("scale-out runs");
    assert_ok(&out);
    let runs = out["runs"].as_array().expect("runs");
    let configs: Vec<&str> = runs.iter().filter_map(|r| r["config"].as_str()).collect();
    assert_eq!(
        configs,
        ["sqlite x1", "postgres x1", "postgres x2"],
        "{out:#}"
    );
    for run in runs {
        // Every note read back (through the other relay, for most of them, on two relays).
        assert_eq!(run["observer_matched"], 8, "{out:#}");
        assert!(run["docs_per_s"].as_f64().expect("docs/s") > 0.0, "{out:#}");
    }
    // The PostgreSQL runs saw their database's backends work.
    for run in &runs[1..] {
        assert!(
            run["postgres_backend_cpu_s"].as_f64().expect("backend CPU") > 0.0,
            "{out:#}"
        );
    }
    assert!(
        out["ratios"]["postgres_x2_over_postgres_x1"]
            .as_f64()
            .is_some(),
        "{out:#}"
    );
    assert!(
        out["table"]
            .as_str()
            .expect("table")
            .contains("postgres x2"),
        "{out:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_on_two_postgres_relays_uses_both() {
    let out = storm::run(StormConfig {
        devices: 4,
        visits: 2,
        seed: 11,
        target: target(true),
        reconnect: false,
        progress: false,
        phase_timeout: LIMIT,
        deployment: Deployment {
            postgres: true,
            relays: 2,
            cpu_per_relay: None,
            pool: Some(4),
        },
    })
    .await
    .expect("storm runs");
    assert_ok(&out);
    assert_eq!(out["observer_matched"], 8, "{out:#}");
    assert_eq!(out["deployment"]["relays"], 2, "{out:#}");
    // Devices are spread over both relays: each one worked during the storm.
    let each = out["relay_storm"]["relay_cpu_s_each"]
        .as_array()
        .expect("per-relay CPU");
    assert_eq!(each.len(), 2, "{out:#}");
    assert!(
        each.iter().all(|c| c.as_f64().is_some_and(|c| c > 0.0)),
        "{out:#}"
    );
}
