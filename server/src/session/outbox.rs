//! A session's outgoing frames: a bounded queue drained by a writer task that owns the socket.
//!
//! The session loop never awaits the socket itself, so a client that stops reading cannot
//! freeze it: revocation, idle timeout and shutdown are still seen while frames wait. Every
//! socket send has a timeout ([`crate::config::SEND_TIMEOUT`]); a send that times out, or a
//! queue that stays full for as long, ends the session as a slow reader.

use std::time::Duration;

use futures::{Sink, SinkExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Frame, close_code};
use crate::config::CLOSE_GRACE;
use crate::metrics::LIMIT_HITS;

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutboxError {
    /// The writer stopped: the socket failed or a send timed out.
    Closed,
    /// The queue stayed full for the whole send timeout: the peer does not read.
    SlowReader,
}

/// A frame to send and, for one that discloses a document, the commit of its `read` audit row:
/// the writer sends nothing past it until that commit succeeded, so frames keep their order and
/// no document data leaves before its row is durable, while the session goes on to its next
/// frames (their rows share the audit log's next commit).
#[derive(Debug)]
struct Outgoing {
    after: Option<oneshot::Receiver<crate::error::Result<()>>>,
    frame: Frame,
}

/// The sending half of a session's socket. See the module docs.
#[derive(Debug)]
pub(super) struct Outbox {
    queue: Option<mpsc::Sender<Outgoing>>,
    writer: JoinHandle<()>,
    send_timeout: Duration,
}

impl Outbox {
    /// Start the writer task over `sink`, with room for `capacity` queued frames.
    pub(super) fn start<K>(sink: K, capacity: usize, send_timeout: Duration) -> Outbox
    where
        K: Sink<Frame> + Unpin + Send + 'static,
    {
        let (queue, rx) = mpsc::channel(capacity.max(1));
        let writer = tokio::spawn(write_frames(sink, rx, send_timeout));
        Outbox {
            queue: Some(queue),
            writer,
            send_timeout,
        }
    }

    /// Queue a frame, waiting at most the send timeout for room.
    pub(super) async fn send(&self, frame: Frame) -> Result<(), OutboxError> {
        self.send_after(None, frame).await
    }

    /// [`Outbox::send`] of a frame the writer sends only once `durable` answered `Ok` (see
    /// [`Outgoing`]); if it answers otherwise, the writer closes the socket with 1011 and sends
    /// nothing more.
    pub(super) async fn send_after(
        &self,
        durable: Option<oneshot::Receiver<crate::error::Result<()>>>,
        frame: Frame,
    ) -> Result<(), OutboxError> {
        let Some(queue) = &self.queue else {
            return Err(OutboxError::Closed);
        };
        match tokio::time::timeout(self.send_timeout, queue.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(Outgoing {
                    after: durable,
                    frame,
                });
                Ok(())
            }
            Ok(Err(_)) => Err(OutboxError::Closed),
            Err(_) => {
                metrics::counter!(LIMIT_HITS, "limit" => "slow_reader").increment(1);
                Err(OutboxError::SlowReader)
            }
        }
    }

    /// Queue a frame if there is room now; `false` otherwise (used while closing).
    pub(super) fn try_send(&self, frame: Frame) -> bool {
        self.queue
            .as_ref()
            .is_some_and(|queue| queue.try_send(Outgoing { after: None, frame }).is_ok())
    }

    /// Resolves when the writer has stopped (the socket failed or a send timed out).
    pub(super) async fn stopped(&self) {
        match &self.queue {
            Some(queue) => queue.closed().await,
            None => std::future::pending().await,
        }
    }

    /// Let the writer send what is queued and close the socket, for at most
    /// [`CLOSE_GRACE`] (or the send timeout, if shorter); then stop it whatever it is doing (a
    /// peer that does not read gets no goodbye).
    pub(super) async fn finish(mut self) {
        self.queue = None;
        let grace = self.send_timeout.min(CLOSE_GRACE);
        if tokio::time::timeout(grace, &mut self.writer).await.is_err() {
            self.writer.abort();
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

async fn write_frames<K>(mut sink: K, mut rx: mpsc::Receiver<Outgoing>, send_timeout: Duration)
where
    K: Sink<Frame> + Unpin,
{
    while let Some(Outgoing { after, frame }) = rx.recv().await {
        if let Some(durable) = after
            && !matches!(durable.await, Ok(Ok(())))
        {
            tracing::error!("a read audit row could not be stored; nothing more is sent");
            rx.close();
            let close = Frame::Close(Some((
                close_code::INTERNAL_ERROR,
                "the relay could not record this access".into(),
            )));
            let _ = tokio::time::timeout(send_timeout, sink.send(close)).await;
            return;
        }
        let last = matches!(frame, Frame::Close(_));
        match tokio::time::timeout(send_timeout, sink.send(frame)).await {
            Ok(Ok(())) if !last => {}
            Ok(Ok(())) => break,
            Ok(Err(_)) => return,
            Err(_) => {
                metrics::counter!(LIMIT_HITS, "limit" => "slow_reader").increment(1);
                tracing::info!("a send timed out; the peer is not reading");
                return;
            }
        }
    }
    rx.close();
    let _ = tokio::time::timeout(send_timeout, sink.close()).await;
}
