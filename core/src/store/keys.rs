//! The device's signing key and its copy of the agency's key directory.
//!
//! The key pair is made on first use, inside a transaction, and never leaves the encrypted
//! file; the app hands the public key to the relay at enrollment. The directory is what the
//! relay publishes at `GET /v1/keys`; storing it lets the device verify signatures offline.

use std::sync::Arc;

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Durability, Inner, Store};
use crate::model::{self, DeviceKey, KeyDirectory};
use crate::{Error, Result};

/// The device key, made (and committed) on first use.
pub(crate) fn device_key(tx: &Transaction<'_>) -> Result<DeviceKey> {
    let secret: Option<Vec<u8>> = tx
        .prepare_cached("SELECT secret FROM device_key WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    if let Some(secret) = secret {
        let secret: [u8; 32] = secret
            .try_into()
            .map_err(|_| Error::Corrupt("device key is not 32 bytes".into()))?;
        return Ok(DeviceKey::from_secret(&secret));
    }
    let key = DeviceKey::generate();
    tx.prepare_cached(
        "INSERT INTO device_key (id, secret, public_key, created_at) VALUES (1, ?1, ?2, ?3)",
    )?
    .execute(params![
        key.secret().to_vec(),
        key.public_key().to_vec(),
        model::now_ms()
    ])?;
    Ok(key)
}

/// The stored key directory (empty before the first fetch).
pub(crate) fn load_directory(conn: &rusqlite::Connection) -> Result<KeyDirectory> {
    let json: Option<String> = conn
        .prepare_cached("SELECT json FROM key_directory WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    match json {
        Some(json) => KeyDirectory::parse(&json),
        None => Ok(KeyDirectory::default()),
    }
}

impl Inner {
    pub(crate) fn signing_key(&mut self) -> Result<DeviceKey> {
        self.write(Durability::PowerLoss, |tx, _| device_key(tx))
    }

    /// Re-derive every note's signed status and review items under the current key directory
    /// (a key may now be known, or revoked). One transaction; notes are loaded one at a time.
    pub(crate) fn reverify_notes(&mut self) -> Result<()> {
        let ids: Vec<crate::protocol::DocumentId> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT doc_id FROM documents WHERE kind = 'visit-note'")?;
            let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
            rows.map(|r| Ok(super::doc_id_from_sql(r?)?))
                .collect::<Result<_>>()?
        };
        let author = self.author.clone();
        for id in ids {
            self.ensure_loaded(id, &author)?;
            let keys = self.keys.clone();
            let now = model::now_ms();
            self.write(Durability::ProcessCrash, |tx, docs| {
                let loaded = docs.get_mut(&id).ok_or(Error::DocumentNotFound(id))?;
                loaded.rebuild_ledger(keys);
                tx.prepare_cached("DELETE FROM review_items WHERE doc_id = ?1")?
                    .execute([id.as_bytes()])?;
                super::documents::reindex(tx, id, loaded, now)
            })?;
        }
        Ok(())
    }
}

impl Store {
    /// This device's public signing key (32 bytes), made on first call. Send it to the relay
    /// when enrolling (`POST /v1/enroll`).
    pub fn device_public_key(&self) -> Result<[u8; 32]> {
        self.with(|inner| Ok(inner.signing_key()?.public_key()))
    }

    /// Replace the stored copy of the agency's device keys with the relay's `GET /v1/keys`
    /// answer. Signatures are re-verified against it: loaded documents are rebuilt and every
    /// note's review items and status re-derived.
    pub fn set_key_directory(&self, json: &str) -> Result<()> {
        let dir = KeyDirectory::parse(json)?;
        let now = model::now_ms();
        self.with(|inner| {
            inner.write(Durability::ProcessCrash, |tx, _| {
                tx.prepare_cached(
                    "INSERT INTO key_directory (id, json, fetched_at) VALUES (1, ?1, ?2)
                     ON CONFLICT (id) DO UPDATE SET json = excluded.json, fetched_at = excluded.fetched_at",
                )?
                .execute(params![json, now])?;
                Ok(())
            })?;
            inner.keys = Arc::new(dir);
            inner.reverify_notes()
        })
    }

    /// The stored copy of the agency's device keys.
    pub fn key_directory(&self) -> Result<KeyDirectory> {
        self.with(|inner| Ok((*inner.keys).clone()))
    }
}
