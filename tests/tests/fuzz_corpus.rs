//! Replays the committed fuzz corpus on stable: every interesting input and every crasher the
//! `cargo fuzz` targets found (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) goes
//! through the same harness the fuzzer ran (`fuzz/src/lib.rs`, included here), so a fixed
//! crash stays fixed without a nightly toolchain.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code, unreachable_pub)]
mod harness;

use std::path::PathBuf;

type Harness = fn(&[u8]);

const TARGETS: &[(&str, Harness)] = &[
    ("frame_decode", harness::frame_decode),
    ("session_messages", harness::session_messages),
    ("document_import", harness::document_import),
    ("journal_replay", harness::journal_replay),
    ("store_open", harness::store_open),
];

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let dir = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            if path.is_file() {
                let bytes = std::fs::read(&path).expect("read corpus file");
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_committed_fuzz_corpus_and_crashers_replay_cleanly() {
    let mut total = 0;
    for (target, run) in TARGETS {
        let inputs = inputs(target);
        assert!(
            !inputs.is_empty(),
            "no committed corpus for fuzz target {target} (fuzz/corpus/{target}/)"
        );
        for (path, bytes) in &inputs {
            let outcome = std::panic::catch_unwind(|| run(bytes));
            assert!(
                outcome.is_ok(),
                "fuzz target {target} fails on {}",
                path.display()
            );
        }
        println!("{target}: {} inputs replayed", inputs.len());
        total += inputs.len();
    }
    println!("{total} inputs replayed");
}
