//! An in-memory backend: the same contract as SQLite (one conformance suite checks both), for
//! fast unit tests of sessions, access and the feed. It can be told to fail writes, which is
//! how tests prove that a storage error is never acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use fieldchart_core::protocol::{DocumentId, StorageId};

use super::{
    AuditEvent, AuditQuery, AuditRecord, DocMeta, DocumentData, DocumentRow, DocumentWrite,
    FeedEntry, FeedPage, FeedQuery, FeedScope, PeerKey, Seq, Storage, StorageFuture,
    StoredDocument,
};
use crate::error::{Error, Result};
use crate::identity::{Agency, AgencyId, Device, DeviceId, Patient, PatientId, User, UserId};

/// Everything in memory, behind one mutex (held only inside a method, never across `.await`).
#[derive(Debug)]
pub struct MemoryStorage {
    storage_id: StorageId,
    state: Mutex<State>,
    fail_writes: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    seq: Seq,
    agencies: HashMap<AgencyId, Agency>,
    users: HashMap<UserId, User>,
    patients: HashMap<PatientId, Patient>,
    /// (user, patient) → assignment seq.
    care_team: BTreeMap<(UserId, PatientId), Seq>,
    devices: HashMap<DeviceId, Device>,
    revoked_seq: HashMap<DeviceId, Seq>,
    documents: BTreeMap<DocumentId, StoredDocument>,
    sync_states: HashMap<(PeerKey, DocumentId), Vec<u8>>,
    audit: Vec<AuditRecord>,
}

impl State {
    fn next_seq(&mut self) -> Seq {
        self.seq += 1;
        self.seq
    }

    fn write_document(&mut self, write: DocumentWrite) -> Result<Seq> {
        match (self.documents.get(&write.document_id), write.create) {
            (Some(_), true) => {
                return Err(Error::Conflict(format!(
                    "document {} exists",
                    write.document_id
                )));
            }
            (None, false) => return Err(Error::NotFound("document")),
            (Some(doc), false)
                if doc.meta.agency_id != write.meta.agency_id
                    || doc.meta.patient_id != write.meta.patient_id =>
            {
                return Err(Error::Conflict(format!(
                    "document {} belongs elsewhere",
                    write.document_id
                )));
            }
            _ => {}
        }
        let seq = self.next_seq();
        let doc = self
            .documents
            .entry(write.document_id)
            .or_insert_with(|| StoredDocument {
                meta: write.meta.clone(),
                snapshot: None,
                chunks: Vec::new(),
                heads: Vec::new(),
                seq,
            });
        doc.heads = write.heads;
        doc.seq = seq;
        match write.data {
            DocumentData::Snapshot(bytes) => {
                doc.snapshot = Some(bytes);
                doc.chunks.clear();
            }
            DocumentData::Chunk(bytes) => doc.chunks.push(bytes),
        }
        if let Some(event) = write.audit {
            self.push_audit(event);
        }
        Ok(seq)
    }

    fn push_audit(&mut self, event: AuditEvent) {
        let id = i64::try_from(self.audit.len()).unwrap_or(i64::MAX - 1) + 1;
        self.audit.push(AuditRecord { id, event });
    }
}

impl Default for MemoryStorage {
    fn default() -> Self {
        MemoryStorage::new()
    }
}

impl MemoryStorage {
    /// An empty store with a fresh storage id.
    pub fn new() -> MemoryStorage {
        MemoryStorage {
            storage_id: StorageId::new(format!(
                "fieldchart-relay-{}",
                crate::identity::random_hex::<16>()
            )),
            state: Mutex::new(State::default()),
            fail_writes: AtomicBool::new(false),
        }
    }

    /// From now on, every document write and audit append fails (as a full disk would), until
    /// called again with `false`.
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    fn check_writable(&self) -> Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            Err(Error::Storage("injected write failure".into()))
        } else {
            Ok(())
        }
    }

    /// Run `f` on the state when the future is polled, like the other backends. The mutex is
    /// taken and released within that one poll; there is nothing to await inside.
    fn with<'a, T, F>(&'a self, f: F) -> StorageFuture<'a, T>
    where
        T: Send + 'a,
        F: FnOnce(&mut State) -> Result<T> + Send + 'a,
    {
        Box::pin(async move {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut state)
        })
    }

    /// Like [`MemoryStorage::with`], for writes that fault injection makes fail.
    fn write<'a, T, F>(&'a self, f: F) -> StorageFuture<'a, T>
    where
        T: Send + 'a,
        F: FnOnce(&mut State) -> Result<T> + Send + 'a,
    {
        self.with(move |state| {
            self.check_writable()?;
            f(state)
        })
    }
}

impl Storage for MemoryStorage {
    fn storage_id(&self) -> StorageFuture<'_, StorageId> {
        Box::pin(std::future::ready(Ok(self.storage_id.clone())))
    }

    fn current_seq(&self) -> StorageFuture<'_, Seq> {
        self.with(|s| Ok(s.seq))
    }

    fn insert_agency(&self, agency: Agency) -> StorageFuture<'_, ()> {
        self.with(move |s| {
            if s.agencies.contains_key(&agency.id) {
                return Err(Error::Conflict(format!("agency {} exists", agency.id)));
            }
            s.agencies.insert(agency.id.clone(), agency);
            Ok(())
        })
    }

    fn agency(&self, id: AgencyId) -> StorageFuture<'_, Option<Agency>> {
        self.with(move |s| Ok(s.agencies.get(&id).cloned()))
    }

    fn insert_user(&self, user: User) -> StorageFuture<'_, ()> {
        self.with(move |s| {
            if !s.agencies.contains_key(&user.agency_id) {
                return Err(Error::NotFound("agency"));
            }
            if s.users.contains_key(&user.id) {
                return Err(Error::Conflict(format!("user {} exists", user.id)));
            }
            s.users.insert(user.id.clone(), user);
            Ok(())
        })
    }

    fn user(&self, id: UserId) -> StorageFuture<'_, Option<User>> {
        self.with(move |s| Ok(s.users.get(&id).cloned()))
    }

    fn insert_patient(&self, patient: Patient, chart: DocumentWrite) -> StorageFuture<'_, Seq> {
        self.write(move |s| {
            if !s.agencies.contains_key(&patient.agency_id) {
                return Err(Error::NotFound("agency"));
            }
            if s.patients.contains_key(&patient.id) {
                return Err(Error::Conflict(format!("patient {} exists", patient.id)));
            }
            if s.documents.contains_key(&chart.document_id) {
                return Err(Error::Conflict(format!(
                    "document {} exists",
                    chart.document_id
                )));
            }
            s.patients.insert(patient.id.clone(), patient);
            s.write_document(chart)
        })
    }

    fn patient(&self, id: PatientId) -> StorageFuture<'_, Option<Patient>> {
        self.with(move |s| Ok(s.patients.get(&id).cloned()))
    }

    fn assign(
        &self,
        user_id: UserId,
        patient_id: PatientId,
        _at_ms: i64,
    ) -> StorageFuture<'_, Seq> {
        self.with(move |s| {
            if !s.users.contains_key(&user_id) {
                return Err(Error::NotFound("user"));
            }
            if !s.patients.contains_key(&patient_id) {
                return Err(Error::NotFound("patient"));
            }
            if let Some(seq) = s.care_team.get(&(user_id.clone(), patient_id.clone())) {
                return Ok(*seq);
            }
            let seq = s.next_seq();
            s.care_team.insert((user_id, patient_id), seq);
            Ok(seq)
        })
    }

    fn unassign(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.with(move |s| Ok(s.care_team.remove(&(user_id, patient_id)).is_some()))
    }

    fn on_care_team(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.with(move |s| Ok(s.care_team.contains_key(&(user_id, patient_id))))
    }

    fn insert_device(&self, device: Device) -> StorageFuture<'_, ()> {
        self.with(move |s| {
            if !s.users.contains_key(&device.user_id) {
                return Err(Error::NotFound("user"));
            }
            if s.devices.contains_key(&device.id)
                || s.devices
                    .values()
                    .any(|d| d.token_hash == device.token_hash)
            {
                return Err(Error::Conflict(format!(
                    "device {} or its token exists",
                    device.id
                )));
            }
            s.devices.insert(device.id.clone(), device);
            Ok(())
        })
    }

    fn device(&self, id: DeviceId) -> StorageFuture<'_, Option<Device>> {
        self.with(move |s| Ok(s.devices.get(&id).cloned()))
    }

    fn device_by_token_hash(
        &self,
        token_hash: [u8; 32],
    ) -> StorageFuture<'_, Option<(Device, User)>> {
        self.with(move |s| {
            Ok(s.devices
                .values()
                .find(|d| d.token_hash == token_hash)
                .and_then(|d| s.users.get(&d.user_id).map(|u| (d.clone(), u.clone()))))
        })
    }

    fn revoke_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, bool> {
        self.with(move |s| {
            let already = match s.devices.get(&id) {
                None => return Err(Error::NotFound("device")),
                Some(d) => d.revoked_at.is_some(),
            };
            if already {
                return Ok(false);
            }
            let seq = s.next_seq();
            if let Some(d) = s.devices.get_mut(&id) {
                d.revoked_at = Some(at_ms);
            }
            s.revoked_seq.insert(id, seq);
            Ok(true)
        })
    }

    fn revoked_devices_since(&self, after: Seq) -> StorageFuture<'_, Vec<(DeviceId, Seq)>> {
        self.with(move |s| {
            let mut out: Vec<_> = s
                .revoked_seq
                .iter()
                .filter(|(_, seq)| **seq > after)
                .map(|(d, seq)| (d.clone(), *seq))
                .collect();
            out.sort_by_key(|(_, seq)| *seq);
            Ok(out)
        })
    }

    fn load_document(&self, id: DocumentId) -> StorageFuture<'_, Option<StoredDocument>> {
        self.with(move |s| Ok(s.documents.get(&id).cloned()))
    }

    fn write_document(&self, write: DocumentWrite) -> StorageFuture<'_, Seq> {
        self.write(move |s| s.write_document(write))
    }

    fn load_sync_state(
        &self,
        peer: PeerKey,
        document_id: DocumentId,
    ) -> StorageFuture<'_, Option<Vec<u8>>> {
        self.with(move |s| Ok(s.sync_states.get(&(peer, document_id)).cloned()))
    }

    fn save_sync_states(
        &self,
        peer: PeerKey,
        states: Vec<(DocumentId, Vec<u8>)>,
    ) -> StorageFuture<'_, ()> {
        self.write(move |s| {
            for (doc, state) in states {
                s.sync_states.insert((peer.clone(), doc), state);
            }
            Ok(())
        })
    }

    fn changes(&self, query: FeedQuery) -> StorageFuture<'_, FeedPage> {
        self.with(move |s| {
            let visible_since = |meta: &DocMeta| -> Option<Seq> {
                match &query.scope {
                    FeedScope::Agency(agency) => (meta.agency_id == *agency).then_some(0),
                    FeedScope::CareTeam { agency_id, user_id } => {
                        if meta.agency_id != *agency_id {
                            return None;
                        }
                        s.care_team
                            .get(&(user_id.clone(), meta.patient_id.clone()))
                            .copied()
                    }
                }
            };
            let mut entries: Vec<FeedEntry> = s
                .documents
                .iter()
                .filter_map(|(id, doc)| {
                    let seq = visible_since(&doc.meta)?.max(doc.seq);
                    let after = seq > query.after.seq
                        || (seq == query.after.seq
                            && query.after.document_id.is_some_and(|c| *id > c));
                    after.then(|| FeedEntry {
                        document_id: *id,
                        meta: doc.meta.clone(),
                        heads: doc.heads.clone(),
                        seq,
                    })
                })
                .collect();
            entries.sort_by_key(|e| (e.seq, e.document_id));
            let more = entries.len() > query.limit;
            entries.truncate(query.limit);
            Ok(FeedPage { entries, more })
        })
    }

    fn append_audit(&self, events: Vec<AuditEvent>) -> StorageFuture<'_, ()> {
        self.write(move |s| {
            for event in events {
                s.push_audit(event);
            }
            Ok(())
        })
    }

    fn query_audit(&self, query: AuditQuery) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.with(move |s| {
            let mut rows: Vec<AuditRecord> = s
                .audit
                .iter()
                .filter(|r| {
                    let e = &r.event;
                    e.at_ms >= query.from_ms
                        && e.at_ms < query.to_ms
                        && query
                            .patient_id
                            .as_ref()
                            .is_none_or(|p| e.patient_id.as_ref() == Some(p))
                        && query.user_id.as_ref().is_none_or(|u| e.user_id == *u)
                })
                .cloned()
                .collect();
            rows.sort_by_key(|r| (r.event.at_ms, r.id));
            rows.truncate(query.limit);
            Ok(rows)
        })
    }

    fn document_row(&self, id: DocumentId) -> StorageFuture<'_, Option<DocumentRow>> {
        self.with(move |s| {
            Ok(s.documents.get(&id).map(|d| DocumentRow {
                meta: d.meta.clone(),
                stored_bytes: (d.snapshot.as_ref().map_or(0, Vec::len)
                    + d.chunks.iter().map(Vec::len).sum::<usize>())
                    as u64,
                heads: d.heads.clone(),
            }))
        })
    }
}
