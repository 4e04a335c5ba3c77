//! Per-document sync logic shared by the relay and the device: one [`DocSync`] per
//! (document, remote peer), wrapping automerge's sync state, plus [`classify`] for the root
//! fields the relay authorizes on.
//!
//! The document is passed in by the caller on every call instead of being owned here, because
//! the caller owns its life cycle (load from storage, evict, persist) and may sync one document
//! with many peers. Documents are `automerge::Automerge`: automerge 0.12 implements
//! `sync::SyncDoc` for it directly, and the relay never edits so needs no `AutoCommit`. A device
//! that edits through `AutoCommit` passes `autocommit.document()` to [`DocSync::generate`] and
//! [`DocSync::in_sync`], and uses [`DocSync::receive_autocommit`] (`AutoCommit` lends out only
//! `&Automerge`, and its own sync wrapper keeps its patch log up to date).

use std::collections::HashMap;

use automerge::sync::{self, ChunkList, SyncDoc};
use automerge::{AutoCommit, Automerge, Change, ChangeHash, ObjType, ROOT, ReadDoc, Value};

use super::message::ProtocolError;

/// Sync state of one document with one remote peer; wraps `automerge::sync::State`.
#[derive(Debug, Clone, Default)]
pub struct DocSync {
    state: sync::State,
}

/// What one received sync message did to the document.
#[derive(Debug, Clone)]
pub struct ReceiveOutcome {
    pub heads_before: Vec<ChangeHash>,
    pub heads_after: Vec<ChangeHash>,
    /// Changes this message added to the document (empty if it only carried heads, needs or
    /// changes we already had). Persist them before replying: the reply tells the peer we have
    /// them, and that must not be said of anything that is not durable.
    pub new_changes: Vec<Change>,
}

impl ReceiveOutcome {
    /// Whether the document changed.
    pub fn changed(&self) -> bool {
        self.heads_before != self.heads_after
    }
}

impl DocSync {
    pub fn new() -> Self {
        DocSync::default()
    }

    /// The part of the state worth keeping across connections (the heads both sides are known
    /// to share), as `sync::State::encode` writes it. JS repos persist exactly this per storage
    /// id, which is what makes a reconnect cheap.
    pub fn encode(&self) -> Vec<u8> {
        self.state.encode()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let mut state = sync::State::decode(bytes)
            .map_err(|e| ProtocolError::InvalidSyncState(e.to_string()))?;
        // Stored bytes are as untrusted as the network: see `decode_sync_message`.
        canonicalize(&mut state.shared_heads);
        Ok(DocSync { state })
    }

    /// Applies one automerge sync message (the `data` of a `sync`/`request`).
    ///
    /// A payload that does not parse as a sync message is an `Err` and leaves both `doc` and
    /// this state untouched. If automerge rejects the changes inside a well-formed message, the
    /// sync state is left untouched; automerge validates changes before applying them, but does
    /// not promise atomicity, so on that error the caller should drop its in-memory copy of the
    /// document rather than persist it.
    pub fn receive(
        &mut self,
        doc: &mut Automerge,
        data: &[u8],
    ) -> Result<ReceiveOutcome, ProtocolError> {
        let message = decode_sync_message(data)?;
        let offered = message.changes.clone();
        let heads_before = doc.get_heads();
        // Work on a copy so a rejected message cannot leave the state half-updated.
        let mut state = self.state.clone();
        doc.receive_sync_message(&mut state, message)
            .map_err(|e| ProtocolError::SyncRejected(e.to_string()))?;
        self.state = state;
        let heads_after = doc.get_heads();
        // Applied changes always move the heads; changes queued for missing dependencies do
        // not, and are reported later, by the message that completes them.
        let new_changes = if heads_after == heads_before {
            Vec::new()
        } else {
            new_changes(doc, &heads_before, &offered)
        };
        Ok(ReceiveOutcome {
            heads_before,
            heads_after,
            new_changes,
        })
    }

    /// [`DocSync::receive`] for a document edited through `AutoCommit`.
    pub fn receive_autocommit(
        &mut self,
        doc: &mut AutoCommit,
        data: &[u8],
    ) -> Result<ReceiveOutcome, ProtocolError> {
        let message = decode_sync_message(data)?;
        let offered = message.changes.clone();
        let heads_before = doc.get_heads();
        let mut state = self.state.clone();
        doc.sync()
            .receive_sync_message(&mut state, message)
            .map_err(|e| ProtocolError::SyncRejected(e.to_string()))?;
        self.state = state;
        let heads_after = doc.get_heads();
        let new_changes = if heads_after == heads_before {
            Vec::new()
        } else {
            new_changes(doc.document(), &heads_before, &offered)
        };
        Ok(ReceiveOutcome {
            heads_before,
            heads_after,
            new_changes,
        })
    }

    /// The bytes of the whole document a sync message (`data`) carries, if its changes are
    /// exactly one whole-document chunk (how automerge sends a document the peer has nothing
    /// of) and nothing else; `None` for anything else, including bytes that do not parse.
    ///
    /// A document that was empty before [`DocSync::receive`] applied such a message (and now
    /// has content) holds exactly what these bytes load to: automerge loads a chunk into an
    /// empty document as a whole document, verifying its heads. The relay stores them as the
    /// new document's snapshot rather than encoding the document again.
    pub fn sole_document_chunk(data: &[u8]) -> Option<Vec<u8>> {
        const DOCUMENT: u8 = 0;
        let message = sync::Message::decode(data).ok()?;
        let mut chunks = message.changes.iter();
        let (Some(bytes), None) = (chunks.next(), chunks.next()) else {
            return None;
        };
        let (end, kind) = chunk_extent(bytes)?;
        (end == bytes.len() && kind == DOCUMENT).then(|| bytes.to_vec())
    }

    /// The next sync message to send, or `None` when there is nothing to say (in sync, or
    /// waiting for the peer to answer the message in flight).
    pub fn generate(&mut self, doc: &Automerge) -> Option<Vec<u8>> {
        doc.generate_sync_message(&mut self.state)
            .map(sync::Message::encode)
    }

    /// Start as if the peer had already said it holds nothing of the document: the next
    /// [`DocSync::generate`] then carries the whole document at once, where a fresh state would
    /// first announce our heads and wait to be asked (a round trip and two messages more).
    ///
    /// For a document the caller has good reason to believe the peer lacks (a device's note
    /// never offered to this relay). If the belief is wrong nothing breaks: the peer applies
    /// changes it already has as a no-op and answers with its heads, so the exchange still
    /// converges; only the document's bytes were sent for nothing. Does nothing once the peer
    /// has spoken or heads are known to be shared (the state is then no longer fresh).
    pub fn presume_peer_has_nothing(&mut self) {
        if self.state.their_heads.is_some() || !self.state.shared_heads.is_empty() {
            return;
        }
        self.state.their_heads = Some(Vec::new());
        self.state.their_need = Some(Vec::new());
        self.state.their_have = Some(vec![sync::Have::default()]);
        // automerge sends a whole document (one compressed chunk) only to a peer that reads
        // v2 messages; every peer on automerge 0.12 and automerge-repo 2 does.
        self.state.their_capabilities = Some(vec![
            sync::Capability::MessageV1,
            sync::Capability::MessageV2,
        ]);
    }

    /// The heads the peer last told us it has, if it has spoken in this session.
    pub fn their_heads(&self) -> Option<Vec<ChangeHash>> {
        self.state.their_heads.clone()
    }

    /// The heads we know the peer has: what a device records as the relay's receipt.
    pub fn shared_heads(&self) -> Vec<ChangeHash> {
        sorted(self.state.shared_heads.clone())
    }

    /// Whether we know the peer has exactly our document: it told us its heads equal ours, and
    /// those heads are shared. False until the peer has spoken in this session.
    pub fn in_sync(&self, doc: &Automerge) -> bool {
        let ours = doc.get_heads();
        self.state
            .their_heads
            .as_ref()
            .is_some_and(|theirs| sorted(theirs.clone()) == ours)
            && sorted(self.state.shared_heads.clone()) == ours
    }
}

/// The changes `doc` gained since `heads_before`: exactly `doc.get_changes(heads_before)`, same
/// changes in the same (causal) order, but taken from the message that brought them when it
/// can be. automerge 0.12 rebuilds a change from its op set, which costs in proportion to the
/// document rather than to the change; listing which changes are new (`get_changes_meta`)
/// does not. Every new change must be among the message's own change chunks, matched by hash
/// (which is computed from the change's bytes, so equal hashes are the same change). A message
/// whose changes came as a whole-document chunk, or changes that an earlier message left
/// waiting for their dependencies and this one released, fall back to `get_changes`.
fn new_changes(doc: &Automerge, heads_before: &[ChangeHash], offered: &ChunkList) -> Vec<Change> {
    let mut by_hash: HashMap<ChangeHash, Change> = offered
        .iter()
        .flat_map(change_chunks)
        .filter_map(|chunk| Change::try_from(chunk).ok())
        .map(|change| (change.hash(), change))
        .collect();
    let wanted = doc.get_changes_meta(heads_before);
    if wanted.len() > by_hash.len() {
        return doc.get_changes(heads_before);
    }
    let mut out = Vec::with_capacity(wanted.len());
    for meta in &wanted {
        match by_hash.remove(&meta.hash) {
            Some(change) => out.push(change),
            None => return doc.get_changes(heads_before),
        }
    }
    out
}

/// Length and type of the storage chunk at the start of `bytes` (see [`change_chunks`]).
fn chunk_extent(bytes: &[u8]) -> Option<(usize, u8)> {
    const HEADER: usize = 9;
    let kind = *bytes.get(HEADER - 1)?;
    let (body_len, len_bytes) = uleb128(bytes.get(HEADER..)?)?;
    let end = usize::try_from(body_len)
        .ok()?
        .checked_add(HEADER + len_bytes)
        .filter(|end| *end <= bytes.len())?;
    Some((end, kind))
}

/// The change chunks (types 1 and 2, plain and deflated) in `bytes`, a sequence of automerge
/// storage chunks: magic (4 bytes), checksum (4), type (1), body length (unsigned LEB128),
/// body. Other chunks (whole documents) are skipped; bytes that do not split cleanly end the
/// list. Only a shortcut for [`new_changes`], which checks what it finds against the document.
fn change_chunks(mut bytes: &[u8]) -> Vec<&[u8]> {
    const CHANGE: u8 = 1;
    const COMPRESSED_CHANGE: u8 = 2;
    let mut out = Vec::new();
    while let Some((end, kind)) = chunk_extent(bytes) {
        let (chunk, rest) = bytes.split_at(end);
        if matches!(kind, CHANGE | COMPRESSED_CHANGE) {
            out.push(chunk);
        }
        bytes = rest;
    }
    out
}

/// An unsigned LEB128 number at the start of `bytes` and how many bytes it took; `None` if it
/// is cut off or does not fit in 64 bits.
fn uleb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, byte) in bytes.iter().take(10).enumerate() {
        let low = u64::from(byte & 0x7f);
        let shift = 7 * u32::try_from(i).ok()?;
        if shift == 63 && low > 1 {
            return None;
        }
        value |= low << shift;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Parses a peer's sync message and puts its hash lists in canonical (sorted, deduplicated)
/// order. They are sets, and automerge assumes they arrive sorted: it copies the peer's heads
/// into the sync state and later re-encodes them behind a `debug_assert!` that they are sorted,
/// so an unsorted list from a peer would panic debug builds of the relay.
fn decode_sync_message(data: &[u8]) -> Result<sync::Message, ProtocolError> {
    crate::model::import_guard::check_sync_message(data)
        .map_err(|e| ProtocolError::InvalidSyncMessage(e.to_string()))?;
    let mut message = sync::Message::decode(data)
        .map_err(|e| ProtocolError::InvalidSyncMessage(e.to_string()))?;
    canonicalize(&mut message.heads);
    canonicalize(&mut message.need);
    for have in &mut message.have {
        canonicalize(&mut have.last_sync);
    }
    Ok(message)
}

fn canonicalize(heads: &mut Vec<ChangeHash>) {
    heads.sort_unstable();
    heads.dedup();
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    canonicalize(&mut heads);
    heads
}

/// Root fields the relay uses for access control.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootFields {
    pub kind: Option<String>,
    pub patient_id: Option<String>,
    pub agency_id: Option<String>,
}

/// Reads `kind`, `patientId` and `agencyId` from the document root.
///
/// Our own code writes them as scalar strings, but JS automerge 3 writes a plain JS string as a
/// Text object, so both are accepted. A field that is missing, empty, or of another type is
/// `None`: a JS client often creates a document before it fills the fields in, and the relay
/// must treat such a document as not yet classified rather than as belonging to "". Under
/// concurrent writes the value automerge shows (the deterministic winner) is returned.
pub fn classify(doc: &impl ReadDoc) -> RootFields {
    RootFields {
        kind: root_string(doc, "kind"),
        patient_id: root_string(doc, "patientId"),
        agency_id: root_string(doc, "agencyId"),
    }
}

fn root_string(doc: &impl ReadDoc, key: &str) -> Option<String> {
    let value = match doc.get(ROOT, key).ok()?? {
        (Value::Scalar(scalar), _) => scalar.as_str().map(str::to_owned),
        (Value::Object(ObjType::Text), id) => doc.text(&id).ok(),
        (Value::Object(_), _) => None,
    }?;
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{DocumentId, Message, PeerId};
    use automerge::transaction::Transactable;
    use proptest::prelude::*;

    fn doc_with(fields: &[(&str, &str)]) -> Automerge {
        let mut doc = Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            for (k, v) in fields {
                tx.put(ROOT, *k, *v)?;
            }
            Ok(())
        })
        .unwrap();
        doc
    }

    fn edit(doc: &mut Automerge, key: &str, value: &str) {
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, key, value)?;
            Ok(())
        })
        .unwrap();
    }

    /// One side of a connection: its copy of the document and its sync state for the other.
    struct Peer {
        id: PeerId,
        doc: Automerge,
        sync: DocSync,
    }

    impl Peer {
        fn new(name: &str, doc: Automerge) -> Self {
            Peer {
                id: PeerId::new(name.into()),
                doc,
                sync: DocSync::new(),
            }
        }

        /// The next frame to the other peer, if any, as it would go over the WebSocket.
        fn frame_to(&mut self, to: &Peer, document_id: DocumentId) -> Option<Vec<u8>> {
            let data = self.sync.generate(&self.doc)?;
            Some(
                Message::Sync {
                    sender_id: self.id.clone(),
                    target_id: to.id.clone(),
                    document_id,
                    data,
                }
                .encode(),
            )
        }

        fn receive_frame(&mut self, frame: &[u8], document_id: DocumentId) -> ReceiveOutcome {
            let Message::Sync {
                data,
                document_id: got,
                target_id,
                ..
            } = Message::decode(frame).unwrap()
            else {
                panic!("expected a sync frame")
            };
            assert_eq!(got, document_id);
            assert_eq!(target_id, self.id);
            self.sync.receive(&mut self.doc, &data).unwrap()
        }
    }

    /// Exchanges frames until neither side has anything to say; returns the number of frames.
    fn run_until_quiet(a: &mut Peer, b: &mut Peer, document_id: DocumentId) -> usize {
        let mut frames = 0;
        for _ in 0..100 {
            let a_to_b = a.frame_to(b, document_id);
            if let Some(f) = &a_to_b {
                b.receive_frame(f, document_id);
                frames += 1;
            }
            let b_to_a = b.frame_to(a, document_id);
            if let Some(f) = &b_to_a {
                a.receive_frame(f, document_id);
                frames += 1;
            }
            if a_to_b.is_none() && b_to_a.is_none() {
                return frames;
            }
        }
        panic!("sync did not go quiet in 100 rounds");
    }

    #[test]
    fn two_peers_converge_over_encoded_frames() {
        let id = DocumentId::random();
        let mut nurse = Peer::new(
            "nurse",
            doc_with(&[("kind", "visit-note"), ("narrative", "BP ok")]),
        );
        let mut office = Peer::new("office", Automerge::new());
        assert!(!nurse.sync.in_sync(&nurse.doc));

        run_until_quiet(&mut nurse, &mut office, id);
        assert_eq!(office.doc.get_heads(), nurse.doc.get_heads());
        assert_eq!(classify(&office.doc).kind.as_deref(), Some("visit-note"));
        assert!(nurse.sync.in_sync(&nurse.doc));
        assert!(office.sync.in_sync(&office.doc));
        assert_eq!(nurse.sync.shared_heads(), nurse.doc.get_heads());

        // Both edit concurrently, then reconnect with fresh session state restored from the
        // persisted part, as after an app restart.
        edit(&mut nurse.doc, "narrative", "BP 120/80");
        edit(&mut office.doc, "plan", "weekly visits");
        nurse.sync = DocSync::decode(&nurse.sync.encode()).unwrap();
        office.sync = DocSync::decode(&office.sync.encode()).unwrap();
        assert!(!nurse.sync.in_sync(&nurse.doc));

        run_until_quiet(&mut nurse, &mut office, id);
        assert_eq!(office.doc.get_heads(), nurse.doc.get_heads());
        assert_eq!(
            nurse.doc.get_heads().len(),
            2,
            "concurrent edits leave two heads"
        );
        for doc in [&nurse.doc, &office.doc] {
            assert_eq!(
                doc.get(ROOT, "plan").unwrap().unwrap().0.as_str(),
                Some("weekly visits")
            );
            assert_eq!(
                doc.get(ROOT, "narrative").unwrap().unwrap().0.as_str(),
                Some("BP 120/80")
            );
        }
        assert!(nurse.sync.in_sync(&nurse.doc) && office.sync.in_sync(&office.doc));
    }

    #[test]
    fn receive_reports_exactly_the_new_changes() {
        let id = DocumentId::random();
        let mut device = Peer::new("device", doc_with(&[("kind", "patient")]));
        let mut relay = Peer::new("relay", Automerge::new());

        let frame = device.frame_to(&relay, id).unwrap();
        let first = relay.receive_frame(&frame, id);
        // The first message only carries heads and a bloom filter.
        assert!(first.new_changes.is_empty() && !first.changed());
        let frame = relay.frame_to(&device, id).unwrap();
        device.receive_frame(&frame, id);
        let frame = device.frame_to(&relay, id).unwrap();
        let second = relay.receive_frame(&frame, id);
        assert!(second.changed());
        assert!(second.heads_before.is_empty());
        assert_eq!(second.heads_after, device.doc.get_heads());
        let hashes: Vec<ChangeHash> = second.new_changes.iter().map(Change::hash).collect();
        assert_eq!(hashes, device.doc.get_heads());

        // The new changes alone rebuild the document: they are what must be persisted.
        let mut stored = Automerge::new();
        stored.apply_changes(second.new_changes.clone()).unwrap();
        assert_eq!(stored.get_heads(), device.doc.get_heads());

        run_until_quiet(&mut device, &mut relay, id);
        edit(&mut device.doc, "patientId", "p-1");
        let frame = device.frame_to(&relay, id).unwrap();
        let third = relay.receive_frame(&frame, id);
        assert_eq!(third.heads_before, second.heads_after);
        assert_eq!(third.new_changes.len(), 1);
        assert_eq!(classify(&relay.doc).patient_id.as_deref(), Some("p-1"));
    }

    /// A sync message carrying `chunks` as its changes, as a peer may send them (any order,
    /// already known ones, several changes in one chunk, a whole document).
    fn message_with(chunks: Vec<Vec<u8>>) -> Vec<u8> {
        sync::Message {
            heads: Vec::new(),
            need: Vec::new(),
            have: Vec::new(),
            changes: ChunkList::from(chunks),
            flags: None,
            version: sync::MessageVersion::V1,
        }
        .encode()
    }

    fn raw(changes: &[&Change]) -> Vec<Vec<u8>> {
        changes.iter().map(|c| c.raw_bytes().to_vec()).collect()
    }

    /// Receives `data` on a copy of `doc` and checks that the reported new changes are exactly
    /// what `get_changes` rebuilds: same changes, same bytes, same (causal) order.
    fn assert_reports_like_get_changes(doc: &Automerge, data: &[u8]) -> Vec<ChangeHash> {
        let mut doc = doc.clone();
        let outcome = DocSync::new().receive(&mut doc, data).unwrap();
        let expected = doc.get_changes(&outcome.heads_before);
        let got: Vec<(ChangeHash, &[u8])> = outcome
            .new_changes
            .iter()
            .map(|c| (c.hash(), c.raw_bytes()))
            .collect();
        let want: Vec<(ChangeHash, &[u8])> =
            expected.iter().map(|c| (c.hash(), c.raw_bytes())).collect();
        assert_eq!(got, want);
        outcome.new_changes.iter().map(Change::hash).collect()
    }

    #[test]
    fn new_changes_taken_from_the_message_equal_what_get_changes_rebuilds() {
        // c1 <- c2 <- c3, and b1 concurrent with c2.
        let mut source = doc_with(&[("kind", "visit-note")]);
        let c1 = source.get_changes(&[]).remove(0);
        edit(&mut source, "x", "1");
        let c2 = source.get_changes(&[c1.hash()]).remove(0);
        edit(&mut source, "y", "2");
        let c3 = source.get_changes(&[c2.hash()]).remove(0);
        let mut branch = Automerge::new();
        branch.apply_changes([c1.clone()]).unwrap();
        edit(&mut branch, "z", "3");
        let b1 = branch.get_changes(&[c1.hash()]).remove(0);

        let mut has_c1 = Automerge::new();
        has_c1.apply_changes([c1.clone()]).unwrap();
        let mut has_c1_c2 = has_c1.clone();
        has_c1_c2.apply_changes([c2.clone()]).unwrap();

        // Out of causal order inside one message: reported in causal order.
        let got = assert_reports_like_get_changes(&has_c1, &message_with(raw(&[&c3, &b1, &c2])));
        assert_eq!(got.len(), 3);
        assert!(
            got.iter().position(|h| *h == c2.hash()) < got.iter().position(|h| *h == c3.hash())
        );
        // Re-sending changes the document has: only the new one is reported.
        let got = assert_reports_like_get_changes(&has_c1_c2, &message_with(raw(&[&c1, &c2, &c3])));
        assert_eq!(got, vec![c3.hash()]);
        // Several changes in one chunk (how automerge writes a v2 message).
        let joined: Vec<u8> = raw(&[&c2, &c3]).concat();
        let got = assert_reports_like_get_changes(&has_c1, &message_with(vec![joined]));
        assert_eq!(got, vec![c2.hash(), c3.hash()]);
        // A whole document instead of changes.
        let got =
            assert_reports_like_get_changes(&Automerge::new(), &message_with(vec![source.save()]));
        assert_eq!(got.len(), 3);

        // Changes that arrive before their dependencies wait; the message that completes them
        // reports them all, the waiting ones included, in causal order.
        let mut doc = has_c1.clone();
        let mut sync = DocSync::new();
        let first = sync.receive(&mut doc, &message_with(raw(&[&c3]))).unwrap();
        assert!(first.new_changes.is_empty() && !first.changed());
        let got = assert_reports_like_get_changes(&doc, &message_with(raw(&[&c2])));
        assert_eq!(got, vec![c2.hash(), c3.hash()]);
    }

    #[test]
    fn change_chunks_splits_concatenated_chunks_and_skips_documents_and_garbage() {
        let mut doc = doc_with(&[("kind", "visit-note")]);
        edit(&mut doc, "x", "1");
        let changes = doc.get_changes(&[]);
        let joined: Vec<u8> = raw(&changes.iter().collect::<Vec<_>>()).concat();
        let found = change_chunks(&joined);
        assert_eq!(found.len(), 2);
        for (chunk, change) in found.iter().zip(&changes) {
            assert_eq!(Change::try_from(*chunk).unwrap().hash(), change.hash());
        }
        assert!(
            change_chunks(&doc.save()).is_empty(),
            "a document is not a change"
        );
        assert!(change_chunks(&joined[..joined.len() - 1]).len() == 1);
        assert!(change_chunks(&[0xff; 12]).is_empty());
        assert_eq!(uleb128(&[0xe5, 0x8e, 0x26]), Some((624_485, 3)));
        assert_eq!(uleb128(&[0x80]), None);
        assert_eq!(uleb128(&[0xff; 11]), None);
    }

    #[test]
    fn a_message_carrying_only_a_whole_document_hands_its_bytes_back() {
        let mut source = doc_with(&[("kind", "visit-note")]);
        edit(&mut source, "x", "1");
        let saved = source.save();
        let data = message_with(vec![saved.clone()]);
        assert_eq!(DocSync::sole_document_chunk(&data), Some(saved.clone()));
        // What an empty document holds after receiving it is what the bytes load to.
        let mut doc = Automerge::new();
        DocSync::new().receive(&mut doc, &data).unwrap();
        assert_eq!(
            Automerge::load(&saved).unwrap().get_heads(),
            doc.get_heads()
        );

        let changes = source.get_changes(&[]);
        for other in [
            message_with(raw(&changes.iter().collect::<Vec<_>>())),
            message_with(vec![
                [saved.clone(), changes[0].raw_bytes().to_vec()].concat(),
            ]),
            message_with(vec![saved.clone(), saved.clone()]),
            message_with(vec![saved[..saved.len() - 1].to_vec()]),
            message_with(vec![]),
            b"garbage".to_vec(),
        ] {
            assert_eq!(DocSync::sole_document_chunk(&other), None);
        }
    }

    /// Messages until both sides are quiet, counting them; `device` starts presuming.
    fn exchange(device: &Automerge, relay: &mut Automerge, presume: bool) -> (usize, DocSync) {
        let mut device = device.clone();
        let mut device_sync = DocSync::new();
        if presume {
            device_sync.presume_peer_has_nothing();
        }
        let mut relay_sync = DocSync::new();
        let mut messages = 0;
        for _ in 0..10 {
            let up = device_sync.generate(&device);
            if let Some(data) = &up {
                messages += 1;
                relay_sync.receive(relay, data).unwrap();
            }
            let down = relay_sync.generate(relay);
            if let Some(data) = &down {
                messages += 1;
                device_sync.receive(&mut device, data).unwrap();
            }
            if up.is_none() && down.is_none() {
                break;
            }
        }
        (messages, device_sync)
    }

    #[test]
    fn presuming_the_peer_empty_sends_the_whole_document_first_and_halves_the_exchange() {
        let mut note = doc_with(&[("kind", "visit-note"), ("patientId", "p1")]);
        edit(&mut note, "narrative", "pain 3/10");
        // The usual exchange: heads, request, document, acknowledgement.
        let mut relay = Automerge::new();
        let (usual, _) = exchange(&note, &mut relay, false);
        assert_eq!(relay.get_heads(), note.get_heads());
        // Presumed: the first message is the whole document, the second its acknowledgement.
        let mut first = DocSync::new();
        first.presume_peer_has_nothing();
        let data = first.generate(&note).expect("a first message");
        assert_eq!(DocSync::sole_document_chunk(&data), Some(note.save()));
        let mut relay = Automerge::new();
        let (presumed, device_sync) = exchange(&note, &mut relay, true);
        assert_eq!(relay.get_heads(), note.get_heads());
        assert!(device_sync.in_sync(&note));
        assert_eq!((usual, presumed), (4, 2));
        // Wrong presumption: the peer already holds it (and more). Still converges.
        let mut relay = note.clone();
        edit(&mut relay, "office", "seen");
        let (_, device_sync) = exchange(&note, &mut relay, true);
        assert!(device_sync.shared_heads() == relay.get_heads());
        // A state that is not fresh is left alone.
        let mut spoken = device_sync.clone();
        spoken.presume_peer_has_nothing();
        assert_eq!(spoken.encode(), device_sync.encode());
        assert_eq!(spoken.their_heads(), device_sync.their_heads());
    }

    #[test]
    fn autocommit_documents_sync_too() {
        let mut device = AutoCommit::new();
        device.put(ROOT, "kind", "visit-note").unwrap();
        let mut device_sync = DocSync::new();
        let mut relay = Automerge::new();
        let mut relay_sync = DocSync::new();
        for _ in 0..10 {
            let up = device_sync.generate(device.document());
            if let Some(data) = &up {
                relay_sync.receive(&mut relay, data).unwrap();
            }
            let down = relay_sync.generate(&relay);
            if let Some(data) = &down {
                device_sync.receive_autocommit(&mut device, data).unwrap();
            }
            if up.is_none() && down.is_none() {
                break;
            }
        }
        assert_eq!(relay.get_heads(), device.get_heads());
        assert!(device_sync.in_sync(device.document()));
    }

    #[test]
    fn garbage_sync_data_is_refused_without_touching_the_doc() {
        let id = DocumentId::random();
        let mut device = Peer::new("device", doc_with(&[("kind", "patient")]));
        let mut relay = Peer::new("relay", doc_with(&[("kind", "visit-note")]));
        run_until_quiet(&mut device, &mut relay, id);
        edit(&mut device.doc, "x", "y");
        let valid = device.sync.generate(&device.doc).unwrap();

        let mut garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x00],
            vec![0x42],
            vec![
                0x43, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            b"not a sync message".to_vec(),
        ];
        // Every truncation of a real message, and the message with its change bytes flipped.
        garbage.extend((1..valid.len()).map(|n| valid[..n].to_vec()));
        garbage.extend((0..valid.len()).map(|i| {
            let mut v = valid.clone();
            v[i] ^= 0x55;
            v
        }));
        let mut refused = 0;
        for data in garbage {
            let frame = Message::Sync {
                sender_id: device.id.clone(),
                target_id: relay.id.clone(),
                document_id: id,
                data,
            }
            .encode();
            let Message::Sync { data, .. } = Message::decode(&frame).unwrap() else {
                panic!("expected a sync frame")
            };
            let mut doc = relay.doc.clone();
            let mut sync = relay.sync.clone();
            // Some cuts are themselves valid messages (e.g. without the trailing flags); the
            // rest must be refused with the document and the sync state as they were.
            if sync.receive(&mut doc, &data).is_err() {
                refused += 1;
                assert_eq!(doc.get_heads(), relay.doc.get_heads());
                assert_eq!(doc.save(), relay.doc.save());
                assert_eq!(sync.state, relay.sync.state);
            }
        }
        assert!(refused > valid.len(), "only {refused} refused");
        assert!(matches!(
            relay.sync.receive(&mut relay.doc, b"garbage"),
            Err(ProtocolError::InvalidSyncMessage(_))
        ));
    }

    /// A v1 sync message written by hand, so that hash lists can be unsorted or duplicated as
    /// a buggy or hostile peer might send them (automerge's encoder refuses to).
    fn raw_sync_message(
        heads: &[ChangeHash],
        need: &[ChangeHash],
        haves: &[Vec<ChangeHash>],
    ) -> Vec<u8> {
        fn hashes(out: &mut Vec<u8>, list: &[ChangeHash]) {
            out.push(u8::try_from(list.len()).unwrap());
            for h in list {
                out.extend_from_slice(h.as_ref());
            }
        }
        let mut out = vec![0x42];
        hashes(&mut out, heads);
        hashes(&mut out, need);
        out.push(u8::try_from(haves.len()).unwrap());
        for last_sync in haves {
            hashes(&mut out, last_sync);
            out.push(0); // empty bloom filter
        }
        out.push(0); // no changes
        out
    }

    #[test]
    fn unsorted_hashes_from_a_peer_do_not_panic() {
        let mut doc = doc_with(&[("kind", "patient")]);
        edit(&mut doc, "patientId", "p-1");
        let first = doc.get_changes(&[])[0].hash();
        let mut heads = vec![first, doc.get_heads()[0], first];
        heads.sort_unstable();
        heads.reverse();
        let mut sync = DocSync::new();
        sync.receive(
            &mut doc,
            &raw_sync_message(&heads, &heads, &[heads.clone(), heads.clone()]),
        )
        .unwrap();
        let _ = sync.generate(&doc);
        let restored = DocSync::decode(&sync.encode()).unwrap();
        assert!(restored.shared_heads().windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn sync_state_encode_decode() {
        let id = DocumentId::random();
        let mut a = Peer::new("a", doc_with(&[("kind", "patient")]));
        let mut b = Peer::new("b", Automerge::new());
        run_until_quiet(&mut a, &mut b, id);
        let restored = DocSync::decode(&a.sync.encode()).unwrap();
        assert_eq!(restored.shared_heads(), a.doc.get_heads());
        assert_eq!(restored.encode(), a.sync.encode());
        // Session-only knowledge is not persisted.
        assert_eq!(restored.their_heads(), None);
        assert_eq!(
            DocSync::decode(&DocSync::new().encode())
                .unwrap()
                .shared_heads(),
            vec![]
        );

        assert!(matches!(
            DocSync::decode(&[]),
            Err(ProtocolError::InvalidSyncState(_))
        ));
        assert!(DocSync::decode(&[0x99, 0x00]).is_err());
        assert!(DocSync::decode(&[0x43, 0x05, 0x01]).is_err());
    }

    #[test]
    fn classify_reads_scalars_and_text() {
        let scalar = doc_with(&[
            ("kind", "visit-note"),
            ("patientId", "p-7"),
            ("agencyId", "a-1"),
        ]);
        assert_eq!(
            classify(&scalar),
            RootFields {
                kind: Some("visit-note".into()),
                patient_id: Some("p-7".into()),
                agency_id: Some("a-1".into()),
            }
        );

        // What JS automerge 3 writes for `doc.patientId = "p-7"`: a Text object.
        let mut text = AutoCommit::new();
        text.put(ROOT, "kind", "patient").unwrap();
        let patient = text.put_object(ROOT, "patientId", ObjType::Text).unwrap();
        text.splice_text(&patient, 0, 0, "p-7").unwrap();
        let agency = text.put_object(ROOT, "agencyId", ObjType::Text).unwrap();
        text.splice_text(&agency, 0, 0, "a-1").unwrap();
        assert_eq!(
            classify(&text),
            RootFields {
                kind: Some("patient".into()),
                patient_id: Some("p-7".into()),
                agency_id: Some("a-1".into()),
            }
        );
    }

    #[test]
    fn classify_treats_missing_empty_and_other_types_as_none() {
        assert_eq!(classify(&Automerge::new()), RootFields::default());

        let mut doc = AutoCommit::new();
        doc.put(ROOT, "kind", "").unwrap();
        doc.put(ROOT, "patientId", 42_i64).unwrap();
        doc.put_object(ROOT, "agencyId", ObjType::Map).unwrap();
        assert_eq!(classify(&doc), RootFields::default());

        let mut doc = AutoCommit::new();
        doc.put_object(ROOT, "agencyId", ObjType::Text).unwrap();
        doc.put(ROOT, "patientId", "p-1").unwrap();
        assert_eq!(
            classify(&doc),
            RootFields {
                kind: None,
                patient_id: Some("p-1".into()),
                agency_id: None,
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random bytes as sync data never panic and never change the document.
        #[test]
        fn random_sync_data_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut doc = doc_with(&[("kind", "patient")]);
            let heads = doc.get_heads();
            let mut sync = DocSync::new();
            if sync.receive(&mut doc, &data).is_err() {
                prop_assert_eq!(doc.get_heads(), heads);
            }
            let _ = sync.generate(&doc);
        }

        /// Well-formed sync messages naming hashes we do not have (a confused or hostile peer)
        /// must not panic in receive or generate.
        #[test]
        fn hostile_sync_messages_never_panic(
            heads in proptest::collection::vec(any::<[u8; 32]>(), 0..3),
            need in proptest::collection::vec(any::<[u8; 32]>(), 0..3),
            last_sync in proptest::collection::vec(any::<[u8; 32]>(), 0..3),
            haves in 0usize..3,
        ) {
            let mut doc = doc_with(&[("kind", "patient")]);
            let known = doc.get_heads();
            let mut sync = DocSync::new();
            let last_sync: Vec<ChangeHash> = last_sync.into_iter().map(ChangeHash).collect();
            let mut have = vec![Vec::new(); haves];
            if let Some(h) = have.get_mut(1) {
                h.clone_from(&last_sync);
            }
            let heads: Vec<ChangeHash> = heads.into_iter().map(ChangeHash).chain(known).collect();
            let need: Vec<ChangeHash> = need.into_iter().map(ChangeHash).collect();
            let _ = sync.receive(&mut doc, &raw_sync_message(&heads, &need, &have));
            let _ = sync.generate(&doc);
            let _ = sync.in_sync(&doc);
            let _ = DocSync::decode(&sync.encode()).unwrap();
        }

        /// Convergence: any two sets of concurrent edits end in the same document.
        #[test]
        fn peers_converge(
            left in proptest::collection::vec(("[a-d]", "[a-z]{0,4}"), 0..5),
            right in proptest::collection::vec(("[a-d]", "[a-z]{0,4}"), 0..5),
        ) {
            let id = DocumentId::random();
            let mut a = Peer::new("a", Automerge::new());
            let mut b = Peer::new("b", Automerge::new());
            for (k, v) in &left {
                edit(&mut a.doc, k, v);
            }
            for (k, v) in &right {
                edit(&mut b.doc, k, v);
            }
            run_until_quiet(&mut a, &mut b, id);
            prop_assert_eq!(a.doc.get_heads(), b.doc.get_heads());
            for key in ["a", "b", "c", "d"] {
                let va = a.doc.get(ROOT, key).unwrap().map(|(v, _)| v.as_str().map(str::to_owned));
                let vb = b.doc.get(ROOT, key).unwrap().map(|(v, _)| v.as_str().map(str::to_owned));
                prop_assert_eq!(va, vb);
            }
        }
    }
}
