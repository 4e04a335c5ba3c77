//! The audit trail (HIPAA "audit controls"): an append-only row for every document sent to a
//! device (`read`), accepted from one (`write`) and refused (`deny`).
//!
//! `write` rows are stored in the same transaction as the document write
//! ([`crate::storage::DocumentWrite::audit`]). `read` and `deny` rows go through [`AuditLog`],
//! which commits them before the caller sends anything, in batches: every session waiting at
//! the same moment shares one transaction (one fsync), so a reconnect storm costs a few commits,
//! not one per document. If the row cannot be stored, the caller does not send.
//!
//! Admins read the trail by patient, user and time range ([`crate::admin::audit`]) as JSON or
//! CSV ([`to_csv`]).

use std::sync::Arc;

use fieldchart_core::protocol::encode_heads;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::clock::format_ms;
use crate::error::{Error, Result};
use crate::storage::{AuditEvent, AuditRecord, Storage};

/// Most events committed in one transaction.
const MAX_BATCH: usize = 1_024;

/// Events waiting for the writer before `record` callers wait for room.
const QUEUE: usize = 4_096;

type Waiter = (AuditEvent, oneshot::Sender<Result<()>>);

/// Handle to the audit writer task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<Waiter>,
}

impl AuditLog {
    /// Start the writer task on the current tokio runtime. It ends when every handle is gone.
    pub fn start(storage: Arc<dyn Storage>) -> AuditLog {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(storage, rx));
        AuditLog { queue }
    }

    /// Store one event; returns once it is durable.
    pub async fn record(&self, event: AuditEvent) -> Result<()> {
        self.submit(event)
            .await?
            .await
            .map_err(|_| Error::Storage("the audit writer has stopped".into()))?
    }

    /// Queue one event and return at once (after waiting for room in the queue); the receiver
    /// answers when the event is durable, or with the error that kept it from being stored.
    /// Events queued while a batch commits go into the next batch together, so a session
    /// that queues several before waiting shares one commit among them.
    pub async fn submit(&self, event: AuditEvent) -> Result<oneshot::Receiver<Result<()>>> {
        let (done, result) = oneshot::channel();
        self.queue
            .send((event, done))
            .await
            .map_err(|_| Error::Storage("the audit writer has stopped".into()))?;
        Ok(result)
    }
}

async fn write_batches(storage: Arc<dyn Storage>, mut rx: mpsc::Receiver<Waiter>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (events, waiters): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        let result = storage.append_audit(events).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, rows = waiters.len(), "audit rows could not be stored");
        }
        for waiter in waiters {
            // A waiter that gave up (its session ended) no longer needs the answer.
            let _ = waiter.send(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| Error::Storage(e.to_string())),
            );
        }
    }
}

/// One row as JSON (the admin API's and the CLI's format).
pub fn to_json(record: &AuditRecord) -> serde_json::Value {
    let e = &record.event;
    json!({
        "id": record.id,
        "at": format_ms(e.at_ms),
        "atMs": e.at_ms,
        "agencyId": e.agency_id,
        "userId": e.user_id,
        "deviceId": e.device_id,
        "documentId": e.document_id.to_string(),
        "patientId": e.patient_id,
        "action": e.action,
        "heads": encode_heads(&e.heads),
    })
}

/// Header of [`to_csv`].
pub const CSV_HEADER: &str =
    "id,at,agency_id,user_id,device_id,document_id,patient_id,action,heads";

/// Rows as CSV (RFC 4180, header line first, heads space-separated).
pub fn to_csv(records: &[AuditRecord]) -> String {
    let mut out = String::with_capacity(64 + records.len() * 160);
    out.push_str(CSV_HEADER);
    out.push_str("\r\n");
    for record in records {
        let e = &record.event;
        let fields = [
            record.id.to_string(),
            format_ms(e.at_ms),
            e.agency_id.to_string(),
            e.user_id.to_string(),
            e.device_id.to_string(),
            e.document_id.to_string(),
            e.patient_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            e.action.to_string(),
            encode_heads(&e.heads).join(" "),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

/// Quote a CSV field when needed, and defuse spreadsheet formulas: a `patientId` refused in a
/// `deny` row comes from an untrusted document and could be `=HYPERLINK(...)`.
fn csv_field(value: &str) -> String {
    let defused = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if defused.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", defused.replace('"', "\"\""))
    } else {
        defused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AgencyId, DeviceId, PatientId, UserId};
    use crate::storage::{AuditAction, AuditQuery, MemoryStorage};
    use fieldchart_core::protocol::DocumentId;

    fn event(patient: &str) -> AuditEvent {
        AuditEvent {
            at_ms: 1_764_000_000_000,
            agency_id: AgencyId::new("agc_1"),
            user_id: UserId::new("usr_1"),
            device_id: DeviceId::new("dev_1"),
            document_id: DocumentId::random(),
            patient_id: Some(PatientId::new(patient)),
            action: AuditAction::Deny,
            heads: vec![
                automerge::ChangeHash([1; 32]),
                automerge::ChangeHash([2; 32]),
            ],
        }
    }

    #[tokio::test]
    async fn recorded_events_are_stored_before_record_returns() {
        let storage = Arc::new(MemoryStorage::new());
        let log = AuditLog::start(storage.clone());
        let waits: Vec<_> = (0..50)
            .map(|i| log.record(event(&format!("pat_{i}"))))
            .collect();
        for r in futures::future::join_all(waits).await {
            r.expect("stored");
        }
        let rows = storage
            .query_audit(AuditQuery {
                patient_id: None,
                user_id: None,
                from_ms: 0,
                to_ms: i64::MAX,
                limit: 100,
            })
            .await
            .expect("query");
        assert_eq!(rows.len(), 50);
    }

    #[tokio::test]
    async fn a_storage_failure_reaches_the_caller() {
        let storage = Arc::new(MemoryStorage::new());
        storage.set_fail_writes(true);
        let log = AuditLog::start(storage.clone());
        assert!(log.record(event("pat_1")).await.is_err());
    }

    #[test]
    fn csv_quotes_and_defuses_untrusted_values() {
        let rows = vec![
            AuditRecord {
                id: 1,
                event: event("pat_1"),
            },
            AuditRecord {
                id: 2,
                event: event("=HYPERLINK(\"x\",\"y\")"),
            },
        ];
        let csv = to_csv(&rows);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert!(lines[1].starts_with("1,2025-11-24T"), "{}", lines[1]);
        assert!(lines[1].contains(",pat_1,deny,"));
        assert!(
            lines[2].contains(",\"'=HYPERLINK(\"\"x\"\",\"\"y\"\")\",deny,"),
            "{}",
            lines[2]
        );
        assert_eq!(lines.len(), 4, "two rows and a final empty line");
        let json = to_json(&rows[0]);
        assert_eq!(json["action"], "deny");
        assert_eq!(json["heads"].as_array().map(Vec::len), Some(2));
    }
}
