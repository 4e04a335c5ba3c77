//! Device sync as sans-IO code: a [`SyncPass`] decides what to ask the relay and what to store;
//! the caller (the mobile driver, a test) moves the bytes.
//!
//! # A pass
//!
//! 1. Read the relay's change feed (`GET /v1/changes?since=CURSOR`, every page) from the cursor
//!    persisted for that relay. The first pass against a relay learns its `storageId` from the
//!    WebSocket handshake first, because cursors, receipts and sync states are keyed by it.
//! 2. Plan ([`crate::store::Store::plan_sync`]): the documents to sync are the feed entries
//!    whose relay heads differ from what this device already knows the relay has (or that this
//!    device lacks), plus every document with local changes the relay has not confirmed.
//!    Documents unchanged on both sides cost nothing; a document whose relay heads in the feed
//!    equal its local heads is confirmed from the feed alone, without a message.
//! 3. Open the WebSocket only if something needs syncing (or in live mode), and run
//!    automerge-repo protocol v1 for each planned document — `request` for documents this
//!    device lacks, `sync` otherwise — at most [`PassConfig::max_docs_in_flight`] at once so
//!    a large caseload streams. Every received message is applied and persisted (document,
//!    index rows, sync state, receipt) in one transaction before the reply is generated.
//! 4. Persist the feed cursor only up to the last page whose documents are all settled, so a
//!    pass cut at any point resumes without losing an entry; persisted sync states and
//!    receipts make the repeated part cheap.
//! 5. If the pass pushed changes, read the feed once more: the relay lists our own writes as
//!    changes, and absorbing them now (they match the receipts just recorded) keeps the next
//!    reconnect at one empty feed page.
//!
//! # Receipts
//!
//! The relay replies to a `sync` only after committing what it received, so the heads it
//! reports are durable there. After every received message the device records, per document,
//! the heads it knows the relay holds (automerge's shared heads) and when they were first
//! confirmed: that is the nurse's receipt ([`Receipt`]). When they equal the document's heads,
//! the document's `unsynced` flag is cleared in the same transaction.
//!
//! # Failures
//!
//! A document the relay refuses (`doc-unavailable`) while it holds data only this device has,
//! and every unconfirmed document when the token is rejected, is listed in
//! [`crate::store::Store::sync_failures`] with the reason. Refused documents are retried no
//! sooner than an exponential backoff ([`FAILURE_RETRY_BASE_MS`] doubling up to
//! [`FAILURE_RETRY_MAX_MS`]); they are never deleted and never retried silently — each retry
//! is counted in the failure row the UI shows.

mod feed;
pub mod fetch;
mod pass;
#[cfg(test)]
mod tests;

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use crate::protocol::DocumentId;

pub use feed::{FeedEntry, FeedPage};
pub use pass::{
    DEFAULT_FETCH_BATCH_DOCS, DEFAULT_FETCHES_IN_FLIGHT, DEFAULT_MAX_DOCS_IN_FLIGHT,
    FEED_PAGE_LIMIT, MAX_FEED_ROUNDS, MAX_MESSAGES_PER_DOC, PassAction, PassConfig, PassEvent,
    PassStats, PassStatus, SyncPass,
};

/// First retry of a refused document, ms after the refusal.
pub const FAILURE_RETRY_BASE_MS: i64 = 15 * 60 * 1000;

/// Longest wait between retries of a refused document, ms (a day): a refusal is usually a
/// permission the office has to fix, so retrying more often only adds relay load.
pub const FAILURE_RETRY_MAX_MS: i64 = 24 * 3600 * 1000;

/// When a document refused `attempts` times may be tried again.
pub fn failure_retry_at(at_ms: i64, attempts: u32) -> i64 {
    let exponent = attempts.saturating_sub(1).min(20);
    let delay = FAILURE_RETRY_BASE_MS
        .saturating_mul(1_i64 << exponent)
        .min(FAILURE_RETRY_MAX_MS);
    at_ms.saturating_add(delay)
}

/// What the relay has confirmed it holds of a document: "stored at the agency, as of when".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Heads the relay confirmed durable (sorted).
    pub heads: Vec<ChangeHash>,
    /// When this device first learned the relay holds these heads, ms since the epoch.
    pub confirmed_at_ms: i64,
    /// Whether the receipt covers the document as it is now on this device (no local change
    /// since).
    pub covers_current: bool,
}

/// A document whose current state the relay has not confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnconfirmedDocument {
    /// The document.
    pub document_id: DocumentId,
    /// Root `kind`, from the index.
    pub kind: Option<String>,
    /// Root `patientId`, from the index.
    pub patient_id: Option<String>,
    /// Whether it has local changes not yet confirmed (else: never confirmed by this relay).
    pub local_changes: bool,
    /// When the relay last confirmed an earlier state of it, if ever.
    pub last_confirmed_at_ms: Option<i64>,
}

/// Why a document is in the failure list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The relay answered `doc-unavailable` for data only this device holds (no access to
    /// the patient, or the relay refused the document).
    Refused,
    /// The device's token was rejected (revoked, expired, unknown) while the document had
    /// unconfirmed changes. Cleared as soon as a pass authenticates again.
    Unauthorized,
    /// The relay sent data for the document that could not be applied.
    Invalid,
}

impl FailureKind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::Invalid => "invalid",
        }
    }

    /// Parse a stored name (unknown names read as `Refused`, the most conservative).
    pub fn parse(s: &str) -> FailureKind {
        match s {
            "unauthorized" => FailureKind::Unauthorized,
            "invalid" => FailureKind::Invalid,
            _ => FailureKind::Refused,
        }
    }
}

/// A document sync could not deliver, shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFailure {
    /// The document (still in the store, with all its data).
    pub document_id: DocumentId,
    /// Root `kind`, from the index.
    pub kind: Option<String>,
    /// Root `patientId`, from the index.
    pub patient_id: Option<String>,
    /// What went wrong.
    pub failure: FailureKind,
    /// Human-readable reason (no patient data).
    pub reason: String,
    /// Last failure, ms since the epoch.
    pub at_ms: i64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not retried before this time, ms since the epoch (0: at the next pass).
    pub retry_at_ms: i64,
}

/// How a planned document starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    /// This device lacks the document: ask for it (`request`).
    Request,
    /// This device holds it: `sync` from the persisted state.
    Sync,
}

/// One document a pass will sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDoc {
    /// The document.
    pub document_id: DocumentId,
    /// `request` or `sync`.
    pub mode: PlanMode,
    /// Whether this device has changes the relay has not confirmed.
    pub local_changes: bool,
    /// The relay is presumed not to hold it: it has unconfirmed changes, no receipt, sync
    /// state or failure for this relay, and the feed did not list it (a note charted here and
    /// never offered). Its first message carries the whole document instead of announcing
    /// heads and waiting to be asked (see [`crate::protocol::DocSync::presume_peer_has_nothing`]).
    pub relay_lacks: bool,
}

/// What [`crate::store::Store::plan_sync`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPlan {
    /// Documents to sync: feed entries first, in feed order, then local ones.
    pub docs: Vec<PlannedDoc>,
    /// Feed entries whose relay heads equal the local heads: confirmed (receipt recorded,
    /// `unsynced` cleared) without a message.
    pub confirmed_from_feed: usize,
    /// Feed entries that needed nothing.
    pub unchanged: usize,
}

/// What applying one received sync message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedSync {
    /// The document was new to this store and is now stored.
    pub created: bool,
    /// The message brought changes.
    pub changed: bool,
    /// Both sides now have exactly the same heads (the relay said so, durably).
    pub in_sync: bool,
}
