//! The one error type of `fieldchart-core`.
//!
//! Messages never contain patient data (names, narrative text): errors end up in logs and crash
//! reports, which are not protected health information stores.

use crate::protocol::{DocumentId, ProtocolError};

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store was closed; open it again to continue.
    #[error("the store is closed")]
    Closed,
    /// The key does not decrypt the file, or the file is not a Fieldchart database. The file is
    /// left untouched.
    #[error(
        "cannot decrypt the database: wrong key, or not a Fieldchart database (file left untouched)"
    )]
    CannotDecrypt,
    /// The database was written by a newer version of Fieldchart.
    #[error(
        "the database schema version {found} is newer than this build supports ({supported}); update the app"
    )]
    SchemaTooNew { found: u32, supported: u32 },
    /// The database is damaged. The file is left untouched for recovery.
    #[error("the database is corrupt: {0} (file left untouched)")]
    Corrupt(String),
    /// No document with this id in the store.
    #[error("document {0} not found")]
    DocumentNotFound(DocumentId),
    /// The document is not of the kind the operation needs.
    #[error("document {doc} is a {found}, expected a {expected}")]
    WrongKind {
        doc: DocumentId,
        expected: &'static str,
        found: String,
    },
    /// The note is signed: its body is a legal record and only addenda may be added.
    #[error("note {0} is signed; add an addendum instead of editing it")]
    NoteSigned(DocumentId),
    /// The caller's role may not do this.
    #[error("role {role} may not {action}")]
    Forbidden {
        role: &'static str,
        action: &'static str,
    },
    /// A referenced item (vital reading, medication, goal, conflict, ...) does not exist.
    #[error("{what} {id} not found")]
    ItemNotFound { what: &'static str, id: String },
    /// A caller-supplied value is out of range or malformed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A UTF-16 position or length is outside the text or splits a surrogate pair.
    #[error("text position {pos}+{len} is invalid for a text of {text_len} UTF-16 code units")]
    InvalidTextRange {
        pos: usize,
        len: usize,
        text_len: usize,
    },
    /// Another `Store` (in this process or another) has this store file open. One file is
    /// opened by one `Store` at a time; close the other first.
    #[error("the store file is already open in another Store (this or another process)")]
    StoreInUse,
    /// The values of a conflicted field changed since they were listed (a sync added or
    /// removed one, or someone resolved it): list the conflicts again and choose again.
    #[error("the conflict at {path} changed since it was listed; list it again")]
    ConflictChanged { path: String },
    /// The note has open conflicts; they must be resolved before it can be signed.
    #[error("the note has {} open conflict(s) to resolve before signing: {}", paths.len(), paths.join(", "))]
    ConflictsOpen { paths: Vec<String> },
    /// The field the caller changed has concurrent values: resolve the conflict first (writing
    /// over it would close it without a resolution record).
    #[error("the field {path} is in conflict; resolve the conflict before changing it")]
    FieldInConflict { path: String },
    /// The field the caller changed no longer holds the value the caller read (another change
    /// arrived since): read the record again.
    #[error("the field {path} changed since it was read; read it again")]
    StaleRead { path: String },
    /// A document's stored bytes could not be decoded.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// Protocol decode/encode error.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// SQLite error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file operation failed (the keystroke journal).
    #[error("io: {0}")]
    Io(String),
    /// JSON (de)serialisation of a stored value failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result type of `fieldchart-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
