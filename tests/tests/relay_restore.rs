//! A relay restored from last night's backup, through the real relay process: its data
//! directory is copied while it is stopped, the relay keeps serving (and confirming) new notes,
//! then it is stopped and the old copy put back. A device that synced in between reconnects
//! with no local change at all — nothing forces a connection — and must still find out that
//! the relay is behind: the feed answers its cursor with a reset (new epoch), the device
//! compares every document with the relay's listing, withdraws the receipts the relay cannot
//! back and pushes what the relay lost. Afterwards every receipt is backed by the relay's
//! store again and the relay holds every note exactly as the device does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use automerge::{ChangeHash, ReadDoc};
use fieldchart_core::model::{NoteText, Role, VisitStart};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreKey};
use fieldchart_mobile::{PassOptions, PassReport, PassStatus, RelayConfig, SyncClient};
use fieldchart_tests::reconnect::open_store;
use fieldchart_tests::relay_process::{Admin, RelayProcess, SyncOutcome, TestPeer};

struct Phone {
    store: Arc<Store>,
    token: String,
}

impl Phone {
    fn open(path: &Path, user: &str, token: &str) -> Phone {
        let key: [u8; 32] = rand::random();
        Phone {
            store: Arc::new(open_store(
                path,
                &StoreKey::from_bytes(key),
                user,
                "phone",
                Role::Clinician,
            )),
            token: token.into(),
        }
    }

    /// One pass against `relay` (a new client each time: the relay's port changes when it
    /// is started again).
    async fn sync(&self, relay: &RelayProcess) -> PassReport {
        let client = SyncClient::new(
            Arc::clone(&self.store),
            RelayConfig {
                base_url: relay.http_base(),
                token: self.token.clone(),
            },
        )
        .expect("sync client");
        let report = client.run_pass(PassOptions::default()).await;
        assert_eq!(report.status, PassStatus::Complete, "{report:?}");
        report
    }

    fn heads(&self, id: DocumentId) -> Vec<ChangeHash> {
        let mut heads = self.store.heads(id).expect("heads");
        heads.sort();
        heads
    }

    fn type_text(&self, note: DocumentId, text: &str) {
        let n = self.store.visit_note(note).expect("note");
        let len = n.assessment.encode_utf16().count();
        self.store
            .splice_text(note, NoteText::Assessment, len, 0, text)
            .expect("type");
    }
}

fn visit(agency: &str, patient: &str, i: i64) -> VisitStart {
    VisitStart {
        agency_id: agency.into(),
        patient_id: patient.into(),
        service_type: "skilled-nursing".into(),
        date: "2026-11-30".into(),
        location: format!("{} Elm St", 10 + i),
        started_at_ms: 1_764_460_800_000 + i * 3_600_000,
        start_monotonic_ms: 50_000 + i * 3_600_000,
    }
}

/// Copy every file of `from` into `to` (a stopped relay's data directory: the database, its
/// WAL and the key file), replacing what is there.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(to).expect("read target") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::remove_file(&path).expect("remove");
        }
    }
    for entry in std::fs::read_dir(from).expect("read source") {
        let path: PathBuf = entry.expect("entry").path();
        if path.is_file() {
            let name = path.file_name().expect("file name");
            std::fs::copy(&path, to.join(name)).expect("copy");
        }
    }
}

/// Every receipt on the device names heads the relay really holds (read back from the relay).
async fn assert_receipts_backed(store: &Store, reader: &mut TestPeer) -> usize {
    let mut receipts = 0;
    for id in store.document_ids().expect("ids") {
        let Some(receipt) = store.receipt(id).expect("receipt") else {
            continue;
        };
        receipts += 1;
        match reader.fetch(id).await {
            SyncOutcome::InSync(_) => {}
            SyncOutcome::Unavailable => panic!("a receipt for {id}, which the relay lacks"),
        }
        let relay_doc = reader.doc(id).expect("fetched");
        for head in &receipt.heads {
            assert!(
                relay_doc.get_change_by_hash(head).is_some(),
                "the receipt of {id} names a change the relay does not hold"
            );
        }
    }
    receipts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restored_from_an_older_copy_gets_back_what_it_lost_without_a_local_edit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let backup_dir = dir.path().join("backup");
    std::fs::create_dir_all(&relay_dir).expect("mkdir");
    let admin = Admin::new(&relay_dir);
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let office = admin.create_user(&agency, "Olive", "office");
    let (patient, _chart) = admin.create_patient(&agency, "Ada");
    admin.assign(&nurse, &patient);
    let phone_token = admin.issue_token(&nurse, "phone").token;
    let office_token = admin.issue_token(&office, "desk").token;

    let mut relay = RelayProcess::start(&relay_dir);
    let phone = Phone::open(&dir.path().join("phone.db"), &nurse, &phone_token);

    // Before the backup: one note, confirmed.
    let before = phone
        .store
        .start_visit(&visit(&agency, &patient, 1))
        .expect("start");
    phone.type_text(before, "Seen before the backup.");
    phone.sync(&relay).await;
    assert!(
        phone
            .store
            .receipt(before)
            .expect("receipt")
            .is_some_and(|r| r.covers_current)
    );

    // Last night's backup, taken with the relay stopped.
    relay.kill();
    copy_dir(&relay_dir, &backup_dir);
    let mut relay = RelayProcess::start(&relay_dir);

    // After the backup: a new note and more text in the old one, both confirmed.
    let after = phone
        .store
        .start_visit(&visit(&agency, &patient, 2))
        .expect("start");
    phone.type_text(after, "Written after the backup.");
    phone.type_text(before, " Wound dressing changed after the backup.");
    phone.sync(&relay).await;
    for id in [before, after] {
        let receipt = phone.store.receipt(id).expect("receipt").expect("receipt");
        assert!(receipt.covers_current, "{id}");
    }

    // The disk is lost; the operator restores the backup and starts the relay.
    relay.kill();
    copy_dir(&backup_dir, &relay_dir);
    let relay = RelayProcess::start(&relay_dir);
    let mut reader = TestPeer::connect(&relay.ws_url(&office_token), None)
        .await
        .expect("reader");
    assert!(
        matches!(reader.fetch(after).await, SyncOutcome::Unavailable),
        "the restored relay should not hold the note written after the backup"
    );

    // The phone reconnects with nothing new of its own.
    assert!(
        phone
            .store
            .unsynced_documents()
            .expect("unsynced")
            .is_empty()
    );
    let report = phone.sync(&relay).await;
    assert!(report.stats.reconciled, "{report:?}");
    assert_eq!(
        report.stats.receipts_withdrawn, 2,
        "exactly the two receipts the restored relay cannot back: {report:?}"
    );
    assert!(report.stats.docs_synced >= 2, "{report:?}");

    // The relay holds everything the phone holds, exactly; every receipt is backed.
    let mut reader = TestPeer::connect(&relay.ws_url(&office_token), None)
        .await
        .expect("reader");
    for id in [before, after] {
        match reader.fetch(id).await {
            SyncOutcome::InSync(heads) => {
                let mut heads = heads;
                heads.sort();
                assert_eq!(heads, phone.heads(id), "{id}");
            }
            SyncOutcome::Unavailable => panic!("{id} was not pushed to the restored relay"),
        }
        let receipt = phone.store.receipt(id).expect("receipt").expect("receipt");
        assert!(receipt.covers_current, "{id}");
    }
    let receipts = assert_receipts_backed(&phone.store, &mut reader).await;
    assert!(receipts >= 3, "the chart and both notes carry receipts");
    assert!(
        phone
            .store
            .unsynced_documents()
            .expect("unsynced")
            .is_empty()
    );
    assert!(phone.store.sync_failures().expect("failures").is_empty());

    // The next pass is quiet again: the cursor belongs to this relay's epoch.
    let next = phone.sync(&relay).await;
    assert!(!next.stats.reconciled, "{next:?}");
    assert_eq!(next.stats.docs_synced, 0, "{next:?}");
}
