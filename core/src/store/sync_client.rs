//! What the sync pass needs from the store: unsynced and known documents, strict import of
//! changes from elsewhere, export, changes since given heads, heads.

use super::*;

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOutcome {
    /// Whether the document was new to this store.
    pub created: bool,
    /// Whether any change was new.
    pub changed: bool,
}

/// Parse untrusted automerge bytes strictly before merging them: automerge's incremental load
/// is lenient by design (it skips a truncated tail), which would turn garbage into a silent
/// no-op instead of an error the caller can report.
fn validate_automerge_bytes(bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Err(Error::InvalidInput("empty automerge data".into()));
    }
    model::import_guard::check_chunks(bytes).map_err(|e| Error::InvalidInput(e.to_string()))?;
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

impl Store {
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
}
