//! The real relay, as a child process, and a minimal Rust peer to talk to it.
//!
//! [`RelayProcess`] runs the built `fieldchart-server` binary (`serve --listen 127.0.0.1:0`) on a
//! data directory, waits for the JSON line it prints once it listens (no sleeps), and kills it
//! on drop. [`RelayProcess::admin`] runs the admin CLI against a data directory and returns its
//! JSON. [`TestPeer`] speaks automerge-repo protocol v1 over a real WebSocket using
//! `fieldchart_core::protocol`, enough to create, fetch, edit and sync documents.
//!
//! Used by the `relay_*` tests and by the JavaScript interop test; keep this API stable:
//!
//! ```no_run
//! use fieldchart_tests::relay_process::{RelayProcess, TestPeer};
//! # async fn demo() {
//! let dir = tempfile::tempdir().unwrap();
//! let agency = RelayProcess::admin(dir.path(), &["create-agency", "--name", "Riverside"]);
//! let agency_id = agency["agencyId"].as_str().unwrap();
//! let user = RelayProcess::admin(dir.path(), &["create-user", "--agency", agency_id, "--name", "Ana", "--role", "office"]);
//! let token = RelayProcess::admin(dir.path(), &["issue-token", "--user", user["userId"].as_str().unwrap(), "--device", "phone"]);
//! let relay = RelayProcess::start(dir.path());
//! let mut peer = TestPeer::connect(&relay.ws_url(token["token"].as_str().unwrap()), Some("my-storage")).await.unwrap();
//! # }
//! ```
//!
//! The binary is looked up next to the test executable (`target/<profile>/fieldchart-server`).
//! `cargo test --workspace` builds it; when running only this crate's tests, build it first with
//! `cargo build -p fieldchart-server`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use automerge::{Automerge, ChangeHash};
use fieldchart_core::protocol::{DocSync, DocumentId, Message, PeerId, PeerMetadata, StorageId};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite;

/// How long the relay may take to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a peer waits for any one message from the relay; reached only when a test fails.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most messages one [`TestPeer::sync`] or [`TestPeer::fetch`] exchanges before giving up.
const MAX_SYNC_MESSAGES: usize = 200;

/// A running `fieldchart-server serve`. Killed when dropped.
#[derive(Debug)]
pub struct RelayProcess {
    data_dir: PathBuf,
    /// Extra `serve` arguments (TLS files), kept for restarts.
    serve_args: Vec<String>,
    /// Whether it serves TLS (`https://`, `wss://`).
    tls: bool,
    child: Option<Child>,
    addr: SocketAddr,
    storage_id: String,
    stderr: Arc<Mutex<String>>,
}

impl RelayProcess {
    /// The `fieldchart-server` binary of this build: `target/<profile>/fieldchart-server`, found
    /// from the running executable (a test in `target/<profile>/deps/`, or the benchmark binary
    /// in `target/<profile>/`; see [`crate::reconnect::server_binary`]).
    pub fn binary() -> PathBuf {
        crate::reconnect::server_binary().unwrap_or_else(|e| {
            panic!(
                "{e}: `cargo test --workspace` builds it, or run `cargo build -p \
                 fieldchart-server` before `cargo test -p fieldchart-tests`"
            )
        })
    }

    /// Start the relay on `data_dir` (created if needed) at a free port on 127.0.0.1, and
    /// return once it listens.
    pub fn start(data_dir: &Path) -> RelayProcess {
        Self::start_on(data_dir, "127.0.0.1:0", &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start the relay serving TLS with a PEM certificate chain and key (`serve --tls-cert
    /// --tls-key`); [`RelayProcess::http_base`] is then `https://127.0.0.1:<port>`.
    pub fn start_tls(data_dir: &Path, cert_pem: &Path, key_pem: &Path) -> RelayProcess {
        let args = vec![
            "--tls-cert".to_owned(),
            cert_pem.display().to_string(),
            "--tls-key".to_owned(),
            key_pem.display().to_string(),
        ];
        Self::start_on(data_dir, "127.0.0.1:0", &args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start a relay on a PostgreSQL database (`serve --database <database_url>`) at a free
    /// port: several may run on one database (scale-out). `data_dir` is only where it would
    /// keep files (none today).
    pub fn start_postgres(data_dir: &Path, database_url: &str) -> RelayProcess {
        let args = vec!["--database".to_owned(), database_url.to_owned()];
        Self::start_on(data_dir, "127.0.0.1:0", &args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Run `fieldchart-server --database <database_url> admin <args...>` (the admin CLI on a
    /// PostgreSQL database) and return its JSON; panics with its output if it fails.
    pub fn admin_postgres(database_url: &str, args: &[&str]) -> Value {
        let mut full = vec!["--database", database_url];
        full.extend_from_slice(args);
        let dir = std::env::temp_dir();
        match Self::try_admin(&dir, &full) {
            Ok(value) => value,
            Err(value) => panic!("`admin {}` failed: {value}", args.join(" ")),
        }
    }

    /// Start the relay with extra `serve` arguments; `Err` with its stderr if it does not come
    /// up (e.g. a wrong database key).
    pub fn try_start_with(data_dir: &Path, serve_args: &[String]) -> Result<RelayProcess, String> {
        Self::start_on(data_dir, "127.0.0.1:0", serve_args)
    }

    fn start_on(
        data_dir: &Path,
        listen: &str,
        serve_args: &[String],
    ) -> Result<RelayProcess, String> {
        let mut child = Command::new(Self::binary())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", listen])
            .args(serve_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the relay: {e}"))?;
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = match lines.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the relay did not report a listening address within {START_TIMEOUT:?}; its stderr:\n{}",
                    text(&stderr)
                ));
            }
        };
        let parsed: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let addr = parsed["listening"].as_str().and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "unexpected first line from the relay: {line:?}; its stderr:\n{}",
                text(&stderr)
            ));
        };
        Ok(RelayProcess {
            data_dir: data_dir.to_owned(),
            serve_args: serve_args.to_vec(),
            tls: parsed["tls"] == Value::Bool(true),
            child: Some(child),
            addr,
            storage_id: parsed["storageId"].as_str().unwrap_or_default().to_owned(),
            stderr,
        })
    }

    /// The address the relay listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://<addr>/v1/sync?token=<token>`: the URL a browser client would use.
    pub fn ws_url(&self, token: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}/v1/sync?token={token}", self.addr)
    }

    /// `http://<addr>` (`https://` for a TLS relay).
    pub fn http_base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The relay's advertised storage id (stable across restarts of the same data directory).
    pub fn storage_id(&self) -> &str {
        &self.storage_id
    }

    /// What the relay wrote to stderr so far (its logs).
    pub fn logs(&self) -> String {
        text(&self.stderr)
    }

    /// Kill the relay at once (SIGKILL: no graceful shutdown, as a crash or power cut).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill the relay and start it again on the same data directory, on the same port when it
    /// is still free (so clients can reconnect to the same URL), else on a new one.
    pub fn restart(&mut self) {
        self.kill();
        let listen = self.addr.to_string();
        let args = self.serve_args.clone();
        let fresh = Self::start_on(&self.data_dir, &listen, &args)
            .or_else(|_| Self::start_on(&self.data_dir, "127.0.0.1:0", &args))
            .unwrap_or_else(|e| panic!("{e}"));
        *self = fresh;
    }

    /// Run `fieldchart-server --data-dir <data_dir> admin <args...>` and return the JSON object it
    /// prints. Panics, with the CLI's output, if it fails.
    pub fn admin(data_dir: &Path, args: &[&str]) -> Value {
        match Self::try_admin(data_dir, args) {
            Ok(value) => value,
            Err(value) => panic!("`admin {}` failed: {value}", args.join(" ")),
        }
    }

    /// Like [`RelayProcess::admin`], but a failing command is `Err` with its JSON (`{"error":..}`).
    pub fn try_admin(data_dir: &Path, args: &[&str]) -> Result<Value, Value> {
        let output = Command::new(Self::binary())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("admin")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the admin CLI");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let value: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            Value::String(format!(
                "stdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        });
        if output.status.success() {
            Ok(value)
        } else {
            Err(value)
        }
    }

    /// `GET /v1/changes` with a bearer token: `(status, body)`.
    pub async fn changes(&self, token: &str, since: Option<&str>) -> (u16, Value) {
        let mut url = format!("{}/v1/changes?limit=1000", self.http_base());
        if let Some(since) = since {
            url.push_str("&since=");
            url.push_str(since);
        }
        self.get(&url, token).await
    }

    /// Every entry of the caller's change feed after `since`, following `next` until `more` is
    /// false; returns the entries and the final cursor.
    pub async fn all_changes(&self, token: &str, since: Option<&str>) -> (Vec<Value>, String) {
        let mut entries = Vec::new();
        let mut cursor = since.map(str::to_owned);
        for _ in 0..1000 {
            let (status, page) = self.changes(token, cursor.as_deref()).await;
            assert_eq!(status, 200, "change feed answered {page}");
            entries.extend(page["changes"].as_array().cloned().unwrap_or_default());
            cursor = page["next"].as_str().map(str::to_owned);
            if page["more"] != Value::Bool(true) {
                return (entries, cursor.unwrap_or_default());
            }
        }
        panic!("the change feed did not end after 1000 pages");
    }

    /// `GET <url>` with a bearer token: `(status, JSON body or the body as a string)`.
    pub async fn get(&self, url: &str, token: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .timeout(MESSAGE_TIMEOUT)
            .send()
            .await
            .expect("HTTP request to the relay");
        let status = response.status().as_u16();
        let body = response.text().await.expect("response body");
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&out);
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

fn text(buffer: &Arc<Mutex<String>>) -> String {
    buffer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

// --- the test peer -------------------------------------------------------------------------

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a connection was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The relay answered the upgrade with this HTTP status (401: bad, expired or revoked token).
    Status(u16),
    /// The relay refused the `join` with an `error` message.
    Refused(String),
    /// Anything else.
    Other(String),
}

/// What the relay answered about a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The relay confirmed it holds exactly these heads (ours).
    InSync(Vec<ChangeHash>),
    /// `doc-unavailable`: unknown, or not ours to see.
    Unavailable,
}

#[derive(Debug)]
struct Replica {
    doc: Automerge,
    sync: DocSync,
    unavailable: bool,
}

/// A protocol v1 peer over a real WebSocket, holding its documents in memory.
#[derive(Debug)]
pub struct TestPeer {
    socket: Socket,
    id: PeerId,
    storage_id: Option<String>,
    relay_id: PeerId,
    relay_metadata: PeerMetadata,
    docs: HashMap<DocumentId, Replica>,
    closed: Option<Option<String>>,
}

impl TestPeer {
    /// Connect to `url` (e.g. [`RelayProcess::ws_url`]) and join, advertising `storage_id`
    /// (`None`: an ephemeral peer).
    pub async fn connect(url: &str, storage_id: Option<&str>) -> Result<TestPeer, ConnectError> {
        let id = PeerId::random("rust-test-peer");
        let (socket, relay_id, relay_metadata) = open(url, &id, storage_id).await?;
        Ok(TestPeer {
            socket,
            id,
            storage_id: storage_id.map(str::to_owned),
            relay_id,
            relay_metadata,
            docs: HashMap::new(),
            closed: None,
        })
    }

    /// Connect again (same peer id, same storage id, same documents), as an app does after a
    /// network drop or a relay restart. Sync states keep only what a client persists (the
    /// shared heads), as after an app restart.
    pub async fn reconnect(&mut self, url: &str) -> Result<(), ConnectError> {
        let (socket, relay_id, relay_metadata) =
            open(url, &self.id, self.storage_id.as_deref()).await?;
        let _ = self.socket.close(None).await;
        self.socket = socket;
        self.relay_id = relay_id;
        self.relay_metadata = relay_metadata;
        self.closed = None;
        for replica in self.docs.values_mut() {
            replica.sync = DocSync::decode(&replica.sync.encode()).expect("a sync state decodes");
            replica.unavailable = false;
        }
        Ok(())
    }

    /// This peer's id.
    pub fn id(&self) -> &PeerId {
        &self.id
    }

    /// The relay's `peerMetadata` from the handshake.
    pub fn relay_metadata(&self) -> &PeerMetadata {
        &self.relay_metadata
    }

    /// Hold a new document under a fresh id (not yet sent: call [`TestPeer::sync`]).
    pub fn create(&mut self, doc: Automerge) -> DocumentId {
        let id = DocumentId::random();
        self.create_with_id(id, doc);
        id
    }

    /// Hold a new document under a given id (a signed note names its id in its signature).
    pub fn create_with_id(&mut self, id: DocumentId, doc: Automerge) {
        self.docs.insert(
            id,
            Replica {
                doc,
                sync: DocSync::new(),
                unavailable: false,
            },
        );
    }

    /// Our copy of a document.
    pub fn doc(&self, id: DocumentId) -> Option<&Automerge> {
        self.docs.get(&id).map(|r| &r.doc)
    }

    /// Our copy of a document, to edit (then [`TestPeer::sync`]).
    pub fn doc_mut(&mut self, id: DocumentId) -> Option<&mut Automerge> {
        self.docs.get_mut(&id).map(|r| &mut r.doc)
    }

    /// Sync a document we hold until the relay confirms our heads, or says `doc-unavailable`.
    pub async fn sync(&mut self, id: DocumentId) -> SyncOutcome {
        self.sync_all(&[id]).await.remove(0)
    }

    /// [`TestPeer::sync`] for many documents at once (all first messages go out together).
    pub async fn sync_all(&mut self, ids: &[DocumentId]) -> Vec<SyncOutcome> {
        for id in ids {
            let replica = self
                .docs
                .get_mut(id)
                .expect("sync a document the peer holds");
            replica.unavailable = false;
            if let Some(data) = replica.sync.generate(&replica.doc) {
                let message = Message::Sync {
                    sender_id: self.id.clone(),
                    target_id: self.relay_id.clone(),
                    document_id: *id,
                    data,
                };
                self.send(message).await;
            }
        }
        self.until_settled(ids).await
    }

    /// Ask the relay for a document we do not hold (`request`), and sync it until we hold what
    /// the relay holds.
    pub async fn fetch(&mut self, id: DocumentId) -> SyncOutcome {
        let mut replica = Replica {
            doc: Automerge::new(),
            sync: DocSync::new(),
            unavailable: false,
        };
        let data = replica
            .sync
            .generate(&replica.doc)
            .expect("a first sync message");
        self.docs.insert(id, replica);
        let message = Message::Request {
            sender_id: self.id.clone(),
            target_id: self.relay_id.clone(),
            document_id: id,
            data,
        };
        self.send(message).await;
        self.until_settled(&[id]).await.remove(0)
    }

    fn settled(&self, id: DocumentId) -> Option<SyncOutcome> {
        let replica = &self.docs[&id];
        if replica.unavailable {
            Some(SyncOutcome::Unavailable)
        } else if replica.sync.in_sync(&replica.doc) && !replica.doc.get_heads().is_empty() {
            Some(SyncOutcome::InSync(replica.doc.get_heads()))
        } else {
            None
        }
    }

    async fn until_settled(&mut self, ids: &[DocumentId]) -> Vec<SyncOutcome> {
        let budget = MAX_SYNC_MESSAGES * ids.len().max(1);
        for _ in 0..budget {
            if let Some(outcomes) = ids
                .iter()
                .map(|id| self.settled(*id))
                .collect::<Option<Vec<_>>>()
            {
                return outcomes;
            }
            if self.pump().await.is_none() {
                panic!(
                    "the relay closed the connection while syncing: {:?}",
                    self.closed
                );
            }
        }
        panic!("documents did not settle within {budget} messages");
    }

    /// Receive and handle one message from the relay: apply `sync` data to our replica (a
    /// document we did not hold is added) and answer it. Returns the message, or `None` once
    /// the connection is closed.
    pub async fn pump(&mut self) -> Option<Message> {
        let message = self.receive().await?;
        match &message {
            Message::Sync {
                document_id, data, ..
            } => {
                let replica = self.docs.entry(*document_id).or_insert_with(|| Replica {
                    doc: Automerge::new(),
                    sync: DocSync::new(),
                    unavailable: false,
                });
                replica
                    .sync
                    .receive(&mut replica.doc, data)
                    .expect("the relay's sync data applies");
                if let Some(data) = replica.sync.generate(&replica.doc) {
                    let reply = Message::Sync {
                        sender_id: self.id.clone(),
                        target_id: self.relay_id.clone(),
                        document_id: *document_id,
                        data,
                    };
                    self.send(reply).await;
                }
            }
            Message::DocUnavailable { document_id, .. } => {
                if let Some(replica) = self.docs.get_mut(document_id) {
                    replica.unavailable = true;
                }
            }
            _ => {}
        }
        Some(message)
    }

    /// Handle messages until `id` has `heads` (e.g. changes another device made, which the
    /// relay forwards live).
    pub async fn wait_for_heads(&mut self, id: DocumentId, heads: &[ChangeHash]) {
        for _ in 0..MAX_SYNC_MESSAGES {
            if self.doc(id).is_some_and(|d| d.get_heads() == heads) {
                return;
            }
            if self.pump().await.is_none() {
                panic!(
                    "the relay closed the connection while waiting for {id}: {:?}",
                    self.closed
                );
            }
        }
        panic!("{id} did not reach the expected heads within {MAX_SYNC_MESSAGES} messages");
    }

    /// Handle messages until the relay closes the connection; returns the relay's `error`
    /// message, if it sent one.
    pub async fn closed(&mut self) -> Option<String> {
        for _ in 0..10_000 {
            if let Some(reason) = &self.closed {
                return reason.clone();
            }
            self.pump().await;
        }
        panic!("the relay kept talking instead of closing");
    }

    /// Close the connection.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }

    async fn send(&mut self, message: Message) {
        // A send to a closed socket is seen by the next receive.
        let _ = self
            .socket
            .send(tungstenite::Message::Binary(message.encode().into()))
            .await;
    }

    async fn receive(&mut self) -> Option<Message> {
        loop {
            if self.closed.is_some() {
                return None;
            }
            let frame = tokio::time::timeout(MESSAGE_TIMEOUT, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no message from the relay within {MESSAGE_TIMEOUT:?}"));
            match frame {
                Some(Ok(tungstenite::Message::Binary(bytes))) => {
                    let message = Message::decode(&bytes).expect("the relay sends valid frames");
                    if let Message::Error { message: text } = &message {
                        self.closed = Some(Some(text.clone()));
                    }
                    return Some(message);
                }
                Some(Ok(tungstenite::Message::Close(_)) | Err(_)) | None => {
                    self.closed.get_or_insert(None);
                    return None;
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// Open a WebSocket to `url` and join as `id`; returns the socket and the relay's `peer` fields.
async fn open(
    url: &str,
    id: &PeerId,
    storage_id: Option<&str>,
) -> Result<(Socket, PeerId, PeerMetadata), ConnectError> {
    let connected = tokio::time::timeout(MESSAGE_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| ConnectError::Other("connect timed out".into()))?;
    let mut socket = match connected {
        Ok((socket, _)) => socket,
        Err(tungstenite::Error::Http(response)) => {
            return Err(ConnectError::Status(response.status().as_u16()));
        }
        Err(e) => return Err(ConnectError::Other(e.to_string())),
    };
    let join = Message::Join {
        sender_id: id.clone(),
        peer_metadata: PeerMetadata {
            storage_id: storage_id.map(|s| StorageId::new(s.to_owned())),
            is_ephemeral: storage_id.is_none(),
        },
        supported_protocol_versions: vec!["1".into()],
    };
    socket
        .send(tungstenite::Message::Binary(join.encode().into()))
        .await
        .map_err(|e| ConnectError::Other(e.to_string()))?;
    loop {
        let frame = tokio::time::timeout(MESSAGE_TIMEOUT, socket.next())
            .await
            .map_err(|_| ConnectError::Other("no answer to join".into()))?;
        match frame {
            Some(Ok(tungstenite::Message::Binary(bytes))) => {
                return match Message::decode(&bytes) {
                    Ok(Message::Peer {
                        sender_id,
                        peer_metadata,
                        ..
                    }) => Ok((socket, sender_id, peer_metadata)),
                    Ok(Message::Error { message }) => Err(ConnectError::Refused(message)),
                    other => Err(ConnectError::Other(format!("expected peer, got {other:?}"))),
                };
            }
            Some(Ok(tungstenite::Message::Close(_)) | Err(_)) | None => {
                return Err(ConnectError::Other("closed before answering join".into()));
            }
            Some(Ok(_)) => continue,
        }
    }
}

// --- fixtures ------------------------------------------------------------------------------

/// The admin CLI on one data directory, with typed helpers returning the new ids.
#[derive(Debug, Clone)]
pub struct Admin {
    data_dir: PathBuf,
    /// `--database` (PostgreSQL) instead of the data directory's SQLite file.
    database: Option<String>,
}

/// A device token issued by [`Admin::issue_token`].
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The bearer token.
    pub token: String,
    /// The device it belongs to.
    pub device_id: String,
}

impl Admin {
    /// The CLI on `data_dir`.
    pub fn new(data_dir: &Path) -> Admin {
        Admin {
            data_dir: data_dir.to_owned(),
            database: None,
        }
    }

    /// The CLI on a PostgreSQL database (`--database <database_url>`).
    pub fn postgres(database_url: &str) -> Admin {
        Admin {
            data_dir: std::env::temp_dir(),
            database: Some(database_url.to_owned()),
        }
    }

    /// Run any admin command (see [`RelayProcess::admin`]).
    pub fn run(&self, args: &[&str]) -> Value {
        match &self.database {
            Some(url) => RelayProcess::admin_postgres(url, args),
            None => RelayProcess::admin(&self.data_dir, args),
        }
    }

    fn field(value: &Value, key: &str) -> String {
        value[key]
            .as_str()
            .unwrap_or_else(|| panic!("`{key}` missing in {value}"))
            .to_owned()
    }

    /// A new agency's id.
    pub fn create_agency(&self, name: &str) -> String {
        Self::field(&self.run(&["create-agency", "--name", name]), "agencyId")
    }

    /// A new user's id (`role`: clinician, office or admin).
    pub fn create_user(&self, agency_id: &str, name: &str, role: &str) -> String {
        Self::field(
            &self.run(&[
                "create-user",
                "--agency",
                agency_id,
                "--name",
                name,
                "--role",
                role,
            ]),
            "userId",
        )
    }

    /// A new patient: `(patient id, chart document id)`.
    pub fn create_patient(&self, agency_id: &str, name: &str) -> (String, DocumentId) {
        let out = self.run(&["create-patient", "--agency", agency_id, "--name", name]);
        let doc = Self::field(&out, "documentId")
            .parse()
            .expect("a document id");
        (Self::field(&out, "patientId"), doc)
    }

    /// Put a user on a patient's care team.
    pub fn assign(&self, user_id: &str, patient_id: &str) {
        self.run(&["assign", "--user", user_id, "--patient", patient_id]);
    }

    /// A token for a new device of the user.
    pub fn issue_token(&self, user_id: &str, device: &str) -> IssuedToken {
        let out = self.run(&["issue-token", "--user", user_id, "--device", device]);
        IssuedToken {
            token: Self::field(&out, "token"),
            device_id: Self::field(&out, "deviceId"),
        }
    }

    /// A one-time enrollment code for a new device of the user.
    pub fn enroll(&self, user_id: &str, device: &str) -> String {
        Self::field(
            &self.run(&["enroll", "--user", user_id, "--device", device]),
            "code",
        )
    }

    /// Offboard a user: every device revoked, nothing new issued.
    pub fn disable_user(&self, user_id: &str) -> Value {
        self.run(&["disable-user", "--user", user_id])
    }

    /// Admin log rows (JSON objects), first page.
    pub fn admin_log(&self) -> Vec<Value> {
        self.run(&["admin-log", "--limit", "100000"])["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Audit rows (JSON objects) about a patient.
    pub fn audit_for_patient(&self, patient_id: &str) -> Vec<Value> {
        self.run(&["audit", "--patient", patient_id])["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A visit note as a device creates it: the root fields every Fieldchart document carries, as
/// scalar strings, and a narrative.
pub fn visit_note(agency_id: &str, patient_id: &str, created_by: &str) -> Automerge {
    use automerge::transaction::Transactable;
    let mut doc = Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(automerge::ROOT, "schema", "fieldchart/visit-note@1")?;
        tx.put(automerge::ROOT, "kind", "visit-note")?;
        tx.put(automerge::ROOT, "patientId", patient_id)?;
        tx.put(automerge::ROOT, "agencyId", agency_id)?;
        tx.put(automerge::ROOT, "createdBy", created_by)?;
        tx.put(
            automerge::ROOT,
            "createdAt",
            automerge::ScalarValue::Int(1_764_230_400_000),
        )?;
        tx.put(automerge::ROOT, "status", "draft")?;
        Ok(())
    })
    .expect("build a visit note");
    doc
}

/// Set a root scalar string (one change).
pub fn set(doc: &mut Automerge, key: &str, value: &str) {
    use automerge::transaction::Transactable;
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(automerge::ROOT, key, value).map(|_| ())
    })
    .expect("edit a document");
}

/// A root scalar string.
pub fn get(doc: &Automerge, key: &str) -> Option<String> {
    use automerge::ReadDoc;
    doc.get(automerge::ROOT, key)
        .ok()
        .flatten()
        .and_then(|(v, _)| v.as_str().map(str::to_owned))
}

/// Wall-clock time, ms since the epoch (documents and signatures carry it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Admin helpers used by the bindings test.
impl Admin {
    /// A one-time enrollment code and its QR payload (`{"v":1,"code":…}`), as the admin hands
    /// them to a nurse.
    pub fn enrollment_with_qr(&self, user_id: &str, device: &str) -> (String, String) {
        let out = self.run(&["enroll", "--user", user_id, "--device", device]);
        (Self::field(&out, "code"), Self::field(&out, "qr"))
    }

    /// Revoke one device (its open sessions close; its token is refused from now on).
    pub fn revoke_device(&self, device_id: &str) -> Value {
        self.run(&["revoke-device", "--device", device_id])
    }
}
