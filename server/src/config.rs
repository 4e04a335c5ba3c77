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

/// Largest protocol frame (one WebSocket message) a session accepts, in bytes. A visit note is
/// ~400 bytes saved and a day of typing a few hundred KiB; a larger frame gets a clear `error`
/// and close 1009 (see [`OVERSIZE_FRAME_GRACE_BYTES`]).
pub const MAX_FRAME_BYTES: usize = 2 * 1024 * 1024;

/// Concurrent WebSocket sessions; the next upgrade gets `503 Service Unavailable`.
pub const MAX_SESSIONS: usize = 10_000;

/// Automerge documents held in memory (`serve --max-docs-in-memory`). Beyond this the least
/// recently used documents that no session is currently working on are dropped (they are on
/// disk; the next use reloads them). A typed visit note takes ~55 KB in memory (~1.6 KB
/// saved): 5,000 held 270 MB of relay RSS after a 1,000-device storm, 1,000 held the storm
/// under 256 MB at the same relay CPU per note — a note is busy while one session syncs it,
/// then rarely read again that day.
pub const MAX_DOCS_IN_MEMORY: usize = 1_000;

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

// --- session hardening (issue 9): per-device bounds, relay-wide budgets, revocation ----------

/// How far past [`MAX_FRAME_BYTES`] the WebSocket transport still reads a message, so the
/// session can refuse it with a clear `error` (close 1009) instead of the transport dropping
/// the connection mid-frame. Larger messages are cut off by the transport itself.
pub const OVERSIZE_FRAME_GRACE_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Initial capacity of a WebSocket's read buffer. tungstenite allocates 128 KiB per connection
/// by default, which is most of an idle session's memory (10,000 idle sessions would hold
/// 1.3 GB for nothing). The buffer grows for a larger frame and a visit note's sync message is
/// a few KiB, so a small start costs an idle session little and a busy one a few reallocations.
pub const WS_READ_BUFFER_BYTES: usize = 4 * 1024;

/// Concurrent sessions of one device token; the next upgrade gets `429 Too Many Requests`.
/// A phone needs one; the JS client may briefly hold two while it reconnects.
pub const MAX_SESSIONS_PER_DEVICE: usize = 4;

/// Sustained bytes of protocol frames per second per device token (token bucket on bytes).
pub const BYTE_RATE_PER_SECOND: u32 = 1024 * 1024;

/// Burst allowance, in bytes, of the per-device byte rate: a first sync of a caseload.
pub const BYTE_BURST: u32 = 16 * 1024 * 1024;

/// Relay-wide bytes of frames being handled at once (received, not yet answered). A frame
/// that does not fit gets `error` and close 1013 (try again later).
pub const MAX_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// Relay-wide bytes of unclassified documents held by all sessions, counted on the decoded
/// change bytes of each sync message before it is applied.
pub const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;

/// Largest stored size of one document (snapshot plus chunks, plus the changes being written),
/// in bytes. A write beyond it is refused with an `error`.
pub const MAX_DOCUMENT_BYTES: usize = 8 * 1024 * 1024;

/// Distinct documents a session may be denied before it is closed (close 1008): a device
/// probing ids or forging owners costs a bounded number of audit rows per connection.
pub const MAX_DENIALS_PER_SESSION: usize = 256;

/// How often a session re-reads its device from storage (revoked? expired?), whatever else
/// closes it; a backstop for revocations no other path announced.
pub const DEVICE_RECHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Longest one WebSocket send may take; a client that does not read for this long is
/// disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closing session lets its writer deliver the `error` and close frames; a peer
/// that does not read gets no goodbye after this.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Frames queued for a session's writer; when the peer does not read and the queue stays full
/// for [`SEND_TIMEOUT`], the session is closed as a slow reader.
pub const OUTBOX_FRAMES: usize = 256;

/// Longest client-supplied text (an `error` message, a document `kind`, a claimed id) written
/// to a log line, in characters; longer values are cut and control characters escaped.
pub const MAX_LOGGED_CLIENT_TEXT: usize = 128;

/// Longest client-supplied id (a claimed `patientId` or `agencyId`) the relay looks up, in
/// bytes; longer claims are refused without a lookup.
pub const MAX_CLAIMED_ID_BYTES: usize = 128;

/// Heads recorded in one `deny` audit row (a refused document's heads come from the client).
pub const MAX_AUDIT_HEADS: usize = 16;
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
    /// See [`MAX_SESSIONS_PER_DEVICE`].
    pub max_sessions_per_device: usize,
    /// See [`BYTE_RATE_PER_SECOND`].
    pub byte_rate_per_second: u32,
    /// See [`BYTE_BURST`].
    pub byte_burst: u32,
    /// See [`MAX_BYTES_IN_FLIGHT`].
    pub max_bytes_in_flight: usize,
    /// See [`MAX_HELD_BYTES`].
    pub max_held_bytes: usize,
    /// See [`MAX_DOCUMENT_BYTES`].
    pub max_document_bytes: usize,
    /// See [`MAX_DENIALS_PER_SESSION`].
    pub max_denials_per_session: usize,
    /// See [`DEVICE_RECHECK_INTERVAL`].
    pub device_recheck_interval: Duration,
    /// See [`SEND_TIMEOUT`].
    pub send_timeout: Duration,
    /// See [`OUTBOX_FRAMES`].
    pub outbox_frames: usize,
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
            max_sessions_per_device: MAX_SESSIONS_PER_DEVICE,
            byte_rate_per_second: BYTE_RATE_PER_SECOND,
            byte_burst: BYTE_BURST,
            max_bytes_in_flight: MAX_BYTES_IN_FLIGHT,
            max_held_bytes: MAX_HELD_BYTES,
            max_document_bytes: MAX_DOCUMENT_BYTES,
            max_denials_per_session: MAX_DENIALS_PER_SESSION,
            device_recheck_interval: DEVICE_RECHECK_INTERVAL,
            send_timeout: SEND_TIMEOUT,
            outbox_frames: OUTBOX_FRAMES,
        }
    }
}
