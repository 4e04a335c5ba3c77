//! History: who changed what and when, and changes to signed notes that need review.

use std::collections::HashSet;

use automerge::{AutoCommit, ChangeHash, Prop};
use serde::{Deserialize, Serialize};

use super::visit_note::{read_signature, signature_heads};
use super::{Actor, change_author};

/// Root keys that may change after signing without altering the signed body.
const AFTER_SIGNING_KEYS: &[&str] = &["addenda", "resolutions", "signature", "status"];

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

/// Why a change of a signed note needs review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReviewReason {
    /// Made without having seen the signature (offline, concurrently). Not part of the signed
    /// version, which is rendered at the signature heads.
    ConcurrentWithSignature,
    /// Made after the signature yet touching the body (only a misbehaving client does this).
    BodyEditAfterSignature,
}

/// A change to a signed note that is not part of the signed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewItem {
    /// Change hash (hex).
    pub change: String,
    /// Who made it.
    pub author: Option<Actor>,
    /// When, ms since the epoch (second precision).
    pub time_ms: i64,
    /// Field paths it touched (`/`-separated).
    pub fields: Vec<String>,
    /// Why it is listed.
    pub reason: ReviewReason,
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

/// Changes of a signed note that are not part of the signed version: those concurrent with the
/// signature, and body edits causally after it. Empty for unsigned notes.
pub fn post_signature_changes(doc: &mut AutoCommit) -> Vec<ReviewItem> {
    let Some(heads) = read_signature(doc).as_ref().and_then(signature_heads) else {
        return Vec::new();
    };
    if heads.iter().any(|h| doc.get_change_by_hash(h).is_none()) {
        return Vec::new();
    }
    let rest = doc.get_changes(&heads);
    // The signing change has exactly the signature heads as deps; everything descending from it
    // has seen the signature.
    let mut after: HashSet<ChangeHash> = HashSet::new();
    let mut items = Vec::new();
    for change in &rest {
        let deps = change.deps();
        let is_sign = {
            let mut d = deps.to_vec();
            let mut h = heads.clone();
            d.sort();
            h.sort();
            d == h && touches_signature(doc, change)
        };
        let descends = deps.iter().any(|d| after.contains(d));
        if is_sign || descends {
            after.insert(change.hash());
        }
        if is_sign {
            continue;
        }
        let fields = changed_fields(doc, change);
        let reason = if descends {
            let body: Vec<&String> = fields
                .iter()
                .filter(|f| !AFTER_SIGNING_KEYS.contains(&f.split('/').next().unwrap_or("")))
                .collect();
            if body.is_empty() {
                continue;
            }
            ReviewReason::BodyEditAfterSignature
        } else {
            ReviewReason::ConcurrentWithSignature
        };
        items.push(ReviewItem {
            change: change.hash().to_string(),
            author: change_author(doc, change),
            time_ms: change.timestamp().saturating_mul(1000),
            fields,
            reason,
        });
    }
    items.sort_by(|a, b| a.change.cmp(&b.change));
    items
}

fn touches_signature(doc: &mut AutoCommit, change: &automerge::Change) -> bool {
    changed_fields(doc, change).iter().any(|f| f == "signature")
}
