//! Documents in memory: loaded on demand, written through to storage, evicted when unused, and
//! changes announced to the other sessions syncing the same document.
//!
//! # One copy per document
//! Each loaded document sits behind its own async mutex. A session holds that lock while it
//! applies a sync message, commits the new changes and generates its reply, so the in-memory
//! document never shows anything that is not on disk to anyone else. If the commit fails the
//! copy is discarded (it holds changes that are not durable) and the next user reloads what is.
//!
//! The lock is never held while storage is *read*: access is decided from the stored row
//! before a document is opened, and a document is loaded before its entry is locked. It is
//! held across the document's own commit (the write of the changes just applied), because
//! releasing it there would show uncommitted changes to other sessions; that wait is per
//! document. automerge work (load, receive, generate, save) runs on the blocking pool
//! ([`DocHub::blocking`]).
//!
//! # Refusing a change
//! [`validate_write`] is the one place where changes from a device, applied to the in-memory
//! copy but not yet committed, can be refused: the caller then discards the copy and the
//! device gets `doc-unavailable`.
//!
//! # Bounded memory
//! At most `max_docs_in_memory` documents are held. Beyond that the least recently used ones
//! that nobody is using right now are dropped, a tenth at a time so a reconnect storm does not
//! scan the table on every load. "Nobody is using" is exact: the table is the only place a
//! handle can be cloned from, under its mutex, so a handle whose only owner is the table is
//! unused.
//!
//! # Forwarding
//! Sessions subscribe to the documents they sync. After a commit, every other subscriber is
//! marked in its [`Inbox`]: a set of changed document ids plus a wake-up. A slow session never
//! blocks a writer and never loses a notification; it just finds several ids when it wakes, and
//! generates one sync message each from its own sync state.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use automerge::{Automerge, Change, ChangeHash};
use fieldchart_core::model::NoteLedger;
use fieldchart_core::protocol::DocumentId;
use tokio::sync::{Notify, OwnedMutexGuard};

use crate::error::{Error, Result};
use crate::metrics::{DIRTY_DISCARDS, DOC_WRITES, DOCS_LOADED};
use crate::storage::{
    AuditEvent, DocMeta, DocumentData, DocumentWrite, Seq, Storage, StoredDocument,
};

/// Identifies a session to the hub (for subscriptions and "don't notify yourself").
pub type SessionId = u64;

/// How often `open` retries a document that was discarded while it waited for the lock.
const OPEN_ATTEMPTS: usize = 8;

type Entry = Arc<tokio::sync::Mutex<EntryState>>;

enum EntryState {
    /// Just put in the table; the first locker loads it.
    Unloaded,
    Loaded(Box<LoadedDoc>),
    /// Not in storage, failed to load, or discarded: look it up again.
    Gone,
}

struct LoadedDoc {
    doc: Automerge,
    meta: DocMeta,
    /// Chunks stored since the last snapshot.
    chunks: u32,
    /// The stored heads this copy was loaded from or last committed: what the next write
    /// builds on ([`Storage::write_document_on`]).
    stored_heads: Vec<ChangeHash>,
    /// Signatures and identity fields seen in the stored history (built on first write; see
    /// `crate::signatures`).
    ledger: Option<NoteLedger>,
}

struct Slot {
    entry: Entry,
    last_used: u64,
}

#[derive(Default)]
struct Table {
    docs: HashMap<DocumentId, Slot>,
    clock: u64,
    subscribers: HashMap<DocumentId, HashMap<SessionId, Arc<Inbox>>>,
}

/// The loaded documents. See the module docs.
pub struct DocHub {
    storage: Arc<dyn Storage>,
    capacity: usize,
    compact_after_chunks: u32,
    table: Mutex<Table>,
}

impl std::fmt::Debug for DocHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocHub")
            .field("capacity", &self.capacity)
            .field("loaded", &self.loaded())
            .finish()
    }
}

/// Exclusive use of one loaded document.
///
/// The guard is dirty from the moment the document is handed out mutably
/// ([`DocGuard::doc_mut`]) until [`DocHub::commit`] stores what was applied. A dirty guard
/// that is dropped on any other path — an early `?` return, a panic unwinding through the
/// session, a cancelled future — throws the in-memory copy away (the entry goes back to
/// "unloaded", so the next user reloads what storage holds): no session can ever be answered
/// from changes that were not stored.
pub struct DocGuard {
    id: DocumentId,
    guard: OwnedMutexGuard<EntryState>,
    dirty: bool,
    /// Heads when the guard became dirty: if they are still the heads, nothing was applied.
    clean_heads: Vec<ChangeHash>,
}

impl Drop for DocGuard {
    fn drop(&mut self) {
        if self.dirty {
            metrics::counter!(DIRTY_DISCARDS).increment(1);
            tracing::warn!(doc = %self.id, "uncommitted in-memory changes discarded; the document will be reloaded from storage");
            *self.guard = EntryState::Unloaded;
        }
    }
}

impl std::fmt::Debug for DocGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocGuard")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl DocGuard {
    fn loaded(&self) -> &LoadedDoc {
        match &*self.guard {
            EntryState::Loaded(doc) => doc,
            _ => unreachable!("a DocGuard is only made for a loaded document"),
        }
    }

    fn loaded_mut(&mut self) -> &mut LoadedDoc {
        match &mut *self.guard {
            EntryState::Loaded(doc) => doc,
            _ => unreachable!("a DocGuard is only made for a loaded document"),
        }
    }

    /// The document id.
    pub fn id(&self) -> DocumentId {
        self.id
    }

    /// The document, as stored.
    pub fn doc(&self) -> &Automerge {
        &self.loaded().doc
    }

    /// The document, to apply a sync message to. Whatever is applied must be committed with
    /// [`DocHub::commit`] or thrown away with [`DocHub::discard`] before the guard is dropped.
    pub fn doc_mut(&mut self) -> &mut Automerge {
        if !self.dirty {
            self.dirty = true;
            self.clean_heads = self.loaded().doc.get_heads();
        }
        &mut self.loaded_mut().doc
    }

    /// The document with its signature ledger, built from the stored history on first use.
    /// Call it before applying a device's changes, so the ledger trusts only what is stored.
    pub fn doc_and_ledger(&mut self) -> (&Automerge, &mut NoteLedger) {
        let LoadedDoc { doc, ledger, .. } = self.loaded_mut();
        let ledger = ledger.get_or_insert_with(|| crate::signatures::trusted_ledger(doc));
        (doc, ledger)
    }

    /// Whether the signature ledger is held (for tests: it must never outlive the copy).
    #[cfg(test)]
    fn has_ledger(&self) -> bool {
        self.loaded().ledger.is_some()
    }

    /// Who the document belongs to.
    pub fn meta(&self) -> &DocMeta {
        &self.loaded().meta
    }

    /// Current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc().get_heads()
    }

    /// Whether the in-memory copy may hold changes that are not stored.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// After applying something that brought no change (a sync message with nothing new):
    /// if the heads are those the guard had when it became dirty, the copy equals what is
    /// stored again, so it need not be discarded. Returns whether the guard is clean.
    pub fn clean_if_unchanged(&mut self) -> bool {
        if self.dirty && self.loaded().doc.get_heads() == self.clean_heads {
            self.dirty = false;
        }
        !self.dirty
    }
}

/// Result of [`DocHub::create`].
#[derive(Debug)]
pub enum Created {
    /// Stored; the guard holds the new document.
    Stored(DocGuard),
    /// The relay already holds a document with this id; nothing was written. The document
    /// handed to [`DocHub::create`] comes back (the caller may resync it against the stored
    /// one).
    Exists(Box<Automerge>),
}

/// Changed-document notifications for one session.
#[derive(Debug, Default)]
pub struct Inbox {
    changed: Mutex<HashSet<DocumentId>>,
    wake: Notify,
}

impl Inbox {
    fn mark(&self, id: DocumentId) {
        self.changed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id);
        self.wake.notify_one();
    }

    /// Wait until at least one document was marked since the last [`Inbox::take`].
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// The documents marked since the last call.
    pub fn take(&self) -> Vec<DocumentId> {
        self.changed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect()
    }
}

impl DocHub {
    /// An empty hub over `storage`.
    pub fn new(storage: Arc<dyn Storage>, capacity: usize, compact_after_chunks: u32) -> DocHub {
        DocHub {
            storage,
            capacity: capacity.max(1),
            compact_after_chunks,
            table: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Documents currently in the table.
    pub fn loaded(&self) -> usize {
        self.table().docs.len()
    }

    /// Whether the document is in memory right now (for tests and diagnostics).
    pub fn is_loaded(&self, id: DocumentId) -> bool {
        self.table().docs.contains_key(&id)
    }

    /// The table entry for `id`, made if missing; marks it used and evicts if over capacity.
    fn entry(&self, id: DocumentId) -> Entry {
        let mut table = self.table();
        table.clock += 1;
        let now = table.clock;
        let entry = {
            let slot = table.docs.entry(id).or_insert_with(|| Slot {
                entry: Arc::new(tokio::sync::Mutex::new(EntryState::Unloaded)),
                last_used: now,
            });
            slot.last_used = now;
            Arc::clone(&slot.entry)
        };
        if table.docs.len() > self.capacity {
            evict(&mut table, self.capacity - self.capacity / 10);
        }
        metrics::gauge!(DOCS_LOADED).set(table.docs.len() as f64);
        entry
    }

    /// Drop `id` from the table if it still maps to `entry`.
    fn forget(&self, id: DocumentId, entry: &Entry) {
        let mut table = self.table();
        if table
            .docs
            .get(&id)
            .is_some_and(|slot| Arc::ptr_eq(&slot.entry, entry))
        {
            table.docs.remove(&id);
        }
        metrics::gauge!(DOCS_LOADED).set(table.docs.len() as f64);
    }

    /// Lock the document, loading it from storage if needed. `None` if the relay does not hold
    /// it.
    ///
    /// No lock is held while storage is read: the document is loaded first and installed
    /// only if nobody else installed it meanwhile (two sessions may load the same document
    /// at once; one copy is kept).
    pub async fn open(&self, id: DocumentId) -> Result<Option<DocGuard>> {
        for _ in 0..OPEN_ATTEMPTS {
            let entry = self.entry(id);
            {
                let guard = Arc::clone(&entry).lock_owned().await;
                match &*guard {
                    EntryState::Loaded(_) => {
                        return Ok(Some(DocGuard {
                            id,
                            guard,
                            dirty: false,
                            clean_heads: Vec::new(),
                        }));
                    }
                    EntryState::Gone => continue,
                    EntryState::Unloaded => {}
                }
            }
            let loaded = self.load(id).await;
            let mut guard = Arc::clone(&entry).lock_owned().await;
            match &*guard {
                // Installed by someone else while we loaded: theirs may be newer; keep it.
                EntryState::Loaded(_) => {
                    return Ok(Some(DocGuard {
                        id,
                        guard,
                        dirty: false,
                        clean_heads: Vec::new(),
                    }));
                }
                EntryState::Gone => continue,
                EntryState::Unloaded => {}
            }
            return match loaded {
                Ok(Some(loaded)) => {
                    *guard = EntryState::Loaded(Box::new(loaded));
                    Ok(Some(DocGuard {
                        id,
                        guard,
                        dirty: false,
                        clean_heads: Vec::new(),
                    }))
                }
                Ok(None) => {
                    *guard = EntryState::Gone;
                    self.forget(id, &entry);
                    Ok(None)
                }
                Err(e) => {
                    *guard = EntryState::Gone;
                    self.forget(id, &entry);
                    Err(e)
                }
            };
        }
        Err(Error::Storage(format!(
            "document {id} was discarded {OPEN_ATTEMPTS} times while opening"
        )))
    }

    async fn load(&self, id: DocumentId) -> Result<Option<LoadedDoc>> {
        let Some(stored) = self.storage.load_document(id).await? else {
            return Ok(None);
        };
        // Loading replays the document's history: CPU work that must not stall the sockets.
        let loaded = tokio::task::spawn_blocking(move || build(stored)).await??;
        Ok(Some(loaded))
    }

    /// Run `work` on the guarded document on the blocking pool (automerge's receive, generate
    /// and save are CPU work proportional to the document), and hand the guard back. If `work`
    /// panics, the copy is discarded, as it may hold half-applied changes.
    pub async fn blocking<T, F>(&self, guard: DocGuard, work: F) -> Result<(DocGuard, T)>
    where
        T: Send + 'static,
        F: FnOnce(&mut DocGuard) -> T + Send + 'static,
    {
        let id = guard.id;
        let entry = Arc::clone(OwnedMutexGuard::mutex(&guard.guard));
        let task = tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            let out = work(&mut guard);
            (guard, out)
        });
        match task.await {
            Ok(done) => Ok(done),
            Err(e) => {
                let mut state = entry.lock().await;
                *state = EntryState::Gone;
                drop(state);
                self.forget(id, &entry);
                Err(e.into())
            }
        }
    }

    /// Store a new document (a `create` write of `snapshot`, its `doc.save()`, with `audit` as
    /// its `write` row) and hold it. If the relay already has a document with this id, nothing
    /// is written.
    pub async fn create(
        &self,
        id: DocumentId,
        doc: Automerge,
        snapshot: Vec<u8>,
        meta: DocMeta,
        audit: AuditEvent,
    ) -> Result<Created> {
        self.create_with_ledger(id, doc, snapshot, meta, audit, None)
            .await
    }

    /// [`DocHub::create`], keeping `ledger` as the stored document's signature ledger, so the
    /// first later message with changes does not rebuild it from the history.
    ///
    /// `ledger` must equal what `crate::signatures::trusted_ledger(&doc)` would build: it is
    /// kept only if the write commits (a refused or failed create drops it with the copy), and
    /// dropped by every later path that replaces the copy (rebase, reload).
    pub async fn create_with_ledger(
        &self,
        id: DocumentId,
        doc: Automerge,
        snapshot: Vec<u8>,
        meta: DocMeta,
        audit: AuditEvent,
        ledger: Option<NoteLedger>,
    ) -> Result<Created> {
        // Existence is decided by the write itself (every backend refuses to create a stored
        // id), never by loading the stored document; no separate read first.
        for _ in 0..OPEN_ATTEMPTS {
            let entry = self.entry(id);
            let mut guard = Arc::clone(&entry).lock_owned().await;
            match &*guard {
                EntryState::Loaded(_) => return Ok(Created::Exists(Box::new(doc))),
                EntryState::Gone => continue,
                EntryState::Unloaded => {}
            }
            let write = DocumentWrite {
                document_id: id,
                meta: meta.clone(),
                create: true,
                data: DocumentData::Snapshot(snapshot),
                heads: doc.get_heads(),
                audit: Some(audit),
            };
            // The write is the document's own commit, so its lock is held: nobody may see the
            // document before it is durable. The write refuses an id stored meanwhile.
            return match self.storage.write_document(write).await {
                Ok(_) => {
                    metrics::counter!(DOC_WRITES).increment(1);
                    let stored_heads = doc.get_heads();
                    *guard = EntryState::Loaded(Box::new(LoadedDoc {
                        doc,
                        meta,
                        chunks: 0,
                        stored_heads,
                        ledger,
                    }));
                    Ok(Created::Stored(DocGuard {
                        id,
                        guard,
                        dirty: false,
                        clean_heads: Vec::new(),
                    }))
                }
                Err(Error::Conflict(_)) => {
                    // Stored first by another session or relay process; use theirs.
                    *guard = EntryState::Gone;
                    self.forget(id, &entry);
                    Ok(Created::Exists(Box::new(doc)))
                }
                Err(e) => {
                    *guard = EntryState::Gone;
                    self.forget(id, &entry);
                    Err(e)
                }
            };
        }
        Err(Error::Storage(format!(
            "document {id} was discarded {OPEN_ATTEMPTS} times while creating"
        )))
    }

    /// Durably store `changes` (just applied to the guarded document), with `audit` as their
    /// `write` row, then tell the other sessions syncing it. Every `compact_after_chunks`
    /// writes the document is stored as one snapshot instead, replacing its chunks.
    ///
    /// On error the in-memory copy is discarded (the guard is consumed) and the error returned:
    /// nothing was stored and nothing may be acknowledged.
    pub async fn commit(
        &self,
        mut guard: DocGuard,
        changes: &[Change],
        audit: AuditEvent,
        origin: SessionId,
    ) -> Result<(DocGuard, Seq)> {
        // Each write names the stored heads it builds on. Another relay process on the same
        // database may have written the document since this copy was loaded: then the write is
        // refused as stale, and this copy is rebased on what is stored (reload, merge) and
        // written again. `changes` stay what is new relative to the stored document either way.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let compact = guard.loaded().chunks + 1 >= self.compact_after_chunks;
            let data = if compact {
                let (saved, snapshot) = self.blocking(guard, |g| g.doc().save()).await?;
                guard = saved;
                DocumentData::Snapshot(snapshot)
            } else {
                DocumentData::Chunk(
                    changes
                        .iter()
                        .flat_map(|c| c.raw_bytes().iter().copied())
                        .collect(),
                )
            };
            let heads = guard.heads();
            let write = DocumentWrite {
                document_id: guard.id,
                meta: guard.meta().clone(),
                create: false,
                data,
                heads: heads.clone(),
                audit: Some(audit.clone()),
            };
            let base = guard.loaded().stored_heads.clone();
            match self.storage.write_document_on(write, base).await {
                Ok(seq) => {
                    metrics::counter!(DOC_WRITES).increment(1);
                    guard.dirty = false;
                    guard.clean_heads.clear();
                    let loaded = guard.loaded_mut();
                    loaded.chunks = if compact { 0 } else { loaded.chunks + 1 };
                    loaded.stored_heads = heads;
                    self.notify(guard.id, origin);
                    return Ok((guard, seq));
                }
                Err(Error::Stale(_)) if attempt < OPEN_ATTEMPTS => {
                    guard = self.rebase(guard).await?;
                }
                Err(e) => {
                    self.discard(guard);
                    return Err(e);
                }
            }
        }
    }

    /// Merge what storage holds now into the guarded (dirty) copy: after another relay process
    /// wrote the document. The result holds the stored document plus this copy's uncommitted
    /// changes, and builds on the stored heads.
    async fn rebase(&self, guard: DocGuard) -> Result<DocGuard> {
        let id = guard.id;
        let Some(stored) = self.storage.load_document(id).await? else {
            return Err(Error::NotFound("document"));
        };
        let (guard, merged) = self
            .blocking(guard, move |g| -> Result<()> {
                let mut fresh = build(stored)?;
                let loaded = g.loaded_mut();
                fresh.doc.merge(&mut loaded.doc)?;
                loaded.doc = fresh.doc;
                loaded.chunks = fresh.chunks;
                loaded.stored_heads = fresh.stored_heads;
                loaded.ledger = None;
                Ok(())
            })
            .await?;
        // On error the dirty guard is dropped, which discards the copy.
        merged?;
        tracing::debug!(doc = %id, "document changed by another relay process; rebased the write");
        Ok(guard)
    }

    /// Another relay process committed a change to `id` (see [`crate::notify`]): drop the copy
    /// held here, so the next use reloads what is stored, and wake every session syncing it.
    pub async fn invalidate(&self, id: DocumentId) {
        let entry = self
            .table()
            .docs
            .get(&id)
            .map(|slot| Arc::clone(&slot.entry));
        if let Some(entry) = entry {
            let mut state = entry.lock().await;
            if matches!(*state, EntryState::Loaded(_)) {
                *state = EntryState::Unloaded;
            }
        }
        let table = self.table();
        for inbox in table
            .subscribers
            .get(&id)
            .into_iter()
            .flatten()
            .map(|(_, i)| i)
        {
            inbox.mark(id);
        }
    }

    /// [`DocHub::invalidate`] every document held or subscribed to: after changes may have
    /// been missed (the notification connection was lost).
    pub async fn invalidate_all(&self) {
        let ids: HashSet<DocumentId> = {
            let table = self.table();
            table
                .docs
                .keys()
                .chain(table.subscribers.keys())
                .copied()
                .collect()
        };
        for id in ids {
            self.invalidate(id).await;
        }
    }

    /// Throw away the in-memory copy (it holds changes that will not be stored); the next
    /// `open` reloads the document from storage.
    pub fn discard(&self, mut guard: DocGuard) {
        guard.dirty = false;
        *guard.guard = EntryState::Gone;
        let entry = Arc::clone(OwnedMutexGuard::mutex(&guard.guard));
        self.forget(guard.id, &entry);
    }

    /// Send changes of `id` to `inbox` from now on.
    pub fn subscribe(&self, id: DocumentId, session: SessionId, inbox: &Arc<Inbox>) {
        self.table()
            .subscribers
            .entry(id)
            .or_default()
            .insert(session, Arc::clone(inbox));
    }

    /// Stop sending changes of `id` to `session`.
    pub fn unsubscribe(&self, id: DocumentId, session: SessionId) {
        let mut table = self.table();
        if let Some(subs) = table.subscribers.get_mut(&id) {
            subs.remove(&session);
            if subs.is_empty() {
                table.subscribers.remove(&id);
            }
        }
    }

    /// Drop every subscription of `session` (after a panic left its own list unreliable).
    pub fn unsubscribe_session(&self, session: SessionId) {
        self.table().subscribers.retain(|_, subs| {
            subs.remove(&session);
            !subs.is_empty()
        });
    }

    fn notify(&self, id: DocumentId, origin: SessionId) {
        let table = self.table();
        for (session, inbox) in table.subscribers.get(&id).into_iter().flatten() {
            if *session != origin {
                inbox.mark(id);
            }
        }
    }
}

/// Why [`validate_write`] refused changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteRefusal {
    /// The changes move the document to another patient or agency; a document's owner is
    /// fixed when it is first stored.
    MovesOwner,
    /// The changes tamper with a signed note (see `crate::signatures`).
    Signatures(crate::signatures::Refusal),
}

impl std::fmt::Display for WriteRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteRefusal::MovesOwner => {
                f.write_str("the changes would move the document to another patient or agency")
            }
            WriteRefusal::Signatures(r) => write!(f, "the changes {r}"),
        }
    }
}

/// Decide whether `changes` from a device, already applied to `doc` (the in-memory copy of a
/// stored document owned as `meta`) but not yet committed, may be committed. Runs on the
/// blocking pool, so it may do CPU work (checks of signatures belong here too).
pub fn validate_write(
    meta: &DocMeta,
    doc: &Automerge,
    changes: &[Change],
) -> std::result::Result<(), WriteRefusal> {
    if changes.is_empty() {
        return Ok(());
    }
    let fields = fieldchart_core::protocol::classify(doc);
    if fields.agency_id.as_deref() != Some(meta.agency_id.as_str())
        || fields.patient_id.as_deref() != Some(meta.patient_id.as_str())
    {
        return Err(WriteRefusal::MovesOwner);
    }
    Ok(())
}

/// Drop least recently used, unused entries until `target` remain (or none is unused).
fn evict(table: &mut Table, target: usize) {
    let mut unused: Vec<(u64, DocumentId)> = table
        .docs
        .iter()
        .filter(|(_, slot)| Arc::strong_count(&slot.entry) == 1)
        .map(|(id, slot)| (slot.last_used, *id))
        .collect();
    unused.sort_unstable();
    let excess = table.docs.len().saturating_sub(target);
    for (_, id) in unused.into_iter().take(excess) {
        table.docs.remove(&id);
    }
}

fn build(stored: StoredDocument) -> Result<LoadedDoc> {
    // Bytes automerge would abort on (an allocation it cannot make) are refused first.
    (stored.snapshot.iter().chain(&stored.chunks))
        .try_for_each(|b| fieldchart_core::model::import_guard::check_chunks(b))
        .map_err(|e| Error::Storage(format!("stored document: {e}")))?;
    let mut doc = match &stored.snapshot {
        Some(bytes) => Automerge::load(bytes)?,
        None => Automerge::new(),
    };
    for chunk in &stored.chunks {
        doc.load_incremental(chunk)?;
    }
    let chunks = u32::try_from(stored.chunks.len()).unwrap_or(u32::MAX);
    Ok(LoadedDoc {
        doc,
        meta: stored.meta,
        chunks,
        stored_heads: stored.heads,
        ledger: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AgencyId, DeviceId, PatientId, UserId};
    use crate::storage::{AuditAction, MemoryStorage};
    use automerge::transaction::Transactable;

    fn meta() -> DocMeta {
        DocMeta {
            agency_id: AgencyId::new("agc_1"),
            patient_id: PatientId::new("pat_1"),
            kind: "visit-note".into(),
        }
    }

    fn audit(id: DocumentId) -> AuditEvent {
        AuditEvent {
            at_ms: 1,
            agency_id: AgencyId::new("agc_1"),
            user_id: UserId::new("usr_1"),
            device_id: DeviceId::new("dev_1"),
            document_id: id,
            patient_id: Some(PatientId::new("pat_1")),
            action: AuditAction::Write,
            heads: vec![],
        }
    }

    fn edit(doc: &mut Automerge, value: i64) -> Vec<Change> {
        let before = doc.get_heads();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(automerge::ROOT, "v", value).map(|_| ())
        })
        .expect("edit");
        doc.get_changes(&before)
    }

    async fn create(hub: &DocHub) -> DocumentId {
        let id = DocumentId::random();
        let mut doc = Automerge::new();
        edit(&mut doc, 0);
        assert!(matches!(
            hub.create(id, doc.clone(), doc.save(), meta(), audit(id))
                .await
                .expect("create"),
            Created::Stored(_)
        ));
        id
    }

    #[tokio::test]
    async fn documents_load_on_demand_and_unused_ones_are_evicted_beyond_capacity() {
        let storage = Arc::new(MemoryStorage::new());
        let hub = DocHub::new(storage.clone(), 10, 64);
        let mut ids = Vec::new();
        for _ in 0..25 {
            ids.push(create(&hub).await);
        }
        assert!(hub.loaded() <= 10, "{} loaded", hub.loaded());
        // The oldest were evicted, and come back from storage intact.
        assert!(!hub.is_loaded(ids[0]));
        let guard = hub.open(ids[0]).await.expect("open").expect("stored");
        assert_eq!(guard.meta(), &meta());
        // A document in use is never evicted, however old.
        for _ in 0..25 {
            create(&hub).await;
        }
        assert!(hub.is_loaded(ids[0]));
        drop(guard);
        assert!(
            hub.open(DocumentId::random())
                .await
                .expect("open")
                .is_none()
        );
        assert!(hub.loaded() <= 10);
    }

    #[tokio::test]
    async fn a_dirty_guard_dropped_without_commit_discards_the_copy_on_every_path() {
        let storage = Arc::new(MemoryStorage::new());
        let hub = Arc::new(DocHub::new(storage.clone(), 10, 64));
        let id = create(&hub).await;
        let stored = hub.open(id).await.expect("open").expect("stored").heads();

        // An early return (dropped guard) after applying a change in memory.
        {
            let mut guard = hub.open(id).await.expect("open").expect("stored");
            edit(guard.doc_mut(), 1);
            assert!(guard.is_dirty());
        }
        let guard = hub.open(id).await.expect("open").expect("stored");
        assert_eq!(guard.heads(), stored, "the uncommitted change is gone");
        assert!(!guard.is_dirty(), "reading does not make a guard dirty");
        drop(guard);

        // A panic in the task that holds the guard.
        let task = {
            let hub = Arc::clone(&hub);
            tokio::spawn(async move {
                let mut guard = hub.open(id).await.expect("open").expect("stored");
                edit(guard.doc_mut(), 2);
                panic!("injected: the task dies holding an uncommitted document");
            })
        };
        assert!(task.await.is_err_and(|e| e.is_panic()));
        let guard = hub.open(id).await.expect("open").expect("stored");
        assert_eq!(guard.heads(), stored, "the uncommitted change is gone");
        drop(guard);

        // A cancelled future (a session dropped mid-message) holding a dirty guard.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let hub = Arc::clone(&hub);
            tokio::spawn(async move {
                let mut guard = hub.open(id).await.expect("open").expect("stored");
                edit(guard.doc_mut(), 3);
                let _ = ready_tx.send(());
                std::future::pending::<()>().await;
                drop(guard);
            })
        };
        ready_rx.await.expect("the task applied its change");
        task.abort();
        assert!(task.await.is_err_and(|e| e.is_cancelled()));
        let guard = hub.open(id).await.expect("open").expect("stored");
        assert_eq!(guard.heads(), stored, "the uncommitted change is gone");

        // A committed change stays.
        let mut guard = guard;
        let changes = edit(guard.doc_mut(), 4);
        let (guard, _) = hub
            .commit(guard, &changes, audit(id), 1)
            .await
            .expect("commit");
        let committed = guard.heads();
        drop(guard);
        let guard = hub.open(id).await.expect("open").expect("stored");
        assert_eq!(guard.heads(), committed);
        assert_ne!(committed, stored);
    }

    #[tokio::test]
    async fn commits_are_stored_as_chunks_then_compacted_and_reload_equal() {
        let storage = Arc::new(MemoryStorage::new());
        let hub = DocHub::new(storage.clone(), 10, 4);
        let id = create(&hub).await;
        for i in 1..=6 {
            let mut guard = hub.open(id).await.expect("open").expect("exists");
            let changes = edit(guard.doc_mut(), i);
            hub.commit(guard, &changes, audit(id), 0)
                .await
                .expect("commit");
        }
        let stored = storage
            .load_document(id)
            .await
            .expect("load")
            .expect("stored");
        assert_eq!(
            stored.chunks.len(),
            2,
            "compacted at the 4th write, then two chunks"
        );
        let heads = hub.open(id).await.expect("open").expect("exists").heads();
        assert_eq!(build(stored).expect("build").doc.get_heads(), heads);
    }

    #[tokio::test]
    async fn a_failed_commit_discards_the_copy_and_the_stored_document_stays() {
        let storage = Arc::new(MemoryStorage::new());
        let hub = DocHub::new(storage.clone(), 10, 64);
        let id = create(&hub).await;
        let stored_heads = hub.open(id).await.expect("open").expect("exists").heads();
        storage.set_fail_writes(true);
        let mut guard = hub.open(id).await.expect("open").expect("exists");
        let changes = edit(guard.doc_mut(), 1);
        assert!(hub.commit(guard, &changes, audit(id), 0).await.is_err());
        storage.set_fail_writes(false);
        let reloaded = hub.open(id).await.expect("open").expect("exists");
        assert_eq!(
            reloaded.heads(),
            stored_heads,
            "the unstored change is gone from memory too"
        );
    }

    #[tokio::test]
    async fn other_subscribers_are_told_of_commits_and_the_writer_is_not() {
        let storage = Arc::new(MemoryStorage::new());
        let hub = DocHub::new(storage, 10, 64);
        let id = create(&hub).await;
        let (mine, theirs) = (Arc::new(Inbox::default()), Arc::new(Inbox::default()));
        hub.subscribe(id, 1, &mine);
        hub.subscribe(id, 2, &theirs);
        let mut guard = hub.open(id).await.expect("open").expect("exists");
        let changes = edit(guard.doc_mut(), 1);
        let (mut guard, _) = hub
            .commit(guard, &changes, audit(id), 1)
            .await
            .expect("commit");
        assert_eq!(theirs.take(), vec![id]);
        assert!(mine.take().is_empty());
        theirs.changed().await; // the wake-up was stored for a later wait
        hub.unsubscribe(id, 2);
        let changes = edit(guard.doc_mut(), 2);
        hub.commit(guard, &changes, audit(id), 1)
            .await
            .expect("commit");
        assert!(theirs.take().is_empty());
    }

    #[tokio::test]
    async fn the_ledger_built_while_creating_is_kept_until_the_copy_is_replaced() {
        let storage = Arc::new(MemoryStorage::new());
        let hub = DocHub::new(storage.clone(), 10, 64);
        let id = DocumentId::random();
        let mut doc = Automerge::new();
        edit(&mut doc, 0);
        let ledger = crate::signatures::trusted_ledger(&doc);
        let created = hub
            .create_with_ledger(id, doc.clone(), doc.save(), meta(), audit(id), Some(ledger))
            .await
            .expect("create");
        let Created::Stored(guard) = created else {
            panic!("a new id was not stored");
        };
        assert!(guard.has_ledger(), "kept with the stored copy");
        drop(guard);
        let mut guard = hub.open(id).await.expect("open").expect("stored");
        assert!(guard.has_ledger(), "still there for the next message");

        // A failed commit discards the copy, ledger included; the reload builds it anew.
        storage.set_fail_writes(true);
        let changes = edit(guard.doc_mut(), 1);
        assert!(hub.commit(guard, &changes, audit(id), 0).await.is_err());
        storage.set_fail_writes(false);
        let mut guard = hub.open(id).await.expect("open").expect("stored");
        assert!(!guard.has_ledger());
        guard.doc_and_ledger();
        assert!(guard.has_ledger());
        drop(guard);

        // A create that fails keeps nothing.
        let other = DocumentId::random();
        storage.set_fail_writes(true);
        let ledger = crate::signatures::trusted_ledger(&doc);
        assert!(
            hub.create_with_ledger(
                other,
                doc.clone(),
                doc.save(),
                meta(),
                audit(other),
                Some(ledger)
            )
            .await
            .is_err()
        );
        storage.set_fail_writes(false);
        assert!(!hub.is_loaded(other));
    }

    #[tokio::test]
    async fn creating_an_existing_document_writes_nothing() {
        let storage = Arc::new(MemoryStorage::new());
        let hub = DocHub::new(storage.clone(), 10, 64);
        let id = create(&hub).await;
        let seq = storage.current_seq().await.expect("seq");
        let mut other = Automerge::new();
        edit(&mut other, 9);
        assert!(matches!(
            hub.create(id, other.clone(), other.save(), meta(), audit(id))
                .await
                .expect("create"),
            Created::Exists(_)
        ));
        assert_eq!(storage.current_seq().await.expect("seq"), seq);
        // Not in memory (another relay process's hub): the write itself refuses the id, and
        // the caller gets its document back.
        let other_hub = DocHub::new(storage.clone(), 10, 64);
        let refused = other_hub
            .create(id, other.clone(), other.save(), meta(), audit(id))
            .await
            .expect("create");
        let Created::Exists(back) = refused else {
            panic!("an existing id was stored again");
        };
        assert_eq!(back.get_heads(), other.get_heads());
        assert_eq!(storage.current_seq().await.expect("seq"), seq);
        assert!(!other_hub.is_loaded(id), "the refused copy is not kept");
    }

    #[test]
    fn validate_write_refuses_changes_that_move_the_owner_and_nothing_else() {
        use automerge::transaction::Transactable;
        let mut doc = Automerge::new();
        let put = |doc: &mut Automerge, key: &str, value: &str| {
            let before = doc.get_heads();
            doc.transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(automerge::ROOT, key, value).map(|_| ())
            })
            .expect("edit");
            doc.get_changes(&before)
        };
        put(&mut doc, "agencyId", "agc_1");
        let own = put(&mut doc, "patientId", "pat_1");
        assert_eq!(validate_write(&meta(), &doc, &own), Ok(()));
        assert_eq!(validate_write(&meta(), &doc, &[]), Ok(()));
        let edit = put(&mut doc, "assessment", "lungs clear");
        assert_eq!(validate_write(&meta(), &doc, &edit), Ok(()));
        let moved = put(&mut doc, "patientId", "pat_2");
        assert_eq!(
            validate_write(&meta(), &doc, &moved),
            Err(WriteRefusal::MovesOwner)
        );
    }
}
