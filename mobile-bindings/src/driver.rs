//! [`SyncClient`]: runs sync passes against one relay for one store.
//!
//! Each pass is a loop: do what the [`SyncPass`] asked (HTTP feed request, connect, send,
//! close), wait for the next thing to happen (a frame, a local edit, a timer, a stop), hand it
//! to the pass on the blocking pool, repeat until the pass says it is finished. Frames that
//! already arrived are handed over in batches, so a large first sync is not one thread hop
//! per message.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fieldchart_core::protocol::{DocumentId, MAX_FRAME_BYTES};
use fieldchart_core::store::Store;
use fieldchart_core::sync::fetch::{
    FETCH_PATH, FETCH_REQUEST_CONTENT_TYPE, MAX_FETCH_RESPONSE_BYTES,
};
use fieldchart_core::sync::{PassAction, PassConfig, PassEvent, PassStats, PassStatus, SyncPass};
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Notify, broadcast, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header::AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::backoff::Backoff;

/// How long opening the WebSocket (TCP, TLS, upgrade) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long one change-feed request may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one batch document fetch may take, answer included (a few megabytes on a slow
/// cellular link).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the relay may stay silent while the pass waits for an answer, by default. The
/// relay answers in milliseconds; silence this long means the link is dead even if TCP has
/// not noticed (a phone moving between cells).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a live session reads the change feed, by default, for documents the relay does
/// not forward to it (ones nobody synced in this session, e.g. a note another nurse created).
pub const DEFAULT_LIVE_FEED_POLL: Duration = Duration::from_secs(60);

/// How long a graceful close may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Events handed to the pass in one blocking call, at most.
const MAX_BATCH: usize = 64;

/// Largest change-feed page accepted, in bytes. A page of the relay's maximum 1,000 entries
/// is about 250 KB; anything far beyond is not a feed page.
const MAX_FEED_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Sync events for listeners (an open chart refreshes when its document changes).
const EVENT_CAPACITY: usize = 1024;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The relay to sync with.
#[derive(Clone)]
pub struct RelayConfig {
    /// `https://host[:port]` (or `http://` for a relay on localhost in tests).
    pub base_url: String,
    /// The device's bearer token. Sent in the `Authorization` header only, never in a URL.
    pub token: String,
}

impl fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayConfig")
            .field("base_url", &self.base_url)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Called with progress while a pass runs (on a tokio thread: keep it quick).
pub type ProgressCallback = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How a pass runs.
#[derive(Clone)]
pub struct PassOptions {
    /// Stop cleanly (at a message boundary, everything so far persisted) after this long.
    pub time_budget: Option<Duration>,
    /// Progress reports.
    pub progress: Option<ProgressCallback>,
    /// Stay connected afterwards: local edits ([`SyncClient::notify_local_change`]) are synced
    /// at once and what the relay forwards is applied, until [`SyncClient::stop`].
    pub live: bool,
    /// Documents with an exchange in progress at once.
    pub max_docs_in_flight: usize,
    /// See [`DEFAULT_REPLY_TIMEOUT`].
    pub reply_timeout: Duration,
    /// See [`DEFAULT_LIVE_FEED_POLL`].
    pub live_feed_poll: Duration,
    /// Documents this device lacks are fetched whole, this many per HTTP request
    /// (`POST /v1/documents/fetch`); 0: one `request` exchange per document over the
    /// WebSocket, as before batch fetches.
    pub fetch_batch_docs: usize,
    /// Fault injection for tests: drop the connection (no close frame, as when the radio
    /// goes) once this many WebSocket messages have passed, both ways counted. Only with the
    /// `test-hooks` feature; not part of the public API.
    #[cfg(feature = "test-hooks")]
    pub drop_connection_after_messages: Option<u64>,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            time_budget: None,
            progress: None,
            live: false,
            max_docs_in_flight: fieldchart_core::sync::DEFAULT_MAX_DOCS_IN_FLIGHT,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            live_feed_poll: DEFAULT_LIVE_FEED_POLL,
            fetch_batch_docs: fieldchart_core::sync::DEFAULT_FETCH_BATCH_DOCS,
            #[cfg(feature = "test-hooks")]
            drop_connection_after_messages: None,
        }
    }
}

impl fmt::Debug for PassOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("PassOptions");
        d.field("time_budget", &self.time_budget)
            .field("progress", &self.progress.is_some())
            .field("live", &self.live)
            .field("max_docs_in_flight", &self.max_docs_in_flight)
            .field("reply_timeout", &self.reply_timeout)
            .field("live_feed_poll", &self.live_feed_poll)
            .field("fetch_batch_docs", &self.fetch_batch_docs);
        #[cfg(feature = "test-hooks")]
        d.field(
            "drop_connection_after_messages",
            &self.drop_connection_after_messages,
        );
        d.finish()
    }
}

/// Progress of a running pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Documents settled.
    pub docs_done: usize,
    /// Documents planned so far.
    pub docs_total: usize,
    /// Bytes sent: WebSocket payloads and HTTP request bodies.
    pub bytes_sent: u64,
    /// Bytes received: WebSocket payloads and HTTP response bodies.
    pub bytes_received: u64,
    /// WebSocket messages sent.
    pub messages_sent: u64,
    /// WebSocket messages received.
    pub messages_received: u64,
}

/// What a pass did.
#[derive(Debug, Clone, Serialize)]
pub struct PassReport {
    /// How it ended.
    pub status: PassStatus,
    /// The pass's own counters (documents planned, synced, fetched, failed, feed entries).
    pub stats: PassStats,
    /// WebSocket messages sent (binary frames: protocol messages).
    pub messages_sent: u64,
    /// WebSocket messages received.
    pub messages_received: u64,
    /// WebSocket payload bytes sent.
    pub ws_bytes_sent: u64,
    /// WebSocket payload bytes received.
    pub ws_bytes_received: u64,
    /// HTTP requests made: change-feed reads and batch document fetches.
    pub http_requests: u64,
    /// HTTP response body bytes (change feed and batch fetches).
    pub http_bytes_received: u64,
    /// HTTP request body bytes (batch fetch requests; feed reads have none).
    pub http_bytes_sent: u64,
    /// Batch document fetches made (`POST /v1/documents/fetch`).
    pub fetch_requests: u64,
    /// Time spent waiting for HTTP answers (change feed, batch fetches, which may overlap),
    /// seconds (the relay's share of a quiet reconnect).
    pub http_s: f64,
    /// Times the pass waited on the network for an answer: each feed request, each
    /// WebSocket upgrade, and each wait for frames after sending (documents in flight
    /// together share one).
    pub round_trips: u64,
    /// WebSocket connections opened.
    pub connections: u64,
    /// Wall time, seconds.
    pub elapsed_s: f64,
}

impl PassReport {
    /// WebSocket messages both ways.
    pub fn messages(&self) -> u64 {
        self.messages_sent + self.messages_received
    }

    /// Bytes both ways: WebSocket payloads and HTTP bodies.
    pub fn bytes(&self) -> u64 {
        self.ws_bytes_sent
            + self.ws_bytes_received
            + self.http_bytes_received
            + self.http_bytes_sent
    }
}

/// What listeners hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncEvent {
    /// A document changed because of what the relay sent.
    DocumentChanged(DocumentId),
    /// A live session has synced everything it knew of and waits for changes.
    UpToDate,
}

/// Why a [`SyncClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The relay URL is not `http(s)://…`.
    #[error("invalid relay URL: {0}")]
    InvalidUrl(String),
    /// The TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(String),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(String),
    /// The relay could not be reached or its answer not read (TLS failures say so here).
    #[error("network: {0}")]
    Network(String),
    /// The relay answered with an error status.
    #[error("relay refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The relay's message.
        message: String,
    },
}

/// Network counters of one pass.
#[derive(Debug, Default)]
struct Io {
    messages_sent: u64,
    messages_received: u64,
    ws_bytes_sent: u64,
    ws_bytes_received: u64,
    http_requests: u64,
    http_bytes_received: u64,
    http_bytes_sent: u64,
    fetch_requests: u64,
    http_time: Duration,
    round_trips: u64,
    connections: u64,
    /// Sent since the last frame arrived: the next arrival ends a round trip.
    waiting: bool,
}

impl Io {
    fn sent(&mut self, bytes: usize) {
        self.messages_sent += 1;
        self.ws_bytes_sent += bytes as u64;
        self.waiting = true;
    }

    fn received(&mut self, bytes: usize) {
        self.messages_received += 1;
        self.ws_bytes_received += bytes as u64;
        if self.waiting {
            self.round_trips += 1;
            self.waiting = false;
        }
    }

    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    fn messages(&self) -> u64 {
        self.messages_sent + self.messages_received
    }

    fn progress(&self, stats: &PassStats) -> Progress {
        Progress {
            docs_done: stats.docs_done,
            docs_total: stats.docs_total,
            bytes_sent: self.ws_bytes_sent + self.http_bytes_sent,
            bytes_received: self.ws_bytes_received + self.http_bytes_received,
            messages_sent: self.messages_sent,
            messages_received: self.messages_received,
        }
    }
}

/// Runs sync passes for one store against one relay. One pass at a time; share it behind an
/// `Arc` (the bindings keep one per signed-in store).
pub struct SyncClient {
    store: Arc<Store>,
    relay: RelayConfig,
    http_base: String,
    ws_url: String,
    http: reqwest::Client,
    /// For retries of reads: a fresh connection each time (see `tls::http_client_unpooled`).
    http_retry: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
    local_tx: mpsc::UnboundedSender<DocumentId>,
    /// Held by the running pass: one pass at a time, and only it hears local edits.
    local_rx: Mutex<mpsc::UnboundedReceiver<DocumentId>>,
    stop: Notify,
    events: broadcast::Sender<SyncEvent>,
    failures: crate::failure_report::FailureReporter,
}

impl fmt::Debug for SyncClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncClient")
            .field("store", &self.store)
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

/// Run one pass (see [`SyncClient::run_pass`]).
pub async fn run_pass(store: Arc<Store>, relay: RelayConfig, options: PassOptions) -> PassReport {
    match SyncClient::new(store, relay) {
        Ok(client) => client.run_pass(options).await,
        Err(e) => PassReport {
            status: PassStatus::LocalError(e.to_string()),
            stats: PassStats::default(),
            messages_sent: 0,
            messages_received: 0,
            ws_bytes_sent: 0,
            ws_bytes_received: 0,
            http_requests: 0,
            http_bytes_received: 0,
            http_bytes_sent: 0,
            fetch_requests: 0,
            http_s: 0.0,
            round_trips: 0,
            connections: 0,
            elapsed_s: 0.0,
        },
    }
}

/// What woke the pass loop.
enum Wake {
    Stop,
    Budget,
    Incoming(Option<Result<WsMessage, WsError>>),
    Local(DocumentId),
    Poll,
    ReplyTimeout,
    Fetched(Result<(PassEvent, FetchIo), tokio::task::JoinError>),
}

/// What one batch fetch moved over the network.
struct FetchIo {
    bytes_sent: u64,
    bytes_received: u64,
    elapsed: Duration,
}

impl SyncClient {
    /// A client for `store` and the relay at `relay.base_url`.
    pub fn new(store: Arc<Store>, relay: RelayConfig) -> Result<SyncClient, DriverError> {
        SyncClient::with_tls(store, relay, &crate::tls::TlsConfig::default())
    }

    /// Like [`SyncClient::new`], trusting what `tls` says (e.g. only the agency's pinned CA).
    pub fn with_tls(
        store: Arc<Store>,
        relay: RelayConfig,
        tls: &crate::tls::TlsConfig,
    ) -> Result<SyncClient, DriverError> {
        let http_base = relay.base_url.trim_end_matches('/').to_owned();
        let ws_base = if let Some(rest) = http_base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = http_base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            return Err(DriverError::InvalidUrl(
                "the relay URL must start with https:// (or http:// for a local relay)".into(),
            ));
        };
        let tls = crate::tls::client_config_with(tls)?;
        let http = crate::tls::http_client(&tls)?;
        let http_retry = crate::tls::http_client_unpooled(&tls)?;
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(SyncClient {
            store,
            relay: RelayConfig {
                base_url: http_base.clone(),
                token: relay.token,
            },
            ws_url: format!("{ws_base}/v1/sync"),
            http_base,
            http,
            http_retry,
            tls,
            local_tx,
            local_rx: Mutex::new(local_rx),
            stop: Notify::new(),
            events,
            failures: Default::default(),
        })
    }

    /// The store this client syncs.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A local edit happened: a live pass syncs the document now. (Without a live pass the
    /// document is flagged unsynced in the store and the next pass takes it.)
    pub fn notify_local_change(&self, document: DocumentId) {
        // The receiver lives as long as the client.
        let _ = self.local_tx.send(document);
    }

    /// Stop the running pass (or, if none runs, the next one) at the next message boundary.
    pub fn stop(&self) {
        self.stop.notify_one();
    }

    /// Listen to sync events.
    pub fn subscribe(&self) -> broadcast::Receiver<SyncEvent> {
        self.events.subscribe()
    }

    /// Run live (see [`PassOptions::live`]) until stopped, the time budget ends, or the
    /// credentials are refused; a pass the network cuts is followed by another after a
    /// backoff delay. Returns the last pass's report.
    pub async fn run_live(&self, options: PassOptions, mut backoff: Backoff) -> PassReport {
        let deadline = options.time_budget.map(|b| Instant::now() + b);
        loop {
            let mut pass_options = options.clone();
            pass_options.live = true;
            pass_options.time_budget =
                deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let mut report = self.run_pass(pass_options).await;
            if !report.status.is_retryable() {
                return report;
            }
            if report.messages_received > 0 {
                // The relay was reachable: this was a cut, not an outage.
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::info!(?delay, status = ?report.status, "sync interrupted; retrying after a delay");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.notified() => {
                    report.status = PassStatus::Stopped;
                    return report;
                }
                () = sleep_until(deadline) => {
                    report.status = PassStatus::BudgetExhausted;
                    return report;
                }
            }
        }
    }

    /// Run one sync pass (live if [`PassOptions::live`]). Never panics on what the network
    /// does; the report says how it ended.
    pub async fn run_pass(&self, options: PassOptions) -> PassReport {
        let started = Instant::now();
        let deadline = options.time_budget.map(|b| started + b);
        let mut io = Io::default();
        let mut local = self.local_rx.lock().await;
        // Edits reported before the pass are in its plan already (flagged unsynced).
        while local.try_recv().is_ok() {}

        let mut config = PassConfig::new(self.relay.base_url.clone());
        config.live = options.live;
        config.max_docs_in_flight = options.max_docs_in_flight;
        config.fetch_batch_docs = options.fetch_batch_docs;
        let (mut pass, first) = match self
            .blocking(move |store| SyncPass::start(store, config))
            .await
        {
            Ok(started) => started,
            Err(status) => return report(status, PassStats::default(), &io, started),
        };
        let mut actions: VecDeque<PassAction> = first.into();
        let mut events: Vec<PassEvent> = Vec::new();
        let mut socket: Option<Socket> = None;
        let mut poll = tokio::time::interval_at(
            started + options.live_feed_poll,
            options.live_feed_poll.max(Duration::from_millis(10)),
        );
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_progress = Progress::default();
        // Batch fetches run as tasks, so the next one arrives while this one is imported;
        // those still running when the pass ends are aborted with the set.
        let mut fetches: JoinSet<(PassEvent, FetchIo)> = JoinSet::new();

        loop {
            // 1. Do what the pass asked, in order. Network waits are bounded by the budget: a
            // pass out of time stops where it is (nothing unsent was promised to anyone).
            let mut unflushed = false;
            while let Some(action) = actions.pop_front() {
                match action {
                    PassAction::FetchFeed { since, limit } => {
                        match within(deadline, self.fetch_feed(since.as_deref(), limit, &mut io))
                            .await
                        {
                            Some(event) => events.push(event),
                            None => {
                                actions.clear();
                                events.push(PassEvent::BudgetExpired);
                            }
                        }
                    }
                    PassAction::FetchDocuments { ids, body } => {
                        io.http_requests += 1;
                        io.fetch_requests += 1;
                        io.round_trips += 1;
                        fetches.spawn(fetch_documents(
                            [self.http.clone(), self.http_retry.clone()],
                            format!("{}{FETCH_PATH}", self.http_base),
                            self.relay.token.clone(),
                            ids,
                            body,
                        ));
                    }
                    PassAction::Connect => match within(deadline, self.connect(&mut io)).await {
                        Some(Ok(s)) => {
                            socket = Some(s);
                            events.push(PassEvent::Connected);
                        }
                        Some(Err(event)) => events.push(event),
                        None => {
                            actions.clear();
                            events.push(PassEvent::BudgetExpired);
                        }
                    },
                    PassAction::Send(frame) => {
                        // Frames for a connection already gone are dropped; the pass hears of
                        // the loss from the event queued when it happened.
                        if let Some(s) = socket.as_mut() {
                            io.sent(frame.len());
                            match within(deadline, s.feed(WsMessage::Binary(frame.into()))).await {
                                Some(Ok(())) => unflushed = true,
                                Some(Err(e)) => {
                                    socket = None;
                                    events.push(lost(None, &e.to_string()));
                                }
                                None => {
                                    actions.clear();
                                    events.push(PassEvent::BudgetExpired);
                                }
                            }
                        }
                    }
                    PassAction::Close => {
                        if let Some(mut s) = socket.take() {
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, s.close(None)).await;
                        }
                    }
                    PassAction::DocumentChanged(id) => {
                        // Nobody listening is fine.
                        let _ = self.events.send(SyncEvent::DocumentChanged(id));
                    }
                    PassAction::UpToDate => {
                        let _ = self.events.send(SyncEvent::UpToDate);
                    }
                    PassAction::Finished(status) => {
                        if let Some(mut s) = socket.take() {
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, s.close(None)).await;
                        }
                        self.progress(&options, &pass, &io, &mut last_progress);
                        let (http, token) = (&self.http, &self.relay.token);
                        self.failures
                            .after_pass(http, &self.http_base, token, &self.store, &status)
                            .await;
                        return report(status, pass.stats().clone(), &io, started);
                    }
                }
            }
            if unflushed && let Some(s) = socket.as_mut() {
                match within(deadline, s.flush()).await {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        socket = None;
                        events.push(lost(None, &e.to_string()));
                    }
                    None => events.push(PassEvent::BudgetExpired),
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d)
                && !events.contains(&PassEvent::BudgetExpired)
            {
                // Checked here too: a stream of feed pages never waits in the select below.
                events.push(PassEvent::BudgetExpired);
            }
            #[cfg(feature = "test-hooks")]
            if let (Some(limit), Some(_)) = (options.drop_connection_after_messages, &socket)
                && io.messages() >= limit
            {
                // Fault injection: the radio goes; no close frame.
                socket = None;
                events.push(lost(None, "connection dropped (fault injection)"));
            }
            self.progress(&options, &pass, &io, &mut last_progress);

            // 2. Wait for something to happen, unless something already did.
            if events.is_empty() {
                let awaiting = pass.awaiting_relay() && socket.is_some();
                let wake = tokio::select! {
                    biased;
                    () = self.stop.notified() => Wake::Stop,
                    () = sleep_until(deadline) => Wake::Budget,
                    incoming = next_message(&mut socket) => Wake::Incoming(incoming),
                    Some(doc) = local.recv() => Wake::Local(doc),
                    Some(fetched) = fetches.join_next(), if !fetches.is_empty() => Wake::Fetched(fetched),
                    _ = poll.tick(), if options.live => Wake::Poll,
                    () = tokio::time::sleep(options.reply_timeout), if awaiting => Wake::ReplyTimeout,
                };
                match wake {
                    Wake::Stop => events.push(PassEvent::Stop),
                    Wake::Budget => events.push(PassEvent::BudgetExpired),
                    Wake::Incoming(incoming) => {
                        if let Some(event) = incoming_event(incoming, &mut socket, &mut io) {
                            events.push(event);
                        }
                    }
                    Wake::Local(doc) => events.push(PassEvent::LocalChange(doc)),
                    Wake::Poll => events.push(PassEvent::FeedPollDue),
                    Wake::Fetched(fetched) => events.push(fetched_event(fetched, &mut io)),
                    Wake::ReplyTimeout => {
                        socket = None;
                        events.push(lost(
                            None,
                            &format!(
                                "no answer from the relay within {:?}",
                                options.reply_timeout
                            ),
                        ));
                    }
                }
                // Take what else already arrived, so one blocking call handles a batch.
                while let Some(fetched) = fetches.try_join_next() {
                    events.push(fetched_event(fetched, &mut io));
                }
                while events.len() < MAX_BATCH {
                    let Some(s) = socket.as_mut() else { break };
                    let Some(incoming) = s.next().now_or_never() else {
                        break;
                    };
                    if let Some(event) = incoming_event(incoming, &mut socket, &mut io) {
                        events.push(event);
                    }
                }
                if events.is_empty() {
                    continue;
                }
            }

            // 3. The pass decides; storage work runs on the blocking pool.
            let batch = std::mem::take(&mut events);
            let handled = self
                .blocking(move |store| {
                    let mut out = Vec::new();
                    for event in batch {
                        out.extend(pass.handle(store, event));
                        if pass.is_finished() {
                            break;
                        }
                    }
                    (pass, out)
                })
                .await;
            match handled {
                Ok((p, out)) => {
                    pass = p;
                    actions.extend(out);
                }
                Err(status) => return report(status, PassStats::default(), &io, started),
            }
        }
    }

    /// Run `f` with the store on tokio's blocking pool. A panic there ends the pass as a
    /// local error (the store's transactions roll back; nothing half-written remains).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> Result<T, PassStatus> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| PassStatus::LocalError(format!("sync task failed: {e}")))
    }

    fn progress(&self, options: &PassOptions, pass: &SyncPass, io: &Io, last: &mut Progress) {
        let Some(callback) = &options.progress else {
            return;
        };
        let now = io.progress(pass.stats());
        if now != *last {
            callback(&now);
            *last = now;
        }
    }

    async fn fetch_feed(&self, since: Option<&str>, limit: usize, io: &mut Io) -> PassEvent {
        let started = Instant::now();
        let event = self.fetch_feed_inner(since, limit, io).await;
        io.http_time += started.elapsed();
        event
    }

    async fn fetch_feed_inner(&self, since: Option<&str>, limit: usize, io: &mut Io) -> PassEvent {
        io.http_requests += 1;
        io.round_trips += 1;
        let mut query = vec![("limit", limit.to_string())];
        if let Some(since) = since {
            query.push(("since", since.to_owned()));
        }
        let url = format!("{}/v1/changes", self.http_base);
        let (sent, retried) = send_read(&self.http, &self.http_retry, |http| {
            http.get(&url).bearer_auth(&self.relay.token).query(&query)
        })
        .await;
        if retried {
            io.http_requests += 1;
        }
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => {
                return PassEvent::FeedUnreachable {
                    error: crate::tls::error_chain(&e.without_url()),
                };
            }
        };
        let status = response.status().as_u16();
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_FEED_BODY_BYTES {
                        return PassEvent::FeedUnreachable {
                            error: format!("change feed page over {MAX_FEED_BODY_BYTES} bytes"),
                        };
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return PassEvent::FeedUnreachable {
                        error: e.without_url().to_string(),
                    };
                }
            }
        }
        io.http_bytes_received += body.len() as u64;
        PassEvent::FeedResponse { status, body }
    }

    async fn connect(&self, io: &mut Io) -> Result<Socket, PassEvent> {
        io.connections += 1;
        io.round_trips += 1;
        let failed = |error: String| PassEvent::ConnectFailed { error };
        let mut request = self
            .ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| failed(e.to_string()))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", self.relay.token))
            .map_err(|_| failed("the token is not a valid header value".into()))?;
        request.headers_mut().insert(AUTHORIZATION, bearer);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(Connector::Rustls(Arc::clone(&self.tls))),
        );
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => Err(failed(format!("no connection within {CONNECT_TIMEOUT:?}"))),
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(WsError::Http(response))) => Err(PassEvent::ConnectRefused {
                status: response.status().as_u16(),
            }),
            Ok(Err(e)) => Err(failed(crate::tls::error_chain(&e))),
        }
    }
}

/// Send a read (`request` builds it on the client given) and return its response and whether
/// it was sent twice. A read is sent once more when the first attempt failed before any
/// response: a pooled keep-alive connection the network (or the relay) has already closed fails
/// that way, as after a phone changes networks. The second attempt goes out on `fresh` (a
/// client that never reuses a connection), not on the next pooled connection, which may be dead
/// too. Connect errors and timeouts are not retried (the pass's backoff handles those).
async fn send_read(
    pooled: &reqwest::Client,
    fresh: &reqwest::Client,
    request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
) -> (reqwest::Result<reqwest::Response>, bool) {
    match request(pooled).send().await {
        Err(e) if !e.is_timeout() && e.is_request() && !e.is_connect() => {
            (request(fresh).send().await, true)
        }
        first => (first, false),
    }
}

/// One batch fetch: `POST` the request, read the answer with a size limit. A `200` whose body
/// breaks off is [`PassEvent::DocumentsUnreachable`] with what arrived (whole records in it
/// are kept by the pass).
async fn fetch_documents(
    [http, http_retry]: [reqwest::Client; 2],
    url: String,
    token: String,
    ids: Vec<DocumentId>,
    body: Vec<u8>,
) -> (PassEvent, FetchIo) {
    let started = Instant::now();
    let bytes_sent = body.len() as u64;
    let mut received = Vec::new();
    let outcome = async {
        let (sent, _) = send_read(&http, &http_retry, |client| {
            client
                .post(&url)
                .bearer_auth(&token)
                .header(reqwest::header::CONTENT_TYPE, FETCH_REQUEST_CONTENT_TYPE)
                .timeout(FETCH_TIMEOUT)
                .body(body.clone())
        })
        .await;
        let mut response = sent.map_err(|e| crate::tls::error_chain(&e.without_url()))?;
        let status = response.status().as_u16();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if received.len() + chunk.len() > MAX_FETCH_RESPONSE_BYTES {
                        return Err(format!(
                            "document batch over {MAX_FETCH_RESPONSE_BYTES} bytes"
                        ));
                    }
                    received.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(status),
                Err(e) => return Err(e.without_url().to_string()),
            }
        }
    }
    .await;
    let io = FetchIo {
        bytes_sent,
        bytes_received: received.len() as u64,
        elapsed: started.elapsed(),
    };
    let event = match outcome {
        Ok(status) => PassEvent::DocumentsResponse {
            ids,
            status,
            body: received,
        },
        Err(error) => PassEvent::DocumentsUnreachable {
            ids,
            partial: received,
            error,
        },
    };
    (event, io)
}

/// Count a finished batch fetch and turn it into the pass's event.
fn fetched_event(
    fetched: Result<(PassEvent, FetchIo), tokio::task::JoinError>,
    io: &mut Io,
) -> PassEvent {
    match fetched {
        Ok((event, fetch_io)) => {
            io.http_bytes_sent += fetch_io.bytes_sent;
            io.http_bytes_received += fetch_io.bytes_received;
            io.http_time += fetch_io.elapsed;
            event
        }
        // Only a panic gets here (the set is not aborted while the pass runs).
        Err(e) => PassEvent::FeedUnreachable {
            error: format!("document fetch task failed: {e}"),
        },
    }
}

fn report(status: PassStatus, stats: PassStats, io: &Io, started: Instant) -> PassReport {
    PassReport {
        status,
        stats,
        messages_sent: io.messages_sent,
        messages_received: io.messages_received,
        ws_bytes_sent: io.ws_bytes_sent,
        ws_bytes_received: io.ws_bytes_received,
        http_requests: io.http_requests,
        http_bytes_received: io.http_bytes_received,
        http_bytes_sent: io.http_bytes_sent,
        fetch_requests: io.fetch_requests,
        http_s: io.http_time.as_secs_f64(),
        round_trips: io.round_trips,
        connections: io.connections,
        elapsed_s: started.elapsed().as_secs_f64(),
    }
}

fn lost(close: Option<(u16, String)>, error: &str) -> PassEvent {
    PassEvent::ConnectionLost {
        close,
        error: Some(error.to_owned()),
    }
}

/// `fut`, unless the deadline comes first (`None`).
async fn within<T>(
    deadline: Option<Instant>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, fut).await.ok(),
        None => Some(fut.await),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn next_message(socket: &mut Option<Socket>) -> Option<Result<WsMessage, WsError>> {
    match socket.as_mut() {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Turn what the socket produced into a pass event (`None`: nothing the pass cares about,
/// e.g. a ping, which tungstenite answers itself).
fn incoming_event(
    incoming: Option<Result<WsMessage, WsError>>,
    socket: &mut Option<Socket>,
    io: &mut Io,
) -> Option<PassEvent> {
    match incoming {
        Some(Ok(WsMessage::Binary(bytes))) => {
            io.received(bytes.len());
            Some(PassEvent::Frame(bytes.to_vec()))
        }
        Some(Ok(WsMessage::Close(frame))) => {
            *socket = None;
            Some(PassEvent::ConnectionLost {
                close: frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())),
                error: None,
            })
        }
        Some(Ok(_)) => None,
        Some(Err(e)) => {
            *socket = None;
            Some(lost(None, &e.to_string()))
        }
        None => {
            *socket = None;
            Some(lost(None, "the relay closed the connection"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path) -> Arc<Store> {
        use fieldchart_core::model::{Actor, Role};
        use fieldchart_core::store::{StoreConfig, StoreKey};
        Arc::new(
            Store::open(StoreConfig {
                path: dir.join("d.db"),
                key: StoreKey::random(),
                actor: Actor {
                    user_id: "u".into(),
                    device_id: "d".into(),
                },
                role: Role::Clinician,
                keystroke_journal: false,
            })
            .expect("store"),
        )
    }

    #[test]
    fn urls_map_to_the_sync_endpoint_and_other_schemes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let relay = |url: &str| RelayConfig {
            base_url: url.into(),
            token: "t".into(),
        };
        let client = SyncClient::new(Arc::clone(&s), relay("https://relay.example/")).expect("ok");
        assert_eq!(client.ws_url, "wss://relay.example/v1/sync");
        assert_eq!(client.http_base, "https://relay.example");
        let client = SyncClient::new(Arc::clone(&s), relay("http://127.0.0.1:9")).expect("ok");
        assert_eq!(client.ws_url, "ws://127.0.0.1:9/v1/sync");
        assert!(matches!(
            SyncClient::new(s, relay("ftp://x")),
            Err(DriverError::InvalidUrl(_))
        ));
        let debug = format!(
            "{:?}",
            RelayConfig {
                base_url: "https://x".into(),
                token: "fct_secret".into(),
            }
        );
        assert!(!debug.contains("fct_secret"), "tokens never reach logs");
    }

    #[tokio::test]
    async fn an_unreachable_relay_is_a_retryable_interruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A port nothing listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let report = run_pass(
            store(dir.path()),
            RelayConfig {
                base_url: format!("http://{addr}"),
                token: "t".into(),
            },
            PassOptions::default(),
        )
        .await;
        assert!(report.status.is_retryable(), "{:?}", report.status);
        assert_eq!(report.messages(), 0);
    }
}
