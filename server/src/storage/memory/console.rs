//! [`ConsoleStore`] in memory, beside a [`MemoryStorage`] (whose users, patients, care teams,
//! documents and admin log it reads and appends to): for tests, like the backend itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use fieldchart_core::protocol::DocumentId;

use super::MemoryStorage;
use crate::console::store::{
    ConsoleSession, ConsoleStore, LoginRecord, PasswordLink, ReportedFailure, UserListing,
};
use crate::error::{Error, Result};
use crate::identity::{AgencyId, DeviceId, Patient, PatientId, UserId};
use crate::storage::{AdminEvent, StorageFuture};

#[derive(Debug, Default)]
struct Tables {
    /// user → (login, password hash)
    logins: HashMap<UserId, (String, Option<String>)>,
    /// token hash → (link, used at)
    links: HashMap<[u8; 32], (PasswordLink, Option<i64>)>,
    sessions: HashMap<[u8; 32], ConsoleSession>,
    /// device → its reported sync failures, by document id
    failures: HashMap<DeviceId, Vec<ReportedFailure>>,
}

/// The console's records in memory, over a [`MemoryStorage`].
#[derive(Debug)]
pub struct MemoryConsole {
    storage: Arc<MemoryStorage>,
    tables: Mutex<Tables>,
}

impl MemoryConsole {
    /// Console records beside `storage`.
    pub fn new(storage: Arc<MemoryStorage>) -> MemoryConsole {
        MemoryConsole {
            storage,
            tables: Mutex::new(Tables::default()),
        }
    }

    /// Run `f` with the storage's state and the console tables locked (in that order, always),
    /// so a change and its admin log row are one step.
    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut super::State, &mut Tables) -> Result<T> + Send,
    ) -> StorageFuture<'_, T> {
        let out = {
            let mut state = self
                .storage
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut state, &mut tables)
        };
        Box::pin(async move { out })
    }
}

fn check_enabled(state: &super::State, user_id: &UserId) -> Result<()> {
    if !state.users.contains_key(user_id) {
        return Err(Error::NotFound("user"));
    }
    if state.disabled.contains_key(user_id) {
        return Err(Error::Forbidden("the user is disabled"));
    }
    Ok(())
}

fn link_user(tables: &Tables, token_hash: &[u8; 32], now_ms: i64) -> Result<UserId> {
    match tables.links.get(token_hash) {
        None => Err(Error::NotFound("set-password link")),
        Some((_, Some(_))) => Err(Error::Conflict("the link was already used".into())),
        Some((link, None)) if link.expires_at <= now_ms => Err(Error::Expired("the link")),
        Some((link, None)) => Ok(link.user_id.clone()),
    }
}

impl ConsoleStore for MemoryConsole {
    fn create_login(
        &self,
        user_id: UserId,
        login: String,
        link: PasswordLink,
        event: AdminEvent,
    ) -> StorageFuture<'_, ()> {
        self.with(move |state, t| {
            check_enabled(state, &user_id)?;
            if t.logins.contains_key(&user_id) || t.logins.values().any(|(l, _)| *l == login) {
                return Err(Error::Conflict(
                    "that sign-in name is taken, or the user already has one".into(),
                ));
            }
            t.logins.insert(user_id, (login, None));
            t.links.insert(link.token_hash, (link, None));
            state.push_admin(event);
            Ok(())
        })
    }

    fn insert_password_link(&self, link: PasswordLink, event: AdminEvent) -> StorageFuture<'_, ()> {
        self.with(move |state, t| {
            check_enabled(state, &link.user_id)?;
            if !t.logins.contains_key(&link.user_id) {
                return Err(Error::NotFound("console login"));
            }
            t.links.insert(link.token_hash, (link, None));
            state.push_admin(event);
            Ok(())
        })
    }

    fn login(&self, login: String) -> StorageFuture<'_, Option<LoginRecord>> {
        self.with(move |_, t| {
            Ok(t.logins
                .iter()
                .find(|(_, (l, _))| *l == login)
                .map(|(user_id, (l, hash))| LoginRecord {
                    user_id: user_id.clone(),
                    login: l.clone(),
                    password_hash: hash.clone(),
                }))
        })
    }

    fn password_link_user(&self, token_hash: [u8; 32], now_ms: i64) -> StorageFuture<'_, UserId> {
        self.with(move |_, t| link_user(t, &token_hash, now_ms))
    }

    fn redeem_password_link(
        &self,
        token_hash: [u8; 32],
        password_hash: String,
        event: AdminEvent,
    ) -> StorageFuture<'_, UserId> {
        self.with(move |state, t| {
            let user_id = link_user(t, &token_hash, event.at_ms)?;
            check_enabled(state, &user_id)?;
            if let Some((_, used)) = t.links.get_mut(&token_hash) {
                *used = Some(event.at_ms);
            }
            if let Some((_, hash)) = t.logins.get_mut(&user_id) {
                *hash = Some(password_hash);
            }
            t.sessions.retain(|_, s| s.user_id != user_id);
            state.push_admin(event);
            Ok(user_id)
        })
    }

    fn insert_session(&self, session: ConsoleSession, event: AdminEvent) -> StorageFuture<'_, ()> {
        self.with(move |state, t| {
            check_enabled(state, &session.user_id)?;
            t.sessions.insert(session.token_hash, session);
            state.push_admin(event);
            Ok(())
        })
    }

    fn session(&self, token_hash: [u8; 32]) -> StorageFuture<'_, Option<ConsoleSession>> {
        self.with(move |_, t| Ok(t.sessions.get(&token_hash).cloned()))
    }

    fn touch_session(&self, token_hash: [u8; 32], at_ms: i64) -> StorageFuture<'_, ()> {
        self.with(move |_, t| {
            if let Some(s) = t.sessions.get_mut(&token_hash) {
                s.last_active_at = s.last_active_at.max(at_ms);
            }
            Ok(())
        })
    }

    fn delete_session(&self, token_hash: [u8; 32]) -> StorageFuture<'_, bool> {
        self.with(move |_, t| Ok(t.sessions.remove(&token_hash).is_some()))
    }

    fn delete_user_sessions(&self, user_id: UserId) -> StorageFuture<'_, usize> {
        self.with(move |_, t| {
            let before = t.sessions.len();
            t.sessions.retain(|_, s| s.user_id != user_id);
            Ok(before - t.sessions.len())
        })
    }

    fn agency_users(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<UserListing>> {
        self.with(move |state, t| {
            let mut out: Vec<UserListing> = state
                .users
                .values()
                .filter(|u| u.agency_id == agency_id)
                .map(|u| UserListing {
                    disabled_at: state.disabled.get(&u.id).copied(),
                    login: t.logins.get(&u.id).map(|(l, _)| l.clone()),
                    has_password: t.logins.get(&u.id).is_some_and(|(_, h)| h.is_some()),
                    user: u.clone(),
                })
                .collect();
            out.sort_by(|a, b| (&a.user.name, &a.user.id).cmp(&(&b.user.name, &b.user.id)));
            Ok(out)
        })
    }

    fn agency_patients(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<Patient>> {
        self.with(move |state, _| {
            let mut out: Vec<Patient> = state
                .patients
                .values()
                .filter(|p| p.agency_id == agency_id)
                .cloned()
                .collect();
            out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            Ok(out)
        })
    }

    fn care_team(&self, patient_id: PatientId) -> StorageFuture<'_, Vec<UserId>> {
        self.with(move |state, _| {
            let mut team: Vec<(u64, UserId)> = state
                .care_team
                .iter()
                .filter(|((_, p), _)| *p == patient_id)
                .map(|((u, _), seq)| (*seq, u.clone()))
                .collect();
            team.sort();
            Ok(team.into_iter().map(|(_, u)| u).collect())
        })
    }

    fn patient_documents(
        &self,
        patient_id: PatientId,
    ) -> StorageFuture<'_, Vec<(DocumentId, String)>> {
        self.with(move |state, _| {
            let mut docs: Vec<(u64, DocumentId, String)> = state
                .documents
                .iter()
                .filter(|(_, d)| d.meta.patient_id == patient_id)
                .map(|(id, d)| (d.seq, *id, d.meta.kind.clone()))
                .collect();
            // Creation order is not kept in memory; sequence order is the closest.
            docs.sort_by_key(|(seq, id, _)| (*seq, *id));
            Ok(docs.into_iter().map(|(_, id, kind)| (id, kind)).collect())
        })
    }

    fn replace_sync_failures(
        &self,
        device_id: DeviceId,
        failures: Vec<ReportedFailure>,
    ) -> StorageFuture<'_, bool> {
        self.with(move |_, tables| {
            if failures.iter().any(|f| f.device_id != device_id) {
                return Err(Error::BadRequest(
                    "a report holds another device's failure".into(),
                ));
            }
            let mut failures = failures;
            failures.sort_by_key(|f| f.document_id.as_bytes().to_vec());
            let before = tables.failures.remove(&device_id).unwrap_or_default();
            let unchanged = before.len() == failures.len()
                && before.iter().zip(&failures).all(|(a, b)| a.same_failure(b));
            if !failures.is_empty() {
                tables.failures.insert(device_id, failures);
            }
            Ok(!unchanged)
        })
    }

    fn agency_sync_failures(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<ReportedFailure>> {
        self.with(move |_, tables| {
            let mut out: Vec<ReportedFailure> = tables
                .failures
                .values()
                .flatten()
                .filter(|f| f.agency_id == agency_id)
                .cloned()
                .collect();
            out.sort_by(|a, b| {
                (b.at_ms, &a.device_id, a.document_id.as_bytes()).cmp(&(
                    a.at_ms,
                    &b.device_id,
                    b.document_id.as_bytes(),
                ))
            });
            Ok(out)
        })
    }
}
