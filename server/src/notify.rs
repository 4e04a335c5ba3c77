//! Cross-relay liveness on PostgreSQL: `LISTEN` for documents other relay processes committed.
//!
//! Every document write of the PostgreSQL backend sends `NOTIFY fieldchart_documents,
//! '<instance> <document id hex>'` inside its transaction, so PostgreSQL delivers it only if
//! (and once) the write commits. Each relay keeps one dedicated connection (outside the pool)
//! listening on that channel; for every document another process changed it drops its
//! in-memory copy and wakes the sessions syncing it, which reload what is stored and send the
//! devices what they lack ([`crate::docs::DocHub::invalidate`]).
//!
//! The console's live pages follow the shared change feed, but the other thing that moves
//! them, a device's changed list of sync failures (the review queue), is counted per process:
//! the backend also sends `NOTIFY` [`FAILURES_CHANNEL`], `'<instance> <agency id>'`, when a
//! report changes an agency's failures, and this connection bumps that agency's counter here
//! ([`crate::console::Console::failures_changed`]), so a report through relay 1 reloads the
//! review queue open on relay 2.
//!
//! Notifications sent while the connection is down are lost, so after every (re)connection the
//! relay first listens again and then invalidates every document it holds
//! ([`crate::docs::DocHub::invalidate_all`]): whatever changed meanwhile is reloaded; after a
//! reconnection open console pages reload once too
//! ([`crate::console::Console::failures_may_have_changed`]). A heartbeat query every
//! [`HEARTBEAT`] notices a connection that died silently.
//!
//! Revocations, disabled users and care-team changes need nothing here: revocations are
//! polled from the shared sequence every [`crate::config::REVOCATION_POLL_INTERVAL`] by every
//! relay ([`crate::watch_revocations`]), and access is decided from storage on every message,
//! with no per-relay cache to invalidate.

use std::time::Duration;

use fieldchart_core::protocol::DocumentId;
use futures::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::identity::AgencyId;
use crate::state::AppState;
use crate::storage::PostgresStorage;
use crate::storage::postgres::NOTIFY_CHANNEL;

/// The channel on which a relay announces that a device's report changed an agency's sync
/// failures: payload `<instance> <agency id>`, sent inside the storing transaction.
pub const FAILURES_CHANNEL: &str = "fieldchart_sync_failures";

/// How often the listening connection is proven alive with a query.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Longest wait for the heartbeat's answer before the connection is called dead.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait before reconnecting, doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Listen for other relays' document changes until the task is aborted.
pub fn spawn(storage: &PostgresStorage, state: AppState) -> tokio::task::JoinHandle<()> {
    spawn_watched(storage, state).0
}

/// [`spawn`], and a receiver of how many times the connection has started listening (so a
/// test can wait until notifications reach this relay).
pub fn spawn_watched(
    storage: &PostgresStorage,
    state: AppState,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<u64>,
) {
    let config = storage.config().clone();
    let instance = storage.instance().to_owned();
    let (listening, watched) = tokio::sync::watch::channel(0u64);
    let task = tokio::spawn(async move {
        let mut backoff = MIN_BACKOFF;
        loop {
            match listen(&config, &instance, &state, &listening).await {
                Ok(()) => backoff = MIN_BACKOFF,
                Err(e) => {
                    tracing::warn!(error = %e, "change notifications from other relays interrupted; reconnecting");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    (task, watched)
}

/// Parse a notification payload: `(instance, document id)`.
pub fn parse_payload(payload: &str) -> Option<(&str, DocumentId)> {
    let (instance, hex_id) = payload.split_once(' ')?;
    let bytes: [u8; 16] = hex::decode(hex_id).ok()?.try_into().ok()?;
    Some((instance, DocumentId::from_bytes(bytes)))
}

/// One connection's life: connect, `LISTEN`, invalidate everything held (changes may have been
/// missed), then forward notifications until the connection fails.
async fn listen(
    config: &tokio_postgres::Config,
    instance: &str,
    state: &AppState,
    listening: &tokio::sync::watch::Sender<u64>,
) -> crate::Result<()> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let note = (n.channel().to_owned(), n.payload().to_owned());
                    if sender.send(note).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "notification connection failed");
                    break;
                }
            }
        }
    });
    let outcome = async {
        client
            .batch_execute(&format!(
                "LISTEN {NOTIFY_CHANNEL}; LISTEN {FAILURES_CHANNEL}"
            ))
            .await?;
        state.docs().invalidate_all().await;
        // After a reconnection, failure reports of other relays may have been missed.
        if *listening.borrow() > 0
            && let Some(console) = state.console()
        {
            console.failures_may_have_changed();
        }
        listening.send_modify(|n| *n += 1);
        tracing::info!("listening for document changes of other relays");
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                note = received.recv() => {
                    let Some((channel, payload)) = note else {
                        return Err(crate::Error::Storage("the notification connection closed".into()));
                    };
                    if channel == FAILURES_CHANNEL {
                        match payload.split_once(' ') {
                            Some((from, _)) if from == instance => {}
                            Some((_, agency)) => {
                                if let Some(console) = state.console() {
                                    console.failures_changed(&AgencyId::new(agency));
                                }
                            }
                            None => tracing::warn!("unexpected sync-failure notification"),
                        }
                        continue;
                    }
                    match parse_payload(&payload) {
                        Some((from, _)) if from == instance => {}
                        Some((_, id)) => state.docs().invalidate(id).await,
                        None => tracing::warn!(payload = %payload.chars().take(64).collect::<String>(), "unexpected change notification"),
                    }
                }
                _ = heartbeat.tick() => {
                    match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err(crate::Error::Storage("the notification connection stopped answering".into())),
                    }
                }
            }
        }
    }
    .await;
    driver.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_the_sender_and_the_document() {
        let id = DocumentId::from_bytes([7; 16]);
        let payload = format!("abc {}", hex::encode(id.as_bytes()));
        assert_eq!(parse_payload(&payload), Some(("abc", id)));
        assert_eq!(parse_payload("abc 0102"), None);
        assert_eq!(parse_payload("no-space"), None);
    }
}
