//! A fault-injecting proxy between devices and the relay, on 127.0.0.1.
//!
//! Plain HTTP (the change feed) is piped byte for byte, and may be reset mid-way. A WebSocket
//! upgrade is relayed as bytes; after the relay's `101` both sides are parsed as WebSocket
//! streams and every message is forwarded subject to a seeded schedule: dropped, delayed,
//! duplicated, reordered (held back and sent after the next one), truncated, or the whole
//! connection reset (both TCP sockets dropped without a close frame). The same seed gives the
//! same decisions in the same order of messages.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Longest request or response head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;

/// Probabilities (per message, or per HTTP connection for `reset`), in percent.
#[derive(Debug, Clone, Copy)]
pub struct FaultRates {
    /// Drop the message.
    pub drop: u32,
    /// Wait up to 50 ms before forwarding it.
    pub delay: u32,
    /// Send it twice.
    pub duplicate: u32,
    /// Hold it back and send it after the next message in the same direction.
    pub reorder: u32,
    /// Cut a binary message short.
    pub truncate: u32,
    /// Reset the connection (both sides, no close frame).
    pub reset: u32,
}

impl FaultRates {
    /// No faults.
    pub const NONE: FaultRates = FaultRates {
        drop: 0,
        delay: 0,
        duplicate: 0,
        reorder: 0,
        truncate: 0,
        reset: 0,
    };

    /// A rough network: every kind of fault, often.
    pub const ROUGH: FaultRates = FaultRates {
        drop: 4,
        delay: 10,
        duplicate: 4,
        reorder: 4,
        truncate: 2,
        reset: 3,
    };
}

/// Counts of what the proxy did.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Messages forwarded (each copy counted).
    pub forwarded: AtomicU64,
    /// Faults injected, all kinds.
    pub injected: AtomicU64,
    /// Connections reset.
    pub resets: AtomicU64,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    rates: Mutex<FaultRates>,
    rng: Mutex<StdRng>,
    counts: FaultCounts,
    stopped: AtomicBool,
}

/// The running proxy. Dropping it stops accepting; open connections end with their peers.
#[allow(missing_debug_implementations)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on 127.0.0.1 (a free port) and forward to `upstream` with `rates`, decisions
    /// drawn from `seed`.
    pub async fn start(upstream: SocketAddr, rates: FaultRates, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            rates: Mutex::new(rates),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            counts: FaultCounts::default(),
            stopped: AtomicBool::new(false),
        });
        let task = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if shared.stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let _ = serve(client, shared).await;
                    });
                }
            })
        };
        FaultProxy { addr, shared, task }
    }

    /// `http://<proxy>` (what devices are configured with).
    pub fn http_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Point at a relay that moved (restarted on another port).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = upstream;
    }

    /// Change the fault rates (e.g. to [`FaultRates::NONE`] for the quiet phase).
    pub fn set_rates(&self, rates: FaultRates) {
        *self
            .shared
            .rates
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = rates;
    }

    /// What the proxy did so far.
    pub fn counts(&self) -> &FaultCounts {
        &self.shared.counts
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Forward,
    Drop,
    Delay(u64),
    Duplicate,
    Reorder,
    Truncate,
    Reset,
}

impl Shared {
    fn decide(&self, binary: bool) -> Action {
        let rates = *self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        let roll = rng.random_range(0..100u32);
        let mut edge = 0;
        let mut pick = |rate: u32| {
            edge += rate;
            roll < edge
        };
        let action = if pick(rates.reset) {
            Action::Reset
        } else if pick(rates.drop) {
            Action::Drop
        } else if pick(rates.duplicate) {
            Action::Duplicate
        } else if pick(rates.reorder) {
            Action::Reorder
        } else if pick(rates.truncate) && binary {
            Action::Truncate
        } else if pick(rates.delay) {
            Action::Delay(rng.random_range(1..50))
        } else {
            Action::Forward
        };
        if action != Action::Forward {
            self.counts.injected.fetch_add(1, Ordering::Relaxed);
        }
        action
    }

    fn reset_http(&self) -> Option<usize> {
        let rates = *self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        (rng.random_range(0..100u32) < rates.reset).then(|| rng.random_range(0..400usize))
    }
}

/// Read an HTTP head (through the blank line); returns it and any bytes after it.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the end of the head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve(mut client: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (head, rest) = read_head(&mut client).await?;
    let upstream = *shared
        .upstream
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut relay = TcpStream::connect(upstream).await?;
    relay.write_all(&head).await?;
    relay.write_all(&rest).await?;
    let upgrade = String::from_utf8_lossy(&head)
        .to_ascii_lowercase()
        .contains("upgrade: websocket");
    if !upgrade {
        // Plain HTTP: pipe, or cut the connection after a few bytes of the answer.
        return match shared.reset_http() {
            None => tokio::io::copy_bidirectional(&mut client, &mut relay)
                .await
                .map(|_| ()),
            Some(after) => {
                shared.counts.resets.fetch_add(1, Ordering::Relaxed);
                let mut buf = vec![0u8; after];
                let n = relay.read(&mut buf).await?;
                client.write_all(&buf[..n]).await?;
                Ok(())
            }
        };
    }
    let (response, leftover) = read_head(&mut relay).await?;
    client.write_all(&response).await?;
    client.write_all(&leftover).await?;
    if !response.starts_with(b"HTTP/1.1 101") || !leftover.is_empty() {
        // A refused upgrade (401, 503): the answer is passed on; nothing more to do.
        return tokio::io::copy_bidirectional(&mut client, &mut relay)
            .await
            .map(|_| ());
    }
    let client_ws = WebSocketStream::from_raw_socket(client, Role::Server, None).await;
    let relay_ws = WebSocketStream::from_raw_socket(relay, Role::Client, None).await;
    let (client_tx, client_rx) = client_ws.split();
    let (relay_tx, relay_rx) = relay_ws.split();
    let up = pump(client_rx, relay_tx, Arc::clone(&shared));
    let down = pump(relay_rx, client_tx, Arc::clone(&shared));
    // Either direction ending (or a reset) ends both: dropping the halves drops the sockets.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    Ok(())
}

/// Forward messages one way with faults; returns when the source ends or a reset fires.
async fn pump<R, W>(mut from: R, mut to: W, shared: Arc<Shared>)
where
    R: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
    W: futures::Sink<WsMessage> + Unpin,
{
    let mut held: Option<WsMessage> = None;
    while let Some(Ok(message)) = from.next().await {
        let control = matches!(
            message,
            WsMessage::Close(_) | WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_)
        );
        let action = if control {
            Action::Forward
        } else {
            shared.decide(message.is_binary())
        };
        let mut out = Vec::new();
        match action {
            Action::Reset => {
                shared.counts.resets.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Action::Drop => {}
            Action::Forward => out.push(message),
            Action::Delay(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                out.push(message);
            }
            Action::Duplicate => {
                out.push(message.clone());
                out.push(message);
            }
            Action::Reorder => {
                if let Some(previous) = held.replace(message) {
                    out.push(previous);
                }
                // Sent after the next message.
            }
            Action::Truncate => {
                let bytes = message.into_data();
                let keep = bytes.len() / 2;
                out.push(WsMessage::Binary(bytes.slice(..keep)));
            }
        }
        if action != Action::Reorder
            && let Some(previous) = held.take()
        {
            out.push(previous);
        }
        for m in out {
            shared.counts.forwarded.fetch_add(1, Ordering::Relaxed);
            if to.send(m).await.is_err() {
                return;
            }
        }
    }
    if let Some(previous) = held.take() {
        let _ = to.send(previous).await;
    }
}
