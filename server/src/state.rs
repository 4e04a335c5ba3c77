//! The relay's shared state: what every request handler and session reaches through
//! [`AppState`].

use std::ops::Deref;
use std::sync::Arc;

use fieldchart_core::protocol::{PeerId, StorageId};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::audit::AuditLog;
use crate::config::Limits;
use crate::docs::DocHub;
use crate::error::Result;
use crate::session::SessionRegistry;
use crate::storage::Storage;

/// Handle to the relay's shared state; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Relay>);

/// The relay's shared state.
#[derive(Debug)]
pub struct Relay {
    storage: Arc<dyn Storage>,
    docs: DocHub,
    sessions: Arc<SessionRegistry>,
    audit: AuditLog,
    limits: Limits,
    peer_id: PeerId,
    storage_id: StorageId,
    epoch: String,
    metrics: PrometheusHandle,
    /// The agency console, when the storage backend has one ([`AppState::attach_console`]).
    console: std::sync::OnceLock<Arc<crate::console::Console>>,
}

impl AppState {
    /// A relay over `storage`. Starts the audit writer, so it needs a tokio runtime.
    pub async fn new(storage: Arc<dyn Storage>, limits: Limits) -> Result<AppState> {
        let storage_id = storage.storage_id().await?;
        // Several relay processes on one database (PostgreSQL) share the database's epoch, so
        // a cursor of one is good on the others.
        let epoch = match storage.shared_epoch().await? {
            Some(epoch) => epoch,
            None => crate::identity::random_hex::<8>(),
        };
        Ok(AppState(Arc::new(Relay {
            docs: DocHub::new(
                Arc::clone(&storage),
                limits.max_docs_in_memory,
                limits.compact_after_chunks,
            ),
            sessions: Arc::new(SessionRegistry::new(&limits)),
            audit: AuditLog::start(Arc::clone(&storage)),
            // The peer id names this process; the storage id names the data, and stays.
            peer_id: PeerId::random("fieldchart-relay"),
            storage_id,
            // New at every start: a relay whose database was restored from a backup (or
            // replaced) can only have been restarted, so devices holding a cursor from before
            // see a new epoch and reconcile (see `crate::feed`).
            epoch,
            metrics: crate::metrics::handle(),
            console: std::sync::OnceLock::new(),
            limits,
            storage,
        })))
    }
}

impl AppState {
    /// Serve the agency console (`/console/…`) from this relay, keeping its own records in
    /// `store` (the same database as the relay's storage). Set once; a second call is ignored.
    pub fn attach_console(
        &self,
        store: Arc<dyn crate::console::store::ConsoleStore>,
        options: crate::console::ConsoleOptions,
    ) {
        let _ = self
            .console
            .set(Arc::new(crate::console::Console::new(store, options)));
    }
}

impl Deref for AppState {
    type Target = Relay;

    fn deref(&self) -> &Relay {
        &self.0
    }
}

impl Relay {
    /// Durable state.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// Documents in memory.
    pub fn docs(&self) -> &DocHub {
        &self.docs
    }

    /// Open sessions.
    pub fn sessions(&self) -> &Arc<SessionRegistry> {
        &self.sessions
    }

    /// The `read`/`deny` audit writer.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// This relay process's peer id (`senderId` of what it sends).
    pub fn peer_id(&self) -> &PeerId {
        &self.peer_id
    }

    /// The stable storage id advertised in `peer` messages.
    pub fn storage_id(&self) -> &StorageId {
        &self.storage_id
    }

    /// The agency console, if attached.
    pub fn console(&self) -> Option<&Arc<crate::console::Console>> {
        self.console.get()
    }

    /// This process's feed epoch: 16 hex digits, new at every start, carried in every feed
    /// cursor. A cursor of another epoch may come from a database that was since restored.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Renders `/metrics`.
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.metrics
    }
}
