//! Visit notes: EVV, vitals, narratives, signing and addenda.
//!
//! Signing follows Medicare's documentation rules: the signed note is a legal record. `sign`
//! stores the document heads at signing and a SHA-256 over a canonical rendering of the body
//! at those heads. The signed version is always rendered *at those heads*, so changes that
//! arrive later without having seen the signature (an offline edit) can never alter it; they are
//! reported as post-signature changes for review (see `history`).

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ObjId, ObjType, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};

use super::signing::{self, NoteLedger, SignatureEntry};
use super::{
    Actor, DocKind, VISIT_NOTE_SCHEMA, commit, ensure_obj, get_i64, get_obj, get_string,
    map_to_json, new_document, new_item_id, obj_to_json, put_root, put_text,
};
use crate::protocol::DocumentId;
use crate::{Error, Result};

/// Root keys that are not part of the signed body: the signature itself, the status it sets,
/// and what may legitimately be added after signing.
const UNSIGNED_KEYS: &[&str] = &[
    "signatures",
    "signature",
    "status",
    "addenda",
    "resolutions",
];

/// Everything captured when a visit starts (the EVV facts, device-side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitStart {
    /// Agency of the patient.
    pub agency_id: String,
    /// The patient visited.
    pub patient_id: String,
    /// Type of service, e.g. `skilled-nursing`.
    pub service_type: String,
    /// Visit date, `YYYY-MM-DD` in the agency's time zone.
    pub date: String,
    /// Where the service was delivered (address or `lat,lon`).
    pub location: String,
    /// Device wall clock at start, ms since the epoch.
    pub started_at_ms: i64,
    /// A monotonic clock reading at start (ms), to detect wall-clock skew.
    pub start_monotonic_ms: i64,
}

/// Status of a note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoteStatus {
    /// Being written.
    Draft,
    /// Signed; a legal record.
    Signed,
}

impl NoteStatus {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            NoteStatus::Draft => "draft",
            NoteStatus::Signed => "signed",
        }
    }
}

/// The narrative Text fields of a note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoteText {
    /// Assessment narrative.
    Assessment,
    /// Plan narrative.
    Plan,
}

impl NoteText {
    /// Document key.
    pub fn key(self) -> &'static str {
        match self {
            NoteText::Assessment => "assessment",
            NoteText::Plan => "plan",
        }
    }
}

/// Append-only lists of a note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoteList {
    /// Interventions performed.
    Interventions,
    /// Medications reviewed.
    MedicationsReviewed,
    /// Teaching given.
    Teaching,
}

impl NoteList {
    /// Document key.
    pub fn key(self) -> &'static str {
        match self {
            NoteList::Interventions => "interventions",
            NoteList::MedicationsReviewed => "medicationsReviewed",
            NoteList::Teaching => "teaching",
        }
    }
}

/// An entry of a [`NoteList`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// Entry id (assigned when added).
    pub id: String,
    /// Code or short title (scalar): the intervention, medication id, teaching topic.
    pub item: String,
    /// Free-text note (Text).
    pub note: String,
}

/// Kinds of vital signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VitalType {
    /// Blood pressure, value `120/80`, mmHg.
    BloodPressure,
    /// Pulse, beats/min.
    Pulse,
    /// Respirations, breaths/min.
    Respirations,
    /// Temperature.
    Temperature,
    /// Oxygen saturation, %.
    Spo2,
    /// Weight.
    Weight,
    /// Pain, 0–10.
    Pain,
    /// Blood glucose.
    Glucose,
}

impl VitalType {
    fn as_str(self) -> &'static str {
        match self {
            VitalType::BloodPressure => "blood-pressure",
            VitalType::Pulse => "pulse",
            VitalType::Respirations => "respirations",
            VitalType::Temperature => "temperature",
            VitalType::Spo2 => "spo2",
            VitalType::Weight => "weight",
            VitalType::Pain => "pain",
            VitalType::Glucose => "glucose",
        }
    }

    fn parse(s: &str) -> Option<VitalType> {
        [
            VitalType::BloodPressure,
            VitalType::Pulse,
            VitalType::Respirations,
            VitalType::Temperature,
            VitalType::Spo2,
            VitalType::Weight,
            VitalType::Pain,
            VitalType::Glucose,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// One vital-sign reading. Readings are never overwritten: a correction is a new reading with
/// `supersedes` set to the id it corrects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitalReading {
    /// Reading id (assigned when recorded).
    pub id: String,
    /// What was measured.
    pub vital: VitalType,
    /// The value as measured, e.g. `128/82`, `98.6`.
    pub value: String,
    /// Unit, e.g. `mmHg`, `F`.
    pub unit: String,
    /// When it was taken, ms since the epoch.
    pub taken_at_ms: i64,
    /// Who recorded it (filled in by the store).
    pub recorded_by: String,
    /// The reading this one corrects.
    pub supersedes: Option<String>,
}

/// A signature as shown to a person: who signed, on which device, when, over what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// User id of the signer.
    pub signed_by: String,
    /// The signer's device.
    pub device_id: String,
    /// The signer's role when signing.
    pub role: String,
    /// When, ms since the epoch.
    pub signed_at_ms: i64,
    /// Document heads at signing (hex).
    pub heads: Vec<String>,
    /// SHA-256 (hex) of the canonical rendering at `heads`.
    pub content_hash: String,
    /// The Ed25519 signature (hex) over the signed payload.
    pub signature: String,
    /// The change that added it (hex).
    pub change: String,
}

impl Signature {
    /// The view of a signature entry found in history (`None` if its payload is malformed).
    pub fn from_entry(entry: &SignatureEntry) -> Option<Signature> {
        let p = entry.payload.as_ref()?;
        Some(Signature {
            signed_by: p.user_id.clone(),
            device_id: p.device_id.clone(),
            role: p.role.clone(),
            signed_at_ms: p.signed_at_ms,
            heads: p.heads.clone(),
            content_hash: p.content_hash.clone(),
            signature: entry.signature.clone(),
            change: entry.change.clone(),
        })
    }
}

/// An addendum to a signed note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addendum {
    /// Addendum id.
    pub id: String,
    /// Author's user id.
    pub author: String,
    /// When, ms since the epoch.
    pub created_at_ms: i64,
    /// Text of the addendum.
    pub text: String,
}

/// Result of re-verifying a note's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignatureCheck {
    /// No signature in the note's history counts (none, or only ones that do not verify, which
    /// are listed as review items).
    NotSigned,
    /// Verified against the agency's keys: the rendering at the signature heads hashes to the
    /// signed hash, under an enrolled, unrevoked key of an allowed signer.
    Valid {
        /// The signed rendering.
        rendering: String,
        /// Who signed, when.
        signature: Signature,
    },
    /// Signed, but this replica's copy of the agency's keys does not know the signing device
    /// yet (fetch the keys and check again). The note is locked all the same.
    Unverified {
        /// Who claims to have signed.
        signature: Signature,
    },
    /// The signed heads are not all present in this replica yet (still syncing).
    HeadsMissing,
}

/// A read view of a visit note (current state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisitNote {
    /// Document id.
    pub document_id: DocumentId,
    /// Patient.
    pub patient_id: String,
    /// Agency.
    pub agency_id: String,
    /// Draft or signed.
    pub status: NoteStatus,
    /// EVV fields by key (values as JSON).
    pub evv: serde_json::Value,
    /// All readings, in recorded order, including superseded ones.
    pub vitals: Vec<VitalReading>,
    /// Assessment narrative.
    pub assessment: String,
    /// Plan narrative.
    pub plan: String,
    /// Interventions performed.
    pub interventions: Vec<ListEntry>,
    /// Medications reviewed.
    pub medications_reviewed: Vec<ListEntry>,
    /// Teaching given.
    pub teaching: Vec<ListEntry>,
    /// Goal progress by goal id: status and note.
    pub goal_progress: serde_json::Value,
    /// Next visit plan.
    pub next_visit: Option<String>,
    /// The signature, when signed.
    pub signature: Option<Signature>,
    /// Addenda, in order.
    pub addenda: Vec<Addendum>,
}

impl VisitNote {
    /// Readings that no later reading supersedes: what a clinician should see as current.
    pub fn current_vitals(&self) -> Vec<&VitalReading> {
        let superseded: std::collections::HashSet<&str> = self
            .vitals
            .iter()
            .filter_map(|v| v.supersedes.as_deref())
            .collect();
        self.vitals
            .iter()
            .filter(|v| !superseded.contains(v.id.as_str()))
            .collect()
    }
}

pub(crate) fn new_visit_note(
    start: &VisitStart,
    actor: &Actor,
    now_ms: i64,
) -> Result<(DocumentId, AutoCommit)> {
    for (name, v) in [
        ("agency_id", &start.agency_id),
        ("patient_id", &start.patient_id),
        ("service_type", &start.service_type),
        ("date", &start.date),
    ] {
        if v.is_empty() {
            return Err(Error::InvalidInput(format!("{name} must not be empty")));
        }
    }
    let mut doc = new_document(actor)?;
    put_root(
        &mut doc,
        VISIT_NOTE_SCHEMA,
        DocKind::VisitNote,
        &start.patient_id,
        &start.agency_id,
        actor,
        now_ms,
    )?;
    let evv = doc.put_object(ROOT, "evv", ObjType::Map)?;
    doc.put(&evv, "serviceType", start.service_type.as_str())?;
    doc.put(&evv, "patientId", start.patient_id.as_str())?;
    doc.put(&evv, "date", start.date.as_str())?;
    doc.put(&evv, "location", start.location.as_str())?;
    doc.put(&evv, "clinicianId", actor.user_id.as_str())?;
    doc.put(&evv, "startedAt", start.started_at_ms)?;
    doc.put(&evv, "startMonotonicMs", start.start_monotonic_ms)?;
    doc.put_object(ROOT, "vitals", ObjType::List)?;
    doc.put_object(ROOT, "assessment", ObjType::Text)?;
    doc.put_object(ROOT, "plan", ObjType::Text)?;
    for list in [
        NoteList::Interventions,
        NoteList::MedicationsReviewed,
        NoteList::Teaching,
    ] {
        doc.put_object(ROOT, list.key(), ObjType::List)?;
    }
    doc.put_object(ROOT, "goalProgress", ObjType::Map)?;
    doc.put_object(ROOT, "addenda", ObjType::List)?;
    // Made with the note, so two devices signing offline append to one list instead of
    // creating competing lists (a replaced list reads as tampering).
    doc.put_object(ROOT, signing::SIGNATURES_KEY, ObjType::List)?;
    doc.put(ROOT, "status", NoteStatus::Draft.as_str())?;
    commit(&mut doc, "start visit", now_ms);
    Ok((DocumentId::random(), doc))
}

pub(crate) fn finish_visit(
    doc: &mut AutoCommit,
    ended_at_ms: i64,
    end_monotonic_ms: i64,
) -> Result<()> {
    let evv = ensure_obj(doc, &ROOT, "evv", ObjType::Map)?;
    doc.put(&evv, "endedAt", ended_at_ms)?;
    doc.put(&evv, "endMonotonicMs", end_monotonic_ms)?;
    Ok(())
}

pub(crate) fn record_vital(
    doc: &mut AutoCommit,
    reading: &VitalReading,
    actor: &Actor,
) -> Result<String> {
    let list = ensure_obj(doc, &ROOT, "vitals", ObjType::List)?;
    if let Some(old) = &reading.supersedes
        && !read_vitals(doc).iter().any(|v| &v.id == old)
    {
        return Err(Error::ItemNotFound {
            what: "vital reading",
            id: old.clone(),
        });
    }
    let id = new_item_id();
    let at = doc.length(&list);
    let entry = doc.insert_object(&list, at, ObjType::Map)?;
    doc.put(&entry, "id", id.as_str())?;
    doc.put(&entry, "type", reading.vital.as_str())?;
    doc.put(&entry, "value", reading.value.as_str())?;
    doc.put(&entry, "unit", reading.unit.as_str())?;
    doc.put(&entry, "takenAt", reading.taken_at_ms)?;
    doc.put(&entry, "recordedBy", actor.user_id.as_str())?;
    if let Some(old) = &reading.supersedes {
        doc.put(&entry, "supersedes", old.as_str())?;
    }
    Ok(id)
}

/// The Text object of a narrative, created if missing.
pub(crate) fn text_obj(doc: &mut AutoCommit, field: NoteText) -> Result<ObjId> {
    ensure_obj(doc, &ROOT, field.key(), ObjType::Text)
}

pub(crate) fn add_list_entry(
    doc: &mut AutoCommit,
    list: NoteList,
    entry: &ListEntry,
) -> Result<String> {
    let list_obj = ensure_obj(doc, &ROOT, list.key(), ObjType::List)?;
    let id = new_item_id();
    let at = doc.length(&list_obj);
    let obj = doc.insert_object(&list_obj, at, ObjType::Map)?;
    doc.put(&obj, "id", id.as_str())?;
    doc.put(&obj, "item", entry.item.as_str())?;
    put_text(doc, &obj, "note", &entry.note)?;
    Ok(id)
}

pub(crate) fn set_goal_progress(
    doc: &mut AutoCommit,
    goal_id: &str,
    status: &str,
    note: &str,
) -> Result<()> {
    let gp = ensure_obj(doc, &ROOT, "goalProgress", ObjType::Map)?;
    let entry = ensure_obj(doc, &gp, goal_id, ObjType::Map)?;
    if get_string(doc, &entry, "status").as_deref() != Some(status) {
        doc.put(&entry, "status", status)?;
    }
    put_text(doc, &entry, "note", note)
}

pub(crate) fn set_next_visit(doc: &mut AutoCommit, next: &str) -> Result<()> {
    doc.put(ROOT, "nextVisit", next)?;
    Ok(())
}

/// The canonical rendering of the note body at `heads`: the root map minus [`UNSIGNED_KEYS`],
/// as JSON with keys sorted (serde_json's map is ordered) and no insignificant whitespace. It is
/// what the signature's hash covers.
pub fn canonical_rendering(doc: &impl ReadDoc, heads: &[ChangeHash]) -> String {
    serde_json::Value::Object(map_to_json(doc, &ROOT, Some(heads), UNSIGNED_KEYS)).to_string()
}

pub(crate) fn add_addendum(
    doc: &mut AutoCommit,
    actor: &Actor,
    now_ms: i64,
    text: &str,
) -> Result<String> {
    let list = ensure_obj(doc, &ROOT, "addenda", ObjType::List)?;
    let id = new_item_id();
    let at = doc.length(&list);
    let obj = doc.insert_object(&list, at, ObjType::Map)?;
    doc.put(&obj, "id", id.as_str())?;
    doc.put(&obj, "author", actor.user_id.as_str())?;
    doc.put(&obj, "createdAt", now_ms)?;
    put_text(doc, &obj, "text", text)?;
    Ok(id)
}

fn read_list<T>(doc: &impl ReadDoc, key: &str, f: impl Fn(&ObjId) -> Option<T>) -> Vec<T> {
    let Some(list) = get_obj(doc, &ROOT, key) else {
        return Vec::new();
    };
    (0..doc.length(&list))
        .filter_map(|i| match doc.get(&list, i).ok()?? {
            (automerge::Value::Object(ObjType::Map), obj) => f(&obj),
            _ => None,
        })
        .collect()
}

fn read_vitals(doc: &impl ReadDoc) -> Vec<VitalReading> {
    read_list(doc, "vitals", |o| {
        Some(VitalReading {
            id: get_string(doc, o, "id")?,
            vital: VitalType::parse(&get_string(doc, o, "type")?)?,
            value: get_string(doc, o, "value").unwrap_or_default(),
            unit: get_string(doc, o, "unit").unwrap_or_default(),
            taken_at_ms: get_i64(doc, o, "takenAt").unwrap_or_default(),
            recorded_by: get_string(doc, o, "recordedBy").unwrap_or_default(),
            supersedes: get_string(doc, o, "supersedes"),
        })
    })
}

fn read_entries(doc: &impl ReadDoc, list: NoteList) -> Vec<ListEntry> {
    read_list(doc, list.key(), |o| {
        Some(ListEntry {
            id: get_string(doc, o, "id")?,
            item: get_string(doc, o, "item").unwrap_or_default(),
            note: get_string(doc, o, "note").unwrap_or_default(),
        })
    })
}

fn read_addenda(doc: &impl ReadDoc) -> Vec<Addendum> {
    read_list(doc, "addenda", |o| {
        Some(Addendum {
            id: get_string(doc, o, "id")?,
            author: get_string(doc, o, "author").unwrap_or_default(),
            created_at_ms: get_i64(doc, o, "createdAt").unwrap_or_default(),
            text: get_string(doc, o, "text").unwrap_or_default(),
        })
    })
}

impl VisitNote {
    /// Read the note. A signed note's body is read *at its signature heads* — the version
    /// that was signed — never the merged current state; later changes are listed separately
    /// as review items. Signed-ness comes from the ledger (history), not the current value.
    pub fn read(document_id: DocumentId, doc: &mut AutoCommit, ledger: &NoteLedger) -> VisitNote {
        let signature = ledger.signature().and_then(Signature::from_entry);
        let heads: Option<Vec<ChangeHash>> = signature
            .as_ref()
            .and_then(|s| s.heads.iter().map(|h| h.parse().ok()).collect());
        let signed_view = heads
            .filter(|h| h.iter().all(|c| doc.get_change_by_hash(c).is_some()))
            .and_then(|h| doc.fork_at(&h).ok());
        let mut note = match signed_view {
            Some(fork) => Self::read_body(document_id, &fork),
            None => Self::read_body(document_id, doc),
        };
        if ledger.is_signed() {
            note.status = NoteStatus::Signed;
        }
        note.signature = signature;
        note.addenda = read_addenda(doc);
        note
    }

    fn read_body(document_id: DocumentId, doc: &impl ReadDoc) -> VisitNote {
        VisitNote {
            document_id,
            patient_id: get_string(doc, &ROOT, "patientId").unwrap_or_default(),
            agency_id: get_string(doc, &ROOT, "agencyId").unwrap_or_default(),
            status: NoteStatus::Draft,
            evv: get_obj(doc, &ROOT, "evv")
                .map(|o| obj_to_json(doc, &o, None))
                .unwrap_or_default(),
            vitals: read_vitals(doc),
            assessment: get_string(doc, &ROOT, "assessment").unwrap_or_default(),
            plan: get_string(doc, &ROOT, "plan").unwrap_or_default(),
            interventions: read_entries(doc, NoteList::Interventions),
            medications_reviewed: read_entries(doc, NoteList::MedicationsReviewed),
            teaching: read_entries(doc, NoteList::Teaching),
            goal_progress: get_obj(doc, &ROOT, "goalProgress")
                .map(|o| obj_to_json(doc, &o, None))
                .unwrap_or_default(),
            next_visit: get_string(doc, &ROOT, "nextVisit"),
            signature: None,
            addenda: Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Role;
    use crate::model::signing::{DeviceKey, KeyDirectory, Tamper};

    fn start() -> VisitStart {
        VisitStart {
            agency_id: "ag".into(),
            patient_id: "p1".into(),
            service_type: "skilled-nursing".into(),
            date: "2026-11-27".into(),
            location: "12 Elm St".into(),
            started_at_ms: 1_000,
            start_monotonic_ms: 5,
        }
    }

    fn directory(nurse: &Actor, key: &DeviceKey) -> KeyDirectory {
        KeyDirectory {
            agency_id: "ag".into(),
            keys: vec![signing::DirectoryKey {
                user_id: nurse.user_id.clone(),
                role: "clinician".into(),
                device_id: nurse.device_id.clone(),
                public_key: hex::encode(key.public_key()),
                enrolled_at_ms: 0,
                revoked_at_ms: None,
            }],
        }
    }

    #[test]
    fn signing_freezes_the_rendering_and_verifies() {
        let nurse = Actor {
            user_id: "n1".into(),
            device_id: "phone".into(),
        };
        let key = DeviceKey::generate();
        let keys = directory(&nurse, &key);
        let (id, mut doc) = new_visit_note(&start(), &nurse, 1_000).unwrap();
        let text = text_obj(&mut doc, NoteText::Assessment).unwrap();
        doc.splice_text(&text, 0, 0, "Alert, oriented 😀 x3")
            .unwrap();
        commit(&mut doc, "type", 2_000);
        let payload = signing::sign(&mut doc, id, &key, &nurse, Role::Clinician, 3_000).unwrap();
        commit(&mut doc, "sign", 3_000);
        add_addendum(&mut doc, &nurse, 4_000, "Late entry: pt called back").unwrap();
        commit(&mut doc, "addendum", 4_000);
        let ledger = NoteLedger::build(doc.document(), &keys, &signing::RoleOnly);
        assert!(ledger.is_signed());
        assert!(
            ledger.review_items().is_empty(),
            "{:?}",
            ledger.review_items()
        );
        let entry = ledger.signature().unwrap().clone();
        assert_eq!(
            signing::verify(doc.document(), id, &entry, &keys, &signing::RoleOnly),
            signing::Verdict::Valid
        );
        let note = VisitNote::read(id, &mut doc, &ledger);
        assert_eq!(note.status, NoteStatus::Signed);
        assert_eq!(note.assessment, "Alert, oriented 😀 x3");
        assert_eq!(note.signature.unwrap().content_hash, payload.content_hash);
        assert_eq!(note.addenda.len(), 1);
    }

    #[test]
    fn a_forged_or_deleted_signature_is_tampering_and_the_note_stays_signed() {
        let nurse = Actor {
            user_id: "n1".into(),
            device_id: "phone".into(),
        };
        let key = DeviceKey::generate();
        let keys = directory(&nurse, &key);
        let (id, mut doc) = new_visit_note(&start(), &nurse, 1_000).unwrap();
        signing::sign(&mut doc, id, &key, &nurse, Role::Clinician, 3_000).unwrap();
        commit(&mut doc, "sign", 3_000);
        let mut ledger = NoteLedger::build(doc.document(), &keys, &signing::RoleOnly);
        let before = doc.get_heads();
        // Delete the signature entry and type into the body.
        let list = get_obj(&doc, &ROOT, "signatures").unwrap();
        doc.delete(&list, 0).unwrap();
        let text = text_obj(&mut doc, NoteText::Plan).unwrap();
        doc.splice_text(&text, 0, 0, "rewritten").unwrap();
        commit(&mut doc, "tamper", 4_000);
        // And add a signature by a key nobody enrolled.
        let rogue = DeviceKey::generate();
        signing::sign(&mut doc, id, &rogue, &nurse, Role::Clinician, 5_000).unwrap();
        commit(&mut doc, "forge", 5_000);
        let changes = doc.get_changes(&before);
        let seen = ledger.observe(doc.document(), &changes, &keys, &signing::RoleOnly);
        let kinds: Vec<&Tamper> = seen.tampers.iter().map(|(_, t)| t).collect();
        assert!(kinds.contains(&&Tamper::SignatureDeleted), "{kinds:?}");
        assert!(
            kinds.contains(&&Tamper::InvalidSignature {
                reason: signing::InvalidSignature::BadSignature
            }),
            "{kinds:?}"
        );
        assert!(ledger.is_signed());
        let note = VisitNote::read(id, &mut doc, &ledger);
        assert_eq!(note.status, NoteStatus::Signed);
        assert_eq!(
            note.plan, "",
            "the signed version is rendered, not the edit"
        );
        assert!(ledger.review_items().iter().any(|i| i.reason
            == signing::ReviewReason::BodyEditAfterSignature
            && i.fields.contains(&"plan".to_owned())));
    }

    #[test]
    fn corrections_supersede_and_never_overwrite() {
        let nurse = Actor {
            user_id: "n1".into(),
            device_id: "phone".into(),
        };
        let (_, mut doc) = new_visit_note(&start(), &nurse, 1_000).unwrap();
        let r = VitalReading {
            id: String::new(),
            vital: VitalType::Pulse,
            value: "700".into(),
            unit: "bpm".into(),
            taken_at_ms: 1,
            recorded_by: String::new(),
            supersedes: None,
        };
        let first = record_vital(&mut doc, &r, &nurse).unwrap();
        let fix = VitalReading {
            value: "70".into(),
            supersedes: Some(first.clone()),
            ..r.clone()
        };
        record_vital(&mut doc, &fix, &nurse).unwrap();
        let bad = VitalReading {
            supersedes: Some("missing".into()),
            ..r
        };
        assert!(record_vital(&mut doc, &bad, &nurse).is_err());
        let note = VisitNote::read(DocumentId::random(), &mut doc, &NoteLedger::default());
        assert_eq!(note.vitals.len(), 2);
        assert_eq!(note.vitals[0].value, "700");
        let current = note.current_vitals();
        assert_eq!(current.len(), 1);
        assert_eq!(current[0].value, "70");
    }
}
