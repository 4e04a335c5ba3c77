//! One WebSocket session: automerge-repo protocol v1 with one authenticated device.
//!
//! The session is generic over a [`Stream`] and a [`Sink`] of [`Frame`]s: the WebSocket
//! endpoint adapts axum's socket, and unit tests drive it with channels.
//!
//! # Flow
//! 1. `join` → `peer` (our peer id, our stable `storageId`, `isEphemeral: false`), or `error`
//!    and close if the client does not speak version `"1"`.
//! 2. `request`/`sync` for a document the relay holds: access is decided from the stored row
//!    (agency, patient, kind) *before anything is loaded*. Denied → exactly what an unknown id
//!    gets (see 3), plus a `deny` row. Allowed → apply the automerge sync message on the
//!    blocking pool; [`crate::docs::validate_write`] may refuse the new changes; then commit
//!    them (bytes, heads, sequence, `write` audit row in one transaction) and only then reply
//!    and tell the other sessions syncing the document. A storage failure ends the session
//!    with an `error` message and a log line.
//! 3. `request` for a document the relay does not hold (or may not show) → `doc-unavailable`.
//!    `sync` → the new-document path, in isolation: the document is held in this session
//!    only, unclassified, until its root `agencyId` and `patientId` arrive (JS clients
//!    announce a document before filling it in); then it is authorized (the role may create
//!    its `kind`, the patient exists in the principal's agency and is one the principal may
//!    access) and stored, or refused with nothing stored. While unclassified the relay
//!    answers only as long as the document is empty: any later answer would claim changes
//!    that are not on disk. The one answer that can still tell "taken" from "free" is the
//!    last: a complete document the device *may* create, sent under a taken id, cannot be
//!    stored.
//! 4. Any document data sent to the device is first recorded as a `read` audit row.
//!
//! # Denials
//! A `deny` row always carries the principal's own agency, a patient only when it is known to
//! be a patient of that agency, and at most [`crate::config::MAX_AUDIT_HEADS`] heads. The
//! device gets its answer first; the row follows through the session's own writer task, in
//! order. A session refused more than `max_denials_per_session` distinct documents is closed.
//!
//! # Bounds
//! Frame size; per-device message and byte rates (token buckets); relay-wide bytes in flight
//! and bytes of held (unclassified) documents, counted on the decoded change bytes before
//! anything is applied; a per-document size quota. Each refusal is a clear `error` (or, for a
//! held document, `doc-unavailable`) and a `fieldchart_limit_hits_total{limit=...}` count.
//!
//! # Never stalled by the peer
//! Frames go out through an outbox drained by a writer task with a timeout on every send; the
//! session loop itself never waits on the socket, so revocation, idle timeout and shutdown
//! reach a session whose peer stopped reading, and such a peer is disconnected. The device row
//! is re-read every `device_recheck_interval` as a backstop for revocations.
//!
//! `ephemeral` messages (presence, cursors) are dropped, not forwarded: they would be an
//! unaudited channel for patient data between devices, and Fieldchart does not use presence.
//! `remote-subscription-change`, `remote-heads-changed` and `doc-unavailable` from the client
//! need no answer and are ignored.
//!
//! The device's sync state per document is persisted when the session ends (keyed by the
//! peer's `storageId` and user, when it has one and is not ephemeral), so a reconnect resumes.

mod outbox;
pub mod registry;

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::{Automerge, ChangeHash};
use fieldchart_core::protocol::{
    DocSync, DocumentId, Message, PROTOCOL_VERSION, PeerId, PeerMetadata, ProtocolError, classify,
};
use futures::{Sink, Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::Instrument;

pub use registry::{
    ByteBudget, CloseReason, RateLimited, Reservation, SessionRegistry, SessionTicket,
};

use self::outbox::{Outbox, OutboxError};
use crate::access;
use crate::audit::AuditLog;
use crate::auth::Principal;
use crate::clock::now_ms;
use crate::config::{CLOSE_GRACE, MAX_AUDIT_HEADS, MAX_CLAIMED_ID_BYTES, MAX_LOGGED_CLIENT_TEXT};
use crate::docs::{Created, DocGuard, Inbox, WriteRefusal, validate_write};
use crate::error::Error;
use crate::identity::{AgencyId, PatientId};
use crate::metrics::{
    BYTES_RECEIVED, BYTES_SENT, LIMIT_HITS, MESSAGES_RECEIVED, MESSAGES_SENT, SESSION_PANICS,
    SESSIONS_CLOSED, STORAGE_ERRORS, SYNC_LATENCY, TAMPER_REFUSALS,
};
use crate::signatures;
use crate::state::AppState;
use crate::storage::{AuditAction, AuditEvent, DocMeta, DocumentRow, PeerKey, Storage};

/// A WebSocket frame, as the session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A protocol message.
    Binary(Vec<u8>),
    /// Not part of the protocol; refused.
    Text(String),
    /// Keepalive probe.
    Ping(Vec<u8>),
    /// Keepalive answer.
    Pong(Vec<u8>),
    /// Closing handshake, with a status code and reason.
    Close(Option<(u16, String)>),
}

/// WebSocket close codes the relay uses (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The relay is going away (shutdown) or the peer idled out.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The peer sent a kind of frame the protocol does not use.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Policy: revoked or expired token, rate limit, too many refusals, document quota.
    pub const POLICY: u16 = 1008;
    /// Frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The relay failed.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The relay is over a relay-wide budget; retry later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Why a session ends.
#[derive(Debug)]
enum End {
    /// Close with a code and a reason, after an optional `error` message to the peer.
    Close {
        reason: &'static str,
        code: u16,
        message: Option<String>,
    },
    /// The relay failed; log it and tell the peer nothing of its last message was kept.
    Internal(Box<Error>),
    /// Handling the peer's last message (or another session's change) panicked. Only this
    /// session ends; any document it held uncommitted was discarded by its guard and is
    /// reloaded from storage by the next user.
    Panicked(String),
    /// The connection is gone.
    Disconnected(&'static str),
}

impl End {
    fn error(reason: &'static str, code: u16, message: impl Into<String>) -> End {
        End::Close {
            reason,
            code,
            message: Some(message.into()),
        }
    }

    fn quiet(reason: &'static str, code: u16) -> End {
        End::Close {
            reason,
            code,
            message: None,
        }
    }

    fn from_close(reason: CloseReason) -> End {
        match reason {
            CloseReason::Revoked => {
                End::error("revoked", close_code::POLICY, "this device was revoked")
            }
            CloseReason::Replaced => End::quiet("replaced", close_code::NORMAL),
            CloseReason::ShuttingDown => End::quiet("shutdown", close_code::GOING_AWAY),
        }
    }

    /// A limit was hit: count it, say which, close.
    fn limit(limit: &'static str, code: u16, message: String) -> End {
        metrics::counter!(LIMIT_HITS, "limit" => limit).increment(1);
        tracing::warn!(limit, "limit hit; closing the session");
        End::error(limit, code, message)
    }
}

impl From<Error> for End {
    fn from(e: Error) -> End {
        End::Internal(Box::new(e))
    }
}

/// The joined peer.
#[derive(Debug)]
struct Peer {
    id: PeerId,
    /// Where its sync states persist, if anywhere.
    sync_key: Option<PeerKey>,
}

/// A new document this session announced before it could be classified.
#[derive(Debug)]
struct PendingDoc {
    doc: Automerge,
    sync: DocSync,
    /// Decoded change bytes applied so far, held in the relay-wide budget.
    held: Option<Reservation>,
    since: Instant,
}

impl PendingDoc {
    fn bytes(&self) -> usize {
        self.held.as_ref().map_or(0, Reservation::bytes)
    }
}

/// A `deny` row waiting for the session's audit writer; the claimed patient is checked there,
/// after the device has its answer.
#[derive(Debug)]
struct Denial {
    event: AuditEvent,
    /// A patient id the client's document claims: recorded only if that patient exists in
    /// the principal's agency.
    claimed_patient: Option<PatientId>,
}

struct Session {
    relay: AppState,
    principal: Principal,
    ticket: SessionTicket,
    outbox: Outbox,
    inbox: Arc<Inbox>,
    peer: Option<Peer>,
    /// Documents this session syncs (authorized, stored, subscribed), with their sync state.
    docs: HashMap<DocumentId, DocSync>,
    pending: HashMap<DocumentId, PendingDoc>,
    pending_bytes: usize,
    /// Documents answered `doc-unavailable` (refused or unknown), bounded by
    /// `max_denials_per_session`.
    refused: HashSet<DocumentId>,
    /// Documents a `deny` row was written for in this session (one row per document).
    audited: HashSet<DocumentId>,
    denials: Option<(mpsc::Sender<Denial>, tokio::task::JoinHandle<()>)>,
}

/// Run one session until the peer leaves, breaks the protocol, is revoked, idles out, or the
/// relay shuts down. Never panics on what the peer sends.
pub async fn run<S, K, E>(
    relay: AppState,
    principal: Principal,
    ticket: SessionTicket,
    mut incoming: S,
    sink: K,
) where
    S: Stream<Item = Result<Frame, E>> + Unpin,
    K: Sink<Frame> + Unpin + Send + 'static,
    E: Display,
{
    let span = tracing::info_span!("session", id = ticket.id(), user = %principal.user_id(), device = %principal.device_id);
    let limits = relay.limits().clone();
    let mut session = Session {
        outbox: Outbox::start(sink, limits.outbox_frames, limits.send_timeout),
        relay,
        principal,
        ticket,
        inbox: Arc::new(Inbox::default()),
        peer: None,
        docs: HashMap::new(),
        pending: HashMap::new(),
        pending_bytes: 0,
        refused: HashSet::new(),
        audited: HashSet::new(),
        denials: None,
    };
    async move {
        tracing::info!("session opened");
        let end = session.serve(&mut incoming).await;
        // Boxed, like every step in `serve`: the task of an idle session holds only the
        // session and the `select!` it waits in, not the largest state any step may need.
        Box::pin(session.finish(end, &mut incoming)).await;
    }
    .instrument(span)
    .await;
}

impl Session {
    async fn serve<S, E>(&mut self, incoming: &mut S) -> End
    where
        S: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        let limits = self.relay.limits().clone();
        let idle = tokio::time::sleep(limits.idle_timeout);
        tokio::pin!(idle);
        let expiry = tokio::time::sleep(until_ms(self.principal.expires_at));
        tokio::pin!(expiry);
        let mut keepalive = tokio::time::interval(limits.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.reset();
        let mut recheck = tokio::time::interval(limits.device_recheck_interval);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recheck.reset();
        let inbox = Arc::clone(&self.inbox);

        loop {
            // Biased, in this order: outside instructions first (a revoked device must not get
            // one more message), then timers, then the writer's fate, then other sessions'
            // changes, then the peer's frames (a flood is bounded by the rate limits), then
            // keepalive.
            let step = tokio::select! {
                biased;
                reason = self.ticket.closed() => return End::from_close(reason),
                () = &mut expiry => {
                    if now_ms() >= self.principal.expires_at {
                        return End::error("expired", close_code::POLICY, "the device token expired");
                    }
                    // The timer is capped (see `until_ms`); a far expiry takes several laps.
                    expiry.as_mut().reset(tokio::time::Instant::now() + until_ms(self.principal.expires_at));
                    Ok(())
                }
                () = &mut idle => return End::quiet("idle", close_code::GOING_AWAY),
                _ = recheck.tick() => Box::pin(self.recheck_device()).await,
                () = self.outbox.stopped() => return End::Disconnected("send_failed"),
                () = inbox.changed() => contained(Box::pin(self.on_changed())).await,
                frame = incoming.next() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                    match frame {
                        None => return End::Disconnected("peer_closed"),
                        Some(Err(e)) => return transport_error(&e.to_string()),
                        Some(Ok(Frame::Binary(bytes))) => contained(Box::pin(self.on_frame(bytes))).await,
                        Some(Ok(Frame::Text(_))) => Err(End::error(
                            "text_frame",
                            close_code::UNSUPPORTED_DATA,
                            "text frames are not part of the protocol: send CBOR in binary frames",
                        )),
                        Some(Ok(Frame::Ping(_) | Frame::Pong(_))) => Ok(()),
                        Some(Ok(Frame::Close(_))) => return End::Disconnected("peer_closed"),
                    }
                }
                _ = keepalive.tick() => Box::pin(self.on_keepalive()).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Say why (when there is something to say), close, and persist sync states.
    async fn finish<S, E>(self, end: End, incoming: &mut S)
    where
        S: Stream<Item = Result<Frame, E>> + Unpin,
    {
        let handshake = !matches!(end, End::Disconnected(_));
        let reason = match &end {
            End::Close { reason, .. } | End::Disconnected(reason) => *reason,
            End::Internal(_) => "internal_error",
            End::Panicked(_) => "panic",
        };
        let panicked = matches!(end, End::Panicked(_));
        // Goodbyes are queued only if there is room: a peer that does not read gets none.
        match end {
            End::Close {
                reason,
                code,
                message,
            } => {
                if let Some(message) = message {
                    tracing::info!(reason, message = %loggable(&message), "closing session");
                    self.try_send(Message::Error { message });
                }
                self.outbox
                    .try_send(Frame::Close(Some((code, reason.replace('_', " ")))));
            }
            End::Internal(e) => {
                metrics::counter!(STORAGE_ERRORS).increment(1);
                tracing::error!(error = %e, "session failed; nothing of the last message was acknowledged");
                let message =
                    "the relay failed to store or load data; nothing from your last message was \
                               acknowledged; reconnect to retry"
                        .to_owned();
                self.try_send(Message::Error { message });
                self.outbox.try_send(Frame::Close(Some((
                    close_code::INTERNAL_ERROR,
                    "internal error".into(),
                ))));
            }
            End::Panicked(what) => {
                metrics::counter!(SESSION_PANICS).increment(1);
                tracing::error!(panic = %what, "handling a message panicked; ending this session only");
                let message = "the relay failed while handling your last message; nothing from \
                               it was acknowledged; reconnect to retry"
                    .to_owned();
                self.try_send(Message::Error { message });
                self.outbox.try_send(Frame::Close(Some((
                    close_code::INTERNAL_ERROR,
                    "internal error".into(),
                ))));
            }
            End::Disconnected(_) => {}
        }
        let Session {
            relay,
            ticket,
            outbox,
            peer,
            docs,
            denials,
            ..
        } = self;
        outbox.finish().await;
        if handshake {
            // Closing handshake: read (and drop) what the peer still sends until its close,
            // for a bounded time. Dropping a socket with unread data resets the connection,
            // and the peer would lose the `error` and close frames sent just before.
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                while let Some(Ok(frame)) = incoming.next().await {
                    if matches!(frame, Frame::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        metrics::counter!(SESSIONS_CLOSED, "reason" => reason).increment(1);
        if panicked {
            // The panic may have struck between taking a document's sync state and putting it
            // back: drop every subscription of this session, and persist no sync state (one
            // may be half-updated; the next connection starts those documents afresh).
            relay.docs().unsubscribe_session(ticket.id());
        } else {
            for id in docs.keys() {
                relay.docs().unsubscribe(*id, ticket.id());
            }
            save_sync_states(relay.storage(), peer.as_ref(), &docs).await;
        }
        if let Some((queue, writer)) = denials {
            // Let queued deny rows reach the audit log before the session is gone.
            drop(queue);
            let grace = relay.limits().send_timeout;
            if tokio::time::timeout(grace, writer).await.is_err() {
                tracing::warn!("deny rows were still being written when the session closed");
            }
        }
        tracing::info!(reason, docs = docs.len(), "session closed");
        drop(ticket);
    }

    fn try_send(&self, message: Message) -> bool {
        let bytes = message.encode();
        self.outbox.try_send(Frame::Binary(bytes))
    }

    async fn send(&mut self, message: Message) -> Result<(), End> {
        self.send_after(None, message).await
    }

    /// [`Session::send`], the frame held by the outbox until `durable` (a `read` row's commit)
    /// succeeded.
    async fn send_after(
        &mut self,
        durable: Option<tokio::sync::oneshot::Receiver<crate::error::Result<()>>>,
        message: Message,
    ) -> Result<(), End> {
        let bytes = message.encode();
        metrics::counter!(MESSAGES_SENT, "type" => message.type_name()).increment(1);
        metrics::counter!(BYTES_SENT).increment(bytes.len() as u64);
        // Waiting for room in the outbox must not hide a revocation or a shutdown.
        let (ticket, outbox) = (&mut self.ticket, &self.outbox);
        tokio::select! {
            biased;
            reason = ticket.closed() => Err(End::from_close(reason)),
            sent = outbox.send_after(durable, Frame::Binary(bytes)) => match sent {
                Ok(()) => Ok(()),
                Err(OutboxError::Closed) => Err(End::Disconnected("send_failed")),
                Err(OutboxError::SlowReader) => Err(End::Disconnected("slow_reader")),
            },
        }
    }

    fn peer_id(&self) -> Result<PeerId, End> {
        self.peer
            .as_ref()
            .map(|p| p.id.clone())
            .ok_or_else(|| End::error("no_join", close_code::PROTOCOL_ERROR, "join first"))
    }

    /// Re-read the device: a revocation or expiry that no other path announced still closes
    /// the session within `device_recheck_interval`.
    async fn recheck_device(&mut self) -> Result<(), End> {
        let device = self
            .relay
            .storage()
            .device(self.principal.device_id.clone())
            .await?;
        match device {
            Some(d) if d.revoked_at.is_none() && d.expires_at > now_ms() => Ok(()),
            Some(d) if d.revoked_at.is_none() => Err(End::error(
                "expired",
                close_code::POLICY,
                "the device token expired",
            )),
            _ => Err(End::from_close(CloseReason::Revoked)),
        }
    }

    async fn on_frame(&mut self, bytes: Vec<u8>) -> Result<(), End> {
        let started = Instant::now();
        metrics::counter!(BYTES_RECEIVED).increment(bytes.len() as u64);
        let limits = self.relay.limits();
        let max = limits.max_frame_bytes;
        if bytes.len() > max {
            return Err(End::limit(
                "frame_size",
                close_code::TOO_BIG,
                format!(
                    "frame of {} bytes exceeds the limit of {max} bytes",
                    bytes.len()
                ),
            ));
        }
        match self
            .relay
            .sessions()
            .admit_frame(&self.principal.device_id, bytes.len())
        {
            Ok(()) => {}
            Err(RateLimited::Messages) => {
                return Err(End::limit(
                    "message_rate",
                    close_code::POLICY,
                    format!(
                        "more than {} messages per second from this device",
                        limits.message_rate_per_second
                    ),
                ));
            }
            Err(RateLimited::Bytes) => {
                return Err(End::limit(
                    "byte_rate",
                    close_code::POLICY,
                    format!(
                        "more than {} bytes per second from this device (burst {} bytes)",
                        limits.byte_rate_per_second, limits.byte_burst
                    ),
                ));
            }
        }
        // Held until this frame is answered: what the relay is working on, relay-wide.
        let Some(_in_flight) = self.relay.sessions().in_flight().reserve(bytes.len()) else {
            return Err(End::limit(
                "bytes_in_flight",
                close_code::TRY_AGAIN_LATER,
                "the relay is busy (too many bytes in flight); reconnect later".to_owned(),
            ));
        };
        let message = match Message::decode(&bytes) {
            Ok(message) => message,
            // JS peers log and drop message types they do not know; so do we.
            Err(ProtocolError::UnknownType(kind)) => {
                tracing::debug!(kind = %loggable(&kind), "ignoring message of unknown type");
                return Ok(());
            }
            Err(e) => {
                return Err(End::error(
                    "bad_frame",
                    close_code::PROTOCOL_ERROR,
                    format!("undecodable message: {e}"),
                ));
            }
        };
        drop(bytes);
        metrics::counter!(MESSAGES_RECEIVED, "type" => message.type_name()).increment(1);

        let Some(peer) = &self.peer else {
            return self.on_join(message).await;
        };
        if message.sender_id().is_some_and(|sender| *sender != peer.id) {
            return Err(End::error(
                "wrong_sender",
                close_code::PROTOCOL_ERROR,
                "senderId differs from the peer that joined on this connection",
            ));
        }
        match message {
            Message::Join { .. } => Err(End::error(
                "second_join",
                close_code::PROTOCOL_ERROR,
                "already joined on this connection",
            )),
            Message::Request {
                document_id, data, ..
            } => {
                self.on_sync(document_id, data, true).await?;
                metrics::histogram!(SYNC_LATENCY).record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Message::Sync {
                document_id, data, ..
            } => {
                self.on_sync(document_id, data, false).await?;
                metrics::histogram!(SYNC_LATENCY).record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Message::Error { message } => {
                tracing::info!(message = %loggable(&message), "peer reported an error");
                Err(End::quiet("peer_error", close_code::NORMAL))
            }
            Message::Peer { .. } => Err(End::error(
                "unexpected_peer",
                close_code::PROTOCOL_ERROR,
                "peer is the relay's message, not the client's",
            )),
            Message::Ephemeral { .. }
            | Message::DocUnavailable { .. }
            | Message::RemoteSubscriptionChange { .. }
            | Message::RemoteHeadsChanged { .. } => Ok(()),
        }
    }

    async fn on_join(&mut self, message: Message) -> Result<(), End> {
        let Message::Join {
            sender_id,
            peer_metadata,
            supported_protocol_versions,
        } = message
        else {
            return Err(End::error(
                "no_join",
                close_code::PROTOCOL_ERROR,
                format!("expected join, got {}", message.type_name()),
            ));
        };
        if !supported_protocol_versions
            .iter()
            .any(|v| v == PROTOCOL_VERSION)
        {
            return Err(End::error(
                "unsupported_version",
                close_code::PROTOCOL_ERROR,
                format!(
                    "unsupported protocol version; this relay speaks version \"{PROTOCOL_VERSION}\""
                ),
            ));
        }
        let sync_key = match peer_metadata.storage_id {
            Some(storage_id) if !peer_metadata.is_ephemeral => Some(PeerKey {
                user_id: self.principal.user_id().clone(),
                storage_id,
            }),
            _ => None,
        };
        self.relay.sessions().joined(self.ticket.id(), &sender_id);
        tracing::info!(peer = %loggable(sender_id.as_str()), persistent = sync_key.is_some(), "peer joined");
        self.peer = Some(Peer {
            id: sender_id.clone(),
            sync_key,
        });
        self.send(Message::Peer {
            sender_id: self.relay.peer_id().clone(),
            target_id: sender_id,
            peer_metadata: PeerMetadata {
                storage_id: Some(self.relay.storage_id().clone()),
                is_ephemeral: false,
            },
            selected_protocol_version: PROTOCOL_VERSION.to_owned(),
        })
        .await
    }

    /// A `sync` or `request`. Access is decided from the stored row before anything is
    /// loaded; a document the device may not see is answered exactly as an unknown one: a
    /// `request` gets `doc-unavailable`, a `sync` takes the new-document path, in isolation
    /// (the stored document is never touched).
    async fn on_sync(
        &mut self,
        id: DocumentId,
        data: Vec<u8>,
        is_request: bool,
    ) -> Result<(), End> {
        if self.pending.contains_key(&id) {
            return self.on_pending(id, data).await;
        }
        let row = self.relay.storage().document_row(id).await?;
        if let Some(row) = row {
            if access::may_access(self.relay.storage(), &self.principal, &row.meta).await? {
                return self.on_stored(id, &row, data).await;
            }
            self.untrack(id);
            let patient = (row.meta.agency_id == *self.principal.agency_id())
                .then(|| row.meta.patient_id.clone());
            self.record_denial(id, patient, None, row.heads.clone());
        }
        if is_request {
            self.send_unavailable(id).await
        } else {
            self.on_new(id, data).await
        }
    }

    /// The sync state for a document this session starts syncing: resumed from storage when
    /// the peer persists its own.
    async fn sync_state(&mut self, id: DocumentId) -> Result<DocSync, End> {
        if let Some(sync) = self.docs.remove(&id) {
            return Ok(sync);
        }
        let Some(key) = self.peer.as_ref().and_then(|p| p.sync_key.clone()) else {
            return Ok(DocSync::new());
        };
        Ok(match self.relay.storage().load_sync_state(key, id).await? {
            Some(bytes) => DocSync::decode(&bytes).unwrap_or_else(|e| {
                tracing::warn!(doc = %id, error = %e, "ignoring unreadable stored sync state");
                DocSync::new()
            }),
            None => DocSync::new(),
        })
    }

    /// Keep syncing `id` with `sync`, and hear about other sessions' changes to it.
    fn track(&mut self, id: DocumentId, sync: DocSync) {
        if self.docs.insert(id, sync).is_none() {
            self.relay
                .docs()
                .subscribe(id, self.ticket.id(), &self.inbox);
        }
    }

    fn untrack(&mut self, id: DocumentId) {
        if self.docs.remove(&id).is_some() {
            self.relay.docs().unsubscribe(id, self.ticket.id());
        }
    }

    /// A message for a stored document this device may access.
    async fn on_stored(
        &mut self,
        id: DocumentId,
        row: &DocumentRow,
        data: Vec<u8>,
    ) -> Result<(), End> {
        let incoming = change_bytes(id, &data)?;
        let quota = self.relay.limits().max_document_bytes;
        let size = usize::try_from(row.stored_bytes).unwrap_or(usize::MAX);
        if incoming > 0 && size.saturating_add(incoming) > quota {
            return Err(End::limit(
                "document_size",
                close_code::POLICY,
                format!("document {id} would exceed the per-document quota of {quota} bytes"),
            ));
        }
        let meta = row.meta.clone();
        let sync = self.sync_state(id).await?;
        let Some(guard) = self.relay.docs().open(id).await? else {
            // Gone since its row was read (never happens today: documents are not deleted).
            return self.refuse(id).await;
        };
        // Apply, check, and (when nothing changed) answer, on the blocking pool.
        let checked_meta = meta.clone();
        let (guard, applied) = self
            .relay
            .docs()
            .blocking(guard, move |guard| {
                let mut sync = sync;
                // The ledger reads the stored history before anything new is applied. A
                // message without changes (acks, heads, requests: most of them) cannot apply
                // anything, so it does not need the ledger, which costs a walk of the history.
                if incoming > 0 {
                    guard.doc_and_ledger();
                }
                let outcome = sync.receive(guard.doc_mut(), &data);
                // Nothing new (the common case: acks, heads exchange): the copy is still what
                // is stored, so dropping the guard need not discard it.
                guard.clean_if_unchanged();
                let outcome = outcome?;
                // The one place changes from a device are checked before they are committed.
                // Tampering (identity fields included) is named as such before the owner check.
                let verdict = {
                    let (doc, ledger) = guard.doc_and_ledger();
                    signatures::scan(ledger, doc, &outcome.new_changes)
                        .map_err(WriteRefusal::Signatures)
                }
                .and_then(|entries| {
                    validate_write(&checked_meta, guard.doc(), &outcome.new_changes)
                        .map(|()| entries)
                });
                let reply = if outcome.new_changes.is_empty() {
                    sync.generate(guard.doc())
                } else {
                    None
                };
                Ok::<_, ProtocolError>((sync, outcome, verdict, reply))
            })
            .await?;
        let (mut sync, outcome, verdict, reply) = match applied {
            Ok(applied) => applied,
            Err(e) => {
                // Automerge may have applied part of a rejected message: drop the copy.
                self.relay.docs().discard(guard);
                self.untrack(id);
                return Err(End::error(
                    "bad_sync",
                    close_code::PROTOCOL_ERROR,
                    format!("sync message for {id} refused: {e}"),
                ));
            }
        };
        let (guard, reply) = if outcome.new_changes.is_empty() {
            (guard, reply)
        } else {
            let (guard, verdict) = match verdict {
                Ok(new_signatures) if !new_signatures.is_empty() => {
                    self.verify_signatures(guard, id, &meta, new_signatures)
                        .await?
                }
                Ok(_) => (guard, Ok(())),
                Err(refusal) => (guard, Err(refusal)),
            };
            if let Err(refusal) = verdict {
                self.relay.docs().discard(guard);
                self.untrack(id);
                tracing::warn!(doc = %id, %refusal, "refused changes from a device");
                let patient = Some(meta.patient_id.clone());
                let heads = outcome.heads_after.clone();
                match refusal {
                    WriteRefusal::Signatures(_) => self.record_tamper(id, &meta, heads).await?,
                    WriteRefusal::MovesOwner => self.record_denial(id, patient, None, heads),
                }
                return self.refuse(id).await;
            }
            let audit = self.audit_event(
                id,
                meta.agency_id.clone(),
                Some(meta.patient_id.clone()),
                AuditAction::Write,
                outcome.heads_after.clone(),
            );
            let (guard, _seq) = self
                .relay
                .docs()
                .commit(guard, &outcome.new_changes, audit, self.ticket.id())
                .await?;
            let (guard, (state, reply)) = self
                .relay
                .docs()
                .blocking(guard, move |guard| {
                    let reply = sync.generate(guard.doc());
                    (sync, reply)
                })
                .await?;
            sync = state;
            (guard, reply)
        };
        let heads = guard.heads();
        drop(guard);
        self.track(id, sync);
        match reply {
            Some(data) => self.send_sync(id, &meta, heads, data).await,
            None => Ok(()),
        }
    }

    /// A `sync` for a document the relay does not hold (or may not show this device): a new
    /// document.
    async fn on_new(&mut self, id: DocumentId, data: Vec<u8>) -> Result<(), End> {
        let fresh = PendingDoc {
            doc: Automerge::new(),
            sync: DocSync::new(),
            held: None,
            since: Instant::now(),
        };
        self.on_unclassified(id, fresh, data).await
    }

    async fn on_pending(&mut self, id: DocumentId, data: Vec<u8>) -> Result<(), End> {
        let Some(pending) = self.pending.remove(&id) else {
            return Ok(());
        };
        self.pending_bytes -= pending.bytes();
        self.on_unclassified(id, pending, data).await
    }

    /// Apply `data` to a new document the relay does not store yet; store it once its owner is
    /// known and allowed, hold it while its owner is unknown.
    async fn on_unclassified(
        &mut self,
        id: DocumentId,
        mut pending: PendingDoc,
        data: Vec<u8>,
    ) -> Result<(), End> {
        // Changes an earlier message brought may still wait in automerge's queue for their
        // dependencies (the document's heads stay empty until they arrive).
        let earlier_changes = pending.bytes() > 0;
        // Bounds first, on the decoded size of the changes, before anything is applied.
        let incoming = change_bytes(id, &data)?;
        if incoming > 0 {
            let limits = self.relay.limits();
            let total = pending.bytes() + incoming;
            if total > limits.max_document_bytes {
                return Err(End::limit(
                    "document_size",
                    close_code::POLICY,
                    format!(
                        "document {id} would exceed the per-document quota of {} bytes",
                        limits.max_document_bytes
                    ),
                ));
            }
            if self.pending_bytes + total > limits.max_pending_bytes {
                metrics::counter!(LIMIT_HITS, "limit" => "held_bytes").increment(1);
                tracing::warn!(doc = %id, bytes = total, "this session holds too many unclassified bytes; dropping one");
                return self.refuse(id).await;
            }
            let held = match pending.held.take() {
                Some(mut held) => held.resize(total).then_some(held),
                None => self.relay.sessions().held().reserve(total),
            };
            let Some(held) = held else {
                metrics::counter!(LIMIT_HITS, "limit" => "held_bytes").increment(1);
                tracing::warn!(doc = %id, bytes = total, "the relay holds too many unclassified bytes; dropping one");
                return self.refuse(id).await;
            };
            pending.held = Some(held);
        }
        let (pending, received) = tokio::task::spawn_blocking(move || {
            let mut pending = pending;
            // The changes applied to a document that was empty are all of its changes: kept
            // for the signature scan below, which would otherwise rebuild them.
            let received = pending
                .sync
                .receive(&mut pending.doc, &data)
                .map(|o| o.heads_before.is_empty().then_some(o.new_changes));
            let empty = pending.doc.get_heads().is_empty();
            // A document sent whole to a document that was empty and had been sent nothing
            // before: those bytes are what it now holds, and become its snapshot (no second
            // encoding by `save`). After earlier changes it may hold more than the bytes —
            // queued changes the whole document released — so it is saved.
            let saved = match &received {
                Ok(Some(_)) if !empty && !earlier_changes => DocSync::sole_document_chunk(&data),
                _ => None,
            };
            // A first announcement carries only heads: answer it (asking for everything)
            // without keeping any state, so announcing many new documents costs no memory and
            // the answer claims nothing.
            let reply = if empty {
                pending.sync.generate(&pending.doc)
            } else {
                None
            };
            (pending, received.map(|all| (empty, reply, all, saved)))
        })
        .await
        .map_err(Error::from)?;
        let (empty, reply, all_changes, saved) = match received {
            Ok(done) => done,
            Err(e) => {
                return Err(End::error(
                    "bad_sync",
                    close_code::PROTOCOL_ERROR,
                    format!("sync message for {id} refused: {e}"),
                ));
            }
        };
        if empty {
            return match reply {
                Some(reply) => self.send_sync_unaudited(id, reply).await,
                None => Ok(()),
            };
        }
        let fields = classify(&pending.doc);
        let (Some(agency), Some(patient)) = (fields.agency_id, fields.patient_id) else {
            // Content, but no owner yet: hold it, silently (any answer would claim changes that
            // are not on disk), within this session's bounds.
            if self.pending.len() >= self.relay.limits().max_pending_docs {
                metrics::counter!(LIMIT_HITS, "limit" => "held_documents").increment(1);
                tracing::warn!(doc = %id, bytes = pending.bytes(), "too many unclassified documents; dropping one");
                return self.refuse(id).await;
            }
            self.pending_bytes += pending.bytes();
            self.pending.insert(id, pending);
            return Ok(());
        };
        let heads = pending.doc.get_heads();
        let claimed = DocMeta {
            agency_id: AgencyId::new(agency),
            patient_id: PatientId::new(patient),
            kind: fields.kind.unwrap_or_default(),
        };
        if claimed.agency_id.as_str().len() > MAX_CLAIMED_ID_BYTES
            || claimed.patient_id.as_str().len() > MAX_CLAIMED_ID_BYTES
        {
            tracing::warn!(doc = %id, "refused a new document with an oversized owner id");
            self.record_denial(id, None, None, heads);
            return self.refuse(id).await;
        }
        // The id may be taken by a document this device may not see: it is refused like any
        // document the device may not create, and the stored one is never loaded.
        if let Some(row) = self.relay.storage().document_row(id).await? {
            if access::may_access(self.relay.storage(), &self.principal, &row.meta).await? {
                // Stored meanwhile by this user's other session: sync against that copy.
                return self.on_stored(id, &row, data_for_resync(&pending)).await;
            }
            tracing::info!(doc = %id, "refused a new document whose id is taken");
            self.record_denial(id, None, Some(claimed.patient_id), heads);
            return self.refuse(id).await;
        }
        if !access::may_create(self.relay.storage(), &self.principal, &claimed).await? {
            tracing::warn!(doc = %id, kind = %loggable(&claimed.kind), "refused a new document this user may not create");
            self.record_denial(id, None, Some(claimed.patient_id), heads);
            return self.refuse(id).await;
        }
        let PendingDoc {
            doc, sync, held, ..
        } = pending;
        // A new note may arrive signed (charted and signed offline): its signatures are
        // checked like any other write before anything of it is stored. The ledger the scan
        // builds is the stored note's once every entry verifies (see `signatures::scan_new`):
        // it is kept with the document, so the note's next message does not rebuild it.
        let (doc, scanned) = tokio::task::spawn_blocking(move || {
            let mut ledger = fieldchart_core::model::NoteLedger::default();
            let all = all_changes.unwrap_or_else(|| doc.get_changes(&[]));
            let scanned =
                signatures::scan_new(&mut ledger, &doc, &all).map(|entries| (ledger, entries));
            (doc, scanned)
        })
        .await
        .map_err(Error::from)?;
        let (doc, verdict) = match scanned {
            Err(refusal) => (doc, Err(refusal)),
            Ok((ledger, entries)) if entries.is_empty() => (doc, Ok(ledger)),
            Ok((mut ledger, entries)) => {
                let signers = signatures::lookup(self.relay.storage(), &claimed, &entries).await?;
                let now = now_ms();
                tokio::task::spawn_blocking(move || {
                    let verdict =
                        signatures::verify_new(&mut ledger, &doc, id, &entries, &signers, now);
                    (doc, verdict.map(|()| ledger))
                })
                .await
                .map_err(Error::from)?
            }
        };
        let ledger = match verdict {
            Ok(ledger) => ledger,
            Err(refusal) => {
                tracing::warn!(doc = %id, %refusal, "refused a new document");
                self.record_tamper(id, &claimed, heads.clone()).await?;
                drop(held);
                return self.refuse(id).await;
            }
        };
        let audit = self.audit_event(
            id,
            claimed.agency_id.clone(),
            Some(claimed.patient_id.clone()),
            AuditAction::Write,
            heads,
        );
        let (doc, snapshot) = match saved {
            Some(snapshot) => (doc, snapshot),
            None => tokio::task::spawn_blocking(move || {
                let snapshot = doc.save();
                (doc, snapshot)
            })
            .await
            .map_err(Error::from)?,
        };
        let created = self
            .relay
            .docs()
            .create_with_ledger(id, doc, snapshot, claimed.clone(), audit, Some(ledger))
            .await?;
        drop(held);
        match created {
            Created::Stored(guard) => {
                tracing::info!(doc = %id, kind = %loggable(&claimed.kind), "stored a new document");
                let (guard, (sync, reply)) = self
                    .relay
                    .docs()
                    .blocking(guard, move |guard| {
                        let mut sync = sync;
                        let reply = sync.generate(guard.doc());
                        (sync, reply)
                    })
                    .await?;
                let heads = guard.heads();
                drop(guard);
                self.track(id, sync);
                match reply {
                    Some(data) => self.send_sync(id, &claimed, heads, data).await,
                    None => Ok(()),
                }
            }
            // Stored meanwhile by another session: sync against that copy if this device may
            // see it, from a fresh announcement of what it holds.
            Created::Exists(doc) => match self.relay.storage().document_row(id).await? {
                Some(row)
                    if access::may_access(self.relay.storage(), &self.principal, &row.meta)
                        .await? =>
                {
                    // Rare (a race with another session): the announcement is made only here.
                    let resync = DocSync::new().generate(&doc).unwrap_or_default();
                    self.on_stored(id, &row, resync).await
                }
                _ => self.refuse(id).await,
            },
        }
    }

    /// Other sessions changed documents this session syncs: send what the device lacks.
    async fn on_changed(&mut self) -> Result<(), End> {
        for id in self.inbox.take() {
            let Some(sync) = self.docs.remove(&id) else {
                continue;
            };
            let Some(row) = self.relay.storage().document_row(id).await? else {
                self.relay.docs().unsubscribe(id, self.ticket.id());
                continue;
            };
            if !access::may_access(self.relay.storage(), &self.principal, &row.meta).await? {
                // Access was withdrawn since the device started syncing it.
                self.relay.docs().unsubscribe(id, self.ticket.id());
                continue;
            }
            let Some(guard) = self.relay.docs().open(id).await? else {
                self.relay.docs().unsubscribe(id, self.ticket.id());
                continue;
            };
            let (guard, (sync, reply)) = self
                .relay
                .docs()
                .blocking(guard, move |guard| {
                    let mut sync = sync;
                    let reply = sync.generate(guard.doc());
                    (sync, reply)
                })
                .await?;
            let heads = guard.heads();
            drop(guard);
            self.docs.insert(id, sync);
            if let Some(data) = reply {
                self.send_sync(id, &row.meta, heads, data).await?;
            }
        }
        Ok(())
    }

    async fn on_keepalive(&mut self) -> Result<(), End> {
        let ttl = self.relay.limits().pending_doc_ttl;
        let expired: Vec<DocumentId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.since.elapsed() >= ttl)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(pending) = self.pending.remove(&id) {
                self.pending_bytes -= pending.bytes();
                tracing::info!(doc = %id, "dropping a document that never got its agencyId and patientId");
                self.send_unavailable(id).await?;
            }
        }
        let (ticket, outbox) = (&mut self.ticket, &self.outbox);
        tokio::select! {
            biased;
            reason = ticket.closed() => Err(End::from_close(reason)),
            sent = outbox.send(Frame::Ping(Vec::new())) => sent.map_err(|_| End::Disconnected("send_failed")),
        }
    }

    fn audit_event(
        &self,
        id: DocumentId,
        agency_id: AgencyId,
        patient_id: Option<PatientId>,
        action: AuditAction,
        heads: Vec<ChangeHash>,
    ) -> AuditEvent {
        AuditEvent {
            at_ms: now_ms(),
            agency_id,
            user_id: self.principal.user_id().clone(),
            device_id: self.principal.device_id.clone(),
            document_id: id,
            patient_id,
            action,
            heads,
        }
    }

    /// Queue a `deny` row (once per document per session, at most `max_denials_per_session`):
    /// always in the principal's own agency; with `patient` (a trusted id, from a stored row in
    /// the principal's agency) or `claimed` (from the client's document, recorded only if that
    /// patient exists in the principal's agency); at most [`MAX_AUDIT_HEADS`] heads. The row is
    /// written by the session's audit writer, in order, after the device has its answer.
    /// Steps 2 and 3 of `crate::signatures`: look the signers up, then verify on the blocking
    /// pool with the document still locked.
    async fn verify_signatures(
        &mut self,
        guard: DocGuard,
        id: DocumentId,
        meta: &DocMeta,
        entries: Vec<fieldchart_core::model::signing::SignatureEntry>,
    ) -> Result<(DocGuard, std::result::Result<(), WriteRefusal>), End> {
        let signers = match signatures::lookup(self.relay.storage(), meta, &entries).await {
            Ok(signers) => signers,
            Err(e) => {
                self.relay.docs().discard(guard);
                return Err(e.into());
            }
        };
        let now = now_ms();
        Ok(self
            .relay
            .docs()
            .blocking(guard, move |guard| {
                let (doc, ledger) = guard.doc_and_ledger();
                signatures::verify_new(ledger, doc, id, &entries, &signers, now)
                    .map_err(WriteRefusal::Signatures)
            })
            .await?)
    }

    /// A `tamper` audit row: the device sent changes that tamper with a signed note; they
    /// were not stored. Written before the device is answered (it is rare and it matters).
    async fn record_tamper(
        &mut self,
        id: DocumentId,
        meta: &DocMeta,
        mut heads: Vec<ChangeHash>,
    ) -> Result<(), End> {
        heads.truncate(MAX_AUDIT_HEADS);
        let event = self.audit_event(
            id,
            meta.agency_id.clone(),
            Some(meta.patient_id.clone()),
            AuditAction::Tamper,
            heads,
        );
        metrics::counter!(TAMPER_REFUSALS).increment(1);
        self.relay.storage().append_audit(vec![event]).await?;
        Ok(())
    }

    fn record_denial(
        &mut self,
        id: DocumentId,
        patient: Option<PatientId>,
        claimed: Option<PatientId>,
        mut heads: Vec<ChangeHash>,
    ) {
        let max = self.relay.limits().max_denials_per_session;
        if self.audited.contains(&id) {
            return;
        }
        if self.audited.len() >= max {
            metrics::counter!(LIMIT_HITS, "limit" => "denials").increment(1);
            tracing::warn!(doc = %id, "deny rows for this session reached their limit; not recorded");
            return;
        }
        self.audited.insert(id);
        tracing::info!(doc = %id, "access denied");
        heads.truncate(MAX_AUDIT_HEADS);
        let event = self.audit_event(
            id,
            self.principal.agency_id().clone(),
            patient,
            AuditAction::Deny,
            heads,
        );
        let denial = Denial {
            event,
            claimed_patient: claimed.filter(|p| p.as_str().len() <= MAX_CLAIMED_ID_BYTES),
        };
        let (queue, _) = self.denials.get_or_insert_with(|| {
            let (queue, rx) = mpsc::channel(max.max(1));
            let writer = tokio::spawn(write_denials(
                self.relay.clone(),
                self.relay.audit().clone(),
                rx,
            ));
            (queue, writer)
        });
        // Room for every row this session may queue: `audited` is bounded by the capacity.
        if queue.try_send(denial).is_err() {
            tracing::error!(doc = %id, "the deny-row queue is full; row dropped");
        }
    }

    /// Answer `doc-unavailable` for a document refused or unknown; a session refused more
    /// than `max_denials_per_session` distinct documents is closed.
    async fn refuse(&mut self, id: DocumentId) -> Result<(), End> {
        self.send_unavailable(id).await
    }

    async fn send_unavailable(&mut self, id: DocumentId) -> Result<(), End> {
        let max = self.relay.limits().max_denials_per_session;
        if self.refused.insert(id) && self.refused.len() > max {
            return Err(End::limit(
                "denials",
                close_code::POLICY,
                format!("more than {max} documents refused or unavailable on this connection"),
            ));
        }
        let target_id = self.peer_id()?;
        self.send(Message::DocUnavailable {
            sender_id: self.relay.peer_id().clone(),
            target_id,
            document_id: id,
        })
        .await
    }

    /// Send a sync message generated from the stored document; if it carries changes, record
    /// the `read` first.
    async fn send_sync(
        &mut self,
        id: DocumentId,
        meta: &DocMeta,
        heads: Vec<ChangeHash>,
        data: Vec<u8>,
    ) -> Result<(), End> {
        if carries_changes(&data) {
            let event = self.audit_event(
                id,
                meta.agency_id.clone(),
                Some(meta.patient_id.clone()),
                AuditAction::Read,
                heads,
            );
            // Queued, not awaited: the outbox holds this message (and everything after it)
            // until the row is durable, and the session goes on to its next frames, whose rows
            // share the next commit.
            let durable = self.relay.audit().submit(event).await?;
            return self.send_sync_after(id, data, Some(durable)).await;
        }
        self.send_sync_unaudited(id, data).await
    }

    async fn send_sync_unaudited(&mut self, id: DocumentId, data: Vec<u8>) -> Result<(), End> {
        self.send_sync_after(id, data, None).await
    }

    async fn send_sync_after(
        &mut self,
        id: DocumentId,
        data: Vec<u8>,
        durable: Option<tokio::sync::oneshot::Receiver<crate::error::Result<()>>>,
    ) -> Result<(), End> {
        let target_id = self.peer_id()?;
        self.send_after(
            durable,
            Message::Sync {
                sender_id: self.relay.peer_id().clone(),
                target_id,
                document_id: id,
                data,
            },
        )
        .await
    }
}

/// Run one step of the session, turning a panic inside it into [`End::Panicked`]: a bug
/// reachable from one peer's input (automerge has had panics reachable from sync messages)
/// ends that peer's session, not the relay. Uncommitted documents are discarded by their
/// guards while the panic unwinds (see [`DocGuard`]).
///
/// Callers box the step: a step's future (a sync message's whole path through access checks,
/// automerge and storage) is tens of KiB, and held inline it would be part of every session's
/// task for the session's whole life, idle or not (~60 KiB of an idle session's ~70 KiB).
async fn contained<F>(step: Pin<Box<F>>) -> Result<(), End>
where
    F: std::future::Future<Output = Result<(), End>> + ?Sized,
{
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(step).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(End::Panicked(what))
        }
    }
}

/// Persist the device's sync states, so its next connection resumes.
async fn save_sync_states(
    storage: &dyn Storage,
    peer: Option<&Peer>,
    docs: &HashMap<DocumentId, DocSync>,
) {
    let Some(key) = peer.and_then(|p| p.sync_key.clone()) else {
        return;
    };
    let states: Vec<_> = docs.iter().map(|(id, sync)| (*id, sync.encode())).collect();
    if states.is_empty() {
        return;
    }
    // Losing these costs the next connection a few round trips, not data: log and go on.
    if let Err(e) = storage.save_sync_states(key, states).await {
        tracing::warn!(error = %e, "could not persist sync states");
    }
}

/// The session's audit writer for `deny` rows: resolves each claimed patient (kept only if it
/// is a patient of the principal's agency) and stores the rows one by one, in order.
async fn write_denials(relay: AppState, audit: AuditLog, mut rx: mpsc::Receiver<Denial>) {
    while let Some(Denial {
        mut event,
        claimed_patient,
    }) = rx.recv().await
    {
        if let Some(claimed) = claimed_patient {
            match relay.storage().patient(claimed).await {
                Ok(Some(patient)) if patient.agency_id == event.agency_id => {
                    event.patient_id = Some(patient.id);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot look up a claimed patient"),
            }
        }
        if let Err(e) = audit.record(event).await {
            tracing::error!(error = %e, "a deny row could not be stored");
        }
    }
}

/// Decoded bytes of the changes a sync message carries (what automerge would load), without
/// applying it; a payload that is not a sync message is a protocol error.
fn change_bytes(id: DocumentId, data: &[u8]) -> Result<usize, End> {
    automerge::sync::Message::decode(data)
        .map(|m| m.changes.iter().map(<[u8]>::len).sum())
        .map_err(|e| {
            End::error(
                "bad_sync",
                close_code::PROTOCOL_ERROR,
                format!("sync message for {id} refused: {e}"),
            )
        })
}

/// A sync message re-announcing `pending`'s heads, to start over against a stored copy.
fn data_for_resync(pending: &PendingDoc) -> Vec<u8> {
    DocSync::new().generate(&pending.doc).unwrap_or_default()
}

/// A transport error: an oversize message (cut off by the transport) is reported as such.
fn transport_error(text: &str) -> End {
    let lower = text.to_ascii_lowercase();
    if lower.contains("too long") || lower.contains("space limit") || lower.contains("too big") {
        return End::limit(
            "frame_size",
            close_code::TOO_BIG,
            format!("cannot read frame: {}", loggable(text)),
        );
    }
    End::error(
        "transport_error",
        close_code::PROTOCOL_ERROR,
        format!("cannot read frame: {}", loggable(text)),
    )
}

/// Client-supplied text made safe for a log line: control characters escaped, at most
/// [`MAX_LOGGED_CLIENT_TEXT`] characters (longer text is cut and marked).
pub fn loggable(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LOGGED_CLIENT_TEXT + 8));
    let mut written = 0;
    for c in text.chars() {
        let escaped: Vec<char> = if c.is_control() {
            c.escape_default().collect()
        } else {
            vec![c]
        };
        if written + escaped.len() > MAX_LOGGED_CLIENT_TEXT {
            out.push_str("…[cut]");
            break;
        }
        written += escaped.len();
        out.extend(escaped);
    }
    out
}

/// Whether a sync message we generated carries document changes (not just heads and filters).
fn carries_changes(data: &[u8]) -> bool {
    automerge::sync::Message::decode(data)
        .map(|m| !m.changes.is_empty())
        .unwrap_or(true)
}

/// Time from now until `ms` since the epoch (zero if past), capped at a day so the timer stays
/// representable whatever the expiry; the session re-arms it until the expiry is reached.
fn until_ms(ms: i64) -> Duration {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    Duration::from_millis(u64::try_from(ms.saturating_sub(now_ms()).clamp(0, DAY_MS)).unwrap_or(0))
}

#[cfg(test)]
mod tests;
