//! The patient chart: demographics, allergies, medications, care team and care plan.
//!
//! Entries live in maps keyed by a random id (not in lists) so that two people adding entries
//! offline never collide, and an edit touches only the fields that changed: writing an unchanged
//! field would create a spurious concurrent value, and with it a false conflict.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};

use super::{
    Actor, DocKind, PATIENT_SCHEMA, commit, ensure_obj, get_obj, get_string, new_document,
    new_item_id, put_root, put_text,
};
use crate::protocol::DocumentId;
use crate::{Error, Result};

/// A demographic field of the chart (all scalar strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Demographic {
    /// Full name.
    Name,
    /// Date of birth, `YYYY-MM-DD`.
    DateOfBirth,
    /// Home address where visits take place.
    Address,
    /// Phone number.
    Phone,
    /// Emergency contact (name and phone).
    EmergencyContact,
}

impl Demographic {
    /// The document key.
    pub fn key(self) -> &'static str {
        match self {
            Demographic::Name => "name",
            Demographic::DateOfBirth => "dateOfBirth",
            Demographic::Address => "address",
            Demographic::Phone => "phone",
            Demographic::EmergencyContact => "emergencyContact",
        }
    }
}

/// An allergy entry. All fields are scalars; concurrent edits are conflicts, never auto-resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allergy {
    /// Entry id; empty when adding a new allergy (one is assigned).
    pub id: String,
    /// The substance (drug, food, material).
    pub substance: String,
    /// Observed reaction.
    pub reaction: String,
    /// `mild`, `moderate`, `severe`, ...
    pub severity: String,
    /// `active` or `inactive` (an allergy is retired, never deleted).
    pub status: String,
}

/// A medication entry. All fields are scalars; concurrent edits are conflicts, never
/// auto-resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Medication {
    /// Entry id; empty when adding a new medication (one is assigned).
    pub id: String,
    /// Drug name.
    pub name: String,
    /// Dose, e.g. `500 mg`.
    pub dose: String,
    /// Route, e.g. `oral`.
    pub route: String,
    /// Frequency, e.g. `twice daily`.
    pub frequency: String,
    /// `active`, `discontinued`, `on-hold`.
    pub status: String,
}

/// A member of the patient's care team.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CareTeamMember {
    /// The user's id.
    pub user_id: String,
    /// Display name.
    pub name: String,
    /// Discipline, e.g. `RN`, `PT`, `case manager`.
    pub role: String,
}

/// Level of a care-plan entry: problems hold goals, goals hold interventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CarePlanLevel {
    /// A problem (nursing diagnosis).
    Problem,
    /// A goal under a problem.
    Goal,
    /// An intervention under a goal.
    Intervention,
}

/// One care-plan entry with its children.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarePlanItem {
    /// Entry id.
    pub id: String,
    /// Problem, goal or intervention.
    pub level: CarePlanLevel,
    /// Description (Text: office and nurse may both type in it).
    pub description: String,
    /// `active`, `met`, `not-met`, `discontinued`, ...
    pub status: String,
    /// Goals of a problem, interventions of a goal.
    pub children: Vec<CarePlanItem>,
}

/// A read view of a patient chart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientChart {
    /// The chart's document id.
    pub document_id: DocumentId,
    /// `patientId` root field.
    pub patient_id: String,
    /// `agencyId` root field.
    pub agency_id: String,
    /// Demographic fields that are set, by key.
    pub demographics: std::collections::BTreeMap<String, String>,
    /// Allergies, sorted by substance.
    pub allergies: Vec<Allergy>,
    /// Medications, sorted by name.
    pub medications: Vec<Medication>,
    /// Care team, sorted by user id.
    pub care_team: Vec<CareTeamMember>,
    /// Care-plan problems (with goals and interventions), sorted by id.
    pub care_plan: Vec<CarePlanItem>,
}

/// Create a new patient chart document. Used by the relay's `admin create-patient` and by
/// office devices.
pub fn new_patient_chart(
    agency_id: &str,
    patient_id: &str,
    name: &str,
    author: &Actor,
    now_ms: i64,
) -> Result<(DocumentId, AutoCommit)> {
    if agency_id.is_empty() || patient_id.is_empty() {
        return Err(Error::InvalidInput(
            "agency and patient ids must not be empty".into(),
        ));
    }
    let mut doc = new_document(author)?;
    put_root(
        &mut doc,
        PATIENT_SCHEMA,
        DocKind::Patient,
        patient_id,
        agency_id,
        author,
        now_ms,
    )?;
    let demo = doc.put_object(ROOT, "demographics", ObjType::Map)?;
    doc.put(&demo, "name", name)?;
    for key in ["allergies", "medications", "careTeam"] {
        doc.put_object(ROOT, key, ObjType::Map)?;
    }
    let plan = doc.put_object(ROOT, "carePlan", ObjType::Map)?;
    doc.put_object(&plan, "problems", ObjType::Map)?;
    commit(&mut doc, "create patient chart", now_ms);
    Ok((DocumentId::random(), doc))
}

/// The `/`-joined path of a map field, for error messages (ids and keys only, no values).
fn field_path(doc: &AutoCommit, obj: &ObjId, key: &str) -> String {
    let mut path = super::conflicts::visible_path(doc, obj).unwrap_or_default();
    path.push(key.to_owned());
    path.join("/")
}

/// A single-field update: writes `value` only if the field does not already show it (no API
/// writes an unchanged value: that would close a conflict without a resolution record, or
/// create a false one). A field in conflict is never written over — the conflict must be
/// resolved first ([`Error::FieldInConflict`]).
fn put_if_changed(doc: &mut AutoCommit, obj: &ObjId, key: &str, value: &str) -> Result<bool> {
    if get_string(doc, obj, key).as_deref() == Some(value) {
        return Ok(false);
    }
    if super::conflicts::is_conflicted(doc, obj, key) {
        return Err(Error::FieldInConflict {
            path: field_path(doc, obj, key),
        });
    }
    doc.put(obj, key, value)?;
    Ok(true)
}

/// A record update against what the caller read: only fields where `new` differs from `read`
/// are written, each only if the document still holds the value the caller read there
/// ([`Error::StaleRead`] otherwise) and is not in conflict ([`Error::FieldInConflict`]).
/// Fields the caller left as read are never written, whatever the document holds now.
/// All checks run before any write, so a refused update writes nothing.
fn put_changed_fields(
    doc: &mut AutoCommit,
    obj: &ObjId,
    read: &[(&str, &str)],
    new: &[(&str, &str)],
) -> Result<bool> {
    let mut writes = Vec::new();
    for ((key, before), (_, after)) in read.iter().zip(new) {
        if before == after {
            continue;
        }
        if super::conflicts::is_conflicted(doc, obj, key) {
            return Err(Error::FieldInConflict {
                path: field_path(doc, obj, key),
            });
        }
        if get_string(doc, obj, key).unwrap_or_default() != *before {
            return Err(Error::StaleRead {
                path: field_path(doc, obj, key),
            });
        }
        writes.push((*key, *after));
    }
    for (key, value) in &writes {
        doc.put(obj, *key, *value)?;
    }
    Ok(!writes.is_empty())
}

/// Set a demographic field (written only if it changed, never over a conflict).
pub fn set_demographic(doc: &mut AutoCommit, field: Demographic, value: &str) -> Result<()> {
    let demo = ensure_obj(doc, &ROOT, "demographics", ObjType::Map)?;
    put_if_changed(doc, &demo, field.key(), value)?;
    Ok(())
}

/// Add an entry (`read` is `None` and the id empty) or update one against the fields the caller
/// read. Returns the id and whether anything was written.
fn upsert_entry(
    doc: &mut AutoCommit,
    list: &str,
    id: &str,
    read: Option<(&str, &[(&str, &str)])>,
    fields: &[(&str, &str)],
) -> Result<(String, bool)> {
    let parent = ensure_obj(doc, &ROOT, list, ObjType::Map)?;
    if id.is_empty() {
        if read.is_some() {
            return Err(Error::InvalidInput(
                "a new entry has no previously read version".into(),
            ));
        }
        let id = new_item_id();
        let entry = doc.put_object(&parent, id.as_str(), ObjType::Map)?;
        for (k, v) in fields {
            doc.put(&entry, *k, *v)?;
        }
        return Ok((id, true));
    }
    let Some((read_id, read_fields)) = read else {
        return Err(Error::InvalidInput(
            "updating an entry needs the version the caller read".into(),
        ));
    };
    if read_id != id {
        return Err(Error::InvalidInput(
            "the read version is of another entry".into(),
        ));
    }
    let entry = get_obj(doc, &parent, id).ok_or_else(|| Error::ItemNotFound {
        what: "entry",
        id: id.to_owned(),
    })?;
    let changed = put_changed_fields(doc, &entry, read_fields, fields)?;
    Ok((id.to_owned(), changed))
}

fn allergy_fields(a: &Allergy) -> [(&'static str, &str); 4] {
    [
        ("substance", &a.substance),
        ("reaction", &a.reaction),
        ("severity", &a.severity),
        ("status", &a.status),
    ]
}

fn medication_fields(m: &Medication) -> [(&'static str, &str); 5] {
    [
        ("name", &m.name),
        ("dose", &m.dose),
        ("route", &m.route),
        ("frequency", &m.frequency),
        ("status", &m.status),
    ]
}

/// Add an allergy (`a.id` empty, `read` `None`) or update one: `read` is the allergy as the
/// caller read it, and only the fields where `a` differs from it are written.
pub fn upsert_allergy(
    doc: &mut AutoCommit,
    read: Option<&Allergy>,
    a: &Allergy,
    actor: &Actor,
    now_ms: i64,
) -> Result<String> {
    let read_fields = read.map(allergy_fields);
    let (id, changed) = upsert_entry(
        doc,
        "allergies",
        &a.id,
        read.zip(read_fields.as_ref())
            .map(|(r, f)| (r.id.as_str(), f.as_slice())),
        &allergy_fields(a),
    )?;
    if changed {
        stamp(doc, "allergies", &id, actor, now_ms)?;
    }
    Ok(id)
}

/// Add a medication (`m.id` empty, `read` `None`) or update one: `read` is the medication as
/// the caller read it, and only the fields where `m` differs from it are written.
pub fn upsert_medication(
    doc: &mut AutoCommit,
    read: Option<&Medication>,
    m: &Medication,
    actor: &Actor,
    now_ms: i64,
) -> Result<String> {
    let read_fields = read.map(medication_fields);
    let (id, changed) = upsert_entry(
        doc,
        "medications",
        &m.id,
        read.zip(read_fields.as_ref())
            .map(|(r, f)| (r.id.as_str(), f.as_slice())),
        &medication_fields(m),
    )?;
    if changed {
        stamp(doc, "medications", &id, actor, now_ms)?;
    }
    Ok(id)
}

/// Record who last touched an entry. These bookkeeping fields are excluded from conflict
/// reports: two people touching the same entry is not itself a clinical conflict.
fn stamp(doc: &mut AutoCommit, list: &str, id: &str, actor: &Actor, now_ms: i64) -> Result<()> {
    if let Some(entry) = get_obj(doc, &ROOT, list).and_then(|l| get_obj(doc, &l, id)) {
        doc.put(&entry, "updatedBy", actor.user_id.as_str())?;
        doc.put(&entry, "updatedAt", now_ms)?;
    }
    Ok(())
}

/// Add or update a care-team member: each field is written only if it changed, and never over
/// a conflict.
pub(crate) fn set_care_team_member(doc: &mut AutoCommit, m: &CareTeamMember) -> Result<()> {
    if m.user_id.is_empty() {
        return Err(Error::InvalidInput(
            "care-team member without user id".into(),
        ));
    }
    let team = ensure_obj(doc, &ROOT, "careTeam", ObjType::Map)?;
    let entry = ensure_obj(doc, &team, &m.user_id, ObjType::Map)?;
    for (k, v) in [("name", &m.name), ("role", &m.role)] {
        if super::conflicts::is_conflicted(doc, &entry, k)
            && get_string(doc, &entry, k).as_deref() != Some(v.as_str())
        {
            return Err(Error::FieldInConflict {
                path: field_path(doc, &entry, k),
            });
        }
    }
    for (k, v) in [("name", &m.name), ("role", &m.role)] {
        put_if_changed(doc, &entry, k, v)?;
    }
    Ok(())
}

pub(crate) fn remove_care_team_member(doc: &mut AutoCommit, user_id: &str) -> Result<()> {
    let team = ensure_obj(doc, &ROOT, "careTeam", ObjType::Map)?;
    doc.delete(&team, user_id)?;
    Ok(())
}

/// Child container key of a care-plan level.
fn children_key(level: CarePlanLevel) -> Option<&'static str> {
    match level {
        CarePlanLevel::Problem => Some("goals"),
        CarePlanLevel::Goal => Some("interventions"),
        CarePlanLevel::Intervention => None,
    }
}

/// Find the map of the care-plan entry at `path` (problem id, goal id, intervention id).
fn care_plan_entry(doc: &impl ReadDoc, path: &[String]) -> Option<(ObjId, CarePlanLevel)> {
    let plan = get_obj(doc, &ROOT, "carePlan")?;
    let mut container = get_obj(doc, &plan, "problems")?;
    let mut level = CarePlanLevel::Problem;
    let mut entry = None;
    for (depth, id) in path.iter().enumerate() {
        if depth > 0 {
            let key = children_key(level)?;
            level = if level == CarePlanLevel::Problem {
                CarePlanLevel::Goal
            } else {
                CarePlanLevel::Intervention
            };
            container = get_obj(doc, entry.as_ref()?, key)?;
        }
        entry = Some(get_obj(doc, &container, id)?);
    }
    entry.map(|e| (e, level))
}

/// Add a problem (empty `parent`), a goal (parent = [problem]) or an intervention
/// (parent = [problem, goal]). Returns the new entry's id.
pub fn add_care_plan_item(
    doc: &mut AutoCommit,
    parent: &[String],
    description: &str,
    status: &str,
) -> Result<String> {
    let container = if parent.is_empty() {
        let plan = ensure_obj(doc, &ROOT, "carePlan", ObjType::Map)?;
        ensure_obj(doc, &plan, "problems", ObjType::Map)?
    } else {
        let (entry, level) = care_plan_entry(doc, parent).ok_or_else(|| Error::ItemNotFound {
            what: "care-plan entry",
            id: parent.join("/"),
        })?;
        let key = children_key(level)
            .ok_or_else(|| Error::InvalidInput("interventions have no children".into()))?;
        ensure_obj(doc, &entry, key, ObjType::Map)?
    };
    let id = new_item_id();
    let entry = doc.put_object(&container, id.as_str(), ObjType::Map)?;
    let text = doc.put_object(&entry, "description", ObjType::Text)?;
    doc.splice_text(&text, 0, 0, description)?;
    doc.put(&entry, "status", status)?;
    // Create the child container now: two people adding the first goal concurrently would
    // otherwise create two competing containers, and one person's goals would be hidden.
    let level = match parent.len() {
        0 => CarePlanLevel::Problem,
        1 => CarePlanLevel::Goal,
        _ => CarePlanLevel::Intervention,
    };
    if let Some(key) = children_key(level) {
        doc.put_object(&entry, key, ObjType::Map)?;
    }
    Ok(id)
}

/// Set the status of the care-plan entry at `path` (problem id, goal id, intervention id);
/// an unchanged status writes nothing.
pub fn set_care_plan_status(doc: &mut AutoCommit, path: &[String], status: &str) -> Result<()> {
    let (entry, _) = care_plan_entry(doc, path).ok_or_else(|| Error::ItemNotFound {
        what: "care-plan entry",
        id: path.join("/"),
    })?;
    put_if_changed(doc, &entry, "status", status)?;
    Ok(())
}

/// Replace the description of the care-plan entry at `path` (a text edit: concurrent edits of
/// the same description merge character by character).
pub fn update_care_plan_description(
    doc: &mut AutoCommit,
    path: &[String],
    text: &str,
) -> Result<()> {
    let (entry, _) = care_plan_entry(doc, path).ok_or_else(|| Error::ItemNotFound {
        what: "care-plan entry",
        id: path.join("/"),
    })?;
    put_text(doc, &entry, "description", text)
}

fn read_map_entries<T>(doc: &impl ReadDoc, key: &str, f: impl Fn(&ObjId, String) -> T) -> Vec<T> {
    let Some(parent) = get_obj(doc, &ROOT, key) else {
        return Vec::new();
    };
    let keys: Vec<String> = doc.keys(&parent).collect();
    keys.into_iter()
        .filter_map(|k| get_obj(doc, &parent, &k).map(|obj| f(&obj, k)))
        .collect()
}

fn read_care_plan(
    doc: &impl ReadDoc,
    container: &ObjId,
    level: CarePlanLevel,
) -> Vec<CarePlanItem> {
    let keys: Vec<String> = doc.keys(container).collect();
    keys.into_iter()
        .filter_map(|id| {
            let entry = get_obj(doc, container, &id)?;
            let children = match (children_key(level), level) {
                (Some(key), CarePlanLevel::Problem) => get_obj(doc, &entry, key)
                    .map(|c| read_care_plan(doc, &c, CarePlanLevel::Goal))
                    .unwrap_or_default(),
                (Some(key), _) => get_obj(doc, &entry, key)
                    .map(|c| read_care_plan(doc, &c, CarePlanLevel::Intervention))
                    .unwrap_or_default(),
                (None, _) => Vec::new(),
            };
            Some(CarePlanItem {
                description: get_string(doc, &entry, "description").unwrap_or_default(),
                status: get_string(doc, &entry, "status").unwrap_or_default(),
                id,
                level,
                children,
            })
        })
        .collect()
}

impl PatientChart {
    /// Read the chart from its document.
    pub fn read(document_id: DocumentId, doc: &impl ReadDoc) -> PatientChart {
        let s = |obj: &ObjId, k: &str| get_string(doc, obj, k).unwrap_or_default();
        let demographics = get_obj(doc, &ROOT, "demographics")
            .map(|d| {
                let keys: Vec<String> = doc.keys(&d).collect();
                keys.into_iter()
                    .filter_map(|k| get_string(doc, &d, &k).map(|v| (k, v)))
                    .collect()
            })
            .unwrap_or_default();
        let mut allergies = read_map_entries(doc, "allergies", |o, id| Allergy {
            id,
            substance: s(o, "substance"),
            reaction: s(o, "reaction"),
            severity: s(o, "severity"),
            status: s(o, "status"),
        });
        allergies.sort_by(|a, b| (&a.substance, &a.id).cmp(&(&b.substance, &b.id)));
        let mut medications = read_map_entries(doc, "medications", |o, id| Medication {
            id,
            name: s(o, "name"),
            dose: s(o, "dose"),
            route: s(o, "route"),
            frequency: s(o, "frequency"),
            status: s(o, "status"),
        });
        medications.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        let care_team = read_map_entries(doc, "careTeam", |o, user_id| CareTeamMember {
            name: s(o, "name"),
            role: s(o, "role"),
            user_id,
        });
        let care_plan = get_obj(doc, &ROOT, "carePlan")
            .and_then(|p| get_obj(doc, &p, "problems"))
            .map(|p| read_care_plan(doc, &p, CarePlanLevel::Problem))
            .unwrap_or_default();
        PatientChart {
            document_id,
            patient_id: s(&ROOT, "patientId"),
            agency_id: s(&ROOT, "agencyId"),
            demographics,
            allergies,
            medications,
            care_team,
            care_plan,
        }
    }

    /// The patient's name, if set.
    pub fn name(&self) -> Option<&str> {
        self.demographics.get("name").map(String::as_str)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn actor(u: &str) -> Actor {
        Actor {
            user_id: u.into(),
            device_id: "d1".into(),
        }
    }

    #[test]
    fn chart_round_trips_through_edits() {
        let a = actor("office-1");
        let (id, mut doc) = new_patient_chart("ag", "p1", "Ada Lovelace", &a, 1_000).unwrap();
        set_demographic(&mut doc, Demographic::Phone, "555-0100").unwrap();
        let med = upsert_medication(
            &mut doc,
            None,
            &Medication {
                name: "Metformin".into(),
                dose: "500 mg".into(),
                status: "active".into(),
                ..Default::default()
            },
            &a,
            2_000,
        )
        .unwrap();
        let problem = add_care_plan_item(&mut doc, &[], "Risk for falls", "active").unwrap();
        let goal = add_care_plan_item(
            &mut doc,
            std::slice::from_ref(&problem),
            "No falls in 60 days",
            "active",
        )
        .unwrap();
        add_care_plan_item(
            &mut doc,
            &[problem.clone(), goal.clone()],
            "Home safety teaching",
            "active",
        )
        .unwrap();
        set_care_plan_status(&mut doc, &[problem.clone(), goal], "met").unwrap();
        let chart = PatientChart::read(id, &doc);
        assert_eq!(chart.name(), Some("Ada Lovelace"));
        assert_eq!(chart.demographics["phone"], "555-0100");
        assert_eq!(chart.medications[0].id, med);
        assert_eq!(chart.care_plan[0].children[0].status, "met");
        assert_eq!(
            chart.care_plan[0].children[0].children[0].description,
            "Home safety teaching"
        );
        assert!(add_care_plan_item(&mut doc, &["nope".into()], "x", "active").is_err());
    }
}
