//! Crash safety: a child process edits in a loop and is killed with SIGKILL at random points;
//! reopening always succeeds and every edit whose call returned is present.
//!
//! The child is this same test binary, re-run with an environment variable that turns the
//! `crash_child` test into the writer loop.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use fieldchart_core::model::{Actor, NoteText, Role, VisitStart, VitalReading, VitalType};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};

const CHILD_ENV: &str = "FIELDCHART_CRASH_CHILD";
const ROUNDS: usize = 50;

fn open(path: &std::path::Path, key: [u8; 32], journal: bool) -> Store {
    Store::open(StoreConfig {
        path: path.to_owned(),
        key: StoreKey::from_bytes(key),
        actor: Actor {
            user_id: "nurse".into(),
            device_id: "phone".into(),
        },
        role: Role::Clinician,
        keystroke_journal: journal,
    })
    .unwrap()
}

/// The writer: appends `<round>.<i>;` to the assessment (alternating with vital readings) and
/// reports each edit on stdout only after the call returned.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split('|');
    let path = std::path::PathBuf::from(parts.next().unwrap());
    let key: [u8; 32] = hex_decode(parts.next().unwrap());
    let note: DocumentId = parts.next().unwrap().parse().unwrap();
    let round = parts.next().unwrap();
    let journal = parts.next().unwrap() == "journal";
    let store = open(&path, key, journal);
    let mut out = std::io::stdout().lock();
    for i in 0..100_000 {
        let token = format!("{round}.{i};");
        if i % 5 == 4 {
            store
                .record_vital(
                    note,
                    &VitalReading {
                        id: String::new(),
                        vital: VitalType::Pulse,
                        value: token.clone(),
                        unit: "bpm".into(),
                        taken_at_ms: 0,
                        recorded_by: String::new(),
                        supersedes: None,
                    },
                )
                .unwrap();
        } else {
            let len = store.visit_note(note).map(|n| n.assessment.len()).unwrap();
            store
                .splice_text(note, NoteText::Assessment, len, 0, &token)
                .unwrap();
        }
        writeln!(out, "ok {token}").unwrap();
        out.flush().unwrap();
    }
}

fn hex_decode(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// Most rounds type through the keystroke journal; every third commits each splice to SQLite
/// (and the reopen alternates too, so journal leftovers are also merged by a later open).
fn mode(round: usize) -> &'static str {
    if round % 3 == 1 {
        "transactions"
    } else {
        "journal"
    }
}

#[test]
fn killed_writers_lose_no_acknowledged_edit() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let key: [u8; 32] = rand::random();
    let note = open(&path, key, true)
        .start_visit(&VisitStart {
            agency_id: "ag".into(),
            patient_id: "p1".into(),
            service_type: "sn".into(),
            date: "2026-11-27".into(),
            location: "home".into(),
            started_at_ms: 0,
            start_monotonic_ms: 0,
        })
        .unwrap();
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut acknowledged: Vec<String> = Vec::new();
    // The child's stderr, shown if it stops before acknowledging anything (a failed reopen
    // after the previous kill would be a finding, not noise).
    let child_err = dir.path().join("child.err");
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(
                CHILD_ENV,
                format!(
                    "{}|{key_hex}|{note}|{round}|{}",
                    path.display(),
                    mode(round)
                ),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&child_err).unwrap())
            .spawn()
            .unwrap();
        // Kill after a random number of acknowledged edits: the child is then somewhere inside
        // its next edit (SQLite write, automerge commit, WAL append...).
        let stop_after = rand::random_range(1..40);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < stop_after {
            let Some(line) = lines.next() else { break };
            let line = line.unwrap();
            if let Some(token) = line.strip_prefix("ok ") {
                acknowledged.push(token.to_owned());
                seen += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL
        // Lines already printed when the kill landed were acknowledged too.
        for line in lines.map_while(Result::ok) {
            if let Some(token) = line.strip_prefix("ok ") {
                acknowledged.push(token.to_owned());
            }
        }
        child.wait().unwrap();
        assert!(
            seen > 0,
            "round {round}: the child never acknowledged an edit; its stderr:\n{}",
            std::fs::read_to_string(&child_err).unwrap_or_default()
        );

        let store = open(&path, key, round % 3 != 2);
        let n = store.visit_note(note).unwrap();
        let vitals: Vec<&str> = n.vitals.iter().map(|v| v.value.as_str()).collect();
        // Whole tokens, not substrings: a surviving "11.2;" must not stand in for a lost "1.2;".
        let typed: std::collections::HashSet<String> = n
            .assessment
            .split_terminator(';')
            .map(|t| format!("{t};"))
            .collect();
        for token in &acknowledged {
            assert!(
                typed.contains(token) || vitals.contains(&token.as_str()),
                "round {round}: acknowledged edit {token} is missing after SIGKILL"
            );
        }
        store.close().unwrap();
    }
}

const REKEY_CHILD_ENV: &str = "FIELDCHART_REKEY_CHILD";

/// The other process of the rekey test: types through the journal, re-keys the store, types
/// more, reports, then waits to be killed (never closing or dropping the store).
#[test]
fn rekey_child() {
    let Ok(spec) = std::env::var(REKEY_CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split('|');
    let path = std::path::PathBuf::from(parts.next().unwrap());
    let old_key = hex_decode(parts.next().unwrap());
    let new_key = hex_decode(parts.next().unwrap());
    let note: DocumentId = parts.next().unwrap().parse().unwrap();
    let store = open(&path, old_key, true);
    let mut pos = 0;
    for c in "before rekey;".chars() {
        store
            .splice_text(note, NoteText::Assessment, pos, 0, &c.to_string())
            .unwrap();
        pos += 1;
    }
    store.rekey(&StoreKey::from_bytes(new_key)).unwrap();
    for c in " after rekey;".chars() {
        store
            .splice_text(note, NoteText::Assessment, pos, 0, &c.to_string())
            .unwrap();
        pos += 1;
    }
    println!("ok typed");
    let mut out = std::io::stdout().lock();
    out.flush().unwrap();
    // Wait for the SIGKILL; the store stays open with its journal.
    loop {
        std::thread::park();
    }
}

#[test]
fn journal_then_rekey_then_sigkill_loses_nothing() {
    if std::env::var(CHILD_ENV).is_ok() || std::env::var(REKEY_CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let old_key: [u8; 32] = rand::random();
    let new_key: [u8; 32] = rand::random();
    let note = {
        let store = open(&path, old_key, true);
        let note = store
            .start_visit(&VisitStart {
                agency_id: "ag".into(),
                patient_id: "p1".into(),
                service_type: "sn".into(),
                date: "2026-11-27".into(),
                location: "home".into(),
                started_at_ms: 0,
                start_monotonic_ms: 0,
            })
            .unwrap();
        store.close().unwrap();
        note
    };
    let hex = |k: &[u8; 32]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rekey_child", "--nocapture", "--test-threads=1"])
        .env(
            REKEY_CHILD_ENV,
            format!(
                "{}|{}|{}|{note}",
                path.display(),
                hex(&old_key),
                hex(&new_key)
            ),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let typed = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        // libtest prints "test rekey_child ... " without a newline before the test's output.
        .any(|l| l.ends_with("ok typed"));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(typed, "the child never finished typing");
    assert!(
        std::fs::metadata(journal_path(&path)).unwrap().len() > 0,
        "the keystrokes after the rekey are only in the journal"
    );

    assert!(
        Store::open(StoreConfig {
            path: path.clone(),
            key: StoreKey::from_bytes(old_key),
            actor: Actor {
                user_id: "nurse".into(),
                device_id: "phone".into(),
            },
            role: Role::Clinician,
            keystroke_journal: true,
        })
        .is_err(),
        "the old key no longer opens the store"
    );
    let store = open(&path, new_key, true);
    assert_eq!(
        store.visit_note(note).unwrap().assessment,
        "before rekey; after rekey;"
    );
    let damaged = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("damaged")
        })
        .count();
    assert_eq!(
        damaged, 0,
        "no journal record was unreadable under the new key"
    );
}

fn journal_path(db: &std::path::Path) -> std::path::PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-keystrokes");
    std::path::PathBuf::from(p)
}
