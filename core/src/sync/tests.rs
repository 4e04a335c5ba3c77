//! The pass against an in-memory relay that follows the real one's rules (reply only after
//! storing, `doc-unavailable` for unknown or denied documents, a change feed by sequence),
//! driven by plain function calls: deterministic, no sockets, no sleeps.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};

use automerge::{Automerge, ChangeHash, ReadDoc};

use super::*;
use crate::model::{Actor, NoteText, Role, VisitStart, new_patient_chart};
use crate::protocol::{
    DocSync, DocumentId, Message, PeerId, PeerMetadata, StorageId, encode_heads,
};
use crate::store::{Store, StoreConfig, StoreKey};

struct StoredDoc {
    doc: Automerge,
    seq: u64,
    /// Whether the device may see it (a denied document gets `doc-unavailable`).
    allowed: bool,
}

/// A relay in memory: documents with a change sequence, one connection at a time.
struct FakeRelay {
    storage_id: String,
    peer_id: PeerId,
    docs: BTreeMap<DocumentId, StoredDoc>,
    seq: u64,
    /// Per-connection sync states; dropped on disconnect (as the real relay keeps only
    /// what `DocSync::encode` persists, keyed by the device's storage id).
    states: HashMap<DocumentId, DocSync>,
    persisted: HashMap<DocumentId, Vec<u8>>,
    /// New documents from the device are refused when false.
    accept_new: bool,
}

impl FakeRelay {
    fn new(storage_id: &str) -> FakeRelay {
        FakeRelay {
            storage_id: storage_id.into(),
            peer_id: PeerId::new(format!("relay-{storage_id}")),
            docs: BTreeMap::new(),
            seq: 0,
            states: HashMap::new(),
            persisted: HashMap::new(),
            accept_new: true,
        }
    }

    fn put(&mut self, id: DocumentId, doc: Automerge) {
        self.seq += 1;
        self.docs.insert(
            id,
            StoredDoc {
                doc,
                seq: self.seq,
                allowed: true,
            },
        );
    }

    fn edit(&mut self, id: DocumentId, key: &str, value: &str) {
        use automerge::transaction::Transactable;
        let stored = self.docs.get_mut(&id).unwrap();
        stored
            .doc
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(automerge::ROOT, key, value).map(|_| ())
            })
            .unwrap();
        self.seq += 1;
        stored.seq = self.seq;
    }

    fn heads(&self, id: DocumentId) -> Option<Vec<ChangeHash>> {
        self.docs.get(&id).map(|d| d.doc.get_heads())
    }

    fn feed(&self, since: Option<&str>, limit: usize) -> Vec<u8> {
        let after: u64 = since.map_or(0, |s| s.parse().unwrap());
        let mut entries: Vec<_> = self
            .docs
            .iter()
            .filter(|(_, d)| d.allowed && d.seq > after)
            .map(|(id, d)| (d.seq, *id, d.doc.get_heads()))
            .collect();
        entries.sort();
        let more = entries.len() > limit;
        entries.truncate(limit);
        let next = entries.last().map_or(after, |e| e.0);
        serde_json::json!({
            "changes": entries.iter().map(|(_, id, heads)| serde_json::json!({
                "documentId": id.to_string(), "kind": "visit-note", "patientId": "p",
                "heads": encode_heads(heads),
            })).collect::<Vec<_>>(),
            "next": next.to_string(),
            "more": more,
        })
        .to_string()
        .into_bytes()
    }

    /// The answer to a batch fetch: stored bytes of what the device may see, `unavailable`
    /// for the rest.
    fn fetch(&self, ids: &[DocumentId]) -> Vec<u8> {
        let mut answer = fetch::FetchResponseWriter::new();
        for id in ids {
            match self.docs.get(id) {
                Some(stored) if stored.allowed => answer.ok(*id, &[&stored.doc.save()]),
                _ => answer.unavailable(*id),
            }
        }
        answer.finish()
    }

    fn disconnect(&mut self) {
        for (id, state) in self.states.drain() {
            self.persisted.insert(id, state.encode());
        }
    }

    fn state(&mut self, id: DocumentId) -> DocSync {
        self.states.remove(&id).unwrap_or_else(|| {
            self.persisted
                .get(&id)
                .map_or_else(DocSync::new, |b| DocSync::decode(b).unwrap())
        })
    }

    fn reply(&self, device: &PeerId, id: DocumentId, data: Vec<u8>) -> Vec<u8> {
        Message::Sync {
            sender_id: self.peer_id.clone(),
            target_id: device.clone(),
            document_id: id,
            data,
        }
        .encode()
    }

    fn unavailable(&self, device: &PeerId, id: DocumentId) -> Vec<u8> {
        Message::DocUnavailable {
            sender_id: self.peer_id.clone(),
            target_id: device.clone(),
            document_id: id,
        }
        .encode()
    }

    fn handle(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        match Message::decode(frame).unwrap() {
            Message::Join { sender_id, .. } => vec![
                Message::Peer {
                    sender_id: self.peer_id.clone(),
                    target_id: sender_id,
                    peer_metadata: PeerMetadata {
                        storage_id: Some(StorageId::new(self.storage_id.clone())),
                        is_ephemeral: false,
                    },
                    selected_protocol_version: "1".into(),
                }
                .encode(),
            ],
            Message::Request {
                sender_id,
                document_id,
                data,
                ..
            }
            | Message::Sync {
                sender_id,
                document_id,
                data,
                ..
            } => {
                let is_request = matches!(Message::decode(frame), Ok(Message::Request { .. }));
                let mut sync = self.state(document_id);
                match self.docs.get_mut(&document_id) {
                    Some(stored) if !stored.allowed => {
                        vec![self.unavailable(&sender_id, document_id)]
                    }
                    Some(stored) => {
                        let outcome = sync.receive(&mut stored.doc, &data).unwrap();
                        if outcome.changed() {
                            self.seq += 1;
                            stored.seq = self.seq;
                        }
                        let reply = sync.generate(&stored.doc);
                        self.states.insert(document_id, sync);
                        reply
                            .map(|d| vec![self.reply(&sender_id, document_id, d)])
                            .unwrap_or_default()
                    }
                    None if is_request || !self.accept_new => {
                        vec![self.unavailable(&sender_id, document_id)]
                    }
                    None => {
                        let mut doc = Automerge::new();
                        sync.receive(&mut doc, &data).unwrap();
                        let reply = sync.generate(&doc);
                        if !doc.get_heads().is_empty() {
                            // Stored before the reply goes out, as the real relay does.
                            self.put(document_id, doc);
                            self.states.insert(document_id, sync);
                        }
                        reply
                            .map(|d| vec![self.reply(&sender_id, document_id, d)])
                            .unwrap_or_default()
                    }
                }
            }
            _ => Vec::new(),
        }
    }
}

const RELAY_URL: &str = "https://relay.test";

struct Device {
    _dir: tempfile::TempDir,
    store: Store,
}

fn device(role: Role) -> Device {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig {
        path: dir.path().join("device.db"),
        key: StoreKey::random(),
        actor: Actor {
            user_id: "nurse-ana".into(),
            device_id: "phone".into(),
        },
        role,
        keystroke_journal: false,
    })
    .unwrap();
    Device { _dir: dir, store }
}

fn new_note(store: &Store, narrative: &str) -> DocumentId {
    let note = store
        .start_visit(&VisitStart {
            agency_id: "agency-1".into(),
            patient_id: "patient-7".into(),
            service_type: "skilled-nursing".into(),
            date: "2026-11-27".into(),
            location: "12 Elm St".into(),
            started_at_ms: 1_764_230_400_000,
            start_monotonic_ms: 1_000,
        })
        .unwrap();
    store
        .update_text(note, NoteText::Assessment, narrative)
        .unwrap();
    note
}

fn chart(name: &str) -> (DocumentId, Automerge) {
    let author = Actor {
        user_id: "office".into(),
        device_id: "desk".into(),
    };
    let (id, mut doc) = new_patient_chart("agency-1", "patient-7", name, &author, 1).unwrap();
    (id, Automerge::load(&doc.save()).unwrap())
}

/// Everything a run observed.
#[derive(Debug, Default)]
struct Run {
    status: Option<PassStatus>,
    fetches: usize,
    batch_fetches: usize,
    connects: usize,
    sent: usize,
    received: usize,
    changed: Vec<DocumentId>,
    up_to_date: usize,
}

/// Drive a pass against the relay until it finishes. `drop_after`: cut the connection after
/// that many frames (both ways); `budget_after`: report the budget expired after that many.
fn run_with(
    store: &Store,
    relay: &mut FakeRelay,
    config: PassConfig,
    drop_after: Option<usize>,
    budget_after: Option<usize>,
    local_edit: &mut dyn FnMut() -> Option<DocumentId>,
) -> Run {
    let mut run = Run::default();
    let (mut pass, first) = SyncPass::start(store, config);
    let mut actions: VecDeque<PassAction> = first.into();
    let mut events: VecDeque<PassEvent> = VecDeque::new();
    let mut connected = false;
    let mut fetch_cut = FETCH_CUT.with(|c| c.take());
    for _ in 0..1_000_000 {
        while let Some(action) = actions.pop_front() {
            match action {
                PassAction::FetchFeed { since, limit } => {
                    run.fetches += 1;
                    events.push_back(PassEvent::FeedResponse {
                        status: 200,
                        body: relay.feed(since.as_deref(), limit),
                    });
                }
                PassAction::FetchDocuments { ids, body } => {
                    run.batch_fetches += 1;
                    let asked = crate::sync::fetch::decode_fetch_request(&body).unwrap();
                    assert_eq!(asked, ids);
                    let answer = relay.fetch(&ids);
                    events.push_back(match fetch_cut.take() {
                        Some(keep) => PassEvent::DocumentsUnreachable {
                            ids,
                            partial: answer[..keep.min(answer.len())].to_vec(),
                            error: "cut by the test".into(),
                        },
                        None => PassEvent::DocumentsResponse {
                            ids,
                            status: 200,
                            body: answer,
                        },
                    });
                }
                PassAction::Connect => {
                    run.connects += 1;
                    connected = true;
                    events.push_back(PassEvent::Connected);
                }
                PassAction::Send(frame) => {
                    assert!(connected, "sent on a closed connection");
                    run.sent += 1;
                    for reply in relay.handle(&frame) {
                        events.push_back(PassEvent::Frame(reply));
                    }
                }
                PassAction::Close => {
                    connected = false;
                    relay.disconnect();
                }
                PassAction::DocumentChanged(id) => run.changed.push(id),
                PassAction::UpToDate => run.up_to_date += 1,
                PassAction::Finished(status) => {
                    if connected {
                        relay.disconnect();
                    }
                    run.status = Some(status);
                    return run;
                }
            }
        }
        let frames = run.sent + run.received;
        let event = if drop_after.is_some_and(|n| frames >= n) && connected {
            connected = false;
            relay.disconnect();
            events.clear();
            PassEvent::ConnectionLost {
                close: None,
                error: Some("cut by the test".into()),
            }
        } else if budget_after.is_some_and(|n| frames >= n) {
            PassEvent::BudgetExpired
        } else if let Some(event) = events.pop_front() {
            if matches!(event, PassEvent::Frame(_)) {
                run.received += 1;
            }
            event
        } else if let Some(id) = config_is_live(&pass).then(&mut *local_edit).flatten() {
            PassEvent::LocalChange(id)
        } else if config_is_live(&pass) {
            PassEvent::Stop
        } else {
            panic!("the pass waits for nothing: {pass:?}");
        };
        actions.extend(pass.handle(store, event));
    }
    panic!("the pass did not finish");
}

thread_local! {
    /// The next run's first batch fetch breaks off after this many bytes of its answer.
    static FETCH_CUT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

fn config_is_live(pass: &SyncPass) -> bool {
    pass.config().live
}

fn run(store: &Store, relay: &mut FakeRelay) -> Run {
    run_with(
        store,
        relay,
        PassConfig::new(RELAY_URL),
        None,
        None,
        &mut || None,
    )
}

fn heads(store: &Store, id: DocumentId) -> Vec<ChangeHash> {
    let mut h = store.heads(id).unwrap();
    h.sort();
    h
}

/// Every receipt names heads the relay really holds.
fn assert_receipts_are_true(store: &Store, relay: &FakeRelay) {
    for id in store.document_ids().unwrap() {
        if let Some(receipt) = store.receipt(id).unwrap() {
            let stored = &relay
                .docs
                .get(&id)
                .expect("receipt for a document the relay lacks")
                .doc;
            for head in &receipt.heads {
                assert!(
                    stored.get_change_by_hash(head).is_some(),
                    "receipt of {id} names a change the relay does not hold"
                );
            }
        }
    }
}

#[test]
fn a_pass_pushes_local_notes_fetches_new_charts_and_records_receipts() {
    let d = device(Role::Clinician);
    let notes: Vec<_> = (0..5)
        .map(|i| new_note(&d.store, &format!("visit {i}")))
        .collect();
    let mut relay = FakeRelay::new("relay-storage-1");
    let (chart_id, chart_doc) = chart("Ruth");
    relay.put(chart_id, chart_doc);

    let first = run(&d.store, &mut relay);
    assert_eq!(first.status, Some(PassStatus::Complete));
    assert_eq!(first.changed, vec![chart_id], "the new chart is announced");
    assert_eq!(d.store.patients().unwrap()[0].document_id, chart_id);
    for note in &notes {
        assert_eq!(relay.heads(*note).unwrap(), heads(&d.store, *note));
        let receipt = d.store.receipt(*note).unwrap().expect("a receipt");
        assert!(receipt.covers_current);
        assert_eq!(receipt.heads, heads(&d.store, *note));
    }
    assert!(d.store.unsynced_documents().unwrap().is_empty());
    assert!(d.store.unconfirmed_documents().unwrap().is_empty());
    assert_receipts_are_true(&d.store, &relay);

    // Nothing changed anywhere: one empty feed page, no connection.
    let again = run(&d.store, &mut relay);
    assert_eq!(again.status, Some(PassStatus::Complete));
    assert_eq!((again.fetches, again.connects, again.sent), (1, 0, 0));

    // A local edit makes the note unconfirmed until the next pass.
    d.store
        .update_text(notes[0], NoteText::Plan, "weekly visits")
        .unwrap();
    let receipt = d.store.receipt(notes[0]).unwrap().unwrap();
    assert!(!receipt.covers_current);
    assert_eq!(d.store.unconfirmed_documents().unwrap().len(), 1);
    let third = run(&d.store, &mut relay);
    assert_eq!(third.status, Some(PassStatus::Complete));
    assert_eq!(third.connects, 1);
    assert!(d.store.receipt(notes[0]).unwrap().unwrap().covers_current);
    let fourth = run(&d.store, &mut relay);
    assert_eq!(
        (fourth.fetches, fourth.connects),
        (1, 0),
        "the echo was absorbed"
    );
}

#[test]
fn a_relay_side_change_syncs_only_that_document_and_a_feed_match_needs_no_message() {
    let d = device(Role::Clinician);
    let notes: Vec<_> = (0..20)
        .map(|i| new_note(&d.store, &format!("n{i}")))
        .collect();
    let mut relay = FakeRelay::new("s");
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));

    relay.edit(notes[3], "nextVisit", "Tuesday");
    relay.edit(notes[11], "nextVisit", "Friday");
    let pass = run(&d.store, &mut relay);
    assert_eq!(pass.status, Some(PassStatus::Complete));
    let mut changed = pass.changed.clone();
    changed.sort();
    let mut expected = vec![notes[3], notes[11]];
    expected.sort();
    assert_eq!(changed, expected);
    for n in &notes {
        assert_eq!(relay.heads(*n).unwrap(), heads(&d.store, *n));
    }

    // The relay got a change that equals what the device already has (e.g. the device's
    // last message was committed but the reply was lost): confirmed from the feed alone.
    d.store.update_text(notes[5], NoteText::Plan, "x").unwrap();
    let saved = d.store.export_changes(notes[5]).unwrap();
    let stored = relay.docs.get_mut(&notes[5]).unwrap();
    stored.doc.load_incremental(&saved).unwrap();
    relay.seq += 1;
    stored.seq = relay.seq;
    assert_eq!(d.store.unsynced_documents().unwrap(), vec![notes[5]]);
    let pass = run(&d.store, &mut relay);
    assert_eq!(pass.status, Some(PassStatus::Complete));
    assert_eq!(pass.connects, 0, "confirmed from the feed, no WebSocket");
    assert!(d.store.unsynced_documents().unwrap().is_empty());
    assert!(d.store.receipt(notes[5]).unwrap().unwrap().covers_current);
}

#[test]
fn a_pass_cut_after_any_frame_resumes_without_loss_and_receipts_stay_true() {
    let d = device(Role::Clinician);
    let mut relay = FakeRelay::new("s");
    let (chart_id, chart_doc) = chart("Ruth");
    relay.put(chart_id, chart_doc);
    let mut notes = Vec::new();
    for cut in 1..40 {
        // Work on both sides between cuts.
        notes.push(new_note(&d.store, &format!("note {cut}")));
        if cut % 3 == 0 {
            relay.edit(chart_id, "phone", &format!("555-01{cut:02}"));
        }
        if cut % 4 == 0 {
            let n = notes[cut % notes.len()];
            d.store
                .update_text(n, NoteText::Plan, &format!("plan {cut}"))
                .unwrap();
        }
        let r = run_with(
            &d.store,
            &mut relay,
            PassConfig::new(RELAY_URL),
            Some(cut),
            None,
            &mut || None,
        );
        assert!(
            matches!(
                r.status,
                Some(PassStatus::Interrupted(_) | PassStatus::Complete)
            ),
            "{:?}",
            r.status
        );
        assert_receipts_are_true(&d.store, &relay);
    }
    for _ in 0..3 {
        assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    }
    for id in notes.iter().chain([&chart_id]) {
        assert_eq!(relay.heads(*id).unwrap(), heads(&d.store, *id), "{id}");
        assert!(d.store.receipt(*id).unwrap().unwrap().covers_current);
    }
    assert!(d.store.unsynced_documents().unwrap().is_empty());
    let listed = d.store.notes_for_patient("patient-7").unwrap();
    assert_eq!(listed.len(), notes.len(), "no duplicate list entries");
    assert_receipts_are_true(&d.store, &relay);
}

#[test]
fn the_budget_stops_a_pass_at_a_message_boundary_and_the_next_pass_finishes() {
    let d = device(Role::Clinician);
    let notes: Vec<_> = (0..80)
        .map(|i| new_note(&d.store, &format!("n{i}")))
        .collect();
    let mut relay = FakeRelay::new("s");
    let mut config = PassConfig::new(RELAY_URL);
    config.max_docs_in_flight = 4;
    let cut = run_with(&d.store, &mut relay, config, None, Some(30), &mut || None);
    assert_eq!(cut.status, Some(PassStatus::BudgetExhausted));
    let left = d.store.unsynced_documents().unwrap().len();
    assert!(left > 0 && left < notes.len(), "{left}");
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    assert!(d.store.unsynced_documents().unwrap().is_empty());
}

#[test]
fn a_note_never_offered_goes_whole_in_one_message_and_later_edits_announce_first() {
    let d = device(Role::Clinician);
    let notes: Vec<_> = (0..4)
        .map(|i| new_note(&d.store, &format!("visit {i}")))
        .collect();
    let mut relay = FakeRelay::new("s");
    // Planned as never offered: no receipt, sync state or failure, and no feed entry.
    let plan = d.store.plan_sync("s", &[], true).unwrap();
    assert_eq!(plan.docs.len(), notes.len());
    assert!(plan.docs.iter().all(|p| p.relay_lacks && p.local_changes));

    let first = run(&d.store, &mut relay);
    assert_eq!(first.status, Some(PassStatus::Complete));
    // One message up and one answer per note (plus the join and the relay's peer message):
    // the usual exchange would take two each way.
    assert_eq!((first.sent, first.received), (1 + 4, 1 + 4));
    for note in &notes {
        assert_eq!(relay.heads(*note).unwrap(), heads(&d.store, *note));
        assert!(d.store.receipt(*note).unwrap().unwrap().covers_current);
    }
    assert_receipts_are_true(&d.store, &relay);

    // Edited after the relay confirmed it: it holds a receipt, so no presumption.
    d.store
        .update_text(notes[0], NoteText::Plan, "weekly visits")
        .unwrap();
    let plan = d.store.plan_sync("s", &[], false).unwrap();
    assert_eq!(plan.docs.len(), 1);
    assert!(!plan.docs[0].relay_lacks);
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    assert_eq!(relay.heads(notes[0]).unwrap(), heads(&d.store, notes[0]));

    // A note the relay refused once is not presumed while its failure stands.
    relay.accept_new = false;
    let refused = new_note(&d.store, "refused once");
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    assert_eq!(d.store.sync_failures().unwrap().len(), 1);
    relay.accept_new = true;
    d.store.retry_failed_document(refused).unwrap();
    let plan = d.store.plan_sync("s", &[], false).unwrap();
    let planned: Vec<_> = plan
        .docs
        .iter()
        .filter(|p| p.document_id == refused)
        .collect();
    assert_eq!(planned.len(), 1);
    assert!(
        !planned[0].relay_lacks,
        "a refused note announces its heads first"
    );
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    assert!(d.store.receipt(refused).unwrap().unwrap().covers_current);
}

#[test]
fn a_refused_document_is_listed_kept_and_retried_only_after_backoff() {
    let d = device(Role::Clinician);
    let mut relay = FakeRelay::new("s");
    relay.accept_new = false;
    let note = new_note(&d.store, "only here");
    let r = run(&d.store, &mut relay);
    assert_eq!(r.status, Some(PassStatus::Complete));
    let failures = d.store.sync_failures().unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].document_id, note);
    assert_eq!(failures[0].failure, FailureKind::Refused);
    assert!(failures[0].retry_at_ms > failures[0].at_ms);
    assert_eq!(d.store.unsynced_documents().unwrap(), vec![note]);
    assert!(d.store.visit_note(note).is_ok(), "never deleted");

    // Not retried while backing off: the next pass does not even connect.
    let r = run(&d.store, &mut relay);
    assert_eq!(r.connects, 0);
    assert_eq!(d.store.sync_failures().unwrap()[0].attempts, 1);

    // The user retries after the office fixed access.
    relay.accept_new = true;
    d.store.retry_failed_document(note).unwrap();
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    assert!(d.store.sync_failures().unwrap().is_empty());
    assert!(d.store.receipt(note).unwrap().unwrap().covers_current);
}

#[test]
fn a_token_rejected_mid_pass_lists_unconfirmed_documents_until_a_pass_authenticates() {
    let d = device(Role::Clinician);
    let mut relay = FakeRelay::new("s");
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    let note = new_note(&d.store, "late entry");
    let (mut pass, actions) = SyncPass::start(&d.store, PassConfig::new(RELAY_URL));
    assert!(matches!(actions[..], [PassAction::FetchFeed { .. }]));
    let body = relay.feed(None, 100);
    let actions = pass.handle(&d.store, PassEvent::FeedResponse { status: 200, body });
    assert_eq!(actions, vec![PassAction::Connect]);
    pass.handle(&d.store, PassEvent::Connected);
    let actions = pass.handle(
        &d.store,
        PassEvent::ConnectionLost {
            close: Some((1008, "revoked".into())),
            error: None,
        },
    );
    assert_eq!(actions, vec![PassAction::Finished(PassStatus::Revoked)]);
    let failures = d.store.sync_failures().unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].failure, FailureKind::Unauthorized);
    assert_eq!(d.store.unsynced_documents().unwrap(), vec![note]);

    // A new token: the failure clears and the note goes through.
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    assert!(d.store.sync_failures().unwrap().is_empty());
    assert!(d.store.unsynced_documents().unwrap().is_empty());
}

#[test]
fn a_relay_on_new_storage_gets_everything_again() {
    let d = device(Role::Clinician);
    let notes: Vec<_> = (0..3)
        .map(|i| new_note(&d.store, &format!("n{i}")))
        .collect();
    let mut old = FakeRelay::new("old-storage");
    assert_eq!(run(&d.store, &mut old).status, Some(PassStatus::Complete));

    // Restored from nothing, same address; the device learns it when it next connects.
    let mut fresh = FakeRelay::new("new-storage");
    let extra = new_note(&d.store, "n3");
    assert!(d.store.receipt(notes[0]).unwrap().is_some());
    let r = run(&d.store, &mut fresh);
    assert_eq!(r.status, Some(PassStatus::Complete));
    for id in notes.iter().chain([&extra]) {
        assert_eq!(fresh.heads(*id).unwrap(), heads(&d.store, *id));
        assert!(d.store.receipt(*id).unwrap().unwrap().covers_current);
    }
}

#[test]
fn live_mode_syncs_local_changes_as_they_happen() {
    let d = device(Role::Clinician);
    let mut relay = FakeRelay::new("s");
    let note = new_note(&d.store, "first");
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    let mut config = PassConfig::new(RELAY_URL);
    config.live = true;
    // Once connected and idle, the nurse types twice; each edit is reported and synced.
    let mut edits = 0;
    let mut edit = || {
        edits += 1;
        (edits <= 2).then(|| {
            d.store
                .update_text(note, NoteText::Assessment, &format!("first, then {edits}"))
                .unwrap();
            note
        })
    };
    let r = run_with(&d.store, &mut relay, config, None, None, &mut edit);
    assert_eq!(r.status, Some(PassStatus::Stopped));
    assert_eq!(r.connects, 1, "one connection for the whole session");
    assert_eq!(r.fetches, 1, "local edits need no feed read");
    assert_eq!(r.up_to_date, 3, "after the pass and after each edit");
    assert_eq!(relay.heads(note).unwrap(), heads(&d.store, note));
    assert!(d.store.unsynced_documents().unwrap().is_empty());
}

#[test]
fn garbage_from_the_relay_ends_the_pass_without_touching_the_store() {
    let d = device(Role::Clinician);
    let note = new_note(&d.store, "n");
    let before = d.store.export_changes(note).unwrap();
    let mut relay = FakeRelay::new("s");
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    d.store.update_text(note, NoteText::Plan, "p").unwrap();
    let (mut pass, _) = SyncPass::start(&d.store, PassConfig::new(RELAY_URL));
    for body in [&b"{"[..], b"{\"changes\":[],\"next\":\"\",\"more\":false}"] {
        let (mut p, _) = SyncPass::start(&d.store, PassConfig::new(RELAY_URL));
        let actions = p.handle(
            &d.store,
            PassEvent::FeedResponse {
                status: 200,
                body: body.to_vec(),
            },
        );
        assert!(matches!(
            actions.last(),
            Some(PassAction::Finished(PassStatus::RelayError(_)))
        ));
    }
    pass.handle(
        &d.store,
        PassEvent::FeedResponse {
            status: 200,
            body: relay.feed(Some(&relay.seq.to_string()), 10),
        },
    );
    pass.handle(&d.store, PassEvent::Connected);
    let peer = relay.handle(
        &Message::Join {
            sender_id: PeerId::new("x".into()),
            peer_metadata: PeerMetadata::default(),
            supported_protocol_versions: vec!["1".into()],
        }
        .encode(),
    );
    pass.handle(&d.store, PassEvent::Frame(peer[0].clone()));
    let bad = Message::Sync {
        sender_id: relay.peer_id.clone(),
        target_id: PeerId::new("x".into()),
        document_id: note,
        data: vec![0x42, 1, 2, 3],
    }
    .encode();
    let actions = pass.handle(&d.store, PassEvent::Frame(bad));
    // Listed, and the pass goes on (here: to its end, as that was its only document).
    assert_eq!(
        actions.last(),
        Some(&PassAction::Finished(PassStatus::Complete))
    );
    let failures = d.store.sync_failures().unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].failure, FailureKind::Invalid);
    assert!(d.store.export_changes(note).unwrap().len() >= before.len());
    assert_eq!(d.store.unsynced_documents().unwrap(), vec![note]);

    // An undecodable frame ends the pass as a relay error.
    d.store.retry_failed_document(note).unwrap();
    let (mut pass, _) = SyncPass::start(&d.store, PassConfig::new(RELAY_URL));
    pass.handle(
        &d.store,
        PassEvent::FeedResponse {
            status: 200,
            body: relay.feed(Some(&relay.seq.to_string()), 10),
        },
    );
    pass.handle(&d.store, PassEvent::Connected);
    pass.handle(&d.store, PassEvent::Frame(peer[0].clone()));
    let actions = pass.handle(&d.store, PassEvent::Frame(vec![0xff, 0x00]));
    assert!(matches!(
        actions.last(),
        Some(PassAction::Finished(PassStatus::RelayError(_)))
    ));
    assert_eq!(d.store.unsynced_documents().unwrap(), vec![note]);
}

#[test]
fn more_feed_confirmations_than_the_cache_holds_settle_in_one_plan() {
    let d = device(Role::Clinician);
    let count = crate::store::MAX_CACHED_DOCS * 2;
    let notes: Vec<_> = (0..count)
        .map(|i| new_note(&d.store, &format!("n{i}")))
        .collect();
    let mut relay = FakeRelay::new("s");
    assert_eq!(run(&d.store, &mut relay).status, Some(PassStatus::Complete));
    // Every note changed here and reached the relay, but every reply was lost.
    for note in &notes {
        d.store.update_text(*note, NoteText::Plan, "p").unwrap();
        let saved = d.store.export_changes(*note).unwrap();
        let stored = relay.docs.get_mut(note).unwrap();
        stored.doc.load_incremental(&saved).unwrap();
        relay.seq += 1;
        stored.seq = relay.seq;
    }
    assert_eq!(d.store.unsynced_documents().unwrap().len(), count);
    let pass = run(&d.store, &mut relay);
    assert_eq!(pass.status, Some(PassStatus::Complete));
    assert_eq!(pass.connects, 0);
    assert!(d.store.unsynced_documents().unwrap().is_empty());
    for note in &notes {
        assert!(d.store.receipt(*note).unwrap().unwrap().covers_current);
    }
}

/// A caseload the device has never seen, on the relay.
fn caseload(relay: &mut FakeRelay, n: usize) -> Vec<DocumentId> {
    let author = Actor {
        user_id: "office".into(),
        device_id: "desk".into(),
    };
    (0..n)
        .map(|i| {
            let patient = format!("patient-{i}");
            let (id, mut doc) =
                new_patient_chart("agency-1", &patient, &format!("Patient {i}"), &author, 1)
                    .unwrap();
            relay.put(id, Automerge::load(&doc.save()).unwrap());
            id
        })
        .collect()
}

#[test]
fn a_first_sync_fetches_the_caseload_in_batches_without_a_message_per_document() {
    let d = device(Role::Clinician);
    let mut relay = FakeRelay::new("relay-storage-1");
    let ids = caseload(&mut relay, 30);
    let config = PassConfig {
        fetch_batch_docs: 8,
        ..PassConfig::new(RELAY_URL)
    };
    let first = run_with(
        &d.store,
        &mut relay,
        config.clone(),
        None,
        None,
        &mut || None,
    );
    assert_eq!(first.status, Some(PassStatus::Complete));
    // Four batches; the WebSocket carried only the handshake that names the relay's storage.
    assert_eq!(first.batch_fetches, 4);
    assert_eq!((first.connects, first.sent, first.received), (1, 1, 1));
    assert_eq!(first.changed.len(), 30);
    for id in &ids {
        assert_eq!(heads(&d.store, *id), {
            let mut h = relay.heads(*id).unwrap();
            h.sort();
            h
        });
        assert!(d.store.receipt(*id).unwrap().unwrap().covers_current);
    }
    assert_eq!(
        d.store.patients().unwrap().len(),
        30,
        "indexed as they were stored"
    );
    assert_receipts_are_true(&d.store, &relay);

    // The next pass asks nothing: one feed page, no fetch, no connection.
    let again = run_with(
        &d.store,
        &mut relay,
        config.clone(),
        None,
        None,
        &mut || None,
    );
    assert_eq!(
        (
            again.fetches,
            again.batch_fetches,
            again.connects,
            again.sent
        ),
        (1, 0, 0, 0)
    );

    // A change on the relay still arrives (over the WebSocket: the device holds the document).
    relay.edit(ids[3], "note", "moved to Tuesday");
    let after = run_with(
        &d.store,
        &mut relay,
        config.clone(),
        None,
        None,
        &mut || None,
    );
    assert_eq!(after.status, Some(PassStatus::Complete));
    assert_eq!(after.batch_fetches, 0);
    assert_eq!(after.changed, vec![ids[3]]);
    assert_eq!(heads(&d.store, ids[3]), {
        let mut h = relay.heads(ids[3]).unwrap();
        h.sort();
        h
    });

    // A local edit uploads.
    let note = new_note(&d.store, "first visit");
    let up = run_with(&d.store, &mut relay, config, None, None, &mut || None);
    assert_eq!(up.status, Some(PassStatus::Complete));
    assert_eq!(relay.heads(note).unwrap(), heads(&d.store, note));
    assert!(d.store.unsynced_documents().unwrap().is_empty());
}

#[test]
fn refused_and_invalid_documents_in_a_batch_take_the_websocket_path_or_settle_as_refused() {
    let d = device(Role::Clinician);
    let mut relay = FakeRelay::new("relay-storage-1");
    let ids = caseload(&mut relay, 5);
    // Listed by the feed, then access withdrawn before the fetch: `unavailable`.
    let config = PassConfig::new(RELAY_URL);
    let (mut pass, mut actions) = SyncPass::start(&d.store, config);
    // Handshake.
    assert_eq!(actions, vec![PassAction::Connect]);
    actions = pass.handle(&d.store, PassEvent::Connected);
    let PassAction::Send(join) = &actions[0] else {
        panic!("{actions:?}")
    };
    let peer = relay.handle(join).remove(0);
    actions = pass.handle(&d.store, PassEvent::Frame(peer));
    let PassAction::FetchFeed { since, limit } = &actions[0] else {
        panic!("{actions:?}")
    };
    let feed = relay.feed(since.as_deref(), *limit);
    actions = pass.handle(
        &d.store,
        PassEvent::FeedResponse {
            status: 200,
            body: feed,
        },
    );
    let PassAction::FetchDocuments { ids: asked, .. } = &actions[0] else {
        panic!("{actions:?}")
    };
    assert_eq!(asked.len(), 5);
    relay.docs.get_mut(&ids[0]).unwrap().allowed = false;
    // Document 1 arrives as garbage: not stored, synced over the WebSocket instead.
    let mut answer = fetch::FetchResponseWriter::new();
    for id in asked {
        match relay.docs.get(id) {
            Some(s) if *id == ids[1] => answer.ok(*id, &[&s.doc.save()[..20]]),
            Some(s) if s.allowed => answer.ok(*id, &[&s.doc.save()]),
            _ => answer.unavailable(*id),
        }
    }
    actions = pass.handle(
        &d.store,
        PassEvent::DocumentsResponse {
            ids: asked.clone(),
            status: 200,
            body: answer.finish(),
        },
    );
    // The three good ones are stored; document 1 goes out as a `request`.
    for id in &ids[2..] {
        assert!(d.store.receipt(*id).unwrap().is_some());
    }
    assert!(d.store.heads(ids[0]).is_err(), "refused: nothing stored");
    let requests: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            PassAction::Send(f) => Some(Message::decode(f).unwrap()),
            _ => None,
        })
        .collect();
    assert!(
        matches!(&requests[..], [Message::Request { document_id, .. }] if *document_id == ids[1]),
        "{requests:?}"
    );
    let mut queue: VecDeque<Vec<u8>> = actions
        .into_iter()
        .filter_map(|a| match a {
            PassAction::Send(f) => Some(f),
            _ => None,
        })
        .collect();
    let mut finished = None;
    for _ in 0..100 {
        let Some(frame) = queue.pop_front() else {
            break;
        };
        for reply in relay.handle(&frame) {
            for action in pass.handle(&d.store, PassEvent::Frame(reply)) {
                match action {
                    PassAction::Send(f) => queue.push_back(f),
                    PassAction::Finished(status) => finished = Some(status),
                    _ => {}
                }
            }
        }
    }
    assert_eq!(finished, Some(PassStatus::Complete));
    assert_eq!(heads(&d.store, ids[1]), {
        let mut h = relay.heads(ids[1]).unwrap();
        h.sort();
        h
    });
    assert!(
        d.store.sync_failures().unwrap().is_empty(),
        "nothing of ours was refused"
    );
}

#[test]
fn a_batch_cut_short_keeps_what_arrived_and_the_next_pass_completes() {
    let d = device(Role::Clinician);
    let mut relay = FakeRelay::new("relay-storage-1");
    let ids = caseload(&mut relay, 6);
    let config = PassConfig::new(RELAY_URL);
    // Enough of the answer for the first document (and part of the second).
    let first_len = relay.docs[&ids[0]].doc.save().len();
    FETCH_CUT.with(|c| c.set(Some(4 + 21 + 4 + first_len + 30)));
    let cut = run_with(
        &d.store,
        &mut relay,
        config.clone(),
        None,
        None,
        &mut || None,
    );
    assert!(
        matches!(&cut.status, Some(PassStatus::Interrupted(e)) if e.contains("broke off")),
        "{:?}",
        cut.status
    );
    let held = d.store.document_ids().unwrap();
    assert!(!held.is_empty() && held.len() < 6, "{held:?}");
    let next = run_with(&d.store, &mut relay, config, None, None, &mut || None);
    assert_eq!(next.status, Some(PassStatus::Complete));
    assert_eq!(d.store.document_ids().unwrap().len(), 6);
    assert_receipts_are_true(&d.store, &relay);
    let last = run(&d.store, &mut relay);
    assert_eq!((last.batch_fetches, last.connects, last.sent), (0, 0, 0));
}

#[test]
fn a_relay_without_batch_fetches_is_synced_one_document_at_a_time() {
    let d = device(Role::Clinician);
    let mut relay = FakeRelay::new("relay-storage-1");
    let ids = caseload(&mut relay, 4);
    let (mut pass, mut actions) = SyncPass::start(&d.store, PassConfig::new(RELAY_URL));
    let mut queue: VecDeque<PassAction> = actions.drain(..).collect();
    let mut finished = None;
    for _ in 0..10_000 {
        let Some(action) = queue.pop_front() else {
            break;
        };
        let events: Vec<PassEvent> = match action {
            PassAction::Connect => vec![PassEvent::Connected],
            PassAction::Send(f) => relay.handle(&f).into_iter().map(PassEvent::Frame).collect(),
            PassAction::FetchFeed { since, limit } => vec![PassEvent::FeedResponse {
                status: 200,
                body: relay.feed(since.as_deref(), limit),
            }],
            // An older relay: no such route.
            PassAction::FetchDocuments { ids, .. } => vec![PassEvent::DocumentsResponse {
                ids,
                status: 404,
                body: Vec::new(),
            }],
            PassAction::Finished(status) => {
                finished = Some(status);
                break;
            }
            _ => Vec::new(),
        };
        for event in events {
            queue.extend(pass.handle(&d.store, event));
        }
    }
    assert_eq!(finished, Some(PassStatus::Complete));
    assert_eq!(d.store.document_ids().unwrap().len(), ids.len());
    assert_eq!(pass.stats().docs_batch_fetched, 0);
    assert_eq!(pass.stats().docs_fetched, 4);
}
