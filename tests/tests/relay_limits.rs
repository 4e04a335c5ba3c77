//! The relay's bounds and its answers to hostile devices, through the real relay process:
//! an oversize frame, floods from one token while another device keeps syncing, revocation
//! racing the handshake, the per-device session cap, the existence oracle, and deny rows that
//! a device cannot forge into another agency's trail.

use std::time::{Duration, Instant};

use automerge::Automerge;
use fieldchart_core::protocol::{DocSync, DocumentId, Message, PeerId, PeerMetadata};
use fieldchart_tests::relay_process::{
    Admin, ConnectError, MESSAGE_TIMEOUT, RelayProcess, SyncOutcome, TestPeer, set, visit_note,
};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite;

/// The relay's default frame limit (`fieldchart_server::config::MAX_FRAME_BYTES`).
const FRAME_LIMIT: usize = fieldchart_server::config::MAX_FRAME_BYTES;

/// Longest one normal sync round trip may take while another token floods the relay. Normal
/// round trips take milliseconds; this margin is for a loaded 2-core machine.
const LATENCY_BOUND: Duration = Duration::from_secs(3);

/// A revoked device's open session must be closed within this (DOMAIN "lost devices"), with a
/// margin for a loaded machine.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(3);

/// A protocol v1 peer that sends exactly what a test gives it and returns every message raw.
struct RawPeer {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    id: PeerId,
    relay: PeerId,
}

/// What the relay said last before closing.
#[derive(Debug)]
struct Closed {
    error: Option<String>,
    code: Option<u16>,
}

impl RawPeer {
    async fn connect(url: &str) -> RawPeer {
        let (mut socket, _) =
            tokio::time::timeout(MESSAGE_TIMEOUT, tokio_tungstenite::connect_async(url))
                .await
                .expect("connect in time")
                .expect("connect");
        let id = PeerId::random("raw-peer");
        let join = Message::Join {
            sender_id: id.clone(),
            peer_metadata: PeerMetadata::default(),
            supported_protocol_versions: vec!["1".into()],
        };
        socket
            .send(tungstenite::Message::Binary(join.encode().into()))
            .await
            .expect("send join");
        let mut peer = RawPeer {
            socket,
            id,
            relay: PeerId::new(String::new()),
        };
        match peer.recv().await {
            Ok(Message::Peer { sender_id, .. }) => peer.relay = sender_id,
            other => panic!("expected peer, got {other:?}"),
        }
        peer
    }

    async fn send_bytes(&mut self, bytes: Vec<u8>) {
        // A send on a closed socket shows up at the next receive.
        let _ = self
            .socket
            .send(tungstenite::Message::Binary(bytes.into()))
            .await;
    }

    async fn sync(&mut self, id: DocumentId, data: Vec<u8>) {
        let message = Message::Sync {
            sender_id: self.id.clone(),
            target_id: self.relay.clone(),
            document_id: id,
            data,
        };
        self.send_bytes(message.encode()).await;
    }

    async fn request(&mut self, id: DocumentId, data: Vec<u8>) {
        let message = Message::Request {
            sender_id: self.id.clone(),
            target_id: self.relay.clone(),
            document_id: id,
            data,
        };
        self.send_bytes(message.encode()).await;
    }

    /// The next protocol message, or how the relay closed.
    async fn recv(&mut self) -> Result<Message, Closed> {
        let mut error = None;
        loop {
            let frame = tokio::time::timeout(MESSAGE_TIMEOUT, self.socket.next())
                .await
                .expect("the relay answered in time");
            match frame {
                Some(Ok(tungstenite::Message::Binary(bytes))) => {
                    match Message::decode(&bytes).expect("valid frame") {
                        Message::Error { message } => error = Some(message),
                        message => return Ok(message),
                    }
                }
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    return Err(Closed {
                        error,
                        code: frame.map(|f| u16::from(f.code)),
                    });
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(Closed { error, code: None }),
            }
        }
    }

    /// Messages until the relay closes; returns how it closed.
    async fn until_closed(&mut self) -> Closed {
        for _ in 0..100_000 {
            if let Err(closed) = self.recv().await {
                return closed;
            }
        }
        panic!("the relay kept talking instead of closing");
    }
}

struct Agency {
    dir: tempfile::TempDir,
    admin: Admin,
    agency: String,
    nurse: String,
    patient: String,
}

fn agency() -> Agency {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let (patient, _) = admin.create_patient(&agency, "Ada");
    admin.assign(&nurse, &patient);
    Agency {
        dir,
        admin,
        agency,
        nurse,
        patient,
    }
}

/// `len` pseudo-random letters: automerge compresses large columns, these stay large.
fn noise(len: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

#[tokio::test]
async fn a_frame_a_mebibyte_over_the_limit_gets_a_clear_error_and_the_relay_serves_on() {
    let a = agency();
    let token = a.admin.issue_token(&a.nurse, "phone").token;
    let relay = RelayProcess::start(a.dir.path());
    let mut peer = RawPeer::connect(&relay.ws_url(&token)).await;
    peer.send_bytes(vec![0xa0; FRAME_LIMIT + 1024 * 1024]).await;
    let closed = peer.until_closed().await;
    let error = closed.error.expect("an error message before the close");
    assert!(
        error.contains(&format!("exceeds the limit of {FRAME_LIMIT} bytes")),
        "{error}"
    );
    assert_eq!(closed.code, Some(1009));
    // The relay is fine: the same device syncs a note right after.
    let mut phone = TestPeer::connect(&relay.ws_url(&token), None)
        .await
        .expect("connect");
    let note = phone.create(visit_note(&a.agency, &a.patient, &a.nurse));
    assert!(matches!(phone.sync(note).await, SyncOutcome::InSync(_)));
}

/// Sync one small edit of `note` and return how long the round trip took.
async fn timed_edit(phone: &mut TestPeer, note: DocumentId, i: usize) -> Duration {
    set(
        phone.doc_mut(note).expect("note"),
        "assessment",
        &format!("edit {i}"),
    );
    let started = Instant::now();
    assert!(matches!(phone.sync(note).await, SyncOutcome::InSync(_)));
    started.elapsed()
}

#[tokio::test]
async fn floods_from_one_token_are_cut_off_while_another_device_keeps_syncing() {
    let a = agency();
    let flooder = a.admin.create_user(&a.agency, "Flooder", "clinician");
    let flood_token = a.admin.issue_token(&flooder, "rogue").token;
    let hold_token = a.admin.issue_token(&flooder, "rogue tablet").token;
    let token = a.admin.issue_token(&a.nurse, "phone").token;
    let relay = RelayProcess::start(a.dir.path());

    let mut phone = TestPeer::connect(&relay.ws_url(&token), Some("phone"))
        .await
        .expect("connect");
    let note = phone.create(visit_note(&a.agency, &a.patient, &a.nurse));
    assert!(matches!(phone.sync(note).await, SyncOutcome::InSync(_)));

    // Byte flood: 1.5 MiB frames as fast as the socket takes them, until the relay cuts it off.
    let url = relay.ws_url(&flood_token);
    let byte_flood = tokio::spawn(async move {
        let mut peer = RawPeer::connect(&url).await;
        let mut sent = 0usize;
        loop {
            peer.request(DocumentId::random(), vec![0x42; 1536 * 1024])
                .await;
            sent += 1;
            // Each answer (doc-unavailable) or the close.
            match peer.recv().await {
                Ok(_) => {}
                Err(closed) => return (sent, closed),
            }
            assert!(sent < 1000, "the byte flood was never cut off");
        }
    });

    // Held-document flood: unclassified documents (no agencyId/patientId) of ~400 KB each.
    let url = relay.ws_url(&hold_token);
    let held_flood = tokio::spawn(async move {
        let mut peer = RawPeer::connect(&url).await;
        let mut unavailable = 0;
        for i in 0..40u64 {
            let id = DocumentId::random();
            let mut doc = Automerge::new();
            set(&mut doc, "blob", &noise(400_000, i + 1));
            let mut sync = DocSync::new();
            peer.sync(id, sync.generate(&doc).expect("first")).await;
            // The relay asks for this document's changes; refusals of earlier ones may come
            // first.
            loop {
                match peer.recv().await {
                    Ok(Message::Sync {
                        document_id, data, ..
                    }) if document_id == id => {
                        sync.receive(&mut doc, &data).expect("apply");
                        peer.sync(id, sync.generate(&doc).expect("changes")).await;
                        break;
                    }
                    Ok(Message::DocUnavailable { .. }) => unavailable += 1,
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(closed) => return (unavailable, Some(closed)),
                }
            }
        }
        // A request for an unknown id marks where the relay has handled everything above.
        let probe = DocSync::new().generate(&Automerge::new()).expect("first");
        let last = DocumentId::random();
        peer.request(last, probe).await;
        loop {
            match peer.recv().await {
                Ok(Message::DocUnavailable { document_id, .. }) if document_id == last => {
                    return (unavailable, None);
                }
                Ok(Message::DocUnavailable { .. }) => unavailable += 1,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(closed) => return (unavailable, Some(closed)),
            }
        }
    });

    // The nurse keeps charting while both floods run.
    let mut slowest = Duration::ZERO;
    let mut i = 0;
    while !(byte_flood.is_finished() && held_flood.is_finished()) && i < 500 {
        slowest = slowest.max(timed_edit(&mut phone, note, i).await);
        i += 1;
    }
    for _ in 0..5 {
        slowest = slowest.max(timed_edit(&mut phone, note, i).await);
        i += 1;
    }
    assert!(
        slowest < LATENCY_BOUND,
        "a normal sync took {slowest:?} during the floods"
    );

    let (sent, closed) = byte_flood.await.expect("byte flood task");
    let error = closed.error.expect("an error message");
    assert!(error.contains("bytes per second"), "{error}");
    assert_eq!(closed.code, Some(1008));
    assert!(sent < 40, "cut off after {sent} frames of 1.5 MiB");

    let (unavailable, closed) = held_flood.await.expect("held flood task");
    assert!(
        closed.is_none(),
        "the held flood stays connected: {closed:?}"
    );
    assert!(
        unavailable >= 15,
        "only {unavailable} of 40 held documents of 400 KB were refused"
    );
}

#[tokio::test]
async fn revocation_racing_the_handshake_never_leaves_a_session_open() {
    let a = agency();
    let boss = a.admin.create_user(&a.agency, "Boss", "admin");
    let admin_token = a.admin.issue_token(&boss, "desk").token;
    let tokens: Vec<_> = (0..50)
        .map(|i| a.admin.issue_token(&a.nurse, &format!("phone {i}")))
        .collect();
    let relay = RelayProcess::start(a.dir.path());
    let http = reqwest::Client::new();
    let (mut refused, mut closed) = (0, 0);
    for issued in &tokens {
        let revoke = async {
            let url = format!(
                "{}/v1/admin/devices/{}/revoke",
                relay.http_base(),
                issued.device_id
            );
            let response = http
                .post(&url)
                .bearer_auth(&admin_token)
                .send()
                .await
                .expect("revoke request");
            assert!(response.status().is_success(), "{}", response.status());
        };
        let url = relay.ws_url(&issued.token);
        let (connected, ()) = tokio::join!(TestPeer::connect(&url, None), revoke);
        match connected {
            Err(ConnectError::Status(401)) => refused += 1,
            Err(ConnectError::Refused(message)) if message.contains("revoked") => closed += 1,
            Err(other) => panic!("unexpected connect failure: {other:?}"),
            Ok(mut peer) => {
                // Connected before the revocation landed: it must be closed, promptly.
                let reason = tokio::time::timeout(REVOCATION_DEADLINE, peer.closed())
                    .await
                    .expect("a session of a revoked device stayed open");
                assert!(
                    reason.as_deref().is_some_and(|r| r.contains("revoked")),
                    "{reason:?}"
                );
                closed += 1;
            }
        }
        // And the token is dead for good.
        assert_eq!(
            TestPeer::connect(&relay.ws_url(&issued.token), None)
                .await
                .err(),
            Some(ConnectError::Status(401))
        );
    }
    assert_eq!(refused + closed, tokens.len());
}

#[tokio::test]
async fn a_device_gets_at_most_its_session_cap() {
    let a = agency();
    let token = a.admin.issue_token(&a.nurse, "phone").token;
    let other = a.admin.issue_token(&a.nurse, "tablet").token;
    let relay = RelayProcess::start(a.dir.path());
    let cap = fieldchart_server::config::MAX_SESSIONS_PER_DEVICE;
    let mut open = Vec::new();
    for _ in 0..cap {
        open.push(
            TestPeer::connect(&relay.ws_url(&token), None)
                .await
                .expect("within the cap"),
        );
    }
    assert_eq!(
        TestPeer::connect(&relay.ws_url(&token), None).await.err(),
        Some(ConnectError::Status(503))
    );
    // Another device of the same user is not affected.
    let _tablet = TestPeer::connect(&relay.ws_url(&other), None)
        .await
        .expect("another device");
    // Closing one makes room (the relay notices the close; retry a bounded number of times).
    open.pop().expect("one").close().await;
    let mut admitted = false;
    for _ in 0..200 {
        match TestPeer::connect(&relay.ws_url(&token), None).await {
            Ok(_) => {
                admitted = true;
                break;
            }
            Err(ConnectError::Status(503)) => tokio::task::yield_now().await,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(admitted, "room again once a session closed");
}

/// The median of `samples`.
fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The relay's answer with the document id blanked: equal answers about two ids are equal.
fn blanked(message: Message) -> Vec<u8> {
    let blank = DocumentId::from_bytes([0; 16]);
    match message {
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
    }
    .encode()
}

#[tokio::test]
async fn an_existing_note_the_device_may_not_see_answers_like_an_unknown_id_in_content_and_time() {
    let a = agency();
    let outsider = a.admin.create_user(&a.agency, "Off the team", "clinician");
    let nurse_token = a.admin.issue_token(&a.nurse, "phone").token;
    let outsider_token = a.admin.issue_token(&outsider, "phone").token;
    let relay = RelayProcess::start(a.dir.path());

    let mut phone = TestPeer::connect(&relay.ws_url(&nurse_token), None)
        .await
        .expect("connect");
    let mut notes = Vec::new();
    for _ in 0..20 {
        let note = phone.create(visit_note(&a.agency, &a.patient, &a.nurse));
        assert!(matches!(phone.sync(note).await, SyncOutcome::InSync(_)));
        notes.push(note);
    }
    let copy = phone.doc(notes[0]).expect("note").clone();

    let mut probe = RawPeer::connect(&relay.ws_url(&outsider_token)).await;
    let empty = DocSync::new().generate(&Automerge::new()).expect("first");
    let holding = DocSync::new().generate(&copy).expect("first");
    let (mut unknown_times, mut denied_times) = (Vec::new(), Vec::new());
    for (round, note) in notes.iter().enumerate() {
        for is_request in [true, false] {
            let data = if is_request { &empty } else { &holding };
            let mut answers = Vec::new();
            // Alternate which goes first, so drift in load does not favour one side.
            let ids = if round % 2 == 0 {
                [(DocumentId::random(), false), (*note, true)]
            } else {
                [(*note, true), (DocumentId::random(), false)]
            };
            for (id, denied) in ids {
                let started = Instant::now();
                if is_request {
                    probe.request(id, data.clone()).await;
                } else {
                    probe.sync(id, data.clone()).await;
                }
                let answer = probe.recv().await.expect("an answer");
                let took = started.elapsed();
                assert_eq!(answer.document_id(), Some(id));
                if denied {
                    denied_times.push(took);
                } else {
                    unknown_times.push(took);
                }
                answers.push(blanked(answer));
            }
            assert_eq!(
                answers[0], answers[1],
                "request={is_request}: a denied note's answer differs from an unknown id's"
            );
        }
    }
    let (unknown, denied) = (median(unknown_times), median(denied_times));
    // Generous: the two paths do the same work but one row lookup (and a care-team check).
    let bound = |d: Duration| d * 3 + Duration::from_millis(30);
    assert!(
        denied <= bound(unknown) && unknown <= bound(denied),
        "median answer: unknown {unknown:?}, denied {denied:?}"
    );
}

/// Audit rows through the CLI until `done` holds (the relay writes deny rows just after it
/// answers); a bounded number of CLI runs.
fn audit_until(admin: &Admin, args: &[&str], done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    for _ in 0..100 {
        let rows = admin.run(args)["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if done(&rows) {
            return rows;
        }
    }
    panic!("the audit rows never appeared");
}

#[tokio::test]
async fn a_device_cannot_forge_deny_rows_into_another_agencys_trail() {
    let a = agency();
    let other_agency = a.admin.create_agency("Hillside");
    let (their_patient, _) = a.admin.create_patient(&other_agency, "Grace");
    let token = a.admin.issue_token(&a.nurse, "phone").token;
    let relay = RelayProcess::start(a.dir.path());

    let mut peer = RawPeer::connect(&relay.ws_url(&token)).await;
    let mut forged = Vec::new();
    for _ in 0..5 {
        let id = DocumentId::random();
        let mut doc = visit_note(&other_agency, &their_patient, &a.nurse);
        let mut sync = DocSync::new();
        peer.sync(id, sync.generate(&doc).expect("first")).await;
        let Ok(Message::Sync { data, .. }) = peer.recv().await else {
            panic!("expected the relay to ask for the changes")
        };
        sync.receive(&mut doc, &data).expect("apply");
        peer.sync(id, sync.generate(&doc).expect("changes")).await;
        assert!(matches!(
            peer.recv().await,
            Ok(Message::DocUnavailable { document_id, .. }) if document_id == id
        ));
        forged.push(id.to_string());
    }

    let rows = audit_until(&a.admin, &["audit", "--user", &a.nurse], |rows| {
        forged
            .iter()
            .all(|id| rows.iter().any(|r| r["documentId"] == id.as_str()))
    });
    for row in rows.iter().filter(|r| r["action"] == "deny") {
        assert_eq!(row["agencyId"], a.agency.as_str(), "{row}");
        assert_eq!(row["patientId"], Value::Null, "{row}");
    }
    assert!(
        a.admin.audit_for_patient(&their_patient).is_empty(),
        "nothing was written into the other agency's patient trail"
    );
}
