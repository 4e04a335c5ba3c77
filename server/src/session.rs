//! One WebSocket session: automerge-repo protocol v1 with one authenticated device.
//!
//! The session is generic over a [`Stream`] and a [`Sink`] of [`Frame`]s: the WebSocket
//! endpoint adapts axum's socket, and unit tests drive it with channels.
//!
//! # Flow
//! 1. `join` → `peer` (our peer id, our stable `storageId`, `isEphemeral: false`), or `error`
//!    and close if the client does not speak version `"1"`.
//! 2. `request`/`sync` for a document the relay holds: access check first (denied → the same
//!    `doc-unavailable` an unknown document gets, plus a `deny` audit row); apply the automerge
//!    sync message; if it brought changes, commit them (bytes, heads, sequence, `write` audit
//!    row in one transaction) and only then reply and tell the other sessions syncing the
//!    document. A storage failure ends the session with an `error` message and a log line.
//! 3. `sync` for a document the relay does not hold: a new document. It is held in this session
//!    only, unclassified, until its root `agencyId` and `patientId` arrive (JS clients announce a
//!    document before filling it in); then it is authorized and stored, or refused with nothing
//!    stored. While unclassified the relay answers only as long as the document is empty: any
//!    later answer would claim changes that are not on disk.
//! 4. Any document data sent to the device is first recorded as a `read` audit row.
//!
//! `ephemeral` messages (presence, cursors) are dropped, not forwarded: they would be an
//! unaudited channel for patient data between devices, and Fieldchart does not use presence.
//! `remote-subscription-change`, `remote-heads-changed` and `doc-unavailable` from the client
//! need no answer and are ignored.
//!
//! The device's sync state per document is persisted when the session ends (keyed by the
//! peer's `storageId` and user, when it has one and is not ephemeral), so a reconnect resumes.

pub mod registry;

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::{Automerge, ChangeHash};
use fieldchart_core::protocol::{
    DocSync, DocumentId, Message, PROTOCOL_VERSION, PeerId, PeerMetadata, ProtocolError, classify,
};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tracing::Instrument;

pub use registry::{CloseReason, SessionRegistry, SessionTicket};

use crate::access;
use crate::auth::Principal;
use crate::clock::now_ms;
use crate::docs::{Created, DocGuard, Inbox};
use crate::error::Error;
use crate::identity::{AgencyId, PatientId};
use crate::metrics::{
    BYTES_RECEIVED, BYTES_SENT, MESSAGES_RECEIVED, MESSAGES_SENT, SESSIONS_CLOSED, STORAGE_ERRORS,
    SYNC_LATENCY,
};
use crate::state::AppState;
use crate::storage::{AuditAction, AuditEvent, DocMeta, PeerKey};

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
    /// Policy: revoked or expired token, rate limit.
    pub const POLICY: u16 = 1008;
    /// Frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The relay failed.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Denied documents remembered per session so a retrying client costs one audit row, not one
/// per retry.
const MAX_DENIALS_REMEMBERED: usize = 10_000;

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
    bytes: usize,
    since: Instant,
}

struct Session<K> {
    relay: AppState,
    principal: Principal,
    ticket: SessionTicket,
    sink: K,
    inbox: Arc<Inbox>,
    peer: Option<Peer>,
    /// Documents this session syncs (authorized, stored, subscribed), with their sync state.
    docs: HashMap<DocumentId, DocSync>,
    pending: HashMap<DocumentId, PendingDoc>,
    pending_bytes: usize,
    denied: HashSet<DocumentId>,
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
    K: Sink<Frame> + Unpin,
    E: Display,
{
    let span = tracing::info_span!("session", id = ticket.id(), user = %principal.user_id(), device = %principal.device_id);
    let mut session = Session {
        relay,
        principal,
        ticket,
        sink,
        inbox: Arc::new(Inbox::default()),
        peer: None,
        docs: HashMap::new(),
        pending: HashMap::new(),
        pending_bytes: 0,
        denied: HashSet::new(),
    };
    async move {
        tracing::info!("session opened");
        let end = session.serve(&mut incoming).await;
        session.finish(end).await;
    }
    .instrument(span)
    .await;
}

impl<K> Session<K>
where
    K: Sink<Frame> + Unpin,
{
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
        let inbox = Arc::clone(&self.inbox);

        loop {
            // Biased, in this order: outside instructions first (a revoked device must not get
            // one more message), then timers, then other sessions' changes, then the peer's
            // frames (a flood is bounded by the rate limit), then keepalive.
            let step = tokio::select! {
                biased;
                reason = self.ticket.closed() => return match reason {
                    CloseReason::Revoked => End::error("revoked", close_code::POLICY, "this device was revoked"),
                    CloseReason::Replaced => End::quiet("replaced", close_code::NORMAL),
                    CloseReason::ShuttingDown => End::quiet("shutdown", close_code::GOING_AWAY),
                },
                () = &mut expiry => {
                    if now_ms() >= self.principal.expires_at {
                        return End::error("expired", close_code::POLICY, "the device token expired");
                    }
                    // The timer is capped (see `until_ms`); a far expiry takes several laps.
                    expiry.as_mut().reset(tokio::time::Instant::now() + until_ms(self.principal.expires_at));
                    Ok(())
                }
                () = &mut idle => return End::quiet("idle", close_code::GOING_AWAY),
                () = inbox.changed() => self.on_changed().await,
                frame = incoming.next() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                    match frame {
                        None => return End::Disconnected("peer_closed"),
                        Some(Err(e)) => {
                            return End::error("transport_error", close_code::PROTOCOL_ERROR, format!("cannot read frame: {e}"));
                        }
                        Some(Ok(Frame::Binary(bytes))) => self.on_frame(bytes).await,
                        Some(Ok(Frame::Text(_))) => Err(End::error(
                            "text_frame",
                            close_code::UNSUPPORTED_DATA,
                            "text frames are not part of the protocol: send CBOR in binary frames",
                        )),
                        Some(Ok(Frame::Ping(_) | Frame::Pong(_))) => Ok(()),
                        Some(Ok(Frame::Close(_))) => return End::Disconnected("peer_closed"),
                    }
                }
                _ = keepalive.tick() => self.on_keepalive().await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Say why (when there is something to say), close, and persist sync states.
    async fn finish(&mut self, end: End) {
        let reason = match &end {
            End::Close { reason, .. } | End::Disconnected(reason) => *reason,
            End::Internal(_) => "internal_error",
        };
        match end {
            End::Close {
                reason,
                code,
                message,
            } => {
                if let Some(message) = message {
                    tracing::info!(reason, %message, "closing session");
                    let _ = self.send(Message::Error { message }).await;
                }
                let _ = self
                    .sink
                    .send(Frame::Close(Some((code, reason.replace('_', " ")))))
                    .await;
            }
            End::Internal(e) => {
                metrics::counter!(STORAGE_ERRORS).increment(1);
                tracing::error!(error = %e, "session failed; nothing of the last message was acknowledged");
                let message =
                    "the relay failed to store or load data; nothing from your last message was \
                               acknowledged; reconnect to retry"
                        .to_owned();
                let _ = self.send(Message::Error { message }).await;
                let _ = self
                    .sink
                    .send(Frame::Close(Some((
                        close_code::INTERNAL_ERROR,
                        "internal error".into(),
                    ))))
                    .await;
            }
            End::Disconnected(_) => {}
        }
        let _ = self.sink.close().await;
        metrics::counter!(SESSIONS_CLOSED, "reason" => reason).increment(1);
        for id in self.docs.keys() {
            self.relay.docs().unsubscribe(*id, self.ticket.id());
        }
        self.save_sync_states().await;
        tracing::info!(reason, docs = self.docs.len(), "session closed");
    }

    async fn save_sync_states(&mut self) {
        let Some(key) = self.peer.as_ref().and_then(|p| p.sync_key.clone()) else {
            return;
        };
        let states: Vec<_> = self
            .docs
            .iter()
            .map(|(id, sync)| (*id, sync.encode()))
            .collect();
        if states.is_empty() {
            return;
        }
        // Losing these costs the next connection a few round trips, not data: log and go on.
        if let Err(e) = self.relay.storage().save_sync_states(key, states).await {
            tracing::warn!(error = %e, "could not persist sync states");
        }
    }

    async fn send(&mut self, message: Message) -> Result<(), End> {
        let bytes = message.encode();
        metrics::counter!(MESSAGES_SENT, "type" => message.type_name()).increment(1);
        metrics::counter!(BYTES_SENT).increment(bytes.len() as u64);
        self.sink
            .send(Frame::Binary(bytes))
            .await
            .map_err(|_| End::Disconnected("send_failed"))
    }

    fn peer_id(&self) -> Result<PeerId, End> {
        self.peer
            .as_ref()
            .map(|p| p.id.clone())
            .ok_or_else(|| End::error("no_join", close_code::PROTOCOL_ERROR, "join first"))
    }

    async fn on_frame(&mut self, bytes: Vec<u8>) -> Result<(), End> {
        let started = Instant::now();
        metrics::counter!(BYTES_RECEIVED).increment(bytes.len() as u64);
        let max = self.relay.limits().max_frame_bytes;
        if bytes.len() > max {
            return Err(End::error(
                "frame_too_large",
                close_code::TOO_BIG,
                format!(
                    "frame of {} bytes exceeds the limit of {max} bytes",
                    bytes.len()
                ),
            ));
        }
        if !self
            .relay
            .sessions()
            .take_message(&self.principal.device_id)
        {
            tracing::warn!("message rate limit exceeded");
            return Err(End::error(
                "rate_limited",
                close_code::POLICY,
                format!(
                    "more than {} messages per second from this device",
                    self.relay.limits().message_rate_per_second
                ),
            ));
        }
        let message = match Message::decode(&bytes) {
            Ok(message) => message,
            // JS peers log and drop message types they do not know; so do we.
            Err(ProtocolError::UnknownType(kind)) => {
                tracing::debug!(%kind, "ignoring message of unknown type");
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
                self.on_sync(document_id, &data, true).await?;
                metrics::histogram!(SYNC_LATENCY).record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Message::Sync {
                document_id, data, ..
            } => {
                self.on_sync(document_id, &data, false).await?;
                metrics::histogram!(SYNC_LATENCY).record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Message::Error { message } => {
                tracing::info!(%message, "peer reported an error");
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
        tracing::info!(peer = %sender_id, persistent = sync_key.is_some(), "peer joined");
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

    async fn on_sync(&mut self, id: DocumentId, data: &[u8], is_request: bool) -> Result<(), End> {
        if self.pending.contains_key(&id) {
            return self.on_pending(id, data).await;
        }
        match self.relay.docs().open(id).await? {
            Some(guard) => self.on_stored(guard, data).await,
            None if is_request => self.send_unavailable(id).await,
            None => self.on_new(id, data).await,
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

    async fn on_stored(&mut self, mut guard: DocGuard, data: &[u8]) -> Result<(), End> {
        let id = guard.id();
        let meta = guard.meta().clone();
        if !access::may_access(self.relay.storage(), &self.principal, &meta).await? {
            let heads = guard.heads();
            drop(guard);
            self.untrack(id);
            return self.deny(id, &meta, heads).await;
        }
        let mut sync = self.sync_state(id).await?;
        let outcome = match sync.receive(guard.doc_mut(), data) {
            Ok(outcome) => outcome,
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
        let guard = if outcome.new_changes.is_empty() {
            guard
        } else {
            // A document's owner is fixed when it is first stored; a change that moves it to
            // another patient or agency is refused like any unauthorized write.
            let fields = classify(guard.doc());
            if fields.agency_id.as_deref() != Some(meta.agency_id.as_str())
                || fields.patient_id.as_deref() != Some(meta.patient_id.as_str())
            {
                let heads = outcome.heads_after.clone();
                self.relay.docs().discard(guard);
                self.untrack(id);
                tracing::warn!(doc = %id, "refused changes that would move the document to another patient or agency");
                return self.deny(id, &meta, heads).await;
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
            guard
        };
        let reply = sync.generate(guard.doc());
        let heads = guard.heads();
        drop(guard);
        self.track(id, sync);
        match reply {
            Some(data) => self.send_sync(id, &meta, heads, data).await,
            None => Ok(()),
        }
    }

    /// A `sync` for a document the relay does not hold: a new document.
    async fn on_new(&mut self, id: DocumentId, data: &[u8]) -> Result<(), End> {
        let fresh = PendingDoc {
            doc: Automerge::new(),
            sync: DocSync::new(),
            bytes: 0,
            since: Instant::now(),
        };
        self.on_unclassified(id, fresh, data).await
    }

    async fn on_pending(&mut self, id: DocumentId, data: &[u8]) -> Result<(), End> {
        let Some(pending) = self.pending.remove(&id) else {
            return Ok(());
        };
        self.pending_bytes -= pending.bytes;
        self.on_unclassified(id, pending, data).await
    }

    /// Apply `data` to a new document the relay does not store yet; store it once its owner is
    /// known and allowed, hold it while its owner is unknown.
    async fn on_unclassified(
        &mut self,
        id: DocumentId,
        mut pending: PendingDoc,
        data: &[u8],
    ) -> Result<(), End> {
        if let Err(e) = pending.sync.receive(&mut pending.doc, data) {
            return Err(End::error(
                "bad_sync",
                close_code::PROTOCOL_ERROR,
                format!("sync message for {id} refused: {e}"),
            ));
        }
        if pending.doc.get_heads().is_empty() {
            // A first announcement carries only heads. Ask for everything without keeping any
            // state: announcing many new documents at once costs the relay no memory, and the
            // answer claims nothing.
            return match pending.sync.generate(&pending.doc) {
                Some(reply) => self.send_sync_unaudited(id, reply).await,
                None => Ok(()),
            };
        }
        pending.bytes += data.len();
        let fields = classify(&pending.doc);
        let (Some(agency), Some(patient)) = (fields.agency_id, fields.patient_id) else {
            // Content, but no owner yet: hold it, silently (any answer would claim changes that
            // are not on disk), within this session's bounds.
            let limits = self.relay.limits();
            if self.pending.len() >= limits.max_pending_docs
                || self.pending_bytes + pending.bytes > limits.max_pending_bytes
            {
                tracing::warn!(doc = %id, bytes = pending.bytes, "too many unclassified documents; dropping one");
                return self.send_unavailable(id).await;
            }
            self.pending_bytes += pending.bytes;
            self.pending.insert(id, pending);
            return Ok(());
        };
        let meta = DocMeta {
            agency_id: AgencyId::new(agency),
            patient_id: PatientId::new(patient),
            kind: fields.kind.unwrap_or_default(),
        };
        let heads = pending.doc.get_heads();
        if !access::may_create(self.relay.storage(), &self.principal, &meta).await? {
            tracing::warn!(doc = %id, "refused a new document for a patient this user may not touch");
            return self.deny(id, &meta, heads).await;
        }
        let audit = self.audit_event(
            id,
            meta.agency_id.clone(),
            Some(meta.patient_id.clone()),
            AuditAction::Write,
            heads,
        );
        let PendingDoc { doc, mut sync, .. } = pending;
        match self
            .relay
            .docs()
            .create(id, doc, meta.clone(), audit)
            .await?
        {
            Created::Stored(guard) => {
                tracing::info!(doc = %id, kind = %meta.kind, "stored a new document");
                let reply = sync.generate(guard.doc());
                let heads = guard.heads();
                drop(guard);
                self.track(id, sync);
                match reply {
                    Some(data) => self.send_sync(id, &meta, heads, data).await,
                    None => Ok(()),
                }
            }
            // Stored meanwhile by another session: sync against that copy from a fresh state.
            Created::Exists => match self.relay.docs().open(id).await? {
                Some(guard) => self.on_stored(guard, data).await,
                None => self.send_unavailable(id).await,
            },
        }
    }

    /// Other sessions changed documents this session syncs: send what the device lacks.
    async fn on_changed(&mut self) -> Result<(), End> {
        for id in self.inbox.take() {
            let Some(mut sync) = self.docs.remove(&id) else {
                continue;
            };
            let Some(guard) = self.relay.docs().open(id).await? else {
                self.relay.docs().unsubscribe(id, self.ticket.id());
                continue;
            };
            let meta = guard.meta().clone();
            if !access::may_access(self.relay.storage(), &self.principal, &meta).await? {
                // Access was withdrawn since the device started syncing it.
                drop(guard);
                self.relay.docs().unsubscribe(id, self.ticket.id());
                continue;
            }
            let reply = sync.generate(guard.doc());
            let heads = guard.heads();
            drop(guard);
            self.docs.insert(id, sync);
            if let Some(data) = reply {
                self.send_sync(id, &meta, heads, data).await?;
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
                self.pending_bytes -= pending.bytes;
                tracing::info!(doc = %id, "dropping a document that never got its agencyId and patientId");
                self.send_unavailable(id).await?;
            }
        }
        self.sink
            .send(Frame::Ping(Vec::new()))
            .await
            .map_err(|_| End::Disconnected("send_failed"))
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

    /// Refuse a document: a `deny` row (once per document per session) and the same
    /// `doc-unavailable` an unknown document gets.
    async fn deny(
        &mut self,
        id: DocumentId,
        meta: &DocMeta,
        heads: Vec<ChangeHash>,
    ) -> Result<(), End> {
        if self.denied.len() >= MAX_DENIALS_REMEMBERED {
            self.denied.clear();
        }
        if self.denied.insert(id) {
            tracing::info!(doc = %id, kind = %meta.kind, "access denied");
            let event = self.audit_event(
                id,
                meta.agency_id.clone(),
                Some(meta.patient_id.clone()),
                AuditAction::Deny,
                heads,
            );
            self.relay.audit().record(event).await?;
        }
        self.send_unavailable(id).await
    }

    async fn send_unavailable(&mut self, id: DocumentId) -> Result<(), End> {
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
            self.relay.audit().record(event).await?;
        }
        self.send_sync_unaudited(id, data).await
    }

    async fn send_sync_unaudited(&mut self, id: DocumentId, data: Vec<u8>) -> Result<(), End> {
        let target_id = self.peer_id()?;
        self.send(Message::Sync {
            sender_id: self.relay.peer_id().clone(),
            target_id,
            document_id: id,
            data,
        })
        .await
    }
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
