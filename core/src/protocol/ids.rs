//! Identifiers of automerge-repo: documents, peers, storage, and bs58check-encoded heads.
//!
//! A document id is 16 random bytes (a UUIDv4) written as bs58check, which is what JS
//! `binaryToDocumentId`/`documentIdToBinary` (`AutomergeUrl.ts`) do; the 4-byte checksum makes
//! a mistyped id fail loudly instead of naming another document. Peer and storage ids are
//! opaque strings chosen by each peer.

use std::fmt;
use std::str::FromStr;

use automerge::ChangeHash;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::message::ProtocolError;

/// The prefix of an automerge URL (`urlPrefix` in JS `AutomergeUrl.ts`).
pub const URL_PREFIX: &str = "automerge:";

/// Longest bs58check string [`DocumentId`] and [`decode_heads`] will try to decode. base58
/// decoding is quadratic in the input, so a huge "id" in a frame must be refused before it is
/// decoded; 36 bytes (a 32-byte hash plus checksum) encode to at most 50 characters.
const MAX_BS58_CHARS: usize = 64;

/// A document id: 16 bytes, shown as bs58check (e.g. `4NMNnkMhL8jXrdJ9jamS58PAVdXu`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocumentId([u8; 16]);

impl DocumentId {
    /// A new random id, shaped as a UUIDv4 like the JS `generateAutomergeUrl`.
    pub fn random() -> Self {
        let mut bytes: [u8; 16] = rand::random();
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        DocumentId(bytes)
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        DocumentId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// `automerge:<bs58check id>`, the form JS apps store and share.
    pub fn url(&self) -> String {
        format!("{URL_PREFIX}{self}")
    }

    /// Parses an automerge URL or a bare id. A `#heads` suffix (a URL pinned to a version) is
    /// accepted and ignored: it names a version of the same document.
    pub fn from_url(s: &str) -> Result<Self, ProtocolError> {
        let without_prefix = s.strip_prefix(URL_PREFIX).unwrap_or(s);
        let id = without_prefix
            .split_once('#')
            .map_or(without_prefix, |(id, _heads)| id);
        id.parse()
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(&self.0).with_check().into_string())
    }
}

impl fmt::Debug for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocumentId({self})")
    }
}

impl FromStr for DocumentId {
    type Err = ProtocolError;

    /// Parses a bare bs58check id; use [`DocumentId::from_url`] for `automerge:` URLs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid =
            |why: &str| ProtocolError::InvalidDocumentId(format!("{}: {why}", snippet(s)));
        let bytes = decode_bs58check(s).map_err(|why| invalid(&why))?;
        let bytes: [u8; 16] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| invalid(&format!("{} bytes, expected 16", b.len())))?;
        Ok(DocumentId(bytes))
    }
}

impl Serialize for DocumentId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DocumentId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Shared shape of the opaque string ids.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: String) -> Self {
                $name(id)
            }

            /// `<prefix>-<22 random base58 characters>` (128 random bits). A prefix that already
            /// ends in `-`, or an empty one, gets no extra separator.
            pub fn random(prefix: &str) -> Self {
                let random = bs58::encode(rand::random::<[u8; 16]>()).into_string();
                if prefix.is_empty() || prefix.ends_with('-') {
                    $name(format!("{prefix}{random}"))
                } else {
                    $name(format!("{prefix}-{random}"))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_owned())
            }
        }
    };
}

string_id!(
    /// The id a peer announces in `join`/`peer` and puts in `senderId`/`targetId`. JS repos
    /// pick a fresh random one per process (`peer-xxxxxxxx`), so it names a connection's
    /// endpoint, not a device or a user: never authorize on it.
    PeerId
);

string_id!(
    /// The stable id of a peer's storage (`peerMetadata.storageId`). JS peers key persisted
    /// sync state by it, so a relay must keep advertising the same one across restarts.
    StorageId
);

/// Encodes heads as bs58check strings, as JS `encodeHeads` does for URLs and
/// `remote-heads-changed`.
pub fn encode_heads(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(encode_head).collect()
}

pub fn encode_head(head: &ChangeHash) -> String {
    bs58::encode(head.as_ref()).with_check().into_string()
}

/// Decodes bs58check heads; any bad checksum or a length other than 32 bytes is an error.
pub fn decode_heads(heads: &[String]) -> Result<Vec<ChangeHash>, ProtocolError> {
    heads.iter().map(|h| decode_head(h)).collect()
}

pub fn decode_head(head: &str) -> Result<ChangeHash, ProtocolError> {
    let invalid = |why: &str| ProtocolError::InvalidHeads(format!("{}: {why}", snippet(head)));
    let bytes = decode_bs58check(head).map_err(|why| invalid(&why))?;
    ChangeHash::try_from(bytes.as_slice())
        .map_err(|_| invalid(&format!("{} bytes, expected 32", bytes.len())))
}

fn decode_bs58check(s: &str) -> Result<Vec<u8>, String> {
    if s.len() > MAX_BS58_CHARS {
        return Err(format!("longer than {MAX_BS58_CHARS} characters"));
    }
    bs58::decode(s)
        .with_check(None)
        .into_vec()
        .map_err(|e| e.to_string())
}

/// At most 64 characters of an untrusted string, for error messages and logs.
pub(super) fn snippet(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{:?}…", &s[..end]),
        None => format!("{s:?}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    /// From automerge-repo `test/AutomergeUrl.test.ts` (goodBinaryDocumentId / goodDocumentId).
    const JS_ID: &str = "4NMNnkMhL8jXrdJ9jamS58PAVdXu";
    const JS_BYTES: [u8; 16] = [
        241, 194, 156, 132, 116, 200, 74, 222, 184, 0, 190, 71, 98, 125, 51, 191,
    ];

    #[test]
    fn document_id_matches_js_fixture() {
        let id = DocumentId::from_bytes(JS_BYTES);
        assert_eq!(id.to_string(), JS_ID);
        assert_eq!(id.url(), format!("automerge:{JS_ID}"));
        assert_eq!(JS_ID.parse::<DocumentId>().unwrap(), id);
        assert_eq!(
            DocumentId::from_url(&format!("automerge:{JS_ID}")).unwrap(),
            id
        );
        assert_eq!(DocumentId::from_url(JS_ID).unwrap(), id);
        assert_eq!(
            DocumentId::from_url(&format!("automerge:{JS_ID}#")).unwrap(),
            id
        );
    }

    #[test]
    fn document_id_rejects_bad_checksum_length_and_alphabet() {
        // The JS test's bad-checksum id.
        assert!(matches!(
            "badbadbad".parse::<DocumentId>(),
            Err(ProtocolError::InvalidDocumentId(_))
        ));
        // One character changed: the checksum catches the typo.
        let mut typo = JS_ID.to_owned();
        typo.replace_range(5..6, "N");
        assert_ne!(typo, JS_ID);
        assert!(typo.parse::<DocumentId>().is_err());
        // Valid bs58check of 8 bytes (JS `badUuidDocumentId`): not a document id.
        let short = bs58::encode([1u8, 2, 3, 4, 42, 255, 69, 9])
            .with_check()
            .into_string();
        let err = short.parse::<DocumentId>().unwrap_err();
        assert!(err.to_string().contains("8 bytes"), "{err}");
        assert!("0OIl".parse::<DocumentId>().is_err());
        assert!("".parse::<DocumentId>().is_err());
        assert!(DocumentId::from_url("yjs:4NMNnkMhL8jXrdJ9jamS58PAVdXu").is_err());
        // A huge string is refused before the quadratic base58 decode.
        let huge = "2".repeat(1 << 20);
        let err = huge.parse::<DocumentId>().unwrap_err();
        assert!(
            err.to_string().len() < 200,
            "error message must not echo the input"
        );
    }

    #[test]
    fn random_document_ids_are_uuid_v4_and_distinct() {
        let a = DocumentId::random();
        let b = DocumentId::random();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[6] >> 4, 4);
        assert_eq!(a.as_bytes()[8] >> 6, 0b10);
    }

    #[test]
    fn document_id_serde_is_the_bs58_string() {
        let id = DocumentId::from_bytes(JS_BYTES);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{JS_ID}\""));
        assert_eq!(serde_json::from_str::<DocumentId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<DocumentId>("\"badbadbad\"").is_err());
    }

    #[test]
    fn string_ids_random_and_display() {
        let p = PeerId::random("relay");
        assert!(p.as_str().starts_with("relay-"), "{p}");
        assert!(PeerId::random("peer-").as_str().starts_with("peer-"));
        assert!(!PeerId::random("peer-").as_str().starts_with("peer--"));
        assert_ne!(PeerId::random("x"), PeerId::random("x"));
        let s = StorageId::new("abc".into());
        assert_eq!(s.to_string(), "abc");
        assert_eq!(format!("{s:?}"), "StorageId(\"abc\")");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"abc\"");
    }

    /// Independent bs58check: base58 of payload ‖ sha256(sha256(payload))[..4].
    fn reference_bs58check(payload: &[u8]) -> String {
        let checksum = Sha256::digest(Sha256::digest(payload));
        let mut data = payload.to_vec();
        data.extend_from_slice(&checksum[..4]);
        bs58::encode(data).into_string()
    }

    #[test]
    fn heads_use_bs58check_of_the_raw_hash() {
        let hash = ChangeHash([7u8; 32]);
        let encoded = encode_heads(&[hash]);
        assert_eq!(encoded, vec![reference_bs58check(&[7u8; 32])]);
        assert_eq!(decode_heads(&encoded).unwrap(), vec![hash]);
        assert_eq!(decode_heads(&[]).unwrap(), vec![]);
    }

    #[test]
    fn heads_reject_bad_checksum_and_length() {
        let good = encode_head(&ChangeHash([9u8; 32]));
        let mut chars: Vec<char> = good.chars().collect();
        chars[3] = if chars[3] == 'z' { 'y' } else { 'z' };
        let typo: String = chars.into_iter().collect();
        assert!(matches!(
            decode_head(&typo),
            Err(ProtocolError::InvalidHeads(_))
        ));
        // The JS test encodes 4-byte "heads"; they are not change hashes.
        let short = reference_bs58check(&[1, 2, 3, 4]);
        assert!(matches!(
            decode_heads(&[good.clone(), short]),
            Err(ProtocolError::InvalidHeads(_))
        ));
        // Hex (automerge's own head format) is not bs58check.
        assert!(decode_head(&hex::encode([9u8; 32])).is_err());
    }

    proptest! {
        #[test]
        fn document_id_roundtrip(bytes in any::<[u8; 16]>()) {
            let id = DocumentId::from_bytes(bytes);
            prop_assert_eq!(id.to_string(), reference_bs58check(&bytes));
            prop_assert_eq!(id.to_string().parse::<DocumentId>().unwrap(), id);
            prop_assert_eq!(DocumentId::from_url(&id.url()).unwrap(), id);
        }

        #[test]
        fn heads_roundtrip(hashes in proptest::collection::vec(any::<[u8; 32]>(), 0..8)) {
            let heads: Vec<ChangeHash> = hashes.into_iter().map(ChangeHash).collect();
            prop_assert_eq!(decode_heads(&encode_heads(&heads)).unwrap(), heads);
        }

        #[test]
        fn document_id_parse_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<DocumentId>();
            let _ = DocumentId::from_url(&s);
            let _ = decode_head(&s);
        }
    }
}
