//! `GET /v1/changes?since=CURSOR&limit=N`: which of the documents the caller may see changed
//! since a cursor.
//!
//! A device that reconnects with thousands of documents asks this first and then syncs only
//! the documents listed (plus its own local changes), instead of one protocol round trip per
//! document. Without a cursor the answer is the caller's whole caseload.
//!
//! Entries are ordered by the relay-wide sequence ([`crate::storage::Seq`]): a document appears
//! when its stored heads change, and, for a clinician, when she is assigned to its patient (all
//! of that patient's documents then appear after her current cursor, even old ones). The cursor
//! is opaque to clients; it encodes the position of the last entry returned.
//!
//! # Epochs: a relay restored from a backup
//! Every cursor carries the relay's epoch ([`crate::state::Relay::epoch`], new at every
//! start; a restored or replaced database can only be served after a start). The feed answers
//! every request with its epoch and never echoes a cursor it did not issue: a cursor of another
//! epoch (or without one), or one past the relay's current sequence (its database went back),
//! gets `reset: true` and the caller's whole caseload from the beginning, with a cursor of the
//! current epoch. A device seeing `reset` treats the relay as possibly behind: it compares the
//! heads of every document it holds with the listing, pushes what the relay lacks and
//! withdraws receipts the relay cannot back (`fieldchart_core::sync`).

use std::fmt;
use std::str::FromStr;

use axum::Json;
use axum::extract::{Query, State};
use fieldchart_core::protocol::{DocumentId, encode_heads};
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::config::{DEFAULT_FEED_PAGE, MAX_FEED_PAGE};
use crate::error::{Error, Result};
use crate::identity::Role;
use crate::state::AppState;
use crate::storage::{FeedCursor, FeedQuery, FeedScope, Storage};

/// A cursor as clients see it: `<epoch>_<seq>` or `<epoch>_<seq>.<documentId>` (`epoch`: 16
/// lowercase hex digits). Cursors of relays before epochs (`<seq>[.<documentId>]`) still
/// parse, without an epoch, and are answered with a reset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    /// The epoch that issued it, if it has one.
    pub epoch: Option<String>,
    /// The position.
    pub at: FeedCursor,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(epoch) = &self.epoch {
            write!(f, "{epoch}_")?;
        }
        match self.at.document_id {
            Some(doc) => write!(f, "{}.{doc}", self.at.seq),
            None => write!(f, "{}", self.at.seq),
        }
    }
}

/// Length of an epoch in a cursor, hex digits.
const EPOCH_DIGITS: usize = 16;

impl FromStr for Cursor {
    type Err = Error;

    fn from_str(s: &str) -> Result<Cursor> {
        let bad = || {
            Error::BadRequest(format!(
                "invalid cursor {:?}",
                s.chars().take(80).collect::<String>()
            ))
        };
        let (epoch, rest) = match s.split_once('_') {
            Some((epoch, rest)) => {
                if epoch.len() != EPOCH_DIGITS
                    || !epoch
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                {
                    return Err(bad());
                }
                (Some(epoch.to_owned()), rest)
            }
            None => (None, s),
        };
        let (seq, doc) = match rest.split_once('.') {
            Some((seq, doc)) => (seq, Some(doc.parse::<DocumentId>().map_err(|_| bad())?)),
            None => (rest, None),
        };
        // Digits only: `u64::from_str` would also take a leading `+`.
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Cursor {
            epoch,
            at: FeedCursor {
                seq: seq.parse().map_err(|_| bad())?,
                document_id: doc,
            },
        })
    }
}

/// Query parameters of `/v1/changes`.
#[derive(Debug, Default, Deserialize)]
pub struct ChangesParams {
    /// The `next` of a previous answer; absent for the whole caseload.
    pub since: Option<String>,
    /// Page size (default [`DEFAULT_FEED_PAGE`], at most [`MAX_FEED_PAGE`]).
    pub limit: Option<usize>,
}

/// One changed document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// The document id (bs58check, as in `automerge:` URLs).
    pub document_id: String,
    /// Root `kind`.
    pub kind: String,
    /// Root `patientId`.
    pub patient_id: String,
    /// Stored heads, bs58check: what the relay holds durably.
    pub heads: Vec<String>,
}

/// The answer of `/v1/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangesPage {
    /// Changed documents, oldest change first.
    pub changes: Vec<Change>,
    /// The cursor to pass as `since` next time.
    pub next: String,
    /// More entries are waiting: ask again with `next` right away.
    pub more: bool,
    /// The relay's current epoch (see the module docs).
    pub epoch: String,
    /// The `since` cursor was not issued by this epoch, or is past the relay's sequence: this
    /// page starts the caller's whole caseload from the beginning, and the caller should
    /// reconcile everything it holds against it.
    pub reset: bool,
}

/// One page of the caller's change feed.
pub async fn page(
    storage: &dyn Storage,
    epoch: &str,
    principal: &Principal,
    params: &ChangesParams,
) -> Result<ChangesPage> {
    let (after, reset) = match &params.since {
        Some(since) => {
            let cursor = since.parse::<Cursor>()?;
            if cursor.epoch.as_deref() != Some(epoch)
                || cursor.at.seq > storage.current_seq().await?
            {
                (FeedCursor::default(), true)
            } else {
                (cursor.at, false)
            }
        }
        None => (FeedCursor::default(), false),
    };
    let limit = params
        .limit
        .unwrap_or(DEFAULT_FEED_PAGE)
        .clamp(1, MAX_FEED_PAGE);
    let scope = match principal.role() {
        Role::Clinician => FeedScope::CareTeam {
            agency_id: principal.agency_id().clone(),
            user_id: principal.user_id().clone(),
        },
        Role::Office | Role::Admin => FeedScope::Agency(principal.agency_id().clone()),
    };
    let page = storage
        .changes(FeedQuery {
            scope,
            after,
            limit,
        })
        .await?;
    let next = page
        .entries
        .last()
        .map(|e| FeedCursor {
            seq: e.seq,
            document_id: Some(e.document_id),
        })
        .unwrap_or(after);
    Ok(ChangesPage {
        changes: page
            .entries
            .into_iter()
            .map(|e| Change {
                document_id: e.document_id.to_string(),
                kind: e.meta.kind,
                patient_id: e.meta.patient_id.to_string(),
                heads: encode_heads(&e.heads),
            })
            .collect(),
        next: Cursor {
            epoch: Some(epoch.to_owned()),
            at: next,
        }
        .to_string(),
        more: page.more,
        epoch: epoch.to_owned(),
        reset,
    })
}

/// The `/v1/changes` handler.
pub async fn changes(
    principal: Principal,
    State(relay): State<AppState>,
    Query(params): Query<ChangesParams>,
) -> Result<Json<ChangesPage>> {
    Ok(Json(
        page(relay.storage(), relay.epoch(), &principal, &params).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Agency, AgencyId, DeviceId, Patient, PatientId, User, UserId};
    use crate::storage::{DocMeta, DocumentData, DocumentWrite, MemoryStorage};

    #[test]
    fn cursors_round_trip_and_garbage_is_a_bad_request() {
        for cursor in [
            Cursor::default(),
            Cursor {
                epoch: None,
                at: FeedCursor {
                    seq: 42,
                    document_id: None,
                },
            },
            Cursor {
                epoch: Some(EPOCH.into()),
                at: FeedCursor {
                    seq: 7,
                    document_id: Some(DocumentId::random()),
                },
            },
        ] {
            assert_eq!(cursor.to_string().parse::<Cursor>().expect("parse"), cursor);
        }
        for bad in [
            "",
            "x",
            "-1",
            "+1",
            "3.",
            "3.notanid",
            "1.2.3",
            "_3",
            "0123_3",
            "0123456789ABCDEF_3",
            "0123456789abcdef_",
            "0123456789abcdef_x",
            "0123456789abcdef_1_2",
        ] {
            assert!(
                matches!(bad.parse::<Cursor>(), Err(Error::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    async fn setup(docs: usize) -> (MemoryStorage, Principal, PatientId, Vec<DocumentId>) {
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
            agency_id: agency.clone(),
            name: "N".into(),
            role: Role::Clinician,
            created_at: 0,
        };
        s.insert_user(user.clone()).await.expect("user");
        let patient = PatientId::random();
        let meta = DocMeta {
            agency_id: agency.clone(),
            patient_id: patient.clone(),
            kind: "visit-note".into(),
        };
        let write = |id| DocumentWrite {
            document_id: id,
            meta: meta.clone(),
            create: true,
            data: DocumentData::Snapshot(automerge::Automerge::new().save()),
            heads: vec![],
            audit: None,
        };
        let chart = DocumentId::random();
        s.insert_patient(
            Patient {
                id: patient.clone(),
                agency_id: agency,
                chart_document_id: chart,
                created_at: 0,
            },
            write(chart),
        )
        .await
        .expect("patient");
        let mut ids = vec![chart];
        for _ in 1..docs {
            let id = DocumentId::random();
            s.write_document(write(id)).await.expect("doc");
            ids.push(id);
        }
        let principal = Principal {
            user,
            device_id: DeviceId::new("dev_1"),
            expires_at: i64::MAX,
        };
        (s, principal, patient, ids)
    }

    const EPOCH: &str = "0123456789abcdef";

    #[tokio::test]
    async fn pages_walk_the_caseload_once_and_then_stay_empty() {
        let (s, nurse, patient, ids) = setup(7).await;
        let params = |since: Option<String>| ChangesParams {
            since,
            limit: Some(3),
        };
        let empty = page(&s, EPOCH, &nurse, &params(None)).await.expect("page");
        assert!(empty.changes.is_empty(), "not on the care team yet");
        s.assign(nurse.user_id().clone(), patient, 0)
            .await
            .expect("assign");

        let mut seen = Vec::new();
        let mut since = None;
        for _ in 0..10 {
            let p = page(&s, EPOCH, &nurse, &params(since.clone()))
                .await
                .expect("page");
            assert!(p.changes.len() <= 3);
            seen.extend(p.changes.iter().map(|c| c.document_id.clone()));
            since = Some(p.next);
            if !p.more {
                break;
            }
        }
        let mut expected: Vec<String> = ids.iter().map(ToString::to_string).collect();
        expected.sort();
        seen.sort();
        assert_eq!(seen, expected);
        let after = page(&s, EPOCH, &nurse, &params(since.clone()))
            .await
            .expect("page");
        assert!(after.changes.is_empty() && !after.more && !after.reset);
        assert_eq!(after.epoch, EPOCH);
        assert_eq!(Some(after.next), since, "an empty page keeps the cursor");

        // The same cursor, shown to a relay of another epoch (restarted, maybe restored): no
        // echo; the whole caseload again, flagged as a reset, with a cursor of that epoch.
        let other = "fedcba9876543210";
        let restored = page(&s, other, &nurse, &params(since.clone()))
            .await
            .expect("page");
        assert!(restored.reset);
        assert_eq!(restored.changes.len(), 3);
        assert!(
            restored.next.starts_with("fedcba9876543210_"),
            "{}",
            restored.next
        );
        // A cursor of this epoch but past the relay's sequence (a database that went back).
        let future = format!("{EPOCH}_{}", s.current_seq().await.expect("seq") + 1);
        let p = page(&s, EPOCH, &nurse, &params(Some(future)))
            .await
            .expect("page");
        assert!(p.reset && p.changes.len() == 3);
        // A cursor from before epochs.
        let p = page(&s, EPOCH, &nurse, &params(Some("1".into())))
            .await
            .expect("page");
        assert!(p.reset);
    }
}
