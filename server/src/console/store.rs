//! What the console keeps beyond the relay's [`crate::storage::Storage`]: sign-in names and
//! password hashes of office users, one-time set-password links, browser sessions, and the
//! agency-wide listings the pages need (users, patients, a patient's documents and care team).
//!
//! A separate trait (same shape as `Storage`: async, object safe, one method = one
//! transaction) so the console can grow without touching the sync path's storage contract.
//! Implemented for the SQLite backend in `storage/sqlite/console.rs`.

use std::fmt;

use fieldchart_core::protocol::DocumentId;

use crate::identity::{AgencyId, DeviceId, Patient, PatientId, User, UserId};
use crate::storage::{AdminEvent, StorageFuture};

/// An office user's sign-in record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRecord {
    /// Whose.
    pub user_id: UserId,
    /// The sign-in name (lower case).
    pub login: String,
    /// argon2id PHC string; `None` until the user set a password.
    pub password_hash: Option<String>,
}

/// A one-time set-password link, as stored (only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordLink {
    /// SHA-256 of the link's token.
    pub token_hash: [u8; 32],
    /// Whose password it sets.
    pub user_id: UserId,
    /// Issued at, ms since the epoch.
    pub created_at: i64,
    /// Refused from this time on.
    pub expires_at: i64,
    /// Who issued it (an admin log actor).
    pub created_by: String,
}

/// A signed-in browser session.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 of the cookie's secret.
    pub token_hash: [u8; 32],
    /// `web_…`: names the browser session in audit rows (as a device id would).
    pub id: String,
    /// Who is signed in.
    pub user_id: UserId,
    /// The session's CSRF token (every form carries it).
    pub csrf: String,
    /// Signed in at, ms since the epoch.
    pub created_at: i64,
    /// Last request, ms since the epoch (idle sign-out counts from here).
    pub last_active_at: i64,
    /// Signed out at this time whatever the activity.
    pub expires_at: i64,
}

impl fmt::Debug for ConsoleSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleSession")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

/// A user as the administration page lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserListing {
    /// The user.
    pub user: User,
    /// When they were disabled, if they were.
    pub disabled_at: Option<i64>,
    /// Their console sign-in name, if they have one.
    pub login: Option<String>,
    /// Whether they have set a console password.
    pub has_password: bool,
}

/// A sync failure a device reported (see `crate::sync_failures`): which document, why, since
/// when; never its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedFailure {
    /// The reporting device.
    pub device_id: DeviceId,
    /// The device's user.
    pub user_id: UserId,
    /// The device's agency.
    pub agency_id: AgencyId,
    /// The document that does not sync.
    pub document_id: DocumentId,
    /// Its patient, when the relay knows them in the device's agency.
    pub patient_id: Option<PatientId>,
    /// Its kind as the device indexed it (`visit-note`, `patient`), if known.
    pub document_kind: Option<String>,
    /// `refused` or `invalid`.
    pub failure: String,
    /// Why, as the device recorded it (no patient data).
    pub reason: String,
    /// The last failure, ms since the epoch (the device's clock).
    pub at_ms: i64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the relay received the report, ms since the epoch.
    pub reported_at: i64,
}

impl ReportedFailure {
    /// What a new report compares: the same document failing the same way is no change.
    pub fn same_failure(&self, other: &ReportedFailure) -> bool {
        (
            &self.document_id,
            &self.patient_id,
            &self.document_kind,
            &self.failure,
            &self.reason,
            self.at_ms,
            self.attempts,
        ) == (
            &other.document_id,
            &other.patient_id,
            &other.document_kind,
            &other.failure,
            &other.reason,
            other.at_ms,
            other.attempts,
        )
    }
}

/// The console's storage. See the module docs.
pub trait ConsoleStore: Send + Sync + fmt::Debug + 'static {
    /// Give `user_id` the sign-in name `login` and store its first set-password link, with the
    /// admin log row `event`, in one transaction. A taken login is [`crate::Error::Conflict`].
    fn create_login(
        &self,
        user_id: UserId,
        login: String,
        link: PasswordLink,
        event: AdminEvent,
    ) -> StorageFuture<'_, ()>;

    /// Store another set-password link for a user who has a login (a reset), with its admin
    /// log row. A user without a login is [`crate::Error::NotFound`].
    fn insert_password_link(&self, link: PasswordLink, event: AdminEvent) -> StorageFuture<'_, ()>;

    /// The sign-in record of `login` (lower case).
    fn login(&self, login: String) -> StorageFuture<'_, Option<LoginRecord>>;

    /// The user a valid link would set the password of, without using it: unknown is
    /// [`crate::Error::NotFound`], used [`crate::Error::Conflict`], expired
    /// [`crate::Error::Expired`].
    fn password_link_user(&self, token_hash: [u8; 32], now_ms: i64) -> StorageFuture<'_, UserId>;

    /// Use a link: set the password hash and mark the link used, and end the user's sessions,
    /// in one transaction, with its admin log row. Errors as
    /// [`ConsoleStore::password_link_user`]; a disabled user is [`crate::Error::Forbidden`].
    fn redeem_password_link(
        &self,
        token_hash: [u8; 32],
        password_hash: String,
        event: AdminEvent,
    ) -> StorageFuture<'_, UserId>;

    /// Store a new session (and the sign-in's admin log row).
    fn insert_session(&self, session: ConsoleSession, event: AdminEvent) -> StorageFuture<'_, ()>;

    /// A session by the hash of its cookie secret.
    fn session(&self, token_hash: [u8; 32]) -> StorageFuture<'_, Option<ConsoleSession>>;

    /// Record activity on a session.
    fn touch_session(&self, token_hash: [u8; 32], at_ms: i64) -> StorageFuture<'_, ()>;

    /// End a session (sign-out or idle); `false` if there was none.
    fn delete_session(&self, token_hash: [u8; 32]) -> StorageFuture<'_, bool>;

    /// End every session of a user (disabled, or a new password set); how many there were.
    fn delete_user_sessions(&self, user_id: UserId) -> StorageFuture<'_, usize>;

    /// Every user of an agency, by name.
    fn agency_users(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<UserListing>>;

    /// Every patient of an agency, oldest first.
    fn agency_patients(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<Patient>>;

    /// The users on a patient's care team.
    fn care_team(&self, patient_id: PatientId) -> StorageFuture<'_, Vec<UserId>>;

    /// Every stored document of a patient, with its kind, oldest first.
    fn patient_documents(
        &self,
        patient_id: PatientId,
    ) -> StorageFuture<'_, Vec<(DocumentId, String)>>;

    /// Replace every sync failure `device_id` reported before with `failures` (its whole
    /// current list; empty: everything synced), in one transaction. Returns whether the list
    /// changed (other than in `reported_at`).
    fn replace_sync_failures(
        &self,
        device_id: DeviceId,
        failures: Vec<ReportedFailure>,
    ) -> StorageFuture<'_, bool>;

    /// Every sync failure devices of an agency reported, newest first.
    fn agency_sync_failures(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<ReportedFailure>>;
}
