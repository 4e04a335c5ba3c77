//! The local audit trail: actions, the row writer used inside change transactions, the reader.

use super::*;

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
    pub(super) fn as_str(self) -> &'static str {
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

/// Append an audit row.
pub(super) fn audit(
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

impl Store {
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
}
