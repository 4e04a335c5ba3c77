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

impl Store {
    /// Store documents fetched whole from relay storage `peer` (see the module docs), in one
    /// transaction ([`Durability::ProcessCrash`]: everything here can be fetched again).
    /// Returns one outcome per input, in order. Parsing runs before the store is locked.
    pub fn import_fetched(
        &self,
        peer: &str,
        docs: Vec<(DocumentId, Vec<u8>)>,
    ) -> Result<Vec<(DocumentId, FetchedImport)>> {
        let now = model::now_ms();
        let parsed: Vec<(DocumentId, std::result::Result<AutoCommit, String>)> = docs
            .into_iter()
            .map(|(id, bytes)| (id, parse_whole_document(&bytes)))
            .collect();
        self.with(|inner| {
            let author = inner.author.clone();
            let keys = inner.keys.clone();
            inner.write(Durability::ProcessCrash, |tx, cached| {
                let mut out = Vec::with_capacity(parsed.len());
                for (id, doc) in parsed {
                    let mut doc = match doc {
                        Ok(doc) => doc,
                        Err(reason) => {
                            out.push((id, FetchedImport::Invalid(reason)));
                            continue;
                        }
                    };
                    if cached.contains_key(&id) || documents::exists(tx, id)? {
                        out.push((id, FetchedImport::AlreadyHeld));
                        continue;
                    }
                    doc.set_author(Some(author.clone()));
                    let mut loaded = LoadedDoc::new(doc, false, keys.clone());
                    documents::store_new(tx, id, &mut loaded, now, false)?;
                    let heads = loaded.doc.get_heads();
                    // Not cached: a caseload is far larger than the cache, and each document
                    // loads from disk when it is first opened.
                    settle(tx, peer, id, &heads, &heads, None, now)?;
                    out.push((id, FetchedImport::Stored));
                }
                Ok(out)
            })
        })
    }
}
