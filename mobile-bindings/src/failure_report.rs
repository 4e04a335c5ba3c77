//! Telling the agency which documents this device cannot sync: after a pass that reached the
//! relay, the device's whole current failure list (`Store::sync_failures`: document id, its
//! kind and patient from the index, `refused` or `invalid`, the recorded reason, time,
//! attempts; never the document's content) is posted to `POST /v1/sync-failures`, which
//! replaces what the device reported before. A document a later pass synced is no longer in
//! the list, so the office's review queue clears it. Token failures are not reported (a
//! device whose token is refused cannot report anything).
//!
//! Best effort and never in the pass's way: the report is sent only when the list differs
//! from the last one the relay accepted (in this client), within [`REPORT_TIMEOUT`]; a report
//! that fails is sent again after the next pass. The pass's own report is unaffected.

use std::time::Duration;

use fieldchart_core::store::Store;
use fieldchart_core::sync::{FailureKind, PassStatus};
use serde::Serialize;
use tokio::sync::Mutex;

/// How long one report may take.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest reason sent, in characters (the relay refuses longer ones).
const MAX_REASON_CHARS: usize = 500;

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Entry {
    document_id: String,
    document_kind: Option<String>,
    patient_id: Option<String>,
    failure: &'static str,
    reason: String,
    at_ms: i64,
    attempts: u32,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    failures: &'a [Entry],
}

/// Remembers what the relay last accepted, so an unchanged list is not sent again.
#[derive(Debug, Default)]
pub(crate) struct FailureReporter {
    last_accepted: Mutex<Option<String>>,
}

impl FailureReporter {
    /// Report the store's failure list after a pass that ended with `status`, if the pass
    /// reached the relay and the list changed since the relay last accepted it.
    pub(crate) async fn after_pass(
        &self,
        http: &reqwest::Client,
        http_base: &str,
        token: &str,
        store: &std::sync::Arc<Store>,
        status: &PassStatus,
    ) {
        if !matches!(
            status,
            PassStatus::Complete | PassStatus::Stopped | PassStatus::BudgetExhausted
        ) {
            return;
        }
        if let Err(e) = self.send(http, http_base, token, store).await {
            // Not delivered: the next pass tries again.
            tracing::warn!(error = %e, "could not report sync failures to the relay");
        }
    }

    async fn send(
        &self,
        http: &reqwest::Client,
        http_base: &str,
        token: &str,
        store: &std::sync::Arc<Store>,
    ) -> Result<(), String> {
        let store = std::sync::Arc::clone(store);
        let entries = tokio::task::spawn_blocking(move || store.sync_failures())
            .await
            .map_err(|e| format!("reading the failure list: {e}"))?
            .map_err(|e| format!("reading the failure list: {e}"))?;
        let mut entries: Vec<Entry> = entries
            .into_iter()
            .filter(|f| f.failure != FailureKind::Unauthorized)
            .map(|f| Entry {
                document_id: f.document_id.to_string(),
                document_kind: f.kind,
                patient_id: f.patient_id,
                failure: f.failure.as_str(),
                reason: f.reason.chars().take(MAX_REASON_CHARS).collect(),
                at_ms: f.at_ms,
                attempts: f.attempts,
            })
            .collect();
        entries.sort_by(|a, b| a.document_id.cmp(&b.document_id));
        let body = serde_json::to_string(&Report { failures: &entries })
            .map_err(|e| format!("reading the failure list: {e}"))?;
        let mut last = self.last_accepted.lock().await;
        if last.as_deref() == Some(body.as_str()) {
            return Ok(());
        }
        // A new client sends even an empty list once: the relay may hold one from an earlier
        // run of the app.
        let response = http
            .post(format!("{http_base}/v1/sync-failures"))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .timeout(REPORT_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("sending the report: {e}"))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            // A relay without the console takes no reports: not asked again until the list
            // changes.
            *last = Some(body);
            return Ok(());
        }
        if !status.is_success() {
            return Err(format!("the relay answered {status}"));
        }
        *last = Some(body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fieldchart_core::model::{Actor, Role};
    use fieldchart_core::store::{StoreConfig, StoreKey};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Accept one request on `listener`; read its head, then answer `reply` (or, with `None`,
    /// drop the connection without a word: the worst moment, the report sent and unanswered).
    async fn one_request(listener: &TcpListener, reply: Option<&'static str>) -> String {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.expect("read");
            assert!(n > 0, "the client closed before sending its request");
            seen.extend_from_slice(&buf[..n]);
        }
        if let Some(reply) = reply {
            socket.write_all(reply.as_bytes()).await.expect("answer");
            socket.shutdown().await.expect("shutdown");
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    #[tokio::test]
    async fn an_unanswered_report_is_sent_again_and_an_accepted_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(
            Store::open(StoreConfig {
                path: dir.path().join("s.db"),
                key: StoreKey::random(),
                actor: Actor {
                    user_id: "usr_ana".into(),
                    device_id: "dev_ana".into(),
                },
                role: Role::Clinician,
                keystroke_journal: false,
            })
            .expect("store"),
        );
        let http = reqwest::Client::new();
        let reporter = FailureReporter::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));

        // The connection drops after the report went out: not delivered, kept to send again.
        let (sent, head) = tokio::join!(
            reporter.send(&http, &base, "fct_token", &store),
            one_request(&listener, None)
        );
        assert!(sent.is_err(), "{sent:?}");
        assert!(head.starts_with("POST /v1/sync-failures"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer fct_token"),
            "{head}"
        );
        assert!(reporter.last_accepted.lock().await.is_none());

        // A refusal is not an acceptance either.
        let (sent, _) = tokio::join!(
            reporter.send(&http, &base, "fct_token", &store),
            one_request(
                &listener,
                Some("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            )
        );
        assert!(sent.is_err(), "{sent:?}");

        // Accepted: remembered.
        let (sent, _) = tokio::join!(
            reporter.send(&http, &base, "fct_token", &store),
            one_request(
                &listener,
                Some("HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
            )
        );
        assert!(sent.is_ok(), "{sent:?}");
        assert_eq!(
            reporter.last_accepted.lock().await.as_deref(),
            Some(r#"{"failures":[]}"#)
        );

        // The same list again is not sent: with nobody listening any request would fail.
        drop(listener);
        assert!(
            reporter
                .send(&http, &base, "fct_token", &store)
                .await
                .is_ok()
        );
    }
}
