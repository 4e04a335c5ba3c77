//! The embedded SQLite backend: one file in the data directory, nothing else to install.
//!
//! - WAL with `synchronous=FULL`: a committed transaction survives power loss, which is what
//!   lets the relay acknowledge a sync only after its commit returns.
//! - Exactly one writer connection (SQLite has one writer anyway; queuing here instead of on
//!   the file lock keeps `SQLITE_BUSY` out of the relay), plus a few reader connections so that
//!   access checks and the change feed do not wait behind a write's fsync.
//! - Every call runs on tokio's blocking pool; the connection mutexes are std mutexes held only
//!   inside that blocking closure, never across an `.await`.
//! - `busy_timeout` lets the admin CLI write to the same file while `serve` runs.
//! - Schema: a migration ladder over `PRAGMA user_version`; a file newer than this build is
//!   refused rather than misread.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fieldchart_core::protocol::{DocumentId, StorageId};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{
    AuditAction, AuditEvent, AuditQuery, AuditRecord, DocMeta, DocumentData, DocumentRow,
    DocumentWrite, FeedEntry, FeedPage, FeedQuery, FeedScope, PeerKey, Seq, Storage, StorageFuture,
    StoredDocument, heads_from_bytes, heads_to_bytes,
};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::identity::{
    Agency, AgencyId, Device, DeviceId, Patient, PatientId, User, UserId, parse_role,
};

/// Schema version this build writes; see `server/migrations/`.
pub const SCHEMA_VERSION: u32 = 1;

/// Reader connections (besides the one writer).
const READER_CONNECTIONS: usize = 4;

/// How long a statement waits for another process (the admin CLI) to release the file lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migration `n` takes the schema from version `n` to `n + 1`.
fn migrate_step(tx: &Transaction<'_>, from_version: u32) -> Result<()> {
    match from_version {
        0 => tx.execute_batch(include_str!("../../migrations/001_initial.sql"))?,
        other => {
            return Err(Error::Storage(format!(
                "no migration from schema version {other}"
            )));
        }
    }
    Ok(())
}

/// The SQLite backend. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct SqliteStorage {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl std::fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStorage {
    /// Open (creating if needed) the database at `path` and bring its schema up to date.
    /// Blocking: call it before serving, or from a blocking task.
    pub fn open(path: &Path) -> Result<SqliteStorage> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut writer = open_connection(path)?;
        // WAL is a property of the file: set once, by the writer.
        let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Storage(format!(
                "cannot enable WAL (journal_mode is {mode})"
            )));
        }
        migrate(&mut writer)?;
        let tx = writer.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO relay_meta (key, value) VALUES ('storage_id', ?1)",
            [format!(
                "fieldchart-relay-{}",
                crate::identity::random_hex::<16>()
            )],
        )?;
        tx.commit()?;
        let readers = (0..READER_CONNECTIONS)
            .map(|_| open_connection(path).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(SqliteStorage {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Run `f` in a read transaction on a reader connection, on the blocking pool.
    fn read<T, F>(&self, f: F) -> StorageFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let i = inner.next_reader.fetch_add(1, Ordering::Relaxed) % inner.readers.len();
                let mut conn = inner.readers[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            })
            .await?
        })
    }

    /// Run `f` in a write transaction on the writer connection, on the blocking pool. The
    /// transaction commits (durably) before the future resolves; any error rolls it back.
    fn write<T, F>(&self, f: F) -> StorageFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = inner.writer.lock().unwrap_or_else(PoisonError::into_inner);
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            })
            .await?
        })
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Acknowledged data must survive power loss (DESIGN §4): fsync the WAL on every commit.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn schema_version(conn: &Connection) -> Result<u32> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    // Checked outside and inside the transaction: another process may be migrating right now.
    let check = |version: u32| {
        if version > SCHEMA_VERSION {
            Err(Error::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            })
        } else {
            Ok(version)
        }
    };
    if check(schema_version(conn)?)? == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let from = check(schema_version(&tx)?)?;
    for version in from..SCHEMA_VERSION {
        migrate_step(&tx, version)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

fn to_i64(seq: Seq) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn to_seq(v: i64) -> Result<Seq> {
    Seq::try_from(v).map_err(|_| Error::Storage(format!("negative sequence value {v}")))
}

fn doc_id_from(bytes: &[u8]) -> Result<DocumentId> {
    let array: [u8; 16] = bytes
        .try_into()
        .map_err(|_| Error::Storage(format!("stored document id of {} bytes", bytes.len())))?;
    Ok(DocumentId::from_bytes(array))
}

fn next_seq(tx: &Transaction<'_>) -> Result<Seq> {
    let v: i64 = tx.query_row(
        "UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value",
        [],
        |r| r.get(0),
    )?;
    to_seq(v)
}

fn exists(tx: &Transaction<'_>, sql: &str, id: &str) -> Result<bool> {
    Ok(tx.query_row(sql, [id], |_| Ok(())).optional()?.is_some())
}

fn user_from_row(
    (id, agency_id, name, role, created_at): (String, String, String, String, i64),
) -> Result<User> {
    let role = parse_role(&role).ok_or_else(|| Error::Storage(format!("stored role {role:?}")))?;
    Ok(User {
        id: UserId::new(id),
        agency_id: AgencyId::new(agency_id),
        name,
        role,
        created_at,
    })
}

type DeviceRow = (String, String, String, Vec<u8>, i64, i64, Option<i64>);

fn device_from_row(
    (id, user_id, name, hash, created_at, expires_at, revoked_at): DeviceRow,
) -> Result<Device> {
    let token_hash: [u8; 32] = hash
        .as_slice()
        .try_into()
        .map_err(|_| Error::Storage("stored token hash is not 32 bytes".into()))?;
    Ok(Device {
        id: DeviceId::new(id),
        user_id: UserId::new(user_id),
        name,
        token_hash,
        created_at,
        expires_at,
        revoked_at,
    })
}

fn write_document_tx(tx: &Transaction<'_>, write: &DocumentWrite) -> Result<Seq> {
    let id = write.document_id.as_bytes().as_slice();
    let stored_meta: Option<(String, String)> = tx
        .query_row(
            "SELECT agency_id, patient_id FROM documents WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match (&stored_meta, write.create) {
        (Some(_), true) => {
            return Err(Error::Conflict(format!(
                "document {} exists",
                write.document_id
            )));
        }
        (None, false) => return Err(Error::NotFound("document")),
        (Some((agency, patient)), false)
            if agency != write.meta.agency_id.as_str()
                || patient != write.meta.patient_id.as_str() =>
        {
            return Err(Error::Conflict(format!(
                "document {} belongs elsewhere",
                write.document_id
            )));
        }
        _ => {}
    }
    let seq = next_seq(tx)?;
    let now = now_ms();
    let heads = heads_to_bytes(&write.heads);
    if write.create {
        tx.execute(
            "INSERT INTO documents (id, agency_id, patient_id, kind, heads, seq, snapshot, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, ?7)",
            params![
                id,
                write.meta.agency_id.as_str(),
                write.meta.patient_id.as_str(),
                write.meta.kind,
                heads,
                to_i64(seq),
                now
            ],
        )?;
    } else {
        tx.execute(
            "UPDATE documents SET heads = ?2, seq = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, heads, to_i64(seq), now],
        )?;
    }
    match &write.data {
        DocumentData::Snapshot(bytes) => {
            tx.execute(
                "UPDATE documents SET snapshot = ?2 WHERE id = ?1",
                params![id, bytes],
            )?;
            tx.execute("DELETE FROM document_chunks WHERE document_id = ?1", [id])?;
        }
        DocumentData::Chunk(bytes) => {
            tx.execute(
                "INSERT INTO document_chunks (document_id, bytes) VALUES (?1, ?2)",
                params![id, bytes],
            )?;
        }
    }
    if let Some(event) = &write.audit {
        insert_audit(tx, event)?;
    }
    Ok(seq)
}

fn insert_audit(tx: &Transaction<'_>, e: &AuditEvent) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit_log (at, agency_id, user_id, device_id, document_id, patient_id, action, heads)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        e.at_ms,
        e.agency_id.as_str(),
        e.user_id.as_str(),
        e.device_id.as_str(),
        e.document_id.as_bytes().as_slice(),
        e.patient_id.as_ref().map(PatientId::as_str),
        e.action.as_str(),
        heads_to_bytes(&e.heads),
    ])?;
    Ok(())
}

type FeedRow = (Vec<u8>, String, String, String, Vec<u8>, i64);

fn feed_entry((id, agency_id, patient_id, kind, heads, seq): FeedRow) -> Result<FeedEntry> {
    Ok(FeedEntry {
        document_id: doc_id_from(&id)?,
        meta: DocMeta {
            agency_id: AgencyId::new(agency_id),
            patient_id: PatientId::new(patient_id),
            kind,
        },
        heads: heads_from_bytes(&heads)?,
        seq: to_seq(seq)?,
    })
}

impl Storage for SqliteStorage {
    fn storage_id(&self) -> StorageFuture<'_, StorageId> {
        self.read(|tx| {
            let id: String = tx.query_row(
                "SELECT value FROM relay_meta WHERE key = 'storage_id'",
                [],
                |r| r.get(0),
            )?;
            Ok(StorageId::new(id))
        })
    }

    fn current_seq(&self) -> StorageFuture<'_, Seq> {
        self.read(|tx| {
            to_seq(
                tx.query_row("SELECT value FROM counters WHERE name = 'seq'", [], |r| {
                    r.get(0)
                })?,
            )
        })
    }

    fn insert_agency(&self, agency: Agency) -> StorageFuture<'_, ()> {
        self.write(move |tx| {
            if exists(
                tx,
                "SELECT 1 FROM agencies WHERE id = ?1",
                agency.id.as_str(),
            )? {
                return Err(Error::Conflict(format!("agency {} exists", agency.id)));
            }
            tx.execute(
                "INSERT INTO agencies (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![agency.id.as_str(), agency.name, agency.created_at],
            )?;
            Ok(())
        })
    }

    fn agency(&self, id: AgencyId) -> StorageFuture<'_, Option<Agency>> {
        self.read(move |tx| {
            Ok(tx
                .query_row(
                    "SELECT name, created_at FROM agencies WHERE id = ?1",
                    [id.as_str()],
                    |r| {
                        Ok(Agency {
                            id: id.clone(),
                            name: r.get(0)?,
                            created_at: r.get(1)?,
                        })
                    },
                )
                .optional()?)
        })
    }

    fn insert_user(&self, user: User) -> StorageFuture<'_, ()> {
        self.write(move |tx| {
            if !exists(tx, "SELECT 1 FROM agencies WHERE id = ?1", user.agency_id.as_str())? {
                return Err(Error::NotFound("agency"));
            }
            if exists(tx, "SELECT 1 FROM users WHERE id = ?1", user.id.as_str())? {
                return Err(Error::Conflict(format!("user {} exists", user.id)));
            }
            tx.execute(
                "INSERT INTO users (id, agency_id, name, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![user.id.as_str(), user.agency_id.as_str(), user.name, user.role.as_str(), user.created_at],
            )?;
            Ok(())
        })
    }

    fn user(&self, id: UserId) -> StorageFuture<'_, Option<User>> {
        self.read(move |tx| {
            tx.query_row(
                "SELECT id, agency_id, name, role, created_at FROM users WHERE id = ?1",
                [id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?
            .map(user_from_row)
            .transpose()
        })
    }

    fn insert_patient(&self, patient: Patient, chart: DocumentWrite) -> StorageFuture<'_, Seq> {
        self.write(move |tx| {
            if !exists(tx, "SELECT 1 FROM agencies WHERE id = ?1", patient.agency_id.as_str())? {
                return Err(Error::NotFound("agency"));
            }
            if exists(tx, "SELECT 1 FROM patients WHERE id = ?1", patient.id.as_str())? {
                return Err(Error::Conflict(format!("patient {} exists", patient.id)));
            }
            tx.execute(
                "INSERT INTO patients (id, agency_id, chart_document_id, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    patient.id.as_str(),
                    patient.agency_id.as_str(),
                    patient.chart_document_id.as_bytes().as_slice(),
                    patient.created_at
                ],
            )?;
            write_document_tx(tx, &chart)
        })
    }

    fn patient(&self, id: PatientId) -> StorageFuture<'_, Option<Patient>> {
        self.read(move |tx| {
            let row: Option<(String, Vec<u8>, i64)> = tx
                .query_row(
                    "SELECT agency_id, chart_document_id, created_at FROM patients WHERE id = ?1",
                    [id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            row.map(|(agency_id, chart, created_at)| {
                Ok(Patient {
                    id: id.clone(),
                    agency_id: AgencyId::new(agency_id),
                    chart_document_id: doc_id_from(&chart)?,
                    created_at,
                })
            })
            .transpose()
        })
    }

    fn assign(&self, user_id: UserId, patient_id: PatientId, at_ms: i64) -> StorageFuture<'_, Seq> {
        self.write(move |tx| {
            if !exists(tx, "SELECT 1 FROM users WHERE id = ?1", user_id.as_str())? {
                return Err(Error::NotFound("user"));
            }
            if !exists(tx, "SELECT 1 FROM patients WHERE id = ?1", patient_id.as_str())? {
                return Err(Error::NotFound("patient"));
            }
            let existing: Option<i64> = tx
                .query_row(
                    "SELECT seq FROM care_team WHERE user_id = ?1 AND patient_id = ?2",
                    [user_id.as_str(), patient_id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(seq) = existing {
                return to_seq(seq);
            }
            let seq = next_seq(tx)?;
            tx.execute(
                "INSERT INTO care_team (user_id, patient_id, seq, assigned_at) VALUES (?1, ?2, ?3, ?4)",
                params![user_id.as_str(), patient_id.as_str(), to_i64(seq), at_ms],
            )?;
            Ok(seq)
        })
    }

    fn unassign(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.write(move |tx| {
            let n = tx.execute(
                "DELETE FROM care_team WHERE user_id = ?1 AND patient_id = ?2",
                [user_id.as_str(), patient_id.as_str()],
            )?;
            Ok(n > 0)
        })
    }

    fn on_care_team(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.read(move |tx| {
            Ok(tx
                .prepare_cached("SELECT 1 FROM care_team WHERE user_id = ?1 AND patient_id = ?2")?
                .query_row([user_id.as_str(), patient_id.as_str()], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    fn insert_device(&self, device: Device) -> StorageFuture<'_, ()> {
        self.write(move |tx| {
            if !exists(tx, "SELECT 1 FROM users WHERE id = ?1", device.user_id.as_str())? {
                return Err(Error::NotFound("user"));
            }
            let clash: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM devices WHERE id = ?1 OR token_hash = ?2",
                    params![device.id.as_str(), device.token_hash.as_slice()],
                    |r| r.get(0),
                )
                .optional()?;
            if clash.is_some() {
                return Err(Error::Conflict(format!("device {} or its token exists", device.id)));
            }
            tx.execute(
                "INSERT INTO devices (id, user_id, name, token_hash, created_at, expires_at, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    device.id.as_str(),
                    device.user_id.as_str(),
                    device.name,
                    device.token_hash.as_slice(),
                    device.created_at,
                    device.expires_at,
                    device.revoked_at
                ],
            )?;
            Ok(())
        })
    }

    fn device(&self, id: DeviceId) -> StorageFuture<'_, Option<Device>> {
        self.read(move |tx| {
            tx.query_row(
                "SELECT id, user_id, name, token_hash, created_at, expires_at, revoked_at FROM devices WHERE id = ?1",
                [id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )
            .optional()?
            .map(device_from_row)
            .transpose()
        })
    }

    fn device_by_token_hash(
        &self,
        token_hash: [u8; 32],
    ) -> StorageFuture<'_, Option<(Device, User)>> {
        self.read(move |tx| {
            let row = tx
                .prepare_cached(
                    "SELECT d.id, d.user_id, d.name, d.token_hash, d.created_at, d.expires_at, d.revoked_at,
                            u.id, u.agency_id, u.name, u.role, u.created_at
                     FROM devices d JOIN users u ON u.id = d.user_id
                     WHERE d.token_hash = ?1",
                )?
                .query_row([token_hash.as_slice()], |r| {
                    Ok((
                        (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
                        (r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?),
                    ))
                })
                .optional()?;
            row.map(|(device, user)| Ok((device_from_row(device)?, user_from_row(user)?))).transpose()
        })
    }

    fn revoke_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, bool> {
        self.write(move |tx| {
            let revoked: Option<Option<i64>> = tx
                .query_row(
                    "SELECT revoked_at FROM devices WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            match revoked {
                None => Err(Error::NotFound("device")),
                Some(Some(_)) => Ok(false),
                Some(None) => {
                    let seq = next_seq(tx)?;
                    tx.execute(
                        "UPDATE devices SET revoked_at = ?2, revoked_seq = ?3 WHERE id = ?1",
                        params![id.as_str(), at_ms, to_i64(seq)],
                    )?;
                    Ok(true)
                }
            }
        })
    }

    fn revoked_devices_since(&self, after: Seq) -> StorageFuture<'_, Vec<(DeviceId, Seq)>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT id, revoked_seq FROM devices WHERE revoked_seq > ?1 ORDER BY revoked_seq",
            )?;
            let rows = stmt.query_map([to_i64(after)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            rows.map(|row| {
                let (id, seq) = row?;
                Ok((DeviceId::new(id), to_seq(seq)?))
            })
            .collect()
        })
    }

    fn load_document(&self, id: DocumentId) -> StorageFuture<'_, Option<StoredDocument>> {
        self.read(move |tx| {
            let key = id.as_bytes().as_slice();
            type Row = (String, String, String, Vec<u8>, i64, Option<Vec<u8>>);
            let row: Option<Row> = tx
                .prepare_cached(
                    "SELECT agency_id, patient_id, kind, heads, seq, snapshot FROM documents WHERE id = ?1",
                )?
                .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
                .optional()?;
            let Some((agency_id, patient_id, kind, heads, seq, snapshot)) = row else {
                return Ok(None);
            };
            let mut stmt =
                tx.prepare_cached("SELECT bytes FROM document_chunks WHERE document_id = ?1 ORDER BY id")?;
            let chunks = stmt.query_map([key], |r| r.get(0))?.collect::<rusqlite::Result<Vec<Vec<u8>>>>()?;
            Ok(Some(StoredDocument {
                meta: DocMeta {
                    agency_id: AgencyId::new(agency_id),
                    patient_id: PatientId::new(patient_id),
                    kind,
                },
                snapshot,
                chunks,
                heads: heads_from_bytes(&heads)?,
                seq: to_seq(seq)?,
            }))
        })
    }

    fn write_document(&self, write: DocumentWrite) -> StorageFuture<'_, Seq> {
        self.write(move |tx| write_document_tx(tx, &write))
    }

    fn load_sync_state(
        &self,
        peer: PeerKey,
        document_id: DocumentId,
    ) -> StorageFuture<'_, Option<Vec<u8>>> {
        self.read(move |tx| {
            Ok(tx
                .prepare_cached(
                    "SELECT state FROM peer_sync_states WHERE user_id = ?1 AND storage_id = ?2 AND document_id = ?3",
                )?
                .query_row(
                    params![peer.user_id.as_str(), peer.storage_id.as_str(), document_id.as_bytes().as_slice()],
                    |r| r.get(0),
                )
                .optional()?)
        })
    }

    fn save_sync_states(
        &self,
        peer: PeerKey,
        states: Vec<(DocumentId, Vec<u8>)>,
    ) -> StorageFuture<'_, ()> {
        self.write(move |tx| {
            let now = now_ms();
            let mut stmt = tx.prepare_cached(
                "INSERT INTO peer_sync_states (user_id, storage_id, document_id, state, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id, storage_id, document_id) DO UPDATE SET state = excluded.state,
                     updated_at = excluded.updated_at",
            )?;
            for (document_id, state) in &states {
                stmt.execute(params![
                    peer.user_id.as_str(),
                    peer.storage_id.as_str(),
                    document_id.as_bytes().as_slice(),
                    state,
                    now
                ])?;
            }
            Ok(())
        })
    }

    fn changes(&self, query: FeedQuery) -> StorageFuture<'_, FeedPage> {
        self.read(move |tx| {
            let after_seq = to_i64(query.after.seq);
            let after_doc = query.after.document_id.map(|d| d.as_bytes().to_vec());
            let fetch = i64::try_from(query.limit.saturating_add(1)).unwrap_or(i64::MAX);
            let map_row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<FeedRow> {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            };
            // `d.id > NULL` is NULL: without a document in the cursor only larger seqs match.
            let rows: Vec<FeedRow> = match &query.scope {
                FeedScope::Agency(agency_id) => tx
                    .prepare_cached(
                        "SELECT id, agency_id, patient_id, kind, heads, seq FROM documents
                         WHERE agency_id = ?1 AND (seq > ?2 OR (seq = ?2 AND id > ?3))
                         ORDER BY seq, id LIMIT ?4",
                    )?
                    .query_map(params![agency_id.as_str(), after_seq, after_doc, fetch], map_row)?
                    .collect::<rusqlite::Result<_>>()?,
                FeedScope::CareTeam { agency_id, user_id } => tx
                    .prepare_cached(
                        "SELECT d.id, d.agency_id, d.patient_id, d.kind, d.heads, MAX(d.seq, c.seq) AS eff
                         FROM care_team c JOIN documents d ON d.patient_id = c.patient_id
                         WHERE c.user_id = ?1 AND d.agency_id = ?2
                           AND (MAX(d.seq, c.seq) > ?3 OR (MAX(d.seq, c.seq) = ?3 AND d.id > ?4))
                         ORDER BY eff, d.id LIMIT ?5",
                    )?
                    .query_map(params![user_id.as_str(), agency_id.as_str(), after_seq, after_doc, fetch], map_row)?
                    .collect::<rusqlite::Result<_>>()?,
            };
            let more = rows.len() > query.limit;
            let entries = rows.into_iter().take(query.limit).map(feed_entry).collect::<Result<Vec<_>>>()?;
            Ok(FeedPage { entries, more })
        })
    }

    fn append_audit(&self, events: Vec<AuditEvent>) -> StorageFuture<'_, ()> {
        self.write(move |tx| events.iter().try_for_each(|e| insert_audit(tx, e)))
    }

    fn query_audit(&self, query: AuditQuery) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT id, at, agency_id, user_id, device_id, document_id, patient_id, action, heads
                 FROM audit_log
                 WHERE at >= ?1 AND at < ?2
                   AND (?3 IS NULL OR patient_id = ?3) AND (?4 IS NULL OR user_id = ?4)
                 ORDER BY at, id LIMIT ?5",
            )?;
            type Row = (i64, i64, String, String, String, Vec<u8>, Option<String>, String, Vec<u8>);
            let rows = stmt.query_map(
                params![
                    query.from_ms,
                    query.to_ms,
                    query.patient_id.as_ref().map(PatientId::as_str),
                    query.user_id.as_ref().map(UserId::as_str),
                    i64::try_from(query.limit).unwrap_or(i64::MAX)
                ],
                |r| -> rusqlite::Result<Row> {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                    ))
                },
            )?;
            rows.map(|row| {
                let (id, at_ms, agency_id, user_id, device_id, document_id, patient_id, action, heads) = row?;
                Ok(AuditRecord {
                    id,
                    event: AuditEvent {
                        at_ms,
                        agency_id: AgencyId::new(agency_id),
                        user_id: UserId::new(user_id),
                        device_id: DeviceId::new(device_id),
                        document_id: doc_id_from(&document_id)?,
                        patient_id: patient_id.map(PatientId::new),
                        action: AuditAction::parse(&action)
                            .ok_or_else(|| Error::Storage(format!("stored audit action {action:?}")))?,
                        heads: heads_from_bytes(&heads)?,
                    },
                })
            })
            .collect()
        })
    }

    fn document_row(&self, id: DocumentId) -> StorageFuture<'_, Option<DocumentRow>> {
        self.read(move |tx| {
            let key = id.as_bytes().as_slice();
            type Row = (String, String, String, i64, Vec<u8>);
            let row: Option<Row> = tx
                .prepare_cached(
                    "SELECT agency_id, patient_id, kind,
                            COALESCE(length(snapshot), 0)
                            + (SELECT COALESCE(SUM(length(bytes)), 0) FROM document_chunks WHERE document_id = ?1),
                            heads
                     FROM documents WHERE id = ?1",
                )?
                .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
                .optional()?;
            let Some((agency_id, patient_id, kind, bytes, heads)) = row else {
                return Ok(None);
            };
            Ok(Some(DocumentRow {
                meta: DocMeta {
                    agency_id: AgencyId::new(agency_id),
                    patient_id: PatientId::new(patient_id),
                    kind,
                },
                stored_bytes: u64::try_from(bytes).unwrap_or(0),
                heads: heads_from_bytes(&heads)?,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_from_a_newer_relay_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.sqlite3");
        drop(SqliteStorage::open(&path).expect("fresh open"));
        let conn = Connection::open(&path).expect("raw open");
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("bump version");
        drop(conn);
        match SqliteStorage::open(&path) {
            Err(Error::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
        let conn = Connection::open(&path).expect("raw open");
        assert_eq!(schema_version(&conn).expect("version"), SCHEMA_VERSION + 1);
    }

    #[test]
    fn reopening_keeps_the_schema_and_the_storage_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.sqlite3");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let first = SqliteStorage::open(&path).expect("open");
        let id = rt.block_on(first.storage_id()).expect("storage id");
        drop(first);
        let second = SqliteStorage::open(&path).expect("reopen");
        assert_eq!(rt.block_on(second.storage_id()).expect("storage id"), id);
        let conn = Connection::open(&path).expect("raw open");
        assert_eq!(schema_version(&conn).expect("version"), SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal mode");
        assert_eq!(mode, "wal");
    }

    #[test]
    fn the_audit_log_refuses_updates_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.sqlite3");
        drop(SqliteStorage::open(&path).expect("open"));
        let conn = Connection::open(&path).expect("raw open");
        conn.execute(
            "INSERT INTO audit_log (at, agency_id, user_id, device_id, document_id, patient_id, action, heads)
             VALUES (1, 'a', 'u', 'd', x'00', NULL, 'read', x'')",
            [],
        )
        .expect("insert");
        assert!(
            conn.execute("UPDATE audit_log SET action = 'write'", [])
                .is_err()
        );
        assert!(conn.execute("DELETE FROM audit_log", []).is_err());
    }
}
