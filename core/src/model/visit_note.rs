//! Visit notes: EVV, vitals, narratives, signing and addenda.
//!
//! Signing follows Medicare's documentation rules: the signed note is a legal record. `sign`
//! stores the document heads at signing and a SHA-256 over a canonical rendering of the body
//! at those heads. The signed version is always rendered *at those heads*, so changes that
//! arrive later without having seen the signature (an offline edit) can never alter it; they are
//! reported as post-signature changes for review (see `history`).

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    Actor, DocKind, VISIT_NOTE_SCHEMA, commit, ensure_obj, get_i64, get_obj, get_string,
    new_document, new_item_id, obj_to_json, put_root, put_text,
};
use crate::protocol::DocumentId;
use crate::{Error, Result};

/// Root keys that are not part of the signed body: the signature itself, the status it sets,
/// and what may legitimately be added after signing.
const UNSIGNED_KEYS: &[&str] = &["signature", "status", "addenda", "resolutions"];

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

/// The signature block of a signed note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// User id of the signer.
    pub signed_by: String,
    /// When, ms since the epoch.
    pub signed_at_ms: i64,
    /// Document heads at signing (hex).
    pub heads: Vec<String>,
    /// SHA-256 (hex) of the canonical rendering at `heads`.
    pub content_hash: String,
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

/// Result of re-verifying a signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignatureCheck {
    /// The note is not signed.
    NotSigned,
    /// The rendering at the signature heads hashes to the recorded hash.
    Valid {
        /// The rendering that was verified.
        rendering: String,
    },
    /// The signed heads are not all present in this replica yet (still syncing).
    HeadsMissing,
    /// The rendering does not hash to the recorded value: the record was altered.
    Mismatch {
        /// Hash recorded in the signature.
        expected: String,
        /// Hash of the rendering now.
        actual: String,
    },
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
    doc.put(ROOT, "status", NoteStatus::Draft.as_str())?;
    commit(&mut doc, "start visit", now_ms);
    Ok((DocumentId::random(), doc))
}

/// Whether the note carries a signature (any replica's).
pub(crate) fn is_signed(doc: &impl ReadDoc) -> bool {
    get_obj(doc, &ROOT, "signature").is_some()
}

/// Refuse body edits of a signed note.
pub(crate) fn ensure_editable(doc: &impl ReadDoc, id: DocumentId) -> Result<()> {
    if is_signed(doc) {
        Err(Error::NoteSigned(id))
    } else {
        Ok(())
    }
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
    let mut body = obj_to_json(doc, &ROOT, Some(heads));
    if let serde_json::Value::Object(map) = &mut body {
        for key in UNSIGNED_KEYS {
            map.remove(*key);
        }
    }
    body.to_string()
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub(crate) fn sign(doc: &mut AutoCommit, actor: &Actor, now_ms: i64) -> Result<Signature> {
    let heads = doc.get_heads();
    let rendering = canonical_rendering(doc, &heads);
    let sig = Signature {
        signed_by: actor.user_id.clone(),
        signed_at_ms: now_ms,
        heads: heads.iter().map(|h| h.to_string()).collect(),
        content_hash: sha256_hex(&rendering),
    };
    let obj = doc.put_object(ROOT, "signature", ObjType::Map)?;
    doc.put(&obj, "signedBy", sig.signed_by.as_str())?;
    doc.put(&obj, "signedAt", sig.signed_at_ms)?;
    doc.put(&obj, "contentHash", sig.content_hash.as_str())?;
    let list = doc.put_object(&obj, "heads", ObjType::List)?;
    for (i, h) in sig.heads.iter().enumerate() {
        doc.insert(&list, i, h.as_str())?;
    }
    doc.put(ROOT, "status", NoteStatus::Signed.as_str())?;
    Ok(sig)
}

pub(crate) fn read_signature(doc: &impl ReadDoc) -> Option<Signature> {
    let obj = get_obj(doc, &ROOT, "signature")?;
    let list = get_obj(doc, &obj, "heads")?;
    let heads = (0..doc.length(&list))
        .filter_map(|i| match doc.get(&list, i).ok()?? {
            (automerge::Value::Scalar(s), _) => match s.as_ref() {
                ScalarValue::Str(s) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    Some(Signature {
        signed_by: get_string(doc, &obj, "signedBy")?,
        signed_at_ms: get_i64(doc, &obj, "signedAt")?,
        heads,
        content_hash: get_string(doc, &obj, "contentHash")?,
    })
}

/// Parse the signature's heads.
pub(crate) fn signature_heads(sig: &Signature) -> Option<Vec<ChangeHash>> {
    sig.heads.iter().map(|h| h.parse().ok()).collect()
}

/// Render the note as signed and check it against the recorded hash.
pub(crate) fn check_signature(doc: &mut AutoCommit) -> SignatureCheck {
    let Some(sig) = read_signature(doc) else {
        return SignatureCheck::NotSigned;
    };
    let Some(heads) = signature_heads(&sig) else {
        return SignatureCheck::Mismatch {
            expected: sig.content_hash,
            actual: "unparseable heads".into(),
        };
    };
    if heads.iter().any(|h| doc.get_change_by_hash(h).is_none()) {
        return SignatureCheck::HeadsMissing;
    }
    let rendering = canonical_rendering(doc, &heads);
    let actual = sha256_hex(&rendering);
    if actual == sig.content_hash {
        SignatureCheck::Valid { rendering }
    } else {
        SignatureCheck::Mismatch {
            expected: sig.content_hash,
            actual,
        }
    }
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

impl VisitNote {
    /// Read the note's current state.
    pub fn read(document_id: DocumentId, doc: &impl ReadDoc) -> VisitNote {
        let signature = read_signature(doc);
        VisitNote {
            document_id,
            patient_id: get_string(doc, &ROOT, "patientId").unwrap_or_default(),
            agency_id: get_string(doc, &ROOT, "agencyId").unwrap_or_default(),
            status: if signature.is_some() {
                NoteStatus::Signed
            } else {
                NoteStatus::Draft
            },
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
            signature,
            addenda: read_list(doc, "addenda", |o| {
                Some(Addendum {
                    id: get_string(doc, o, "id")?,
                    author: get_string(doc, o, "author").unwrap_or_default(),
                    created_at_ms: get_i64(doc, o, "createdAt").unwrap_or_default(),
                    text: get_string(doc, o, "text").unwrap_or_default(),
                })
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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

    #[test]
    fn signing_freezes_the_rendering_and_verifies() {
        let nurse = Actor {
            user_id: "n1".into(),
            device_id: "phone".into(),
        };
        let (_, mut doc) = new_visit_note(&start(), &nurse, 1_000).unwrap();
        let text = text_obj(&mut doc, NoteText::Assessment).unwrap();
        doc.splice_text(&text, 0, 0, "Alert, oriented 😀 x3")
            .unwrap();
        commit(&mut doc, "type", 2_000);
        let sig = sign(&mut doc, &nurse, 3_000).unwrap();
        commit(&mut doc, "sign", 3_000);
        let SignatureCheck::Valid { rendering } = check_signature(&mut doc) else {
            panic!("not valid")
        };
        assert!(rendering.contains("Alert, oriented 😀 x3"));
        assert!(!rendering.contains("signature"));
        add_addendum(&mut doc, &nurse, 4_000, "Late entry: pt called back").unwrap();
        commit(&mut doc, "addendum", 4_000);
        assert!(matches!(
            check_signature(&mut doc),
            SignatureCheck::Valid { .. }
        ));
        let note = VisitNote::read(DocumentId::random(), &doc);
        assert_eq!(note.status, NoteStatus::Signed);
        assert_eq!(note.signature.unwrap().content_hash, sig.content_hash);
        assert_eq!(note.addenda.len(), 1);
    }

    #[test]
    fn tampering_with_the_hash_is_detected() {
        let nurse = Actor {
            user_id: "n1".into(),
            device_id: "phone".into(),
        };
        let (_, mut doc) = new_visit_note(&start(), &nurse, 1_000).unwrap();
        sign(&mut doc, &nurse, 3_000).unwrap();
        let sig = get_obj(&doc, &ROOT, "signature").unwrap();
        doc.put(&sig, "contentHash", "00").unwrap();
        commit(&mut doc, "tamper", 3_000);
        assert!(matches!(
            check_signature(&mut doc),
            SignatureCheck::Mismatch { .. }
        ));
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
        let note = VisitNote::read(DocumentId::random(), &doc);
        assert_eq!(note.vitals.len(), 2);
        assert_eq!(note.vitals[0].value, "700");
        let current = note.current_vitals();
        assert_eq!(current.len(), 1);
        assert_eq!(current[0].value, "70");
    }
}
