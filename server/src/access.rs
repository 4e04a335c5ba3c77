//! Who may touch which document (HIPAA's "access only for those granted it").
//!
//! - A clinician reaches the patients whose care team she is on.
//! - Office and admin users reach every patient of their agency.
//! - Nothing crosses agencies.
//! - Over sync, a clinician creates only `visit-note` documents; office and admin users create
//!   `visit-note` and `schedule` documents. Patient charts (`kind: "patient"`) are created only
//!   with their patient (admin CLI and API), never over sync: a second chart for a patient
//!   would split the record. Documents of other or missing kinds are refused.
//!
//! A document's agency and patient come from its root fields, read once when it is first stored
//! ([`crate::storage::DocMeta`]). The rule itself is the pure function [`decide`]; the async
//! helpers fetch the one fact it needs (care-team membership, the patient's agency) per call,
//! so an assignment or removal takes effect on the next message, with no cache to go stale.

use crate::auth::Principal;
use crate::error::Result;
use crate::identity::Role;
use crate::storage::{DocMeta, Storage};

/// The access rule. `on_care_team` is only consulted for clinicians.
pub fn decide(principal: &Principal, doc: &DocMeta, on_care_team: bool) -> bool {
    if doc.agency_id != *principal.agency_id() {
        return false;
    }
    match principal.role() {
        Role::Office | Role::Admin => true,
        Role::Clinician => on_care_team,
    }
}

/// Whether `principal` may read and write the stored document described by `doc`.
pub async fn may_access(
    storage: &dyn Storage,
    principal: &Principal,
    doc: &DocMeta,
) -> Result<bool> {
    let on_care_team = match principal.role() {
        Role::Clinician if doc.agency_id == *principal.agency_id() => {
            storage
                .on_care_team(principal.user_id().clone(), doc.patient_id.clone())
                .await?
        }
        _ => false,
    };
    Ok(decide(principal, doc, on_care_team))
}

/// Kinds of document each role may create over sync (see the module docs).
pub fn may_create_kind(role: Role, kind: &str) -> bool {
    match role {
        Role::Clinician => kind == "visit-note",
        Role::Office | Role::Admin => matches!(kind, "visit-note" | "schedule"),
    }
}

/// Whether `principal` may create a new document with these root fields: a kind its role may
/// create, and a patient that exists, is a patient of the agency the document names, and is
/// one the principal may access.
pub async fn may_create(
    storage: &dyn Storage,
    principal: &Principal,
    doc: &DocMeta,
) -> Result<bool> {
    if doc.agency_id != *principal.agency_id() || !may_create_kind(principal.role(), &doc.kind) {
        return Ok(false);
    }
    match storage.patient(doc.patient_id.clone()).await? {
        Some(patient) if patient.agency_id == doc.agency_id => {
            may_access(storage, principal, doc).await
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AgencyId, DeviceId, PatientId, User, UserId};

    fn principal(agency: &str, role: Role) -> Principal {
        Principal {
            user: User {
                id: UserId::new("usr_1"),
                agency_id: AgencyId::new(agency),
                name: "N".into(),
                role,
                created_at: 0,
            },
            device_id: DeviceId::new("dev_1"),
            expires_at: i64::MAX,
        }
    }

    fn doc(agency: &str) -> DocMeta {
        DocMeta {
            agency_id: AgencyId::new(agency),
            patient_id: PatientId::new("pat_1"),
            kind: "visit-note".into(),
        }
    }

    #[test]
    fn the_access_matrix() {
        // (role, same agency, on care team) → allowed
        let cases = [
            (Role::Clinician, true, true, true),
            (Role::Clinician, true, false, false),
            (Role::Office, true, false, true),
            (Role::Admin, true, false, true),
            (Role::Clinician, false, true, false),
            (Role::Office, false, false, false),
            (Role::Admin, false, true, false),
        ];
        for (role, same_agency, on_team, allowed) in cases {
            let p = principal("agc_a", role);
            let d = doc(if same_agency { "agc_a" } else { "agc_b" });
            assert_eq!(
                decide(&p, &d, on_team),
                allowed,
                "{role:?} same_agency={same_agency} on_team={on_team}"
            );
        }
    }

    #[test]
    fn kinds_each_role_may_create() {
        for (role, kind, allowed) in [
            (Role::Clinician, "visit-note", true),
            (Role::Clinician, "patient", false),
            (Role::Clinician, "schedule", false),
            (Role::Clinician, "", false),
            (Role::Office, "visit-note", true),
            (Role::Office, "schedule", true),
            (Role::Office, "patient", false),
            (Role::Admin, "patient", false),
            (Role::Admin, "something-else", false),
        ] {
            assert_eq!(may_create_kind(role, kind), allowed, "{role:?} {kind:?}");
        }
    }
}
