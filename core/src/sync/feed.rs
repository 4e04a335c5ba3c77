//! The relay's change feed (`GET /v1/changes`) as the device reads it.
//!
//! The JSON is the relay's `ChangesPage` (`server/src/feed.rs`): `{"changes": [{"documentId",
//! "kind", "patientId", "heads"}], "next", "more"}`. Parsing is strict about what the pass acts
//! on (ids, heads, the cursor) and ignores fields it does not know, so the relay can add some.

use automerge::ChangeHash;
use serde::Deserialize;

use crate::protocol::{DocumentId, decode_heads};
use crate::{Error, Result};

/// Longest cursor accepted, in bytes. The relay's cursors are `<seq>.<documentId>` (under 50
/// characters); a cursor is stored and sent back in a URL, so an absurd one is refused.
const MAX_CURSOR_BYTES: usize = 256;

/// One document the feed lists as changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    /// The document.
    pub document_id: DocumentId,
    /// Root `kind`, as the relay classified it.
    pub kind: String,
    /// Root `patientId`.
    pub patient_id: String,
    /// The heads the relay holds durably, sorted.
    pub heads: Vec<ChangeHash>,
}

/// One page of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPage {
    /// Changed documents, oldest change first.
    pub changes: Vec<FeedEntry>,
    /// Cursor to ask from next time.
    pub next: String,
    /// More entries are waiting after `next`.
    pub more: bool,
    /// The relay's epoch (new at every relay start); `None` from relays older than epochs.
    pub epoch: Option<String>,
    /// The relay did not issue the cursor we sent (another epoch, or past its sequence): this
    /// page starts our whole caseload again, and we must reconcile (see `crate::sync`).
    pub reset: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEntry {
    document_id: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    patient_id: String,
    heads: Vec<String>,
}

#[derive(Deserialize)]
struct WirePage {
    changes: Vec<WireEntry>,
    next: String,
    more: bool,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    reset: bool,
}

impl FeedPage {
    /// Parse a `/v1/changes` response body. Anything malformed is an error for the whole page:
    /// acting on half a page could move the cursor past entries that were never read.
    pub fn parse(body: &[u8]) -> Result<FeedPage> {
        let wire: WirePage = serde_json::from_slice(body)
            .map_err(|e| Error::InvalidInput(format!("change feed page: {e}")))?;
        if wire.next.is_empty()
            || wire.next.len() > MAX_CURSOR_BYTES
            || !wire
                .next
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        {
            return Err(Error::InvalidInput(
                "change feed page: `next` is not a cursor".into(),
            ));
        }
        let changes = wire
            .changes
            .into_iter()
            .map(|e| {
                let document_id: DocumentId = e.document_id.parse().map_err(|_| {
                    Error::InvalidInput("change feed entry: invalid documentId".into())
                })?;
                let mut heads = decode_heads(&e.heads)?;
                heads.sort_unstable();
                heads.dedup();
                Ok(FeedEntry {
                    document_id,
                    kind: e.kind,
                    patient_id: e.patient_id,
                    heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if wire.epoch.as_deref().is_some_and(|e| {
            e.is_empty() || e.len() > 64 || !e.bytes().all(|b| b.is_ascii_hexdigit())
        }) {
            return Err(Error::InvalidInput(
                "change feed page: `epoch` is not an epoch".into(),
            ));
        }
        Ok(FeedPage {
            changes,
            next: wire.next,
            more: wire.more,
            epoch: wire.epoch,
            reset: wire.reset,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::encode_heads;

    #[test]
    fn a_relay_page_parses_and_heads_come_back_sorted() {
        let doc = DocumentId::random();
        let mut heads = vec![ChangeHash([9; 32]), ChangeHash([1; 32])];
        let body = serde_json::json!({
            "changes": [{"documentId": doc.to_string(), "kind": "visit-note",
                         "patientId": "pat_1", "heads": encode_heads(&heads), "extra": 1}],
            "next": format!("42.{doc}"),
            "more": true,
        });
        let page = FeedPage::parse(body.to_string().as_bytes()).unwrap();
        heads.sort();
        assert_eq!(page.changes[0].heads, heads);
        assert_eq!(page.changes[0].document_id, doc);
        assert_eq!(page.next, format!("42.{doc}"));
        assert!(page.more);
    }

    #[test]
    fn epoch_and_reset_are_read_and_absent_ones_default() {
        let body = br#"{"changes": [], "next": "0123456789abcdef_3", "more": false,
                        "epoch": "0123456789abcdef", "reset": true}"#;
        let page = FeedPage::parse(body).unwrap();
        assert_eq!(page.epoch.as_deref(), Some("0123456789abcdef"));
        assert!(page.reset);
        let old = FeedPage::parse(br#"{"changes": [], "next": "3", "more": false}"#).unwrap();
        assert_eq!(old.epoch, None);
        assert!(!old.reset);
        for bad in [
            &br#"{"changes": [], "next": "3", "more": false, "epoch": ""}"#[..],
            br#"{"changes": [], "next": "3", "more": false, "epoch": "not hex"}"#,
            br#"{"changes": [], "next": "3", "more": false, "reset": "yes"}"#,
        ] {
            assert!(FeedPage::parse(bad).is_err());
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for body in [
            &b""[..],
            b"null",
            b"{\"changes\": [], \"next\": \"\", \"more\": false}",
            b"{\"changes\": [], \"next\": \"1 2\", \"more\": false}",
            b"{\"changes\": [{\"documentId\": \"nope\", \"heads\": []}], \"next\": \"1\", \"more\": false}",
            b"{\"changes\": [{\"documentId\": \"nope\", \"heads\": [\"zz\"]}], \"next\": \"1\", \"more\": false}",
            b"\xff\xfe",
        ] {
            assert!(FeedPage::parse(body).is_err(), "{body:?}");
        }
    }
}
