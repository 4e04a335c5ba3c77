//! Records and enums the foreign languages see, each with its one conversion from (or to)
//! the core type. Document ids are strings (base58, as the relay shows them); positions and
//! counts are unsigned; times are ms since the epoch (`i64`, as in the core).

use std::collections::HashMap;

use fieldchart_core::model as m;
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store as s;
use fieldchart_core::sync as y;

use super::error::{FfiResult, FieldchartError};

/// Parse a document id passed in from the app.
pub(crate) fn doc_id(id: &str) -> FfiResult<DocumentId> {
    id.parse()
        .map_err(|_| FieldchartError::InvalidInput("not a document id".into()))
}

/// Mirror a fieldless core enum (both directions).
macro_rules! mirror_enum {
    ($(#[$meta:meta])* $name:ident <=> $core:path { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }
        impl From<$name> for $core {
            fn from(v: $name) -> Self { match v { $($name::$variant => <$core>::$variant),+ } }
        }
        impl From<$core> for $name {
            fn from(v: $core) -> Self { match v { $(<$core>::$variant => $name::$variant),+ } }
        }
    };
}

mirror_enum!(
    /// The signed-in user's role (decides what the core allows locally).
    Role <=> m::Role { Clinician, Office, Admin }
);
mirror_enum!(
    /// Narrative fields of a visit note (Text: edited by UTF-16 splices).
    NoteText <=> m::NoteText { Assessment, Plan }
);
mirror_enum!(
    /// Entry lists of a visit note.
    NoteList <=> m::NoteList { Interventions, MedicationsReviewed, Teaching }
);
mirror_enum!(
    /// Draft or signed.
    NoteStatus <=> m::NoteStatus { Draft, Signed }
);
mirror_enum!(
    /// Vital sign types.
    VitalType <=> m::VitalType { BloodPressure, Pulse, Respirations, Temperature, Spo2, Weight, Pain, Glucose }
);
mirror_enum!(
    /// Demographic fields of a patient chart.
    Demographic <=> m::Demographic { Name, DateOfBirth, Address, Phone, EmergencyContact }
);
mirror_enum!(
    /// Level of a care-plan item.
    CarePlanLevel <=> m::CarePlanLevel { Problem, Goal, Intervention }
);
mirror_enum!(
    /// Why a document is in the sync failure list.
    FailureKind <=> y::FailureKind { Refused, Unauthorized, Invalid }
);

/// Who made a change: a user on one device.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Actor {
    pub user_id: String,
    pub device_id: String,
}

impl From<m::Actor> for Actor {
    fn from(a: m::Actor) -> Self {
        Actor {
            user_id: a.user_id,
            device_id: a.device_id,
        }
    }
}

/// How to open a store. The key comes from the platform keystore (Keychain / Android
/// Keystore): exactly 32 bytes.
#[derive(Debug, Clone, uniffi::Record)]
pub struct StoreOptions {
    /// Database file path (created if missing).
    pub path: String,
    /// The 256-bit encryption key.
    pub key: Vec<u8>,
    /// The signed-in user.
    pub user_id: String,
    /// This device's id (from enrollment).
    pub device_id: String,
    /// The user's role.
    pub role: Role,
}

impl StoreOptions {
    pub(crate) fn into_core(self) -> FfiResult<s::StoreConfig> {
        let key: [u8; 32] = self.key.try_into().map_err(|_| {
            FieldchartError::InvalidInput("the store key must be exactly 32 bytes".into())
        })?;
        Ok(s::StoreConfig {
            path: self.path.into(),
            key: s::StoreKey::from_bytes(key),
            actor: m::Actor {
                user_id: self.user_id,
                device_id: self.device_id,
            },
            role: self.role.into(),
            keystroke_journal: true,
        })
    }
}

/// Start of a visit (EVV: who, whom, what service, when, where).
#[derive(Debug, Clone, uniffi::Record)]
pub struct VisitStart {
    pub agency_id: String,
    pub patient_id: String,
    pub service_type: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    pub location: String,
    pub started_at_ms: i64,
    /// A monotonic clock reading at the start (the device's uptime clock).
    pub start_monotonic_ms: i64,
}

impl From<VisitStart> for m::VisitStart {
    fn from(v: VisitStart) -> Self {
        m::VisitStart {
            agency_id: v.agency_id,
            patient_id: v.patient_id,
            service_type: v.service_type,
            date: v.date,
            location: v.location,
            started_at_ms: v.started_at_ms,
            start_monotonic_ms: v.start_monotonic_ms,
        }
    }
}

/// A vital sign reading. `id` and `recorded_by` are filled in by the store when recording.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct VitalReading {
    pub id: String,
    pub vital: VitalType,
    pub value: String,
    pub unit: String,
    pub taken_at_ms: i64,
    pub recorded_by: String,
    /// The reading this one corrects, if any.
    pub supersedes: Option<String>,
}

impl From<VitalReading> for m::VitalReading {
    fn from(v: VitalReading) -> Self {
        m::VitalReading {
            id: v.id,
            vital: v.vital.into(),
            value: v.value,
            unit: v.unit,
            taken_at_ms: v.taken_at_ms,
            recorded_by: v.recorded_by,
            supersedes: v.supersedes,
        }
    }
}

impl From<m::VitalReading> for VitalReading {
    fn from(v: m::VitalReading) -> Self {
        VitalReading {
            id: v.id,
            vital: v.vital.into(),
            value: v.value,
            unit: v.unit,
            taken_at_ms: v.taken_at_ms,
            recorded_by: v.recorded_by,
            supersedes: v.supersedes,
        }
    }
}

/// An entry of an intervention, medications-reviewed or teaching list.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ListEntry {
    pub id: String,
    pub item: String,
    pub note: String,
}

impl From<ListEntry> for m::ListEntry {
    fn from(e: ListEntry) -> Self {
        m::ListEntry {
            id: e.id,
            item: e.item,
            note: e.note,
        }
    }
}

impl From<m::ListEntry> for ListEntry {
    fn from(e: m::ListEntry) -> Self {
        ListEntry {
            id: e.id,
            item: e.item,
            note: e.note,
        }
    }
}

/// Who signed a note, when, and over what.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Signature {
    pub signed_by: String,
    pub device_id: String,
    pub role: String,
    pub signed_at_ms: i64,
    pub heads: Vec<String>,
    pub content_hash: String,
    pub signature: String,
    pub change: String,
}

impl From<m::Signature> for Signature {
    fn from(s: m::Signature) -> Self {
        Signature {
            signed_by: s.signed_by,
            device_id: s.device_id,
            role: s.role,
            signed_at_ms: s.signed_at_ms,
            heads: s.heads,
            content_hash: s.content_hash,
            signature: s.signature,
            change: s.change,
        }
    }
}

/// An addendum to a (signed) note.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Addendum {
    pub id: String,
    pub author: String,
    pub created_at_ms: i64,
    pub text: String,
}

impl From<m::Addendum> for Addendum {
    fn from(a: m::Addendum) -> Self {
        Addendum {
            id: a.id,
            author: a.author,
            created_at_ms: a.created_at_ms,
            text: a.text,
        }
    }
}

/// Result of re-verifying a note's signature.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum SignatureCheck {
    /// No signature counts.
    NotSigned,
    /// Verified against the agency's keys; `rendering` is what was signed.
    Valid {
        rendering: String,
        signature: Signature,
    },
    /// Signed, but this device does not know the signing device's key yet (fetch the keys).
    Unverified { signature: Signature },
    /// The signed version has not fully arrived yet (still syncing).
    HeadsMissing,
}

impl From<m::SignatureCheck> for SignatureCheck {
    fn from(c: m::SignatureCheck) -> Self {
        match c {
            m::SignatureCheck::NotSigned => SignatureCheck::NotSigned,
            m::SignatureCheck::Valid {
                rendering,
                signature,
            } => SignatureCheck::Valid {
                rendering,
                signature: signature.into(),
            },
            m::SignatureCheck::Unverified { signature } => SignatureCheck::Unverified {
                signature: signature.into(),
            },
            m::SignatureCheck::HeadsMissing => SignatureCheck::HeadsMissing,
        }
    }
}

/// Electronic visit verification: the fields the note's `evv` map holds.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Evv {
    pub service_type: Option<String>,
    pub patient_id: Option<String>,
    pub date: Option<String>,
    pub location: Option<String>,
    pub clinician_id: Option<String>,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
}

impl From<&serde_json::Value> for Evv {
    fn from(v: &serde_json::Value) -> Self {
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let int = |k: &str| v.get(k).and_then(serde_json::Value::as_i64);
        Evv {
            service_type: text("serviceType"),
            patient_id: text("patientId"),
            date: text("date"),
            location: text("location"),
            clinician_id: text("clinicianId"),
            started_at_ms: int("startedAt"),
            ended_at_ms: int("endedAt"),
        }
    }
}

/// Progress recorded against one care-plan goal in a note.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct GoalProgress {
    pub goal_id: String,
    pub status: String,
    pub note: String,
}

/// A visit note as the app shows it (a signed note: the version that was signed).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct VisitNote {
    pub document_id: String,
    pub patient_id: String,
    pub agency_id: String,
    pub status: NoteStatus,
    pub evv: Evv,
    /// Every reading, corrections included.
    pub vitals: Vec<VitalReading>,
    /// Readings no later reading supersedes.
    pub current_vitals: Vec<VitalReading>,
    pub assessment: String,
    pub plan: String,
    pub interventions: Vec<ListEntry>,
    pub medications_reviewed: Vec<ListEntry>,
    pub teaching: Vec<ListEntry>,
    pub goal_progress: Vec<GoalProgress>,
    pub next_visit: Option<String>,
    pub signature: Option<Signature>,
    pub addenda: Vec<Addendum>,
}

impl From<m::VisitNote> for VisitNote {
    fn from(n: m::VisitNote) -> Self {
        let current_vitals = n
            .current_vitals()
            .into_iter()
            .cloned()
            .map(Into::into)
            .collect();
        let goal_progress = n
            .goal_progress
            .as_object()
            .map(|goals| {
                goals
                    .iter()
                    .map(|(goal_id, g)| GoalProgress {
                        goal_id: goal_id.clone(),
                        status: g
                            .get("status")
                            .and_then(|x| x.as_str())
                            .unwrap_or_default()
                            .to_owned(),
                        note: g
                            .get("note")
                            .and_then(|x| x.as_str())
                            .unwrap_or_default()
                            .to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        VisitNote {
            document_id: n.document_id.to_string(),
            patient_id: n.patient_id,
            agency_id: n.agency_id,
            status: n.status.into(),
            evv: Evv::from(&n.evv),
            vitals: n.vitals.into_iter().map(Into::into).collect(),
            current_vitals,
            assessment: n.assessment,
            plan: n.plan,
            interventions: n.interventions.into_iter().map(Into::into).collect(),
            medications_reviewed: n.medications_reviewed.into_iter().map(Into::into).collect(),
            teaching: n.teaching.into_iter().map(Into::into).collect(),
            goal_progress,
            next_visit: n.next_visit,
            signature: n.signature.map(Into::into),
            addenda: n.addenda.into_iter().map(Into::into).collect(),
        }
    }
}

/// An allergy on a patient chart.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Allergy {
    pub id: String,
    pub substance: String,
    pub reaction: String,
    pub severity: String,
    pub status: String,
}

impl From<Allergy> for m::Allergy {
    fn from(a: Allergy) -> Self {
        m::Allergy {
            id: a.id,
            substance: a.substance,
            reaction: a.reaction,
            severity: a.severity,
            status: a.status,
        }
    }
}

impl From<m::Allergy> for Allergy {
    fn from(a: m::Allergy) -> Self {
        Allergy {
            id: a.id,
            substance: a.substance,
            reaction: a.reaction,
            severity: a.severity,
            status: a.status,
        }
    }
}

/// A medication on a patient chart.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Medication {
    pub id: String,
    pub name: String,
    pub dose: String,
    pub route: String,
    pub frequency: String,
    pub status: String,
}

impl From<Medication> for m::Medication {
    fn from(x: Medication) -> Self {
        m::Medication {
            id: x.id,
            name: x.name,
            dose: x.dose,
            route: x.route,
            frequency: x.frequency,
            status: x.status,
        }
    }
}

impl From<m::Medication> for Medication {
    fn from(x: m::Medication) -> Self {
        Medication {
            id: x.id,
            name: x.name,
            dose: x.dose,
            route: x.route,
            frequency: x.frequency,
            status: x.status,
        }
    }
}

/// A member of the patient's care team.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct CareTeamMember {
    pub user_id: String,
    pub name: String,
    pub role: String,
}

impl From<m::CareTeamMember> for CareTeamMember {
    fn from(c: m::CareTeamMember) -> Self {
        CareTeamMember {
            user_id: c.user_id,
            name: c.name,
            role: c.role,
        }
    }
}

/// One item of the care plan, flattened: `path` is the ids from the top-level problem down
/// to this item (what `set_care_plan_status` takes); items are listed parent first.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct CarePlanItem {
    pub id: String,
    pub path: Vec<String>,
    pub level: CarePlanLevel,
    pub description: String,
    pub status: String,
}

fn flatten_plan(items: Vec<m::CarePlanItem>, parent: &[String], out: &mut Vec<CarePlanItem>) {
    for item in items {
        let mut path = parent.to_vec();
        path.push(item.id.clone());
        out.push(CarePlanItem {
            id: item.id,
            path: path.clone(),
            level: item.level.into(),
            description: item.description,
            status: item.status,
        });
        flatten_plan(item.children, &path, out);
    }
}

/// A patient chart.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PatientChart {
    pub document_id: String,
    pub patient_id: String,
    pub agency_id: String,
    /// Demographic field name (`name`, `dateOfBirth`, ...) to value.
    pub demographics: HashMap<String, String>,
    pub allergies: Vec<Allergy>,
    pub medications: Vec<Medication>,
    pub care_team: Vec<CareTeamMember>,
    pub care_plan: Vec<CarePlanItem>,
}

impl From<m::PatientChart> for PatientChart {
    fn from(c: m::PatientChart) -> Self {
        let mut care_plan = Vec::new();
        flatten_plan(c.care_plan, &[], &mut care_plan);
        PatientChart {
            document_id: c.document_id.to_string(),
            patient_id: c.patient_id,
            agency_id: c.agency_id,
            demographics: c.demographics.into_iter().collect(),
            allergies: c.allergies.into_iter().map(Into::into).collect(),
            medications: c.medications.into_iter().map(Into::into).collect(),
            care_team: c.care_team.into_iter().map(Into::into).collect(),
            care_plan,
        }
    }
}

/// A value of a conflicted field.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum FieldValue {
    Null,
    Boolean {
        value: bool,
    },
    Integer {
        value: i64,
    },
    Number {
        value: f64,
    },
    Text {
        value: String,
    },
    /// A whole object or list written concurrently, as JSON (rare: structured values are
    /// usually maps keyed by id, which merge).
    Structured {
        json: String,
    },
}

impl From<&serde_json::Value> for FieldValue {
    fn from(v: &serde_json::Value) -> Self {
        use serde_json::Value as J;
        match v {
            J::Null => FieldValue::Null,
            J::Bool(b) => FieldValue::Boolean { value: *b },
            J::Number(n) => match n.as_i64() {
                Some(i) => FieldValue::Integer { value: i },
                None => FieldValue::Number {
                    value: n.as_f64().unwrap_or(f64::NAN),
                },
            },
            J::String(s) => FieldValue::Text { value: s.clone() },
            other => FieldValue::Structured {
                json: other.to_string(),
            },
        }
    }
}

impl From<&FieldValue> for serde_json::Value {
    fn from(v: &FieldValue) -> Self {
        use serde_json::Value as J;
        match v {
            FieldValue::Null => J::Null,
            FieldValue::Boolean { value } => J::Bool(*value),
            FieldValue::Integer { value } => J::from(*value),
            FieldValue::Number { value } => J::from(*value),
            FieldValue::Text { value } => J::String(value.clone()),
            FieldValue::Structured { json } => serde_json::from_str(json).unwrap_or(J::Null),
        }
    }
}

/// One of the concurrent values of a conflicted field. Resolve by passing its `id`.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ConflictValue {
    pub id: String,
    pub value: FieldValue,
    pub author: Option<Actor>,
    pub time_ms: i64,
    pub change: String,
}

/// A field with concurrent values.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Conflict {
    pub path: String,
    pub values: Vec<ConflictValue>,
}

impl From<m::Conflict> for Conflict {
    fn from(c: m::Conflict) -> Self {
        Conflict {
            path: c.path,
            values: c
                .values
                .into_iter()
                .map(|v| ConflictValue {
                    value: FieldValue::from(&v.value),
                    id: v.id,
                    author: v.author.map(Into::into),
                    time_ms: v.time_ms,
                    change: v.change,
                })
                .collect(),
        }
    }
}

impl From<&Conflict> for m::Conflict {
    fn from(c: &Conflict) -> Self {
        m::Conflict {
            path: c.path.clone(),
            values: c
                .values
                .iter()
                .map(|v| m::ConflictValue {
                    id: v.id.clone(),
                    value: (&v.value).into(),
                    author: v.author.as_ref().map(|a| m::Actor {
                        user_id: a.user_id.clone(),
                        device_id: a.device_id.clone(),
                    }),
                    time_ms: v.time_ms,
                    change: v.change.clone(),
                })
                .collect(),
        }
    }
}

/// An open conflict anywhere in the store.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct OpenConflict {
    pub document_id: String,
    pub conflict: Conflict,
}

impl From<s::OpenConflict> for OpenConflict {
    fn from(c: s::OpenConflict) -> Self {
        OpenConflict {
            document_id: c.document_id.to_string(),
            conflict: c.conflict.into(),
        }
    }
}

/// One change in a document's history.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct HistoryEntry {
    pub change: String,
    pub author: Option<Actor>,
    pub time_ms: i64,
    pub message: Option<String>,
}

impl From<m::HistoryEntry> for HistoryEntry {
    fn from(h: m::HistoryEntry) -> Self {
        HistoryEntry {
            change: h.change,
            author: h.author.map(Into::into),
            time_ms: h.time_ms,
            message: h.message,
        }
    }
}

/// Why a change to a signed note is listed for review.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ReviewReason {
    /// Made offline, concurrently with the signature.
    ConcurrentWithSignature,
    /// A body edit after the signature (never shown as signed).
    BodyEditAfterSignature,
    /// An attempt to alter the signature record; `what` names it (e.g. `signature-deleted`).
    Tampered { what: String },
}

/// A change to a signed note that someone should review.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ReviewItem {
    pub id: String,
    pub change: String,
    pub last_change: String,
    pub changes: u32,
    pub author: Option<Actor>,
    pub time_ms: i64,
    pub last_time_ms: i64,
    pub fields: Vec<String>,
    pub reason: ReviewReason,
}

impl From<m::ReviewItem> for ReviewItem {
    fn from(r: m::ReviewItem) -> Self {
        let reason = match r.reason {
            m::ReviewReason::ConcurrentWithSignature => ReviewReason::ConcurrentWithSignature,
            m::ReviewReason::BodyEditAfterSignature => ReviewReason::BodyEditAfterSignature,
            m::ReviewReason::Tampered(t) => ReviewReason::Tampered {
                what: serde_json::to_value(&t)
                    .ok()
                    .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "tampered".into()),
            },
        };
        ReviewItem {
            id: r.id,
            change: r.change,
            last_change: r.last_change,
            changes: r.changes,
            author: r.author.map(Into::into),
            time_ms: r.time_ms,
            last_time_ms: r.last_time_ms,
            fields: r.fields,
            reason,
        }
    }
}

/// A row of the patient list.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PatientSummary {
    pub patient_id: String,
    pub document_id: String,
    pub agency_id: String,
    pub name: Option<String>,
}

impl From<s::PatientSummary> for PatientSummary {
    fn from(p: s::PatientSummary) -> Self {
        PatientSummary {
            patient_id: p.patient_id,
            document_id: p.document_id.to_string(),
            agency_id: p.agency_id,
            name: p.name,
        }
    }
}

/// A row of a note list.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct NoteSummary {
    pub document_id: String,
    pub patient_id: String,
    pub visit_date: Option<String>,
    pub status: NoteStatus,
    pub clinician_id: Option<String>,
    pub started_at_ms: Option<i64>,
    pub signed_at_ms: Option<i64>,
}

impl From<s::NoteSummary> for NoteSummary {
    fn from(n: s::NoteSummary) -> Self {
        NoteSummary {
            document_id: n.document_id.to_string(),
            patient_id: n.patient_id,
            visit_date: n.visit_date,
            status: n.status.into(),
            clinician_id: n.clinician_id,
            started_at_ms: n.started_at_ms,
            signed_at_ms: n.signed_at_ms,
        }
    }
}

/// "Stored at the agency at 14:02": what the relay confirmed it holds of a document.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Receipt {
    pub heads: Vec<String>,
    pub confirmed_at_ms: i64,
    /// Whether it covers the document as it is now on this device.
    pub covers_current: bool,
}

impl From<y::Receipt> for Receipt {
    fn from(r: y::Receipt) -> Self {
        Receipt {
            heads: r.heads.iter().map(ToString::to_string).collect(),
            confirmed_at_ms: r.confirmed_at_ms,
            covers_current: r.covers_current,
        }
    }
}

/// A document sync could not deliver (its data stays in the store).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncFailure {
    pub document_id: String,
    pub kind: Option<String>,
    pub patient_id: Option<String>,
    pub failure: FailureKind,
    pub reason: String,
    pub at_ms: i64,
    pub attempts: u32,
    pub retry_at_ms: i64,
}

impl From<y::SyncFailure> for SyncFailure {
    fn from(f: y::SyncFailure) -> Self {
        SyncFailure {
            document_id: f.document_id.to_string(),
            kind: f.kind,
            patient_id: f.patient_id,
            failure: f.failure.into(),
            reason: f.reason,
            at_ms: f.at_ms,
            attempts: f.attempts,
            retry_at_ms: f.retry_at_ms,
        }
    }
}

/// A document whose current state the relay has not confirmed.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct UnconfirmedDocument {
    pub document_id: String,
    pub kind: Option<String>,
    pub patient_id: Option<String>,
    pub local_changes: bool,
    pub last_confirmed_at_ms: Option<i64>,
}

impl From<y::UnconfirmedDocument> for UnconfirmedDocument {
    fn from(u: y::UnconfirmedDocument) -> Self {
        UnconfirmedDocument {
            document_id: u.document_id.to_string(),
            kind: u.kind,
            patient_id: u.patient_id,
            local_changes: u.local_changes,
            last_confirmed_at_ms: u.last_confirmed_at_ms,
        }
    }
}

/// A row of the local audit trail.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct AuditEntry {
    pub at_ms: i64,
    pub user_id: String,
    pub device_id: String,
    pub action: String,
    pub document_id: Option<String>,
    pub patient_id: Option<String>,
}

impl From<s::AuditEntry> for AuditEntry {
    fn from(a: s::AuditEntry) -> Self {
        AuditEntry {
            at_ms: a.at_ms,
            user_id: a.user_id,
            device_id: a.device_id,
            action: a.action,
            document_id: a.document_id.map(|d| d.to_string()),
            patient_id: a.patient_id,
        }
    }
}

/// What enrollment gave this device.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Enrollment {
    /// The device's bearer token: keep it in the platform keystore.
    pub token: String,
    pub device_id: String,
    pub device_name: String,
    pub user_id: String,
    pub agency_id: String,
    pub role: String,
    pub expires_at_ms: i64,
}

impl From<crate::Enrollment> for Enrollment {
    fn from(e: crate::Enrollment) -> Self {
        Enrollment {
            token: e.token,
            device_id: e.device_id,
            device_name: e.device_name,
            user_id: e.user_id,
            agency_id: e.agency_id,
            role: e.role,
            expires_at_ms: e.expires_at_ms,
        }
    }
}

/// What an enrollment QR code says.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct EnrollmentCode {
    pub code: String,
    /// The relay's URL, when the admin's relay knows its public URL.
    pub relay_url: Option<String>,
}

impl From<crate::enrollment::QrEnrollment> for EnrollmentCode {
    fn from(q: crate::enrollment::QrEnrollment) -> Self {
        EnrollmentCode {
            code: q.code,
            relay_url: q.relay,
        }
    }
}
