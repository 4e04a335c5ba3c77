//! automerge-repo protocol v1, as sans-IO code shared by the relay and the device.
//!
//! This is the wire protocol of the JS packages `@automerge/automerge-repo` and
//! `@automerge/automerge-repo-network-websocket` (2.x), so any JS automerge-repo client can sync
//! with our relay. Their source is the spec; this module was checked against 2.5.6.
//!
//! # The protocol
//!
//! One binary WebSocket frame carries one CBOR map with a `type` field ([`Message`]).
//!
//! 1. Handshake: the client sends `join` with its `senderId`, `peerMetadata` (`storageId`,
//!    `isEphemeral`) and `supportedProtocolVersions: ["1"]`; the server answers `peer` with
//!    `selectedProtocolVersion: "1"`, or `error` and closes.
//! 2. Per document, either side sends `request` (first message for a document it does not have)
//!    or `sync`; `data` is an automerge sync message, handled by [`DocSync`]. Each side keeps one
//!    sync state per (document, peer) and answers until neither has anything to say. A peer
//!    that does not have, or may not share, the document answers `doc-unavailable`.
//! 3. `ephemeral` messages are relayed application broadcasts; `remote-subscription-change` and
//!    `remote-heads-changed` are remote-heads gossip, decoded so they are not errors, and
//!    otherwise ignored.
//!
//! Ids ([`DocumentId`], heads) are bs58check strings; `peerMetadata.storageId` is how JS peers
//! key the sync state they persist, so a relay advertises a stable one.
//!
//! # Why sans-IO
//!
//! Nothing here touches a socket, a clock, a thread or storage: [`Message::decode`] takes
//! bytes and returns a value, [`DocSync::receive`] takes a document and a payload and returns
//! what changed, [`DocSync::generate`] returns the bytes to send. The relay (tokio + axum) and
//! the phone (uniffi + its own runtime) drive the same code with their own I/O, and the tests
//! drive it with plain function calls, deterministically, with no servers and no sleeps. It also
//! makes ordering explicit at the call site: [`ReceiveOutcome::new_changes`] is handed back so
//! the caller persists before it generates a reply, because a reply claims the changes.
//!
//! # Example
//!
//! ```
//! use automerge::{Automerge, ROOT, transaction::Transactable};
//! use fieldchart_core::protocol::{DocSync, DocumentId, Message, PeerId, classify};
//!
//! let document_id = DocumentId::random();
//! let (device_id, relay_id) = (PeerId::random("device"), PeerId::random("relay"));
//!
//! let mut device_doc = Automerge::new();
//! device_doc
//!     .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "kind", "visit-note").map(|_| ()))
//!     .unwrap();
//! let (mut device, mut relay) = (DocSync::new(), DocSync::new());
//! let mut relay_doc = Automerge::new();
//!
//! // Exchange frames until both sides are quiet.
//! loop {
//!     let mut quiet = true;
//!     if let Some(data) = device.generate(&device_doc) {
//!         quiet = false;
//!         let frame = Message::Sync {
//!             sender_id: device_id.clone(),
//!             target_id: relay_id.clone(),
//!             document_id,
//!             data,
//!         }
//!         .encode();
//!         if let Ok(Message::Sync { data, .. }) = Message::decode(&frame) {
//!             let outcome = relay.receive(&mut relay_doc, &data).unwrap();
//!             // A relay persists `outcome.new_changes` here, before it replies.
//!             let _ = outcome.new_changes;
//!         }
//!     }
//!     if let Some(data) = relay.generate(&relay_doc) {
//!         quiet = false;
//!         device.receive(&mut device_doc, &data).unwrap();
//!     }
//!     if quiet {
//!         break;
//!     }
//! }
//! assert_eq!(relay_doc.get_heads(), device_doc.get_heads());
//! assert_eq!(classify(&relay_doc).kind.as_deref(), Some("visit-note"));
//! ```

mod cbor;
mod doc_sync;
mod ids;
mod message;

pub use doc_sync::{DocSync, ReceiveOutcome, RootFields, classify};
pub use ids::{
    DocumentId, PeerId, StorageId, URL_PREFIX, decode_head, decode_heads, encode_head, encode_heads,
};
pub use message::{
    MAX_FRAME_BYTES, MAX_ID_BYTES, MAX_PROTOCOL_VERSIONS, Message, PROTOCOL_VERSION, PeerMetadata,
    ProtocolError,
};
