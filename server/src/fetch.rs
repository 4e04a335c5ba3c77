//! `POST /v1/documents/fetch`: whole documents, many per request, for a device that does not
//! hold them — a first sync, or new documents on a caseload — instead of one protocol
//! `request` exchange per document over the WebSocket.
//!
//! The body is the binary id list of `fieldchart_core::sync::fetch` (content type
//! [`FETCH_REQUEST_CONTENT_TYPE`]), or, with any other content type, the JSON form
//! `{"documentIds": [...]}` earlier devices send (either way at most [`MAX_FETCH_IDS`] ids,
//! each once); the answer is
//! the binary batch of `fieldchart_core::sync::fetch` (that module documents the framing): per
//! id, in the order asked, the relay's stored bytes (its last snapshot and the chunks after
//! it, as stored: nothing is re-encoded), `unavailable`, or `deferred` once the answer holds
//! [`FETCH_RESPONSE_BUDGET_BYTES`] (at least one document is always sent).
//!
//! The rules are the WebSocket session's for a `request`:
//! - access is decided per document from its stored row, before its bytes are read
//!   ([`crate::access::decide`], the care-team lookup made once per patient per request);
//! - a document the caller may not see is answered exactly as an unknown one (`unavailable`),
//!   and leaves a `deny` row;
//! - every document sent has its `read` row committed before the answer leaves (all rows of a
//!   request in one transaction); if they cannot be stored, nothing is sent.
//!
//! The automerge-repo WebSocket path is unchanged; JS clients never see this endpoint.

use std::collections::{HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, post};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::sync::fetch::{
    FETCH_CONTENT_TYPE, FETCH_REQUEST_CONTENT_TYPE, FETCH_RESPONSE_BUDGET_BYTES,
    FetchResponseWriter, MAX_FETCH_DOC_BYTES, MAX_FETCH_IDS, MAX_FETCH_REQUEST_BYTES,
    decode_fetch_request,
};
use serde::Deserialize;

use crate::access;
use crate::auth::Principal;
use crate::clock::now_ms;
use crate::config::MAX_AUDIT_HEADS;
use crate::error::{Error, Result};
use crate::identity::{PatientId, Role};
use crate::state::AppState;
use crate::storage::{AuditAction, AuditEvent, DocMeta, StoredDocument};

/// The route: `POST`, bodies over [`MAX_FETCH_REQUEST_BYTES`] refused with 413 before they
/// are read.
pub fn route() -> MethodRouter<AppState> {
    post(fetch_documents).layer(DefaultBodyLimit::max(MAX_FETCH_REQUEST_BYTES))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FetchRequest {
    document_ids: Vec<String>,
}

/// What goes into the answer for one id.
enum Planned {
    /// Its bytes are to be read (it may be seen, and fits the budget by its row).
    Load(DocumentId),
    Ok(DocumentId, StoredDocument),
    Unavailable(DocumentId),
    Deferred(DocumentId),
}

/// The ids of a request body, binary or JSON by its content type, or a 400 saying what is
/// wrong (never echoing much of it).
fn parse_request(content_type: Option<&str>, body: &[u8]) -> Result<Vec<DocumentId>> {
    let binary = content_type
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(FETCH_REQUEST_CONTENT_TYPE));
    if binary {
        return decode_fetch_request(body).map_err(|e| Error::BadRequest(e.to_string()));
    }
    parse_json_request(body)
}

/// The JSON form of a request.
fn parse_json_request(body: &[u8]) -> Result<Vec<DocumentId>> {
    let request: FetchRequest = serde_json::from_slice(body).map_err(|e| {
        let mut detail = e.to_string();
        detail.truncate(120);
        Error::BadRequest(format!(
            "the body must be JSON {{\"documentIds\": [\"<id>\", ...]}}: {detail}"
        ))
    })?;
    if request.document_ids.is_empty() {
        return Err(Error::BadRequest("documentIds is empty".into()));
    }
    if request.document_ids.len() > MAX_FETCH_IDS {
        return Err(Error::BadRequest(format!(
            "at most {MAX_FETCH_IDS} documentIds per request (got {})",
            request.document_ids.len()
        )));
    }
    let mut seen = HashSet::with_capacity(request.document_ids.len());
    let mut ids = Vec::with_capacity(request.document_ids.len());
    for (i, text) in request.document_ids.iter().enumerate() {
        let id: DocumentId = text
            .parse()
            .map_err(|_| Error::BadRequest(format!("documentIds[{i}] is not a document id")))?;
        if !seen.insert(id) {
            return Err(Error::BadRequest(format!(
                "documentIds[{i}] repeats an earlier id"
            )));
        }
        ids.push(id);
    }
    Ok(ids)
}

fn stored_bytes(doc: &StoredDocument) -> usize {
    doc.snapshot.as_ref().map_or(0, Vec::len) + doc.chunks.iter().map(Vec::len).sum::<usize>()
}

/// The handler.
pub async fn fetch_documents(
    principal: Principal,
    State(relay): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let ids = parse_request(content_type, &body)?;
    let storage = relay.storage();
    // 1. Every row (who the document belongs to, its size; no bytes).
    let rows = storage.document_rows(ids.clone()).await?;
    // 2. In the order asked: access, then the byte budget by the rows' sizes. Only documents
    // the caller may see are read.
    let mut care_team: HashMap<PatientId, bool> = HashMap::new();
    let mut planned = Vec::with_capacity(ids.len());
    let mut rows_out: Vec<(usize, AuditEvent)> = Vec::new();
    let mut budget_used = 0usize;
    let mut to_load = Vec::new();
    for (i, (id, row)) in ids.iter().copied().zip(rows).enumerate() {
        if !to_load.is_empty() && budget_used >= FETCH_RESPONSE_BUDGET_BYTES {
            planned.push(Planned::Deferred(id));
            continue;
        }
        let Some(row) = row else {
            planned.push(Planned::Unavailable(id));
            continue;
        };
        if !may_access(&relay, &principal, &row.meta, &mut care_team).await? {
            // As the session does for a denied `request`: the caller learns nothing a missing
            // document would not tell, and the attempt is on record.
            let patient =
                (row.meta.agency_id == *principal.agency_id()).then(|| row.meta.patient_id.clone());
            let mut heads = row.heads;
            heads.truncate(MAX_AUDIT_HEADS);
            rows_out.push((
                i,
                event(
                    &principal,
                    id,
                    principal.agency_id().clone(),
                    patient,
                    AuditAction::Deny,
                    heads,
                ),
            ));
            planned.push(Planned::Unavailable(id));
            continue;
        }
        let size = usize::try_from(row.stored_bytes).unwrap_or(usize::MAX);
        if size > MAX_FETCH_DOC_BYTES {
            // Larger than a batch may carry: the device syncs it over the WebSocket.
            planned.push(Planned::Deferred(id));
            continue;
        }
        budget_used = budget_used.saturating_add(size);
        to_load.push(i);
        planned.push(Planned::Load(id));
    }
    // 3. The bytes of those documents.
    let loaded = storage
        .load_documents(to_load.iter().map(|&i| ids[i]).collect())
        .await?;
    // 4. The answer, by the sizes read (a document may have grown since its row was read):
    // the budget again, and a `read` row for each document sent.
    let mut budget_used = 0usize;
    let mut sent_any = false;
    for (i, doc) in to_load.into_iter().zip(loaded) {
        let id = ids[i];
        // Gone since its row was read (another relay process, an offboarding): unknown now.
        let Some(doc) = doc else {
            planned[i] = Planned::Unavailable(id);
            continue;
        };
        let size = stored_bytes(&doc);
        if size > MAX_FETCH_DOC_BYTES || (sent_any && budget_used >= FETCH_RESPONSE_BUDGET_BYTES) {
            planned[i] = Planned::Deferred(id);
            continue;
        }
        budget_used += size;
        sent_any = true;
        rows_out.push((
            i,
            event(
                &principal,
                id,
                doc.meta.agency_id.clone(),
                Some(doc.meta.patient_id.clone()),
                AuditAction::Read,
                doc.heads.clone(),
            ),
        ));
        planned[i] = Planned::Ok(id, doc);
    }
    if !rows_out.is_empty() {
        // In the order asked, as when they were decided one at a time.
        rows_out.sort_by_key(|(i, _)| *i);
        let rows = rows_out.into_iter().map(|(_, row)| row).collect();
        // Durable before anything is sent; if this fails, the caller gets a 500 and no data.
        storage.append_audit(rows).await?;
    }
    let mut answer = FetchResponseWriter::new();
    for item in &planned {
        match item {
            Planned::Ok(id, doc) => {
                let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + doc.chunks.len());
                if let Some(snapshot) = &doc.snapshot {
                    parts.push(snapshot);
                }
                parts.extend(doc.chunks.iter().map(Vec::as_slice));
                answer.ok(*id, &parts);
            }
            Planned::Unavailable(id) => answer.unavailable(*id),
            // (`Load` does not remain: every one was read above.)
            Planned::Deferred(id) | Planned::Load(id) => answer.deferred(*id),
        }
    }
    Ok((
        [
            (CONTENT_TYPE, FETCH_CONTENT_TYPE),
            (CACHE_CONTROL, "no-store"),
        ],
        answer.finish(),
    )
        .into_response())
}

/// [`access::may_access`], with the care-team lookup made once per patient per request.
async fn may_access(
    relay: &AppState,
    principal: &Principal,
    meta: &DocMeta,
    care_team: &mut HashMap<PatientId, bool>,
) -> Result<bool> {
    let on_team = match principal.role() {
        Role::Clinician if meta.agency_id == *principal.agency_id() => {
            match care_team.get(&meta.patient_id) {
                Some(on) => *on,
                None => {
                    let on = relay
                        .storage()
                        .on_care_team(principal.user_id().clone(), meta.patient_id.clone())
                        .await?;
                    care_team.insert(meta.patient_id.clone(), on);
                    on
                }
            }
        }
        _ => false,
    };
    Ok(access::decide(principal, meta, on_team))
}

fn event(
    principal: &Principal,
    id: DocumentId,
    agency_id: crate::identity::AgencyId,
    patient_id: Option<PatientId>,
    action: AuditAction,
    heads: Vec<automerge::ChangeHash>,
) -> AuditEvent {
    AuditEvent {
        at_ms: now_ms(),
        agency_id,
        user_id: principal.user_id().clone(),
        device_id: principal.device_id.clone(),
        document_id: id,
        patient_id,
        action,
        heads,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use automerge::ReadDoc;
    use automerge::transaction::Transactable;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use fieldchart_core::sync::fetch::{FetchRecord, decode_fetch_response};
    use tower::ServiceExt;

    use super::*;
    use crate::config::Limits;
    use crate::identity::{Agency, AgencyId, Device, DeviceId, Patient, User, UserId};
    use crate::storage::{AuditQuery, DocumentData, DocumentWrite, MemoryStorage, Storage};

    struct World {
        storage: Arc<MemoryStorage>,
        token: String,
        nurse: UserId,
        /// On the nurse's caseload.
        mine: Vec<DocumentId>,
        /// Another patient's note, same agency, not on her care team.
        other_patient: DocumentId,
        /// Another agency's note.
        other_agency: DocumentId,
        mine_patient: PatientId,
        other_patient_id: PatientId,
    }

    fn note(agency: &AgencyId, patient: &PatientId, text: &str) -> automerge::Automerge {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "kind", "visit-note").expect("put");
        tx.put(automerge::ROOT, "agencyId", agency.as_str())
            .expect("put");
        tx.put(automerge::ROOT, "patientId", patient.as_str())
            .expect("put");
        tx.put(automerge::ROOT, "narrative", text).expect("put");
        tx.commit();
        doc
    }

    async fn store_doc(
        s: &MemoryStorage,
        doc: &automerge::Automerge,
        create_patient: Option<&Patient>,
    ) -> DocumentId {
        let id = DocumentId::random();
        let patient: PatientId = doc
            .get(automerge::ROOT, "patientId")
            .ok()
            .flatten()
            .and_then(|(v, _)| v.into_string().ok())
            .map(PatientId::new)
            .expect("patientId");
        let agency: AgencyId = doc
            .get(automerge::ROOT, "agencyId")
            .ok()
            .flatten()
            .and_then(|(v, _)| v.into_string().ok())
            .map(AgencyId::new)
            .expect("agencyId");
        let write = DocumentWrite {
            document_id: id,
            meta: DocMeta {
                agency_id: agency,
                patient_id: patient,
                kind: "visit-note".into(),
            },
            create: true,
            data: DocumentData::Snapshot(doc.save()),
            heads: doc.get_heads(),
            audit: None,
        };
        match create_patient {
            Some(p) => {
                let mut p = p.clone();
                p.chart_document_id = id;
                s.insert_patient(p, write).await.expect("patient");
            }
            None => {
                s.write_document(write).await.expect("doc");
            }
        }
        id
    }

    async fn world() -> World {
        let s = Arc::new(MemoryStorage::new());
        let mut agencies = Vec::new();
        for name in ["A", "B"] {
            let id = AgencyId::random();
            s.insert_agency(Agency {
                id: id.clone(),
                name: name.into(),
                created_at: 0,
            })
            .await
            .expect("agency");
            agencies.push(id);
        }
        let nurse = User {
            id: UserId::random(),
            agency_id: agencies[0].clone(),
            name: "N".into(),
            role: Role::Clinician,
            created_at: 0,
        };
        s.insert_user(nurse.clone()).await.expect("user");
        let (token, token_hash) = crate::auth::new_token();
        s.insert_device(Device {
            id: DeviceId::new("dev_phone"),
            user_id: nurse.id.clone(),
            name: "phone".into(),
            token_hash,
            created_at: 0,
            expires_at: i64::MAX,
            revoked_at: None,
        })
        .await
        .expect("device");
        let mut patients = Vec::new();
        for agency in [&agencies[0], &agencies[0], &agencies[1]] {
            let p = Patient {
                id: PatientId::random(),
                agency_id: agency.clone(),
                chart_document_id: DocumentId::random(),
                created_at: 0,
            };
            store_doc(&s, &note(agency, &p.id, "chart"), Some(&p)).await;
            patients.push(p);
        }
        s.assign(nurse.id.clone(), patients[0].id.clone(), 0)
            .await
            .expect("assign");
        let mut mine = Vec::new();
        for i in 0..3 {
            mine.push(
                store_doc(
                    &s,
                    &note(&agencies[0], &patients[0].id, &format!("visit {i}")),
                    None,
                )
                .await,
            );
        }
        let other_patient =
            store_doc(&s, &note(&agencies[0], &patients[1].id, "not hers"), None).await;
        let other_agency =
            store_doc(&s, &note(&agencies[1], &patients[2].id, "elsewhere"), None).await;
        World {
            storage: s,
            token,
            nurse: nurse.id,
            mine,
            other_patient,
            other_agency,
            mine_patient: patients[0].id.clone(),
            other_patient_id: patients[1].id.clone(),
        }
    }

    /// A request as devices send it (the binary id list).
    async fn post(w: &World, token: Option<&str>, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        post_as(w, token, FETCH_REQUEST_CONTENT_TYPE, body).await
    }

    async fn post_as(
        w: &World,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Vec<u8>) {
        let state = crate::AppState::new(w.storage.clone(), Limits::default())
            .await
            .expect("state");
        let mut request = Request::post(fieldchart_core::sync::fetch::FETCH_PATH)
            .header(CONTENT_TYPE, content_type);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = crate::app(state)
            .oneshot(request.body(Body::from(body)).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, bytes.to_vec())
    }

    fn ids_body(ids: &[DocumentId]) -> Vec<u8> {
        fieldchart_core::sync::fetch::fetch_request_body(ids)
    }

    /// The JSON form earlier devices send.
    fn json_body(ids: &[DocumentId]) -> Vec<u8> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        serde_json::json!({ "documentIds": ids })
            .to_string()
            .into_bytes()
    }

    /// A device that still sends JSON gets the same answer as one sending the binary list.
    #[tokio::test]
    async fn the_json_form_of_a_request_is_still_answered_alike() {
        let w = world().await;
        let asked = vec![w.mine[1], w.other_patient, w.mine[0]];
        let (status, binary) = post(&w, Some(&w.token), ids_body(&asked)).await;
        assert_eq!(status, StatusCode::OK);
        for content_type in ["application/json", "application/json; charset=utf-8"] {
            let (status, json) = post_as(&w, Some(&w.token), content_type, json_body(&asked)).await;
            assert_eq!(status, StatusCode::OK, "{content_type}");
            assert_eq!(json, binary, "{content_type}");
        }
        let decoded = decode_fetch_response(&binary, &asked);
        assert_eq!(decoded.error, None);
        assert!(matches!(decoded.records[1], FetchRecord::Unavailable(_)));
    }

    async fn audit(w: &World, patient: &PatientId) -> Vec<(AuditAction, DocumentId)> {
        w.storage
            .query_audit(AuditQuery {
                patient_id: Some(patient.clone()),
                user_id: Some(w.nurse.clone()),
                from_ms: 0,
                to_ms: i64::MAX,
                limit: 100,
            })
            .await
            .expect("audit")
            .into_iter()
            .map(|r| (r.event.action, r.event.document_id))
            .collect()
    }

    #[tokio::test]
    async fn documents_come_whole_and_unauthorised_or_unknown_ids_look_the_same() {
        let w = world().await;
        let unknown = DocumentId::random();
        let asked = vec![
            w.mine[0],
            w.other_patient,
            w.mine[1],
            unknown,
            w.other_agency,
            w.mine[2],
        ];
        let (status, body) = post(&w, Some(&w.token), ids_body(&asked)).await;
        assert_eq!(status, StatusCode::OK);
        let decoded = decode_fetch_response(&body, &asked);
        assert_eq!(decoded.error, None);
        let mut sent = Vec::new();
        for record in &decoded.records {
            match record {
                FetchRecord::Ok(id, bytes) => {
                    let stored = w
                        .storage
                        .load_document(*id)
                        .await
                        .expect("load")
                        .expect("doc");
                    let doc = automerge::Automerge::load(bytes).expect("loads");
                    assert_eq!(doc.get_heads(), stored.heads);
                    sent.push(*id);
                }
                FetchRecord::Unavailable(_) => {}
                FetchRecord::Deferred(id) => panic!("deferred {id}"),
            }
        }
        assert_eq!(sent, w.mine, "hers, in the order asked");
        // No existence oracle: the unknown id and the two she may not see get the same record.
        let unavailable: Vec<_> = decoded
            .records
            .iter()
            .filter(|r| matches!(r, FetchRecord::Unavailable(_)))
            .map(FetchRecord::id)
            .collect();
        assert_eq!(unavailable, vec![w.other_patient, unknown, w.other_agency]);

        // A `read` row per document sent, a `deny` for the one of her agency she may not see.
        let mut reads = audit(&w, &w.mine_patient).await;
        reads.sort_by_key(|(_, id)| *id);
        let mut want: Vec<_> = w.mine.iter().map(|id| (AuditAction::Read, *id)).collect();
        want.sort_by_key(|(_, id)| *id);
        assert_eq!(reads, want);
        assert_eq!(
            audit(&w, &w.other_patient_id).await,
            vec![(AuditAction::Deny, w.other_patient)]
        );
    }

    #[tokio::test]
    async fn bad_requests_get_clear_errors_and_send_nothing() {
        let w = world().await;
        let many: Vec<DocumentId> = (0..=MAX_FETCH_IDS).map(|_| DocumentId::random()).collect();
        let mut cut = ids_body(&w.mine);
        cut.pop();
        let binary: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
            (
                "binary garbage",
                b"\x00\xffnot ids".to_vec(),
                StatusCode::BAD_REQUEST,
                "wrong magic",
            ),
            (
                "binary sent as JSON's body",
                json_body(&w.mine),
                StatusCode::BAD_REQUEST,
                "wrong magic",
            ),
            (
                "binary truncated",
                cut,
                StatusCode::BAD_REQUEST,
                "whole number of 16-byte ids",
            ),
            (
                "binary empty",
                ids_body(&[]),
                StatusCode::BAD_REQUEST,
                "empty",
            ),
            (
                "binary repeated",
                ids_body(&[w.mine[0], w.mine[1], w.mine[0]]),
                StatusCode::BAD_REQUEST,
                "named twice",
            ),
            (
                "binary too many",
                ids_body(&many),
                StatusCode::BAD_REQUEST,
                "at most 500",
            ),
            (
                "binary oversize",
                vec![0; MAX_FETCH_REQUEST_BYTES + 1],
                StatusCode::PAYLOAD_TOO_LARGE,
                "",
            ),
        ];
        for (name, body, want, says) in binary {
            let (status, answer) = post(&w, Some(&w.token), body).await;
            assert_eq!(status, want, "{name}");
            let text = String::from_utf8_lossy(&answer);
            assert!(text.contains(says), "{name}: {text}");
        }
        let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
            (
                "garbage",
                b"\x00\xffnot json".to_vec(),
                StatusCode::BAD_REQUEST,
                "must be JSON",
            ),
            (
                "truncated",
                br#"{"documentIds": ["#.to_vec(),
                StatusCode::BAD_REQUEST,
                "must be JSON",
            ),
            (
                "wrong shape",
                br#"{"ids": []}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "must be JSON",
            ),
            (
                "empty",
                br#"{"documentIds": []}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "empty",
            ),
            (
                "not an id",
                br#"{"documentIds": ["x"]}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "documentIds[0]",
            ),
            (
                "repeated",
                json_body(&[w.mine[0], w.mine[0]]),
                StatusCode::BAD_REQUEST,
                "repeats",
            ),
            (
                "too many",
                json_body(&many),
                StatusCode::BAD_REQUEST,
                "at most 500",
            ),
            (
                "oversize",
                vec![b' '; MAX_FETCH_REQUEST_BYTES + 1],
                StatusCode::PAYLOAD_TOO_LARGE,
                "",
            ),
        ];
        for (name, body, want, says) in cases {
            let (status, answer) = post_as(&w, Some(&w.token), "application/json", body).await;
            assert_eq!(status, want, "{name}");
            let text = String::from_utf8_lossy(&answer);
            assert!(text.contains(says), "{name}: {text}");
        }
        let (status, _) = post(&w, None, ids_body(&w.mine)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = post(&w, Some("fct_0000"), ids_body(&w.mine)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            audit(&w, &w.mine_patient).await.is_empty(),
            "nothing sent, nothing recorded"
        );
    }
}
