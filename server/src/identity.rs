//! Who is who: agencies (tenants), users and their roles, patients, care teams and devices.
//!
//! These are plain records; [`crate::storage::Storage`] keeps them and [`crate::admin`] is the
//! only place that creates or changes them. Identifiers are random (128 bits, hex, with a short
//! prefix naming the kind) so that an id seen in a log or a document tells its kind, and so that
//! nothing about a person can be read from it.

use std::fmt;

use fieldchart_core::protocol::DocumentId;
use rand::TryRngCore;
use serde::{Deserialize, Serialize};

pub use fieldchart_core::model::Role;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Prefix of freshly generated ids of this kind.
            pub const PREFIX: &'static str = $prefix;

            /// Wrap an id read from storage or from a caller.
            pub fn new(id: impl Into<String>) -> Self {
                $name(id.into())
            }

            /// A fresh random id.
            pub fn random() -> Self {
                $name(format!("{}{}", $prefix, random_hex::<16>()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }
    };
}

id_type!(
    /// An agency (tenant). Nothing crosses agencies.
    AgencyId,
    "agc_"
);
id_type!(
    /// A person with an account at an agency.
    UserId,
    "usr_"
);
id_type!(
    /// A patient of an agency; documents name it in their root `patientId`.
    PatientId,
    "pat_"
);
id_type!(
    /// One device (phone, tablet, browser) of a user, with its own token.
    DeviceId,
    "dev_"
);

/// `N` bytes from the operating system's random number generator, as lowercase hex.
///
/// The OS generator (not a user-space one) because the same helper makes bearer tokens.
pub(crate) fn random_hex<const N: usize>() -> String {
    hex::encode(os_random::<N>())
}

/// `N` bytes from the operating system's random number generator.
pub(crate) fn os_random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random number generator is unavailable");
    bytes
}

/// Parse a role name as the CLI and the admin API spell it.
pub fn parse_role(s: &str) -> Option<Role> {
    match s {
        "clinician" => Some(Role::Clinician),
        "office" => Some(Role::Office),
        "admin" => Some(Role::Admin),
        _ => None,
    }
}

/// An agency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Agency {
    /// Its id.
    pub id: AgencyId,
    /// Display name.
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// A user of an agency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Its id.
    pub id: UserId,
    /// The agency the user works for.
    pub agency_id: AgencyId,
    /// Display name.
    pub name: String,
    /// What the user may reach: see [`crate::access`].
    pub role: Role,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// A patient. The name and every clinical fact live in the patient's chart document, not here:
/// the relay's identity tables hold only what access control needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Patient {
    /// Its id (the `patientId` root field of its documents).
    pub id: PatientId,
    /// The agency caring for the patient.
    pub agency_id: AgencyId,
    /// The patient's chart document, created with the patient.
    pub chart_document_id: DocumentId,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// A device of a user, authenticated by a bearer token of which only the hash is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// Whose device it is.
    pub user_id: UserId,
    /// A name the admin gave it ("Maria's phone").
    pub name: String,
    /// SHA-256 of the bearer token.
    pub token_hash: [u8; 32],
    /// Creation time, ms since the epoch.
    pub created_at: i64,
    /// The token is refused from this time on, ms since the epoch.
    pub expires_at: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_carry_their_kind_and_differ() {
        let a = PatientId::random();
        let b = PatientId::random();
        assert!(a.as_str().starts_with("pat_"));
        assert_eq!(a.as_str().len(), 4 + 32);
        assert_ne!(a, b);
    }

    #[test]
    fn roles_parse_as_spelled_on_the_cli() {
        assert_eq!(parse_role("office"), Some(Role::Office));
        assert_eq!(parse_role("Office"), None);
        for role in [Role::Clinician, Role::Office, Role::Admin] {
            assert_eq!(parse_role(role.as_str()), Some(role));
        }
    }
}
