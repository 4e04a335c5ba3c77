//! The storage contract as one test suite, run against every backend (SQLite in a temp dir,
//! in-memory, and PostgreSQL in a fresh schema per test: see [`test_postgres`]). A backend that
//! passes is interchangeable.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ROOT, ReadDoc};
use fieldchart_core::protocol::DocumentId;

use super::*;
use crate::Error;
use crate::identity::{Agency, AgencyId, Device, DeviceId, Patient, PatientId, Role, User, UserId};

/// A backend under test, plus whatever must outlive it (a temp dir).
struct Fixture {
    storage: Box<dyn Storage>,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<test_postgres::Schema>,
}

impl Fixture {
    fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = SqliteStorage::open(&dir.path().join("relay.sqlite3")).expect("open sqlite");
        Fixture {
            storage: Box::new(storage),
            _dir: Some(dir),
            _schema: None,
        }
    }

    fn memory() -> Fixture {
        Fixture {
            storage: Box::new(MemoryStorage::new()),
            _dir: None,
            _schema: None,
        }
    }

    async fn postgres() -> Fixture {
        let schema = test_postgres::Schema::create().await;
        let storage = PostgresStorage::connect(&schema.url, 4)
            .await
            .expect("connect to the test schema");
        Fixture {
            storage: Box::new(storage),
            _dir: None,
            _schema: Some(schema),
        }
    }
}

/// A fresh PostgreSQL schema per test (tests run in parallel), dropped when the test ends.
///
/// The server is `FIELDCHART_TEST_POSTGRES` (a libpq key=value string), default
/// `host=127.0.0.1 port=5432 user=postgres dbname=postgres`; `.ci/run` starts one when none
/// runs. An unreachable server fails the test with a message saying so: never a silent skip.
pub(crate) mod test_postgres {
    /// The server's connection string.
    pub fn server() -> String {
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

    /// A schema of its own; the connection string selects it through `search_path`.
    #[derive(Debug)]
    pub struct Schema {
        pub name: String,
        pub url: String,
    }

    impl Schema {
        pub async fn create() -> Schema {
            let name = format!("fc_test_{}", crate::identity::random_hex::<8>());
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
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            let name = self.name.clone();
            // Drop runs inside the test's runtime: a thread of its own with its own runtime.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    // The test's pool may still hold connections (its runtime is blocked
                    // here): end them first, so nothing they hold blocks the drop.
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
}

macro_rules! conformance_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite_backend {
            $( #[tokio::test] async fn $test() { super::$test(&*super::Fixture::sqlite().storage).await; } )*
        }
        mod memory_backend {
            $( #[tokio::test] async fn $test() { super::$test(&*super::Fixture::memory().storage).await; } )*
        }
        mod postgres_backend {
            $( #[tokio::test] async fn $test() {
                let fixture = super::Fixture::postgres().await;
                super::$test(&*fixture.storage).await;
            } )*
        }
    };
}

conformance_suite!(
    storage_id_is_stable_and_sequence_starts_at_zero,
    agencies_and_users_round_trip_and_refuse_duplicates_and_orphans,
    a_patient_is_stored_with_its_chart_in_one_write,
    document_writes_append_chunks_compact_to_snapshots_and_reload_in_automerge,
    document_writes_check_existence_and_ownership,
    care_team_assignment_is_idempotent_and_takes_a_sequence_position,
    devices_are_found_by_token_hash_and_revocations_are_sequenced,
    sync_states_are_kept_per_user_peer_and_document,
    agency_feed_pages_in_sequence_order_and_sees_only_its_agency,
    care_team_feed_shows_a_new_assignment_after_the_cursor_and_pages_within_one_seq,
    audit_rows_are_appended_with_writes_and_queried_by_patient_user_and_time,
    a_document_row_names_its_owner_and_stored_size_without_loading,
    batch_reads_answer_in_the_order_asked_as_single_reads_do,
    admin_changes_and_their_log_rows_commit_together,
    enrollment_codes_are_consumed_once_and_bind_a_key,
    disabling_a_user_revokes_every_device_at_a_sequence_position,
    audit_pages_resume_after_a_cursor,
    a_write_on_heads_that_are_no_longer_stored_is_refused_and_stores_nothing,
);

// ---------------------------------------------------------------------------------------------

struct World {
    agency: AgencyId,
    other_agency: AgencyId,
    nurse: UserId,
    office: UserId,
}

async fn agency(s: &dyn Storage, name: &str) -> AgencyId {
    let id = AgencyId::random();
    s.insert_agency(Agency {
        id: id.clone(),
        name: name.into(),
        created_at: 1,
    })
    .await
    .expect("insert agency");
    id
}

async fn user(s: &dyn Storage, agency: &AgencyId, role: Role) -> UserId {
    let id = UserId::random();
    s.insert_user(User {
        id: id.clone(),
        agency_id: agency.clone(),
        name: "N".into(),
        role,
        created_at: 1,
    })
    .await
    .expect("insert user");
    id
}

async fn world(s: &dyn Storage) -> World {
    let agency_id = agency(s, "Riverside").await;
    let other_agency = agency(s, "Hillside").await;
    World {
        nurse: user(s, &agency_id, Role::Clinician).await,
        office: user(s, &agency_id, Role::Office).await,
        agency: agency_id,
        other_agency,
    }
}

fn doc_with(agency: &AgencyId, patient: &PatientId, kind: &str) -> AutoCommit {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "kind", kind).expect("put");
    doc.put(ROOT, "agencyId", agency.as_str()).expect("put");
    doc.put(ROOT, "patientId", patient.as_str()).expect("put");
    doc.commit();
    doc
}

fn meta(agency: &AgencyId, patient: &PatientId, kind: &str) -> DocMeta {
    DocMeta {
        agency_id: agency.clone(),
        patient_id: patient.clone(),
        kind: kind.into(),
    }
}

fn create(id: DocumentId, doc: &mut AutoCommit, meta: DocMeta) -> DocumentWrite {
    DocumentWrite {
        document_id: id,
        meta,
        create: true,
        data: DocumentData::Snapshot(doc.save()),
        heads: doc.get_heads(),
        audit: None,
    }
}

async fn patient(s: &dyn Storage, agency: &AgencyId) -> (PatientId, DocumentId) {
    let id = PatientId::random();
    let chart = DocumentId::random();
    let mut doc = doc_with(agency, &id, "patient");
    s.insert_patient(
        Patient {
            id: id.clone(),
            agency_id: agency.clone(),
            chart_document_id: chart,
            created_at: 1,
        },
        create(chart, &mut doc, meta(agency, &id, "patient")),
    )
    .await
    .expect("insert patient");
    (id, chart)
}

async fn store_doc(
    s: &dyn Storage,
    agency: &AgencyId,
    patient: &PatientId,
) -> (DocumentId, AutoCommit) {
    let id = DocumentId::random();
    let mut doc = doc_with(agency, patient, "visit-note");
    s.write_document(create(id, &mut doc, meta(agency, patient, "visit-note")))
        .await
        .expect("create doc");
    (id, doc)
}

/// Append one change to `doc` and store it as a chunk.
async fn edit(
    s: &dyn Storage,
    id: DocumentId,
    doc: &mut AutoCommit,
    m: &DocMeta,
    audit: Option<AuditEvent>,
) -> Seq {
    let before = doc.get_heads();
    let n = doc.get_heads().len() as i64 + 1;
    doc.put(ROOT, "edited", n).expect("put");
    doc.commit();
    let bytes: Vec<u8> = doc
        .get_changes(&before)
        .iter()
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect();
    s.write_document(DocumentWrite {
        document_id: id,
        meta: m.clone(),
        create: false,
        data: DocumentData::Chunk(bytes),
        heads: doc.get_heads(),
        audit,
    })
    .await
    .expect("write chunk")
}

fn load(stored: &StoredDocument) -> automerge::Automerge {
    let mut doc = match &stored.snapshot {
        Some(bytes) => automerge::Automerge::load(bytes).expect("load snapshot"),
        None => automerge::Automerge::new(),
    };
    for chunk in &stored.chunks {
        doc.load_incremental(chunk).expect("load chunk");
    }
    doc
}

fn event(
    w: &World,
    doc: DocumentId,
    patient: &PatientId,
    action: AuditAction,
    at_ms: i64,
) -> AuditEvent {
    AuditEvent {
        at_ms,
        agency_id: w.agency.clone(),
        user_id: w.nurse.clone(),
        device_id: DeviceId::new("dev_1"),
        document_id: doc,
        patient_id: Some(patient.clone()),
        action,
        heads: vec![ChangeHash([7; 32])],
    }
}

// ---------------------------------------------------------------------------------------------

async fn storage_id_is_stable_and_sequence_starts_at_zero(s: &dyn Storage) {
    let id = s.storage_id().await.expect("storage id");
    assert!(!id.as_str().is_empty());
    assert_eq!(s.storage_id().await.expect("storage id"), id);
    assert_eq!(s.current_seq().await.expect("seq"), 0);
}

async fn agencies_and_users_round_trip_and_refuse_duplicates_and_orphans(s: &dyn Storage) {
    let a = Agency {
        id: AgencyId::random(),
        name: "Riverside".into(),
        created_at: 5,
    };
    s.insert_agency(a.clone()).await.expect("insert");
    assert_eq!(s.agency(a.id.clone()).await.expect("get"), Some(a.clone()));
    assert!(matches!(
        s.insert_agency(a.clone()).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(s.agency(AgencyId::random()).await.expect("get"), None);

    let u = User {
        id: UserId::random(),
        agency_id: a.id.clone(),
        name: "Maria".into(),
        role: Role::Office,
        created_at: 6,
    };
    s.insert_user(u.clone()).await.expect("insert user");
    assert_eq!(s.user(u.id.clone()).await.expect("get"), Some(u.clone()));
    assert!(matches!(
        s.insert_user(u.clone()).await,
        Err(Error::Conflict(_))
    ));
    let orphan = User {
        id: UserId::random(),
        agency_id: AgencyId::random(),
        ..u
    };
    assert!(matches!(
        s.insert_user(orphan).await,
        Err(Error::NotFound("agency"))
    ));
}

async fn a_patient_is_stored_with_its_chart_in_one_write(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, chart) = patient(s, &w.agency).await;
    let p = s.patient(pid.clone()).await.expect("get").expect("exists");
    assert_eq!(
        (p.agency_id.clone(), p.chart_document_id),
        (w.agency.clone(), chart)
    );
    let stored = s
        .load_document(chart)
        .await
        .expect("load")
        .expect("chart stored");
    assert_eq!(stored.meta, meta(&w.agency, &pid, "patient"));
    assert_eq!(load(&stored).get_heads(), stored.heads);
    assert_eq!(stored.seq, 1);

    // A patient for a missing agency stores nothing, chart included.
    let ghost_chart = DocumentId::random();
    let ghost = PatientId::random();
    let orphan_agency = AgencyId::random();
    let mut doc = doc_with(&orphan_agency, &ghost, "patient");
    let err = s
        .insert_patient(
            Patient {
                id: ghost.clone(),
                agency_id: orphan_agency.clone(),
                chart_document_id: ghost_chart,
                created_at: 1,
            },
            create(
                ghost_chart,
                &mut doc,
                meta(&orphan_agency, &ghost, "patient"),
            ),
        )
        .await;
    assert!(matches!(err, Err(Error::NotFound("agency"))), "{err:?}");
    assert_eq!(s.load_document(ghost_chart).await.expect("load"), None);
    assert_eq!(s.patient(ghost).await.expect("get"), None);
}

async fn document_writes_append_chunks_compact_to_snapshots_and_reload_in_automerge(
    s: &dyn Storage,
) {
    let w = world(s).await;
    let (pid, _) = patient(s, &w.agency).await;
    let (id, mut doc) = store_doc(s, &w.agency, &pid).await;
    let m = meta(&w.agency, &pid, "visit-note");
    let mut last = 0;
    for _ in 0..3 {
        let seq = edit(s, id, &mut doc, &m, None).await;
        assert!(seq > last, "every write takes a new sequence position");
        last = seq;
    }
    let stored = s.load_document(id).await.expect("load").expect("exists");
    assert_eq!(stored.chunks.len(), 3);
    assert!(stored.snapshot.is_some());
    assert_eq!(stored.heads, doc.get_heads());
    assert_eq!(stored.seq, last);
    assert_eq!(load(&stored).get_heads(), doc.get_heads());

    // Compaction: a snapshot write replaces the chunks in the same write.
    s.write_document(DocumentWrite {
        document_id: id,
        meta: m.clone(),
        create: false,
        data: DocumentData::Snapshot(doc.save()),
        heads: doc.get_heads(),
        audit: None,
    })
    .await
    .expect("compact");
    let compacted = s.load_document(id).await.expect("load").expect("exists");
    assert!(compacted.chunks.is_empty());
    assert_eq!(load(&compacted).get_heads(), doc.get_heads());
    assert_eq!(s.current_seq().await.expect("seq"), compacted.seq);
}

async fn document_writes_check_existence_and_ownership(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, _) = patient(s, &w.agency).await;
    let (id, mut doc) = store_doc(s, &w.agency, &pid).await;
    let m = meta(&w.agency, &pid, "visit-note");
    let again = s.write_document(create(id, &mut doc, m.clone())).await;
    assert!(matches!(again, Err(Error::Conflict(_))), "{again:?}");

    let missing = DocumentWrite {
        document_id: DocumentId::random(),
        create: false,
        ..create(id, &mut doc, m.clone())
    };
    assert!(matches!(
        s.write_document(missing).await,
        Err(Error::NotFound("document"))
    ));

    let moved = DocumentWrite {
        create: false,
        ..create(id, &mut doc, meta(&w.other_agency, &pid, "visit-note"))
    };
    assert!(matches!(
        s.write_document(moved).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        s.load_document(id)
            .await
            .expect("load")
            .expect("exists")
            .meta,
        m
    );
}

async fn care_team_assignment_is_idempotent_and_takes_a_sequence_position(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, _) = patient(s, &w.agency).await;
    assert!(
        !s.on_care_team(w.nurse.clone(), pid.clone())
            .await
            .expect("check")
    );
    let seq = s
        .assign(w.nurse.clone(), pid.clone(), 10)
        .await
        .expect("assign");
    assert_eq!(seq, s.current_seq().await.expect("seq"));
    assert!(
        s.on_care_team(w.nurse.clone(), pid.clone())
            .await
            .expect("check")
    );
    assert_eq!(
        s.assign(w.nurse.clone(), pid.clone(), 11)
            .await
            .expect("assign again"),
        seq
    );
    assert!(
        !s.on_care_team(w.office.clone(), pid.clone())
            .await
            .expect("check")
    );
    assert!(matches!(
        s.assign(UserId::random(), pid.clone(), 1).await,
        Err(Error::NotFound("user"))
    ));
    assert!(matches!(
        s.assign(w.nurse.clone(), PatientId::random(), 1).await,
        Err(Error::NotFound("patient"))
    ));
    assert!(
        s.unassign(w.nurse.clone(), pid.clone())
            .await
            .expect("unassign")
    );
    assert!(
        !s.unassign(w.nurse.clone(), pid.clone())
            .await
            .expect("unassign again")
    );
    assert!(!s.on_care_team(w.nurse.clone(), pid).await.expect("check"));
}

async fn devices_are_found_by_token_hash_and_revocations_are_sequenced(s: &dyn Storage) {
    let w = world(s).await;
    let device = Device {
        id: DeviceId::random(),
        user_id: w.nurse.clone(),
        name: "phone".into(),
        token_hash: [1; 32],
        created_at: 1,
        expires_at: 100,
        revoked_at: None,
    };
    s.insert_device(device.clone()).await.expect("insert");
    let clash = Device {
        id: DeviceId::random(),
        ..device.clone()
    };
    assert!(
        matches!(s.insert_device(clash).await, Err(Error::Conflict(_))),
        "token hashes are unique"
    );
    let orphan = Device {
        id: DeviceId::random(),
        user_id: UserId::random(),
        token_hash: [2; 32],
        ..device.clone()
    };
    assert!(matches!(
        s.insert_device(orphan).await,
        Err(Error::NotFound("user"))
    ));

    let (found, owner) = s
        .device_by_token_hash([1; 32])
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!((found, owner.id), (device.clone(), w.nurse.clone()));
    assert_eq!(s.device_by_token_hash([9; 32]).await.expect("lookup"), None);

    let before = s.current_seq().await.expect("seq");
    assert!(
        s.revoke_device(device.id.clone(), 50)
            .await
            .expect("revoke")
    );
    assert!(
        !s.revoke_device(device.id.clone(), 51)
            .await
            .expect("revoke again")
    );
    assert!(matches!(
        s.revoke_device(DeviceId::random(), 1).await,
        Err(Error::NotFound("device"))
    ));
    let revoked = s.revoked_devices_since(before).await.expect("since");
    assert_eq!(revoked, vec![(device.id.clone(), before + 1)]);
    assert!(
        s.revoked_devices_since(before + 1)
            .await
            .expect("since")
            .is_empty()
    );
    assert_eq!(
        s.device(device.id)
            .await
            .expect("get")
            .expect("exists")
            .revoked_at,
        Some(50)
    );
}

async fn sync_states_are_kept_per_user_peer_and_document(s: &dyn Storage) {
    let w = world(s).await;
    let peer = PeerKey {
        user_id: w.nurse.clone(),
        storage_id: StorageId::new("phone-storage".into()),
    };
    let other_user = PeerKey {
        user_id: w.office.clone(),
        ..peer.clone()
    };
    let (a, b) = (DocumentId::random(), DocumentId::random());
    s.save_sync_states(peer.clone(), vec![(a, vec![1]), (b, vec![2])])
        .await
        .expect("save");
    s.save_sync_states(peer.clone(), vec![(a, vec![3])])
        .await
        .expect("overwrite");
    assert_eq!(
        s.load_sync_state(peer.clone(), a).await.expect("load"),
        Some(vec![3])
    );
    assert_eq!(
        s.load_sync_state(peer.clone(), b).await.expect("load"),
        Some(vec![2])
    );
    assert_eq!(s.load_sync_state(other_user, a).await.expect("load"), None);
    assert_eq!(
        s.load_sync_state(peer, DocumentId::random())
            .await
            .expect("load"),
        None
    );
}

async fn collect_feed(
    s: &dyn Storage,
    scope: FeedScope,
    after: FeedCursor,
    limit: usize,
) -> (Vec<FeedEntry>, FeedCursor) {
    let mut out = Vec::new();
    let mut cursor = after;
    for _ in 0..1000 {
        let page = s
            .changes(FeedQuery {
                scope: scope.clone(),
                after: cursor,
                limit,
            })
            .await
            .expect("feed");
        assert!(page.entries.len() <= limit);
        if let Some(last) = page.entries.last() {
            cursor = FeedCursor {
                seq: last.seq,
                document_id: Some(last.document_id),
            };
        }
        out.extend(page.entries);
        if !page.more {
            return (out, cursor);
        }
    }
    panic!("feed did not end");
}

async fn agency_feed_pages_in_sequence_order_and_sees_only_its_agency(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, chart) = patient(s, &w.agency).await;
    let (other_pid, _) = patient(s, &w.other_agency).await;
    let mut docs = vec![chart];
    for _ in 0..4 {
        docs.push(store_doc(s, &w.agency, &pid).await.0);
    }
    store_doc(s, &w.other_agency, &other_pid).await;
    let scope = FeedScope::Agency(w.agency.clone());
    let (all, cursor) = collect_feed(s, scope.clone(), FeedCursor::default(), 2).await;
    assert_eq!(
        all.iter().map(|e| e.document_id).collect::<Vec<_>>(),
        docs,
        "whole agency, in write order"
    );
    assert!(all.windows(2).all(|p| p[0].seq < p[1].seq));
    assert!(all.iter().all(|e| e.meta.agency_id == w.agency));

    // Edit two documents: exactly those follow the cursor, in edit order.
    let m = meta(&w.agency, &pid, "visit-note");
    for id in [docs[3], docs[1]] {
        let mut doc = AutoCommit::load(
            &s.load_document(id)
                .await
                .expect("load")
                .expect("exists")
                .snapshot
                .expect("snapshot"),
        )
        .expect("load doc");
        edit(s, id, &mut doc, &m, None).await;
    }
    let (changed, _) = collect_feed(s, scope, cursor, 10).await;
    assert_eq!(
        changed.iter().map(|e| e.document_id).collect::<Vec<_>>(),
        vec![docs[3], docs[1]]
    );
    let stored = s
        .load_document(docs[1])
        .await
        .expect("load")
        .expect("exists");
    assert_eq!(
        (changed[1].heads.clone(), changed[1].seq),
        (stored.heads, stored.seq)
    );
}

async fn care_team_feed_shows_a_new_assignment_after_the_cursor_and_pages_within_one_seq(
    s: &dyn Storage,
) {
    let w = world(s).await;
    let (mine, _) = patient(s, &w.agency).await;
    let (later, later_chart) = patient(s, &w.agency).await;
    s.assign(w.nurse.clone(), mine.clone(), 1)
        .await
        .expect("assign");
    let mut later_docs = vec![later_chart];
    for _ in 0..4 {
        store_doc(s, &w.agency, &mine).await;
        later_docs.push(store_doc(s, &w.agency, &later).await.0);
    }
    let scope = FeedScope::CareTeam {
        agency_id: w.agency.clone(),
        user_id: w.nurse.clone(),
    };
    let (first, cursor) = collect_feed(s, scope.clone(), FeedCursor::default(), 3).await;
    assert_eq!(
        first.len(),
        5,
        "the chart and four notes of the assigned patient"
    );
    assert!(first.iter().all(|e| e.meta.patient_id == mine));

    // Assigning another patient puts all of its (older) documents after the cursor, sharing the
    // assignment's seq; pages of 2 must still return each exactly once.
    let seq = s
        .assign(w.nurse.clone(), later.clone(), 2)
        .await
        .expect("assign");
    let (added, _) = collect_feed(s, scope.clone(), cursor, 2).await;
    let mut ids: Vec<_> = added.iter().map(|e| e.document_id).collect();
    assert!(added.iter().all(|e| e.seq == seq));
    ids.sort();
    later_docs.sort();
    assert_eq!(ids, later_docs);

    // Another agency's user with the same role sees none of it.
    let stranger = user(s, &w.other_agency, Role::Clinician).await;
    let (none, _) = collect_feed(
        s,
        FeedScope::CareTeam {
            agency_id: w.other_agency.clone(),
            user_id: stranger,
        },
        FeedCursor::default(),
        10,
    )
    .await;
    assert!(none.is_empty());
}

async fn audit_rows_are_appended_with_writes_and_queried_by_patient_user_and_time(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, chart) = patient(s, &w.agency).await;
    let (other, _) = patient(s, &w.agency).await;
    let (id, mut doc) = store_doc(s, &w.agency, &pid).await;
    let m = meta(&w.agency, &pid, "visit-note");
    edit(
        s,
        id,
        &mut doc,
        &m,
        Some(event(&w, id, &pid, AuditAction::Write, 200)),
    )
    .await;
    s.append_audit(vec![
        event(&w, chart, &pid, AuditAction::Read, 100),
        AuditEvent {
            user_id: w.office.clone(),
            ..event(&w, id, &pid, AuditAction::Deny, 300)
        },
        event(&w, id, &other, AuditAction::Read, 400),
    ])
    .await
    .expect("append");

    let q = |patient: Option<&PatientId>, user: Option<&UserId>, from_ms, to_ms| AuditQuery {
        patient_id: patient.cloned(),
        user_id: user.cloned(),
        from_ms,
        to_ms,
        limit: 100,
    };
    let actions = |rows: Vec<AuditRecord>| {
        rows.into_iter()
            .map(|r| (r.event.action, r.event.at_ms))
            .collect::<Vec<_>>()
    };
    let by_patient = s
        .query_audit(q(Some(&pid), None, 0, 1000))
        .await
        .expect("query");
    assert_eq!(
        actions(by_patient.clone()),
        vec![
            (AuditAction::Read, 100),
            (AuditAction::Write, 200),
            (AuditAction::Deny, 300)
        ]
    );
    assert_eq!(
        by_patient[1].event,
        event(&w, id, &pid, AuditAction::Write, 200)
    );
    assert_eq!(
        actions(
            s.query_audit(q(None, Some(&w.nurse), 0, 1000))
                .await
                .expect("query")
        ),
        vec![
            (AuditAction::Read, 100),
            (AuditAction::Write, 200),
            (AuditAction::Read, 400)
        ]
    );
    assert_eq!(
        actions(
            s.query_audit(q(Some(&pid), Some(&w.office), 0, 1000))
                .await
                .expect("query")
        ),
        vec![(AuditAction::Deny, 300)]
    );
    assert_eq!(
        actions(s.query_audit(q(None, None, 200, 400)).await.expect("query")),
        vec![(AuditAction::Write, 200), (AuditAction::Deny, 300)],
        "from inclusive, to exclusive"
    );
    let limited = s
        .query_audit(AuditQuery {
            limit: 1,
            ..q(None, None, 0, 1000)
        })
        .await
        .expect("query");
    assert_eq!(actions(limited), vec![(AuditAction::Read, 100)]);
}

async fn a_document_row_names_its_owner_and_stored_size_without_loading(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, _) = patient(s, &w.agency).await;
    assert_eq!(
        s.document_row(DocumentId::random()).await.expect("row"),
        None
    );
    let (id, mut doc) = store_doc(s, &w.agency, &pid).await;
    let m = meta(&w.agency, &pid, "visit-note");
    edit(s, id, &mut doc, &m, None).await;
    let row = s.document_row(id).await.expect("row").expect("exists");
    assert_eq!(row.meta, m);
    let stored = s.load_document(id).await.expect("load").expect("exists");
    let expected = stored.snapshot.as_ref().map_or(0, Vec::len)
        + stored.chunks.iter().map(Vec::len).sum::<usize>();
    assert_eq!(row.stored_bytes, expected as u64);
    assert_eq!(row.heads, doc.get_heads());
    assert!(!stored.chunks.is_empty(), "the size counts chunks too");
}

/// `document_rows` and `load_documents` (a batch fetch's reads): one answer per id, in the
/// order asked, each what the single read gives; unknown ids are `None` in their place.
async fn batch_reads_answer_in_the_order_asked_as_single_reads_do(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, chart) = patient(s, &w.agency).await;
    let (a, mut doc) = store_doc(s, &w.agency, &pid).await;
    edit(s, a, &mut doc, &meta(&w.agency, &pid, "visit-note"), None).await;
    let (b, _) = store_doc(s, &w.agency, &pid).await;
    let ghost = DocumentId::random();
    let asked = vec![b, ghost, chart, a, DocumentId::random()];

    let rows = s.document_rows(asked.clone()).await.expect("rows");
    let docs = s.load_documents(asked.clone()).await.expect("docs");
    assert_eq!(rows.len(), asked.len());
    assert_eq!(docs.len(), asked.len());
    for (i, id) in asked.iter().enumerate() {
        assert_eq!(rows[i], s.document_row(*id).await.expect("row"), "row {i}");
        assert_eq!(docs[i], s.load_document(*id).await.expect("doc"), "doc {i}");
    }
    assert!(
        rows[1].is_none() && docs[4].is_none(),
        "unknown ids in their place"
    );
    assert!(docs[3].as_ref().is_some_and(|d| !d.chunks.is_empty()));
    assert!(s.document_rows(Vec::new()).await.expect("none").is_empty());
    assert!(s.load_documents(Vec::new()).await.expect("none").is_empty());
}

// --- administration, enrollment, offboarding ------------------------------------------------

fn admin_event(agency: &AgencyId, action: &str, target: &str) -> AdminEvent {
    AdminEvent {
        at_ms: 5,
        agency_id: Some(agency.clone()),
        actor: "cli:test".into(),
        actor_device_id: None,
        source: "cli".into(),
        remote_addr: None,
        action: action.into(),
        target: target.into(),
        details: "{}".into(),
    }
}

async fn log(s: &dyn Storage, agency: &AgencyId) -> Vec<AdminRecord> {
    s.admin_log(AdminLogQuery {
        agency_id: Some(agency.clone()),
        target: None,
        actor: None,
        after_id: 0,
        limit: 1_000,
    })
    .await
    .expect("admin log")
}

fn bare_device(user: &UserId, hash: u8) -> Device {
    Device {
        id: DeviceId::random(),
        user_id: user.clone(),
        name: "phone".into(),
        token_hash: [hash; 32],
        created_at: 1,
        expires_at: i64::MAX,
        revoked_at: None,
    }
}

async fn admin_changes_and_their_log_rows_commit_together(s: &dyn Storage) {
    let w = world(s).await;
    let user = User {
        id: UserId::random(),
        agency_id: w.agency.clone(),
        name: "New".into(),
        role: Role::Office,
        created_at: 2,
    };
    s.admin_change(
        AdminChange::InsertUser(user.clone()),
        admin_event(&w.agency, "create-user", user.id.as_str()),
    )
    .await
    .expect("create");
    assert_eq!(
        s.user(user.id.clone()).await.expect("get"),
        Some(user.clone())
    );
    // A change that fails leaves no row.
    assert!(matches!(
        s.admin_change(
            AdminChange::InsertUser(user.clone()),
            admin_event(&w.agency, "create-user", "dup"),
        )
        .await,
        Err(Error::Conflict(_))
    ));
    let device = bare_device(&user.id, 3);
    s.admin_change(
        AdminChange::InsertDevice {
            device: device.clone(),
            issued_by: "usr_admin".into(),
        },
        admin_event(&w.agency, "issue-token", device.id.as_str()),
    )
    .await
    .expect("device");
    let rows = log(s, &w.agency).await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.event.action.as_str(), r.event.target.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("create-user", user.id.as_str()),
            ("issue-token", device.id.as_str())
        ]
    );
    assert!(rows[0].id < rows[1].id);
    assert_eq!(
        rows[0].event,
        admin_event(&w.agency, "create-user", user.id.as_str())
    );
    let after_first = s
        .admin_log(AdminLogQuery {
            agency_id: None,
            target: None,
            actor: Some("cli:test".into()),
            after_id: rows[0].id,
            limit: 10,
        })
        .await
        .expect("page");
    assert_eq!(after_first, rows[1..].to_vec());
    let devices = s.user_devices(user.id.clone()).await.expect("devices");
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].enrolled_by.as_deref(), Some("usr_admin"));
    assert_eq!(devices[0].public_key, None);
    assert_eq!(devices[0].last_seen_at, None);
    s.touch_device(device.id.clone(), 1_000_000)
        .await
        .expect("touch");
    let devices = s.user_devices(user.id.clone()).await.expect("devices");
    assert_eq!(devices[0].last_seen_at, Some(1_000_000));
    assert_eq!(
        s.device_key(device.id).await.expect("key"),
        None,
        "no key, no entry"
    );
}

fn redemption(code: &str, key: u8, token: u8, at_ms: i64) -> Redemption {
    Redemption {
        code_hash: crate::auth::hash_secret(code),
        device_id: DeviceId::random(),
        device_name: None,
        token_hash: [token; 32],
        public_key: [key; 32],
        at_ms,
        token_expires_at: at_ms + 1_000_000,
        remote_addr: Some("127.0.0.1:1".into()),
    }
}

async fn issue_code(s: &dyn Storage, w: &World, code: &str, expires_at: i64) {
    s.admin_change(
        AdminChange::InsertEnrollmentCode(EnrollmentCode {
            code_hash: crate::auth::hash_secret(code),
            user_id: w.nurse.clone(),
            device_name: "phone".into(),
            created_at: 10,
            expires_at,
            created_by: "usr_admin".into(),
        }),
        admin_event(&w.agency, "enroll", w.nurse.as_str()),
    )
    .await
    .expect("code");
}

async fn enrollment_codes_are_consumed_once_and_bind_a_key(s: &dyn Storage) {
    let w = world(s).await;
    issue_code(s, &w, "fce_a", 1_000).await;
    issue_code(s, &w, "fce_old", 100).await;
    let (device, user) = s
        .redeem_enrollment(redemption("fce_a", 7, 70, 500))
        .await
        .expect("redeem");
    assert_eq!(
        (user.id.clone(), device.name.as_str()),
        (w.nurse.clone(), "phone")
    );
    assert!(matches!(
        s.redeem_enrollment(redemption("fce_a", 8, 71, 501)).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        s.redeem_enrollment(redemption("fce_old", 8, 72, 501)).await,
        Err(Error::Expired(_))
    ));
    assert!(matches!(
        s.redeem_enrollment(redemption("fce_none", 8, 73, 501))
            .await,
        Err(Error::NotFound(_))
    ));
    let devices = s.user_devices(w.nurse.clone()).await.expect("devices");
    assert_eq!(devices.len(), 1, "failed redemptions create nothing");
    assert_eq!(devices[0].public_key, Some([7; 32]));
    assert_eq!(devices[0].enrolled_by.as_deref(), Some("usr_admin"));
    let key = s
        .device_key(device.id.clone())
        .await
        .expect("key")
        .expect("exists");
    assert_eq!(
        key,
        DeviceKey {
            device_id: device.id.clone(),
            user_id: w.nurse.clone(),
            agency_id: w.agency.clone(),
            role: Role::Clinician,
            public_key: [7; 32],
            enrolled_at_ms: 500,
            revoked_at_ms: None,
        }
    );
    assert_eq!(
        s.agency_device_keys(w.agency.clone()).await.expect("keys"),
        vec![key.clone()]
    );
    assert!(
        s.agency_device_keys(w.other_agency.clone())
            .await
            .expect("keys")
            .is_empty()
    );
    let rows = log(s, &w.agency).await;
    let last = rows.last().expect("rows");
    assert_eq!(
        (
            last.event.action.as_str(),
            last.event.actor.as_str(),
            last.event.target.as_str()
        ),
        ("enroll-device", w.nurse.as_str(), device.id.as_str())
    );
    s.revoke_device(device.id.clone(), 600)
        .await
        .expect("revoke");
    assert_eq!(
        s.device_key(device.id)
            .await
            .expect("key")
            .map(|k| k.revoked_at_ms),
        Some(Some(600))
    );
}

async fn disabling_a_user_revokes_every_device_at_a_sequence_position(s: &dyn Storage) {
    let w = world(s).await;
    let a = bare_device(&w.nurse, 11);
    let b = bare_device(&w.nurse, 12);
    for d in [&a, &b] {
        s.insert_device(d.clone()).await.expect("device");
    }
    s.revoke_device(a.id.clone(), 5).await.expect("revoke one");
    issue_code(s, &w, "fce_pending", i64::MAX).await;
    let before = s.current_seq().await.expect("seq");
    let outcome = s
        .admin_change(
            AdminChange::DisableUser {
                user_id: w.nurse.clone(),
                at_ms: 50,
            },
            admin_event(&w.agency, "disable-user", w.nurse.as_str()),
        )
        .await
        .expect("disable");
    assert_eq!(outcome, AdminOutcome::Revoked(vec![b.id.clone()]));
    assert_eq!(
        s.user_disabled_at(w.nurse.clone()).await.expect("get"),
        Some(50)
    );
    assert_eq!(
        s.user_disabled_at(w.office.clone()).await.expect("get"),
        None
    );
    let revoked = s.revoked_devices_since(before).await.expect("since");
    assert_eq!(
        revoked.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        vec![b.id.clone()]
    );
    // Nothing new for a disabled user: no device, no code, and a pending code is dead.
    assert!(matches!(
        s.admin_change(
            AdminChange::InsertDevice {
                device: bare_device(&w.nurse, 13),
                issued_by: "x".into()
            },
            admin_event(&w.agency, "issue-token", "x"),
        )
        .await,
        Err(Error::Forbidden(_))
    ));
    assert!(matches!(
        s.redeem_enrollment(redemption("fce_pending", 1, 14, 60))
            .await,
        Err(Error::Expired(_) | Error::Forbidden(_))
    ));
    assert_eq!(
        s.user_devices(w.nurse.clone())
            .await
            .expect("devices")
            .len(),
        2
    );
    // Idempotent.
    assert_eq!(
        s.admin_change(
            AdminChange::DisableUser {
                user_id: w.nurse.clone(),
                at_ms: 70
            },
            admin_event(&w.agency, "disable-user", w.nurse.as_str()),
        )
        .await
        .expect("again"),
        AdminOutcome::Revoked(vec![])
    );
    assert_eq!(
        s.user_disabled_at(w.nurse.clone()).await.expect("get"),
        Some(50)
    );
}

async fn audit_pages_resume_after_a_cursor(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, chart) = patient(s, &w.agency).await;
    let events: Vec<AuditEvent> = (0..7)
        .map(|i| event(&w, chart, &pid, AuditAction::Read, 100 + i / 3))
        .collect();
    s.append_audit(events).await.expect("append");
    let q = AuditQuery {
        patient_id: Some(pid.clone()),
        user_id: None,
        from_ms: 0,
        to_ms: 1_000,
        limit: 3,
    };
    let mut all = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = s.audit_page(q.clone(), after).await.expect("page");
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| (r.event.at_ms, r.id));
        all.extend(page);
    }
    assert_eq!(all.len(), 7);
    assert_eq!(
        all,
        s.query_audit(AuditQuery { limit: 100, ..q })
            .await
            .expect("all")
    );
}

async fn a_write_on_heads_that_are_no_longer_stored_is_refused_and_stores_nothing(s: &dyn Storage) {
    let w = world(s).await;
    let (pid, _) = patient(s, &w.agency).await;
    let (id, mut doc) = store_doc(s, &w.agency, &pid).await;
    let m = meta(&w.agency, &pid, "visit-note");
    let base = doc.get_heads();
    // Another writer's copy, forked before the first edit below.
    let mut other = doc.fork();
    edit(s, id, &mut doc, &m, None).await;
    let stored = s.load_document(id).await.expect("load").expect("exists");
    let seq = s.current_seq().await.expect("seq");

    other.put(ROOT, "other", 1).expect("put");
    other.commit();
    let bytes: Vec<u8> = other
        .get_changes(&base)
        .iter()
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect();
    let stale = DocumentWrite {
        document_id: id,
        meta: m.clone(),
        create: false,
        data: DocumentData::Chunk(bytes.clone()),
        heads: other.get_heads(),
        audit: Some(event(&w, id, &pid, AuditAction::Write, 5)),
    };
    let refused = s.write_document_on(stale.clone(), base.clone()).await;
    assert!(matches!(refused, Err(Error::Stale(_))), "{refused:?}");
    assert_eq!(
        s.load_document(id).await.expect("load").expect("exists"),
        stored,
        "nothing of a refused write is stored"
    );
    assert_eq!(s.current_seq().await.expect("seq"), seq);
    assert!(
        s.query_audit(AuditQuery {
            patient_id: Some(pid.clone()),
            user_id: None,
            from_ms: 0,
            to_ms: i64::MAX,
            limit: 100,
        })
        .await
        .expect("audit")
        .is_empty(),
        "nor its audit row"
    );

    // Rebased on what is stored, the same change is accepted, and both edits survive.
    let mut merged = load(&stored);
    merged
        .merge(&mut automerge::Automerge::load(&other.save()).expect("load"))
        .expect("merge");
    let accepted = DocumentWrite {
        heads: merged.get_heads(),
        ..stale
    };
    let seq = s
        .write_document_on(accepted, stored.heads.clone())
        .await
        .expect("rebased write");
    let now = s.load_document(id).await.expect("load").expect("exists");
    assert_eq!(now.seq, seq);
    assert_eq!(now.heads, merged.get_heads());
    let reloaded = load(&now);
    assert_eq!(reloaded.get_heads(), merged.get_heads());
    assert!(reloaded.get(ROOT, "edited").expect("get").is_some());
    assert!(reloaded.get(ROOT, "other").expect("get").is_some());
}
