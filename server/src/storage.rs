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

pub mod faulty;
pub mod memory;
pub mod postgres;
pub mod sqlite;

#[cfg(test)]
mod conformance;

use std::fmt;

use automerge::ChangeHash;
use fieldchart_core::protocol::{DocumentId, StorageId};
use futures::future::BoxFuture;
use serde::Serialize;

use crate::error::Result;
use crate::identity::{Agency, AgencyId, Device, DeviceId, Patient, PatientId, Role, User, UserId};

pub use faulty::{Faults, FaultyStorage, WriteFault};
pub use memory::MemoryStorage;
pub use postgres::PostgresStorage;
pub use sqlite::{DatabaseKey, SqliteStorage};

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
    /// A device sent changes that tamper with a signed note (delete, alter or forge a
    /// signature, move the note); they were refused and not stored.
    Tamper,
}

impl AuditAction {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Read => "read",
            AuditAction::Write => "write",
            AuditAction::Deny => "deny",
            AuditAction::Tamper => "tamper",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<AuditAction> {
        match s {
            "read" => Some(AuditAction::Read),
            "write" => Some(AuditAction::Write),
            "deny" => Some(AuditAction::Deny),
            "tamper" => Some(AuditAction::Tamper),
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

// --- Administration, enrollment, device keys, offboarding ------------------------------------

/// One administrative action, as the audit trail records it (HIPAA "unique identity on every
/// action"): stored in the same transaction as the change it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminEvent {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// The agency acted on, when there is one.
    pub agency_id: Option<AgencyId>,
    /// Who: `usr_…` (an admin over the HTTP API, or a user redeeming an enrollment code) or
    /// `cli:<operator>` (the admin CLI).
    pub actor: String,
    /// The device the actor used, over HTTP.
    pub actor_device_id: Option<DeviceId>,
    /// `cli` or `http`.
    pub source: String,
    /// The peer address of an HTTP request.
    pub remote_addr: Option<String>,
    /// What (`create-user`, `issue-token`, `enroll`, `disable-user`, ...).
    pub action: String,
    /// The id acted on (user, patient, device, agency), or what was queried.
    pub target: String,
    /// A JSON object with the rest (names of users and devices, never patient data).
    pub details: String,
}

/// A stored [`AdminEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRecord {
    /// Row id, increasing in insertion order: the paging cursor.
    pub id: i64,
    /// The event.
    pub event: AdminEvent,
}

/// Which admin log rows to return: all conditions given must hold; rows with `id > after_id`,
/// in id order, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminLogQuery {
    /// Only rows about this agency.
    pub agency_id: Option<AgencyId>,
    /// Only rows acting on this target.
    pub target: Option<String>,
    /// Only rows by this actor.
    pub actor: Option<String>,
    /// Rows after this id (0: from the start).
    pub after_id: i64,
    /// Page size.
    pub limit: usize,
}

/// A one-time enrollment code, as stored (only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentCode {
    /// SHA-256 of the code.
    pub code_hash: [u8; 32],
    /// The user the enrolled device will belong to.
    pub user_id: UserId,
    /// The device name the admin gave.
    pub device_name: String,
    /// Issued at, ms since the epoch.
    pub created_at: i64,
    /// Refused from this time on.
    pub expires_at: i64,
    /// Who issued it (an [`AdminEvent::actor`]); becomes the device's `enrolled_by`.
    pub created_by: String,
}

/// Redeeming an enrollment code: consume it and create the device with its key, in one
/// transaction, with an `enroll-device` admin log row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redemption {
    /// SHA-256 of the presented code.
    pub code_hash: [u8; 32],
    /// Id of the device to create.
    pub device_id: DeviceId,
    /// A name the device gave itself; the admin's name for it when `None`.
    pub device_name: Option<String>,
    /// SHA-256 of the device's new token.
    pub token_hash: [u8; 32],
    /// Its Ed25519 public key.
    pub public_key: [u8; 32],
    /// Now, ms since the epoch.
    pub at_ms: i64,
    /// When the token expires.
    pub token_expires_at: i64,
    /// The peer address of the request.
    pub remote_addr: Option<String>,
}

/// An administrative change, applied by [`Storage::admin_change`] together with its audit row.
#[derive(Debug, Clone)]
pub enum AdminChange {
    /// Nothing changes; only the row is written (audit queries and exports, listings).
    Record,
    /// See [`Storage::insert_agency`].
    InsertAgency(Agency),
    /// See [`Storage::insert_user`].
    InsertUser(User),
    /// See [`Storage::insert_patient`].
    InsertPatient(Patient, Box<DocumentWrite>),
    /// See [`Storage::assign`].
    Assign {
        /// The user.
        user_id: UserId,
        /// The patient.
        patient_id: PatientId,
        /// When.
        at_ms: i64,
    },
    /// See [`Storage::unassign`].
    Unassign {
        /// The user.
        user_id: UserId,
        /// The patient.
        patient_id: PatientId,
    },
    /// A device with a bare token (no key), recording who issued it. Refused for a disabled
    /// user.
    InsertDevice {
        /// The device.
        device: Device,
        /// Who issued it (an [`AdminEvent::actor`]).
        issued_by: String,
    },
    /// See [`Storage::revoke_device`].
    RevokeDevice {
        /// The device.
        device_id: DeviceId,
        /// When.
        at_ms: i64,
    },
    /// Disable a user and revoke every device of theirs (each at its own sequence position,
    /// so a running relay closes their sessions). Idempotent.
    DisableUser {
        /// The user.
        user_id: UserId,
        /// When.
        at_ms: i64,
    },
    /// Store a new enrollment code. Refused for a disabled user.
    InsertEnrollmentCode(EnrollmentCode),
}

/// What an [`AdminChange`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOutcome {
    /// Done; nothing more to say.
    Done,
    /// A sequence position (patient chart, assignment).
    Seq(Seq),
    /// Whether anything changed (unassign, revoke, disable of an already disabled user).
    Changed(bool),
    /// Devices revoked by [`AdminChange::DisableUser`].
    Revoked(Vec<DeviceId>),
}

/// A device as the admin listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device.
    pub device: Device,
    /// Its Ed25519 public key, if it enrolled with one.
    pub public_key: Option<[u8; 32]>,
    /// Who issued or enrolled it.
    pub enrolled_by: Option<String>,
    /// When it last authenticated (to within a minute).
    pub last_seen_at: Option<i64>,
}

/// A device's signing key and whose it is: what a signature is verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKey {
    /// The device.
    pub device_id: DeviceId,
    /// Its user.
    pub user_id: UserId,
    /// The user's agency.
    pub agency_id: AgencyId,
    /// The user's role.
    pub role: Role,
    /// Ed25519 public key.
    pub public_key: [u8; 32],
    /// When the device enrolled, ms since the epoch.
    pub enrolled_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
}

/// How long a device's `last_seen_at` may lag: authentications within this interval of the
/// last recorded one are not written (one write a minute per device at most).
pub const LAST_SEEN_RESOLUTION_MS: i64 = 60_000;

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

    // --- administration, enrollment, device keys, offboarding ---

    /// Apply an administrative change and append its audit row, in one transaction: if either
    /// fails, neither is stored.
    fn admin_change(
        &self,
        change: AdminChange,
        event: AdminEvent,
    ) -> StorageFuture<'_, AdminOutcome>;

    /// A page of the admin log.
    fn admin_log(&self, query: AdminLogQuery) -> StorageFuture<'_, Vec<AdminRecord>>;

    /// Consume an enrollment code and create its device (see [`Redemption`]). An unknown code
    /// is [`crate::Error::NotFound`], a used one [`crate::Error::Conflict`], an expired one
    /// [`crate::Error::Expired`], a disabled user [`crate::Error::Forbidden`]; in every one of
    /// these cases nothing is written.
    fn redeem_enrollment(&self, redemption: Redemption) -> StorageFuture<'_, (Device, User)>;

    /// When the user was disabled, if they were (`None` also for an unknown user).
    fn user_disabled_at(&self, id: UserId) -> StorageFuture<'_, Option<i64>>;

    /// Every device of a user, oldest first.
    fn user_devices(&self, id: UserId) -> StorageFuture<'_, Vec<DeviceInfo>>;

    /// Record that a device authenticated at `at_ms`. Backends may skip the write when the
    /// stored time is within [`LAST_SEEN_RESOLUTION_MS`].
    fn touch_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, ()>;

    /// The signing key of a device, with its user, agency and role; `None` if the device has
    /// no key or does not exist.
    fn device_key(&self, id: DeviceId) -> StorageFuture<'_, Option<DeviceKey>>;

    /// Every device key of an agency (revoked ones too, with their revocation time), by
    /// enrollment time.
    fn agency_device_keys(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<DeviceKey>>;

    /// Like [`Storage::query_audit`], starting after the row `(at_ms, id)`: how audit queries
    /// page without ever truncating silently.
    fn audit_page(
        &self,
        query: AuditQuery,
        after: Option<(i64, i64)>,
    ) -> StorageFuture<'_, Vec<AuditRecord>>;

    /// A stored document, or `None` if the relay does not hold it.
    fn load_document(&self, id: DocumentId) -> StorageFuture<'_, Option<StoredDocument>>;

    /// Durably apply one write (see [`DocumentWrite`]) and return the document's new sequence
    /// position. A `create` of an existing document is [`crate::Error::Conflict`]; an update of
    /// a missing one is [`crate::Error::NotFound`].
    fn write_document(&self, write: DocumentWrite) -> StorageFuture<'_, Seq>;

    /// Like [`Storage::write_document`] (an update, not a create), applied only if the
    /// document's stored heads are still `base`, the heads the writer's copy was built from;
    /// otherwise [`crate::Error::Stale`] and nothing is written. How several relay processes
    /// share one document: the loser reloads, merges and retries (see `crate::docs`).
    fn write_document_on(
        &self,
        write: DocumentWrite,
        base: Vec<ChangeHash>,
    ) -> StorageFuture<'_, Seq>;

    /// A feed epoch shared by every relay process on this storage, if the backend keeps one
    /// (PostgreSQL); `None`: each process makes its own at start (SQLite, one process).
    fn shared_epoch(&self) -> StorageFuture<'_, Option<String>> {
        Box::pin(std::future::ready(Ok(None)))
    }

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

    /// [`Storage::document_row`] of many documents, in the order given (a batch fetch). By
    /// default [`BATCH_READS_IN_FLIGHT`] single reads at a time; a backend that can read them
    /// in one round trip does.
    fn document_rows(&self, ids: Vec<DocumentId>) -> StorageFuture<'_, Vec<Option<DocumentRow>>> {
        use futures::{StreamExt, TryStreamExt};
        Box::pin(
            futures::stream::iter(ids)
                .map(move |id| self.document_row(id))
                .buffered(BATCH_READS_IN_FLIGHT)
                .try_collect(),
        )
    }

    /// [`Storage::load_document`] of many documents, in the order given; as
    /// [`Storage::document_rows`].
    fn load_documents(
        &self,
        ids: Vec<DocumentId>,
    ) -> StorageFuture<'_, Vec<Option<StoredDocument>>> {
        use futures::{StreamExt, TryStreamExt};
        Box::pin(
            futures::stream::iter(ids)
                .map(move |id| self.load_document(id))
                .buffered(BATCH_READS_IN_FLIGHT)
                .try_collect(),
        )
    }
}

/// Single reads in flight at once in the default [`Storage::document_rows`] and
/// [`Storage::load_documents`]: each is a round trip to the database (or a blocking pool), and
/// one at a time they leave the relay mostly waiting.
pub const BATCH_READS_IN_FLIGHT: usize = 8;

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

/// The admin log row of a redemption: the user enrolled a device, provisioned by `created_by`.
pub(crate) fn enrollment_event(
    r: &Redemption,
    user: &User,
    device: &Device,
    created_by: &str,
) -> AdminEvent {
    AdminEvent {
        at_ms: r.at_ms,
        agency_id: Some(user.agency_id.clone()),
        actor: user.id.to_string(),
        actor_device_id: Some(device.id.clone()),
        source: "http".into(),
        remote_addr: r.remote_addr.clone(),
        action: "enroll-device".into(),
        target: device.id.to_string(),
        details: serde_json::json!({
            "userId": user.id,
            "deviceName": device.name,
            "publicKey": hex::encode(r.public_key),
            "enrolledBy": created_by,
        })
        .to_string(),
    }
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
