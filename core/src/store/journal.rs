//! The keystroke journal: how a typed character is durable when its call returns without a
//! SQLite transaction per keystroke.
//!
//! A text splice is the edit a person makes several times a second. Committing a SQLite
//! transaction for each (WAL frame, page encryption and HMAC, locks) costs several times the
//! automerge edit itself, and even encoding the new change costs a third of it. Instead each
//! splice appends one record — the edit itself: document, Text object, position, deleted
//! length, inserted text, plus the actor, time and dependencies of the change it made and that
//! change's hash — with a single `write(2)` before the call returns. Once `write` has returned,
//! killing the process cannot lose the record (the kernel has it). The changes are committed to
//! SQLite (one chunk per document) inside the next SQLite transaction: any other edit, a sync,
//! every [`FOLD_AFTER_RECORDS`] records, before a document leaves the cache, on close.
//!
//! At open, leftover records are replayed: the same splice by the same actor on the same
//! dependencies with the same time and message makes automerge produce the identical change,
//! and the recorded hash is checked. Records whose change is already stored (a fold committed
//! but the journal was not yet emptied) are skipped by hash, so replay is idempotent. If the
//! document moved on since (it cannot in normal operation), the edit is re-made on a fork at
//! the recorded dependencies and merged, so it still lands exactly where it was typed.
//!
//! Records are sealed with XChaCha20-Poly1305 (random 192-bit nonces) under a key derived from
//! the store key, so the journal holds no plaintext, and a torn or altered record is detected
//! rather than trusted. Records are encoded as CBOR with `minicbor`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

use super::StoreKey;
use crate::protocol::DocumentId;
use crate::{Error, Result};

/// Fold the journal into SQLite after this many records. Bounds the memory held for the fold,
/// the work at the next open, and how many keystrokes are protected against a process kill but
/// not yet by SQLite's own guarantees.
pub const FOLD_AFTER_RECORDS: usize = 1024;

/// Largest record accepted when reading back (a long paste fits easily).
const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

const NONCE_BYTES: usize = 24;

/// One journaled splice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JournalRecord {
    /// The document.
    pub doc: DocumentId,
    /// The Text object (its `ObjId` display form).
    pub obj: String,
    /// Position and deleted length, UTF-16 code units.
    pub pos: u64,
    pub delete: u64,
    /// Inserted text.
    pub insert: String,
    /// The actor that made the change.
    pub actor: Vec<u8>,
    /// The change's time, ms since the epoch (committed as seconds).
    pub time_ms: i64,
    /// The heads the change was made on.
    pub deps: Vec<[u8; 32]>,
    /// The change's hash.
    pub hash: [u8; 32],
}

impl JournalRecord {
    fn encode(&self) -> Vec<u8> {
        let mut e = minicbor::Encoder::new(Vec::with_capacity(96 + self.insert.len()));
        // Writing to a Vec cannot fail.
        let _ = (|| -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
            e.array(9)?
                .bytes(self.doc.as_bytes())?
                .str(&self.obj)?
                .u64(self.pos)?
                .u64(self.delete)?
                .str(&self.insert)?
                .bytes(&self.actor)?
                .i64(self.time_ms)?
                .array(self.deps.len() as u64)?;
            for d in &self.deps {
                e.bytes(d)?;
            }
            e.bytes(&self.hash)?;
            Ok(())
        })();
        e.into_writer()
    }

    fn decode(bytes: &[u8]) -> Option<JournalRecord> {
        let mut d = minicbor::Decoder::new(bytes);
        if d.array().ok()? != Some(9) {
            return None;
        }
        let doc: [u8; 16] = d.bytes().ok()?.try_into().ok()?;
        let obj = d.str().ok()?.to_owned();
        let pos = d.u64().ok()?;
        let delete = d.u64().ok()?;
        let insert = d.str().ok()?.to_owned();
        let actor = d.bytes().ok()?.to_vec();
        let time_ms = d.i64().ok()?;
        let n = d.array().ok()??;
        if n > 1024 {
            return None;
        }
        let deps = (0..n)
            .map(|_| d.bytes().ok()?.try_into().ok())
            .collect::<Option<Vec<[u8; 32]>>>()?;
        let hash: [u8; 32] = d.bytes().ok()?.try_into().ok()?;
        (d.position() == bytes.len()).then_some(JournalRecord {
            doc: DocumentId::from_bytes(doc),
            obj,
            pos,
            delete,
            insert,
            actor,
            time_ms,
            deps,
            hash,
        })
    }
}

/// The open journal file.
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    cipher: XChaCha20Poly1305,
    /// Records appended since the journal was last emptied.
    pub records: usize,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("records", &self.records)
            .finish()
    }
}

/// The journal path of a database.
pub(crate) fn path_for(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-keystrokes");
    PathBuf::from(p)
}

fn io(e: std::io::Error) -> Error {
    Error::Io(e.to_string())
}

impl Journal {
    /// Open (creating) the journal of database `db` and return the records it holds, in order.
    /// Reading stops at the first record that does not decrypt; if bytes follow it, the file is
    /// kept aside (renamed, never deleted) and a fresh journal is started.
    pub fn open(db: &Path, key: &StoreKey) -> Result<(Journal, Vec<JournalRecord>)> {
        let path = path_for(db);
        let cipher = cipher_for(key);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let (records, clean) = decode_all(&cipher, &bytes);
        if !clean {
            let aside = path.with_extension(format!("damaged-{}", crate::model::now_ms()));
            std::fs::rename(&path, &aside).map_err(io)?;
            tracing::error!(file = %aside.display(), kept = records.len(), "keystroke journal has an unreadable tail; file kept aside");
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok((
            Journal {
                path,
                file,
                cipher,
                records: 0,
            },
            records,
        ))
    }

    /// Append one record with a single `write`; returns once the kernel has it.
    pub fn append(&mut self, record: &JournalRecord) -> Result<()> {
        let plain = record.encode();
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), plain.as_slice())
            .map_err(|_| Error::Io("journal encryption failed".into()))?;
        let len = u32::try_from(NONCE_BYTES + sealed.len())
            .map_err(|_| Error::InvalidInput("edit too large".into()))?;
        let mut frame = Vec::with_capacity(4 + len as usize);
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&nonce);
        frame.extend_from_slice(&sealed);
        self.file.write_all(&frame).map_err(io)?;
        self.records += 1;
        Ok(())
    }

    /// The records currently in the journal file (to recover one document in-session).
    pub fn records_on_disk(&self) -> Vec<JournalRecord> {
        std::fs::read(&self.path)
            .map(|bytes| decode_all(&self.cipher, &bytes).0)
            .unwrap_or_default()
    }

    /// Bytes in the journal file (0: nothing pending).
    pub fn bytes_on_disk(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(io)?.len())
    }

    /// Seal later records under a key derived from `key` (after the store was re-keyed; the
    /// caller has emptied the journal first, so no record is under the old key).
    pub fn rekey(&mut self, key: &StoreKey) {
        self.cipher = cipher_for(key);
    }

    /// Empty the journal once its records are committed to SQLite.
    pub fn clear(&mut self) -> Result<()> {
        self.file.set_len(0).map_err(io)?;
        self.records = 0;
        Ok(())
    }
}

/// The journal's cipher, with a key derived from the store key.
fn cipher_for(key: &StoreKey) -> XChaCha20Poly1305 {
    let mut h = Sha256::new();
    h.update(b"fieldchart keystroke journal v1");
    h.update(key.as_bytes());
    XChaCha20Poly1305::new(&h.finalize())
}

/// Decode every record; `false` if bytes follow the last good record.
fn decode_all(cipher: &XChaCha20Poly1305, mut bytes: &[u8]) -> (Vec<JournalRecord>, bool) {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        match decode_one(cipher, bytes) {
            Some((record, used)) => {
                out.push(record);
                bytes = &bytes[used..];
            }
            None => return (out, false),
        }
    }
    (out, true)
}

fn decode_one(cipher: &XChaCha20Poly1305, bytes: &[u8]) -> Option<(JournalRecord, usize)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    if !(NONCE_BYTES + 16..=MAX_RECORD_BYTES).contains(&len) {
        // 16: the Poly1305 tag, the least any sealed record holds.
        return None;
    }
    let frame = bytes.get(4..4 + len)?;
    let (nonce, sealed) = frame.split_at(NONCE_BYTES);
    let plain = cipher.decrypt(XNonce::from_slice(nonce), sealed).ok()?;
    Some((JournalRecord::decode(&plain)?, 4 + len))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(i: u8) -> JournalRecord {
        JournalRecord {
            doc: DocumentId::from_bytes([i; 16]),
            obj: "2@abcdef".into(),
            pos: u64::from(i),
            delete: 1,
            insert: format!("change {i} 😀"),
            actor: vec![i; 16],
            time_ms: 1_700_000_000_000,
            deps: vec![[i; 32], [7; 32]],
            hash: [i; 32],
        }
    }

    #[test]
    fn records_round_trip_and_hold_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("d.db");
        let key = StoreKey::random();
        let (mut j, old) = Journal::open(&db, &key).unwrap();
        assert!(old.is_empty());
        for i in 0..10 {
            j.append(&rec(i)).unwrap();
        }
        drop(j);
        let raw = std::fs::read(path_for(&db)).unwrap();
        assert!(
            !raw.windows(6).any(|w| w == b"change"),
            "plaintext in the journal"
        );
        let (mut j, got) = Journal::open(&db, &key).unwrap();
        assert_eq!(got, (0..10).map(rec).collect::<Vec<_>>());
        j.clear().unwrap();
        assert!(Journal::open(&db, &key).unwrap().1.is_empty());
    }

    #[test]
    fn truncated_garbage_and_foreign_journals_are_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("d.db");
        let key = StoreKey::random();
        let (mut j, _) = Journal::open(&db, &key).unwrap();
        for i in 1..=2 {
            j.append(&rec(i)).unwrap();
        }
        drop(j);
        let full = std::fs::read(path_for(&db)).unwrap();
        // Cut at every length: only whole records before the cut come back.
        for cut in 0..full.len() {
            std::fs::write(path_for(&db), &full[..cut]).unwrap();
            let (_, got) = Journal::open(&db, &key).unwrap();
            assert_eq!(got, (1..=got.len() as u8).map(rec).collect::<Vec<_>>());
        }
        // Garbage, an absurd length, and a journal sealed under another key read as nothing.
        for bad in [vec![0xffu8; 64], vec![0, 0, 0, 0x7f, 1, 2, 3], full.clone()] {
            std::fs::write(path_for(&db), &bad).unwrap();
            let other = if bad == full {
                StoreKey::random()
            } else {
                key.clone()
            };
            let (_, got) = Journal::open(&db, &other).unwrap();
            assert!(got.is_empty());
        }
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("damaged")
            })
            .count();
        assert!(kept >= 3, "unreadable journals are kept aside, not deleted");
    }
}
