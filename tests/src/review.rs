//! The `review` benchmark: what one more write costs as a signed note collects post-signature
//! changes. A note is signed on one device; another device, offline since before the signing,
//! types into the plan and assessment in bursts (10 keystrokes per field, alternating, so
//! there are many review items, not one). A third device that holds the signed note imports
//! those changes one at a time, each a durable store write; the benchmark reports the time per
//! write around 1, 1,000 and 10,000 post-signature changes; as the baseline, bare automerge
//! applying the same change to a bare copy, and the review ledger alone (`NoteLedger::observe`
//! on that copy), all in the same run.

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT, ReadDoc};
use fieldchart_core::model::signing::{NoteLedger, RoleOnly};
use fieldchart_core::model::{Actor, DirectoryKey, KeyDirectory, NoteText, Role, VisitStart};
use fieldchart_core::store::{Store, StoreConfig, StoreKey};

/// Keystrokes per field before the typist switches field.
const BURST: usize = 10;

fn open(dir: &std::path::Path, user: &str) -> Result<Store, String> {
    Store::open(StoreConfig {
        path: dir.join(format!("{user}.db")),
        key: StoreKey::random(),
        actor: Actor {
            user_id: user.into(),
            device_id: format!("{user}-phone"),
        },
        role: Role::Clinician,
        keystroke_journal: true,
    })
    .map_err(|e| e.to_string())
}

fn median_us(mut xs: Vec<Duration>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort();
    xs[xs.len() / 2].as_secs_f64() * 1e6
}

/// Run the workload: `total` post-signature changes, medians over `window` writes at each
/// checkpoint.
pub fn measure(total: usize, window: usize) -> Result<serde_json::Value, String> {
    let e = |e: fieldchart_core::Error| e.to_string();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ana = open(dir.path(), "ana")?;
    let ben = open(dir.path(), "ben")?;
    let keys = KeyDirectory {
        agency_id: "agency".into(),
        keys: vec![DirectoryKey {
            user_id: "ana".into(),
            role: "clinician".into(),
            device_id: "ana-phone".into(),
            public_key: hex::encode(ana.device_public_key().map_err(e)?),
            enrolled_at_ms: 0,
            revoked_at_ms: None,
        }],
    };
    let json = serde_json::to_string(&keys).map_err(|e| e.to_string())?;
    ana.set_key_directory(&json).map_err(e)?;
    ben.set_key_directory(&json).map_err(e)?;
    let note = ana
        .start_visit(&VisitStart {
            agency_id: "agency".into(),
            patient_id: "patient".into(),
            service_type: "skilled-nursing".into(),
            date: "2026-11-27".into(),
            location: "home".into(),
            started_at_ms: 0,
            start_monotonic_ms: 0,
        })
        .map_err(e)?;
    ana.update_text(note, NoteText::Assessment, "Alert and oriented.")
        .map_err(e)?;
    let draft = ana.export_changes(note).map_err(e)?;
    ana.sign(note).map_err(e)?;
    ben.import(note, &ana.export_changes(note).map_err(e)?)
        .map_err(e)?;

    // Carl typed offline on the draft, never having seen the signature.
    let mut carl = AutoCommit::load(&draft).map_err(|e| e.to_string())?;
    carl.set_actor(automerge::ActorId::random());
    carl.set_author(Some(
        Actor {
            user_id: "carl".into(),
            device_id: "carl-phone".into(),
        }
        .author(),
    ));
    let text = |doc: &AutoCommit, key: &str| match doc.get(ROOT, key) {
        Ok(Some((_, id))) => Ok(id),
        _ => Err(format!("no {key} text")),
    };
    let plan = text(&carl, "plan")?;
    let assessment = text(&carl, "assessment")?;
    let mut changes = Vec::with_capacity(total);
    for i in 0..total {
        let obj = if (i / BURST).is_multiple_of(2) {
            &plan
        } else {
            &assessment
        };
        let at = carl.length(obj);
        carl.splice_text(obj, at, 0, "x")
            .map_err(|e| e.to_string())?;
        let hash = carl
            .commit_with(
                automerge::transaction::CommitOptions::default().with_time(1_000 + i as i64),
            )
            .ok_or("no change")?;
        let change = carl.get_change_by_hash(&hash).ok_or("change missing")?;
        changes.push(change.raw_bytes().to_vec());
    }

    // Bare automerge applying each change to a copy of Ben's document (the baseline), and the
    // ledger alone on that copy, one change at a time.
    let mut bare = automerge::Automerge::load(&ben.export_changes(note).map_err(e)?)
        .map_err(|e| e.to_string())?;
    let mut ledger = NoteLedger::build(&bare, &keys, &RoleOnly);
    let mut ledger_times = Vec::with_capacity(total);
    let mut apply_times = Vec::with_capacity(total);
    for bytes in &changes {
        let change = automerge::Change::from_bytes(bytes.clone()).map_err(|e| e.to_string())?;
        let t = Instant::now();
        bare.apply_changes([change.clone()])
            .map_err(|e| e.to_string())?;
        apply_times.push(t.elapsed());
        let t = Instant::now();
        ledger.observe(&bare, &[change], &keys, &RoleOnly);
        ledger_times.push(t.elapsed());
    }
    let items = ledger.review_items().len();

    // Through the store: each import is one durable transaction.
    let mut store_times = Vec::with_capacity(total);
    for bytes in &changes {
        let t = Instant::now();
        ben.import(note, bytes).map_err(e)?;
        store_times.push(t.elapsed());
    }
    let review = ben.post_signature_changes(note).map_err(e)?;
    let rendered = ben.visit_note(note).map_err(e)?;
    let ok = review.len() == items
        && review.iter().map(|i| i.changes as usize).sum::<usize>() == total
        && rendered.plan.is_empty()
        && rendered.assessment == "Alert and oriented.";

    let checkpoints: Vec<usize> = [window, 1_000, 10_000, total]
        .into_iter()
        .filter(|c| *c <= total && *c >= window)
        .collect();
    let at = |times: &[Duration], c: usize| median_us(times[c - window..c].to_vec());
    // What the store adds to automerge's own cost of applying the same change.
    let overhead: Vec<Duration> = store_times
        .iter()
        .zip(&apply_times)
        .map(|(s, a)| s.saturating_sub(*a))
        .collect();
    let rows: Vec<serde_json::Value> = checkpoints
        .iter()
        .map(|c| {
            serde_json::json!({
                "post_signature_changes": c,
                "store_write_p50_us": at(&store_times, *c),
                "bare_automerge_apply_p50_us": at(&apply_times, *c),
                "store_minus_bare_p50_us": at(&overhead, *c),
                "ledger_observe_p50_us": at(&ledger_times, *c),
            })
        })
        .collect();
    let first = at(&store_times, window);
    let last = at(&store_times, total);
    Ok(serde_json::json!({
        "workload": "review",
        "ok": ok,
        "post_signature_changes": total,
        "review_items": items,
        "window": window,
        "checkpoints": rows,
        "store_write_growth": last / first,
        "store_minus_bare_growth": at(&overhead, total) / at(&overhead, window),
        "ledger_growth": at(&ledger_times, total) / at(&ledger_times, window),
        "write": "Store::import of one post-signature keystroke change (durable, synchronous=FULL), including review-item and conflict indexing",
    }))
}
