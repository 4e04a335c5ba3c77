//! The PostgreSQL backend: several relay processes on one database (scale-out, issue 12).
//!
//! - **Driver and pool:** `tokio-postgres` behind a `deadpool-postgres` pool; every method takes
//!   a pooled connection, runs one transaction and returns it (see the README's Decisions).
//! - **Schema:** a migration ladder (`server/migrations/postgres/`, one file per SQLite
//!   version) under a transaction-scoped advisory lock, so relays starting together migrate
//!   once; the version is the `schema_version` row of `relay_meta`. A newer database is refused.
//! - **Several writers on one document:** every document write locks the document's row
//!   (`SELECT … FOR UPDATE`) and, through [`Storage::write_document_on`], proves that the
//!   stored heads are those the writer's copy was built from; otherwise it is
//!   [`Error::Stale`], nothing is stored, and the writer reloads, merges and retries. So a
//!   compaction snapshot always contains every chunk it deletes (they were all appended under
//!   the same row lock, and the heads check proves the writer had read them), and the stored
//!   heads are always the heads of everything stored.
//! - **The sequence:** the `counters` row is updated in the transaction that takes a position
//!   and stays locked until it commits, so positions become visible in commit order and a feed
//!   cursor can never step over an entry committed later with a smaller position. The row is
//!   taken last in each transaction, to hold it for as short a time as possible.
//! - **Liveness:** a committed document write sends `NOTIFY` [`NOTIFY_CHANNEL`] with
//!   `<instance> <document id hex>` in its own transaction (delivered only on commit); see
//!   [`crate::notify`].
//! - **Encryption at rest** is the database's business (disk or tablespace encryption of the
//!   PostgreSQL host), as are backups; the relay keeps no key for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use automerge::ChangeHash;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use fieldchart_core::protocol::{DocumentId, StorageId};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

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

/// Schema version this build writes (the same numbering as the SQLite schema).
pub const SCHEMA_VERSION: u32 = 5;

/// The `NOTIFY` channel of committed document writes.
pub const NOTIFY_CHANNEL: &str = "fieldchart_documents";

/// Connections in the pool when the URL does not say (`?pool_size=` is not a libpq option, so
/// the relay takes it from `--database-pool`).
pub const DEFAULT_POOL_SIZE: usize = 16;

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x6669_656c_6463_6861;

type Tx<'a> = tokio_postgres::Transaction<'a>;
type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Migration `n` takes the schema from version `n` to `n + 1`.
fn migration(from_version: u32) -> Option<&'static str> {
    Some(match from_version {
        0 => include_str!("../../migrations/postgres/001_initial.sql"),
        1 => include_str!("../../migrations/postgres/002_admin_enrollment.sql"),
        2 => include_str!("../../migrations/postgres/003_audit_tamper.sql"),
        3 => include_str!("../../migrations/postgres/004_console.sql"),
        4 => include_str!("../../migrations/postgres/005_sync_failures.sql"),
        _ => return None,
    })
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) if *db.code() == SqlState::UNIQUE_VIOLATION => Error::Conflict(format!(
                "already stored ({})",
                db.constraint().unwrap_or("?")
            )),
            Some(db) => Error::Storage(format!("postgres {}: {}", db.code().code(), db.message())),
            None if e.is_closed() => {
                Error::Storage("postgres: the database connection was lost".into())
            }
            None => Error::Storage(format!("postgres: {e}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Error::Storage(format!("postgres pool: {other}")),
        }
    }
}

/// The PostgreSQL backend. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PostgresStorage {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: tokio_postgres::Config,
    /// Names this process in its `NOTIFY` payloads, so it can skip its own.
    instance: String,
    epoch: String,
    last_seen: Mutex<HashMap<DeviceId, i64>>,
}

const MAX_LAST_SEEN_ENTRIES: usize = 100_000;

impl std::fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStorage")
            .field("dbname", &self.inner.config.get_dbname())
            .field("instance", &self.inner.instance)
            .finish_non_exhaustive()
    }
}

/// Parse a `postgres://` URL (or libpq key=value string), with a clear error.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| Error::BadRequest(format!("cannot parse the database URL: {e}")))
}

impl PostgresStorage {
    /// Connect to the database at `url` with a pool of `pool_size` connections, bring its
    /// schema up to date and make the relay's storage id and epoch base if missing.
    pub async fn connect(url: &str, pool_size: usize) -> Result<PostgresStorage> {
        let config = parse_url(url)?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| Error::Storage(format!("postgres pool: {e}")))?;
        let mut client = pool.get().await.map_err(|e| {
            Error::Storage(format!(
                "cannot connect to PostgreSQL at {}: {e}",
                describe(&config)
            ))
        })?;
        migrate(&mut client).await?;
        let tx = client.transaction().await?;
        for (key, value) in [
            (
                "storage_id",
                format!("fieldchart-relay-{}", crate::identity::random_hex::<16>()),
            ),
            ("epoch_base", crate::identity::random_hex::<8>()),
        ] {
            tx.execute(
                "INSERT INTO relay_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )
            .await?;
        }
        let base: String = tx
            .query_one("SELECT value FROM relay_meta WHERE key = 'epoch_base'", &[])
            .await?
            .try_get(0)?;
        tx.commit().await?;
        let epoch = epoch(&client, &base).await;
        drop(client);
        Ok(PostgresStorage {
            inner: Arc::new(Inner {
                pool,
                config,
                instance: crate::identity::random_hex::<8>(),
                epoch,
                last_seen: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The connection settings (for the `LISTEN` connection of [`crate::notify`]).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.inner.config
    }

    /// This process's name in `NOTIFY` payloads.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.inner.pool.get().await?)
    }

    /// Run `f` in one transaction; commit if it succeeds, roll back otherwise.
    fn tx<'s, T, F>(&'s self, f: F) -> StorageFuture<'s, T>
    where
        T: Send + 's,
        F: for<'c> FnOnce(&'c Tx<'c>) -> futures::future::BoxFuture<'c, Result<T>> + Send + 's,
    {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // Roll back explicitly on error: the connection goes back to the pool clean, and no
            // lock waits for a rollback that a dropped transaction only queues.
            match f(&tx).await {
                Ok(out) => {
                    tx.commit().await?;
                    Ok(out)
                }
                Err(e) => {
                    let _ = tx.rollback().await;
                    Err(e)
                }
            }
        })
    }

    /// Like [`PostgresStorage::tx`], read-only and on one snapshot (`REPEATABLE READ`).
    fn read<'s, T, F>(&'s self, f: F) -> StorageFuture<'s, T>
    where
        T: Send + 's,
        F: for<'c> FnOnce(&'c Tx<'c>) -> futures::future::BoxFuture<'c, Result<T>> + Send + 's,
    {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            // Roll back explicitly on error: the connection goes back to the pool clean, and no
            // lock waits for a rollback that a dropped transaction only queues.
            match f(&tx).await {
                Ok(out) => {
                    tx.commit().await?;
                    Ok(out)
                }
                Err(e) => {
                    let _ = tx.rollback().await;
                    Err(e)
                }
            }
        })
    }
}

/// Host, port and database of a configuration, for messages (never the password).
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// The feed epoch shared by every relay on this database: the stored base, the cluster's
/// system identifier and its timeline, hashed. A database restored into another cluster
/// (`pg_restore`) gets a new system identifier, and a point-in-time recovery or a failover to a
/// replica a new timeline: either way a new epoch, and devices reconcile (see `crate::feed`).
/// Where the control functions are not readable (a managed service), the base alone; an
/// operator then declares a restore by deleting the `epoch_base` row.
async fn epoch(client: &tokio_postgres::Client, base: &str) -> String {
    use sha2::Digest;
    let cluster = client
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text || '/' ||
                    (SELECT timeline_id FROM pg_control_checkpoint())::text",
            &[],
        )
        .await
        .and_then(|row| row.try_get::<_, String>(0));
    let cluster = match cluster {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the cluster's identity; the feed epoch will not change on a restore unless declared");
            String::new()
        }
    };
    let digest = sha2::Sha256::digest(format!("{base}/{cluster}").as_bytes());
    hex::encode(&digest[..8])
}

async fn migrate(client: &mut tokio_postgres::Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let has_meta: bool = tx
        .query_one("SELECT to_regclass('relay_meta') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    let found: u32 = if has_meta {
        let v: Option<String> = tx
            .query_opt(
                "SELECT value FROM relay_meta WHERE key = 'schema_version'",
                &[],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        v.as_deref()
            .unwrap_or("0")
            .parse()
            .map_err(|_| Error::Storage(format!("stored schema version {v:?}")))?
    } else {
        0
    };
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for version in found..SCHEMA_VERSION {
        let sql = migration(version)
            .ok_or_else(|| Error::Storage(format!("no migration from schema version {version}")))?;
        tx.batch_execute(sql).await?;
    }
    if found < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO relay_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&SCHEMA_VERSION.to_string()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn to_i64(seq: Seq) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn to_seq(v: i64) -> Result<Seq> {
    Seq::try_from(v).map_err(|_| Error::Storage(format!("negative sequence value {v}")))
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn doc_id_from(bytes: &[u8]) -> Result<DocumentId> {
    let array: [u8; 16] = bytes
        .try_into()
        .map_err(|_| Error::Storage(format!("stored document id of {} bytes", bytes.len())))?;
    Ok(DocumentId::from_bytes(array))
}

fn hash32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| Error::Storage(format!("stored {what} is not 32 bytes")))
}

async fn next_seq(tx: &Tx<'_>) -> Result<Seq> {
    let v: i64 = tx
        .query_one(
            "UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value",
            &[],
        )
        .await?
        .try_get(0)?;
    to_seq(v)
}

async fn exists(tx: &Tx<'_>, sql: &str, params: &Params<'_>) -> Result<bool> {
    Ok(tx.query_opt(sql, params).await?.is_some())
}

fn user_from_row(r: &tokio_postgres::Row, at: usize) -> Result<User> {
    let role: String = r.try_get(at + 3)?;
    Ok(User {
        id: UserId::new(r.try_get::<_, String>(at)?),
        agency_id: AgencyId::new(r.try_get::<_, String>(at + 1)?),
        name: r.try_get(at + 2)?,
        role: parse_role(&role).ok_or_else(|| Error::Storage(format!("stored role {role:?}")))?,
        created_at: r.try_get(at + 4)?,
    })
}

const USER_COLUMNS: &str = "id, agency_id, name, role, created_at";
const DEVICE_COLUMNS: &str = "id, user_id, name, token_hash, created_at, expires_at, revoked_at";

fn device_from_row(r: &tokio_postgres::Row, at: usize) -> Result<Device> {
    Ok(Device {
        id: DeviceId::new(r.try_get::<_, String>(at)?),
        user_id: UserId::new(r.try_get::<_, String>(at + 1)?),
        name: r.try_get(at + 2)?,
        token_hash: hash32(r.try_get::<_, &[u8]>(at + 3)?, "token hash")?,
        created_at: r.try_get(at + 4)?,
        expires_at: r.try_get(at + 5)?,
        revoked_at: r.try_get(at + 6)?,
    })
}

/// One document write under the document row's lock; `base`: the stored heads it must find.
async fn write_document_tx(
    tx: &Tx<'_>,
    instance: &str,
    write: &DocumentWrite,
    base: Option<&[ChangeHash]>,
) -> Result<Seq> {
    let id: &[u8] = write.document_id.as_bytes().as_slice();
    let stored = tx
        .query_opt(
            "SELECT agency_id, patient_id, heads FROM documents WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    let now = now_ms();
    let heads = heads_to_bytes(&write.heads);
    match (&stored, write.create) {
        (Some(_), true) => {
            return Err(Error::Conflict(format!(
                "document {} exists",
                write.document_id
            )));
        }
        (None, false) => return Err(Error::NotFound("document")),
        (Some(row), false) => {
            let agency: &str = row.try_get(0)?;
            let patient: &str = row.try_get(1)?;
            if agency != write.meta.agency_id.as_str() || patient != write.meta.patient_id.as_str()
            {
                return Err(Error::Conflict(format!(
                    "document {} belongs elsewhere",
                    write.document_id
                )));
            }
            if let Some(base) = base {
                let stored_heads: &[u8] = row.try_get(2)?;
                if stored_heads != heads_to_bytes(base).as_slice() {
                    return Err(Error::Stale(write.document_id.to_string()));
                }
            }
        }
        (None, true) => {
            // A concurrent create of the same id commits first or waits on the primary key.
            let inserted = tx
                .execute(
                    "INSERT INTO documents (id, agency_id, patient_id, kind, heads, seq, snapshot, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, 0, NULL, $6, $6) ON CONFLICT (id) DO NOTHING",
                    &[
                        &id,
                        &write.meta.agency_id.as_str(),
                        &write.meta.patient_id.as_str(),
                        &write.meta.kind,
                        &heads,
                        &now,
                    ],
                )
                .await?;
            if inserted != 1 {
                return Err(Error::Conflict(format!(
                    "document {} exists",
                    write.document_id
                )));
            }
        }
    }
    match &write.data {
        DocumentData::Snapshot(bytes) => {
            tx.execute(
                "UPDATE documents SET snapshot = $2 WHERE id = $1",
                &[&id, bytes],
            )
            .await?;
            // Every chunk was appended under this row's lock, and the heads check proved the
            // snapshot's writer had read them all: the snapshot contains each one it deletes.
            tx.execute("DELETE FROM document_chunks WHERE document_id = $1", &[&id])
                .await?;
        }
        DocumentData::Chunk(bytes) => {
            tx.execute(
                "INSERT INTO document_chunks (document_id, bytes) VALUES ($1, $2)",
                &[&id, bytes],
            )
            .await?;
        }
    }
    if let Some(event) = &write.audit {
        insert_audit(tx, event).await?;
    }
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&NOTIFY_CHANNEL, &format!("{instance} {}", hex::encode(id))],
    )
    .await?;
    // Last: the sequence row stays locked until commit.
    let seq = next_seq(tx).await?;
    tx.execute(
        "UPDATE documents SET heads = $2, seq = $3, updated_at = $4 WHERE id = $1",
        &[&id, &heads, &to_i64(seq), &now],
    )
    .await?;
    Ok(seq)
}

async fn insert_audit(tx: &Tx<'_>, e: &AuditEvent) -> Result<()> {
    let stmt = tx
        .prepare(
            "INSERT INTO audit_log (at, agency_id, user_id, device_id, document_id, patient_id, action, heads)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &e.at_ms,
            &e.agency_id.as_str(),
            &e.user_id.as_str(),
            &e.device_id.as_str(),
            &e.document_id.as_bytes().as_slice(),
            &e.patient_id.as_ref().map(PatientId::as_str),
            &e.action.as_str(),
            &heads_to_bytes(&e.heads),
        ],
    )
    .await?;
    Ok(())
}

async fn insert_agency_tx(tx: &Tx<'_>, agency: &Agency) -> Result<()> {
    let n = tx
        .execute(
            "INSERT INTO agencies (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
            &[&agency.id.as_str(), &agency.name, &agency.created_at],
        )
        .await?;
    if n != 1 {
        return Err(Error::Conflict(format!("agency {} exists", agency.id)));
    }
    Ok(())
}

async fn insert_user_tx(tx: &Tx<'_>, user: &User) -> Result<()> {
    if !exists(
        tx,
        "SELECT 1 FROM agencies WHERE id = $1",
        &[&user.agency_id.as_str()],
    )
    .await?
    {
        return Err(Error::NotFound("agency"));
    }
    let n = tx
        .execute(
            "INSERT INTO users (id, agency_id, name, role, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO NOTHING",
            &[
                &user.id.as_str(),
                &user.agency_id.as_str(),
                &user.name,
                &user.role.as_str(),
                &user.created_at,
            ],
        )
        .await?;
    if n != 1 {
        return Err(Error::Conflict(format!("user {} exists", user.id)));
    }
    Ok(())
}

async fn insert_patient_tx(
    tx: &Tx<'_>,
    instance: &str,
    patient: &Patient,
    chart: &DocumentWrite,
) -> Result<Seq> {
    if !exists(
        tx,
        "SELECT 1 FROM agencies WHERE id = $1",
        &[&patient.agency_id.as_str()],
    )
    .await?
    {
        return Err(Error::NotFound("agency"));
    }
    let n = tx
        .execute(
            "INSERT INTO patients (id, agency_id, chart_document_id, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
            &[
                &patient.id.as_str(),
                &patient.agency_id.as_str(),
                &patient.chart_document_id.as_bytes().as_slice(),
                &patient.created_at,
            ],
        )
        .await?;
    if n != 1 {
        return Err(Error::Conflict(format!("patient {} exists", patient.id)));
    }
    write_document_tx(tx, instance, chart, None).await
}

async fn assign_tx(
    tx: &Tx<'_>,
    user_id: &UserId,
    patient_id: &PatientId,
    at_ms: i64,
) -> Result<Seq> {
    if !exists(
        tx,
        "SELECT 1 FROM users WHERE id = $1",
        &[&user_id.as_str()],
    )
    .await?
    {
        return Err(Error::NotFound("user"));
    }
    if !exists(
        tx,
        "SELECT 1 FROM patients WHERE id = $1",
        &[&patient_id.as_str()],
    )
    .await?
    {
        return Err(Error::NotFound("patient"));
    }
    let existing = tx
        .query_opt(
            "SELECT seq FROM care_team WHERE user_id = $1 AND patient_id = $2",
            &[&user_id.as_str(), &patient_id.as_str()],
        )
        .await?;
    if let Some(row) = existing {
        return to_seq(row.try_get(0)?);
    }
    let seq = next_seq(tx).await?;
    let n = tx
        .execute(
            "INSERT INTO care_team (user_id, patient_id, seq, assigned_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id, patient_id) DO NOTHING",
            &[
                &user_id.as_str(),
                &patient_id.as_str(),
                &to_i64(seq),
                &at_ms,
            ],
        )
        .await?;
    if n != 1 {
        // Assigned by another relay meanwhile: keep the first assignment.
        return Err(Error::Conflict("assigned concurrently; retry".into()));
    }
    Ok(seq)
}

async fn unassign_tx(tx: &Tx<'_>, user_id: &UserId, patient_id: &PatientId) -> Result<bool> {
    let n = tx
        .execute(
            "DELETE FROM care_team WHERE user_id = $1 AND patient_id = $2",
            &[&user_id.as_str(), &patient_id.as_str()],
        )
        .await?;
    Ok(n > 0)
}

pub(crate) async fn check_user_enabled(tx: &Tx<'_>, user_id: &UserId) -> Result<()> {
    let row = tx
        .query_opt(
            "SELECT disabled_at FROM users WHERE id = $1",
            &[&user_id.as_str()],
        )
        .await?;
    match row {
        None => Err(Error::NotFound("user")),
        Some(r) => match r.try_get::<_, Option<i64>>(0)? {
            Some(_) => Err(Error::Forbidden("the user is disabled")),
            None => Ok(()),
        },
    }
}

async fn insert_device_tx(
    tx: &Tx<'_>,
    device: &Device,
    enrolled_by: Option<&str>,
    public_key: Option<&[u8; 32]>,
) -> Result<()> {
    if !exists(
        tx,
        "SELECT 1 FROM users WHERE id = $1",
        &[&device.user_id.as_str()],
    )
    .await?
    {
        return Err(Error::NotFound("user"));
    }
    let token: &[u8] = device.token_hash.as_slice();
    if exists(
        tx,
        "SELECT 1 FROM devices WHERE id = $1 OR token_hash = $2",
        &[&device.id.as_str(), &token],
    )
    .await?
    {
        return Err(Error::Conflict(format!(
            "device {} or its token exists",
            device.id
        )));
    }
    tx.execute(
        "INSERT INTO devices (id, user_id, name, token_hash, created_at, expires_at, revoked_at, enrolled_by, public_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &device.id.as_str(),
            &device.user_id.as_str(),
            &device.name,
            &token,
            &device.created_at,
            &device.expires_at,
            &device.revoked_at,
            &enrolled_by,
            &public_key.map(|k| k.as_slice()),
        ],
    )
    .await?;
    Ok(())
}

async fn revoke_device_tx(tx: &Tx<'_>, id: &DeviceId, at_ms: i64) -> Result<bool> {
    let row = tx
        .query_opt(
            "SELECT revoked_at FROM devices WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await?;
    let Some(row) = row else {
        return Err(Error::NotFound("device"));
    };
    if row.try_get::<_, Option<i64>>(0)?.is_some() {
        return Ok(false);
    }
    let seq = next_seq(tx).await?;
    tx.execute(
        "UPDATE devices SET revoked_at = $2, revoked_seq = $3 WHERE id = $1",
        &[&id.as_str(), &at_ms, &to_i64(seq)],
    )
    .await?;
    Ok(true)
}

async fn disable_user_tx(tx: &Tx<'_>, user_id: &UserId, at_ms: i64) -> Result<Vec<DeviceId>> {
    if !exists(
        tx,
        "SELECT 1 FROM users WHERE id = $1 FOR UPDATE",
        &[&user_id.as_str()],
    )
    .await?
    {
        return Err(Error::NotFound("user"));
    }
    tx.execute(
        "UPDATE users SET disabled_at = $2 WHERE id = $1 AND disabled_at IS NULL",
        &[&user_id.as_str(), &at_ms],
    )
    .await?;
    let live = tx
        .query(
            "SELECT id FROM devices WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at, id COLLATE \"C\"",
            &[&user_id.as_str()],
        )
        .await?;
    let mut revoked = Vec::with_capacity(live.len());
    for row in live {
        let id = DeviceId::new(row.try_get::<_, String>(0)?);
        revoke_device_tx(tx, &id, at_ms).await?;
        revoked.push(id);
    }
    tx.execute(
        "UPDATE enrollment_codes SET expires_at = LEAST(expires_at, $2) WHERE user_id = $1 AND used_at IS NULL",
        &[&user_id.as_str(), &at_ms],
    )
    .await?;
    Ok(revoked)
}

async fn insert_enrollment_code_tx(tx: &Tx<'_>, code: &EnrollmentCode) -> Result<()> {
    check_user_enabled(tx, &code.user_id).await?;
    tx.execute(
        "INSERT INTO enrollment_codes (code_hash, user_id, device_name, created_at, expires_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &code.code_hash.as_slice(),
            &code.user_id.as_str(),
            &code.device_name,
            &code.created_at,
            &code.expires_at,
            &code.created_by,
        ],
    )
    .await?;
    Ok(())
}

pub(crate) async fn insert_admin_event(tx: &Tx<'_>, e: &AdminEvent) -> Result<()> {
    tx.execute(
        "INSERT INTO admin_log (at, agency_id, actor, actor_device_id, source, remote_addr, action, target, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &e.at_ms,
            &e.agency_id.as_ref().map(AgencyId::as_str),
            &e.actor,
            &e.actor_device_id.as_ref().map(DeviceId::as_str),
            &e.source,
            &e.remote_addr,
            &e.action,
            &e.target,
            &e.details,
        ],
    )
    .await?;
    Ok(())
}

async fn admin_change_tx(
    tx: &Tx<'_>,
    instance: &str,
    change: &AdminChange,
) -> Result<AdminOutcome> {
    Ok(match change {
        AdminChange::Record => AdminOutcome::Done,
        AdminChange::InsertAgency(agency) => {
            insert_agency_tx(tx, agency).await?;
            AdminOutcome::Done
        }
        AdminChange::InsertUser(user) => {
            insert_user_tx(tx, user).await?;
            AdminOutcome::Done
        }
        AdminChange::InsertPatient(patient, chart) => {
            AdminOutcome::Seq(insert_patient_tx(tx, instance, patient, chart).await?)
        }
        AdminChange::Assign {
            user_id,
            patient_id,
            at_ms,
        } => AdminOutcome::Seq(assign_tx(tx, user_id, patient_id, *at_ms).await?),
        AdminChange::Unassign {
            user_id,
            patient_id,
        } => AdminOutcome::Changed(unassign_tx(tx, user_id, patient_id).await?),
        AdminChange::InsertDevice { device, issued_by } => {
            check_user_enabled(tx, &device.user_id).await?;
            insert_device_tx(tx, device, Some(issued_by), None).await?;
            AdminOutcome::Done
        }
        AdminChange::RevokeDevice { device_id, at_ms } => {
            AdminOutcome::Changed(revoke_device_tx(tx, device_id, *at_ms).await?)
        }
        AdminChange::DisableUser { user_id, at_ms } => {
            AdminOutcome::Revoked(disable_user_tx(tx, user_id, *at_ms).await?)
        }
        AdminChange::InsertEnrollmentCode(code) => {
            insert_enrollment_code_tx(tx, code).await?;
            AdminOutcome::Done
        }
    })
}

async fn redeem_tx(tx: &Tx<'_>, r: &Redemption) -> Result<(Device, User)> {
    let code = tx
        .query_opt(
            "SELECT user_id, device_name, expires_at, created_by, used_at FROM enrollment_codes
             WHERE code_hash = $1 FOR UPDATE",
            &[&r.code_hash.as_slice()],
        )
        .await?;
    let Some(code) = code else {
        return Err(Error::NotFound("enrollment code"));
    };
    let user_id: String = code.try_get(0)?;
    let admin_name: String = code.try_get(1)?;
    let expires_at: i64 = code.try_get(2)?;
    let created_by: String = code.try_get(3)?;
    let used_at: Option<i64> = code.try_get(4)?;
    if used_at.is_some() {
        return Err(Error::Conflict(
            "the enrollment code was already used".into(),
        ));
    }
    if expires_at <= r.at_ms {
        return Err(Error::Expired("enrollment code"));
    }
    let user_id = UserId::new(user_id);
    check_user_enabled(tx, &user_id).await?;
    let row = tx
        .query_one(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"),
            &[&user_id.as_str()],
        )
        .await?;
    let user = user_from_row(&row, 0)?;
    let device = Device {
        id: r.device_id.clone(),
        user_id: user.id.clone(),
        name: r.device_name.clone().unwrap_or(admin_name),
        token_hash: r.token_hash,
        created_at: r.at_ms,
        expires_at: r.token_expires_at,
        revoked_at: None,
    };
    let consumed = tx
        .execute(
            "UPDATE enrollment_codes SET used_at = $2, device_id = $3 WHERE code_hash = $1 AND used_at IS NULL",
            &[&r.code_hash.as_slice(), &r.at_ms, &device.id.as_str()],
        )
        .await?;
    if consumed != 1 {
        return Err(Error::Conflict(
            "the enrollment code was already used".into(),
        ));
    }
    insert_device_tx(tx, &device, Some(&created_by), Some(&r.public_key)).await?;
    insert_admin_event(tx, &super::enrollment_event(r, &user, &device, &created_by)).await?;
    Ok((device, user))
}

const KEY_COLUMNS: &str =
    "SELECT d.id, d.user_id, u.agency_id, u.role, d.public_key, d.created_at, d.revoked_at
     FROM devices d JOIN users u ON u.id = d.user_id";

fn key_from_row(r: &tokio_postgres::Row) -> Result<DeviceKey> {
    let role: String = r.try_get(3)?;
    Ok(DeviceKey {
        device_id: DeviceId::new(r.try_get::<_, String>(0)?),
        user_id: UserId::new(r.try_get::<_, String>(1)?),
        agency_id: AgencyId::new(r.try_get::<_, String>(2)?),
        role: parse_role(&role).ok_or_else(|| Error::Storage(format!("stored role {role:?}")))?,
        public_key: hash32(r.try_get::<_, &[u8]>(4)?, "public key")?,
        enrolled_at_ms: r.try_get(5)?,
        revoked_at_ms: r.try_get(6)?,
    })
}

async fn query_audit_tx(
    tx: &Tx<'_>,
    query: &AuditQuery,
    after: Option<(i64, i64)>,
) -> Result<Vec<AuditRecord>> {
    let rows = tx
        .query(
            "SELECT id, at, agency_id, user_id, device_id, document_id, patient_id, action, heads
             FROM audit_log
             WHERE at >= $1 AND at < $2
               AND ($3::text IS NULL OR patient_id = $3) AND ($4::text IS NULL OR user_id = $4)
               AND ($6::bigint IS NULL OR at > $6 OR (at = $6 AND id > $7))
             ORDER BY at, id LIMIT $5",
            &[
                &query.from_ms,
                &query.to_ms,
                &query.patient_id.as_ref().map(PatientId::as_str),
                &query.user_id.as_ref().map(UserId::as_str),
                &limit(query.limit),
                &after.map(|(at, _)| at),
                &after.map(|(_, id)| id),
            ],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let action: String = r.try_get(7)?;
            Ok(AuditRecord {
                id: r.try_get(0)?,
                event: AuditEvent {
                    at_ms: r.try_get(1)?,
                    agency_id: AgencyId::new(r.try_get::<_, String>(2)?),
                    user_id: UserId::new(r.try_get::<_, String>(3)?),
                    device_id: DeviceId::new(r.try_get::<_, String>(4)?),
                    document_id: doc_id_from(r.try_get(5)?)?,
                    patient_id: r.try_get::<_, Option<String>>(6)?.map(PatientId::new),
                    action: AuditAction::parse(&action)
                        .ok_or_else(|| Error::Storage(format!("stored audit action {action:?}")))?,
                    heads: heads_from_bytes(r.try_get(8)?)?,
                },
            })
        })
        .collect()
}

fn feed_entry(r: &tokio_postgres::Row) -> Result<FeedEntry> {
    Ok(FeedEntry {
        document_id: doc_id_from(r.try_get(0)?)?,
        meta: DocMeta {
            agency_id: AgencyId::new(r.try_get::<_, String>(1)?),
            patient_id: PatientId::new(r.try_get::<_, String>(2)?),
            kind: r.try_get(3)?,
        },
        heads: heads_from_bytes(r.try_get(4)?)?,
        seq: to_seq(r.try_get(5)?)?,
    })
}

impl Storage for PostgresStorage {
    fn storage_id(&self) -> StorageFuture<'_, StorageId> {
        self.read(|tx| {
            Box::pin(async move {
                let id: String = tx
                    .query_one("SELECT value FROM relay_meta WHERE key = 'storage_id'", &[])
                    .await?
                    .try_get(0)?;
                Ok(StorageId::new(id))
            })
        })
    }

    fn current_seq(&self) -> StorageFuture<'_, Seq> {
        self.read(|tx| {
            Box::pin(async move {
                to_seq(
                    tx.query_one("SELECT value FROM counters WHERE name = 'seq'", &[])
                        .await?
                        .try_get(0)?,
                )
            })
        })
    }

    fn insert_agency(&self, agency: Agency) -> StorageFuture<'_, ()> {
        self.tx(move |tx| Box::pin(async move { insert_agency_tx(tx, &agency).await }))
    }

    fn agency(&self, id: AgencyId) -> StorageFuture<'_, Option<Agency>> {
        self.read(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "SELECT name, created_at FROM agencies WHERE id = $1",
                        &[&id.as_str()],
                    )
                    .await?;
                row.map(|r| {
                    Ok(Agency {
                        id: id.clone(),
                        name: r.try_get(0)?,
                        created_at: r.try_get(1)?,
                    })
                })
                .transpose()
            })
        })
    }

    fn insert_user(&self, user: User) -> StorageFuture<'_, ()> {
        self.tx(move |tx| Box::pin(async move { insert_user_tx(tx, &user).await }))
    }

    fn user(&self, id: UserId) -> StorageFuture<'_, Option<User>> {
        self.read(move |tx| {
            Box::pin(async move {
                tx.query_opt(
                    &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"),
                    &[&id.as_str()],
                )
                .await?
                .map(|r| user_from_row(&r, 0))
                .transpose()
            })
        })
    }

    fn insert_patient(&self, patient: Patient, chart: DocumentWrite) -> StorageFuture<'_, Seq> {
        let instance = self.inner.instance.clone();
        self.tx(move |tx| {
            Box::pin(async move { insert_patient_tx(tx, &instance, &patient, &chart).await })
        })
    }

    fn patient(&self, id: PatientId) -> StorageFuture<'_, Option<Patient>> {
        self.read(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "SELECT agency_id, chart_document_id, created_at FROM patients WHERE id = $1",
                        &[&id.as_str()],
                    )
                    .await?;
                row.map(|r| {
                    Ok(Patient {
                        id: id.clone(),
                        agency_id: AgencyId::new(r.try_get::<_, String>(0)?),
                        chart_document_id: doc_id_from(r.try_get(1)?)?,
                        created_at: r.try_get(2)?,
                    })
                })
                .transpose()
            })
        })
    }

    fn assign(&self, user_id: UserId, patient_id: PatientId, at_ms: i64) -> StorageFuture<'_, Seq> {
        self.tx(move |tx| {
            Box::pin(async move { assign_tx(tx, &user_id, &patient_id, at_ms).await })
        })
    }

    fn unassign(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.tx(move |tx| Box::pin(async move { unassign_tx(tx, &user_id, &patient_id).await }))
    }

    fn on_care_team(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.read(move |tx| {
            Box::pin(async move {
                exists(
                    tx,
                    "SELECT 1 FROM care_team WHERE user_id = $1 AND patient_id = $2",
                    &[&user_id.as_str(), &patient_id.as_str()],
                )
                .await
            })
        })
    }

    fn insert_device(&self, device: Device) -> StorageFuture<'_, ()> {
        self.tx(move |tx| Box::pin(async move { insert_device_tx(tx, &device, None, None).await }))
    }

    fn device(&self, id: DeviceId) -> StorageFuture<'_, Option<Device>> {
        self.read(move |tx| {
            Box::pin(async move {
                tx.query_opt(
                    &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"),
                    &[&id.as_str()],
                )
                .await?
                .map(|r| device_from_row(&r, 0))
                .transpose()
            })
        })
    }

    fn device_by_token_hash(
        &self,
        token_hash: [u8; 32],
    ) -> StorageFuture<'_, Option<(Device, User)>> {
        self.read(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "SELECT d.id, d.user_id, d.name, d.token_hash, d.created_at, d.expires_at, d.revoked_at,
                                u.id, u.agency_id, u.name, u.role, u.created_at
                         FROM devices d JOIN users u ON u.id = d.user_id
                         WHERE d.token_hash = $1",
                        &[&token_hash.as_slice()],
                    )
                    .await?;
                row.map(|r| Ok((device_from_row(&r, 0)?, user_from_row(&r, 7)?)))
                    .transpose()
            })
        })
    }

    fn revoke_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, bool> {
        self.tx(move |tx| Box::pin(async move { revoke_device_tx(tx, &id, at_ms).await }))
    }

    fn revoked_devices_since(&self, after: Seq) -> StorageFuture<'_, Vec<(DeviceId, Seq)>> {
        self.read(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT id, revoked_seq FROM devices WHERE revoked_seq > $1 ORDER BY revoked_seq",
                        &[&to_i64(after)],
                    )
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok((
                            DeviceId::new(r.try_get::<_, String>(0)?),
                            to_seq(r.try_get(1)?)?,
                        ))
                    })
                    .collect()
            })
        })
    }

    fn admin_change(
        &self,
        change: AdminChange,
        event: AdminEvent,
    ) -> StorageFuture<'_, AdminOutcome> {
        let instance = self.inner.instance.clone();
        self.tx(move |tx| {
            Box::pin(async move {
                let outcome = admin_change_tx(tx, &instance, &change).await?;
                insert_admin_event(tx, &event).await?;
                Ok(outcome)
            })
        })
    }

    fn admin_log(&self, query: AdminLogQuery) -> StorageFuture<'_, Vec<AdminRecord>> {
        self.read(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT id, at, agency_id, actor, actor_device_id, source, remote_addr, action, target, details
                         FROM admin_log
                         WHERE id > $1 AND ($2::text IS NULL OR agency_id = $2) AND ($3::text IS NULL OR target = $3)
                           AND ($4::text IS NULL OR actor = $4)
                         ORDER BY id LIMIT $5",
                        &[
                            &query.after_id,
                            &query.agency_id.as_ref().map(AgencyId::as_str),
                            &query.target,
                            &query.actor,
                            &limit(query.limit),
                        ],
                    )
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(AdminRecord {
                            id: r.try_get(0)?,
                            event: AdminEvent {
                                at_ms: r.try_get(1)?,
                                agency_id: r.try_get::<_, Option<String>>(2)?.map(AgencyId::new),
                                actor: r.try_get(3)?,
                                actor_device_id: r
                                    .try_get::<_, Option<String>>(4)?
                                    .map(DeviceId::new),
                                source: r.try_get(5)?,
                                remote_addr: r.try_get(6)?,
                                action: r.try_get(7)?,
                                target: r.try_get(8)?,
                                details: r.try_get(9)?,
                            },
                        })
                    })
                    .collect()
            })
        })
    }

    fn redeem_enrollment(&self, redemption: Redemption) -> StorageFuture<'_, (Device, User)> {
        self.tx(move |tx| Box::pin(async move { redeem_tx(tx, &redemption).await }))
    }

    fn user_disabled_at(&self, id: UserId) -> StorageFuture<'_, Option<i64>> {
        self.read(move |tx| {
            Box::pin(async move {
                Ok(tx
                    .query_opt(
                        "SELECT disabled_at FROM users WHERE id = $1",
                        &[&id.as_str()],
                    )
                    .await?
                    .map(|r| r.try_get::<_, Option<i64>>(0))
                    .transpose()?
                    .flatten())
            })
        })
    }

    fn user_devices(&self, id: UserId) -> StorageFuture<'_, Vec<DeviceInfo>> {
        self.read(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {DEVICE_COLUMNS}, public_key, enrolled_by, last_seen_at
                             FROM devices WHERE user_id = $1 ORDER BY created_at, id COLLATE \"C\""
                        ),
                        &[&id.as_str()],
                    )
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(DeviceInfo {
                            device: device_from_row(r, 0)?,
                            public_key: r
                                .try_get::<_, Option<&[u8]>>(7)?
                                .map(|k| hash32(k, "public key"))
                                .transpose()?,
                            enrolled_by: r.try_get(8)?,
                            last_seen_at: r.try_get(9)?,
                        })
                    })
                    .collect()
            })
        })
    }

    fn touch_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, ()> {
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
        Box::pin(async move {
            let key = id.clone();
            self.tx(move |tx| {
                Box::pin(async move {
                    tx.execute(
                        "UPDATE devices SET last_seen_at = $2 WHERE id = $1
                           AND (last_seen_at IS NULL OR last_seen_at <= $2::bigint - $3::bigint)",
                        &[&key.as_str(), &at_ms, &LAST_SEEN_RESOLUTION_MS],
                    )
                    .await?;
                    Ok(())
                })
            })
            .await?;
            let mut seen = self
                .inner
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
            Box::pin(async move {
                tx.query_opt(
                    &format!("{KEY_COLUMNS} WHERE d.id = $1 AND d.public_key IS NOT NULL"),
                    &[&id.as_str()],
                )
                .await?
                .map(|r| key_from_row(&r))
                .transpose()
            })
        })
    }

    fn agency_device_keys(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<DeviceKey>> {
        self.read(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "{KEY_COLUMNS} WHERE u.agency_id = $1 AND d.public_key IS NOT NULL ORDER BY d.created_at, d.id COLLATE \"C\""
                        ),
                        &[&agency_id.as_str()],
                    )
                    .await?;
                rows.iter().map(key_from_row).collect()
            })
        })
    }

    fn audit_page(
        &self,
        query: AuditQuery,
        after: Option<(i64, i64)>,
    ) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.read(move |tx| Box::pin(async move { query_audit_tx(tx, &query, after).await }))
    }

    fn load_document(&self, id: DocumentId) -> StorageFuture<'_, Option<StoredDocument>> {
        self.read(move |tx| {
            Box::pin(async move {
                let key: &[u8] = id.as_bytes().as_slice();
                let row = tx
                    .query_opt(
                        "SELECT agency_id, patient_id, kind, heads, seq, snapshot FROM documents WHERE id = $1",
                        &[&key],
                    )
                    .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let chunks = tx
                    .query(
                        "SELECT bytes FROM document_chunks WHERE document_id = $1 ORDER BY id",
                        &[&key],
                    )
                    .await?
                    .iter()
                    .map(|r| r.try_get::<_, Vec<u8>>(0))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Ok(Some(StoredDocument {
                    meta: DocMeta {
                        agency_id: AgencyId::new(row.try_get::<_, String>(0)?),
                        patient_id: PatientId::new(row.try_get::<_, String>(1)?),
                        kind: row.try_get(2)?,
                    },
                    snapshot: row.try_get(5)?,
                    chunks,
                    heads: heads_from_bytes(row.try_get(3)?)?,
                    seq: to_seq(row.try_get(4)?)?,
                }))
            })
        })
    }

    fn write_document(&self, write: DocumentWrite) -> StorageFuture<'_, Seq> {
        let instance = self.inner.instance.clone();
        self.tx(move |tx| {
            Box::pin(async move { write_document_tx(tx, &instance, &write, None).await })
        })
    }

    fn write_document_on(
        &self,
        write: DocumentWrite,
        base: Vec<ChangeHash>,
    ) -> StorageFuture<'_, Seq> {
        let instance = self.inner.instance.clone();
        self.tx(move |tx| {
            Box::pin(async move { write_document_tx(tx, &instance, &write, Some(&base)).await })
        })
    }

    fn shared_epoch(&self) -> StorageFuture<'_, Option<String>> {
        let epoch = self.inner.epoch.clone();
        Box::pin(async move { Ok(Some(epoch)) })
    }

    fn load_sync_state(
        &self,
        peer: PeerKey,
        document_id: DocumentId,
    ) -> StorageFuture<'_, Option<Vec<u8>>> {
        self.read(move |tx| {
            Box::pin(async move {
                tx.query_opt(
                    "SELECT state FROM peer_sync_states WHERE user_id = $1 AND storage_id = $2 AND document_id = $3",
                    &[
                        &peer.user_id.as_str(),
                        &peer.storage_id.as_str(),
                        &document_id.as_bytes().as_slice(),
                    ],
                )
                .await?
                .map(|r| Ok(r.try_get::<_, Vec<u8>>(0)?))
                .transpose()
            })
        })
    }

    fn save_sync_states(
        &self,
        peer: PeerKey,
        states: Vec<(DocumentId, Vec<u8>)>,
    ) -> StorageFuture<'_, ()> {
        self.tx(move |tx| {
            Box::pin(async move {
                let now = now_ms();
                let stmt = tx
                    .prepare(
                        "INSERT INTO peer_sync_states (user_id, storage_id, document_id, state, updated_at)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (user_id, storage_id, document_id) DO UPDATE SET state = excluded.state,
                             updated_at = excluded.updated_at",
                    )
                    .await?;
                for (document_id, state) in &states {
                    tx.execute(
                        &stmt,
                        &[
                            &peer.user_id.as_str(),
                            &peer.storage_id.as_str(),
                            &document_id.as_bytes().as_slice(),
                            state,
                            &now,
                        ],
                    )
                    .await?;
                }
                Ok(())
            })
        })
    }

    fn changes(&self, query: FeedQuery) -> StorageFuture<'_, FeedPage> {
        self.read(move |tx| {
            Box::pin(async move {
                let after_seq = to_i64(query.after.seq);
                let after_doc = query.after.document_id.map(|d| d.as_bytes().to_vec());
                let fetch = limit(query.limit.saturating_add(1));
                // `d.id > NULL` is NULL: without a document in the cursor only larger seqs match.
                let rows = match &query.scope {
                    FeedScope::Agency(agency_id) => {
                        tx.query(
                            "SELECT id, agency_id, patient_id, kind, heads, seq FROM documents
                             WHERE agency_id = $1 AND (seq > $2 OR (seq = $2 AND id > $3))
                             ORDER BY seq, id LIMIT $4",
                            &[&agency_id.as_str(), &after_seq, &after_doc, &fetch],
                        )
                        .await?
                    }
                    FeedScope::CareTeam { agency_id, user_id } => {
                        tx.query(
                            "SELECT d.id, d.agency_id, d.patient_id, d.kind, d.heads, GREATEST(d.seq, c.seq) AS eff
                             FROM care_team c JOIN documents d ON d.patient_id = c.patient_id
                             WHERE c.user_id = $1 AND d.agency_id = $2
                               AND (GREATEST(d.seq, c.seq) > $3 OR (GREATEST(d.seq, c.seq) = $3 AND d.id > $4))
                             ORDER BY eff, d.id LIMIT $5",
                            &[
                                &user_id.as_str(),
                                &agency_id.as_str(),
                                &after_seq,
                                &after_doc,
                                &fetch,
                            ],
                        )
                        .await?
                    }
                };
                let more = rows.len() > query.limit;
                let entries = rows
                    .iter()
                    .take(query.limit)
                    .map(feed_entry)
                    .collect::<Result<Vec<_>>>()?;
                Ok(FeedPage { entries, more })
            })
        })
    }

    fn append_audit(&self, events: Vec<AuditEvent>) -> StorageFuture<'_, ()> {
        self.tx(move |tx| {
            Box::pin(async move {
                for e in &events {
                    insert_audit(tx, e).await?;
                }
                Ok(())
            })
        })
    }

    fn query_audit(&self, query: AuditQuery) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.read(move |tx| Box::pin(async move { query_audit_tx(tx, &query, None).await }))
    }

    fn document_row(&self, id: DocumentId) -> StorageFuture<'_, Option<DocumentRow>> {
        self.read(move |tx| {
            Box::pin(async move {
                let key: &[u8] = id.as_bytes().as_slice();
                let row = tx
                    .query_opt(
                        "SELECT agency_id, patient_id, kind,
                                (COALESCE(length(snapshot), 0)
                                 + (SELECT COALESCE(SUM(length(bytes)), 0) FROM document_chunks WHERE document_id = $1))::bigint,
                                heads
                         FROM documents WHERE id = $1",
                        &[&key],
                    )
                    .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                Ok(Some(DocumentRow {
                    meta: DocMeta {
                        agency_id: AgencyId::new(row.try_get::<_, String>(0)?),
                        patient_id: PatientId::new(row.try_get::<_, String>(1)?),
                        kind: row.try_get(2)?,
                    },
                    stored_bytes: u64::try_from(row.try_get::<_, i64>(3)?).unwrap_or(0),
                    heads: heads_from_bytes(row.try_get(4)?)?,
                }))
            })
        })
    }
}
