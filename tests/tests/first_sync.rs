//! A device's first sync through batch fetches (`POST /v1/documents/fetch`), end to end: the
//! real relay process on 127.0.0.1, real device stores, the sync driver.
//!
//! Build the relay first when running only this file: `cargo build -p fieldchart-server`.
//! Every wait is bounded; nothing sleeps to wait for readiness.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use automerge::{Automerge, ChangeHash};
use fieldchart_core::model::{NoteText, Role};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreKey};
use fieldchart_mobile::{PassOptions, PassReport, PassStatus, RelayConfig, SyncClient};
use fieldchart_tests::bootstrap::seeded_note;
use fieldchart_tests::reconnect::open_store;
use fieldchart_tests::relay_process::{Admin, RelayProcess, SyncOutcome, TestPeer, set};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any one pass may take before the test fails.
const WAIT: Duration = Duration::from_secs(120);

/// Documents per batch in these tests: small, so a caseload of a few hundred is several
/// batches with two in flight.
const BATCH: usize = 64;

/// A caseload on a real relay: two patients on the nurse's care team with `notes` visit notes
/// written by the office, and one patient she is not assigned to, with a note.
struct Caseload {
    _dir: tempfile::TempDir,
    relay: RelayProcess,
    admin: Admin,
    nurse: String,
    office: TestPeer,
    /// Charts and notes she may see, as the office wrote them.
    hers: BTreeMap<DocumentId, Vec<ChangeHash>>,
    notes: Vec<DocumentId>,
    patients: Vec<String>,
    not_hers: DocumentId,
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort();
    heads
}

async fn caseload(notes: usize) -> Caseload {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    std::fs::create_dir_all(&data).expect("data dir");
    let admin = Admin::new(&data);
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let office_user = admin.create_user(&agency, "Sam", "office");
    let mut patients = Vec::new();
    let mut charts = Vec::new();
    for name in ["Ruth", "Otto", "Vera"] {
        let (patient, chart) = admin.create_patient(&agency, name);
        patients.push(patient);
        charts.push(chart);
    }
    admin.assign(&nurse, &patients[0]);
    admin.assign(&nurse, &patients[1]);
    let desk = admin.issue_token(&office_user, "desk");
    let relay = RelayProcess::start(&data);
    let mut office = TestPeer::connect(&relay.ws_url(&desk.token), Some("desk"))
        .await
        .expect("office connects");
    let mut rng = StdRng::seed_from_u64(7);
    let mut ids = Vec::new();
    for i in 0..notes {
        let doc: Automerge = seeded_note(&mut rng, &agency, &patients[i % 2], &nurse);
        ids.push(office.create(doc));
    }
    let not_hers = office.create(seeded_note(&mut rng, &agency, &patients[2], &nurse));
    let mut all = ids.clone();
    all.push(not_hers);
    let mut hers = BTreeMap::new();
    for (id, outcome) in all.iter().zip(office.sync_all(&all).await) {
        let SyncOutcome::InSync(heads) = outcome else {
            panic!("the relay refused a seeded note")
        };
        if *id != not_hers {
            hers.insert(*id, sorted(heads));
        }
    }
    for chart in &charts[..2] {
        let SyncOutcome::InSync(heads) = office.fetch(*chart).await else {
            panic!("the office cannot read a chart")
        };
        hers.insert(*chart, sorted(heads));
    }
    Caseload {
        _dir: dir,
        relay,
        admin,
        nurse,
        office,
        hers,
        notes: ids,
        patients,
        not_hers,
    }
}

fn device(dir: &Path, world: &Caseload, base_url: &str) -> (Arc<Store>, SyncClient) {
    let token = world.admin.issue_token(&world.nurse, "phone");
    let store = Arc::new(open_store(
        &dir.join("phone.db"),
        &StoreKey::random(),
        &world.nurse,
        &token.device_id,
        Role::Clinician,
    ));
    let client = SyncClient::new(
        Arc::clone(&store),
        RelayConfig {
            base_url: base_url.into(),
            token: token.token,
        },
    )
    .expect("client");
    (store, client)
}

async fn pass(client: &SyncClient) -> PassReport {
    tokio::time::timeout(
        WAIT,
        client.run_pass(PassOptions {
            fetch_batch_docs: BATCH,
            ..PassOptions::default()
        }),
    )
    .await
    .expect("the pass finishes")
}

fn held(store: &Store) -> BTreeMap<DocumentId, Vec<ChangeHash>> {
    store
        .document_ids()
        .expect("ids")
        .into_iter()
        .map(|id| (id, sorted(store.heads(id).expect("heads"))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_fetches_the_caseload_in_batches_and_later_changes_still_flow_both_ways() {
    let mut world = caseload(300).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, client) = device(dir.path(), &world, &world.relay.http_base());

    let first = pass(&client).await;
    assert_eq!(first.status, PassStatus::Complete, "{first:?}");
    let total = world.hers.len();
    assert_eq!(total, 302);
    assert_eq!(first.stats.docs_batch_fetched, total, "{first:?}");
    assert_eq!(first.fetch_requests as usize, total.div_ceil(BATCH));
    // The WebSocket carried only the handshake that names the relay's storage.
    assert_eq!(first.messages(), 2, "{first:?}");
    assert_eq!(
        held(&store),
        world.hers,
        "exactly her caseload, at the relay's heads"
    );
    for id in world.hers.keys() {
        assert!(
            store
                .receipt(*id)
                .expect("receipt")
                .expect("some")
                .covers_current
        );
    }
    assert_eq!(
        store.patients().expect("charts").len(),
        2,
        "indexed on arrival"
    );
    assert!(store.sync_failures().expect("failures").is_empty());
    // Every document sent is on the audit trail as a `read` by this device.
    let reads = world
        .admin
        .audit_for_patient(&world.patients[0])
        .into_iter()
        .filter(|r| r["action"] == "read" && r["userId"] == world.nurse.as_str())
        .count();
    assert_eq!(reads, 151, "150 notes and the chart");
    assert!(
        world
            .admin
            .audit_for_patient(&world.patients[2])
            .iter()
            .all(|r| r["userId"] != world.nurse.as_str()),
        "nothing of the patient she is not assigned to was asked for"
    );
    assert!(store.heads(world.not_hers).is_err());

    // Nothing changed: one feed read, no fetch, no WebSocket.
    let quiet = pass(&client).await;
    assert_eq!(quiet.status, PassStatus::Complete);
    assert_eq!(
        (quiet.messages(), quiet.fetch_requests, quiet.http_requests),
        (0, 0, 1),
        "{quiet:?}"
    );

    // The office changes a note: it reaches the device (which holds it: a sync exchange).
    let changed = world.notes[17];
    set(
        world.office.doc_mut(changed).expect("office copy"),
        "nextVisit",
        "Tuesday",
    );
    let SyncOutcome::InSync(relay_heads) = world.office.sync(changed).await else {
        panic!("the relay refused the office's edit")
    };
    let after = pass(&client).await;
    assert_eq!(after.status, PassStatus::Complete, "{after:?}");
    assert_eq!(after.stats.docs_changed, 1);
    assert_eq!(after.fetch_requests, 0);
    assert_eq!(
        sorted(store.heads(changed).expect("heads")),
        sorted(relay_heads)
    );

    // The nurse edits a fetched note: it uploads, and the office sees it.
    let edited = world.notes[4];
    store
        .update_text(edited, NoteText::Assessment, "wound healing well")
        .expect("edit");
    let up = pass(&client).await;
    assert_eq!(up.status, PassStatus::Complete, "{up:?}");
    assert!(store.unsynced_documents().expect("unsynced").is_empty());
    let ours = sorted(store.heads(edited).expect("heads"));
    world.office.wait_for_heads(edited, &ours).await;
}

/// A TCP proxy that cuts the first connection carrying a batch fetch after `cut` bytes of its
/// answer (both sockets dropped, as when the radio goes); everything else passes untouched.
async fn cutting_proxy(upstream: SocketAddr, cut: usize) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let armed = Arc::new(AtomicBool::new(true));
    let a = Arc::clone(&armed);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let armed = Arc::clone(&a);
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut ri, mut wi) = inbound.into_split();
                let (mut ro, mut wo) = outbound.into_split();
                let chosen = Arc::new(AtomicBool::new(false));
                let c = Arc::clone(&chosen);
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match ri.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let post: &[u8] = b"POST /v1/documents/fetch";
                        if buf[..n].windows(post.len()).any(|w| w == post)
                            && armed.swap(false, Ordering::SeqCst)
                        {
                            c.store(true, Ordering::SeqCst);
                        }
                        if wo.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 4 * 1024];
                    let mut sent_after_choice = 0usize;
                    loop {
                        let n = match ro.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut n = n;
                        if chosen.load(Ordering::SeqCst) {
                            let left = cut.saturating_sub(sent_after_choice);
                            n = n.min(left);
                            sent_after_choice += n;
                        }
                        if n > 0 && wi.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if chosen.load(Ordering::SeqCst) && sent_after_choice >= cut {
                            break;
                        }
                    }
                };
                // Whichever direction ends first drops both sockets.
                tokio::select! {
                    () = up => {}
                    () = down => {}
                }
            });
        }
    });
    (addr, armed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_batch_loses_nothing_and_the_next_pass_completes() {
    let world = caseload(200).await;
    let (proxy, armed) = cutting_proxy(world.relay.addr(), 30_000).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, client) = device(dir.path(), &world, &format!("http://{proxy}"));

    let cut = pass(&client).await;
    assert!(!armed.load(Ordering::SeqCst), "the proxy cut a fetch");
    assert!(
        matches!(&cut.status, PassStatus::Interrupted(e) if e.contains("document fetch")),
        "{cut:?}"
    );
    let partial = held(&store);
    assert!(
        !partial.is_empty() && partial.len() < world.hers.len(),
        "records that arrived whole are kept: {} of {}",
        partial.len(),
        world.hers.len()
    );
    for (id, heads) in &partial {
        assert_eq!(
            Some(heads),
            world.hers.get(id),
            "stored whole, at the relay's heads"
        );
        assert!(store.receipt(*id).expect("receipt").is_some());
    }
    assert!(store.sync_failures().expect("failures").is_empty());

    let next = pass(&client).await;
    assert_eq!(next.status, PassStatus::Complete, "{next:?}");
    assert_eq!(held(&store), world.hers);
    assert_eq!(
        next.stats.docs_batch_fetched,
        world.hers.len() - partial.len(),
        "only what the cut pass did not store is fetched again"
    );
    let quiet = pass(&client).await;
    assert_eq!(
        (
            quiet.messages(),
            quiet.fetch_requests,
            quiet.stats.docs_fetched
        ),
        (0, 0, 0),
        "{quiet:?}"
    );
}
