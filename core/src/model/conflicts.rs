//! Conflicts: concurrent values of one field, kept and listed until a person resolves them.
//!
//! Automerge keeps every concurrent value of a map key (`get_all`) and picks one
//! deterministically for `get`. For clinical data a silent pick is not acceptable, so every
//! field with more than one value is reported, with each value's author and time. Nothing is
//! auto-resolved — medications and allergies least of all.

use automerge::{AutoCommit, ObjId, ObjType, ROOT, ReadDoc, Value};
use serde::{Deserialize, Serialize};

use super::{Actor, change_author, value_to_json};

/// Keys whose concurrent values are bookkeeping, not clinical content.
const IGNORED_KEYS: &[&str] = &["updatedBy", "updatedAt"];

/// One value of a conflicted field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictValue {
    /// The value, as JSON (objects rendered whole).
    pub value: serde_json::Value,
    /// Who wrote it, when written by Fieldchart; `None` for foreign clients.
    pub author: Option<Actor>,
    /// When the change that wrote it was made, ms since the epoch (second precision).
    pub time_ms: i64,
    /// The change that wrote it (hex).
    pub change: String,
}

/// A field with concurrent values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// Path from the root, segments joined by `/` (map keys, list indexes).
    pub path: String,
    /// Every concurrent value, ordered by change hash so the list is identical on all replicas.
    pub values: Vec<ConflictValue>,
}

/// List every conflicted field of a document.
pub fn find_conflicts(doc: &AutoCommit) -> Vec<Conflict> {
    let mut out = Vec::new();
    walk(doc, &ROOT, ObjType::Map, &mut Vec::new(), &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn walk(
    doc: &AutoCommit,
    obj: &ObjId,
    ty: ObjType,
    path: &mut Vec<String>,
    out: &mut Vec<Conflict>,
) {
    match ty {
        ObjType::Map | ObjType::Table => {
            let keys: Vec<String> = doc.keys(obj).collect();
            for key in keys {
                path.push(key.clone());
                visit(
                    doc,
                    obj,
                    automerge::Prop::Map(key.clone()),
                    path,
                    out,
                    IGNORED_KEYS.contains(&key.as_str()),
                );
                path.pop();
            }
        }
        ObjType::List => {
            for i in 0..doc.length(obj) {
                path.push(i.to_string());
                visit(doc, obj, automerge::Prop::Seq(i), path, out, false);
                path.pop();
            }
        }
        // Text merges character by character; it cannot conflict.
        ObjType::Text => {}
    }
}

fn visit(
    doc: &AutoCommit,
    obj: &ObjId,
    prop: automerge::Prop,
    path: &mut Vec<String>,
    out: &mut Vec<Conflict>,
    ignored: bool,
) {
    let Ok(values) = doc.get_all(obj, prop) else {
        return;
    };
    if values.len() > 1 && !ignored {
        let mut listed: Vec<ConflictValue> = values
            .iter()
            .map(|(v, id)| {
                let change = doc
                    .hash_for_opid(id)
                    .and_then(|h| doc.get_change_by_hash(&h));
                ConflictValue {
                    value: value_to_json(doc, v, id, None),
                    author: change.as_ref().and_then(|c| change_author(doc, c)),
                    time_ms: change
                        .as_ref()
                        .map(|c| c.timestamp().saturating_mul(1000))
                        .unwrap_or(0),
                    change: change.map(|c| c.hash().to_string()).unwrap_or_default(),
                }
            })
            .collect();
        listed.sort_by(|a, b| a.change.cmp(&b.change));
        out.push(Conflict {
            path: path.join("/"),
            values: listed,
        });
    }
    // Descend into every concurrent object, not only the winner, so nothing nested is hidden.
    for (v, id) in values {
        if let Value::Object(ty) = v {
            walk(doc, &id, ty, path, out);
        }
    }
}
