//! Storing a batch of whole documents fetched from the relay (`sync::fetch`): a first sync,
//! or new documents on the caseload, in one transaction instead of one per document.
//!
//! Each document is checked exactly as far as [`Store::import`] checks a new one — the
//! import guard's structural walk, then automerge's strict load (a truncated or garbled tail
//! is an error, not silently dropped) — and stored the same way: the signature ledger reads
//! its history, the index, conflict and review rows are written. A document that fails is
//! left out and reported; the others are stored. With each stored document goes its receipt
//! (the relay sent its stored bytes, so it holds exactly these heads) so the next pass asks
//! nothing about it, and the feed, seeing the same heads, lists it as unchanged.

use automerge::{AutoCommit, LoadOptions, OnPartialLoad, TextEncoding};

use crate::model::conflicts::Conflict;

use super::sync_state::settle;
use super::*;

/// What happened to one fetched document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchedImport {
    /// Stored, with its receipt.
    Stored,
    /// This store holds the document already (created or synced meanwhile): not touched; the
    /// caller syncs it instead.
    AlreadyHeld,
    /// The bytes are not a valid document; nothing stored. The reason names no content.
    Invalid(String),
}

/// Parse a whole document strictly: the import guard, then a load that refuses partial input
/// and missing dependencies (a stored document is complete). automerge 0.12 can panic on
/// malformed chunks (see `fuzz/regressions/`): that is invalid input too.
fn parse_whole_document(bytes: &[u8]) -> std::result::Result<AutoCommit, String> {
    if bytes.is_empty() {
        return Err("empty automerge data".into());
    }
    model::import_guard::check_chunks(bytes).map_err(|e| e.to_string())?;
    let options = LoadOptions::new()
        .on_partial_load(OnPartialLoad::Error)
        .text_encoding(TextEncoding::Utf16CodeUnit);
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        AutoCommit::load_with_options(bytes, options)
    }))
    .map_err(|_| "not valid automerge data (the parser failed)".to_owned())?;
    let mut doc = loaded.map_err(|e| format!("not valid automerge data: {e}"))?;
    if doc.get_heads().is_empty() {
        return Err("an empty document".into());
    }
    Ok(doc)
}

/// A fetched document after parsing: its place in the batch, id, bytes as received, and the
/// loaded document (its signature ledger and cached facts built) with its conflicts, or why
/// it is invalid.
type Parsed = (
    usize,
    DocumentId,
    Vec<u8>,
    std::result::Result<(LoadedDoc, Vec<Conflict>), String>,
);

/// Threads that parse a batch at once, at most: the per-document work (the strict load and
/// the signature ledger, which reads the whole history) is independent and CPU-bound, and a
/// phone has several cores.
const MAX_PARSE_THREADS: usize = 4;

/// Parse and load every document of a batch (and find its conflicts), in order, on up to
/// [`MAX_PARSE_THREADS`] threads (one for a small batch or a single core).
fn parse_batch(
    docs: Vec<(DocumentId, Vec<u8>)>,
    author: &automerge::Author<'static>,
    keys: &Arc<KeyDirectory>,
) -> Vec<Parsed> {
    let parse_one = |(i, (id, bytes)): (usize, (DocumentId, Vec<u8>))| -> Parsed {
        let loaded = parse_whole_document(&bytes).map(|mut doc| {
            doc.set_author(Some(author.clone()));
            let loaded = LoadedDoc::new(doc, false, Arc::clone(keys));
            // The conflict walk reads the whole document too: done here, in parallel, rather
            // than inside the store's transaction.
            let conflicts = model::find_conflicts(&loaded.doc);
            (loaded, conflicts)
        });
        (i, id, bytes, loaded)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_PARSE_THREADS)
        .min(docs.len() / 4)
        .max(1);
    let docs: Vec<_> = docs.into_iter().enumerate().collect();
    if threads == 1 {
        return docs.into_iter().map(parse_one).collect();
    }
    // Interleaved shares (document sizes vary along a batch), put back in order after.
    let mut shares: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
    for (n, doc) in docs.into_iter().enumerate() {
        shares[n % threads].push(doc);
    }
    let mut parsed: Vec<Parsed> = std::thread::scope(|scope| {
        let workers: Vec<_> = shares
            .into_iter()
            .map(|share| scope.spawn(move || share.into_iter().map(parse_one).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(parsed) => parsed,
                // The load itself is behind catch_unwind; anything else is a bug to surface.
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    parsed.sort_by_key(|(i, ..)| *i);
    parsed
}

impl Store {
    /// Store documents fetched whole from relay storage `peer` (see the module docs), in one
    /// transaction ([`Durability::ProcessCrash`]: everything here can be fetched again).
    /// Returns one outcome per input, in order. Parsing, and building each document's
    /// signature ledger, runs before the store is locked, on several threads.
    ///
    /// A document is stored as the bytes it arrived in, once they loaded strictly (see
    /// [`documents::store_new_as_received`]). Documents are written in id order: ids are
    /// random, and inserting them sorted touches each B-tree page of the doc-keyed tables once
    /// per batch instead of once per document.
    pub fn import_fetched(
        &self,
        peer: &str,
        docs: Vec<(DocumentId, Vec<u8>)>,
    ) -> Result<Vec<(DocumentId, FetchedImport)>> {
        let now = model::now_ms();
        let (author, keys) = self.with(|inner| Ok((inner.author.clone(), inner.keys.clone())))?;
        let mut parsed = parse_batch(docs, &author, &keys);
        parsed.sort_by_key(|(_, id, _, _)| *id.as_bytes());
        let mut out = self.with(|inner| {
            // The agency's keys changed while the batch was parsed: its ledgers were built
            // with the old ones and are built again (the same as every cached document's).
            let stale_keys = (!Arc::ptr_eq(&keys, &inner.keys)).then(|| inner.keys.clone());
            inner.write(Durability::ProcessCrash, |tx, cached| {
                let mut out = Vec::with_capacity(parsed.len());
                for (i, id, bytes, loaded) in parsed {
                    let (mut loaded, conflicts) = match loaded {
                        Ok(parsed) => parsed,
                        Err(reason) => {
                            out.push((i, id, FetchedImport::Invalid(reason)));
                            continue;
                        }
                    };
                    if cached.contains_key(&id) || documents::exists(tx, id)? {
                        out.push((i, id, FetchedImport::AlreadyHeld));
                        continue;
                    }
                    if let Some(keys) = &stale_keys {
                        loaded.rebuild_ledger(keys.clone());
                    }
                    documents::store_new_as_received(tx, id, &mut loaded, &bytes, now, &conflicts)?;
                    let heads = loaded.doc.get_heads();
                    // Not cached: a caseload is far larger than the cache, and each document
                    // loads from disk when it is first opened.
                    settle(tx, peer, id, &heads, &heads, None, now)?;
                    out.push((i, id, FetchedImport::Stored));
                }
                Ok(out)
            })
        })?;
        out.sort_by_key(|(i, _, _)| *i);
        Ok(out
            .into_iter()
            .map(|(_, id, outcome)| (id, outcome))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ROOT};
    use rusqlite::OptionalExtension;

    use super::*;
    use crate::model::{Actor, Role};

    fn open(path: &std::path::Path) -> Store {
        Store::open(StoreConfig {
            path: path.to_owned(),
            key: StoreKey::from_bytes([7; 32]),
            actor: Actor {
                user_id: "usr_ana".into(),
                device_id: "dev_ana".into(),
            },
            role: Role::Clinician,
            keystroke_journal: false,
        })
        .expect("open")
    }

    fn chart(patient: &str, name: &str) -> (DocumentId, AutoCommit) {
        let office = Actor {
            user_id: "usr_olga".into(),
            device_id: "web_1".into(),
        };
        model::new_patient_chart("agc", patient, name, &office, 1).expect("chart")
    }

    fn stored_snapshot(store: &Store, id: DocumentId) -> Vec<u8> {
        store
            .with(|inner| {
                Ok(inner.conn.query_row(
                    "SELECT snapshot FROM documents WHERE doc_id = ?1",
                    [id.as_bytes()],
                    |r| r.get(0),
                )?)
            })
            .expect("snapshot")
    }

    fn receipt(store: &Store, id: DocumentId) -> Option<String> {
        store
            .with(|inner| {
                Ok(inner
                    .conn
                    .query_row(
                        "SELECT heads FROM receipts WHERE doc_id = ?1 AND peer_id = 'relay'",
                        [id.as_bytes()],
                        |r| r.get(0),
                    )
                    .optional()?)
            })
            .expect("receipt")
    }

    /// A batch large enough to be parsed on several threads comes back in the order given,
    /// each document with the outcome (and, loaded, the heads and kind) it has parsed alone.
    #[test]
    fn a_batch_parsed_on_several_threads_keeps_its_order_and_outcomes() {
        let keys = Arc::new(KeyDirectory::default());
        let author = automerge::Author::from(b"test-author".to_vec());
        let docs: Vec<(DocumentId, Vec<u8>)> = (0..37)
            .map(|n| {
                let (id, mut doc) = chart(&format!("pat_{n}"), &format!("Patient {n}"));
                if n % 4 == 1 {
                    // Two offline edits of one field: a conflict the index must list.
                    let mut other = doc.fork();
                    doc.put(ROOT, "room", "12").expect("put");
                    other.put(ROOT, "room", "14").expect("put");
                    doc.merge(&mut other).expect("merge");
                }
                let bytes = doc.save();
                let bytes = match n % 7 {
                    3 => bytes[..bytes.len() / 2].to_vec(),
                    5 => b"not automerge".to_vec(),
                    _ => bytes,
                };
                (id, bytes)
            })
            .collect();
        let alone: Vec<_> = docs
            .iter()
            .map(|(id, bytes)| {
                let alone = parse_whole_document(bytes)
                    .map(|mut d| (d.get_heads(), model::find_conflicts(&d)));
                (*id, alone)
            })
            .collect();
        let mut parsed = parse_batch(docs.clone(), &author, &keys);
        assert_eq!(parsed.len(), docs.len());
        for (n, ((i, id, bytes, loaded), (want_id, want))) in
            parsed.iter_mut().zip(&alone).enumerate()
        {
            assert_eq!((*i, &*id, &*bytes), (n, want_id, &docs[n].1));
            match (loaded, want) {
                (Ok((loaded, conflicts)), Ok((heads, alone))) => {
                    assert_eq!(&loaded.doc.get_heads(), heads);
                    assert_eq!(loaded.cache.kind, Some(DocKind::Patient));
                    assert_eq!(conflicts, alone);
                    assert_eq!(conflicts.is_empty(), n % 4 != 1, "document {n}");
                }
                (Err(a), Err(b)) => assert_eq!(a, b),
                _ => panic!("document {n}: outcome differs from parsing it alone"),
            }
        }
    }

    #[test]
    fn a_batch_is_stored_as_it_came_indexed_and_answered_in_the_order_given() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open(&dir.path().join("s.db"));

        // As the relay stores a document: a snapshot, then a chunk of later changes.
        let (a, mut a_doc) = chart("pat_a", "Ada");
        let mut a_bytes = a_doc.save();
        let snapshot_heads = a_doc.get_heads();
        let demo = model::get_obj(&a_doc, &ROOT, "demographics").expect("demographics");
        a_doc.put(&demo, "name", "Ada L.").expect("put");
        a_doc.commit();
        a_bytes.extend(a_doc.save_after(&snapshot_heads));

        // Two offices renamed the patient at once: a conflict to index.
        let (b, mut b_doc) = chart("pat_b", "Bea");
        let mut other = b_doc.fork().with_actor(ActorId::random());
        let demo = model::get_obj(&b_doc, &ROOT, "demographics").expect("demographics");
        b_doc.put(&demo, "name", "Beatrice").expect("put");
        b_doc.commit();
        other.put(&demo, "name", "Bee").expect("put");
        other.commit();
        b_doc.merge(&mut other).expect("merge");
        let b_bytes = b_doc.save();

        // Held already (imported before): left alone.
        let (c, mut c_doc) = chart("pat_c", "Cy");
        let c_bytes = c_doc.save();
        assert_eq!(
            store
                .import_fetched("relay", vec![(c, c_bytes.clone())])
                .expect("import"),
            vec![(c, FetchedImport::Stored)]
        );

        let garbage = DocumentId::random();
        let mut truncated = a_bytes.clone();
        truncated.truncate(a_bytes.len() - 3);
        let cut = DocumentId::random();
        let given = vec![
            (b, b_bytes.clone()),
            (garbage, b"not a document".to_vec()),
            (a, a_bytes.clone()),
            (c, c_bytes),
            (cut, truncated),
        ];
        let outcomes = store.import_fetched("relay", given).expect("import");
        let ids: Vec<DocumentId> = outcomes.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids,
            vec![b, garbage, a, c, cut],
            "answered in the order given"
        );
        assert_eq!(outcomes[0].1, FetchedImport::Stored);
        assert!(matches!(outcomes[1].1, FetchedImport::Invalid(_)));
        assert_eq!(outcomes[2].1, FetchedImport::Stored);
        assert_eq!(outcomes[3].1, FetchedImport::AlreadyHeld);
        assert!(
            matches!(outcomes[4].1, FetchedImport::Invalid(_)),
            "a cut tail is refused, not loaded partly: {:?}",
            outcomes[4].1
        );

        // Kept byte for byte; loads to the same heads; indexed; its receipt recorded.
        assert_eq!(stored_snapshot(&store, a), a_bytes);
        assert_eq!(stored_snapshot(&store, b), b_bytes);
        assert_eq!(store.heads(a).expect("heads"), a_doc.get_heads());
        assert_eq!(
            store.conflicts(b).expect("conflicts").len(),
            1,
            "the concurrent renames are listed"
        );
        assert!(store.conflicts(a).expect("conflicts").is_empty());
        assert!(receipt(&store, a).is_some() && receipt(&store, b).is_some());
        assert!(receipt(&store, garbage).is_none() && receipt(&store, cut).is_none());
        assert_eq!(
            store.document_ids().expect("ids").len(),
            3,
            "nothing stored for the invalid ones"
        );
        store.close().expect("close");

        // After reopening, the documents load from the bytes as stored.
        let store = open(&dir.path().join("s.db"));
        let mut names: Vec<(String, Option<String>)> = store
            .patients()
            .expect("patients")
            .into_iter()
            .map(|p| (p.patient_id, p.name))
            .collect();
        names.sort();
        assert_eq!(names[0], ("pat_a".into(), Some("Ada L.".into())));
        assert_eq!(names.len(), 3);
        assert_eq!(store.heads(a).expect("heads"), a_doc.get_heads());
        let mut b_heads = b_doc.get_heads();
        b_heads.sort();
        let mut held = store.heads(b).expect("heads");
        held.sort();
        assert_eq!(held, b_heads);
        let mut exported =
            AutoCommit::load(&store.export_changes(a).expect("export")).expect("load");
        assert_eq!(exported.get_heads(), a_doc.get_heads());
    }
}
