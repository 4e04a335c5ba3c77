//! An in-memory backend: the same contract as SQLite (one conformance suite checks both), for
//! fast unit tests of sessions, access and the feed. It can be told to fail writes, which is
//! how tests prove that a storage error is never acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use fieldchart_core::protocol::{DocumentId, StorageId};

use super::{
    AdminChange, AdminEvent, AdminLogQuery, AdminOutcome, AdminRecord, AuditEvent, AuditQuery,
    AuditRecord, DeviceInfo, DeviceKey, DocMeta, DocumentData, DocumentRow, DocumentWrite,
    EnrollmentCode, FeedEntry, FeedPage, FeedQuery, FeedScope, PeerKey, Redemption, Seq, Storage,
    StorageFuture, StoredDocument,
};
use crate::error::{Error, Result};
use crate::identity::{Agency, AgencyId, Device, DeviceId, Patient, PatientId, User, UserId};

mod console;
pub use console::MemoryConsole;

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
    disabled: HashMap<UserId, i64>,
    device_extra: HashMap<DeviceId, DeviceExtra>,
    codes: HashMap<[u8; 32], (EnrollmentCode, Option<i64>)>,
    admin_log: Vec<AdminRecord>,
}

/// What the SQLite backend keeps in extra `devices` columns.
#[derive(Debug, Default, Clone)]
struct DeviceExtra {
    public_key: Option<[u8; 32]>,
    enrolled_by: Option<String>,
    last_seen_at: Option<i64>,
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

    fn check_user_enabled(&self, user_id: &UserId) -> Result<()> {
        if !self.users.contains_key(user_id) {
            return Err(Error::NotFound("user"));
        }
        if self.disabled.contains_key(user_id) {
            return Err(Error::Forbidden("the user is disabled"));
        }
        Ok(())
    }

    fn insert_agency(&mut self, agency: Agency) -> Result<()> {
        if self.agencies.contains_key(&agency.id) {
            return Err(Error::Conflict(format!("agency {} exists", agency.id)));
        }
        self.agencies.insert(agency.id.clone(), agency);
        Ok(())
    }

    fn insert_user(&mut self, user: User) -> Result<()> {
        if !self.agencies.contains_key(&user.agency_id) {
            return Err(Error::NotFound("agency"));
        }
        if self.users.contains_key(&user.id) {
            return Err(Error::Conflict(format!("user {} exists", user.id)));
        }
        self.users.insert(user.id.clone(), user);
        Ok(())
    }

    fn insert_patient(&mut self, patient: Patient, chart: DocumentWrite) -> Result<Seq> {
        if !self.agencies.contains_key(&patient.agency_id) {
            return Err(Error::NotFound("agency"));
        }
        if self.patients.contains_key(&patient.id) {
            return Err(Error::Conflict(format!("patient {} exists", patient.id)));
        }
        if self.documents.contains_key(&chart.document_id) {
            return Err(Error::Conflict(format!(
                "document {} exists",
                chart.document_id
            )));
        }
        self.patients.insert(patient.id.clone(), patient);
        self.write_document(chart)
    }

    fn assign(&mut self, user_id: UserId, patient_id: PatientId) -> Result<Seq> {
        if !self.users.contains_key(&user_id) {
            return Err(Error::NotFound("user"));
        }
        if !self.patients.contains_key(&patient_id) {
            return Err(Error::NotFound("patient"));
        }
        if let Some(seq) = self.care_team.get(&(user_id.clone(), patient_id.clone())) {
            return Ok(*seq);
        }
        let seq = self.next_seq();
        self.care_team.insert((user_id, patient_id), seq);
        Ok(seq)
    }

    fn insert_device(&mut self, device: Device, extra: DeviceExtra) -> Result<()> {
        if !self.users.contains_key(&device.user_id) {
            return Err(Error::NotFound("user"));
        }
        if self.devices.contains_key(&device.id)
            || self
                .devices
                .values()
                .any(|d| d.token_hash == device.token_hash)
        {
            return Err(Error::Conflict(format!(
                "device {} or its token exists",
                device.id
            )));
        }
        self.device_extra.insert(device.id.clone(), extra);
        self.devices.insert(device.id.clone(), device);
        Ok(())
    }

    fn revoke_device(&mut self, id: DeviceId, at_ms: i64) -> Result<bool> {
        let already = match self.devices.get(&id) {
            None => return Err(Error::NotFound("device")),
            Some(d) => d.revoked_at.is_some(),
        };
        if already {
            return Ok(false);
        }
        let seq = self.next_seq();
        if let Some(d) = self.devices.get_mut(&id) {
            d.revoked_at = Some(at_ms);
        }
        self.revoked_seq.insert(id, seq);
        Ok(true)
    }

    fn admin_change(&mut self, change: AdminChange) -> Result<AdminOutcome> {
        Ok(match change {
            AdminChange::Record => AdminOutcome::Done,
            AdminChange::InsertAgency(agency) => {
                self.insert_agency(agency)?;
                AdminOutcome::Done
            }
            AdminChange::InsertUser(user) => {
                self.insert_user(user)?;
                AdminOutcome::Done
            }
            AdminChange::InsertPatient(patient, chart) => {
                AdminOutcome::Seq(self.insert_patient(patient, *chart)?)
            }
            AdminChange::Assign {
                user_id,
                patient_id,
                ..
            } => AdminOutcome::Seq(self.assign(user_id, patient_id)?),
            AdminChange::Unassign {
                user_id,
                patient_id,
            } => AdminOutcome::Changed(self.care_team.remove(&(user_id, patient_id)).is_some()),
            AdminChange::InsertDevice { device, issued_by } => {
                self.check_user_enabled(&device.user_id)?;
                self.insert_device(
                    device,
                    DeviceExtra {
                        enrolled_by: Some(issued_by),
                        ..DeviceExtra::default()
                    },
                )?;
                AdminOutcome::Done
            }
            AdminChange::RevokeDevice { device_id, at_ms } => {
                AdminOutcome::Changed(self.revoke_device(device_id, at_ms)?)
            }
            AdminChange::DisableUser { user_id, at_ms } => {
                if !self.users.contains_key(&user_id) {
                    return Err(Error::NotFound("user"));
                }
                self.disabled.entry(user_id.clone()).or_insert(at_ms);
                let mut live: Vec<&Device> = self
                    .devices
                    .values()
                    .filter(|d| d.user_id == user_id && d.revoked_at.is_none())
                    .collect();
                live.sort_by_key(|d| (d.created_at, d.id.clone()));
                let live: Vec<DeviceId> = live.into_iter().map(|d| d.id.clone()).collect();
                for id in &live {
                    self.revoke_device(id.clone(), at_ms)?;
                }
                for (code, _) in self.codes.values_mut() {
                    if code.user_id == user_id {
                        code.expires_at = code.expires_at.min(at_ms);
                    }
                }
                AdminOutcome::Revoked(live)
            }
            AdminChange::InsertEnrollmentCode(code) => {
                self.check_user_enabled(&code.user_id)?;
                if self.codes.contains_key(&code.code_hash) {
                    return Err(Error::Conflict("enrollment code exists".into()));
                }
                self.codes.insert(code.code_hash, (code, None));
                AdminOutcome::Done
            }
        })
    }

    fn redeem(&mut self, r: Redemption) -> Result<(Device, User)> {
        let Some((code, used)) = self.codes.get(&r.code_hash).cloned() else {
            return Err(Error::NotFound("enrollment code"));
        };
        if used.is_some() {
            return Err(Error::Conflict(
                "the enrollment code was already used".into(),
            ));
        }
        if code.expires_at <= r.at_ms {
            return Err(Error::Expired("enrollment code"));
        }
        self.check_user_enabled(&code.user_id)?;
        let user = self
            .users
            .get(&code.user_id)
            .cloned()
            .ok_or(Error::NotFound("user"))?;
        let device = Device {
            id: r.device_id.clone(),
            user_id: user.id.clone(),
            name: r.device_name.clone().unwrap_or(code.device_name.clone()),
            token_hash: r.token_hash,
            created_at: r.at_ms,
            expires_at: r.token_expires_at,
            revoked_at: None,
        };
        self.insert_device(
            device.clone(),
            DeviceExtra {
                public_key: Some(r.public_key),
                enrolled_by: Some(code.created_by.clone()),
                last_seen_at: None,
            },
        )?;
        self.codes
            .insert(r.code_hash, (code.clone(), Some(r.at_ms)));
        let event = super::enrollment_event(&r, &user, &device, &code.created_by);
        self.push_admin(event);
        Ok((device, user))
    }

    fn push_admin(&mut self, event: AdminEvent) {
        let id = i64::try_from(self.admin_log.len()).unwrap_or(i64::MAX - 1) + 1;
        self.admin_log.push(AdminRecord { id, event });
    }

    fn device_key(&self, device: &Device) -> Option<DeviceKey> {
        let key = self.device_extra.get(&device.id)?.public_key?;
        let user = self.users.get(&device.user_id)?;
        Some(DeviceKey {
            device_id: device.id.clone(),
            user_id: user.id.clone(),
            agency_id: user.agency_id.clone(),
            role: user.role,
            public_key: key,
            enrolled_at_ms: device.created_at,
            revoked_at_ms: device.revoked_at,
        })
    }

    fn query_audit(&self, query: &AuditQuery, after: Option<(i64, i64)>) -> Vec<AuditRecord> {
        let mut rows: Vec<AuditRecord> = self
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
                    && after.is_none_or(|a| (e.at_ms, r.id) > a)
            })
            .cloned()
            .collect();
        rows.sort_by_key(|r| (r.event.at_ms, r.id));
        rows.truncate(query.limit);
        rows
    }

    /// A copy, for all-or-nothing changes. (Test backend: the copy's cost does not matter.)
    fn clone_state(&self) -> State {
        State {
            seq: self.seq,
            agencies: self.agencies.clone(),
            users: self.users.clone(),
            patients: self.patients.clone(),
            care_team: self.care_team.clone(),
            devices: self.devices.clone(),
            revoked_seq: self.revoked_seq.clone(),
            documents: self.documents.clone(),
            sync_states: self.sync_states.clone(),
            audit: self.audit.clone(),
            disabled: self.disabled.clone(),
            device_extra: self.device_extra.clone(),
            codes: self.codes.clone(),
            admin_log: self.admin_log.clone(),
        }
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
        self.with(move |s| s.insert_agency(agency))
    }

    fn agency(&self, id: AgencyId) -> StorageFuture<'_, Option<Agency>> {
        self.with(move |s| Ok(s.agencies.get(&id).cloned()))
    }

    fn insert_user(&self, user: User) -> StorageFuture<'_, ()> {
        self.with(move |s| s.insert_user(user))
    }

    fn user(&self, id: UserId) -> StorageFuture<'_, Option<User>> {
        self.with(move |s| Ok(s.users.get(&id).cloned()))
    }

    fn insert_patient(&self, patient: Patient, chart: DocumentWrite) -> StorageFuture<'_, Seq> {
        self.write(move |s| s.insert_patient(patient, chart))
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
        self.with(move |s| s.assign(user_id, patient_id))
    }

    fn unassign(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.with(move |s| Ok(s.care_team.remove(&(user_id, patient_id)).is_some()))
    }

    fn on_care_team(&self, user_id: UserId, patient_id: PatientId) -> StorageFuture<'_, bool> {
        self.with(move |s| Ok(s.care_team.contains_key(&(user_id, patient_id))))
    }

    fn insert_device(&self, device: Device) -> StorageFuture<'_, ()> {
        self.with(move |s| s.insert_device(device, DeviceExtra::default()))
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
        self.with(move |s| s.revoke_device(id, at_ms))
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

    fn admin_change(
        &self,
        change: AdminChange,
        event: AdminEvent,
    ) -> StorageFuture<'_, AdminOutcome> {
        self.write(move |s| {
            // All or nothing, like a transaction: apply to a copy, keep it only on success.
            let mut next = s.clone_state();
            let outcome = next.admin_change(change)?;
            next.push_admin(event);
            *s = next;
            Ok(outcome)
        })
    }

    fn admin_log(&self, query: AdminLogQuery) -> StorageFuture<'_, Vec<AdminRecord>> {
        self.with(move |s| {
            Ok(s.admin_log
                .iter()
                .filter(|r| {
                    r.id > query.after_id
                        && query
                            .agency_id
                            .as_ref()
                            .is_none_or(|a| r.event.agency_id.as_ref() == Some(a))
                        && query.target.as_ref().is_none_or(|t| r.event.target == *t)
                        && query.actor.as_ref().is_none_or(|a| r.event.actor == *a)
                })
                .take(query.limit)
                .cloned()
                .collect())
        })
    }

    fn redeem_enrollment(&self, redemption: Redemption) -> StorageFuture<'_, (Device, User)> {
        self.write(move |s| {
            let mut next = s.clone_state();
            let out = next.redeem(redemption)?;
            *s = next;
            Ok(out)
        })
    }

    fn user_disabled_at(&self, id: UserId) -> StorageFuture<'_, Option<i64>> {
        self.with(move |s| Ok(s.disabled.get(&id).copied()))
    }

    fn user_devices(&self, id: UserId) -> StorageFuture<'_, Vec<DeviceInfo>> {
        self.with(move |s| {
            let mut out: Vec<DeviceInfo> = s
                .devices
                .values()
                .filter(|d| d.user_id == id)
                .map(|d| {
                    let extra = s.device_extra.get(&d.id).cloned().unwrap_or_default();
                    DeviceInfo {
                        device: d.clone(),
                        public_key: extra.public_key,
                        enrolled_by: extra.enrolled_by,
                        last_seen_at: extra.last_seen_at,
                    }
                })
                .collect();
            out.sort_by_key(|i| (i.device.created_at, i.device.id.clone()));
            Ok(out)
        })
    }

    fn touch_device(&self, id: DeviceId, at_ms: i64) -> StorageFuture<'_, ()> {
        self.with(move |s| {
            if s.devices.contains_key(&id) {
                s.device_extra.entry(id).or_default().last_seen_at = Some(at_ms);
            }
            Ok(())
        })
    }

    fn device_key(&self, id: DeviceId) -> StorageFuture<'_, Option<DeviceKey>> {
        self.with(move |s| Ok(s.devices.get(&id).and_then(|d| s.device_key(d))))
    }

    fn agency_device_keys(&self, agency_id: AgencyId) -> StorageFuture<'_, Vec<DeviceKey>> {
        self.with(move |s| {
            let mut keys: Vec<DeviceKey> = s
                .devices
                .values()
                .filter_map(|d| s.device_key(d))
                .filter(|k| k.agency_id == agency_id)
                .collect();
            keys.sort_by_key(|k| (k.enrolled_at_ms, k.device_id.clone()));
            Ok(keys)
        })
    }

    fn audit_page(
        &self,
        query: AuditQuery,
        after: Option<(i64, i64)>,
    ) -> StorageFuture<'_, Vec<AuditRecord>> {
        self.with(move |s| Ok(s.query_audit(&query, after)))
    }

    fn load_document(&self, id: DocumentId) -> StorageFuture<'_, Option<StoredDocument>> {
        self.with(move |s| Ok(s.documents.get(&id).cloned()))
    }

    fn write_document(&self, write: DocumentWrite) -> StorageFuture<'_, Seq> {
        self.write(move |s| s.write_document(write))
    }

    fn write_document_on(
        &self,
        write: DocumentWrite,
        base: Vec<automerge::ChangeHash>,
    ) -> StorageFuture<'_, Seq> {
        self.write(move |s| {
            if let Some(doc) = s.documents.get(&write.document_id)
                && !write.create
                && doc.heads != base
            {
                return Err(Error::Stale(write.document_id.to_string()));
            }
            s.write_document(write)
        })
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
        self.with(move |s| Ok(s.query_audit(&query, None)))
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
