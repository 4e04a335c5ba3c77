//! The store's side of device sync ([`crate::sync`]): per-relay cursors and sync states,
//! applying received sync messages, receipts and the failure list.
//!
//! Each mutating method is one SQLite transaction, so a pass killed at any instant leaves the
//! document, its index rows, its sync state and its receipt consistent with one another.
//! These transactions use [`Durability::ProcessCrash`]: everything they write came from, or
//! was confirmed by, the relay, so a power cut that loses the last of them (WAL keeps them in
//! order) costs a re-sync, never data. Only the `unsynced` flag could be lost set, which errs
//! on the safe side.

use std::collections::{HashMap, HashSet};

use automerge::{AutoCommit, Automerge, ChangeHash, TextEncoding};
use rusqlite::{OptionalExtension, params};

use super::{Durability, Inner, LoadedDoc, Store, Tx, doc_id_from_sql, documents};
use crate::model;
use crate::protocol::{DocSync, DocumentId, StorageId, decode_heads, encode_heads};
use crate::sync::{
    AppliedSync, FailureKind, FeedEntry, PlanMode, PlannedDoc, Receipt, SyncFailure, SyncPlan,
    UnconfirmedDocument, failure_retry_at,
};
use crate::{Error, Result};

/// Heads as stored in `receipts.heads`: sorted bs58check hashes joined by commas.
fn heads_text(heads: &[ChangeHash]) -> String {
    let mut sorted = heads.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    encode_heads(&sorted).join(",")
}

fn parse_heads_text(text: &str) -> Result<Vec<ChangeHash>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<String> = text.split(',').map(str::to_owned).collect();
    let mut heads = decode_heads(&parts).map_err(|e| Error::Corrupt(format!("receipt: {e}")))?;
    heads.sort_unstable();
    Ok(heads)
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort_unstable();
    heads.dedup();
    heads
}

/// Record what the relay is known to hold after a sync step, in the caller's transaction:
/// the receipt (only when its heads change, so `confirmed_at` is when they were first
/// confirmed) and, when the relay holds exactly our heads (`ours`), clear `unsynced` (on disk,
/// and on the cached document if it is loaded) and any failure. Returns whether the relay
/// holds exactly our heads.
pub(super) fn settle(
    tx: &Tx<'_>,
    peer: &str,
    id: DocumentId,
    relay_heads: &[ChangeHash],
    ours: &[ChangeHash],
    loaded: Option<&mut LoadedDoc>,
    now_ms: i64,
) -> Result<bool> {
    if relay_heads.is_empty() {
        return Ok(false);
    }
    tx.prepare_cached(
        "INSERT INTO receipts (doc_id, peer_id, heads, confirmed_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (doc_id, peer_id) DO UPDATE SET heads = excluded.heads, confirmed_at = excluded.confirmed_at
         WHERE receipts.heads <> excluded.heads",
    )?
    .execute(params![id.as_bytes(), peer, heads_text(relay_heads), now_ms])?;
    let covers = sorted(relay_heads.to_vec()) == sorted(ours.to_vec());
    if covers {
        tx.prepare_cached("UPDATE documents SET unsynced = 0 WHERE doc_id = ?1 AND unsynced = 1")?
            .execute([id.as_bytes()])?;
        if let Some(loaded) = loaded {
            loaded.unsynced = false;
        }
        tx.prepare_cached("DELETE FROM sync_failures WHERE doc_id = ?1 AND peer_id = ?2")?
            .execute(params![id.as_bytes(), peer])?;
    }
    Ok(covers)
}

fn save_sync_state(tx: &Tx<'_>, peer: &str, id: DocumentId, sync: &DocSync) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO sync_states (peer_id, doc_id, state) VALUES (?1, ?2, ?3)
         ON CONFLICT (peer_id, doc_id) DO UPDATE SET state = excluded.state",
    )?
    .execute(params![peer, id.as_bytes(), sync.encode()])?;
    Ok(())
}

/// The relay a store last synced with (its storage id), for receipts shown to the user.
fn current_peer(inner: &Inner) -> Result<Option<String>> {
    Ok(inner
        .conn
        .prepare_cached("SELECT peer_id FROM sync_relays ORDER BY updated_at DESC, relay LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?)
}

impl Store {
    /// The `storageId` this store advertises to relays (created on first use).
    pub fn sync_storage_id(&self) -> Result<StorageId> {
        self.with(|inner| {
            let existing: Option<String> = inner
                .conn
                .prepare_cached("SELECT storage_id FROM sync_identity WHERE id = 1")?
                .query_row([], |r| r.get(0))
                .optional()?;
            if let Some(id) = existing {
                return Ok(StorageId::new(id));
            }
            let fresh = StorageId::random("fieldchart-device");
            inner.write(Durability::ProcessCrash, |tx, _| {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO sync_identity (id, storage_id) VALUES (1, ?1)",
                )?
                .execute([fresh.as_str()])?;
                Ok(())
            })?;
            Ok(fresh)
        })
    }

    /// The storage id the relay at `relay` (its configured address) served last, if known.
    pub fn relay_peer(&self, relay: &str) -> Result<Option<String>> {
        self.with(|inner| {
            Ok(inner
                .conn
                .prepare_cached("SELECT peer_id FROM sync_relays WHERE relay = ?1")?
                .query_row([relay], |r| r.get(0))
                .optional()?)
        })
    }

    /// Remember that `relay` serves storage `peer_id` (and make it the current relay).
    pub fn set_relay_peer(&self, relay: &str, peer_id: &str) -> Result<()> {
        let now = model::now_ms();
        self.with(|inner| {
            inner.write(Durability::ProcessCrash, |tx, _| {
                tx.prepare_cached(
                    "INSERT INTO sync_relays (relay, peer_id, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (relay) DO UPDATE SET peer_id = excluded.peer_id, updated_at = excluded.updated_at",
                )?
                .execute(params![relay, peer_id, now])?;
                Ok(())
            })
        })
    }

    /// The change-feed cursor persisted for a relay storage.
    pub fn feed_cursor(&self, peer: &str) -> Result<Option<String>> {
        self.with(|inner| {
            Ok(inner
                .conn
                .prepare_cached("SELECT cursor FROM feed_cursors WHERE peer_id = ?1")?
                .query_row([peer], |r| r.get(0))
                .optional()?)
        })
    }

    /// Persist the change-feed cursor for a relay storage. Call only once every document the
    /// feed listed up to `cursor` is settled (in sync, or in the failure list).
    pub fn set_feed_cursor(&self, peer: &str, cursor: &str) -> Result<()> {
        self.with(|inner| {
            inner.write(Durability::ProcessCrash, |tx, _| {
                tx.prepare_cached(
                    "INSERT INTO feed_cursors (peer_id, cursor) VALUES (?1, ?2)
                     ON CONFLICT (peer_id) DO UPDATE SET cursor = excluded.cursor",
                )?
                .execute(params![peer, cursor])?;
                Ok(())
            })
        })
    }

    /// Decide which documents a pass syncs with relay storage `peer`, given the feed entries
    /// read since the persisted cursor (see [`crate::sync`]). `first_contact`: no cursor is
    /// persisted for this storage yet, so local documents it never confirmed are synced too
    /// (a relay restored onto new storage gets everything it lacks).
    ///
    /// Feed entries whose relay heads equal the local heads are confirmed here, in one
    /// transaction, without a message.
    pub fn plan_sync(
        &self,
        peer: &str,
        feed: &[FeedEntry],
        first_contact: bool,
    ) -> Result<SyncPlan> {
        let now = model::now_ms();
        self.with(|inner| {
            // Everything here is proportional to the feed and to the documents with local
            // changes, never to the whole store: a reconnect with nothing changed must cost
            // the same with 50 documents as with 50,000.
            let unsynced: Vec<DocumentId> = {
                let mut stmt = inner.conn.prepare_cached(
                    "SELECT doc_id FROM documents WHERE unsynced = 1 ORDER BY doc_id",
                )?;
                let rows = stmt.query_map([], |r| doc_id_from_sql(r.get(0)?))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            // Of those, the ones never offered to this relay: no receipt, no sync state, no
            // failure. Unless the feed lists them, the relay is presumed not to hold them.
            let never_offered: HashSet<DocumentId> = {
                let mut stmt = inner.conn.prepare_cached(
                    "SELECT d.doc_id FROM documents d WHERE d.unsynced = 1
                     AND NOT EXISTS (SELECT 1 FROM receipts r
                                     WHERE r.doc_id = d.doc_id AND r.peer_id = ?1)
                     AND NOT EXISTS (SELECT 1 FROM sync_states s
                                     WHERE s.peer_id = ?1 AND s.doc_id = d.doc_id)
                     AND NOT EXISTS (SELECT 1 FROM sync_failures f
                                     WHERE f.doc_id = d.doc_id AND f.peer_id = ?1)",
                )?;
                let rows = stmt.query_map([peer], |r| doc_id_from_sql(r.get(0)?))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let never_confirmed: Vec<DocumentId> = if first_contact {
                let mut stmt = inner.conn.prepare_cached(
                    "SELECT doc_id FROM documents WHERE unsynced = 0 AND doc_id NOT IN
                     (SELECT doc_id FROM receipts WHERE peer_id = ?1) ORDER BY doc_id",
                )?;
                let rows = stmt.query_map([peer], |r| doc_id_from_sql(r.get(0)?))?;
                rows.collect::<rusqlite::Result<_>>()?
            } else {
                Vec::new()
            };
            // Failed documents wait for their retry time; failures of every kind but token
            // rejections (cleared when a pass authenticates) are in backoff.
            let waiting: HashSet<DocumentId> = {
                let mut stmt = inner.conn.prepare_cached(
                    "SELECT doc_id FROM sync_failures WHERE peer_id = ?1 AND retry_at > ?2",
                )?;
                let rows = stmt.query_map(params![peer, now], |r| doc_id_from_sql(r.get(0)?))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let due_failures: Vec<DocumentId> = {
                let mut stmt = inner.conn.prepare_cached(
                    "SELECT f.doc_id FROM sync_failures f JOIN documents d ON d.doc_id = f.doc_id
                     WHERE f.peer_id = ?1 AND f.retry_at <= ?2 ORDER BY f.doc_id",
                )?;
                let rows = stmt.query_map(params![peer, now], |r| doc_id_from_sql(r.get(0)?))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            // Per feed entry: held here? local changes? what the relay last confirmed?
            let mut feed_rows: HashMap<DocumentId, (bool, Option<String>)> = HashMap::new();
            {
                let mut stmt = inner.conn.prepare_cached(
                    "SELECT d.unsynced, r.heads FROM documents d
                     LEFT JOIN receipts r ON r.doc_id = d.doc_id AND r.peer_id = ?2
                     WHERE d.doc_id = ?1",
                )?;
                for entry in feed {
                    let row = stmt
                        .query_row(params![entry.document_id.as_bytes(), peer], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .optional()?;
                    if let Some(row) = row {
                        feed_rows.insert(entry.document_id, row);
                    }
                }
            }

            let mut plan = SyncPlan::default();
            let mut seen = HashSet::new();
            let mut confirm: Vec<(DocumentId, Vec<ChangeHash>)> = Vec::new();
            let author = inner.author.clone();
            for entry in feed {
                let id = entry.document_id;
                if !seen.insert(id) {
                    continue;
                }
                let Some((unsynced, receipt)) = feed_rows.get(&id) else {
                    plan.docs.push(PlannedDoc {
                        document_id: id,
                        mode: PlanMode::Request,
                        local_changes: false,
                        relay_lacks: false,
                    });
                    continue;
                };
                if !unsynced && receipt.as_deref() == Some(heads_text(&entry.heads).as_str()) {
                    // The relay holds what it held when it last confirmed us, and nothing
                    // changed here: the entry is our own write echoed back, or old news.
                    plan.unchanged += 1;
                    continue;
                }
                inner.ensure_loaded(id, &author)?;
                let ours = inner
                    .docs
                    .get_mut(&id)
                    .map(|d| sorted(d.doc.get_heads()))
                    .ok_or(Error::DocumentNotFound(id))?;
                if ours == entry.heads {
                    confirm.push((id, entry.heads.clone()));
                    continue;
                }
                plan.docs.push(PlannedDoc {
                    document_id: id,
                    mode: PlanMode::Sync,
                    local_changes: *unsynced,
                    relay_lacks: false,
                });
            }
            for id in unsynced.into_iter().chain(never_confirmed) {
                if !waiting.contains(&id) && seen.insert(id) {
                    plan.docs.push(PlannedDoc {
                        document_id: id,
                        mode: PlanMode::Sync,
                        local_changes: true,
                        relay_lacks: never_offered.contains(&id),
                    });
                }
            }
            for id in due_failures {
                if seen.insert(id) {
                    plan.docs.push(PlannedDoc {
                        document_id: id,
                        mode: PlanMode::Sync,
                        local_changes: true,
                        relay_lacks: false,
                    });
                }
            }

            plan.confirmed_from_feed = confirm.len();
            if !confirm.is_empty() {
                inner.write(Durability::ProcessCrash, |tx, docs| {
                    // Documents compared early may have left the cache since (it is bounded);
                    // their heads are known to equal the feed's, so none needs loading.
                    for (id, heads) in &confirm {
                        settle(tx, peer, *id, heads, heads, docs.get_mut(id), now)?;
                    }
                    Ok(())
                })?;
            }
            Ok(plan)
        })
    }

    /// Reconcile everything this device holds for relay storage `peer` with `listing`, the
    /// relay's whole caseload for us as its change feed listed it after a reset (a new epoch,
    /// or our cursor was from its future: the relay may have been restored from a backup and
    /// be behind what it once confirmed). In one transaction:
    /// - every persisted sync state with `peer` is dropped (they claim shared heads the relay
    ///   may no longer have; automerge would not resend changes it believes were delivered);
    /// - every receipt the listing does not back — the document is listed with other heads,
    ///   or (when `complete`) not listed at all — is withdrawn and its document marked
    ///   unsynced, so this pass pushes it and a receipt is earned again from the relay.
    ///
    /// Returns the number of receipts withdrawn. With an incomplete listing (the pass stopped
    /// paging), unlisted documents keep their receipts: the next reset reconciles them.
    pub fn reconcile_with_relay(
        &self,
        peer: &str,
        listing: &[&FeedEntry],
        complete: bool,
    ) -> Result<usize> {
        let relay: HashMap<DocumentId, String> = listing
            .iter()
            .map(|e| (e.document_id, heads_text(&e.heads)))
            .collect();
        self.with(|inner| {
            let receipts: Vec<(DocumentId, String)> = {
                let mut stmt = inner
                    .conn
                    .prepare_cached("SELECT doc_id, heads FROM receipts WHERE peer_id = ?1")?;
                let rows =
                    stmt.query_map([peer], |r| Ok((doc_id_from_sql(r.get(0)?)?, r.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let withdraw: Vec<DocumentId> = receipts
                .into_iter()
                .filter(|(id, heads)| match relay.get(id) {
                    Some(listed) => listed != heads,
                    None => complete,
                })
                .map(|(id, _)| id)
                .collect();
            inner.write(Durability::ProcessCrash, |tx, docs| {
                tx.prepare_cached("DELETE FROM sync_states WHERE peer_id = ?1")?
                    .execute([peer])?;
                for id in &withdraw {
                    tx.prepare_cached("DELETE FROM receipts WHERE doc_id = ?1 AND peer_id = ?2")?
                        .execute(params![id.as_bytes(), peer])?;
                    tx.prepare_cached("UPDATE documents SET unsynced = 1 WHERE doc_id = ?1")?
                        .execute([id.as_bytes()])?;
                    if let Some(loaded) = docs.get_mut(id) {
                        loaded.unsynced = true;
                    }
                }
                Ok(())
            })?;
            Ok(withdraw.len())
        })
    }

    /// The persisted sync state of a document with relay storage `peer` (fresh if none, or if
    /// the stored one is unreadable: that costs a longer exchange, not data).
    pub fn doc_sync_state(&self, peer: &str, id: DocumentId) -> Result<DocSync> {
        self.with(|inner| {
            let bytes: Option<Vec<u8>> = inner
                .conn
                .prepare_cached("SELECT state FROM sync_states WHERE peer_id = ?1 AND doc_id = ?2")?
                .query_row(params![peer, id.as_bytes()], |r| r.get(0))
                .optional()?;
            Ok(match bytes {
                Some(bytes) => DocSync::decode(&bytes).unwrap_or_else(|e| {
                    tracing::warn!(doc = %id, error = %e, "ignoring an unreadable sync state");
                    DocSync::new()
                }),
                None => DocSync::new(),
            })
        })
    }

    /// The next sync message for a document (`None`: nothing to say). A document this store
    /// does not hold is treated as empty, which makes the message a request for all of it.
    ///
    /// Nothing is written: generating a message changes only the in-session part of the sync
    /// state (what was sent), and the persisted part (the heads known to be shared) changes
    /// only when a message is received.
    pub fn generate_sync_message(
        &self,
        id: DocumentId,
        sync: &mut DocSync,
    ) -> Result<Option<Vec<u8>>> {
        self.with(|inner| {
            let author = inner.author.clone();
            match inner.ensure_loaded(id, &author) {
                Ok(()) => {}
                Err(Error::DocumentNotFound(_)) => return Ok(sync.generate(&Automerge::new())),
                Err(e) => return Err(e),
            }
            let loaded = inner.docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
            Ok(sync.generate(loaded.doc.document()))
        })
    }

    /// Apply a sync message received from relay storage `peer` for document `id`: merge its
    /// changes (storing a document new to this device), rewrite the index and conflict rows,
    /// persist the sync state and record the receipt — one transaction. `sync` is updated only
    /// if the transaction commits.
    ///
    /// Garbage or changes automerge refuses are an error and change nothing on disk.
    pub fn apply_sync_message(
        &self,
        peer: &str,
        id: DocumentId,
        sync: &mut DocSync,
        data: &[u8],
    ) -> Result<AppliedSync> {
        let now = model::now_ms();
        self.with(|inner| {
            let author = inner.author.clone();
            match inner.ensure_loaded(id, &author) {
                Ok(()) => {}
                Err(Error::DocumentNotFound(_)) => {
                    return apply_to_new(inner, peer, id, sync, data, now);
                }
                Err(e) => return Err(e),
            }
            let result = inner.write(Durability::ProcessCrash, |tx, docs| {
                let loaded = docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
                let mut trial = sync.clone();
                let before = trial.encode();
                // automerge 0.12 can panic on malformed chunks (see fuzz/regressions/): data
                // from the relay that does that is invalid input, and the cached copy, which
                // may be half-applied, is dropped so the next use reloads what is stored.
                let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    trial.receive_autocommit(&mut loaded.doc, data)
                }));
                let outcome = match received {
                    Ok(outcome) => outcome?,
                    Err(_) => {
                        docs.remove(&id);
                        return Err(Error::InvalidInput(
                            "the relay sent sync data the automerge parser failed on".into(),
                        ));
                    }
                };
                let changed = outcome.changed();
                if changed {
                    documents::store_merged(tx, id, loaded, now)?;
                }
                if trial.encode() != before {
                    save_sync_state(tx, peer, id, &trial)?;
                }
                let ours = loaded.doc.get_heads();
                settle(
                    tx,
                    peer,
                    id,
                    &trial.shared_heads(),
                    &ours,
                    Some(loaded),
                    now,
                )?;
                let in_sync = trial.in_sync(loaded.doc.document());
                Ok((trial, changed, in_sync))
            });
            match result {
                Ok((trial, changed, in_sync)) => {
                    *sync = trial;
                    Ok(AppliedSync {
                        created: false,
                        changed,
                        in_sync,
                    })
                }
                Err(e) => {
                    // Automerge may have applied part of a refused message, or the transaction
                    // rolled back: memory must not be ahead of disk. `discard` keeps the
                    // document's journaled splices (they are not in SQLite).
                    inner.discard(id);
                    Err(e)
                }
            }
        })
    }

    /// The relay refused document `id` (`doc-unavailable`). If this device holds data of it the
    /// relay never confirmed (local changes, or never stored there), list it as failed with
    /// `reason` and back off its retries; returns whether it was listed. A document the
    /// relay confirmed and that has no local changes is merely no longer shared with this
    /// device (e.g. the nurse left the care team): nothing is lost, nothing is listed.
    pub fn record_refusal(&self, peer: &str, id: DocumentId, reason: &str) -> Result<bool> {
        self.record_failure(peer, id, FailureKind::Refused, reason)
    }

    /// List document `id` as failed because the relay sent data for it that cannot be applied.
    pub fn record_invalid(&self, peer: &str, id: DocumentId, reason: &str) -> Result<bool> {
        self.record_failure(peer, id, FailureKind::Invalid, reason)
    }

    fn record_failure(
        &self,
        peer: &str,
        id: DocumentId,
        kind: FailureKind,
        reason: &str,
    ) -> Result<bool> {
        let now = model::now_ms();
        self.with(|inner| {
            let row: Option<(bool, bool)> = inner
                .conn
                .prepare_cached(
                    "SELECT d.unsynced, r.doc_id IS NOT NULL FROM documents d
                     LEFT JOIN receipts r ON r.doc_id = d.doc_id AND r.peer_id = ?2
                     WHERE d.doc_id = ?1",
                )?
                .query_row(params![id.as_bytes(), peer], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let listed = match (kind, row) {
                (_, None) => false,
                (FailureKind::Refused, Some((unsynced, confirmed))) => unsynced || !confirmed,
                (_, Some(_)) => true,
            };
            if !listed {
                return Ok(false);
            }
            let attempts: u32 = inner
                .conn
                .prepare_cached(
                    "SELECT attempts FROM sync_failures WHERE doc_id = ?1 AND peer_id = ?2",
                )?
                .query_row(params![id.as_bytes(), peer], |r| r.get(0))
                .optional()?
                .map_or(1, |a: u32| a.saturating_add(1));
            let retry_at = failure_retry_at(now, attempts);
            inner.write(Durability::ProcessCrash, |tx, _| {
                tx.prepare_cached(
                    "INSERT INTO sync_failures (doc_id, peer_id, reason, at, kind, attempts, retry_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (doc_id, peer_id) DO UPDATE SET reason = excluded.reason,
                       at = excluded.at, kind = excluded.kind, attempts = excluded.attempts,
                       retry_at = excluded.retry_at",
                )?
                .execute(params![
                    id.as_bytes(),
                    peer,
                    reason,
                    now,
                    kind.as_str(),
                    attempts,
                    retry_at
                ])?;
                Ok(())
            })?;
            Ok(true)
        })
    }

    /// The relay rejected this device's token: list every document with unconfirmed changes
    /// as failed with `reason` (they stay in the store, flagged unsynced). Returns how many.
    pub fn record_unauthorized(&self, peer: &str, reason: &str) -> Result<usize> {
        let now = model::now_ms();
        self.with(|inner| {
            inner.write(Durability::ProcessCrash, |tx, _| {
                Ok(tx
                    .prepare_cached(
                        "INSERT INTO sync_failures (doc_id, peer_id, reason, at, kind, attempts, retry_at)
                         SELECT doc_id, ?1, ?2, ?3, 'unauthorized', 1, 0 FROM documents WHERE unsynced = 1
                         ON CONFLICT (doc_id, peer_id) DO UPDATE SET reason = excluded.reason,
                           at = excluded.at, kind = 'unauthorized', attempts = sync_failures.attempts + 1,
                           retry_at = 0",
                    )?
                    .execute(params![peer, reason, now])?)
            })
        })
    }

    /// A pass authenticated again: token failures no longer apply.
    pub fn clear_unauthorized(&self, peer: &str) -> Result<()> {
        self.with(|inner| {
            let any: bool = inner
                .conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM sync_failures WHERE peer_id = ?1 AND kind = 'unauthorized')",
                )?
                .query_row([peer], |r| r.get(0))?;
            if !any {
                return Ok(());
            }
            inner.write(Durability::ProcessCrash, |tx, _| {
                tx.prepare_cached(
                    "DELETE FROM sync_failures WHERE peer_id = ?1 AND kind = 'unauthorized'",
                )?
                .execute([peer])?;
                Ok(())
            })
        })
    }

    /// "Is this document safe at the agency, as of when": the heads the current relay confirmed
    /// durable and when, and whether that covers the document as it is now. `None`: the relay
    /// never confirmed any state of it.
    pub fn receipt(&self, id: DocumentId) -> Result<Option<Receipt>> {
        self.with(|inner| {
            let Some(peer) = current_peer(inner)? else {
                return Ok(None);
            };
            let row: Option<(String, i64)> = inner
                .conn
                .prepare_cached(
                    "SELECT heads, confirmed_at FROM receipts WHERE doc_id = ?1 AND peer_id = ?2",
                )?
                .query_row(params![id.as_bytes(), peer], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((text, confirmed_at_ms)) = row else {
                return Ok(None);
            };
            let heads = parse_heads_text(&text)?;
            let author = inner.author.clone();
            inner.ensure_loaded(id, &author)?;
            let ours = inner
                .docs
                .get_mut(&id)
                .map(|d| sorted(d.doc.get_heads()))
                .ok_or(Error::DocumentNotFound(id))?;
            Ok(Some(Receipt {
                covers_current: heads == ours,
                heads,
                confirmed_at_ms,
            }))
        })
    }

    /// Documents whose current state the relay has not confirmed: local changes not yet
    /// confirmed, or never confirmed by the current relay at all. From the tables alone (no
    /// document is loaded), so it is cheap for a list screen.
    pub fn unconfirmed_documents(&self) -> Result<Vec<UnconfirmedDocument>> {
        self.with(|inner| {
            let peer = current_peer(inner)?;
            let mut stmt = inner.conn.prepare_cached(
                "SELECT d.doc_id, d.kind, d.patient_id, d.unsynced, r.confirmed_at FROM documents d
                 LEFT JOIN receipts r ON r.doc_id = d.doc_id AND r.peer_id = ?1
                 WHERE d.unsynced = 1 OR r.doc_id IS NULL
                 ORDER BY d.doc_id",
            )?;
            let rows = stmt.query_map([peer], |r| {
                Ok(UnconfirmedDocument {
                    document_id: doc_id_from_sql(r.get(0)?)?,
                    kind: r.get(1)?,
                    patient_id: r.get(2)?,
                    local_changes: r.get(3)?,
                    last_confirmed_at_ms: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// Documents sync could not deliver, with the reason, newest first.
    pub fn sync_failures(&self) -> Result<Vec<SyncFailure>> {
        self.with(|inner| {
            let mut stmt = inner.conn.prepare_cached(
                "SELECT f.doc_id, d.kind, d.patient_id, f.kind, f.reason, f.at, f.attempts, f.retry_at
                 FROM sync_failures f LEFT JOIN documents d ON d.doc_id = f.doc_id
                 ORDER BY f.at DESC, f.doc_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(SyncFailure {
                    document_id: doc_id_from_sql(r.get(0)?)?,
                    kind: r.get(1)?,
                    patient_id: r.get(2)?,
                    failure: FailureKind::parse(&r.get::<_, String>(3)?),
                    reason: r.get(4)?,
                    at_ms: r.get(5)?,
                    attempts: r.get(6)?,
                    retry_at_ms: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// Make a failed document eligible at the next pass (the user tapped "retry").
    pub fn retry_failed_document(&self, id: DocumentId) -> Result<()> {
        self.with(|inner| {
            inner.write(Durability::ProcessCrash, |tx, _| {
                tx.prepare_cached("UPDATE sync_failures SET retry_at = 0 WHERE doc_id = ?1")?
                    .execute([id.as_bytes()])?;
                Ok(())
            })
        })
    }
}

/// [`Store::apply_sync_message`] for a document this store does not hold: store it once the
/// message brought content (a new caseload document), else only advance `sync`.
fn apply_to_new(
    inner: &mut Inner,
    peer: &str,
    id: DocumentId,
    sync: &mut DocSync,
    data: &[u8],
    now: i64,
) -> Result<AppliedSync> {
    let mut doc = AutoCommit::new_with_encoding(TextEncoding::Utf16CodeUnit);
    let mut trial = sync.clone();
    trial.receive_autocommit(&mut doc, data)?;
    if doc.get_heads().is_empty() {
        // Heads only (or changes still waiting for their dependencies): nothing to store yet.
        *sync = trial;
        return Ok(AppliedSync {
            created: false,
            changed: false,
            in_sync: false,
        });
    }
    doc.set_author(Some(inner.author.clone()));
    let mut loaded = LoadedDoc::new(doc, false, inner.keys.clone());
    let in_sync = inner.write(Durability::ProcessCrash, |tx, _| {
        documents::store_new(tx, id, &mut loaded, now, false)?;
        save_sync_state(tx, peer, id, &trial)?;
        let ours = loaded.doc.get_heads();
        settle(
            tx,
            peer,
            id,
            &trial.shared_heads(),
            &ours,
            Some(&mut loaded),
            now,
        )?;
        Ok(trial.in_sync(loaded.doc.document()))
    })?;
    loaded.saved_heads = loaded.doc.get_heads();
    inner.cache(id, loaded)?;
    *sync = trial;
    Ok(AppliedSync {
        created: true,
        changed: true,
        in_sync,
    })
}
