//! Device authentication by bearer token.
//!
//! A token is 256 bits from the operating system's random number generator, shown once when it
//! is issued and stored only as its SHA-256. A fast hash is the right tool here: password
//! hashing exists to slow down guessing low-entropy secrets, and nobody guesses 256 random
//! bits; the hash only keeps a stolen database from containing usable tokens. A token is
//! refused after its expiry or once its device is revoked.
//!
//! Each successful authentication records the device's last-seen time (to within
//! [`crate::storage::LAST_SEEN_RESOLUTION_MS`]).
//!
//! HTTP endpoints take the token from `Authorization: Bearer`; the WebSocket endpoint also
//! accepts `?token=` because browsers cannot set headers on a WebSocket (the request log
//! never records query strings: see [`crate::http_log`]).

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::identity::{AgencyId, DeviceId, Role, User, UserId, os_random};
use crate::state::AppState;
use crate::storage::Storage;

/// Prefix of every token, so a leaked one is recognisable in a secret scanner.
pub const TOKEN_PREFIX: &str = "fct_";

/// Length of a token: the prefix and 64 hex digits.
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 64;

/// A fresh token and the hash to store for it.
pub fn new_token() -> (String, [u8; 32]) {
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(os_random::<32>()));
    let hash = hash_token(&token);
    (token, hash)
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    hash_secret(token)
}

/// The stored form of a high-entropy secret (a token or an enrollment code): SHA-256.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// An authenticated device of a user: who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user: User,
    /// The device the token belongs to.
    pub device_id: DeviceId,
    /// When the token stops working, ms since the epoch.
    pub expires_at: i64,
}

impl Principal {
    /// The user's id.
    pub fn user_id(&self) -> &UserId {
        &self.user.id
    }

    /// The user's agency.
    pub fn agency_id(&self) -> &AgencyId {
        &self.user.agency_id
    }

    /// The user's role.
    pub fn role(&self) -> Role {
        self.user.role
    }
}

/// Who holds `token`, if it is known, unexpired and its device not revoked. Every failure is
/// the same [`Error::Unauthorized`], so a caller cannot tell an unknown token from a revoked one.
pub async fn authenticate(storage: &dyn Storage, token: &str) -> Result<Principal> {
    if token.len() != TOKEN_LEN || !token.starts_with(TOKEN_PREFIX) {
        return Err(Error::Unauthorized);
    }
    let Some((device, user)) = storage.device_by_token_hash(hash_token(token)).await? else {
        return Err(Error::Unauthorized);
    };
    let now = now_ms();
    if device.revoked_at.is_some() || device.expires_at <= now {
        return Err(Error::Unauthorized);
    }
    // Last seen, for the admin's device list; at most one write a minute per device (the
    // backend skips the rest). Failing to record it does not refuse the device.
    if let Err(e) = storage.touch_device(device.id.clone(), now).await {
        tracing::warn!(error = %e, device = %device.id, "cannot record last-seen time");
    }
    Ok(Principal {
        user,
        device_id: device.id,
        expires_at: device.expires_at,
    })
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The token of a `token=` query parameter. Tokens are ASCII (a prefix and hex digits), so
/// the value is taken verbatim: a percent-encoded value is not one of ours and fails to
/// authenticate.
pub fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Principal> {
        let token = bearer_token(&parts.headers).ok_or(Error::Unauthorized)?;
        authenticate(state.storage(), token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Agency, Device, DeviceId};
    use crate::storage::MemoryStorage;

    async fn storage_with_device(expires_at: i64) -> (MemoryStorage, String, DeviceId) {
        let s = MemoryStorage::new();
        let agency = AgencyId::random();
        s.insert_agency(Agency {
            id: agency.clone(),
            name: "A".into(),
            created_at: 0,
        })
        .await
        .expect("agency");
        let user = User {
            id: UserId::random(),
            agency_id: agency,
            name: "U".into(),
            role: Role::Clinician,
            created_at: 0,
        };
        s.insert_user(user.clone()).await.expect("user");
        let (token, token_hash) = new_token();
        let device = Device {
            id: DeviceId::random(),
            user_id: user.id,
            name: "phone".into(),
            token_hash,
            created_at: 0,
            expires_at,
            revoked_at: None,
        };
        s.insert_device(device.clone()).await.expect("device");
        (s, token, device.id)
    }

    #[tokio::test]
    async fn a_valid_token_authenticates_its_device() {
        let (s, token, device) = storage_with_device(now_ms() + 60_000).await;
        let principal = authenticate(&s, &token).await.expect("valid token");
        assert_eq!(principal.device_id, device);
        assert_eq!(principal.role(), Role::Clinician);
    }

    #[tokio::test]
    async fn bad_expired_and_revoked_tokens_are_refused_alike() {
        let (s, token, device) = storage_with_device(now_ms() + 60_000).await;
        let (other, _) = new_token();
        for bad in [
            "",
            "fct_",
            "Bearer x",
            other.as_str(),
            &token[..token.len() - 1],
        ] {
            assert!(
                matches!(authenticate(&s, bad).await, Err(Error::Unauthorized)),
                "{bad:?}"
            );
        }
        s.revoke_device(device, now_ms()).await.expect("revoke");
        assert!(matches!(
            authenticate(&s, &token).await,
            Err(Error::Unauthorized)
        ));

        let (s, token, _) = storage_with_device(now_ms() - 1).await;
        assert!(matches!(
            authenticate(&s, &token).await,
            Err(Error::Unauthorized)
        ));
    }

    #[test]
    fn tokens_are_256_random_bits_and_only_their_hash_is_kept() {
        let (a, hash_a) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_LEN);
        assert_eq!(hash_a, hash_token(&a));
        assert_ne!(hex::encode(hash_a), a[TOKEN_PREFIX.len()..]);
    }

    #[test]
    fn tokens_come_from_the_header_or_the_query() {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            "Bearer fct_abc".parse().expect("header"),
        );
        assert_eq!(bearer_token(&headers), Some("fct_abc"));
        headers.insert(
            axum::http::header::AUTHORIZATION,
            "Basic fct_abc".parse().expect("header"),
        );
        assert_eq!(bearer_token(&headers), None);
        assert_eq!(query_token(Some("a=1&token=fct_x")), Some("fct_x"));
        assert_eq!(query_token(Some("tokens=1")), None);
        assert_eq!(query_token(None), None);
    }
}
