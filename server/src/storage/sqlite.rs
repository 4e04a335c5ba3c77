//! The embedded SQLite backend: one file in the data directory, nothing else to install.
//!
//! - WAL with `synchronous=FULL`: a committed transaction survives power loss, which is what
//!   lets the relay acknowledge a sync only after its commit returns.
//! - Exactly one writer connection (SQLite has one writer anyway; queuing here instead of on
//!   the file lock keeps `SQLITE_BUSY` out of the relay), owned by a writer thread that
//!   commits every write waiting at the same moment in one transaction, one fsync (group
//!   commit, see [`group`]), plus a few reader connections so that access checks and the
//!   change feed do not wait behind a write's fsync.
//! - Reads run on tokio's blocking pool; the reader mutexes are std mutexes held only inside
//!   that blocking closure, never across an `.await`.
//! - `busy_timeout` lets the admin CLI write to the same file while `serve` runs.
//! - Schema: a migration ladder over `PRAGMA user_version`; a file newer than this build is
//!   refused rather than misread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fieldchart_core::protocol::{DocumentId, StorageId};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{
    AdminChange, AdminEvent, AdminLogQuery, AdminOutcome, AdminRecord, AuditAction, AuditEvent,
    AuditQuery, AuditRecord, DeviceInfo, DeviceKey, DocMeta, DocumentData, DocumentRow,
    DocumentWrite, EnrollmentCode, FeedEntry, FeedPage, FeedQuery, FeedScope,
    LAST_SEEN_RESOLUTION_MS, PeerKey, Redemption, Seq, Storage, StorageFuture, StoredDocument,
    heads_from_bytes, heads_to_bytes,
};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::identity::{
    Agency, AgencyId, Device, DeviceId, Patient, PatientId, User, UserId, parse_role,
};

mod console;
mod group;

/// Schema version this build writes; see `server/migrations/`.
pub const SCHEMA_VERSION: u32 = 6;

/// Page size, in bytes, of a database this build creates. Every commit rewrites each page it
/// dirtied in full to the WAL (and a checkpoint copies it once more), and a note's commit
/// dirties a leaf in each of several indexes for a few dozen bytes of entries: at 1 KiB per
/// page that costs a quarter of what SQLCipher's default 4 KiB did (`fieldchart-bench storm`
/// in the README). SQLCipher reserves 80 bytes per page (IV and HMAC), 8% of 1 KiB.
const PAGE_SIZE: u32 = 1024;

/// Page size of the relay databases created before [`PAGE_SIZE`] (SQLCipher's default). They
/// keep it: a page size is fixed when the file is created.
const LEGACY_PAGE_SIZE: u32 = 4096;

/// WAL size, in bytes, past which a commit checkpoints it into the database file (SQLite's
/// default of 1,000 pages at 4 KiB; the same bytes whatever the page size).
const WAL_AUTOCHECKPOINT_BYTES: u32 = 4 * 1024 * 1024;

/// Reader connections (besides the one writer).
const READER_CONNECTIONS: usize = 4;

/// How long a statement waits for another process (the admin CLI) to release the file lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migration `n` takes the schema from version `n` to `n + 1`.
fn migrate_step(tx: &Transaction<'_>, from_version: u32) -> Result<()> {
    match from_version {
        0 => tx.execute_batch(include_str!("../../migrations/001_initial.sql"))?,
        1 => tx.execute_batch(include_str!("../../migrations/002_admin_enrollment.sql"))?,
        2 => tx.execute_batch(include_str!("../../migrations/003_audit_tamper.sql"))?,
        3 => tx.execute_batch(include_str!("../../migrations/004_console.sql"))?,
        4 => tx.execute_batch(include_str!("../../migrations/005_sync_failures.sql"))?,
        5 => tx.execute_batch(include_str!("../../migrations/006_fewer_index_writes.sql"))?,
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
    /// The one writer connection, owned by the group-commit thread.
    writer: group::GroupWriter,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    /// Last `last_seen_at` written per device by this process (see [`Storage::touch_device`]).
    last_seen: Mutex<HashMap<DeviceId, i64>>,
}

/// Devices remembered in [`Inner::last_seen`] before the map is cleared (a cleared map costs
/// one write per device, once).
const MAX_LAST_SEEN_ENTRIES: usize = 100_000;

/// The relay database's 256-bit SQLCipher key. Given raw (`x'…'`): no key derivation, which only
/// helps low-entropy passphrases.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseKey([u8; 32]);

impl DatabaseKey {
    /// Wrap raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> DatabaseKey {
        DatabaseKey(bytes)
    }

    /// Parse 64 hex digits (surrounding whitespace, e.g. a key file's newline, is ignored).
    pub fn from_hex(text: &str) -> Result<DatabaseKey> {
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                Error::BadRequest("a database key is 64 hex digits (32 bytes)".into())
            })?;
        Ok(DatabaseKey(bytes))
    }

    /// A fresh key from the operating system's random number generator.
    pub fn random() -> DatabaseKey {
        DatabaseKey(crate::identity::os_random::<32>())
    }

    /// The key as 64 hex digits (what a key file holds).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn pragma(&self, name: &str) -> String {
        format!("PRAGMA {name} = \"x'{}'\";", hex::encode(self.0))
    }
}

impl std::fmt::Debug for DatabaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseKey(<redacted>)")
    }
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
        Self::open_with(path, None)
    }

    /// Open (creating if needed) the SQLCipher-encrypted database at `path` with `key`. A wrong
    /// key (or a file that is not a relay database) is [`Error::CannotDecrypt`], and the file
    /// is left untouched. Blocking.
    pub fn open_encrypted(path: &Path, key: &DatabaseKey) -> Result<SqliteStorage> {
        Self::open_with(path, Some(key))
    }

    /// Change the key of the database at `path` from `old` to `new` (`PRAGMA rekey`: every page
    /// is re-encrypted in place). Nothing else may have the file open. Blocking.
    pub fn rekey(path: &Path, old: &DatabaseKey, new: &DatabaseKey) -> Result<()> {
        let conn = open_connection(path, Some(old))?;
        // Fold the WAL into the file first, so no page is left under the old key.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        conn.execute_batch(&new.pragma("rekey"))?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    fn open_with(path: &Path, key: Option<&DatabaseKey>) -> Result<SqliteStorage> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut writer = open_connection(path, key)?;
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
            .map(|_| open_connection(path, key).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(SqliteStorage {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: group::GroupWriter::start(writer)?,
                readers,
                next_reader: AtomicUsize::new(0),
                last_seen: Mutex::new(HashMap::new()),
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

    /// Run `f` in a write transaction on the writer connection: queued now, to the writer
    /// thread, which commits it together with every other write waiting at that moment (see
    /// [`group`]). The future resolves after that transaction committed (durably), with `f`'s
    /// result; an error of `f` rolls back `f`'s work only, a failed commit fails every write
    /// of the group. Dropping the future does not withdraw the write.
    fn write<T, F>(&self, f: F) -> StorageFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let result = self.inner.writer.submit(f);
        Box::pin(async move {
            result
                .await
                .map_err(|_| Error::Storage("the SQLite writer thread has stopped".into()))?
        })
    }
}

fn open_connection(path: &Path, key: Option<&DatabaseKey>) -> Result<Connection> {
    let conn = match key {
        Some(key) => open_keyed(path, key)?,
        None => {
            let conn = Connection::open(path)?;
            // Takes effect only when this creates the file; an existing file keeps its size.
            conn.pragma_update(None, "page_size", PAGE_SIZE)?;
            conn
        }
    };
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Acknowledged data must survive power loss (DESIGN §4): fsync the WAL on every commit.
    conn.pragma_update(None, "synchronous", "FULL")?;
    let page_size = page_size(&conn)?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        WAL_AUTOCHECKPOINT_BYTES / page_size.max(1),
    )?;
    Ok(conn)
}

/// The page size of `conn`'s database (SQLCipher answers for a keyed connection, as text).
fn page_size(conn: &Connection) -> Result<u32> {
    let value: rusqlite::types::Value = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    match value {
        rusqlite::types::Value::Integer(n) => u32::try_from(n).ok(),
        rusqlite::types::Value::Text(text) => text.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| Error::Storage("unreadable page size".into()))
}

/// Open `path` with `key`: at [`PAGE_SIZE`] (what a new file gets), else at
/// [`LEGACY_PAGE_SIZE`] (a relay database created before schema version 6). SQLCipher stores
/// no page size in the clear, so the only test is reading page 1: a page size that does not
/// match fails its HMAC like a wrong key does, and writes nothing (SQLite refuses to
/// checkpoint a WAL of another page size).
fn open_keyed(path: &Path, key: &DatabaseKey) -> Result<Connection> {
    for page_size in [PAGE_SIZE, LEGACY_PAGE_SIZE] {
        let conn = Connection::open(path)?;
        match key_connection(&conn, key, page_size) {
            Ok(()) => return Ok(conn),
            Err(Error::CannotDecrypt) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::CannotDecrypt)
}

/// Key a fresh connection and prove the key by reading page 1.
///
/// SQLCipher sets up its crypto provider on the first keyed connection and tears it down when
/// the last closes; keying while another thread closes was seen to fail in the device store
/// (see core's `store/db.rs`). So keying is serialised and one keyed in-memory connection is
/// kept for the life of the process.
fn key_connection(conn: &Connection, key: &DatabaseKey, page_size: u32) -> Result<()> {
    static KEYING: Mutex<Option<Connection>> = Mutex::new(None);
    let mut anchor = KEYING.lock().unwrap_or_else(PoisonError::into_inner);
    if anchor.is_none() {
        let keep = Connection::open_in_memory()?;
        keep.execute_batch("PRAGMA cipher_log_level = NONE;")?;
        keep.execute_batch(&DatabaseKey([7; 32]).pragma("key"))?;
        keep.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })?;
        *anchor = Some(keep);
    }
    conn.execute_batch("PRAGMA cipher_log_level = NONE;")?;
    conn.execute_batch(&key.pragma("key"))?;
    conn.execute_batch(&format!("PRAGMA cipher_page_size = {page_size};"))?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => Error::CannotDecrypt,
        _ => Error::Sqlite(e),
    })?;
    Ok(())
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

fn insert_agency_tx(tx: &Transaction<'_>, agency: &Agency) -> Result<()> {
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
}

fn insert_user_tx(tx: &Transaction<'_>, user: &User) -> Result<()> {
    if !exists(
        tx,
        "SELECT 1 FROM agencies WHERE id = ?1",
        user.agency_id.as_str(),
    )? {
        return Err(Error::NotFound("agency"));
    }
    if exists(tx, "SELECT 1 FROM users WHERE id = ?1", user.id.as_str())? {
        return Err(Error::Conflict(format!("user {} exists", user.id)));
    }
    tx.execute(
        "INSERT INTO users (id, agency_id, name, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            user.id.as_str(),
            user.agency_id.as_str(),
            user.name,
            user.role.as_str(),
            user.created_at
        ],
    )?;
    Ok(())
}

fn insert_patient_tx(
    tx: &Transaction<'_>,
    patient: &Patient,
    chart: &DocumentWrite,
) -> Result<Seq> {
    if !exists(
        tx,
        "SELECT 1 FROM agencies WHERE id = ?1",
        patient.agency_id.as_str(),
    )? {
        return Err(Error::NotFound("agency"));
    }
    if exists(
        tx,
        "SELECT 1 FROM patients WHERE id = ?1",
        patient.id.as_str(),
    )? {
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
    write_document_tx(tx, chart)
}

fn assign_tx(
    tx: &Transaction<'_>,
    user_id: &UserId,
    patient_id: &PatientId,
    at_ms: i64,
) -> Result<Seq> {
    if !exists(tx, "SELECT 1 FROM users WHERE id = ?1", user_id.as_str())? {
        return Err(Error::NotFound("user"));
    }
    if !exists(
        tx,
        "SELECT 1 FROM patients WHERE id = ?1",
        patient_id.as_str(),
    )? {
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
}

fn unassign_tx(tx: &Transaction<'_>, user_id: &UserId, patient_id: &PatientId) -> Result<bool> {
    let n = tx.execute(
        "DELETE FROM care_team WHERE user_id = ?1 AND patient_id = ?2",
        [user_id.as_str(), patient_id.as_str()],
    )?;
    Ok(n > 0)
}

/// Refuse new credentials for a missing or disabled user.
fn check_user_enabled(tx: &Transaction<'_>, user_id: &UserId) -> Result<()> {
    let disabled: Option<Option<i64>> = tx
        .query_row(
            "SELECT disabled_at FROM users WHERE id = ?1",
            [user_id.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    match disabled {
        None => Err(Error::NotFound("user")),
        Some(Some(_)) => Err(Error::Forbidden("the user is disabled")),
        Some(None) => Ok(()),
    }
}

fn insert_device_tx(
    tx: &Transaction<'_>,
    device: &Device,
    enrolled_by: Option<&str>,
    public_key: Option<&[u8; 32]>,
) -> Result<()> {
    if !exists(
        tx,
        "SELECT 1 FROM users WHERE id = ?1",
        device.user_id.as_str(),
    )? {
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
        return Err(Error::Conflict(format!(
            "device {} or its token exists",
            device.id
        )));
    }
    tx.execute(
        "INSERT INTO devices (id, user_id, name, token_hash, created_at, expires_at, revoked_at, enrolled_by, public_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            device.id.as_str(),
            device.user_id.as_str(),
            device.name,
            device.token_hash.as_slice(),
            device.created_at,
            device.expires_at,
            device.revoked_at,
            enrolled_by,
            public_key.map(|k| k.as_slice())
        ],
    )?;
    Ok(())
}

fn revoke_device_tx(tx: &Transaction<'_>, id: &DeviceId, at_ms: i64) -> Result<bool> {
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
}

fn disable_user_tx(tx: &Transaction<'_>, user_id: &UserId, at_ms: i64) -> Result<Vec<DeviceId>> {
    if !exists(tx, "SELECT 1 FROM users WHERE id = ?1", user_id.as_str())? {
        return Err(Error::NotFound("user"));
    }
    tx.execute(
        "UPDATE users SET disabled_at = ?2 WHERE id = ?1 AND disabled_at IS NULL",
        params![user_id.as_str(), at_ms],
    )?;
    let live: Vec<String> = tx
        .prepare("SELECT id FROM devices WHERE user_id = ?1 AND revoked_at IS NULL ORDER BY created_at, id")?
        .query_map([user_id.as_str()], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut revoked = Vec::with_capacity(live.len());
    for id in live {
        let id = DeviceId::new(id);
        revoke_device_tx(tx, &id, at_ms)?;
        revoked.push(id);
    }
    // Codes issued but not redeemed die with the account.
    tx.execute(
        "UPDATE enrollment_codes SET expires_at = MIN(expires_at, ?2) WHERE user_id = ?1 AND used_at IS NULL",
        params![user_id.as_str(), at_ms],
    )?;
    Ok(revoked)
}

fn insert_enrollment_code_tx(tx: &Transaction<'_>, code: &EnrollmentCode) -> Result<()> {
    check_user_enabled(tx, &code.user_id)?;
    tx.execute(
        "INSERT INTO enrollment_codes (code_hash, user_id, device_name, created_at, expires_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            code.code_hash.as_slice(),
            code.user_id.as_str(),
            code.device_name,
            code.created_at,
            code.expires_at,
            code.created_by
        ],
    )?;
    Ok(())
}

fn insert_admin_event(tx: &Transaction<'_>, e: &AdminEvent) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO admin_log (at, agency_id, actor, actor_device_id, source, remote_addr, action, target, details)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        e.at_ms,
        e.agency_id.as_ref().map(AgencyId::as_str),
        e.actor,
        e.actor_device_id.as_ref().map(DeviceId::as_str),
        e.source,
        e.remote_addr,
        e.action,
        e.target,
        e.details
    ])?;
    Ok(())
}

fn admin_change_tx(tx: &Transaction<'_>, change: &AdminChange) -> Result<AdminOutcome> {
    Ok(match change {
        AdminChange::Record => AdminOutcome::Done,
        AdminChange::InsertAgency(agency) => {
            insert_agency_tx(tx, agency)?;
            AdminOutcome::Done
        }
        AdminChange::InsertUser(user) => {
            insert_user_tx(tx, user)?;
            AdminOutcome::Done
        }
        AdminChange::InsertPatient(patient, chart) => {
            AdminOutcome::Seq(insert_patient_tx(tx, patient, chart)?)
        }
        AdminChange::Assign {
            user_id,
            patient_id,
            at_ms,
        } => AdminOutcome::Seq(assign_tx(tx, user_id, patient_id, *at_ms)?),
        AdminChange::Unassign {
            user_id,
            patient_id,
        } => AdminOutcome::Changed(unassign_tx(tx, user_id, patient_id)?),
        AdminChange::InsertDevice { device, issued_by } => {
            check_user_enabled(tx, &device.user_id)?;
            insert_device_tx(tx, device, Some(issued_by), None)?;
            AdminOutcome::Done
        }
        AdminChange::RevokeDevice { device_id, at_ms } => {
            AdminOutcome::Changed(revoke_device_tx(tx, device_id, *at_ms)?)
        }
        AdminChange::DisableUser { user_id, at_ms } => {
            AdminOutcome::Revoked(disable_user_tx(tx, user_id, *at_ms)?)
        }
        AdminChange::InsertEnrollmentCode(code) => {
            insert_enrollment_code_tx(tx, code)?;
            AdminOutcome::Done
        }
    })
}

fn redeem_tx(tx: &Transaction<'_>, r: &Redemption) -> Result<(Device, User)> {
    type CodeRow = (String, String, i64, String, Option<i64>);
    let code: Option<CodeRow> = tx
        .query_row(
            "SELECT user_id, device_name, expires_at, created_by, used_at FROM enrollment_codes WHERE code_hash = ?1",
            [r.code_hash.as_slice()],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
        )
        .optional()?;
    let Some((user_id, admin_name, expires_at, created_by, used_at)) = code else {
        return Err(Error::NotFound("enrollment code"));
    };
    if used_at.is_some() {
        return Err(Error::Conflict(
            "the enrollment code was already used".into(),
        ));
    }
    if expires_at <= r.at_ms {
        return Err(Error::Expired("enrollment code"));
    }
    let user_id = UserId::new(user_id);
    check_user_enabled(tx, &user_id)?;
    let user = tx
        .query_row(
            "SELECT id, agency_id, name, role, created_at FROM users WHERE id = ?1",
            [user_id.as_str()],
            |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            },
        )
        .map(user_from_row)??;
    let device = Device {
        id: r.device_id.clone(),
        user_id: user.id.clone(),
        name: r.device_name.clone().unwrap_or(admin_name),
        token_hash: r.token_hash,
        created_at: r.at_ms,
        expires_at: r.token_expires_at,
        revoked_at: None,
    };
    let consumed = tx.execute(
        "UPDATE enrollment_codes SET used_at = ?2, device_id = ?3 WHERE code_hash = ?1 AND used_at IS NULL",
        params![r.code_hash.as_slice(), r.at_ms, device.id.as_str()],
    )?;
    if consumed != 1 {
        return Err(Error::Conflict(
            "the enrollment code was already used".into(),
        ));
    }
    insert_device_tx(tx, &device, Some(&created_by), Some(&r.public_key))?;
    insert_admin_event(tx, &super::enrollment_event(r, &user, &device, &created_by))?;
    Ok((device, user))
}

type KeyRow = (String, String, String, String, Vec<u8>, i64, Option<i64>);

fn key_from_row(
    (device_id, user_id, agency_id, role, key, enrolled, revoked): KeyRow,
) -> Result<DeviceKey> {
    Ok(DeviceKey {
        device_id: DeviceId::new(device_id),
        user_id: UserId::new(user_id),
        agency_id: AgencyId::new(agency_id),
        role: parse_role(&role).ok_or_else(|| Error::Storage(format!("stored role {role:?}")))?,
        public_key: key
            .as_slice()
            .try_into()
            .map_err(|_| Error::Storage("stored public key is not 32 bytes".into()))?,
        enrolled_at_ms: enrolled,
        revoked_at_ms: revoked,
    })
}

const KEY_COLUMNS: &str =
    "SELECT d.id, d.user_id, u.agency_id, u.role, d.public_key, d.created_at, d.revoked_at
     FROM devices d JOIN users u ON u.id = d.user_id";

/// The audit query: a time range, optionally one patient and/or one user, from a cursor. Planned
/// on `audit_log_at` (see `006_fewer_index_writes.sql`; a test holds the plan).
const AUDIT_QUERY: &str =
    "SELECT id, at, agency_id, user_id, device_id, document_id, patient_id, action, heads
     FROM audit_log
     WHERE at >= ?1 AND at < ?2
       AND (?3 IS NULL OR patient_id = ?3) AND (?4 IS NULL OR user_id = ?4)
       AND (?6 IS NULL OR at > ?6 OR (at = ?6 AND id > ?7))
     ORDER BY at, id LIMIT ?5";

fn query_audit_tx(
    tx: &Transaction<'_>,
    query: &AuditQuery,
    after: Option<(i64, i64)>,
) -> Result<Vec<AuditRecord>> {
    let mut stmt = tx.prepare_cached(AUDIT_QUERY)?;
    type Row = (
        i64,
        i64,
        String,
        String,
        String,
        Vec<u8>,
        Option<String>,
        String,
        Vec<u8>,
    );
    let rows = stmt.query_map(
        params![
            query.from_ms,
            query.to_ms,
            query.patient_id.as_ref().map(PatientId::as_str),
            query.user_id.as_ref().map(UserId::as_str),
            i64::try_from(query.limit).unwrap_or(i64::MAX),
            after.map(|(at, _)| at),
            after.map(|(_, id)| id)
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
        let (id, at_ms, agency_id, user_id, device_id, document_id, patient_id, action, heads) =
            row?;
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
}

type FeedRow = (Vec<u8>, String, String, String, Vec<u8>, i64);

/// A clinician's feed: the documents of her care team's patients, by effective sequence.
/// `CROSS JOIN` fixes the join order (SQLite's planner otherwise prefers scanning every
/// document of the agency through `documents_agency_seq`, one table row per document: with
/// 1,000 nurses in an agency each feed request read all 8,000 notes' rows, ~36 ms of relay
/// CPU). Driven by her care-team rows, it reads her patients' documents only
/// (`documents_patient`).
const CARE_TEAM_FEED: &str =
    "SELECT d.id, d.agency_id, d.patient_id, d.kind, d.heads, MAX(d.seq, c.seq) AS eff
     FROM care_team c CROSS JOIN documents d ON d.patient_id = c.patient_id
     WHERE c.user_id = ?1 AND d.agency_id = ?2
       AND (MAX(d.seq, c.seq) > ?3 OR (MAX(d.seq, c.seq) = ?3 AND d.id > ?4))
     ORDER BY eff, d.id LIMIT ?5";

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
        self.write(move |tx| insert_agency_tx(tx, &agency))
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
        self.write(move |tx| insert_user_tx(tx, &user))
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
        self.write(move |tx| insert_patient_tx(tx, &patient, &chart))
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
        self.write(move |tx| assign_tx(tx, &user_id, &patient_id, at_ms))
    }

    fn unassign(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.write(move |tx| unassign_tx(tx, &user_id, &patient_id))
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
        self.write(move |tx| insert_device_tx(tx, &device, None, None))
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
        self.write(move |tx| revoke_device_tx(tx, &id, at_ms))
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

    fn admin_change(
        &self,
        change: AdminChange,
        event: AdminEvent,
    ) -> StorageFuture<'_, AdminOutcome> {
        self.write(move |tx| {
            let outcome = admin_change_tx(tx, &change)?;
            insert_admin_event(tx, &event)?;
            Ok(outcome)
        })
    }

    fn admin_log(&self, query: AdminLogQuery) -> StorageFuture<'_, Vec<AdminRecord>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT id, at, agency_id, actor, actor_device_id, source, remote_addr, action, target, details
                 FROM admin_log
                 WHERE id > ?1 AND (?2 IS NULL OR agency_id = ?2) AND (?3 IS NULL OR target = ?3)
                   AND (?4 IS NULL OR actor = ?4)
                 ORDER BY id LIMIT ?5",
            )?;
            let rows = stmt.query_map(
                params![
                    query.after_id,
                    query.agency_id.as_ref().map(AgencyId::as_str),
                    query.target,
                    query.actor,
                    i64::try_from(query.limit).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok(AdminRecord {
                        id: r.get(0)?,
                        event: AdminEvent {
                            at_ms: r.get(1)?,
                            agency_id: r.get::<_, Option<String>>(2)?.map(AgencyId::new),
                            actor: r.get(3)?,
                            actor_device_id: r.get::<_, Option<String>>(4)?.map(DeviceId::new),
                            source: r.get(5)?,
                            remote_addr: r.get(6)?,
                            action: r.get(7)?,
                            target: r.get(8)?,
                            details: r.get(9)?,
                        },
                    })
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn redeem_enrollment(&self, redemption: Redemption) -> StorageFuture<'_, (Device, User)> {
        self.write(move |tx| redeem_tx(tx, &redemption))
    }

    fn user_disabled_at(&self, id: UserId) -> StorageFuture<'_, Option<i64>> {
        self.read(move |tx| {
            Ok(tx
                .query_row(
                    "SELECT disabled_at FROM users WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get::<_, Option<i64>>(0),
                )
                .optional()?
                .flatten())
        })
    }

    fn user_devices(&self, id: UserId) -> StorageFuture<'_, Vec<DeviceInfo>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT id, user_id, name, token_hash, created_at, expires_at, revoked_at, public_key, enrolled_by, last_seen_at
                 FROM devices WHERE user_id = ?1 ORDER BY created_at, id",
            )?;
            type Row = (DeviceRow, Option<Vec<u8>>, Option<String>, Option<i64>);
            let rows = stmt.query_map([id.as_str()], |r| -> rusqlite::Result<Row> {
                Ok((
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            })?;
            rows.map(|row| {
                let (device, key, enrolled_by, last_seen_at) = row?;
                Ok(DeviceInfo {
                    device: device_from_row(device)?,
                    public_key: key
                        .map(|k| {
                            <[u8; 32]>::try_from(k.as_slice())
                                .map_err(|_| Error::Storage("stored public key is not 32 bytes".into()))
                        })
                        .transpose()?,
                    enrolled_by,
                    last_seen_at,
                })
            })
            .collect()
        })
    }

    fn touch_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, ()> {
        // Most authentications are within a minute of the last: answered from memory, no write.
        {
            let seen = self
                .inner
                .last_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if seen
                .get(&id)
                .is_some_and(|last| at_ms - last < LAST_SEEN_RESOLUTION_MS)
            {
                return Box::pin(std::future::ready(Ok(())));
            }
        }
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            self.write({
                let id = id.clone();
                move |tx| {
                    tx.execute(
                        "UPDATE devices SET last_seen_at = ?2 WHERE id = ?1
                           AND (last_seen_at IS NULL OR last_seen_at <= ?2 - ?3)",
                        params![id.as_str(), at_ms, LAST_SEEN_RESOLUTION_MS],
                    )?;
                    Ok(())
                }
            })
            .await?;
            let mut seen = inner
                .last_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if seen.len() >= MAX_LAST_SEEN_ENTRIES {
                seen.clear();
            }
            seen.insert(id, at_ms);
            Ok(())
        })
    }

    fn device_key(&self, id: DeviceId) -> StorageFuture<'_, Option<DeviceKey>> {
        self.read(move |tx| {
            tx.prepare_cached(&format!(
                "{KEY_COLUMNS} WHERE d.id = ?1 AND d.public_key IS NOT NULL"
            ))?
            .query_row([id.as_str()], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .optional()?
            .map(key_from_row)
            .transpose()
        })
    }

    fn agency_device_keys(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<DeviceKey>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "{KEY_COLUMNS} WHERE u.agency_id = ?1 AND d.public_key IS NOT NULL ORDER BY d.created_at, d.id"
            ))?;
            let rows = stmt.query_map([agency_id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
            })?;
            rows.map(|row| key_from_row(row?)).collect()
        })
    }

    fn audit_page(
        &self,
        query: AuditQuery,
        after: Option<(i64, i64)>,
    ) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.read(move |tx| query_audit_tx(tx, &query, after))
    }

    fn load_document(&self, id: DocumentId) -> StorageFuture<'_, Option<StoredDocument>> {
        self.read(move |tx| load_document_tx(tx, id))
    }

    fn load_documents(
        &self,
        ids: Vec<DocumentId>,
    ) -> StorageFuture<'_, Vec<Option<StoredDocument>>> {
        // One read transaction (one trip to the blocking pool) for the whole batch.
        self.read(move |tx| ids.into_iter().map(|id| load_document_tx(tx, id)).collect())
    }

    fn write_document(&self, write: DocumentWrite) -> StorageFuture<'_, Seq> {
        self.write(move |tx| write_document_tx(tx, &write))
    }

    fn write_document_on(
        &self,
        write: DocumentWrite,
        base: Vec<automerge::ChangeHash>,
    ) -> StorageFuture<'_, Seq> {
        self.write(move |tx| {
            // One writer process: the heads check only fails if the admin CLI wrote the
            // document meanwhile; it is here so the contract is the same on every backend.
            let stored: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT heads FROM documents WHERE id = ?1",
                    [write.document_id.as_bytes().as_slice()],
                    |r| r.get(0),
                )
                .optional()?;
            if !write.create && stored.is_some_and(|h| h != heads_to_bytes(&base)) {
                return Err(Error::Stale(write.document_id.to_string()));
            }
            write_document_tx(tx, &write)
        })
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
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            };
            // `d.id > NULL` is NULL: without a document in the cursor only larger seqs match.
            let rows: Vec<FeedRow> = match &query.scope {
                FeedScope::Agency(agency_id) => tx
                    .prepare_cached(
                        "SELECT id, agency_id, patient_id, kind, heads, seq FROM documents
                         WHERE agency_id = ?1 AND (seq > ?2 OR (seq = ?2 AND id > ?3))
                         ORDER BY seq, id LIMIT ?4",
                    )?
                    .query_map(
                        params![agency_id.as_str(), after_seq, after_doc, fetch],
                        map_row,
                    )?
                    .collect::<rusqlite::Result<_>>()?,
                FeedScope::CareTeam { agency_id, user_id } => tx
                    .prepare_cached(CARE_TEAM_FEED)?
                    .query_map(
                        params![
                            user_id.as_str(),
                            agency_id.as_str(),
                            after_seq,
                            after_doc,
                            fetch
                        ],
                        map_row,
                    )?
                    .collect::<rusqlite::Result<_>>()?,
            };
            let more = rows.len() > query.limit;
            let entries = rows
                .into_iter()
                .take(query.limit)
                .map(feed_entry)
                .collect::<Result<Vec<_>>>()?;
            Ok(FeedPage { entries, more })
        })
    }

    fn append_audit(&self, events: Vec<AuditEvent>) -> StorageFuture<'_, ()> {
        self.write(move |tx| events.iter().try_for_each(|e| insert_audit(tx, e)))
    }

    fn query_audit(&self, query: AuditQuery) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.read(move |tx| query_audit_tx(tx, &query, None))
    }

    fn document_row(&self, id: DocumentId) -> StorageFuture<'_, Option<DocumentRow>> {
        self.read(move |tx| document_row_tx(tx, id))
    }

    fn document_rows(&self, ids: Vec<DocumentId>) -> StorageFuture<'_, Vec<Option<DocumentRow>>> {
        self.read(move |tx| ids.into_iter().map(|id| document_row_tx(tx, id)).collect())
    }
}

/// [`Storage::load_document`] in a read transaction.
fn load_document_tx(tx: &Transaction<'_>, id: DocumentId) -> Result<Option<StoredDocument>> {
    let key = id.as_bytes().as_slice();
    type Row = (String, String, String, Vec<u8>, i64, Option<Vec<u8>>);
    let row: Option<Row> = tx
        .prepare_cached(
            "SELECT agency_id, patient_id, kind, heads, seq, snapshot FROM documents WHERE id = ?1",
        )?
        .query_row([key], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()?;
    let Some((agency_id, patient_id, kind, heads, seq, snapshot)) = row else {
        return Ok(None);
    };
    let mut stmt =
        tx.prepare_cached("SELECT bytes FROM document_chunks WHERE document_id = ?1 ORDER BY id")?;
    let chunks = stmt
        .query_map([key], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<Vec<u8>>>>()?;
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
}

/// [`Storage::document_row`] in a read transaction.
fn document_row_tx(tx: &Transaction<'_>, id: DocumentId) -> Result<Option<DocumentRow>> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_agency(name: &str) -> Agency {
        Agency {
            id: AgencyId::random(),
            name: name.into(),
            created_at: 1,
        }
    }

    /// Occupy the writer thread until the returned sender is used (or dropped): the writes
    /// queued meanwhile are committed together, as one group.
    async fn hold_writer(storage: &SqliteStorage) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        drop(storage.write(move |_tx| {
            let _ = started.send(());
            let _ = held.recv();
            Ok(())
        }));
        running
            .await
            .expect("the writer thread runs the holding write");
        release
    }

    /// The clinician feed reads her care team's patients' documents through
    /// `documents_patient`, never every document of the agency: the planner's choice without
    /// the fixed join order (`documents_agency_seq`) made each request O(agency).
    #[tokio::test]
    async fn the_care_team_feed_is_driven_by_her_care_team_not_the_agency() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = SqliteStorage::open(&dir.path().join("relay.sqlite3")).expect("open");
        let plan: Vec<String> = storage
            .read(|tx| {
                let mut stmt = tx.prepare(&format!("EXPLAIN QUERY PLAN {CARE_TEAM_FEED}"))?;
                let rows = stmt
                    .query_map(params!["u", "a", 0, None::<Vec<u8>>, 10], |r| {
                        r.get::<_, String>(3)
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
            .expect("plan");
        assert!(plan[0].starts_with("SEARCH c USING"), "{plan:?}");
        assert!(
            plan[1].contains("USING INDEX documents_patient"),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|p| p.contains("documents_agency_seq")),
            "{plan:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_group_commit_fails_every_write_in_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = SqliteStorage::open(&dir.path().join("relay.sqlite3")).expect("open");
        let release = hold_writer(&storage).await;
        let (first, second) = (new_agency("first"), new_agency("second"));
        let first_write = storage.insert_agency(first.clone());
        // A write that succeeds inside its savepoint but makes the group's COMMIT fail: a
        // deferred foreign-key violation is only checked at commit.
        let poison = storage.write(|tx| {
            tx.execute_batch(
                "PRAGMA defer_foreign_keys = ON;
                 INSERT INTO document_chunks (document_id, bytes) VALUES (x'00', x'00');",
            )?;
            Ok(())
        });
        let second_write = storage.insert_agency(second.clone());
        release.send(()).expect("release the writer");
        for (what, result) in [
            ("first", first_write.await),
            ("poison", poison.await),
            ("second", second_write.await),
        ] {
            match result {
                Err(Error::Storage(msg)) => {
                    assert!(msg.contains("group commit failed"), "{what}: {msg}")
                }
                other => panic!("{what}: expected the group's failure, got {other:?}"),
            }
        }
        for agency in [&first, &second] {
            assert_eq!(storage.agency(agency.id.clone()).await.expect("read"), None);
        }
        // The writer goes on: the next group commits.
        storage
            .insert_agency(first.clone())
            .await
            .expect("insert after the failed group");
        assert_eq!(
            storage.agency(first.id.clone()).await.expect("read"),
            Some(first)
        );
    }

    #[tokio::test]
    async fn a_failing_write_in_a_group_fails_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = SqliteStorage::open(&dir.path().join("relay.sqlite3")).expect("open");
        let taken = new_agency("taken");
        storage.insert_agency(taken.clone()).await.expect("insert");
        let release = hold_writer(&storage).await;
        let (first, second) = (new_agency("first"), new_agency("second"));
        let first_write = storage.insert_agency(first.clone());
        let duplicate = storage.insert_agency(taken.clone());
        // A write that changes rows and then panics: its change is rolled back with it.
        let panicking = storage.write(|tx| -> Result<()> {
            tx.execute("UPDATE agencies SET name = 'renamed'", [])?;
            panic!("injected panic in a write");
        });
        let second_write = storage.insert_agency(second.clone());
        release.send(()).expect("release the writer");
        first_write.await.expect("first write commits");
        assert!(matches!(duplicate.await, Err(Error::Conflict(_))));
        assert!(matches!(panicking.await, Err(Error::Storage(m)) if m.contains("panicked")));
        second_write.await.expect("second write commits");
        for agency in [taken, first, second] {
            assert_eq!(
                storage.agency(agency.id.clone()).await.expect("read"),
                Some(agency)
            );
        }
    }

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

    /// The schema as `sqlite_master` lists it, without the order of creation.
    fn schema(conn: &Connection) -> Vec<(String, String)> {
        let mut stmt = conn
            .prepare("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")
            .expect("schema");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("schema rows")
    }

    #[test]
    fn every_upgrade_path_ends_equal_to_a_fresh_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fresh = dir.path().join("fresh.sqlite3");
        drop(SqliteStorage::open(&fresh).expect("fresh"));
        for start in 1..SCHEMA_VERSION {
            let path = dir.path().join(format!("from-{start}.sqlite3"));
            let mut conn = Connection::open(&path).expect("raw open");
            let tx = conn.transaction().expect("tx");
            for version in 0..start {
                migrate_step(&tx, version).expect("old step");
            }
            tx.pragma_update(None, "user_version", start)
                .expect("version");
            tx.commit().expect("commit");
            drop(conn);
            drop(SqliteStorage::open(&path).expect("upgrade"));
            let upgraded = Connection::open(&path).expect("raw open");
            assert_eq!(schema_version(&upgraded).expect("version"), SCHEMA_VERSION);
            assert_eq!(
                schema(&upgraded),
                schema(&Connection::open(&fresh).expect("raw open")),
                "from version {start}"
            );
        }
    }

    #[test]
    fn an_encrypted_database_opens_with_its_key_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.sqlite3");
        let key = DatabaseKey::random();
        drop(SqliteStorage::open_encrypted(&path, &key).expect("create"));
        let bytes = std::fs::read(&path).expect("read");
        assert!(
            !bytes.starts_with(b"SQLite format 3"),
            "the header is encrypted too"
        );
        assert!(matches!(
            SqliteStorage::open_encrypted(&path, &DatabaseKey::random()),
            Err(Error::CannotDecrypt)
        ));
        assert!(SqliteStorage::open(&path).is_err(), "no key, no database");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bytes,
            "failed opens touch nothing"
        );
        let new = DatabaseKey::random();
        SqliteStorage::rekey(&path, &key, &new).expect("rekey");
        assert!(matches!(
            SqliteStorage::open_encrypted(&path, &key),
            Err(Error::CannotDecrypt)
        ));
        drop(SqliteStorage::open_encrypted(&path, &new).expect("new key"));
        assert!(matches!(
            DatabaseKey::from_hex("abc"),
            Err(Error::BadRequest(_))
        ));
        assert_eq!(
            DatabaseKey::from_hex(&format!("{}\n", key.to_hex())).expect("hex"),
            key
        );
    }

    #[test]
    fn a_new_database_gets_small_pages_and_an_old_one_keeps_its_own_and_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = DatabaseKey::random();
        let fresh = dir.path().join("fresh.sqlite3");
        drop(SqliteStorage::open_encrypted(&fresh, &key).expect("create"));
        let conn = open_connection(&fresh, Some(&key)).expect("reopen");
        assert_eq!(page_size(&conn).expect("page size"), PAGE_SIZE);
        assert_eq!(
            conn.pragma_query_value(None, "wal_autocheckpoint", |r| r.get::<_, u32>(0))
                .expect("autocheckpoint"),
            WAL_AUTOCHECKPOINT_BYTES / PAGE_SIZE
        );
        drop(conn);
        let plain = dir.path().join("plain.sqlite3");
        drop(SqliteStorage::open(&plain).expect("create plain"));
        assert_eq!(
            page_size(&Connection::open(&plain).expect("raw")).expect("page size"),
            PAGE_SIZE
        );

        // A relay database as schema version 5 made it: SQLCipher's default 4 KiB pages, the
        // audit indexes version 6 drops, rows in the audit log, a WAL left by a crash.
        let old = dir.path().join("old.sqlite3");
        let agency = new_agency("old");
        let mut conn = Connection::open(&old).expect("raw open");
        conn.execute_batch(&key.pragma("key")).expect("key");
        conn.execute_batch("PRAGMA cipher_page_size = 4096;")
            .expect("page size");
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .expect("wal");
        assert_eq!(mode, "wal");
        let tx = conn.transaction().expect("tx");
        for version in 0..5 {
            migrate_step(&tx, version).expect("old step");
        }
        tx.pragma_update(None, "user_version", 5).expect("version");
        tx.execute(
            "INSERT INTO agencies (id, name, created_at) VALUES (?1, ?2, ?3)",
            params![agency.id.as_str(), agency.name, agency.created_at],
        )
        .expect("agency");
        tx.execute(
            "INSERT INTO audit_log (at, agency_id, user_id, device_id, document_id, patient_id, action, heads)
             VALUES (5, ?1, 'usr_a', 'dev_a', zeroblob(16), 'pat_a', 'read', x'')",
            [agency.id.as_str()],
        )
        .expect("audit row");
        tx.commit().expect("commit");
        assert_eq!(page_size(&conn).expect("page size"), LEGACY_PAGE_SIZE);
        let untouched = std::fs::read(&old).expect("read");
        assert!(matches!(
            SqliteStorage::open_encrypted(&old, &DatabaseKey::random()),
            Err(Error::CannotDecrypt)
        ));
        assert_eq!(
            std::fs::read(&old).expect("read"),
            untouched,
            "a wrong key at either page size touches nothing"
        );
        // The WAL is still there: nobody checkpointed it.
        std::mem::forget(conn);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let storage = SqliteStorage::open_encrypted(&old, &key).expect("upgrade");
        assert_eq!(
            rt.block_on(storage.agency(agency.id.clone()))
                .expect("read"),
            Some(agency.clone())
        );
        let rows = rt
            .block_on(storage.query_audit(AuditQuery {
                from_ms: 0,
                to_ms: 10,
                patient_id: Some(PatientId::new("pat_a")),
                user_id: None,
                limit: 10,
            }))
            .expect("audit");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].event.user_id, UserId::new("usr_a"));
        let later = new_agency("later");
        rt.block_on(storage.insert_agency(later.clone()))
            .expect("write after the upgrade");
        drop(storage);
        let conn = open_connection(&old, Some(&key)).expect("reopen");
        assert_eq!(page_size(&conn).expect("page size"), LEGACY_PAGE_SIZE);
        assert_eq!(
            conn.pragma_query_value(None, "wal_autocheckpoint", |r| r.get::<_, u32>(0))
                .expect("autocheckpoint"),
            WAL_AUTOCHECKPOINT_BYTES / LEGACY_PAGE_SIZE
        );
        assert_eq!(schema_version(&conn).expect("version"), SCHEMA_VERSION);
        let names: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE tbl_name = 'audit_log' ORDER BY name")
            .expect("names")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("names");
        assert_eq!(
            names,
            [
                "audit_log",
                "audit_log_at",
                "audit_log_no_delete",
                "audit_log_no_update"
            ]
        );
        let agencies: i64 = conn
            .query_row("SELECT count(*) FROM agencies", [], |r| r.get(0))
            .expect("count");
        assert_eq!(agencies, 2);
    }

    #[test]
    fn the_audit_query_is_planned_on_the_time_index_with_or_without_filters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.sqlite3");
        drop(SqliteStorage::open(&path).expect("open"));
        let conn = Connection::open(&path).expect("raw open");
        for (patient, user, after) in [
            (None, None, None),
            (Some("pat_a"), None, None),
            (None, Some("usr_a"), Some(3_i64)),
            (Some("pat_a"), Some("usr_a"), Some(3)),
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {AUDIT_QUERY}"))
                .expect("plan")
                .query_map(params![0, 10, patient, user, 100, after, after], |r| {
                    r.get(3)
                })
                .expect("rows")
                .collect::<rusqlite::Result<_>>()
                .expect("plan rows");
            assert_eq!(
                plan,
                ["SEARCH audit_log USING INDEX audit_log_at (at>? AND at<?)"],
                "{patient:?} {user:?} {after:?}"
            );
        }
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
