//! The batch document fetch (`POST /v1/documents/fetch`): how a device gets documents it does
//! not hold at all — a first sync, a new patient on the caseload — without one protocol
//! exchange per document.
//!
//! The request (content type [`FETCH_REQUEST_CONTENT_TYPE`]) is binary: the magic
//! [`FETCH_REQUEST_MAGIC`], then the raw 16-byte ids, 1 to [`MAX_FETCH_IDS`] of them, each
//! once ([`fetch_request_body`], [`decode_fetch_request`]). A relay also reads the JSON form
//! `{"documentIds": ["<bs58check id>", ...]}` that devices sent before: the binary one is 16
//! bytes an id instead of about 33, which on a first sync of small documents is most of what
//! goes up. The answer (`200`, [`FETCH_CONTENT_TYPE`]) is binary: the magic
//! [`FETCH_MAGIC`], then one record per requested id, then an end record:
//!
//! ```text
//! 0x01 id[16] len:u32be bytes[len]   ok: the relay's stored document (automerge chunks)
//! 0x02 id[16]                        unavailable: unknown, or not this caller's to see
//! 0x03 id[16]                        deferred: over the answer's byte budget; ask again
//! 0x00 count:u32be                   end: the number of records before it
//! ```
//!
//! Both sides live here so the relay's writer and the device's reader cannot drift apart. The
//! reader is strict: every record must name an id that was asked for, once; lengths are
//! bounded; the end record must be there, count every record and close the body. A body cut
//! short (the connection dropped mid-batch) still yields the records that arrived whole, with
//! the error, so what was delivered is not thrown away.

use std::collections::HashSet;
use std::fmt;

use crate::protocol::DocumentId;

/// Path of the endpoint.
pub const FETCH_PATH: &str = "/v1/documents/fetch";

/// Content type of the answer.
pub const FETCH_CONTENT_TYPE: &str = "application/vnd.fieldchart.documents";

/// First bytes of every answer: format name and version.
pub const FETCH_MAGIC: &[u8; 4] = b"FCD1";

/// Most ids in one request.
pub const MAX_FETCH_IDS: usize = 500;

/// Largest request body the relay reads, bytes (500 ids of ~30 characters in JSON take about
/// 18 KB).
pub const MAX_FETCH_REQUEST_BYTES: usize = 64 * 1024;

/// The relay stops adding documents to an answer once it holds this many bytes; the rest are
/// `deferred`. At least one document is always sent, so every request makes progress.
pub const FETCH_RESPONSE_BUDGET_BYTES: usize = 8 * 1024 * 1024;

/// Largest single document accepted in an answer, bytes.
pub const MAX_FETCH_DOC_BYTES: usize = 16 * 1024 * 1024;

/// Largest answer the device reads, bytes: the budget, one document past it, and framing.
pub const MAX_FETCH_RESPONSE_BYTES: usize =
    FETCH_RESPONSE_BUDGET_BYTES + MAX_FETCH_DOC_BYTES + MAX_FETCH_IDS * 32 + 64;

const TAG_END: u8 = 0x00;
const TAG_OK: u8 = 0x01;
const TAG_UNAVAILABLE: u8 = 0x02;
const TAG_DEFERRED: u8 = 0x03;

/// Content type of the binary request.
pub const FETCH_REQUEST_CONTENT_TYPE: &str = "application/vnd.fieldchart.document-ids";

/// First bytes of a binary request: format name and version.
pub const FETCH_REQUEST_MAGIC: &[u8; 4] = b"FCI1";

/// The binary body of a fetch request for `ids` (the caller keeps to [`MAX_FETCH_IDS`]
/// distinct ids, as the relay refuses anything else).
pub fn fetch_request_body(ids: &[DocumentId]) -> Vec<u8> {
    let mut body = Vec::with_capacity(FETCH_REQUEST_MAGIC.len() + 16 * ids.len());
    body.extend_from_slice(FETCH_REQUEST_MAGIC);
    for id in ids {
        body.extend_from_slice(id.as_bytes());
    }
    body
}

/// Why a binary request was refused (the relay answers 400 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchRequestError {
    /// The body does not start with [`FETCH_REQUEST_MAGIC`].
    #[error("not a document id list (wrong magic or version)")]
    BadMagic,
    /// The ids are not whole 16-byte ids (a cut body).
    #[error("the document id list is not a whole number of 16-byte ids")]
    Truncated,
    /// No id at all.
    #[error("the document id list is empty")]
    Empty,
    /// More than [`MAX_FETCH_IDS`] ids.
    #[error("at most {MAX_FETCH_IDS} document ids per request (got {0})")]
    TooMany(usize),
    /// An id named twice (the answer has one record per id).
    #[error("document id {0} is named twice")]
    Repeated(usize),
}

/// Read a binary request: the ids in the order asked. Never panics, whatever the bytes.
pub fn decode_fetch_request(body: &[u8]) -> Result<Vec<DocumentId>, FetchRequestError> {
    let rest = body
        .strip_prefix(FETCH_REQUEST_MAGIC.as_slice())
        .ok_or(FetchRequestError::BadMagic)?;
    if rest.len() % 16 != 0 {
        return Err(FetchRequestError::Truncated);
    }
    let count = rest.len() / 16;
    if count == 0 {
        return Err(FetchRequestError::Empty);
    }
    if count > MAX_FETCH_IDS {
        return Err(FetchRequestError::TooMany(count));
    }
    let mut seen = HashSet::with_capacity(count);
    let mut ids = Vec::with_capacity(count);
    for (i, raw) in rest.chunks_exact(16).enumerate() {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(raw);
        let id = DocumentId::from_bytes(bytes);
        if !seen.insert(id) {
            return Err(FetchRequestError::Repeated(i));
        }
        ids.push(id);
    }
    Ok(ids)
}

/// What the relay said about one document.
#[derive(Clone, PartialEq, Eq)]
pub enum FetchRecord {
    /// The document's stored bytes.
    Ok(DocumentId, Vec<u8>),
    /// Unknown to the relay, or not the caller's to see (the two are not told apart).
    Unavailable(DocumentId),
    /// Not sent in this answer (byte budget); ask again.
    Deferred(DocumentId),
}

impl FetchRecord {
    /// The document the record is about.
    pub fn id(&self) -> DocumentId {
        match self {
            FetchRecord::Ok(id, _) | FetchRecord::Unavailable(id) | FetchRecord::Deferred(id) => {
                *id
            }
        }
    }
}

impl fmt::Debug for FetchRecord {
    /// Document bytes are shown as a length: they carry clinical content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchRecord::Ok(id, bytes) => write!(f, "Ok({id}, <{} bytes>)", bytes.len()),
            FetchRecord::Unavailable(id) => write!(f, "Unavailable({id})"),
            FetchRecord::Deferred(id) => write!(f, "Deferred({id})"),
        }
    }
}

/// Why an answer could not be read (completely).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The body does not start with [`FETCH_MAGIC`].
    #[error("not a document batch (wrong magic or version)")]
    BadMagic,
    /// The body ended before the end record.
    #[error("the document batch was cut short after {0} records")]
    Truncated(usize),
    /// A record type this reader does not know.
    #[error("unknown record type {0:#04x} in the document batch")]
    UnknownRecord(u8),
    /// A record names an id that was not asked for, or one already answered.
    #[error("the document batch answers an id that was not asked for, or twice")]
    UnexpectedId,
    /// A document longer than [`MAX_FETCH_DOC_BYTES`], or a body longer than
    /// [`MAX_FETCH_RESPONSE_BYTES`].
    #[error("the document batch is over its size limit")]
    Oversize,
    /// The end record's count differs from the records read, or ids asked for are missing.
    #[error("the document batch's end record does not match its records")]
    CountMismatch,
    /// Bytes after the end record.
    #[error("bytes after the end of the document batch")]
    TrailingBytes,
}

/// What [`decode_fetch_response`] read: the records that arrived whole, in order, and the
/// error that stopped it, if any (then `records` is a prefix of the answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedBatch {
    /// Records read.
    pub records: Vec<FetchRecord>,
    /// Why reading stopped early, if it did.
    pub error: Option<FetchError>,
}

/// Read an answer to a request for `requested`. Never panics, whatever the bytes.
pub fn decode_fetch_response(body: &[u8], requested: &[DocumentId]) -> DecodedBatch {
    let mut records = Vec::new();
    let error = decode_into(body, requested, &mut records).err();
    DecodedBatch { records, error }
}

fn decode_into(
    body: &[u8],
    requested: &[DocumentId],
    records: &mut Vec<FetchRecord>,
) -> Result<(), FetchError> {
    if body.len() > MAX_FETCH_RESPONSE_BYTES {
        return Err(FetchError::Oversize);
    }
    let Some(mut rest) = body.strip_prefix(FETCH_MAGIC.as_slice()) else {
        return Err(if FETCH_MAGIC.starts_with(body) {
            FetchError::Truncated(0)
        } else {
            FetchError::BadMagic
        });
    };
    let mut open: HashSet<DocumentId> = requested.iter().copied().collect();
    loop {
        let truncated = FetchError::Truncated(records.len());
        let (&tag, after) = rest.split_first().ok_or(truncated.clone())?;
        rest = after;
        if tag == TAG_END {
            let count = take_u32(&mut rest).ok_or(truncated)?;
            if count as usize != records.len() || !open.is_empty() {
                return Err(FetchError::CountMismatch);
            }
            if !rest.is_empty() {
                return Err(FetchError::TrailingBytes);
            }
            return Ok(());
        }
        if !matches!(tag, TAG_OK | TAG_UNAVAILABLE | TAG_DEFERRED) {
            return Err(FetchError::UnknownRecord(tag));
        }
        let id = take_id(&mut rest).ok_or(truncated.clone())?;
        if !open.remove(&id) {
            return Err(FetchError::UnexpectedId);
        }
        let record = match tag {
            TAG_OK => {
                let len = take_u32(&mut rest).ok_or(truncated.clone())? as usize;
                if len > MAX_FETCH_DOC_BYTES {
                    return Err(FetchError::Oversize);
                }
                if rest.len() < len {
                    return Err(truncated);
                }
                let (bytes, after) = rest.split_at(len);
                rest = after;
                FetchRecord::Ok(id, bytes.to_vec())
            }
            TAG_UNAVAILABLE => FetchRecord::Unavailable(id),
            _ => FetchRecord::Deferred(id),
        };
        records.push(record);
    }
}

fn take_u32(rest: &mut &[u8]) -> Option<u32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(u32::from_be_bytes(*head))
}

fn take_id(rest: &mut &[u8]) -> Option<DocumentId> {
    let (head, tail) = rest.split_first_chunk::<16>()?;
    *rest = tail;
    Some(DocumentId::from_bytes(*head))
}

/// Builds an answer (the relay's side).
#[derive(Debug)]
pub struct FetchResponseWriter {
    buf: Vec<u8>,
    records: u32,
}

impl Default for FetchResponseWriter {
    fn default() -> Self {
        FetchResponseWriter::new()
    }
}

impl FetchResponseWriter {
    /// An empty answer.
    pub fn new() -> FetchResponseWriter {
        FetchResponseWriter {
            buf: FETCH_MAGIC.to_vec(),
            records: 0,
        }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no record was written yet.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// A document, as the concatenation of `parts` (a snapshot and the chunks after it: any
    /// sequence of automerge chunks loads as one document). Parts longer than
    /// [`MAX_FETCH_DOC_BYTES`] together are the caller's to refuse (the reader would).
    pub fn ok(&mut self, id: DocumentId, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.buf.push(TAG_OK);
        self.buf.extend_from_slice(id.as_bytes());
        self.buf
            .extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        for part in parts {
            self.buf.extend_from_slice(part);
        }
        self.records += 1;
    }

    /// A document the caller does not get (unknown, or not theirs to see).
    pub fn unavailable(&mut self, id: DocumentId) {
        self.buf.push(TAG_UNAVAILABLE);
        self.buf.extend_from_slice(id.as_bytes());
        self.records += 1;
    }

    /// A document left for another request.
    pub fn deferred(&mut self, id: DocumentId) {
        self.buf.push(TAG_DEFERRED);
        self.buf.extend_from_slice(id.as_bytes());
        self.records += 1;
    }

    /// The finished answer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(TAG_END);
        self.buf.extend_from_slice(&self.records.to_be_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<DocumentId> {
        (0..n).map(|_| DocumentId::random()).collect()
    }

    fn answer(requested: &[DocumentId]) -> Vec<u8> {
        let mut w = FetchResponseWriter::new();
        w.ok(requested[0], &[b"snap", b"chunk"]);
        w.unavailable(requested[1]);
        w.deferred(requested[2]);
        w.finish()
    }

    #[test]
    fn an_answer_reads_back_record_by_record() {
        let requested = ids(3);
        let decoded = decode_fetch_response(&answer(&requested), &requested);
        assert_eq!(decoded.error, None);
        assert_eq!(
            decoded.records,
            vec![
                FetchRecord::Ok(requested[0], b"snapchunk".to_vec()),
                FetchRecord::Unavailable(requested[1]),
                FetchRecord::Deferred(requested[2]),
            ]
        );
    }

    #[test]
    fn every_truncation_is_an_error_and_keeps_only_whole_records() {
        let requested = ids(3);
        let body = answer(&requested);
        for cut in 0..body.len() {
            let decoded = decode_fetch_response(&body[..cut], &requested);
            assert!(
                matches!(decoded.error, Some(FetchError::Truncated(n)) if n == decoded.records.len()),
                "cut at {cut}: {decoded:?}"
            );
            // The first record (the document) is kept only once all of its bytes arrived.
            let first_whole = 4 + 1 + 16 + 4 + 9;
            assert_eq!(
                !decoded.records.is_empty(),
                cut >= first_whole,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_unknown_ids_duplicates_and_bad_counts_are_refused() {
        let requested = ids(3);
        let stranger = DocumentId::random();
        assert_eq!(
            decode_fetch_response(b"GET / HTTP/1.1", &requested).error,
            Some(FetchError::BadMagic)
        );
        let mut w = FetchResponseWriter::new();
        w.unavailable(stranger);
        assert_eq!(
            decode_fetch_response(&w.finish(), &requested).error,
            Some(FetchError::UnexpectedId)
        );
        let mut w = FetchResponseWriter::new();
        w.unavailable(requested[0]);
        w.unavailable(requested[0]);
        assert_eq!(
            decode_fetch_response(&w.finish(), &requested).error,
            Some(FetchError::UnexpectedId)
        );
        // An id asked for and never answered.
        let mut w = FetchResponseWriter::new();
        w.unavailable(requested[0]);
        w.unavailable(requested[1]);
        assert_eq!(
            decode_fetch_response(&w.finish(), &requested).error,
            Some(FetchError::CountMismatch)
        );
        let mut body = answer(&requested);
        body.push(0);
        assert_eq!(
            decode_fetch_response(&body, &requested).error,
            Some(FetchError::TrailingBytes)
        );
        let mut body = answer(&requested);
        let n = body.len();
        body[n - 1] = 9;
        assert_eq!(
            decode_fetch_response(&body, &requested).error,
            Some(FetchError::CountMismatch)
        );
        let mut body = FETCH_MAGIC.to_vec();
        body.push(0x7f);
        assert_eq!(
            decode_fetch_response(&body, &requested).error,
            Some(FetchError::UnknownRecord(0x7f))
        );
    }

    #[test]
    fn oversize_documents_and_bodies_are_refused_before_reading_them() {
        let requested = ids(1);
        let mut body = FETCH_MAGIC.to_vec();
        body.push(TAG_OK);
        body.extend_from_slice(requested[0].as_bytes());
        body.extend_from_slice(&(MAX_FETCH_DOC_BYTES as u32 + 1).to_be_bytes());
        assert_eq!(
            decode_fetch_response(&body, &requested).error,
            Some(FetchError::Oversize)
        );
        let huge = vec![0u8; MAX_FETCH_RESPONSE_BYTES + 1];
        assert_eq!(
            decode_fetch_response(&huge, &requested).error,
            Some(FetchError::Oversize)
        );
    }

    #[test]
    fn the_request_body_names_every_id_in_order() {
        let requested = ids(3);
        let body = fetch_request_body(&requested);
        assert_eq!(body.len(), 4 + 3 * 16);
        assert_eq!(decode_fetch_request(&body), Ok(requested));
        let most = ids(MAX_FETCH_IDS);
        assert_eq!(decode_fetch_request(&fetch_request_body(&most)), Ok(most));
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let requested = ids(3);
        let body = fetch_request_body(&requested);
        // Every cut: the magic cut is a bad magic, a cut id is truncated, no id is empty.
        for cut in 0..body.len() {
            let want = match cut {
                0..4 => FetchRequestError::BadMagic,
                4 => FetchRequestError::Empty,
                c if (c - 4) % 16 == 0 => continue,
                _ => FetchRequestError::Truncated,
            };
            assert_eq!(
                decode_fetch_request(&body[..cut]),
                Err(want),
                "cut at {cut}"
            );
        }
        // Garbage, the JSON form, another version.
        assert_eq!(
            decode_fetch_request(b"\xff\xfe garbage"),
            Err(FetchRequestError::BadMagic)
        );
        assert_eq!(
            decode_fetch_request(br#"{"documentIds": []}"#),
            Err(FetchRequestError::BadMagic)
        );
        let mut v2 = body.clone();
        v2[3] = b'2';
        assert_eq!(decode_fetch_request(&v2), Err(FetchRequestError::BadMagic));
        // Oversize, and an id twice.
        let too_many = fetch_request_body(&ids(MAX_FETCH_IDS + 1));
        assert_eq!(
            decode_fetch_request(&too_many),
            Err(FetchRequestError::TooMany(MAX_FETCH_IDS + 1))
        );
        let twice = fetch_request_body(&[requested[0], requested[1], requested[0]]);
        assert_eq!(
            decode_fetch_request(&twice),
            Err(FetchRequestError::Repeated(2))
        );
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let requested = ids(2);
            let mut body = FETCH_MAGIC.to_vec();
            body.extend_from_slice(&bytes);
            let _ = decode_fetch_response(&body, &requested);
            let _ = decode_fetch_response(&bytes, &requested);
        }

        #[test]
        fn any_request_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut body = FETCH_REQUEST_MAGIC.to_vec();
            body.extend_from_slice(&bytes);
            let _ = decode_fetch_request(&body);
            let _ = decode_fetch_request(&bytes);
        }

        #[test]
        fn written_answers_read_back(docs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..20)) {
            let requested = ids(docs.len());
            let mut w = FetchResponseWriter::new();
            let mut want = Vec::new();
            for (id, (kind, bytes)) in requested.iter().zip(&docs) {
                match kind % 3 {
                    0 => { w.ok(*id, &[bytes]); want.push(FetchRecord::Ok(*id, bytes.clone())); }
                    1 => { w.unavailable(*id); want.push(FetchRecord::Unavailable(*id)); }
                    _ => { w.deferred(*id); want.push(FetchRecord::Deferred(*id)); }
                }
            }
            let decoded = decode_fetch_response(&w.finish(), &requested);
            prop_assert_eq!(decoded.error, None);
            prop_assert_eq!(decoded.records, want);
        }
    }
}
