//! Administration: agencies, users, patients, care teams, device tokens, audit queries.
//!
//! Each operation is one async function over [`Storage`], called by both front ends:
//! - the CLI (`fieldchart-server admin ...`), run by whoever operates the relay, on the data
//!   directory directly (it works while `serve` runs: SQLite WAL plus a busy timeout, and the
//!   server notices revocations by polling, see [`crate::watch_revocations`]);
//! - the HTTP API under `/v1/admin/...` ([`routes`]), for an agency's admin users: bearer token
//!   of an `admin`-role user, and everything scoped to that user's agency. Ids of another
//!   agency answer `404`, exactly like ids that do not exist.
//!
//! Creating agencies is the operator's job and exists only on the CLI.

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fieldchart_core::model::{Actor, new_patient_chart};
use fieldchart_core::protocol::classify;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::audit;
use crate::auth::{Principal, new_token};
use crate::clock::{format_ms, now_ms, parse_time};
use crate::config::{DEFAULT_TOKEN_TTL_DAYS, MAX_AUDIT_ROWS};
use crate::error::{Error, Result};
use crate::identity::{
    Agency, AgencyId, Device, DeviceId, Patient, PatientId, Role, User, UserId, parse_role,
};
use crate::state::AppState;
use crate::storage::{
    AuditAction, AuditEvent, AuditQuery, AuditRecord, DocMeta, DocumentData, DocumentWrite, Storage,
};

/// Longest name accepted for an agency, user or device, in characters.
const MAX_NAME_CHARS: usize = 200;

/// Author recorded on charts created from the CLI, which has no user or device.
pub fn cli_actor() -> Actor {
    Actor {
        user_id: "fieldchart-admin-cli".into(),
        device_id: "cli".into(),
    }
}

fn check_name(what: &'static str, name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(Error::BadRequest(format!(
            "{what} name must be 1 to {MAX_NAME_CHARS} printable characters"
        )));
    }
    Ok(name.to_owned())
}

/// Create an agency.
pub async fn create_agency(storage: &dyn Storage, name: &str) -> Result<Agency> {
    let agency = Agency {
        id: AgencyId::random(),
        name: check_name("agency", name)?,
        created_at: now_ms(),
    };
    storage.insert_agency(agency.clone()).await?;
    Ok(agency)
}

/// Create a user of an agency.
pub async fn create_user(
    storage: &dyn Storage,
    agency_id: &AgencyId,
    name: &str,
    role: Role,
) -> Result<User> {
    let user = User {
        id: UserId::random(),
        agency_id: agency_id.clone(),
        name: check_name("user", name)?,
        role,
        created_at: now_ms(),
    };
    storage.insert_user(user.clone()).await?;
    Ok(user)
}

/// Create a patient and their chart document (built by the document model), in one write.
/// `audit` names the device that did it, when one did.
pub async fn create_patient(
    storage: &dyn Storage,
    agency_id: &AgencyId,
    name: &str,
    author: &Actor,
    audit_device: Option<&DeviceId>,
) -> Result<Patient> {
    let name = check_name("patient", name)?;
    if storage.agency(agency_id.clone()).await?.is_none() {
        return Err(Error::NotFound("agency"));
    }
    let patient_id = PatientId::random();
    let now = now_ms();
    let (document_id, mut chart) =
        new_patient_chart(agency_id.as_str(), patient_id.as_str(), &name, author, now)?;
    let kind = classify(chart.document())
        .kind
        .unwrap_or_else(|| "patient".into());
    let heads = chart.get_heads();
    let write = DocumentWrite {
        document_id,
        meta: DocMeta {
            agency_id: agency_id.clone(),
            patient_id: patient_id.clone(),
            kind,
        },
        create: true,
        data: DocumentData::Snapshot(chart.save()),
        heads: heads.clone(),
        audit: audit_device.map(|device| AuditEvent {
            at_ms: now,
            agency_id: agency_id.clone(),
            user_id: UserId::new(author.user_id.clone()),
            device_id: device.clone(),
            document_id,
            patient_id: Some(patient_id.clone()),
            action: AuditAction::Write,
            heads,
        }),
    };
    let patient = Patient {
        id: patient_id,
        agency_id: agency_id.clone(),
        chart_document_id: document_id,
        created_at: now,
    };
    storage.insert_patient(patient.clone(), write).await?;
    Ok(patient)
}

/// Put a user on a patient's care team (both of one agency). Returns the assignment's sequence
/// position: the patient's documents enter the user's change feed there.
pub async fn assign(
    storage: &dyn Storage,
    user_id: &UserId,
    patient_id: &PatientId,
) -> Result<u64> {
    let user = storage
        .user(user_id.clone())
        .await?
        .ok_or(Error::NotFound("user"))?;
    let patient = storage
        .patient(patient_id.clone())
        .await?
        .ok_or(Error::NotFound("patient"))?;
    if user.agency_id != patient.agency_id {
        return Err(Error::BadRequest(
            "the user and the patient belong to different agencies".into(),
        ));
    }
    storage.assign(user.id, patient.id, now_ms()).await
}

/// Take a user off a patient's care team; `false` if they were not on it.
pub async fn unassign(
    storage: &dyn Storage,
    user_id: &UserId,
    patient_id: &PatientId,
) -> Result<bool> {
    storage.unassign(user_id.clone(), patient_id.clone()).await
}

/// Issue a token for a new device of a user. The token is returned once and never stored.
pub async fn issue_token(
    storage: &dyn Storage,
    user_id: &UserId,
    device_name: &str,
    expires_at: i64,
) -> Result<(Device, String)> {
    let user = storage
        .user(user_id.clone())
        .await?
        .ok_or(Error::NotFound("user"))?;
    let (token, token_hash) = new_token();
    let device = Device {
        id: DeviceId::random(),
        user_id: user.id,
        name: check_name("device", device_name)?,
        token_hash,
        created_at: now_ms(),
        expires_at,
        revoked_at: None,
    };
    storage.insert_device(device.clone()).await?;
    Ok((device, token))
}

/// Expiry of a token issued now for `days` days.
pub fn expiry_in_days(days: u32) -> i64 {
    now_ms().saturating_add(i64::from(days) * 24 * 3600 * 1000)
}

/// Revoke a device; `false` if it already was. (Open sessions close: at once when the running
/// relay did it, within [`crate::config::REVOCATION_POLL_INTERVAL`] when the CLI did.)
pub async fn revoke_device(storage: &dyn Storage, device_id: &DeviceId) -> Result<bool> {
    storage.revoke_device(device_id.clone(), now_ms()).await
}

/// Audit rows by patient and/or user in `[from_ms, to_ms)`.
pub async fn audit(
    storage: &dyn Storage,
    patient_id: Option<PatientId>,
    user_id: Option<UserId>,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<AuditRecord>> {
    if from_ms >= to_ms {
        return Err(Error::BadRequest("`from` must be before `to`".into()));
    }
    storage
        .query_audit(AuditQuery {
            patient_id,
            user_id,
            from_ms,
            to_ms,
            limit: MAX_AUDIT_ROWS,
        })
        .await
}

/// JSON of a user.
pub fn user_json(user: &User) -> Value {
    json!({ "userId": user.id, "agencyId": user.agency_id, "name": user.name, "role": user.role })
}

/// JSON of a patient.
pub fn patient_json(patient: &Patient) -> Value {
    json!({
        "patientId": patient.id,
        "agencyId": patient.agency_id,
        "documentId": patient.chart_document_id.to_string(),
        "documentUrl": patient.chart_document_id.url(),
    })
}

/// JSON of an issued token.
pub fn token_json(device: &Device, token: &str) -> Value {
    json!({
        "token": token,
        "deviceId": device.id,
        "userId": device.user_id,
        "expiresAt": format_ms(device.expires_at),
    })
}

// --- HTTP -----------------------------------------------------------------------------------

/// An authenticated user with the `admin` role.
#[derive(Debug, Clone)]
pub struct AgencyAdmin(pub Principal);

impl FromRequestParts<AppState> for AgencyAdmin {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<AgencyAdmin> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if principal.role() != Role::Admin {
            return Err(Error::Forbidden(
                "the admin API needs an admin user's token",
            ));
        }
        Ok(AgencyAdmin(principal))
    }
}

impl AgencyAdmin {
    fn agency(&self) -> &AgencyId {
        self.0.agency_id()
    }

    /// The user, if it is of the admin's agency.
    async fn user(&self, storage: &dyn Storage, id: &UserId) -> Result<User> {
        match storage.user(id.clone()).await? {
            Some(user) if user.agency_id == *self.agency() => Ok(user),
            _ => Err(Error::NotFound("user")),
        }
    }

    /// The patient, if it is of the admin's agency.
    async fn patient(&self, storage: &dyn Storage, id: &PatientId) -> Result<Patient> {
        match storage.patient(id.clone()).await? {
            Some(patient) if patient.agency_id == *self.agency() => Ok(patient),
            _ => Err(Error::NotFound("patient")),
        }
    }
}

/// The admin API routes (mounted under `/v1/admin`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/users", post(http_create_user))
        .route("/patients", post(http_create_patient))
        .route("/assign", post(http_assign))
        .route("/unassign", post(http_unassign))
        .route("/tokens", post(http_issue_token))
        .route("/devices/{device_id}/revoke", post(http_revoke_device))
        .route("/audit", get(http_audit))
}

#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
    role: String,
}

async fn http_create_user(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Json(body): Json<NewUser>,
) -> Result<Response> {
    let role = parse_role(&body.role)
        .ok_or_else(|| Error::BadRequest("role must be clinician, office or admin".into()))?;
    let user = create_user(relay.storage(), admin.agency(), &body.name, role).await?;
    Ok((StatusCode::CREATED, Json(user_json(&user))).into_response())
}

#[derive(Debug, Deserialize)]
struct NewPatient {
    name: String,
}

async fn http_create_patient(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Json(body): Json<NewPatient>,
) -> Result<Response> {
    let author = Actor {
        user_id: admin.0.user_id().to_string(),
        device_id: admin.0.device_id.to_string(),
    };
    let patient = create_patient(
        relay.storage(),
        admin.agency(),
        &body.name,
        &author,
        Some(&admin.0.device_id),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(patient_json(&patient))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CareTeamChange {
    user_id: UserId,
    patient_id: PatientId,
}

async fn http_assign(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Json(body): Json<CareTeamChange>,
) -> Result<Json<Value>> {
    let user = admin.user(relay.storage(), &body.user_id).await?;
    let patient = admin.patient(relay.storage(), &body.patient_id).await?;
    assign(relay.storage(), &user.id, &patient.id).await?;
    Ok(Json(
        json!({ "userId": user.id, "patientId": patient.id, "assigned": true }),
    ))
}

async fn http_unassign(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Json(body): Json<CareTeamChange>,
) -> Result<Json<Value>> {
    let user = admin.user(relay.storage(), &body.user_id).await?;
    let patient = admin.patient(relay.storage(), &body.patient_id).await?;
    let removed = unassign(relay.storage(), &user.id, &patient.id).await?;
    Ok(Json(
        json!({ "userId": user.id, "patientId": patient.id, "removed": removed }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewToken {
    user_id: UserId,
    device_name: String,
    ttl_days: Option<u32>,
}

async fn http_issue_token(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Json(body): Json<NewToken>,
) -> Result<Response> {
    let user = admin.user(relay.storage(), &body.user_id).await?;
    let days = body.ttl_days.unwrap_or(DEFAULT_TOKEN_TTL_DAYS);
    if days == 0 {
        return Err(Error::BadRequest("ttlDays must be at least 1".into()));
    }
    let (device, token) = issue_token(
        relay.storage(),
        &user.id,
        &body.device_name,
        expiry_in_days(days),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(token_json(&device, &token))).into_response())
}

async fn http_revoke_device(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Path(device_id): Path<DeviceId>,
) -> Result<Json<Value>> {
    let device = relay
        .storage()
        .device(device_id.clone())
        .await?
        .ok_or(Error::NotFound("device"))?;
    admin
        .user(relay.storage(), &device.user_id)
        .await
        .map_err(|_| Error::NotFound("device"))?;
    let revoked = revoke_device(relay.storage(), &device_id).await?;
    let closed = relay.sessions().revoke_device(&device_id);
    tracing::info!(device = %device_id, by = %admin.0.user_id(), closed, "device revoked");
    Ok(Json(
        json!({ "deviceId": device_id, "revoked": revoked, "sessionsClosed": closed }),
    ))
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    patient: Option<PatientId>,
    user: Option<UserId>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

async fn http_audit(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Query(params): Query<AuditParams>,
) -> Result<Response> {
    if params.patient.is_none() && params.user.is_none() {
        return Err(Error::BadRequest("give `patient`, `user` or both".into()));
    }
    if let Some(patient) = &params.patient {
        admin.patient(relay.storage(), patient).await?;
    }
    if let Some(user) = &params.user {
        admin.user(relay.storage(), user).await?;
    }
    let from = params
        .from
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(0);
    let to = params
        .to
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(i64::MAX);
    let rows = audit(relay.storage(), params.patient, params.user, from, to).await?;
    match params.format.as_deref().unwrap_or("json") {
        "json" => Ok(
            Json(json!({ "rows": rows.iter().map(audit::to_json).collect::<Vec<_>>() }))
                .into_response(),
        ),
        "csv" => Ok((
            [
                (CONTENT_TYPE, "text/csv; charset=utf-8"),
                (CONTENT_DISPOSITION, "attachment; filename=\"audit.csv\""),
            ],
            audit::to_csv(&rows),
        )
            .into_response()),
        _ => Err(Error::BadRequest("format must be json or csv".into())),
    }
}
