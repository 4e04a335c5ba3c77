//! The one error type of the relay, and how each error becomes an HTTP response.
//!
//! Client mistakes (bad input, missing or invalid credentials, unknown ids) become 4xx responses
//! with a message the caller can act on. Internal failures (storage, automerge, I/O) are logged
//! once, here, and the client gets a generic 500 body: their text may name tables, paths or
//! ids that are none of the caller's business. Messages never contain patient data.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fieldchart_core::protocol::ProtocolError;

/// Everything that can go wrong in the relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No credentials, or a token that is unknown, expired or revoked.
    #[error("missing, invalid, expired or revoked token")]
    Unauthorized,
    /// Authenticated, but the caller's role or agency does not allow this.
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// The named thing does not exist (or is not visible to the caller).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request conflicts with existing state (e.g. a document id already stored).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A document write built on heads that are no longer the stored ones (another relay
    /// process wrote it meanwhile); nothing was written. Reload and retry.
    #[error("stale write of document {0}: it changed meanwhile")]
    Stale(String),
    /// A one-time credential (an enrollment code) is past its expiry.
    #[error("{0} expired")]
    Expired(&'static str),
    /// A bounded resource is exhausted (sessions); retry later.
    #[error("server busy: {0}")]
    Busy(&'static str),
    /// The database was written by a newer relay.
    #[error("database schema version {found} is newer than this relay supports ({supported})")]
    SchemaTooNew {
        /// Version found in the file.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
    /// The database cannot be read with the key given: a wrong key, an unencrypted database
    /// opened with a key, or a file that is not a relay database.
    #[error(
        "the relay database cannot be decrypted with this key (wrong key, or not an encrypted relay database)"
    )]
    CannotDecrypt,
    /// A stored row could not be decoded, or a storage backend failed in a way that has no
    /// more specific variant.
    #[error("storage: {0}")]
    Storage(String),
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// An automerge document or change could not be loaded. (Boxed, like [`Error::Core`], to
    /// keep every `Result` of the relay small.)
    #[error("automerge: {0}")]
    Automerge(Box<automerge::AutomergeError>),
    /// A protocol message could not be decoded or a sync message applied.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The document model refused an operation.
    #[error("{0}")]
    Core(Box<fieldchart_core::Error>),
    /// File system or socket failure.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Result type of the relay.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The HTTP status this error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Core(e) if matches!(**e, fieldchart_core::Error::InvalidInput(_)) => {
                StatusCode::BAD_REQUEST
            }
            Error::Conflict(_) | Error::Stale(_) => StatusCode::CONFLICT,
            Error::Expired(_) => StatusCode::GONE,
            Error::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Failures of the relay itself (as opposed to a client's mistake).
    pub fn is_internal(&self) -> bool {
        self.status().is_server_error() && !matches!(self, Error::Busy(_))
    }
}

impl From<automerge::AutomergeError> for Error {
    fn from(e: automerge::AutomergeError) -> Self {
        Error::Automerge(Box::new(e))
    }
}

impl From<fieldchart_core::Error> for Error {
    fn from(e: fieldchart_core::Error) -> Self {
        Error::Core(Box::new(e))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Storage(format!("blocking task failed: {e}"))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = if self.is_internal() {
            // Logged once, here; the body stays generic.
            tracing::error!(error = %self, "request failed");
            "internal server error".to_owned()
        } else {
            self.to_string()
        };
        let mut response =
            (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_keep_their_message_and_internal_errors_do_not() {
        assert_eq!(Error::NotFound("patient").status(), StatusCode::NOT_FOUND);
        assert!(!Error::BadRequest("x".into()).is_internal());
        assert!(Error::Storage("disk on fire".into()).is_internal());
        assert!(!Error::Busy("sessions").is_internal());
        assert!(
            std::mem::size_of::<Error>() <= 72,
            "keep Result<T, Error> small"
        );
    }
}
