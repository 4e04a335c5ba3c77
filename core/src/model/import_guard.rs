//! A cheap structural check of untrusted automerge bytes before automerge sees them.
//!
//! automerge 0.12 trusts some counts it reads from its input. The one `fuzz/` found: a bundle
//! chunk (chunk type 3) whose delta-encoded counter column starts with the run header
//! `ff ff ff ff 04` — "repeat the next value 1,342,177,279 times" — in 33 bytes. automerge's
//! `extract_id_ctr_values` (`storage/bundle/storage.rs`) expands that column eagerly
//! (`DeltaDecoder::collect::<Vec<i64>>`), asks for ~10 GiB, and the process aborts: an
//! allocation failure does not unwind, so `catch_unwind` cannot contain it. The same shape
//! reaches `change_graph.rs` (`max_op`/`seq` columns of a document chunk, collected eagerly),
//! deflated columns are inflated without a limit (a deflate bomb inflates ~1000:1), and a sync
//! message's Bloom filter declares its probe count (`Vec::with_capacity(num_probes)` per hash
//! checked, up to 2³² − 1).
//!
//! This module walks the same structure automerge parses — chunk headers, the prefixes of
//! document, change, compressed-change and bundle chunks, column metadata, and every run of
//! every run-length, delta and boolean column (after inflating deflated ones, with a budget) —
//! and refuses, with the byte offset and a reason:
//! - a length or count larger than what the remaining bytes can encode (a chunk, column, hash
//!   list, actor or string that would run past the end);
//! - more than [`Limits::max_rows`] rows declared by the columns of one input (runs of
//!   repeated values are summed without being expanded, so the walk costs O(input));
//! - more than [`Limits::max_inflated_bytes`] of inflated column data in one input;
//! - a Bloom filter with more than [`Limits::max_bloom_probes`] probes, or with entries but no
//!   bits (automerge would divide by zero).
//!
//! It does not verify checksums, hashes or semantics: automerge still does that. It only
//! guarantees that what reaches automerge cannot make it allocate much more than the input
//! (see the limits). Every document, change, compressed change, bundle and sync message
//! automerge itself produces passes (property test below).

use std::io::Read;

/// The first bytes of every automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// The first byte of a sync message (v1 and v2).
const SYNC_MESSAGE_TYPES: [u8; 2] = [0x42, 0x43];
/// A change hash, in bytes.
const HASH_BYTES: u64 = 32;
/// Column type of raw values (column type bits `111`): bytes, not runs.
const RAW_VALUE_COLUMN: u32 = 7;
/// Column type of boolean columns: alternating run lengths.
const BOOLEAN_COLUMN: u32 = 4;
/// Column type of string columns: runs of length-prefixed UTF-8.
const STRING_COLUMN: u32 = 5;
/// The deflate bit of a column specification.
const DEFLATE_BIT: u32 = 0b1000;

/// What one input may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rows (operations, changes, predecessors…) the columns of one input may declare in
    /// total, summed over chunks (each chunk counts its longest column). automerge holds a few
    /// dozen bytes per row and expands some columns into `Vec<i64>`.
    pub max_rows: u64,
    /// Bytes the deflated columns and compressed changes of one input may inflate to, in total.
    pub max_inflated_bytes: u64,
    /// Probes a sync message's Bloom filter may ask for per hash (automerge writes 7).
    pub max_bloom_probes: u32,
}

impl Limits {
    /// The limits the device and the relay apply: 8 Mi rows (a visit note is thousands of
    /// operations; the relay's 16 MiB frame holds at most ~16 M inserted characters, and a
    /// document past the relay's per-document quota is refused anyway), 64 MiB inflated, and
    /// 32 probes.
    pub const DEFAULT: Self = Self {
        max_rows: 1 << 23,
        max_inflated_bytes: 64 << 20,
        max_bloom_probes: 32,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why untrusted bytes were refused before automerge saw them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("automerge data refused at byte {offset}: {reason}")]
pub struct Refused {
    /// Offset in the input (for data inside a deflated column: where that column starts).
    pub offset: usize,
    /// What was wrong, in words.
    pub reason: String,
}

type Result<T> = std::result::Result<T, Refused>;

/// Checks a concatenation of automerge chunks (a saved document, `save_after` output, change
/// bytes, bundles) as passed to `Automerge::load` or `load_incremental`. Empty input passes
/// (automerge loads it as an empty document; callers that need content check that).
pub fn check_chunks(bytes: &[u8]) -> Result<()> {
    check_chunks_with(bytes, &Limits::DEFAULT)
}

/// [`check_chunks`] with explicit limits.
pub fn check_chunks_with(bytes: &[u8], limits: &Limits) -> Result<()> {
    let mut budget = Budget::new(limits);
    chunks(&mut Reader::new(bytes, 0), &mut budget)
}

/// Checks an automerge sync message (what `automerge::sync::Message::decode` reads), including
/// every change it carries, against the limits of one input.
pub fn check_sync_message(bytes: &[u8]) -> Result<()> {
    check_sync_message_with(bytes, &Limits::DEFAULT)
}

/// [`check_sync_message`] with explicit limits.
pub fn check_sync_message_with(bytes: &[u8], limits: &Limits) -> Result<()> {
    let mut budget = Budget::new(limits);
    let mut r = Reader::new(bytes, 0);
    let version = r.take(1, "the message type")?[0];
    if !SYNC_MESSAGE_TYPES.contains(&version) {
        return Err(r.refuse(format!("{version:#04x} is not a sync message type")));
    }
    hashes(&mut r, "heads")?;
    hashes(&mut r, "need")?;
    let haves = r.count(1, "have entries")?;
    for _ in 0..haves {
        hashes(&mut r, "last-sync heads")?;
        let len = r.uleb("the Bloom filter length")?;
        let at = r.offset();
        let filter = r.take(len, "the Bloom filter")?;
        bloom(&mut Reader::new(filter, at), limits)?;
    }
    let changes = r.count(1, "changes")?;
    for _ in 0..changes {
        let len = r.uleb("a change's length")?;
        let at = r.offset();
        let change = r.take(len, "a change")?;
        chunks(&mut Reader::new(change, at), &mut budget)?;
    }
    if !r.is_empty() {
        let len = r.uleb("the flags' length")?;
        r.take(len, "the flags")?;
    }
    Ok(())
}

struct Budget<'l> {
    limits: &'l Limits,
    rows: u64,
    inflated: u64,
}

impl<'l> Budget<'l> {
    fn new(limits: &'l Limits) -> Self {
        Self {
            limits,
            rows: 0,
            inflated: 0,
        }
    }

    fn rows_left(&self) -> u64 {
        self.limits.max_rows.saturating_sub(self.rows)
    }
}

/// A cursor over bytes that knows its offset in the whole input.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], base: usize) -> Self {
        Self {
            bytes,
            pos: 0,
            base,
        }
    }

    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn refuse(&self, reason: String) -> Refused {
        Refused {
            offset: self.offset(),
            reason,
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.refuse(format!(
                "{what} declares {n} bytes, only {} follow",
                self.remaining()
            )));
        }
        // n <= remaining, which is a usize.
        let n = usize::try_from(n).map_err(|_| self.refuse(format!("{what} is too long")))?;
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// An unsigned LEB128 number of at most 64 bits.
    fn uleb(&mut self, what: &str) -> Result<u64> {
        let start = self.offset();
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return Err(Refused {
                    offset: start,
                    reason: format!("{what}: the input ends inside a number"),
                });
            };
            self.pos += 1;
            let low = u64::from(byte & 0x7f);
            if shift == 63 && low > 1 {
                break;
            }
            value |= low << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Refused {
            offset: start,
            reason: format!("{what}: a number longer than 64 bits"),
        })
    }

    /// A signed LEB128 number of at most 64 bits.
    fn sleb(&mut self, what: &str) -> Result<i64> {
        let start = self.offset();
        let mut value: i64 = 0;
        for shift in (0..70).step_by(7) {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return Err(Refused {
                    offset: start,
                    reason: format!("{what}: the input ends inside a number"),
                });
            };
            self.pos += 1;
            if shift == 63 && byte != 0x00 && byte != 0x7f {
                break;
            }
            value |= i64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if shift < 57 && byte & 0x40 != 0 {
                    value |= -1_i64 << (shift + 7);
                }
                return Ok(value);
            }
        }
        Err(Refused {
            offset: start,
            reason: format!("{what}: a number longer than 64 bits"),
        })
    }

    /// A count of items each at least `min_bytes` long: refused if the rest cannot hold them.
    fn count(&mut self, min_bytes: u64, what: &str) -> Result<u64> {
        let start = self.offset();
        let n = self.uleb(what)?;
        if n.saturating_mul(min_bytes) > self.remaining() {
            return Err(Refused {
                offset: start,
                reason: format!(
                    "{n} {what} declared, but only {} bytes follow",
                    self.remaining()
                ),
            });
        }
        Ok(n)
    }

    fn length_prefixed(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.uleb(what)?;
        self.take(len, what)
    }
}

fn hashes(r: &mut Reader<'_>, what: &str) -> Result<()> {
    let n = r.count(HASH_BYTES, what)?;
    r.take(n * HASH_BYTES, what)?;
    Ok(())
}

fn actors(r: &mut Reader<'_>) -> Result<()> {
    let n = r.count(1, "actors")?;
    for _ in 0..n {
        r.length_prefixed("an actor id")?;
    }
    Ok(())
}

fn bloom(r: &mut Reader<'_>, limits: &Limits) -> Result<()> {
    if r.is_empty() {
        return Ok(());
    }
    let entries = u32_field(r, "the Bloom filter's entries")?;
    let bits_per_entry = u32_field(r, "the Bloom filter's bits per entry")?;
    let probes = u32_field(r, "the Bloom filter's probes")?;
    if probes > limits.max_bloom_probes {
        return Err(r.refuse(format!(
            "a Bloom filter with {probes} probes (at most {})",
            limits.max_bloom_probes
        )));
    }
    let bits = (u64::from(entries) * u64::from(bits_per_entry)).div_ceil(8);
    if entries > 0 && bits == 0 {
        return Err(r.refuse("a Bloom filter with entries but no bits".into()));
    }
    r.take(bits, "the Bloom filter's bits")?;
    Ok(())
}

fn u32_field(r: &mut Reader<'_>, what: &str) -> Result<u32> {
    let at = r.offset();
    let v = r.uleb(what)?;
    u32::try_from(v).map_err(|_| Refused {
        offset: at,
        reason: format!("{what}: {v} does not fit 32 bits"),
    })
}

fn chunks(r: &mut Reader<'_>, budget: &mut Budget<'_>) -> Result<()> {
    while !r.is_empty() {
        chunk(r, budget)?;
    }
    Ok(())
}

fn chunk(r: &mut Reader<'_>, budget: &mut Budget<'_>) -> Result<()> {
    let start = r.offset();
    if r.take(4, "the chunk's magic bytes")? != MAGIC {
        return Err(Refused {
            offset: start,
            reason: "not an automerge chunk (wrong magic bytes)".into(),
        });
    }
    r.take(4, "the chunk's checksum")?;
    let kind = r.take(1, "the chunk type")?[0];
    let len = r.uleb("the chunk length")?;
    let at = r.offset();
    let body = r.take(len, "the chunk")?;
    let mut body = Reader::new(body, at);
    match kind {
        0 => document(&mut body, budget),
        1 => change(&mut body, budget),
        2 => {
            let inflated = inflate(&body, body.bytes, budget, "a compressed change")?;
            change(&mut Reader::new(&inflated, at), budget)
        }
        3 => bundle(&mut body, budget),
        other => Err(Refused {
            offset: start + 8,
            reason: format!("unknown chunk type {other}"),
        }),
    }
}

/// Document chunk: actors, heads, change and op column metadata, their data, head indexes.
fn document(r: &mut Reader<'_>, budget: &mut Budget<'_>) -> Result<()> {
    actors(r)?;
    hashes(r, "heads")?;
    let change_meta = columns(r)?;
    let op_meta = columns(r)?;
    let mut rows = column_data(r, &change_meta, budget)?;
    rows = rows.max(column_data(r, &op_meta, budget)?);
    charge(r, rows, budget)
}

/// Change chunk: dependencies, actor, seq, start op, time, message, other actors, op columns.
fn change(r: &mut Reader<'_>, budget: &mut Budget<'_>) -> Result<()> {
    hashes(r, "dependencies")?;
    r.length_prefixed("the actor id")?;
    r.uleb("the sequence number")?;
    r.uleb("the start op")?;
    r.sleb("the timestamp")?;
    r.length_prefixed("the message")?;
    actors(r)?;
    let op_meta = columns(r)?;
    let rows = column_data(r, &op_meta, budget)?;
    charge(r, rows, budget)
}

/// Bundle chunk: dependencies, actors, change columns and their data, op columns and theirs.
fn bundle(r: &mut Reader<'_>, budget: &mut Budget<'_>) -> Result<()> {
    hashes(r, "dependencies")?;
    actors(r)?;
    let change_meta = columns(r)?;
    let mut rows = column_data(r, &change_meta, budget)?;
    let op_meta = columns(r)?;
    rows = rows.max(column_data(r, &op_meta, budget)?);
    charge(r, rows, budget)
}

fn charge(r: &Reader<'_>, rows: u64, budget: &mut Budget<'_>) -> Result<()> {
    if rows > budget.rows_left() {
        return Err(r.refuse(format!(
            "the columns declare more than {} rows",
            budget.limits.max_rows
        )));
    }
    budget.rows += rows;
    Ok(())
}

/// Column metadata: `(specification, data length)` pairs.
fn columns(r: &mut Reader<'_>) -> Result<Vec<(u32, u64)>> {
    let n = r.count(2, "columns")?;
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        let spec = u32_field(r, "a column specification")?;
        let len = r.uleb("a column length")?;
        out.push((spec, len));
    }
    Ok(out)
}

/// Takes the data of `meta`'s columns and walks each; the longest column's row count.
fn column_data(r: &mut Reader<'_>, meta: &[(u32, u64)], budget: &mut Budget<'_>) -> Result<u64> {
    let mut rows = 0;
    for &(spec, len) in meta {
        let at = r.offset();
        let data = r.take(len, "a column")?;
        let column = Reader::new(data, at);
        let n = if spec & DEFLATE_BIT != 0 {
            let inflated = inflate(&column, data, budget, "a deflated column")?;
            walk_column(&mut Reader::new(&inflated, at), spec, budget)?
        } else {
            walk_column(&mut Reader::new(data, at), spec, budget)?
        };
        rows = rows.max(n);
    }
    Ok(rows)
}

/// Inflates raw deflate data within what is left of the budget.
fn inflate(r: &Reader<'_>, data: &[u8], budget: &mut Budget<'_>, what: &str) -> Result<Vec<u8>> {
    let left = budget
        .limits
        .max_inflated_bytes
        .saturating_sub(budget.inflated);
    let mut out = Vec::new();
    flate2::bufread::DeflateDecoder::new(data)
        .take(left.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| r.refuse(format!("{what} does not inflate: {e}")))?;
    let n = out.len() as u64;
    if n > left {
        return Err(r.refuse(format!(
            "{what} inflates past {} bytes",
            budget.limits.max_inflated_bytes
        )));
    }
    budget.inflated += n;
    Ok(out)
}

/// Walks one column's runs without expanding them; its row count.
fn walk_column(r: &mut Reader<'_>, spec: u32, budget: &Budget<'_>) -> Result<u64> {
    let kind = spec & 0b111;
    if kind == RAW_VALUE_COLUMN {
        return Ok(0);
    }
    let limit = budget.rows_left();
    let mut rows: u64 = 0;
    while !r.is_empty() {
        let at = r.offset();
        let run = if kind == BOOLEAN_COLUMN {
            r.uleb("a boolean run")?
        } else {
            let count = r.sleb("a run length")?;
            if count > 0 {
                value(r, kind)?;
                count.unsigned_abs()
            } else if count < 0 {
                let n = count.unsigned_abs();
                if n > r.remaining() {
                    return Err(r.refuse(format!(
                        "a literal run of {n} values, only {} bytes follow",
                        r.remaining()
                    )));
                }
                for _ in 0..n {
                    value(r, kind)?;
                }
                n
            } else {
                r.uleb("a null run")?
            }
        };
        rows = rows.saturating_add(run);
        if rows > limit {
            return Err(Refused {
                offset: at,
                reason: format!(
                    "a column declares more than {} rows (a run of {run})",
                    budget.limits.max_rows
                ),
            });
        }
    }
    Ok(rows)
}

fn value(r: &mut Reader<'_>, kind: u32) -> Result<()> {
    if kind == STRING_COLUMN {
        r.length_prefixed("a string value")?;
    } else {
        r.uleb("a value")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, AutoCommit, ObjType, ROOT, ReadDoc};
    use proptest::prelude::*;

    /// `fuzz/findings/document_import/oom-df67b51d…`: automerge 0.12 aborts on it (~10 GiB).
    const BUNDLE_RUN_OOM: [u8; 32] = [
        0x85, 0x6f, 0x4a, 0x83, 0xb8, 0x00, 0x00, 0x00, 0x03, 0x10, 0x00, 0x00, 0x02, 0x00, 0x00,
        0x23, 0x07, 0xff, 0xff, 0xff, 0xff, 0x04, 0x04, 0xf3, 0xcf, 0x60, 0xff, 0xff, 0xff, 0x45,
        0xff, 0xff,
    ];

    #[test]
    fn the_fuzzed_bundle_run_is_refused_by_its_row_count() {
        let refused = check_chunks(&BUNDLE_RUN_OOM).expect_err("refused");
        assert!(refused.reason.contains("rows"), "{refused}");
        assert_eq!(
            refused.offset, 17,
            "the run header starts the counter column"
        );
    }

    #[test]
    fn sync_messages_carrying_the_bundle_are_refused() {
        let mut msg = vec![0x42, 0, 0, 0, 1, BUNDLE_RUN_OOM.len() as u8];
        msg.extend_from_slice(&BUNDLE_RUN_OOM);
        let refused = check_sync_message(&msg).expect_err("refused");
        assert!(refused.reason.contains("rows"), "{refused}");
        assert_eq!(
            refused.offset,
            6 + 17,
            "offsets count from the message's start"
        );
    }

    #[test]
    fn bloom_filters_asking_for_billions_of_probes_or_no_bits_are_refused() {
        // heads 0, need 0, one have: no last-sync, a filter of 4 bytes; no changes.
        let msg = |filter: &[u8]| {
            let mut m = vec![0x42, 0, 0, 1, 0, filter.len() as u8];
            m.extend_from_slice(filter);
            m.push(0);
            m
        };
        // 1 entry, 10 bits per entry (2 bytes), 7 probes: what automerge writes.
        check_sync_message(&msg(&[1, 10, 7, 0, 0])).expect("a normal filter passes");
        let huge = msg(&[1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0]);
        let refused = check_sync_message(&huge).expect_err("refused");
        assert!(refused.reason.contains("probes"), "{refused}");
        let no_bits = msg(&[1, 0, 7]);
        let refused = check_sync_message(&no_bits).expect_err("refused");
        assert!(refused.reason.contains("no bits"), "{refused}");
    }

    #[test]
    fn declared_lengths_past_the_end_are_refused() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "k", "v").expect("put");
        let saved = doc.save();
        for cut in 1..saved.len() {
            let refused = check_chunks(&saved[..cut]).expect_err("a truncated chunk is refused");
            assert!(
                refused.reason.contains("follow") || refused.reason.contains("ends inside"),
                "cut at {cut}: {refused}"
            );
        }
        check_chunks(&saved).expect("the whole document passes");
        // A hash count no input of this size can hold.
        let msg = [0x42, 0xff, 0xff, 0x03];
        let refused = check_sync_message(&msg).expect_err("refused");
        assert!(refused.reason.contains("heads declared"), "{refused}");
    }

    #[test]
    fn a_deflate_bomb_is_refused_within_the_inflation_budget() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "t", ObjType::Text).expect("text");
        doc.splice_text(&text, 0, 0, &"a".repeat(20_000))
            .expect("splice");
        let saved = doc.save();
        check_chunks(&saved).expect("passes with the default limits");
        let small = Limits {
            max_inflated_bytes: 1_000,
            ..Limits::DEFAULT
        };
        let refused = check_chunks_with(&saved, &small).expect_err("refused");
        assert!(refused.reason.contains("inflates past"), "{refused}");
        let few_rows = Limits {
            max_rows: 10_000,
            ..Limits::DEFAULT
        };
        let refused = check_chunks_with(&saved, &few_rows).expect_err("refused");
        assert!(refused.reason.contains("rows"), "{refused}");
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Splice { at: usize, del: usize, text: String },
        Put { key: u8, value: i64 },
        Delete { key: u8 },
        Increment { by: i64 },
        Push { value: String },
        Sync,
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (0usize..400, 0usize..300, "[a-zé😀 ]{0,40}")
                .prop_map(|(at, del, text)| Edit::Splice { at, del, text }),
            (0u8..8, any::<i64>()).prop_map(|(key, value)| Edit::Put { key, value }),
            (0u8..8).prop_map(|key| Edit::Delete { key }),
            (-5i64..5).prop_map(|by| Edit::Increment { by }),
            "[a-z]{0,12}".prop_map(|value| Edit::Push { value }),
            Just(Edit::Sync),
        ]
    }

    fn apply(doc: &mut AutoCommit, edit: &Edit) {
        let text = match doc.get(ROOT, "text").expect("get") {
            Some((_, id)) => id,
            None => doc.put_object(ROOT, "text", ObjType::Text).expect("text"),
        };
        let list = match doc.get(ROOT, "list").expect("get") {
            Some((_, id)) => id,
            None => doc.put_object(ROOT, "list", ObjType::List).expect("list"),
        };
        match edit {
            Edit::Splice { at, del, text: s } => {
                let len = doc.length(&text);
                let at = (*at).min(len);
                let del = (*del).min(len - at);
                doc.splice_text(&text, at, del as isize, s).expect("splice");
            }
            Edit::Put { key, value } => doc.put(ROOT, format!("k{key}"), *value).expect("put"),
            Edit::Delete { key } => {
                let _ = doc.delete(ROOT, format!("k{key}"));
            }
            Edit::Increment { by } => {
                if doc.get(ROOT, "n").expect("get").is_none() {
                    doc.put(ROOT, "n", automerge::ScalarValue::counter(0))
                        .expect("counter");
                }
                doc.increment(ROOT, "n", *by).expect("increment");
            }
            Edit::Push { value } => {
                let len = doc.length(&list);
                doc.insert(&list, len, value.as_str()).expect("insert");
            }
            Edit::Sync => {}
        }
        doc.commit();
    }

    /// Everything automerge produces between two replicas editing concurrently and syncing.
    fn produced(edits: &[(bool, Edit)]) -> Vec<(String, Vec<u8>, bool)> {
        let mut a = AutoCommit::new().with_actor(ActorId::from(b"alpha-device".to_vec()));
        let mut b = AutoCommit::new().with_actor(ActorId::from(b"bravo-device".to_vec()));
        let mut out = Vec::new();
        let sync = |a: &mut AutoCommit, b: &mut AutoCommit, out: &mut Vec<_>| {
            let (mut sa, mut sb) = (automerge::sync::State::new(), automerge::sync::State::new());
            for _ in 0..20 {
                let ma = a.sync().generate_sync_message(&mut sa);
                let mb = b.sync().generate_sync_message(&mut sb);
                if ma.is_none() && mb.is_none() {
                    break;
                }
                if let Some(m) = ma {
                    let bytes = m.encode();
                    out.push(("sync message".to_string(), bytes.clone(), true));
                    let m = automerge::sync::Message::decode(&bytes).expect("decode");
                    b.sync().receive_sync_message(&mut sb, m).expect("receive");
                }
                if let Some(m) = mb {
                    let bytes = m.encode();
                    out.push(("sync message".to_string(), bytes.clone(), true));
                    let m = automerge::sync::Message::decode(&bytes).expect("decode");
                    a.sync().receive_sync_message(&mut sa, m).expect("receive");
                }
            }
        };
        let mut mark = Vec::new();
        for (on_a, e) in edits {
            if matches!(e, Edit::Sync) {
                sync(&mut a, &mut b, &mut out);
                out.push(("save_after".into(), a.save_after(&mark), false));
                mark = a.get_heads();
                continue;
            }
            apply(if *on_a { &mut a } else { &mut b }, e);
        }
        sync(&mut a, &mut b, &mut out);
        out.push(("save".into(), a.save(), false));
        out.push(("save".into(), b.save(), false));
        out.push((
            "save without deflate".into(),
            a.save_with_options(automerge::SaveOptions {
                deflate: false,
                ..Default::default()
            }),
            false,
        ));
        let doc = a.document();
        let hashes: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let bundle = doc
            .bundle(hashes.iter().copied())
            .expect("a bundle of every change");
        out.push(("bundle".into(), bundle.bytes().to_vec(), false));
        for mut c in doc.get_changes(&[]) {
            out.push(("change".into(), c.raw_bytes().to_vec(), false));
            out.push(("change, compressed".into(), c.bytes().to_vec(), false));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn everything_automerge_produces_passes(
            edits in proptest::collection::vec((any::<bool>(), edit()), 1..40)
        ) {
            for (what, bytes, is_sync) in produced(&edits) {
                let checked = if is_sync {
                    check_sync_message(&bytes)
                } else {
                    check_chunks(&bytes)
                };
                prop_assert!(checked.is_ok(), "{what} refused: {:?}", checked);
            }
        }
    }

    #[test]
    fn a_large_document_with_deflated_columns_and_long_runs_passes() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "t", ObjType::Text).expect("text");
        doc.splice_text(&text, 0, 0, &"abcdefgh".repeat(20_000))
            .expect("splice");
        doc.commit();
        doc.splice_text(&text, 100, 150_000, "").expect("delete");
        doc.commit();
        let saved = doc.save();
        check_chunks(&saved).expect("passes");
        for mut c in doc.get_changes(&[]) {
            check_chunks(c.raw_bytes()).expect("change passes");
            check_chunks(&c.bytes()).expect("compressed change passes");
        }
    }
}
