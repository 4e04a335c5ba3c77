//! Prometheus metrics: names, units, and the one process-wide recorder.
//!
//! Code records through the `metrics` macros with the names below; `/metrics` renders them in
//! the Prometheus text format. The recorder is global (that is how the `metrics` facade works),
//! so it is installed once per process even when tests build many relays.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge: open WebSocket sessions.
pub const SESSIONS_ACTIVE: &str = "fieldchart_sessions_active";
/// Counter: sessions ended, by `reason`.
pub const SESSIONS_CLOSED: &str = "fieldchart_sessions_closed_total";
/// Counter: protocol messages received, by `type`.
pub const MESSAGES_RECEIVED: &str = "fieldchart_messages_received_total";
/// Counter: protocol messages sent, by `type`.
pub const MESSAGES_SENT: &str = "fieldchart_messages_sent_total";
/// Counter: bytes of protocol frames received.
pub const BYTES_RECEIVED: &str = "fieldchart_received_bytes_total";
/// Counter: bytes of protocol frames sent.
pub const BYTES_SENT: &str = "fieldchart_sent_bytes_total";
/// Gauge: documents held in memory.
pub const DOCS_LOADED: &str = "fieldchart_docs_loaded";
/// Histogram, seconds: from receiving a `sync`/`request` to having sent the answer (including
/// the commit of what it carried).
pub const SYNC_LATENCY: &str = "fieldchart_sync_latency_seconds";
/// Counter: document writes committed.
pub const DOC_WRITES: &str = "fieldchart_document_writes_total";
/// Counter: storage failures that ended a session.
pub const STORAGE_ERRORS: &str = "fieldchart_storage_errors_total";

/// Counter: a bounded resource refused something, by `limit` (`frame_size`,
/// `sessions_per_device`, `byte_rate`, `message_rate`, `bytes_in_flight`, `held_bytes`,
/// `document_size`, `denials`, `slow_reader`).
pub const LIMIT_HITS: &str = "fieldchart_limit_hits_total";

/// Counter: in-memory documents thrown away because they held changes that were never stored
/// (a dirty guard dropped on an error or panic path; see `docs::DocGuard`).
pub const DIRTY_DISCARDS: &str = "fieldchart_dirty_discards_total";
/// Counter: sessions ended because handling one of their messages panicked.
pub const SESSION_PANICS: &str = "fieldchart_session_panics_total";

/// Counter: changes refused because they tamper with a signed note (see `signatures`).
pub const TAMPER_REFUSALS: &str = "fieldchart_tamper_refusals_total";

/// Counter: transactions the SQLite writer committed (or tried to), each holding every write
/// that was waiting (group commit; see `storage::sqlite::group`).
pub const GROUP_COMMITS: &str = "fieldchart_group_commits_total";

/// Counter: writes the SQLite writer ran inside group commits.
pub const GROUP_COMMIT_WRITES: &str = "fieldchart_group_commit_writes_total";

/// Upper bounds of the sync latency buckets, in seconds.
const SYNC_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The process-wide Prometheus recorder, installed on first call.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(SYNC_LATENCY.to_owned()), SYNC_LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (e.g. by an embedding
            // program); our metrics then go there and `/metrics` renders what it has.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics shows only the relay's own view");
            }
            describe();
            handle
        })
        .clone()
}

/// HELP lines and units, and zero values so a scrape of an idle relay shows every series.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(SESSIONS_ACTIVE, Unit::Count, "Open WebSocket sessions");
    describe_counter!(SESSIONS_CLOSED, Unit::Count, "Sessions ended, by reason");
    describe_counter!(
        MESSAGES_RECEIVED,
        Unit::Count,
        "Protocol messages received, by type"
    );
    describe_counter!(
        MESSAGES_SENT,
        Unit::Count,
        "Protocol messages sent, by type"
    );
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "Bytes of protocol frames received"
    );
    describe_counter!(BYTES_SENT, Unit::Bytes, "Bytes of protocol frames sent");
    describe_gauge!(DOCS_LOADED, Unit::Count, "Documents held in memory");
    describe_histogram!(
        SYNC_LATENCY,
        Unit::Seconds,
        "From receiving a sync or request to having answered it"
    );
    describe_counter!(DOC_WRITES, Unit::Count, "Document writes committed");
    describe_counter!(
        STORAGE_ERRORS,
        Unit::Count,
        "Storage failures that ended a session"
    );
    describe_counter!(
        TAMPER_REFUSALS,
        Unit::Count,
        "Changes refused because they tamper with a signed note"
    );
    describe_counter!(
        LIMIT_HITS,
        Unit::Count,
        "Requests refused by a bounded resource, by limit"
    );
    describe_counter!(
        DIRTY_DISCARDS,
        Unit::Count,
        "In-memory documents discarded because they held unstored changes"
    );
    describe_counter!(
        SESSION_PANICS,
        Unit::Count,
        "Sessions ended by a panic while handling one of their messages"
    );
    describe_counter!(
        GROUP_COMMITS,
        Unit::Count,
        "Transactions of the SQLite writer (each commits every write that was waiting)"
    );
    describe_counter!(
        GROUP_COMMIT_WRITES,
        Unit::Count,
        "Writes committed (or failed) inside the SQLite writer's transactions"
    );
    metrics::gauge!(SESSIONS_ACTIVE).set(0.0);
    metrics::gauge!(DOCS_LOADED).set(0.0);
    for counter in [BYTES_RECEIVED, BYTES_SENT, DOC_WRITES, STORAGE_ERRORS] {
        metrics::counter!(counter).absolute(0);
    }
}
