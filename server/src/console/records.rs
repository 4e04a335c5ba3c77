//! What the console's pages read, and the audit rows reading writes: patients, a patient's
//! chart, a visit note with its signatures verified, the vitals over time.
//!
//! Every read goes through the relay's own services: the access rule ([`crate::access`]),
//! the loaded documents ([`crate::docs::DocHub`], so the console sees exactly what devices
//! sync), core's document model (`PatientChart::read`, `VisitNote::read`) and core's
//! `signing::verify`, the routine the relay and the devices run. Opening a chart or a note
//! writes one `read` audit row per document shown, naming the office user and the browser
//! session (as a device would be named), before the page is returned.

use automerge::{AutoCommit, Automerge, ChangeHash};
use fieldchart_core::model::PatientChart;
use fieldchart_core::model::schedule::{self, ScheduledVisit};
use fieldchart_core::model::signing::{
    self, DirectoryKey, InvalidSignature, KeyDirectory, ReviewItem, RoleOnly, SignatureEntry,
    Verdict,
};
use fieldchart_core::model::{Signature, VisitNote, VitalReading};
use fieldchart_core::protocol::DocumentId;

use crate::access;
use crate::auth::Principal;
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::identity::{Patient, PatientId, User};
use crate::state::AppState;
use crate::storage::{AuditAction, AuditEvent, DocMeta};

/// A patient as the list shows them.
#[derive(Debug, Clone)]
pub struct PatientSummary {
    /// The patient.
    pub patient: Patient,
    /// Name from the chart.
    pub name: String,
}

/// The patients `principal` may open: the agency's for office and admin users, the care team's
/// for clinicians. Names come from the charts (not audited: a list of names is what every
/// device of the agency holds; opening a chart is).
pub async fn patients(state: &AppState, principal: &Principal) -> Result<Vec<PatientSummary>> {
    let store = console_store(state)?;
    let mut out = Vec::new();
    for patient in store.agency_patients(principal.agency_id().clone()).await? {
        let meta = chart_meta(&patient);
        if !access::may_access(state.storage(), principal, &meta).await? {
            continue;
        }
        let id = patient.chart_document_id;
        let name = read_doc(state, id, move |doc| {
            PatientChart::read(id, doc).name().unwrap_or("").to_owned()
        })
        .await?
        .map(|(name, _)| name)
        .unwrap_or_default();
        out.push(PatientSummary { patient, name });
    }
    Ok(out)
}

/// One visit note in a chart's list.
#[derive(Debug, Clone)]
pub struct NoteSummary {
    /// The note.
    pub note: VisitNote,
}

/// A patient's chart as the chart page shows it.
#[derive(Debug, Clone)]
pub struct ChartView {
    /// The patient.
    pub patient: Patient,
    /// The chart document, read.
    pub chart: PatientChart,
    /// Users on the care team (the relay's table, which decides access).
    pub care_team: Vec<User>,
    /// Visit notes, oldest first.
    pub notes: Vec<NoteSummary>,
    /// Every current (not superseded) vital reading of every note, by time.
    pub vitals: Vec<VitalReading>,
    /// The chart's open conflicts, every value with its author and time.
    pub conflicts: Vec<fieldchart_core::model::Conflict>,
}

/// Open a patient's chart (and, for the vitals chart, their notes) as `principal`: one `read`
/// audit row per document read. Another agency's patient is `NotFound`, one the principal may
/// not open `Forbidden` (with a `deny` row).
pub async fn open_chart(
    state: &AppState,
    principal: &Principal,
    patient_id: &PatientId,
) -> Result<ChartView> {
    let store = console_store(state)?;
    let patient = visible_patient(state, principal, patient_id).await?;
    let chart_id = patient.chart_document_id;
    let ((chart, conflicts), heads) = read_doc(state, chart_id, move |doc| {
        let conflicts =
            AutoCommit::load(&doc.save()).map(|copy| fieldchart_core::model::find_conflicts(&copy));
        (PatientChart::read(chart_id, doc), conflicts)
    })
    .await?
    .ok_or(Error::NotFound("chart"))?;
    let conflicts = conflicts?;
    audit(
        state,
        principal,
        &patient,
        chart_id,
        AuditAction::Read,
        heads,
    )
    .await?;
    let mut care_team = Vec::new();
    for user_id in store.care_team(patient.id.clone()).await? {
        if let Some(user) = state.storage().user(user_id).await? {
            care_team.push(user);
        }
    }
    let mut notes = Vec::new();
    for (id, kind) in store.patient_documents(patient.id.clone()).await? {
        if kind != "visit-note" {
            continue;
        }
        if let Some((note, heads)) = read_doc_with_ledger(state, id).await? {
            audit(state, principal, &patient, id, AuditAction::Read, heads).await?;
            notes.push(NoteSummary { note: note.note });
        }
    }
    let mut vitals: Vec<VitalReading> = notes
        .iter()
        .flat_map(|n| n.note.current_vitals().into_iter().cloned())
        .collect();
    vitals.sort_by_key(|v| v.taken_at_ms);
    notes.sort_by_key(|n| n.note.evv["startedAt"].as_i64().unwrap_or_default());
    Ok(ChartView {
        conflicts,
        patient,
        chart,
        care_team,
        notes,
        vitals,
    })
}

/// A signature and whether it verifies now.
#[derive(Debug, Clone)]
pub struct CheckedSignature {
    /// Who signed, on which device, when.
    pub signature: Signature,
    /// The signer's name, when the relay knows the user.
    pub signer_name: Option<String>,
    /// `Ok(())`: valid; otherwise why not.
    pub verdict: std::result::Result<(), String>,
}

/// A visit note as the note page shows it.
#[derive(Debug, Clone)]
pub struct NoteView {
    /// The patient.
    pub patient: Patient,
    /// The patient's name.
    pub patient_name: String,
    /// The note (a signed note's body as signed).
    pub note: VisitNote,
    /// The canonical rendering at the signature heads, when signed.
    pub rendering: Option<String>,
    /// Every signature entry in the note's history, verified.
    pub signatures: Vec<CheckedSignature>,
    /// Changes awaiting review (after or concurrent with the signature, tampering).
    pub review: Vec<ReviewItem>,
    /// Open conflicts of the note's fields (a draft's are resolved in the console).
    pub conflicts: Vec<fieldchart_core::model::Conflict>,
}

/// Open a visit note as `principal` (one `read` audit row), verifying every signature entry
/// against the agency's enrolled device keys with core's `signing::verify`.
pub async fn open_note(
    state: &AppState,
    principal: &Principal,
    document_id: DocumentId,
) -> Result<NoteView> {
    let row = state
        .storage()
        .document_row(document_id)
        .await?
        .filter(|row| row.meta.kind == "visit-note")
        .ok_or(Error::NotFound("note"))?;
    let patient = visible_patient(state, principal, &row.meta.patient_id).await?;
    let read = read_doc_with_ledger(state, document_id)
        .await?
        .ok_or(Error::NotFound("note"))?;
    let (read, heads) = read;
    audit(
        state,
        principal,
        &patient,
        document_id,
        AuditAction::Read,
        heads,
    )
    .await?;
    let keys = key_directory(state, &row.meta).await?;
    let entries = read.entries.clone();
    let doc = read.doc;
    let (checked, conflicts) = tokio::task::spawn_blocking(move || {
        let conflicts =
            AutoCommit::load(&doc.save()).map(|copy| fieldchart_core::model::find_conflicts(&copy));
        let checked = entries
            .iter()
            .filter_map(|entry| {
                let signature = Signature::from_entry(entry)?;
                let verdict = match signing::verify(&doc, document_id, entry, &keys, &RoleOnly) {
                    Verdict::Valid => Ok(()),
                    Verdict::HeadsMissing => Err("the signed version is not on the relay".into()),
                    Verdict::Invalid(reason) => Err(invalid_reason(&reason).to_owned()),
                };
                Some((signature, verdict))
            })
            .collect::<Vec<_>>();
        (checked, conflicts)
    })
    .await?;
    let conflicts = conflicts?;
    let mut signatures = Vec::new();
    for (signature, verdict) in checked {
        let signer_name = state
            .storage()
            .user(crate::identity::UserId::new(signature.signed_by.as_str()))
            .await?
            .filter(|u| u.agency_id == patient.agency_id)
            .map(|u| u.name);
        signatures.push(CheckedSignature {
            signature,
            signer_name,
            verdict,
        });
    }
    let chart_id = patient.chart_document_id;
    let patient_name = read_doc(state, chart_id, move |doc| {
        PatientChart::read(chart_id, doc)
            .name()
            .unwrap_or("")
            .to_owned()
    })
    .await?
    .map(|(n, _)| n)
    .unwrap_or_default();
    Ok(NoteView {
        patient,
        patient_name,
        note: read.note,
        rendering: read.rendering,
        signatures,
        review: read.review,
        conflicts,
    })
}

/// Why a signature does not verify, for a person.
pub fn invalid_reason(reason: &InvalidSignature) -> &'static str {
    match reason {
        InvalidSignature::Malformed => "the signature entry is malformed",
        InvalidSignature::WrongDocument => "it was made for another note",
        InvalidSignature::UnknownKey => "no enrolled key for the signing device",
        InvalidSignature::KeyOfAnotherUser => "the device key belongs to another user",
        InvalidSignature::KeyRevoked => "the device was revoked before the signing time",
        InvalidSignature::BadTime => "the signing time is before enrollment or in the future",
        InvalidSignature::BadSignature => "the cryptographic signature does not verify",
        InvalidSignature::ContentMismatch => "the signed content has been altered",
        InvalidSignature::NotAllowed => "the signer's role may not sign notes",
    }
}

// --- helpers ---------------------------------------------------------------------------------

fn console_store(state: &AppState) -> Result<&dyn super::store::ConsoleStore> {
    state
        .console()
        .map(|c| c.store())
        .ok_or(Error::NotFound("console"))
}

fn chart_meta(patient: &Patient) -> DocMeta {
    DocMeta {
        agency_id: patient.agency_id.clone(),
        patient_id: patient.id.clone(),
        kind: "patient".into(),
    }
}

/// The patient, if `principal` may open their records: another agency's (or an unknown)
/// patient is `NotFound`; one of the agency the principal may not open is `Forbidden`, with a
/// `deny` audit row.
pub(super) async fn visible_patient(
    state: &AppState,
    principal: &Principal,
    patient_id: &PatientId,
) -> Result<Patient> {
    let patient = state
        .storage()
        .patient(patient_id.clone())
        .await?
        .filter(|p| p.agency_id == *principal.agency_id())
        .ok_or(Error::NotFound("patient"))?;
    if !access::may_access(state.storage(), principal, &chart_meta(&patient)).await? {
        audit(
            state,
            principal,
            &patient,
            patient.chart_document_id,
            AuditAction::Deny,
            Vec::new(),
        )
        .await?;
        return Err(Error::Forbidden("you are not on this patient's care team"));
    }
    Ok(patient)
}

/// Append one audit row and wait until it is durable (the page is shown only after).
async fn audit(
    state: &AppState,
    principal: &Principal,
    patient: &Patient,
    document_id: DocumentId,
    action: AuditAction,
    heads: Vec<ChangeHash>,
) -> Result<()> {
    state
        .audit()
        .record(AuditEvent {
            at_ms: now_ms(),
            agency_id: patient.agency_id.clone(),
            user_id: principal.user_id().clone(),
            device_id: principal.device_id.clone(),
            document_id,
            patient_id: Some(patient.id.clone()),
            action,
            heads,
        })
        .await
}

/// Run `f` on a loaded document on the blocking pool; `None` if the relay does not hold it.
async fn read_doc<T, F>(
    state: &AppState,
    id: DocumentId,
    f: F,
) -> Result<Option<(T, Vec<ChangeHash>)>>
where
    T: Send + 'static,
    F: FnOnce(&Automerge) -> T + Send + 'static,
{
    let Some(guard) = state.docs().open(id).await? else {
        return Ok(None);
    };
    let (_guard, out) = state
        .docs()
        .blocking(guard, move |g| (f(g.doc()), g.heads()))
        .await?;
    Ok(Some(out))
}

/// A note read with its ledger (the relay's trusted one: stored signatures were verified when
/// accepted; the page verifies them again).
struct ReadNote {
    note: VisitNote,
    rendering: Option<String>,
    entries: Vec<SignatureEntry>,
    review: Vec<ReviewItem>,
    doc: Automerge,
}

async fn read_doc_with_ledger(
    state: &AppState,
    id: DocumentId,
) -> Result<Option<(ReadNote, Vec<ChangeHash>)>> {
    let Some(guard) = state.docs().open(id).await? else {
        return Ok(None);
    };
    let (_guard, out) = state
        .docs()
        .blocking(guard, move |g| -> Result<(ReadNote, Vec<ChangeHash>)> {
            let heads = g.heads();
            let (doc, ledger) = g.doc_and_ledger();
            // VisitNote::read takes an AutoCommit; a copy keeps the shared document untouched.
            let mut copy = AutoCommit::load(&doc.save())?;
            let note = VisitNote::read(id, &mut copy, ledger);
            let rendering = ledger
                .signature()
                .and_then(|e| e.payload.as_ref())
                .and_then(|p| p.change_hashes())
                .map(|h| fieldchart_core::model::canonical_rendering(&copy, &h));
            Ok((
                ReadNote {
                    note,
                    rendering,
                    entries: ledger.signatures().cloned().collect(),
                    review: ledger.review_items().to_vec(),
                    doc: doc.clone(),
                },
                heads,
            ))
        })
        .await?;
    out.map(Some)
}

/// The agency's device keys, as devices get them from `/v1/keys`.
async fn key_directory(state: &AppState, meta: &DocMeta) -> Result<KeyDirectory> {
    let keys = state
        .storage()
        .agency_device_keys(meta.agency_id.clone())
        .await?;
    Ok(KeyDirectory {
        agency_id: meta.agency_id.as_str().to_owned(),
        keys: keys
            .into_iter()
            .map(|k| DirectoryKey {
                user_id: k.user_id.as_str().to_owned(),
                role: k.role.as_str().to_owned(),
                device_id: k.device_id.as_str().to_owned(),
                public_key: hex::encode(k.public_key),
                enrolled_at_ms: k.enrolled_at_ms,
                revoked_at_ms: k.revoked_at_ms,
            })
            .collect(),
    })
}

/// What a review-queue entry is about.
#[derive(Debug, Clone)]
pub enum ReviewWhat {
    /// A note's post-signature change or tampering ([`ReviewItem`]).
    Item(ReviewItem),
    /// A field with concurrent values, every one listed with its author and time (never
    /// resolved automatically).
    Conflict(fieldchart_core::model::Conflict),
}

/// One entry of the review queue, linked to its document.
#[derive(Debug, Clone)]
pub struct ReviewEntry {
    /// Whose record.
    pub patient: Patient,
    /// The patient's name.
    pub patient_name: String,
    /// The document (a note or the chart).
    pub document_id: DocumentId,
    /// Its kind (`visit-note`, `patient`, ...).
    pub kind: String,
    /// What needs a person.
    pub what: ReviewWhat,
    /// A signed note (its conflicts are listed, never resolved in the console).
    pub signed: bool,
}

/// Everything awaiting a person across the patients `principal` may open: post-signature
/// changes and tampering found in notes' histories, and open conflicts in any document. The
/// listing holds who/when/which field, not chart content, and is not audited; opening the
/// linked note or chart is.
pub async fn review_queue(state: &AppState, principal: &Principal) -> Result<Vec<ReviewEntry>> {
    let store = console_store(state)?;
    let mut out = Vec::new();
    for summary in patients(state, principal).await? {
        for (id, kind) in store.patient_documents(summary.patient.id.clone()).await? {
            let Some(guard) = state.docs().open(id).await? else {
                continue;
            };
            let note = kind == "visit-note";
            let (_guard, found) = state
                .docs()
                .blocking(guard, move |g| -> Result<(Vec<ReviewItem>, Vec<_>, bool)> {
                    let (items, signed) = if note {
                        let (_, ledger) = g.doc_and_ledger();
                        (ledger.review_items().to_vec(), ledger.is_signed())
                    } else {
                        (Vec::new(), false)
                    };
                    let copy = AutoCommit::load(&g.doc().save())?;
                    Ok((items, fieldchart_core::model::find_conflicts(&copy), signed))
                })
                .await?;
            let (items, conflicts, signed) = found?;
            let entry = |what| ReviewEntry {
                patient: summary.patient.clone(),
                patient_name: summary.name.clone(),
                document_id: id,
                kind: kind.clone(),
                what,
                signed,
            };
            out.extend(items.into_iter().map(|i| entry(ReviewWhat::Item(i))));
            out.extend(
                conflicts
                    .into_iter()
                    .map(|c| entry(ReviewWhat::Conflict(c))),
            );
        }
    }
    Ok(out)
}

/// A device's sync failure as the review queue lists it.
#[derive(Debug, Clone)]
pub struct FailureView {
    /// What the device reported.
    pub failure: super::store::ReportedFailure,
    /// The patient and their name, when the relay knows them and the user may open them.
    pub patient: Option<PatientSummary>,
    /// The device's user's name.
    pub user_name: String,
    /// The relay holds the document as a visit note the user may open (link to it).
    pub note_on_relay: bool,
}

/// The sync failures devices of `principal`'s agency reported: all of them for office and
/// admin users; for clinicians, their own devices' and those of patients they may open. Not
/// audited (document ids, reasons and times; no chart content).
pub async fn sync_failures(state: &AppState, principal: &Principal) -> Result<Vec<FailureView>> {
    let store = console_store(state)?;
    let reported = store
        .agency_sync_failures(principal.agency_id().clone())
        .await?;
    if reported.is_empty() {
        return Ok(Vec::new());
    }
    let visible = patients(state, principal).await?;
    let office = principal.role() != crate::identity::Role::Clinician;
    let mut out = Vec::new();
    for failure in reported {
        let patient = failure
            .patient_id
            .as_ref()
            .and_then(|p| visible.iter().find(|s| &s.patient.id == p))
            .cloned();
        if !office && patient.is_none() && &failure.user_id != principal.user_id() {
            continue;
        }
        let note_on_relay = patient.is_some()
            && state
                .storage()
                .document_row(failure.document_id)
                .await?
                .is_some_and(|row| {
                    row.meta.kind == "visit-note" && row.meta.agency_id == *principal.agency_id()
                });
        let user_name = state
            .storage()
            .user(failure.user_id.clone())
            .await?
            .map(|u| u.name)
            .unwrap_or_else(|| failure.user_id.to_string());
        out.push(FailureView {
            failure,
            patient,
            user_name,
            note_on_relay,
        });
    }
    Ok(out)
}

// --- schedule and board ------------------------------------------------------------------------

/// Plan a visit: appended to the patient's `schedule` document (created with the first visit)
/// as an automerge change authored by the scheduler through the browser session, stored and
/// forwarded to connected devices like a device's change, with a `write` audit row. A clinician
/// not yet on the patient's care team is assigned (admin log row): her phone then syncs the
/// patient's chart and schedule before the day. Office and admin users only.
pub async fn schedule_visit(
    state: &AppState,
    principal: &Principal,
    ctx: &crate::admin::AdminContext,
    patient_id: &PatientId,
    visit: ScheduledVisit,
) -> Result<String> {
    if principal.role() == crate::identity::Role::Clinician {
        return Err(Error::Forbidden("scheduling is for office and admin users"));
    }
    visit.validate()?;
    let patient = visible_patient(state, principal, patient_id).await?;
    let clinician = state
        .storage()
        .user(crate::identity::UserId::new(visit.clinician_id.as_str()))
        .await?
        .filter(|u| u.agency_id == patient.agency_id && u.role == crate::identity::Role::Clinician)
        .ok_or(Error::NotFound("clinician"))?;
    if state
        .storage()
        .user_disabled_at(clinician.id.clone())
        .await?
        .is_some()
    {
        return Err(Error::BadRequest("the clinician is disabled".into()));
    }
    if !state
        .storage()
        .on_care_team(clinician.id.clone(), patient.id.clone())
        .await?
    {
        crate::admin::assign(state.storage(), ctx, &clinician.id, &patient.id).await?;
    }
    let author = fieldchart_core::model::Actor {
        user_id: principal.user_id().to_string(),
        device_id: principal.device_id.to_string(),
    };
    let existing = console_store(state)?
        .patient_documents(patient.id.clone())
        .await?
        .into_iter()
        .find(|(_, kind)| kind == schedule::SCHEDULE_KIND)
        .map(|(id, _)| id);
    let meta = DocMeta {
        agency_id: patient.agency_id.clone(),
        patient_id: patient.id.clone(),
        kind: schedule::SCHEDULE_KIND.into(),
    };
    let now = now_ms();
    let write_audit = |id: DocumentId, heads: Vec<ChangeHash>| AuditEvent {
        at_ms: now,
        agency_id: patient.agency_id.clone(),
        user_id: principal.user_id().clone(),
        device_id: principal.device_id.clone(),
        document_id: id,
        patient_id: Some(patient.id.clone()),
        action: AuditAction::Write,
        heads,
    };
    if let Some(id) = existing {
        let guard = state
            .docs()
            .open(id)
            .await?
            .ok_or(Error::NotFound("schedule"))?;
        let (guard, made) = state
            .docs()
            .blocking(
                guard,
                move |g| -> Result<(String, Vec<automerge::Change>)> {
                    let before = g.heads();
                    let mut copy = fieldchart_core::model::load_document(&g.doc().save())?;
                    copy.set_actor(automerge::ActorId::random());
                    copy.set_author(Some(author.author()));
                    let visit_id = schedule::add_visit(&mut copy, &visit, now)?;
                    let changes: Vec<automerge::Change> = copy.get_changes(&before);
                    g.doc_mut().apply_changes(changes.clone())?;
                    Ok((visit_id, changes))
                },
            )
            .await?;
        let (visit_id, changes) = match made {
            Ok(made) => made,
            Err(e) => {
                state.docs().discard(guard);
                return Err(e);
            }
        };
        let heads = guard.heads();
        // `u64::MAX` is no session's id: every device syncing the schedule is told.
        state
            .docs()
            .commit(guard, &changes, write_audit(id, heads), u64::MAX)
            .await?;
        Ok(visit_id)
    } else {
        let (id, mut doc) = schedule::new_schedule(
            patient.agency_id.as_str(),
            patient.id.as_str(),
            &author,
            now,
        )?;
        let visit_id = schedule::add_visit(&mut doc, &visit, now)?;
        let snapshot = doc.save();
        let doc = Automerge::load(&snapshot)?;
        let heads = doc.get_heads();
        match state
            .docs()
            .create(id, doc, snapshot, meta, write_audit(id, heads))
            .await?
        {
            crate::docs::Created::Stored(_) => Ok(visit_id),
            _ => Err(Error::Conflict(
                "the schedule was created meanwhile; try again".into(),
            )),
        }
    }
}

/// Where a scheduled visit stands on the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisitState {
    /// Planned; no note yet.
    Scheduled,
    /// A note exists (EVV start) and is on the relay: received by the agency.
    Started,
    /// EVV end recorded.
    Finished,
    /// Signed.
    Signed,
}

/// One line of the Today board.
#[derive(Debug, Clone)]
pub struct BoardVisit {
    /// The visit as planned.
    pub visit: ScheduledVisit,
    /// The patient.
    pub patient: Patient,
    /// The patient's name.
    pub patient_name: String,
    /// The clinician's name.
    pub clinician_name: String,
    /// How far it got.
    pub state: VisitState,
    /// The note, when one was received.
    pub note: Option<DocumentId>,
    /// The window has ended and the visit has not started.
    pub late: bool,
    /// The window ended more than [`NOTE_DUE_AFTER_MS`] ago and no signed note was received.
    pub note_missing: bool,
}

/// A note is expected signed this long after the visit window ends.
pub const NOTE_DUE_AFTER_MS: i64 = 2 * 3600 * 1000;

/// Milliseconds of `date` `HH:MM` (UTC: the relay has no agency time zone yet).
fn at_ms(date: &str, time: &str) -> Option<i64> {
    format!("{date}T{time}:00Z")
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

/// Every clinician's visits on `date` across the patients `principal` may open, with what
/// the relay received (note started, finished, signed). Statuses only, not chart content: not
/// audited.
pub async fn board(state: &AppState, principal: &Principal, date: &str) -> Result<Vec<BoardVisit>> {
    let store = console_store(state)?;
    let now = now_ms();
    let mut out = Vec::new();
    for summary in patients(state, principal).await? {
        let docs = store.patient_documents(summary.patient.id.clone()).await?;
        let mut visits = Vec::new();
        let mut notes = Vec::new();
        for (id, kind) in &docs {
            if kind == schedule::SCHEDULE_KIND
                && let Some((found, _)) = read_doc(state, *id, schedule::read_schedule).await?
            {
                visits.extend(
                    found
                        .into_iter()
                        .filter(|v| v.date == date && v.status != "cancelled"),
                );
            }
        }
        if visits.is_empty() {
            continue;
        }
        for (id, kind) in &docs {
            if kind == "visit-note"
                && let Some((read, _)) = read_doc_with_ledger(state, *id).await?
            {
                notes.push(read.note);
            }
        }
        for visit in visits {
            let note = notes.iter().find(|n| {
                n.evv["date"].as_str() == Some(date)
                    && n.evv["clinicianId"].as_str() == Some(visit.clinician_id.as_str())
            });
            let state_of = match note {
                None => VisitState::Scheduled,
                Some(n) if n.status == fieldchart_core::model::NoteStatus::Signed => {
                    VisitState::Signed
                }
                Some(n) if n.evv.get("endedAt").is_some() => VisitState::Finished,
                Some(_) => VisitState::Started,
            };
            let end = at_ms(&visit.date, &visit.window_end).unwrap_or(i64::MAX);
            let clinician_name = state
                .storage()
                .user(crate::identity::UserId::new(visit.clinician_id.as_str()))
                .await?
                .map(|u| u.name)
                .unwrap_or_else(|| visit.clinician_id.clone());
            out.push(BoardVisit {
                late: state_of == VisitState::Scheduled && now > end,
                note_missing: state_of != VisitState::Signed
                    && now > end.saturating_add(NOTE_DUE_AFTER_MS),
                note: note.map(|n| n.document_id),
                patient: summary.patient.clone(),
                patient_name: summary.name.clone(),
                clinician_name,
                state: state_of,
                visit,
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.clinician_name, &a.visit.window_start).cmp(&(&b.clinician_name, &b.visit.window_start))
    });
    Ok(out)
}
