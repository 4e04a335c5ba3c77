//! Property tests: random concurrent operations on three replicas, merged in random orders,
//! converge to identical documents and identical index tables, and every concurrent value of a
//! field is in the conflict list.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use fieldchart_core::model::{
    Actor, Demographic, Medication, NoteText, Role, VisitStart, VitalReading, VitalType,
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
        Op::Phone(v) => s
            .set_demographic(w.chart, Demographic::Phone, &format!("555-{v:04}"))
            .unwrap(),
        Op::Dose(v) => {
            let mut m = s
                .patient_chart(w.chart)
                .unwrap()
                .medications
                .into_iter()
                .find(|m| m.id == w.med)
                .unwrap();
            m.dose = format!("{v} mg");
            s.upsert_medication(w.chart, &m).unwrap();
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
        }
        // Bring everyone up to date, then a final round of concurrent writes to one medication
        // field: every value written there must show up in the conflict list.
        for a in 0..3 { for b in 0..3 { merge(&w, a, b); } }
        // Writing the value a field already has is not a change (and creates no conflict).
        let before = w.stores[0].patient_chart(w.chart).unwrap().medications.into_iter().find(|m| m.id == w.med).unwrap().dose;
        let mut written = BTreeSet::new();
        let mut writers = 0;
        for (r, dose) in final_doses.iter().enumerate() {
            if let Some(d) = dose {
                apply(&w, r, &Op::Dose(*d));
                if format!("{d} mg") != before {
                    written.insert(format!("{d} mg"));
                    writers += 1;
                }
            }
        }
        for (a, b) in &merge_order {
            merge(&w, *a, *b);
        }
        for a in 0..3 { for b in 0..3 { merge(&w, a, b); } }

        let first = state(&w, 0);
        for r in 1..3 {
            prop_assert_eq!(&state(&w, r), &first, "replica {} differs", r);
        }
        let path = format!("medications/{}/dose", w.med);
        for s in &w.stores {
            let listed: BTreeSet<String> = s
                .conflicts(w.chart)
                .unwrap()
                .into_iter()
                .filter(|c| c.path == path)
                .flat_map(|c| c.values.into_iter().map(|v| v.value.as_str().unwrap().to_owned()))
                .collect();
            if writers >= 2 && written.len() >= 2 {
                prop_assert_eq!(&listed, &written);
            } else {
                prop_assert!(listed.len() <= 1 || written.len() < 2);
                if writers >= 1 {
                    let current = s.patient_chart(w.chart).unwrap().medications.into_iter().find(|m| m.id == w.med).unwrap().dose;
                    prop_assert!(written.contains(&current));
                }
            }
        }
    }
}
