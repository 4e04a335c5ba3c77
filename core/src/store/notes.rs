//! Visit notes: EVV start/finish, vitals, narrative text (UTF-16 splices and whole-value
//! updates), entries, signing, addenda, the signed read view and verification.

use super::*;

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

impl Store {
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
}
