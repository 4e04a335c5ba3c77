//! The clinical document model: one automerge document per patient chart and per visit note.
//!
//! # Root fields
//! Every document carries these at its root, all as **scalar strings or integers, never Text**,
//! because the relay reads them to decide access and identifiers must not merge character by
//! character:
//!
//! | field       | type            | meaning                                        |
//! |-------------|-----------------|------------------------------------------------|
//! | `schema`    | scalar string   | `fieldchart/patient@1`, `fieldchart/visit-note@1` |
//! | `kind`      | scalar string   | `patient` or `visit-note`                      |
//! | `patientId` | scalar string   | the patient the record belongs to              |
//! | `agencyId`  | scalar string   | the agency (tenant)                            |
//! | `createdBy` | scalar string   | user id of the creator                         |
//! | `createdAt` | scalar integer  | creation time, ms since the Unix epoch         |
//!
//! # Scalar or Text, per field
//! The rule (DESIGN §2): free prose a person types is automerge **Text** (both people's typing
//! merges); identifiers, codes, timestamps, enums and short structured values are **scalars**
//! (a concurrent write keeps both values and surfaces a [`Conflict`] for a person to resolve,
//! instead of splicing two medication doses into nonsense).
//!
//! Patient chart (`kind = "patient"`):
//! - `demographics.{name, dateOfBirth, address, phone, emergencyContact}` — scalar strings.
//!   Names and phone numbers are short values where a character merge produces a wrong value.
//! - `allergies.<id>.{substance, reaction, severity, status, recordedBy, recordedAt}` — scalars.
//! - `medications.<id>.{name, dose, route, frequency, status, updatedBy, updatedAt}` — scalars.
//! - `careTeam.<userId>.{name, role}` — scalars.
//! - `carePlan.problems.<id>.{description: Text, status}`, `.goals.<id>.{description: Text,
//!   status, targetDate}`, `.interventions.<id>.{description: Text, status, frequency}`.
//!
//! Visit note (`kind = "visit-note"`):
//! - `evv.{serviceType, patientId, date, location, clinicianId, startedAt, startMonotonicMs,
//!   endedAt, endMonotonicMs}` — scalars (the six Cures Act facts, captured on the device).
//! - `vitals[]` — append-only list of readings `{id, type, value, unit, takenAt, recordedBy,
//!   supersedes}`, all scalars; a correction is a new reading whose `supersedes` names the old id.
//! - `assessment`, `plan` — Text.
//! - `interventions[]`, `medicationsReviewed[]`, `teaching[]` — entries of scalars plus a Text
//!   `note`.
//! - `goalProgress.<goalId>.{status, note: Text}`, `nextVisit` — scalar.
//! - `status` (`draft`/`signed`, informative only: signed-ness comes from history, see
//!   [`signing`]), `signatures[]` — `{payload, signature}`: signed payload JSON text and Ed25519
//!   signature (hex), both scalars, each entry written in one change and never changed.
//! - `addenda[]` — `{id, author, createdAt, text: Text}`.
//! - `resolutions[]` — `{path, value, resolvedBy, resolvedAt}`: conflict resolutions (both kinds).

pub mod conflicts;
mod history;
pub mod import_guard;
pub(crate) mod patient;
pub mod schedule;
pub mod signing;
pub(crate) mod visit_note;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, TextEncoding, Value};

pub use conflicts::{Conflict, ConflictValue, find_conflicts};
pub use history::{HistoryEntry, changed_fields, history};
pub use patient::{
    Allergy, CarePlanItem, CarePlanLevel, CareTeamMember, Demographic, Medication, PatientChart,
    add_care_plan_item, new_patient_chart, set_care_plan_status, update_care_plan_description,
};
/// The chart edits the console makes as the office user (the store's own calls use them too).
pub use patient::{set_demographic, upsert_allergy, upsert_medication};
pub use signing::{
    DeviceKey, DirectoryKey, KeyDirectory, NoteLedger, ReviewItem, ReviewReason, Tamper, Verdict,
};
/// The canonical rendering a signature hashes (the console shows it as signed).
pub use visit_note::canonical_rendering;
pub use visit_note::{
    Addendum, ListEntry, NoteList, NoteStatus, NoteText, Signature, SignatureCheck, VisitNote,
    VisitStart, VitalReading, VitalType,
};

use crate::protocol::DocumentId;
use crate::{Error, Result};

/// Schema string of a patient chart.
pub const PATIENT_SCHEMA: &str = "fieldchart/patient@1";
/// Schema string of a visit note.
pub const VISIT_NOTE_SCHEMA: &str = "fieldchart/visit-note@1";

/// Who makes a change: a user on one device. Recorded as the automerge [`automerge::Author`] of
/// every change, so history answers "who changed this, on which device".
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Actor {
    /// The user's id at the agency.
    pub user_id: String,
    /// The device's id (issued with its token).
    pub device_id: String,
}

impl Actor {
    /// The automerge author bytes: `user_id` `0x1f` `device_id` (unit separator, which no id
    /// contains).
    pub fn author(&self) -> automerge::Author<'static> {
        let mut bytes = self.user_id.as_bytes().to_vec();
        bytes.push(0x1f);
        bytes.extend_from_slice(self.device_id.as_bytes());
        automerge::Author::from(bytes)
    }

    /// Parse author bytes written by [`Actor::author`]; `None` for authors written by other
    /// software (a JS client sets none).
    pub fn from_author(author: &automerge::Author<'_>) -> Option<Actor> {
        let s = std::str::from_utf8(author.as_bytes()).ok()?;
        let (user, device) = s.split_once('\u{1f}')?;
        Some(Actor {
            user_id: user.to_owned(),
            device_id: device.to_owned(),
        })
    }

    fn validate(&self) -> Result<()> {
        if self.user_id.is_empty()
            || self.user_id.contains('\u{1f}')
            || self.device_id.contains('\u{1f}')
        {
            return Err(Error::InvalidInput(
                "actor ids must be non-empty and printable".into(),
            ));
        }
        Ok(())
    }
}

/// Role of the person using a store, which decides what the core lets them do locally (the
/// relay enforces access independently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A field clinician (nurse, therapist).
    Clinician,
    /// Office staff: case managers, schedulers, reviewers.
    Office,
    /// Agency administrator.
    Admin,
}

impl Role {
    /// The role's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clinician => "clinician",
            Role::Office => "office",
            Role::Admin => "admin",
        }
    }
}

/// The kind of a document, from its root `kind` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DocKind {
    /// A patient chart.
    Patient,
    /// A visit note.
    VisitNote,
}

impl DocKind {
    /// The root `kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Patient => "patient",
            DocKind::VisitNote => "visit-note",
        }
    }

    /// Parse a root `kind` value.
    pub fn parse(s: &str) -> Option<DocKind> {
        match s {
            "patient" => Some(DocKind::Patient),
            "visit-note" => Some(DocKind::VisitNote),
            _ => None,
        }
    }
}

/// The root fields of a Fieldchart document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    /// `kind`, if it is one this build knows.
    pub kind: Option<DocKind>,
    /// `patientId`.
    pub patient_id: Option<String>,
    /// `agencyId`.
    pub agency_id: Option<String>,
    /// `createdBy`.
    pub created_by: Option<String>,
    /// `createdAt`, ms since the epoch.
    pub created_at: Option<i64>,
}

/// Read the root fields of a document.
pub fn root_info(doc: &impl ReadDoc) -> RootInfo {
    RootInfo {
        kind: get_string(doc, &automerge::ROOT, "kind")
            .as_deref()
            .and_then(DocKind::parse),
        patient_id: get_string(doc, &automerge::ROOT, "patientId"),
        agency_id: get_string(doc, &automerge::ROOT, "agencyId"),
        created_by: get_string(doc, &automerge::ROOT, "createdBy"),
        created_at: get_i64(doc, &automerge::ROOT, "createdAt"),
    }
}

/// A new empty document that counts text in UTF-16 code units, authored by `actor`.
pub(crate) fn new_document(actor: &Actor) -> Result<AutoCommit> {
    actor.validate()?;
    let mut doc = AutoCommit::new_with_encoding(TextEncoding::Utf16CodeUnit);
    doc.set_author(Some(actor.author()));
    Ok(doc)
}

/// Load a document saved by [`AutoCommit::save`] (or any automerge document), counting text in
/// UTF-16 code units.
pub fn load_document(bytes: &[u8]) -> Result<AutoCommit> {
    import_guard::check_chunks(bytes).map_err(|e| Error::InvalidInput(e.to_string()))?;
    let opts = automerge::LoadOptions::new().text_encoding(TextEncoding::Utf16CodeUnit);
    Ok(AutoCommit::load_with_options(bytes, opts)?)
}

pub(crate) fn put_root(
    doc: &mut AutoCommit,
    schema: &str,
    kind: DocKind,
    patient_id: &str,
    agency_id: &str,
    actor: &Actor,
    now_ms: i64,
) -> Result<()> {
    doc.put(automerge::ROOT, "schema", schema)?;
    doc.put(automerge::ROOT, "kind", kind.as_str())?;
    doc.put(automerge::ROOT, "patientId", patient_id)?;
    doc.put(automerge::ROOT, "agencyId", agency_id)?;
    doc.put(automerge::ROOT, "createdBy", actor.user_id.as_str())?;
    doc.put(automerge::ROOT, "createdAt", ScalarValue::Int(now_ms))?;
    Ok(())
}

/// Check that `doc` is of `kind`.
pub(crate) fn expect_kind(doc: &impl ReadDoc, id: DocumentId, kind: DocKind) -> Result<()> {
    let info = root_info(doc);
    if info.kind == Some(kind) {
        Ok(())
    } else {
        Err(Error::WrongKind {
            doc: id,
            expected: kind.as_str(),
            found: get_string(doc, &automerge::ROOT, "kind")
                .unwrap_or_else(|| "document without kind".into()),
        })
    }
}

/// A new random id for a list entry (vital reading, allergy, medication, ...).
pub(crate) fn new_item_id() -> String {
    let bytes: [u8; 12] = rand::random();
    hex::encode(bytes)
}

/// Read a string value: a scalar string, or the content of a Text object (JS clients write
/// plain strings as Text).
pub(crate) fn get_string(doc: &impl ReadDoc, obj: &ObjId, key: &str) -> Option<String> {
    match doc.get(obj, key).ok()?? {
        (Value::Scalar(s), _) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        (Value::Object(ObjType::Text), id) => doc.text(&id).ok(),
        _ => None,
    }
}

pub(crate) fn get_i64(doc: &impl ReadDoc, obj: &ObjId, key: &str) -> Option<i64> {
    match doc.get(obj, key).ok()?? {
        (Value::Scalar(s), _) => scalar_i64(s.as_ref()),
        _ => None,
    }
}

pub(crate) fn scalar_i64(s: &ScalarValue) -> Option<i64> {
    match s {
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Some(*i),
        ScalarValue::Uint(u) => i64::try_from(*u).ok(),
        // JS numbers that are integral arrive as F64 from some clients.
        ScalarValue::F64(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
        _ => None,
    }
}

/// Get a child object of a map, or create it as `ty`.
pub(crate) fn ensure_obj(
    doc: &mut AutoCommit,
    parent: &ObjId,
    key: &str,
    ty: ObjType,
) -> Result<ObjId> {
    match doc.get(parent, key)? {
        Some((Value::Object(t), id)) if t == ty => Ok(id),
        _ => Ok(doc.put_object(parent, key, ty)?),
    }
}

/// Get a child object if it exists.
pub(crate) fn get_obj(doc: &impl ReadDoc, parent: &ObjId, key: &str) -> Option<ObjId> {
    match doc.get(parent, key).ok()?? {
        (Value::Object(_), id) => Some(id),
        _ => None,
    }
}

/// Write `text` into a Text field of a map, creating the Text object if missing.
pub(crate) fn put_text(doc: &mut AutoCommit, parent: &ObjId, key: &str, text: &str) -> Result<()> {
    let obj = ensure_obj(doc, parent, key, ObjType::Text)?;
    doc.update_text(&obj, text)?;
    Ok(())
}

/// Convert an automerge value to JSON for rendering and conflict display.
pub(crate) fn value_to_json(
    doc: &impl ReadDoc,
    value: &Value<'_>,
    id: &ObjId,
    heads: Option<&[automerge::ChangeHash]>,
) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => J::String(s.to_string()),
            ScalarValue::Int(i) | ScalarValue::Timestamp(i) => J::from(*i),
            ScalarValue::Uint(u) => J::from(*u),
            ScalarValue::F64(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or(J::Null),
            ScalarValue::Boolean(b) => J::Bool(*b),
            ScalarValue::Counter(c) => J::from(i64::from(c)),
            ScalarValue::Bytes(b) => J::String(hex::encode(b)),
            ScalarValue::Null | ScalarValue::Unknown { .. } => J::Null,
        },
        Value::Object(ObjType::Text) => J::String(match heads {
            Some(h) => doc.text_at(id, h).unwrap_or_default(),
            None => doc.text(id).unwrap_or_default(),
        }),
        Value::Object(ObjType::Map) | Value::Object(ObjType::Table) => {
            J::Object(map_to_json(doc, id, heads, &[]))
        }
        Value::Object(ObjType::List) => {
            // One pass over the list (indexing each element would seek from the start).
            let items = match heads {
                Some(h) => doc.list_range_at(id, .., h),
                None => doc.list_range(id, ..),
            };
            J::Array(
                items
                    .map(|item| child_to_json(doc, item.value.clone(), || item.id(), heads))
                    .collect(),
            )
        }
    }
}

/// A map's entries as JSON (current state, or at `heads`), leaving out the keys in `skip`
/// (whose values are never rendered). One pass over the map, keys in automerge's (sorted)
/// order; each value is the one `get` would return.
pub(crate) fn map_to_json(
    doc: &impl ReadDoc,
    id: &ObjId,
    heads: Option<&[automerge::ChangeHash]>,
    skip: &[&str],
) -> serde_json::Map<String, serde_json::Value> {
    let items = match heads {
        Some(h) => doc.map_range_at(id, .., h),
        None => doc.map_range(id, ..),
    };
    let mut map = serde_json::Map::new();
    for item in items {
        if skip.contains(&item.key.as_ref()) {
            continue;
        }
        let value = child_to_json(doc, item.value.clone(), || item.id(), heads);
        map.insert(item.key.into_owned(), value);
    }
    map
}

/// One element of a map or list as JSON; `id` is asked only for objects.
fn child_to_json(
    doc: &impl ReadDoc,
    value: automerge::ValueRef<'_>,
    id: impl FnOnce() -> ObjId,
    heads: Option<&[automerge::ChangeHash]>,
) -> serde_json::Value {
    match value {
        automerge::ValueRef::Object(ty) => value_to_json(doc, &Value::Object(ty), &id(), heads),
        scalar => value_to_json(doc, &scalar.into_value(), &ObjId::Root, heads),
    }
}

/// Render a whole object as JSON (current state, or at `heads`).
pub(crate) fn obj_to_json(
    doc: &impl ReadDoc,
    obj: &ObjId,
    heads: Option<&[automerge::ChangeHash]>,
) -> serde_json::Value {
    value_to_json(doc, &Value::Object(ObjType::Map), obj, heads)
}

/// Current time in ms since the epoch (the device's wall clock).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Commit pending operations as one change with `message`, timestamped in seconds (automerge's
/// convention for change times).
pub(crate) fn commit(
    doc: &mut AutoCommit,
    message: &str,
    now_ms: i64,
) -> Option<automerge::ChangeHash> {
    doc.commit_with(
        automerge::transaction::CommitOptions::default()
            .with_message(message.to_owned())
            .with_time(now_ms.div_euclid(1000)),
    )
}

/// Find the parent object and property of a `/`-separated field path (as listed in
/// [`Conflict::path`]).
pub(crate) fn resolve_path(doc: &impl ReadDoc, path: &str) -> Result<(ObjId, automerge::Prop)> {
    let not_found = || Error::ItemNotFound {
        what: "field",
        id: path.to_owned(),
    };
    let segments: Vec<&str> = path.split('/').collect();
    let (last, parents) = segments.split_last().ok_or_else(not_found)?;
    let mut obj = automerge::ROOT;
    let mut ty = ObjType::Map;
    for seg in parents {
        let prop = prop_for(ty, seg).ok_or_else(not_found)?;
        match doc.get(&obj, prop)?.ok_or_else(not_found)? {
            (Value::Object(t), id) => {
                obj = id;
                ty = t;
            }
            _ => return Err(not_found()),
        }
    }
    Ok((obj, prop_for(ty, last).ok_or_else(not_found)?))
}

fn prop_for(ty: ObjType, seg: &str) -> Option<automerge::Prop> {
    match ty {
        ObjType::List | ObjType::Text => seg.parse().ok().map(automerge::Prop::Seq),
        ObjType::Map | ObjType::Table => Some(automerge::Prop::Map(seg.to_owned())),
    }
}

/// The scalar for a JSON value shown in a conflict; `None` for objects and arrays.
pub(crate) fn json_to_scalar(v: &serde_json::Value) -> Option<ScalarValue> {
    use serde_json::Value as J;
    match v {
        J::String(s) => Some(ScalarValue::Str(s.as_str().into())),
        J::Bool(b) => Some(ScalarValue::Boolean(*b)),
        J::Null => Some(ScalarValue::Null),
        J::Number(n) => n
            .as_i64()
            .map(ScalarValue::Int)
            .or_else(|| n.as_u64().map(ScalarValue::Uint))
            .or_else(|| n.as_f64().map(ScalarValue::F64)),
        J::Array(_) | J::Object(_) => None,
    }
}

/// Who made a change. Automerge records the author once per actor (in the actor's first
/// change), so look it up through the actor rather than on the change itself.
pub(crate) fn change_author(doc: &AutoCommit, change: &automerge::Change) -> Option<Actor> {
    doc.get_author_for_actor(change.actor_id())
        .and_then(|a| Actor::from_author(&a))
}

/// [`change_author`] for a plain [`automerge::Automerge`] (the relay's documents).
pub(crate) fn change_author_of(
    doc: &automerge::Automerge,
    change: &automerge::Change,
) -> Option<Actor> {
    doc.get_author_for_actor(change.actor_id())
        .and_then(|a| Actor::from_author(&a))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjId, ObjType, ROOT, ReadDoc, Value};
    use proptest::prelude::*;

    use super::{map_to_json, obj_to_json};

    /// The rendering as it was written first (a lookup per key and per list index): the oracle
    /// the one-pass rendering must match byte for byte, since signatures hash it.
    fn lookup_json(
        doc: &impl ReadDoc,
        value: &Value<'_>,
        id: &ObjId,
        heads: Option<&[automerge::ChangeHash]>,
    ) -> serde_json::Value {
        use serde_json::Value as J;
        match value {
            Value::Scalar(_) => super::value_to_json(doc, value, id, heads),
            Value::Object(ObjType::Text) => super::value_to_json(doc, value, id, heads),
            Value::Object(ObjType::Map) | Value::Object(ObjType::Table) => {
                let keys: Vec<String> = match heads {
                    Some(h) => doc.keys_at(id, h).collect(),
                    None => doc.keys(id).collect(),
                };
                let mut map = serde_json::Map::new();
                for key in keys {
                    let got = match heads {
                        Some(h) => doc.get_at(id, key.as_str(), h),
                        None => doc.get(id, key.as_str()),
                    };
                    if let Ok(Some((v, child))) = got {
                        map.insert(key, lookup_json(doc, &v, &child, heads));
                    }
                }
                J::Object(map)
            }
            Value::Object(ObjType::List) => {
                let len = match heads {
                    Some(h) => doc.length_at(id, h),
                    None => doc.length(id),
                };
                let mut out = Vec::new();
                for i in 0..len {
                    let got = match heads {
                        Some(h) => doc.get_at(id, i, h),
                        None => doc.get(id, i),
                    };
                    if let Ok(Some((v, child))) = got {
                        out.push(lookup_json(doc, &v, &child, heads));
                    }
                }
                J::Array(out)
            }
        }
    }

    /// Edits of a small note-like document, on two actors that merge now and then (so maps
    /// hold conflicts and lists interleave). Shared with the conflict walk's property test.
    #[derive(Debug, Clone)]
    pub(super) enum Edit {
        Put(u8, i64),
        PutStr(u8, String),
        Delete(u8),
        Push(u8),
        Remove(u8),
        Type(String),
        Nested(u8, bool),
        /// Overwrite a list element (concurrent ones conflict).
        SetAt(u8, i64),
        /// Write inside a nested map (concurrent ones conflict below the root).
        PutIn(u8, i64),
        Commit,
        Merge,
    }

    pub(super) fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (0u8..6, any::<i64>()).prop_map(|(k, v)| Edit::Put(k, v)),
            (0u8..6, "[a-z ]{0,6}").prop_map(|(k, v)| Edit::PutStr(k, v)),
            (0u8..6).prop_map(Edit::Delete),
            (0u8..3).prop_map(Edit::Push),
            (0u8..4).prop_map(Edit::Remove),
            "[a-zé ]{1,8}".prop_map(Edit::Type),
            (0u8..6, any::<bool>()).prop_map(|(k, list)| Edit::Nested(k, list)),
            (0u8..4, any::<i64>()).prop_map(|(i, v)| Edit::SetAt(i, v)),
            (0u8..6, 0i64..3).prop_map(|(k, v)| Edit::PutIn(k, v)),
            Just(Edit::Commit),
            Just(Edit::Merge),
        ]
    }

    pub(super) fn apply(doc: &mut AutoCommit, edit: &Edit) {
        // Key 5 is one whose concurrent values the conflict walk ignores.
        let key = |k: &u8| match k {
            5 => "updatedBy".to_owned(),
            k => format!("k{k}"),
        };
        let list = match doc.get(ROOT, "vitals").unwrap() {
            Some((Value::Object(ObjType::List), id)) => id,
            _ => doc.put_object(ROOT, "vitals", ObjType::List).unwrap(),
        };
        match edit {
            Edit::Put(k, v) => doc.put(ROOT, key(k), *v).unwrap(),
            Edit::PutStr(k, v) => doc.put(ROOT, key(k), v.as_str()).unwrap(),
            Edit::Delete(k) => doc.delete(ROOT, key(k)).unwrap(),
            Edit::Push(kind) => {
                let at = doc.length(&list);
                match kind {
                    0 => doc.insert(&list, at, i64::from(*kind)).unwrap(),
                    _ => {
                        let m = doc.insert_object(&list, at, ObjType::Map).unwrap();
                        doc.put(&m, "hr", 72).unwrap();
                        doc.put(&m, "note", "ok").unwrap();
                    }
                }
            }
            Edit::Remove(i) => {
                if usize::from(*i) < doc.length(&list) {
                    doc.delete(&list, usize::from(*i)).unwrap();
                }
            }
            Edit::Type(s) => {
                let text = match doc.get(ROOT, "narrative").unwrap() {
                    Some((Value::Object(ObjType::Text), id)) => id,
                    _ => doc.put_object(ROOT, "narrative", ObjType::Text).unwrap(),
                };
                let at = doc.length(&text);
                doc.splice_text(&text, at, 0, s).unwrap();
            }
            Edit::Nested(k, list) => {
                let ty = if *list { ObjType::List } else { ObjType::Map };
                let obj = doc.put_object(ROOT, key(k), ty).unwrap();
                if *list {
                    doc.insert(&obj, 0, "a").unwrap();
                } else {
                    doc.put(&obj, "x", 1).unwrap();
                }
            }
            Edit::SetAt(i, v) => {
                if usize::from(*i) < doc.length(&list) {
                    doc.put(&list, usize::from(*i), *v).unwrap();
                }
            }
            Edit::PutIn(k, v) => {
                if let Some((Value::Object(ObjType::Map), obj)) = doc.get(ROOT, key(k)).unwrap() {
                    doc.put(&obj, "x", *v).unwrap();
                }
            }
            Edit::Commit | Edit::Merge => {}
        }
    }

    proptest! {
        #[test]
        fn one_pass_rendering_equals_lookups_at_every_heads(
            edits in proptest::collection::vec((any::<bool>(), edit()), 1..60)
        ) {
            let mut a = AutoCommit::new();
            let mut b = a.fork();
            let mut heads = vec![a.get_heads()];
            for (on_b, e) in &edits {
                let doc = if *on_b { &mut b } else { &mut a };
                match e {
                    Edit::Commit => {
                        doc.commit();
                        heads.push(doc.get_heads());
                    }
                    Edit::Merge => {
                        a.merge(&mut b).unwrap();
                        b.merge(&mut a).unwrap();
                        heads.push(a.get_heads());
                    }
                    e => apply(doc, e),
                }
            }
            a.merge(&mut b).unwrap();
            heads.push(a.get_heads());
            let doc = a.document();
            let root = Value::Object(ObjType::Map);
            prop_assert_eq!(obj_to_json(doc, &ROOT, None), lookup_json(doc, &root, &ROOT, None));
            for h in &heads {
                let one_pass = obj_to_json(doc, &ROOT, Some(h));
                prop_assert_eq!(&one_pass, &lookup_json(doc, &root, &ROOT, Some(h)));
                // Skipping keys renders the rest exactly as before.
                let mut without = one_pass.as_object().cloned().unwrap_or_default();
                without.remove("k1");
                without.remove("vitals");
                prop_assert_eq!(without, map_to_json(doc, &ROOT, Some(h), &["k1", "vitals"]));
            }
        }
    }
}
