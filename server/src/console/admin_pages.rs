//! Administration in the console (admin role only): users (create, disable, set-password
//! links), patients (create), care-team assignment, devices (list with last seen, revoke),
//! enrolling a phone by a QR code rendered here, and the audit search with CSV export.
//!
//! Every operation is the admin service the HTTP API and the CLI use ([`crate::admin`]), so
//! each writes its admin log row naming the admin and the browser session.

use axum::Form;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::{Markup, PreEscaped, html};
use serde::Deserialize;

use super::auth::{self, Office};
use super::pages::layout;
use super::{ConsoleResult, redirect};
use crate::admin;
use crate::clock::{format_ms, now_ms, parse_time};
use crate::error::Error;
use crate::identity::{DeviceId, PatientId, Role, User, UserId, parse_role};
use crate::state::AppState;
use crate::storage::{AuditAction, AuditRecord};

/// The administration routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/admin/users", get(users).post(create_user))
        .route("/console/admin/users/{user_id}", get(user_page))
        .route("/console/admin/users/{user_id}/disable", post(disable_user))
        .route(
            "/console/admin/users/{user_id}/password-link",
            post(password_link),
        )
        .route("/console/admin/users/{user_id}/enroll", post(enroll))
        .route(
            "/console/admin/devices/{device_id}/revoke",
            post(revoke_device),
        )
        .route("/console/admin/patients", post(create_patient))
        .route("/console/admin/assign", post(assign))
        .route("/console/admin/audit", get(audit))
}

/// The signed-in user, if they are an admin.
fn require_admin(office: &Office) -> Result<(), Error> {
    if office.user().role == Role::Admin {
        Ok(())
    } else {
        Err(Error::Forbidden("administration needs an admin account"))
    }
}

/// A user of the admin's agency (another agency's is "not found").
async fn agency_user(state: &AppState, office: &Office, id: &UserId) -> Result<User, Error> {
    match state.storage().user(id.clone()).await? {
        Some(u) if u.agency_id == office.user().agency_id => Ok(u),
        _ => Err(Error::NotFound("user")),
    }
}

fn console_store(state: &AppState) -> Result<&dyn super::store::ConsoleStore, Error> {
    state
        .console()
        .map(|c| c.store())
        .ok_or(Error::NotFound("console"))
}

fn public_url(state: &AppState) -> Option<String> {
    state.console().and_then(|c| c.options().public_url.clone())
}

fn csrf_field(office: &Office) -> Markup {
    html! { input type="hidden" name="csrf" value=(office.csrf); }
}

/// `GET /console/admin/users` — users, patients, and the forms to add them and assign.
async fn users(State(state): State<AppState>, office: Office) -> ConsoleResult<Markup> {
    require_admin(&office)?;
    users_page(&state, &office, None).await
}

async fn users_page(
    state: &AppState,
    office: &Office,
    notice: Option<Markup>,
) -> ConsoleResult<Markup> {
    let store = console_store(state)?;
    let users = store.agency_users(office.user().agency_id.clone()).await?;
    let patients = super::records::patients(state, &office.principal).await?;
    let clinicians: Vec<_> = users
        .iter()
        .filter(|u| u.user.role == Role::Clinician && u.disabled_at.is_none())
        .collect();
    Ok(layout(
        "Users and patients",
        Some(office),
        html! {
            @if let Some(n) = notice { div class="notice" role="status" { (n) } }
            section aria-labelledby="users" {
                h2 id="users" { "Users" }
                table {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Role" } th scope="col" { "Console sign-in" } th scope="col" { "Status" } } }
                    tbody {
                        @for u in &users {
                            tr {
                                td { a href={"/console/admin/users/" (u.user.id)} { (u.user.name) } }
                                td { (u.user.role.as_str()) }
                                td { @if let Some(l) = &u.login { (l) @if !u.has_password { " (password not set)" } } @else { "—" } }
                                td { @if let Some(at) = u.disabled_at { "disabled " (format_ms(at)) } @else { "active" } }
                            }
                        }
                    }
                }
                h3 { "Add a user" }
                form method="post" action="/console/admin/users" {
                    (csrf_field(office))
                    p { label for="name" { "Name" } input id="name" name="name" type="text" required; }
                    p {
                        label for="role" { "Role" }
                        select id="role" name="role" {
                            option value="clinician" { "Clinician" }
                            option value="office" { "Office" }
                            option value="admin" { "Admin" }
                        }
                    }
                    p {
                        label for="login" { "Console sign-in name (office and admin users)" }
                        input id="login" name="login" type="text";
                    }
                    p { button type="submit" { "Add user" } }
                }
            }
            section aria-labelledby="patients" {
                h2 id="patients" { "Patients" }
                ul { @for p in &patients { li { a href={"/console/patients/" (p.patient.id)} { (p.name) } } } }
                h3 { "Add a patient" }
                form method="post" action="/console/admin/patients" {
                    (csrf_field(office))
                    p { label for="patient-name" { "Name" } input id="patient-name" name="name" type="text" required; }
                    p { button type="submit" { "Add patient" } }
                }
                h3 { "Assign a clinician" }
                form method="post" action="/console/admin/assign" {
                    (csrf_field(office))
                    p {
                        label for="assign-user" { "Clinician" }
                        select id="assign-user" name="user" {
                            @for u in &clinicians { option value=(u.user.id) { (u.user.name) } }
                        }
                    }
                    p {
                        label for="assign-patient" { "Patient" }
                        select id="assign-patient" name="patient" {
                            @for p in &patients { option value=(p.patient.id) { (p.name) } }
                        }
                    }
                    p { button type="submit" { "Assign" } }
                }
            }
        },
    ))
}

/// The add-user form.
#[derive(Debug, Deserialize)]
struct CreateUserForm {
    name: String,
    role: String,
    #[serde(default)]
    login: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/admin/users`
async fn create_user(
    State(state): State<AppState>,
    office: Office,
    Form(form): Form<CreateUserForm>,
) -> ConsoleResult<Markup> {
    require_admin(&office)?;
    office.check_csrf(&form.csrf)?;
    let role = parse_role(&form.role).ok_or_else(|| Error::BadRequest("unknown role".into()))?;
    let login = form.login.trim();
    if role != Role::Clinician && login.is_empty() {
        return Err(Error::BadRequest("office and admin users need a sign-in name".into()).into());
    }
    if !login.is_empty() {
        auth::free_login(console_store(&state)?, login).await?;
    }
    let user = admin::create_user(
        state.storage(),
        &office.ctx,
        &office.user().agency_id,
        &form.name,
        role,
    )
    .await?;
    let notice = if login.is_empty() {
        html! { p { "Added " (user.name) "." } }
    } else {
        let token = auth::create_login(console_store(&state)?, &office.ctx, &user, login).await?;
        let url = auth::link_url(public_url(&state).as_deref(), &token);
        html! {
            p { "Added " (user.name) ". Give them this one-time link to set their password (valid 24 hours):" }
            p { code class="link" { (url) } }
        }
    };
    users_page(&state, &office, Some(notice)).await
}

/// `GET /console/admin/users/{id}` — a user's devices and the enrollment form.
async fn user_page(
    State(state): State<AppState>,
    office: Office,
    Path(user_id): Path<UserId>,
) -> ConsoleResult<Markup> {
    require_admin(&office)?;
    let user = agency_user(&state, &office, &user_id).await?;
    let (user, disabled, devices) =
        admin::list_devices(state.storage(), &office.ctx, &user.id).await?;
    let now = now_ms();
    Ok(layout(
        &user.name,
        Some(&office),
        html! {
            p { "Role: " (user.role.as_str()) ". "
                @if let Some(at) = disabled { "Disabled " (format_ms(at)) "." } @else { "Active." } }
            section aria-labelledby="devices" {
                h2 id="devices" { "Devices" }
                @if devices.is_empty() { p { "No devices." } } @else {
                    table {
                        thead { tr { th scope="col" { "Device" } th scope="col" { "Enrolled" } th scope="col" { "Last seen" } th scope="col" { "Status" } } }
                        tbody {
                            @for d in &devices {
                                tr {
                                    td { (d.device.name) }
                                    td { (format_ms(d.device.created_at)) }
                                    td { @if let Some(t) = d.last_seen_at { (format_ms(t)) } @else { "never" } }
                                    td {
                                        @if let Some(at) = d.device.revoked_at { "revoked " (format_ms(at)) }
                                        @else if d.device.expires_at <= now { "expired" }
                                        @else {
                                            form method="post" action={"/console/admin/devices/" (d.device.id) "/revoke"} {
                                                (csrf_field(&office))
                                                button type="submit" aria-label={"Revoke " (d.device.name)} { "Revoke" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if disabled.is_none() {
                @if user.role != Role::Admin {
                    section aria-labelledby="enroll" {
                        h2 id="enroll" { "Enroll a phone" }
                        form method="post" action={"/console/admin/users/" (user.id) "/enroll"} {
                            (csrf_field(&office))
                            p { label for="device" { "Device name" } input id="device" name="device" type="text" required; }
                            p { button type="submit" { "Show enrollment code" } }
                        }
                    }
                }
                section aria-labelledby="account" {
                    h2 id="account" { "Account" }
                    @if user.role != Role::Clinician {
                        form method="post" action={"/console/admin/users/" (user.id) "/password-link"} {
                            (csrf_field(&office))
                            button type="submit" { "New set-password link" }
                        }
                    }
                    @if user.id != *office.principal.user_id() {
                        form method="post" action={"/console/admin/users/" (user.id) "/disable"} {
                            (csrf_field(&office))
                            button type="submit" class="danger" { "Disable user and revoke every device" }
                        }
                    }
                }
            }
        },
    ))
}

/// A form with a CSRF token only.
#[derive(Debug, Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

/// `POST /console/admin/users/{id}/disable`
async fn disable_user(
    State(state): State<AppState>,
    office: Office,
    Path(user_id): Path<UserId>,
    Form(form): Form<CsrfOnly>,
) -> ConsoleResult<Response> {
    require_admin(&office)?;
    office.check_csrf(&form.csrf)?;
    let user = agency_user(&state, &office, &user_id).await?;
    if user.id == *office.principal.user_id() {
        return Err(Error::BadRequest("an admin cannot disable themselves".into()).into());
    }
    let revoked = admin::disable_user(state.storage(), &office.ctx, &user.id).await?;
    for device in &revoked {
        state.sessions().revoke_device(device);
    }
    console_store(&state)?
        .delete_user_sessions(user.id.clone())
        .await?;
    Ok(redirect(&format!("/console/admin/users/{}", user.id)))
}

/// `POST /console/admin/users/{id}/password-link`
async fn password_link(
    State(state): State<AppState>,
    office: Office,
    Path(user_id): Path<UserId>,
    Form(form): Form<CsrfOnly>,
) -> ConsoleResult<Markup> {
    require_admin(&office)?;
    office.check_csrf(&form.csrf)?;
    let user = agency_user(&state, &office, &user_id).await?;
    let token = auth::reset_password_link(console_store(&state)?, &office.ctx, &user).await?;
    let url = auth::link_url(public_url(&state).as_deref(), &token);
    users_page(
        &state,
        &office,
        Some(html! { p { "One-time link for " (user.name) " (valid 24 hours):" } p { code class="link" { (url) } } }),
    )
    .await
}

/// The enrollment form.
#[derive(Debug, Deserialize)]
struct EnrollForm {
    device: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/admin/users/{id}/enroll` — a one-time enrollment code as a QR code (SVG,
/// rendered here) and as text.
async fn enroll(
    State(state): State<AppState>,
    office: Office,
    Path(user_id): Path<UserId>,
    Form(form): Form<EnrollForm>,
) -> ConsoleResult<Markup> {
    require_admin(&office)?;
    office.check_csrf(&form.csrf)?;
    let user = agency_user(&state, &office, &user_id).await?;
    let issued = admin::enroll(state.storage(), &office.ctx, &user.id, &form.device, None).await?;
    let payload = issued.qr_payload(public_url(&state).as_deref());
    let svg = qr_svg(&payload)?;
    Ok(layout(
        &format!("Enroll {}", issued.device_name),
        Some(&office),
        html! {
            p { "Scan this code with the Fieldchart app on " (user.name) "'s phone. It works once, until "
                (format_ms(issued.expires_at)) "." }
            figure class="qr" {
                (PreEscaped(svg))
                figcaption { "Enrollment code: " code id="enrollment-code" { (issued.code) } }
            }
            p { a href={"/console/admin/users/" (user.id)} { "Back to " (user.name) } }
        },
    ))
}

/// The QR code of `payload` as an SVG element with an accessible name.
fn qr_svg(payload: &str) -> Result<String, Error> {
    let code = qrcode::QrCode::new(payload.as_bytes())
        .map_err(|e| Error::Storage(format!("QR encoding failed: {e}")))?;
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(240, 240)
        .dark_color(qrcode::render::svg::Color("#000000"))
        .light_color(qrcode::render::svg::Color("#ffffff"))
        .build();
    // Drop the XML prolog (not allowed inside HTML) and name the image.
    let start = svg.find("<svg").unwrap_or(0);
    Ok(svg[start..].replacen(
        "<svg",
        "<svg role=\"img\" aria-label=\"Enrollment QR code\"",
        1,
    ))
}

/// `POST /console/admin/devices/{id}/revoke`
async fn revoke_device(
    State(state): State<AppState>,
    office: Office,
    Path(device_id): Path<DeviceId>,
    Form(form): Form<CsrfOnly>,
) -> ConsoleResult<Response> {
    require_admin(&office)?;
    office.check_csrf(&form.csrf)?;
    let device = state
        .storage()
        .device(device_id.clone())
        .await?
        .ok_or(Error::NotFound("device"))?;
    let user = agency_user(&state, &office, &device.user_id)
        .await
        .map_err(|_| Error::NotFound("device"))?;
    admin::revoke_device(state.storage(), &office.ctx, &device.id).await?;
    state.sessions().revoke_device(&device.id);
    Ok(redirect(&format!("/console/admin/users/{}", user.id)))
}

/// The add-patient form.
#[derive(Debug, Deserialize)]
struct CreatePatientForm {
    name: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/admin/patients`
async fn create_patient(
    State(state): State<AppState>,
    office: Office,
    Form(form): Form<CreatePatientForm>,
) -> ConsoleResult<Response> {
    require_admin(&office)?;
    office.check_csrf(&form.csrf)?;
    let patient = admin::create_patient(
        state.storage(),
        &office.ctx,
        &office.user().agency_id,
        &form.name,
    )
    .await?;
    Ok(redirect(&format!("/console/patients/{}", patient.id)))
}

/// The assignment form.
#[derive(Debug, Deserialize)]
struct AssignForm {
    user: UserId,
    patient: PatientId,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/admin/assign`
async fn assign(
    State(state): State<AppState>,
    office: Office,
    Form(form): Form<AssignForm>,
) -> ConsoleResult<Markup> {
    require_admin(&office)?;
    office.check_csrf(&form.csrf)?;
    let user = agency_user(&state, &office, &form.user).await?;
    match state.storage().patient(form.patient.clone()).await? {
        Some(p) if p.agency_id == office.user().agency_id => {}
        _ => return Err(Error::NotFound("patient").into()),
    }
    admin::assign(state.storage(), &office.ctx, &user.id, &form.patient).await?;
    users_page(
        &state,
        &office,
        Some(html! { p { "Assigned " (user.name) "." } }),
    )
    .await
}

/// The audit search.
#[derive(Debug, Default, Deserialize)]
struct AuditSearch {
    #[serde(default)]
    user: String,
    #[serde(default)]
    patient: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    format: String,
}

/// Most rows one search or export returns (the page says when there were more).
const MAX_AUDIT_SEARCH_ROWS: usize = 5_000;

/// `GET /console/admin/audit` — search by user, patient, action and time range; `format=csv`
/// downloads the same rows. The search itself is logged (`audit-query`).
async fn audit(
    State(state): State<AppState>,
    office: Office,
    Query(q): Query<AuditSearch>,
) -> ConsoleResult<Response> {
    require_admin(&office)?;
    let searched = !(q.user.is_empty()
        && q.patient.is_empty()
        && q.action.is_empty()
        && q.from.is_empty()
        && q.to.is_empty()
        && q.format.is_empty());
    let mut rows: Vec<AuditRecord> = Vec::new();
    let mut truncated = false;
    if searched {
        let from = if q.from.trim().is_empty() {
            0
        } else {
            parse_time(&q.from)?
        };
        let to = if q.to.trim().is_empty() {
            i64::MAX
        } else {
            parse_time(&q.to)?
        };
        let action = match q.action.trim() {
            "" => None,
            a => Some(
                AuditAction::parse(a).ok_or_else(|| Error::BadRequest("unknown action".into()))?,
            ),
        };
        let user = (!q.user.trim().is_empty()).then(|| UserId::new(q.user.trim()));
        if let Some(u) = &user {
            agency_user(&state, &office, u).await?;
        }
        let patient = (!q.patient.trim().is_empty()).then(|| PatientId::new(q.patient.trim()));
        if let Some(p) = &patient {
            match state.storage().patient(p.clone()).await? {
                Some(p) if p.agency_id == office.user().agency_id => {}
                _ => return Err(Error::NotFound("patient").into()),
            }
        }
        let agency = office.user().agency_id.clone();
        let mut after: Option<String> = None;
        // Bounded: at most MAX_AUDIT_SEARCH_ROWS / page size pages.
        for _ in 0..(MAX_AUDIT_SEARCH_ROWS / crate::config::MAX_AUDIT_ROWS + 1) {
            let page = admin::audit(
                state.storage(),
                &office.ctx,
                Some(&agency),
                patient.clone(),
                user.clone(),
                (from, to),
                after.as_deref(),
                Some(crate::config::MAX_AUDIT_ROWS),
            )
            .await?;
            rows.extend(
                page.rows
                    .into_iter()
                    .filter(|r| r.event.agency_id == agency)
                    .filter(|r| action.is_none_or(|a| r.event.action == a)),
            );
            match page.next {
                Some(next) if rows.len() < MAX_AUDIT_SEARCH_ROWS => after = Some(next),
                Some(_) => {
                    truncated = true;
                    break;
                }
                None => break,
            }
        }
    }
    if q.format == "csv" {
        return Ok((
            [
                (CONTENT_TYPE, "text/csv; charset=utf-8"),
                (CONTENT_DISPOSITION, "attachment; filename=\"audit.csv\""),
            ],
            crate::audit::to_csv(&rows),
        )
            .into_response());
    }
    let csv_query = serde_urlencode(&[
        ("user", &q.user),
        ("patient", &q.patient),
        ("action", &q.action),
        ("from", &q.from),
        ("to", &q.to),
        ("format", &"csv".to_owned()),
    ]);
    Ok(layout(
        "Audit",
        Some(&office),
        html! {
            form method="get" action="/console/admin/audit" class="search" {
                p { label for="a-user" { "User id" } input id="a-user" name="user" type="text" value=(q.user); }
                p { label for="a-patient" { "Patient id" } input id="a-patient" name="patient" type="text" value=(q.patient); }
                p {
                    label for="a-action" { "Action" }
                    select id="a-action" name="action" {
                        option value="" { "any" }
                        @for a in ["read", "write", "deny", "tamper"] {
                            option value=(a) selected[q.action == a] { (a) }
                        }
                    }
                }
                p { label for="a-from" { "From (date or RFC 3339)" } input id="a-from" name="from" type="text" value=(q.from); }
                p { label for="a-to" { "To" } input id="a-to" name="to" type="text" value=(q.to); }
                p { button type="submit" { "Search" } }
            }
            @if searched {
                p { (rows.len()) " rows" @if truncated { " (the first " (MAX_AUDIT_SEARCH_ROWS) "; narrow the search)" } ". "
                    a href={"/console/admin/audit?" (csv_query)} { "Download CSV" } }
                table class="audit" {
                    thead { tr { th scope="col" { "When" } th scope="col" { "User" } th scope="col" { "Device or session" } th scope="col" { "Action" } th scope="col" { "Patient" } th scope="col" { "Document" } } }
                    tbody {
                        @for r in &rows {
                            tr {
                                td { (format_ms(r.event.at_ms)) }
                                td { (r.event.user_id) }
                                td { (r.event.device_id) }
                                td { (r.event.action.as_str()) }
                                td { @if let Some(p) = &r.event.patient_id { (p) } }
                                td { (r.event.document_id.to_string()) }
                            }
                        }
                    }
                }
            }
        },
    )
    .into_response())
}

/// `k=v&…` with values percent-encoded.
fn serde_urlencode(pairs: &[(&str, &String)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}
