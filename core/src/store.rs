//! The device store: encrypted SQLite holding automerge documents, index tables, sync state and
//! the local audit log.
//!
//! Every mutating call runs one SQLite transaction holding the automerge change, the index
//! rows and the audit row; when the call returns, the transaction has committed. With WAL and
//! `synchronous = NORMAL` a committed transaction survives the process being killed at any
//! instant (it is in the WAL, in the OS page cache); records that must also survive power
//! loss — signatures, finished visits, vitals, imports — commit with `synchronous = FULL`,
//! which also flushes every keystroke committed before them. See the README's "Decisions".
//!
//! The store keeps exactly one connection (the only writer) behind a mutex, and a bounded cache
//! of loaded documents. One file is used by one `Store` at a time, across threads and
//! processes: `open` takes an exclusive OS advisory lock on `<path>-lock` and a second open
//! fails with [`Error::StoreInUse`]; `close` releases it (iOS terminates suspended apps that
//! hold file locks), and the OS releases it when a process dies.
//!
//! Keystrokes in the journal survive any later failure: a document dropped from the cache while
//! it holds journaled splices (a refused sync message, a failed write) has them replayed from
//! the journal file, and the journal is emptied only once SQLite holds every record.
//!
//! Audit: changes that must be accountable (signing, resolving a conflict, creating) write their
//! audit row in the change's own transaction. Reading a chart or note writes one
//! `chart-opened` / `note-viewed` row per (user, document, store session), not one per call.

mod audit;
mod charts;
mod conflicts;
mod db;
mod disk_faults;
mod documents;
mod fetched;
mod index;
mod journal;
mod keys;
mod lists;
mod notes;
mod schedule;
mod sync_client;
mod sync_state;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use automerge::AutoCommit;
use automerge::transaction::Transactable;
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use audit::audit;
pub use audit::{AuditAction, AuditEntry};
pub use conflicts::OpenConflict;
pub use db::{SCHEMA_VERSION, StoreKey};
pub use documents::COMPACT_AFTER_CHUNKS;
pub use fetched::FetchedImport;
pub use journal::FOLD_AFTER_RECORDS;
pub use lists::{NoteSummary, PatientSummary};
pub use schedule::ScheduledVisitRow;
pub use sync_client::ImportOutcome;

use crate::model::{
    self, Actor, Allergy, CareTeamMember, Conflict, ConflictValue, Demographic, DocKind,
    HistoryEntry, KeyDirectory, ListEntry, Medication, NoteList, NoteStatus, NoteText,
    PatientChart, ReviewItem, Role, Signature, SignatureCheck, VisitNote, VisitStart, VitalReading,
};
use crate::protocol::DocumentId;
use crate::text;
use crate::{Error, Result};
use documents::LoadedDoc;
use journal::{Journal, JournalRecord};

/// Documents kept loaded in memory; the least recently used beyond this are dropped (they are
/// on disk). A nurse's day touches a few dozen documents.
pub const MAX_CACHED_DOCS: usize = 64;

/// How hard a transaction must be flushed before the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Survives the process being killed (WAL, `synchronous = NORMAL`).
    ProcessCrash,
    /// Also survives power loss (`synchronous = FULL`: the WAL is fsynced before returning).
    PowerLoss,
}

/// Options to open a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Database file path (created if missing).
    pub path: PathBuf,
    /// Encryption key, from the platform keystore.
    pub key: StoreKey,
    /// The signed-in user on this device.
    pub actor: Actor,
    /// The user's role.
    pub role: Role,
    /// Make text splices durable through the keystroke journal (one encrypted `write` per
    /// splice, committed to SQLite in batches) rather than one SQLite transaction per splice.
    /// Either way a splice survives the process being killed once the call returns; see
    /// `store::journal` and the README's Decisions.
    pub keystroke_journal: bool,
}

struct Inner {
    conn: Connection,
    /// This device's automerge author, set on every loaded document.
    author: automerge::Author<'static>,
    docs: HashMap<DocumentId, LoadedDoc>,
    clock: u64,
    /// Where splices are made durable before SQLite has them (`None`: a SQLite transaction
    /// per splice).
    journal: Option<Journal>,
    /// The agency's device keys (last fetched copy), for verifying signatures.
    keys: Arc<KeyDirectory>,
    /// A document left the cache while it held journaled splices SQLite does not have (a
    /// failed merge or edit dropped it). Until they are replayed from the journal file, the
    /// journal must not be emptied: see [`Inner::recover_orphans`].
    journal_orphans: bool,
    /// The exclusive lock on `<db>-lock` (see `db::lock`); dropped with `Inner` on close.
    lock: Option<std::fs::File>,
    /// (user, document, action) already audited as read in this store session: reading a chart
    /// or note writes one `chart-opened` / `note-viewed` row per session, not one per call.
    audited_reads: HashSet<(DocumentId, AuditAction)>,
}

/// The encrypted local store of one device. Cheap to share behind an `Arc`; calls are
/// serialized on its single connection.
pub struct Store {
    inner: Mutex<Option<Inner>>,
    actor: Actor,
    role: Role,
    path: PathBuf,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(inner) = self.lock().as_mut()
            && let Err(e) = inner.fold()
        {
            // Still in the journal: merged again at the next open.
            tracing::warn!(error = %e, "could not commit journaled splices on drop");
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("actor", &self.actor)
            .finish()
    }
}

type Tx<'a> = rusqlite::Transaction<'a>;

impl Inner {
    /// Run `f` in a write transaction flushed to `durability`.
    fn write<T>(
        &mut self,
        durability: Durability,
        f: impl FnOnce(&Tx<'_>, &mut HashMap<DocumentId, LoadedDoc>) -> Result<T>,
    ) -> Result<T> {
        if self.journal_orphans {
            self.recover_orphans();
        }
        if durability == Durability::PowerLoss {
            self.conn.execute_batch("PRAGMA synchronous = FULL")?;
        }
        let mut folded = Vec::new();
        let result = run_transaction(&mut self.conn, &mut self.docs, &mut folded, f);
        if durability == Durability::PowerLoss {
            self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        }
        match result {
            Ok(out) => {
                // Emptied only when every journaled splice is in SQLite: none pending in a cached
                // document, none orphaned by a document that left the cache.
                if let Some(journal) = self.journal.as_mut()
                    && journal.records > 0
                    && !self.journal_orphans
                    && self.docs.values().all(|d| !d.journaled)
                {
                    journal.clear()?;
                }
                Ok(out)
            }
            Err(e) => {
                // Rolled back: what was folded is again only in the journal.
                for undo in folded {
                    if let Some(d) = self.docs.get_mut(&undo.id) {
                        undo.restore(d);
                    }
                }
                Err(e)
            }
        }
    }

    /// Forget a document's in-memory state after a failed write may have left memory ahead of
    /// disk. Splices that are durable in the keystroke journal are kept: the document is
    /// reloaded from SQLite and its journal records replayed (if that fails too, they stay in the
    /// journal file and are replayed at the next open).
    ///
    /// Every path that drops a document after a failure comes through here, so journaled
    /// splices are never silently left behind: if the replay fails, `journal_orphans` keeps the
    /// journal file from being emptied and the replay is retried before the next write (and at
    /// the next open in any case).
    fn discard(&mut self, id: DocumentId) {
        let Some(old) = self.docs.remove(&id) else {
            return;
        };
        if old.journaled {
            self.journal_orphans = true;
            self.recover_orphans();
        }
    }

    /// Replay the journal file's records into memory (records already in a document are
    /// skipped by hash), so splices of documents that left the cache are journaled again and
    /// the next transaction commits them. On failure the flag stays set: the journal is kept.
    fn recover_orphans(&mut self) {
        let Some(records) = self.journal.as_ref().map(|j| j.records_on_disk()) else {
            return;
        };
        // Cleared first: the replay may itself write (a full cache folds before loading).
        self.journal_orphans = false;
        if let Err(e) = self.replay_records(records) {
            tracing::error!(error = %e, "could not recover journaled splices in-session; kept in the journal");
            self.journal_orphans = true;
        }
    }

    /// Re-walk the conflicts of documents whose rows an older build wrote (no value ids): a
    /// one-time cost after an upgrade, nothing when there are none.
    fn reindex_legacy_conflicts(&mut self) -> Result<()> {
        let legacy = {
            let tx = self.conn.transaction()?;
            let legacy = index::documents_with_legacy_conflicts(&tx)?;
            tx.commit()?;
            legacy
        };
        let author = self.author.clone();
        for id in legacy {
            self.ensure_loaded(id, &author)?;
            self.write(Durability::ProcessCrash, |tx, docs| {
                let loaded = docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
                index::refresh_all_conflicts(tx, id, &loaded.doc)?;
                loaded.indexed_heads = loaded.doc.get_heads();
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Commit journaled splices to SQLite now.
    fn fold(&mut self) -> Result<()> {
        if self.journal_orphans || self.docs.values().any(|d| d.journaled) {
            self.write(Durability::ProcessCrash, |_, _| Ok(()))?;
        }
        Ok(())
    }

    /// Replay splices a killed process left in the journal, then commit them to SQLite.
    fn replay(&mut self, records: Vec<JournalRecord>) -> Result<()> {
        let replayed = self.replay_records(records)?;
        tracing::info!(replayed, "keystroke journal replayed");
        self.fold()?;
        if let Some(journal) = self.journal.as_mut() {
            journal.clear()?;
        }
        Ok(())
    }

    /// Re-make journaled splices in memory (marking their documents journaled); returns how
    /// many were not already present.
    fn replay_records(&mut self, records: Vec<JournalRecord>) -> Result<usize> {
        let author = self.author.clone();
        let mut replayed = 0;
        for record in records {
            let id = record.doc;
            match self.ensure_loaded(id, &author) {
                Ok(()) => {}
                Err(Error::DocumentNotFound(_)) => {
                    tracing::error!(doc = %id, "journal record for a document not in the store; skipped");
                    continue;
                }
                Err(e) => return Err(e),
            }
            let loaded = self.docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
            if replay_one(&mut loaded.doc, &author, &record)? {
                loaded.journaled = true;
                loaded.refresh_cache();
                replayed += 1;
            }
        }
        // Later edits in this session get a fresh actor, as after any load.
        for loaded in self.docs.values_mut() {
            loaded.doc.set_actor(automerge::ActorId::random());
        }
        Ok(replayed)
    }

    fn ensure_loaded(&mut self, id: DocumentId, author: &automerge::Author<'static>) -> Result<()> {
        self.clock += 1;
        if let Some(d) = self.docs.get_mut(&id) {
            d.last_used = self.clock;
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        let loaded = documents::load(&tx, id, author, self.keys.clone())?;
        tx.commit()?;
        self.cache(id, loaded)
    }

    /// Keep a document in memory, evicting the least recently used beyond
    /// [`MAX_CACHED_DOCS`] (only once everything journaled is in SQLite).
    fn cache(&mut self, id: DocumentId, mut loaded: LoadedDoc) -> Result<()> {
        self.clock += 1;
        loaded.last_used = self.clock;
        if self.docs.len() >= MAX_CACHED_DOCS {
            self.fold()?;
            if let Some(oldest) = self
                .docs
                .iter()
                .min_by_key(|(_, d)| d.last_used)
                .map(|(k, _)| *k)
            {
                self.docs.remove(&oldest);
            }
        }
        self.docs.insert(id, loaded);
        Ok(())
    }
}

/// One SQLite write transaction. Journaled splices are committed first, in the same
/// transaction, so SQLite always holds edits in the order they were made.
fn run_transaction<T>(
    conn: &mut Connection,
    docs: &mut HashMap<DocumentId, LoadedDoc>,
    folded: &mut Vec<documents::FoldUndo>,
    f: impl FnOnce(&Tx<'_>, &mut HashMap<DocumentId, LoadedDoc>) -> Result<T>,
) -> Result<T> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    documents::fold_journaled(&tx, docs, folded)?;
    let out = f(&tx, docs)?;
    tx.commit()?;
    Ok(out)
}

/// Re-make one journaled splice. Returns `false` if its change is already in the document.
fn replay_one(
    doc: &mut AutoCommit,
    author: &automerge::Author<'static>,
    r: &JournalRecord,
) -> Result<bool> {
    let hash = automerge::ChangeHash(r.hash);
    if doc.get_change_by_hash(&hash).is_some() {
        return Ok(false);
    }
    let deps: Vec<automerge::ChangeHash> =
        r.deps.iter().map(|d| automerge::ChangeHash(*d)).collect();
    let corrupt = |what: &str| Error::Corrupt(format!("keystroke journal record: {what}"));
    if deps.iter().any(|d| doc.get_change_by_hash(d).is_none()) {
        return Err(corrupt("its dependencies are not in the document"));
    }
    let delete = isize::try_from(r.delete).map_err(|_| corrupt("delete length"))?;
    let pos = usize::try_from(r.pos).map_err(|_| corrupt("position"))?;
    let mut heads = doc.get_heads();
    heads.sort();
    let mut sorted_deps = deps.clone();
    sorted_deps.sort();
    // The same splice by the same actor on the same state at the same time is the same change.
    let mut target = if heads == sorted_deps {
        None
    } else {
        Some(doc.fork_at(&deps)?)
    };
    let editing = target.as_mut().unwrap_or(doc);
    editing.set_author(Some(author.clone()));
    editing.set_actor(automerge::ActorId::from(r.actor.as_slice()));
    let (obj, _) = editing.import(&r.obj)?;
    editing.splice_text(&obj, pos, delete, &r.insert)?;
    let made = model::commit(editing, "edit text", r.time_ms);
    if made != Some(hash) {
        // Kept either way: a different hash is only a different change id, and journaled changes
        // were never synced (every sync writes through SQLite, which folds the journal first).
        tracing::error!("replayed keystroke produced a different change hash");
    }
    if let Some(mut fork) = target {
        let changes = fork.get_changes(&deps);
        doc.apply_changes(changes)?;
    }
    Ok(true)
}

/// Refuse (with every path) if the document has open conflicts.
pub(crate) fn refuse_open_conflicts(doc: &AutoCommit) -> Result<()> {
    let paths = model::conflicts::open_conflict_paths(doc);
    if paths.is_empty() {
        Ok(())
    } else {
        Err(Error::ConflictsOpen { paths })
    }
}

/// Check a cached document's kind.
fn expect_kind(loaded: &LoadedDoc, id: DocumentId, kind: DocKind) -> Result<()> {
    if loaded.cache.kind == Some(kind) {
        Ok(())
    } else {
        model::expect_kind(&loaded.doc, id, kind)
    }
}

fn doc_id_from_sql(bytes: Vec<u8>) -> rusqlite::Result<DocumentId> {
    let arr: [u8; 16] = bytes.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "document id is not 16 bytes".into(),
        )
    })?;
    Ok(DocumentId::from_bytes(arr))
}

/// What kind of index maintenance an edit needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reindex {
    /// A text splice: no index row can change (Text cannot conflict; status is untouched).
    No,
    /// Anything else.
    Yes,
}

impl Store {
    /// Open (or create) the store. Migrates an older schema; refuses a newer one
    /// ([`Error::SchemaTooNew`]); a wrong key or a foreign/corrupt file is
    /// [`Error::CannotDecrypt`] and the file is left untouched.
    ///
    /// One file is used by one `Store` at a time: a second open of the same file — from this
    /// process or another — fails with [`Error::StoreInUse`] until the first is closed or
    /// dropped (an OS advisory lock on `<path>-lock`, released by the OS if the process dies).
    pub fn open(config: StoreConfig) -> Result<Store> {
        let lock = db::lock(&config.path)?;
        let conn = db::open(&config.path, &config.key)?;
        // Leftover records are merged whether or not this session journals splices: a store
        // opened without the journal must not leave a killed session's keystrokes behind.
        let leftover_file = journal::path_for(&config.path)
            .metadata()
            .is_ok_and(|m| m.len() > 0);
        let (journal, leftover) = if config.keystroke_journal || leftover_file {
            let (journal, records) = Journal::open(&config.path, &config.key)?;
            (Some(journal), records)
        } else {
            (None, Vec::new())
        };
        let keys = Arc::new(keys::load_directory(&conn)?);
        let mut inner = Inner {
            conn,
            author: config.actor.author(),
            docs: HashMap::new(),
            clock: 0,
            journal,
            keys,
            journal_orphans: false,
            lock: Some(lock),
            audited_reads: HashSet::new(),
        };
        if !leftover.is_empty() {
            inner.replay(leftover)?;
        }
        inner.reindex_legacy_conflicts()?;
        if !config.keystroke_journal {
            inner.journal = None;
        }
        Ok(Store {
            inner: Mutex::new(Some(inner)),
            actor: config.actor,
            role: config.role,
            path: config.path,
        })
    }

    /// Close the store, releasing the file and its lock (e.g. when the app is suspended: iOS
    /// terminates suspended apps that hold file locks). Later calls return [`Error::Closed`].
    pub fn close(&self) -> Result<()> {
        let mut guard = self.lock();
        if let Some(inner) = guard.as_mut() {
            inner.fold()?;
        }
        if let Some(inner) = guard.take() {
            inner.conn.close().map_err(|(_, e)| Error::Sqlite(e))?;
        }
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The signed-in actor.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// Change the encryption key. Journaled splices are committed to SQLite first and the
    /// journal's key is re-derived from the new key, so a kill at any point leaves nothing
    /// under the old key that the next open (with the new key) could not read.
    pub fn rekey(&self, key: &StoreKey) -> Result<()> {
        self.with(|inner| {
            inner.fold()?;
            if let Some(journal) = inner.journal.as_ref()
                && (inner.journal_orphans || journal.bytes_on_disk()? > 0)
            {
                return Err(Error::Io(
                    "the keystroke journal could not be committed; not changing the key".into(),
                ));
            }
            db::rekey(&inner.conn, key)?;
            if let Some(journal) = inner.journal.as_mut() {
                journal.rekey(key);
            }
            Ok(())
        })
    }

    /// Tests only: behave as if the process were killed now — nothing is folded, committed or
    /// closed (the connection and documents are leaked), except that the file lock is
    /// released, as the OS does for a dead process.
    #[doc(hidden)]
    pub fn simulate_kill(self) {
        let inner = self.lock().take();
        if let Some(mut inner) = inner {
            drop(inner.lock.take());
            std::mem::forget(inner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Inner>> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so the data is still consistent: keep going.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let mut guard = self.lock();
        let inner = guard.as_mut().ok_or(Error::Closed)?;
        f(inner)
    }

    fn require_role(&self, allowed: &[Role], action: &'static str) -> Result<()> {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(Error::Forbidden {
                role: self.role.as_str(),
                action,
            })
        }
    }

    /// Store a brand-new document.
    fn insert_document(&self, id: DocumentId, doc: AutoCommit, patient: &str) -> Result<()> {
        let now = model::now_ms();
        let actor = self.actor.clone();
        self.with(|inner| {
            let mut loaded = LoadedDoc::new(doc, true, inner.keys.clone());
            inner.write(Durability::PowerLoss, |tx, _| {
                documents::store_new(tx, id, &mut loaded, now, true)?;
                audit(
                    tx,
                    &actor,
                    AuditAction::Created,
                    Some(id),
                    Some(patient),
                    now,
                )
            })?;
            inner.cache(id, loaded)
        })
    }

    /// Apply one edit to a document: run `f`, commit one automerge change, persist it with the
    /// index rows in one transaction. If anything fails, the in-memory document is dropped so it
    /// is reloaded from disk: memory never holds what the disk does not.
    fn edit<T>(
        &self,
        id: DocumentId,
        kind: DocKind,
        message: &str,
        reindex: Reindex,
        durability: Durability,
        f: impl FnOnce(&mut AutoCommit, &Actor, i64) -> Result<T>,
    ) -> Result<T> {
        self.edit_loaded(
            id,
            kind,
            message,
            reindex,
            durability,
            |loaded, actor, now| f(&mut loaded.doc, actor, now),
        )
    }

    /// [`Store::edit`] with access to the cached per-document state.
    fn edit_loaded<T>(
        &self,
        id: DocumentId,
        kind: DocKind,
        message: &str,
        reindex: Reindex,
        durability: Durability,
        f: impl FnOnce(&mut LoadedDoc, &Actor, i64) -> Result<T>,
    ) -> Result<T> {
        self.edit_with(id, kind, message, reindex, durability, None, f)
    }

    #[allow(clippy::too_many_arguments)]
    fn edit_with<T>(
        &self,
        id: DocumentId,
        kind: DocKind,
        message: &str,
        reindex: Reindex,
        durability: Durability,
        audit_action: Option<AuditAction>,
        f: impl FnOnce(&mut LoadedDoc, &Actor, i64) -> Result<T>,
    ) -> Result<T> {
        let now = model::now_ms();
        let actor = &self.actor;
        self.with(|inner| {
            let author = inner.author.clone();
            inner.ensure_loaded(id, &author)?;
            let result = inner.write(durability, |tx, docs| {
                let loaded = docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
                expect_kind(loaded, id, kind)?;
                let out = match f(loaded, actor, now) {
                    Ok(out) => out,
                    Err(e) => {
                        loaded.doc.rollback();
                        return Err(e);
                    }
                };
                if model::commit(&mut loaded.doc, message, now).is_none() {
                    return Ok(out);
                }
                documents::append_local_change(tx, id, loaded)?;
                documents::mark_unsynced(tx, id, loaded)?;
                if reindex == Reindex::Yes {
                    loaded.refresh_cache();
                    documents::reindex(tx, id, loaded, now)?;
                }
                if loaded.needs_compaction() {
                    documents::compact(tx, id, loaded)?;
                }
                if let Some(action) = audit_action {
                    let patient = model::root_info(&loaded.doc).patient_id;
                    audit(tx, actor, action, Some(id), patient.as_deref(), now)?;
                }
                Ok(out)
            });
            if result.is_err() {
                // Rolled-back validation errors leave the document as it was; anything else may
                // have left memory ahead of disk.
                if !matches!(
                    result,
                    Err(Error::NoteSigned(_)
                        | Error::ConflictsOpen { .. }
                        | Error::ConflictChanged { .. }
                        | Error::FieldInConflict { .. }
                        | Error::StaleRead { .. }
                        | Error::InvalidInput(_)
                        | Error::ItemNotFound { .. }
                        | Error::InvalidTextRange { .. }
                        | Error::WrongKind { .. })
                ) {
                    inner.discard(id);
                }
            }
            result
        })
    }

    /// Read a document (loading it if needed), optionally recording an audit row: `opened` /
    /// `viewed` once per document per store session (open to close), so reading a chart on
    /// every screen refresh does not write a transaction each time.
    fn read<T>(
        &self,
        id: DocumentId,
        audit_action: Option<AuditAction>,
        f: impl FnOnce(&mut AutoCommit) -> Result<T>,
    ) -> Result<T> {
        self.read_loaded(id, audit_action, |loaded| f(&mut loaded.doc))
    }

    /// [`Store::read`] with access to the cached per-document state (the signature ledger).
    fn read_loaded<T>(
        &self,
        id: DocumentId,
        audit_action: Option<AuditAction>,
        f: impl FnOnce(&mut LoadedDoc) -> Result<T>,
    ) -> Result<T> {
        let now = model::now_ms();
        let actor = &self.actor;
        self.with(|inner| {
            let author = inner.author.clone();
            inner.ensure_loaded(id, &author)?;
            let loaded = inner.docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
            let out = f(loaded)?;
            if let Some(action) = audit_action {
                // Reading is audited once per (user, document, store session): the user of a
                // store is fixed, so the session's set is keyed by document and action. Other
                // actions (exports) are audited every time.
                let once = matches!(action, AuditAction::ChartOpened | AuditAction::NoteViewed);
                if !once || !inner.audited_reads.contains(&(id, action)) {
                    let patient = model::root_info(&loaded.doc).patient_id;
                    inner.write(Durability::ProcessCrash, |tx, _| {
                        audit(tx, actor, action, Some(id), patient.as_deref(), now)
                    })?;
                    if once {
                        inner.audited_reads.insert((id, action));
                    }
                }
            }
            Ok(out)
        })
    }

    /// Fold a document's chunks into a new snapshot (e.g. when the app goes to background).
    pub fn compact(&self, id: DocumentId) -> Result<()> {
        self.with(|inner| {
            let author = inner.author.clone();
            inner.ensure_loaded(id, &author)?;
            inner.write(Durability::ProcessCrash, |tx, docs| {
                let loaded = docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
                documents::compact(tx, id, loaded)
            })
        })
    }

    /// Run `f` with the loaded automerge document (read-only use; for tests and tools).
    pub fn with_document<T>(
        &self,
        id: DocumentId,
        f: impl FnOnce(&mut AutoCommit) -> T,
    ) -> Result<T> {
        self.read(id, None, |doc| Ok(f(doc)))
    }

    /// Drop every cached document (they are reloaded from disk on next use).
    pub fn clear_cache(&self) -> Result<()> {
        self.with(|inner| {
            inner.fold()?;
            inner.docs.clear();
            Ok(())
        })
    }

    /// Rows of the index tables, for replicas to compare (tests) — everything but local times.
    pub fn index_snapshot(&self) -> Result<Vec<String>> {
        self.with(|inner| {
            let mut out = Vec::new();
            for sql in [
                "SELECT hex(doc_id) || '|' || patient_id || '|' || agency_id || '|' || coalesce(name,'') FROM patients ORDER BY doc_id",
                "SELECT hex(doc_id) || '|' || patient_id || '|' || coalesce(visit_date,'') || '|' || status || '|' || coalesce(signed_at,'') FROM notes ORDER BY doc_id",
                "SELECT hex(doc_id) || '|' || path || '|' || values_json FROM conflicts ORDER BY doc_id, path",
                "SELECT hex(doc_id) || '|' || change || '|' || item_json FROM review_items ORDER BY doc_id, change",
            ] {
                let mut stmt = inner.conn.prepare(sql)?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                for r in rows {
                    out.push(r?);
                }
            }
            Ok(out)
        })
    }
}
