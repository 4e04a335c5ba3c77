//! `POST /v1/sync-failures`: a device reports the documents it cannot sync, so the office sees
//! them in the console's review queue.
//!
//! After a pass the device sends its whole current failure list (document id, the document's
//! kind and patient as the device indexed them, `refused` or `invalid`, the recorded reason,
//! time and attempts; never the document's content), and the relay replaces what that device
//! reported before: a document a later pass synced drops out of the list, an empty list clears
//! the device. Authenticated like every device call (bearer token); the rows are the device's
//! agency's. A patient is recorded only when the relay knows them in that agency (a document
//! the relay stores gives its own patient; one it never took, e.g. a note refused because the
//! nurse is not on the patient's care team, gives the patient the device names, if that
//! patient is the agency's): nothing a device says can place a row in another agency.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fieldchart_core::protocol::DocumentId;
use serde::Deserialize;

use crate::auth::Principal;
use crate::clock::now_ms;
use crate::console::store::ReportedFailure;
use crate::error::{Error, Result};
use crate::identity::PatientId;
use crate::state::AppState;

/// Most failures one report may hold (a device with more has bigger problems; the relay
/// refuses the report rather than keep part of it).
pub const MAX_REPORTED_FAILURES: usize = 1_000;
/// Longest reason kept, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// One failure as the device reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureEntry {
    /// The document.
    pub document_id: String,
    /// Its kind, from the device's index.
    #[serde(default)]
    pub document_kind: Option<String>,
    /// Its patient, from the device's index.
    #[serde(default)]
    pub patient_id: Option<String>,
    /// `refused` or `invalid`.
    pub failure: String,
    /// Why (no patient data).
    pub reason: String,
    /// Last failure, ms since the epoch.
    pub at_ms: i64,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// The body of `POST /v1/sync-failures`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureReport {
    /// Every document the device cannot sync now.
    pub failures: Vec<FailureEntry>,
}

fn check(entry: &FailureEntry) -> Result<DocumentId> {
    let id: DocumentId = entry
        .document_id
        .parse()
        .map_err(|_| Error::BadRequest(format!("{:?} is not a document id", entry.document_id)))?;
    if !matches!(entry.failure.as_str(), "refused" | "invalid") {
        return Err(Error::BadRequest(format!(
            "unknown failure {:?}: refused or invalid",
            entry.failure
        )));
    }
    if entry.reason.chars().count() > MAX_REASON_CHARS {
        return Err(Error::BadRequest(format!(
            "a reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    if entry
        .document_kind
        .as_ref()
        .is_some_and(|k| k.len() > 64 || !k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
    {
        return Err(Error::BadRequest("a document kind is malformed".into()));
    }
    if entry.patient_id.as_ref().is_some_and(|p| p.len() > 128) {
        return Err(Error::BadRequest("a patient id is too long".into()));
    }
    Ok(id)
}

/// Record `report` as `principal`'s device's current failure list. Returns whether the list
/// changed (the console's live pages then reload).
pub async fn record(
    state: &AppState,
    principal: &Principal,
    report: FailureReport,
) -> Result<bool> {
    let console = state.console().ok_or(Error::NotFound("console"))?;
    if report.failures.len() > MAX_REPORTED_FAILURES {
        return Err(Error::BadRequest(format!(
            "a report holds at most {MAX_REPORTED_FAILURES} failures"
        )));
    }
    let agency = principal.user.agency_id.clone();
    let now = now_ms();
    let mut rows: Vec<ReportedFailure> = Vec::with_capacity(report.failures.len());
    for entry in report.failures {
        let document_id = check(&entry)?;
        if rows.iter().any(|r| r.document_id == document_id) {
            return Err(Error::BadRequest(format!(
                "document {document_id} is reported twice"
            )));
        }
        // The relay's own record of the document wins over what the device says.
        let patient_id = match state.storage().document_row(document_id).await? {
            Some(row) if row.meta.agency_id == agency => Some(row.meta.patient_id),
            Some(_) => None,
            None => match entry.patient_id {
                Some(p) => state
                    .storage()
                    .patient(PatientId::new(p))
                    .await?
                    .filter(|p| p.agency_id == agency)
                    .map(|p| p.id),
                None => None,
            },
        };
        rows.push(ReportedFailure {
            device_id: principal.device_id.clone(),
            user_id: principal.user_id().clone(),
            agency_id: agency.clone(),
            document_id,
            patient_id,
            document_kind: entry.document_kind,
            failure: entry.failure,
            reason: entry.reason,
            at_ms: entry.at_ms,
            attempts: entry.attempts,
            reported_at: now,
        });
    }
    let changed = console
        .store()
        .replace_sync_failures(principal.device_id.clone(), rows)
        .await?;
    if changed {
        console.failures_changed(&agency);
    }
    Ok(changed)
}

/// The `POST /v1/sync-failures` handler: `204 No Content` once stored.
pub async fn report_endpoint(
    principal: Principal,
    State(state): State<AppState>,
    Json(report): Json<FailureReport>,
) -> Result<StatusCode> {
    record(&state, &principal, report).await?;
    Ok(StatusCode::NO_CONTENT)
}
