//! Signed notes on the relay: changes from a device that tamper with a note's signatures or
//! identity fields are refused before they are stored.
//!
//! The checks are core's (`fieldchart_core::model::signing`), the same the devices run; here
//! they decide what is stored. In three steps, because the keys live in async storage and the
//! automerge work belongs on the blocking pool:
//! 1. [`scan`] (blocking): the document's [`NoteLedger`] looks at the new changes. Deleting or
//!    altering a signature entry, replacing the list, writing `kind`/`patientId`/`agencyId`
//!    after they were set (a concurrent, losing value too), or editing the body of a note
//!    already signed (causally after the signature) is refused outright. New signature
//!    entries are handed back.
//! 2. [`lookup`] (async): the keys of the devices those entries name, from storage, and
//!    whether each signer is on the patient's care team.
//! 3. [`verify_new`] (blocking): each new entry must verify — key of that device and user, not
//!    revoked before the signing time, role and care team allow it, signed time not in the
//!    future, hash equal to the rendering at the signed heads. Valid ones join the ledger.
//!
//! A refusal discards the in-memory copy, answers the device `doc-unavailable` for that
//! document, and writes a `tamper` audit row; everyone else keeps the unchanged document.
//! Legitimate late edits (concurrent with the signing) are accepted: devices list them for
//! review.

use std::collections::{HashMap, HashSet};

use automerge::{Automerge, Change};
use fieldchart_core::model::signing::{
    self, DirectoryKey, InvalidSignature, KeyDirectory, NoteLedger, SignatureEntry, SigningPolicy,
    Tamper, Verdict, Verification,
};
use fieldchart_core::protocol::DocumentId;

use crate::error::Result;
use crate::identity::DeviceId;
use crate::storage::{DocMeta, Storage};

/// Why changes were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The changes tamper with signatures or identity fields.
    Tampered(Tamper),
    /// The changes edit the body of a signed note.
    BodyEditAfterSignature,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Tampered(Tamper::SignatureDeleted) => f.write_str("deletes a signature"),
            Refusal::Tampered(Tamper::SignatureAltered) => f.write_str("alters a signature"),
            Refusal::Tampered(Tamper::SignaturesReplaced) => {
                f.write_str("replaces the signature list")
            }
            Refusal::Tampered(Tamper::IdentityChanged { field }) => {
                write!(f, "rewrites the identity field {field}")
            }
            Refusal::Tampered(Tamper::InvalidSignature { reason }) => {
                write!(f, "carries a signature that does not verify ({reason:?})")
            }
            Refusal::BodyEditAfterSignature => f.write_str("edits the body of a signed note"),
        }
    }
}

/// The ledger of a stored document: its stored signatures were verified when accepted.
pub fn trusted_ledger(doc: &Automerge) -> NoteLedger {
    NoteLedger::build_with(doc, Verification::Trust)
}

/// Step 1: look at the new changes of a stored document; refuse tampering, return new
/// signature entries.
pub fn scan(
    ledger: &mut NoteLedger,
    doc: &Automerge,
    changes: &[Change],
) -> std::result::Result<Vec<SignatureEntry>, Refusal> {
    scan_with(ledger, doc, changes, false)
}

/// Step 1 for a document the relay has never stored: its own history may set an identity
/// field more than once (a client filling in a new document), as long as one value remains —
/// a concurrent second value is still refused.
///
/// `changes` must be all of `doc`'s changes in the order `doc.get_changes(&[])` gives them,
/// and `ledger` empty. The ledger counts the entries it finds as valid while it scans
/// ([`Verification::Trust`]), so once [`verify_new`] has accepted every returned entry it
/// equals [`trusted_ledger`] of the stored document and can be kept with it. The refusals are
/// those of a stored note: a body edit causally after a signature inside the new note's own
/// history is refused as it would be one message later (a device's store never makes one:
/// it refuses to edit a signed note's body, so such history is forged or from a broken
/// client). Edits concurrent with the signature stay accepted, for review.
pub fn scan_new(
    ledger: &mut NoteLedger,
    doc: &Automerge,
    changes: &[Change],
) -> std::result::Result<Vec<SignatureEntry>, Refusal> {
    scan_with(ledger, doc, changes, true)
}

fn scan_with(
    ledger: &mut NoteLedger,
    doc: &Automerge,
    changes: &[Change],
    new_document: bool,
) -> std::result::Result<Vec<SignatureEntry>, Refusal> {
    use automerge::ReadDoc;
    let verification = if new_document {
        Verification::Trust
    } else {
        Verification::Defer
    };
    let observed = ledger.observe_with(doc, changes, verification);
    let refused = observed
        .tampers
        .into_iter()
        .find(|(_, t)| !(new_document && matches!(t, Tamper::IdentityChanged { .. })));
    if let Some((_, tamper)) = refused {
        return Err(Refusal::Tampered(tamper));
    }
    if new_document {
        for field in signing::IDENTITY_KEYS {
            if doc.get_all(automerge::ROOT, *field).map_or(0, |v| v.len()) > 1 {
                return Err(Refusal::Tampered(Tamper::IdentityChanged {
                    field: (*field).to_owned(),
                }));
            }
        }
    }
    if observed.body_after_signature {
        return Err(Refusal::BodyEditAfterSignature);
    }
    Ok(observed.new_signatures)
}

/// What [`verify_new`] needs from storage.
#[derive(Debug, Default)]
pub struct Signers {
    keys: KeyDirectory,
    on_care_team: HashSet<String>,
}

impl SigningPolicy for Signers {
    fn may_sign(&self, user_id: &str, _role: &str, _patient_id: &str) -> Option<bool> {
        Some(self.on_care_team.contains(user_id))
    }
}

/// Step 2: the keys (of the document's own agency only) and care-team membership of the
/// signers the new entries name.
pub async fn lookup(
    storage: &dyn Storage,
    meta: &DocMeta,
    entries: &[SignatureEntry],
) -> Result<Signers> {
    let mut signers = Signers::default();
    let mut seen: HashMap<String, ()> = HashMap::new();
    for entry in entries {
        let Some(payload) = &entry.payload else {
            continue;
        };
        if seen.insert(payload.device_id.clone(), ()).is_some() {
            continue;
        }
        let Some(key) = storage
            .device_key(DeviceId::new(payload.device_id.as_str()))
            .await?
        else {
            continue;
        };
        if key.agency_id != meta.agency_id {
            continue;
        }
        if storage
            .on_care_team(key.user_id.clone(), meta.patient_id.clone())
            .await?
        {
            signers.on_care_team.insert(key.user_id.as_str().to_owned());
        }
        signers.keys.keys.push(DirectoryKey {
            user_id: key.user_id.as_str().to_owned(),
            role: key.role.as_str().to_owned(),
            device_id: key.device_id.as_str().to_owned(),
            public_key: hex::encode(key.public_key),
            enrolled_at_ms: key.enrolled_at_ms,
            revoked_at_ms: key.revoked_at_ms,
        });
    }
    signers.keys.agency_id = meta.agency_id.as_str().to_owned();
    Ok(signers)
}

/// Step 3: every new signature must verify; the valid ones become part of the ledger.
pub fn verify_new(
    ledger: &mut NoteLedger,
    doc: &Automerge,
    id: DocumentId,
    entries: &[SignatureEntry],
    signers: &Signers,
    now_ms: i64,
) -> std::result::Result<(), Refusal> {
    for entry in entries {
        let refuse = |reason| Err(Refusal::Tampered(Tamper::InvalidSignature { reason }));
        if entry
            .payload
            .as_ref()
            .is_some_and(|p| signing::signed_in_future(p, now_ms))
        {
            return refuse(InvalidSignature::BadTime);
        }
        match signing::verify(doc, id, entry, &signers.keys, signers) {
            Verdict::Valid => ledger.admit_trusted(doc, entry),
            // The signed heads are ancestors of the change carrying the entry: they are here.
            Verdict::HeadsMissing => return refuse(InvalidSignature::Malformed),
            Verdict::Invalid(reason) => return refuse(reason),
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT, ReadDoc};
    use fieldchart_core::model::signing::ReviewReason;
    use fieldchart_core::model::{Actor, DeviceKey, Role};

    fn nurse() -> Actor {
        Actor {
            user_id: "usr_n".into(),
            device_id: "dev_n".into(),
        }
    }

    fn signers(key: &DeviceKey) -> Signers {
        Signers {
            keys: KeyDirectory {
                agency_id: "agc_1".into(),
                keys: vec![DirectoryKey {
                    user_id: "usr_n".into(),
                    role: "clinician".into(),
                    device_id: "dev_n".into(),
                    public_key: hex::encode(key.public_key()),
                    enrolled_at_ms: 0,
                    revoked_at_ms: None,
                }],
            },
            on_care_team: HashSet::from(["usr_n".to_owned()]),
        }
    }

    /// A new note as a device uploads it: charted, signed, edited on a second copy
    /// concurrently with the signature, and (if `edit_after`) its body edited after signing.
    fn signed_note(key: &DeviceKey, id: DocumentId, edit_after: bool) -> Automerge {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "kind", "visit-note").unwrap();
        doc.put(ROOT, "agencyId", "agc_1").unwrap();
        doc.put(ROOT, "patientId", "pat_1").unwrap();
        let text = doc.put_object(ROOT, "assessment", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, "Alert and oriented").unwrap();
        doc.commit();
        let before_signing = doc.get_heads();
        signing::sign(&mut doc, id, key, &nurse(), Role::Clinician, 2_000).unwrap();
        doc.commit();
        let mut other = doc.fork_at(&before_signing).unwrap();
        other.put(ROOT, "plan", "weekly visits").unwrap();
        other.commit();
        doc.merge(&mut other).unwrap();
        if edit_after {
            doc.splice_text(&text, 0, 0, "Late: ").unwrap();
            doc.commit();
        }
        Automerge::load(&doc.save()).unwrap()
    }

    /// A ledger as JSON with its hash sets sorted (their serialized order is arbitrary).
    fn comparable(ledger: &NoteLedger) -> serde_json::Value {
        let mut value = serde_json::to_value(ledger).unwrap();
        for set in ["seen", "after"] {
            if let Some(serde_json::Value::Array(items)) = value.get_mut(set) {
                items.sort_by_key(ToString::to_string);
            }
        }
        value
    }

    /// The ledger a new note's scan leaves behind, once its signatures verify, is exactly the
    /// one the relay would rebuild from the stored note: so it can be kept with the note.
    #[test]
    fn a_verified_new_note_leaves_the_ledger_its_stored_history_would_build() {
        let key = DeviceKey::generate();
        let id = DocumentId::random();
        let doc = signed_note(&key, id, false);
        let mut ledger = NoteLedger::default();
        let entries = scan_new(&mut ledger, &doc, &doc.get_changes(&[])).unwrap();
        assert_eq!(entries.len(), 1);
        verify_new(&mut ledger, &doc, id, &entries, &signers(&key), 10_000).unwrap();

        assert_eq!(comparable(&ledger), comparable(&trusted_ledger(&doc)));
        assert!(ledger.is_signed());
        let reasons: Vec<_> = ledger.review_items().iter().map(|i| &i.reason).collect();
        assert_eq!(reasons, [&ReviewReason::ConcurrentWithSignature]);
    }

    /// A new note whose own history edits the body after its signature is refused on its
    /// first upload, exactly as the same edit sent one message after the signature is: the
    /// signed version is a legal record from the moment it is signed, not from the moment the
    /// relay first stores it.
    #[test]
    fn a_new_note_edited_after_its_signature_is_refused_as_a_stored_one_is() {
        let key = DeviceKey::generate();
        let id = DocumentId::random();
        let doc = signed_note(&key, id, true);
        let mut ledger = NoteLedger::default();
        assert_eq!(
            scan_new(&mut ledger, &doc, &doc.get_changes(&[])),
            Err(Refusal::BodyEditAfterSignature)
        );

        // The same history in two messages: the signed note stored first, then the edit.
        let all = doc.get_changes(&[]);
        let (edit, signed) = all.split_last().unwrap();
        let mut stored = Automerge::new();
        stored.apply_changes(signed.iter().cloned()).unwrap();
        let mut ledger = NoteLedger::default();
        let entries = scan_new(&mut ledger, &stored, &stored.get_changes(&[])).unwrap();
        verify_new(&mut ledger, &stored, id, &entries, &signers(&key), 10_000).unwrap();
        stored.apply_changes([edit.clone()]).unwrap();
        assert_eq!(
            scan(&mut ledger, &stored, std::slice::from_ref(edit)),
            Err(Refusal::BodyEditAfterSignature)
        );
    }

    /// Scanning a new note with its entries trusted early changes no decision: a signature by
    /// an unknown key is still refused at verification, tampering still at the scan.
    #[test]
    fn a_new_note_with_a_forged_or_tampered_signature_is_still_refused() {
        let key = DeviceKey::generate();
        let id = DocumentId::random();
        let doc = signed_note(&key, id, false);
        let mut ledger = NoteLedger::default();
        let entries = scan_new(&mut ledger, &doc, &doc.get_changes(&[])).unwrap();
        let forger = signers(&DeviceKey::generate());
        assert!(matches!(
            verify_new(&mut ledger, &doc, id, &entries, &forger, 10_000),
            Err(Refusal::Tampered(Tamper::InvalidSignature { .. }))
        ));

        let mut copy = AutoCommit::load(&doc.save()).unwrap();
        let list = match copy.get(ROOT, signing::SIGNATURES_KEY).unwrap() {
            Some((_, list)) => list,
            None => panic!("the note has a signature list"),
        };
        copy.delete(&list, 0).unwrap();
        copy.commit();
        let tampered = Automerge::load(&copy.save()).unwrap();
        let mut ledger = NoteLedger::default();
        assert_eq!(
            scan_new(&mut ledger, &tampered, &tampered.get_changes(&[])),
            Err(Refusal::Tampered(Tamper::SignatureDeleted))
        );
    }
}
