//! Fault injection for tests of disk trouble: cap the database at its current size, as a full
//! disk does. SQLite then fails every write that needs a new page with `SQLITE_FULL`
//! ("database or disk is full") — the same error, through the same code paths, as a real full
//! disk; each failed write rolls back whole, so nothing acknowledged is lost.

use super::Store;
use crate::Result;

impl Store {
    /// Fault injection (tests): `true` caps the database file at the pages it has now (writes
    /// that need more fail with "database or disk is full"); `false` lifts the cap (the disk
    /// has room again). Returns the page cap now in force.
    pub fn simulate_full_disk(&self, full: bool) -> Result<i64> {
        self.with(|inner| {
            let pages: i64 = if full {
                inner
                    .conn
                    .query_row("PRAGMA page_count", [], |r| r.get(0))?
            } else {
                // SQLite's default maximum.
                0xffff_fffe
            };
            let set: i64 =
                inner
                    .conn
                    .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                        r.get(0)
                    })?;
            Ok(set)
        })
    }
}
