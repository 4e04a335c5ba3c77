//! The schedule on the device: the visits the office planned, read from the `schedule`
//! documents the relay sends with the patients of the nurse's care team (one per patient, see
//! [`crate::model::schedule`]).
//!
//! The store keeps no index table of visits (that would be a store migration): schedule
//! documents are the ones whose root `kind` this build's index does not know, and a call
//! reads each of them (one per patient of the care team: a nurse holds dozens). A schedule
//! already in the document cache is read there; the others are loaded for the call only, so
//! listing the week does not push the nurse's open charts and notes out of the cache.

use super::*;
use crate::model::schedule::{SCHEDULE_KIND, read_schedule};

/// A planned visit as the phone lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledVisitRow {
    /// The visit's id in its schedule.
    pub visit_id: String,
    /// The schedule document.
    pub document_id: DocumentId,
    /// The patient.
    pub patient_id: String,
    /// The patient's name, when the store holds the chart.
    pub patient_name: Option<String>,
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

fn check_date(what: &str, date: &str) -> Result<()> {
    let b = date.as_bytes();
    let ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!("{what} is not YYYY-MM-DD")))
    }
}

impl Store {
    // ----- the schedule -----

    /// Visits planned from `from_date` to `to_date` (`YYYY-MM-DD`, both included), by date
    /// and window; only `clinician_id`'s when given (a nurse's own visits), cancelled ones
    /// included (their `status` says so). Not audited: a schedule holds no clinical content,
    /// and opening the patient's chart is audited.
    pub fn scheduled_visits(
        &self,
        from_date: &str,
        to_date: &str,
        clinician_id: Option<&str>,
    ) -> Result<Vec<ScheduledVisitRow>> {
        check_date("the first date", from_date)?;
        check_date("the last date", to_date)?;
        self.with(|inner| {
            let candidates: Vec<(DocumentId, Option<String>)> = {
                let mut stmt = inner.conn.prepare_cached(
                    "SELECT d.doc_id, p.name FROM documents d
                     LEFT JOIN patients p ON p.patient_id = d.patient_id
                     WHERE d.kind IS NULL",
                )?;
                stmt.query_map([], |r| Ok((doc_id_from_sql(r.get(0)?)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?
            };
            let author = inner.author.clone();
            let mut out = Vec::new();
            for (id, patient_name) in candidates {
                let mut read = |doc: &AutoCommit| {
                    if model::get_string(doc, &automerge::ROOT, "kind").as_deref()
                        != Some(SCHEDULE_KIND)
                    {
                        return;
                    }
                    let patient_id = model::root_info(doc).patient_id.unwrap_or_default();
                    for v in read_schedule(doc) {
                        if v.date.as_str() < from_date
                            || v.date.as_str() > to_date
                            || clinician_id.is_some_and(|c| c != v.clinician_id)
                        {
                            continue;
                        }
                        out.push(ScheduledVisitRow {
                            visit_id: v.id,
                            document_id: id,
                            patient_id: patient_id.clone(),
                            patient_name: patient_name.clone(),
                            clinician_id: v.clinician_id,
                            date: v.date,
                            window_start: v.window_start,
                            window_end: v.window_end,
                            service_type: v.service_type,
                            status: v.status,
                        });
                    }
                };
                if let Some(cached) = inner.docs.get(&id) {
                    read(&cached.doc);
                } else {
                    let tx = inner.conn.transaction()?;
                    let loaded = documents::load(&tx, id, &author, inner.keys.clone())?;
                    tx.commit()?;
                    read(&loaded.doc);
                }
            }
            out.sort_by(|a, b| {
                (&a.date, &a.window_start, &a.patient_id, &a.visit_id).cmp(&(
                    &b.date,
                    &b.window_start,
                    &b.patient_id,
                    &b.visit_id,
                ))
            });
            Ok(out)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::schedule::{ScheduledVisit, add_visit, new_schedule};

    fn visit(clinician: &str, date: &str, start: &str) -> ScheduledVisit {
        ScheduledVisit {
            id: String::new(),
            clinician_id: clinician.into(),
            date: date.into(),
            window_start: start.into(),
            window_end: "23:00".into(),
            service_type: "skilled-nursing".into(),
            status: String::new(),
        }
    }

    #[test]
    fn a_synced_schedule_lists_the_nurses_visits_in_the_range_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            path: dir.path().join("s.db"),
            key: StoreKey::from_bytes([7; 32]),
            actor: Actor {
                user_id: "usr_ana".into(),
                device_id: "dev_ana".into(),
            },
            role: Role::Clinician,
            keystroke_journal: false,
        };
        let store = Store::open(config.clone()).unwrap();
        let office = Actor {
            user_id: "usr_olga".into(),
            device_id: "web_1".into(),
        };
        // The chart (for the name) and the schedule arrive as the relay sends them: whole
        // documents imported by the sync path.
        let (chart_id, chart) =
            model::new_patient_chart("agc", "pat_1", "Grace Hopper", &office, 1).unwrap();
        let (sched_id, mut sched) = new_schedule("agc", "pat_1", &office, 1).unwrap();
        add_visit(&mut sched, &visit("usr_ana", "2026-12-01", "09:00"), 2).unwrap();
        add_visit(&mut sched, &visit("usr_ana", "2026-11-30", "13:00"), 3).unwrap();
        add_visit(&mut sched, &visit("usr_ben", "2026-12-01", "08:00"), 4).unwrap();
        add_visit(&mut sched, &visit("usr_ana", "2026-12-09", "08:00"), 5).unwrap();
        for (id, mut doc) in [(chart_id, chart), (sched_id, sched)] {
            store.import(id, &doc.save()).unwrap();
        }
        let mine = store
            .scheduled_visits("2026-11-30", "2026-12-01", Some("usr_ana"))
            .unwrap();
        let shown: Vec<(&str, &str)> = mine
            .iter()
            .map(|v| (v.date.as_str(), v.window_start.as_str()))
            .collect();
        assert_eq!(shown, [("2026-11-30", "13:00"), ("2026-12-01", "09:00")]);
        assert!(mine.iter().all(|v| v.patient_id == "pat_1"
            && v.patient_name.as_deref() == Some("Grace Hopper")
            && v.status == "scheduled"
            && v.document_id == sched_id));
        assert_eq!(
            store
                .scheduled_visits("2026-11-30", "2026-12-31", None)
                .unwrap()
                .len(),
            4
        );
        assert!(matches!(
            store.scheduled_visits("30.11.2026", "2026-12-01", None),
            Err(Error::InvalidInput(_))
        ));
        store.close().unwrap();
        let store = Store::open(config).unwrap();
        assert_eq!(
            store
                .scheduled_visits("2026-11-30", "2026-12-01", Some("usr_ana"))
                .unwrap(),
            mine,
            "the schedule is stored on the phone"
        );
    }
}
