//! Joining a relay: redeem an enrollment code with the device's public key, and fetch the
//! agency's device keys (to verify signatures offline).
//!
//! The device makes its Ed25519 key pair itself and keeps the private half in its encrypted
//! store; only the public key travels. The admin gives the device a one-time code (typed or
//! scanned from a QR code); [`enroll`] redeems it at `POST /v1/enroll` and returns the device's
//! bearer token. [`fetch_device_keys`] returns `GET /v1/keys` as raw JSON, which the core
//! parses and caches.

use serde::Deserialize;

use crate::DriverError;
use crate::tls::{TlsConfig, client_config_with, error_chain, http_client};

/// Largest `/v1/keys` answer accepted, in bytes.
pub const MAX_KEYS_BODY_BYTES: usize = 16 * 1024 * 1024;

/// What the relay answers a redeemed code with.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Enrollment {
    /// The device's bearer token: keep it in the platform keystore.
    pub token: String,
    /// The new device's id.
    pub device_id: String,
    /// Its name as the relay stored it.
    pub device_name: String,
    /// The user it belongs to.
    pub user_id: String,
    /// The user's agency.
    pub agency_id: String,
    /// The user's role (`clinician`, `office`, `admin`).
    pub role: String,
    /// When the token expires, ms since the epoch.
    pub expires_at_ms: i64,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("token", &"<redacted>")
            .field("device_id", &self.device_id)
            .field("user_id", &self.user_id)
            .field("agency_id", &self.agency_id)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

fn base(url: &str) -> Result<String, DriverError> {
    let url = url.trim_end_matches('/');
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(url.to_owned())
    } else {
        Err(DriverError::InvalidUrl(
            "the relay URL must start with https:// (or http:// for a local relay)".into(),
        ))
    }
}

async fn read_body(response: reqwest::Response) -> Result<(u16, String), DriverError> {
    let status = response.status().as_u16();
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| DriverError::Network(error_chain(&e.without_url())))?
    {
        if body.len() + chunk.len() > MAX_KEYS_BODY_BYTES {
            return Err(DriverError::Network(format!(
                "answer over {MAX_KEYS_BODY_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The relay's `{"error": ...}` text, or the raw body.
fn refusal(status: u16, body: &str) -> DriverError {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect());
    DriverError::Refused { status, message }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an enrollment QR code carries (the relay's `admin enroll` prints it):
/// `{"v":1,"code":"fce_…","relay":"https://…"}`, `relay` only when the relay knows its URL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QrEnrollment {
    /// The one-time code.
    pub code: String,
    /// The relay's public URL, if the payload names one.
    #[serde(default)]
    pub relay: Option<String>,
}

/// Read a scanned enrollment QR payload. `None` if it is not one (another QR code, a newer
/// payload version, or no code in it).
pub fn parse_qr_payload(payload: &str) -> Option<QrEnrollment> {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    let version: Versioned = serde_json::from_str(payload.trim()).ok()?;
    if version.v != 1 {
        return None;
    }
    let qr: QrEnrollment = serde_json::from_str(payload.trim()).ok()?;
    (!qr.code.trim().is_empty()).then_some(qr)
}

/// Redeem an enrollment `code` at the relay with this device's Ed25519 `public_key`.
///
/// A used, expired or unknown code, or a refused key, is [`DriverError::Refused`] with the
/// relay's status (409, 410, 404, 400) and message; nothing was created on the relay then.
pub async fn enroll(
    relay_base_url: &str,
    code: &str,
    device_name: Option<&str>,
    public_key: [u8; 32],
    tls: &TlsConfig,
) -> Result<Enrollment, DriverError> {
    let http = http_client(&*client_config_with(tls)?)?;
    let mut body = serde_json::json!({ "code": code.trim(), "publicKey": hex(&public_key) });
    if let Some(name) = device_name {
        body["deviceName"] = serde_json::Value::String(name.to_owned());
    }
    let response = http
        .post(format!("{}/v1/enroll", base(relay_base_url)?))
        .json(&body)
        .send()
        .await
        .map_err(|e| DriverError::Network(error_chain(&e.without_url())))?;
    let (status, text) = read_body(response).await?;
    if status != 201 {
        return Err(refusal(status, &text));
    }
    serde_json::from_str(&text)
        .map_err(|e| DriverError::Network(format!("unreadable enrollment answer: {e}")))
}

/// The agency's device keys, `GET /v1/keys`, as the relay's raw JSON:
/// `{"agencyId": "...", "keys": [{"userId","role","deviceId","publicKey","enrolledAtMs","revokedAtMs"}]}`.
pub async fn fetch_device_keys(
    base_url: &str,
    token: &str,
    tls: &TlsConfig,
) -> Result<String, DriverError> {
    let http = http_client(&*client_config_with(tls)?)?;
    let response = http
        .get(format!("{}/v1/keys", base(base_url)?))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| DriverError::Network(error_chain(&e.without_url())))?;
    let (status, text) = read_body(response).await?;
    if status != 200 {
        return Err(refusal(status, &text));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn other_schemes_are_refused_before_any_request() {
        assert!(matches!(
            enroll("ftp://x", "fce_1", None, [0; 32], &TlsConfig::default()).await,
            Err(DriverError::InvalidUrl(_))
        ));
        assert!(matches!(
            fetch_device_keys("relay", "t", &TlsConfig::default()).await,
            Err(DriverError::InvalidUrl(_))
        ));
    }

    #[test]
    fn qr_payloads_are_read_and_others_refused() {
        let qr = parse_qr_payload(r#"{"v":1,"code":"fce_abc","relay":"https://relay.example"}"#)
            .expect("a valid payload");
        assert_eq!(qr.code, "fce_abc");
        assert_eq!(qr.relay.as_deref(), Some("https://relay.example"));
        assert_eq!(
            parse_qr_payload(r#"{"v":1,"code":"fce_abc"}"#).map(|q| q.relay),
            Some(None)
        );
        assert_eq!(parse_qr_payload(r#"{"v":2,"code":"fce_abc"}"#), None);
        assert_eq!(parse_qr_payload(r#"{"v":1,"code":" "}"#), None);
        assert_eq!(parse_qr_payload("https://example.com"), None);
    }

    #[test]
    fn refusals_carry_the_relays_message() {
        match refusal(
            409,
            r#"{"error":"conflict: the enrollment code was already used"}"#,
        ) {
            DriverError::Refused { status, message } => {
                assert_eq!(status, 409);
                assert!(message.contains("already used"));
            }
            other => panic!("{other:?}"),
        }
    }
}
