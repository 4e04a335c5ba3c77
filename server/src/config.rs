//! Relay configuration and its limits.
//!
//! Every bounded resource has a named constant here, with its unit in the name or the doc. The
//! constants are the production defaults; [`Limits`] carries them at run time so tests can
//! shrink one limit without waiting for the real one.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Data directory used when `--data-dir` is not given.
pub const DEFAULT_DATA_DIR: &str = "./fieldchart-data";

/// Listen address used when `--listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3030";

/// File name of the relay's SQLite database inside the data directory.
pub const DATABASE_FILE: &str = "relay.sqlite3";

/// Path of the relay database inside `data_dir`.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DATABASE_FILE)
}

/// Largest WebSocket message (one protocol frame) accepted, in bytes. Same bound as the
/// protocol decoder's, so the transport rejects what the codec would.
pub const MAX_FRAME_BYTES: usize = fieldchart_core::protocol::MAX_FRAME_BYTES;

/// Concurrent WebSocket sessions; the next upgrade gets `503 Service Unavailable`.
pub const MAX_SESSIONS: usize = 10_000;

/// Automerge documents held in memory. Beyond this the least recently used documents that no
/// session is currently working on are dropped (they are on disk; the next use reloads them).
pub const MAX_DOCS_IN_MEMORY: usize = 5_000;

/// Sustained protocol messages per second per device token.
pub const MESSAGE_RATE_PER_SECOND: u32 = 500;

/// Burst allowance, in messages, of the per-token rate limit. A JS client re-sends one `sync`
/// per document it holds on every reconnect, so the burst must cover a large caseload.
pub const MESSAGE_BURST: u32 = 10_000;

/// A session that receives nothing (no message, no pong) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Interval of the relay's WebSocket pings; a live client's pongs keep it from idling out.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Documents a session may hold unclassified (announced before `agencyId`/`patientId` exist).
pub const MAX_PENDING_DOCS_PER_SESSION: usize = 64;

/// Total bytes of unclassified documents a session may hold in memory.
pub const MAX_PENDING_BYTES_PER_SESSION: usize = 4 * 1024 * 1024;

/// How long an unclassified document is held before it is dropped (the client gets
/// `doc-unavailable` and may announce it again once it has its root fields).
pub const PENDING_DOC_TTL: Duration = Duration::from_secs(60);

/// Incremental chunks a stored document may accumulate before the next write compacts it into
/// one snapshot.
pub const COMPACT_AFTER_CHUNKS: u32 = 64;

/// How often the relay looks for devices revoked by another process (the admin CLI).
pub const REVOCATION_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How long graceful shutdown waits for sessions to finish before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Largest change-feed page, in entries.
pub const MAX_FEED_PAGE: usize = 1_000;

/// Default change-feed page, in entries.
pub const DEFAULT_FEED_PAGE: usize = 500;

/// Largest audit query page, in rows (answers page with a cursor; nothing is cut off).
pub const MAX_AUDIT_ROWS: usize = 100_000;

/// Default lifetime of a device token, in days.
pub const DEFAULT_TOKEN_TTL_DAYS: u32 = 90;

// --- Administration, enrollment, encryption at rest, TLS (issue 9 / issue 7) ----------------

/// Longest device-token lifetime anyone may ask for (HTTP `ttlDays`, CLI `--ttl-days` and
/// `--expires-at`), in days.
pub const MAX_TOKEN_TTL_DAYS: u32 = 365;

/// Lifetime of an enrollment code when the admin does not say, in minutes.
pub const DEFAULT_ENROLLMENT_TTL_MINUTES: u32 = 15;

/// Longest enrollment-code lifetime, in minutes (a day: long enough to hand a phone over the
/// next morning, short enough that a forgotten code dies).
pub const MAX_ENROLLMENT_TTL_MINUTES: u32 = 24 * 60;

/// Audit rows per page when the caller does not say.
pub const DEFAULT_AUDIT_PAGE: usize = 1_000;

/// File name of the generated database key inside the data directory, used when no key is
/// given (`--key-file`, `FIELDCHART_DB_KEY_FILE`, `FIELDCHART_DB_KEY`).
pub const DEFAULT_KEY_FILE: &str = "relay.key";

/// Environment variable naming a key file.
pub const KEY_FILE_ENV: &str = "FIELDCHART_DB_KEY_FILE";

/// Environment variable holding the key itself (64 hex digits).
pub const KEY_ENV: &str = "FIELDCHART_DB_KEY";

/// How often the TLS certificate and key files are checked for changes (they are also
/// reloaded on SIGHUP).
pub const TLS_RELOAD_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// How long a client may take to finish its TLS handshake before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at once; further connections wait to be accepted.
pub const MAX_TLS_HANDSHAKES: usize = 256;

/// The limits a running relay enforces. `Default` is the constants above.
#[derive(Debug, Clone)]
pub struct Limits {
    /// See [`MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// See [`MAX_SESSIONS`].
    pub max_sessions: usize,
    /// See [`MAX_DOCS_IN_MEMORY`].
    pub max_docs_in_memory: usize,
    /// See [`MESSAGE_RATE_PER_SECOND`].
    pub message_rate_per_second: u32,
    /// See [`MESSAGE_BURST`].
    pub message_burst: u32,
    /// See [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`KEEPALIVE_INTERVAL`].
    pub keepalive_interval: Duration,
    /// See [`MAX_PENDING_DOCS_PER_SESSION`].
    pub max_pending_docs: usize,
    /// See [`MAX_PENDING_BYTES_PER_SESSION`].
    pub max_pending_bytes: usize,
    /// See [`PENDING_DOC_TTL`].
    pub pending_doc_ttl: Duration,
    /// See [`COMPACT_AFTER_CHUNKS`].
    pub compact_after_chunks: u32,
    /// See [`REVOCATION_POLL_INTERVAL`].
    pub revocation_poll_interval: Duration,
    /// See [`SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: MAX_FRAME_BYTES,
            max_sessions: MAX_SESSIONS,
            max_docs_in_memory: MAX_DOCS_IN_MEMORY,
            message_rate_per_second: MESSAGE_RATE_PER_SECOND,
            message_burst: MESSAGE_BURST,
            idle_timeout: IDLE_TIMEOUT,
            keepalive_interval: KEEPALIVE_INTERVAL,
            max_pending_docs: MAX_PENDING_DOCS_PER_SESSION,
            max_pending_bytes: MAX_PENDING_BYTES_PER_SESSION,
            pending_doc_ttl: PENDING_DOC_TTL,
            compact_after_chunks: COMPACT_AFTER_CHUNKS,
            revocation_poll_interval: REVOCATION_POLL_INTERVAL,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}
