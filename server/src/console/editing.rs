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
use fieldchart_core::model::{self, Actor, Allergy, Demographic, Medication, PatientChart};
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
        false,
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

/// Demographic fields the console edits, with their labels.
pub const DEMOGRAPHICS: &[(Demographic, &str)] = &[
    (Demographic::Name, "Name"),
    (Demographic::DateOfBirth, "Date of birth"),
    (Demographic::Address, "Address"),
    (Demographic::Phone, "Phone"),
    (Demographic::EmergencyContact, "Emergency contact"),
];

/// Allergy severities the console offers.
pub const SEVERITIES: &[&str] = &["mild", "moderate", "severe", "unknown"];
/// Allergy statuses (an allergy is retired, never deleted).
pub const ALLERGY_STATUSES: &[&str] = &["active", "inactive"];
/// Medication statuses.
pub const MEDICATION_STATUSES: &[&str] = &["active", "on-hold", "discontinued"];

/// What the office changes in a chart besides its care plan. Updates carry the entry as the
/// page showed it: only the fields the person changed are written, each only if the chart
/// still holds what the page showed (a device may have synced meanwhile).
#[derive(Debug, Clone)]
pub enum ChartEdit {
    /// Set a demographic field; `shown` is the value the page showed.
    Demographic {
        /// Which.
        field: Demographic,
        /// As shown.
        shown: String,
        /// The new value.
        value: String,
    },
    /// Add an allergy (`shown` is `None`, the id empty) or update one.
    Allergy {
        /// As shown.
        shown: Option<Allergy>,
        /// As the person left it.
        allergy: Allergy,
    },
    /// Add a medication (`shown` is `None`, the id empty) or update one.
    Medication {
        /// As shown.
        shown: Option<Medication>,
        /// As the person left it.
        medication: Medication,
    },
}

fn check_field(what: &str, text: &str, required: bool) -> Result<()> {
    if required && text.trim().is_empty() {
        return Err(Error::BadRequest(format!("the {what} is empty")));
    }
    if text.chars().count() > 500 {
        return Err(Error::BadRequest(format!(
            "the {what} is longer than 500 characters"
        )));
    }
    Ok(())
}

fn check_choice(what: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "unknown {what} {value:?}; choose one of {}",
            allowed.join(", ")
        )))
    }
}

fn trimmed_allergy(a: Allergy) -> Allergy {
    Allergy {
        id: a.id.trim().to_owned(),
        substance: a.substance.trim().to_owned(),
        reaction: a.reaction.trim().to_owned(),
        severity: a.severity.trim().to_owned(),
        status: a.status.trim().to_owned(),
    }
}

fn trimmed_medication(m: Medication) -> Medication {
    Medication {
        id: m.id.trim().to_owned(),
        name: m.name.trim().to_owned(),
        dose: m.dose.trim().to_owned(),
        route: m.route.trim().to_owned(),
        frequency: m.frequency.trim().to_owned(),
        status: m.status.trim().to_owned(),
    }
}

/// Apply `edit` to the patient's chart as `principal`: one automerge change authored by the
/// office user, merged with the nurses' offline edits like any device's. A field in conflict
/// is not written over (resolve it first) and a field a device changed since the page was
/// shown is refused ([`Error::Conflict`]); nothing is written then.
pub async fn edit_chart(
    state: &AppState,
    principal: &Principal,
    patient_id: &PatientId,
    edit: ChartEdit,
) -> Result<()> {
    if principal.role() == Role::Clinician {
        return Err(Error::Forbidden(
            "charts are edited in the console by case managers; clinicians edit on their phone",
        ));
    }
    let edit = match edit {
        ChartEdit::Demographic {
            field,
            shown,
            value,
        } => {
            let value = value.trim().to_owned();
            check_field("value", &value, field == Demographic::Name)?;
            ChartEdit::Demographic {
                field,
                shown,
                value,
            }
        }
        ChartEdit::Allergy { shown, allergy } => {
            let allergy = trimmed_allergy(allergy);
            check_field("substance", &allergy.substance, true)?;
            check_field("reaction", &allergy.reaction, false)?;
            // A value a device wrote outside the console's choices may stay as it is.
            if shown
                .as_ref()
                .is_none_or(|s| s.severity != allergy.severity)
            {
                check_choice("severity", &allergy.severity, SEVERITIES)?;
            }
            if shown.as_ref().is_none_or(|s| s.status != allergy.status) {
                check_choice("status", &allergy.status, ALLERGY_STATUSES)?;
            }
            if shown.is_some() == allergy.id.is_empty() {
                return Err(Error::BadRequest("which allergy?".into()));
            }
            ChartEdit::Allergy {
                shown: shown.map(|s| Allergy {
                    id: allergy.id.clone(),
                    ..s
                }),
                allergy,
            }
        }
        ChartEdit::Medication { shown, medication } => {
            let medication = trimmed_medication(medication);
            check_field("drug name", &medication.name, true)?;
            for (what, text) in [
                ("dose", &medication.dose),
                ("route", &medication.route),
                ("frequency", &medication.frequency),
            ] {
                check_field(what, text, false)?;
            }
            if shown.as_ref().is_none_or(|s| s.status != medication.status) {
                check_choice("status", &medication.status, MEDICATION_STATUSES)?;
            }
            if shown.is_some() == medication.id.is_empty() {
                return Err(Error::BadRequest("which medication?".into()));
            }
            ChartEdit::Medication {
                shown: shown.map(|s| Medication {
                    id: medication.id.clone(),
                    ..s
                }),
                medication,
            }
        }
    };
    let patient = visible_patient(state, principal, patient_id).await?;
    let chart = patient.chart_document_id;
    let author = Actor {
        user_id: principal.user_id().to_string(),
        device_id: principal.device_id.to_string(),
    };
    write_as(
        state,
        principal,
        &patient,
        chart,
        "edit chart",
        false,
        move |doc, now| match edit {
            ChartEdit::Demographic {
                field,
                shown,
                value,
            } => {
                let current = PatientChart::read(chart, &*doc)
                    .demographics
                    .remove(field.key())
                    .unwrap_or_default();
                if current != shown.trim() {
                    return Err(fieldchart_core::Error::StaleRead {
                        path: format!("demographics/{}", field.key()),
                    });
                }
                model::set_demographic(doc, field, &value)
            }
            ChartEdit::Allergy { shown, allergy } => {
                model::upsert_allergy(doc, shown.as_ref(), &allergy, &author, now).map(drop)
            }
            ChartEdit::Medication { shown, medication } => {
                model::upsert_medication(doc, shown.as_ref(), &medication, &author, now).map(drop)
            }
        },
    )
    .await
    .map_err(|e| match e {
        Error::Core(c) => match *c {
            fieldchart_core::Error::StaleRead { path } => Error::Conflict(format!(
                "{path} changed since the page was shown (a device synced); nothing was \
                 saved: reload the chart and edit again"
            )),
            fieldchart_core::Error::FieldInConflict { path } => Error::Conflict(format!(
                "{path} has conflicting values: keep one of them first (listed at the top of \
                 the chart); nothing was saved"
            )),
            fieldchart_core::Error::ItemNotFound { .. } => Error::BadRequest(
                "that entry is not in the chart: it may have been removed; reload the chart".into(),
            ),
            other => Error::Core(Box::new(other)),
        },
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
    let chart = patient.chart_document_id;
    resolve_in(
        state, principal, &patient, chart, path, listed, choice, false,
    )
    .await
}

/// Resolve the conflict at `path` of a visit note, as [`resolve_conflict`] does for a chart.
/// Only a note that is not signed: a signed note's rendering is never touched, and its later
/// changes are review items, not conflicts to settle here ([`Error::Conflict`]).
pub async fn resolve_note_conflict(
    state: &AppState,
    principal: &Principal,
    document_id: DocumentId,
    path: String,
    listed: Vec<String>,
    choice: String,
) -> Result<Patient> {
    check_office(principal)?;
    if listed.len() < 2 || !listed.contains(&choice) {
        return Err(Error::BadRequest(
            "the chosen value is not one of the listed values".into(),
        ));
    }
    let row = state
        .storage()
        .document_row(document_id)
        .await?
        .filter(|row| row.meta.kind == "visit-note")
        .ok_or(Error::NotFound("note"))?;
    let patient = visible_patient(state, principal, &row.meta.patient_id).await?;
    resolve_in(
        state,
        principal,
        &patient,
        document_id,
        path,
        listed,
        choice,
        true,
    )
    .await?;
    Ok(patient)
}

#[allow(clippy::too_many_arguments)]
async fn resolve_in(
    state: &AppState,
    principal: &Principal,
    patient: &Patient,
    id: DocumentId,
    path: String,
    listed: Vec<String>,
    choice: String,
    unsigned_only: bool,
) -> Result<()> {
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
        patient,
        id,
        "resolve conflict",
        unsigned_only,
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
    unsigned_only: bool,
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
        .ok_or(Error::NotFound("document"))?;
    let (guard, made) = state
        .docs()
        .blocking(guard, move |g| -> Result<Vec<automerge::Change>> {
            if unsigned_only && g.doc_and_ledger().1.is_signed() {
                return Err(Error::Conflict(
                    "the note is signed: the console never changes a signed note; its later \
                     changes are listed for review and corrections go in an addendum"
                        .into(),
                ));
            }
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
