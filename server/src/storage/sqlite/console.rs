//! [`ConsoleStore`] on the SQLite backend (tables of `migrations/004_console.sql` and
//! `migrations/005_sync_failures.sql`).

use fieldchart_core::protocol::DocumentId;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{SqliteStorage, check_user_enabled, doc_id_from, insert_admin_event, user_from_row};
use crate::console::store::{
    ConsoleSession, ConsoleStore, LoginRecord, PasswordLink, ReportedFailure, UserListing,
};
use crate::error::{Error, Result};
use crate::identity::{AgencyId, DeviceId, Patient, PatientId, UserId};
use crate::storage::{AdminEvent, StorageFuture};

fn insert_link(tx: &Transaction<'_>, link: &PasswordLink) -> Result<()> {
    tx.execute(
        "INSERT INTO console_password_links (token_hash, user_id, created_at, expires_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            link.token_hash.as_slice(),
            link.user_id.as_str(),
            link.created_at,
            link.expires_at,
            link.created_by
        ],
    )?;
    Ok(())
}

/// The user of a usable link (see [`ConsoleStore::password_link_user`]).
fn link_user(tx: &Transaction<'_>, token_hash: &[u8; 32], now_ms: i64) -> Result<UserId> {
    let row: Option<(String, i64, Option<i64>)> = tx
        .query_row(
            "SELECT user_id, expires_at, used_at FROM console_password_links WHERE token_hash = ?1",
            [token_hash.as_slice()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    match row {
        None => Err(Error::NotFound("set-password link")),
        Some((_, _, Some(_))) => Err(Error::Conflict("the link was already used".into())),
        Some((_, expires_at, None)) if expires_at <= now_ms => Err(Error::Expired("the link")),
        Some((user_id, _, None)) => Ok(UserId::new(user_id)),
    }
}

fn session_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Vec<u8>, ConsoleSessionRow)> {
    Ok((
        r.get(0)?,
        (
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ),
    ))
}

type ConsoleSessionRow = (String, String, String, i64, i64, i64);

const FAILURE_COLUMNS: &str = "device_id, document_id, agency_id, user_id, patient_id, document_kind, failure, reason, at_ms, attempts, reported_at";

fn failures_where(tx: &Transaction<'_>, clause: &str, arg: &str) -> Result<Vec<ReportedFailure>> {
    let mut stmt = tx.prepare(&format!(
        "SELECT {FAILURE_COLUMNS} FROM device_sync_failures WHERE {clause}"
    ))?;
    let rows = stmt.query_map([arg], |r| {
        Ok((
            (
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
            ),
            (
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, i64>(10)?,
            ),
        ))
    })?;
    rows.map(|row| {
        let (
            (device, doc, agency, user, patient, kind),
            (failure, reason, at_ms, attempts, reported_at),
        ) = row?;
        Ok(ReportedFailure {
            device_id: DeviceId::new(device),
            user_id: UserId::new(user),
            agency_id: AgencyId::new(agency),
            document_id: doc_id_from(&doc)?,
            patient_id: patient.map(PatientId::new),
            document_kind: kind,
            failure,
            reason,
            at_ms,
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            reported_at,
        })
    })
    .collect()
}

impl ConsoleStore for SqliteStorage {
    fn create_login(
        &self,
        user_id: UserId,
        login: String,
        link: PasswordLink,
        event: AdminEvent,
    ) -> StorageFuture<'_, ()> {
        self.write(move |tx| {
            check_user_enabled(tx, &user_id)?;
            let taken = tx
                .query_row(
                    "SELECT 1 FROM console_logins WHERE login = ?1 OR user_id = ?2",
                    params![login, user_id.as_str()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if taken {
                return Err(Error::Conflict(
                    "that sign-in name is taken, or the user already has one".into(),
                ));
            }
            tx.execute(
                "INSERT INTO console_logins (user_id, login, created_at) VALUES (?1, ?2, ?3)",
                params![user_id.as_str(), login, link.created_at],
            )?;
            insert_link(tx, &link)?;
            insert_admin_event(tx, &event)
        })
    }

    fn insert_password_link(&self, link: PasswordLink, event: AdminEvent) -> StorageFuture<'_, ()> {
        self.write(move |tx| {
            check_user_enabled(tx, &link.user_id)?;
            let has_login = tx
                .query_row(
                    "SELECT 1 FROM console_logins WHERE user_id = ?1",
                    [link.user_id.as_str()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !has_login {
                return Err(Error::NotFound("console login"));
            }
            insert_link(tx, &link)?;
            insert_admin_event(tx, &event)
        })
    }

    fn login(&self, login: String) -> StorageFuture<'_, Option<LoginRecord>> {
        self.read(move |tx| {
            Ok(tx
                .query_row(
                    "SELECT user_id, login, password_hash FROM console_logins WHERE login = ?1",
                    [login],
                    |r| {
                        Ok(LoginRecord {
                            user_id: UserId::new(r.get::<_, String>(0)?),
                            login: r.get(1)?,
                            password_hash: r.get(2)?,
                        })
                    },
                )
                .optional()?)
        })
    }

    fn password_link_user(&self, token_hash: [u8; 32], now_ms: i64) -> StorageFuture<'_, UserId> {
        self.read(move |tx| link_user(tx, &token_hash, now_ms))
    }

    fn redeem_password_link(
        &self,
        token_hash: [u8; 32],
        password_hash: String,
        event: AdminEvent,
    ) -> StorageFuture<'_, UserId> {
        self.write(move |tx| {
            let user_id = link_user(tx, &token_hash, event.at_ms)?;
            check_user_enabled(tx, &user_id)?;
            tx.execute(
                "UPDATE console_password_links SET used_at = ?2 WHERE token_hash = ?1",
                params![token_hash.as_slice(), event.at_ms],
            )?;
            tx.execute(
                "UPDATE console_logins SET password_hash = ?2, password_set_at = ?3 WHERE user_id = ?1",
                params![user_id.as_str(), password_hash, event.at_ms],
            )?;
            tx.execute(
                "DELETE FROM console_sessions WHERE user_id = ?1",
                [user_id.as_str()],
            )?;
            insert_admin_event(tx, &event)?;
            Ok(user_id)
        })
    }

    fn insert_session(&self, session: ConsoleSession, event: AdminEvent) -> StorageFuture<'_, ()> {
        self.write(move |tx| {
            check_user_enabled(tx, &session.user_id)?;
            tx.execute(
                "INSERT INTO console_sessions (token_hash, id, user_id, csrf, created_at, last_active_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    session.token_hash.as_slice(),
                    session.id,
                    session.user_id.as_str(),
                    session.csrf,
                    session.created_at,
                    session.last_active_at,
                    session.expires_at
                ],
            )?;
            insert_admin_event(tx, &event)
        })
    }

    fn session(&self, token_hash: [u8; 32]) -> StorageFuture<'_, Option<ConsoleSession>> {
        self.read(move |tx| {
            let row = tx
                .query_row(
                    "SELECT token_hash, id, user_id, csrf, created_at, last_active_at, expires_at
                     FROM console_sessions WHERE token_hash = ?1",
                    [token_hash.as_slice()],
                    session_from_row,
                )
                .optional()?;
            row.map(
                |(hash, (id, user_id, csrf, created_at, last_active_at, expires_at))| {
                    Ok(ConsoleSession {
                        token_hash: hash.as_slice().try_into().map_err(|_| {
                            Error::Storage("stored session hash is not 32 bytes".into())
                        })?,
                        id,
                        user_id: UserId::new(user_id),
                        csrf,
                        created_at,
                        last_active_at,
                        expires_at,
                    })
                },
            )
            .transpose()
        })
    }

    fn touch_session(&self, token_hash: [u8; 32], at_ms: i64) -> StorageFuture<'_, ()> {
        self.write(move |tx| {
            tx.execute(
                "UPDATE console_sessions SET last_active_at = max(last_active_at, ?2) WHERE token_hash = ?1",
                params![token_hash.as_slice(), at_ms],
            )?;
            Ok(())
        })
    }

    fn delete_session(&self, token_hash: [u8; 32]) -> StorageFuture<'_, bool> {
        self.write(move |tx| {
            Ok(tx.execute(
                "DELETE FROM console_sessions WHERE token_hash = ?1",
                [token_hash.as_slice()],
            )? > 0)
        })
    }

    fn delete_user_sessions(&self, user_id: UserId) -> StorageFuture<'_, usize> {
        self.write(move |tx| {
            Ok(tx.execute(
                "DELETE FROM console_sessions WHERE user_id = ?1",
                [user_id.as_str()],
            )?)
        })
    }

    fn agency_users(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<UserListing>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare(
                "SELECT u.id, u.agency_id, u.name, u.role, u.created_at, u.disabled_at,
                        l.login, l.password_hash IS NOT NULL
                 FROM users u LEFT JOIN console_logins l ON l.user_id = u.id
                 WHERE u.agency_id = ?1 ORDER BY u.name, u.id",
            )?;
            let rows = stmt.query_map([agency_id.as_str()], |r| {
                Ok((
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?),
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<bool>>(7)?,
                ))
            })?;
            rows.map(|row| {
                let (user, disabled_at, login, has_password) = row?;
                Ok(UserListing {
                    user: user_from_row(user)?,
                    disabled_at,
                    login,
                    has_password: has_password.unwrap_or(false),
                })
            })
            .collect()
        })
    }

    fn agency_patients(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<Patient>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare(
                "SELECT id, agency_id, chart_document_id, created_at FROM patients
                 WHERE agency_id = ?1 ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([agency_id.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            rows.map(|row| {
                let (id, agency_id, doc, created_at) = row?;
                Ok(Patient {
                    id: PatientId::new(id),
                    agency_id: AgencyId::new(agency_id),
                    chart_document_id: doc_id_from(&doc)?,
                    created_at,
                })
            })
            .collect()
        })
    }

    fn care_team(&self, patient_id: PatientId) -> StorageFuture<'_, Vec<UserId>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare(
                "SELECT user_id FROM care_team WHERE patient_id = ?1 ORDER BY assigned_at, user_id",
            )?;
            let rows = stmt.query_map([patient_id.as_str()], |r| r.get::<_, String>(0))?;
            rows.map(|r| Ok(UserId::new(r?))).collect()
        })
    }

    fn patient_documents(
        &self,
        patient_id: PatientId,
    ) -> StorageFuture<'_, Vec<(DocumentId, String)>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare(
                "SELECT id, kind FROM documents WHERE patient_id = ?1 ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([patient_id.as_str()], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
            })?;
            rows.map(|row| {
                let (id, kind) = row?;
                Ok((doc_id_from(&id)?, kind))
            })
            .collect()
        })
    }

    fn replace_sync_failures(
        &self,
        device_id: DeviceId,
        failures: Vec<ReportedFailure>,
    ) -> StorageFuture<'_, bool> {
        self.write(move |tx| {
            let before = failures_where(
                tx,
                "device_id = ?1 ORDER BY document_id",
                device_id.as_str(),
            )?;
            tx.execute(
                "DELETE FROM device_sync_failures WHERE device_id = ?1",
                [device_id.as_str()],
            )?;
            let mut stmt = tx.prepare(&format!(
                "INSERT INTO device_sync_failures ({FAILURE_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))?;
            for f in &failures {
                if f.device_id != device_id {
                    return Err(Error::BadRequest(
                        "a report holds another device's failure".into(),
                    ));
                }
                stmt.execute(params![
                    f.device_id.as_str(),
                    f.document_id.as_bytes().as_slice(),
                    f.agency_id.as_str(),
                    f.user_id.as_str(),
                    f.patient_id.as_ref().map(PatientId::as_str),
                    f.document_kind,
                    f.failure,
                    f.reason,
                    f.at_ms,
                    i64::from(f.attempts),
                    f.reported_at,
                ])?;
            }
            let mut after: Vec<&ReportedFailure> = failures.iter().collect();
            after.sort_by_key(|f| f.document_id.as_bytes().to_vec());
            let unchanged = before.len() == after.len()
                && before.iter().zip(&after).all(|(a, b)| a.same_failure(b));
            Ok(!unchanged)
        })
    }

    fn agency_sync_failures(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<ReportedFailure>> {
        self.read(move |tx| {
            failures_where(
                tx,
                "agency_id = ?1 ORDER BY at_ms DESC, device_id, document_id",
                agency_id.as_str(),
            )
        })
    }
}
