//! Persisting automerge documents as a snapshot plus incremental chunks.
//!
//! Every committed edit appends one chunk (the bytes of the new change) — a small insert, so
//! an edit is durable when its call returns without rewriting the whole document. Compaction
//! folds the chunks into a new snapshot and deletes them in the same transaction, so a crash at
//! any point leaves either the old snapshot + chunks or the new snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use automerge::{AutoCommit, ChangeHash};
use rusqlite::{OptionalExtension, Transaction, params};

use crate::model::signing::RoleOnly;
use crate::model::{DocKind, KeyDirectory, NoteLedger, get_string, load_document};
use crate::protocol::DocumentId;
use crate::{Error, Result};

/// Compact when a document has more chunks than this. Loading replays every chunk, so this
/// bounds load time; each chunk is one change, typically one keystroke.
pub const COMPACT_AFTER_CHUNKS: u64 = 8_192;

/// Compact once the chunks hold more than this many bytes and more than
/// [`COMPACT_CHUNK_BYTES_RATIO`] times the snapshot: keystroke changes stored one by one are
/// uncompressed and much larger than the same history in a snapshot. The ratio keeps the total
/// compaction work linear in the document's history.
pub const COMPACT_MIN_CHUNK_BYTES: u64 = 1024 * 1024;
/// See [`COMPACT_MIN_CHUNK_BYTES`].
pub const COMPACT_CHUNK_BYTES_RATIO: u64 = 4;

/// A document held in memory with its on-disk bookkeeping.
#[derive(Debug)]
pub(crate) struct LoadedDoc {
    pub doc: AutoCommit,
    /// Heads of what is in SQLite: the next chunk holds the changes after these.
    pub saved_heads: Vec<automerge::ChangeHash>,
    /// Chunks written since the snapshot.
    pub chunks: u64,
    /// Bytes in those chunks.
    pub chunk_bytes: u64,
    /// Bytes of the snapshot.
    pub snapshot_bytes: u64,
    /// Heads the conflict index was last refreshed at: the next refresh re-checks only what
    /// the changes after these wrote.
    pub indexed_heads: Vec<automerge::ChangeHash>,
    /// Whether `documents.unsynced` is already 1 on disk.
    pub unsynced: bool,
    /// Last use, for least-recently-used eviction.
    pub last_used: u64,
    /// Whether changes of this document are in the keystroke journal but not yet in SQLite.
    pub journaled: bool,
    /// Cached facts about the document, derived from it; rebuilt whenever it merges foreign
    /// changes (see [`LoadedDoc::refresh_cache`]).
    pub cache: DocCache,
    /// Signatures, tampering and review items read from history (see `model::signing`).
    pub ledger: NoteLedger,
    /// Heads the ledger has looked at; changes after these are observed at the next refresh.
    pub ledger_heads: Vec<ChangeHash>,
    /// The agency's keys the ledger verifies signatures against.
    pub keys: Arc<KeyDirectory>,
    /// Review items created or extended since the index last wrote them.
    pub pending_review: Vec<String>,
}

/// Facts derived from a document that the keystroke path needs on every call.
#[derive(Debug, Default)]
pub(crate) struct DocCache {
    /// `kind` root field.
    pub kind: Option<DocKind>,
    /// Whether the note is signed for good (a signature in its history counts; see
    /// `model::signing`). Body edits are refused.
    pub signed: bool,
    /// Text objects by root key, with their id's display form (journal records name it).
    pub texts: HashMap<&'static str, (automerge::ObjId, String)>,
    /// Text objects known to hold only Basic Multilingual Plane characters, where every UTF-16
    /// offset is a character boundary (checking costs a lookup per offset otherwise).
    pub bmp_only: HashMap<automerge::ObjId, bool>,
}

impl LoadedDoc {
    /// A document that is entirely on disk as of now.
    pub fn new(doc: AutoCommit, unsynced: bool, keys: Arc<KeyDirectory>) -> LoadedDoc {
        let mut doc = doc;
        let saved_heads = doc.get_heads();
        let mut loaded = LoadedDoc {
            doc,
            indexed_heads: saved_heads.clone(),
            saved_heads,
            chunks: 0,
            chunk_bytes: 0,
            snapshot_bytes: 0,
            unsynced,
            last_used: 0,
            journaled: false,
            cache: DocCache::default(),
            ledger: NoteLedger::default(),
            ledger_heads: Vec::new(),
            keys,
            pending_review: Vec::new(),
        };
        loaded.refresh_cache();
        loaded
    }

    /// Whether the chunks should be folded into a new snapshot.
    pub fn needs_compaction(&self) -> bool {
        self.chunks >= COMPACT_AFTER_CHUNKS
            || self.chunk_bytes
                > COMPACT_MIN_CHUNK_BYTES.max(COMPACT_CHUNK_BYTES_RATIO * self.snapshot_bytes)
    }

    /// Recompute the cached facts (after anything but a local text splice).
    pub fn refresh_cache(&mut self) {
        self.update_ledger();
        self.cache = DocCache {
            // Only `kind` (not all of `root_info`): each root field read is a lookup in the
            // document, and this runs for every document imported.
            kind: get_string(&self.doc, &automerge::ROOT, "kind")
                .as_deref()
                .and_then(DocKind::parse),
            signed: self.ledger.is_signed(),
            ..DocCache::default()
        };
    }

    /// Show the ledger the changes it has not seen. A local edit on top of what it saw is the
    /// one change just made (cheap); anything else asks automerge for the changes since.
    pub fn update_ledger(&mut self) {
        let heads = self.doc.get_heads();
        if heads == self.ledger_heads {
            return;
        }
        let changes = match self.doc.get_last_local_change() {
            Some(c) if heads == [c.hash()] && sorted(c.deps()) == self.ledger_heads => vec![c],
            _ => self.doc.get_changes(&self.ledger_heads),
        };
        let observed = self
            .ledger
            .observe(self.doc.document(), &changes, &self.keys, &RoleOnly);
        self.pending_review.extend(observed.touched_items);
        self.ledger_heads = heads;
    }

    /// Rebuild the ledger from the whole history (after the key directory changed).
    pub fn rebuild_ledger(&mut self, keys: Arc<KeyDirectory>) {
        self.keys = keys;
        self.ledger = NoteLedger::default();
        self.ledger_heads.clear();
        self.refresh_cache();
        self.pending_review = self
            .ledger
            .review_items()
            .iter()
            .map(|i| i.change.clone())
            .collect();
    }
}

/// Load a document from its snapshot and chunks.
pub(crate) fn load(
    tx: &Transaction<'_>,
    id: DocumentId,
    author: &automerge::Author<'static>,
    keys: Arc<KeyDirectory>,
) -> Result<LoadedDoc> {
    let row: Option<(Option<Vec<u8>>, bool)> = tx
        .prepare_cached("SELECT snapshot, unsynced FROM documents WHERE doc_id = ?1")?
        .query_row([id.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((snapshot, unsynced)) = row else {
        return Err(Error::DocumentNotFound(id));
    };
    // Concatenate snapshot and chunks and load once: automerge accepts a sequence of chunks,
    // and one load is linear where a `load_incremental` per chunk re-indexes the document each
    // time (a day of keystrokes would take seconds to open).
    let mut all = snapshot.unwrap_or_default();
    let snapshot_bytes = all.len() as u64;
    let mut chunks = 0;
    let mut stmt = tx.prepare_cached("SELECT bytes FROM chunks WHERE doc_id = ?1 ORDER BY id")?;
    let mut rows = stmt.query([id.as_bytes()])?;
    while let Some(row) = rows.next()? {
        let bytes = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
        all.extend_from_slice(bytes);
        chunks += 1;
    }
    let mut doc = load_document(&all).map_err(|e| Error::Corrupt(format!("document {id}: {e}")))?;
    // Everything loaded is on disk already: the next chunk starts from here.
    let saved_heads = doc.get_heads();
    doc.set_author(Some(author.clone()));
    let mut loaded = LoadedDoc::new(doc, unsynced, keys);
    loaded.indexed_heads = saved_heads.clone();
    loaded.saved_heads = saved_heads;
    loaded.chunks = chunks;
    loaded.snapshot_bytes = snapshot_bytes;
    loaded.chunk_bytes = all.len() as u64 - snapshot_bytes;
    Ok(loaded)
}

/// Insert a brand-new document row with a full snapshot.
pub(crate) fn insert_new(
    tx: &Transaction<'_>,
    id: DocumentId,
    doc: &mut AutoCommit,
    now_ms: i64,
    unsynced: bool,
) -> Result<()> {
    let snapshot = doc.save();
    insert_row(tx, id, &snapshot, now_ms, unsynced)
}

fn insert_row(
    tx: &Transaction<'_>,
    id: DocumentId,
    snapshot: &[u8],
    now_ms: i64,
    unsynced: bool,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO documents (doc_id, snapshot, updated_at, unsynced) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id.as_bytes(), snapshot, now_ms, unsynced])?;
    Ok(())
}

/// Store a brand-new document with its index rows, in the caller's transaction.
pub(crate) fn store_new(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    now_ms: i64,
    unsynced: bool,
) -> Result<()> {
    insert_new(tx, id, &mut loaded.doc, now_ms, unsynced)?;
    super::index::index_new(tx, id, loaded, now_ms)
}

/// [`store_new`] for a document that arrived whole as `bytes` and loaded from exactly those
/// bytes (strictly: nothing partial, nothing missing): the bytes are stored as they came, as
/// its snapshot. [`load`] reads any sequence of automerge chunks, so a relay's snapshot plus
/// the chunks after it is as good a snapshot as `save()`'s, and re-encoding the document
/// would cost about as much as loading it. `conflicts` are the document's, as
/// `find_conflicts` found them before the transaction.
pub(crate) fn store_new_as_received(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    bytes: &[u8],
    now_ms: i64,
    conflicts: &[crate::model::conflicts::Conflict],
) -> Result<()> {
    insert_row(tx, id, bytes, now_ms, false)?;
    loaded.snapshot_bytes = bytes.len() as u64;
    super::index::index_new_with_conflicts(tx, id, loaded, now_ms, conflicts)
}

/// Persist changes merged into a loaded document from elsewhere (an import, a sync message):
/// the new chunk, the index and conflict rows, compaction when due — in the caller's
/// transaction — and the cached facts, which foreign changes may alter.
pub(crate) fn store_merged(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    now_ms: i64,
) -> Result<()> {
    loaded.refresh_cache();
    append_chunk(tx, id, loaded)?;
    reindex(tx, id, loaded, now_ms)?;
    if loaded.needs_compaction() {
        compact(tx, id, loaded)?;
    }
    Ok(())
}

/// Refresh the document's index rows (conflicts only where the changes since the last refresh
/// wrote), in the caller's transaction. A rolled-back transaction must drop the document from
/// the cache (every failure path does), so `indexed_heads` never runs ahead of the table.
pub(crate) fn reindex(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    now_ms: i64,
) -> Result<()> {
    let indexed = std::mem::take(&mut loaded.indexed_heads);
    super::index::refresh(tx, id, loaded, Some(&indexed), now_ms)?;
    loaded.indexed_heads = loaded.doc.get_heads();
    Ok(())
}

/// Whether a document exists in the store.
pub(crate) fn exists(tx: &Transaction<'_>, id: DocumentId) -> Result<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM documents WHERE doc_id = ?1")?
        .query_row([id.as_bytes()], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Append the changes made since the last save as one chunk. Returns whether anything was
/// written.
pub(crate) fn append_chunk(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
) -> Result<bool> {
    let bytes = loaded.doc.save_after(&loaded.saved_heads);
    append_bytes(tx, id, loaded, &bytes)
}

/// Append the one change a local edit just committed. Cheaper than [`append_chunk`], whose
/// `save_after` walks the history: this is the per-keystroke path.
pub(crate) fn append_local_change(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
) -> Result<bool> {
    let Some(mut change) = loaded.doc.get_last_local_change() else {
        return Ok(false);
    };
    if loaded.saved_heads != change.deps() {
        // Something else changed the document since the last save: save everything new.
        return append_chunk(tx, id, loaded);
    }
    let bytes = change.bytes().into_owned();
    append_bytes(tx, id, loaded, &bytes)
}

fn append_bytes(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
    bytes: &[u8],
) -> Result<bool> {
    if bytes.is_empty() {
        return Ok(false);
    }
    tx.prepare_cached("INSERT INTO chunks (doc_id, bytes) VALUES (?1, ?2)")?
        .execute(params![id.as_bytes(), bytes])?;
    loaded.saved_heads = loaded.doc.get_heads();
    loaded.chunks += 1;
    loaded.chunk_bytes += bytes.len() as u64;
    Ok(true)
}

/// How to undo a fold in memory if its transaction rolls back.
#[derive(Debug)]
pub(crate) struct FoldUndo {
    pub id: DocumentId,
    saved_heads: Vec<automerge::ChangeHash>,
    chunks: u64,
    chunk_bytes: u64,
}

impl FoldUndo {
    /// Put the document back to "journaled, not in SQLite".
    pub fn restore(self, loaded: &mut LoadedDoc) {
        loaded.saved_heads = self.saved_heads;
        loaded.chunks = self.chunks;
        loaded.chunk_bytes = self.chunk_bytes;
        loaded.journaled = true;
    }
}

/// Write every journaled document's new changes as one chunk each, in the caller's
/// transaction.
pub(crate) fn fold_journaled(
    tx: &Transaction<'_>,
    docs: &mut HashMap<DocumentId, LoadedDoc>,
    undo: &mut Vec<FoldUndo>,
) -> Result<()> {
    for (id, loaded) in docs.iter_mut().filter(|(_, d)| d.journaled) {
        undo.push(FoldUndo {
            id: *id,
            saved_heads: loaded.saved_heads.clone(),
            chunks: loaded.chunks,
            chunk_bytes: loaded.chunk_bytes,
        });
        append_chunk(tx, *id, loaded)?;
        loaded.journaled = false;
        if loaded.needs_compaction() {
            compact(tx, *id, loaded)?;
        }
    }
    Ok(())
}

/// Replace snapshot + chunks with a fresh snapshot, in the caller's transaction.
pub(crate) fn compact(tx: &Transaction<'_>, id: DocumentId, loaded: &mut LoadedDoc) -> Result<()> {
    let snapshot = loaded.doc.save();
    loaded.saved_heads = loaded.doc.get_heads();
    tx.prepare_cached("UPDATE documents SET snapshot = ?2 WHERE doc_id = ?1")?
        .execute(params![id.as_bytes(), snapshot])?;
    tx.prepare_cached("DELETE FROM chunks WHERE doc_id = ?1")?
        .execute([id.as_bytes()])?;
    loaded.chunks = 0;
    loaded.chunk_bytes = 0;
    loaded.snapshot_bytes = snapshot.len() as u64;
    Ok(())
}

/// Mark a document as having local changes the relay has not confirmed.
pub(crate) fn mark_unsynced(
    tx: &Transaction<'_>,
    id: DocumentId,
    loaded: &mut LoadedDoc,
) -> Result<()> {
    if !loaded.unsynced {
        tx.prepare_cached("UPDATE documents SET unsynced = 1 WHERE doc_id = ?1")?
            .execute([id.as_bytes()])?;
        loaded.unsynced = true;
    }
    Ok(())
}

fn sorted(hashes: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut v = hashes.to_vec();
    v.sort();
    v
}
