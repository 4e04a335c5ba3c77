//! # fieldchart-server
//!
//! The Fieldchart relay: devices sync their automerge documents with it over WebSocket, in
//! automerge-repo protocol v1 (so unmodified JS automerge-repo clients work too), and it keeps
//! them on disk, decides who may see what, and records who did.
//!
//! - `GET /v1/sync` — WebSocket, automerge-repo protocol v1 ([`session`], [`websocket`]);
//!   bearer token in `Authorization` or `?token=` ([`auth`]).
//! - `GET /v1/changes?since=CURSOR` — which documents the caller may see changed ([`feed`]).
//! - `POST /v1/documents/fetch` — whole documents, many per request, for a first sync ([`fetch`]).
//! - `/v1/admin/...` — users, patients, care teams, tokens, audit ([`admin`]).
//! - `POST /v1/enroll`, `GET /v1/keys` — device enrollment and the agency's device keys
//!   ([`enroll`]).
//! - `GET /healthz`; `GET /metrics` (Prometheus) with an admin token, or open on the separate
//!   `--metrics-addr` listener ([`run_metrics`]).
//! - `/console/` — the agency console for office users in a browser ([`console`]).
//! - TLS: [`run_tls`] ([`tls`]).
//!
//! The binary (`fieldchart-server serve`, `fieldchart-server admin ...`) is a thin shell over
//! [`app`] and [`run`]; tests use them directly.
//!
//! ```
//! # async fn demo() -> fieldchart_server::Result<()> {
//! use std::sync::Arc;
//! use fieldchart_server::{AppState, config::Limits, storage::MemoryStorage};
//!
//! let state = AppState::new(Arc::new(MemoryStorage::new()), Limits::default()).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(fieldchart_server::run(listener, state, async {
//!     let _ = stopped.await;
//! }));
//! // ... serve ...
//! let _ = stop.send(());
//! server.await.expect("server task")?;
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

pub mod access;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod console;
pub mod docs;
pub mod enroll;
pub mod error;
pub mod feed;
pub mod fetch;
pub mod http_log;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod session;
pub mod signatures;
pub mod state;
pub mod storage;
pub mod sync_failures;
pub mod tls;
pub mod websocket;

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::{get, post};

pub use error::{Error, Result};
pub use state::AppState;

/// The relay's HTTP routes.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/sync", get(websocket::sync_endpoint))
        .route("/v1/changes", get(feed::changes))
        .route(fieldchart_core::sync::fetch::FETCH_PATH, fetch::route())
        .route("/v1/enroll", post(enroll::enroll_endpoint))
        .route("/v1/keys", get(enroll::keys_endpoint))
        .route("/v1/sync-failures", post(sync_failures::report_endpoint))
        .nest("/v1/admin", admin::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(admin_metrics))
        .merge(console::routes())
        .layer(axum::middleware::from_fn(http_log::log_request))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> Result<impl IntoResponse> {
    // A health check that does not touch storage would call a relay with a dead disk healthy.
    state.storage().current_seq().await?;
    Ok(axum::Json(
        serde_json::json!({ "status": "ok", "sessions": state.sessions().len() }),
    ))
}

/// `/metrics` on the public listener: an agency admin's token is required (relay-wide counters
/// are no business of devices). Scrapers use `serve --metrics-addr` instead.
async fn admin_metrics(_admin: admin::AgencyAdmin, state: State<AppState>) -> impl IntoResponse {
    render_metrics(state).await
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
}

/// Serve on `listener` until `shutdown` resolves; then stop accepting, tell every session to
/// close (each finishes the message it is handling, so in-flight commits complete), and return
/// once they are gone or [`config::SHUTDOWN_GRACE`] has passed.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_on(listener, state, shutdown).await
}

/// Like [`run`], over TLS with the certificate `files` hold (reloaded on SIGHUP and on file
/// change, see [`tls`]).
pub async fn run_tls(
    listener: tokio::net::TcpListener,
    files: tls::TlsFiles,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let reload = tokio::spawn(files.clone().watch());
    let served = serve_on(tls::TlsListener::new(listener, files)?, state, shutdown).await;
    reload.abort();
    served
}

/// Serve `/metrics` alone on `listener` (`serve --metrics-addr`), so the scrape endpoint can sit
/// on a private interface while the main listener faces devices.
pub async fn run_metrics(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(state);
    Ok(axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?)
}

async fn serve_on<L>(
    listener: L,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
    admin::RemoteAddr:
        for<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    let revocations = tokio::spawn(watch_revocations(state.clone()));
    let upkeep = tokio::spawn(metrics_upkeep(state.clone()));
    let sessions = state.sessions().clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: closing sessions");
        sessions.shut_down();
    };
    let served = axum::serve(
        listener,
        app(state.clone()).into_make_service_with_connect_info::<admin::RemoteAddr>(),
    )
    .with_graceful_shutdown(signal)
    .await;
    // Sessions live on after their HTTP connection was upgraded; wait for them here.
    state.sessions().shut_down();
    let grace = state.limits().shutdown_grace;
    if tokio::time::timeout(grace, state.sessions().drained())
        .await
        .is_err()
    {
        tracing::warn!(
            open = state.sessions().len(),
            "sessions still open after the shutdown grace period"
        );
    }
    revocations.abort();
    upkeep.abort();
    tracing::info!("relay stopped");
    Ok(served?)
}

/// Close the sessions of devices revoked by another process (the admin CLI on the same data
/// directory), polling the storage's revocation sequence every
/// [`config::REVOCATION_POLL_INTERVAL`]. Revocations through the admin API close sessions at
/// once; this covers every other writer.
pub async fn watch_revocations(state: AppState) {
    let mut seen = match state.storage().current_seq().await {
        Ok(seq) => seq,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the sequence; revocations by the CLI will not close sessions");
            return;
        }
    };
    let mut tick = tokio::time::interval(state.limits().revocation_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match state.storage().revoked_devices_since(seen).await {
            Ok(revoked) => {
                for (device, seq) in revoked {
                    let closed = state.sessions().revoke_device(&device);
                    if closed > 0 {
                        tracing::info!(%device, closed, "device revoked; sessions closed");
                    }
                    seen = seen.max(seq);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot poll revocations"),
        }
    }
}

async fn metrics_upkeep(state: AppState) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        state.metrics().run_upkeep();
    }
}
