//! A storage wrapper that injects faults into writes: a full disk or a failing device (every
//! write fails with a storage error, nothing is written), or a panic at the moment of the write
//! (what a bug anywhere between applying a change in memory and committing it looks like to
//! the caller). Reads always pass through.
//!
//! Used by the relay's fault-containment tests over the real SQLite backend (and usable over
//! any backend); never by `serve`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use fieldchart_core::protocol::{DocumentId, StorageId};

use super::{
    AdminChange, AdminEvent, AdminLogQuery, AdminOutcome, AdminRecord, AuditEvent, AuditQuery,
    AuditRecord, DeviceInfo, DeviceKey, DocumentRow, DocumentWrite, FeedPage, FeedQuery, PeerKey,
    Redemption, Seq, Storage, StorageFuture, StoredDocument,
};
use crate::error::Error;
use crate::identity::{Agency, AgencyId, Device, DeviceId, Patient, PatientId, User, UserId};

/// What the next writes do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// Writes pass through.
    None,
    /// Every write fails with a storage error ("No space left on device"); nothing is written.
    DiskFull,
    /// The next write panics (once; then writes pass through again).
    PanicOnce,
}

/// The switch a test flips; shared with the [`FaultyStorage`] it was made with.
#[derive(Debug, Default)]
pub struct Faults {
    mode: AtomicU8,
    refused: AtomicU64,
}

impl Faults {
    /// Set what the next writes do.
    pub fn set(&self, fault: WriteFault) {
        let mode = match fault {
            WriteFault::None => 0,
            WriteFault::DiskFull => 1,
            WriteFault::PanicOnce => 2,
        };
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Writes refused (disk full) or panicked so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    fn before_write(&self, what: &'static str) -> Option<Error> {
        match self.mode.load(Ordering::SeqCst) {
            1 => {
                self.refused.fetch_add(1, Ordering::SeqCst);
                Some(Error::Storage(format!(
                    "{what}: disk I/O error: No space left on device (injected)"
                )))
            }
            2 => {
                if self
                    .mode
                    .compare_exchange(2, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    self.refused.fetch_add(1, Ordering::SeqCst);
                    panic!("injected panic in {what}");
                }
                None
            }
            _ => None,
        }
    }
}

/// `inner` with writes subject to [`Faults`].
#[derive(Debug)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    faults: Arc<Faults>,
}

impl FaultyStorage {
    /// Wrap `inner`; flip faults through the returned handle.
    pub fn new(inner: Arc<dyn Storage>) -> (FaultyStorage, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            FaultyStorage {
                inner,
                faults: Arc::clone(&faults),
            },
            faults,
        )
    }
}

impl Storage for FaultyStorage {
    fn storage_id(&self) -> StorageFuture<'_, StorageId> {
        self.inner.storage_id()
    }

    fn current_seq(&self) -> StorageFuture<'_, Seq> {
        self.inner.current_seq()
    }

    fn insert_agency(&self, agency: Agency) -> StorageFuture<'_, ()> {
        if let Some(e) = self.faults.before_write("insert_agency") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.insert_agency(agency)
    }

    fn agency(&self, id: AgencyId) -> StorageFuture<'_, Option<Agency>> {
        self.inner.agency(id)
    }

    fn insert_user(&self, user: User) -> StorageFuture<'_, ()> {
        if let Some(e) = self.faults.before_write("insert_user") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.insert_user(user)
    }

    fn user(&self, id: UserId) -> StorageFuture<'_, Option<User>> {
        self.inner.user(id)
    }

    fn insert_patient(&self, patient: Patient, chart: DocumentWrite) -> StorageFuture<'_, Seq> {
        if let Some(e) = self.faults.before_write("insert_patient") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.insert_patient(patient, chart)
    }

    fn patient(&self, id: PatientId) -> StorageFuture<'_, Option<Patient>> {
        self.inner.patient(id)
    }

    fn assign(&self, user_id: UserId, patient_id: PatientId, at_ms: i64) -> StorageFuture<'_, Seq> {
        if let Some(e) = self.faults.before_write("assign") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.assign(user_id, patient_id, at_ms)
    }

    fn unassign(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        if let Some(e) = self.faults.before_write("unassign") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.unassign(user_id, patient_id)
    }

    fn on_care_team(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.inner.on_care_team(user_id, patient_id)
    }

    fn insert_device(&self, device: Device) -> StorageFuture<'_, ()> {
        if let Some(e) = self.faults.before_write("insert_device") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.insert_device(device)
    }

    fn device(&self, id: DeviceId) -> StorageFuture<'_, Option<Device>> {
        self.inner.device(id)
    }

    fn device_by_token_hash(
        &self,
        token_hash: [u8; 32],
    ) -> StorageFuture<'_, Option<(Device, User)>> {
        self.inner.device_by_token_hash(token_hash)
    }

    fn revoke_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, bool> {
        if let Some(e) = self.faults.before_write("revoke_device") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.revoke_device(id, at_ms)
    }

    fn revoked_devices_since(&self, after: Seq) -> StorageFuture<'_, Vec<(DeviceId, Seq)>> {
        self.inner.revoked_devices_since(after)
    }

    fn admin_change(
        &self,
        change: AdminChange,
        event: AdminEvent,
    ) -> StorageFuture<'_, AdminOutcome> {
        if let Some(e) = self.faults.before_write("admin_change") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.admin_change(change, event)
    }

    fn admin_log(&self, query: AdminLogQuery) -> StorageFuture<'_, Vec<AdminRecord>> {
        self.inner.admin_log(query)
    }

    fn redeem_enrollment(&self, redemption: Redemption) -> StorageFuture<'_, (Device, User)> {
        if let Some(e) = self.faults.before_write("redeem_enrollment") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.redeem_enrollment(redemption)
    }

    fn user_disabled_at(&self, id: UserId) -> StorageFuture<'_, Option<i64>> {
        self.inner.user_disabled_at(id)
    }

    fn user_devices(&self, id: UserId) -> StorageFuture<'_, Vec<DeviceInfo>> {
        self.inner.user_devices(id)
    }

    fn touch_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, ()> {
        if let Some(e) = self.faults.before_write("touch_device") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.touch_device(id, at_ms)
    }

    fn device_key(&self, id: DeviceId) -> StorageFuture<'_, Option<DeviceKey>> {
        self.inner.device_key(id)
    }

    fn agency_device_keys(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<DeviceKey>> {
        self.inner.agency_device_keys(agency_id)
    }

    fn audit_page(
        &self,
        query: AuditQuery,
        after: Option<(i64, i64)>,
    ) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.inner.audit_page(query, after)
    }

    fn load_document(&self, id: DocumentId) -> StorageFuture<'_, Option<StoredDocument>> {
        self.inner.load_document(id)
    }

    fn write_document(&self, write: DocumentWrite) -> StorageFuture<'_, Seq> {
        if let Some(e) = self.faults.before_write("write_document") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.write_document(write)
    }

    fn write_document_on(
        &self,
        write: DocumentWrite,
        base: Vec<automerge::ChangeHash>,
    ) -> StorageFuture<'_, Seq> {
        if let Some(e) = self.faults.before_write("write_document") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.write_document_on(write, base)
    }

    fn shared_epoch(&self) -> StorageFuture<'_, Option<String>> {
        self.inner.shared_epoch()
    }

    fn load_sync_state(
        &self,
        peer: PeerKey,
        document_id: DocumentId,
    ) -> StorageFuture<'_, Option<Vec<u8>>> {
        self.inner.load_sync_state(peer, document_id)
    }

    fn save_sync_states(
        &self,
        peer: PeerKey,
        states: Vec<(DocumentId, Vec<u8>)>,
    ) -> StorageFuture<'_, ()> {
        if let Some(e) = self.faults.before_write("save_sync_states") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.save_sync_states(peer, states)
    }

    fn changes(&self, query: FeedQuery) -> StorageFuture<'_, FeedPage> {
        self.inner.changes(query)
    }

    fn append_audit(&self, events: Vec<AuditEvent>) -> StorageFuture<'_, ()> {
        if let Some(e) = self.faults.before_write("append_audit") {
            return Box::pin(async move { Err(e) });
        }
        self.inner.append_audit(events)
    }

    fn query_audit(&self, query: AuditQuery) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.inner.query_audit(query)
    }

    fn document_row(&self, id: DocumentId) -> StorageFuture<'_, Option<DocumentRow>> {
        self.inner.document_row(id)
    }
}
