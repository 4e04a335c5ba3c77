//! Patient charts: demographics, allergies, medications, care team and care plan.

use super::*;

impl Store {
    // ----- patient charts -----

    /// Create a patient chart (office and admin roles).
    pub fn create_patient(
        &self,
        agency_id: &str,
        patient_id: &str,
        name: &str,
    ) -> Result<DocumentId> {
        self.require_role(&[Role::Office, Role::Admin], "create patient charts")?;
        let (id, doc) =
            model::new_patient_chart(agency_id, patient_id, name, &self.actor, model::now_ms())?;
        self.insert_document(id, doc, patient_id)?;
        Ok(id)
    }

    /// Open a patient chart (audited as `chart-opened`).
    pub fn patient_chart(&self, id: DocumentId) -> Result<PatientChart> {
        self.read(id, Some(AuditAction::ChartOpened), |doc| {
            model::expect_kind(doc, id, DocKind::Patient)?;
            Ok(PatientChart::read(id, doc))
        })
    }

    /// Set a demographic field. Nothing is written if the field already shows `value`; a field
    /// in conflict is refused ([`Error::FieldInConflict`]: resolve it first).
    pub fn set_demographic(&self, id: DocumentId, field: Demographic, value: &str) -> Result<()> {
        self.edit(
            id,
            DocKind::Patient,
            "set demographic",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::set_demographic(doc, field, value),
        )
    }

    /// Add an allergy (`allergy.id` empty, `read` `None`) or update one; returns its id.
    ///
    /// An update passes `read`, the allergy as the caller read it (from
    /// [`Store::patient_chart`]), and writes only the fields where `allergy` differs from it.
    /// A field the caller left unchanged is never written, so an update never closes a conflict
    /// on another field. A changed field that is in conflict is refused
    /// ([`Error::FieldInConflict`]: resolve it first), and one that no longer holds what the
    /// caller read is refused ([`Error::StaleRead`]: read again); either way nothing is written.
    pub fn upsert_allergy(
        &self,
        id: DocumentId,
        read: Option<&Allergy>,
        allergy: &Allergy,
    ) -> Result<String> {
        self.edit(
            id,
            DocKind::Patient,
            "upsert allergy",
            Reindex::Yes,
            Durability::PowerLoss,
            |doc, actor, now| model::patient::upsert_allergy(doc, read, allergy, actor, now),
        )
    }

    /// Add a medication (`medication.id` empty, `read` `None`) or update one; returns its id.
    /// Same contract as [`Store::upsert_allergy`]: only the fields where `medication` differs
    /// from `read` (what the caller read) are written.
    pub fn upsert_medication(
        &self,
        id: DocumentId,
        read: Option<&Medication>,
        medication: &Medication,
    ) -> Result<String> {
        self.edit(
            id,
            DocKind::Patient,
            "upsert medication",
            Reindex::Yes,
            Durability::PowerLoss,
            |doc, actor, now| model::patient::upsert_medication(doc, read, medication, actor, now),
        )
    }

    /// Add or update a care-team member (office and admin roles).
    pub fn set_care_team_member(&self, id: DocumentId, member: &CareTeamMember) -> Result<()> {
        self.require_role(&[Role::Office, Role::Admin], "change care teams")?;
        self.edit(
            id,
            DocKind::Patient,
            "set care team member",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::set_care_team_member(doc, member),
        )
    }

    /// Remove a care-team member (office and admin roles).
    pub fn remove_care_team_member(&self, id: DocumentId, user_id: &str) -> Result<()> {
        self.require_role(&[Role::Office, Role::Admin], "change care teams")?;
        self.edit(
            id,
            DocKind::Patient,
            "remove care team member",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::remove_care_team_member(doc, user_id),
        )
    }

    /// Add a care-plan problem (`parent` empty), goal (`[problem]`) or intervention
    /// (`[problem, goal]`); returns its id.
    pub fn add_care_plan_item(
        &self,
        id: DocumentId,
        parent: &[String],
        description: &str,
        status: &str,
    ) -> Result<String> {
        self.edit(
            id,
            DocKind::Patient,
            "add care plan item",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::add_care_plan_item(doc, parent, description, status),
        )
    }

    /// Set the status of a care-plan entry (path of ids from the problem down).
    pub fn set_care_plan_status(
        &self,
        id: DocumentId,
        path: &[String],
        status: &str,
    ) -> Result<()> {
        self.edit(
            id,
            DocKind::Patient,
            "set care plan status",
            Reindex::Yes,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::set_care_plan_status(doc, path, status),
        )
    }

    /// Replace a care-plan entry's description (diffed into a minimal Text edit).
    pub fn update_care_plan_description(
        &self,
        id: DocumentId,
        path: &[String],
        text: &str,
    ) -> Result<()> {
        self.edit(
            id,
            DocKind::Patient,
            "edit care plan",
            Reindex::No,
            Durability::ProcessCrash,
            |doc, _, _| model::patient::update_care_plan_description(doc, path, text),
        )
    }
}
