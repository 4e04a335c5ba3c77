//! Property tests: random concurrent operations on three replicas, merged in random orders,
//! converge to identical documents and identical index tables, and every concurrent value of a
//! field is in the conflict list.

#![allow(clippy::unwrap_used)]

use fieldchart_core::Error;
use fieldchart_core::model::{
    Actor, Demographic, Medication, NoteText, Role, VisitStart, VitalReading, VitalType,
    find_conflicts,
};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Phone(u8),
    Dose(u8),
    Goal(u8),
    Type { at: u8, text: String },
    Vital(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<u8>().prop_map(Op::Phone),
        any::<u8>().prop_map(Op::Dose),
        any::<u8>().prop_map(Op::Goal),
        (any::<u8>(), "[a-z 😀é]{1,6}").prop_map(|(at, text)| Op::Type { at, text }),
        any::<u8>().prop_map(Op::Vital),
    ]
}

struct World {
    stores: Vec<Store>,
    chart: DocumentId,
    note: DocumentId,
    med: String,
    _dirs: Vec<tempfile::TempDir>,
}

fn world() -> World {
    let mut dirs = Vec::new();
    let stores: Vec<Store> = [
        ("office", Role::Office),
        ("ana", Role::Clinician),
        ("ben", Role::Clinician),
    ]
    .into_iter()
    .map(|(user, role)| {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(StoreConfig {
            path: dir.path().join("d.db"),
            key: StoreKey::random(),
            actor: Actor {
                user_id: user.into(),
                device_id: "dev".into(),
            },
            role,
            keystroke_journal: true,
        })
        .unwrap();
        dirs.push(dir);
        s
    })
    .collect();
    let chart = stores[0]
        .create_patient("ag", "p1", "Mary Seacole")
        .unwrap();
    let med = stores[0]
        .upsert_medication(
            chart,
            None,
            &Medication {
                name: "Lisinopril".into(),
                dose: "10 mg".into(),
                status: "active".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let note = stores[1]
        .start_visit(&VisitStart {
            agency_id: "ag".into(),
            patient_id: "p1".into(),
            service_type: "sn".into(),
            date: "2026-11-27".into(),
            location: "home".into(),
            started_at_ms: 0,
            start_monotonic_ms: 0,
        })
        .unwrap();
    let w = World {
        stores,
        chart,
        note,
        med,
        _dirs: dirs,
    };
    for a in 0..3 {
        for b in 0..3 {
            merge(&w, a, b);
        }
    }
    w
}

fn merge(w: &World, from: usize, to: usize) {
    if from == to {
        return;
    }
    let known = w.stores[from].document_ids().unwrap();
    for id in [w.chart, w.note]
        .into_iter()
        .filter(|id| known.contains(id))
    {
        let bytes = w.stores[from].export_changes(id).unwrap();
        w.stores[to].import(id, &bytes).unwrap();
    }
}

fn apply(w: &World, r: usize, op: &Op) {
    let s = &w.stores[r];
    match op {
        Op::Phone(v) => {
            match s.set_demographic(w.chart, Demographic::Phone, &format!("555-{v:04}")) {
                Ok(()) | Err(Error::FieldInConflict { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        Op::Dose(v) => {
            let read = s
                .patient_chart(w.chart)
                .unwrap()
                .medications
                .into_iter()
                .find(|m| m.id == w.med)
                .unwrap();
            let mut m = read.clone();
            m.dose = format!("{v} mg");
            match s.upsert_medication(w.chart, Some(&read), &m) {
                Ok(_) => {}
                // The dose is in conflict: changing it means resolving first (never written
                // over, which would close the conflict without a record).
                Err(Error::FieldInConflict { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        Op::Goal(v) => {
            s.add_care_plan_item(w.chart, &[], &format!("problem {v}"), "active")
                .unwrap();
        }
        Op::Type { at, text } => {
            let current = s.visit_note(w.note).unwrap().assessment;
            // Pick a character boundary and convert to UTF-16 units.
            let chars: Vec<char> = current.chars().collect();
            let cp = usize::from(*at) % (chars.len() + 1);
            let pos: usize = chars[..cp].iter().map(|c| c.len_utf16()).sum();
            s.splice_text(w.note, NoteText::Assessment, pos, 0, text)
                .unwrap();
        }
        Op::Vital(v) => {
            s.record_vital(
                w.note,
                &VitalReading {
                    id: String::new(),
                    vital: VitalType::Pulse,
                    value: v.to_string(),
                    unit: "bpm".into(),
                    taken_at_ms: i64::from(*v),
                    recorded_by: String::new(),
                    supersedes: None,
                },
            )
            .unwrap();
        }
    }
}

/// The conflict index of every replica equals a full recomputation from the documents (the
/// index is refreshed incrementally, only where new changes wrote).
fn assert_index_is_complete(w: &World) {
    for (r, s) in w.stores.iter().enumerate() {
        let known = s.document_ids().unwrap();
        for id in [w.chart, w.note]
            .into_iter()
            .filter(|id| known.contains(id))
        {
            let indexed = s.conflicts(id).unwrap();
            let full = s.with_document(id, |doc| find_conflicts(doc)).unwrap();
            assert_eq!(
                indexed, full,
                "replica {r}: conflict index differs from a full walk"
            );
        }
    }
}

fn dose(w: &World, r: usize) -> String {
    w.stores[r]
        .patient_chart(w.chart)
        .unwrap()
        .medications
        .into_iter()
        .find(|m| m.id == w.med)
        .unwrap()
        .dose
}

fn merge_all(w: &World) {
    for a in 0..3 {
        for b in 0..3 {
            merge(w, a, b);
        }
    }
}

fn state(w: &World, r: usize) -> (String, Vec<String>) {
    let s = &w.stores[r];
    let chart = serde_json::to_string(&s.patient_chart(w.chart).unwrap()).unwrap();
    let note = serde_json::to_string(&s.visit_note(w.note).unwrap()).unwrap();
    let mut heads: Vec<String> = s
        .heads(w.chart)
        .unwrap()
        .iter()
        .chain(s.heads(w.note).unwrap().iter())
        .map(|h| h.to_string())
        .collect();
    heads.sort();
    (
        format!("{chart}\n{note}\n{heads:?}"),
        s.index_snapshot().unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_and_keep_every_concurrent_value(
        rounds in prop::collection::vec(
            (prop::collection::vec((0usize..3, op()), 1..6), prop::collection::vec((0usize..3, 0usize..3), 0..4)),
            1..4,
        ),
        final_doses in prop::collection::vec(prop::option::of(any::<u8>()), 3),
        merge_order in Just(vec![(0usize, 1usize), (1, 2), (2, 0), (0, 1)]).prop_shuffle(),
    ) {
        let w = world();
        for (ops, merges) in &rounds {
            for (r, op) in ops {
                apply(&w, *r, op);
            }
            for (a, b) in merges {
                merge(&w, *a, *b);
            }
            assert_index_is_complete(&w);
        }
        // Bring everyone up to date and close any dose conflict, then a final round of
        // concurrent writes to the dose.
        merge_all(&w);
        let path = format!("medications/{}/dose", w.med);
        if let Some(open) = w.stores[0].conflicts(w.chart).unwrap().into_iter().find(|c| c.path == path) {
            let choice = open.values[0].id.clone();
            w.stores[0].resolve_conflict(w.chart, &open, &choice).unwrap();
            merge_all(&w);
        }
        let before = dose(&w, 0);
        // Writers whose value equals the current one write nothing (no API writes an unchanged
        // value); the others write concurrently, and equal values among them are one value.
        let mut written: Vec<String> = Vec::new();
        for (r, d) in final_doses.iter().enumerate() {
            if let Some(d) = d {
                apply(&w, r, &Op::Dose(*d));
                let value = format!("{d} mg");
                if value != before {
                    written.push(value);
                }
            }
        }
        for (a, b) in &merge_order {
            merge(&w, *a, *b);
        }
        merge_all(&w);
        assert_index_is_complete(&w);

        let first = state(&w, 0);
        for r in 1..3 {
            prop_assert_eq!(&state(&w, r), &first, "replica {} differs", r);
        }
        let mut distinct = written.clone();
        distinct.sort();
        distinct.dedup();
        for (r, s) in w.stores.iter().enumerate() {
            let conflicts: Vec<_> = s
                .conflicts(w.chart)
                .unwrap()
                .into_iter()
                .filter(|c| c.path == path)
                .collect();
            if distinct.len() >= 2 {
                // Exactly the distinct written values, each listed once (a Vec, so a duplicate
                // would show).
                prop_assert_eq!(conflicts.len(), 1, "replica {}", r);
                let mut listed: Vec<String> = conflicts[0]
                    .values
                    .iter()
                    .map(|v| v.value.as_str().unwrap().to_owned())
                    .collect();
                listed.sort();
                prop_assert_eq!(&listed, &distinct, "replica {}", r);
            } else {
                // One distinct value (however many wrote it), or none: no conflict.
                prop_assert!(conflicts.is_empty(), "replica {}: {:?}", r, conflicts);
                let expected = distinct.first().cloned().unwrap_or_else(|| before.clone());
                prop_assert_eq!(dose(&w, r), expected, "replica {}", r);
            }
        }
    }
}
