//! The agency console: the office's screen, served by the relay itself at `/console/`.
//!
//! Server-rendered HTML (maud, compiled templates): every action is a plain form, so the pages
//! work with a keyboard and a screen reader and need no build step. The one script
//! (`static/live.js`, a few lines) reloads the board and the review queue on Server-Sent
//! Events ([`live`]); without it they are still correct, just not live.
//! A strict Content-Security-Policy (`default-src 'none'`, styles from the relay only) keeps
//! anything from loading from elsewhere.
//!
//! - Sign-in ([`auth`]): office users sign in with a password (argon2id) they set through a
//!   one-time link the admin CLI or an admin prints; the session cookie is `HttpOnly`,
//!   `SameSite=Strict` and `Secure` under TLS; every form carries a CSRF token; failed sign-ins
//!   are rate-limited; idle sessions end.
//! - A signed-in browser acts as its user with a [`crate::auth::Principal`] whose device is the
//!   session (`web_…`): the same access rule ([`crate::access`]), the same admin services
//!   ([`crate::admin`]) and the same audit rows as a device. Opening a chart or a note writes a
//!   `read` audit row naming the office user and the session.
//! - Records ([`records`]): the services the pages read through (chart, note with its
//!   signatures verified by core's `signing::verify`, vitals). Handlers and templates hold no
//!   SQL and no automerge calls.
//! - Pages: [`pages`] (patients, chart, note, review queue), [`chart_pages`] (the chart's
//!   demographics, allergies and medications forms), [`admin_pages`] (users, devices,
//!   enrollment QR, care team, audit search and CSV), [`vitals`] (the SVG chart).
//! - Writes ([`editing`]): the office user's automerge changes (care plan, chart records,
//!   conflicts of charts and draft notes resolved by a person), through the document hub.
//! - Devices' sync failures arrive by `POST /v1/sync-failures` ([`crate::sync_failures`]) and
//!   are listed in the review queue.

pub mod admin_pages;
pub mod auth;
pub mod chart_pages;
pub mod editing;
pub mod live;
pub mod pages;
pub mod records;
pub mod store;
pub mod vitals;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::error::Error;
use crate::state::AppState;
use store::ConsoleStore;

/// Sessions idle this long are signed out.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Sessions end this long after sign-in, whatever the activity.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// How long a set-password link is valid.
pub const PASSWORD_LINK_TTL: Duration = Duration::from_secs(24 * 3600);
/// Failed sign-ins allowed per sign-in name, and per remote address, in [`SIGN_IN_WINDOW`].
pub const SIGN_IN_FAILURES: usize = 5;
/// The window [`SIGN_IN_FAILURES`] counts over.
pub const SIGN_IN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Sign-in names and addresses tracked by the rate limiter before the oldest are forgotten.
pub const SIGN_IN_TRACKED_KEYS: usize = 10_000;
/// Shortest password accepted, in characters (NIST SP 800-63B: at least 8; we ask 12).
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted, in bytes (argon2 hashes anything, but a bound stops abuse).
pub const MAX_PASSWORD_BYTES: usize = 1_024;

/// The policy every console response carries: nothing loads from anywhere but the relay, no
/// inline script runs (the one script is `live.js`, served here), nothing frames the console,
/// forms post only to the relay.
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// How the console is set up.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// Mark cookies `Secure` (the relay serves TLS).
    pub secure_cookies: bool,
    /// Idle sign-out ([`IDLE_TIMEOUT`] by default).
    pub idle_timeout: Duration,
    /// The relay's public URL, put into enrollment QR codes and set-password links.
    pub public_url: Option<String>,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        ConsoleOptions {
            secure_cookies: false,
            idle_timeout: IDLE_TIMEOUT,
            public_url: None,
        }
    }
}

/// The console's state: its store, options and sign-in rate limiter.
#[derive(Debug)]
pub struct Console {
    store: Arc<dyn ConsoleStore>,
    options: ConsoleOptions,
    limiter: auth::SignInLimiter,
    /// Per agency, how many times its devices' reported sync failures changed (in this
    /// process): the live pages reload when it moves.
    failure_reports: std::sync::Mutex<std::collections::HashMap<crate::identity::AgencyId, u64>>,
    /// Times every agency's failures may have changed unseen (another relay's notifications
    /// were missed): added to every agency's count.
    failure_resyncs: std::sync::atomic::AtomicU64,
}

impl Console {
    /// A console over `store`.
    pub fn new(store: Arc<dyn ConsoleStore>, options: ConsoleOptions) -> Console {
        Console {
            store,
            options,
            limiter: auth::SignInLimiter::default(),
            failure_reports: std::sync::Mutex::default(),
            failure_resyncs: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A device of `agency` reported a changed list of sync failures.
    pub fn failures_changed(&self, agency: &crate::identity::AgencyId) {
        let mut counts = self
            .failure_reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry(agency.clone()).or_default() += 1;
    }

    /// Any agency's reported sync failures may have changed without this process hearing of
    /// it (the relay's notification connection to PostgreSQL was down): every live page
    /// reloads once.
    pub fn failures_may_have_changed(&self) {
        self.failure_resyncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many times `agency`'s reported sync failures changed (see
    /// [`Console::failures_changed`] and [`Console::failures_may_have_changed`]); it only grows.
    pub fn failure_reports(&self, agency: &crate::identity::AgencyId) -> u64 {
        let own = self
            .failure_reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(agency)
            .copied()
            .unwrap_or_default();
        own + self
            .failure_resyncs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Its store.
    pub fn store(&self) -> &dyn ConsoleStore {
        &*self.store
    }

    /// Its options.
    pub fn options(&self) -> &ConsoleOptions {
        &self.options
    }
}

/// The console's routes (merged into the relay's router by [`crate::app`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { redirect("/console/") }))
        .route("/console", get(|| async { redirect("/console/") }))
        .route("/console/", get(pages::patients))
        .route("/console/console.css", get(stylesheet))
        .route("/console/live.js", get(live_script))
        .route("/console/events", get(live::events))
        .route(
            "/console/sign-in",
            get(auth::sign_in_page).post(auth::sign_in),
        )
        .route("/console/sign-out", post(auth::sign_out))
        .route(
            "/console/set-password",
            get(auth::set_password_page).post(auth::set_password),
        )
        .route("/console/review", get(pages::review))
        .route("/console/board", get(pages::board))
        .route("/console/schedule", post(pages::schedule))
        .route("/console/patients/{patient_id}", get(pages::chart))
        .route(
            "/console/patients/{patient_id}/care-plan",
            post(pages::edit_care_plan),
        )
        .route(
            "/console/patients/{patient_id}/resolve",
            post(pages::resolve_conflict),
        )
        .route("/console/notes/{document_id}", get(pages::note))
        .route(
            "/console/notes/{document_id}/resolve",
            post(pages::resolve_note_conflict),
        )
        .route(
            "/console/patients/{patient_id}/demographics",
            post(chart_pages::edit_demographic),
        )
        .route(
            "/console/patients/{patient_id}/allergies",
            post(chart_pages::edit_allergy),
        )
        .route(
            "/console/patients/{patient_id}/medications",
            post(chart_pages::edit_medication),
        )
        .merge(admin_pages::routes())
        .layer(axum::middleware::map_response(security_headers))
}

/// Headers on every console response.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // Pages hold patient data: no browser or proxy cache keeps them.
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn stylesheet() -> Response {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("console/static/console.css"),
    )
        .into_response()
}

async fn live_script() -> Response {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("console/static/live.js"),
    )
        .into_response()
}

/// A `303 See Other` to `to` (after a form post, or to the sign-in page).
pub fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, to.to_owned())]).into_response()
}

/// A console failure, shown as a page (or, when no one is signed in, a redirect to sign-in).
#[derive(Debug)]
pub struct ConsoleError(pub Error);

impl<E: Into<Error>> From<E> for ConsoleError {
    fn from(e: E) -> Self {
        ConsoleError(e.into())
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let error = self.0;
        if matches!(error, Error::Unauthorized) {
            return redirect("/console/sign-in");
        }
        let status = error.status();
        let message = if error.is_internal() {
            tracing::error!(error = %error, "console request failed");
            "Something went wrong on the relay; the error was logged.".to_owned()
        } else {
            error.to_string()
        };
        (status, pages::error_page(status, &message)).into_response()
    }
}

/// Result of a console handler.
pub type ConsoleResult<T> = std::result::Result<T, ConsoleError>;
