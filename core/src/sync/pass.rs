//! [`SyncPass`]: one sync pass as a state machine. Events in ([`PassEvent`]: feed answers,
//! frames, connection changes, timers the caller runs), actions out ([`PassAction`]: requests
//! to make, frames to send, completion); storage effects go through [`Store`] methods, each
//! one transaction, before the action that depends on them is returned.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use serde::Serialize;

use super::fetch::{FetchRecord, MAX_FETCH_IDS, decode_fetch_response, fetch_request_body};
use super::{FeedEntry, FeedPage, PlanMode, PlannedDoc};
use crate::protocol::{
    DocSync, DocumentId, Message, PROTOCOL_VERSION, PeerId, PeerMetadata, ProtocolError, StorageId,
};
use crate::store::{FetchedImport, Store};
use crate::{Error, Result};

/// Feed reads in one pass: the first, and up to two more to absorb the relay's echo of our
/// own writes (and whatever arrived meanwhile). Bounded so a busy relay cannot keep a pass
/// running forever; what is left is the next pass's first page.
pub const MAX_FEED_ROUNDS: usize = 3;

/// Messages sent for one document in one pass before it is given up as not converging (an
/// exchange takes two to four). Bounds a ping-pong with a misbehaving relay.
pub const MAX_MESSAGES_PER_DOC: u32 = 64;

/// Documents with an exchange in progress at once, by default. Enough to keep the link busy
/// (the relay answers each in well under a millisecond) while a large caseload streams
/// through with bounded memory on both sides.
pub const DEFAULT_MAX_DOCS_IN_FLIGHT: usize = 32;

/// Largest first message that carries a whole document the relay is presumed to lack
/// ([`crate::sync::PlannedDoc::relay_lacks`]); a larger document announces its heads first.
pub const MAX_PRESUMED_UPLOAD_BYTES: usize = 64 * 1024;

/// Entries asked per feed page (the relay's maximum).
pub const FEED_PAGE_LIMIT: usize = 1_000;

/// Documents asked for in one batch fetch, by default (see [`crate::sync::fetch`]): the most
/// a request may name. Each batch is stored in one transaction, and document ids are random,
/// so every commit rewrites (re-encrypts) most pages of the doc-keyed tables: half as many
/// commits as with 250 was ~8% off a first sync of 5,000. The answers stay under a megabyte
/// for typical visit notes, and the next batch still overlaps the import of this one.
pub const DEFAULT_FETCH_BATCH_DOCS: usize = MAX_FETCH_IDS;

/// Batch fetches in flight at once, by default: one being imported while the next arrives.
pub const DEFAULT_FETCHES_IN_FLIGHT: usize = 2;

/// Feed pages read in one round before planning with what is known (10 million entries at
/// the default page size); the rest is the next round's or the next pass's.
const MAX_FEED_PAGES: usize = 10_000;

/// WebSocket close codes the relay uses that the pass tells apart (RFC 6455 §7.4.1).
mod close_code {
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const POLICY: u16 = 1008;
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// How a pass runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassConfig {
    /// The relay as the app is configured with it (its base URL): the key under which its
    /// storage id is remembered.
    pub relay: String,
    /// Stay connected after the pass: sync local changes as they are reported and apply what
    /// the relay forwards, until stopped.
    pub live: bool,
    /// Documents with an exchange in progress at once.
    pub max_docs_in_flight: usize,
    /// Entries asked per feed page.
    pub feed_page_limit: usize,
    /// Documents this device lacks are fetched whole in batches of this many (at most
    /// [`MAX_FETCH_IDS`]); 0 turns batch fetches off (one `request` exchange per document).
    pub fetch_batch_docs: usize,
    /// Batch fetches in flight at once.
    pub max_fetches_in_flight: usize,
}

impl PassConfig {
    /// Defaults for the relay at `relay`.
    pub fn new(relay: impl Into<String>) -> PassConfig {
        PassConfig {
            relay: relay.into(),
            live: false,
            max_docs_in_flight: DEFAULT_MAX_DOCS_IN_FLIGHT,
            feed_page_limit: FEED_PAGE_LIMIT,
            fetch_batch_docs: DEFAULT_FETCH_BATCH_DOCS,
            max_fetches_in_flight: DEFAULT_FETCHES_IN_FLIGHT,
        }
    }
}

/// What happened, as the caller reports it.
#[derive(Clone, PartialEq, Eq)]
pub enum PassEvent {
    /// The answer to [`PassAction::FetchFeed`]: HTTP status and body.
    FeedResponse { status: u16, body: Vec<u8> },
    /// [`PassAction::FetchFeed`] got no answer (DNS, TCP, TLS, timeout).
    FeedUnreachable { error: String },
    /// The answer to [`PassAction::FetchDocuments`] (the same `ids`): HTTP status and body.
    DocumentsResponse {
        ids: Vec<DocumentId>,
        status: u16,
        body: Vec<u8>,
    },
    /// [`PassAction::FetchDocuments`] (the same `ids`) failed before its whole answer arrived:
    /// the part of a `200` body that did arrive (records in it that are whole are kept), and
    /// the error.
    DocumentsUnreachable {
        ids: Vec<DocumentId>,
        partial: Vec<u8>,
        error: String,
    },
    /// [`PassAction::Connect`] succeeded: the WebSocket is open.
    Connected,
    /// The relay answered the WebSocket upgrade with an HTTP error status (401: token
    /// rejected; 503: full).
    ConnectRefused { status: u16 },
    /// [`PassAction::Connect`] failed otherwise.
    ConnectFailed { error: String },
    /// A binary frame from the relay.
    Frame(Vec<u8>),
    /// The WebSocket is gone: the relay's close frame (code, reason) if it sent one, and the
    /// transport error if there was one.
    ConnectionLost {
        close: Option<(u16, String)>,
        error: Option<String>,
    },
    /// A local edit to a document (live mode: sync it now).
    LocalChange(DocumentId),
    /// Live mode: time to read the change feed again (documents nobody forwards to this
    /// session, e.g. a note another nurse just created).
    FeedPollDue,
    /// The pass's time budget ran out: stop now (everything so far is persisted).
    BudgetExpired,
    /// The app asked to stop (live mode ends this way).
    Stop,
}

impl fmt::Debug for PassEvent {
    /// Frames and bodies are shown as lengths: they carry clinical content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PassEvent::FeedResponse { status, body } => {
                write!(f, "FeedResponse({status}, <{} bytes>)", body.len())
            }
            PassEvent::FeedUnreachable { error } => write!(f, "FeedUnreachable({error})"),
            PassEvent::DocumentsResponse { ids, status, body } => write!(
                f,
                "DocumentsResponse({} ids, {status}, <{} bytes>)",
                ids.len(),
                body.len()
            ),
            PassEvent::DocumentsUnreachable {
                ids,
                partial,
                error,
            } => write!(
                f,
                "DocumentsUnreachable({} ids, <{} bytes>, {error})",
                ids.len(),
                partial.len()
            ),
            PassEvent::Connected => f.write_str("Connected"),
            PassEvent::ConnectRefused { status } => write!(f, "ConnectRefused({status})"),
            PassEvent::ConnectFailed { error } => write!(f, "ConnectFailed({error})"),
            PassEvent::Frame(bytes) => write!(f, "Frame(<{} bytes>)", bytes.len()),
            PassEvent::ConnectionLost { close, error } => {
                write!(f, "ConnectionLost({close:?}, {error:?})")
            }
            PassEvent::LocalChange(id) => write!(f, "LocalChange({id})"),
            PassEvent::FeedPollDue => f.write_str("FeedPollDue"),
            PassEvent::BudgetExpired => f.write_str("BudgetExpired"),
            PassEvent::Stop => f.write_str("Stop"),
        }
    }
}

/// What the caller must do next, in order.
#[derive(Clone, PartialEq, Eq)]
pub enum PassAction {
    /// `GET /v1/changes?since=…&limit=…` with the device's bearer token; report the answer as
    /// [`PassEvent::FeedResponse`].
    FetchFeed { since: Option<String>, limit: usize },
    /// `POST` `body` to [`crate::sync::fetch::FETCH_PATH`] with the device's bearer token;
    /// report [`PassEvent::DocumentsResponse`] (or [`PassEvent::DocumentsUnreachable`]) with
    /// the same `ids`. Several may be in flight at once, alongside the WebSocket.
    FetchDocuments { ids: Vec<DocumentId>, body: Vec<u8> },
    /// Open the WebSocket to `/v1/sync`; report [`PassEvent::Connected`] or a failure.
    Connect,
    /// Send one binary frame.
    Send(Vec<u8>),
    /// Close the WebSocket (normal closure).
    Close,
    /// A document changed because of what the relay sent (for listeners, e.g. an open chart).
    DocumentChanged(DocumentId),
    /// Live mode: connected, and everything planned is settled; the session now waits for
    /// changes. Said each time the session becomes idle.
    UpToDate,
    /// The pass is over; nothing more will be asked.
    Finished(PassStatus),
}

impl fmt::Debug for PassAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PassAction::FetchFeed { since, limit } => write!(f, "FetchFeed({since:?}, {limit})"),
            PassAction::FetchDocuments { ids, .. } => {
                write!(f, "FetchDocuments({} ids)", ids.len())
            }
            PassAction::Connect => f.write_str("Connect"),
            PassAction::Send(bytes) => write!(f, "Send(<{} bytes>)", bytes.len()),
            PassAction::Close => f.write_str("Close"),
            PassAction::DocumentChanged(id) => write!(f, "DocumentChanged({id})"),
            PassAction::UpToDate => f.write_str("UpToDate"),
            PassAction::Finished(status) => write!(f, "Finished({status:?})"),
        }
    }
}

/// How a pass ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "kebab-case")]
pub enum PassStatus {
    /// Everything planned is in sync (or in the failure list).
    Complete,
    /// Stopped on request (live mode).
    Stopped,
    /// The time budget ran out; the next pass continues where this one stopped.
    BudgetExhausted,
    /// The relay closed the session because this device was revoked. Local data is intact
    /// and listed as unconfirmed; the device needs a new token.
    Revoked,
    /// The device token expired; the device needs a new token.
    TokenExpired,
    /// The relay rejected the token (HTTP 401: revoked, expired or unknown).
    Unauthorized,
    /// The network failed (connection refused or dropped, timeout). Retry with backoff.
    Interrupted(String),
    /// The relay failed or misbehaved (5xx, an `error` message, an unreadable answer). Retry
    /// with backoff.
    RelayError(String),
    /// This device's store failed (e.g. disk full).
    LocalError(String),
}

impl PassStatus {
    /// Whether trying again later (with backoff) may succeed without the user doing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PassStatus::Interrupted(_) | PassStatus::RelayError(_))
    }

    /// Whether the device's credentials were refused (sign in again).
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            PassStatus::Revoked | PassStatus::TokenExpired | PassStatus::Unauthorized
        )
    }
}

/// Counters of a pass, for progress and the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PassStats {
    /// Documents planned (the progress total).
    pub docs_total: usize,
    /// Planned documents settled: in sync, refused or given up (the progress count).
    pub docs_done: usize,
    /// Planned documents that ended in sync.
    pub docs_synced: usize,
    /// Documents new to this device, stored.
    pub docs_fetched: usize,
    /// Of those, documents stored from batch fetches (no WebSocket message).
    pub docs_batch_fetched: usize,
    /// Batch fetch requests made.
    pub fetch_requests: usize,
    /// Documents that received changes from the relay.
    pub docs_changed: usize,
    /// Documents listed in the failure list by this pass.
    pub docs_failed: usize,
    /// Feed entries confirmed from their heads alone (no message).
    pub confirmed_from_feed: usize,
    /// Feed entries that needed nothing.
    pub feed_unchanged: usize,
    /// Feed entries read.
    pub feed_entries: usize,
    /// Feed pages read.
    pub feed_pages: usize,
    /// The relay answered with a reset (new epoch, or our cursor was from its future: it may
    /// have been restored from a backup) and this pass reconciled every document against it.
    pub reconciled: bool,
    /// Receipts withdrawn by that reconciliation: the relay could not back them (it lacks the
    /// document, or holds other heads); those documents are pushed again.
    pub receipts_withdrawn: usize,
}

#[derive(Debug)]
enum Conn {
    Closed,
    Connecting,
    /// `join` sent, waiting for `peer`.
    Joining,
    Ready {
        relay: PeerId,
    },
}

#[derive(Debug)]
enum Phase {
    /// First contact with this relay: learn its storage id from the handshake first.
    Handshake,
    /// Reading the feed.
    Feed {
        entries: Vec<(usize, FeedEntry)>,
        pages: Vec<String>,
        /// The relay answered the first page with a reset: reconcile before planning.
        reset: bool,
        /// Every page was read (`more` was false on the last one).
        complete: bool,
    },
    /// Syncing planned documents.
    Syncing,
    /// Live mode with nothing to do.
    Idle,
    /// Finished.
    Done,
}

#[derive(Debug, Clone, Copy)]
struct DocTask {
    mode: PlanMode,
    /// Feed page that listed it, if any (the cursor may not pass that page before it settles).
    page: Option<usize>,
    local_changes: bool,
    relay_lacks: bool,
    messages: u32,
}

#[derive(Debug)]
struct PageMark {
    next: String,
    pending: usize,
}

/// One sync pass. See the module docs of [`crate::sync`].
#[derive(Debug)]
pub struct SyncPass {
    config: PassConfig,
    local_peer: PeerId,
    local_storage: StorageId,
    /// The relay's storage id: the key of cursors, sync states and receipts.
    peer: Option<String>,
    first_contact: bool,
    conn: Conn,
    phase: Phase,
    queue: VecDeque<(DocumentId, DocTask)>,
    queued: HashSet<DocumentId>,
    in_flight: HashMap<DocumentId, DocTask>,
    /// Documents this device lacks, waiting for a batch fetch (their ids are in `queued`).
    fetch_queue: VecDeque<(DocumentId, DocTask)>,
    /// Documents in a batch fetch that has not answered yet.
    fetching: HashMap<DocumentId, DocTask>,
    fetches_in_flight: usize,
    /// Whether documents this device lacks go through batch fetches (off when configured so,
    /// or after the relay did not serve one: the WebSocket does the same job).
    batch_fetch: bool,
    /// Sync states of every document exchanged in this session (kept after a document
    /// settles: the relay keeps forwarding changes to documents this session synced).
    states: HashMap<DocumentId, DocSync>,
    pages: Vec<PageMark>,
    persisted_pages: usize,
    cursor: Option<String>,
    rounds: usize,
    round_from_feed: bool,
    pushed: bool,
    /// Live mode: whether [`PassAction::UpToDate`] was said since the session went idle.
    announced: bool,
    authenticated: bool,
    /// Local changes reported while the feed is read; queued once the plan is made.
    pending_local: Vec<DocumentId>,
    relay_error: Option<String>,
    status: Option<PassStatus>,
    stats: PassStats,
}

impl SyncPass {
    /// Begin a pass: returns the pass and its first actions.
    pub fn start(store: &Store, config: PassConfig) -> (SyncPass, Vec<PassAction>) {
        let mut out = Vec::new();
        let local_storage = match store.sync_storage_id() {
            Ok(id) => id,
            Err(e) => {
                let status = PassStatus::LocalError(e.to_string());
                out.push(PassAction::Finished(status.clone()));
                let mut pass = SyncPass::new(config, StorageId::new("unavailable".into()));
                pass.phase = Phase::Done;
                pass.status = Some(status);
                return (pass, out);
            }
        };
        let mut pass = SyncPass::new(config, local_storage);
        let started = match store.relay_peer(&pass.config.relay) {
            Ok(Some(peer)) => {
                pass.peer = Some(peer);
                pass.begin_feed(store, &mut out)
            }
            Ok(None) => {
                // Cursors and receipts are keyed by the relay's storage id, which only the
                // handshake tells.
                pass.phase = Phase::Handshake;
                pass.connect(&mut out);
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            pass.finish(PassStatus::LocalError(e.to_string()), &mut out);
        }
        (pass, out)
    }

    fn new(config: PassConfig, local_storage: StorageId) -> SyncPass {
        // A live pass syncs every document over its socket: the relay forwards other
        // devices' changes only for documents a session has synced, and a batch fetch would
        // leave the fetched ones unforwarded until the next feed poll.
        let batch_fetch = config.fetch_batch_docs > 0 && !config.live;
        SyncPass {
            // Stable per store: a second `join` with the same sender id replaces the old
            // socket on the relay, so a connection the phone lost track of is dropped promptly.
            local_peer: PeerId::new(format!("peer-{}", local_storage.as_str())),
            local_storage,
            config,
            peer: None,
            first_contact: false,
            conn: Conn::Closed,
            phase: Phase::Syncing,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: HashMap::new(),
            fetch_queue: VecDeque::new(),
            fetching: HashMap::new(),
            fetches_in_flight: 0,
            batch_fetch,
            states: HashMap::new(),
            pages: Vec::new(),
            persisted_pages: 0,
            cursor: None,
            rounds: 0,
            round_from_feed: false,
            pushed: false,
            announced: false,
            authenticated: false,
            pending_local: Vec::new(),
            relay_error: None,
            status: None,
            stats: PassStats::default(),
        }
    }

    /// Handle one event; returns what to do next.
    pub fn handle(&mut self, store: &Store, event: PassEvent) -> Vec<PassAction> {
        let mut out = Vec::new();
        if matches!(self.phase, Phase::Done) {
            return out;
        }
        let handled = self
            .on_event(store, event, &mut out)
            .and_then(|()| self.drive(store, &mut out));
        if let Err(e) = handled {
            tracing::error!(error = %e, "sync pass stopped by a local storage error");
            self.finish(PassStatus::LocalError(e.to_string()), &mut out);
        }
        out
    }

    /// How the pass runs.
    pub fn config(&self) -> &PassConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> &PassStats {
        &self.stats
    }

    /// How the pass ended, once it has.
    pub fn status(&self) -> Option<&PassStatus> {
        self.status.as_ref()
    }

    /// Whether the pass is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Whether the pass is waiting on the relay to answer (the caller runs its reply timeout
    /// only then: an idle live connection is quiet on purpose).
    pub fn awaiting_relay(&self) -> bool {
        match self.conn {
            Conn::Joining => true,
            Conn::Ready { .. } => !self.in_flight.is_empty(),
            Conn::Closed | Conn::Connecting => false,
        }
    }

    /// This store's storage id, as advertised in `join`.
    pub fn local_storage_id(&self) -> &StorageId {
        &self.local_storage
    }

    /// The relay storage this pass syncs with, once known.
    pub fn relay_storage_id(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    fn on_event(
        &mut self,
        store: &Store,
        event: PassEvent,
        out: &mut Vec<PassAction>,
    ) -> Result<()> {
        match event {
            PassEvent::FeedResponse { status, body } => self.on_feed(store, status, &body, out),
            PassEvent::DocumentsResponse { ids, status, body } => {
                self.on_documents(store, &ids, status, &body, None, out)
            }
            PassEvent::DocumentsUnreachable {
                ids,
                partial,
                error,
            } => self.on_documents(store, &ids, 200, &partial, Some(error), out),
            PassEvent::FeedUnreachable { error } => {
                self.finish(
                    PassStatus::Interrupted(format!("change feed unreachable: {error}")),
                    out,
                );
                Ok(())
            }
            PassEvent::Connected => {
                if matches!(self.conn, Conn::Connecting) {
                    self.conn = Conn::Joining;
                    out.push(PassAction::Send(
                        Message::Join {
                            sender_id: self.local_peer.clone(),
                            peer_metadata: PeerMetadata {
                                storage_id: Some(self.local_storage.clone()),
                                is_ephemeral: false,
                            },
                            supported_protocol_versions: vec![PROTOCOL_VERSION.to_owned()],
                        }
                        .encode(),
                    ));
                }
                Ok(())
            }
            PassEvent::ConnectRefused { status } => {
                self.conn = Conn::Closed;
                match status {
                    401 => self.unauthorized(store, PassStatus::Unauthorized, out)?,
                    408 | 429 | 500..=599 => self.finish(
                        PassStatus::Interrupted(format!("relay answered HTTP {status} to connect")),
                        out,
                    ),
                    _ => self.finish(
                        PassStatus::RelayError(format!("relay answered HTTP {status} to connect")),
                        out,
                    ),
                }
                Ok(())
            }
            PassEvent::ConnectFailed { error } => {
                self.conn = Conn::Closed;
                self.finish(
                    PassStatus::Interrupted(format!("cannot connect: {error}")),
                    out,
                );
                Ok(())
            }
            PassEvent::Frame(bytes) => self.on_frame(store, &bytes, out),
            PassEvent::ConnectionLost { close, error } => {
                self.conn = Conn::Closed;
                let status = self.classify_close(close, error);
                if status.is_auth_failure() {
                    self.unauthorized(store, status, out)?;
                } else {
                    self.finish(status, out);
                }
                Ok(())
            }
            PassEvent::LocalChange(id) => {
                if !self.config.live {
                    // The document is flagged unsynced; the next pass picks it up.
                    return Ok(());
                }
                match self.phase {
                    Phase::Handshake | Phase::Feed { .. } => self.pending_local.push(id),
                    Phase::Idle => {
                        self.enqueue_local(id);
                        self.phase = Phase::Syncing;
                        self.round_from_feed = false;
                        self.pushed = false;
                    }
                    Phase::Syncing => self.enqueue_local(id),
                    Phase::Done => {}
                }
                Ok(())
            }
            PassEvent::FeedPollDue => {
                if matches!(self.phase, Phase::Idle) {
                    self.begin_feed(store, out)?;
                }
                Ok(())
            }
            PassEvent::BudgetExpired => {
                self.finish(PassStatus::BudgetExhausted, out);
                Ok(())
            }
            PassEvent::Stop => {
                self.finish(PassStatus::Stopped, out);
                Ok(())
            }
        }
    }

    fn peer(&self) -> Result<&str> {
        self.peer
            .as_deref()
            .ok_or_else(|| Error::InvalidInput("relay storage id not known yet".into()))
    }

    fn connect(&mut self, out: &mut Vec<PassAction>) {
        if matches!(self.conn, Conn::Closed) {
            self.conn = Conn::Connecting;
            out.push(PassAction::Connect);
        }
    }

    fn begin_feed(&mut self, store: &Store, out: &mut Vec<PassAction>) -> Result<()> {
        let since = store.feed_cursor(self.peer()?)?;
        self.first_contact = since.is_none();
        self.cursor.clone_from(&since);
        self.phase = Phase::Feed {
            entries: Vec::new(),
            pages: Vec::new(),
            reset: false,
            complete: false,
        };
        out.push(PassAction::FetchFeed {
            since,
            limit: self.config.feed_page_limit,
        });
        Ok(())
    }

    fn on_feed(
        &mut self,
        store: &Store,
        status: u16,
        body: &[u8],
        out: &mut Vec<PassAction>,
    ) -> Result<()> {
        if !matches!(self.phase, Phase::Feed { .. }) {
            return Ok(());
        }
        match status {
            200 => {}
            401 => return self.unauthorized(store, PassStatus::Unauthorized, out),
            408 | 429 | 500..=599 => {
                self.finish(
                    PassStatus::Interrupted(format!("change feed answered HTTP {status}")),
                    out,
                );
                return Ok(());
            }
            _ => {
                self.finish(
                    PassStatus::RelayError(format!("change feed answered HTTP {status}")),
                    out,
                );
                return Ok(());
            }
        }
        let page = match FeedPage::parse(body) {
            Ok(page) => page,
            Err(e) => {
                self.finish(PassStatus::RelayError(e.to_string()), out);
                return Ok(());
            }
        };
        if !self.authenticated {
            self.authenticated = true;
            store.clear_unauthorized(self.peer()?)?;
        }
        self.stats.feed_pages += 1;
        self.stats.feed_entries += page.changes.len();
        let sent_cursor = self.cursor.clone();
        let Phase::Feed {
            entries,
            pages,
            reset,
            complete,
        } = &mut self.phase
        else {
            return Ok(());
        };
        let index = pages.len();
        if index == 0 {
            // A new epoch (the relay restarted, perhaps from a backup), or a cursor the relay
            // says it never issued: it may be behind what it once confirmed.
            // No cursor at all also reconciles: the listing is then the whole caseload anyway,
            // and a device can hold receipts without a cursor (a pass cut after a push was
            // confirmed but before its first feed page settled) from a relay since restored.
            *reset = page.reset
                || sent_cursor.is_none()
                || epoch_changed(sent_cursor.as_deref(), page.epoch.as_deref());
        }
        *complete = !page.more;
        pages.push(page.next.clone());
        entries.extend(page.changes.into_iter().map(|e| (index, e)));
        if page.more && pages.len() < MAX_FEED_PAGES {
            out.push(PassAction::FetchFeed {
                since: Some(page.next),
                limit: self.config.feed_page_limit,
            });
            return Ok(());
        }
        self.plan(store)
    }

    fn plan(&mut self, store: &Store) -> Result<()> {
        let Phase::Feed {
            entries,
            pages,
            reset,
            complete,
        } = std::mem::replace(&mut self.phase, Phase::Syncing)
        else {
            return Ok(());
        };
        if reset {
            // The listing is the relay's whole caseload for us, page by page: compare every
            // document we hold with it. Sync states from before are dropped (they claim shared
            // heads the relay may have lost), receipts it cannot back are withdrawn and those
            // documents marked for a push, all in one transaction before anything is planned.
            let listing: Vec<&FeedEntry> = entries.iter().map(|(_, e)| e).collect();
            let withdrawn = store.reconcile_with_relay(self.peer()?, &listing, complete)?;
            self.states.clear();
            self.stats.reconciled = true;
            self.stats.receipts_withdrawn += withdrawn;
            tracing::warn!(
                listed = listing.len(),
                withdrawn,
                complete,
                "the relay's feed was reset (new epoch or a cursor from its future); reconciled"
            );
        }
        let mut page_of = HashMap::with_capacity(entries.len());
        let mut feed = Vec::with_capacity(entries.len());
        for (page, entry) in entries {
            // A document listed twice keeps its last page: the cursor must not pass it early.
            page_of.insert(entry.document_id, page);
            feed.push(entry);
        }
        let plan = store.plan_sync(self.peer()?, &feed, self.first_contact || reset)?;
        tracing::info!(
            feed = feed.len(),
            planned = plan.docs.len(),
            confirmed_from_feed = plan.confirmed_from_feed,
            "sync plan"
        );
        self.stats.confirmed_from_feed += plan.confirmed_from_feed;
        self.stats.feed_unchanged += plan.unchanged;
        self.pages = pages
            .into_iter()
            .map(|next| PageMark { next, pending: 0 })
            .collect();
        self.persisted_pages = 0;
        self.round_from_feed = true;
        self.pushed = false;
        for doc in plan.docs {
            let page = page_of.get(&doc.document_id).copied();
            self.enqueue(doc, page);
        }
        for id in std::mem::take(&mut self.pending_local) {
            self.enqueue_local(id);
        }
        self.advance_cursor(store)
    }

    fn enqueue(&mut self, doc: PlannedDoc, page: Option<usize>) {
        if self.in_flight.contains_key(&doc.document_id)
            || self.fetching.contains_key(&doc.document_id)
            || !self.queued.insert(doc.document_id)
        {
            return;
        }
        if let Some(p) = page {
            self.pages[p].pending += 1;
        }
        self.stats.docs_total += 1;
        let task = DocTask {
            mode: doc.mode,
            page,
            local_changes: doc.local_changes,
            relay_lacks: doc.relay_lacks,
            messages: 0,
        };
        if doc.mode == PlanMode::Request && self.batch_fetch {
            self.fetch_queue.push_back((doc.document_id, task));
        } else {
            self.queue.push_back((doc.document_id, task));
        }
    }

    fn enqueue_local(&mut self, id: DocumentId) {
        self.enqueue(
            PlannedDoc {
                document_id: id,
                mode: PlanMode::Sync,
                local_changes: true,
                relay_lacks: false,
            },
            None,
        );
    }

    /// Start documents, finish rounds, connect when there is work: called after every event.
    fn drive(&mut self, store: &Store, out: &mut Vec<PassAction>) -> Result<()> {
        // Each turn either starts documents or changes phase; a few turns always suffice.
        for _ in 0..4 {
            match self.phase {
                Phase::Syncing => {
                    let fetches_done = self.fetch_queue.is_empty() && self.fetching.is_empty();
                    if self.queue.is_empty() && self.in_flight.is_empty() && fetches_done {
                        self.finish_round(store, out)?;
                        continue;
                    }
                    self.start_fetches(out);
                    if self.queue.is_empty() && self.in_flight.is_empty() {
                        // Only batch fetches are left: no WebSocket needed for them.
                        return Ok(());
                    }
                    if let Conn::Ready { .. } = self.conn {
                        while self.in_flight.len() < self.config.max_docs_in_flight.max(1) {
                            let Some((id, task)) = self.queue.pop_front() else {
                                break;
                            };
                            self.queued.remove(&id);
                            self.start_doc(store, id, task, out)?;
                        }
                        if self.queue.is_empty() && self.in_flight.is_empty() {
                            continue;
                        }
                    } else {
                        self.connect(out);
                    }
                    return Ok(());
                }
                Phase::Idle => {
                    self.connect(out);
                    // "Up to date" means connected and current: said once joined.
                    if matches!(self.conn, Conn::Ready { .. }) && !self.announced {
                        self.announced = true;
                        out.push(PassAction::UpToDate);
                    }
                    return Ok(());
                }
                Phase::Handshake | Phase::Feed { .. } | Phase::Done => return Ok(()),
            }
        }
        Ok(())
    }

    fn finish_round(&mut self, store: &Store, out: &mut Vec<PassAction>) -> Result<()> {
        self.advance_cursor(store)?;
        if self.round_from_feed {
            self.rounds += 1;
        }
        if self.round_from_feed && self.pushed && self.rounds < MAX_FEED_ROUNDS {
            // The relay lists our own writes as changes after the cursor; reading them now
            // (they match the receipts just recorded, so they cost nothing more) keeps the
            // next reconnect at one empty page.
            return self.begin_feed(store, out);
        }
        if self.config.live {
            self.phase = Phase::Idle;
            self.announced = false;
        } else {
            self.finish(PassStatus::Complete, out);
        }
        Ok(())
    }

    fn start_doc(
        &mut self,
        store: &Store,
        id: DocumentId,
        mut task: DocTask,
        out: &mut Vec<PassAction>,
    ) -> Result<()> {
        let peer = self.peer()?.to_owned();
        let mut sync = match self.states.remove(&id) {
            Some(sync) => sync,
            None if task.mode == PlanMode::Request => DocSync::new(),
            None => store.doc_sync_state(&peer, id)?,
        };
        // A note the relay has never been offered goes whole in the first message, unless it
        // is large: if the presumption were wrong (a receipt lost to a crash), a large resend
        // could push the relay's copy over its per-document quota.
        let presumed = if task.relay_lacks {
            let mut presumed = sync.clone();
            presumed.presume_peer_has_nothing();
            store
                .generate_sync_message(id, &mut presumed)?
                .filter(|data| data.len() <= MAX_PRESUMED_UPLOAD_BYTES)
                .map(|data| (presumed, data))
        } else {
            None
        };
        let data = match presumed {
            Some((presumed, data)) => {
                sync = presumed;
                Some(data)
            }
            None => store.generate_sync_message(id, &mut sync)?,
        };
        self.states.insert(id, sync);
        match data {
            Some(data) => {
                task.messages = 1;
                self.send_doc(id, task.mode, data, out)?;
                self.in_flight.insert(id, task);
            }
            // Already in sync as far as this session knows.
            None => self.complete(store, task, true)?,
        }
        Ok(())
    }

    fn send_doc(
        &self,
        id: DocumentId,
        mode: PlanMode,
        data: Vec<u8>,
        out: &mut Vec<PassAction>,
    ) -> Result<()> {
        let Conn::Ready { relay } = &self.conn else {
            return Err(Error::InvalidInput("not connected".into()));
        };
        let (sender_id, target_id) = (self.local_peer.clone(), relay.clone());
        let message = match mode {
            PlanMode::Request => Message::Request {
                sender_id,
                target_id,
                document_id: id,
                data,
            },
            PlanMode::Sync => Message::Sync {
                sender_id,
                target_id,
                document_id: id,
                data,
            },
        };
        out.push(PassAction::Send(message.encode()));
        Ok(())
    }

    /// Send batch fetches for documents this device lacks, up to the configured number in
    /// flight.
    fn start_fetches(&mut self, out: &mut Vec<PassAction>) {
        let per_batch = self.config.fetch_batch_docs.clamp(1, MAX_FETCH_IDS);
        while self.batch_fetch
            && self.fetches_in_flight < self.config.max_fetches_in_flight.max(1)
            && !self.fetch_queue.is_empty()
        {
            let n = per_batch.min(self.fetch_queue.len());
            let mut ids = Vec::with_capacity(n);
            for (id, task) in self.fetch_queue.drain(..n) {
                self.queued.remove(&id);
                self.fetching.insert(id, task);
                ids.push(id);
            }
            self.fetches_in_flight += 1;
            self.stats.fetch_requests += 1;
            out.push(PassAction::FetchDocuments {
                body: fetch_request_body(&ids),
                ids,
            });
        }
    }

    /// Hand documents a batch fetch did not deliver to the WebSocket path.
    fn fall_back_to_websocket(&mut self, tasks: impl IntoIterator<Item = (DocumentId, DocTask)>) {
        for (id, task) in tasks {
            if self.queued.insert(id) {
                self.queue.push_back((id, task));
            }
        }
    }

    /// Stop batch fetching for this pass: everything still waiting for one is synced over
    /// the WebSocket instead.
    fn stop_batch_fetches(&mut self) {
        self.batch_fetch = false;
        let waiting: Vec<_> = self.fetch_queue.drain(..).collect();
        for (id, _) in &waiting {
            self.queued.remove(id);
        }
        self.fall_back_to_websocket(waiting);
    }

    /// The answer to a batch fetch (`network_error`: it broke off; `body` is what arrived).
    /// Stored documents settle at once; refused ones are handled as a `doc-unavailable`;
    /// deferred ones wait for the next batch; anything else (invalid bytes, a document that
    /// appeared here meanwhile, a garbled answer) goes to the WebSocket path.
    fn on_documents(
        &mut self,
        store: &Store,
        ids: &[DocumentId],
        status: u16,
        body: &[u8],
        network_error: Option<String>,
        out: &mut Vec<PassAction>,
    ) -> Result<()> {
        self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
        let mut tasks: HashMap<DocumentId, DocTask> = ids
            .iter()
            .filter_map(|id| self.fetching.remove(id).map(|t| (*id, t)))
            .collect();
        if tasks.is_empty() || !matches!(self.phase, Phase::Syncing) {
            return Ok(());
        }
        if network_error.is_none() && status != 200 {
            match status {
                401 => return self.unauthorized(store, PassStatus::Unauthorized, out),
                408 | 429 | 500..=599 => {
                    self.finish(
                        PassStatus::Interrupted(format!("document fetch answered HTTP {status}")),
                        out,
                    );
                }
                _ => {
                    // A relay without the endpoint (404, 405), or one refusing our request:
                    // the WebSocket does the same job, one document at a time.
                    tracing::warn!(
                        status,
                        "the relay did not serve a batch fetch; syncing those documents one at a time"
                    );
                    self.fall_back_to_websocket(ordered(ids, &mut tasks));
                    self.stop_batch_fetches();
                }
            }
            return Ok(());
        }
        let peer = self.peer()?.to_owned();
        let decoded = decode_fetch_response(body, ids);
        let mut docs = Vec::new();
        let mut deferred = Vec::new();
        for record in decoded.records {
            match record {
                FetchRecord::Ok(id, bytes) => docs.push((id, bytes)),
                FetchRecord::Unavailable(id) => {
                    if let Some(task) = tasks.remove(&id) {
                        self.in_flight.insert(id, task);
                        self.on_unavailable(store, id)?;
                    }
                }
                FetchRecord::Deferred(id) => deferred.push(id),
            }
        }
        for (id, outcome) in store.import_fetched(&peer, docs)? {
            match outcome {
                FetchedImport::Stored => {
                    self.stats.docs_fetched += 1;
                    self.stats.docs_batch_fetched += 1;
                    self.stats.docs_changed += 1;
                    out.push(PassAction::DocumentChanged(id));
                    if let Some(task) = tasks.remove(&id) {
                        self.complete(store, task, true)?;
                    }
                }
                FetchedImport::AlreadyHeld => {
                    if let Some(task) = tasks.get_mut(&id) {
                        task.mode = PlanMode::Sync;
                    }
                }
                FetchedImport::Invalid(reason) => {
                    tracing::warn!(doc = %id, %reason, "a fetched document was not stored; syncing it instead");
                }
            }
        }
        for id in deferred {
            if let Some(task) = tasks.remove(&id)
                && self.queued.insert(id)
            {
                self.fetch_queue.push_back((id, task));
            }
        }
        match (network_error, decoded.error) {
            (Some(error), _) => {
                // What arrived whole is stored; the rest is the next pass's (the cursor has
                // not passed it).
                self.finish(
                    PassStatus::Interrupted(format!("document fetch broke off: {error}")),
                    out,
                );
            }
            (None, Some(error)) => {
                tracing::warn!(%error, "unreadable batch fetch answer; syncing the rest one at a time");
                self.fall_back_to_websocket(ordered(ids, &mut tasks));
                self.stop_batch_fetches();
            }
            (None, None) => self.fall_back_to_websocket(ordered(ids, &mut tasks)),
        }
        Ok(())
    }

    fn complete(&mut self, store: &Store, task: DocTask, synced: bool) -> Result<()> {
        self.stats.docs_done += 1;
        if synced {
            self.stats.docs_synced += 1;
            if task.local_changes {
                self.pushed = true;
            }
        }
        if let Some(p) = task.page {
            self.pages[p].pending -= 1;
        }
        self.advance_cursor(store)
    }

    /// Persist the cursor of the last feed page whose documents (and every earlier page's)
    /// have all settled.
    fn advance_cursor(&mut self, store: &Store) -> Result<()> {
        let mut upto = self.persisted_pages;
        while upto < self.pages.len() && self.pages[upto].pending == 0 {
            upto += 1;
        }
        if upto == self.persisted_pages {
            return Ok(());
        }
        self.persisted_pages = upto;
        let next = self.pages[upto - 1].next.clone();
        if self.cursor.as_deref() != Some(next.as_str()) {
            store.set_feed_cursor(self.peer()?, &next)?;
            self.cursor = Some(next);
        }
        Ok(())
    }

    fn on_frame(&mut self, store: &Store, bytes: &[u8], out: &mut Vec<PassAction>) -> Result<()> {
        let message = match Message::decode(bytes) {
            Ok(message) => message,
            // JS peers drop message types they do not know; so do we.
            Err(ProtocolError::UnknownType(kind)) => {
                tracing::debug!(%kind, "ignoring a message of unknown type");
                return Ok(());
            }
            Err(e) => {
                self.finish(
                    PassStatus::RelayError(format!("undecodable frame from the relay: {e}")),
                    out,
                );
                return Ok(());
            }
        };
        match (&self.conn, message) {
            (_, Message::Error { message }) => {
                // The relay closes right after; the close tells the status.
                tracing::warn!(%message, "relay reported an error");
                self.relay_error = Some(message);
                Ok(())
            }
            (
                Conn::Joining,
                Message::Peer {
                    sender_id,
                    peer_metadata,
                    selected_protocol_version,
                    ..
                },
            ) => self.on_peer(
                store,
                sender_id,
                peer_metadata,
                &selected_protocol_version,
                out,
            ),
            (
                Conn::Ready { .. },
                Message::Sync {
                    document_id, data, ..
                }
                | Message::Request {
                    document_id, data, ..
                },
            ) => self.on_sync(store, document_id, &data, out),
            (Conn::Ready { .. }, Message::DocUnavailable { document_id, .. }) => {
                self.on_unavailable(store, document_id)
            }
            (
                Conn::Ready { .. },
                Message::Ephemeral { .. }
                | Message::RemoteHeadsChanged { .. }
                | Message::RemoteSubscriptionChange { .. },
            ) => Ok(()),
            (_, other) => {
                self.finish(
                    PassStatus::RelayError(format!(
                        "unexpected {} message from the relay",
                        other.type_name()
                    )),
                    out,
                );
                Ok(())
            }
        }
    }

    fn on_peer(
        &mut self,
        store: &Store,
        relay: PeerId,
        metadata: PeerMetadata,
        version: &str,
        out: &mut Vec<PassAction>,
    ) -> Result<()> {
        if version != PROTOCOL_VERSION {
            self.finish(
                PassStatus::RelayError(format!("relay selected protocol version {version:?}")),
                out,
            );
            return Ok(());
        }
        let storage = match metadata.storage_id {
            Some(storage) if !metadata.is_ephemeral => storage.as_str().to_owned(),
            _ => {
                // A receipt from a relay that keeps nothing would be a lie.
                self.finish(
                    PassStatus::RelayError("the relay advertises no persistent storage id".into()),
                    out,
                );
                return Ok(());
            }
        };
        self.conn = Conn::Ready { relay };
        if self.peer.as_deref() == Some(storage.as_str()) {
            return Ok(());
        }
        if self.peer.is_some() {
            tracing::warn!(
                relay = %self.config.relay,
                "the relay serves a different storage than last time; syncing everything against it"
            );
        }
        store.set_relay_peer(&self.config.relay, &storage)?;
        self.peer = Some(storage);
        // Nothing was sent for any document yet (documents start only once connected): plan
        // again against the new storage's cursor and receipts.
        for (id, task) in self.queue.drain(..) {
            if task.local_changes {
                self.pending_local.push(id);
            }
        }
        // Documents this device lacks are planned again from the new storage's feed; answers
        // to fetches already sent find no task and are ignored.
        self.fetch_queue.clear();
        self.fetching.clear();
        self.queued.clear();
        self.stats.docs_total = self.stats.docs_done;
        self.pages.clear();
        self.persisted_pages = 0;
        self.begin_feed(store, out)
    }

    fn on_sync(
        &mut self,
        store: &Store,
        id: DocumentId,
        data: &[u8],
        out: &mut Vec<PassAction>,
    ) -> Result<()> {
        let peer = self.peer()?.to_owned();
        let mut sync = match self.states.remove(&id) {
            Some(sync) => sync,
            None => store.doc_sync_state(&peer, id)?,
        };
        let task = self.in_flight.remove(&id);
        let applied = match store.apply_sync_message(&peer, id, &mut sync, data) {
            Ok(applied) => applied,
            Err(
                e @ (Error::Protocol(_)
                | Error::Automerge(_)
                | Error::InvalidInput(_)
                | Error::WrongKind { .. }),
            ) => {
                // The relay sent something this device cannot apply: list it, keep going.
                tracing::error!(doc = %id, error = %e, "could not apply the relay's sync message");
                let reason = format!("the relay sent data that could not be applied: {e}");
                if store.record_invalid(&peer, id, &reason)? {
                    self.stats.docs_failed += 1;
                }
                if let Some(task) = task {
                    self.complete(store, task, false)?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if applied.created {
            self.stats.docs_fetched += 1;
        }
        if applied.changed {
            self.stats.docs_changed += 1;
            out.push(PassAction::DocumentChanged(id));
        }
        // A document this pass asked about that is now in sync (the relay told us its heads,
        // they equal ours and are shared) needs no answer: the relay learns nothing from an
        // acknowledgement it needs, and leaving it out saves a third of the messages of a
        // first sync (`request`, `sync`, no ack). Automerge's sync is robust to it: the next
        // exchange starts from the heads each side has. Forwarded changes are still answered.
        let settled = task.is_some() && applied.in_sync;
        let reply = if settled {
            None
        } else {
            store.generate_sync_message(id, &mut sync)?
        };
        self.states.insert(id, sync);
        let quiet = reply.is_none();
        let mode = task.map_or(PlanMode::Sync, |t| t.mode);
        if let Some(data) = reply {
            // A document the relay sent us first is ours now: always `sync` from here.
            let mode = if applied.created {
                PlanMode::Sync
            } else {
                mode
            };
            self.send_doc(id, mode, data, out)?;
        }
        let Some(mut task) = task else {
            // A change the relay forwarded, or a late answer: applied and answered above.
            return Ok(());
        };
        if applied.in_sync || quiet {
            // In sync: the relay answers a final acknowledgement only if it has more to say,
            // and then it arrives as a forwarded message.
            return self.complete(store, task, true);
        }
        task.messages += 1;
        if task.messages >= MAX_MESSAGES_PER_DOC {
            tracing::error!(doc = %id, "sync did not converge; giving up on this document for this pass");
            let reason = format!("sync did not converge within {MAX_MESSAGES_PER_DOC} messages");
            if store.record_invalid(&peer, id, &reason)? {
                self.stats.docs_failed += 1;
            }
            return self.complete(store, task, false);
        }
        if applied.created {
            task.mode = PlanMode::Sync;
        }
        self.in_flight.insert(id, task);
        Ok(())
    }

    fn on_unavailable(&mut self, store: &Store, id: DocumentId) -> Result<()> {
        let peer = self.peer()?.to_owned();
        self.states.remove(&id);
        let listed = store.record_refusal(
            &peer,
            id,
            "the relay refused this document (doc-unavailable): this device may not share it, \
             or the relay does not know it",
        )?;
        if listed {
            self.stats.docs_failed += 1;
            tracing::warn!(doc = %id, "relay refused a document with unconfirmed local data");
        }
        match self.in_flight.remove(&id) {
            Some(task) => self.complete(store, task, false),
            None => Ok(()),
        }
    }

    fn unauthorized(
        &mut self,
        store: &Store,
        status: PassStatus,
        out: &mut Vec<PassAction>,
    ) -> Result<()> {
        let reason = match status {
            PassStatus::Revoked => "this device was revoked; sign in again to send its changes",
            PassStatus::TokenExpired => {
                "this device's sign-in expired; sign in again to send its changes"
            }
            _ => "the relay rejected this device's token; sign in again to send its changes",
        };
        if let Some(peer) = self.peer.clone() {
            let listed = store.record_unauthorized(&peer, reason)?;
            self.stats.docs_failed += listed;
        }
        self.finish(status, out);
        Ok(())
    }

    fn classify_close(&self, close: Option<(u16, String)>, error: Option<String>) -> PassStatus {
        let said = self.relay_error.clone().unwrap_or_default();
        let (code, reason) = close.unwrap_or((0, String::new()));
        let mentions = |word: &str| reason.contains(word) || said.contains(word);
        if mentions("revoked") && (code == close_code::POLICY || code == 0) {
            return PassStatus::Revoked;
        }
        if mentions("expired") && (code == close_code::POLICY || code == 0) {
            return PassStatus::TokenExpired;
        }
        let detail = |fallback: String| {
            if !said.is_empty() {
                said.clone()
            } else if !reason.is_empty() {
                reason.clone()
            } else {
                fallback
            }
        };
        match code {
            close_code::INTERNAL_ERROR | close_code::PROTOCOL_ERROR => {
                PassStatus::RelayError(detail(format!("relay closed with code {code}")))
            }
            _ => PassStatus::Interrupted(detail(
                error.unwrap_or_else(|| "the connection closed".to_owned()),
            )),
        }
    }

    fn finish(&mut self, status: PassStatus, out: &mut Vec<PassAction>) {
        if matches!(self.phase, Phase::Done) {
            return;
        }
        if !matches!(self.conn, Conn::Closed) {
            out.push(PassAction::Close);
            self.conn = Conn::Closed;
        }
        tracing::info!(?status, stats = ?self.stats, "sync pass finished");
        self.phase = Phase::Done;
        self.status = Some(status.clone());
        out.push(PassAction::Finished(status));
    }
}

/// The tasks left in `tasks`, in the order of `ids` (the order the feed listed them).
fn ordered(
    ids: &[DocumentId],
    tasks: &mut HashMap<DocumentId, DocTask>,
) -> Vec<(DocumentId, DocTask)> {
    ids.iter()
        .filter_map(|id| tasks.remove(id).map(|t| (*id, t)))
        .collect()
}

/// Whether the epoch of the cursor we sent (`<epoch>_<seq>…`) differs from the epoch the relay
/// answered with. A relay that names no epoch (older than epochs), or a cursor without one,
/// decides nothing here; the relay's own `reset` covers those.
fn epoch_changed(sent: Option<&str>, answered: Option<&str>) -> bool {
    let sent_epoch = sent.and_then(|c| c.split_once('_')).map(|(epoch, _)| epoch);
    matches!((sent_epoch, answered), (Some(a), Some(b)) if a != b)
}

#[cfg(test)]
mod epoch_tests {
    use super::epoch_changed;

    #[test]
    fn only_two_named_epochs_that_differ_count_as_a_change() {
        assert!(epoch_changed(
            Some("0123456789abcdef_12.doc"),
            Some("fedcba9876543210")
        ));
        assert!(!epoch_changed(
            Some("0123456789abcdef_12"),
            Some("0123456789abcdef")
        ));
        // Relays older than epochs, cursors from them, and first contact decide nothing here
        // (the relay's own `reset` flag covers a foreign cursor).
        assert!(!epoch_changed(Some("12.doc"), Some("0123456789abcdef")));
        assert!(!epoch_changed(Some("0123456789abcdef_12"), None));
        assert!(!epoch_changed(None, Some("0123456789abcdef")));
    }
}
