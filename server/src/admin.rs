//! Administration: agencies, users, patients, care teams, devices (tokens and enrollment
//! codes), offboarding, audit queries.
//!
//! Each operation is one async function over [`Storage`], called by both front ends:
//! - the CLI (`fieldchart-server admin ...`), run by whoever operates the relay, on the data
//!   directory directly (it works while `serve` runs: SQLite WAL plus a busy timeout, and the
//!   server notices revocations by polling, see [`crate::watch_revocations`]);
//! - the HTTP API under `/v1/admin/...` ([`routes`]), for an agency's admin users: bearer token
//!   of an `admin`-role user, and everything scoped to that user's agency. Ids of another
//!   agency answer `404`, exactly like ids that do not exist.
//!
//! # Accountability
//! Every operation — changes, listings and audit queries alike — writes one admin log row
//! ([`AdminEvent`]: actor, action, target, time, source `cli`/`http` with the peer address) in
//! the same transaction as its change ([`Storage::admin_change`]). The actor is the admin user
//! (and device) over HTTP, and `cli:<operator>` on the CLI (`--actor`, default the OS user: the
//! CLI runs on the relay's host with access to its data directory and key, so the operator name
//! is a label, not a credential). Devices record who issued or enrolled them.
//!
//! Admins cannot obtain credentials for other admins over HTTP: `issue-token` and `enroll` for
//! an admin-role user are refused there. The CLI is the bootstrap path (the first admin's device
//! comes from it) and may provision any user. A token or code an admin provisions for a
//! non-admin user is tied to that admin in the log and on the device row, so acting through it
//! is never anonymous.
//!
//! Creating agencies is the operator's job and exists only on the CLI.

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::extract::connect_info::{ConnectInfo, Connected};
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
use crate::auth::{Principal, hash_secret, new_token};
use crate::clock::{format_ms, now_ms, parse_time};
use crate::config::{
    DEFAULT_AUDIT_PAGE, DEFAULT_ENROLLMENT_TTL_MINUTES, DEFAULT_TOKEN_TTL_DAYS, MAX_AUDIT_ROWS,
    MAX_ENROLLMENT_TTL_MINUTES, MAX_TOKEN_TTL_DAYS,
};
use crate::error::{Error, Result};
use crate::identity::{
    Agency, AgencyId, Device, DeviceId, Patient, PatientId, Role, User, UserId, parse_role,
    random_hex,
};
use crate::state::AppState;
use crate::storage::{
    AdminChange, AdminEvent, AdminLogQuery, AdminOutcome, AdminRecord, AuditAction, AuditEvent,
    AuditQuery, AuditRecord, DeviceInfo, DocMeta, DocumentData, DocumentWrite, EnrollmentCode,
    Storage,
};

/// Longest name accepted for an agency, user or device, in characters.
const MAX_NAME_CHARS: usize = 200;

/// Prefix of enrollment codes, so a leaked one is recognisable.
pub const ENROLLMENT_CODE_PREFIX: &str = "fce_";

/// Author recorded on charts created from the CLI, which has no user or device.
pub fn cli_actor() -> Actor {
    Actor {
        user_id: "fieldchart-admin-cli".into(),
        device_id: "cli".into(),
    }
}

/// The peer address of an HTTP request, as the relay's listeners report it
/// (`into_make_service_with_connect_info::<RemoteAddr>()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for RemoteAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        RemoteAddr(*stream.remote_addr())
    }
}

/// The peer address of a request, when the listener reported one (tests that drive the router
/// directly have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> std::result::Result<PeerAddr, Self::Rejection> {
        Ok(PeerAddr(
            parts
                .extensions
                .get::<ConnectInfo<RemoteAddr>>()
                .map(|ConnectInfo(RemoteAddr(addr))| *addr),
        ))
    }
}

/// Where an administrative operation comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The admin CLI on the relay's host.
    Cli,
    /// The HTTP admin API, from this peer (when known).
    Http(Option<SocketAddr>),
}

/// Who performs an administrative operation, and from where: what its log row records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminContext {
    /// `usr_…` over HTTP, `cli:<operator>` on the CLI.
    pub actor: String,
    /// The admin's device, over HTTP.
    pub device_id: Option<DeviceId>,
    /// The admin user, over HTTP (what scopes the operation to one agency).
    pub user: Option<User>,
    /// Where from.
    pub source: Source,
}

impl AdminContext {
    /// The CLI, run by `operator` (an `--actor` name or the OS user).
    pub fn cli(operator: &str) -> AdminContext {
        AdminContext {
            actor: format!("cli:{operator}"),
            device_id: None,
            user: None,
            source: Source::Cli,
        }
    }

    /// An admin user over HTTP.
    pub fn http(principal: &Principal, remote: Option<SocketAddr>) -> AdminContext {
        AdminContext {
            actor: principal.user_id().to_string(),
            device_id: Some(principal.device_id.clone()),
            user: Some(principal.user.clone()),
            source: Source::Http(remote),
        }
    }

    fn is_http(&self) -> bool {
        matches!(self.source, Source::Http(_))
    }

    /// Who authors a chart this context creates.
    fn author(&self) -> Actor {
        match (&self.user, &self.device_id) {
            (Some(user), Some(device)) => Actor {
                user_id: user.id.to_string(),
                device_id: device.to_string(),
            },
            _ => cli_actor(),
        }
    }

    /// The log row of `action` on `target`.
    pub fn event(
        &self,
        agency_id: Option<&AgencyId>,
        action: &str,
        target: &str,
        details: Value,
    ) -> AdminEvent {
        let (source, remote_addr) = match &self.source {
            Source::Cli => ("cli", None),
            Source::Http(addr) => ("http", addr.map(|a| a.to_string())),
        };
        AdminEvent {
            at_ms: now_ms(),
            agency_id: agency_id.cloned(),
            actor: self.actor.clone(),
            actor_device_id: self.device_id.clone(),
            source: source.into(),
            remote_addr,
            action: action.into(),
            target: target.into(),
            details: details.to_string(),
        }
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

async fn existing_user(storage: &dyn Storage, user_id: &UserId) -> Result<User> {
    storage
        .user(user_id.clone())
        .await?
        .ok_or(Error::NotFound("user"))
}

/// Create an agency.
pub async fn create_agency(
    storage: &dyn Storage,
    ctx: &AdminContext,
    name: &str,
) -> Result<Agency> {
    if ctx.is_http() {
        return Err(Error::Forbidden("agencies are created on the CLI only"));
    }
    let agency = Agency {
        id: AgencyId::random(),
        name: check_name("agency", name)?,
        created_at: now_ms(),
    };
    let event = ctx.event(
        Some(&agency.id),
        "create-agency",
        agency.id.as_str(),
        json!({ "name": agency.name }),
    );
    storage
        .admin_change(AdminChange::InsertAgency(agency.clone()), event)
        .await?;
    Ok(agency)
}

/// Create a user of an agency.
pub async fn create_user(
    storage: &dyn Storage,
    ctx: &AdminContext,
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
    let event = ctx.event(
        Some(agency_id),
        "create-user",
        user.id.as_str(),
        json!({ "name": user.name, "role": role }),
    );
    storage
        .admin_change(AdminChange::InsertUser(user.clone()), event)
        .await?;
    Ok(user)
}

/// Create a patient and their chart document (built by the document model), in one write.
/// Over HTTP the chart's `write` audit row names the admin's device. The admin log row holds
/// ids only: the patient's name is clinical data and lives in the chart.
pub async fn create_patient(
    storage: &dyn Storage,
    ctx: &AdminContext,
    agency_id: &AgencyId,
    name: &str,
) -> Result<Patient> {
    let name = check_name("patient", name)?;
    if storage.agency(agency_id.clone()).await?.is_none() {
        return Err(Error::NotFound("agency"));
    }
    let patient_id = PatientId::random();
    let now = now_ms();
    let author = ctx.author();
    let (document_id, mut chart) =
        new_patient_chart(agency_id.as_str(), patient_id.as_str(), &name, &author, now)?;
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
        audit: match (&ctx.user, &ctx.device_id) {
            (Some(user), Some(device)) => Some(AuditEvent {
                at_ms: now,
                agency_id: agency_id.clone(),
                user_id: user.id.clone(),
                device_id: device.clone(),
                document_id,
                patient_id: Some(patient_id.clone()),
                action: AuditAction::Write,
                heads,
            }),
            _ => None,
        },
    };
    let patient = Patient {
        id: patient_id,
        agency_id: agency_id.clone(),
        chart_document_id: document_id,
        created_at: now,
    };
    let event = ctx.event(
        Some(agency_id),
        "create-patient",
        patient.id.as_str(),
        json!({ "documentId": document_id.to_string() }),
    );
    storage
        .admin_change(
            AdminChange::InsertPatient(patient.clone(), Box::new(write)),
            event,
        )
        .await?;
    Ok(patient)
}

/// Put a user on a patient's care team (both of one agency). Returns the assignment's sequence
/// position: the patient's documents enter the user's change feed there.
pub async fn assign(
    storage: &dyn Storage,
    ctx: &AdminContext,
    user_id: &UserId,
    patient_id: &PatientId,
) -> Result<u64> {
    let user = existing_user(storage, user_id).await?;
    let patient = storage
        .patient(patient_id.clone())
        .await?
        .ok_or(Error::NotFound("patient"))?;
    if user.agency_id != patient.agency_id {
        return Err(Error::BadRequest(
            "the user and the patient belong to different agencies".into(),
        ));
    }
    let event = ctx.event(
        Some(&user.agency_id),
        "assign",
        user.id.as_str(),
        json!({ "patientId": patient.id }),
    );
    let change = AdminChange::Assign {
        user_id: user.id,
        patient_id: patient.id,
        at_ms: now_ms(),
    };
    match storage.admin_change(change, event).await? {
        AdminOutcome::Seq(seq) => Ok(seq),
        other => Err(Error::Storage(format!("assign answered {other:?}"))),
    }
}

/// Take a user off a patient's care team; `false` if they were not on it.
pub async fn unassign(
    storage: &dyn Storage,
    ctx: &AdminContext,
    user_id: &UserId,
    patient_id: &PatientId,
) -> Result<bool> {
    let user = existing_user(storage, user_id).await?;
    let event = ctx.event(
        Some(&user.agency_id),
        "unassign",
        user.id.as_str(),
        json!({ "patientId": patient_id }),
    );
    let change = AdminChange::Unassign {
        user_id: user.id,
        patient_id: patient_id.clone(),
    };
    Ok(matches!(
        storage.admin_change(change, event).await?,
        AdminOutcome::Changed(true)
    ))
}

/// New credentials for `user`: refused over HTTP for admin users (no admin obtains another
/// admin's credentials) and, everywhere, for disabled users (checked again in the write).
async fn check_may_provision(storage: &dyn Storage, ctx: &AdminContext, user: &User) -> Result<()> {
    if ctx.is_http() && user.role == Role::Admin {
        return Err(Error::Forbidden(
            "admin users get devices from the operator's CLI, not from another admin",
        ));
    }
    if storage.user_disabled_at(user.id.clone()).await?.is_some() {
        return Err(Error::Forbidden("the user is disabled"));
    }
    Ok(())
}

/// Issue a bearer token for a new device of a user, without a signing key: the support and
/// bootstrap path (enrollment, [`enroll`], is the normal one). The token is returned once and
/// never stored; the device records who issued it.
pub async fn issue_token(
    storage: &dyn Storage,
    ctx: &AdminContext,
    user_id: &UserId,
    device_name: &str,
    expires_at: i64,
) -> Result<(Device, String)> {
    let user = existing_user(storage, user_id).await?;
    check_may_provision(storage, ctx, &user).await?;
    check_token_expiry(expires_at)?;
    let (token, token_hash) = new_token();
    let device = Device {
        id: DeviceId::random(),
        user_id: user.id.clone(),
        name: check_name("device", device_name)?,
        token_hash,
        created_at: now_ms(),
        expires_at,
        revoked_at: None,
    };
    let event = ctx.event(
        Some(&user.agency_id),
        "issue-token",
        device.id.as_str(),
        json!({ "userId": user.id, "deviceName": device.name, "expiresAt": format_ms(expires_at) }),
    );
    storage
        .admin_change(
            AdminChange::InsertDevice {
                device: device.clone(),
                issued_by: ctx.actor.clone(),
            },
            event,
        )
        .await?;
    Ok((device, token))
}

/// A token lifetime within [`MAX_TOKEN_TTL_DAYS`].
fn check_token_expiry(expires_at: i64) -> Result<()> {
    if expires_at > expiry_in_days(MAX_TOKEN_TTL_DAYS) {
        return Err(Error::BadRequest(format!(
            "a token lives at most {MAX_TOKEN_TTL_DAYS} days"
        )));
    }
    Ok(())
}

/// Expiry of a token issued now for `days` days.
pub fn expiry_in_days(days: u32) -> i64 {
    now_ms().saturating_add(i64::from(days) * 24 * 3600 * 1000)
}

/// Token lifetime in days as asked (`None`: the default), checked against the cap.
pub fn token_ttl_days(days: Option<u32>) -> Result<u32> {
    match days.unwrap_or(DEFAULT_TOKEN_TTL_DAYS) {
        0 => Err(Error::BadRequest("ttlDays must be at least 1".into())),
        d if d > MAX_TOKEN_TTL_DAYS => Err(Error::BadRequest(format!(
            "ttlDays must be at most {MAX_TOKEN_TTL_DAYS}"
        ))),
        d => Ok(d),
    }
}

/// A one-time enrollment code, as shown to the admin once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedEnrollment {
    /// The code (`fce_` + 128 random bits in hex). Only its hash is stored.
    pub code: String,
    /// Whose device it enrolls.
    pub user: User,
    /// The admin's name for the device.
    pub device_name: String,
    /// Refused from this time on, ms since the epoch.
    pub expires_at: i64,
}

impl IssuedEnrollment {
    /// What to put in a QR code for the device to scan: a small JSON object,
    /// `{"v":1,"code":"fce_…","relay":"https://…"}` (`relay` only when known). JSON rather than
    /// a URI: nothing to escape, and new fields can be added without breaking old scanners.
    pub fn qr_payload(&self, relay_url: Option<&str>) -> String {
        let mut payload = json!({ "v": 1, "code": self.code });
        if let Some(url) = relay_url {
            payload["relay"] = Value::String(url.to_owned());
        }
        payload.to_string()
    }
}

/// Issue a one-time enrollment code for a new device of a user, valid `ttl_minutes` (default
/// [`DEFAULT_ENROLLMENT_TTL_MINUTES`], at most [`MAX_ENROLLMENT_TTL_MINUTES`]).
pub async fn enroll(
    storage: &dyn Storage,
    ctx: &AdminContext,
    user_id: &UserId,
    device_name: &str,
    ttl_minutes: Option<u32>,
) -> Result<IssuedEnrollment> {
    let user = existing_user(storage, user_id).await?;
    check_may_provision(storage, ctx, &user).await?;
    let minutes = match ttl_minutes.unwrap_or(DEFAULT_ENROLLMENT_TTL_MINUTES) {
        0 => {
            return Err(Error::BadRequest(
                "the code must live at least 1 minute".into(),
            ));
        }
        m if m > MAX_ENROLLMENT_TTL_MINUTES => {
            return Err(Error::BadRequest(format!(
                "an enrollment code lives at most {MAX_ENROLLMENT_TTL_MINUTES} minutes"
            )));
        }
        m => m,
    };
    let device_name = check_name("device", device_name)?;
    let code = format!("{ENROLLMENT_CODE_PREFIX}{}", random_hex::<16>());
    let now = now_ms();
    let expires_at = now.saturating_add(i64::from(minutes) * 60_000);
    let event = ctx.event(
        Some(&user.agency_id),
        "enroll",
        user.id.as_str(),
        json!({ "deviceName": device_name, "expiresAt": format_ms(expires_at) }),
    );
    storage
        .admin_change(
            AdminChange::InsertEnrollmentCode(EnrollmentCode {
                code_hash: hash_secret(&code),
                user_id: user.id.clone(),
                device_name: device_name.clone(),
                created_at: now,
                expires_at,
                created_by: ctx.actor.clone(),
            }),
            event,
        )
        .await?;
    Ok(IssuedEnrollment {
        code,
        user,
        device_name,
        expires_at,
    })
}

/// Revoke a device; `false` if it already was. (Open sessions close: at once when the running
/// relay did it, within [`crate::config::REVOCATION_POLL_INTERVAL`] when the CLI did.)
pub async fn revoke_device(
    storage: &dyn Storage,
    ctx: &AdminContext,
    device_id: &DeviceId,
) -> Result<bool> {
    let device = storage
        .device(device_id.clone())
        .await?
        .ok_or(Error::NotFound("device"))?;
    let user = existing_user(storage, &device.user_id).await?;
    let event = ctx.event(
        Some(&user.agency_id),
        "revoke-device",
        device.id.as_str(),
        json!({ "userId": user.id }),
    );
    let change = AdminChange::RevokeDevice {
        device_id: device.id,
        at_ms: now_ms(),
    };
    Ok(matches!(
        storage.admin_change(change, event).await?,
        AdminOutcome::Changed(true)
    ))
}

/// Offboard a user: disabled, every device revoked (in one transaction), future tokens and
/// enrollments refused. Returns the devices revoked now. The caller closes their sessions
/// (the HTTP API at once; a running relay picks up the CLI's revocations by polling).
pub async fn disable_user(
    storage: &dyn Storage,
    ctx: &AdminContext,
    user_id: &UserId,
) -> Result<Vec<DeviceId>> {
    let user = existing_user(storage, user_id).await?;
    let devices: Vec<DeviceId> = storage
        .user_devices(user.id.clone())
        .await?
        .into_iter()
        .filter(|d| d.device.revoked_at.is_none())
        .map(|d| d.device.id)
        .collect();
    let event = ctx.event(
        Some(&user.agency_id),
        "disable-user",
        user.id.as_str(),
        json!({ "devices": devices }),
    );
    let change = AdminChange::DisableUser {
        user_id: user.id,
        at_ms: now_ms(),
    };
    match storage.admin_change(change, event).await? {
        AdminOutcome::Revoked(revoked) => Ok(revoked),
        other => Err(Error::Storage(format!("disable answered {other:?}"))),
    }
}

/// A user's devices with last-seen times (the listing is logged too).
pub async fn list_devices(
    storage: &dyn Storage,
    ctx: &AdminContext,
    user_id: &UserId,
) -> Result<(User, Option<i64>, Vec<DeviceInfo>)> {
    let user = existing_user(storage, user_id).await?;
    let event = ctx.event(
        Some(&user.agency_id),
        "list-devices",
        user.id.as_str(),
        json!({}),
    );
    storage.admin_change(AdminChange::Record, event).await?;
    let disabled = storage.user_disabled_at(user.id.clone()).await?;
    let devices = storage.user_devices(user.id.clone()).await?;
    Ok((user, disabled, devices))
}

/// One page of an audit query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// Rows, oldest first.
    pub rows: Vec<AuditRecord>,
    /// Cursor of the next page (`after=`), when there is one.
    pub next: Option<String>,
}

/// Parse an audit cursor (`<at ms>.<row id>`).
fn parse_audit_cursor(cursor: &str) -> Result<(i64, i64)> {
    cursor
        .split_once('.')
        .and_then(|(at, id)| Some((at.parse().ok()?, id.parse().ok()?)))
        .ok_or_else(|| Error::BadRequest("`after` is not an audit cursor".into()))
}

/// Audit rows by patient and/or user in `[from_ms, to_ms)`, one page of at most `limit` rows
/// (≤ [`MAX_AUDIT_ROWS`]) after the cursor `after`; `next` is set whenever more rows follow, so
/// nothing is ever cut off silently. The query itself is logged.
#[allow(clippy::too_many_arguments)]
pub async fn audit(
    storage: &dyn Storage,
    ctx: &AdminContext,
    agency_id: Option<&AgencyId>,
    patient_id: Option<PatientId>,
    user_id: Option<UserId>,
    (from_ms, to_ms): (i64, i64),
    after: Option<&str>,
    limit: Option<usize>,
) -> Result<AuditPage> {
    if from_ms >= to_ms {
        return Err(Error::BadRequest("`from` must be before `to`".into()));
    }
    let limit = limit.unwrap_or(DEFAULT_AUDIT_PAGE);
    if limit == 0 || limit > MAX_AUDIT_ROWS {
        return Err(Error::BadRequest(format!(
            "`limit` must be 1 to {MAX_AUDIT_ROWS}"
        )));
    }
    let after = after.map(parse_audit_cursor).transpose()?;
    let target = patient_id
        .as_ref()
        .map(ToString::to_string)
        .or_else(|| user_id.as_ref().map(ToString::to_string))
        .unwrap_or_else(|| "*".into());
    let event = ctx.event(
        agency_id,
        "audit-query",
        &target,
        json!({ "patientId": patient_id, "userId": user_id, "from": from_ms, "to": to_ms }),
    );
    storage.admin_change(AdminChange::Record, event).await?;
    let mut rows = storage
        .audit_page(
            AuditQuery {
                patient_id,
                user_id,
                from_ms,
                to_ms,
                limit: limit + 1,
            },
            after,
        )
        .await?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| format!("{}.{}", r.event.at_ms, r.id))
    } else {
        None
    };
    Ok(AuditPage { rows, next })
}

/// A page of the admin log (after row id `after`), and the next cursor when more follow. The
/// query itself is logged.
pub async fn admin_log(
    storage: &dyn Storage,
    ctx: &AdminContext,
    mut query: AdminLogQuery,
) -> Result<(Vec<AdminRecord>, Option<i64>)> {
    if query.limit == 0 || query.limit > MAX_AUDIT_ROWS {
        return Err(Error::BadRequest(format!(
            "`limit` must be 1 to {MAX_AUDIT_ROWS}"
        )));
    }
    let event = ctx.event(
        query.agency_id.as_ref(),
        "admin-log-query",
        query.target.as_deref().unwrap_or("*"),
        json!({ "actor": query.actor, "after": query.after_id }),
    );
    storage.admin_change(AdminChange::Record, event).await?;
    let limit = query.limit;
    query.limit += 1;
    let mut rows = storage.admin_log(query).await?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok((rows, next))
}

/// JSON of an admin log row.
pub fn admin_record_json(record: &AdminRecord) -> Value {
    let e = &record.event;
    json!({
        "id": record.id,
        "at": format_ms(e.at_ms),
        "atMs": e.at_ms,
        "agencyId": e.agency_id,
        "actor": e.actor,
        "actorDeviceId": e.actor_device_id,
        "source": e.source,
        "remoteAddr": e.remote_addr,
        "action": e.action,
        "target": e.target,
        "details": serde_json::from_str::<Value>(&e.details).unwrap_or(Value::String(e.details.clone())),
    })
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

/// JSON of an issued enrollment code.
pub fn enrollment_json(issued: &IssuedEnrollment, relay_url: Option<&str>) -> Value {
    json!({
        "code": issued.code,
        "userId": issued.user.id,
        "agencyId": issued.user.agency_id,
        "deviceName": issued.device_name,
        "expiresAt": format_ms(issued.expires_at),
        "expiresAtMs": issued.expires_at,
        "qr": issued.qr_payload(relay_url),
    })
}

/// JSON of a user's device listing.
pub fn devices_json(user: &User, disabled_at: Option<i64>, devices: &[DeviceInfo]) -> Value {
    json!({
        "userId": user.id,
        "disabledAt": disabled_at.map(format_ms),
        "devices": devices.iter().map(|d| json!({
            "deviceId": d.device.id,
            "name": d.device.name,
            "createdAt": format_ms(d.device.created_at),
            "expiresAt": format_ms(d.device.expires_at),
            "revokedAt": d.device.revoked_at.map(format_ms),
            "lastSeenAt": d.last_seen_at.map(format_ms),
            "lastSeenAtMs": d.last_seen_at,
            "enrolledBy": d.enrolled_by,
            "publicKey": d.public_key.map(hex::encode),
        })).collect::<Vec<_>>(),
    })
}

// --- HTTP -----------------------------------------------------------------------------------

/// An authenticated user with the `admin` role, and where the request came from.
#[derive(Debug, Clone)]
pub struct AgencyAdmin {
    /// The admin.
    pub principal: Principal,
    /// What the admin log records for this request.
    pub ctx: AdminContext,
}

impl FromRequestParts<AppState> for AgencyAdmin {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<AgencyAdmin> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if principal.role() != Role::Admin {
            return Err(Error::Forbidden(
                "the admin API needs an admin user's token",
            ));
        }
        let Ok(PeerAddr(remote)) = PeerAddr::from_request_parts(parts, state).await;
        let ctx = AdminContext::http(&principal, remote);
        Ok(AgencyAdmin { principal, ctx })
    }
}

impl AgencyAdmin {
    fn agency(&self) -> &AgencyId {
        self.principal.agency_id()
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
        .route("/users/{user_id}/disable", post(http_disable_user))
        .route("/users/{user_id}/devices", get(http_list_devices))
        .route("/patients", post(http_create_patient))
        .route("/assign", post(http_assign))
        .route("/unassign", post(http_unassign))
        .route("/tokens", post(http_issue_token))
        .route("/enrollments", post(http_enroll))
        .route("/devices/{device_id}/revoke", post(http_revoke_device))
        .route("/audit", get(http_audit))
        .route("/log", get(http_admin_log))
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
    let user = create_user(
        relay.storage(),
        &admin.ctx,
        admin.agency(),
        &body.name,
        role,
    )
    .await?;
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
    let patient = create_patient(relay.storage(), &admin.ctx, admin.agency(), &body.name).await?;
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
    assign(relay.storage(), &admin.ctx, &user.id, &patient.id).await?;
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
    let removed = unassign(relay.storage(), &admin.ctx, &user.id, &patient.id).await?;
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
    let days = token_ttl_days(body.ttl_days)?;
    let (device, token) = issue_token(
        relay.storage(),
        &admin.ctx,
        &user.id,
        &body.device_name,
        expiry_in_days(days),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(token_json(&device, &token))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewEnrollment {
    user_id: UserId,
    device_name: String,
    ttl_minutes: Option<u32>,
    /// The relay's public URL, for the QR payload.
    relay_url: Option<String>,
}

async fn http_enroll(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Json(body): Json<NewEnrollment>,
) -> Result<Response> {
    let user = admin.user(relay.storage(), &body.user_id).await?;
    let issued = enroll(
        relay.storage(),
        &admin.ctx,
        &user.id,
        &body.device_name,
        body.ttl_minutes,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(enrollment_json(&issued, body.relay_url.as_deref())),
    )
        .into_response())
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
    let revoked = revoke_device(relay.storage(), &admin.ctx, &device_id).await?;
    let closed = relay.sessions().revoke_device(&device_id);
    tracing::info!(device = %device_id, by = %admin.principal.user_id(), closed, "device revoked");
    Ok(Json(
        json!({ "deviceId": device_id, "revoked": revoked, "sessionsClosed": closed }),
    ))
}

async fn http_disable_user(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Path(user_id): Path<UserId>,
) -> Result<Json<Value>> {
    let user = admin.user(relay.storage(), &user_id).await?;
    if user.id == *admin.principal.user_id() {
        return Err(Error::BadRequest(
            "an admin cannot disable themselves".into(),
        ));
    }
    let revoked = disable_user(relay.storage(), &admin.ctx, &user.id).await?;
    let closed: usize = revoked
        .iter()
        .map(|device| relay.sessions().revoke_device(device))
        .sum();
    tracing::info!(user = %user.id, by = %admin.principal.user_id(), devices = revoked.len(), closed, "user disabled");
    Ok(Json(json!({
        "userId": user.id,
        "disabled": true,
        "devicesRevoked": revoked,
        "sessionsClosed": closed,
    })))
}

async fn http_list_devices(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Path(user_id): Path<UserId>,
) -> Result<Json<Value>> {
    let user = admin.user(relay.storage(), &user_id).await?;
    let (user, disabled, devices) = list_devices(relay.storage(), &admin.ctx, &user.id).await?;
    Ok(Json(devices_json(&user, disabled, &devices)))
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    patient: Option<PatientId>,
    user: Option<UserId>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
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
    let page = audit(
        relay.storage(),
        &admin.ctx,
        Some(admin.agency()),
        params.patient,
        params.user,
        (from, to),
        params.after.as_deref(),
        params.limit,
    )
    .await?;
    match params.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(json!({
            "rows": page.rows.iter().map(audit::to_json).collect::<Vec<_>>(),
            "next": page.next,
            "more": page.next.is_some(),
        }))
        .into_response()),
        "csv" => {
            let mut response = (
                [
                    (CONTENT_TYPE, "text/csv; charset=utf-8"),
                    (CONTENT_DISPOSITION, "attachment; filename=\"audit.csv\""),
                ],
                audit::to_csv(&page.rows),
            )
                .into_response();
            // A CSV page has no room for the cursor: it travels in a header.
            if let Some(next) = page.next.as_deref().and_then(|n| n.parse().ok()) {
                response.headers_mut().insert("x-next-cursor", next);
            }
            Ok(response)
        }
        _ => Err(Error::BadRequest("format must be json or csv".into())),
    }
}

#[derive(Debug, Deserialize)]
struct AdminLogParams {
    after: Option<i64>,
    limit: Option<usize>,
    target: Option<String>,
    actor: Option<String>,
}

async fn http_admin_log(
    admin: AgencyAdmin,
    State(relay): State<AppState>,
    Query(params): Query<AdminLogParams>,
) -> Result<Json<Value>> {
    let (rows, next) = admin_log(
        relay.storage(),
        &admin.ctx,
        AdminLogQuery {
            agency_id: Some(admin.agency().clone()),
            target: params.target,
            actor: params.actor,
            after_id: params.after.unwrap_or(0),
            limit: params.limit.unwrap_or(DEFAULT_AUDIT_PAGE),
        },
    )
    .await?;
    Ok(Json(json!({
        "rows": rows.iter().map(admin_record_json).collect::<Vec<_>>(),
        "next": next,
        "more": next.is_some(),
    })))
}
