//! The schedule on the phone: the visits the office planned for the signed-in nurse, read
//! from the `schedule` documents her sync pass received (see `Store::scheduled_visits` in the
//! core).

use super::error::FfiResult;
use super::store::Store;

/// A visit the office planned.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ScheduledVisit {
    /// The visit's id in its schedule.
    pub visit_id: String,
    /// The patient.
    pub patient_id: String,
    /// The patient's name, when the phone holds the chart.
    pub patient_name: Option<String>,
    /// Who will visit (user id).
    pub clinician_id: String,
    /// `YYYY-MM-DD` (the agency's calendar date).
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

impl From<fieldchart_core::store::ScheduledVisitRow> for ScheduledVisit {
    fn from(v: fieldchart_core::store::ScheduledVisitRow) -> Self {
        ScheduledVisit {
            visit_id: v.visit_id,
            patient_id: v.patient_id,
            patient_name: v.patient_name,
            clinician_id: v.clinician_id,
            date: v.date,
            window_start: v.window_start,
            window_end: v.window_end,
            service_type: v.service_type,
            status: v.status,
        }
    }
}

#[uniffi::export]
impl Store {
    /// The signed-in user's visits from `from_date` to `to_date` (`YYYY-MM-DD`, both
    /// included), by date and time window; cancelled visits are listed with their status.
    /// Dates, not instants: the schedule is kept in the agency's calendar dates and local
    /// times, so the app asks for "today" or "this week" as it shows them.
    pub fn visits_scheduled(
        &self,
        from_date: String,
        to_date: String,
    ) -> FfiResult<Vec<ScheduledVisit>> {
        let me = self.inner.actor().user_id.clone();
        Ok(self
            .inner
            .scheduled_visits(&from_date, &to_date, Some(&me))?
            .into_iter()
            .map(ScheduledVisit::from)
            .collect())
    }
}
