//! The fuzz harnesses, shared by the `cargo fuzz` targets (nightly, `fuzz/fuzz_targets/`) and
//! by the stable replay test (`tests/tests/fuzz_corpus.rs`, which includes this file), so a
//! committed crasher or interesting input is replayed through exactly the code that found it.
//!
//! Every harness states what must hold for any input: no panic anywhere, errors are errors,
//! and whatever is accepted reads back.

#![allow(clippy::missing_panics_doc)]

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use automerge::Automerge;
use fieldchart_core::model::{Actor, NoteText, Role, VisitStart, import_guard};
use fieldchart_core::protocol::{DocSync, DocumentId, Message, PeerId, PeerMetadata};
use fieldchart_core::store::{Store, StoreConfig, StoreKey};

/// The frame decoder: any bytes decode to a message or an error; a decoded message encodes
/// to bytes that decode to the same message.
pub fn frame_decode(data: &[u8]) {
    if let Ok(message) = Message::decode(data) {
        let again = Message::decode(&message.encode()).expect("a re-encoded message decodes");
        assert_eq!(again, message, "decode(encode(m)) == m");
    }
}

fn store_config(path: &Path, journal: bool) -> StoreConfig {
    StoreConfig {
        path: path.to_owned(),
        key: StoreKey::from_bytes([7; 32]),
        actor: Actor {
            user_id: "usr_fuzz".into(),
            device_id: "dev_fuzz".into(),
        },
        role: Role::Clinician,
        keystroke_journal: journal,
    }
}

/// Document import and load: arbitrary bytes as automerge data, through bare automerge and
/// through `Store::import` (which indexes, classifies and checks signatures). Garbage is an
/// error; an accepted import reads back with the heads bare automerge sees.
pub fn document_import(data: &[u8]) {
    struct Held {
        _dir: tempfile::TempDir,
        store: Store,
    }
    static STORE: OnceLock<std::sync::Mutex<Held>> = OnceLock::new();
    let held = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(store_config(&dir.path().join("import.db"), false)).expect("open");
        std::sync::Mutex::new(Held { _dir: dir, store })
    });
    // automerge 0.12 itself panics on some malformed chunks and aborts on others (an
    // allocation of gigabytes it cannot make; both found by this target, see
    // fuzz/regressions/document_import/): bytes reach bare automerge only past the import
    // guard, as in the app, and its panics are contained here; what must never panic is the
    // store's import below.
    let guarded = import_guard::check_chunks(data).is_ok();
    let bare = guarded
        .then(|| std::panic::catch_unwind(|| Automerge::load(data)).ok())
        .flatten()
        .and_then(Result::ok);
    // The same bytes as a sync message: refused by the guard or applied (or rejected) by
    // automerge, never an abort.
    if import_guard::check_sync_message(data).is_ok() {
        let _ = std::panic::catch_unwind(|| DocSync::new().receive(&mut Automerge::new(), data));
    }
    let held = held
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let id = DocumentId::random();
    if held.store.import(id, data).is_ok() {
        let mut heads = held
            .store
            .heads(id)
            .expect("an imported document has heads");
        heads.sort();
        if let Some(bare) = bare {
            let mut expected = bare.get_heads();
            expected.sort();
            assert_eq!(heads, expected, "the store holds what automerge loaded");
        }
    }
}

/// A closed store with a keystroke journal in use: its database files, to copy per input.
fn journal_template() -> &'static (tempfile::TempDir, DocumentId) {
    static TEMPLATE: OnceLock<(tempfile::TempDir, DocumentId)> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(store_config(&dir.path().join("j.db"), true)).expect("open");
        let note = store
            .start_visit(&VisitStart {
                agency_id: "agc_1".into(),
                patient_id: "pat_1".into(),
                service_type: "skilled-nursing".into(),
                date: "2026-11-30".into(),
                location: "1 Elm St".into(),
                started_at_ms: 1_764_460_800_000,
                start_monotonic_ms: 1,
            })
            .expect("visit");
        store
            .splice_text(note, NoteText::Assessment, 0, 0, "Alert and oriented.")
            .expect("splice");
        store.close().expect("close");
        (dir, note)
    })
}

/// Journal replay: a store opened with arbitrary bytes as its keystroke journal. Records must
/// authenticate (XChaCha20-Poly1305) to be replayed; anything else is set aside, never a
/// panic, and the note written before stays readable.
pub fn journal_replay(data: &[u8]) {
    let (template, note) = journal_template();
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(template.path()).expect("template") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.ends_with("-keystrokes") {
            continue;
        }
        std::fs::copy(&path, dir.path().join(&name)).expect("copy");
    }
    let db = dir.path().join("j.db");
    let mut journal = db.as_os_str().to_owned();
    journal.push("-keystrokes");
    std::fs::write(&journal, data).expect("write journal");
    if let Ok(store) = Store::open(store_config(&db, true)) {
        let read = store
            .visit_note(*note)
            .expect("the note reads after replay");
        assert!(
            read.assessment.starts_with("Alert and oriented."),
            "what was committed before is intact"
        );
    }
}

/// Store open on an arbitrary file: an error, never a panic.
pub fn store_open(data: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("any.db");
    std::fs::write(&db, data).expect("write");
    if let Ok(store) = Store::open(store_config(&db, false)) {
        let _ = store.document_ids();
    }
}

/// The relay's session message handling, in process: one authenticated clinician joins and
/// sends frames built from the input. Whatever it sends, its session ends or answers without
/// taking the relay down, and the stored note is unchanged unless a valid sync message
/// changed it (checked by reloading it from storage).
pub fn session_messages(data: &[u8]) {
    use fieldchart_server::session::Frame;
    let relay = relay_world();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let me = PeerId::new("fuzz-device".into());
    let join = Message::Join {
        sender_id: me.clone(),
        peer_metadata: PeerMetadata {
            storage_id: None,
            is_ephemeral: true,
        },
        supported_protocol_versions: vec!["1".into()],
    };
    let mut frames = vec![Frame::Binary(join.encode())];
    match mode % 4 {
        // Raw frames, each prefixed by a one-byte length.
        0 => {
            let mut rest = rest;
            while let Some((&len, tail)) = rest.split_first() {
                let len = usize::from(len).min(tail.len());
                frames.push(Frame::Binary(tail[..len].to_vec()));
                rest = &tail[len..];
            }
        }
        // The input as the data of a `sync` for the stored note.
        1 => frames.push(Frame::Binary(
            Message::Sync {
                sender_id: me.clone(),
                target_id: relay.peer.clone(),
                document_id: relay.note,
                data: rest.to_vec(),
            }
            .encode(),
        )),
        // ... for a new document.
        2 => frames.push(Frame::Binary(
            Message::Sync {
                sender_id: me.clone(),
                target_id: relay.peer.clone(),
                document_id: DocumentId::random(),
                data: rest.to_vec(),
            }
            .encode(),
        )),
        // ... as a `request` for the stored note, after a valid first message.
        _ => {
            frames.push(Frame::Binary(
                Message::Request {
                    sender_id: me.clone(),
                    target_id: relay.peer.clone(),
                    document_id: relay.note,
                    data: DocSync::new()
                        .generate(&Automerge::new())
                        .expect("first message"),
                }
                .encode(),
            ));
            frames.push(Frame::Binary(
                Message::Sync {
                    sender_id: me.clone(),
                    target_id: relay.peer.clone(),
                    document_id: relay.note,
                    data: rest.to_vec(),
                }
                .encode(),
            ));
        }
    }
    frames.push(Frame::Close(None));
    relay.runtime.block_on(async {
        let ticket = relay
            .state
            .sessions()
            .register(relay.principal.device_id.clone())
            .expect("admitted");
        let incoming = futures::stream::iter(
            frames
                .into_iter()
                .map(Ok::<_, std::convert::Infallible>)
                .collect::<Vec<_>>(),
        );
        let (sink, mut replies) = futures::channel::mpsc::unbounded::<Frame>();
        let session = tokio::spawn(fieldchart_server::session::run(
            relay.state.clone(),
            relay.principal.clone(),
            ticket,
            incoming,
            sink,
        ));
        // Drain the replies so the outbox never fills.
        let drain = tokio::spawn(async move {
            use futures::StreamExt;
            while replies.next().await.is_some() {}
        });
        tokio::time::timeout(Duration::from_secs(30), session)
            .await
            .expect("the session ends")
            .expect("the session task did not panic");
        let _ = drain.await;
        let stored = relay
            .state
            .storage()
            .load_document(relay.note)
            .await
            .expect("the stored note loads")
            .expect("the stored note exists");
        assert!(!stored.meta.kind.is_empty());
    });
}

struct RelayWorld {
    runtime: tokio::runtime::Runtime,
    state: fieldchart_server::AppState,
    principal: fieldchart_server::auth::Principal,
    peer: PeerId,
    note: DocumentId,
}

fn relay_world() -> &'static RelayWorld {
    static WORLD: OnceLock<RelayWorld> = OnceLock::new();
    WORLD.get_or_init(|| {
        use fieldchart_server::admin::{self, AdminContext};
        use fieldchart_server::identity::Role as RelayRole;
        use fieldchart_server::storage::{MemoryStorage, Storage};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (state, principal, peer, note) = runtime.block_on(async {
            let storage = Arc::new(MemoryStorage::new());
            let limits = fieldchart_server::config::Limits {
                // Inputs come fast; rate limits are not what is fuzzed here.
                message_rate_per_second: u32::MAX / 4,
                message_burst: u32::MAX / 4,
                byte_rate_per_second: u32::MAX / 4,
                byte_burst: u32::MAX / 4,
                ..fieldchart_server::config::Limits::default()
            };
            let state = fieldchart_server::AppState::new(storage.clone(), limits)
                .await
                .expect("state");
            let ctx = AdminContext::cli("fuzz");
            let agency = admin::create_agency(&*storage, &ctx, "Fuzz")
                .await
                .expect("agency");
            let user =
                admin::create_user(&*storage, &ctx, &agency.id, "Nurse", RelayRole::Clinician)
                    .await
                    .expect("user");
            let patient = admin::create_patient(&*storage, &ctx, &agency.id, "Pat")
                .await
                .expect("patient");
            admin::assign(&*storage, &ctx, &user.id, &patient.id)
                .await
                .expect("assign");
            let expires_at = fieldchart_server::clock::now_ms() + 30 * 86_400_000;
            let (device, _token) =
                admin::issue_token(&*storage, &ctx, &user.id, "phone", expires_at)
                    .await
                    .expect("token");
            let note = patient.chart_document_id;
            let peer = state.peer_id().clone();
            let principal = fieldchart_server::auth::Principal {
                user,
                device_id: device.id,
                expires_at,
            };
            let _ = storage.current_seq().await;
            (state, principal, peer, note)
        });
        RelayWorld {
            runtime,
            state,
            principal,
            peer,
            note,
        }
    })
}
