//! Lists for screens, answered from the index tables only (no document is loaded).

use super::*;

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

impl Store {
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

    /// Signed notes with changes listed for review (concurrent with or after the signature,
    /// or tampering): what a reviewer's queue shows.
    pub fn notes_needing_review(&self) -> Result<Vec<NoteSummary>> {
        self.notes_where("WHERE doc_id IN (SELECT doc_id FROM review_items)", None)
    }

    /// Notes with local changes the relay has not confirmed yet.
    pub fn unsynced_notes(&self) -> Result<Vec<NoteSummary>> {
        self.notes_where(
            "WHERE doc_id IN (SELECT doc_id FROM documents WHERE unsynced = 1)",
            None,
        )
    }
}
