//! Index tables, rewritten for one document inside the transaction that writes it, so lists
//! (patients, notes, drafts, conflicts, review items) never load automerge documents and are
//! never out of step with them.

use automerge::ROOT;
use rusqlite::{Transaction, params};

use super::documents::LoadedDoc;
use crate::Result;
use crate::model::{DocKind, NoteStatus, find_conflicts, get_obj, get_string, root_info};
use crate::protocol::DocumentId;

/// Rewrite every index row of document `id` from its current state.
pub(crate) fn refresh(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    now_ms: i64,
) -> Result<()> {
    let key = id.as_bytes();
    let signed_at = loaded
        .ledger
        .signature()
        .and_then(|e| e.payload.as_ref())
        .map(|p| p.signed_at_ms);
    let signed = loaded.ledger.is_signed();
    write_review_items(tx, id, loaded)?;
    let doc = &mut loaded.doc;
    let info = root_info(doc);
    tx.prepare_cached("UPDATE documents SET kind = ?2, patient_id = ?3, agency_id = ?4, updated_at = ?5 WHERE doc_id = ?1")?
        .execute(params![key, info.kind.map(DocKind::as_str), info.patient_id, info.agency_id, now_ms])?;
    tx.prepare_cached("DELETE FROM patients WHERE doc_id = ?1")?
        .execute([key])?;
    tx.prepare_cached("DELETE FROM notes WHERE doc_id = ?1")?
        .execute([key])?;
    match (info.kind, &info.patient_id) {
        (Some(DocKind::Patient), Some(patient)) => {
            let name =
                get_obj(doc, &ROOT, "demographics").and_then(|d| get_string(doc, &d, "name"));
            tx.prepare_cached("INSERT INTO patients (patient_id, doc_id, agency_id, name) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![patient, key, info.agency_id.unwrap_or_default(), name])?;
        }
        (Some(DocKind::VisitNote), Some(patient)) => {
            let evv = get_obj(doc, &ROOT, "evv");
            let evv_str = |k: &str| evv.as_ref().and_then(|e| get_string(doc, e, k));
            let status = if signed {
                NoteStatus::Signed
            } else {
                NoteStatus::Draft
            };
            tx.prepare_cached(
                "INSERT INTO notes (doc_id, patient_id, visit_date, status, clinician_id, service_type, started_at, signed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                key,
                patient,
                evv_str("date"),
                status.as_str(),
                evv_str("clinicianId"),
                evv_str("serviceType"),
                evv.as_ref().and_then(|e| crate::model::get_i64(doc, e, "startedAt")),
                signed_at,
            ])?;
        }
        _ => {}
    }
    tx.prepare_cached("DELETE FROM conflicts WHERE doc_id = ?1")?
        .execute([key])?;
    for c in find_conflicts(doc) {
        tx.prepare_cached("INSERT INTO conflicts (doc_id, path, values_json) VALUES (?1, ?2, ?3)")?
            .execute(params![key, c.path, serde_json::to_string(&c.values)?])?;
    }
    Ok(())
}

/// Write the review items the ledger created or extended since the last write: a burst of
/// changes updates one row, so the cost follows the new changes, not the note's history.
fn write_review_items(tx: &Transaction<'_>, id: DocumentId, loaded: &mut LoadedDoc) -> Result<()> {
    let mut touched = std::mem::take(&mut loaded.pending_review);
    touched.sort();
    touched.dedup();
    for change in touched {
        if let Some(item) = loaded.ledger.review_item(&change) {
            tx.prepare_cached(
                "INSERT INTO review_items (doc_id, change, item_json) VALUES (?1, ?2, ?3)
                 ON CONFLICT (doc_id, change) DO UPDATE SET item_json = excluded.item_json",
            )?
            .execute(params![
                id.as_bytes(),
                item.id,
                serde_json::to_string(item)?
            ])?;
        }
    }
    Ok(())
}
