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

mod db;
mod disk_faults;
mod documents;
mod index;
mod journal;
mod keys;
mod sync_state;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

pub use db::{SCHEMA_VERSION, StoreKey};
pub use documents::COMPACT_AFTER_CHUNKS;
pub use journal::FOLD_AFTER_RECORDS;

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

/// Audit actions recorded locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditAction {
    /// A patient chart was opened.
    ChartOpened,
    /// A visit note was viewed.
    NoteViewed,
    /// A note was signed.
    Signed,
    /// A note was exported (rendered for printing or sending).
    Exported,
    /// A document was created.
    Created,
    /// A conflict was resolved.
    ConflictResolved,
}

impl AuditAction {
    fn as_str(self) -> &'static str {
        match self {
            AuditAction::ChartOpened => "chart-opened",
            AuditAction::NoteViewed => "note-viewed",
            AuditAction::Signed => "signed",
            AuditAction::Exported => "exported",
            AuditAction::Created => "created",
            AuditAction::ConflictResolved => "conflict-resolved",
        }
    }
}

/// A local audit row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Who.
    pub user_id: String,
    /// On which device.
    pub device_id: String,
    /// What.
    pub action: String,
    /// Which document.
    pub document_id: Option<DocumentId>,
    /// Which patient.
    pub patient_id: Option<String>,
}

/// A row of the patient list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientSummary {
    /// Patient id.
    pub patient_id: String,
    /// The chart document.
    pub document_id: DocumentId,
    /// Agency.
    pub agency_id: String,
    /// Name from the chart.
    pub name: Option<String>,
}

/// A row of a note list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoteSummary {
    /// The note document.
    pub document_id: DocumentId,
    /// Patient.
    pub patient_id: String,
    /// Visit date, `YYYY-MM-DD`.
    pub visit_date: Option<String>,
    /// Draft or signed.
    pub status: NoteStatus,
    /// Clinician who started it.
    pub clinician_id: Option<String>,
    /// EVV start, ms since the epoch.
    pub started_at_ms: Option<i64>,
    /// When signed.
    pub signed_at_ms: Option<i64>,
}

/// An open conflict, from the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenConflict {
    /// Document holding the field.
    pub document_id: DocumentId,
    /// The conflict.
    pub conflict: Conflict,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOutcome {
    /// Whether the document was new to this store.
    pub created: bool,
    /// Whether any change was new.
    pub changed: bool,
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

/// Apply one text splice to a loaded note (not yet committed), using the cached kind,
/// signature flag and Text object. Returns the Text object's id (display form).
fn splice_in_memory(
    loaded: &mut LoadedDoc,
    id: DocumentId,
    field: NoteText,
    pos: usize,
    delete: usize,
    insert: &str,
) -> Result<String> {
    expect_kind(loaded, id, DocKind::VisitNote)?;
    if loaded.cache.signed {
        return Err(Error::NoteSigned(id));
    }
    let (obj, obj_name) = match loaded.cache.texts.get(field.key()) {
        Some((obj, name)) => (obj.clone(), name.clone()),
        None => {
            let obj = model::visit_note::text_obj(&mut loaded.doc, field)?;
            let name = obj.to_string();
            loaded
                .cache
                .texts
                .insert(field.key(), (obj.clone(), name.clone()));
            (obj, name)
        }
    };
    text::splice(
        &mut loaded.doc,
        &obj,
        pos,
        delete,
        insert,
        &mut loaded.cache.bmp_only,
    )?;
    Ok(obj_name)
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

/// Verify a loaded note's signature (see [`Store::verify_signature`]).
fn check_signature(id: DocumentId, loaded: &mut LoadedDoc) -> SignatureCheck {
    use model::signing::{InvalidSignature, RoleOnly, Verdict, verify};
    loaded.update_ledger();
    let Some(entry) = loaded.ledger.signature().cloned() else {
        return SignatureCheck::NotSigned;
    };
    let Some(signature) = Signature::from_entry(&entry) else {
        return SignatureCheck::NotSigned;
    };
    match verify(loaded.doc.document(), id, &entry, &loaded.keys, &RoleOnly) {
        Verdict::Valid => {
            let heads = entry
                .payload
                .as_ref()
                .and_then(|p| p.change_hashes())
                .unwrap_or_default();
            SignatureCheck::Valid {
                rendering: model::visit_note::canonical_rendering(&loaded.doc, &heads),
                signature,
            }
        }
        Verdict::HeadsMissing => SignatureCheck::HeadsMissing,
        Verdict::Invalid(InvalidSignature::UnknownKey) => SignatureCheck::Unverified { signature },
        // The ledger only adopts signatures that count; one that no longer verifies (keys
        // changed since) is reported by the rebuilt ledger. Show it as unverified meanwhile.
        Verdict::Invalid(_) => SignatureCheck::Unverified { signature },
    }
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

/// Append an audit row.
fn audit(
    tx: &Tx<'_>,
    actor: &Actor,
    action: AuditAction,
    doc: Option<DocumentId>,
    patient: Option<&str>,
    now_ms: i64,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit_log (at, user_id, device_id, action, doc_id, patient_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        now_ms,
        actor.user_id,
        actor.device_id,
        action.as_str(),
        doc.map(|d| d.as_bytes().to_vec()),
        patient
    ])?;
    Ok(())
}

/// Parse untrusted automerge bytes strictly before merging them: automerge's incremental load
/// is lenient by design (it skips a truncated tail), which would turn garbage into a silent
/// no-op instead of an error the caller can report.
fn validate_automerge_bytes(bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Err(Error::InvalidInput("empty automerge data".into()));
    }
    let options = automerge::LoadOptions::new().on_partial_load(automerge::OnPartialLoad::Error);
    // automerge 0.12 can panic on malformed chunks (found by `fuzz/` document_import; the input
    // is in fuzz/regressions/): such bytes are invalid input, not a crash of the app.
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        automerge::Automerge::load_with_options(bytes, options)
    }))
    .map_err(|_| Error::InvalidInput("not valid automerge data (the parser failed)".into()))?;
    match loaded {
        // Every chunk parsed; some changes depend on history only the target document has.
        Ok(_) | Err(automerge::AutomergeError::MissingDeps) => Ok(()),
        Err(e) => Err(Error::InvalidInput(format!(
            "not valid automerge data: {e}"
        ))),
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

    // ----- patient charts -----

    /// Create a patient chart (office and admin roles).
    pub fn create_patient(
        &self,
        agency_id: &str,
        patient_id: &str,
        name: &str,
    ) -> Result<DocumentId> {
        self.require_role(&[Role::Office, Role::Admin], "create patient charts")?;
        let (id, doc) =
            model::new_patient_chart(agency_id, patient_id, name, &self.actor, model::now_ms())?;
        self.insert_document(id, doc, patient_id)?;
        Ok(id)
    }

    /// Open a patient chart (audited as `chart-opened`).
    pub fn patient_chart(&self, id: DocumentId) -> Result<PatientChart> {
        self.read(id, Some(AuditAction::ChartOpened), |doc| {
            model::expect_kind(doc, id, DocKind::Patient)?;
            Ok(PatientChart::read(id, doc))
        })
    }

    /// Set a demographic field. Nothing is written if the field already shows `value`; a field
    /// in conflict is refused ([`Error::FieldInConflict`]: resolve it first).
    pub fn set_demographic(&self, id: DocumentId, field: Demographic, value: &str) -> Result<()> {
        self.edit(
            id,
            DocKind::Patient,
            "set demographic",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::set_demographic(doc, field, value),
        )
    }

    /// Add an allergy (`allergy.id` empty, `read` `None`) or update one; returns its id.
    ///
    /// An update passes `read`, the allergy as the caller read it (from
    /// [`Store::patient_chart`]), and writes only the fields where `allergy` differs from it.
    /// A field the caller left unchanged is never written, so an update never closes a conflict
    /// on another field. A changed field that is in conflict is refused
    /// ([`Error::FieldInConflict`]: resolve it first), and one that no longer holds what the
    /// caller read is refused ([`Error::StaleRead`]: read again); either way nothing is written.
    pub fn upsert_allergy(
        &self,
        id: DocumentId,
        read: Option<&Allergy>,
        allergy: &Allergy,
    ) -> Result<String> {
        self.edit(
            id,
            DocKind::Patient,
            "upsert allergy",
            Reindex::Yes,
            Durability::PowerLoss,
            |doc, actor, now| model::patient::upsert_allergy(doc, read, allergy, actor, now),
        )
    }

    /// Add a medication (`medication.id` empty, `read` `None`) or update one; returns its id.
    /// Same contract as [`Store::upsert_allergy`]: only the fields where `medication` differs
    /// from `read` (what the caller read) are written.
    pub fn upsert_medication(
        &self,
        id: DocumentId,
        read: Option<&Medication>,
        medication: &Medication,
    ) -> Result<String> {
        self.edit(
            id,
            DocKind::Patient,
            "upsert medication",
            Reindex::Yes,
            Durability::PowerLoss,
            |doc, actor, now| model::patient::upsert_medication(doc, read, medication, actor, now),
        )
    }

    /// Add or update a care-team member (office and admin roles).
    pub fn set_care_team_member(&self, id: DocumentId, member: &CareTeamMember) -> Result<()> {
        self.require_role(&[Role::Office, Role::Admin], "change care teams")?;
        self.edit(
            id,
            DocKind::Patient,
            "set care team member",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::set_care_team_member(doc, member),
        )
    }

    /// Remove a care-team member (office and admin roles).
    pub fn remove_care_team_member(&self, id: DocumentId, user_id: &str) -> Result<()> {
        self.require_role(&[Role::Office, Role::Admin], "change care teams")?;
        self.edit(
            id,
            DocKind::Patient,
            "remove care team member",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::remove_care_team_member(doc, user_id),
        )
    }

    /// Add a care-plan problem (`parent` empty), goal (`[problem]`) or intervention
    /// (`[problem, goal]`); returns its id.
    pub fn add_care_plan_item(
        &self,
        id: DocumentId,
        parent: &[String],
        description: &str,
        status: &str,
    ) -> Result<String> {
        self.edit(
            id,
            DocKind::Patient,
            "add care plan item",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::add_care_plan_item(doc, parent, description, status),
        )
    }

    /// Set the status of a care-plan entry (path of ids from the problem down).
    pub fn set_care_plan_status(
        &self,
        id: DocumentId,
        path: &[String],
        status: &str,
    ) -> Result<()> {
        self.edit(
            id,
            DocKind::Patient,
            "set care plan status",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::set_care_plan_status(doc, path, status),
        )
    }

    /// Replace a care-plan entry's description (diffed into a minimal Text edit).
    pub fn update_care_plan_description(
        &self,
        id: DocumentId,
        path: &[String],
        text: &str,
    ) -> Result<()> {
        self.edit(
            id,
            DocKind::Patient,
            "edit care plan",
            Reindex::No,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::update_care_plan_description(doc, path, text),
        )
    }

    // ----- visit notes -----

    /// Start a visit: creates a draft note with the EVV start facts; the clinician is the
    /// signed-in user.
    pub fn start_visit(&self, start: &VisitStart) -> Result<DocumentId> {
        self.require_role(&[Role::Clinician], "start visits")?;
        let (id, doc) = model::visit_note::new_visit_note(start, &self.actor, model::now_ms())?;
        self.insert_document(id, doc, &start.patient_id)?;
        Ok(id)
    }

    /// Record the EVV end of the visit.
    pub fn finish_visit(
        &self,
        id: DocumentId,
        ended_at_ms: i64,
        end_monotonic_ms: i64,
    ) -> Result<()> {
        self.note_edit(
            id,
            "finish visit",
            Reindex::Yes,
            Durability::PowerLoss,
            |doc, _, _| model::visit_note::finish_visit(doc, ended_at_ms, end_monotonic_ms),
        )
    }

    /// Open a visit note (audited as `note-viewed`).
    pub fn visit_note(&self, id: DocumentId) -> Result<VisitNote> {
        self.read_loaded(id, Some(AuditAction::NoteViewed), |loaded| {
            model::expect_kind(&loaded.doc, id, DocKind::VisitNote)?;
            loaded.update_ledger();
            Ok(VisitNote::read(id, &mut loaded.doc, &loaded.ledger))
        })
    }

    fn note_edit<T>(
        &self,
        id: DocumentId,
        message: &str,
        reindex: Reindex,
        durability: Durability,
        f: impl FnOnce(&mut AutoCommit, &Actor, i64) -> Result<T>,
    ) -> Result<T> {
        self.edit_loaded(
            id,
            DocKind::VisitNote,
            message,
            reindex,
            durability,
            |loaded, actor, now| {
                if loaded.cache.signed {
                    return Err(Error::NoteSigned(id));
                }
                f(&mut loaded.doc, actor, now)
            },
        )
    }

    /// Append a vital-sign reading (a correction sets `supersedes`); returns its id.
    pub fn record_vital(&self, id: DocumentId, reading: &VitalReading) -> Result<String> {
        self.note_edit(
            id,
            "record vital",
            Reindex::Yes,
            Durability::PowerLoss,
            |doc, actor, _| model::visit_note::record_vital(doc, reading, actor),
        )
    }

    /// Splice a narrative: at UTF-16 offset `pos`, delete `delete` UTF-16 code units and insert
    /// `insert`.
    pub fn splice_text(
        &self,
        id: DocumentId,
        field: NoteText,
        pos: usize,
        delete: usize,
        insert: &str,
    ) -> Result<()> {
        let now = model::now_ms();
        let journaled = self.with(|inner| {
            let author = inner.author.clone();
            inner.ensure_loaded(id, &author)?;
            let Inner { docs, journal, .. } = &mut *inner;
            let (Some(journal), Some(loaded)) = (journal.as_mut(), docs.get_mut(&id)) else {
                return Ok(false);
            };
            if !loaded.unsynced {
                // The first edit after a sync also flags the document in SQLite.
                return Ok(false);
            }
            let deps = loaded.doc.get_heads();
            let obj = splice_in_memory(loaded, id, field, pos, delete, insert)?;
            let Some(hash) = model::commit(&mut loaded.doc, "edit text", now) else {
                return Ok(true);
            };
            let record = JournalRecord {
                doc: id,
                obj,
                pos: pos as u64,
                delete: delete as u64,
                insert: insert.to_owned(),
                actor: loaded.doc.get_actor().to_bytes().to_vec(),
                time_ms: now,
                deps: deps.iter().map(|h| h.0).collect(),
                hash: hash.0,
            };
            loaded.journaled = true;
            match journal.append(&record) {
                Ok(()) => {
                    if journal.records >= FOLD_AFTER_RECORDS {
                        inner.fold()?;
                    }
                }
                Err(e) => {
                    // No journal: commit through SQLite instead (the fold writes every change
                    // after the stored heads, this one included). If that fails too, this
                    // change is nowhere durable and memory must forget it.
                    tracing::warn!(error = %e, "keystroke journal append failed; committing to SQLite");
                    if let Err(e) = inner.fold() {
                        inner.discard(id);
                        return Err(e);
                    }
                }
            }
            Ok(true)
        })?;
        if journaled {
            return Ok(());
        }
        self.edit_loaded(
            id,
            DocKind::VisitNote,
            "edit text",
            Reindex::No,
            Durability::ProcessCrash,
            |loaded, _, _| splice_in_memory(loaded, id, field, pos, delete, insert).map(|_| ()),
        )
    }

    /// Replace a narrative with `text` (native text fields hand over whole strings); stored as
    /// the minimal character edit, so concurrent typing elsewhere is kept.
    pub fn update_text(&self, id: DocumentId, field: NoteText, text: &str) -> Result<()> {
        self.note_edit(
            id,
            "edit text",
            Reindex::No,
            Durability::ProcessCrash,
            |doc, _, _| {
                let obj = model::visit_note::text_obj(doc, field)?;
                doc.update_text(&obj, text)?;
                Ok(())
            },
        )
    }

    /// Append an intervention, medication reviewed or teaching entry; returns its id.
    pub fn add_note_entry(
        &self,
        id: DocumentId,
        list: NoteList,
        entry: &ListEntry,
    ) -> Result<String> {
        self.note_edit(
            id,
            "add note entry",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::visit_note::add_list_entry(doc, list, entry),
        )
    }

    /// Record progress toward a care-plan goal.
    pub fn set_goal_progress(
        &self,
        id: DocumentId,
        goal_id: &str,
        status: &str,
        note: &str,
    ) -> Result<()> {
        self.note_edit(
            id,
            "set goal progress",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::visit_note::set_goal_progress(doc, goal_id, status, note),
        )
    }

    /// Set the plan for the next visit.
    pub fn set_next_visit(&self, id: DocumentId, next: &str) -> Result<()> {
        self.note_edit(
            id,
            "set next visit",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::visit_note::set_next_visit(doc, next),
        )
    }

    /// Sign the note (clinicians) with this device's key: an Ed25519 signature over the
    /// document id, heads, the hash of the canonical rendering at those heads, signer, device,
    /// role and time (see `model::signing`). Afterwards the body refuses edits; only addenda are
    /// added.
    pub fn sign(&self, id: DocumentId) -> Result<Signature> {
        self.require_role(&[Role::Clinician], "sign notes")?;
        let role = self.role;
        let key = self.with(|inner| inner.signing_key())?;
        // Signature, index rows and the `signed` audit row in one transaction.
        self.edit_with(
            id,
            DocKind::VisitNote,
            "sign",
            Reindex::Yes,
            Durability::PowerLoss,
            Some(AuditAction::Signed),
            |loaded, actor, now| {
                // Open conflicts first: once signed, the body can no longer be changed to
                // resolve them.
                refuse_open_conflicts(&loaded.doc)?;
                if loaded.cache.signed {
                    return Err(Error::NoteSigned(id));
                }
                model::signing::sign(&mut loaded.doc, id, &key, actor, role, now)
            },
        )?;
        self.read_loaded(id, None, |loaded| {
            // The entry just written (whether or not this device's key list vouches for it).
            let heads: Vec<String> = loaded
                .doc
                .get_heads()
                .iter()
                .map(|h| h.to_string())
                .collect();
            loaded
                .ledger
                .signatures()
                .find(|e| heads.contains(&e.change))
                .and_then(Signature::from_entry)
                .ok_or_else(|| Error::Corrupt("the signature just written is unreadable".into()))
        })
    }

    /// Add an addendum (a correction or late entry, with author and time) to a signed note.
    pub fn add_addendum(&self, id: DocumentId, text: &str) -> Result<String> {
        self.edit_loaded(
            id,
            DocKind::VisitNote,
            "add addendum",
            Reindex::Yes,
            Durability::PowerLoss,
            |loaded, actor, now| {
                if !loaded.cache.signed {
                    return Err(Error::InvalidInput(
                        "addenda are for signed notes; edit the draft instead".into(),
                    ));
                }
                model::visit_note::add_addendum(&mut loaded.doc, actor, now, text)
            },
        )
    }

    /// Re-verify the note's signature against this device's copy of the agency's keys and
    /// render it as signed (at the signature heads).
    pub fn verify_signature(&self, id: DocumentId) -> Result<SignatureCheck> {
        self.read_loaded(id, None, |loaded| {
            model::expect_kind(&loaded.doc, id, DocKind::VisitNote)?;
            Ok(check_signature(id, loaded))
        })
    }

    /// The signed note for printing or sending (audited as `exported`): verified first, then
    /// the signed rendering with signer, device, time, signature and addenda, as JSON.
    pub fn export_signed(&self, id: DocumentId) -> Result<String> {
        let (check, addenda) = self.read_loaded(id, Some(AuditAction::Exported), |loaded| {
            model::expect_kind(&loaded.doc, id, DocKind::VisitNote)?;
            let check = check_signature(id, loaded);
            let note = VisitNote::read(id, &mut loaded.doc, &loaded.ledger);
            Ok((check, note.addenda))
        })?;
        match check {
            SignatureCheck::Valid {
                rendering,
                signature,
            } => {
                let body: serde_json::Value = serde_json::from_str(&rendering)?;
                Ok(serde_json::json!({
                    "documentId": id.to_string(),
                    "verified": true,
                    "signedBy": signature.signed_by,
                    "deviceId": signature.device_id,
                    "role": signature.role,
                    "signedAtMs": signature.signed_at_ms,
                    "heads": signature.heads,
                    "contentHash": signature.content_hash,
                    "signature": signature.signature,
                    "body": body,
                    "addenda": addenda,
                })
                .to_string())
            }
            SignatureCheck::NotSigned => Err(Error::InvalidInput(
                "note is not signed; only signed notes are exported as signed".into(),
            )),
            SignatureCheck::Unverified { .. } => Err(Error::InvalidInput(
                "the signing device's key is not known here yet; fetch the agency's keys".into(),
            )),
            SignatureCheck::HeadsMissing => Err(Error::InvalidInput(
                "the signed version has not fully synced to this device yet".into(),
            )),
        }
    }

    /// Changes of a signed note that are not part of the signed version, and tampering, for
    /// review (from the index; a burst of typing by one author is one item).
    pub fn post_signature_changes(&self, id: DocumentId) -> Result<Vec<ReviewItem>> {
        self.with(|inner| {
            // The index is written with each document write; a freshly loaded document may
            // hold items not yet written (a rebuilt ledger), so read them from memory when loaded.
            if let Some(loaded) = inner.docs.get_mut(&id) {
                loaded.update_ledger();
                let mut items = loaded.ledger.review_items().to_vec();
                items.sort_by(|a, b| a.id.cmp(&b.id));
                return Ok(items);
            }
            let mut stmt = inner.conn.prepare_cached(
                "SELECT item_json FROM review_items WHERE doc_id = ?1 ORDER BY change",
            )?;
            let rows = stmt.query_map([id.as_bytes()], |r| r.get::<_, String>(0))?;
            rows.map(|r| Ok(serde_json::from_str(&r?)?)).collect()
        })
    }

    // ----- conflicts and history -----

    /// Open conflicts of one document.
    pub fn conflicts(&self, id: DocumentId) -> Result<Vec<Conflict>> {
        Ok(self
            .open_conflicts()?
            .into_iter()
            .filter(|c| c.document_id == id)
            .map(|c| c.conflict)
            .collect())
    }

    /// Every open conflict in the store, from the index.
    pub fn open_conflicts(&self) -> Result<Vec<OpenConflict>> {
        self.with(|inner| {
            let mut stmt = inner.conn.prepare_cached(
                "SELECT doc_id, path, values_json FROM conflicts ORDER BY doc_id, path",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            rows.map(|r| {
                let (doc, path, values) = r?;
                let values: Vec<ConflictValue> = serde_json::from_str(&values)?;
                Ok(OpenConflict {
                    document_id: doc_id_from_sql(doc)?,
                    conflict: Conflict { path, values },
                })
            })
            .collect()
        })
    }

    /// Resolve a conflict on a scalar field by choosing one of its values.
    ///
    /// `listed` is the conflict as the caller saw it (from [`Store::conflicts`]) and `choice`
    /// the [`ConflictValue::id`] of the chosen value. If the field's set of values is no longer
    /// the one listed (a sync added or removed one, someone resolved it), nothing is written and
    /// the call fails with [`Error::ConflictChanged`]: list again and let the person choose
    /// again. The choice, who made it, when, and the values it replaced are appended to the
    /// document's `resolutions` list in the same change, and the `conflict-resolved` audit row in
    /// the same transaction.
    pub fn resolve_conflict(&self, id: DocumentId, listed: &Conflict, choice: &str) -> Result<()> {
        let kind = self.read(id, None, |doc| {
            model::root_info(doc)
                .kind
                .ok_or_else(|| Error::InvalidInput("document has no kind".into()))
        })?;
        let path = listed.path.as_str();
        self.edit_with(
            id,
            kind,
            "resolve conflict",
            Reindex::Yes,
            Durability::PowerLoss,
            Some(AuditAction::ConflictResolved),
            |loaded, actor, now| {
                if kind == DocKind::VisitNote
                    && loaded.cache.signed
                    && !path.starts_with("addenda/")
                {
                    return Err(Error::NoteSigned(id));
                }
                let doc = &mut loaded.doc;
                let changed = || Error::ConflictChanged {
                    path: path.to_owned(),
                };
                let (parent, prop) = model::resolve_path(doc, path).map_err(|_| changed())?;
                let current = model::conflicts::conflict_at(doc, &parent, prop.clone(), path)
                    .ok_or_else(changed)?;
                if current.value_ids() != listed.value_ids() {
                    return Err(changed());
                }
                let chosen = current
                    .values
                    .iter()
                    .find(|v| v.id == choice)
                    .ok_or_else(|| Error::ItemNotFound {
                        what: "conflict value",
                        id: choice.to_owned(),
                    })?
                    .value
                    .clone();
                let scalar = model::json_to_scalar(&chosen).ok_or_else(|| {
                    Error::InvalidInput(
                        "only scalar fields can be resolved by choice; edit the object instead"
                            .into(),
                    )
                })?;
                doc.put(&parent, prop, scalar)?;
                let list = model::ensure_obj(
                    doc,
                    &automerge::ROOT,
                    "resolutions",
                    automerge::ObjType::List,
                )?;
                let at = doc.length(&list);
                let entry = doc.insert_object(&list, at, automerge::ObjType::Map)?;
                doc.put(&entry, "path", path)?;
                doc.put(&entry, "value", chosen.to_string())?;
                doc.put(&entry, "replaced", serde_json::to_string(&current.values)?)?;
                doc.put(&entry, "resolvedBy", actor.user_id.as_str())?;
                doc.put(&entry, "resolvedAt", now)?;
                Ok(())
            },
        )
    }

    /// Every change of a document with its author and time.
    pub fn history(&self, id: DocumentId) -> Result<Vec<HistoryEntry>> {
        self.read(id, None, |doc| Ok(model::history(doc)))
    }

    /// Field paths one change touched (`change` in hex, from [`HistoryEntry::change`]).
    pub fn change_fields(&self, id: DocumentId, change: &str) -> Result<Vec<String>> {
        let hash: automerge::ChangeHash = change
            .parse()
            .map_err(|_| Error::InvalidInput("change hash is not 64 hex digits".into()))?;
        self.read(id, None, |doc| {
            let c = doc
                .get_change_by_hash(&hash)
                .ok_or_else(|| Error::ItemNotFound {
                    what: "change",
                    id: change.to_owned(),
                })?;
            Ok(model::changed_fields(doc, &c))
        })
    }

    // ----- lists (index tables only) -----

    /// Every patient chart in the store.
    pub fn patients(&self) -> Result<Vec<PatientSummary>> {
        self.with(|inner| {
            let mut stmt = inner.conn.prepare_cached("SELECT patient_id, doc_id, agency_id, name FROM patients ORDER BY name, patient_id")?;
            let rows = stmt.query_map([], |r| {
                Ok(PatientSummary {
                    patient_id: r.get(0)?,
                    document_id: doc_id_from_sql(r.get(1)?)?,
                    agency_id: r.get(2)?,
                    name: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn notes_where(&self, clause: &str, arg: Option<&str>) -> Result<Vec<NoteSummary>> {
        let sql = format!(
            "SELECT doc_id, patient_id, visit_date, status, clinician_id, started_at, signed_at FROM notes {clause}
             ORDER BY visit_date, started_at, doc_id"
        );
        self.with(|inner| {
            let mut stmt = inner.conn.prepare_cached(&sql)?;
            let map = |r: &rusqlite::Row<'_>| {
                let status: String = r.get(3)?;
                Ok(NoteSummary {
                    document_id: doc_id_from_sql(r.get(0)?)?,
                    patient_id: r.get(1)?,
                    visit_date: r.get(2)?,
                    status: if status == "signed" {
                        NoteStatus::Signed
                    } else {
                        NoteStatus::Draft
                    },
                    clinician_id: r.get(4)?,
                    started_at_ms: r.get(5)?,
                    signed_at_ms: r.get(6)?,
                })
            };
            let rows = match arg {
                Some(a) => stmt
                    .query_map([a], map)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
                None => stmt
                    .query_map([], map)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            };
            Ok(rows)
        })
    }

    /// Notes of one patient, oldest first.
    pub fn notes_for_patient(&self, patient_id: &str) -> Result<Vec<NoteSummary>> {
        self.notes_where("WHERE patient_id = ?1", Some(patient_id))
    }

    /// Notes of one visit date (`YYYY-MM-DD`).
    pub fn notes_on(&self, date: &str) -> Result<Vec<NoteSummary>> {
        self.notes_where("WHERE visit_date = ?1", Some(date))
    }

    /// Notes with a status.
    pub fn notes_with_status(&self, status: NoteStatus) -> Result<Vec<NoteSummary>> {
        self.notes_where("WHERE status = ?1", Some(status.as_str()))
    }

    /// Drafts not yet signed.
    pub fn drafts(&self) -> Result<Vec<NoteSummary>> {
        self.notes_with_status(NoteStatus::Draft)
    }

    /// Notes with local changes the relay has not confirmed yet.
    pub fn unsynced_notes(&self) -> Result<Vec<NoteSummary>> {
        self.notes_where(
            "WHERE doc_id IN (SELECT doc_id FROM documents WHERE unsynced = 1)",
            None,
        )
    }

    /// Every document with local changes the relay has not confirmed yet.
    pub fn unsynced_documents(&self) -> Result<Vec<DocumentId>> {
        self.with(|inner| {
            let mut stmt = inner.conn.prepare_cached(
                "SELECT doc_id FROM documents WHERE unsynced = 1 ORDER BY doc_id",
            )?;
            let rows = stmt.query_map([], |r| doc_id_from_sql(r.get(0)?))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// Every document id in the store.
    pub fn document_ids(&self) -> Result<Vec<DocumentId>> {
        self.with(|inner| {
            let mut stmt = inner
                .conn
                .prepare_cached("SELECT doc_id FROM documents ORDER BY doc_id")?;
            let rows = stmt.query_map([], |r| doc_id_from_sql(r.get(0)?))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// The local audit trail, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>> {
        self.with(|inner| {
            let mut stmt = inner
                .conn
                .prepare_cached("SELECT at, user_id, device_id, action, doc_id, patient_id FROM audit_log ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok(AuditEntry {
                    at_ms: r.get(0)?,
                    user_id: r.get(1)?,
                    device_id: r.get(2)?,
                    action: r.get(3)?,
                    document_id: r.get::<_, Option<Vec<u8>>>(4)?.map(doc_id_from_sql).transpose()?,
                    patient_id: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    // ----- merging documents from elsewhere -----

    /// Import automerge changes or a saved document (any concatenation of automerge chunks)
    /// for document `id`, updating index and conflict tables in the same transaction. An
    /// unknown id creates the document. Garbage bytes are an error and change nothing.
    pub fn import(&self, id: DocumentId, bytes: &[u8]) -> Result<ImportOutcome> {
        let now = model::now_ms();
        validate_automerge_bytes(bytes)?;
        self.with(|inner| {
            let known = {
                let tx = inner.conn.transaction()?;
                let known = documents::exists(&tx, id)?;
                tx.commit()?;
                known
            };
            if !known {
                let mut doc = model::load_document(bytes)?;
                doc.set_author(Some(inner.author.clone()));
                let mut loaded = LoadedDoc::new(doc, false, inner.keys.clone());
                inner.write(Durability::PowerLoss, |tx, _| {
                    documents::store_new(tx, id, &mut loaded, now, false)
                })?;
                inner.cache(id, loaded)?;
                return Ok(ImportOutcome {
                    created: true,
                    changed: true,
                });
            }
            let author = inner.author.clone();
            inner.ensure_loaded(id, &author)?;
            let result = inner.write(Durability::PowerLoss, |tx, docs| {
                let loaded = docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
                let before = loaded.doc.get_heads();
                loaded.doc.load_incremental(bytes)?;
                if loaded.doc.get_heads() == before {
                    return Ok(false);
                }
                documents::store_merged(tx, id, loaded, now)?;
                Ok(true)
            });
            match result {
                Ok(changed) => Ok(ImportOutcome {
                    created: false,
                    changed,
                }),
                Err(e) => {
                    inner.discard(id);
                    Err(e)
                }
            }
        })
    }

    /// Every change of a document, as bytes another replica can [`Store::import`].
    pub fn export_changes(&self, id: DocumentId) -> Result<Vec<u8>> {
        self.read(id, None, |doc| Ok(doc.save()))
    }

    /// The changes of a document that are not ancestors of `heads`, as bytes another replica
    /// can [`Store::import`].
    pub fn changes_since(
        &self,
        id: DocumentId,
        heads: &[automerge::ChangeHash],
    ) -> Result<Vec<u8>> {
        self.read(id, None, |doc| Ok(doc.save_after(heads)))
    }

    /// Current heads of a document.
    pub fn heads(&self, id: DocumentId) -> Result<Vec<automerge::ChangeHash>> {
        self.read(id, None, |doc| Ok(doc.get_heads()))
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
