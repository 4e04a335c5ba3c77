//! Editing traces (`tests/data/editing-traces`, CC BY 4.0, see its README): parsing, and replay through the store
//! and through a bare automerge document.
//!
//! Trace positions count Unicode code points; Fieldchart's text API counts UTF-16 code units.
//! Each replica keeps a rope of its text to convert positions in O(log n).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, TextEncoding};
use fieldchart_core::model::{Actor, NoteText, Role, VisitStart};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};
use ropey::Rope;
use serde::Deserialize;

/// One transaction of a trace.
#[derive(Debug, Clone, Deserialize)]
pub struct Txn {
    /// Agent (replica) that made it; 0 for sequential traces.
    #[serde(default)]
    pub agent: usize,
    /// Indexes of the transactions it was made on top of; `None` for sequential traces (the
    /// previous transaction).
    #[serde(default)]
    pub parents: Option<Vec<usize>>,
    /// `[position, delete count, inserted text]`, positions in code points.
    pub patches: Vec<(usize, usize, String)>,
}

/// A trace file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    /// Text before the first transaction.
    #[serde(default)]
    pub start_content: String,
    /// Text after all transactions.
    pub end_content: String,
    /// Number of agents (1 for sequential traces).
    #[serde(default = "one")]
    pub num_agents: usize,
    /// Transactions, in an order where parents come first.
    pub txns: Vec<Txn>,
}

fn one() -> usize {
    1
}

impl Trace {
    /// Load a trace (`.json` or `.json.gz`).
    pub fn load(path: &Path) -> Result<Trace, String> {
        let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let json = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_string(&mut s)
                .map_err(|e| format!("gunzip: {e}"))?;
            s
        } else {
            String::from_utf8(raw).map_err(|e| format!("utf-8: {e}"))?
        };
        let mut trace: Trace =
            serde_json::from_str(&json).map_err(|e| format!("trace json: {e}"))?;
        for (i, t) in trace.txns.iter_mut().enumerate() {
            if t.parents.is_none() {
                t.parents = Some(if i == 0 { vec![] } else { vec![i - 1] });
            }
            if t.agent >= trace.num_agents {
                return Err(format!(
                    "txn {i}: agent {} >= numAgents {}",
                    t.agent, trace.num_agents
                ));
            }
            if t.parents.iter().flatten().any(|p| *p >= i) {
                return Err(format!("txn {i}: a parent is not earlier"));
            }
        }
        Ok(trace)
    }

    /// A copy with every `from` character replaced by `to` in inserted text and in the start and
    /// end content. Positions count code points, so they stay valid; with a `to` outside the
    /// Basic Multilingual Plane this exercises the UTF-16 conversion on real editing patterns.
    pub fn map_char(&self, from: char, to: char) -> Trace {
        let map = |s: &str| {
            s.chars()
                .map(|c| if c == from { to } else { c })
                .collect::<String>()
        };
        let mut t = self.clone();
        t.start_content = map(&t.start_content);
        t.end_content = map(&t.end_content);
        for txn in &mut t.txns {
            for p in &mut txn.patches {
                p.2 = map(&p.2);
            }
        }
        t
    }

    /// Number of edits (patches).
    pub fn edits(&self) -> usize {
        self.txns.iter().map(|t| t.patches.len()).sum()
    }
}

/// One editing replica: the store, or a bare automerge document.
pub trait Replica {
    /// Splice at UTF-16 offsets, committing one change.
    fn splice(&mut self, pos: usize, delete: usize, insert: &str) -> Result<(), String>;
    /// Current text.
    fn text(&mut self) -> String;
    /// Current heads.
    fn heads(&mut self) -> Vec<ChangeHash>;
    /// Changes after `heads`.
    fn changes_since(&mut self, heads: &[ChangeHash]) -> Vec<u8>;
    /// Merge changes from elsewhere.
    fn import(&mut self, bytes: &[u8]) -> Result<(), String>;
}

/// A bare in-memory automerge document (the baseline).
#[derive(Debug)]
pub struct BareReplica {
    doc: AutoCommit,
    text: ObjId,
}

impl BareReplica {
    /// A replica from a saved document holding the text at root key `assessment`.
    pub fn from_saved(bytes: &[u8]) -> BareReplica {
        let opts = automerge::LoadOptions::new().text_encoding(TextEncoding::Utf16CodeUnit);
        let doc = AutoCommit::load_with_options(bytes, opts).expect("load seed");
        let text = match doc.get(ROOT, "assessment") {
            Ok(Some((automerge::Value::Object(ObjType::Text), id))) => id,
            _ => panic!("seed has no assessment text"),
        };
        BareReplica { doc, text }
    }
}

impl Replica for BareReplica {
    fn splice(&mut self, pos: usize, delete: usize, insert: &str) -> Result<(), String> {
        self.doc
            .splice_text(&self.text, pos, delete as isize, insert)
            .map_err(|e| e.to_string())?;
        self.doc.commit();
        Ok(())
    }
    fn text(&mut self) -> String {
        self.doc.text(&self.text).unwrap_or_default()
    }
    fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }
    fn changes_since(&mut self, heads: &[ChangeHash]) -> Vec<u8> {
        self.doc.save_after(heads)
    }
    fn import(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.doc
            .load_incremental(bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A device store replica editing one visit note's assessment.
#[derive(Debug)]
pub struct StoreReplica {
    /// The store.
    pub store: Store,
    /// The note.
    pub note: DocumentId,
}

impl Replica for StoreReplica {
    fn splice(&mut self, pos: usize, delete: usize, insert: &str) -> Result<(), String> {
        self.store
            .splice_text(self.note, NoteText::Assessment, pos, delete, insert)
            .map_err(|e| e.to_string())
    }
    fn text(&mut self) -> String {
        self.store
            .with_document(self.note, |doc| match doc.get(ROOT, "assessment") {
                Ok(Some((_, id))) => doc.text(&id).unwrap_or_default(),
                _ => String::new(),
            })
            .unwrap_or_default()
    }
    fn heads(&mut self) -> Vec<ChangeHash> {
        self.store.heads(self.note).unwrap_or_default()
    }
    fn changes_since(&mut self, heads: &[ChangeHash]) -> Vec<u8> {
        self.store
            .changes_since(self.note, heads)
            .unwrap_or_default()
    }
    fn import(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.store
            .import(self.note, bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Open a store for agent `agent` in `dir`.
pub fn open_store(dir: &Path, agent: usize, journal: bool) -> Store {
    Store::open(StoreConfig {
        path: dir.join(format!("agent-{agent}.db")),
        key: StoreKey::random(),
        actor: Actor {
            user_id: format!("agent-{agent}"),
            device_id: format!("device-{agent}"),
        },
        role: Role::Clinician,
        keystroke_journal: journal,
    })
    .expect("open store")
}

/// Create the note every replica edits, with `start` as its assessment; returns the store's
/// replica and the saved document (to seed the others).
pub fn seed_note(store: Store, start: &str) -> (StoreReplica, Vec<u8>) {
    let note = store
        .start_visit(&VisitStart {
            agency_id: "agency".into(),
            patient_id: "patient".into(),
            service_type: "skilled-nursing".into(),
            date: "2026-11-27".into(),
            location: "home".into(),
            started_at_ms: 0,
            start_monotonic_ms: 0,
        })
        .expect("start visit");
    if !start.is_empty() {
        store
            .update_text(note, NoteText::Assessment, start)
            .expect("start content");
    }
    let saved = store.export_changes(note).expect("export");
    (StoreReplica { store, note }, saved)
}

/// Timings of a replay.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Final text of every replica, after merging everything everywhere.
    pub texts: Vec<String>,
    /// Time spent inside edit calls (splices), summed.
    pub edit_time: Duration,
    /// Latency of each edit call.
    pub latencies: Vec<Duration>,
    /// Time spent merging other agents' changes (concurrent traces: every import, each a
    /// durable transaction on a store, including the final exchange), summed.
    pub merge_time: Duration,
}

/// Replay `trace` with one replica per agent, merging per the trace's parents: before a
/// transaction, its agent's replica imports every ancestor transaction it has not seen (and
/// nothing else), so positions apply to exactly the version the author saw.
pub fn replay<R: Replica>(trace: &Trace, replicas: &mut [R]) -> Result<Replay, String> {
    let agents = replicas.len();
    assert_eq!(agents, trace.num_agents.max(1));
    let mut ropes: Vec<Rope> = replicas
        .iter_mut()
        .map(|r| Rope::from_str(&r.text()))
        .collect();
    // For concurrent traces: the change bytes each transaction produced, and which
    // transactions each replica has.
    let concurrent = agents > 1;
    let mut txn_changes: Vec<Vec<u8>> = Vec::new();
    let mut applied: Vec<Vec<bool>> = vec![vec![false; trace.txns.len()]; agents];
    let mut latencies = Vec::with_capacity(trace.edits());
    let mut edit_time = Duration::ZERO;
    let mut merge_time = Duration::ZERO;
    for (i, txn) in trace.txns.iter().enumerate() {
        let a = txn.agent;
        if concurrent {
            let mut missing = BTreeSet::new();
            let mut stack: Vec<usize> = txn.parents.clone().unwrap_or_default();
            while let Some(p) = stack.pop() {
                if !applied[a][p] {
                    applied[a][p] = true;
                    missing.insert(p);
                    stack.extend(trace.txns[p].parents.iter().flatten().copied());
                }
            }
            if !missing.is_empty() {
                let bytes: Vec<u8> = missing
                    .iter()
                    .flat_map(|p| txn_changes[*p].iter().copied())
                    .collect();
                if !bytes.is_empty() {
                    let t = Instant::now();
                    replicas[a].import(&bytes)?;
                    merge_time += t.elapsed();
                }
                ropes[a] = Rope::from_str(&replicas[a].text());
            }
        }
        let before = if concurrent {
            replicas[a].heads()
        } else {
            Vec::new()
        };
        for (pos, del, ins) in &txn.patches {
            let rope = &mut ropes[a];
            if pos + del > rope.len_chars() {
                return Err(format!(
                    "txn {i}: patch {pos}+{del} beyond text of {} chars",
                    rope.len_chars()
                ));
            }
            let start = rope.char_to_utf16_cu(*pos);
            let end = rope.char_to_utf16_cu(pos + del);
            let t = Instant::now();
            replicas[a].splice(start, end - start, ins)?;
            let took = t.elapsed();
            edit_time += took;
            latencies.push(took);
            rope.remove(*pos..pos + del);
            rope.insert(*pos, ins);
        }
        if concurrent {
            applied[a][i] = true;
            txn_changes.push(replicas[a].changes_since(&before));
        }
    }
    // Finally everyone gets everything.
    if concurrent {
        let all: Vec<u8> = txn_changes.concat();
        for r in replicas.iter_mut() {
            let t = Instant::now();
            r.import(&all)?;
            merge_time += t.elapsed();
        }
    }
    let texts = replicas.iter_mut().map(|r| r.text()).collect();
    Ok(Replay {
        texts,
        edit_time,
        latencies,
        merge_time,
    })
}
