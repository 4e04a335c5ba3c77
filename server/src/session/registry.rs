//! Every open session: how many there are (bounded), each device's message budget (a token
//! bucket), and the ways a session is told to close from outside: its device was revoked, the
//! same peer joined again on a newer socket, or the relay is shutting down.
//!
//! Each session watches its own `watch` channel, so telling one session to close is one send
//! and costs the others nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use fieldchart_core::protocol::PeerId;
use tokio::sync::watch;

use crate::docs::SessionId;
use crate::error::{Error, Result};
use crate::identity::DeviceId;
use crate::metrics::SESSIONS_ACTIVE;

/// Why a session was told to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The device's token was revoked.
    Revoked,
    /// The same peer joined again on another socket (a reconnect the client made before this
    /// socket died); the newer socket wins, as in the JS server.
    Replaced,
    /// The relay is shutting down.
    ShuttingDown,
}

/// The registry. Shared as `Arc<SessionRegistry>`; tickets hold a clone.
#[derive(Debug)]
pub struct SessionRegistry {
    max_sessions: usize,
    rate_per_second: f64,
    burst: f64,
    inner: Mutex<Inner>,
    count: watch::Sender<usize>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: SessionId,
    shutting_down: bool,
    sessions: HashMap<SessionId, Registered>,
    buckets: HashMap<DeviceId, TokenBucket>,
}

#[derive(Debug)]
struct Registered {
    device_id: DeviceId,
    peer_id: Option<PeerId>,
    close: watch::Sender<Option<CloseReason>>,
}

/// A session's place in the registry; leaving it (drop) unregisters the session.
#[derive(Debug)]
pub struct SessionTicket {
    id: SessionId,
    device_id: DeviceId,
    registry: Arc<SessionRegistry>,
    close: watch::Receiver<Option<CloseReason>>,
}

#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl SessionRegistry {
    /// An empty registry.
    pub fn new(max_sessions: usize, rate_per_second: u32, burst: u32) -> SessionRegistry {
        SessionRegistry {
            max_sessions,
            rate_per_second: f64::from(rate_per_second),
            burst: f64::from(burst.max(1)),
            inner: Mutex::new(Inner::default()),
            count: watch::Sender::new(0),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admit a new session of `device_id`, or refuse it with [`Error::Busy`] when the relay
    /// holds its maximum or is shutting down.
    pub fn register(self: &Arc<Self>, device_id: DeviceId) -> Result<SessionTicket> {
        let mut inner = self.inner();
        if inner.shutting_down {
            return Err(Error::Busy("the relay is shutting down"));
        }
        if inner.sessions.len() >= self.max_sessions {
            return Err(Error::Busy("too many sessions"));
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let (close, close_rx) = watch::channel(None);
        inner.sessions.insert(
            id,
            Registered {
                device_id: device_id.clone(),
                peer_id: None,
                close,
            },
        );
        self.publish_count(&inner);
        Ok(SessionTicket {
            id,
            device_id,
            registry: Arc::clone(self),
            close: close_rx,
        })
    }

    fn publish_count(&self, inner: &Inner) {
        let n = inner.sessions.len();
        self.count.send_replace(n);
        metrics::gauge!(SESSIONS_ACTIVE).set(n as f64);
    }

    fn unregister(&self, id: SessionId) {
        let mut inner = self.inner();
        if let Some(gone) = inner.sessions.remove(&id) {
            // Keep the device's budget while it has sessions, so reconnecting does not refill it;
            // forget budgets of devices with no session once they are full again.
            let still_open = inner
                .sessions
                .values()
                .any(|s| s.device_id == gone.device_id);
            if !still_open && inner.buckets.len() > self.max_sessions {
                let (rate, burst) = (self.rate_per_second, self.burst);
                let now = Instant::now();
                let open: std::collections::HashSet<DeviceId> = inner
                    .sessions
                    .values()
                    .map(|s| s.device_id.clone())
                    .collect();
                inner.buckets.retain(|device, bucket| {
                    open.contains(device) || bucket.level(now, rate, burst) < burst
                });
            }
        }
        self.publish_count(&inner);
    }

    /// Record that session `id` joined as peer `peer_id`; older sessions of the same device that
    /// joined as the same peer are told to close ([`CloseReason::Replaced`]).
    pub fn joined(&self, id: SessionId, peer_id: &PeerId) {
        let mut inner = self.inner();
        let Some(device) = inner.sessions.get(&id).map(|s| s.device_id.clone()) else {
            return;
        };
        for (other, session) in inner.sessions.iter() {
            if *other != id
                && session.device_id == device
                && session.peer_id.as_ref() == Some(peer_id)
            {
                session.close.send_replace(Some(CloseReason::Replaced));
            }
        }
        if let Some(me) = inner.sessions.get_mut(&id) {
            me.peer_id = Some(peer_id.clone());
        }
    }

    /// Tell every session of `device_id` to close; returns how many there were.
    pub fn revoke_device(&self, device_id: &DeviceId) -> usize {
        let inner = self.inner();
        let mut n = 0;
        for session in inner
            .sessions
            .values()
            .filter(|s| s.device_id == *device_id)
        {
            session.close.send_replace(Some(CloseReason::Revoked));
            n += 1;
        }
        n
    }

    /// Refuse new sessions and tell every open one to close.
    pub fn shut_down(&self) {
        let mut inner = self.inner();
        inner.shutting_down = true;
        for session in inner.sessions.values() {
            session.close.send_replace(Some(CloseReason::ShuttingDown));
        }
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        *self.count.borrow()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once no session is open.
    pub async fn drained(&self) {
        let mut rx = self.count.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we borrow `self`.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Take one message from the device's budget; `false` when it is exhausted.
    pub fn take_message(&self, device_id: &DeviceId) -> bool {
        let (rate, burst) = (self.rate_per_second, self.burst);
        let now = Instant::now();
        let mut inner = self.inner();
        let bucket = inner
            .buckets
            .entry(device_id.clone())
            .or_insert(TokenBucket {
                tokens: burst,
                refilled: now,
            });
        bucket.tokens = bucket.level(now, rate, burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl TokenBucket {
    fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

impl SessionTicket {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The authenticated device.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// Resolves when the session is told to close, with the reason.
    pub async fn closed(&mut self) -> CloseReason {
        match self.close.wait_for(Option::is_some).await {
            Ok(reason) => reason.unwrap_or(CloseReason::ShuttingDown),
            // The sender went away: the registry dropped us, which only happens at shutdown.
            Err(_) => CloseReason::ShuttingDown,
        }
    }
}

impl Drop for SessionTicket {
    fn drop(&mut self) {
        self.registry.unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_are_bounded_and_counted() {
        let registry = Arc::new(SessionRegistry::new(2, 10, 10));
        let a = registry.register(DeviceId::new("dev_a")).expect("first");
        let _b = registry.register(DeviceId::new("dev_a")).expect("second");
        assert!(matches!(
            registry.register(DeviceId::new("dev_b")),
            Err(Error::Busy(_))
        ));
        assert_eq!(registry.len(), 2);
        drop(a);
        let _c = registry
            .register(DeviceId::new("dev_b"))
            .expect("room again");
    }

    #[tokio::test]
    async fn revoking_a_device_closes_its_sessions_only() {
        let registry = Arc::new(SessionRegistry::new(10, 10, 10));
        let mut mine = registry.register(DeviceId::new("dev_a")).expect("register");
        let theirs = registry.register(DeviceId::new("dev_b")).expect("register");
        assert_eq!(registry.revoke_device(&DeviceId::new("dev_a")), 1);
        assert_eq!(mine.closed().await, CloseReason::Revoked);
        assert!(theirs.close.borrow().is_none());
    }

    #[tokio::test]
    async fn a_second_join_of_the_same_peer_replaces_the_first() {
        let registry = Arc::new(SessionRegistry::new(10, 10, 10));
        let peer = PeerId::new("peer-1".into());
        let mut old = registry.register(DeviceId::new("dev_a")).expect("register");
        registry.joined(old.id(), &peer);
        let new = registry.register(DeviceId::new("dev_a")).expect("register");
        let other_device = registry.register(DeviceId::new("dev_b")).expect("register");
        registry.joined(other_device.id(), &peer);
        assert!(
            old.close.borrow().is_none(),
            "another device's peer id does not replace"
        );
        registry.joined(new.id(), &peer);
        assert_eq!(old.closed().await, CloseReason::Replaced);
        assert!(new.close.borrow().is_none());
    }

    #[tokio::test]
    async fn shutdown_closes_everything_refuses_newcomers_and_drains() {
        let registry = Arc::new(SessionRegistry::new(10, 10, 10));
        let mut a = registry.register(DeviceId::new("dev_a")).expect("register");
        registry.shut_down();
        assert!(matches!(
            registry.register(DeviceId::new("dev_b")),
            Err(Error::Busy(_))
        ));
        assert_eq!(a.closed().await, CloseReason::ShuttingDown);
        let waiter = {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move { registry.drained().await })
        };
        drop(a);
        waiter.await.expect("drained");
        assert!(registry.is_empty());
    }

    #[test]
    fn the_message_budget_allows_a_burst_then_refuses() {
        let registry = SessionRegistry::new(10, 1, 5);
        let device = DeviceId::new("dev_a");
        assert!((0..5).all(|_| registry.take_message(&device)));
        assert!(!registry.take_message(&device));
        assert!(
            registry.take_message(&DeviceId::new("dev_b")),
            "budgets are per device"
        );
    }
}
