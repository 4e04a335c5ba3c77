//! A full disk on the device, through the store (SQLite's page cap: the real `SQLITE_FULL`
//! path): the write in progress fails with a clear error, everything written before stays,
//! and writing works again once the disk has room.

use fieldchart_core::model::{Actor, NoteText, Role, VisitStart};
use fieldchart_core::store::{Store, StoreConfig, StoreKey};

fn open(path: &std::path::Path, journal: bool) -> Store {
    Store::open(StoreConfig {
        path: path.to_owned(),
        key: StoreKey::from_bytes([3; 32]),
        actor: Actor {
            user_id: "usr_1".into(),
            device_id: "dev_1".into(),
        },
        role: Role::Clinician,
        keystroke_journal: journal,
    })
    .expect("open")
}

fn visit() -> VisitStart {
    VisitStart {
        agency_id: "agc_1".into(),
        patient_id: "pat_1".into(),
        service_type: "skilled-nursing".into(),
        date: "2026-11-30".into(),
        location: "1 Elm St".into(),
        started_at_ms: 1_764_460_800_000,
        start_monotonic_ms: 1,
    }
}

#[test]
fn a_full_disk_fails_the_write_loses_nothing_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("phone.db");
    let store = open(&path, false);
    let note = store.start_visit(&visit()).expect("start");
    store
        .splice_text(note, NoteText::Assessment, 0, 0, "Before the disk filled.")
        .expect("type");
    let before = store.visit_note(note).expect("read").assessment;

    store.simulate_full_disk(true).expect("cap");
    // Large writes need new pages: they fail, each with the disk error, and change nothing.
    let big = "Wound measured 3 x 4 cm, edges approximated, no drainage. ".repeat(2_000);
    let mut failures = 0;
    for _ in 0..5 {
        match store.splice_text(
            note,
            NoteText::Assessment,
            before.encode_utf16().count(),
            0,
            &big,
        ) {
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("full"), "a clear error: {text}");
                failures += 1;
            }
        }
    }
    assert!(
        failures > 0,
        "the capped database accepted every large write"
    );
    assert!(store.start_visit(&visit()).is_err() || failures > 0);
    // Nothing acknowledged was lost, and the store still answers.
    let read = store.visit_note(note).expect("read while full").assessment;
    assert!(read.starts_with(&before), "{read:?}");

    // The disk has room again.
    store.simulate_full_disk(false).expect("uncap");
    store
        .splice_text(
            note,
            NoteText::Assessment,
            read.encode_utf16().count(),
            0,
            " After.",
        )
        .expect("writes work again");
    store.close().expect("close");
    let store = open(&path, false);
    let read = store.visit_note(note).expect("read").assessment;
    assert!(
        read.starts_with(&before) && read.ends_with(" After."),
        "{read:?}"
    );
}
