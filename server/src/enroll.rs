//! Device enrollment and the agency's device keys (issue 7): how a device joins without anyone
//! copying a raw token.
//!
//! 1. An admin issues a one-time code for a user and a device name ([`crate::admin::enroll`]:
//!    CLI `admin enroll`, or `POST /v1/admin/enrollments`). The code is 128 random bits, shown
//!    once (with a QR payload), stored only as its SHA-256, and dies after a short TTL.
//! 2. The device generates its Ed25519 key pair, keeps the private key in its encrypted store,
//!    and redeems the code: `POST /v1/enroll {code, deviceName?, publicKey}`. In one
//!    transaction the code is consumed, the device is created with its public key and
//!    `enrolled_by` (the admin who issued the code), and an `enroll-device` admin log row is
//!    written; the device receives its bearer token. A used, expired or unknown code, a
//!    malformed key or a disabled user is a 4xx and nothing is created.
//! 3. `GET /v1/keys` (any device of the agency) lists the agency's device keys with user, role,
//!    enrolled-at and revoked-at, so devices can verify signatures offline. Care teams are not
//!    in it.
//!
//! A code names its user, so it enrolls a device of that user in that user's agency, whoever
//! redeems it: the resulting token reaches only that agency.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::{ENROLLMENT_CODE_PREFIX, PeerAddr, expiry_in_days};
use crate::auth::{Principal, hash_secret, new_token};
use crate::clock::{format_ms, now_ms};
use crate::config::DEFAULT_TOKEN_TTL_DAYS;
use crate::error::{Error, Result};
use crate::identity::DeviceId;
use crate::state::AppState;
use crate::storage::{DeviceKey, Redemption};

/// Longest device name a device may give itself, in characters.
const MAX_DEVICE_NAME_CHARS: usize = 200;

/// The body of `POST /v1/enroll`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    /// The one-time code.
    pub code: String,
    /// A name for the device; the admin's when absent.
    pub device_name: Option<String>,
    /// Hex of the device's 32-byte Ed25519 public key.
    pub public_key: String,
}

/// Parse a public key: 64 hex digits.
pub fn parse_public_key(hex_key: &str) -> Result<[u8; 32]> {
    hex::decode(hex_key.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| {
            Error::BadRequest("publicKey must be the hex of a 32-byte Ed25519 public key".into())
        })
}

/// `POST /v1/enroll`: redeem a code (no bearer token: the code is the credential).
pub async fn enroll_endpoint(
    State(relay): State<AppState>,
    PeerAddr(remote): PeerAddr,
    Json(body): Json<EnrollRequest>,
) -> Result<Response> {
    let public_key = parse_public_key(&body.public_key)?;
    let code = body.code.trim();
    if !code.starts_with(ENROLLMENT_CODE_PREFIX) || code.len() > 100 {
        return Err(Error::NotFound("enrollment code"));
    }
    let device_name = match body.device_name.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(name)
            if name.chars().count() <= MAX_DEVICE_NAME_CHARS
                && !name.chars().any(char::is_control) =>
        {
            Some(name.to_owned())
        }
        Some(_) => {
            return Err(Error::BadRequest(format!(
                "deviceName must be at most {MAX_DEVICE_NAME_CHARS} printable characters"
            )));
        }
    };
    let (token, token_hash) = new_token();
    let (device, user) = relay
        .storage()
        .redeem_enrollment(Redemption {
            code_hash: hash_secret(code),
            device_id: DeviceId::random(),
            device_name,
            token_hash,
            public_key,
            at_ms: now_ms(),
            token_expires_at: expiry_in_days(DEFAULT_TOKEN_TTL_DAYS),
            remote_addr: remote.map(|addr| addr.to_string()),
        })
        .await?;
    tracing::info!(device = %device.id, user = %user.id, "device enrolled");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token,
            "deviceId": device.id,
            "deviceName": device.name,
            "userId": user.id,
            "agencyId": user.agency_id,
            "role": user.role,
            "expiresAt": format_ms(device.expires_at),
            "expiresAtMs": device.expires_at,
        })),
    )
        .into_response())
}

/// JSON of one device key, as `GET /v1/keys` lists it (core parses these names).
pub fn key_json(key: &DeviceKey) -> Value {
    json!({
        "userId": key.user_id,
        "role": key.role,
        "deviceId": key.device_id,
        "publicKey": hex::encode(key.public_key),
        "enrolledAtMs": key.enrolled_at_ms,
        "revokedAtMs": key.revoked_at_ms,
    })
}

/// `GET /v1/keys`: the caller's agency's device keys.
pub async fn keys_endpoint(
    principal: Principal,
    State(relay): State<AppState>,
) -> Result<(HeaderMap, Json<Value>)> {
    let keys = relay
        .storage()
        .agency_device_keys(principal.agency_id().clone())
        .await?;
    let mut headers = HeaderMap::new();
    headers.insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok((
        headers,
        Json(json!({
            "agencyId": principal.agency_id(),
            "keys": keys.iter().map(key_json).collect::<Vec<_>>(),
        })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_are_64_hex_digits() {
        assert_eq!(parse_public_key(&"ab".repeat(32)).expect("key"), [0xab; 32]);
        for bad in ["", "zz", &"ab".repeat(31), &"ab".repeat(33)] {
            assert!(
                matches!(parse_public_key(bad), Err(Error::BadRequest(_))),
                "{bad}"
            );
        }
    }
}
