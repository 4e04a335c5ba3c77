//! Sessions driven through channels: no sockets, no sleeps. Every wait is bounded by
//! [`WAIT`], which only a failing test reaches.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use fieldchart_core::protocol::{DocSync, DocumentId, Message, PeerId, PeerMetadata};
use futures::StreamExt;
use futures::channel::mpsc;

use super::{Frame, close_code};
use crate::auth::Principal;
use crate::config::Limits;
use crate::identity::{Agency, AgencyId, Device, DeviceId, PatientId, Role, User, UserId};
use crate::state::AppState;
use crate::storage::{
    AuditAction, AuditQuery, AuditRecord, DocMeta, DocumentData, DocumentWrite, Faults,
    FaultyStorage, MemoryStorage, Storage, WriteFault,
};

/// Longest any test waits for the relay; reached only when a test fails.
const WAIT: Duration = Duration::from_secs(10);

struct World {
    state: AppState,
    storage: Arc<MemoryStorage>,
    agency: AgencyId,
    patient: PatientId,
    other_patient: PatientId,
    /// On the care team of `patient` only.
    nurse: Principal,
    /// On no care team.
    other_nurse: Principal,
    office: Principal,
    /// Office user of another agency.
    stranger: Principal,
}

async fn principal(storage: &dyn Storage, agency: &AgencyId, role: Role) -> Principal {
    let user = User {
        id: UserId::random(),
        agency_id: agency.clone(),
        name: "N".into(),
        role,
        created_at: 0,
    };
    storage.insert_user(user.clone()).await.expect("user");
    let device = Device {
        id: DeviceId::random(),
        user_id: user.id.clone(),
        name: "phone".into(),
        token_hash: crate::identity::os_random::<32>(),
        created_at: 0,
        expires_at: i64::MAX,
        revoked_at: None,
    };
    storage.insert_device(device.clone()).await.expect("device");
    Principal {
        user,
        device_id: device.id,
        expires_at: i64::MAX,
    }
}

async fn patient(storage: &dyn Storage, agency: &AgencyId) -> PatientId {
    let id = PatientId::random();
    let chart = DocumentId::random();
    let doc = note_doc(agency.as_str(), id.as_str());
    storage
        .insert_patient(
            crate::identity::Patient {
                id: id.clone(),
                agency_id: agency.clone(),
                chart_document_id: chart,
                created_at: 0,
            },
            DocumentWrite {
                document_id: chart,
                meta: DocMeta {
                    agency_id: agency.clone(),
                    patient_id: id.clone(),
                    kind: "patient".into(),
                },
                create: true,
                data: DocumentData::Snapshot(doc.save()),
                heads: doc.get_heads(),
                audit: None,
            },
        )
        .await
        .expect("patient");
    id
}

async fn world_with(limits: Limits) -> World {
    let storage = Arc::new(MemoryStorage::new());
    world_over(storage.clone(), storage, limits).await
}

/// A world set up in `storage`, whose relay serves through `served` (the same storage, or a
/// wrapper of it).
async fn world_over(
    storage: Arc<MemoryStorage>,
    served: Arc<dyn Storage>,
    limits: Limits,
) -> World {
    let agency = AgencyId::random();
    let other_agency = AgencyId::random();
    for id in [&agency, &other_agency] {
        storage
            .insert_agency(Agency {
                id: id.clone(),
                name: "A".into(),
                created_at: 0,
            })
            .await
            .expect("agency");
    }
    let patient_id = patient(&*storage, &agency).await;
    let other_patient = patient(&*storage, &agency).await;
    let nurse = principal(&*storage, &agency, Role::Clinician).await;
    storage
        .assign(nurse.user_id().clone(), patient_id.clone(), 0)
        .await
        .expect("assign");
    World {
        other_nurse: principal(&*storage, &agency, Role::Clinician).await,
        office: principal(&*storage, &agency, Role::Office).await,
        stranger: principal(&*storage, &other_agency, Role::Office).await,
        nurse,
        state: AppState::new(served, limits).await.expect("state"),
        storage,
        agency,
        patient: patient_id,
        other_patient,
    }
}

async fn world() -> World {
    world_with(Limits::default()).await
}

fn note_doc(agency: &str, patient: &str) -> Automerge {
    let mut doc = Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(ROOT, "schema", "fieldchart/visit-note@1")?;
        tx.put(ROOT, "kind", "visit-note")?;
        tx.put(ROOT, "agencyId", agency)?;
        tx.put(ROOT, "patientId", patient)?;
        Ok(())
    })
    .expect("build doc");
    doc
}

fn edit(doc: &mut Automerge, key: &str, value: &str) {
    doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, key, value).map(|_| ()))
        .expect("edit");
}

/// One device's end of a session.
struct Client {
    id: PeerId,
    relay: Option<PeerId>,
    to_relay: mpsc::UnboundedSender<Result<Frame, Infallible>>,
    from_relay: mpsc::UnboundedReceiver<Frame>,
    session: tokio::task::JoinHandle<()>,
}

impl Client {
    fn connect(world: &World, principal: &Principal) -> Client {
        let ticket = world
            .state
            .sessions()
            .register(principal.device_id.clone())
            .expect("admitted");
        let (to_relay, incoming) = mpsc::unbounded();
        let (outgoing, from_relay) = mpsc::unbounded();
        let session = tokio::spawn(super::run(
            world.state.clone(),
            principal.clone(),
            ticket,
            incoming,
            outgoing,
        ));
        Client {
            id: PeerId::random("device"),
            relay: None,
            to_relay,
            from_relay,
            session,
        }
    }

    fn send_frame(&mut self, frame: Frame) {
        // The session may already have ended; tests look at what it answered.
        let _ = self.to_relay.unbounded_send(Ok(frame));
    }

    fn send(&mut self, message: Message) {
        self.send_frame(Frame::Binary(message.encode()));
    }

    /// The next frame from the relay other than a ping; `None` once the session ended.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            match tokio::time::timeout(WAIT, self.from_relay.next())
                .await
                .expect("the relay answered in time")
            {
                Some(Frame::Ping(_)) => continue,
                other => return other,
            }
        }
    }

    async fn message(&mut self) -> Message {
        match self.frame().await {
            Some(Frame::Binary(bytes)) => {
                Message::decode(&bytes).expect("the relay sends valid messages")
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The relay's `error` message, then its close frame; returns both.
    async fn closed_with_error(&mut self) -> (String, u16) {
        let message = match self.message().await {
            Message::Error { message } => message,
            other => panic!("expected an error message, got {other:?}"),
        };
        let code = match self.frame().await {
            Some(Frame::Close(Some((code, _)))) => code,
            other => panic!("expected a close frame, got {other:?}"),
        };
        // Complete the closing handshake, as a WebSocket client does.
        self.send_frame(Frame::Close(None));
        assert_eq!(self.frame().await, None, "nothing after the close");
        (message, code)
    }

    fn join_with(&mut self, versions: &[&str], storage_id: Option<&str>) {
        self.send(Message::Join {
            sender_id: self.id.clone(),
            peer_metadata: PeerMetadata {
                storage_id: storage_id.map(|s| fieldchart_core::protocol::StorageId::new(s.into())),
                is_ephemeral: false,
            },
            supported_protocol_versions: versions.iter().map(|v| (*v).to_owned()).collect(),
        });
    }

    async fn join(&mut self) -> Message {
        self.join_with(&["1"], Some("device-storage"));
        let peer = self.message().await;
        if let Message::Peer { sender_id, .. } = &peer {
            self.relay = Some(sender_id.clone());
        }
        peer
    }

    fn relay_id(&self) -> PeerId {
        self.relay.clone().expect("joined")
    }

    fn sync(&mut self, document_id: DocumentId, data: Vec<u8>) {
        let (sender_id, target_id) = (self.id.clone(), self.relay_id());
        self.send(Message::Sync {
            sender_id,
            target_id,
            document_id,
            data,
        });
    }

    fn request(&mut self, document_id: DocumentId, data: Vec<u8>) {
        let (sender_id, target_id) = (self.id.clone(), self.relay_id());
        self.send(Message::Request {
            sender_id,
            target_id,
            document_id,
            data,
        });
    }

    /// Sync `doc` with the relay until the relay confirms it holds exactly our heads.
    async fn sync_until_in_sync(
        &mut self,
        id: DocumentId,
        doc: &mut Automerge,
        sync: &mut DocSync,
    ) {
        if let Some(data) = sync.generate(doc) {
            self.sync(id, data);
        }
        for _ in 0..50 {
            if sync.in_sync(doc) {
                return;
            }
            match self.message().await {
                Message::Sync {
                    document_id, data, ..
                } if document_id == id => {
                    sync.receive(doc, &data).expect("relay sync data applies");
                    if let Some(data) = sync.generate(doc) {
                        self.sync(id, data);
                    }
                }
                other => panic!("expected sync for {id}, got {other:?}"),
            }
        }
        panic!("not in sync after 50 messages");
    }

    /// Fetch a document from the relay into an empty one.
    async fn fetch(&mut self, id: DocumentId) -> (Automerge, DocSync) {
        let mut doc = Automerge::new();
        let mut sync = DocSync::new();
        let first = sync.generate(&doc).expect("first message");
        self.request(id, first);
        for _ in 0..50 {
            if sync.in_sync(&doc) && !doc.get_heads().is_empty() {
                return (doc, sync);
            }
            match self.message().await {
                Message::Sync {
                    document_id, data, ..
                } if document_id == id => {
                    sync.receive(&mut doc, &data)
                        .expect("relay sync data applies");
                    if let Some(data) = sync.generate(&doc) {
                        self.sync(id, data);
                    }
                }
                other => panic!("expected sync for {id}, got {other:?}"),
            }
        }
        panic!("fetch did not finish");
    }

    /// Close from our side and wait until the session has finished (its deny rows written).
    async fn hang_up(mut self) {
        self.send_frame(Frame::Close(None));
        self.ended().await;
    }

    async fn ended(self) {
        tokio::time::timeout(WAIT, self.session)
            .await
            .expect("session ended in time")
            .expect("session did not panic");
    }
}

async fn audit_rows(storage: &MemoryStorage) -> Vec<AuditRecord> {
    storage
        .query_audit(AuditQuery {
            patient_id: None,
            user_id: None,
            from_ms: 0,
            to_ms: i64::MAX,
            limit: 10_000,
        })
        .await
        .expect("audit query")
}

async fn rows_for(
    storage: &MemoryStorage,
    doc: DocumentId,
    action: AuditAction,
) -> Vec<AuditRecord> {
    audit_rows(storage)
        .await
        .into_iter()
        .filter(|r| r.event.document_id == doc && r.event.action == action)
        .collect()
}

/// A note stored by the nurse through a session; returns its id and the nurse's copy.
async fn stored_note(w: &World) -> (DocumentId, Automerge) {
    let mut nurse = Client::connect(w, &w.nurse);
    nurse.join().await;
    let id = DocumentId::random();
    let mut doc = note_doc(w.agency.as_str(), w.patient.as_str());
    nurse
        .sync_until_in_sync(id, &mut doc, &mut DocSync::new())
        .await;
    drop(nurse);
    (id, doc)
}

// --- handshake ------------------------------------------------------------------------------

#[tokio::test]
async fn join_is_answered_with_peer_and_the_stable_storage_id() {
    let w = world().await;
    let mut client = Client::connect(&w, &w.nurse);
    match client.join().await {
        Message::Peer {
            sender_id,
            target_id,
            peer_metadata,
            selected_protocol_version,
        } => {
            assert_eq!(sender_id, *w.state.peer_id());
            assert_eq!(target_id, client.id);
            assert_eq!(selected_protocol_version, "1");
            assert_eq!(
                peer_metadata.storage_id.as_ref(),
                Some(w.state.storage_id())
            );
            assert_eq!(
                peer_metadata.storage_id,
                Some(w.storage.storage_id().await.expect("id"))
            );
            assert!(!peer_metadata.is_ephemeral);
        }
        other => panic!("expected peer, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unsupported_protocol_version_gets_an_error_and_a_close() {
    let w = world().await;
    let mut client = Client::connect(&w, &w.nurse);
    client.join_with(&["2", "0"], None);
    let (message, code) = client.closed_with_error().await;
    assert!(message.contains("protocol version"), "{message}");
    assert_eq!(code, close_code::PROTOCOL_ERROR);
    client.ended().await;
}

#[tokio::test]
async fn anything_before_join_is_refused() {
    let w = world().await;
    let mut client = Client::connect(&w, &w.nurse);
    client.send(Message::Sync {
        sender_id: client.id.clone(),
        target_id: PeerId::new("x".into()),
        document_id: DocumentId::random(),
        data: vec![],
    });
    let (message, _) = client.closed_with_error().await;
    assert!(message.contains("expected join"), "{message}");
    client.ended().await;
}

// --- bad input ------------------------------------------------------------------------------

#[tokio::test]
async fn garbage_truncated_text_and_oversize_frames_get_a_clear_error_and_a_close() {
    let limits = Limits {
        max_frame_bytes: 4096,
        ..Limits::default()
    };
    let w = world_with(limits).await;
    let join = Message::Join {
        sender_id: PeerId::new("device".into()),
        peer_metadata: PeerMetadata::default(),
        supported_protocol_versions: vec!["1".into()],
    }
    .encode();
    let cases: Vec<(Frame, &str, u16)> = vec![
        (
            Frame::Binary(b"\xff\x00garbage".to_vec()),
            "undecodable",
            close_code::PROTOCOL_ERROR,
        ),
        (
            Frame::Binary(join[..join.len() - 3].to_vec()),
            "undecodable",
            close_code::PROTOCOL_ERROR,
        ),
        (
            Frame::Binary(Vec::new()),
            "undecodable",
            close_code::PROTOCOL_ERROR,
        ),
        (
            Frame::Text("{\"type\":\"join\"}".into()),
            "binary",
            close_code::UNSUPPORTED_DATA,
        ),
        (
            Frame::Binary(vec![0xa0; 4097]),
            "exceeds the limit of 4096 bytes",
            close_code::TOO_BIG,
        ),
    ];
    for (frame, expected, expected_code) in cases {
        let mut client = Client::connect(&w, &w.nurse);
        client.send_frame(frame);
        let (message, code) = client.closed_with_error().await;
        assert!(
            message.contains(expected),
            "{message:?} should mention {expected:?}"
        );
        assert_eq!(code, expected_code);
        client.ended().await;
    }
    // The same garbage after a successful join.
    let mut client = Client::connect(&w, &w.nurse);
    client.join().await;
    client.sync(
        DocumentId::random(),
        b"not an automerge sync message".to_vec(),
    );
    let (message, _) = client.closed_with_error().await;
    assert!(message.contains("refused"), "{message}");
    client.ended().await;
}

#[tokio::test]
async fn a_transport_error_ends_the_session_with_an_error() {
    let w = world().await;
    let ticket = w
        .state
        .sessions()
        .register(w.nurse.device_id.clone())
        .expect("admitted");
    let incoming = futures::stream::iter(vec![Err::<Frame, _>("message too big")]);
    let (outgoing, mut from_relay) = mpsc::unbounded();
    super::run(w.state.clone(), w.nurse.clone(), ticket, incoming, outgoing).await;
    let first = from_relay.next().await.expect("error message");
    let Frame::Binary(bytes) = first else {
        panic!("expected a message, got {first:?}")
    };
    assert!(
        matches!(Message::decode(&bytes), Ok(Message::Error { message }) if message.contains("message too big"))
    );
}

// --- access ---------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_and_denied_documents_get_the_same_prompt_doc_unavailable() {
    let w = world().await;
    let (note, _) = stored_note(&w).await;
    let unknown = DocumentId::random();
    let mut outsider = Client::connect(&w, &w.other_nurse);
    outsider.join().await;
    let mut answers = Vec::new();
    for id in [unknown, note] {
        outsider.request(
            id,
            DocSync::new()
                .generate(&Automerge::new())
                .expect("first message"),
        );
        match outsider.message().await {
            Message::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            } => {
                assert_eq!(document_id, id);
                answers.push((sender_id, target_id));
            }
            other => panic!("expected doc-unavailable, got {other:?}"),
        }
    }
    assert_eq!(answers[0], answers[1], "denied looks exactly like unknown");
    outsider.hang_up().await;
    let denied = rows_for(&w.storage, note, AuditAction::Deny).await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].event.user_id, *w.other_nurse.user_id());
    assert_eq!(denied[0].event.patient_id.as_ref(), Some(&w.patient));
    assert!(
        rows_for(&w.storage, unknown, AuditAction::Deny)
            .await
            .is_empty(),
        "nothing to audit for a document nobody has"
    );
    assert!(
        rows_for(&w.storage, note, AuditAction::Read)
            .await
            .iter()
            .all(|r| r.event.user_id != *w.other_nurse.user_id())
    );
}

#[tokio::test]
async fn care_team_office_and_other_agency_access() {
    let w = world().await;
    let (note, doc) = stored_note(&w).await;
    for (who, allowed) in [
        (&w.nurse, true),
        (&w.office, true),
        (&w.other_nurse, false),
        (&w.stranger, false),
    ] {
        let mut client = Client::connect(&w, who);
        client.join().await;
        if allowed {
            let (fetched, _) = client.fetch(note).await;
            assert_eq!(fetched.get_heads(), doc.get_heads());
        } else {
            client.request(
                note,
                DocSync::new().generate(&Automerge::new()).expect("first"),
            );
            assert!(matches!(
                client.message().await,
                Message::DocUnavailable { .. }
            ));
        }
        client.hang_up().await;
    }
    let reads = rows_for(&w.storage, note, AuditAction::Read).await;
    assert!(
        reads
            .iter()
            .any(|r| r.event.user_id == *w.office.user_id() && r.event.heads == doc.get_heads())
    );
    let denials = rows_for(&w.storage, note, AuditAction::Deny).await;
    let denied_users: Vec<_> = denials.iter().map(|r| r.event.user_id.clone()).collect();
    assert_eq!(
        denied_users,
        vec![
            w.other_nurse.user_id().clone(),
            w.stranger.user_id().clone()
        ]
    );
}

// --- new documents --------------------------------------------------------------------------

#[tokio::test]
async fn a_new_document_is_stored_with_a_write_row_before_it_is_acknowledged() {
    let w = world().await;
    let (id, doc) = stored_note(&w).await;
    let stored = w
        .storage
        .load_document(id)
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(stored.heads, doc.get_heads());
    assert_eq!(
        stored.meta,
        DocMeta {
            agency_id: w.agency.clone(),
            patient_id: w.patient.clone(),
            kind: "visit-note".into()
        }
    );
    // Sent whole (the relay had nothing of it), it is stored as the bytes that were sent, and
    // those load to exactly the document.
    let snapshot = stored
        .snapshot
        .expect("a new document is stored as a snapshot");
    assert_eq!(snapshot, doc.save());
    assert_eq!(
        Automerge::load(&snapshot).expect("loads").get_heads(),
        doc.get_heads()
    );
    let writes = rows_for(&w.storage, id, AuditAction::Write).await;
    assert_eq!(writes.len(), 1);
    assert_eq!(
        (
            writes[0].event.user_id.clone(),
            writes[0].event.heads.clone()
        ),
        (w.nurse.user_id().clone(), doc.get_heads())
    );
}

/// A sync message whose changes are exactly `chunks` (any automerge storage chunks).
fn sync_message_with(chunks: Vec<Vec<u8>>) -> Vec<u8> {
    automerge::sync::Message {
        heads: Vec::new(),
        need: Vec::new(),
        have: Vec::new(),
        changes: automerge::sync::ChunkList::from(chunks),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    }
    .encode()
}

/// The document a stored row's bytes load to: its snapshot, then its chunks.
fn reload(stored: &crate::storage::StoredDocument) -> Automerge {
    let mut doc = Automerge::load(stored.snapshot.as_deref().expect("a snapshot")).expect("loads");
    for chunk in &stored.chunks {
        doc.load_incremental(chunk).expect("chunk loads");
    }
    doc
}

/// A change sent before its dependency (the new document stays empty), then the whole document
/// without it: the relay's stored heads must always be what its stored bytes load to — a
/// snapshot kept as the bytes sent must not claim a change those bytes lack — and a sync then
/// brings the rest.
#[tokio::test]
async fn a_whole_document_after_a_dangling_change_stores_what_its_bytes_hold() {
    let w = world().await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let id = DocumentId::random();
    let mut doc = note_doc(w.agency.as_str(), w.patient.as_str());
    let whole = doc.save();
    let before = doc.get_heads();
    edit(&mut doc, "narrative", "written after the first save");
    let later: Vec<Vec<u8>> = doc
        .get_changes(&before)
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    nurse.sync(id, sync_message_with(later));
    nurse.sync(id, sync_message_with(vec![whole]));
    // The relay stores the note before it acknowledges it: wait for that answer.
    let mut stored = None;
    for _ in 0..5 {
        nurse.message().await;
        stored = w.storage.load_document(id).await.expect("load");
        if stored.is_some() {
            break;
        }
    }
    let stored = stored.expect("the note is stored once it is whole");
    let reloaded = reload(&stored);
    // What the relay says it holds is what its stored bytes load to (here the first change
    // only: a document that stays empty is answered without keeping what it was sent).
    assert_eq!(reloaded.get_heads(), stored.heads);
    // A sync then completes it.
    nurse
        .sync_until_in_sync(id, &mut doc, &mut DocSync::new())
        .await;
    let stored = w
        .storage
        .load_document(id)
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(reload(&stored).get_heads(), doc.get_heads());
    assert_eq!(stored.heads, doc.get_heads());
}

#[tokio::test]
async fn a_new_document_for_a_patient_off_the_care_team_is_refused_and_nothing_stored() {
    let w = world().await;
    // (claimed patient, claimed agency, patient recorded in the deny row)
    let unknown = PatientId::random();
    let cases = [
        (
            w.other_patient.clone(),
            w.agency.clone(),
            Some(w.other_patient.clone()),
        ),
        (unknown, w.agency.clone(), None),
        (
            w.patient.clone(),
            AgencyId::random(),
            Some(w.patient.clone()),
        ),
    ];
    for (patient, agency, recorded) in cases {
        let mut nurse = Client::connect(&w, &w.nurse);
        nurse.join().await;
        let id = DocumentId::random();
        let mut doc = note_doc(agency.as_str(), patient.as_str());
        let mut sync = DocSync::new();
        nurse.sync(id, sync.generate(&doc).expect("first"));
        let mut refused = false;
        for _ in 0..10 {
            match nurse.message().await {
                Message::Sync { data, .. } => {
                    sync.receive(&mut doc, &data).expect("apply");
                    if let Some(data) = sync.generate(&doc) {
                        nurse.sync(id, data);
                    }
                }
                Message::DocUnavailable { document_id, .. } if document_id == id => {
                    refused = true;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(refused, "refused");
        assert!(!sync.in_sync(&doc), "the relay never claimed the document");
        // The deny row is written after the answer; a closed session has written its rows.
        nurse.send_frame(Frame::Close(None));
        nurse.ended().await;
        assert_eq!(w.storage.load_document(id).await.expect("load"), None);
        let denied = rows_for(&w.storage, id, AuditAction::Deny).await;
        assert_eq!(denied.len(), 1);
        assert_eq!(
            denied[0].event.agency_id, w.agency,
            "always the nurse's agency"
        );
        assert_eq!(denied[0].event.patient_id, recorded);
    }
}

#[tokio::test]
async fn an_unclassified_document_is_held_unacknowledged_until_its_fields_arrive() {
    let w = world().await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let id = DocumentId::random();
    let mut doc = Automerge::new();
    let mut sync = DocSync::new();
    // The empty document is announced first, as a JS client does.
    nurse.sync(id, sync.generate(&doc).expect("first"));
    let Message::Sync { data, .. } = nurse.message().await else {
        panic!("expected sync")
    };
    sync.receive(&mut doc, &data).expect("apply");
    // Some content, but no agencyId/patientId yet: the relay takes it but claims nothing.
    edit(&mut doc, "kind", "visit-note");
    nurse.sync(id, sync.generate(&doc).expect("changes"));
    // Then the fields: now it is classified, authorized, stored and acknowledged.
    edit(&mut doc, "agencyId", w.agency.as_str());
    edit(&mut doc, "patientId", w.patient.as_str());
    nurse.sync_until_in_sync(id, &mut doc, &mut sync).await;
    let stored = w
        .storage
        .load_document(id)
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(stored.heads, doc.get_heads());
    assert_eq!(stored.meta.kind, "visit-note");
}

#[tokio::test]
async fn announcing_many_new_documents_at_once_holds_nothing_until_their_changes_arrive() {
    let w = world_with(Limits {
        max_pending_docs: 2,
        ..Limits::default()
    })
    .await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let mut docs: Vec<(DocumentId, Automerge, DocSync)> = (0..10)
        .map(|_| {
            (
                DocumentId::random(),
                note_doc(w.agency.as_str(), w.patient.as_str()),
                DocSync::new(),
            )
        })
        .collect();
    // A reconnecting phone announces every note it wrote offline before answering anything.
    for (id, doc, sync) in &mut docs {
        let first = sync.generate(doc).expect("first");
        nurse.sync(*id, first);
    }
    for _ in 0..200 {
        if docs.iter().all(|(_, doc, sync)| sync.in_sync(doc)) {
            break;
        }
        let Message::Sync {
            document_id, data, ..
        } = nurse.message().await
        else {
            panic!("expected sync")
        };
        let (id, doc, sync) = docs
            .iter_mut()
            .find(|(id, ..)| *id == document_id)
            .expect("one of ours");
        sync.receive(doc, &data).expect("apply");
        if let Some(data) = sync.generate(doc) {
            let id = *id;
            nurse.sync(id, data);
        }
    }
    for (id, doc, _) in &docs {
        let stored = w
            .storage
            .load_document(*id)
            .await
            .expect("load")
            .expect("stored");
        assert_eq!(stored.heads, doc.get_heads());
    }
}

#[tokio::test]
async fn unclassified_documents_are_bounded_per_session() {
    let w = world_with(Limits {
        max_pending_docs: 1,
        ..Limits::default()
    })
    .await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let id = DocumentId::random();
        let mut doc = Automerge::new();
        let mut sync = DocSync::new();
        edit(&mut doc, "kind", "visit-note");
        nurse.sync(id, sync.generate(&doc).expect("first"));
        let Message::Sync { data, .. } = nurse.message().await else {
            panic!("expected sync")
        };
        sync.receive(&mut doc, &data).expect("apply");
        nurse.sync(id, sync.generate(&doc).expect("changes"));
        held.push(id);
    }
    // The first is held silently; the second is over the bound and refused.
    match nurse.message().await {
        Message::DocUnavailable { document_id, .. } => assert_eq!(document_id, held[1]),
        other => panic!("expected doc-unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unclassified_document_is_never_shared() {
    let w = world().await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let id = DocumentId::random();
    let mut doc = Automerge::new();
    edit(&mut doc, "kind", "visit-note");
    let mut sync = DocSync::new();
    nurse.sync(id, sync.generate(&doc).expect("first"));
    let Message::Sync { data, .. } = nurse.message().await else {
        panic!("expected sync")
    };
    sync.receive(&mut doc, &data).expect("apply");
    nurse.sync(id, sync.generate(&doc).expect("changes"));
    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    office.request(
        id,
        DocSync::new().generate(&Automerge::new()).expect("first"),
    );
    assert!(matches!(
        office.message().await,
        Message::DocUnavailable { .. }
    ));
    assert_eq!(w.storage.load_document(id).await.expect("load"), None);
}

// --- writes, forwarding, failures ----------------------------------------------------------

#[tokio::test]
async fn changes_are_forwarded_live_to_other_sessions_syncing_the_document() {
    let w = world().await;
    let (id, mut nurse_doc) = stored_note(&w).await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let mut nurse_sync = DocSync::new();
    nurse
        .sync_until_in_sync(id, &mut nurse_doc, &mut nurse_sync)
        .await;

    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    let (mut office_doc, mut office_sync) = office.fetch(id).await;

    edit(&mut nurse_doc, "assessment", "lungs clear");
    nurse
        .sync_until_in_sync(id, &mut nurse_doc, &mut nurse_sync)
        .await;
    // The office did not ask: the relay pushes the change.
    for _ in 0..10 {
        if office_doc.get_heads() == nurse_doc.get_heads() {
            break;
        }
        let Message::Sync { data, .. } = office.message().await else {
            panic!("expected sync")
        };
        office_sync.receive(&mut office_doc, &data).expect("apply");
        if let Some(data) = office_sync.generate(&office_doc) {
            office.sync(id, data);
        }
    }
    assert_eq!(office_doc.get_heads(), nurse_doc.get_heads());
    let reads = rows_for(&w.storage, id, AuditAction::Read).await;
    assert!(
        reads
            .iter()
            .any(|r| r.event.user_id == *w.office.user_id()
                && r.event.heads == nurse_doc.get_heads())
    );
}

#[tokio::test]
async fn a_storage_failure_ends_the_session_with_an_error_and_acknowledges_nothing() {
    let w = world().await;
    let (id, mut doc) = stored_note(&w).await;
    let stored_heads = doc.get_heads();
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let mut sync = DocSync::new();
    nurse.sync_until_in_sync(id, &mut doc, &mut sync).await;

    w.storage.set_fail_writes(true);
    edit(&mut doc, "assessment", "never stored");
    nurse.sync(id, sync.generate(&doc).expect("changes"));
    let (message, code) = nurse.closed_with_error().await;
    assert!(
        message.contains("nothing from your last message was acknowledged"),
        "{message}"
    );
    assert_eq!(code, close_code::INTERNAL_ERROR);
    nurse.ended().await;
    w.storage.set_fail_writes(false);
    assert_eq!(
        w.storage
            .load_document(id)
            .await
            .expect("load")
            .expect("stored")
            .heads,
        stored_heads
    );
    // The relay's memory holds no trace of the change either.
    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    let (office_doc, _) = office.fetch(id).await;
    assert_eq!(office_doc.get_heads(), stored_heads);
}

#[tokio::test]
async fn a_change_moving_a_document_to_another_patient_is_refused() {
    let w = world().await;
    let (id, mut doc) = stored_note(&w).await;
    let stored_heads = doc.get_heads();
    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    let mut sync = DocSync::new();
    office.sync_until_in_sync(id, &mut doc, &mut sync).await;
    edit(&mut doc, "patientId", w.other_patient.as_str());
    office.sync(id, sync.generate(&doc).expect("changes"));
    loop {
        match office.message().await {
            Message::DocUnavailable { document_id, .. } if document_id == id => break,
            Message::Sync { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    office.hang_up().await;
    assert_eq!(
        w.storage
            .load_document(id)
            .await
            .expect("load")
            .expect("stored")
            .heads,
        stored_heads
    );
    // Moving a stored document is tampering with its identity: audited as such.
    assert_eq!(rows_for(&w.storage, id, AuditAction::Tamper).await.len(), 1);
    assert!(rows_for(&w.storage, id, AuditAction::Deny).await.is_empty());
}

// --- closing from outside -------------------------------------------------------------------

#[tokio::test]
async fn revoking_the_device_closes_its_session_with_an_error() {
    let w = world().await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    assert_eq!(w.state.sessions().revoke_device(&w.nurse.device_id), 1);
    let (message, code) = nurse.closed_with_error().await;
    assert!(message.contains("revoked"));
    assert_eq!(code, close_code::POLICY);
    nurse.ended().await;
}

#[tokio::test]
async fn a_second_join_of_the_same_peer_replaces_the_older_socket() {
    let w = world().await;
    let mut first = Client::connect(&w, &w.nurse);
    first.join().await;
    let mut second = Client::connect(&w, &w.nurse);
    second.id = first.id.clone();
    second.join().await;
    assert!(matches!(
        first.frame().await,
        Some(Frame::Close(Some((close_code::NORMAL, _))))
    ));
    first.ended().await;
    // The newer socket works.
    let (id, _) = stored_note(&w).await;
    let _ = second.fetch(id).await;
}

#[tokio::test]
async fn exceeding_the_message_rate_closes_the_session() {
    // No refill (rate 0): how long a loaded machine takes between frames cannot change which
    // frame is refused.
    let limits = Limits {
        message_rate_per_second: 0,
        message_burst: 3,
        ..Limits::default()
    };
    let w = world_with(limits).await;
    let mut client = Client::connect(&w, &w.nurse);
    client.join().await;
    for _ in 0..5 {
        client.request(
            DocumentId::random(),
            DocSync::new().generate(&Automerge::new()).expect("first"),
        );
    }
    for _ in 0..2 {
        assert!(matches!(
            client.message().await,
            Message::DocUnavailable { .. }
        ));
    }
    let (message, code) = client.closed_with_error().await;
    assert!(message.contains("messages per second"), "{message}");
    assert_eq!(code, close_code::POLICY);
}

#[tokio::test]
async fn an_expired_token_closes_the_session() {
    let w = world().await;
    let mut nurse = w.nurse.clone();
    nurse.expires_at = crate::clock::now_ms();
    let mut client = Client::connect(&w, &nurse);
    let (message, _) = client.closed_with_error().await;
    assert!(message.contains("expired"));
}

#[tokio::test]
async fn sync_state_is_persisted_per_peer_storage_id_so_reconnects_resume() {
    let w = world().await;
    let (id, mut doc) = stored_note(&w).await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let mut sync = DocSync::new();
    nurse.sync_until_in_sync(id, &mut doc, &mut sync).await;
    nurse.send_frame(Frame::Close(None));
    nurse.ended().await;
    let key = crate::storage::PeerKey {
        user_id: w.nurse.user_id().clone(),
        storage_id: fieldchart_core::protocol::StorageId::new("device-storage".into()),
    };
    let stored = w
        .storage
        .load_sync_state(key, id)
        .await
        .expect("load")
        .expect("persisted");
    let restored = DocSync::decode(&stored).expect("decodes");
    assert_eq!(restored.shared_heads(), doc.get_heads());
}

#[tokio::test]
async fn shutdown_closes_sessions_with_going_away() {
    let w = world().await;
    let mut client = Client::connect(&w, &w.nurse);
    client.join().await;
    w.state.sessions().shut_down();
    assert!(matches!(
        client.frame().await,
        Some(Frame::Close(Some((close_code::GOING_AWAY, _))))
    ));
    client.ended().await;
    tokio::time::timeout(WAIT, w.state.sessions().drained())
        .await
        .expect("drained");
}

#[tokio::test]
async fn ephemeral_messages_are_dropped_not_forwarded() {
    let w = world().await;
    let (id, _) = stored_note(&w).await;
    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    let _ = office.fetch(id).await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let _ = nurse.fetch(id).await;
    nurse.send(Message::Ephemeral {
        sender_id: nurse.id.clone(),
        target_id: nurse.relay_id(),
        document_id: id,
        count: 1,
        session_id: "s".into(),
        data: vec![0xa0],
    });
    // The nurse's session handled the ephemeral message before this request, and stays open.
    nurse.request(
        DocumentId::random(),
        DocSync::new().generate(&Automerge::new()).expect("first"),
    );
    assert!(matches!(
        nurse.message().await,
        Message::DocUnavailable { .. }
    ));
    // Nothing reached the office before the answer to its own request.
    office.request(
        DocumentId::random(),
        DocSync::new().generate(&Automerge::new()).expect("first"),
    );
    assert!(matches!(
        office.message().await,
        Message::DocUnavailable { .. }
    ));
}

// --- issue 9: tenant-safe denials, no existence oracle, bounds, revocation ------------------

/// `len` pseudo-random letters (automerge compresses large columns; these stay ~60% of
/// their length).
fn noise(len: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// A note with `text_bytes` bytes of narrative, for size limits.
fn big_note(agency: &str, patient: &str, text_bytes: usize) -> Automerge {
    let mut doc = note_doc(agency, patient);
    edit(&mut doc, "assessment", &noise(text_bytes));
    doc
}

#[tokio::test]
async fn a_forged_owner_writes_a_deny_row_only_into_the_principals_agency() {
    let w = world().await;
    let other_agency = w.stranger.agency_id().clone();
    let their_patient = patient(&*w.storage, &other_agency).await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let mut forged = Vec::new();
    for _ in 0..5 {
        let id = DocumentId::random();
        let doc = note_doc(other_agency.as_str(), their_patient.as_str());
        nurse.sync(id, DocSync::new().generate(&doc).expect("first"));
        let Message::Sync { data, .. } = nurse.message().await else {
            panic!("expected the relay to ask for the changes")
        };
        let mut sync = DocSync::new();
        let mut mine = doc.clone();
        sync.generate(&mine);
        sync.receive(&mut mine, &data).expect("apply");
        nurse.sync(id, sync.generate(&mine).expect("changes"));
        assert!(matches!(
            nurse.message().await,
            Message::DocUnavailable { document_id, .. } if document_id == id
        ));
        forged.push(id);
    }
    nurse.hang_up().await;
    let rows = audit_rows(&w.storage).await;
    for id in forged {
        let denied: Vec<_> = rows.iter().filter(|r| r.event.document_id == id).collect();
        assert_eq!(denied.len(), 1);
        assert_eq!(denied[0].event.action, AuditAction::Deny);
        assert_eq!(denied[0].event.agency_id, w.agency);
        assert_eq!(
            denied[0].event.patient_id, None,
            "another agency's patient is never named in this agency's trail"
        );
    }
    assert!(
        rows.iter().all(|r| r.event.agency_id != other_agency
            && r.event.patient_id.as_ref() != Some(&their_patient)),
        "nothing was written into the other agency's trail"
    );
}

/// The relay's answer to one message about `id`, with `id` blanked so answers about two ids
/// compare equal exactly when they are the same answer.
async fn answer_about(client: &mut Client, id: DocumentId) -> Vec<u8> {
    let message = client.message().await;
    assert_eq!(message.document_id(), Some(id), "{message:?}");
    let blank = DocumentId::from_bytes([0; 16]);
    let blanked = match message {
        Message::Sync {
            sender_id,
            target_id,
            data,
            ..
        } => Message::Sync {
            sender_id,
            target_id,
            document_id: blank,
            data,
        },
        Message::DocUnavailable {
            sender_id,
            target_id,
            ..
        } => Message::DocUnavailable {
            sender_id,
            target_id,
            document_id: blank,
        },
        other => panic!("unexpected {other:?}"),
    };
    blanked.encode()
}

#[tokio::test]
async fn an_existing_document_the_device_may_not_see_is_answered_exactly_as_an_unknown_one() {
    let w = world().await;
    let (note, note_doc_copy) = stored_note(&w).await;
    let mut outsider = Client::connect(&w, &w.other_nurse);
    outsider.join().await;
    // `request` with an empty document, and `sync` announcing a document the device holds
    // (here: a copy of the note itself, as a device that once had it would send).
    let empty = DocSync::new().generate(&Automerge::new()).expect("first");
    let holding = DocSync::new().generate(&note_doc_copy).expect("first");
    for is_request in [true, false] {
        let data = if is_request { &empty } else { &holding };
        let mut answers = Vec::new();
        for id in [DocumentId::random(), note] {
            if is_request {
                outsider.request(id, data.clone());
            } else {
                outsider.sync(id, data.clone());
            }
            answers.push(answer_about(&mut outsider, id).await);
        }
        assert_eq!(
            answers[0], answers[1],
            "request={is_request}: the denied document's answer differs from an unknown one's"
        );
    }
    outsider.hang_up().await;
    // Audited once, in the outsider's own agency, naming the patient (same agency).
    let denied = rows_for(&w.storage, note, AuditAction::Deny).await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].event.user_id, *w.other_nurse.user_id());
}

#[tokio::test]
async fn a_denied_or_probing_device_never_forces_a_document_load() {
    let w = world_with(Limits {
        max_docs_in_memory: 1,
        ..Limits::default()
    })
    .await;
    let (note, _) = stored_note(&w).await;
    // Push the note out of memory by loading another document.
    let (_other, _) = stored_note(&w).await;
    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    let _ = office.fetch(_other).await;
    office.hang_up().await;
    assert!(!w.state.docs().is_loaded(note), "evicted");
    let mut outsider = Client::connect(&w, &w.stranger);
    outsider.join().await;
    outsider.request(
        note,
        DocSync::new().generate(&Automerge::new()).expect("first"),
    );
    assert!(matches!(
        outsider.message().await,
        Message::DocUnavailable { .. }
    ));
    assert!(
        !w.state.docs().is_loaded(note),
        "a denied request loaded the document"
    );
}

#[tokio::test]
async fn a_session_that_keeps_being_refused_is_closed() {
    let w = world_with(Limits {
        max_denials_per_session: 3,
        ..Limits::default()
    })
    .await;
    let mut client = Client::connect(&w, &w.nurse);
    client.join().await;
    let first = DocSync::new().generate(&Automerge::new()).expect("first");
    let repeated = DocumentId::random();
    for _ in 0..5 {
        // Asking again for the same document does not count twice.
        client.request(repeated, first.clone());
        assert!(matches!(
            client.message().await,
            Message::DocUnavailable { .. }
        ));
    }
    for _ in 0..2 {
        client.request(DocumentId::random(), first.clone());
        assert!(matches!(
            client.message().await,
            Message::DocUnavailable { .. }
        ));
    }
    client.request(DocumentId::random(), first);
    let (message, code) = client.closed_with_error().await;
    assert!(message.contains("refused or unavailable"), "{message}");
    assert_eq!(code, close_code::POLICY);
}

#[tokio::test]
async fn a_clinician_cannot_create_a_patient_chart_and_the_office_can_create_a_note() {
    let w = world().await;
    for (who, kind, allowed) in [
        (&w.nurse, "patient", false),
        (&w.office, "patient", false),
        (&w.office, "visit-note", true),
        (&w.nurse, "visit-note", true),
    ] {
        let mut client = Client::connect(&w, who);
        client.join().await;
        let id = DocumentId::random();
        let mut doc = note_doc(w.agency.as_str(), w.patient.as_str());
        edit(&mut doc, "kind", kind);
        let mut sync = DocSync::new();
        let mut refused = false;
        if let Some(data) = sync.generate(&doc) {
            client.sync(id, data);
        }
        for _ in 0..20 {
            if sync.in_sync(&doc) {
                break;
            }
            match client.message().await {
                Message::Sync { data, .. } => {
                    sync.receive(&mut doc, &data).expect("apply");
                    if let Some(data) = sync.generate(&doc) {
                        client.sync(id, data);
                    }
                }
                Message::DocUnavailable { .. } => {
                    refused = true;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(!refused, allowed, "{kind} by {:?}", who.role());
        assert_eq!(
            w.storage.load_document(id).await.expect("load").is_some(),
            allowed
        );
        client.hang_up().await;
    }
}

#[tokio::test]
async fn a_document_over_its_quota_is_refused_with_a_clear_error_and_not_stored() {
    let w = world_with(Limits {
        max_document_bytes: 4096,
        ..Limits::default()
    })
    .await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let id = DocumentId::random();
    let mut doc = big_note(w.agency.as_str(), w.patient.as_str(), 16_384);
    let mut sync = DocSync::new();
    nurse.sync(id, sync.generate(&doc).expect("first"));
    let Message::Sync { data, .. } = nurse.message().await else {
        panic!("expected sync")
    };
    sync.receive(&mut doc, &data).expect("apply");
    nurse.sync(id, sync.generate(&doc).expect("changes"));
    let (message, code) = nurse.closed_with_error().await;
    assert!(
        message.contains("per-document quota of 4096 bytes"),
        "{message}"
    );
    assert_eq!(code, close_code::POLICY);
    assert_eq!(w.storage.load_document(id).await.expect("load"), None);
}

#[tokio::test]
async fn held_documents_are_bounded_relay_wide_on_decoded_size() {
    let w = world_with(Limits {
        max_held_bytes: 7000,
        ..Limits::default()
    })
    .await;
    let mut refused = 0;
    let mut clients = Vec::new();
    // Two sessions (two devices) each hold a ~5 KB unclassified document: the second does
    // not fit the relay-wide budget, though it fits its own session's.
    for who in [&w.nurse, &w.office] {
        let mut client = Client::connect(&w, who);
        client.join().await;
        let id = DocumentId::random();
        let mut doc = Automerge::new();
        edit(&mut doc, "assessment", &noise(8000));
        let mut sync = DocSync::new();
        client.sync(id, sync.generate(&doc).expect("first"));
        let Message::Sync { data, .. } = client.message().await else {
            panic!("expected sync")
        };
        sync.receive(&mut doc, &data).expect("apply");
        client.sync(id, sync.generate(&doc).expect("changes"));
        // A request for an unknown id marks the point where the previous message was handled.
        client.request(
            DocumentId::random(),
            DocSync::new().generate(&Automerge::new()).expect("first"),
        );
        match client.message().await {
            Message::DocUnavailable { document_id, .. } if document_id == id => {
                refused += 1;
                assert!(matches!(
                    client.message().await,
                    Message::DocUnavailable { .. }
                ));
            }
            Message::DocUnavailable { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
        clients.push(client);
    }
    assert_eq!(
        refused, 1,
        "exactly the document over the budget was refused"
    );
    assert!(w.state.sessions().held().used() <= 7000);
    for client in clients {
        client.hang_up().await;
    }
    assert_eq!(
        w.state.sessions().held().used(),
        0,
        "held bytes are given back"
    );
}

#[tokio::test]
async fn a_byte_flood_closes_the_session_on_the_byte_rate() {
    let w = world_with(Limits {
        byte_rate_per_second: 1,
        byte_burst: 20_000,
        ..Limits::default()
    })
    .await;
    let mut client = Client::connect(&w, &w.nurse);
    client.join().await;
    // Requests for unknown documents with 4 KiB payloads: cheap for the relay to answer, so
    // only the byte budget can end this.
    for _ in 0..10 {
        client.request(DocumentId::random(), vec![0x42; 4096]);
    }
    let mut answered = 0;
    let message = loop {
        match client.message().await {
            Message::DocUnavailable { .. } => answered += 1,
            Message::Error { message } => break message,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(message.contains("bytes per second"), "{message}");
    let metrics = w.state.metrics().render();
    assert!(
        metrics.contains("fieldchart_limit_hits_total{limit=\"byte_rate\"}"),
        "the limit hit is counted: {metrics}"
    );
    assert!(
        (3..=5).contains(&answered),
        "{answered} frames fit a 20,000-byte burst"
    );
    assert!(matches!(
        client.frame().await,
        Some(Frame::Close(Some((close_code::POLICY, _))))
    ));
}

#[tokio::test]
async fn bytes_in_flight_are_bounded_relay_wide() {
    let w = world_with(Limits {
        max_bytes_in_flight: 64,
        ..Limits::default()
    })
    .await;
    let mut client = Client::connect(&w, &w.nurse);
    client.join_with(&["1"], Some(&"s".repeat(200)));
    let (message, code) = client.closed_with_error().await;
    assert!(message.contains("too many bytes in flight"), "{message}");
    assert_eq!(code, close_code::TRY_AGAIN_LATER);
}

/// A sink that never accepts a frame: a client that never reads, once its buffers are full.
struct StuckSink;

impl futures::Sink<Frame> for StuckSink {
    type Error = Infallible;

    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Pending
    }

    fn start_send(self: std::pin::Pin<&mut Self>, _: Frame) -> Result<(), Infallible> {
        Ok(())
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Pending
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Pending
    }
}

/// A session whose peer never reads; returns the sender of its frames and the session task.
fn connect_stuck(
    world: &World,
    principal: &Principal,
) -> (
    mpsc::UnboundedSender<Result<Frame, Infallible>>,
    tokio::task::JoinHandle<()>,
) {
    let ticket = world
        .state
        .sessions()
        .register(principal.device_id.clone())
        .expect("admitted");
    let (to_relay, incoming) = mpsc::unbounded();
    let session = tokio::spawn(super::run(
        world.state.clone(),
        principal.clone(),
        ticket,
        incoming,
        StuckSink,
    ));
    (to_relay, session)
}

fn join_frame() -> Frame {
    Frame::Binary(
        Message::Join {
            sender_id: PeerId::random("stuck"),
            peer_metadata: PeerMetadata::default(),
            supported_protocol_versions: vec!["1".into()],
        }
        .encode(),
    )
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_blocks_nobody() {
    let w = world_with(Limits {
        send_timeout: Duration::from_millis(200),
        outbox_frames: 2,
        ..Limits::default()
    })
    .await;
    let (to_relay, stuck) = connect_stuck(&w, &w.office);
    to_relay.unbounded_send(Ok(join_frame())).expect("send");
    let probe = DocSync::new().generate(&Automerge::new()).expect("first");
    for _ in 0..10 {
        let _ = to_relay.unbounded_send(Ok(Frame::Binary(
            Message::Request {
                sender_id: PeerId::new("x".into()),
                target_id: w.state.peer_id().clone(),
                document_id: DocumentId::random(),
                data: probe.clone(),
            }
            .encode(),
        )));
    }
    // Meanwhile another device syncs normally.
    let (id, _) = stored_note(&w).await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let _ = nurse.fetch(id).await;
    tokio::time::timeout(WAIT, stuck)
        .await
        .expect("the slow reader was disconnected")
        .expect("no panic");
    assert_eq!(
        w.state.sessions().len(),
        1,
        "only the nurse's session is left"
    );
}

#[tokio::test]
async fn revocation_and_shutdown_reach_a_session_whose_peer_never_reads() {
    // A send timeout far longer than the test: only the revocation can end the session.
    let w = world_with(Limits {
        send_timeout: Duration::from_secs(3600),
        outbox_frames: 1,
        ..Limits::default()
    })
    .await;
    let (to_relay, stuck) = connect_stuck(&w, &w.nurse);
    to_relay.unbounded_send(Ok(join_frame())).expect("send");
    for _ in 0..5 {
        let _ = to_relay.unbounded_send(Ok(Frame::Ping(vec![])));
    }
    let (to_relay_2, stuck_2) = connect_stuck(&w, &w.office);
    to_relay_2.unbounded_send(Ok(join_frame())).expect("send");
    w.state.sessions().revoke_device(&w.nurse.device_id);
    w.state.sessions().shut_down();
    for session in [stuck, stuck_2] {
        let finished = tokio::time::timeout(WAIT, session).await;
        assert!(
            finished.is_ok(),
            "a stuck session ignored revocation or shutdown"
        );
    }
}

#[tokio::test]
async fn a_device_revoked_behind_the_relays_back_is_closed_by_the_periodic_check() {
    let w = world_with(Limits {
        device_recheck_interval: Duration::from_millis(50),
        ..Limits::default()
    })
    .await;
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    // Revoked in storage only: no registry call, no poller.
    w.storage
        .revoke_device(w.nurse.device_id.clone(), crate::clock::now_ms())
        .await
        .expect("revoke");
    let (message, code) = nurse.closed_with_error().await;
    assert!(message.contains("revoked"), "{message}");
    assert_eq!(code, close_code::POLICY);
}

#[test]
fn client_text_is_bounded_and_escaped_for_logs() {
    let raw = format!(
        "evil\n{{\"level\":\"ERROR\"}}\u{1b}[31m{}",
        "x".repeat(1000)
    );
    let logged = super::loggable(&raw);
    assert!(
        !logged.contains('\n') && !logged.contains('\u{1b}'),
        "{logged}"
    );
    assert!(logged.contains("\\n"));
    assert!(logged.chars().count() <= crate::config::MAX_LOGGED_CLIENT_TEXT + 8);
    assert_eq!(super::loggable("visit-note"), "visit-note");
}

// --- panics and disk trouble ------------------------------------------------------------------

/// A world whose relay writes through [`FaultyStorage`].
async fn faulty_world() -> (World, Arc<Faults>) {
    let storage = Arc::new(MemoryStorage::new());
    let (faulty, faults) = FaultyStorage::new(storage.clone());
    (
        world_over(storage, Arc::new(faulty), Limits::default()).await,
        faults,
    )
}

/// A document is sent only after its `read` row is durable: when the row cannot be stored the
/// document never leaves, and the socket closes with 1011.
#[tokio::test]
async fn a_document_whose_read_row_cannot_be_stored_is_not_sent() {
    let (w, faults) = faulty_world().await;
    let (id, _) = stored_note(&w).await;
    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    faults.set(WriteFault::DiskFull);
    office.request(
        id,
        DocSync::new().generate(&Automerge::new()).expect("first"),
    );
    match office.frame().await {
        Some(Frame::Close(Some((code, _)))) => assert_eq!(code, close_code::INTERNAL_ERROR),
        other => panic!("expected the socket closed, got {other:?}"),
    }
    assert!(faults.refused() >= 1, "the read row's write was refused");
    faults.set(WriteFault::None);
    let reads = rows_for(&w.storage, id, AuditAction::Read).await;
    assert!(reads.is_empty(), "{reads:?}");
}

/// Requests sent back to back on one socket are answered in order, each document after its
/// own `read` row (the rows of requests waiting together share a commit).
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_each_after_its_read_row() {
    let w = world().await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(stored_note(&w).await.0);
    }
    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    for id in &ids {
        office.request(
            *id,
            DocSync::new().generate(&Automerge::new()).expect("first"),
        );
    }
    for id in &ids {
        match office.message().await {
            Message::Sync { document_id, .. } => {
                assert_eq!(document_id, *id, "answers keep the order of the requests");
                let reads = rows_for(&w.storage, *id, AuditAction::Read).await;
                assert!(
                    reads.iter().any(|r| r.event.user_id == *w.office.user_id()),
                    "the read row is durable before the document arrives"
                );
            }
            other => panic!("expected a sync message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_panic_while_committing_ends_that_session_only_and_nothing_unstored_is_served() {
    let (w, faults) = faulty_world().await;
    let (id, mut doc) = stored_note(&w).await;
    let stored_heads = doc.get_heads();
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let mut sync = DocSync::new();
    nurse.sync_until_in_sync(id, &mut doc, &mut sync).await;
    // The office has the note open in another session.
    let mut office = Client::connect(&w, &w.office);
    office.join().await;
    let (office_doc, _) = office.fetch(id).await;
    assert_eq!(office_doc.get_heads(), stored_heads);

    // The change is applied in memory; the commit panics.
    faults.set(WriteFault::PanicOnce);
    edit(&mut doc, "assessment", "applied in memory, never stored");
    nurse.sync(id, sync.generate(&doc).expect("changes"));
    let (message, code) = nurse.closed_with_error().await;
    assert!(
        message.contains("nothing from it was acknowledged"),
        "{message}"
    );
    assert_eq!(code, close_code::INTERNAL_ERROR);
    // The session task itself ended normally: the panic was contained in it.
    nurse.ended().await;
    assert_eq!(faults.refused(), 1, "the injected panic fired");

    // Storage never saw the change, and neither does anyone reading from the relay's memory.
    assert_eq!(
        w.storage
            .load_document(id)
            .await
            .expect("load")
            .expect("stored")
            .heads,
        stored_heads
    );
    let mut reader = Client::connect(&w, &w.office);
    reader.join().await;
    let (read, _) = reader.fetch(id).await;
    assert_eq!(
        read.get_heads(),
        stored_heads,
        "the uncommitted copy was discarded"
    );
    // The other session is alive: a new note of the nurse's reaches it when it asks.
    let (_, office_sync) = office.fetch(id).await;
    drop(office_sync);

    // The nurse reconnects and the same change is stored this time.
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    nurse
        .sync_until_in_sync(id, &mut doc, &mut DocSync::new())
        .await;
    assert_eq!(
        w.storage
            .load_document(id)
            .await
            .expect("load")
            .expect("stored")
            .heads,
        doc.get_heads()
    );
}

#[tokio::test]
async fn a_full_disk_fails_the_write_with_a_clear_error_and_service_recovers_with_the_disk() {
    let (w, faults) = faulty_world().await;
    let (id, mut doc) = stored_note(&w).await;
    let stored_heads = doc.get_heads();
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    let mut sync = DocSync::new();
    nurse.sync_until_in_sync(id, &mut doc, &mut sync).await;

    faults.set(WriteFault::DiskFull);
    edit(&mut doc, "assessment", "written while the disk is full");
    nurse.sync(id, sync.generate(&doc).expect("changes"));
    let (message, code) = nurse.closed_with_error().await;
    assert!(
        message.contains("nothing from your last message was acknowledged"),
        "{message}"
    );
    assert_eq!(code, close_code::INTERNAL_ERROR);
    nurse.ended().await;
    // A new note is refused the same way, and nothing of it is stored.
    let mut other = Client::connect(&w, &w.nurse);
    other.join().await;
    let new_id = DocumentId::random();
    let mut new_doc = note_doc(w.agency.as_str(), w.patient.as_str());
    let mut new_sync = DocSync::new();
    other.sync(new_id, new_sync.generate(&new_doc).expect("first"));
    let (message, _) = loop {
        match other.message().await {
            Message::Sync { data, .. } => {
                new_sync.receive(&mut new_doc, &data).expect("apply");
                if let Some(data) = new_sync.generate(&new_doc) {
                    other.sync(new_id, data);
                }
            }
            Message::Error { message } => break (message, ()),
            m => panic!("unexpected {m:?}"),
        }
    };
    assert!(message.contains("acknowledged"), "{message}");
    assert!(w.storage.document_row(new_id).await.expect("row").is_none());
    assert!(faults.refused() >= 2);
    assert_eq!(
        w.storage
            .load_document(id)
            .await
            .expect("load")
            .expect("stored")
            .heads,
        stored_heads,
        "nothing acknowledged was lost, nothing unacknowledged was stored"
    );

    // The disk has room again: the device's retry stores everything.
    faults.set(WriteFault::None);
    let mut nurse = Client::connect(&w, &w.nurse);
    nurse.join().await;
    nurse
        .sync_until_in_sync(id, &mut doc, &mut DocSync::new())
        .await;
    assert_eq!(
        w.storage
            .load_document(id)
            .await
            .expect("load")
            .expect("stored")
            .heads,
        doc.get_heads()
    );
}
