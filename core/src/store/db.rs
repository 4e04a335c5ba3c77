//! Opening the encrypted SQLite file: key, pragmas, and the schema migration ladder.
//!
//! One module opens SQLite so every connection gets the same settings. The store keeps exactly
//! one connection, which is also its only writer.

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::{Error, Result};

/// Schema migrations, in order; index + 1 is the `user_version` after applying it.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/001_initial.sql"),
    include_str!("../../migrations/002_sync.sql"),
    include_str!("../../migrations/003_sync_client.sql"),
    include_str!("../../migrations/004_signing.sql"),
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The store's page cache, KiB (SQLite's default is 2,000). Every page read from the file is
/// decrypted and its HMAC checked; document ids are random, so a first sync of thousands of
/// documents spreads its inserts over every page of the doc-keyed tables, and with the default
/// cache each batch re-read and re-decrypted most of them (a third of the first sync's CPU).
/// The cache grows only as pages are used, up to this.
pub const PAGE_CACHE_KIB: u32 = 16 * 1024;

/// A 256-bit database key. The native shell generates it once and keeps it in the Keychain /
/// Keystore; the core never stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    /// Wrap raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> StoreKey {
        StoreKey(bytes)
    }

    /// The raw key bytes (to derive subkeys).
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A new random key (for tests and first launch).
    pub fn random() -> StoreKey {
        StoreKey(rand::random())
    }

    /// SQLCipher's raw-key literal: `x'…'` skips its key derivation, which is right for a
    /// random 256-bit key (derivation only helps low-entropy passphrases).
    fn pragma_literal(&self) -> String {
        format!("\"x'{}'\"", hex::encode(self.0))
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

/// Map SQLite's open-time errors to ours: SQLCipher reports a wrong key as "file is not a
/// database", exactly like a file that is not SQLite at all; both leave the file untouched.
pub(crate) fn map_open_error(e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => Error::CannotDecrypt,
        Some(ErrorCode::DatabaseCorrupt) => Error::Corrupt(e.to_string()),
        _ => Error::Sqlite(e),
    }
}

/// Open (creating if missing) and migrate the database at `path`.
pub(crate) fn open(path: &Path, key: &StoreKey) -> Result<Connection> {
    // SQLCipher activates its crypto provider on the first keyed connection and tears it down
    // when the last one closes; keying while another thread closes was seen to fail ("An error
    // occurred with PRAGMA key") in parallel tests. So opening is serialised, and one keyed
    // in-memory connection stays open for the life of the process so the provider is never torn
    // down and re-created under a concurrent open. Opening is rare; this costs nothing noticeable.
    static KEYING: std::sync::Mutex<Option<Connection>> = std::sync::Mutex::new(None);
    let mut anchor = KEYING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if anchor.is_none() {
        let keep = Connection::open_in_memory()?;
        // A raw key: a passphrase would run SQLCipher's key derivation (about a second).
        keep.execute_batch(&format!(
            "PRAGMA cipher_log_level = NONE; PRAGMA key = {};",
            StoreKey([7; 32]).pragma_literal()
        ))?;
        keep.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })?;
        *anchor = Some(keep);
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Silence SQLCipher's own stderr logging of decrypt failures; we report them as errors.
    conn.execute_batch("PRAGMA cipher_log_level = NONE;")?;
    conn.execute_batch(&format!("PRAGMA key = {};", key.pragma_literal()))?;
    // The first read decrypts page 1: a wrong key or a foreign file fails here.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(map_open_error)?;
    drop(anchor);
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;
         PRAGMA secure_delete = ON;
         PRAGMA cache_size = -{PAGE_CACHE_KIB};"
    ))
    .map_err(map_open_error)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Bring the schema to [`SCHEMA_VERSION`], one numbered step at a time, each in its own
/// transaction. A database newer than this build is refused, untouched.
pub(crate) fn migrate(conn: &Connection) -> Result<()> {
    let found: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(map_open_error)?;
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i + 1;
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {version};"))?;
        tx.commit()?;
    }
    Ok(())
}

/// The lock file of a database: `<db>-lock`, next to it.
pub(crate) fn lock_path(db: &Path) -> std::path::PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-lock");
    std::path::PathBuf::from(p)
}

/// Take the store's exclusive OS advisory lock (`flock` on Unix, `LockFileEx` on Windows) on
/// `<db>-lock`, so one file is used by one `Store` at a time, across threads (each open is its
/// own open file description) and processes. The lock lives as long as the returned file and
/// the OS drops it when the process dies, so a killed app never leaves a stale lock.
/// [`Error::StoreInUse`] if another holder has it.
pub(crate) fn lock(db: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(lock_path(db))
        .map_err(|e| Error::Io(e.to_string()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::StoreInUse),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::Io(e.to_string())),
    }
}

/// Change the key of an open database.
pub(crate) fn rekey(conn: &Connection, key: &StoreKey) -> Result<()> {
    conn.execute_batch(&format!("PRAGMA rekey = {};", key.pragma_literal()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn schema(conn: &Connection) -> Vec<(String, String, Option<String>)> {
        let mut stmt = conn
            .prepare("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    fn open_at_version(path: &Path, key: &StoreKey, version: usize) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(&format!("PRAGMA key = {};", key.pragma_literal()))
            .unwrap();
        for (i, sql) in MIGRATIONS.iter().enumerate().take(version) {
            conn.execute_batch(sql).unwrap();
            conn.execute_batch(&format!("PRAGMA user_version = {};", i + 1))
                .unwrap();
        }
        conn
    }

    #[test]
    fn every_upgrade_path_ends_equal_to_a_fresh_schema() {
        let dir = tempfile::tempdir().unwrap();
        let key = StoreKey::random();
        let fresh = open(&dir.path().join("fresh.db"), &key).unwrap();
        let expected = schema(&fresh);
        assert!(!expected.is_empty());
        for start in 0..MIGRATIONS.len() {
            let path = dir.path().join(format!("from-{start}.db"));
            let old = open_at_version(&path, &key, start);
            if start >= 1 {
                // Data written under the old schema survives the upgrade.
                old.execute(
                    "INSERT INTO audit_log (at, user_id, device_id, action) VALUES (1, 'u', 'd', 'chart-opened')",
                    [],
                )
                .unwrap();
            }
            drop(old);
            let upgraded = open(&path, &key).unwrap();
            assert_eq!(schema(&upgraded), expected, "upgrade from version {start}");
            let v: u32 = upgraded
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, SCHEMA_VERSION);
            if start >= 1 {
                let n: i64 = upgraded
                    .query_row("SELECT count(*) FROM audit_log", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(n, 1);
            }
        }
    }

    #[test]
    fn concurrent_opens_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|scope| {
            for t in 0..16 {
                let path = dir.path().join(format!("{t}.db"));
                scope.spawn(move || {
                    for _ in 0..10 {
                        match open(&path, &StoreKey::random()) {
                            // A different random key on an existing file is expected to fail.
                            Ok(_) | Err(Error::CannotDecrypt) => {}
                            Err(other) => panic!("open failed: {other}"),
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        let key = StoreKey::random();
        drop(open(&path, &key).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!("PRAGMA key = {};", key.pragma_literal()))
                .unwrap();
            conn.execute_batch(&format!("PRAGMA user_version = {};", SCHEMA_VERSION + 1))
                .unwrap();
        }
        let err = open(&path, &key).unwrap_err();
        assert!(
            matches!(err, Error::SchemaTooNew { found, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );
    }

    #[test]
    fn wrong_key_and_garbage_are_clear_errors_and_files_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        drop(open(&path, &StoreKey::random()).unwrap());
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(
            open(&path, &StoreKey::random()),
            Err(Error::CannotDecrypt)
        ));
        assert_eq!(std::fs::read(&path).unwrap(), before);

        let garbage = dir.path().join("garbage.db");
        let bytes: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&garbage, &bytes).unwrap();
        assert!(matches!(
            open(&garbage, &StoreKey::random()),
            Err(Error::CannotDecrypt)
        ));
        assert_eq!(
            std::fs::read(&garbage).unwrap(),
            bytes,
            "a corrupt file is never deleted or rewritten"
        );
    }
}
