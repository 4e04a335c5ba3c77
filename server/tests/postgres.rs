//! Several writers on one PostgreSQL database: what the conformance suite (one connection pool
//! at a time) cannot show. Each `PostgresStorage` here has its own pool, as a relay process
//! would, and each test works in a fresh schema of its own (dropped at the end), so the tests
//! run in parallel.
//!
//! PostgreSQL is found at `FIELDCHART_TEST_POSTGRES` (libpq key=value), default
//! `host=127.0.0.1 port=5432 user=postgres dbname=postgres`; unreachable, the tests fail and
//! say so.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use automerge::{Automerge, Change, ReadDoc, transaction::Transactable};
use fieldchart_core::protocol::DocumentId;
use fieldchart_server::Error;
use fieldchart_server::docs::{Created, DocHub};
use fieldchart_server::identity::{AgencyId, DeviceId, PatientId, UserId};
use fieldchart_server::storage::{
    AuditAction, AuditEvent, DocMeta, DocumentData, DocumentWrite, FeedCursor, FeedQuery,
    FeedScope, PostgresStorage, Storage,
};

fn server() -> String {
    std::env::var("FIELDCHART_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

async fn admin() -> tokio_postgres::Client {
    let server = server();
    let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is needed for this test and is not reachable at `{server}` ({e}). \
                 Start it (`.ci/run` does) or set FIELDCHART_TEST_POSTGRES."
            )
        });
    tokio::spawn(connection);
    client
}

/// A schema of its own, dropped at the end of the test.
struct Schema {
    name: String,
    url: String,
}

impl Schema {
    async fn create() -> Schema {
        let name = format!("fc_pgtest_{:016x}", rand::random::<u64>());
        admin()
            .await
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .expect("create schema");
        let url = format!(
            "{} application_name={name} options='-c search_path={name}'",
            server()
        );
        Schema { name, url }
    }

    /// A relay's storage: a pool of its own.
    async fn relay(&self) -> PostgresStorage {
        PostgresStorage::connect(&self.url, 4)
            .await
            .expect("connect")
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async {
                    admin()
                        .await
                        .batch_execute(&format!(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                             WHERE application_name = '{name}';
                             DROP SCHEMA IF EXISTS {name} CASCADE"
                        ))
                        .await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}

fn meta() -> DocMeta {
    DocMeta {
        agency_id: AgencyId::new("agc_1"),
        patient_id: PatientId::new("pat_1"),
        kind: "visit-note".into(),
    }
}

fn audit(id: DocumentId) -> AuditEvent {
    AuditEvent {
        at_ms: 1,
        agency_id: AgencyId::new("agc_1"),
        user_id: UserId::new("usr_1"),
        device_id: DeviceId::new("dev_1"),
        document_id: id,
        patient_id: Some(PatientId::new("pat_1")),
        action: AuditAction::Write,
        heads: vec![],
    }
}

fn put(doc: &mut Automerge, key: &str, value: i64) -> Vec<Change> {
    let before = doc.get_heads();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(automerge::ROOT, key, value).map(|_| ())
    })
    .expect("edit");
    doc.get_changes(&before)
}

/// The integer at `key` of the document's root.
fn int(doc: &Automerge, key: &str) -> Option<i64> {
    doc.get(automerge::ROOT, key)
        .expect("read")
        .and_then(|(value, _)| value.as_i64())
}

async fn create(hub: &DocHub) -> DocumentId {
    let id = DocumentId::random();
    let mut doc = Automerge::new();
    put(&mut doc, "created", 0);
    assert!(matches!(
        hub.create(id, doc.clone(), doc.save(), meta(), audit(id))
            .await
            .expect("create"),
        Created::Stored(_)
    ));
    id
}

/// One relay's edit: open (its possibly stale copy), apply, commit.
async fn edit_through(hub: &DocHub, id: DocumentId, key: String, value: i64) {
    let mut guard = hub.open(id).await.expect("open").expect("stored");
    let changes = put(guard.doc_mut(), &key, value);
    hub.commit(guard, &changes, audit(id), 1)
        .await
        .expect("commit");
}

async fn stored(storage: &dyn Storage, id: DocumentId) -> (Automerge, Vec<automerge::ChangeHash>) {
    let stored = storage
        .load_document(id)
        .await
        .expect("load")
        .expect("stored");
    let mut doc = match &stored.snapshot {
        Some(bytes) => Automerge::load(bytes).expect("snapshot"),
        None => Automerge::new(),
    };
    for chunk in &stored.chunks {
        doc.load_incremental(chunk).expect("chunk");
    }
    (doc, stored.heads)
}

/// Two relays (two pools, two document hubs, each with its own cached copy) write one document
/// at the same time, round after round; one of them compacts at every write, so compaction races
/// the other's appends. Every change of both survives, and the stored heads are the heads of
/// what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_writing_one_document_keep_every_change_and_the_right_heads() {
    let schema = Schema::create().await;
    let one: Arc<dyn Storage> = Arc::new(schema.relay().await);
    let two: Arc<dyn Storage> = Arc::new(schema.relay().await);
    // Relay one compacts at every write; relay two appends chunks.
    let hub_one = Arc::new(DocHub::new(Arc::clone(&one), 100, 1));
    let hub_two = Arc::new(DocHub::new(Arc::clone(&two), 100, 1_000));
    let id = create(&hub_one).await;
    const ROUNDS: i64 = 25;
    for round in 0..ROUNDS {
        let a = {
            let hub = Arc::clone(&hub_one);
            tokio::spawn(async move { edit_through(&hub, id, format!("one-{round}"), round).await })
        };
        let b = {
            let hub = Arc::clone(&hub_two);
            tokio::spawn(async move { edit_through(&hub, id, format!("two-{round}"), round).await })
        };
        a.await.expect("relay one");
        b.await.expect("relay two");
    }
    let (doc, heads) = stored(&*one, id).await;
    assert_eq!(
        heads,
        doc.get_heads(),
        "stored heads are those of what is stored"
    );
    for round in 0..ROUNDS {
        for relay in ["one", "two"] {
            assert_eq!(
                int(&doc, &format!("{relay}-{round}")),
                Some(round),
                "{relay}-{round} lost"
            );
        }
    }
    // Both relays' copies, reopened, show everything.
    for hub in [&hub_one, &hub_two] {
        let guard = hub.open(id).await.expect("open").expect("stored");
        let mut copy = guard.doc().clone();
        drop(guard);
        copy.merge(&mut doc.clone()).expect("merge");
        assert_eq!(copy.get_heads().len(), heads.len());
    }
}

/// Writers on two relays create documents while a reader on a third follows the change feed
/// page by page: every document appears, although sequence positions are taken by concurrent
/// transactions (commit order cannot skip an entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_never_skips_an_entry_written_concurrently_on_two_relays() {
    let schema = Schema::create().await;
    let relays = [schema.relay().await, schema.relay().await];
    let reader = schema.relay().await;
    const PER_WRITER: usize = 40;
    let mut writers = Vec::new();
    for (w, relay) in relays.iter().enumerate() {
        for lane in 0..2 {
            let relay = relay.clone();
            writers.push(tokio::spawn(async move {
                let mut made = Vec::new();
                for i in 0..PER_WRITER / 2 {
                    let id = DocumentId::random();
                    let mut doc = Automerge::new();
                    put(&mut doc, &format!("w{w}-{lane}-{i}"), 1);
                    relay
                        .write_document(DocumentWrite {
                            document_id: id,
                            meta: meta(),
                            create: true,
                            data: DocumentData::Snapshot(doc.save()),
                            heads: doc.get_heads(),
                            audit: Some(audit(id)),
                        })
                        .await
                        .expect("create");
                    made.push(id);
                }
                made
            }));
        }
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follow = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut cursor = FeedCursor::default();
            let mut seen = BTreeSet::new();
            let mut last_seq = 0;
            // Bounded: the writers finish in well under this many pages on any machine.
            for _ in 0..100_000 {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let page = reader
                    .changes(FeedQuery {
                        scope: FeedScope::Agency(AgencyId::new("agc_1")),
                        after: cursor,
                        limit: 7,
                    })
                    .await
                    .expect("page");
                for entry in &page.entries {
                    assert!(entry.seq >= last_seq, "the feed goes forward");
                    last_seq = entry.seq;
                    seen.insert(entry.document_id);
                    cursor = FeedCursor {
                        seq: entry.seq,
                        document_id: Some(entry.document_id),
                    };
                }
                if finished && !page.more && page.entries.is_empty() {
                    return seen;
                }
                if page.entries.is_empty() {
                    tokio::task::yield_now().await;
                }
            }
            panic!("the feed reader did not finish");
        })
    };
    let mut created = BTreeSet::new();
    for writer in writers {
        created.extend(writer.await.expect("writer"));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = follow.await.expect("reader");
    assert_eq!(created.len(), 2 * PER_WRITER);
    let missed: Vec<_> = created.difference(&seen).collect();
    assert!(missed.is_empty(), "the feed skipped {missed:?}");
}

/// The database connection is killed (`pg_terminate_backend`) while a write is inside its
/// transaction: the write fails with a clear error, nothing of it is stored, and the next call
/// on the same storage works (the pool replaced the dead connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_mid_transaction_stores_nothing_and_the_next_call_recovers() {
    let schema = Schema::create().await;
    let storage = Arc::new(schema.relay().await);
    let hub = DocHub::new(storage.clone(), 10, 1_000);
    let id = create(&hub).await;
    let (before, heads_before) = stored(&*storage, id).await;
    let seq_before = storage.current_seq().await.expect("seq");

    // Hold the document's row from another connection, so the write stops inside its
    // transaction, waiting for the row lock.
    let (mut locker, connection) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
        .await
        .expect("locker");
    tokio::spawn(connection);
    let lock_tx = locker.transaction().await.expect("begin");
    let locker_pid: i32 = lock_tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    lock_tx
        .execute(
            "SELECT 1 FROM documents WHERE id = $1 FOR UPDATE",
            &[&id.as_bytes().as_slice()],
        )
        .await
        .expect("lock the row");

    let mut doc = before.clone();
    let changes = put(&mut doc, "never", 1);
    let write = {
        let storage = storage.clone();
        let bytes: Vec<u8> = changes
            .iter()
            .flat_map(|c| c.raw_bytes().to_vec())
            .collect();
        let heads = doc.get_heads();
        let base = heads_before.clone();
        tokio::spawn(async move {
            storage
                .write_document_on(
                    DocumentWrite {
                        document_id: id,
                        meta: meta(),
                        create: false,
                        data: DocumentData::Chunk(bytes),
                        heads,
                        audit: Some(audit(id)),
                    },
                    base,
                )
                .await
        })
    };
    // Wait (bounded) until the write's backend is blocked behind the locker, then kill it.
    let observer = admin().await;
    let mut victim = None;
    for _ in 0..500 {
        let rows = observer
            .query(
                "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                &[&locker_pid],
            )
            .await
            .expect("activity");
        if let Some(row) = rows.first() {
            victim = Some(row.get::<_, i32>(0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let victim = victim.expect("the write reached the row lock within 5 s");
    let killed: bool = observer
        .query_one("SELECT pg_terminate_backend($1)", &[&victim])
        .await
        .expect("terminate")
        .get(0);
    assert!(killed);
    let outcome = write.await.expect("write task");
    match &outcome {
        Err(Error::Storage(message)) => assert!(
            message.contains("postgres"),
            "a clear storage error: {message}"
        ),
        other => panic!("the write must fail, got {other:?}"),
    }
    lock_tx.rollback().await.expect("release");

    let (after, heads_after) = stored(&*storage, id).await;
    assert_eq!(
        heads_after, heads_before,
        "nothing of the failed write is stored"
    );
    assert_eq!(after.get_heads(), before.get_heads());
    assert!(after.get(automerge::ROOT, "never").expect("get").is_none());
    assert_eq!(storage.current_seq().await.expect("seq"), seq_before);

    // The next calls recover: the pool drops the dead connection.
    edit_through(&hub, id, "after".into(), 2).await;
    let (after, _) = stored(&*storage, id).await;
    assert!(after.get(automerge::ROOT, "after").expect("get").is_some());
}
