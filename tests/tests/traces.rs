//! Real editing traces replayed through the store API end exactly at `endContent`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use fieldchart_tests::trace::{StoreReplica, Trace, open_store, replay, seed_note};

fn trace(name: &str) -> Trace {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/editing-traces")
        .join(name);
    Trace::load(&path).unwrap()
}

fn replicas(trace: &Trace, dir: &std::path::Path) -> Vec<StoreReplica> {
    let (first, seed) = seed_note(open_store(dir, 0, true), &trace.start_content);
    let mut out = vec![first];
    for agent in 1..trace.num_agents {
        let store = open_store(dir, agent, true);
        store.import(out[0].note, &seed).unwrap();
        out.push(StoreReplica {
            store,
            note: out[0].note,
        });
    }
    out
}

fn check(trace: &Trace) {
    let dir = tempfile::tempdir().unwrap();
    let mut reps = replicas(trace, dir.path());
    let result = replay(trace, &mut reps).unwrap();
    for (agent, text) in result.texts.iter().enumerate() {
        assert!(
            text == &trace.end_content,
            "agent {agent} ends with {} chars, expected {}",
            text.chars().count(),
            trace.end_content.chars().count()
        );
    }
    // And after reopening from disk.
    for r in &reps {
        r.store.clear_cache().unwrap();
        assert_eq!(
            r.store.visit_note(r.note).unwrap().assessment,
            trace.end_content
        );
    }
}

#[test]
fn automerge_paper_replays_exactly() {
    check(&trace("automerge-paper.json.gz"));
}

#[test]
fn friendsforever_replays_exactly_on_every_replica() {
    check(&trace("friendsforever.json.gz"));
}

#[test]
fn text_outside_the_basic_multilingual_plane_replays_exactly() {
    // Every 'e' becomes a mathematical fraktur 'e' (U+1D522, two UTF-16 units), so trace
    // positions (code points) and store positions (UTF-16) differ all over the document.
    let t = trace("friendsforever.json.gz").map_char('e', '𝔢');
    assert!(t.end_content.contains('𝔢'));
    check(&t);
}
