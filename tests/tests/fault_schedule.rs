//! The randomized fault run (`fieldchart_tests::soak`) for 20 seeds: devices edit offline and
//! sync through the fault-injecting proxy while the relay is killed (between rounds, and in
//! the middle of a device's pass), restarted and once restored from an older copy; then,
//! faults off, everything converges. A failure prints its seed; rerun one with
//! `fieldchart-bench soak --seed N --runs 1`.

/// Seeds the test command runs (the soak runs many more).
const SEEDS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_seeded_fault_schedules_converge_without_loss_or_false_receipts() {
    // The device processes the schedules SIGKILL: the benchmark binary's `device-pass`.
    let device = std::path::Path::new(env!("CARGO_BIN_EXE_fieldchart-bench"));
    let mut failures = Vec::new();
    let mut device_kills = 0;
    let (mut faults, mut resets, mut kills, mut restores) = (0, 0, 0, 0);
    let mut mid_pass_kills = 0;
    for seed in 0..SEEDS {
        match fieldchart_tests::soak::run(seed, device).await {
            Ok(report) => {
                println!("{}", report.to_json());
                faults += report.faults;
                resets += report.resets;
                kills += report.relay_kills;
                mid_pass_kills += report.relay_kills_mid_pass;
                restores += report.restores;
                device_kills += report.device_kills;
            }
            Err(e) => {
                println!("FAILED {e}");
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {SEEDS} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The schedules really did fire.
    assert!(
        faults > 0 && resets > 0 && kills > 0 && mid_pass_kills > 0 && device_kills > 0,
        "{faults} faults, {resets} resets, {kills} relay kills between rounds, \
         {mid_pass_kills} mid-pass, {device_kills} device kills"
    );
    assert_eq!(
        restores as u64, SEEDS,
        "every run restores the relay from an older copy once"
    );
}
