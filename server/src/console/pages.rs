//! The console's pages (maud templates, compiled with the relay) and the handlers of the
//! patient list, the chart and the note. Templates only lay out what [`super::records`] read.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use fieldchart_core::model::signing::ReviewReason;
use fieldchart_core::protocol::DocumentId;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::auth::Office;
use super::records::{self, ChartView, NoteView, PatientSummary};
use super::{ConsoleResult, chart_pages, editing, vitals};
use crate::clock::format_ms;
use crate::error::Error;
use crate::identity::{PatientId, Role};
use crate::state::AppState;

/// The frame of every page: skip link, header with navigation and sign-out, main landmark.
pub fn layout(title: &str, office: Option<&Office>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Fieldchart console" }
                link rel="stylesheet" href="/console/console.css";
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    span class="brand" { "Fieldchart" }
                    @if let Some(office) = office {
                        nav aria-label="Console" {
                            ul {
                                li { a href="/console/board" { "Today" } }
                                li { a href="/console/" { "Patients" } }
                                li { a href="/console/review" { "Review queue" } }
                                @if office.user().role == Role::Admin {
                                    li { a href="/console/admin/users" { "Users" } }
                                    li { a href="/console/admin/audit" { "Audit" } }
                                }
                            }
                        }
                        form class="sign-out" method="post" action="/console/sign-out" {
                            input type="hidden" name="csrf" value=(office.csrf);
                            span { (office.user().name) " (" (office.user().role.as_str()) ")" }
                            " "
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// [`layout`] plus the live-update script (the board and the review queue).
pub fn live_layout(title: &str, office: &Office, body: Markup) -> Markup {
    layout(
        title,
        Some(office),
        html! {
            (body)
            script src="/console/live.js" defer {}
        },
    )
}

/// A failure as a page.
pub fn error_page(status: StatusCode, message: &str) -> Markup {
    layout(
        status.canonical_reason().unwrap_or("Error"),
        None,
        html! {
            p role="alert" { (message) }
            p { a href="/console/" { "Back to the console" } }
        },
    )
}

/// The sign-in page.
pub fn sign_in_page(csrf: &str, note: Option<&str>, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            @if let Some(note) = note { p role="status" { (note) } }
            @if let Some(error) = error { p class="error" role="alert" { (error) } }
            form method="post" action="/console/sign-in" {
                input type="hidden" name="csrf" value=(csrf);
                p {
                    label for="login" { "Sign-in name" }
                    input id="login" name="login" type="text" autocomplete="username" required autofocus;
                }
                p {
                    label for="password" { "Password" }
                    input id="password" name="password" type="password" autocomplete="current-password" required;
                }
                p { button type="submit" { "Sign in" } }
            }
        },
    )
}

/// The set-password page of a one-time link.
pub fn set_password_page(csrf: &str, token: &str, name: &str, error: Option<&str>) -> Markup {
    layout(
        "Set your password",
        None,
        html! {
            p { "Welcome, " (name) ". Choose a password of at least "
                (super::MIN_PASSWORD_CHARS) " characters. This link works once." }
            @if let Some(error) = error { p class="error" role="alert" { (error) } }
            form method="post" action="/console/set-password" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="token" value=(token);
                p {
                    label for="password" { "New password" }
                    input id="password" name="password" type="password" autocomplete="new-password"
                        minlength=(super::MIN_PASSWORD_CHARS) required;
                }
                p {
                    label for="confirm" { "Repeat it" }
                    input id="confirm" name="confirm" type="password" autocomplete="new-password" required;
                }
                p { button type="submit" { "Set password" } }
            }
        },
    )
}

/// `GET /console/` — the patients the user may open.
pub async fn patients(State(state): State<AppState>, office: Office) -> ConsoleResult<Markup> {
    let list = records::patients(&state, &office.principal).await?;
    Ok(layout("Patients", Some(&office), patients_body(&list)))
}

fn patients_body(list: &[PatientSummary]) -> Markup {
    html! {
        @if list.is_empty() {
            p { "No patients to show." }
        } @else {
            ul class="patients" {
                @for p in list {
                    li { a href={"/console/patients/" (p.patient.id)} {
                        @if p.name.is_empty() { (p.patient.id) } @else { (p.name) }
                    } }
                }
            }
        }
    }
}

/// Query of the board.
#[derive(Debug, Deserialize)]
pub struct BoardQuery {
    /// `YYYY-MM-DD`; today (UTC) by default.
    #[serde(default)]
    pub date: Option<String>,
}

fn today() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%d").to_string()
}

/// `GET /console/board` — each clinician's visits of the day and how far each got; late and
/// missing notes stand out. Office and admin users also get the scheduling form.
pub async fn board(
    State(state): State<AppState>,
    office: Office,
    Query(q): Query<BoardQuery>,
) -> ConsoleResult<Markup> {
    let date = q.date.filter(|d| !d.is_empty()).unwrap_or_else(today);
    let visits = records::board(&state, &office.principal, &date).await?;
    let can_schedule = office.user().role != Role::Clinician;
    let (patients, clinicians) = if can_schedule {
        let store = state
            .console()
            .map(|c| c.store())
            .ok_or(Error::NotFound("console"))?;
        let users = store.agency_users(office.user().agency_id.clone()).await?;
        (
            records::patients(&state, &office.principal).await?,
            users
                .into_iter()
                .filter(|u| u.user.role == Role::Clinician && u.disabled_at.is_none())
                .map(|u| u.user)
                .collect::<Vec<_>>(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(live_layout(
        &format!("Visits on {date}"),
        &office,
        html! {
            form method="get" action="/console/board" class="search" {
                p { label for="date" { "Date" } input id="date" name="date" type="date" value=(date); }
                p { button type="submit" { "Show" } }
            }
            @if visits.is_empty() { p { "No visits scheduled." } } @else {
                table class="board" {
                    thead { tr {
                        th scope="col" { "Clinician" } th scope="col" { "Window" } th scope="col" { "Patient" }
                        th scope="col" { "Service" } th scope="col" { "Status" } th scope="col" { "Note" }
                    } }
                    tbody {
                        @for v in &visits {
                            tr class=[(v.late || v.note_missing).then_some("attention")] {
                                td { (v.clinician_name) }
                                td { (v.visit.window_start) "–" (v.visit.window_end) }
                                td { (v.patient_name) }
                                td { (v.visit.service_type) }
                                td {
                                    (match v.state {
                                        records::VisitState::Scheduled => "scheduled",
                                        records::VisitState::Started => "started, received",
                                        records::VisitState::Finished => "finished, received",
                                        records::VisitState::Signed => "signed, received",
                                    })
                                    @if v.late { " " strong class="flag" { "Late" } }
                                    @if v.note_missing { " " strong class="flag" { "Note missing" } }
                                }
                                td { @if let Some(n) = v.note { a href={"/console/notes/" (n)} { "Open note" } } }
                            }
                        }
                    }
                }
            }
            @if can_schedule {
                section aria-labelledby="schedule" {
                    h2 id="schedule" { "Schedule a visit" }
                    form method="post" action="/console/schedule" {
                        input type="hidden" name="csrf" value=(office.csrf);
                        p { label for="s-patient" { "Patient" } select id="s-patient" name="patient" {
                            @for p in &patients { option value=(p.patient.id) { (p.name) } } } }
                        p { label for="s-clinician" { "Clinician" } select id="s-clinician" name="clinician" {
                            @for u in &clinicians { option value=(u.id) { (u.name) } } } }
                        p { label for="s-date" { "Date" } input id="s-date" name="date" type="date" value=(date) required; }
                        p { label for="s-start" { "From" } input id="s-start" name="start" type="time" value="09:00" required; }
                        p { label for="s-end" { "To" } input id="s-end" name="end" type="time" value="10:00" required; }
                        p { label for="s-service" { "Service" } input id="s-service" name="service" type="text" value="skilled-nursing" required; }
                        p { button type="submit" { "Schedule" } }
                    }
                }
            }
        },
    ))
}

/// The scheduling form.
#[derive(Debug, Deserialize)]
pub struct ScheduleForm {
    patient: PatientId,
    clinician: String,
    date: String,
    start: String,
    end: String,
    service: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/schedule`
pub async fn schedule(
    State(state): State<AppState>,
    office: Office,
    Form(form): Form<ScheduleForm>,
) -> ConsoleResult<axum::response::Response> {
    office.check_csrf(&form.csrf)?;
    records::schedule_visit(
        &state,
        &office.principal,
        &office.ctx,
        &form.patient,
        fieldchart_core::model::schedule::ScheduledVisit {
            id: String::new(),
            clinician_id: form.clinician,
            date: form.date.clone(),
            window_start: form.start,
            window_end: form.end,
            service_type: form.service,
            status: String::new(),
        },
    )
    .await?;
    Ok(super::redirect(&format!(
        "/console/board?date={}",
        form.date
    )))
}

/// `GET /console/review` — changes after signatures, tampering and open conflicts, each linked
/// to its note or chart.
pub async fn review(State(state): State<AppState>, office: Office) -> ConsoleResult<Markup> {
    let entries = records::review_queue(&state, &office.principal).await?;
    let failures = records::sync_failures(&state, &office.principal).await?;
    Ok(live_layout(
        "Review queue",
        &office,
        html! {
            (review_body(&entries, &office))
            (failures_body(&failures))
        },
    ))
}

fn failure_text(failure: &str) -> &'static str {
    match failure {
        "refused" => "the relay refused the device's data",
        "invalid" => "the relay's data could not be applied on the device",
        _ => "sync failure",
    }
}

/// Documents devices cannot sync, as they reported them (cleared when a later pass syncs).
fn failures_body(failures: &[records::FailureView]) -> Markup {
    html! {
        section aria-labelledby="sync-failures" {
            h2 id="sync-failures" { "Device sync failures" }
            @if failures.is_empty() { p { "Every device reports its documents in sync." } } @else {
                table class="review" {
                    thead { tr {
                        th scope="col" { "Patient" } th scope="col" { "Document" } th scope="col" { "Device" }
                        th scope="col" { "What" } th scope="col" { "Since" } th scope="col" { "Open" }
                    } }
                    tbody {
                        @for f in failures {
                            tr {
                                td { (f.patient.as_ref().map(|p| if p.name.is_empty() { p.patient.id.to_string() } else { p.name.clone() }).unwrap_or_else(|| "unknown to the relay".into())) }
                                td { (f.failure.document_kind.as_deref().unwrap_or("document")) " " code { (f.failure.document_id) } }
                                td { (f.user_name) " on " (f.failure.device_id) }
                                td { (failure_text(&f.failure.failure)) ": " (f.failure.reason) }
                                td { (format_ms(f.failure.at_ms)) " (" (f.failure.attempts) " attempts)" }
                                td {
                                    @if f.note_on_relay {
                                        a href={"/console/notes/" (f.failure.document_id)} { "Open note" }
                                    } @else if let Some(p) = &f.patient {
                                        a href={"/console/patients/" (p.patient.id)} { "Open chart" }
                                    } @else { "—" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn review_body(entries: &[records::ReviewEntry], office: &Office) -> Markup {
    let csrf = (office.user().role != Role::Clinician).then_some(office.csrf.as_str());
    html! {
        @if entries.is_empty() { p { "Nothing is waiting for review." } } @else {
            table class="review" {
                thead { tr {
                    th scope="col" { "Patient" } th scope="col" { "What" } th scope="col" { "Details" }
                    th scope="col" { "Open" }
                } }
                tbody {
                    @for e in entries {
                        tr {
                            td { (e.patient_name) }
                            @match &e.what {
                                records::ReviewWhat::Item(item) => {
                                    td { (review_reason(&item.reason)) }
                                    td {
                                        (item.author.as_ref().map(|a| format!("{} on {}", a.user_id, a.device_id)).unwrap_or_else(|| "unknown author".into()))
                                        ", " (format_ms(item.time_ms)) ": " (item.fields.join(", "))
                                    }
                                }
                                records::ReviewWhat::Conflict(c) => {
                                    td { "Conflicting values of " code { (c.path) } }
                                    td {
                                        (conflict_values(c, csrf.and_then(|t| {
                                            let action = match e.kind.as_str() {
                                                "patient" => format!("/console/patients/{}/resolve", e.patient.id),
                                                "visit-note" if !e.signed => format!("/console/notes/{}/resolve", e.document_id),
                                                _ => return None,
                                            };
                                            Some((action, t, "review"))
                                        })))
                                    }
                                }
                            }
                            td {
                                @if e.kind == "visit-note" {
                                    a href={"/console/notes/" (e.document_id)} { "Open note" }
                                } @else {
                                    a href={"/console/patients/" (e.patient.id)} { "Open chart" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /console/patients/{id}` — the chart (audited).
pub async fn chart(
    State(state): State<AppState>,
    office: Office,
    Path(patient_id): Path<PatientId>,
) -> ConsoleResult<Markup> {
    let view = records::open_chart(&state, &office.principal, &patient_id).await?;
    let title = view.chart.name().unwrap_or("Patient").to_owned();
    Ok(layout(&title, Some(&office), chart_body(&view, &office)))
}

/// A care-plan form: `action` is `add` (under `path`, empty for a problem), `status` or
/// `description` (of the entry at `path`, ids joined by `/`).
#[derive(Debug, Deserialize)]
pub struct CarePlanForm {
    action: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/patients/{id}/care-plan` — one care-plan edit, as the office user.
pub async fn edit_care_plan(
    State(state): State<AppState>,
    office: Office,
    Path(patient_id): Path<PatientId>,
    Form(form): Form<CarePlanForm>,
) -> ConsoleResult<axum::response::Response> {
    office.check_csrf(&form.csrf)?;
    let path: Vec<String> = form
        .path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let edit = match form.action.as_str() {
        "add" => editing::CarePlanEdit::Add {
            parent: path,
            description: form.description,
            status: form.status,
        },
        "status" | "description" if path.is_empty() => {
            return Err(Error::BadRequest("which care-plan entry?".into()).into());
        }
        "status" => editing::CarePlanEdit::Status {
            path,
            status: form.status,
        },
        "description" => editing::CarePlanEdit::Description {
            path,
            text: form.description,
        },
        _ => return Err(Error::BadRequest("unknown care-plan action".into()).into()),
    };
    editing::edit_care_plan(&state, &office.principal, &patient_id, edit).await?;
    Ok(super::redirect(&format!(
        "/console/patients/{patient_id}#care-plan"
    )))
}

/// "Keep this value": the conflicted field `path`, the ids of the values the page listed
/// (space separated), the chosen one, and where to go back to (`review` or the chart).
#[derive(Debug, Deserialize)]
pub struct ResolveForm {
    path: String,
    listed: String,
    choice: String,
    #[serde(default)]
    back: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/patients/{id}/resolve` — a person resolves a conflict of the chart.
pub async fn resolve_conflict(
    State(state): State<AppState>,
    office: Office,
    Path(patient_id): Path<PatientId>,
    Form(form): Form<ResolveForm>,
) -> ConsoleResult<axum::response::Response> {
    office.check_csrf(&form.csrf)?;
    let listed = form.listed.split_whitespace().map(str::to_owned).collect();
    editing::resolve_conflict(
        &state,
        &office.principal,
        &patient_id,
        form.path,
        listed,
        form.choice,
    )
    .await?;
    Ok(super::redirect(&if form.back == "review" {
        "/console/review".to_owned()
    } else {
        format!("/console/patients/{patient_id}#conflicts")
    }))
}

/// `POST /console/notes/{id}/resolve` — a person resolves a conflict of a draft visit note.
pub async fn resolve_note_conflict(
    State(state): State<AppState>,
    office: Office,
    Path(document_id): Path<String>,
    Form(form): Form<ResolveForm>,
) -> ConsoleResult<axum::response::Response> {
    office.check_csrf(&form.csrf)?;
    let id: DocumentId = document_id.parse().map_err(|_| Error::NotFound("note"))?;
    let listed = form.listed.split_whitespace().map(str::to_owned).collect();
    editing::resolve_note_conflict(
        &state,
        &office.principal,
        id,
        form.path,
        listed,
        form.choice,
    )
    .await?;
    Ok(super::redirect(&if form.back == "review" {
        "/console/review".to_owned()
    } else {
        format!("/console/notes/{id}#conflicts")
    }))
}

fn shown_value(v: &serde_json::Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

/// Every value of a conflict with author and time, and (for office users, on the chart) a
/// "keep this value" button per value.
pub(super) fn conflict_values(
    c: &fieldchart_core::model::Conflict,
    resolve: Option<(String, &str, &str)>,
) -> Markup {
    let listed = c
        .values
        .iter()
        .map(|v| v.id.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    html! {
        ul class="conflict" {
            @for v in &c.values {
                li {
                    strong { (shown_value(&v.value)) }
                    " — " (v.author.as_ref().map(|a| format!("{} on {}", a.user_id, a.device_id)).unwrap_or_else(|| "unknown author".into()))
                    ", " (format_ms(v.time_ms))
                    @if let Some((action, csrf, back)) = &resolve {
                        form method="post" action=(action) class="inline" {
                            input type="hidden" name="csrf" value=(csrf);
                            input type="hidden" name="path" value=(c.path);
                            input type="hidden" name="listed" value=(listed);
                            input type="hidden" name="choice" value=(v.id);
                            input type="hidden" name="back" value=(back);
                            button type="submit" aria-label={"Keep " (shown_value(&v.value)) " for " (c.path)} { "Keep this value" }
                        }
                    }
                }
            }
        }
    }
}

fn status_select(id: &str, current: &str) -> Markup {
    html! {
        select id=(id) name="status" {
            @for s in editing::STATUSES {
                option value=(s) selected[*s == current] { (s) }
            }
        }
    }
}

/// One care-plan entry with (for office users) its status and description forms.
fn care_plan_entry(
    patient: &PatientId,
    item: &fieldchart_core::model::CarePlanItem,
    path: &str,
    level: &str,
    csrf: Option<&str>,
) -> Markup {
    let key = path.replace('/', "-");
    html! {
        (level) ": " strong { (item.description) } " — " (status_text(&item.status))
        @if let Some(csrf) = csrf {
            div class="edit" {
                form method="post" action={"/console/patients/" (patient) "/care-plan"} class="inline" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="action" value="status";
                    input type="hidden" name="path" value=(path);
                    label for={"status-" (key)} { "Status of " (level) " " (item.description) }
                    (status_select(&format!("status-{key}"), &item.status))
                    button type="submit" { "Set status" }
                }
                form method="post" action={"/console/patients/" (patient) "/care-plan"} class="inline" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="action" value="description";
                    input type="hidden" name="path" value=(path);
                    label for={"text-" (key)} { "Description of " (level) " " (item.description) }
                    input type="text" id={"text-" (key)} name="description" value=(item.description) required;
                    button type="submit" { "Save description" }
                }
            }
        }
    }
}

/// A form adding a problem (`parent` empty), a goal or an intervention.
fn add_form(patient: &PatientId, parent: &str, what: &str, csrf: &str) -> Markup {
    let key = if parent.is_empty() {
        "root".to_owned()
    } else {
        parent.replace('/', "-")
    };
    html! {
        form method="post" action={"/console/patients/" (patient) "/care-plan"} class="add" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="action" value="add";
            input type="hidden" name="path" value=(parent);
            input type="hidden" name="status" value="active";
            label for={"add-" (key)} { "New " (what) }
            input type="text" id={"add-" (key)} name="description" required;
            button type="submit" { "Add " (what) }
        }
    }
}

fn status_text(status: &str) -> &str {
    if status.is_empty() { "—" } else { status }
}

fn chart_body(v: &ChartView, office: &Office) -> Markup {
    let c = &v.chart;
    let pid = &v.patient.id;
    let csrf = (office.user().role != Role::Clinician).then_some(office.csrf.as_str());
    html! {
        @if !v.conflicts.is_empty() {
            section aria-labelledby="conflicts" {
                h2 id="conflicts" { "Conflicting values" }
                p { "These fields were changed concurrently. Nothing is chosen automatically: keep the right value." }
                @for conflict in &v.conflicts {
                    h3 { code { (conflict.path) } }
                    (conflict_values(conflict, csrf.map(|t| (format!("/console/patients/{pid}/resolve"), t, "chart"))))
                }
            }
        }
        section aria-labelledby="demographics" {
            h2 id="demographics" { "Demographics" }
            dl {
                @for (k, val) in &c.demographics { dt { (k) } dd { (val) } }
            }
            @if let Some(csrf) = csrf { (chart_pages::demographics_form(pid, c, csrf)) }
        }
        section aria-labelledby="allergies" {
            h2 id="allergies" { "Allergies" }
            @if c.allergies.is_empty() { p { "No allergies recorded." } } @else {
                table {
                    thead { tr { th scope="col" { "Substance" } th scope="col" { "Reaction" } th scope="col" { "Severity" } th scope="col" { "Status" } } }
                    tbody { @for a in &c.allergies { tr { td { (a.substance) } td { (a.reaction) } td { (a.severity) } td { (status_text(&a.status)) } } } }
                }
            }
            @if let Some(csrf) = csrf { (chart_pages::allergy_forms(pid, &c.allergies, csrf)) }
        }
        section aria-labelledby="medications" {
            h2 id="medications" { "Medications" }
            @if c.medications.is_empty() { p { "No medications recorded." } } @else {
                table {
                    thead { tr { th scope="col" { "Drug" } th scope="col" { "Dose" } th scope="col" { "Route" } th scope="col" { "Frequency" } th scope="col" { "Status" } } }
                    tbody { @for m in &c.medications { tr { td { (m.name) } td { (m.dose) } td { (m.route) } td { (m.frequency) } td { (status_text(&m.status)) } } } }
                }
            }
            @if let Some(csrf) = csrf { (chart_pages::medication_forms(pid, &c.medications, csrf)) }
        }
        section aria-labelledby="care-team" {
            h2 id="care-team" { "Care team" }
            @if v.care_team.is_empty() { p { "Nobody is assigned." } } @else {
                ul { @for u in &v.care_team { li { (u.name) " (" (u.role.as_str()) ")" } } }
            }
        }
        section aria-labelledby="care-plan" {
            h2 id="care-plan" { "Care plan" }
            @if c.care_plan.is_empty() { p { "No care plan yet." } } @else {
                ul class="care-plan" {
                    @for problem in &c.care_plan {
                        li {
                            (care_plan_entry(pid, problem, &problem.id, "Problem", csrf))
                            ul { @for goal in &problem.children {
                                @let goal_path = format!("{}/{}", problem.id, goal.id);
                                li {
                                    (care_plan_entry(pid, goal, &goal_path, "Goal", csrf))
                                    ul { @for i in &goal.children {
                                        li { (care_plan_entry(pid, i, &format!("{goal_path}/{}", i.id), "Intervention", csrf)) }
                                    } }
                                    @if let Some(csrf) = csrf { (add_form(pid, &goal_path, "intervention", csrf)) }
                                }
                            } }
                            @if let Some(csrf) = csrf { (add_form(pid, &problem.id, "goal", csrf)) }
                        }
                    }
                }
            }
            @if let Some(csrf) = csrf { (add_form(pid, "", "problem", csrf)) }
        }
        section aria-labelledby="vitals" {
            h2 id="vitals" { "Vital signs" }
            (vitals::chart(&v.vitals))
        }
        section aria-labelledby="notes" {
            h2 id="notes" { "Visit notes" }
            @if v.notes.is_empty() { p { "No visit notes yet." } } @else {
                table {
                    thead { tr { th scope="col" { "Date" } th scope="col" { "Service" } th scope="col" { "Status" } th scope="col" { "Note" } } }
                    tbody {
                        @for n in &v.notes {
                            tr {
                                td { (n.note.evv["date"].as_str().unwrap_or("")) }
                                td { (n.note.evv["serviceType"].as_str().unwrap_or("")) }
                                td { (n.note.status.as_str()) }
                                td { a href={"/console/notes/" (n.note.document_id)} { "Open note" } }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /console/notes/{id}` — a visit note with its signatures verified (audited).
pub async fn note(
    State(state): State<AppState>,
    office: Office,
    Path(document_id): Path<String>,
) -> ConsoleResult<Markup> {
    let id: DocumentId = document_id.parse().map_err(|_| Error::NotFound("note"))?;
    let view = records::open_note(&state, &office.principal, id).await?;
    let title = format!(
        "Visit note — {}",
        if view.patient_name.is_empty() {
            view.patient.id.as_str()
        } else {
            &view.patient_name
        }
    );
    let csrf = (office.user().role != Role::Clinician).then_some(office.csrf.as_str());
    Ok(layout(&title, Some(&office), note_body(&view, csrf)))
}

fn vital_label(v: fieldchart_core::model::VitalType) -> &'static str {
    use fieldchart_core::model::VitalType as V;
    match v {
        V::BloodPressure => "Blood pressure",
        V::Pulse => "Pulse",
        V::Respirations => "Respirations",
        V::Temperature => "Temperature",
        V::Spo2 => "SpO2",
        V::Weight => "Weight",
        V::Pain => "Pain",
        V::Glucose => "Glucose",
    }
}

fn review_reason(reason: &ReviewReason) -> String {
    match reason {
        ReviewReason::ConcurrentWithSignature => "made offline without seeing the signature".into(),
        ReviewReason::BodyEditAfterSignature => "edited the body after signing".into(),
        ReviewReason::Tampered(t) => format!("tampering: {t:?}"),
    }
}

fn note_body(v: &NoteView, csrf: Option<&str>) -> Markup {
    let n = &v.note;
    // A signed note is never changed here: its conflicts are listed without buttons.
    let signed = n.status == fieldchart_core::model::NoteStatus::Signed;
    let csrf = csrf.filter(|_| !signed);
    html! {
        p { a href={"/console/patients/" (v.patient.id)} { "Back to the chart" } }
        @if !v.conflicts.is_empty() {
            section aria-labelledby="conflicts" {
                h2 id="conflicts" { "Conflicting values" }
                @if csrf.is_some() {
                    p { "These fields of the draft were changed concurrently. Nothing is chosen automatically: keep the right value." }
                } @else if signed {
                    p { "The note is signed: the console does not change it. Corrections go in an addendum." }
                }
                @for conflict in &v.conflicts {
                    h3 { code { (conflict.path) } }
                    (conflict_values(conflict, csrf.map(|t| (format!("/console/notes/{}/resolve", n.document_id), t, "note"))))
                }
            }
        }
        section aria-labelledby="signature" {
            h2 id="signature" { "Signature" }
            @if v.signatures.is_empty() { p { "Not signed." } }
            @for s in &v.signatures {
                div class="signature" {
                    @match &s.verdict {
                        Ok(()) => p class="valid" { strong { "Valid" } },
                        Err(reason) => p class="invalid" { strong { "Not valid: " } (reason) },
                    }
                    dl {
                        dt { "Signed by" } dd { (s.signer_name.as_deref().unwrap_or(&s.signature.signed_by)) " (" (s.signature.role) ")" }
                        dt { "Device" } dd { (s.signature.device_id) }
                        dt { "Signed at" } dd { (format_ms(s.signature.signed_at_ms)) }
                    }
                }
            }
        }
        section aria-labelledby="evv" {
            h2 id="evv" { "Electronic visit verification" }
            dl {
                @if let Some(map) = n.evv.as_object() {
                    @for (k, val) in map {
                        dt { (k) }
                        dd {
                            @if let (true, Some(ms)) = (k.ends_with("At"), val.as_i64()) { (format_ms(ms)) }
                            @else if let Some(s) = val.as_str() { (s) }
                            @else { (val.to_string()) }
                        }
                    }
                }
            }
        }
        section aria-labelledby="body" {
            h2 id="body" { @if v.rendering.is_some() { "As signed" } @else { "Draft" } }
            @if let Some(rendering) = &v.rendering {
                pre class="rendering" { (rendering) }
            } @else {
                h3 { "Assessment" } p { (n.assessment) }
                h3 { "Plan" } p { (n.plan) }
            }
        }
        section aria-labelledby="note-vitals" {
            h2 id="note-vitals" { "Vital signs" }
            @let current: Vec<_> = n.current_vitals().into_iter().cloned().collect();
            (vitals::chart(&current))
            @if !current.is_empty() {
                table {
                    thead { tr { th scope="col" { "Measure" } th scope="col" { "Value" } th scope="col" { "Taken" } } }
                    tbody { @for r in &current { tr { td { (vital_label(r.vital)) } td { (r.value) " " (r.unit) } td { (format_ms(r.taken_at_ms)) } } } }
                }
            }
        }
        section aria-labelledby="addenda" {
            h2 id="addenda" { "Addenda" }
            @if n.addenda.is_empty() { p { "None." } }
            @for a in &n.addenda {
                div class="addendum" { p { (a.text) } p class="meta" { (a.author) ", " (format_ms(a.created_at_ms)) } }
            }
        }
        section aria-labelledby="review" {
            h2 id="review" { "Changes awaiting review" }
            @if v.review.is_empty() { p { "None." } } @else {
                table {
                    thead { tr { th scope="col" { "Who" } th scope="col" { "When" } th scope="col" { "Fields" } th scope="col" { "Why listed" } } }
                    tbody {
                        @for item in &v.review {
                            tr {
                                td { (item.author.as_ref().map(|a| format!("{} on {}", a.user_id, a.device_id)).unwrap_or_else(|| "unknown".into())) }
                                td { (format_ms(item.time_ms)) }
                                td { (item.fields.join(", ")) }
                                td { (review_reason(&item.reason)) }
                            }
                        }
                    }
                }
            }
        }
    }
}
