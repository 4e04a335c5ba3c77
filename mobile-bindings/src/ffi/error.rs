//! The one public error of the bindings: Kotlin `FieldchartException`, Swift `FieldchartError`,
//! Python `FieldchartError`. Flat: each variant is a kind a UI can switch on, carrying a
//! message for logs. Messages come from the core's and the driver's `Display`, which never
//! contain patient data (names, narrative text).

use fieldchart_core::Error as CoreError;

use crate::DriverError;

/// Why a call failed. Every exported function that can fail returns this; none panics
/// across the boundary.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum FieldchartError {
    /// The key does not open the store (or the file is not a Fieldchart store). Nothing was
    /// changed on disk.
    #[error("{0}")]
    WrongKey(String),
    /// Another open store (this or another process) holds the file; close it first.
    #[error("{0}")]
    StoreInUse(String),
    /// The store was closed; open it again.
    #[error("{0}")]
    Closed(String),
    /// The signed-in role may not do this.
    #[error("{0}")]
    NotAllowed(String),
    /// The note is signed: only addenda may be added.
    #[error("{0}")]
    SignedNote(String),
    /// Open conflicts must be resolved first (signing, or writing over a conflicted field).
    #[error("{0}")]
    ConflictOpen(String),
    /// The data changed since it was read or listed (a sync arrived): read it again.
    #[error("{0}")]
    Stale(String),
    /// No such document or item.
    #[error("{0}")]
    NotFound(String),
    /// A caller-supplied value is malformed or out of range (ids, UTF-16 positions, URLs).
    #[error("{0}")]
    InvalidInput(String),
    /// The relay could not be reached, or its answer not read; local data is intact. Retry.
    #[error("{0}")]
    Network(String),
    /// The relay refused the request (e.g. a used or expired enrollment code).
    #[error("{0}")]
    Refused(String),
    /// This device's access was revoked or its token is no longer accepted: enroll again.
    /// Unsynced local data stays in the store and is listed.
    #[error("{0}")]
    Revoked(String),
    /// The device token expired: sign in again.
    #[error("{0}")]
    TokenExpired(String),
    /// The store file was written by a newer app version.
    #[error("{0}")]
    NeedsUpdate(String),
    /// The store is damaged or the device's storage failed (disk full, I/O error).
    #[error("{0}")]
    Storage(String),
    /// A bug in this library (or a callback that threw). Please report it.
    #[error("{0}")]
    Internal(String),
}

/// The result type of every fallible exported function.
pub type FfiResult<T> = Result<T, FieldchartError>;

impl From<CoreError> for FieldchartError {
    fn from(e: CoreError) -> Self {
        let message = e.to_string();
        match e {
            CoreError::CannotDecrypt => FieldchartError::WrongKey(message),
            CoreError::StoreInUse => FieldchartError::StoreInUse(message),
            CoreError::Closed => FieldchartError::Closed(message),
            CoreError::Forbidden { .. } => FieldchartError::NotAllowed(message),
            CoreError::NoteSigned(_) => FieldchartError::SignedNote(message),
            CoreError::ConflictsOpen { .. } | CoreError::FieldInConflict { .. } => {
                FieldchartError::ConflictOpen(message)
            }
            CoreError::ConflictChanged { .. } | CoreError::StaleRead { .. } => {
                FieldchartError::Stale(message)
            }
            CoreError::DocumentNotFound(_) | CoreError::ItemNotFound { .. } => {
                FieldchartError::NotFound(message)
            }
            CoreError::WrongKind { .. }
            | CoreError::InvalidInput(_)
            | CoreError::InvalidTextRange { .. }
            | CoreError::Protocol(_) => FieldchartError::InvalidInput(message),
            CoreError::SchemaTooNew { .. } => FieldchartError::NeedsUpdate(message),
            CoreError::Corrupt(_)
            | CoreError::Automerge(_)
            | CoreError::Sqlite(_)
            | CoreError::Io(_)
            | CoreError::Json(_) => FieldchartError::Storage(message),
            _ => FieldchartError::Internal(message),
        }
    }
}

impl From<DriverError> for FieldchartError {
    fn from(e: DriverError) -> Self {
        let message = e.to_string();
        match e {
            DriverError::InvalidUrl(_) | DriverError::Tls(_) => {
                FieldchartError::InvalidInput(message)
            }
            DriverError::Http(_) => FieldchartError::Internal(message),
            DriverError::Network(_) => FieldchartError::Network(message),
            DriverError::Refused { status: 401, .. } => FieldchartError::Revoked(message),
            DriverError::Refused { .. } => FieldchartError::Refused(message),
        }
    }
}

impl From<uniffi::UnexpectedUniFFICallbackError> for FieldchartError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        FieldchartError::Internal(format!("a listener failed: {}", e.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_core_error() {
        assert!(matches!(
            FieldchartError::from(CoreError::CannotDecrypt),
            FieldchartError::WrongKey(_)
        ));
        assert!(matches!(
            FieldchartError::from(CoreError::StoreInUse),
            FieldchartError::StoreInUse(_)
        ));
        assert!(matches!(
            FieldchartError::from(CoreError::ConflictsOpen {
                paths: vec!["nextVisit".into()]
            }),
            FieldchartError::ConflictOpen(_)
        ));
        assert!(matches!(
            FieldchartError::from(DriverError::Refused {
                status: 401,
                message: "unauthorized".into()
            }),
            FieldchartError::Revoked(_)
        ));
    }
}
