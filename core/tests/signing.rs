//! The tamper catalogue through `Store::import`: a legitimately signed note reaches a second
//! device, then a malicious replica's changes arrive. Whatever they do, the second device keeps
//! the note signed, renders the signed version, verifies it Valid, and lists what happened.

#![allow(clippy::unwrap_used)]

mod common;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ROOT, ReadDoc};
use common::{Replica, directory_key, publish, publish_all, replica, sync, visit};
use fieldchart_core::model::signing::{self, InvalidSignature, ReviewReason, Tamper};
use fieldchart_core::model::{
    Actor, DeviceKey, DirectoryKey, NoteStatus, NoteText, Role, SignatureCheck,
};
use fieldchart_core::protocol::DocumentId;

const SIGNED_TEXT: &str = "Wound clean, dry, intact.";

struct Scene {
    ana: Replica,
    ben: Replica,
    note: DocumentId,
    rendering: String,
}

/// Ana signs a note; Ben has it.
fn signed_note() -> Scene {
    let ana = replica("ana", Role::Clinician);
    let ben = replica("ben", Role::Clinician);
    publish_all(&[&ana, &ben]);
    let note = ana.store.start_visit(&visit("p1")).unwrap();
    ana.store
        .update_text(note, NoteText::Assessment, SIGNED_TEXT)
        .unwrap();
    ana.store.sign(note).unwrap();
    sync(&ana, &ben);
    let SignatureCheck::Valid { rendering, .. } = ben.store.verify_signature(note).unwrap() else {
        panic!("the legitimate signature verifies on the second device")
    };
    Scene {
        ana,
        ben,
        note,
        rendering,
    }
}

/// A malicious replica: the note's bytes in a bare automerge document with its own actor.
fn attacker(scene: &Scene, user: &str) -> AutoCommit {
    let mut doc = AutoCommit::load(&scene.ana.store.export_changes(scene.note).unwrap()).unwrap();
    doc.set_actor(automerge::ActorId::random());
    doc.set_author(Some(
        Actor {
            user_id: user.into(),
            device_id: format!("{user}-laptop"),
        }
        .author(),
    ));
    doc
}

fn deliver(scene: &Scene, doc: &mut AutoCommit) {
    scene.ben.store.import(scene.note, &doc.save()).unwrap();
}

/// What every case must leave on the second device: signed, the signed version rendered and
/// verifying, and the tampering listed with its author.
fn assert_signed_and_listed(scene: &Scene, expect: &Tamper, author: &str) {
    let ben = &scene.ben.store;
    let SignatureCheck::Valid { rendering, .. } = ben.verify_signature(scene.note).unwrap() else {
        panic!("verification stays Valid")
    };
    assert_eq!(
        rendering, scene.rendering,
        "the signed rendering is unchanged"
    );
    let view = ben.visit_note(scene.note).unwrap();
    assert_eq!(view.status, NoteStatus::Signed);
    assert_eq!(view.assessment, SIGNED_TEXT);
    assert!(ben.update_text(scene.note, NoteText::Plan, "x").is_err());
    let review = ben.post_signature_changes(scene.note).unwrap();
    assert!(
        review
            .iter()
            .any(|i| i.reason == ReviewReason::Tampered(expect.clone())
                && i.author.as_ref().is_some_and(|a| a.user_id == author)),
        "expected {expect:?} by {author} in {review:#?}"
    );
    // The index lists it too (what a review queue reads without loading the note).
    ben.clear_cache().unwrap();
    let listed = ben.post_signature_changes(scene.note).unwrap();
    assert_eq!(listed, review);
    assert_eq!(
        ben.notes_with_status(NoteStatus::Signed).unwrap().len(),
        1,
        "still listed as signed"
    );
}

fn signatures(doc: &AutoCommit) -> automerge::ObjId {
    match doc.get(ROOT, "signatures").unwrap() {
        Some((automerge::Value::Object(ObjType::List), id)) => id,
        other => panic!("no signatures list: {other:?}"),
    }
}

#[test]
fn deleting_the_signature_does_not_unsign_the_note() {
    let scene = signed_note();
    let mut doc = attacker(&scene, "mallory");
    let list = signatures(&doc);
    doc.delete(&list, 0).unwrap();
    doc.put(ROOT, "status", "draft").unwrap();
    doc.commit();
    deliver(&scene, &mut doc);
    assert_signed_and_listed(&scene, &Tamper::SignatureDeleted, "mallory");
}

#[test]
fn rewriting_the_signer_or_time_is_listed_and_changes_nothing() {
    let scene = signed_note();
    let mut doc = attacker(&scene, "mallory");
    let list = signatures(&doc);
    let (_, entry) = doc.get(&list, 0).unwrap().unwrap();
    let payload = doc.get(&entry, "payload").unwrap().unwrap().0.to_string();
    let forged = payload
        .replace("\"userId\":\"ana\"", "\"userId\":\"mallory\"")
        .replace("\"signedAtMs\":", "\"signedAtMs\":1");
    assert_ne!(forged, payload);
    doc.put(&entry, "payload", forged.trim_matches('"'))
        .unwrap();
    doc.commit();
    deliver(&scene, &mut doc);
    assert_signed_and_listed(&scene, &Tamper::SignatureAltered, "mallory");
    // The signer shown is still the one who signed.
    let view = scene.ben.store.visit_note(scene.note).unwrap();
    assert_eq!(view.signature.unwrap().signed_by, "ana");
}

#[test]
fn re_signing_an_edited_body_with_an_unenrolled_key_is_refused_as_a_signature() {
    let scene = signed_note();
    let mut doc = attacker(&scene, "ana");
    let text = match doc.get(ROOT, "assessment").unwrap() {
        Some((_, id)) => id,
        None => panic!(),
    };
    doc.splice_text(&text, 0, 25, "Wound infected.").unwrap();
    doc.commit();
    let rogue = DeviceKey::generate();
    let ana = Actor {
        user_id: "ana".into(),
        device_id: "ana-phone".into(),
    };
    signing::sign(
        &mut doc,
        scene.note,
        &rogue,
        &ana,
        Role::Clinician,
        1_764_230_500_000,
    )
    .unwrap();
    doc.commit();
    deliver(&scene, &mut doc);
    assert_signed_and_listed(
        &scene,
        &Tamper::InvalidSignature {
            reason: InvalidSignature::BadSignature,
        },
        "ana",
    );
    let review = scene.ben.store.post_signature_changes(scene.note).unwrap();
    assert!(
        review
            .iter()
            .any(|i| i.reason == ReviewReason::BodyEditAfterSignature
                && i.fields == vec!["assessment".to_string()]),
        "{review:#?}"
    );
}

#[test]
fn a_signature_by_a_revoked_device_dated_after_revocation_does_not_verify() {
    // Ana's phone is revoked; a note signed with its key afterwards (a stolen phone) arrives.
    let ana = replica("ana", Role::Clinician);
    let ben = replica("ben", Role::Clinician);
    let revoked = DirectoryKey {
        revoked_at_ms: Some(1_000),
        ..directory_key(&ana)
    };
    publish(&[&ana, &ben], vec![revoked, directory_key(&ben)]);
    let note = ana.store.start_visit(&visit("p1")).unwrap();
    ana.store.sign(note).unwrap();
    push(&ana, &ben);
    let review = ben.store.post_signature_changes(note).unwrap();
    assert!(
        review.iter().any(|i| i.reason
            == ReviewReason::Tampered(Tamper::InvalidSignature {
                reason: InvalidSignature::KeyRevoked
            })),
        "{review:#?}"
    );
    assert_eq!(
        ben.store.verify_signature(note).unwrap(),
        SignatureCheck::NotSigned
    );
    assert_eq!(
        ben.store.visit_note(note).unwrap().status,
        NoteStatus::Draft,
        "a signature that does not verify does not make a note signed"
    );
}

#[test]
fn a_signature_by_an_office_user_is_not_allowed() {
    let ana = replica("ana", Role::Clinician);
    let office = replica("olga", Role::Office);
    let ben = replica("ben", Role::Clinician);
    // Olga's enrolled office laptop: its key is genuine, her role is office.
    let laptop = DeviceKey::generate();
    let olga_key = DirectoryKey {
        user_id: "olga".into(),
        role: "office".into(),
        device_id: "olga-laptop".into(),
        public_key: hex::encode(laptop.public_key()),
        enrolled_at_ms: 0,
        revoked_at_ms: None,
    };
    publish(&[&ana, &office, &ben], vec![directory_key(&ana), olga_key]);
    let note = ana.store.start_visit(&visit("p1")).unwrap();
    push(&ana, &office);
    // The office store refuses to sign; a modified office client signs anyway, claiming a
    // clinician role in the payload, then honestly.
    assert!(office.store.sign(note).is_err());
    for claimed in [Role::Clinician, Role::Office] {
        let mut doc = AutoCommit::load(&office.store.export_changes(note).unwrap()).unwrap();
        let olga = Actor {
            user_id: "olga".into(),
            device_id: "olga-laptop".into(),
        };
        signing::sign(&mut doc, note, &laptop, &olga, claimed, 5_000).unwrap();
        doc.commit();
        ben.store.import(note, &doc.save()).unwrap();
    }
    assert_eq!(
        ben.store.verify_signature(note).unwrap(),
        SignatureCheck::NotSigned
    );
    let review = ben.store.post_signature_changes(note).unwrap();
    let not_allowed = review
        .iter()
        .filter(|i| {
            i.reason
                == ReviewReason::Tampered(Tamper::InvalidSignature {
                    reason: InvalidSignature::NotAllowed,
                })
        })
        .count();
    assert_eq!(not_allowed, 2, "{review:#?}");
}

#[test]
fn moving_the_patient_by_a_concurrent_value_is_listed() {
    let scene = signed_note();
    for field in ["patientId", "agencyId"] {
        let mut doc = attacker(&scene, "mallory");
        doc.put(ROOT, field, "somebody-else").unwrap();
        doc.commit();
        deliver(&scene, &mut doc);
        assert_signed_and_listed(
            &scene,
            &Tamper::IdentityChanged {
                field: field.into(),
            },
            "mallory",
        );
    }
}

#[test]
fn a_legitimate_concurrent_edit_is_accepted_and_listed_for_review_once() {
    let scene = signed_note();
    // Ben had the draft before signing and typed offline (a burst of keystrokes).
    let carl = replica("carl", Role::Clinician);
    publish_all(&[&scene.ana, &scene.ben, &carl]);
    let mut doc = attacker(&scene, "carl");
    let sign_change = doc
        .get_changes(&[])
        .iter()
        .find(|c| c.message() == Some("sign"))
        .map(|c| c.deps().to_vec())
        .unwrap();
    let mut offline = doc.fork_at(&sign_change).unwrap();
    offline.set_actor(automerge::ActorId::random());
    offline.set_author(Some(
        Actor {
            user_id: "carl".into(),
            device_id: "carl-phone".into(),
        }
        .author(),
    ));
    let text = match offline.get(ROOT, "plan").unwrap() {
        Some((_, id)) => id,
        None => panic!(),
    };
    for (i, c) in "Recheck in 2 days".chars().enumerate() {
        offline.splice_text(&text, i, 0, &c.to_string()).unwrap();
        offline.commit();
    }
    doc.merge(&mut offline).unwrap();
    deliver(&scene, &mut doc);
    let ben = &scene.ben.store;
    let SignatureCheck::Valid { rendering, .. } = ben.verify_signature(scene.note).unwrap() else {
        panic!()
    };
    assert_eq!(rendering, scene.rendering);
    let review = ben.post_signature_changes(scene.note).unwrap();
    assert_eq!(review.len(), 1, "one burst, one item: {review:#?}");
    assert_eq!(review[0].reason, ReviewReason::ConcurrentWithSignature);
    assert_eq!(review[0].changes, 17);
    assert_eq!(review[0].fields, vec!["plan".to_string()]);
    assert_eq!(review[0].author.as_ref().unwrap().user_id, "carl");
    assert!(
        !review
            .iter()
            .any(|i| matches!(i.reason, ReviewReason::Tampered(_)))
    );
}

#[test]
fn an_unknown_key_keeps_the_note_locked_until_the_keys_are_fetched() {
    let ana = replica("ana", Role::Clinician);
    let ben = replica("ben", Role::Clinician);
    let note = ana.store.start_visit(&visit("p1")).unwrap();
    ana.store.sign(note).unwrap();
    push(&ana, &ben);
    // Ben has no key list yet: the note is locked and shown as unverified, never as a draft.
    assert!(matches!(
        ben.store.verify_signature(note).unwrap(),
        SignatureCheck::Unverified { .. }
    ));
    assert!(ben.store.update_text(note, NoteText::Plan, "x").is_err());
    publish_all(&[&ana, &ben]);
    assert!(matches!(
        ben.store.verify_signature(note).unwrap(),
        SignatureCheck::Valid { .. }
    ));
    assert!(ben.store.post_signature_changes(note).unwrap().is_empty());
}

#[test]
fn export_signed_verifies_and_carries_the_signature_and_addenda() {
    let scene = signed_note();
    scene
        .ana
        .store
        .add_addendum(scene.note, "Late entry: daughter present")
        .unwrap();
    let exported: serde_json::Value =
        serde_json::from_str(&scene.ana.store.export_signed(scene.note).unwrap()).unwrap();
    assert_eq!(exported["verified"], true);
    assert_eq!(exported["signedBy"], "ana");
    assert_eq!(exported["deviceId"], "ana-phone");
    assert_eq!(exported["signature"].as_str().unwrap().len(), 128);
    assert_eq!(exported["body"]["assessment"], SIGNED_TEXT);
    assert_eq!(
        exported["addenda"][0]["text"],
        "Late entry: daughter present"
    );
    // A draft cannot be exported as signed.
    let draft = scene.ana.store.start_visit(&visit("p1")).unwrap();
    assert!(scene.ana.store.export_signed(draft).is_err());
}

use common::push;
