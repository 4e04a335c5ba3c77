//! Conflicts: concurrent values of one field, kept and listed until a person resolves them.
//!
//! Automerge keeps every concurrent value of a map key (`get_all`) and picks one
//! deterministically for `get`. For clinical data a silent pick is not acceptable, so every
//! field with more than one *distinct* value is reported, with each value's author and time.
//! Nothing is auto-resolved — medications and allergies least of all. Identical concurrent
//! values (two nurses writing the same dose offline) are one value, not a conflict.
//!
//! Each listed value carries its automerge op id (`counter@actor`) as a stable identity:
//! resolving names the chosen value by it, never by a position in a list that a sync may have
//! reordered in between.
//!
//! The store keeps an index of conflicts and refreshes it incrementally ([`touched_fields`] +
//! [`conflicts_under`]): only the fields the new changes wrote are looked at again.

use std::collections::BTreeSet;

use automerge::{AutoCommit, ChangeHash, ObjId, ObjType, Prop, ROOT, ReadDoc, Value, ValueRef};
use serde::{Deserialize, Serialize};

use automerge::transaction::Transactable;

use super::{Actor, change_author, value_to_json};
use crate::{Error, Result};

/// Keys whose concurrent values are bookkeeping, not clinical content.
const IGNORED_KEYS: &[&str] = &["updatedBy", "updatedAt"];

/// One value of a conflicted field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictValue {
    /// The value's stable identity: the automerge op id that wrote it, `counter@actor`. Pass it
    /// to `Store::resolve_conflict`. When several concurrent ops wrote the same value, this is
    /// the one from the change with the smallest hash. (Empty in rows an older build indexed,
    /// which the store re-walks at open.)
    #[serde(default)]
    pub id: String,
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
    /// Every distinct concurrent value, ordered by change hash so the list is identical on all
    /// replicas.
    pub values: Vec<ConflictValue>,
}

impl Conflict {
    /// The ids of the listed values, sorted: what a resolution checks it still matches.
    pub fn value_ids(&self) -> BTreeSet<&str> {
        self.values.iter().map(|v| v.id.as_str()).collect()
    }
}

/// List every conflicted field of a document.
pub fn find_conflicts(doc: &AutoCommit) -> Vec<Conflict> {
    let mut out = Vec::new();
    walk(doc, &ROOT, ObjType::Map, &mut Vec::new(), &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Resolve the conflict `listed` (as a person saw it) at `path` by keeping the value whose id
/// is `choice`: the chosen value is written over every concurrent one and a `resolutions`
/// entry records what was replaced, by `user_id`, at `now_ms`. The pending operations are not
/// committed (the caller commits them as one change with its author).
///
/// Refused with [`Error::ConflictChanged`] when the field no longer holds exactly the listed
/// values (a sync added or resolved one since the person looked), so nothing is resolved on a
/// set of values nobody saw. Only scalar fields can be resolved by choice.
pub fn resolve(
    doc: &mut AutoCommit,
    path: &str,
    listed: &Conflict,
    choice: &str,
    user_id: &str,
    now_ms: i64,
) -> Result<()> {
    let changed = || Error::ConflictChanged {
        path: path.to_owned(),
    };
    let (parent, prop) = super::resolve_path(doc, path).map_err(|_| changed())?;
    let current = conflict_at(doc, &parent, prop.clone(), path).ok_or_else(changed)?;
    if current.value_ids() != listed.value_ids() {
        return Err(changed());
    }
    let chosen = current
        .values
        .iter()
        .find(|v| v.id == choice)
        .ok_or_else(|| Error::ItemNotFound {
            what: "conflict value",
            id: choice.to_owned(),
        })?
        .value
        .clone();
    let scalar = super::json_to_scalar(&chosen).ok_or_else(|| {
        Error::InvalidInput(
            "only scalar fields can be resolved by choice; edit the object instead".into(),
        )
    })?;
    doc.put(&parent, prop, scalar)?;
    let list = super::ensure_obj(
        doc,
        &automerge::ROOT,
        "resolutions",
        automerge::ObjType::List,
    )?;
    let at = doc.length(&list);
    let entry = doc.insert_object(&list, at, automerge::ObjType::Map)?;
    doc.put(&entry, "path", path)?;
    doc.put(&entry, "value", chosen.to_string())?;
    doc.put(&entry, "replaced", serde_json::to_string(&current.values)?)?;
    doc.put(&entry, "resolvedBy", user_id)?;
    doc.put(&entry, "resolvedAt", now_ms)?;
    Ok(())
}

/// Paths of every open conflict of a document (what blocks signing).
pub(crate) fn open_conflict_paths(doc: &AutoCommit) -> Vec<String> {
    find_conflicts(doc).into_iter().map(|c| c.path).collect()
}

/// The conflict at one field, if it has more than one distinct value.
pub(crate) fn conflict_at(
    doc: &AutoCommit,
    obj: &ObjId,
    prop: Prop,
    path: &str,
) -> Option<Conflict> {
    let values = doc.get_all(obj, prop).ok()?;
    let listed = distinct_values(doc, &values);
    (listed.len() > 1).then(|| Conflict {
        path: path.to_owned(),
        values: listed,
    })
}

/// Whether a map field holds more than one distinct value.
pub(crate) fn is_conflicted(doc: &AutoCommit, obj: &ObjId, key: &str) -> bool {
    doc.get_all(obj, key)
        .map(|values| values.len() > 1 && distinct_values(doc, &values).len() > 1)
        .unwrap_or(false)
}

/// What a set of new changes touched, for re-checking conflicts there only.
#[derive(Debug, Default)]
pub(crate) struct Touched {
    /// Map fields written or deleted: (map object, key).
    pub fields: Vec<(ObjId, String)>,
    /// Lists with inserted, deleted or overwritten elements: indexes shift, so the whole list
    /// is re-checked.
    pub lists: Vec<ObjId>,
}

/// The map fields and lists that the changes after `before` wrote (Text edits are skipped:
/// Text merges by character and cannot conflict). Costs in proportion to those changes.
pub(crate) fn touched_fields(doc: &mut AutoCommit, before: &[ChangeHash]) -> Touched {
    let mut fields = BTreeSet::new();
    let mut lists = BTreeSet::new();
    // A local edit is one change on top of `before`: take it directly (the per-edit path).
    // Otherwise (merges) collect every change after `before`.
    let mut sorted_before = before.to_vec();
    sorted_before.sort();
    let changes = match doc.get_last_local_change() {
        Some(last)
            if doc.get_heads() == [last.hash()] && {
                let mut deps = last.deps().to_vec();
                deps.sort();
                deps == sorted_before
            } =>
        {
            vec![last]
        }
        _ => doc.document().get_changes(before),
    };
    let doc = &*doc;
    for change in changes {
        for op in change.decode().operations {
            let obj = match &op.obj {
                automerge::legacy::ObjectId::Root => (ROOT, ObjType::Map),
                other => match doc.import(&other.to_string()) {
                    Ok(found) => found,
                    Err(_) => continue,
                },
            };
            match (obj.1, &op.key) {
                (ObjType::Map | ObjType::Table, automerge::legacy::Key::Map(key)) => {
                    fields.insert((obj.0, key.to_string()));
                }
                (ObjType::List, _) => {
                    lists.insert(obj.0);
                }
                _ => {}
            }
        }
    }
    Touched {
        fields: fields.into_iter().collect(),
        lists: lists.into_iter().collect(),
    }
}

/// The path of an object from the root as segments, or `None` if it is not visible (deleted,
/// or inside a concurrent value that does not win).
pub(crate) fn visible_path(doc: &AutoCommit, obj: &ObjId) -> Option<Vec<String>> {
    if *obj == ROOT {
        return Some(Vec::new());
    }
    let path = doc.parents(obj).ok()?.visible_path()?;
    Some(path.into_iter().map(|(_, p)| prop_segment(&p)).collect())
}

/// Every conflict at a map field and below it (in every concurrent value).
pub(crate) fn conflicts_under_field(
    doc: &AutoCommit,
    obj: &ObjId,
    key: &str,
    path: &mut Vec<String>,
) -> Vec<Conflict> {
    let mut out = Vec::new();
    path.push(key.to_owned());
    visit(
        doc,
        obj,
        Prop::Map(key.to_owned()),
        path,
        &mut out,
        IGNORED_KEYS.contains(&key),
    );
    path.pop();
    out
}

/// Every conflict inside an object (not at its own field).
pub(crate) fn conflicts_inside(
    doc: &AutoCommit,
    obj: &ObjId,
    ty: ObjType,
    path: &mut Vec<String>,
) -> Vec<Conflict> {
    let mut out = Vec::new();
    walk(doc, obj, ty, path, &mut out);
    out
}

fn prop_segment(p: &Prop) -> String {
    match p {
        Prop::Map(k) => k.clone(),
        Prop::Seq(i) => i.to_string(),
    }
}

/// Every conflict inside `obj`, in one pass over it: automerge's range iterators say which
/// fields hold more than one visible value (`conflict`), and only those are read with
/// `get_all` ([`visit`]); every other field's single value is descended into directly.
/// Seeking each key with `get_all` instead made this walk a tenth of a fetched note's import.
fn walk(
    doc: &AutoCommit,
    obj: &ObjId,
    ty: ObjType,
    path: &mut Vec<String>,
    out: &mut Vec<Conflict>,
) {
    match ty {
        ObjType::Map | ObjType::Table => {
            for item in doc.map_range(obj, ..) {
                let key = item.key.to_string();
                path.push(key.clone());
                if item.conflict {
                    let ignored = IGNORED_KEYS.contains(&key.as_str());
                    visit(doc, obj, Prop::Map(key), path, out, ignored);
                } else if let ValueRef::Object(ty) = item.value {
                    walk(doc, &item.id(), ty, path, out);
                }
                path.pop();
            }
        }
        ObjType::List => {
            for item in doc.list_range(obj, ..) {
                path.push(item.index.to_string());
                if item.conflict {
                    visit(doc, obj, Prop::Seq(item.index), path, out, false);
                } else if let ValueRef::Object(ty) = item.value {
                    walk(doc, &item.id(), ty, path, out);
                }
                path.pop();
            }
        }
        // Text merges character by character; it cannot conflict.
        ObjType::Text => {}
    }
}

/// The distinct values of a field: one entry per distinct scalar (the representative is the
/// op from the change with the smallest hash), every concurrent object on its own.
fn distinct_values(doc: &AutoCommit, values: &[(Value<'_>, ObjId)]) -> Vec<ConflictValue> {
    let mut listed: Vec<(bool, ConflictValue)> = values
        .iter()
        .map(|(v, id)| {
            let change = doc
                .hash_for_opid(id)
                .and_then(|h| doc.get_change_by_hash(&h));
            (
                matches!(v, Value::Object(_)),
                ConflictValue {
                    id: id.to_string(),
                    value: value_to_json(doc, v, id, None),
                    author: change.as_ref().and_then(|c| change_author(doc, c)),
                    time_ms: change
                        .as_ref()
                        .map(|c| c.timestamp().saturating_mul(1000))
                        .unwrap_or(0),
                    change: change.map(|c| c.hash().to_string()).unwrap_or_default(),
                },
            )
        })
        .collect();
    listed.sort_by(|a, b| (&a.1.change, &a.1.id).cmp(&(&b.1.change, &b.1.id)));
    let mut out: Vec<ConflictValue> = Vec::with_capacity(listed.len());
    for (is_object, value) in listed {
        if !is_object && out.iter().any(|o| o.value == value.value) {
            continue;
        }
        out.push(value);
    }
    out
}

/// List the field at `path` as a conflict if its `values` are more than one distinct value.
fn push_if_distinct(
    doc: &AutoCommit,
    values: &[(Value<'_>, ObjId)],
    path: &[String],
    out: &mut Vec<Conflict>,
) {
    if values.len() > 1 {
        let listed = distinct_values(doc, values);
        if listed.len() > 1 {
            out.push(Conflict {
                path: path.join("/"),
                values: listed,
            });
        }
    }
}

fn visit(
    doc: &AutoCommit,
    obj: &ObjId,
    prop: Prop,
    path: &mut Vec<String>,
    out: &mut Vec<Conflict>,
    ignored: bool,
) {
    let Ok(values) = doc.get_all(obj, prop) else {
        return;
    };
    if !ignored {
        push_if_distinct(doc, &values, path, out);
    }
    // Descend into every concurrent object, not only the winner, so nothing nested is hidden.
    for (v, id) in values {
        if let Value::Object(ty) = v {
            walk(doc, &id, ty, path, out);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::patient::{add_care_plan_item, set_care_plan_status};

    /// The walk as it was written first (a `get_all` per map key and per list index): the
    /// oracle the one-pass walk must match. It shares only how one field's values are judged
    /// ([`push_if_distinct`]); the traversal, which is what changed, is its own.
    fn lookup_walk(
        doc: &AutoCommit,
        obj: &ObjId,
        ty: ObjType,
        path: &mut Vec<String>,
        out: &mut Vec<Conflict>,
    ) {
        let props: Vec<Prop> = match ty {
            ObjType::Map | ObjType::Table => doc.keys(obj).map(Prop::Map).collect(),
            ObjType::List => (0..doc.length(obj)).map(Prop::Seq).collect(),
            ObjType::Text => Vec::new(),
        };
        for prop in props {
            path.push(prop_segment(&prop));
            let ignored = matches!(&prop, Prop::Map(k) if IGNORED_KEYS.contains(&k.as_str()));
            let values = doc.get_all(obj, prop).unwrap();
            if !ignored {
                push_if_distinct(doc, &values, path, out);
            }
            for (v, id) in values {
                if let Value::Object(ty) = v {
                    lookup_walk(doc, &id, ty, path, out);
                }
            }
            path.pop();
        }
    }

    fn lookup_conflicts(doc: &AutoCommit) -> Vec<Conflict> {
        let mut out = Vec::new();
        lookup_walk(doc, &ROOT, ObjType::Map, &mut Vec::new(), &mut out);
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    proptest::proptest! {
        #[test]
        fn the_one_pass_walk_finds_what_a_lookup_per_field_finds(
            edits in proptest::collection::vec(
                (proptest::prelude::any::<bool>(), crate::model::tests::edit()),
                1..60,
            )
        ) {
            use crate::model::tests::{Edit, apply};
            let mut a = AutoCommit::new();
            let mut b = a.fork();
            b.set_actor(automerge::ActorId::random());
            for (on_b, e) in &edits {
                match e {
                    Edit::Commit => {
                        if *on_b { b.commit(); } else { a.commit(); }
                    }
                    Edit::Merge => {
                        a.merge(&mut b).unwrap();
                        b.merge(&mut a).unwrap();
                        proptest::prop_assert_eq!(find_conflicts(&a), lookup_conflicts(&a));
                    }
                    e => apply(if *on_b { &mut b } else { &mut a }, e),
                }
            }
            a.merge(&mut b).unwrap();
            proptest::prop_assert_eq!(find_conflicts(&a), lookup_conflicts(&a));
        }
    }

    #[test]
    fn conflicts_in_nested_maps_and_list_elements_are_found() {
        let mut a = AutoCommit::new();
        let vitals = a.put_object(ROOT, "vitals", ObjType::List).unwrap();
        a.insert(&vitals, 0, 1).unwrap();
        let plan = a.put_object(ROOT, "plan", ObjType::Map).unwrap();
        a.put(&plan, "status", "open").unwrap();
        a.put(ROOT, "updatedBy", "a").unwrap();
        a.commit();
        let mut b = a.fork();
        b.set_actor(automerge::ActorId::random());
        a.put(&vitals, 0, 2).unwrap();
        b.put(&vitals, 0, 3).unwrap();
        a.put(&plan, "status", "met").unwrap();
        b.put(&plan, "status", "on hold").unwrap();
        a.put(ROOT, "updatedBy", "a2").unwrap();
        b.put(ROOT, "updatedBy", "b2").unwrap();
        a.commit();
        b.commit();
        a.merge(&mut b).unwrap();
        let found = find_conflicts(&a);
        let paths: Vec<&str> = found.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            ["plan/status", "vitals/0"],
            "bookkeeping keys are not listed"
        );
        assert!(found.iter().all(|c| c.values.len() == 2));
        assert_eq!(found, lookup_conflicts(&a));
    }

    fn by(doc: &mut AutoCommit, user: &str) {
        doc.set_actor(automerge::ActorId::random());
        doc.set_author(Some(
            Actor {
                user_id: user.into(),
                device_id: "dev".into(),
            }
            .author(),
        ));
    }

    #[test]
    fn resolve_keeps_the_chosen_value_only_while_the_listed_values_stand() {
        let mut doc = AutoCommit::new();
        by(&mut doc, "usr_a");
        let problem = add_care_plan_item(&mut doc, &[], "Pain", "active").expect("problem");
        doc.commit();
        let mut other = doc.fork();
        by(&mut other, "usr_b");
        set_care_plan_status(&mut doc, std::slice::from_ref(&problem), "met").expect("met");
        set_care_plan_status(&mut other, std::slice::from_ref(&problem), "on hold")
            .expect("on hold");
        doc.commit();
        other.commit();
        doc.merge(&mut other).expect("merge");
        let listed = find_conflicts(&doc).pop().expect("a conflict");
        let path = listed.path.clone();
        assert_eq!(path, format!("carePlan/problems/{problem}/status"));
        let met = listed
            .values
            .iter()
            .find(|v| v.value == "met")
            .expect("met listed")
            .id
            .clone();

        // A list the person never saw (one value missing) is refused, and nothing is written.
        let mut partial = listed.clone();
        partial.values.truncate(1);
        let heads = doc.get_heads();
        assert!(matches!(
            resolve(&mut doc, &path, &partial, &met, "usr_c", 1_000),
            Err(Error::ConflictChanged { .. })
        ));
        assert!(matches!(
            resolve(&mut doc, &path, &listed, "1@00", "usr_c", 1_000),
            Err(Error::ItemNotFound { .. })
        ));
        doc.commit();
        assert_eq!(doc.get_heads(), heads, "refusals wrote nothing");

        resolve(&mut doc, &path, &listed, &met, "usr_c", 1_000).expect("resolve");
        doc.commit();
        assert!(find_conflicts(&doc).is_empty());
        let (parent, prop) = super::super::resolve_path(&doc, &path).expect("path");
        let status = doc
            .get(&parent, prop)
            .expect("get")
            .map(|(v, _)| v.to_string());
        assert_eq!(status.as_deref(), Some("\"met\""));
        let list = super::super::get_obj(&doc, &ROOT, "resolutions").expect("resolutions");
        assert_eq!(doc.length(&list), 1);
        // Resolving again (the page is stale now) is refused.
        assert!(matches!(
            resolve(&mut doc, &path, &listed, &met, "usr_c", 2_000),
            Err(Error::ConflictChanged { .. })
        ));
    }
}
