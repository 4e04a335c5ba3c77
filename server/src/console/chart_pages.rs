//! The chart's edit forms besides the care plan — demographics, allergies, medications — and
//! their handlers. Every form carries the values as the page showed them (`was_…`), so a
//! field a device changed meanwhile is refused instead of silently overwritten; the writes are
//! [`super::editing::edit_chart`]'s automerge changes, authored by the office user.

use axum::Form;
use axum::extract::{Path, State};
use fieldchart_core::model::{Allergy, Demographic, Medication, PatientChart};
use maud::{Markup, html};
use serde::Deserialize;

use super::auth::Office;
use super::editing::{self, ChartEdit};
use super::{ConsoleResult, redirect};
use crate::error::Error;
use crate::identity::PatientId;
use crate::state::AppState;

fn options(id: &str, name: &str, allowed: &[&str], current: &str) -> Markup {
    html! {
        select id=(id) name=(name) {
            @if !allowed.contains(&current) { option value="" selected { "—" } }
            @for s in allowed { option value=(s) selected[*s == current] { (s) } }
        }
    }
}

/// One form per demographic field (office users).
pub fn demographics_form(patient: &PatientId, chart: &PatientChart, csrf: &str) -> Markup {
    html! {
        div class="edit" {
            @for (field, label) in editing::DEMOGRAPHICS {
                @let current = chart.demographics.get(field.key()).map(String::as_str).unwrap_or("");
                form method="post" action={"/console/patients/" (patient) "/demographics"} class="inline" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="field" value=(field.key());
                    input type="hidden" name="was" value=(current);
                    label for={"demo-" (field.key())} { (label) }
                    input type="text" id={"demo-" (field.key())} name="value" value=(current);
                    button type="submit" aria-label={"Save " (label)} { "Save" }
                }
            }
        }
    }
}

fn allergy_fields(key: &str, a: &Allergy) -> Markup {
    html! {
        label for={"allergy-substance-" (key)} { "Substance" }
        input type="text" id={"allergy-substance-" (key)} name="substance" value=(a.substance) required;
        label for={"allergy-reaction-" (key)} { "Reaction" }
        input type="text" id={"allergy-reaction-" (key)} name="reaction" value=(a.reaction);
        label for={"allergy-severity-" (key)} { "Severity" }
        (options(&format!("allergy-severity-{key}"), "severity", editing::SEVERITIES, &a.severity))
        label for={"allergy-status-" (key)} { "Status" }
        (options(&format!("allergy-status-{key}"), "status", editing::ALLERGY_STATUSES, &a.status))
    }
}

/// A form per allergy and one adding an allergy (office users).
pub fn allergy_forms(patient: &PatientId, allergies: &[Allergy], csrf: &str) -> Markup {
    let action = format!("/console/patients/{patient}/allergies");
    html! {
        @for a in allergies {
            form method="post" action=(action) class="entry" {
                fieldset {
                    legend { "Allergy: " (a.substance) }
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="id" value=(a.id);
                    input type="hidden" name="was_substance" value=(a.substance);
                    input type="hidden" name="was_reaction" value=(a.reaction);
                    input type="hidden" name="was_severity" value=(a.severity);
                    input type="hidden" name="was_status" value=(a.status);
                    (allergy_fields(&a.id, a))
                    button type="submit" aria-label={"Save allergy " (a.substance)} { "Save" }
                }
            }
        }
        form method="post" action=(action) class="entry" {
            fieldset {
                legend { "New allergy" }
                input type="hidden" name="csrf" value=(csrf);
                (allergy_fields("new", &Allergy { status: "active".into(), severity: "unknown".into(), ..Allergy::default() }))
                button type="submit" { "Add allergy" }
            }
        }
    }
}

fn medication_fields(key: &str, m: &Medication) -> Markup {
    html! {
        label for={"med-name-" (key)} { "Drug" }
        input type="text" id={"med-name-" (key)} name="name" value=(m.name) required;
        label for={"med-dose-" (key)} { "Dose" }
        input type="text" id={"med-dose-" (key)} name="dose" value=(m.dose);
        label for={"med-route-" (key)} { "Route" }
        input type="text" id={"med-route-" (key)} name="route" value=(m.route);
        label for={"med-frequency-" (key)} { "Frequency" }
        input type="text" id={"med-frequency-" (key)} name="frequency" value=(m.frequency);
        label for={"med-status-" (key)} { "Status" }
        (options(&format!("med-status-{key}"), "status", editing::MEDICATION_STATUSES, &m.status))
    }
}

/// A form per medication and one adding a medication (office users).
pub fn medication_forms(patient: &PatientId, medications: &[Medication], csrf: &str) -> Markup {
    let action = format!("/console/patients/{patient}/medications");
    html! {
        @for m in medications {
            form method="post" action=(action) class="entry" {
                fieldset {
                    legend { "Medication: " (m.name) }
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="id" value=(m.id);
                    input type="hidden" name="was_name" value=(m.name);
                    input type="hidden" name="was_dose" value=(m.dose);
                    input type="hidden" name="was_route" value=(m.route);
                    input type="hidden" name="was_frequency" value=(m.frequency);
                    input type="hidden" name="was_status" value=(m.status);
                    (medication_fields(&m.id, m))
                    button type="submit" aria-label={"Save medication " (m.name)} { "Save" }
                }
            }
        }
        form method="post" action=(action) class="entry" {
            fieldset {
                legend { "New medication" }
                input type="hidden" name="csrf" value=(csrf);
                (medication_fields("new", &Medication { status: "active".into(), ..Medication::default() }))
                button type="submit" { "Add medication" }
            }
        }
    }
}

/// A demographic field's form.
#[derive(Debug, Deserialize)]
pub struct DemographicForm {
    field: String,
    #[serde(default)]
    was: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/patients/{id}/demographics` — one demographic field, as the office user.
pub async fn edit_demographic(
    State(state): State<AppState>,
    office: Office,
    Path(patient_id): Path<PatientId>,
    Form(form): Form<DemographicForm>,
) -> ConsoleResult<axum::response::Response> {
    office.check_csrf(&form.csrf)?;
    let field: Demographic = editing::DEMOGRAPHICS
        .iter()
        .map(|(f, _)| *f)
        .find(|f| f.key() == form.field)
        .ok_or_else(|| Error::BadRequest("unknown demographic field".into()))?;
    let edit = ChartEdit::Demographic {
        field,
        shown: form.was,
        value: form.value,
    };
    editing::edit_chart(&state, &office.principal, &patient_id, edit).await?;
    Ok(redirect(&format!(
        "/console/patients/{patient_id}#demographics"
    )))
}

/// An allergy's form: the entry as edited and (for an update) as shown.
#[derive(Debug, Deserialize)]
pub struct AllergyForm {
    #[serde(default)]
    id: String,
    #[serde(default)]
    substance: String,
    #[serde(default)]
    reaction: String,
    #[serde(default)]
    severity: String,
    #[serde(default)]
    status: String,
    was_substance: Option<String>,
    #[serde(default)]
    was_reaction: String,
    #[serde(default)]
    was_severity: String,
    #[serde(default)]
    was_status: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/patients/{id}/allergies` — add or update an allergy, as the office user.
pub async fn edit_allergy(
    State(state): State<AppState>,
    office: Office,
    Path(patient_id): Path<PatientId>,
    Form(form): Form<AllergyForm>,
) -> ConsoleResult<axum::response::Response> {
    office.check_csrf(&form.csrf)?;
    let shown = form.was_substance.map(|substance| Allergy {
        id: form.id.clone(),
        substance,
        reaction: form.was_reaction,
        severity: form.was_severity,
        status: form.was_status,
    });
    let edit = ChartEdit::Allergy {
        shown,
        allergy: Allergy {
            id: form.id,
            substance: form.substance,
            reaction: form.reaction,
            severity: form.severity,
            status: form.status,
        },
    };
    editing::edit_chart(&state, &office.principal, &patient_id, edit).await?;
    Ok(redirect(&format!(
        "/console/patients/{patient_id}#allergies"
    )))
}

/// A medication's form: the entry as edited and (for an update) as shown.
#[derive(Debug, Deserialize)]
pub struct MedicationForm {
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    dose: String,
    #[serde(default)]
    route: String,
    #[serde(default)]
    frequency: String,
    #[serde(default)]
    status: String,
    was_name: Option<String>,
    #[serde(default)]
    was_dose: String,
    #[serde(default)]
    was_route: String,
    #[serde(default)]
    was_frequency: String,
    #[serde(default)]
    was_status: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/patients/{id}/medications` — add or update a medication, as the office user.
pub async fn edit_medication(
    State(state): State<AppState>,
    office: Office,
    Path(patient_id): Path<PatientId>,
    Form(form): Form<MedicationForm>,
) -> ConsoleResult<axum::response::Response> {
    office.check_csrf(&form.csrf)?;
    let shown = form.was_name.map(|name| Medication {
        id: form.id.clone(),
        name,
        dose: form.was_dose,
        route: form.was_route,
        frequency: form.was_frequency,
        status: form.was_status,
    });
    let edit = ChartEdit::Medication {
        shown,
        medication: Medication {
            id: form.id,
            name: form.name,
            dose: form.dose,
            route: form.route,
            frequency: form.frequency,
            status: form.status,
        },
    };
    editing::edit_chart(&state, &office.principal, &patient_id, edit).await?;
    Ok(redirect(&format!(
        "/console/patients/{patient_id}#medications"
    )))
}
