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

/// A cursor as clients see it: `<seq>` or `<seq>.<documentId>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor(pub FeedCursor);

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.document_id {
            Some(doc) => write!(f, "{}.{doc}", self.0.seq),
            None => write!(f, "{}", self.0.seq),
        }
    }
}

impl FromStr for Cursor {
    type Err = Error;

    fn from_str(s: &str) -> Result<Cursor> {
        let bad = || {
            Error::BadRequest(format!(
                "invalid cursor {:?}",
                s.chars().take(80).collect::<String>()
            ))
        };
        let (seq, doc) = match s.split_once('.') {
            Some((seq, doc)) => (seq, Some(doc.parse::<DocumentId>().map_err(|_| bad())?)),
            None => (s, None),
        };
        Ok(Cursor(FeedCursor {
            seq: seq.parse().map_err(|_| bad())?,
            document_id: doc,
        }))
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
}

/// One page of the caller's change feed.
pub async fn page(
    storage: &dyn Storage,
    principal: &Principal,
    params: &ChangesParams,
) -> Result<ChangesPage> {
    let after = match &params.since {
        Some(since) => since.parse::<Cursor>()?.0,
        None => FeedCursor::default(),
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
        next: Cursor(next).to_string(),
        more: page.more,
    })
}

/// The `/v1/changes` handler.
pub async fn changes(
    principal: Principal,
    State(relay): State<AppState>,
    Query(params): Query<ChangesParams>,
) -> Result<Json<ChangesPage>> {
    Ok(Json(page(relay.storage(), &principal, &params).await?))
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
            Cursor(FeedCursor {
                seq: 42,
                document_id: None,
            }),
            Cursor(FeedCursor {
                seq: 7,
                document_id: Some(DocumentId::random()),
            }),
        ] {
            assert_eq!(cursor.to_string().parse::<Cursor>().expect("parse"), cursor);
        }
        for bad in ["", "x", "-1", "3.", "3.notanid", "1.2.3"] {
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

    #[tokio::test]
    async fn pages_walk_the_caseload_once_and_then_stay_empty() {
        let (s, nurse, patient, ids) = setup(7).await;
        let params = |since: Option<String>| ChangesParams {
            since,
            limit: Some(3),
        };
        let empty = page(&s, &nurse, &params(None)).await.expect("page");
        assert!(empty.changes.is_empty(), "not on the care team yet");
        s.assign(nurse.user_id().clone(), patient, 0)
            .await
            .expect("assign");

        let mut seen = Vec::new();
        let mut since = None;
        for _ in 0..10 {
            let p = page(&s, &nurse, &params(since.clone()))
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
        let after = page(&s, &nurse, &params(since.clone()))
            .await
            .expect("page");
        assert!(after.changes.is_empty() && !after.more);
        assert_eq!(Some(after.next), since, "an empty page keeps the cursor");
    }
}
