//! Every open session: how many there are (bounded relay-wide and per device), each device's
//! message and byte budgets (token buckets), the relay-wide byte budgets (frames in flight,
//! unclassified documents held), and the ways a session is told to close from outside: its
//! device was revoked, the same peer joined again on a newer socket, or the relay is shutting
//! down.
//!
//! Each session watches its own `watch` channel, so telling one session to close is one send
//! and costs the others nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use fieldchart_core::protocol::PeerId;
use tokio::sync::watch;

use crate::config::Limits;
use crate::docs::SessionId;
use crate::error::{Error, Result};
use crate::identity::DeviceId;
use crate::metrics::{LIMIT_HITS, SESSIONS_ACTIVE};

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
    max_per_device: usize,
    rate_per_second: f64,
    burst: f64,
    byte_rate_per_second: f64,
    byte_burst: f64,
    inner: Mutex<Inner>,
    count: watch::Sender<usize>,
    in_flight: Arc<ByteBudget>,
    held: Arc<ByteBudget>,
}

/// Why a frame was refused by [`SessionRegistry::admit_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimited {
    /// The device's message budget is spent.
    Messages,
    /// The device's byte budget is spent.
    Bytes,
}

/// A relay-wide budget of bytes, shared by every session; reservations are released when
/// their [`Reservation`] is dropped.
#[derive(Debug)]
pub struct ByteBudget {
    max: usize,
    used: AtomicUsize,
}

/// Bytes taken from a [`ByteBudget`]; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    fn new(max: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// Take `bytes`, or `None` (nothing taken) if they do not fit.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        self.try_add(bytes).then(|| Reservation {
            budget: Arc::clone(self),
            bytes,
        })
    }

    fn try_add(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    /// Bytes currently taken.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

impl Reservation {
    /// Bytes held by this reservation.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Grow (or shrink) this reservation to `bytes`; `false` (unchanged) if the growth does
    /// not fit.
    pub fn resize(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            self.budget
                .used
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
            return true;
        }
        let grown = self.budget.try_add(bytes - self.bytes);
        if grown {
            self.bytes = bytes;
        }
        grown
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: SessionId,
    shutting_down: bool,
    sessions: HashMap<SessionId, Registered>,
    buckets: HashMap<DeviceId, TokenBucket>,
    byte_buckets: HashMap<DeviceId, TokenBucket>,
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
    /// An empty registry enforcing `limits`.
    pub fn new(limits: &Limits) -> SessionRegistry {
        SessionRegistry {
            max_sessions: limits.max_sessions,
            max_per_device: limits.max_sessions_per_device.max(1),
            rate_per_second: f64::from(limits.message_rate_per_second),
            burst: f64::from(limits.message_burst.max(1)),
            byte_rate_per_second: f64::from(limits.byte_rate_per_second),
            byte_burst: f64::from(limits.byte_burst.max(1)),
            inner: Mutex::new(Inner::default()),
            count: watch::Sender::new(0),
            in_flight: ByteBudget::new(limits.max_bytes_in_flight),
            held: ByteBudget::new(limits.max_held_bytes),
        }
    }

    /// Relay-wide bytes of frames being handled.
    pub fn in_flight(&self) -> &Arc<ByteBudget> {
        &self.in_flight
    }

    /// Relay-wide bytes of unclassified documents held.
    pub fn held(&self) -> &Arc<ByteBudget> {
        &self.held
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
        let of_device = inner
            .sessions
            .values()
            .filter(|s| s.device_id == device_id)
            .count();
        if of_device >= self.max_per_device {
            metrics::counter!(LIMIT_HITS, "limit" => "sessions_per_device").increment(1);
            return Err(Error::Busy("too many sessions for this device"));
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
                let (rate, burst) = (self.byte_rate_per_second, self.byte_burst);
                inner.byte_buckets.retain(|device, bucket| {
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

    /// Take one message of `bytes` from the device's message and byte budgets; nothing is
    /// taken when either is exhausted.
    pub fn admit_frame(&self, device_id: &DeviceId, bytes: usize) -> Result<(), RateLimited> {
        let now = Instant::now();
        let mut inner = self.inner();
        let inner = &mut *inner;
        let messages = TokenBucket::refill(
            &mut inner.buckets,
            device_id,
            now,
            self.rate_per_second,
            self.burst,
        );
        if messages.tokens < 1.0 {
            return Err(RateLimited::Messages);
        }
        let cost = bytes as f64;
        let bytes_bucket = TokenBucket::refill(
            &mut inner.byte_buckets,
            device_id,
            now,
            self.byte_rate_per_second,
            self.byte_burst,
        );
        if bytes_bucket.tokens < cost {
            return Err(RateLimited::Bytes);
        }
        bytes_bucket.tokens -= cost;
        if let Some(messages) = inner.buckets.get_mut(device_id) {
            messages.tokens -= 1.0;
        }
        Ok(())
    }

    /// Take one message from the device's budget; `false` when it is exhausted.
    pub fn take_message(&self, device_id: &DeviceId) -> bool {
        self.admit_frame(device_id, 0).is_ok()
    }
}

impl TokenBucket {
    /// The device's bucket in `buckets` (made full if missing), refilled up to `now`.
    fn refill<'a>(
        buckets: &'a mut HashMap<DeviceId, TokenBucket>,
        device_id: &DeviceId,
        now: Instant,
        rate: f64,
        burst: f64,
    ) -> &'a mut TokenBucket {
        let bucket = buckets.entry(device_id.clone()).or_insert(TokenBucket {
            tokens: burst,
            refilled: now,
        });
        bucket.tokens = bucket.level(now, rate, burst);
        bucket.refilled = now;
        bucket
    }

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

    fn limits(max_sessions: usize, rate: u32, burst: u32) -> Limits {
        Limits {
            max_sessions,
            message_rate_per_second: rate,
            message_burst: burst,
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn sessions_are_bounded_and_counted() {
        let registry = Arc::new(SessionRegistry::new(&limits(2, 10, 10)));
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
        let registry = Arc::new(SessionRegistry::new(&limits(10, 10, 10)));
        let mut mine = registry.register(DeviceId::new("dev_a")).expect("register");
        let theirs = registry.register(DeviceId::new("dev_b")).expect("register");
        assert_eq!(registry.revoke_device(&DeviceId::new("dev_a")), 1);
        assert_eq!(mine.closed().await, CloseReason::Revoked);
        assert!(theirs.close.borrow().is_none());
    }

    #[tokio::test]
    async fn a_second_join_of_the_same_peer_replaces_the_first() {
        let registry = Arc::new(SessionRegistry::new(&limits(10, 10, 10)));
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
        let registry = Arc::new(SessionRegistry::new(&limits(10, 10, 10)));
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
        // No refill (rate 0): a loaded machine pausing this thread for a second must not
        // hand out a token the test did not plan for.
        let registry = SessionRegistry::new(&limits(10, 0, 5));
        let device = DeviceId::new("dev_a");
        assert!((0..5).all(|_| registry.take_message(&device)));
        assert!(!registry.take_message(&device));
        assert!(
            registry.take_message(&DeviceId::new("dev_b")),
            "budgets are per device"
        );
    }

    #[tokio::test]
    async fn sessions_are_bounded_per_device() {
        let registry = Arc::new(SessionRegistry::new(&Limits {
            max_sessions_per_device: 2,
            ..Limits::default()
        }));
        let a = registry.register(DeviceId::new("dev_a")).expect("first");
        let _b = registry.register(DeviceId::new("dev_a")).expect("second");
        assert!(matches!(
            registry.register(DeviceId::new("dev_a")),
            Err(Error::Busy("too many sessions for this device"))
        ));
        let _other = registry
            .register(DeviceId::new("dev_b"))
            .expect("another device is not affected");
        drop(a);
        let _c = registry
            .register(DeviceId::new("dev_a"))
            .expect("room again once one closed");
    }

    #[test]
    fn the_byte_budget_allows_a_burst_then_refuses_and_takes_nothing_when_refused() {
        let registry = SessionRegistry::new(&Limits {
            byte_rate_per_second: 1,
            byte_burst: 1000,
            ..Limits::default()
        });
        let device = DeviceId::new("dev_a");
        assert_eq!(registry.admit_frame(&device, 600), Ok(()));
        assert_eq!(
            registry.admit_frame(&device, 600),
            Err(RateLimited::Bytes),
            "600 + 600 bytes exceed the 1000-byte burst"
        );
        assert_eq!(
            registry.admit_frame(&device, 300),
            Ok(()),
            "the refusal took nothing"
        );
        assert_eq!(
            registry.admit_frame(&DeviceId::new("dev_b"), 900),
            Ok(()),
            "budgets are per device"
        );
    }

    #[test]
    fn byte_budgets_reserve_resize_and_release() {
        let budget = ByteBudget::new(100);
        let mut a = budget.reserve(60).expect("fits");
        assert!(budget.reserve(50).is_none());
        assert!(!a.resize(120), "growth beyond the budget is refused");
        assert_eq!(a.bytes(), 60);
        assert!(a.resize(90));
        assert_eq!(budget.used(), 90);
        assert!(a.resize(10));
        let b = budget.reserve(90).expect("fits after shrinking");
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
