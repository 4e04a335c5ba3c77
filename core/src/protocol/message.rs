//! The messages of automerge-repo protocol v1 and their CBOR encoding.
//!
//! The field names and shapes follow the JS sources, which are the spec:
//! `automerge-repo/src/network/messages.ts` (repo messages),
//! `automerge-repo-network-websocket/src/messages.ts` (`join`/`peer`/`error`) and
//! `automerge-repo/src/helpers/cbor.ts` (cbor-x with `tagUint8Array: false`, so byte fields are
//! plain byte strings). Decoding is lenient where the JS peers are lenient, because a relay that
//! rejects what a real client sends is a relay nobody can use; it is strict about anything the
//! caller will act on (ids, sync data).

use std::convert::Infallible;
use std::fmt;

use minicbor::Encoder;
use minicbor::data::Type;

use super::cbor::{Reader, is_nil};
use super::ids::{DocumentId, PeerId, StorageId, snippet};

/// The only protocol version of the JS websocket adapter (`ProtocolV1`).
pub const PROTOCOL_VERSION: &str = "1";

/// Largest frame accepted, in bytes (16 MiB).
///
/// A frame is held whole in memory while it is decoded, so this bounds the memory one
/// connection can pin. Our documents are small (a saved visit note is ~400 bytes, DESIGN §2),
/// and the largest frame a peer sends is the first sync of a document, which automerge sends as
/// one compressed snapshot: 16 MiB leaves room for a document tens of thousands of times that
/// size while staying well under the JS `ws` server's default `maxPayload` (100 MiB). A
/// legitimate client does not meet the limit; a hostile one cannot make the relay buffer more
/// than 16 MiB per socket.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Longest peer id, storage id or ephemeral session id accepted, in bytes. JS ids are ~10 to 40
/// characters; ids end up in maps and log lines, so a megabyte "id" is refused.
pub const MAX_ID_BYTES: usize = 1024;

/// Most entries accepted in `supportedProtocolVersions` (JS sends one).
pub const MAX_PROTOCOL_VERSIONS: usize = 16;

/// Why a frame or sync payload was refused. Messages name fields, never echo payload bytes, and
/// quote at most 64 characters of an offending id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed CBOR: {0}")]
    Cbor(String),
    #[error("message is missing the required field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` must be a {expected}")]
    InvalidField {
        field: &'static str,
        expected: &'static str,
    },
    /// A well-formed message of a type this code does not know. JS peers log and drop such
    /// messages (`NetworkSubsystem`), so a caller may do the same instead of closing.
    #[error("unknown message type {0}")]
    UnknownType(String),
    #[error("invalid document id {0}")]
    InvalidDocumentId(String),
    #[error("invalid heads {0}")]
    InvalidHeads(String),
    #[error("invalid automerge sync message: {0}")]
    InvalidSyncMessage(String),
    #[error("invalid persisted sync state: {0}")]
    InvalidSyncState(String),
    #[error("automerge refused the sync message: {0}")]
    SyncRejected(String),
}

/// `peerMetadata` of `join`/`peer`. An absent or `undefined` `storageId` and an absent
/// `isEphemeral` decode as `None`/`false`, as the JS repo reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    pub storage_id: Option<StorageId>,
    pub is_ephemeral: bool,
}

/// One frame of the protocol. See the module docs of [`crate::protocol`] for the flow.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// Client → server handshake.
    Join {
        sender_id: PeerId,
        peer_metadata: PeerMetadata,
        /// A `join` without the field decodes as `["1"]`: the JS server's `selectProtocol`
        /// treats a missing list as version 1.
        supported_protocol_versions: Vec<String>,
    },
    /// Server → client handshake answer.
    Peer {
        sender_id: PeerId,
        target_id: PeerId,
        peer_metadata: PeerMetadata,
        selected_protocol_version: String,
    },
    /// The sender is about to close the connection. (JS also sends `senderId`/`targetId`, which
    /// nobody reads; they are ignored on decode and not sent.)
    Error { message: String },
    /// First sync message for a document the sender does not have (or has not shared yet).
    Request {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
        data: Vec<u8>,
    },
    /// An automerge sync message (`data`) for one document.
    Sync {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
        data: Vec<u8>,
    },
    /// The sender does not have the document, or may not share it: the two are one answer.
    DocUnavailable {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
    },
    /// Application broadcast (presence, cursors); never stored. `data` is opaque (CBOR made by
    /// the JS app); `(sender_id, session_id, count)` lets receivers drop duplicates.
    Ephemeral {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
        count: u64,
        session_id: String,
        data: Vec<u8>,
    },
    /// Remote-heads gossip subscription; contents (`add`/`remove`) are ignored.
    RemoteSubscriptionChange {
        sender_id: PeerId,
        target_id: PeerId,
    },
    /// Remote-heads gossip; contents (`newHeads`) are ignored.
    RemoteHeadsChanged {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
    },
}

impl fmt::Debug for Message {
    /// Payloads are shown as lengths: sync data holds clinical content and must not reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Len(usize);
        impl fmt::Debug for Len {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "<{} bytes>", self.0)
            }
        }
        match self {
            Message::Join {
                sender_id,
                peer_metadata,
                supported_protocol_versions,
            } => f
                .debug_struct("Join")
                .field("sender_id", sender_id)
                .field("peer_metadata", peer_metadata)
                .field("supported_protocol_versions", supported_protocol_versions)
                .finish(),
            Message::Peer {
                sender_id,
                target_id,
                peer_metadata,
                selected_protocol_version,
            } => f
                .debug_struct("Peer")
                .field("sender_id", sender_id)
                .field("target_id", target_id)
                .field("peer_metadata", peer_metadata)
                .field("selected_protocol_version", selected_protocol_version)
                .finish(),
            Message::Error { message } => {
                f.debug_struct("Error").field("message", message).finish()
            }
            Message::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
            | Message::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            } => f
                .debug_struct(if matches!(self, Message::Request { .. }) {
                    "Request"
                } else {
                    "Sync"
                })
                .field("sender_id", sender_id)
                .field("target_id", target_id)
                .field("document_id", document_id)
                .field("data", &Len(data.len()))
                .finish(),
            Message::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            }
            | Message::RemoteHeadsChanged {
                sender_id,
                target_id,
                document_id,
            } => f
                .debug_struct(if matches!(self, Message::DocUnavailable { .. }) {
                    "DocUnavailable"
                } else {
                    "RemoteHeadsChanged"
                })
                .field("sender_id", sender_id)
                .field("target_id", target_id)
                .field("document_id", document_id)
                .finish(),
            Message::Ephemeral {
                sender_id,
                target_id,
                document_id,
                count,
                session_id,
                data,
            } => f
                .debug_struct("Ephemeral")
                .field("sender_id", sender_id)
                .field("target_id", target_id)
                .field("document_id", document_id)
                .field("count", count)
                .field("session_id", session_id)
                .field("data", &Len(data.len()))
                .finish(),
            Message::RemoteSubscriptionChange {
                sender_id,
                target_id,
            } => f
                .debug_struct("RemoteSubscriptionChange")
                .field("sender_id", sender_id)
                .field("target_id", target_id)
                .finish(),
        }
    }
}

/// The map keys this code reads; everything else in a frame is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Type,
    SenderId,
    TargetId,
    DocumentId,
    Data,
    PeerMetadata,
    SupportedProtocolVersions,
    SelectedProtocolVersion,
    Message,
    Count,
    SessionId,
}

impl Field {
    const ALL: [Field; 11] = [
        Field::Type,
        Field::SenderId,
        Field::TargetId,
        Field::DocumentId,
        Field::Data,
        Field::PeerMetadata,
        Field::SupportedProtocolVersions,
        Field::SelectedProtocolVersion,
        Field::Message,
        Field::Count,
        Field::SessionId,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::Type => "type",
            Field::SenderId => "senderId",
            Field::TargetId => "targetId",
            Field::DocumentId => "documentId",
            Field::Data => "data",
            Field::PeerMetadata => "peerMetadata",
            Field::SupportedProtocolVersions => "supportedProtocolVersions",
            Field::SelectedProtocolVersion => "selectedProtocolVersion",
            Field::Message => "message",
            Field::Count => "count",
            Field::SessionId => "sessionId",
        }
    }

    fn from_key(key: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == key)
    }
}

/// The raw encoding of each known field of a frame's top-level map.
///
/// Fields are first located (the whole frame is checked to be well-formed CBOR) and only the
/// ones the message type needs are then parsed. A field that a message type does not use is
/// never parsed, so a wrongly typed irrelevant field is ignored as JS ignores it.
struct RawFields<'a>([Option<&'a [u8]>; Field::ALL.len()]);

impl<'a> RawFields<'a> {
    fn read(frame: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut fields = RawFields([None; Field::ALL.len()]);
        let mut reader = Reader::new(frame);
        let len = match reader.untagged()? {
            Type::Map | Type::MapIndef => reader.map()?,
            other => {
                return Err(ProtocolError::Cbor(format!(
                    "a frame must be a map, found {other}"
                )));
            }
        };
        reader.map_entries(len, 1, |key, value| {
            if let Some(field) = Field::from_key(key) {
                // Duplicate keys: the last one wins, as when cbor-x builds a JS object.
                fields.0[field as usize] = Some(value);
            }
            Ok(())
        })?;
        if !reader.is_at_end() {
            // cbor-x `decode` also refuses data after the first item.
            return Err(ProtocolError::Cbor(
                "trailing bytes after the message map".into(),
            ));
        }
        Ok(fields)
    }

    fn optional<T>(&self, field: Field, parse: Parse<'a, T>) -> Result<Option<T>, ProtocolError> {
        match self.0[field as usize] {
            Some(raw) => optional(field.name(), raw, parse),
            None => Ok(None),
        }
    }

    fn required<T>(&self, field: Field, parse: Parse<'a, T>) -> Result<T, ProtocolError> {
        self.optional(field, parse)?
            .ok_or(ProtocolError::MissingField(field.name()))
    }

    fn peer_id(&self, field: Field) -> Result<PeerId, ProtocolError> {
        self.required(field, parse_id).map(PeerId::new)
    }

    fn document_id(&self) -> Result<DocumentId, ProtocolError> {
        self.required(Field::DocumentId, parse_document_id)
    }

    fn data(&self) -> Result<Vec<u8>, ProtocolError> {
        self.required(Field::Data, parse_bytes)
    }

    fn peer_metadata(&self) -> Result<PeerMetadata, ProtocolError> {
        // JS peers without metadata (older clients, custom adapters) are read as "no storage,
        // not ephemeral", which is what the JS repo makes of them.
        Ok(self
            .optional(Field::PeerMetadata, parse_peer_metadata)?
            .unwrap_or_default())
    }

    fn into_message(self) -> Result<Message, ProtocolError> {
        let message_type = self.required(Field::Type, parse_text)?;
        Ok(match message_type.as_str() {
            "join" => Message::Join {
                sender_id: self.peer_id(Field::SenderId)?,
                peer_metadata: self.peer_metadata()?,
                supported_protocol_versions: self
                    .optional(Field::SupportedProtocolVersions, parse_versions)?
                    .unwrap_or_else(|| vec![PROTOCOL_VERSION.to_owned()]),
            },
            "peer" => Message::Peer {
                sender_id: self.peer_id(Field::SenderId)?,
                target_id: self.peer_id(Field::TargetId)?,
                peer_metadata: self.peer_metadata()?,
                selected_protocol_version: self
                    .required(Field::SelectedProtocolVersion, parse_id)?,
            },
            "error" => Message::Error {
                message: self.required(Field::Message, parse_text)?,
            },
            "request" => Message::Request {
                sender_id: self.peer_id(Field::SenderId)?,
                target_id: self.peer_id(Field::TargetId)?,
                document_id: self.document_id()?,
                data: self.data()?,
            },
            "sync" => Message::Sync {
                sender_id: self.peer_id(Field::SenderId)?,
                target_id: self.peer_id(Field::TargetId)?,
                document_id: self.document_id()?,
                data: self.data()?,
            },
            "doc-unavailable" => Message::DocUnavailable {
                sender_id: self.peer_id(Field::SenderId)?,
                target_id: self.peer_id(Field::TargetId)?,
                document_id: self.document_id()?,
            },
            "ephemeral" => Message::Ephemeral {
                sender_id: self.peer_id(Field::SenderId)?,
                target_id: self.peer_id(Field::TargetId)?,
                document_id: self.document_id()?,
                count: self.required(Field::Count, parse_count)?,
                session_id: self.required(Field::SessionId, parse_id)?,
                data: self.data()?,
            },
            "remote-subscription-change" => Message::RemoteSubscriptionChange {
                sender_id: self.peer_id(Field::SenderId)?,
                target_id: self.peer_id(Field::TargetId)?,
            },
            "remote-heads-changed" => Message::RemoteHeadsChanged {
                sender_id: self.peer_id(Field::SenderId)?,
                target_id: self.peer_id(Field::TargetId)?,
                document_id: self.document_id()?,
            },
            other => return Err(ProtocolError::UnknownType(snippet(other))),
        })
    }
}

/// Parses one field value: its name (for errors), its type (tags looked through) and a reader
/// positioned at the value.
type Parse<'a, T> = fn(&'static str, Type, &mut Reader<'a>) -> Result<T, ProtocolError>;

/// `None` if the value is null or undefined: JS treats both like an absent key.
fn optional<'a, T>(
    name: &'static str,
    raw: &'a [u8],
    parse: Parse<'a, T>,
) -> Result<Option<T>, ProtocolError> {
    let mut reader = Reader::new(raw);
    let ty = reader.untagged()?;
    if is_nil(ty) {
        return Ok(None);
    }
    parse(name, ty, &mut reader).map(Some)
}

fn invalid(field: &'static str, expected: &'static str) -> ProtocolError {
    ProtocolError::InvalidField { field, expected }
}

fn is_text(ty: Type) -> bool {
    matches!(ty, Type::String | Type::StringIndef)
}

fn is_bytes(ty: Type) -> bool {
    matches!(ty, Type::Bytes | Type::BytesIndef)
}

fn parse_text(name: &'static str, ty: Type, r: &mut Reader<'_>) -> Result<String, ProtocolError> {
    if !is_text(ty) {
        return Err(invalid(name, "text string"));
    }
    Ok(r.text()?.into_owned())
}

/// A text id of at most [`MAX_ID_BYTES`].
fn parse_id(name: &'static str, ty: Type, r: &mut Reader<'_>) -> Result<String, ProtocolError> {
    if !is_text(ty) {
        return Err(invalid(name, "text string"));
    }
    let text = r.text()?;
    if text.len() > MAX_ID_BYTES {
        return Err(invalid(name, "text string of at most 1024 bytes"));
    }
    Ok(text.into_owned())
}

fn parse_bytes(name: &'static str, ty: Type, r: &mut Reader<'_>) -> Result<Vec<u8>, ProtocolError> {
    if !is_bytes(ty) {
        return Err(invalid(name, "byte string"));
    }
    Ok(r.bytes()?.into_owned())
}

/// The JS wire form is the bs58check string; 16 raw bytes (the binary id) are accepted too, as
/// samod's decoder accepts them.
fn parse_document_id(
    name: &'static str,
    ty: Type,
    r: &mut Reader<'_>,
) -> Result<DocumentId, ProtocolError> {
    if is_text(ty) {
        return r.text()?.parse();
    }
    if !is_bytes(ty) {
        return Err(invalid(name, "bs58check text string"));
    }
    let bytes = r.bytes()?;
    let bytes: [u8; 16] = bytes.as_ref().try_into().map_err(|_| {
        ProtocolError::InvalidDocumentId(format!("{} raw bytes, expected 16", bytes.len()))
    })?;
    Ok(DocumentId::from_bytes(bytes))
}

/// A JS number: cbor-x writes integers above 2^32 as float64, so an integral float is accepted.
fn parse_count(name: &'static str, ty: Type, r: &mut Reader<'_>) -> Result<u64, ProtocolError> {
    const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
    match ty {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => r.u64(),
        Type::F16 | Type::F32 | Type::F64 => match r.f64()? {
            // Exact: x is an integer in [0, 2^64).
            x if (0.0..TWO_POW_64).contains(&x) && x.fract() == 0.0 => Ok(x as u64),
            _ => Err(invalid(name, "non-negative integer")),
        },
        _ => Err(invalid(name, "non-negative integer")),
    }
}

fn parse_versions(
    name: &'static str,
    ty: Type,
    r: &mut Reader<'_>,
) -> Result<Vec<String>, ProtocolError> {
    let expected = "array of at most 16 text strings";
    if !matches!(ty, Type::Array | Type::ArrayIndef) {
        return Err(invalid(name, expected));
    }
    let len = r.array()?;
    let mut versions = Vec::new();
    loop {
        if len.is_some_and(|n| versions.len() as u64 == n) {
            return Ok(versions);
        }
        match r.untagged()? {
            Type::Break if len.is_none() => return Ok(versions),
            ty if is_text(ty) && versions.len() < MAX_PROTOCOL_VERSIONS => {
                versions.push(parse_id(name, ty, r)?);
            }
            _ => return Err(invalid(name, expected)),
        }
    }
}

fn parse_peer_metadata(
    name: &'static str,
    ty: Type,
    r: &mut Reader<'_>,
) -> Result<PeerMetadata, ProtocolError> {
    if !matches!(ty, Type::Map | Type::MapIndef) {
        return Err(invalid(name, "map"));
    }
    let len = r.map()?;
    let mut metadata = PeerMetadata::default();
    r.map_entries(len, 2, |key, value| {
        match key {
            "storageId" => {
                metadata.storage_id = optional("storageId", value, parse_id)?.map(StorageId::new)
            }
            "isEphemeral" => {
                metadata.is_ephemeral =
                    optional("isEphemeral", value, parse_bool)?.unwrap_or(false);
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(metadata)
}

fn parse_bool(name: &'static str, ty: Type, r: &mut Reader<'_>) -> Result<bool, ProtocolError> {
    match ty {
        Type::Bool => r.bool(),
        _ => Err(invalid(name, "bool")),
    }
}

impl Message {
    /// Decodes one WebSocket frame. Never panics; any input that is not a well-formed message
    /// is an `Err`. Unknown fields are ignored; an unknown `type` is
    /// [`ProtocolError::UnknownType`].
    pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(ProtocolError::FrameTooLarge {
                len: frame.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        RawFields::read(frame)?.into_message()
    }

    /// Encodes as one frame: a definite-length map with minimal headers, ids as text, payloads
    /// as byte strings.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new());
        let written = self.write(&mut e);
        // Writing to a `Vec` cannot fail (its write error is `Infallible`), and the encoder calls
        // used here fail only when writing does.
        debug_assert!(written.is_ok());
        e.into_writer()
    }

    fn write(&self, e: &mut Encoder<Vec<u8>>) -> Result<(), minicbor::encode::Error<Infallible>> {
        match self {
            Message::Join {
                sender_id,
                peer_metadata,
                supported_protocol_versions,
            } => {
                e.map(4)?.str("type")?.str("join")?;
                e.str("senderId")?.str(sender_id.as_str())?;
                e.str("peerMetadata")?;
                write_peer_metadata(e, peer_metadata)?;
                e.str("supportedProtocolVersions")?
                    .array(supported_protocol_versions.len() as u64)?;
                for version in supported_protocol_versions {
                    e.str(version)?;
                }
            }
            Message::Peer {
                sender_id,
                target_id,
                peer_metadata,
                selected_protocol_version,
            } => {
                e.map(5)?.str("type")?.str("peer")?;
                e.str("senderId")?.str(sender_id.as_str())?;
                e.str("targetId")?.str(target_id.as_str())?;
                e.str("peerMetadata")?;
                write_peer_metadata(e, peer_metadata)?;
                e.str("selectedProtocolVersion")?
                    .str(selected_protocol_version)?;
            }
            Message::Error { message } => {
                e.map(2)?.str("type")?.str("error")?;
                e.str("message")?.str(message)?;
            }
            Message::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
            | Message::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            } => {
                e.map(5)?.str("type")?.str(self.type_name())?;
                e.str("senderId")?.str(sender_id.as_str())?;
                e.str("targetId")?.str(target_id.as_str())?;
                e.str("documentId")?.str(&document_id.to_string())?;
                e.str("data")?.bytes(data)?;
            }
            Message::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            } => {
                e.map(4)?.str("type")?.str("doc-unavailable")?;
                e.str("senderId")?.str(sender_id.as_str())?;
                e.str("targetId")?.str(target_id.as_str())?;
                e.str("documentId")?.str(&document_id.to_string())?;
            }
            Message::Ephemeral {
                sender_id,
                target_id,
                document_id,
                count,
                session_id,
                data,
            } => {
                e.map(7)?.str("type")?.str("ephemeral")?;
                e.str("senderId")?.str(sender_id.as_str())?;
                e.str("targetId")?.str(target_id.as_str())?;
                e.str("documentId")?.str(&document_id.to_string())?;
                e.str("count")?.u64(*count)?;
                e.str("sessionId")?.str(session_id)?;
                e.str("data")?.bytes(data)?;
            }
            Message::RemoteSubscriptionChange {
                sender_id,
                target_id,
            } => {
                // `add`/`remove` are optional in JS (`control.add?`), so they are left out.
                e.map(3)?.str("type")?.str("remote-subscription-change")?;
                e.str("senderId")?.str(sender_id.as_str())?;
                e.str("targetId")?.str(target_id.as_str())?;
            }
            Message::RemoteHeadsChanged {
                sender_id,
                target_id,
                document_id,
            } => {
                e.map(5)?.str("type")?.str("remote-heads-changed")?;
                e.str("senderId")?.str(sender_id.as_str())?;
                e.str("targetId")?.str(target_id.as_str())?;
                e.str("documentId")?.str(&document_id.to_string())?;
                // JS iterates `Object.entries(msg.newHeads)`, which throws on undefined: an
                // empty map is the harmless "no news".
                e.str("newHeads")?.map(0)?;
            }
        }
        Ok(())
    }

    /// The wire `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Join { .. } => "join",
            Message::Peer { .. } => "peer",
            Message::Error { .. } => "error",
            Message::Request { .. } => "request",
            Message::Sync { .. } => "sync",
            Message::DocUnavailable { .. } => "doc-unavailable",
            Message::Ephemeral { .. } => "ephemeral",
            Message::RemoteSubscriptionChange { .. } => "remote-subscription-change",
            Message::RemoteHeadsChanged { .. } => "remote-heads-changed",
        }
    }

    pub fn document_id(&self) -> Option<DocumentId> {
        match self {
            Message::Request { document_id, .. }
            | Message::Sync { document_id, .. }
            | Message::DocUnavailable { document_id, .. }
            | Message::Ephemeral { document_id, .. }
            | Message::RemoteHeadsChanged { document_id, .. } => Some(*document_id),
            Message::Join { .. }
            | Message::Peer { .. }
            | Message::Error { .. }
            | Message::RemoteSubscriptionChange { .. } => None,
        }
    }

    /// `senderId`; `None` only for `error`.
    pub fn sender_id(&self) -> Option<&PeerId> {
        match self {
            Message::Join { sender_id, .. }
            | Message::Peer { sender_id, .. }
            | Message::Request { sender_id, .. }
            | Message::Sync { sender_id, .. }
            | Message::DocUnavailable { sender_id, .. }
            | Message::Ephemeral { sender_id, .. }
            | Message::RemoteSubscriptionChange { sender_id, .. }
            | Message::RemoteHeadsChanged { sender_id, .. } => Some(sender_id),
            Message::Error { .. } => None,
        }
    }

    /// `targetId`; `None` for `join` and `error`.
    pub fn target_id(&self) -> Option<&PeerId> {
        match self {
            Message::Peer { target_id, .. }
            | Message::Request { target_id, .. }
            | Message::Sync { target_id, .. }
            | Message::DocUnavailable { target_id, .. }
            | Message::Ephemeral { target_id, .. }
            | Message::RemoteSubscriptionChange { target_id, .. }
            | Message::RemoteHeadsChanged { target_id, .. } => Some(target_id),
            Message::Join { .. } | Message::Error { .. } => None,
        }
    }
}

fn write_peer_metadata(
    e: &mut Encoder<Vec<u8>>,
    metadata: &PeerMetadata,
) -> Result<(), minicbor::encode::Error<Infallible>> {
    match &metadata.storage_id {
        Some(storage_id) => {
            e.map(2)?.str("storageId")?.str(storage_id.as_str())?;
        }
        None => {
            e.map(1)?;
        }
    }
    e.str("isEphemeral")?.bool(metadata.is_ephemeral)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DOC: &str = "4NMNnkMhL8jXrdJ9jamS58PAVdXu";

    fn doc_id() -> DocumentId {
        DOC.parse().unwrap()
    }

    fn peer(s: &str) -> PeerId {
        PeerId::new(s.into())
    }

    /// A minimal CBOR text string, as cbor-x writes short strings.
    fn t(s: &str) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new());
        e.str(s).unwrap();
        e.into_writer()
    }

    fn b(bytes: &[u8]) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new());
        e.bytes(bytes).unwrap();
        e.into_writer()
    }

    fn frame(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn one_of_each() -> Vec<Message> {
        vec![
            Message::Join {
                sender_id: peer("peer-abc"),
                peer_metadata: PeerMetadata {
                    storage_id: Some(StorageId::new("3f1c".into())),
                    is_ephemeral: false,
                },
                supported_protocol_versions: vec!["1".into()],
            },
            Message::Peer {
                sender_id: peer("relay"),
                target_id: peer("peer-abc"),
                peer_metadata: PeerMetadata::default(),
                selected_protocol_version: "1".into(),
            },
            Message::Error {
                message: "unsupported protocol version".into(),
            },
            Message::Request {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc_id(),
                data: vec![0x43, 0, 0],
            },
            Message::Sync {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc_id(),
                data: vec![0x43, 1, 2, 3],
            },
            Message::DocUnavailable {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc_id(),
            },
            Message::Ephemeral {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc_id(),
                count: 7,
                session_id: "k2j3h4".into(),
                data: vec![0xa0],
            },
            Message::RemoteSubscriptionChange {
                sender_id: peer("a"),
                target_id: peer("b"),
            },
            Message::RemoteHeadsChanged {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc_id(),
            },
        ]
    }

    // ---- fixtures: frames as the JS 2.5.6 client (cbor-x, useRecords: false) emits them ----

    #[test]
    fn js_join_from_ephemeral_client() {
        // {type, senderId, peerMetadata: {storageId: undefined, isEphemeral: true},
        //  supportedProtocolVersions: ["1"]} with cbor-x's map16 headers and `undefined`.
        let bytes = frame(&[
            &[0xb9, 0x00, 0x04],
            &t("type"),
            &t("join"),
            &t("senderId"),
            &t("peer-7x9k2"),
            &t("peerMetadata"),
            &[0xb9, 0x00, 0x02],
            &t("storageId"),
            &[0xf7],
            &t("isEphemeral"),
            &[0xf5],
            &t("supportedProtocolVersions"),
            &[0x81],
            &t("1"),
        ]);
        assert_eq!(&bytes[..4], &[0xb9, 0x00, 0x04, 0x64]);
        assert_eq!(
            Message::decode(&bytes).unwrap(),
            Message::Join {
                sender_id: peer("peer-7x9k2"),
                peer_metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true,
                },
                supported_protocol_versions: vec!["1".into()],
            }
        );
    }

    #[test]
    fn js_join_literal_hex() {
        // The same kind of frame written out byte by byte, with a storage id.
        let hex = concat!(
            "b90004",
            "6474797065",
            "646a6f696e", // type: join
            "6873656e6465724964",
            "6470656572", // senderId: peer
            "6c706565724d65746164617461",
            "b90002", // peerMetadata: {
            "6973746f726167654964",
            "6461626364", //   storageId: abcd
            "6b6973457068656d6572616c",
            "f4", //   isEphemeral: false }
            "781973757070",
            "6f7274656450726f746f636f6c56657273696f6e73",
            "816131", // ["1"]
        );
        let msg = Message::decode(&hex::decode(hex).unwrap()).unwrap();
        assert_eq!(
            msg,
            Message::Join {
                sender_id: peer("peer"),
                peer_metadata: PeerMetadata {
                    storage_id: Some(StorageId::new("abcd".into())),
                    is_ephemeral: false,
                },
                supported_protocol_versions: vec!["1".into()],
            }
        );
    }

    #[test]
    fn js_join_without_versions_or_metadata_means_v1() {
        let bytes = frame(&[
            &[0xb9, 0x00, 0x02],
            &t("type"),
            &t("join"),
            &t("senderId"),
            &t("p"),
        ]);
        let Message::Join {
            supported_protocol_versions,
            peer_metadata,
            ..
        } = Message::decode(&bytes).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            supported_protocol_versions,
            vec![PROTOCOL_VERSION.to_owned()]
        );
        assert_eq!(peer_metadata, PeerMetadata::default());
        // `peerMetadata: {}`, as the JS client sends when given none.
        let bytes = frame(&[
            &[0xb9, 0x00, 0x03],
            &t("type"),
            &t("join"),
            &t("senderId"),
            &t("p"),
            &t("peerMetadata"),
            &[0xb9, 0x00, 0x00],
        ]);
        assert!(matches!(
            Message::decode(&bytes).unwrap(),
            Message::Join { .. }
        ));
    }

    #[test]
    fn js_sync_request_and_doc_unavailable() {
        let data = [0x43, 0x00, 0x01, 0x02];
        for (ty, expected) in [
            (
                "sync",
                Message::Sync {
                    sender_id: peer("peer-a"),
                    target_id: peer("relay"),
                    document_id: doc_id(),
                    data: data.to_vec(),
                },
            ),
            (
                "request",
                Message::Request {
                    sender_id: peer("peer-a"),
                    target_id: peer("relay"),
                    document_id: doc_id(),
                    data: data.to_vec(),
                },
            ),
        ] {
            let bytes = frame(&[
                &[0xb9, 0x00, 0x05],
                &t("type"),
                &t(ty),
                &t("documentId"),
                &t(DOC),
                &t("targetId"),
                &t("relay"),
                &t("data"),
                &b(&data),
                &t("senderId"),
                &t("peer-a"),
            ]);
            assert_eq!(Message::decode(&bytes).unwrap(), expected);
        }
        let bytes = frame(&[
            &[0xb9, 0x00, 0x04],
            &t("type"),
            &t("doc-unavailable"),
            &t("senderId"),
            &t("relay"),
            &t("targetId"),
            &t("peer-a"),
            &t("documentId"),
            &t(DOC),
        ]);
        assert_eq!(
            Message::decode(&bytes).unwrap().document_id(),
            Some(doc_id())
        );
    }

    #[test]
    fn js_ephemeral_with_float_count() {
        // count 2^33 is written by cbor-x as float64 (it only uses integers up to 2^32).
        let count = 8_589_934_592_f64;
        let bytes = frame(&[
            &[0xb9, 0x00, 0x07],
            &t("type"),
            &t("ephemeral"),
            &t("senderId"),
            &t("peer-a"),
            &t("targetId"),
            &t("relay"),
            &t("documentId"),
            &t(DOC),
            &t("data"),
            &b(&[0xa1, 0x61, 0x78, 0x01]),
            &t("count"),
            &[&[0xfb][..], &count.to_be_bytes()].concat(),
            &t("sessionId"),
            &t("m1x2k3"),
        ]);
        let Message::Ephemeral {
            count, session_id, ..
        } = Message::decode(&bytes).unwrap()
        else {
            panic!()
        };
        assert_eq!(count, 1 << 33);
        assert_eq!(session_id, "m1x2k3");
    }

    #[test]
    fn js_remote_heads_changed_with_float_timestamp_is_decoded_and_ignored() {
        let head = super::super::ids::encode_head(&automerge::ChangeHash([3; 32]));
        let timestamp = 1_764_158_400_123_f64;
        let bytes = frame(&[
            &[0xb9, 0x00, 0x05],
            &t("type"),
            &t("remote-heads-changed"),
            &t("senderId"),
            &t("peer-a"),
            &t("targetId"),
            &t("relay"),
            &t("documentId"),
            &t(DOC),
            &t("newHeads"),
            &[0xb9, 0x00, 0x01],
            &t("6b0d9c5e-0c8f-4a57-9a2c-1f1e1d1c1b1a"),
            &[0xb9, 0x00, 0x02],
            &t("heads"),
            &[0x81],
            &t(&head),
            &t("timestamp"),
            &[&[0xfb][..], &timestamp.to_be_bytes()].concat(),
        ]);
        assert_eq!(
            Message::decode(&bytes).unwrap(),
            Message::RemoteHeadsChanged {
                sender_id: peer("peer-a"),
                target_id: peer("relay"),
                document_id: doc_id(),
            }
        );
    }

    #[test]
    fn js_remote_subscription_change_with_undefined_remove() {
        let bytes = frame(&[
            &[0xb9, 0x00, 0x05],
            &t("type"),
            &t("remote-subscription-change"),
            &t("senderId"),
            &t("peer-a"),
            &t("targetId"),
            &t("relay"),
            &t("add"),
            &[0x81],
            &t("6b0d9c5e"),
            &t("remove"),
            &[0xf7],
        ]);
        assert_eq!(
            Message::decode(&bytes).unwrap(),
            Message::RemoteSubscriptionChange {
                sender_id: peer("peer-a"),
                target_id: peer("relay"),
            }
        );
    }

    #[test]
    fn js_server_peer_and_error() {
        let bytes = frame(&[
            &[0xb9, 0x00, 0x05],
            &t("type"),
            &t("peer"),
            &t("senderId"),
            &t("storage-server"),
            &t("peerMetadata"),
            &[0xb9, 0x00, 0x02],
            &t("storageId"),
            &t("6b0d9c5e"),
            &t("isEphemeral"),
            &[0xf4],
            &t("selectedProtocolVersion"),
            &t("1"),
            &t("targetId"),
            &t("peer-a"),
        ]);
        assert!(matches!(
            Message::decode(&bytes).unwrap(),
            Message::Peer { selected_protocol_version, .. } if selected_protocol_version == "1"
        ));
        // The JS server's error also carries senderId/targetId.
        let bytes = frame(&[
            &[0xb9, 0x00, 0x04],
            &t("type"),
            &t("error"),
            &t("senderId"),
            &t("storage-server"),
            &t("message"),
            &t("unsupported protocol version"),
            &t("targetId"),
            &t("peer-a"),
        ]);
        assert_eq!(
            Message::decode(&bytes).unwrap(),
            Message::Error {
                message: "unsupported protocol version".into()
            }
        );
    }

    #[test]
    fn lenient_forms_decode() {
        // Indefinite-length map and strings, a tagged byte string (tag 64, a typed array), a
        // binary document id, null for absent, unknown fields of every kind, a duplicate key.
        let bytes = frame(&[
            &[0xbf],
            &t("type"),
            &t("request"),
            &t("senderId"),
            &[0x7f, 0x62, b'p', b'e', 0x62, b'e', b'r', 0xff],
            &t("targetId"),
            &t("relay"),
            &t("documentId"),
            &b(doc_id().as_bytes()),
            &t("data"),
            &[0xd8, 0x40],
            &b(&[0x43]),
            &t("timestamp"),
            &[0xfb, 0x42, 0x79, 0xad, 0x5a, 0x4d, 0x1f, 0x80, 0x00],
            &t("nested"),
            &[0xa1, 0x01, 0x9f, 0xf6, 0xf7, 0x20, 0xff],
            &[0x05],
            &t("integer key"),
            &t("count"),
            &t("wrong type but unused by request"),
            &t("targetId"),
            &t("relay-2"),
            &[0xff],
        ]);
        assert_eq!(
            Message::decode(&bytes).unwrap(),
            Message::Request {
                sender_id: peer("peer"),
                target_id: peer("relay-2"),
                document_id: doc_id(),
                data: vec![0x43],
            }
        );
    }

    // ---- encoding ----

    #[test]
    fn encode_is_plain_cbor_that_an_independent_decoder_reads() {
        use ciborium::Value;
        for msg in one_of_each() {
            let bytes = msg.encode();
            let value: Value = ciborium::de::from_reader(bytes.as_slice()).unwrap();
            let Value::Map(entries) = value else {
                panic!("not a map")
            };
            let get = |k: &str| {
                entries
                    .iter()
                    .find(|(key, _)| key.as_text() == Some(k))
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(get("type"), Some(Value::Text(msg.type_name().into())));
            if let Some(id) = msg.document_id() {
                assert_eq!(get("documentId"), Some(Value::Text(id.to_string())));
            }
            if let Message::Sync { data, .. } | Message::Request { data, .. } = &msg {
                assert_eq!(get("data"), Some(Value::Bytes(data.clone())));
            }
            if let Message::Join { .. } = &msg {
                let Some(Value::Map(meta)) = get("peerMetadata") else {
                    panic!()
                };
                assert!(
                    meta.iter()
                        .any(|(k, v)| k.as_text() == Some("isEphemeral") && v.is_bool())
                );
            }
            if let Message::RemoteHeadsChanged { .. } = &msg {
                assert_eq!(get("newHeads"), Some(Value::Map(vec![])));
            }
            // Definite-length, minimal header.
            assert_eq!(bytes[0] & 0xe0, 0xa0);
            assert_ne!(bytes[0] & 0x1f, 31);
        }
    }

    #[test]
    fn encode_uses_minimal_headers() {
        // The ephemeral count exercises every integer width; lengths use the same headers.
        let cases: [(u64, &[u8]); 6] = [
            (23, &[0x17]),
            (24, &[0x18, 24]),
            (255, &[0x18, 0xff]),
            (256, &[0x19, 0x01, 0x00]),
            (65_536, &[0x1a, 0x00, 0x01, 0x00, 0x00]),
            (1 << 32, &[0x1b, 0, 0, 0, 1, 0, 0, 0, 0]),
        ];
        for (count, expected) in cases {
            let Message::Ephemeral { data, .. } = &one_of_each()[6] else {
                panic!()
            };
            let msg = Message::Ephemeral {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc_id(),
                count,
                session_id: "s".into(),
                data: data.clone(),
            };
            let bytes = msg.encode();
            let at = bytes
                .windows(6)
                .position(|w| w == t("count").as_slice())
                .unwrap()
                + 6;
            assert_eq!(&bytes[at..at + expected.len()], expected, "{count}");
            assert_eq!(Message::decode(&bytes).unwrap(), msg);
        }
        let sync = Message::Sync {
            sender_id: peer("a"),
            target_id: peer("b"),
            document_id: doc_id(),
            data: vec![0; 300],
        };
        let bytes = sync.encode();
        assert_eq!(
            &bytes[bytes.len() - 303..bytes.len() - 300],
            &[0x59, 0x01, 0x2c]
        );
    }

    #[test]
    fn decodes_what_serde_cbor_writes() {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Sync<'a> {
            #[serde(rename = "type")]
            ty: &'a str,
            sender_id: &'a str,
            target_id: &'a str,
            document_id: &'a str,
            #[serde(with = "serde_bytes")]
            data: &'a [u8],
        }
        let mut bytes = Vec::new();
        ciborium::ser::into_writer(
            &Sync {
                ty: "sync",
                sender_id: "a",
                target_id: "b",
                document_id: DOC,
                data: &[0x43, 9],
            },
            &mut bytes,
        )
        .unwrap();
        assert_eq!(
            Message::decode(&bytes).unwrap(),
            Message::Sync {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc_id(),
                data: vec![0x43, 9],
            }
        );
    }

    #[test]
    fn peer_metadata_without_storage_id_omits_the_key() {
        let msg = Message::Peer {
            sender_id: peer("relay"),
            target_id: peer("c"),
            peer_metadata: PeerMetadata::default(),
            selected_protocol_version: "1".into(),
        };
        let value: ciborium::Value = ciborium::de::from_reader(msg.encode().as_slice()).unwrap();
        let text = format!("{value:?}");
        assert!(!text.contains("storageId"), "{text}");
    }

    #[test]
    fn type_name_and_accessors() {
        let names: Vec<_> = one_of_each().iter().map(Message::type_name).collect();
        assert_eq!(
            names,
            [
                "join",
                "peer",
                "error",
                "request",
                "sync",
                "doc-unavailable",
                "ephemeral",
                "remote-subscription-change",
                "remote-heads-changed"
            ]
        );
        for msg in one_of_each() {
            assert_eq!(
                msg.sender_id().is_none(),
                matches!(msg, Message::Error { .. })
            );
            assert_eq!(
                msg.target_id().is_none(),
                matches!(msg, Message::Error { .. } | Message::Join { .. })
            );
        }
    }

    #[test]
    fn debug_hides_payload_bytes() {
        let msg = Message::Sync {
            sender_id: peer("a"),
            target_id: peer("b"),
            document_id: doc_id(),
            data: b"patient name Jane".to_vec(),
        };
        let shown = format!("{msg:?}");
        assert!(shown.contains("<17 bytes>"), "{shown}");
        assert!(!shown.contains("74, 97"), "{shown}");
    }

    // ---- refusal ----

    #[test]
    fn truncations_of_valid_frames_are_errors() {
        for msg in one_of_each() {
            let bytes = msg.encode();
            for n in 0..bytes.len() {
                assert!(
                    Message::decode(&bytes[..n]).is_err(),
                    "{} cut at {n}",
                    msg.type_name()
                );
            }
            assert_eq!(Message::decode(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = one_of_each()[4].encode();
        bytes.push(0x00);
        assert!(matches!(
            Message::decode(&bytes),
            Err(ProtocolError::Cbor(_))
        ));
    }

    #[test]
    fn oversize_frames_are_refused_before_parsing() {
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert_eq!(
            Message::decode(&big),
            Err(ProtocolError::FrameTooLarge {
                len: MAX_FRAME_BYTES + 1,
                max: MAX_FRAME_BYTES
            })
        );
        // A sync frame just under the limit is fine.
        let msg = Message::Sync {
            sender_id: peer("a"),
            target_id: peer("b"),
            document_id: doc_id(),
            data: vec![7; MAX_FRAME_BYTES - 200],
        };
        let bytes = msg.encode();
        assert!(bytes.len() <= MAX_FRAME_BYTES);
        assert_eq!(Message::decode(&bytes).unwrap(), msg);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        for opener in [0x81_u8, 0x9f, 0xa1] {
            let mut bytes = frame(&[&[0xa2], &t("type"), &t("sync"), &t("extra")]);
            bytes.extend(std::iter::repeat_n(opener, 200_000));
            let err = Message::decode(&bytes).unwrap_err();
            assert!(matches!(err, ProtocolError::Cbor(_)), "{err}");
        }
    }

    #[test]
    fn large_ignored_fields_are_skipped_not_built() {
        // One million one-byte items in an unknown field: accepted, and cheap.
        let mut bytes = frame(&[&one_of_each()[5].encode()]);
        bytes[0] += 1; // one more map entry
        bytes.extend(t("padding"));
        bytes.extend([0x9a, 0x00, 0x0f, 0x42, 0x40]);
        bytes.extend(std::iter::repeat_n(0x00, 1_000_000));
        assert!(matches!(
            Message::decode(&bytes).unwrap(),
            Message::DocUnavailable { .. }
        ));
    }

    #[test]
    fn not_a_map_and_unknown_type() {
        assert!(matches!(Message::decode(&[]), Err(ProtocolError::Cbor(_))));
        assert!(matches!(
            Message::decode(&t("sync")),
            Err(ProtocolError::Cbor(_))
        ));
        assert!(matches!(
            Message::decode(&[0x80]),
            Err(ProtocolError::Cbor(_))
        ));
        let bytes = frame(&[&[0xa2], &t("type"), &t("leave"), &t("senderId"), &t("a")]);
        assert_eq!(
            Message::decode(&bytes),
            Err(ProtocolError::UnknownType("\"leave\"".into()))
        );
        let long_type = "x".repeat(10_000);
        let err = Message::decode(&frame(&[&[0xa1], &t("type"), &t(&long_type)])).unwrap_err();
        assert!(err.to_string().len() < 200);
    }

    /// Removes one top-level key from an encoded message by re-encoding without it.
    fn without(msg: &Message, key: &str) -> Vec<u8> {
        let value: ciborium::Value = ciborium::de::from_reader(msg.encode().as_slice()).unwrap();
        let ciborium::Value::Map(entries) = value else {
            panic!()
        };
        let kept: Vec<_> = entries
            .into_iter()
            .filter(|(k, _)| k.as_text() != Some(key))
            .collect();
        let mut out = Vec::new();
        ciborium::ser::into_writer(&ciborium::Value::Map(kept), &mut out).unwrap();
        out
    }

    fn with(msg: &Message, key: &str, value: ciborium::Value) -> Vec<u8> {
        let parsed: ciborium::Value = ciborium::de::from_reader(msg.encode().as_slice()).unwrap();
        let ciborium::Value::Map(mut entries) = parsed else {
            panic!()
        };
        entries.retain(|(k, _)| k.as_text() != Some(key));
        entries.push((ciborium::Value::Text(key.into()), value));
        let mut out = Vec::new();
        ciborium::ser::into_writer(&ciborium::Value::Map(entries), &mut out).unwrap();
        out
    }

    #[test]
    fn missing_required_fields_are_named() {
        let required: [(&str, &[&str]); 9] = [
            ("join", &["type", "senderId"]),
            (
                "peer",
                &["type", "senderId", "targetId", "selectedProtocolVersion"],
            ),
            ("error", &["type", "message"]),
            (
                "request",
                &["type", "senderId", "targetId", "documentId", "data"],
            ),
            (
                "sync",
                &["type", "senderId", "targetId", "documentId", "data"],
            ),
            (
                "doc-unavailable",
                &["type", "senderId", "targetId", "documentId"],
            ),
            (
                "ephemeral",
                &[
                    "type",
                    "senderId",
                    "targetId",
                    "documentId",
                    "count",
                    "sessionId",
                    "data",
                ],
            ),
            (
                "remote-subscription-change",
                &["type", "senderId", "targetId"],
            ),
            (
                "remote-heads-changed",
                &["type", "senderId", "targetId", "documentId"],
            ),
        ];
        for (msg, (name, fields)) in one_of_each().iter().zip(required) {
            assert_eq!(msg.type_name(), name);
            for field in fields {
                let err = Message::decode(&without(msg, field)).unwrap_err();
                assert_eq!(
                    err,
                    ProtocolError::MissingField(field),
                    "{name} without {field}"
                );
                // null and undefined mean absent too
                let err = Message::decode(&with(msg, field, ciborium::Value::Null)).unwrap_err();
                assert_eq!(
                    err,
                    ProtocolError::MissingField(field),
                    "{name} with null {field}"
                );
            }
        }
    }

    #[test]
    fn wrong_types_are_refused_with_the_field_name() {
        use ciborium::Value;
        let sync = &one_of_each()[4];
        let ephemeral = &one_of_each()[6];
        let join = &one_of_each()[0];
        let cases: Vec<(&Message, &str, Value)> = vec![
            (sync, "senderId", Value::Integer(5.into())),
            (sync, "targetId", Value::Bytes(b"b".to_vec())),
            (sync, "data", Value::Text("not bytes".into())),
            (sync, "data", Value::Array(vec![Value::Integer(1.into())])),
            (sync, "type", Value::Integer(1.into())),
            (sync, "documentId", Value::Integer(1.into())),
            (ephemeral, "count", Value::Integer((-1).into())),
            (ephemeral, "count", Value::Float(1.5)),
            (ephemeral, "count", Value::Float(f64::NAN)),
            (ephemeral, "count", Value::Float(1e20)),
            (ephemeral, "count", Value::Text("1".into())),
            (join, "peerMetadata", Value::Text("x".into())),
            (join, "supportedProtocolVersions", Value::Text("1".into())),
            (
                join,
                "supportedProtocolVersions",
                Value::Array(vec![Value::Integer(1.into())]),
            ),
            (
                join,
                "supportedProtocolVersions",
                Value::Array(vec![Value::Text("1".into()); 17]),
            ),
            (sync, "senderId", Value::Text("p".repeat(MAX_ID_BYTES + 1))),
        ];
        for (msg, field, value) in cases {
            let err = Message::decode(&with(msg, field, value.clone())).unwrap_err();
            assert!(
                matches!(err, ProtocolError::InvalidField { field: f, .. } if f == field),
                "{field} = {value:?}: {err}"
            );
        }
        let bad_meta = Value::Map(vec![(
            Value::Text("isEphemeral".into()),
            Value::Text("yes".into()),
        )]);
        assert_eq!(
            Message::decode(&with(join, "peerMetadata", bad_meta)).unwrap_err(),
            ProtocolError::InvalidField {
                field: "isEphemeral",
                expected: "bool"
            }
        );
        for bad_id in [Value::Text("badbadbad".into()), Value::Bytes(vec![1; 15])] {
            assert!(matches!(
                Message::decode(&with(sync, "documentId", bad_id)).unwrap_err(),
                ProtocolError::InvalidDocumentId(_)
            ));
        }
    }

    // ---- properties ----

    fn id_string() -> impl Strategy<Value = String> {
        prop_oneof!["[a-zA-Z0-9-]{0,24}", "\\PC{0,12}"]
    }

    fn arb_peer() -> impl Strategy<Value = PeerId> {
        id_string().prop_map(PeerId::new)
    }

    fn arb_metadata() -> impl Strategy<Value = PeerMetadata> {
        (proptest::option::of(id_string()), any::<bool>()).prop_map(|(s, e)| PeerMetadata {
            storage_id: s.map(StorageId::new),
            is_ephemeral: e,
        })
    }

    fn arb_doc() -> impl Strategy<Value = DocumentId> {
        any::<[u8; 16]>().prop_map(DocumentId::from_bytes)
    }

    fn arb_data() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..300)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                arb_peer(),
                arb_metadata(),
                proptest::collection::vec(id_string(), 0..4)
            )
                .prop_map(|(sender_id, peer_metadata, supported_protocol_versions)| {
                    Message::Join {
                        sender_id,
                        peer_metadata,
                        supported_protocol_versions,
                    }
                }),
            (arb_peer(), arb_peer(), arb_metadata(), id_string()).prop_map(
                |(sender_id, target_id, peer_metadata, selected_protocol_version)| Message::Peer {
                    sender_id,
                    target_id,
                    peer_metadata,
                    selected_protocol_version,
                }
            ),
            "\\PC{0,40}".prop_map(|message| Message::Error { message }),
            (arb_peer(), arb_peer(), arb_doc(), arb_data()).prop_map(
                |(sender_id, target_id, document_id, data)| Message::Request {
                    sender_id,
                    target_id,
                    document_id,
                    data,
                }
            ),
            (arb_peer(), arb_peer(), arb_doc(), arb_data()).prop_map(
                |(sender_id, target_id, document_id, data)| Message::Sync {
                    sender_id,
                    target_id,
                    document_id,
                    data,
                }
            ),
            (arb_peer(), arb_peer(), arb_doc()).prop_map(|(sender_id, target_id, document_id)| {
                Message::DocUnavailable {
                    sender_id,
                    target_id,
                    document_id,
                }
            }),
            (
                arb_peer(),
                arb_peer(),
                arb_doc(),
                any::<u64>(),
                id_string(),
                arb_data()
            )
                .prop_map(
                    |(sender_id, target_id, document_id, count, session_id, data)| {
                        Message::Ephemeral {
                            sender_id,
                            target_id,
                            document_id,
                            count,
                            session_id,
                            data,
                        }
                    }
                ),
            (arb_peer(), arb_peer()).prop_map(|(sender_id, target_id)| {
                Message::RemoteSubscriptionChange {
                    sender_id,
                    target_id,
                }
            }),
            (arb_peer(), arb_peer(), arb_doc()).prop_map(|(sender_id, target_id, document_id)| {
                Message::RemoteHeadsChanged {
                    sender_id,
                    target_id,
                    document_id,
                }
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn roundtrip_every_variant(msg in arb_message()) {
            let bytes = msg.encode();
            prop_assert_eq!(Message::decode(&bytes).unwrap(), msg);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&bytes);
        }

        /// Mutations of valid frames reach much deeper into the decoder than random bytes.
        #[test]
        fn mutated_frames_never_panic(
            msg in arb_message(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = msg.encode();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            let _ = Message::decode(&bytes);
            let _ = Message::decode(&bytes[..cut.index(bytes.len())]);
        }
    }
}
