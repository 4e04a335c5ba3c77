//! Group commit: every write of the SQLite backend goes through one writer thread, which
//! commits all the writes waiting at the same moment in one transaction (one WAL fsync).
//!
//! # Why it is as durable as one transaction per write
//! A caller's future resolves only after the `COMMIT` of the transaction holding its write has
//! returned (with `synchronous=FULL`, after the WAL is fsynced). Nothing is acknowledged
//! earlier: a crash before that commit loses writes nobody was told about.
//!
//! # Isolation of one write's failure
//! Each write runs inside its own `SAVEPOINT`. A write whose closure fails (a conflict, a
//! missing row, a panic) is rolled back to its savepoint and gets its own error; the others in
//! the group are unaffected. If the group's `COMMIT` (or anything outside one write's
//! savepoint) fails, nothing of the group is stored and *every* write in it fails.
//!
//! # Ordering and bounds
//! Writes are applied in the order they were queued, so a caller that awaited one write before
//! queueing the next sees them committed in that order. A group holds at most [`MAX_GROUP`]
//! writes. The queue is unbounded, but every queued write belongs to a caller awaiting it, so
//! its length is bounded by the number of concurrent callers (sessions, the audit writer).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::thread::{self, JoinHandle, ThreadId};

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Most writes committed in one transaction.
pub(super) const MAX_GROUP: usize = 512;

/// One queued write: runs in the group's transaction, then learns whether the group committed.
trait Pending: Send {
    /// Run the write (inside its savepoint). `false`: it failed and must be rolled back.
    fn apply(&mut self, tx: &Transaction<'_>) -> bool;
    /// Deliver the outcome: the write's own error, or `committed`'s.
    fn finish(self: Box<Self>, committed: std::result::Result<(), &str>);
}

struct Job<T, F> {
    work: Option<F>,
    out: Option<Result<T>>,
    done: oneshot::Sender<Result<T>>,
}

impl<T, F> Pending for Job<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
{
    fn apply(&mut self, tx: &Transaction<'_>) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let out = catch_unwind(AssertUnwindSafe(|| work(tx))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(Error::Storage(format!("write panicked: {what}")))
        });
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, committed: std::result::Result<(), &str>) {
        let result = match (self.out, committed) {
            (Some(Err(own)), _) => Err(own),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)), Err(why)) | (None, Err(why)) => Err(Error::Storage(format!(
                "group commit failed, nothing of this write was stored: {why}"
            ))),
            (None, Ok(())) => Err(Error::Storage(
                "write was not run (internal error of the group commit)".into(),
            )),
        };
        // The caller may have stopped waiting (a dropped future); the write stands regardless.
        let _ = self.done.send(result);
    }
}

/// The handle to the writer thread. Dropping it lets the thread finish the queued writes, close
/// the connection and exit, and waits for that (so the file is closed when the storage is).
pub(super) struct GroupWriter {
    queue: Option<mpsc::Sender<Box<dyn Pending>>>,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

impl GroupWriter {
    /// Start the writer thread on `conn`.
    pub(super) fn start(conn: Connection) -> Result<GroupWriter> {
        let (queue, rx) = mpsc::channel::<Box<dyn Pending>>();
        let thread = thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, &rx))?;
        Ok(GroupWriter {
            queue: Some(queue),
            thread_id: thread.thread().id(),
            thread: Some(thread),
        })
    }

    /// Queue `work` now; the returned receiver yields its outcome after the commit.
    pub(super) fn submit<T, F>(&self, work: F) -> oneshot::Receiver<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job = Box::new(Job {
            work: Some(work),
            out: None,
            done,
        });
        if let Some(queue) = &self.queue {
            // A send fails only if the thread is gone; the job (and its `done`) is dropped and
            // the receiver reports that.
            let _ = queue.send(job);
        }
        result
    }
}

impl Drop for GroupWriter {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            // A write closure can hold the last handle to the storage; the writer thread cannot
            // wait for itself.
            if thread::current().id() != self.thread_id {
                let _ = thread.join();
            }
        }
    }
}

fn run(mut conn: Connection, rx: &mpsc::Receiver<Box<dyn Pending>>) {
    let mut group: Vec<Box<dyn Pending>> = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        metrics::counter!(crate::metrics::GROUP_COMMITS).increment(1);
        metrics::counter!(crate::metrics::GROUP_COMMIT_WRITES).increment(group.len() as u64);
        let committed = commit_group(&mut conn, &mut group).map_err(|e| e.to_string());
        if let Err(e) = &committed {
            tracing::error!(writes = group.len(), error = %e, "group commit failed; every write in it failed");
        }
        for job in group.drain(..) {
            job.finish(committed.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }
}

/// Apply every write of `group`, each in its own savepoint, and commit them together.
fn commit_group(conn: &mut Connection, group: &mut [Box<dyn Pending>]) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for job in group.iter_mut() {
        tx.execute_batch("SAVEPOINT one_write")?;
        if job.apply(&tx) {
            tx.execute_batch("RELEASE one_write")?;
        } else {
            // Fails (failing the group) if SQLite already rolled the whole transaction back,
            // as it does after some I/O errors: then nothing before this write stands either.
            tx.execute_batch("ROLLBACK TO one_write; RELEASE one_write")?;
        }
        if tx.is_autocommit() {
            return Err(Error::Storage(
                "the group's transaction was rolled back by SQLite".into(),
            ));
        }
    }
    tx.commit()?;
    Ok(())
}
