//! [`ConsoleStore`] on the PostgreSQL backend (tables of `migrations/postgres/004_console.sql`).

use fieldchart_core::protocol::DocumentId;

use super::{
    PostgresStorage, Tx, USER_COLUMNS, check_user_enabled, doc_id_from, insert_admin_event,
    user_from_row,
};
use crate::console::store::{
    ConsoleSession, ConsoleStore, LoginRecord, PasswordLink, ReportedFailure, UserListing,
};
use crate::error::{Error, Result};
use crate::identity::{AgencyId, DeviceId, Patient, PatientId, UserId};
use crate::notify::FAILURES_CHANNEL;
use crate::storage::{AdminEvent, StorageFuture};

const FAILURE_COLUMNS: &str = "device_id, document_id, agency_id, user_id, patient_id, document_kind, failure, reason, at_ms, attempts, reported_at";

/// The sync failures matching `clause` (with one text parameter `$1`).
async fn failures_where(tx: &Tx<'_>, clause: &str, arg: &str) -> Result<Vec<ReportedFailure>> {
    let rows = tx
        .query(
            &format!("SELECT {FAILURE_COLUMNS} FROM device_sync_failures WHERE {clause}"),
            &[&arg],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let attempts: i64 = r.try_get(9)?;
            Ok(ReportedFailure {
                device_id: DeviceId::new(r.try_get::<_, String>(0)?),
                document_id: doc_id_from(r.try_get(1)?)?,
                agency_id: AgencyId::new(r.try_get::<_, String>(2)?),
                user_id: UserId::new(r.try_get::<_, String>(3)?),
                patient_id: r.try_get::<_, Option<String>>(4)?.map(PatientId::new),
                document_kind: r.try_get(5)?,
                failure: r.try_get(6)?,
                reason: r.try_get(7)?,
                at_ms: r.try_get(8)?,
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                reported_at: r.try_get(10)?,
            })
        })
        .collect()
}

async fn insert_link(tx: &Tx<'_>, link: &PasswordLink) -> Result<()> {
    tx.execute(
        "INSERT INTO console_password_links (token_hash, user_id, created_at, expires_at, created_by)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &link.token_hash.as_slice(),
            &link.user_id.as_str(),
            &link.created_at,
            &link.expires_at,
            &link.created_by,
        ],
    )
    .await?;
    Ok(())
}

/// The user of a usable link (see [`ConsoleStore::password_link_user`]); `lock`: take the
/// link's row lock (redeeming).
async fn link_user(tx: &Tx<'_>, token_hash: &[u8; 32], now_ms: i64, lock: bool) -> Result<UserId> {
    let sql = if lock {
        "SELECT user_id, expires_at, used_at FROM console_password_links WHERE token_hash = $1 FOR UPDATE"
    } else {
        "SELECT user_id, expires_at, used_at FROM console_password_links WHERE token_hash = $1"
    };
    let row = tx.query_opt(sql, &[&token_hash.as_slice()]).await?;
    let Some(row) = row else {
        return Err(Error::NotFound("set-password link"));
    };
    let user_id: String = row.try_get(0)?;
    let expires_at: i64 = row.try_get(1)?;
    let used_at: Option<i64> = row.try_get(2)?;
    match used_at {
        Some(_) => Err(Error::Conflict("the link was already used".into())),
        None if expires_at <= now_ms => Err(Error::Expired("the link")),
        None => Ok(UserId::new(user_id)),
    }
}

impl ConsoleStore for PostgresStorage {
    fn create_login(
        &self,
        user_id: UserId,
        login: String,
        link: PasswordLink,
        event: AdminEvent,
    ) -> StorageFuture<'_, ()> {
        self.tx(move |tx| {
            Box::pin(async move {
                check_user_enabled(tx, &user_id).await?;
                let taken = tx
                    .query_opt(
                        "SELECT 1 FROM console_logins WHERE login = $1 OR user_id = $2",
                        &[&login, &user_id.as_str()],
                    )
                    .await?
                    .is_some();
                if taken {
                    return Err(Error::Conflict(
                        "that sign-in name is taken, or the user already has one".into(),
                    ));
                }
                tx.execute(
                    "INSERT INTO console_logins (user_id, login, created_at) VALUES ($1, $2, $3)",
                    &[&user_id.as_str(), &login, &link.created_at],
                )
                .await?;
                insert_link(tx, &link).await?;
                insert_admin_event(tx, &event).await
            })
        })
    }

    fn insert_password_link(&self, link: PasswordLink, event: AdminEvent) -> StorageFuture<'_, ()> {
        self.tx(move |tx| {
            Box::pin(async move {
                check_user_enabled(tx, &link.user_id).await?;
                let has_login = tx
                    .query_opt(
                        "SELECT 1 FROM console_logins WHERE user_id = $1",
                        &[&link.user_id.as_str()],
                    )
                    .await?
                    .is_some();
                if !has_login {
                    return Err(Error::NotFound("console login"));
                }
                insert_link(tx, &link).await?;
                insert_admin_event(tx, &event).await
            })
        })
    }

    fn login(&self, login: String) -> StorageFuture<'_, Option<LoginRecord>> {
        self.read(move |tx| {
            Box::pin(async move {
                tx.query_opt(
                    "SELECT user_id, login, password_hash FROM console_logins WHERE login = $1",
                    &[&login],
                )
                .await?
                .map(|r| {
                    Ok(LoginRecord {
                        user_id: UserId::new(r.try_get::<_, String>(0)?),
                        login: r.try_get(1)?,
                        password_hash: r.try_get(2)?,
                    })
                })
                .transpose()
            })
        })
    }

    fn password_link_user(&self, token_hash: [u8; 32], now_ms: i64) -> StorageFuture<'_, UserId> {
        self.read(move |tx| {
            Box::pin(async move { link_user(tx, &token_hash, now_ms, false).await })
        })
    }

    fn redeem_password_link(
        &self,
        token_hash: [u8; 32],
        password_hash: String,
        event: AdminEvent,
    ) -> StorageFuture<'_, UserId> {
        self.tx(move |tx| {
            Box::pin(async move {
                let user_id = link_user(tx, &token_hash, event.at_ms, true).await?;
                check_user_enabled(tx, &user_id).await?;
                tx.execute(
                    "UPDATE console_password_links SET used_at = $2 WHERE token_hash = $1",
                    &[&token_hash.as_slice(), &event.at_ms],
                )
                .await?;
                tx.execute(
                    "UPDATE console_logins SET password_hash = $2, password_set_at = $3 WHERE user_id = $1",
                    &[&user_id.as_str(), &password_hash, &event.at_ms],
                )
                .await?;
                tx.execute(
                    "DELETE FROM console_sessions WHERE user_id = $1",
                    &[&user_id.as_str()],
                )
                .await?;
                insert_admin_event(tx, &event).await?;
                Ok(user_id)
            })
        })
    }

    fn insert_session(&self, session: ConsoleSession, event: AdminEvent) -> StorageFuture<'_, ()> {
        self.tx(move |tx| {
            Box::pin(async move {
                check_user_enabled(tx, &session.user_id).await?;
                tx.execute(
                    "INSERT INTO console_sessions (token_hash, id, user_id, csrf, created_at, last_active_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &session.token_hash.as_slice(),
                        &session.id,
                        &session.user_id.as_str(),
                        &session.csrf,
                        &session.created_at,
                        &session.last_active_at,
                        &session.expires_at,
                    ],
                )
                .await?;
                insert_admin_event(tx, &event).await
            })
        })
    }

    fn session(&self, token_hash: [u8; 32]) -> StorageFuture<'_, Option<ConsoleSession>> {
        self.read(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "SELECT token_hash, id, user_id, csrf, created_at, last_active_at, expires_at
                         FROM console_sessions WHERE token_hash = $1",
                        &[&token_hash.as_slice()],
                    )
                    .await?;
                row.map(|r| {
                    Ok(ConsoleSession {
                        token_hash: r.try_get::<_, &[u8]>(0)?.try_into().map_err(|_| {
                            Error::Storage("stored session hash is not 32 bytes".into())
                        })?,
                        id: r.try_get(1)?,
                        user_id: UserId::new(r.try_get::<_, String>(2)?),
                        csrf: r.try_get(3)?,
                        created_at: r.try_get(4)?,
                        last_active_at: r.try_get(5)?,
                        expires_at: r.try_get(6)?,
                    })
                })
                .transpose()
            })
        })
    }

    fn touch_session(&self, token_hash: [u8; 32], at_ms: i64) -> StorageFuture<'_, ()> {
        self.tx(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE console_sessions SET last_active_at = GREATEST(last_active_at, $2) WHERE token_hash = $1",
                    &[&token_hash.as_slice(), &at_ms],
                )
                .await?;
                Ok(())
            })
        })
    }

    fn delete_session(&self, token_hash: [u8; 32]) -> StorageFuture<'_, bool> {
        self.tx(move |tx| {
            Box::pin(async move {
                Ok(tx
                    .execute(
                        "DELETE FROM console_sessions WHERE token_hash = $1",
                        &[&token_hash.as_slice()],
                    )
                    .await?
                    > 0)
            })
        })
    }

    fn delete_user_sessions(&self, user_id: UserId) -> StorageFuture<'_, usize> {
        self.tx(move |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "DELETE FROM console_sessions WHERE user_id = $1",
                        &[&user_id.as_str()],
                    )
                    .await?;
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            })
        })
    }

    fn agency_users(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<UserListing>> {
        self.read(move |tx| {
            Box::pin(async move {
                let columns = USER_COLUMNS
                    .split(", ")
                    .map(|c| format!("u.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {columns}, u.disabled_at, l.login, l.password_hash IS NOT NULL
                             FROM users u LEFT JOIN console_logins l ON l.user_id = u.id
                             WHERE u.agency_id = $1 ORDER BY u.name COLLATE \"C\", u.id COLLATE \"C\""
                        ),
                        &[&agency_id.as_str()],
                    )
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(UserListing {
                            user: user_from_row(r, 0)?,
                            disabled_at: r.try_get(5)?,
                            login: r.try_get(6)?,
                            has_password: r.try_get::<_, Option<bool>>(7)?.unwrap_or(false),
                        })
                    })
                    .collect()
            })
        })
    }

    fn agency_patients(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<Patient>> {
        self.read(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT id, agency_id, chart_document_id, created_at FROM patients
                         WHERE agency_id = $1 ORDER BY created_at, id COLLATE \"C\"",
                        &[&agency_id.as_str()],
                    )
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(Patient {
                            id: PatientId::new(r.try_get::<_, String>(0)?),
                            agency_id: AgencyId::new(r.try_get::<_, String>(1)?),
                            chart_document_id: doc_id_from(r.try_get(2)?)?,
                            created_at: r.try_get(3)?,
                        })
                    })
                    .collect()
            })
        })
    }

    fn care_team(&self, patient_id: PatientId) -> StorageFuture<'_, Vec<UserId>> {
        self.read(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT user_id FROM care_team WHERE patient_id = $1 ORDER BY assigned_at, user_id COLLATE \"C\"",
                        &[&patient_id.as_str()],
                    )
                    .await?;
                rows.iter()
                    .map(|r| Ok(UserId::new(r.try_get::<_, String>(0)?)))
                    .collect()
            })
        })
    }

    fn patient_documents(
        &self,
        patient_id: PatientId,
    ) -> StorageFuture<'_, Vec<(DocumentId, String)>> {
        self.read(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT id, kind FROM documents WHERE patient_id = $1 ORDER BY created_at, id",
                        &[&patient_id.as_str()],
                    )
                    .await?;
                rows.iter()
                    .map(|r| Ok((doc_id_from(r.try_get(0)?)?, r.try_get(1)?)))
                    .collect()
            })
        })
    }

    fn replace_sync_failures(
        &self,
        device_id: DeviceId,
        failures: Vec<ReportedFailure>,
    ) -> StorageFuture<'_, bool> {
        let instance = self.instance().to_owned();
        self.tx(move |tx| {
            Box::pin(async move {
                // Concurrent reports of one device (two relays) serialise on a lock taken
                // first: row locks alone would let two reports of a device with no stored rows
                // yet both insert, and one fail on the primary key.
                tx.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('sync-failures ' || $1, 0))",
                    &[&device_id.as_str()],
                )
                .await?;
                let before = failures_where(
                    tx,
                    "device_id = $1 ORDER BY document_id",
                    device_id.as_str(),
                )
                .await?;
                tx.execute(
                    "DELETE FROM device_sync_failures WHERE device_id = $1",
                    &[&device_id.as_str()],
                )
                .await?;
                let insert = format!(
                    "INSERT INTO device_sync_failures ({FAILURE_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                );
                for f in &failures {
                    if f.device_id != device_id {
                        return Err(Error::BadRequest(
                            "a report holds another device's failure".into(),
                        ));
                    }
                    tx.execute(
                        &insert,
                        &[
                            &f.device_id.as_str(),
                            &f.document_id.as_bytes().as_slice(),
                            &f.agency_id.as_str(),
                            &f.user_id.as_str(),
                            &f.patient_id.as_ref().map(PatientId::as_str),
                            &f.document_kind,
                            &f.failure,
                            &f.reason,
                            &f.at_ms,
                            &i64::from(f.attempts),
                            &f.reported_at,
                        ],
                    )
                    .await?;
                }
                let mut after: Vec<&ReportedFailure> = failures.iter().collect();
                after.sort_by_key(|f| f.document_id.as_bytes().to_vec());
                let unchanged = before.len() == after.len()
                    && before.iter().zip(&after).all(|(a, b)| a.same_failure(b));
                if !unchanged {
                    // Other relays' live console pages reload too (delivered on commit only;
                    // `crate::notify`).
                    let agencies: std::collections::BTreeSet<&str> = before
                        .iter()
                        .chain(&failures)
                        .map(|f| f.agency_id.as_str())
                        .collect();
                    for agency in agencies {
                        tx.execute(
                            "SELECT pg_notify($1, $2)",
                            &[&FAILURES_CHANNEL, &format!("{instance} {agency}")],
                        )
                        .await?;
                    }
                }
                Ok(!unchanged)
            })
        })
    }

    fn agency_sync_failures(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<ReportedFailure>> {
        self.read(move |tx| {
            Box::pin(async move {
                failures_where(
                    tx,
                    "agency_id = $1 ORDER BY at_ms DESC, device_id, document_id",
                    agency_id.as_str(),
                )
                .await
            })
        })
    }
}
