//! Index tables, rewritten for one document inside the transaction that writes it, so lists
//! (patients, notes, drafts, conflicts, review items) never load automerge documents and are
//! never out of step with them.

use automerge::{AutoCommit, ChangeHash, ObjType, ROOT};
use rusqlite::{Transaction, params};

use super::documents::LoadedDoc;
use crate::Result;
use crate::model::conflicts::{
    Conflict, conflicts_inside, conflicts_under_field, touched_fields, visible_path,
};
use crate::model::{DocKind, NoteStatus, find_conflicts, get_obj, get_string};
use crate::protocol::DocumentId;

/// Rewrite every index row of document `id` from its current state. Conflict rows are
/// recomputed only where the changes after `indexed` (the heads the index was last refreshed
/// at) wrote, or for the whole document when `indexed` is `None`.
pub(crate) fn refresh(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    indexed: Option<&[ChangeHash]>,
    now_ms: i64,
) -> Result<()> {
    write_rows(tx, id, loaded, Some(indexed), now_ms, None)
}

/// Write the index rows of a document just inserted, in the same transaction: it has none
/// yet, so nothing is deleted first (on a first sync that is thousands of statements).
pub(crate) fn index_new(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    now_ms: i64,
) -> Result<()> {
    write_rows(tx, id, loaded, None, now_ms, None)
}

/// [`index_new`] with the document's conflicts already found (`find_conflicts` of this very
/// document, run before the transaction: a fetched batch walks them on several threads).
pub(crate) fn index_new_with_conflicts(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    now_ms: i64,
    conflicts: &[Conflict],
) -> Result<()> {
    write_rows(tx, id, loaded, None, now_ms, Some(conflicts))
}

/// `indexed`: as [`refresh`]'s; `None`: a new document, without rows to replace, whose
/// conflicts are `found` (walked here when `None`).
fn write_rows(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    indexed: Option<Option<&[ChangeHash]>>,
    now_ms: i64,
    found: Option<&[Conflict]>,
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
    let info = IndexedRoot::read(doc);
    tx.prepare_cached("UPDATE documents SET kind = ?2, patient_id = ?3, agency_id = ?4, updated_at = ?5 WHERE doc_id = ?1")?
        .execute(params![key, info.kind.map(DocKind::as_str), info.patient_id, info.agency_id, now_ms])?;
    if indexed.is_some() {
        tx.prepare_cached("DELETE FROM patients WHERE doc_id = ?1")?
            .execute([key])?;
        tx.prepare_cached("DELETE FROM notes WHERE doc_id = ?1")?
            .execute([key])?;
    }
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
    match indexed {
        Some(Some(before)) if !has_object_conflicts(tx, id)? => {
            if !refresh_conflicts_incrementally(tx, id, doc, before)? {
                refresh_all_conflicts(tx, id, doc)?;
            }
        }
        Some(_) => refresh_all_conflicts(tx, id, doc)?,
        None => match found {
            Some(conflicts) => insert_conflicts(tx, id, conflicts)?,
            None => insert_conflicts(tx, id, &find_conflicts(doc))?,
        },
    }
    Ok(())
}

/// The root fields the index keeps: [`crate::model::root_info`]'s, less the two it does not
/// (each field read is a lookup in the document; on a first sync, thousands of them).
struct IndexedRoot {
    kind: Option<DocKind>,
    patient_id: Option<String>,
    agency_id: Option<String>,
}

impl IndexedRoot {
    fn read(doc: &AutoCommit) -> IndexedRoot {
        IndexedRoot {
            kind: get_string(doc, &ROOT, "kind")
                .as_deref()
                .and_then(DocKind::parse),
            patient_id: get_string(doc, &ROOT, "patientId"),
            agency_id: get_string(doc, &ROOT, "agencyId"),
        }
    }
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

/// Rewrite every conflict row of a document from a full walk.
pub(crate) fn refresh_all_conflicts(
    tx: &Transaction<'_>,
    id: DocumentId,
    doc: &AutoCommit,
) -> Result<()> {
    tx.prepare_cached("DELETE FROM conflicts WHERE doc_id = ?1")?
        .execute([id.as_bytes()])?;
    insert_conflicts(tx, id, &find_conflicts(doc))
}

fn insert_conflicts(tx: &Transaction<'_>, id: DocumentId, conflicts: &[Conflict]) -> Result<()> {
    for c in conflicts {
        tx.prepare_cached("INSERT INTO conflicts (doc_id, path, values_json) VALUES (?1, ?2, ?3)")?
            .execute(params![
                id.as_bytes(),
                c.path,
                serde_json::to_string(&c.values)?
            ])?;
    }
    Ok(())
}

/// Delete the conflict rows at `path` and below it (`below_only`: only below it).
fn delete_under(tx: &Transaction<'_>, id: DocumentId, path: &str, below_only: bool) -> Result<()> {
    let prefix = format!("{path}/");
    tx.prepare_cached(
        "DELETE FROM conflicts WHERE doc_id = ?1
         AND ((?4 = 0 AND path = ?2) OR substr(path, 1, length(?3)) = ?3)",
    )?
    .execute(params![id.as_bytes(), path, prefix, below_only])?;
    Ok(())
}

/// Documents whose conflict rows were written by an older build (values without an `id`, and
/// identical values listed apart): re-walked once at open.
pub(crate) fn documents_with_legacy_conflicts(tx: &Transaction<'_>) -> Result<Vec<DocumentId>> {
    let mut stmt = tx.prepare(
        "SELECT DISTINCT doc_id FROM conflicts WHERE EXISTS
         (SELECT 1 FROM json_each(values_json) WHERE json_extract(value, '$.id') IS NULL)",
    )?;
    let rows = stmt.query_map([], |r| super::doc_id_from_sql(r.get(0)?))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether an indexed conflict of the document is between objects. Changes inside a losing
/// concurrent object produce no visible path, so such documents (rare: containers are created
/// with their parents) are re-walked whole.
fn has_object_conflicts(tx: &Transaction<'_>, id: DocumentId) -> Result<bool> {
    let mut stmt = tx.prepare_cached("SELECT values_json FROM conflicts WHERE doc_id = ?1")?;
    let mut rows = stmt.query([id.as_bytes()])?;
    while let Some(row) = rows.next()? {
        let values: Vec<crate::model::ConflictValue> =
            serde_json::from_str(&row.get::<_, String>(0)?)?;
        if values
            .iter()
            .any(|v| v.value.is_object() || v.value.is_array())
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Re-check conflicts only at the fields (and lists) the changes after `before` wrote.
/// Returns `false` when that is not possible (a touched object is not visible, or a conflict
/// between objects appeared): the caller walks the whole document instead.
fn refresh_conflicts_incrementally(
    tx: &Transaction<'_>,
    id: DocumentId,
    doc: &mut AutoCommit,
    before: &[ChangeHash],
) -> Result<bool> {
    let touched = touched_fields(doc, before);
    let doc = &*doc;
    let mut found = Vec::new();
    for (obj, key) in &touched.fields {
        let Some(mut path) = visible_path(doc, obj) else {
            return Ok(false);
        };
        path.push(key.clone());
        delete_under(tx, id, &path.join("/"), false)?;
        path.pop();
        found.extend(conflicts_under_field(doc, obj, key, &mut path));
    }
    for list in &touched.lists {
        let Some(mut path) = visible_path(doc, list) else {
            return Ok(false);
        };
        delete_under(tx, id, &path.join("/"), true)?;
        found.extend(conflicts_inside(doc, list, ObjType::List, &mut path));
    }
    if found.iter().any(|c| {
        c.values
            .iter()
            .any(|v| v.value.is_object() || v.value.is_array())
    }) {
        return Ok(false);
    }
    // A list re-walk may cover fields also listed as touched: keep one row per path.
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found.dedup_by(|a, b| a.path == b.path);
    for c in &found {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO conflicts (doc_id, path, values_json) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![
            id.as_bytes(),
            c.path,
            serde_json::to_string(&c.values)?
        ])?;
    }
    Ok(true)
}
