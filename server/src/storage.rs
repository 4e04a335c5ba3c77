//! Durable state of the relay behind one trait, so the embedded SQLite backend (the default) and
//! the PostgreSQL backend of a later issue are interchangeable and pass one conformance suite.
//!
//! # Shape of the trait
//! - **Async and object safe.** Every method returns a boxed future ([`StorageFuture`]), so the
//!   relay holds an `Arc<dyn Storage>` and a PostgreSQL backend can use an async driver. The
//!   SQLite backend runs each call on tokio's blocking pool against its connections; the
//!   in-memory backend answers synchronously inside the future.
//! - **One method, one transaction.** Methods are whole operations, not SQL statements:
//!   [`Storage::write_document`] appends the document's bytes, moves its heads, bumps the
//!   relay-wide sequence and appends the audit row together or not at all. Callers never see a
//!   transaction, which is what keeps both backends honest.
//! - **Callers make ids and timestamps**; backends store what they are given. Business rules
//!   (who may assign whom) live in [`crate::admin`] and [`crate::access`], not here.
//!
//! # The sequence
//! One relay-wide counter ([`Seq`]) orders everything the change feed reports: it is bumped in
//! the same transaction as a document whose stored heads change, a care-team assignment, and a
//! device revocation. A feed cursor is a position in it.

pub mod memory;
pub mod sqlite;

#[cfg(test)]
mod conformance;

use std::fmt;

use automerge::ChangeHash;
use fieldchart_core::protocol::{DocumentId, StorageId};
use futures::future::BoxFuture;
use serde::Serialize;

use crate::error::Result;
use crate::identity::{Agency, AgencyId, Device, DeviceId, Patient, PatientId, User, UserId};

pub use memory::MemoryStorage;
pub use sqlite::SqliteStorage;

/// The future every storage method returns.
pub type StorageFuture<'a, T> = BoxFuture<'a, Result<T>>;

/// A position in the relay-wide sequence (see the module docs).
pub type Seq = u64;

/// What the relay knows about a document without loading it: who it belongs to.
///
/// Read from the document's root fields when it is first stored, and fixed from then on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DocMeta {
    /// Root `agencyId`.
    pub agency_id: AgencyId,
    /// Root `patientId`.
    pub patient_id: PatientId,
    /// Root `kind` (`patient`, `visit-note`, ...), as the document spells it.
    pub kind: String,
}

/// A stored document: the last snapshot plus the incremental chunks appended since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    /// Who it belongs to.
    pub meta: DocMeta,
    /// The last compacted snapshot (`Automerge::save`), if any.
    pub snapshot: Option<Vec<u8>>,
    /// Change chunks appended after the snapshot, oldest first; each loads with
    /// `Automerge::load_incremental`.
    pub chunks: Vec<Vec<u8>>,
    /// Heads of everything stored.
    pub heads: Vec<ChangeHash>,
    /// Sequence position of the last change of the stored heads.
    pub seq: Seq,
}

/// The bytes of one document write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentData {
    /// A full save of the document; replaces the stored snapshot and every chunk, in the same
    /// transaction (compaction, or a new document).
    Snapshot(Vec<u8>),
    /// Raw bytes of the new changes, appended as one incremental chunk.
    Chunk(Vec<u8>),
}

/// One durable document write: bytes, heads, sequence bump and audit row, all or nothing.
#[derive(Debug, Clone)]
pub struct DocumentWrite {
    /// Which document.
    pub document_id: DocumentId,
    /// Who it belongs to (stored on create; must match on later writes).
    pub meta: DocMeta,
    /// `true`: the document must not exist yet; `false`: it must.
    pub create: bool,
    /// The bytes.
    pub data: DocumentData,
    /// Heads of the document after this write.
    pub heads: Vec<ChangeHash>,
    /// The audit row recording who wrote it, if a device did.
    pub audit: Option<AuditEvent>,
}

/// Whose automerge sync state this is: a peer (by its advertised `storageId`) of a user.
///
/// The user is part of the key so that one account can never resume from the state another
/// account's peer left behind, whatever `storageId` a client claims.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The authenticated user.
    pub user_id: UserId,
    /// The peer's `peerMetadata.storageId`.
    pub storage_id: StorageId,
}

/// What an audit row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    /// Document data was sent to a device.
    Read,
    /// Changes from a device were accepted and stored.
    Write,
    /// A device asked for or wrote a document it may not touch; nothing was sent or stored.
    Deny,
}

impl AuditAction {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Read => "read",
            AuditAction::Write => "write",
            AuditAction::Deny => "deny",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<AuditAction> {
        match s {
            "read" => Some(AuditAction::Read),
            "write" => Some(AuditAction::Write),
            "deny" => Some(AuditAction::Deny),
            _ => None,
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit event, before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// The agency whose record it is (the document's; the user's when the document claims an
    /// agency that is not theirs or none at all).
    pub agency_id: AgencyId,
    /// Who.
    pub user_id: UserId,
    /// On which device.
    pub device_id: DeviceId,
    /// Which document.
    pub document_id: DocumentId,
    /// Whose record, when known.
    pub patient_id: Option<PatientId>,
    /// What happened.
    pub action: AuditAction,
    /// The document heads involved (sent, stored, or the relay's heads when denied).
    pub heads: Vec<ChangeHash>,
}

/// A stored audit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Row id, increasing in insertion order.
    pub id: i64,
    /// The event.
    pub event: AuditEvent,
}

/// Which audit rows to return: all conditions given must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only rows about this patient.
    pub patient_id: Option<PatientId>,
    /// Only rows of this user.
    pub user_id: Option<UserId>,
    /// From this time, inclusive, ms since the epoch.
    pub from_ms: i64,
    /// Until this time, exclusive, ms since the epoch.
    pub to_ms: i64,
    /// At most this many rows, oldest first.
    pub limit: usize,
}

/// Whose documents a feed query covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedScope {
    /// Every document of the agency (office and admin users).
    Agency(AgencyId),
    /// Documents of the patients whose care team the user is on (clinicians).
    CareTeam {
        /// The user's agency: documents of other agencies never appear.
        agency_id: AgencyId,
        /// The user.
        user_id: UserId,
    },
}

/// A position in the change feed: after the entry `(seq, document_id)`.
///
/// Entries are ordered by `(seq, document_id)`; several documents can share one `seq` (all
/// documents of a patient become visible at the `seq` of the assignment), so a page may end in
/// the middle of a `seq` and the cursor names the last document too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeedCursor {
    /// Entries with a larger `seq` follow.
    pub seq: Seq,
    /// Entries with this `seq` and a larger document id follow; `None`: none with this `seq`.
    pub document_id: Option<DocumentId>,
}

/// A change-feed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedQuery {
    /// Whose documents.
    pub scope: FeedScope,
    /// Entries after this cursor.
    pub after: FeedCursor,
    /// Page size.
    pub limit: usize,
}

/// One document in the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    /// Which document.
    pub document_id: DocumentId,
    /// Who it belongs to.
    pub meta: DocMeta,
    /// Its stored heads.
    pub heads: Vec<ChangeHash>,
    /// Its position: the later of its last write and (for care-team scopes) the assignment
    /// that made it visible.
    pub seq: Seq,
}

/// A page of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPage {
    /// Entries in `(seq, document_id)` order.
    pub entries: Vec<FeedEntry>,
    /// More entries follow the last one.
    pub more: bool,
}

/// The relay's durable state. See the module docs for the contract every backend keeps.
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    /// The relay's stable storage id, advertised to peers in `peerMetadata.storageId`; made on
    /// first use and the same ever after.
    fn storage_id(&self) -> StorageFuture<'_, StorageId>;

    /// The current end of the relay-wide sequence.
    fn current_seq(&self) -> StorageFuture<'_, Seq>;

    /// Store a new agency.
    fn insert_agency(&self, agency: Agency) -> StorageFuture<'_, ()>;

    /// An agency by id.
    fn agency(&self, id: AgencyId) -> StorageFuture<'_, Option<Agency>>;

    /// Store a new user; its agency must exist.
    fn insert_user(&self, user: User) -> StorageFuture<'_, ()>;

    /// A user by id.
    fn user(&self, id: UserId) -> StorageFuture<'_, Option<User>>;

    /// Store a new patient together with its chart document (a `create` write), in one
    /// transaction. Returns the chart's sequence position.
    fn insert_patient(&self, patient: Patient, chart: DocumentWrite) -> StorageFuture<'_, Seq>;

    /// A patient by id.
    fn patient(&self, id: PatientId) -> StorageFuture<'_, Option<Patient>>;

    /// Put a user on a patient's care team. The assignment takes a new sequence position, so
    /// the patient's existing documents enter the user's change feed after any earlier cursor.
    /// Assigning twice keeps the first assignment and returns its position.
    fn assign(&self, user_id: UserId, patient_id: PatientId, at_ms: i64) -> StorageFuture<'_, Seq>;

    /// Take a user off a patient's care team; `false` if they were not on it.
    fn unassign(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool>;

    /// Whether the user is on the patient's care team.
    fn on_care_team(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool>;

    /// Store a new device; its user must exist and its token hash must be unique.
    fn insert_device(&self, device: Device) -> StorageFuture<'_, ()>;

    /// A device by id.
    fn device(&self, id: DeviceId) -> StorageFuture<'_, Option<Device>>;

    /// The device holding this token hash, with its user, whatever its expiry or revocation
    /// (the caller decides).
    fn device_by_token_hash(
        &self,
        token_hash: [u8; 32],
    ) -> StorageFuture<'_, Option<(Device, User)>>;

    /// Revoke a device at a new sequence position. `false` if it was already revoked;
    /// [`crate::Error::NotFound`] if there is no such device.
    fn revoke_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, bool>;

    /// Devices revoked at a sequence position after `after`, with those positions: how a
    /// running relay learns of revocations made by another process.
    fn revoked_devices_since(&self, after: Seq) -> StorageFuture<'_, Vec<(DeviceId, Seq)>>;

    /// A stored document, or `None` if the relay does not hold it.
    fn load_document(&self, id: DocumentId) -> StorageFuture<'_, Option<StoredDocument>>;

    /// Durably apply one write (see [`DocumentWrite`]) and return the document's new sequence
    /// position. A `create` of an existing document is [`crate::Error::Conflict`]; an update of
    /// a missing one is [`crate::Error::NotFound`].
    fn write_document(&self, write: DocumentWrite) -> StorageFuture<'_, Seq>;

    /// The persisted automerge sync state of a peer for a document.
    fn load_sync_state(
        &self,
        peer: PeerKey,
        document_id: DocumentId,
    ) -> StorageFuture<'_, Option<Vec<u8>>>;

    /// Persist sync states of a peer, in one transaction.
    fn save_sync_states(
        &self,
        peer: PeerKey,
        states: Vec<(DocumentId, Vec<u8>)>,
    ) -> StorageFuture<'_, ()>;

    /// A page of the change feed.
    fn changes(&self, query: FeedQuery) -> StorageFuture<'_, FeedPage>;

    /// Append audit rows, in one transaction.
    fn append_audit(&self, events: Vec<AuditEvent>) -> StorageFuture<'_, ()>;

    /// Audit rows matching a query, oldest first.
    fn query_audit(&self, query: AuditQuery) -> StorageFuture<'_, Vec<AuditRecord>>;

    /// Who a stored document belongs to and how many bytes it takes, without reading its
    /// bytes: what the relay authorizes from before it loads anything. `None` if the relay
    /// does not hold it.
    fn document_row(&self, id: DocumentId) -> StorageFuture<'_, Option<DocumentRow>>;
}

/// A stored document's row, without its contents ([`Storage::document_row`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentRow {
    /// Who it belongs to.
    pub meta: DocMeta,
    /// Bytes of its stored snapshot plus chunks.
    pub stored_bytes: u64,
    /// Heads of everything stored.
    pub heads: Vec<ChangeHash>,
}

/// Concatenated 32-byte hashes: how heads are stored.
pub(crate) fn heads_to_bytes(heads: &[ChangeHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(heads.len() * 32);
    for head in heads {
        out.extend_from_slice(&head.0);
    }
    out
}

/// Inverse of [`heads_to_bytes`]; stored bytes that are not whole hashes are an error.
pub(crate) fn heads_from_bytes(bytes: &[u8]) -> Result<Vec<ChangeHash>> {
    if !bytes.len().is_multiple_of(32) {
        return Err(crate::Error::Storage(format!(
            "stored heads of {} bytes",
            bytes.len()
        )));
    }
    bytes
        .chunks_exact(32)
        .map(|chunk| {
            ChangeHash::try_from(chunk)
                .map_err(|e| crate::Error::Storage(format!("stored head: {e}")))
        })
        .collect()
}
