//! The office's writes to a patient's chart: care-plan edits and conflicts resolved by a
//! person. Each is one automerge change authored by the office user (the same [`Actor`]
//! encoding a device writes: user id and the browser session as the device), made on the
//! relay's own loaded document with core's model functions (the ones a device's store runs),
//! committed through [`crate::docs::DocHub`] with a `write` audit row and forwarded to every
//! device syncing the chart, exactly like the schedule. Nothing here is resolved
//! automatically: a conflict is resolved only by the value a person chose, and only while the
//! field still holds exactly the values she was shown.

use automerge::AutoCommit;
use fieldchart_core::model::conflicts::{self, Conflict, ConflictValue};
use fieldchart_core::model::{self, Actor};
use fieldchart_core::protocol::DocumentId;

use super::records::visible_patient;
use crate::auth::Principal;
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::identity::{Patient, PatientId, Role};
use crate::state::AppState;
use crate::storage::{AuditAction, AuditEvent};

/// Care-plan statuses the console offers.
pub const STATUSES: &[&str] = &["active", "met", "not met", "on hold", "discontinued"];

/// What the office changes in a care plan.
#[derive(Debug, Clone)]
pub enum CarePlanEdit {
    /// Add a problem (empty parent), a goal (parent = [problem]) or an intervention
    /// (parent = [problem, goal]).
    Add {
        /// Where.
        parent: Vec<String>,
        /// What.
        description: String,
        /// Its status.
        status: String,
    },
    /// Change an entry's status.
    Status {
        /// The entry (problem id, goal id, intervention id).
        path: Vec<String>,
        /// The new status.
        status: String,
    },
    /// Replace an entry's description.
    Description {
        /// The entry.
        path: Vec<String>,
        /// The new text.
        text: String,
    },
}

fn check_status(status: &str) -> Result<()> {
    if STATUSES.contains(&status) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "unknown status {status:?}; choose one of {}",
            STATUSES.join(", ")
        )))
    }
}

fn check_text(text: &str) -> Result<()> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Error::BadRequest("the description is empty".into()));
    }
    if text.chars().count() > 2000 {
        return Err(Error::BadRequest(
            "the description is longer than 2000 characters".into(),
        ));
    }
    Ok(())
}

/// Office and admin users edit care plans in the console; clinicians on their phone.
fn check_office(principal: &Principal) -> Result<()> {
    if principal.role() == Role::Clinician {
        return Err(Error::Forbidden(
            "care plans are edited in the console by case managers; clinicians edit on their phone",
        ));
    }
    Ok(())
}

/// Apply `edit` to the patient's care plan as `principal`.
pub async fn edit_care_plan(
    state: &AppState,
    principal: &Principal,
    patient_id: &PatientId,
    edit: CarePlanEdit,
) -> Result<()> {
    check_office(principal)?;
    match &edit {
        CarePlanEdit::Add {
            description,
            status,
            parent,
        } => {
            check_text(description)?;
            check_status(status)?;
            if parent.len() > 2 {
                return Err(Error::BadRequest("interventions have no children".into()));
            }
        }
        CarePlanEdit::Status { status, .. } => check_status(status)?,
        CarePlanEdit::Description { text, .. } => check_text(text)?,
    }
    let patient = visible_patient(state, principal, patient_id).await?;
    let chart = patient.chart_document_id;
    write_as(
        state,
        principal,
        &patient,
        chart,
        "edit care plan",
        move |doc, _| match edit {
            CarePlanEdit::Add {
                parent,
                description,
                status,
            } => model::add_care_plan_item(doc, &parent, description.trim(), &status).map(drop),
            CarePlanEdit::Status { path, status } => {
                model::set_care_plan_status(doc, &path, &status)
            }
            CarePlanEdit::Description { path, text } => {
                model::update_care_plan_description(doc, &path, text.trim())
            }
        },
    )
    .await
    .map_err(|e| match e {
        Error::Core(c) if matches!(*c, fieldchart_core::Error::ItemNotFound { .. }) => {
            Error::BadRequest(format!("{c}: it may have been removed; reload the chart"))
        }
        other => other,
    })
}

/// Resolve the conflict at `path` of the patient's chart by keeping the value `choice`, as
/// `principal`, provided the field still holds exactly the values `listed` (their ids, as the
/// page showed them). A set that changed since is refused with [`Error::Conflict`] and nothing
/// is written.
pub async fn resolve_conflict(
    state: &AppState,
    principal: &Principal,
    patient_id: &PatientId,
    path: String,
    listed: Vec<String>,
    choice: String,
) -> Result<()> {
    check_office(principal)?;
    if listed.len() < 2 || !listed.contains(&choice) {
        return Err(Error::BadRequest(
            "the chosen value is not one of the listed values".into(),
        ));
    }
    let patient = visible_patient(state, principal, patient_id).await?;
    let listed = Conflict {
        path: path.clone(),
        values: listed
            .into_iter()
            .map(|id| ConflictValue {
                id,
                value: serde_json::Value::Null,
                author: None,
                time_ms: 0,
                change: String::new(),
            })
            .collect(),
    };
    let user = principal.user_id().to_string();
    let shown = path.clone();
    write_as(
        state,
        principal,
        &patient,
        patient.chart_document_id,
        "resolve conflict",
        move |doc, now| conflicts::resolve(doc, &path, &listed, &choice, &user, now),
    )
    .await
    .map_err(|e| match e {
        Error::Core(c) if matches!(*c, fieldchart_core::Error::ConflictChanged { .. }) => {
            Error::Conflict(format!(
                "the values of {shown} changed since the page was shown (a device synced); \
                 nothing was resolved: look at the values again and choose"
            ))
        }
        Error::Core(c) if matches!(*c, fieldchart_core::Error::ItemNotFound { .. }) => {
            Error::BadRequest("the chosen value is not one of the field's values".into())
        }
        other => other,
    })
}

/// Make `f`'s operations one change of `id` authored by `principal` (the browser session as
/// the device), commit it with a `write` audit row and forward it to every device syncing
/// the document. A failing `f` writes nothing.
async fn write_as<F>(
    state: &AppState,
    principal: &Principal,
    patient: &Patient,
    id: DocumentId,
    message: &'static str,
    f: F,
) -> Result<()>
where
    F: FnOnce(&mut AutoCommit, i64) -> fieldchart_core::Result<()> + Send + 'static,
{
    let author = Actor {
        user_id: principal.user_id().to_string(),
        device_id: principal.device_id.to_string(),
    };
    let now = now_ms();
    let guard = state
        .docs()
        .open(id)
        .await?
        .ok_or(Error::NotFound("chart"))?;
    let (guard, made) = state
        .docs()
        .blocking(guard, move |g| -> Result<Vec<automerge::Change>> {
            let before = g.heads();
            let mut copy = model::load_document(&g.doc().save())?;
            copy.set_actor(automerge::ActorId::random());
            copy.set_author(Some(author.author()));
            f(&mut copy, now)?;
            copy.commit_with(
                automerge::transaction::CommitOptions::default()
                    .with_message(message.to_owned())
                    .with_time(now.div_euclid(1000)),
            );
            let changes: Vec<automerge::Change> = copy.get_changes(&before);
            if !changes.is_empty() {
                g.doc_mut().apply_changes(changes.clone())?;
            }
            Ok(changes)
        })
        .await?;
    let changes = match made {
        Ok(changes) => changes,
        Err(e) => {
            state.docs().discard(guard);
            return Err(e);
        }
    };
    if changes.is_empty() {
        // Nothing changed (the same status again): no change, no write row.
        drop(guard);
        return Ok(());
    }
    let heads = guard.heads();
    let event = AuditEvent {
        at_ms: now,
        agency_id: patient.agency_id.clone(),
        user_id: principal.user_id().clone(),
        device_id: principal.device_id.clone(),
        document_id: id,
        patient_id: Some(patient.id.clone()),
        action: AuditAction::Write,
        heads,
    };
    // `u64::MAX` is no session's id: every device syncing the chart is told.
    state
        .docs()
        .commit(guard, &changes, event, u64::MAX)
        .await
        .map(drop)
}
