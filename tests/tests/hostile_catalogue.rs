//! The hostile-input catalogue: one table, each row an input a broken or malicious client can
//! send to the real relay process, with the outcome the relay must give. After every row the
//! relay is checked: a peer that connected before the catalogue started still syncs the stored
//! note with exactly its original heads (nothing stored was harmed; the relay keeps serving
//! others), and `/healthz` answers.
//!
//! Outcomes are observed, never timed: after the hostile frames of a session row, the test
//! sends a probe (`request` for a random id) — the relay answers frames in order, so if the
//! first answer is the probe's `doc-unavailable`, the hostile frames got no answer at all and
//! the session is alive.

use std::io::Write as _;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{Automerge, ChangeHash, ROOT};
use fieldchart_core::protocol::{DocSync, DocumentId, Message, PeerId, PeerMetadata};
use fieldchart_tests::relay_process::{Admin, RelayProcess, SyncOutcome, TestPeer, visit_note};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite;

/// Longest wait for any one answer (reached only when a row fails).
const WAIT: Duration = Duration::from_secs(20);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

// --- a tiny CBOR writer, for frames the protocol encoder would never produce -----------------

#[derive(Clone)]
enum Cbor {
    Text(String),
    Bytes(Vec<u8>),
    Uint(u64),
    Neg(u64),
    Array(Vec<Cbor>),
    Map(Vec<(Cbor, Cbor)>),
    Null,
}

fn head(major: u8, n: u64, out: &mut Vec<u8>) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend([m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend((n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend((n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend(n.to_be_bytes());
        }
    }
}

impl Cbor {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Cbor::Uint(n) => head(0, *n, out),
            Cbor::Neg(n) => head(1, *n, out),
            Cbor::Bytes(b) => {
                head(2, b.len() as u64, out);
                out.extend(b);
            }
            Cbor::Text(t) => {
                head(3, t.len() as u64, out);
                out.extend(t.as_bytes());
            }
            Cbor::Array(items) => {
                head(4, items.len() as u64, out);
                for i in items {
                    i.write(out);
                }
            }
            Cbor::Map(pairs) => {
                head(5, pairs.len() as u64, out);
                for (k, v) in pairs {
                    k.write(out);
                    v.write(out);
                }
            }
            Cbor::Null => out.push(0xf6),
        }
    }
}

fn t(s: &str) -> Cbor {
    Cbor::Text(s.into())
}

/// A message map with these fields (keys are text).
fn map(fields: &[(&str, Cbor)]) -> Vec<u8> {
    Cbor::Map(fields.iter().map(|(k, v)| (t(k), v.clone())).collect()).encode()
}

// --- rows ------------------------------------------------------------------------------------

/// What a session row knows when it builds its frames.
struct Ctx {
    me: PeerId,
    relay: PeerId,
    /// The stored note (the hostile device's own, on its care team).
    note: DocumentId,
    /// The note as stored (a copy to derive sync messages from).
    note_doc: Automerge,
    agency: String,
    patient: String,
    other_agency: String,
    other_patient: String,
    nurse: String,
}

enum Frame {
    Binary(Vec<u8>),
    Text(String),
}

/// What the relay must answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// An `error` message containing this text, then the connection closes.
    Closed(&'static str),
    /// `doc-unavailable` for the document the row names; the session goes on.
    Unavailable,
    /// No answer at all; the session goes on (the probe is answered first).
    Silent,
    /// A `sync` answer; the session goes on.
    Answered,
    /// An HTTP status (for the upgrade or a plain request).
    Status(u16),
}

/// Builds a session row's frames, and names the document an `Unavailable` answer must name.
type FrameBuilder = dyn Fn(&Ctx) -> (Vec<Frame>, Option<DocumentId>);

/// Builds a new document for a refusal row.
type DocBuilder = fn(&Ctx) -> Automerge;

enum Input {
    /// Frames after a valid `join` (or instead of it, when `join` is false), with the document
    /// id an `Unavailable` answer must name.
    Session {
        join: bool,
        frames: Box<FrameBuilder>,
    },
    /// The WebSocket upgrade with this query token (`None`: no token at all).
    Upgrade(Option<TokenKind>),
    /// A plain HTTP request: method, path (and query), admin token or not, body bytes.
    Http {
        method: &'static str,
        path: Box<dyn Fn(&Ctx) -> String>,
        admin: bool,
        body: Vec<u8>,
    },
    /// The rest (floods, slow-loris): a function given the relay and the context.
    Special(Special),
}

#[derive(Clone, Copy)]
enum TokenKind {
    Empty,
    Malformed,
    Unknown,
    Expired,
    Revoked,
    NearMiss,
}

#[derive(Clone, Copy)]
enum Special {
    MessageFlood,
    SlowLoris,
    OtherAgencyReads,
}

struct Row {
    name: &'static str,
    input: Input,
    expect: Expect,
    /// After the row: this document must not be stored (a refused new document).
    not_stored: bool,
}

fn session(
    name: &'static str,
    expect: Expect,
    frames: impl Fn(&Ctx) -> (Vec<Frame>, Option<DocumentId>) + 'static,
) -> Row {
    Row {
        name,
        input: Input::Session {
            join: true,
            frames: Box::new(frames),
        },
        expect,
        not_stored: false,
    }
}

fn bin(bytes: Vec<u8>) -> (Vec<Frame>, Option<DocumentId>) {
    (vec![Frame::Binary(bytes)], None)
}

fn sync_fields(c: &Ctx, doc: &str, data: Cbor) -> Vec<u8> {
    map(&[
        ("type", t("sync")),
        ("senderId", t(c.me.as_str())),
        ("targetId", t(c.relay.as_str())),
        ("documentId", t(doc)),
        ("data", data),
    ])
}

fn sync_msg(c: &Ctx, id: DocumentId, data: Vec<u8>) -> Vec<u8> {
    Message::Sync {
        sender_id: c.me.clone(),
        target_id: c.relay.clone(),
        document_id: id,
        data,
    }
    .encode()
}

/// A first sync message carrying all of `doc` (as a device announcing a new document sends
/// after the relay's first answer): the complete changes, so the relay can classify it.
fn full_sync(doc: &Automerge) -> Vec<u8> {
    // Pretend the relay already told us it has nothing: generate twice (first message
    // advertises heads; with no answer the second carries nothing), so build it directly.
    let mut ours = DocSync::new();
    let mut theirs = DocSync::new();
    let mut empty = Automerge::new();
    let first = ours.generate(doc).expect("first");
    theirs.receive(&mut empty, &first).expect("receive");
    let answer = theirs.generate(&empty).expect("answer");
    let mut doc = doc.clone();
    ours.receive(&mut doc, &answer).expect("receive answer");
    ours.generate(&doc).expect("changes")
}

fn note_with(fields: &[(&str, &str)], ints: &[(&str, i64)]) -> Automerge {
    let mut doc = Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        for (k, v) in fields {
            tx.put(ROOT, *k, *v)?;
        }
        for (k, v) in ints {
            tx.put(ROOT, *k, *v)?;
        }
        Ok(())
    })
    .expect("build");
    doc
}

fn bs58check(bytes: &[u8]) -> String {
    bs58::encode(bytes).with_check().into_string()
}

#[allow(clippy::too_many_lines)]
fn catalogue() -> Vec<Row> {
    let mut rows = vec![
        // --- malformed CBOR and wrong shapes
        session(
            "malformed CBOR (a break byte)",
            Expect::Closed("undecodable"),
            |_| bin(vec![0xff, 0x00, 0x13]),
        ),
        session("truncated CBOR map", Expect::Closed("undecodable"), |c| {
            let full = sync_msg(c, c.note, vec![0x42, 1, 2, 3]);
            bin(full[..full.len() / 2].to_vec())
        }),
        session(
            "CBOR array instead of a map",
            Expect::Closed("undecodable"),
            |_| bin(Cbor::Array(vec![Cbor::Uint(1), Cbor::Uint(2)]).encode()),
        ),
        session("a bare CBOR integer", Expect::Closed("undecodable"), |_| {
            bin(Cbor::Uint(7).encode())
        }),
        session("CBOR null", Expect::Closed("undecodable"), |_| {
            bin(vec![0xf6])
        }),
        session("map without a type", Expect::Closed("undecodable"), |c| {
            bin(map(&[("senderId", t(c.me.as_str()))]))
        }),
        session("type is an integer", Expect::Closed("undecodable"), |c| {
            bin(map(&[
                ("type", Cbor::Uint(1)),
                ("senderId", t(c.me.as_str())),
            ]))
        }),
        session(
            "type is a huge integer",
            Expect::Closed("undecodable"),
            |_| bin(map(&[("type", Cbor::Uint(u64::MAX))])),
        ),
        session(
            "unknown message type (ignored, like JS peers)",
            Expect::Silent,
            |c| {
                bin(map(&[
                    ("type", t("frobnicate")),
                    ("senderId", t(c.me.as_str())),
                ]))
            },
        ),
        session(
            "documentId is an integer",
            Expect::Closed("undecodable"),
            |c| {
                bin(map(&[
                    ("type", t("sync")),
                    ("senderId", t(c.me.as_str())),
                    ("targetId", t(c.relay.as_str())),
                    ("documentId", Cbor::Uint(12)),
                    ("data", Cbor::Bytes(vec![0x42])),
                ]))
            },
        ),
        session(
            "data is text, not bytes",
            Expect::Closed("undecodable"),
            |c| bin(sync_fields(c, &c.note.to_string(), t("not bytes"))),
        ),
        session("data missing", Expect::Closed("undecodable"), |c| {
            bin(map(&[
                ("type", t("sync")),
                ("senderId", t(c.me.as_str())),
                ("targetId", t(c.relay.as_str())),
                ("documentId", t(&c.note.to_string())),
            ]))
        }),
        session(
            "data is a negative huge integer",
            Expect::Closed("undecodable"),
            |c| bin(sync_fields(c, &c.note.to_string(), Cbor::Neg(u64::MAX))),
        ),
        session("senderId is null", Expect::Closed("undecodable"), |c| {
            bin(map(&[
                ("type", t("sync")),
                ("senderId", Cbor::Null),
                ("targetId", t(c.relay.as_str())),
                ("documentId", t(&c.note.to_string())),
                ("data", Cbor::Bytes(vec![0x42])),
            ]))
        }),
        // --- ids
        session(
            "documentId not bs58check",
            Expect::Closed("undecodable"),
            |c| bin(sync_fields(c, "not-an-id", Cbor::Bytes(vec![0x42]))),
        ),
        session(
            "documentId with a bad checksum",
            Expect::Closed("undecodable"),
            |c| {
                let mut id = c.note.to_string();
                let last = id.pop().expect("non-empty");
                id.push(if last == '1' { '2' } else { '1' });
                bin(sync_fields(c, &id, Cbor::Bytes(vec![0x42])))
            },
        ),
        session(
            "documentId of 8 bytes",
            Expect::Closed("undecodable"),
            |c| bin(sync_fields(c, &bs58check(&[7; 8]), Cbor::Bytes(vec![0x42]))),
        ),
        session(
            "documentId of 64 bytes",
            Expect::Closed("undecodable"),
            |c| {
                bin(sync_fields(
                    c,
                    &bs58check(&[7; 64]),
                    Cbor::Bytes(vec![0x42]),
                ))
            },
        ),
        session("documentId of 10 kB", Expect::Closed("undecodable"), |c| {
            bin(sync_fields(c, &"z".repeat(10_000), Cbor::Bytes(vec![0x42])))
        }),
        // --- frames
        session("text frame", Expect::Closed("text frames"), |_| {
            (vec![Frame::Text("{\"type\":\"sync\"}".into())], None)
        }),
        session(
            "zero-length binary frame",
            Expect::Closed("undecodable"),
            |_| bin(Vec::new()),
        ),
        session(
            "oversize frame",
            Expect::Closed("exceeds the limit"),
            |_| bin(vec![0u8; fieldchart_server::config::MAX_FRAME_BYTES + 1]),
        ),
        // --- protocol misuse
        session(
            "wrong senderId after the handshake",
            Expect::Closed("senderId differs"),
            |c| {
                bin(Message::Request {
                    sender_id: PeerId::new("someone-else".into()),
                    target_id: c.relay.clone(),
                    document_id: c.note,
                    data: DocSync::new().generate(&Automerge::new()).expect("first"),
                }
                .encode())
            },
        ),
        session("a second join", Expect::Closed("already joined"), |c| {
            bin(Message::Join {
                sender_id: c.me.clone(),
                peer_metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true,
                },
                supported_protocol_versions: vec!["1".into()],
            }
            .encode())
        }),
        session(
            "a peer message from the client",
            Expect::Closed("relay's message"),
            |c| {
                bin(Message::Peer {
                    sender_id: c.me.clone(),
                    target_id: c.relay.clone(),
                    peer_metadata: PeerMetadata::default(),
                    selected_protocol_version: "1".into(),
                }
                .encode())
            },
        ),
        session(
            "forged targetId (answered as addressed to the relay; nothing goes elsewhere)",
            Expect::Answered,
            |c| {
                let mut ours = DocSync::new();
                let data = ours.generate(&c.note_doc).expect("first");
                bin(Message::Sync {
                    sender_id: c.me.clone(),
                    target_id: PeerId::new("another-device".into()),
                    document_id: c.note,
                    data,
                }
                .encode())
            },
        ),
        session(
            "ephemeral message (dropped, never forwarded)",
            Expect::Silent,
            |c| {
                bin(map(&[
                    ("type", t("ephemeral")),
                    ("senderId", t(c.me.as_str())),
                    ("targetId", t(c.relay.as_str())),
                    ("documentId", t(&c.note.to_string())),
                    ("count", Cbor::Uint(1)),
                    ("sessionId", t("s")),
                    ("data", Cbor::Bytes(b"{\"cursor\":1}".to_vec())),
                ]))
            },
        ),
        session(
            "request for an unknown document",
            Expect::Unavailable,
            |c| {
                let id = DocumentId::random();
                let data = DocSync::new().generate(&Automerge::new()).expect("first");
                (
                    vec![Frame::Binary(
                        Message::Request {
                            sender_id: c.me.clone(),
                            target_id: c.relay.clone(),
                            document_id: id,
                            data,
                        }
                        .encode(),
                    )],
                    Some(id),
                )
            },
        ),
        // --- automerge sync messages and documents
        session(
            "zero-length sync data for a stored note",
            Expect::Closed("refused"),
            |c| bin(sync_msg(c, c.note, Vec::new())),
        ),
        session(
            "random bytes as sync data for a stored note",
            Expect::Closed("refused"),
            |c| {
                bin(sync_msg(
                    c,
                    c.note,
                    vec![0x42, 0xde, 0xad, 0xbe, 0xef, 0x00, 0x17],
                ))
            },
        ),
        session(
            "truncated sync message for a stored note",
            Expect::Closed("refused"),
            |c| {
                let mut doc = c.note_doc.clone();
                doc.transact::<_, _, automerge::AutomergeError>(|tx| {
                    tx.put(ROOT, "assessment", "edited").map(|_| ())
                })
                .expect("edit");
                let mut data = full_sync(&doc);
                data.truncate(data.len() * 2 / 3);
                bin(sync_msg(c, c.note, data))
            },
        ),
        session(
            // automerge skips a change chunk whose checksum fails: nothing is applied or
            // stored (the check after every row sees the note unchanged), and the relay's
            // answer does not confirm the change, so the device will send it again.
            "a sync message whose change bytes are corrupt (dropped, not confirmed)",
            Expect::Answered,
            |c| {
                let mut doc = c.note_doc.clone();
                doc.transact::<_, _, automerge::AutomergeError>(|tx| {
                    tx.put(ROOT, "assessment", "edited with a flipped byte")
                        .map(|_| ())
                })
                .expect("edit");
                let mut data = full_sync(&doc);
                // Flip a byte of the change's checksum (bytes 4..8 of the chunk): the chunk
                // still parses, its checksum no longer matches. (A byte flipped inside its
                // columns is refused by the import guard when it breaks their structure.)
                let message = automerge::sync::Message::decode(&data).expect("decodes");
                let change = message
                    .changes
                    .iter()
                    .last()
                    .expect("the message carries changes")
                    .to_vec();
                let at = data
                    .windows(change.len())
                    .position(|w| w == change.as_slice())
                    .expect("the sync message carries the change");
                data[at + 5] ^= 0xff;
                bin(sync_msg(c, c.note, data))
            },
        ),
        session(
            // fuzz/regressions/document_import/oom-…: a bundle chunk whose counter column
            // declares 1,342,177,279 rows in 5 bytes; automerge 0.12 expands it eagerly and the
            // process aborts. The import guard refuses it before automerge sees it.
            "a sync message carrying a 32-byte chunk that declares 1.3 billion rows",
            Expect::Closed("rows"),
            |c| {
                let chunk: &[u8] = include_bytes!(
                    "../../fuzz/regressions/document_import/oom-df67b51d37f9c22db0058e5372ca06be25580049"
                );
                let mut data = vec![0x42, 0, 0, 0, 1, u8::try_from(chunk.len()).expect("short")];
                data.extend_from_slice(chunk);
                bin(sync_msg(c, c.note, data))
            },
        ),
        session(
            // automerge allocates the probe count per hash it looks up (up to 2^32 - 1).
            "a sync message whose Bloom filter asks for 4 billion probes",
            Expect::Closed("probes"),
            |c| {
                let filter = [1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0];
                let mut data = vec![0x42, 0, 0, 1, 0, filter.len() as u8];
                data.extend_from_slice(&filter);
                data.push(0);
                bin(sync_msg(c, c.note, data))
            },
        ),
        session(
            "garbage sync data for a new document",
            Expect::Closed("refused"),
            |c| {
                bin(sync_msg(
                    c,
                    DocumentId::random(),
                    vec![0x42, 0xff, 0xff, 0xff, 0xff],
                ))
            },
        ),
    ];
    // New documents with bad roots: refused with doc-unavailable, nothing stored.
    let new_doc_rows: Vec<(&'static str, DocBuilder)> = vec![
        ("a note claiming another agency's patient", |c| {
            note_with(
                &[
                    ("schema", "fieldchart/visit-note@1"),
                    ("kind", "visit-note"),
                    ("agencyId", &c.other_agency),
                    ("patientId", &c.other_patient),
                    ("createdBy", &c.nurse),
                ],
                &[("createdAt", 1)],
            )
        }),
        (
            "a note claiming a patient of this agency who does not exist",
            |c| {
                note_with(
                    &[
                        ("schema", "fieldchart/visit-note@1"),
                        ("kind", "visit-note"),
                        ("agencyId", &c.agency),
                        ("patientId", "pat_doesnotexist"),
                        ("createdBy", &c.nurse),
                    ],
                    &[("createdAt", 1)],
                )
            },
        ),
        (
            "a note naming this agency with another agency's patient",
            |c| {
                note_with(
                    &[
                        ("schema", "fieldchart/visit-note@1"),
                        ("kind", "visit-note"),
                        ("agencyId", &c.agency),
                        ("patientId", &c.other_patient),
                        ("createdBy", &c.nurse),
                    ],
                    &[("createdAt", 1)],
                )
            },
        ),
        (
            "agencyId and patientId of the wrong type (integers): held unclassified, never stored",
            |_| {
                note_with(
                    &[
                        ("schema", "fieldchart/visit-note@1"),
                        ("kind", "visit-note"),
                    ],
                    &[("agencyId", 1), ("patientId", 2), ("createdAt", 1)],
                )
            },
        ),
        ("a clinician creating a patient chart", |c| {
            note_with(
                &[
                    ("schema", "fieldchart/patient@1"),
                    ("kind", "patient"),
                    ("agencyId", &c.agency),
                    ("patientId", &c.patient),
                    ("createdBy", &c.nurse),
                ],
                &[("createdAt", 1)],
            )
        }),
        ("SQL metacharacters in patientId", |c| {
            note_with(
                &[
                    ("schema", "fieldchart/visit-note@1"),
                    ("kind", "visit-note"),
                    ("agencyId", &c.agency),
                    ("patientId", "pat_1' OR '1'='1"),
                    ("createdBy", &c.nurse),
                ],
                &[("createdAt", 1)],
            )
        }),
    ];
    for (name, build) in new_doc_rows {
        // A document whose owner fields are not strings cannot be classified: it is held,
        // unacknowledged, like any document still waiting for its fields.
        let expect = if name.contains("wrong type") {
            Expect::Silent
        } else {
            Expect::Unavailable
        };
        let mut row = session(name, expect, move |c| {
            let id = DocumentId::random();
            let doc = build(c);
            (
                vec![Frame::Binary(sync_msg(c, id, full_sync(&doc)))],
                Some(id),
            )
        });
        row.not_stored = true;
        rows.push(row);
    }
    rows.push(session(
        "a huge narrative (1.5 MB, under the frame limit) in a new note",
        Expect::Answered,
        |c| {
            let narrative = "Patient reports pain 4/10. ".repeat(55_000);
            let doc = note_with(
                &[
                    ("schema", "fieldchart/visit-note@1"),
                    ("kind", "visit-note"),
                    ("agencyId", &c.agency),
                    ("patientId", &c.patient),
                    ("createdBy", &c.nurse),
                    ("assessment", &narrative),
                ],
                &[("createdAt", 1)],
            );
            let id = DocumentId::random();
            (vec![Frame::Binary(sync_msg(c, id, full_sync(&doc)))], None)
        },
    ));
    rows.push(session(
        "a 3 MB narrative of random text (over the frame limit, compressed)",
        Expect::Closed("exceeds the limit"),
        |c| {
            use rand::Rng;
            let mut rng = rand::rng();
            let narrative: String = (0..3 * 1024 * 1024)
                .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
                .collect();
            let doc = note_with(
                &[
                    ("kind", "visit-note"),
                    ("agencyId", &c.agency),
                    ("patientId", &c.patient),
                    ("assessment", &narrative),
                ],
                &[],
            );
            bin(sync_msg(c, DocumentId::random(), full_sync(&doc)))
        },
    ));
    // Before the handshake.
    rows.push(Row {
        name: "a sync before join",
        input: Input::Session {
            join: false,
            frames: Box::new(|c| bin(sync_msg(c, c.note, vec![0x42]))),
        },
        expect: Expect::Closed("expected join"),
        not_stored: false,
    });
    rows.push(Row {
        name: "join with only unsupported protocol versions",
        input: Input::Session {
            join: false,
            frames: Box::new(|c| {
                bin(Message::Join {
                    sender_id: c.me.clone(),
                    peer_metadata: PeerMetadata::default(),
                    supported_protocol_versions: vec!["0".into(), "99".into()],
                }
                .encode())
            }),
        },
        expect: Expect::Closed("unsupported protocol version"),
        not_stored: false,
    });
    // Tokens.
    for (name, kind) in [
        ("upgrade with an empty token", TokenKind::Empty),
        ("upgrade with a malformed token", TokenKind::Malformed),
        ("upgrade with an unknown token", TokenKind::Unknown),
        ("upgrade with an expired token", TokenKind::Expired),
        ("upgrade with a revoked token", TokenKind::Revoked),
        (
            "upgrade with a near miss of a real token",
            TokenKind::NearMiss,
        ),
    ] {
        rows.push(Row {
            name,
            input: Input::Upgrade(Some(kind)),
            expect: Expect::Status(401),
            not_stored: false,
        });
    }
    rows.push(Row {
        name: "upgrade without a token",
        input: Input::Upgrade(None),
        expect: Expect::Status(401),
        not_stored: false,
    });
    // HTTP.
    let http = |name, method, path: fn(&Ctx) -> String, admin, body: &[u8], status| Row {
        name,
        input: Input::Http {
            method,
            path: Box::new(path),
            admin,
            body: body.to_vec(),
        },
        expect: Expect::Status(status),
        not_stored: false,
    };
    rows.extend([
        http(
            "feed cursor that is garbage",
            "GET",
            |_| "/v1/changes?since=%00%ff".into(),
            false,
            b"",
            400,
        ),
        http(
            "feed cursor with SQL metacharacters",
            "GET",
            |_| "/v1/changes?since=1%27%20OR%20%271%27%3D%271".into(),
            false,
            b"",
            400,
        ),
        http(
            "feed cursor with a huge sequence number",
            "GET",
            |_| "/v1/changes?since=99999999999999999999999".into(),
            false,
            b"",
            400,
        ),
        http(
            "feed with a negative limit",
            "GET",
            |_| "/v1/changes?limit=-1".into(),
            false,
            b"",
            400,
        ),
        http(
            "admin: a user name with SQL metacharacters is stored verbatim",
            "POST",
            |_| "/v1/admin/users".into(),
            true,
            br#"{"name":"Robert'); DROP TABLE documents;--","role":"clinician"}"#,
            201,
        ),
        http(
            "admin: a patient name with invalid UTF-8",
            "POST",
            |_| "/v1/admin/patients".into(),
            true,
            b"{\"name\":\"Gr\xffce\"}",
            400,
        ),
        http(
            "admin: a user with a wrong-type role",
            "POST",
            |_| "/v1/admin/users".into(),
            true,
            br#"{"name":"Ann","role":7}"#,
            422,
        ),
        http(
            "admin: assign with SQL metacharacters in the ids",
            "POST",
            |_| "/v1/admin/assign".into(),
            true,
            br#"{"userId":"usr_1' OR 1=1 --","patientId":"pat_1\"; DELETE FROM patients;"}"#,
            404,
        ),
        http(
            "admin: revoke a device id with a path traversal",
            "POST",
            |_| "/v1/admin/devices/..%2F..%2Fetc/revoke".into(),
            true,
            b"",
            404,
        ),
        http(
            "admin API with a device (non-admin) token",
            "POST",
            |_| "/v1/admin/users".into(),
            false,
            br#"{"name":"Eve","role":"admin"}"#,
            403,
        ),
    ]);
    rows.push(Row {
        name: "a flood past the message rate",
        input: Input::Special(Special::MessageFlood),
        expect: Expect::Closed("messages per second"),
        not_stored: false,
    });
    rows.push(Row {
        name: "slow-loris upgrades (half-sent headers held open)",
        input: Input::Special(Special::SlowLoris),
        expect: Expect::Answered,
        not_stored: false,
    });
    rows.push(Row {
        name: "another agency's token asking for this agency's note",
        input: Input::Special(Special::OtherAgencyReads),
        expect: Expect::Unavailable,
        not_stored: false,
    });
    rows
}

// --- running a row ---------------------------------------------------------------------------

struct World {
    relay: RelayProcess,
    admin: Admin,
    ctx_base: CtxBase,
    admin_token: String,
    device_token: String,
    other_agency_token: String,
}

#[derive(Clone)]
struct CtxBase {
    note: DocumentId,
    note_doc: Automerge,
    agency: String,
    patient: String,
    other_agency: String,
    other_patient: String,
    nurse: String,
}

async fn connect(relay: &RelayProcess, token: &str) -> Socket {
    let (socket, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(relay.ws_url(token)))
            .await
            .expect("connect in time")
            .expect("upgrade");
    socket
}

async fn join(socket: &mut Socket, me: &PeerId) -> PeerId {
    let join = Message::Join {
        sender_id: me.clone(),
        peer_metadata: PeerMetadata {
            storage_id: None,
            is_ephemeral: true,
        },
        supported_protocol_versions: vec!["1".into()],
    };
    socket
        .send(tungstenite::Message::Binary(join.encode().into()))
        .await
        .expect("send join");
    match next_message(socket).await {
        Observed::Message(Message::Peer { sender_id, .. }) => sender_id,
        other => panic!("expected peer, got {other:?}"),
    }
}

#[derive(Debug)]
enum Observed {
    Message(Message),
    Closed,
}

async fn next_message(socket: &mut Socket) -> Observed {
    loop {
        let frame = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("the relay answered in time");
        match frame {
            Some(Ok(tungstenite::Message::Binary(bytes))) => {
                return Observed::Message(Message::decode(&bytes).expect("relay frames decode"));
            }
            Some(Ok(tungstenite::Message::Close(_)) | Err(_)) | None => return Observed::Closed,
            Some(Ok(_)) => continue,
        }
    }
}

/// Send the probe and read until its answer; returns what came before it.
async fn answers_until_probe(socket: &mut Socket, me: &PeerId, relay: &PeerId) -> Vec<Observed> {
    let probe = DocumentId::random();
    let request = Message::Request {
        sender_id: me.clone(),
        target_id: relay.clone(),
        document_id: probe,
        data: DocSync::new().generate(&Automerge::new()).expect("first"),
    };
    let _ = socket
        .send(tungstenite::Message::Binary(request.encode().into()))
        .await;
    let mut seen = Vec::new();
    for _ in 0..1000 {
        match next_message(socket).await {
            Observed::Message(Message::DocUnavailable { document_id, .. })
                if document_id == probe =>
            {
                return seen;
            }
            Observed::Closed => {
                seen.push(Observed::Closed);
                return seen;
            }
            other => seen.push(other),
        }
    }
    panic!("the probe was never answered");
}

async fn run_session(
    w: &World,
    token: &str,
    join_first: bool,
    frames: &FrameBuilder,
) -> (Expect, Option<DocumentId>) {
    let mut socket = connect(&w.relay, token).await;
    let me = PeerId::new(format!("hostile-{}", rand::random::<u32>()));
    let relay = if join_first {
        join(&mut socket, &me).await
    } else {
        PeerId::new("unknown-relay".into())
    };
    let base = w.ctx_base.clone();
    let ctx = Ctx {
        me: me.clone(),
        relay: relay.clone(),
        note: base.note,
        note_doc: base.note_doc,
        agency: base.agency,
        patient: base.patient,
        other_agency: base.other_agency,
        other_patient: base.other_patient,
        nurse: base.nurse,
    };
    let (frames, named) = frames(&ctx);
    for frame in frames {
        let frame = match frame {
            Frame::Binary(b) => tungstenite::Message::Binary(b.into()),
            Frame::Text(s) => tungstenite::Message::Text(s.into()),
        };
        if socket.send(frame).await.is_err() {
            break;
        }
    }
    let seen = if join_first {
        answers_until_probe(&mut socket, &me, &relay).await
    } else {
        let mut seen = Vec::new();
        for _ in 0..10 {
            let o = next_message(&mut socket).await;
            let done = matches!(
                o,
                Observed::Closed | Observed::Message(Message::Error { .. })
            );
            seen.push(o);
            if done {
                break;
            }
        }
        seen
    };
    let _ = socket.close(None).await;
    (classify(&seen, named), named)
}

fn classify(seen: &[Observed], named: Option<DocumentId>) -> Expect {
    for o in seen {
        match o {
            Observed::Message(Message::Error { message }) => {
                return Expect::Closed(Box::leak(message.clone().into_boxed_str()));
            }
            Observed::Message(Message::DocUnavailable { document_id, .. })
                if Some(*document_id) == named =>
            {
                return Expect::Unavailable;
            }
            Observed::Message(Message::Sync { .. }) => return Expect::Answered,
            Observed::Closed => return Expect::Closed("closed without an error message"),
            _ => {}
        }
    }
    Expect::Silent
}

fn matches(expect: &Expect, got: &Expect) -> bool {
    match (expect, got) {
        (Expect::Closed(want), Expect::Closed(got)) => got.contains(want),
        (a, b) => a == b,
    }
}

async fn http(w: &World, method: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> u16 {
    let url = format!("{}{path}", w.relay.http_base());
    let mut request = reqwest::Client::new()
        .request(method.parse().expect("method"), url)
        .timeout(WAIT)
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("HTTP").status().as_u16()
}

async fn upgrade_status(w: &World, token: Option<String>) -> Expect {
    let url = match token {
        Some(token) => w.relay.ws_url(&token),
        None => format!("ws://{}/v1/sync", w.relay.addr()),
    };
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("answered in time")
    {
        Ok(_) => Expect::Answered,
        Err(tungstenite::Error::Http(response)) => Expect::Status(response.status().as_u16()),
        Err(e) => panic!("upgrade failed oddly: {e}"),
    }
}

fn token_of(w: &World, kind: TokenKind) -> String {
    match kind {
        TokenKind::Empty => String::new(),
        TokenKind::Malformed => "not-a-token".into(),
        TokenKind::Unknown => "fct_".to_owned() + &"0".repeat(64),
        TokenKind::Expired => {
            let user = w.ctx_base.nurse.clone();
            let out = w.admin.run(&[
                "issue-token",
                "--user",
                &user,
                "--device",
                "expired phone",
                "--expires-at",
                "1000",
            ]);
            out["token"].as_str().expect("token").to_owned()
        }
        TokenKind::Revoked => {
            let issued = w.admin.issue_token(&w.ctx_base.nurse, "revoked phone");
            w.admin
                .run(&["revoke-device", "--device", &issued.device_id]);
            issued.token
        }
        TokenKind::NearMiss => {
            let (head, last) = w.device_token.split_at(w.device_token.len() - 1);
            format!("{head}{}", if last == "0" { "1" } else { "0" })
        }
    }
}

async fn run_special(w: &World, special: Special) -> Expect {
    match special {
        Special::MessageFlood => {
            // A token of its own: the rate is per device.
            let token = w
                .admin
                .issue_token(&w.ctx_base.nurse, "flooding phone")
                .token;
            let mut socket = connect(&w.relay, &token).await;
            let me = PeerId::new("flooder".into());
            let relay = join(&mut socket, &me).await;
            let ephemeral = map(&[
                ("type", t("ephemeral")),
                ("senderId", t(me.as_str())),
                ("targetId", t(relay.as_str())),
                ("documentId", t(&w.ctx_base.note.to_string())),
                ("count", Cbor::Uint(1)),
                ("sessionId", t("s")),
                ("data", Cbor::Bytes(vec![1])),
            ]);
            let burst = fieldchart_server::config::MESSAGE_BURST as usize;
            // Twice the burst: past it even if sending takes many seconds of refill.
            for _ in 0..burst * 2 {
                if socket
                    .feed(tungstenite::Message::Binary(ephemeral.clone().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = socket.flush().await;
            let mut seen = Vec::new();
            for _ in 0..10 {
                let o = next_message(&mut socket).await;
                let done = matches!(
                    o,
                    Observed::Closed | Observed::Message(Message::Error { .. })
                );
                seen.push(o);
                if done {
                    break;
                }
            }
            classify(&seen, None)
        }
        Special::SlowLoris => {
            // Many upgrades that never finish their headers, held open while a real device
            // syncs: the relay keeps answering it.
            let mut held = Vec::new();
            for _ in 0..64 {
                let mut stream = std::net::TcpStream::connect(w.relay.addr()).expect("tcp connect");
                stream
                    .write_all(
                        b"GET /v1/sync HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n",
                    )
                    .expect("half a request");
                held.push(stream);
            }
            let mut peer = TestPeer::connect(&w.relay.ws_url(&w.device_token), None)
                .await
                .expect("a device still connects");
            let id = peer.create(visit_note(
                &w.ctx_base.agency,
                &w.ctx_base.patient,
                &w.ctx_base.nurse,
            ));
            let outcome = peer.sync(id).await;
            drop(held);
            match outcome {
                SyncOutcome::InSync(_) => Expect::Answered,
                SyncOutcome::Unavailable => Expect::Unavailable,
            }
        }
        Special::OtherAgencyReads => {
            let mut peer = TestPeer::connect(&w.relay.ws_url(&w.other_agency_token), None)
                .await
                .expect("connect");
            match peer.fetch(w.ctx_base.note).await {
                SyncOutcome::InSync(_) => Expect::Answered,
                SyncOutcome::Unavailable => Expect::Unavailable,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_input_gets_its_designed_answer_and_harms_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = Admin::new(dir.path());
    let agency = admin.create_agency("Riverside");
    let other_agency = admin.create_agency("Elsewhere");
    let nurse = admin.create_user(&agency, "Maria", "clinician");
    let boss = admin.create_user(&agency, "Ada", "admin");
    let stranger = admin.create_user(&other_agency, "Eve", "office");
    let (patient, _) = admin.create_patient(&agency, "Grace");
    let (other_patient, _) = admin.create_patient(&other_agency, "Mallory");
    admin.assign(&nurse, &patient);
    let device_token = admin.issue_token(&nurse, "phone").token;
    let admin_token = admin.issue_token(&boss, "office pc").token;
    let other_agency_token = admin.issue_token(&stranger, "their pc").token;
    let watcher_token = admin.issue_token(&nurse, "tablet").token;
    let relay = RelayProcess::start(dir.path());

    // The stored note every row must leave untouched, and a peer connected throughout.
    let mut watcher = TestPeer::connect(&relay.ws_url(&watcher_token), Some("watcher"))
        .await
        .expect("watcher");
    let note_doc = visit_note(&agency, &patient, &nurse);
    let note = watcher.create(note_doc.clone());
    let SyncOutcome::InSync(stored_heads) = watcher.sync(note).await else {
        panic!("the note was not stored");
    };
    let stored_heads: Vec<ChangeHash> = stored_heads;

    let w = World {
        relay,
        admin: admin.clone(),
        ctx_base: CtxBase {
            note,
            note_doc: watcher.doc(note).expect("note").clone(),
            agency,
            patient,
            other_agency,
            other_patient,
            nurse,
        },
        admin_token,
        device_token,
        other_agency_token,
    };

    let rows = catalogue();
    assert!(rows.len() >= 40, "the catalogue has {} rows", rows.len());
    let mut failures = Vec::new();
    for row in &rows {
        let (got, named) = match &row.input {
            Input::Session { join, frames } => {
                // A token per row: rate limits and per-session refusal counts are per device.
                let token = w.admin.issue_token(&w.ctx_base.nurse, row.name).token;
                run_session(&w, &token, *join, frames.as_ref()).await
            }
            Input::Upgrade(kind) => (
                upgrade_status(&w, kind.map(|k| token_of(&w, k))).await,
                None,
            ),
            Input::Http {
                method,
                path,
                admin,
                body,
            } => {
                let ctx = Ctx {
                    me: PeerId::new("http".into()),
                    relay: PeerId::new("relay".into()),
                    note,
                    note_doc: note_doc.clone(),
                    agency: w.ctx_base.agency.clone(),
                    patient: w.ctx_base.patient.clone(),
                    other_agency: w.ctx_base.other_agency.clone(),
                    other_patient: w.ctx_base.other_patient.clone(),
                    nurse: w.ctx_base.nurse.clone(),
                };
                let token = if *admin {
                    &w.admin_token
                } else {
                    &w.device_token
                };
                let status = http(&w, method, &path(&ctx), Some(token), body.clone()).await;
                (Expect::Status(status), None)
            }
            Input::Special(special) => (run_special(&w, *special).await, None),
        };
        if !matches(&row.expect, &got) {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                row.name, row.expect, got
            ));
        }
        if row.not_stored {
            let id = named.expect("a refused row names its document");
            let mut reader = TestPeer::connect(&w.relay.ws_url(&w.admin_token), None)
                .await
                .expect("reader");
            if reader.fetch(id).await != SyncOutcome::Unavailable {
                failures.push(format!("{}: the refused document was stored", row.name));
            }
        }
        // The relay survived, serves the watcher, and the stored note is exactly as it was.
        match watcher.sync(note).await {
            SyncOutcome::InSync(heads) if heads == stored_heads => {}
            other => failures.push(format!(
                "{}: the stored note changed or became unavailable: {other:?}\nrelay log:\n{}",
                row.name,
                w.relay.logs()
            )),
        }
        let health = http(&w, "GET", "/healthz", None, Vec::new()).await;
        assert_eq!(health, 200, "after {}: /healthz", row.name);
        println!("ok: {} -> {:?}", row.name, got);
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    println!("{} hostile inputs, all answered as designed", rows.len());
}
