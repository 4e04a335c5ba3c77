//! Conflicts (listed per document and from the index, resolved by value identity) and history.

use super::*;

/// An open conflict, from the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenConflict {
    /// Document holding the field.
    pub document_id: DocumentId,
    /// The conflict.
    pub conflict: Conflict,
}

impl Store {
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
                model::conflicts::resolve(
                    &mut loaded.doc,
                    path,
                    listed,
                    choice,
                    &actor.user_id,
                    now,
                )
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
}
