//! Shared helpers for the multi-replica tests: stores in temp dirs, "sync" by export/import,
//! and a key directory published the way the relay would.

#![allow(dead_code, clippy::unwrap_used)]

use fieldchart_core::model::{Actor, DirectoryKey, KeyDirectory, Role, VisitStart};
use fieldchart_core::store::{Store, StoreConfig, StoreKey};

pub struct Replica {
    pub store: Store,
    pub user: String,
    pub role: Role,
    pub _dir: tempfile::TempDir,
}

pub fn replica(user: &str, role: Role) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig {
        path: dir.path().join("device.db"),
        key: StoreKey::random(),
        actor: Actor {
            user_id: user.into(),
            device_id: format!("{user}-phone"),
        },
        role,
        keystroke_journal: true,
    })
    .unwrap();
    Replica {
        store,
        user: user.into(),
        role,
        _dir: dir,
    }
}

/// The directory entry of a replica's device key, enrolled at time 0.
pub fn directory_key(r: &Replica) -> DirectoryKey {
    DirectoryKey {
        user_id: r.user.clone(),
        role: r.role.as_str().into(),
        device_id: format!("{}-phone", r.user),
        public_key: hex::encode(r.store.device_public_key().unwrap()),
        enrolled_at_ms: 0,
        revoked_at_ms: None,
    }
}

/// Give every replica the agency's key directory listing `keys`.
pub fn publish(replicas: &[&Replica], keys: Vec<DirectoryKey>) {
    let json = serde_json::to_string(&KeyDirectory {
        agency_id: "agency".into(),
        keys,
    })
    .unwrap();
    for r in replicas {
        r.store.set_key_directory(&json).unwrap();
    }
}

/// Every replica's key, published to all of them.
pub fn publish_all(replicas: &[&Replica]) {
    let keys = replicas.iter().map(|r| directory_key(r)).collect();
    publish(replicas, keys);
}

/// Copy every document of `from` into `to`.
pub fn push(from: &Replica, to: &Replica) {
    for id in from.store.document_ids().unwrap() {
        to.store
            .import(id, &from.store.export_changes(id).unwrap())
            .unwrap();
    }
}

pub fn sync(a: &Replica, b: &Replica) {
    push(a, b);
    push(b, a);
}

pub fn visit(patient: &str) -> VisitStart {
    VisitStart {
        agency_id: "agency".into(),
        patient_id: patient.into(),
        service_type: "skilled-nursing".into(),
        date: "2026-11-27".into(),
        location: "home".into(),
        started_at_ms: 1_764_230_400_000,
        start_monotonic_ms: 1,
    }
}
