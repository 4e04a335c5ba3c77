//! History: who changed what and when. (Changes to signed notes that need review come from
//! the signature ledger, `signing`.)

use automerge::{AutoCommit, Prop};
use serde::{Deserialize, Serialize};

use super::{Actor, change_author};

/// One change in a document's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Change hash (hex).
    pub change: String,
    /// Author, when written by Fieldchart.
    pub author: Option<Actor>,
    /// Change time, ms since the epoch (second precision).
    pub time_ms: i64,
    /// The change's message (Fieldchart describes the operation).
    pub message: Option<String>,
}

/// Every change of a document, oldest first (causal order).
pub fn history(doc: &mut AutoCommit) -> Vec<HistoryEntry> {
    let changes = doc.get_changes(&[]);
    changes
        .iter()
        .map(|c| HistoryEntry {
            change: c.hash().to_string(),
            author: change_author(doc, c),
            time_ms: c.timestamp().saturating_mul(1000),
            message: c.message().map(str::to_owned),
        })
        .collect()
}

fn prop_string(p: &Prop) -> String {
    match p {
        Prop::Map(k) => k.clone(),
        Prop::Seq(i) => i.to_string(),
    }
}

/// Field paths one change touched.
pub fn changed_fields(doc: &mut AutoCommit, change: &automerge::Change) -> Vec<String> {
    let deps = change.deps().to_vec();
    let mut fields: Vec<String> = doc
        .diff(&deps, &[change.hash()])
        .into_iter()
        .map(|patch| {
            let mut parts: Vec<String> = patch.path.iter().map(|(_, p)| prop_string(p)).collect();
            match &patch.action {
                automerge::PatchAction::PutMap { key, .. }
                | automerge::PatchAction::DeleteMap { key } => parts.push(key.clone()),
                automerge::PatchAction::PutSeq { index, .. }
                | automerge::PatchAction::Insert { index, .. } => parts.push(index.to_string()),
                _ => {}
            }
            parts.join("/")
        })
        .collect();
    fields.sort();
    fields.dedup();
    fields
}
