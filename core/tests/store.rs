//! Store behaviour against a real SQLCipher file: encryption at rest, keys, close, lists,
//! history, compaction and bad input.

#![allow(clippy::unwrap_used)]

use fieldchart_core::Error;
use fieldchart_core::model::{Actor, Demographic, NoteStatus, NoteText, Role, VisitStart};
use fieldchart_core::store::{Store, StoreConfig, StoreKey};

fn config(dir: &std::path::Path, key: &StoreKey, user: &str, role: Role) -> StoreConfig {
    StoreConfig {
        path: dir.join("device.db"),
        key: key.clone(),
        actor: Actor {
            user_id: user.into(),
            device_id: "ipad-7".into(),
        },
        role,
        keystroke_journal: true,
    }
}

fn visit(patient: &str, date: &str) -> VisitStart {
    VisitStart {
        agency_id: "ag".into(),
        patient_id: patient.into(),
        service_type: "skilled-nursing".into(),
        date: date.into(),
        location: "home".into(),
        started_at_ms: 1_764_230_400_000,
        start_monotonic_ms: 7,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn nothing_is_stored_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let store = Store::open(config(dir.path(), &key, "office", Role::Office)).unwrap();
    let name = "Zebediah Quarrington-Phlox";
    let id = store.create_patient("ag", "p-zq", name).unwrap();
    store
        .set_demographic(id, Demographic::Address, "742 Evergreen Terrace")
        .unwrap();
    // Read back through the store: the data is there...
    assert_eq!(store.patient_chart(id).unwrap().name(), Some(name));
    // One file, one Store at a time: the office's store is closed before the nurse's opens.
    store.close().unwrap();
    // A nurse types a note keystroke by keystroke (the keystroke journal path) and the app is
    // killed before anything is committed to SQLite.
    let nurse = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let note = nurse.start_visit(&visit("p-zq", "2026-11-27")).unwrap();
    for (i, c) in "Zebediah reports Evergreen pain".chars().enumerate() {
        nurse
            .splice_text(note, NoteText::Assessment, i, 0, &c.to_string())
            .unwrap();
    }
    // A paste is one splice: the whole name in one journal record.
    nurse
        .splice_text(
            note,
            NoteText::Plan,
            0,
            0,
            "Call Zebediah Quarrington-Phlox at Evergreen",
        )
        .unwrap();
    assert!(
        std::fs::metadata(dir.path().join("device.db-keystrokes"))
            .unwrap()
            .len()
            > 0
    );
    nurse.simulate_kill();
    // ...but neither the database file nor its WAL hold it in plaintext (checked while the WAL
    // still has the frames, before any checkpoint, and again after close).
    for phase in ["open", "closed"] {
        for file in ["device.db", "device.db-wal", "device.db-keystrokes"] {
            let path = dir.path().join(file);
            if let Ok(bytes) = std::fs::read(&path) {
                assert!(
                    !contains(&bytes, name.as_bytes()),
                    "{file} ({phase}) leaks the name"
                );
                assert!(
                    !contains(&bytes, b"Evergreen"),
                    "{file} ({phase}) leaks the address"
                );
                assert!(
                    !contains(&bytes, b"SQLite format 3"),
                    "{file} ({phase}) has a plaintext header"
                );
            }
        }
        if phase == "open" {
            assert!(
                dir.path().join("device.db-wal").exists(),
                "the check must see the WAL"
            );
            // Reopen (replaying the journal) and close, checkpointing the WAL.
            Store::open(config(dir.path(), &key, "nurse", Role::Clinician))
                .unwrap()
                .close()
                .unwrap();
        }
    }
}

#[test]
fn wrong_key_is_a_clear_error_and_rekey_works() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let store = Store::open(config(dir.path(), &key, "office", Role::Office)).unwrap();
    let id = store.create_patient("ag", "p1", "Ada").unwrap();
    let new_key = StoreKey::random();
    store.rekey(&new_key).unwrap();
    store.close().unwrap();

    let err = Store::open(config(dir.path(), &key, "office", Role::Office)).unwrap_err();
    assert!(matches!(err, Error::CannotDecrypt), "{err}");
    assert!(err.to_string().contains("wrong key"));
    let store = Store::open(config(dir.path(), &new_key, "office", Role::Office)).unwrap();
    assert_eq!(store.patient_chart(id).unwrap().name(), Some("Ada"));
}

#[test]
fn calls_after_close_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(
        dir.path(),
        &StoreKey::random(),
        "n",
        Role::Clinician,
    ))
    .unwrap();
    let note = store.start_visit(&visit("p1", "2026-11-27")).unwrap();
    store.close().unwrap();
    assert!(matches!(store.visit_note(note), Err(Error::Closed)));
    assert!(matches!(store.drafts(), Err(Error::Closed)));
    assert!(matches!(
        store.update_text(note, NoteText::Plan, "x"),
        Err(Error::Closed)
    ));
    store.close().unwrap();
}

#[test]
fn lists_come_from_the_index_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let nurse = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    assert!(matches!(
        nurse.create_patient("ag", "p", "x"),
        Err(Error::Forbidden { .. })
    ));
    let a = nurse.start_visit(&visit("p1", "2026-11-27")).unwrap();
    let b = nurse.start_visit(&visit("p1", "2026-11-28")).unwrap();
    let c = nurse.start_visit(&visit("p2", "2026-11-27")).unwrap();
    nurse
        .update_text(b, NoteText::Assessment, "Stable.")
        .unwrap();
    nurse.sign(b).unwrap();
    assert!(matches!(
        nurse.splice_text(b, NoteText::Assessment, 0, 0, "x"),
        Err(Error::NoteSigned(_))
    ));
    nurse.close().unwrap();

    let nurse = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let ids = |v: Vec<fieldchart_core::store::NoteSummary>| {
        v.into_iter().map(|n| n.document_id).collect::<Vec<_>>()
    };
    assert_eq!(ids(nurse.notes_for_patient("p1").unwrap()), vec![a, b]);
    let mut on_27 = ids(nurse.notes_on("2026-11-27").unwrap());
    on_27.sort();
    let mut expected = vec![a, c];
    expected.sort();
    assert_eq!(on_27, expected);
    let mut drafts = ids(nurse.drafts().unwrap());
    drafts.sort();
    assert_eq!(drafts, expected);
    assert_eq!(
        ids(nurse.notes_with_status(NoteStatus::Signed).unwrap()),
        vec![b]
    );
    assert_eq!(
        nurse.unsynced_notes().unwrap().len(),
        3,
        "nothing has reached the relay yet"
    );
    let log = nurse.audit_log().unwrap();
    assert!(
        log.iter()
            .any(|e| e.action == "signed" && e.document_id == Some(b) && e.device_id == "ipad-7")
    );
    nurse.visit_note(a).unwrap();
    assert!(
        nurse
            .audit_log()
            .unwrap()
            .iter()
            .any(|e| e.action == "note-viewed" && e.document_id == Some(a))
    );
    let history = nurse.history(b).unwrap();
    assert!(
        history.iter().all(|h| h
            .author
            .as_ref()
            .is_some_and(|a| a.user_id == "nurse" && a.device_id == "ipad-7")),
        "{history:?}"
    );
    assert_eq!(history.last().unwrap().message.as_deref(), Some("sign"));
    let fields = nurse.change_fields(b, &history[1].change).unwrap();
    assert_eq!(fields, vec!["assessment".to_string()]);
}

#[test]
fn compaction_keeps_everything_and_reload_matches() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let note = store.start_visit(&visit("p1", "2026-11-27")).unwrap();
    for i in 0..50 {
        store
            .splice_text(
                note,
                NoteText::Plan,
                i,
                0,
                "ab".get(i % 2..i % 2 + 1).unwrap(),
            )
            .unwrap();
    }
    let before = store.visit_note(note).unwrap();
    store.compact(note).unwrap();
    store.splice_text(note, NoteText::Plan, 0, 0, "😀").unwrap();
    store.close().unwrap();
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let after = store.visit_note(note).unwrap();
    assert_eq!(after.plan, format!("😀{}", before.plan));
    assert_eq!(store.history(note).unwrap().len(), 52);
}

#[test]
fn garbage_imports_are_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(
        dir.path(),
        &StoreKey::random(),
        "nurse",
        Role::Clinician,
    ))
    .unwrap();
    let note = store.start_visit(&visit("p1", "2026-11-27")).unwrap();
    let heads = store.heads(note).unwrap();
    let good = store.export_changes(note).unwrap();
    for bad in [
        vec![0u8; 0],
        vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3],
        b"not automerge at all".to_vec(),
        good[..good.len() / 2].to_vec(),
    ] {
        let fresh = fieldchart_core::protocol::DocumentId::random();
        assert!(
            matches!(store.import(fresh, &bad), Err(Error::InvalidInput(_))),
            "{bad:?}"
        );
        assert!(
            !store.document_ids().unwrap().contains(&fresh),
            "a refused import creates no document"
        );
        assert!(store.import(note, &bad).is_err(), "{bad:?}");
        assert_eq!(store.heads(note).unwrap(), heads);
    }
    assert_eq!(store.visit_note(note).unwrap().status, NoteStatus::Draft);
}

#[test]
fn splices_left_in_the_journal_by_a_crash_are_merged_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let note = store.start_visit(&visit("p1", "2026-11-27")).unwrap();
    store
        .update_text(note, NoteText::Assessment, "Pain 3/10.")
        .unwrap();
    // Reopen, so this session's actor makes its very first change through the journal.
    store.close().unwrap();
    drop(store);
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let mut pos = 10;
    for c in "  Ambulating 😀 with cane".chars() {
        store
            .splice_text(note, NoteText::Assessment, pos, 0, &c.to_string())
            .unwrap();
        pos += c.len_utf16();
    }
    store
        .splice_text(note, NoteText::Assessment, 0, 4, "Ache")
        .unwrap();
    let heads = store.heads(note).unwrap();
    let journal = dir.path().join("device.db-keystrokes");
    assert!(
        std::fs::metadata(&journal).unwrap().len() > 0,
        "the splices are in the journal"
    );
    // Simulate a kill: the store is never closed or dropped.
    store.simulate_kill();

    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    assert_eq!(
        store.visit_note(note).unwrap().assessment,
        "Ache 3/10.  Ambulating 😀 with cane"
    );
    assert_eq!(
        store.heads(note).unwrap(),
        heads,
        "the very same changes, not re-made ones"
    );
    assert_eq!(
        std::fs::metadata(&journal).unwrap().len(),
        0,
        "merged records are committed and cleared"
    );
    store.close().unwrap();
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    assert_eq!(store.heads(note).unwrap(), heads);
}

#[test]
fn without_the_journal_every_splice_is_its_own_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let open = || {
        Store::open(StoreConfig {
            keystroke_journal: false,
            ..config(dir.path(), &key, "nurse", Role::Clinician)
        })
        .unwrap()
    };
    let store = open();
    let note = store.start_visit(&visit("p1", "2026-11-27")).unwrap();
    for (i, c) in "abc😀".chars().enumerate() {
        store
            .splice_text(note, NoteText::Plan, i, 0, &c.to_string())
            .unwrap();
    }
    store.simulate_kill();
    assert!(!dir.path().join("device.db-keystrokes").exists());
    assert_eq!(open().visit_note(note).unwrap().plan, "abc😀");
}

#[test]
fn journaled_keystrokes_survive_a_failed_sync_apply() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let note = store.start_visit(&visit("p1", "2026-11-27")).unwrap();
    for (i, c) in "Edema +2".chars().enumerate() {
        store
            .splice_text(note, NoteText::Assessment, i, 0, &c.to_string())
            .unwrap();
    }
    assert!(
        std::fs::metadata(dir.path().join("device.db-keystrokes"))
            .unwrap()
            .len()
            > 0,
        "the keystrokes are only in the journal"
    );
    // A sync message the store refuses, for the very document being typed in.
    let mut sync = store.doc_sync_state("relay", note).unwrap();
    assert!(
        store
            .apply_sync_message("relay", note, &mut sync, &[0x42, 0xff, 0x00, 0x13])
            .is_err()
    );
    // The keystrokes are still there in this session...
    assert_eq!(store.visit_note(note).unwrap().assessment, "Edema +2");
    // ...and a later write (which commits the journal and empties it) keeps them too.
    let other = store.start_visit(&visit("p2", "2026-11-27")).unwrap();
    store.set_next_visit(other, "2026-11-30").unwrap();
    store.simulate_kill();
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    assert_eq!(store.visit_note(note).unwrap().assessment, "Edema +2");
}

#[test]
fn a_second_open_from_another_thread_is_refused_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let first = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let note = first.start_visit(&visit("p1", "2026-11-27")).unwrap();
    let second = std::thread::scope(|s| {
        s.spawn(|| Store::open(config(dir.path(), &key, "nurse", Role::Clinician)))
            .join()
            .unwrap()
    });
    let err = second.unwrap_err();
    assert!(matches!(err, Error::StoreInUse), "{err}");
    assert!(err.to_string().contains("already open"), "{err}");
    // The refused open changed nothing: the first handle keeps working.
    first.update_text(note, NoteText::Plan, "Recheck").unwrap();
    first.close().unwrap();
    // Another test in this binary spawns a child process; between its fork and exec the child
    // holds a copy of every descriptor, our lock file's included, so the lock can outlive
    // `close` by that window. Retry only `StoreInUse`, within a bound far above a fork.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reopened = loop {
        let opened = std::thread::scope(|s| {
            s.spawn(|| Store::open(config(dir.path(), &key, "nurse", Role::Clinician)))
                .join()
                .unwrap()
        });
        match opened {
            Ok(store) => break store.visit_note(note).unwrap().plan,
            Err(Error::StoreInUse) if std::time::Instant::now() < deadline => {
                std::thread::yield_now()
            }
            Err(e) => panic!("reopen after close: {e}"),
        }
    };
    assert_eq!(reopened, "Recheck");
}

const LOCK_CHILD_ENV: &str = "FIELDCHART_LOCK_CHILD";

/// The other process of the lock test: tries to open the store and reports the outcome.
#[test]
fn lock_child() {
    let Ok(spec) = std::env::var(LOCK_CHILD_ENV) else {
        return;
    };
    let (dir, key_hex) = spec.split_once('|').unwrap();
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let outcome = match Store::open(config(
        std::path::Path::new(dir),
        &StoreKey::from_bytes(key),
        "nurse",
        Role::Clinician,
    )) {
        Ok(store) => {
            store.close().unwrap();
            "opened".to_string()
        }
        Err(Error::StoreInUse) => "in-use".to_string(),
        Err(e) => format!("error {e}"),
    };
    println!("outcome {outcome}");
}

#[test]
fn a_second_open_from_another_process_is_refused_until_close() {
    if std::env::var(LOCK_CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key: [u8; 32] = rand::random();
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let child = || {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "lock_child", "--nocapture", "--test-threads=1"])
            .env(
                LOCK_CHILD_ENV,
                format!("{}|{key_hex}", dir.path().display()),
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            // libtest prints "test lock_child ... " without a newline before the output.
            .find_map(|l| l.split_once("outcome ").map(|(_, o)| o.to_owned()))
            .unwrap_or_else(|| "no outcome".into())
    };
    let store = Store::open(config(
        dir.path(),
        &StoreKey::from_bytes(key),
        "nurse",
        Role::Clinician,
    ))
    .unwrap();
    store.start_visit(&visit("p1", "2026-11-27")).unwrap();
    assert_eq!(child(), "in-use");
    store.close().unwrap();
    assert_eq!(child(), "opened");
}

#[test]
fn reading_is_audited_once_per_document_and_session() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::random();
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    let a = store.start_visit(&visit("p1", "2026-11-27")).unwrap();
    let b = store.start_visit(&visit("p2", "2026-11-27")).unwrap();
    let viewed = |store: &Store, id| {
        store
            .audit_log()
            .unwrap()
            .iter()
            .filter(|e| e.action == "note-viewed" && e.document_id == Some(id))
            .count()
    };
    for _ in 0..5 {
        store.visit_note(a).unwrap();
    }
    store.visit_note(b).unwrap();
    assert_eq!(viewed(&store, a), 1, "five reads, one row");
    assert_eq!(viewed(&store, b), 1);
    store.close().unwrap();
    let store = Store::open(config(dir.path(), &key, "nurse", Role::Clinician)).unwrap();
    store.visit_note(a).unwrap();
    store.visit_note(a).unwrap();
    assert_eq!(viewed(&store, a), 2, "a new session audits again, once");
}

#[test]
fn conflict_rows_from_an_older_build_are_reindexed_at_open() {
    use fieldchart_core::model::Medication;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let raw: [u8; 32] = rand::random();
    let key = StoreKey::from_bytes(raw);
    let a = Store::open(config(dir_a.path(), &key, "office", Role::Office)).unwrap();
    let b = Store::open(config(dir_b.path(), &key, "nurse", Role::Clinician)).unwrap();
    let chart = a.create_patient("ag", "p1", "Ada").unwrap();
    a.upsert_medication(
        chart,
        None,
        &Medication {
            name: "Metformin".into(),
            dose: "500 mg".into(),
            ..Default::default()
        },
    )
    .unwrap();
    b.import(chart, &a.export_changes(chart).unwrap()).unwrap();
    for (store, dose) in [(&a, "250 mg"), (&b, "750 mg")] {
        let read = store.patient_chart(chart).unwrap().medications[0].clone();
        let mut m = read.clone();
        m.dose = dose.into();
        store.upsert_medication(chart, Some(&read), &m).unwrap();
    }
    a.import(chart, &b.export_changes(chart).unwrap()).unwrap();
    let expected = a.conflicts(chart).unwrap();
    assert_eq!(expected.len(), 1);
    a.close().unwrap();
    // Rewrite the row as an older build stored it: values without ids.
    {
        let conn = rusqlite::Connection::open(dir_a.path().join("device.db")).unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        conn.execute_batch(&format!("PRAGMA key = \"x'{hex}'\";"))
            .unwrap();
        let n = conn
            .execute(
                "UPDATE conflicts SET values_json = (SELECT json_group_array(json(json_remove(value, '$.id'))) FROM json_each(values_json))",
                [],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    let a = Store::open(config(dir_a.path(), &key, "office", Role::Office)).unwrap();
    let listed = a.conflicts(chart).unwrap();
    assert_eq!(listed, expected, "re-walked at open, ids restored");
    let choice = listed[0].values[0].id.clone();
    a.resolve_conflict(chart, &listed[0], &choice).unwrap();
    assert!(a.conflicts(chart).unwrap().is_empty());
}
