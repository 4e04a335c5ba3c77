//! The schedule: visits a scheduler plans (patient, clinician, date, time window, service type).
//!
//! One `schedule` document per patient, written by the office (the relay writes it for the
//! console) and synced like any other document of the patient: every clinician on the care team
//! gets it, so a nurse's phone holds the visits planned for her before the day. Visits live in a
//! map keyed by a random id (two schedulers adding visits offline never collide); a visit is
//! cancelled by its `status`, never deleted. All fields are scalars: a concurrent change of one
//! field is a listed conflict, not a merge of two times.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};

use super::{Actor, commit, ensure_obj, get_obj, get_string, new_document, new_item_id};
use crate::protocol::DocumentId;
use crate::{Error, Result};

/// Root `kind` of a schedule document.
pub const SCHEDULE_KIND: &str = "schedule";
/// Schema string of a schedule document.
pub const SCHEDULE_SCHEMA: &str = "fieldchart/schedule@1";

/// One planned visit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledVisit {
    /// Entry id; empty when adding (one is assigned).
    pub id: String,
    /// The clinician who will visit (user id).
    pub clinician_id: String,
    /// Visit date, `YYYY-MM-DD` (the agency's calendar date).
    pub date: String,
    /// Start of the time window, `HH:MM`.
    pub window_start: String,
    /// End of the time window, `HH:MM`.
    pub window_end: String,
    /// Type of service, e.g. `skilled-nursing`.
    pub service_type: String,
    /// `scheduled` or `cancelled`.
    pub status: String,
}

fn valid_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

fn valid_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 5
        && b[2] == b':'
        && b[..2].iter().chain(&b[3..]).all(u8::is_ascii_digit)
        && s[..2] < *"24"
        && s[3..] < *"60"
}

impl ScheduledVisit {
    /// Check the fields a scheduler entered.
    pub fn validate(&self) -> Result<()> {
        if self.clinician_id.is_empty() || self.service_type.trim().is_empty() {
            return Err(Error::InvalidInput(
                "a visit needs a clinician and a service type".into(),
            ));
        }
        if !valid_date(&self.date) {
            return Err(Error::InvalidInput("the date is YYYY-MM-DD".into()));
        }
        if !valid_time(&self.window_start) || !valid_time(&self.window_end) {
            return Err(Error::InvalidInput("times are HH:MM".into()));
        }
        if self.window_end <= self.window_start {
            return Err(Error::InvalidInput(
                "the window must end after it starts".into(),
            ));
        }
        Ok(())
    }
}

/// A new, empty schedule document of a patient.
pub fn new_schedule(
    agency_id: &str,
    patient_id: &str,
    author: &Actor,
    now_ms: i64,
) -> Result<(DocumentId, AutoCommit)> {
    if agency_id.is_empty() || patient_id.is_empty() {
        return Err(Error::InvalidInput(
            "agency and patient ids must not be empty".into(),
        ));
    }
    let mut doc = new_document(author)?;
    doc.put(ROOT, "schema", SCHEDULE_SCHEMA)?;
    doc.put(ROOT, "kind", SCHEDULE_KIND)?;
    doc.put(ROOT, "patientId", patient_id)?;
    doc.put(ROOT, "agencyId", agency_id)?;
    doc.put(ROOT, "createdBy", author.user_id.as_str())?;
    doc.put(ROOT, "createdAt", now_ms)?;
    doc.put_object(ROOT, "visits", ObjType::Map)?;
    commit(&mut doc, "create schedule", now_ms);
    Ok((DocumentId::random(), doc))
}

/// Add a visit (validated) and commit; returns its id.
pub fn add_visit(doc: &mut AutoCommit, visit: &ScheduledVisit, now_ms: i64) -> Result<String> {
    visit.validate()?;
    let visits = ensure_obj(doc, &ROOT, "visits", ObjType::Map)?;
    let id = new_item_id();
    let entry = doc.put_object(&visits, id.as_str(), ObjType::Map)?;
    for (key, value) in [
        ("clinicianId", visit.clinician_id.as_str()),
        ("date", visit.date.as_str()),
        ("windowStart", visit.window_start.as_str()),
        ("windowEnd", visit.window_end.as_str()),
        ("serviceType", visit.service_type.trim()),
        ("status", "scheduled"),
    ] {
        doc.put(&entry, key, value)?;
    }
    commit(doc, "schedule visit", now_ms);
    Ok(id)
}

/// Every visit of a schedule document, by date and window.
pub fn read_schedule(doc: &impl ReadDoc) -> Vec<ScheduledVisit> {
    let Some(visits) = get_obj(doc, &ROOT, "visits") else {
        return Vec::new();
    };
    let ids: Vec<String> = doc.keys(&visits).collect();
    let mut out: Vec<ScheduledVisit> = ids
        .into_iter()
        .filter_map(|id| {
            let entry = get_obj(doc, &visits, &id)?;
            let s = |k: &str| get_string(doc, &entry, k).unwrap_or_default();
            Some(ScheduledVisit {
                clinician_id: s("clinicianId"),
                date: s("date"),
                window_start: s("windowStart"),
                window_end: s("windowEnd"),
                service_type: s("serviceType"),
                status: s("status"),
                id,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.date, &a.window_start, &a.id).cmp(&(&b.date, &b.window_start, &b.id)));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn visit(date: &str, start: &str, end: &str) -> ScheduledVisit {
        ScheduledVisit {
            id: String::new(),
            clinician_id: "usr_ana".into(),
            date: date.into(),
            window_start: start.into(),
            window_end: end.into(),
            service_type: "skilled-nursing".into(),
            status: String::new(),
        }
    }

    #[test]
    fn visits_added_offline_on_two_copies_both_survive_the_merge() {
        let office = Actor {
            user_id: "usr_o".into(),
            device_id: "web_1".into(),
        };
        let (_, mut a) = new_schedule("agc", "pat", &office, 1).unwrap();
        let mut b = a.fork();
        b.set_actor(automerge::ActorId::random());
        add_visit(&mut a, &visit("2026-12-01", "09:00", "10:00"), 2).unwrap();
        add_visit(&mut b, &visit("2026-11-30", "13:00", "14:30"), 3).unwrap();
        a.merge(&mut b).unwrap();
        let visits = read_schedule(&a);
        assert_eq!(visits.len(), 2);
        assert_eq!(visits[0].date, "2026-11-30", "sorted by date");
        assert!(visits.iter().all(|v| v.status == "scheduled"));
    }

    #[test]
    fn bad_dates_and_windows_are_refused_and_nothing_is_written() {
        let office = Actor {
            user_id: "usr_o".into(),
            device_id: "web_1".into(),
        };
        let (_, mut doc) = new_schedule("agc", "pat", &office, 1).unwrap();
        let heads = doc.get_heads();
        for bad in [
            visit("2026-13", "09:00", "10:00"),
            visit("2026-12-01", "9:00", "10:00"),
            visit("2026-12-01", "10:00", "09:00"),
            visit("2026-12-01", "24:00", "25:00"),
        ] {
            assert!(add_visit(&mut doc, &bad, 2).is_err(), "{bad:?}");
        }
        assert_eq!(doc.get_heads(), heads);
    }
}
