//! Sync for the app: an `async` pass with a time budget, live mode, listeners with
//! subscription handles, enrollment. All network I/O runs on the library's own tokio runtime
//! (one multi-thread runtime in a `OnceLock`); each exported `async fn` spawns onto it and
//! awaits the join handle, so the foreign side's executor (Kotlin coroutines, Swift
//! concurrency, asyncio) only waits.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use fieldchart_core::sync::{PassStats, PassStatus};
use tokio::runtime::Runtime;
use tokio::sync::broadcast::error::RecvError;

use super::error::{FfiResult, FieldchartError};
use super::records::{Enrollment, EnrollmentCode, doc_id};
use super::store::Store;
use crate::driver::{self, PassOptions, PassReport, Progress, RelayConfig, SyncEvent};
use crate::{Backoff, TlsConfig};

/// Worker threads of the library's runtime: sync is I/O-bound; two keep a slow store write
/// from stalling the socket.
const RUNTIME_THREADS: usize = 2;

/// The library's runtime (built on first use). Core stays runtime-free.
fn runtime() -> FfiResult<&'static Runtime> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(RUNTIME_THREADS)
                .thread_name("fieldchart-sync")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| FieldchartError::Internal(format!("cannot start the sync runtime: {e}")))
}

/// Run `future` on the library's runtime and wait for it from any executor.
async fn on_runtime<T: Send + 'static>(
    future: impl Future<Output = FfiResult<T>> + Send + 'static,
) -> FfiResult<T> {
    runtime()?
        .spawn(future)
        .await
        .map_err(|e| FieldchartError::Internal(format!("sync task failed: {e}")))?
}

/// Progress of a running pass.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncProgress {
    pub docs_done: u64,
    pub docs_total: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
}

impl From<&Progress> for SyncProgress {
    fn from(p: &Progress) -> Self {
        SyncProgress {
            docs_done: p.docs_done as u64,
            docs_total: p.docs_total as u64,
            bytes_sent: p.bytes_sent,
            bytes_received: p.bytes_received,
            messages_sent: p.messages_sent,
            messages_received: p.messages_received,
        }
    }
}

/// How a pass ended.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum SyncStatus {
    /// Everything planned is in sync (or in the failure list).
    Complete,
    /// Stopped on request.
    Stopped,
    /// The time budget ran out; the next pass continues where this one stopped.
    BudgetExhausted,
    /// The relay closed the session: this device was revoked.
    Revoked,
    /// The device token expired.
    TokenExpired,
    /// The relay refused the token (revoked, expired or unknown).
    Unauthorized,
    /// The network failed; retry later.
    Interrupted { detail: String },
    /// The relay failed or misbehaved; retry later.
    RelayError { detail: String },
    /// This device's store failed.
    LocalError { detail: String },
}

impl From<&PassStatus> for SyncStatus {
    fn from(s: &PassStatus) -> Self {
        match s {
            PassStatus::Complete => SyncStatus::Complete,
            PassStatus::Stopped => SyncStatus::Stopped,
            PassStatus::BudgetExhausted => SyncStatus::BudgetExhausted,
            PassStatus::Revoked => SyncStatus::Revoked,
            PassStatus::TokenExpired => SyncStatus::TokenExpired,
            PassStatus::Unauthorized => SyncStatus::Unauthorized,
            PassStatus::Interrupted(d) => SyncStatus::Interrupted { detail: d.clone() },
            PassStatus::RelayError(d) => SyncStatus::RelayError { detail: d.clone() },
            PassStatus::LocalError(d) => SyncStatus::LocalError { detail: d.clone() },
        }
    }
}

/// What a finished pass did.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncReport {
    pub status: SyncStatus,
    pub docs_total: u64,
    pub docs_synced: u64,
    pub docs_fetched: u64,
    pub docs_changed: u64,
    pub docs_failed: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// WebSocket payloads and change-feed bodies, both ways.
    pub bytes: u64,
    pub elapsed_ms: u64,
}

impl From<&PassReport> for SyncReport {
    fn from(r: &PassReport) -> Self {
        let PassStats {
            docs_total,
            docs_synced,
            docs_fetched,
            docs_changed,
            docs_failed,
            ..
        } = r.stats;
        SyncReport {
            status: (&r.status).into(),
            docs_total: docs_total as u64,
            docs_synced: docs_synced as u64,
            docs_fetched: docs_fetched as u64,
            docs_changed: docs_changed as u64,
            docs_failed: docs_failed as u64,
            messages_sent: r.messages_sent,
            messages_received: r.messages_received,
            bytes: r.bytes(),
            elapsed_ms: (r.elapsed_s * 1000.0) as u64,
        }
    }
}

/// A pass that ended without finishing its work because of the relay or the network is an
/// error a UI can switch on; a complete, stopped or budget-limited pass is a report.
fn report_result(report: &PassReport) -> FfiResult<SyncReport> {
    let message = |what: &str| format!("sync: {what}");
    match &report.status {
        PassStatus::Complete | PassStatus::Stopped | PassStatus::BudgetExhausted => {
            Ok(report.into())
        }
        PassStatus::Revoked => Err(FieldchartError::Revoked(message(
            "this device was revoked; unsynced notes stay on the device",
        ))),
        PassStatus::Unauthorized => Err(FieldchartError::Revoked(message(
            "the relay no longer accepts this device's token; unsynced notes stay on the device",
        ))),
        PassStatus::TokenExpired => Err(FieldchartError::TokenExpired(message(
            "the device token expired",
        ))),
        PassStatus::Interrupted(d) | PassStatus::RelayError(d) => {
            Err(FieldchartError::Network(message(d)))
        }
        PassStatus::LocalError(d) => Err(FieldchartError::Storage(message(d))),
    }
}

/// What a sync listener is told.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum SyncState {
    /// A pass started.
    Started,
    /// Live mode has synced everything it knew of and waits for changes.
    UpToDate,
    /// A pass ended.
    Finished { status: SyncStatus },
}

/// Progress and state of passes. Called on the library's sync threads: keep it quick and hop
/// to the main thread for UI work.
#[uniffi::export(foreign)]
pub trait SyncListener: Send + Sync {
    /// Progress of the running pass.
    fn on_progress(&self, progress: SyncProgress);
    /// A pass started or ended, or live mode is up to date.
    fn on_state(&self, state: SyncState);
}

/// Told when synced data changed a document, so screens showing it refresh. Called on the
/// library's sync threads.
#[uniffi::export(foreign)]
pub trait ChangeListener: Send + Sync {
    /// `document_id` changed because of what the relay sent.
    fn on_document_changed(&self, document_id: String);
}

/// The registered listeners of one client.
#[derive(Default)]
struct Listeners {
    next_id: AtomicU64,
    sync: Mutex<Vec<(u64, Arc<dyn SyncListener>)>>,
    change: Mutex<Vec<(u64, Arc<dyn ChangeListener>)>>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners").finish_non_exhaustive()
    }
}

impl Listeners {
    /// A snapshot, so no lock is held while foreign code runs.
    fn sync_listeners(&self) -> Vec<Arc<dyn SyncListener>> {
        lock(&self.sync).iter().map(|(_, l)| l.clone()).collect()
    }

    fn change_listeners(&self) -> Vec<Arc<dyn ChangeListener>> {
        lock(&self.change).iter().map(|(_, l)| l.clone()).collect()
    }

    fn state(&self, state: SyncState) {
        for l in self.sync_listeners() {
            l.on_state(state.clone());
        }
    }

    fn remove(&self, id: u64) {
        lock(&self.sync).retain(|(i, _)| *i != id);
        lock(&self.change).retain(|(i, _)| *i != id);
    }
}

/// A poisoned listener list is still a valid list (a push or retain never half-completes).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A listener registration. The listener is no longer called after `cancel()` or after this
/// handle is dropped (garbage-collected / `close()`d / out of scope).
#[derive(Debug, uniffi::Object)]
pub struct Subscription {
    id: u64,
    listeners: Weak<Listeners>,
}

#[uniffi::export]
impl Subscription {
    /// Stop calling the listener. Idempotent.
    pub fn cancel(&self) {
        if let Some(listeners) = self.listeners.upgrade() {
            listeners.remove(self.id);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Syncs one store with one relay. One pass at a time (a second `sync` waits for the first).
#[derive(Debug, uniffi::Object)]
pub struct SyncClient {
    inner: Arc<driver::SyncClient>,
    relay: RelayConfig,
    tls: TlsConfig,
    listeners: Arc<Listeners>,
    live: Mutex<Option<tokio::task::JoinHandle<PassReport>>>,
}

#[uniffi::export]
impl SyncClient {
    /// A client for `store` and the relay at `relay_url` (`https://…`), authenticating with the
    /// device token from enrollment. `pinned_ca_pem`: trust only the agency's CA.
    #[uniffi::constructor]
    pub fn new(
        store: Arc<Store>,
        relay_url: String,
        token: String,
        pinned_ca_pem: Option<String>,
    ) -> FfiResult<Arc<SyncClient>> {
        let relay = RelayConfig {
            base_url: relay_url,
            token,
        };
        let tls = TlsConfig {
            ca_pem: pinned_ca_pem,
        };
        let inner = Arc::new(driver::SyncClient::with_tls(
            store.inner.clone(),
            relay.clone(),
            &tls,
        )?);
        let listeners = Arc::new(Listeners::default());
        // Forward the driver's events to change listeners until the client is gone.
        let mut events = inner.subscribe();
        let weak = Arc::downgrade(&listeners);
        runtime()?.spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                };
                let Some(listeners) = weak.upgrade() else {
                    break;
                };
                match event {
                    SyncEvent::DocumentChanged(id) => {
                        let id = id.to_string();
                        for l in listeners.change_listeners() {
                            l.on_document_changed(id.clone());
                        }
                    }
                    SyncEvent::UpToDate => listeners.state(SyncState::UpToDate),
                }
            }
        });
        Ok(Arc::new(SyncClient {
            inner,
            relay,
            tls,
            listeners,
            live: Mutex::new(None),
        }))
    }

    /// Run one pass, stopping cleanly after `time_budget_ms` if given (an iOS background
    /// task gets about 30 s: pass 25,000). Everything synced before the budget ends is kept.
    /// Revocation is `Revoked`, network or relay failures `Network` (nothing is lost; retry).
    pub async fn sync(&self, time_budget_ms: Option<u64>) -> FfiResult<SyncReport> {
        let inner = self.inner.clone();
        let options = self.options(time_budget_ms, None);
        let listeners = self.listeners.clone();
        on_runtime(async move {
            listeners.state(SyncState::Started);
            let report = inner.run_pass(options).await;
            listeners.state(SyncState::Finished {
                status: (&report.status).into(),
            });
            report_result(&report)
        })
        .await
    }

    /// Start live mode in the background: local edits (`notify_local_change`) are pushed at
    /// once and what the relay forwards is applied; documents not yet in the session arrive
    /// by a feed poll every `feed_poll_ms` (default 60 s). Reconnects with backoff. Returns
    /// at once; `InvalidInput` if live mode already runs.
    pub fn start_live(&self, feed_poll_ms: Option<u64>) -> FfiResult<()> {
        let mut live = lock(&self.live);
        if live.as_ref().is_some_and(|h| !h.is_finished()) {
            return Err(FieldchartError::InvalidInput(
                "live mode is already running".into(),
            ));
        }
        let inner = self.inner.clone();
        let options = self.options(None, feed_poll_ms);
        let listeners = self.listeners.clone();
        *live = Some(runtime()?.spawn(async move {
            listeners.state(SyncState::Started);
            let report = inner.run_live(options, Backoff::default()).await;
            listeners.state(SyncState::Finished {
                status: (&report.status).into(),
            });
            report
        }));
        Ok(())
    }

    /// Stop live mode (at the next message boundary) and return its last pass's report;
    /// `None` if live mode was not running.
    pub async fn stop_live(&self) -> FfiResult<Option<SyncReport>> {
        let handle = lock(&self.live).take();
        let Some(handle) = handle else {
            return Ok(None);
        };
        if !handle.is_finished() {
            self.inner.stop();
        }
        let report = on_runtime(async move {
            handle
                .await
                .map_err(|e| FieldchartError::Internal(format!("live sync task failed: {e}")))
        })
        .await?;
        report_result(&report).map(Some)
    }

    /// A local edit happened: live mode pushes the document now (otherwise the next pass
    /// takes it).
    pub fn notify_local_change(&self, document_id: String) -> FfiResult<()> {
        self.inner.notify_local_change(doc_id(&document_id)?);
        Ok(())
    }

    /// Fetch the agency's device keys into the store (to verify signatures offline).
    pub async fn fetch_keys(&self) -> FfiResult<()> {
        let (relay, tls, store) = (
            self.relay.clone(),
            self.tls.clone(),
            self.inner.store().clone(),
        );
        on_runtime(async move {
            let keys = crate::fetch_device_keys(&relay.base_url, &relay.token, &tls).await?;
            Ok(store.set_key_directory(&keys)?)
        })
        .await
    }

    /// Hear progress and state. Keep the returned handle: dropping it unsubscribes.
    pub fn subscribe_sync(&self, listener: Arc<dyn SyncListener>) -> Arc<Subscription> {
        let id = self.listeners.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.listeners.sync).push((id, listener));
        self.subscription(id)
    }

    /// Hear which documents synced data changed. Keep the handle: dropping it unsubscribes.
    pub fn subscribe_changes(&self, listener: Arc<dyn ChangeListener>) -> Arc<Subscription> {
        let id = self.listeners.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.listeners.change).push((id, listener));
        self.subscription(id)
    }
}

impl Drop for SyncClient {
    /// A client the app lets go of does not leave live mode running on the library's threads.
    fn drop(&mut self) {
        if lock(&self.live).take().is_some_and(|h| !h.is_finished()) {
            self.inner.stop();
        }
    }
}

impl SyncClient {
    fn subscription(&self, id: u64) -> Arc<Subscription> {
        Arc::new(Subscription {
            id,
            listeners: Arc::downgrade(&self.listeners),
        })
    }

    fn options(&self, time_budget_ms: Option<u64>, feed_poll_ms: Option<u64>) -> PassOptions {
        let listeners = Arc::downgrade(&self.listeners);
        let mut options = PassOptions {
            time_budget: time_budget_ms.map(Duration::from_millis),
            progress: Some(Arc::new(move |p: &Progress| {
                if let Some(listeners) = listeners.upgrade() {
                    let progress = SyncProgress::from(p);
                    for l in listeners.sync_listeners() {
                        l.on_progress(progress.clone());
                    }
                }
            })),
            ..PassOptions::default()
        };
        if let Some(ms) = feed_poll_ms {
            options.live_feed_poll = Duration::from_millis(ms.max(1));
        }
        options
    }
}

/// Redeem an enrollment code (typed, or from `parse_enrollment_qr`) with this device's
/// public key (`Store.device_public_key()`). A used, expired or unknown code is `Refused`.
#[uniffi::export]
pub async fn enroll(
    relay_url: String,
    code: String,
    device_name: Option<String>,
    public_key: Vec<u8>,
    pinned_ca_pem: Option<String>,
) -> FfiResult<Enrollment> {
    let public_key: [u8; 32] = public_key.try_into().map_err(|_| {
        FieldchartError::InvalidInput("the public key must be exactly 32 bytes".into())
    })?;
    let tls = TlsConfig {
        ca_pem: pinned_ca_pem,
    };
    on_runtime(async move {
        Ok(
            crate::enroll(&relay_url, &code, device_name.as_deref(), public_key, &tls)
                .await?
                .into(),
        )
    })
    .await
}

/// Read a scanned enrollment QR code. `InvalidInput` if it is not a Fieldchart enrollment.
#[uniffi::export]
pub fn parse_enrollment_qr(payload: String) -> FfiResult<EnrollmentCode> {
    crate::enrollment::parse_qr_payload(&payload)
        .map(Into::into)
        .ok_or_else(|| FieldchartError::InvalidInput("not a Fieldchart enrollment code".into()))
}
