//! The device store as the app sees it: one-line delegations to `fieldchart_core::store::Store`
//! plus type and error conversion.
//!
//! Store calls are synchronous and block for as long as the SQLite transaction takes (well
//! under a millisecond for a keystroke, a few ms for a signature with its fsync, longer for a
//! first open that migrates): call them off the main thread (a background dispatch queue /
//! `Dispatchers.IO`). Only network calls (`SyncClient`, `enroll`) are `async`.

use std::sync::Arc;

use fieldchart_core::store as s;

use super::error::FfiResult;
use super::records::{
    Allergy, AuditEntry, Conflict, Demographic, HistoryEntry, ListEntry, Medication, NoteList,
    NoteStatus, NoteSummary, NoteText, OpenConflict, PatientChart, PatientSummary, Receipt,
    ReviewItem, Signature, SignatureCheck, StoreOptions, SyncFailure, UnconfirmedDocument,
    VisitNote, VisitStart, VitalReading, doc_id,
};

/// An open, encrypted device store. One file is opened by one `Store` at a time (a second
/// open is `StoreInUse`); `close_store()` releases the file and its lock (do it when the app goes
/// to the background on iOS); calls after `close_store()` fail with `Closed`.
#[derive(Debug, uniffi::Object)]
pub struct Store {
    pub(crate) inner: Arc<s::Store>,
}

#[uniffi::export]
impl Store {
    /// Open (or create) the store at `options.path` with the app's key.
    #[uniffi::constructor]
    pub fn open(options: StoreOptions) -> FfiResult<Arc<Store>> {
        Ok(Arc::new(Store {
            inner: Arc::new(s::Store::open(options.into_core()?)?),
        }))
    }

    /// Release the file and its lock (calls after it fail with `Closed`). Idempotent. Named
    /// `close_store`, not `close`: Kotlin objects are `AutoCloseable`, whose `close()` frees
    /// the handle (it does not close a store a `SyncClient` still holds).
    pub fn close_store(&self) -> FfiResult<()> {
        Ok(self.inner.close()?)
    }

    /// This device's Ed25519 public key (32 bytes), for enrollment.
    pub fn device_public_key(&self) -> FfiResult<Vec<u8>> {
        Ok(self.inner.device_public_key()?.to_vec())
    }

    // ----- patient charts -----

    /// Create a patient chart (office and admin roles; charts normally come from the relay).
    pub fn create_patient(
        &self,
        agency_id: String,
        patient_id: String,
        name: String,
    ) -> FfiResult<String> {
        Ok(self
            .inner
            .create_patient(&agency_id, &patient_id, &name)?
            .to_string())
    }

    /// Read a patient chart.
    pub fn patient_chart(&self, document_id: String) -> FfiResult<PatientChart> {
        Ok(self.inner.patient_chart(doc_id(&document_id)?)?.into())
    }

    /// Set a demographic field.
    pub fn set_demographic(
        &self,
        document_id: String,
        field: Demographic,
        value: String,
    ) -> FfiResult<()> {
        Ok(self
            .inner
            .set_demographic(doc_id(&document_id)?, field.into(), &value)?)
    }

    /// Add (`read` = None) or update an allergy; `read` is the record as the user saw it, so
    /// only fields the user changed are written (`Stale` if someone changed them since).
    pub fn upsert_allergy(
        &self,
        document_id: String,
        read: Option<Allergy>,
        allergy: Allergy,
    ) -> FfiResult<String> {
        let read = read.map(Into::into);
        Ok(self
            .inner
            .upsert_allergy(doc_id(&document_id)?, read.as_ref(), &allergy.into())?)
    }

    /// Add or update a medication (see `upsert_allergy`).
    pub fn upsert_medication(
        &self,
        document_id: String,
        read: Option<Medication>,
        medication: Medication,
    ) -> FfiResult<String> {
        let read = read.map(Into::into);
        Ok(self.inner.upsert_medication(
            doc_id(&document_id)?,
            read.as_ref(),
            &medication.into(),
        )?)
    }

    /// Add a care-plan item under `parent` (ids from the top; empty: a new problem). Returns
    /// its id.
    pub fn add_care_plan_item(
        &self,
        document_id: String,
        parent: Vec<String>,
        description: String,
        status: String,
    ) -> FfiResult<String> {
        Ok(self
            .inner
            .add_care_plan_item(doc_id(&document_id)?, &parent, &description, &status)?)
    }

    /// Set a care-plan item's status (`path` as listed in `CarePlanItem.path`).
    pub fn set_care_plan_status(
        &self,
        document_id: String,
        path: Vec<String>,
        status: String,
    ) -> FfiResult<()> {
        Ok(self
            .inner
            .set_care_plan_status(doc_id(&document_id)?, &path, &status)?)
    }

    /// Replace a care-plan item's description (whole value; only the difference is written).
    pub fn update_care_plan_description(
        &self,
        document_id: String,
        path: Vec<String>,
        text: String,
    ) -> FfiResult<()> {
        Ok(self
            .inner
            .update_care_plan_description(doc_id(&document_id)?, &path, &text)?)
    }

    // ----- visit notes -----

    /// Start a visit (EVV start): a new draft note. Returns its document id.
    pub fn start_visit(&self, start: VisitStart) -> FfiResult<String> {
        Ok(self.inner.start_visit(&start.into())?.to_string())
    }

    /// Finish a visit (EVV end).
    pub fn finish_visit(
        &self,
        document_id: String,
        ended_at_ms: i64,
        end_monotonic_ms: i64,
    ) -> FfiResult<()> {
        Ok(self
            .inner
            .finish_visit(doc_id(&document_id)?, ended_at_ms, end_monotonic_ms)?)
    }

    /// Read a visit note (a signed note: the version that was signed, with addenda).
    pub fn visit_note(&self, document_id: String) -> FfiResult<VisitNote> {
        Ok(self.inner.visit_note(doc_id(&document_id)?)?.into())
    }

    /// Record a vital-sign reading; returns its id.
    pub fn record_vital(&self, document_id: String, reading: VitalReading) -> FfiResult<String> {
        Ok(self
            .inner
            .record_vital(doc_id(&document_id)?, &reading.into())?)
    }

    /// Splice a narrative: delete `delete` UTF-16 code units at UTF-16 position `position`
    /// and insert `insert` there (what Android's `EditText` and iOS's `NSString` ranges count).
    /// A position inside a surrogate pair or past the end is `InvalidInput`; nothing changes.
    pub fn splice_text(
        &self,
        document_id: String,
        field: NoteText,
        position: u32,
        delete: u32,
        insert: String,
    ) -> FfiResult<()> {
        Ok(self.inner.splice_text(
            doc_id(&document_id)?,
            field.into(),
            position as usize,
            delete as usize,
            &insert,
        )?)
    }

    /// Replace a narrative with `text` (whole value; only the difference is written).
    pub fn update_text(&self, document_id: String, field: NoteText, text: String) -> FfiResult<()> {
        Ok(self
            .inner
            .update_text(doc_id(&document_id)?, field.into(), &text)?)
    }

    /// Add an intervention, medication reviewed or teaching entry; returns its id.
    pub fn add_note_entry(
        &self,
        document_id: String,
        list: NoteList,
        entry: ListEntry,
    ) -> FfiResult<String> {
        Ok(self
            .inner
            .add_note_entry(doc_id(&document_id)?, list.into(), &entry.into())?)
    }

    /// Record progress against a care-plan goal.
    pub fn set_goal_progress(
        &self,
        document_id: String,
        goal_id: String,
        status: String,
        note: String,
    ) -> FfiResult<()> {
        Ok(self
            .inner
            .set_goal_progress(doc_id(&document_id)?, &goal_id, &status, &note)?)
    }

    /// Set the next visit (free text or a date).
    pub fn set_next_visit(&self, document_id: String, next: String) -> FfiResult<()> {
        Ok(self.inner.set_next_visit(doc_id(&document_id)?, &next)?)
    }

    /// Sign the note (clinicians). Refused with `ConflictOpen` while conflicts are open.
    pub fn sign(&self, document_id: String) -> FfiResult<Signature> {
        Ok(self.inner.sign(doc_id(&document_id)?)?.into())
    }

    /// Add an addendum (the only change a signed note takes); returns its id.
    pub fn add_addendum(&self, document_id: String, text: String) -> FfiResult<String> {
        Ok(self.inner.add_addendum(doc_id(&document_id)?, &text)?)
    }

    /// Verify the note's signature against the agency's keys (fetched with
    /// `SyncClient.fetch_keys`).
    pub fn verify_signature(&self, document_id: String) -> FfiResult<SignatureCheck> {
        Ok(self.inner.verify_signature(doc_id(&document_id)?)?.into())
    }

    /// The note rendered as signed (for printing or sending; audited).
    pub fn render_signed(&self, document_id: String) -> FfiResult<String> {
        Ok(self.inner.export_signed(doc_id(&document_id)?)?)
    }

    /// Changes to a signed note that need review.
    pub fn post_signature_changes(&self, document_id: String) -> FfiResult<Vec<ReviewItem>> {
        Ok(into_all(
            self.inner.post_signature_changes(doc_id(&document_id)?)?,
        ))
    }

    // ----- conflicts and history -----

    /// The document's fields with concurrent values.
    pub fn conflicts(&self, document_id: String) -> FfiResult<Vec<Conflict>> {
        Ok(into_all(self.inner.conflicts(doc_id(&document_id)?)?))
    }

    /// Every open conflict in the store.
    pub fn open_conflicts(&self) -> FfiResult<Vec<OpenConflict>> {
        Ok(into_all(self.inner.open_conflicts()?))
    }

    /// Resolve `listed` (as listed) by choosing the value with id `choice`. `Stale` if the
    /// conflict changed since it was listed.
    pub fn resolve_conflict(
        &self,
        document_id: String,
        listed: Conflict,
        choice: String,
    ) -> FfiResult<()> {
        Ok(self
            .inner
            .resolve_conflict(doc_id(&document_id)?, &(&listed).into(), &choice)?)
    }

    /// Who changed the document, when.
    pub fn history(&self, document_id: String) -> FfiResult<Vec<HistoryEntry>> {
        Ok(into_all(self.inner.history(doc_id(&document_id)?)?))
    }

    // ----- lists (from the index; no document is loaded) -----

    /// Every patient in the store.
    pub fn patients(&self) -> FfiResult<Vec<PatientSummary>> {
        Ok(into_all(self.inner.patients()?))
    }

    /// A patient's notes.
    pub fn notes_for_patient(&self, patient_id: String) -> FfiResult<Vec<NoteSummary>> {
        Ok(into_all(self.inner.notes_for_patient(&patient_id)?))
    }

    /// Notes of one visit date (`YYYY-MM-DD`): today's visits.
    pub fn notes_on(&self, date: String) -> FfiResult<Vec<NoteSummary>> {
        Ok(into_all(self.inner.notes_on(&date)?))
    }

    /// Notes with a status.
    pub fn notes_with_status(&self, status: NoteStatus) -> FfiResult<Vec<NoteSummary>> {
        Ok(into_all(self.inner.notes_with_status(status.into())?))
    }

    /// Unsigned notes.
    pub fn drafts(&self) -> FfiResult<Vec<NoteSummary>> {
        Ok(into_all(self.inner.drafts()?))
    }

    /// Notes with local changes the relay has not confirmed.
    pub fn unsynced_notes(&self) -> FfiResult<Vec<NoteSummary>> {
        Ok(into_all(self.inner.unsynced_notes()?))
    }

    /// Signed notes with changes listed for review.
    pub fn notes_needing_review(&self) -> FfiResult<Vec<NoteSummary>> {
        Ok(into_all(self.inner.notes_needing_review()?))
    }

    /// Documents sync could not deliver, with the reason (their data stays here).
    pub fn sync_failures(&self) -> FfiResult<Vec<SyncFailure>> {
        Ok(into_all(self.inner.sync_failures()?))
    }

    /// Documents whose current state the relay has not confirmed.
    pub fn unconfirmed_documents(&self) -> FfiResult<Vec<UnconfirmedDocument>> {
        Ok(into_all(self.inner.unconfirmed_documents()?))
    }

    /// "Stored at the agency at …": what the relay confirmed of this document, if anything.
    pub fn receipt(&self, document_id: String) -> FfiResult<Option<Receipt>> {
        Ok(self.inner.receipt(doc_id(&document_id)?)?.map(Into::into))
    }

    /// The local audit trail, oldest first.
    pub fn audit_log(&self) -> FfiResult<Vec<AuditEntry>> {
        Ok(into_all(self.inner.audit_log()?))
    }
}

fn into_all<T, U: From<T>>(items: Vec<T>) -> Vec<U> {
    items.into_iter().map(Into::into).collect()
}
