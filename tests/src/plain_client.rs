//! A plain automerge-repo protocol v1 client for the throughput benchmarks: core's protocol
//! codec and per-document automerge sync over one WebSocket, nothing Fieldchart-specific (no
//! token needed, no change feed, no classification), so the same code path measures
//! Fieldchart, the reference JavaScript sync server and a samod relay like for like.
//!
//! Unlike [`crate::relay_process::TestPeer`] (a test fixture that panics), every failure here
//! is an `Err` and every wait has a deadline, so a relay that never answers is reported, not
//! hung on. It pipelines: all documents' first messages go out at once, then it answers what
//! comes back until every document is settled.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use automerge::{Automerge, ChangeHash};
use fieldchart_core::protocol::{DocSync, DocumentId, Message, PeerId, PeerMetadata, StorageId};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Messages and payload bytes one client exchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Binary frames sent.
    pub messages_sent: u64,
    /// Binary frames received.
    pub messages_received: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
}

impl Traffic {
    /// Messages both ways.
    pub fn messages(&self) -> u64 {
        self.messages_sent + self.messages_received
    }
}

#[derive(Debug)]
struct Replica {
    doc: Automerge,
    sync: DocSync,
    unavailable: bool,
}

/// How a document ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The relay confirmed exactly these heads (ours).
    InSync(Vec<ChangeHash>),
    /// The relay answered `doc-unavailable`.
    Unavailable,
}

/// One protocol v1 connection holding documents in memory.
#[derive(Debug)]
pub struct PlainClient {
    socket: Socket,
    id: PeerId,
    relay_id: PeerId,
    docs: HashMap<DocumentId, Replica>,
    traffic: Traffic,
}

impl PlainClient {
    /// Connect to `url` and join (storage id `storage_id`, `None`: ephemeral); `Err` if the
    /// relay does not answer `peer` before `deadline`.
    pub async fn connect(
        url: &str,
        storage_id: Option<&str>,
        deadline: Instant,
    ) -> Result<PlainClient, String> {
        let id = PeerId::random("bench");
        let remaining = deadline.saturating_duration_since(Instant::now());
        let (socket, _) = tokio::time::timeout(remaining, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect {url}: {e}"))?;
        let mut client = PlainClient {
            socket,
            relay_id: PeerId::new(String::new()),
            id: id.clone(),
            docs: HashMap::new(),
            traffic: Traffic::default(),
        };
        client
            .send(Message::Join {
                sender_id: id,
                peer_metadata: PeerMetadata {
                    storage_id: storage_id.map(|s| StorageId::new(s.to_owned())),
                    is_ephemeral: storage_id.is_none(),
                },
                supported_protocol_versions: vec!["1".into()],
            })
            .await?;
        loop {
            match client.receive(deadline).await? {
                Message::Peer { sender_id, .. } => {
                    client.relay_id = sender_id;
                    return Ok(client);
                }
                Message::Error { message } => return Err(format!("join refused: {message}")),
                _ => continue,
            }
        }
    }

    /// What this connection exchanged so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Hold `doc` under `id` (sent by [`PlainClient::push`]).
    pub fn hold(&mut self, id: DocumentId, doc: Automerge) {
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

    /// Sync every document in `ids` (held) until the relay confirms our heads or refuses it.
    pub async fn push(
        &mut self,
        ids: &[DocumentId],
        deadline: Instant,
    ) -> Result<Vec<Settled>, String> {
        for id in ids {
            let replica = self
                .docs
                .get_mut(id)
                .ok_or_else(|| format!("push of {id}, which this client does not hold"))?;
            replica.unavailable = false;
            if let Some(data) = replica.sync.generate(&replica.doc) {
                let message = Message::Sync {
                    sender_id: self.id.clone(),
                    target_id: self.relay_id.clone(),
                    document_id: *id,
                    data,
                };
                self.send(message).await?;
            }
        }
        self.until_settled(ids, deadline).await
    }

    /// Ask for every document in `ids` (`request`) and sync until we hold what the relay holds
    /// (or it says `doc-unavailable`).
    pub async fn fetch(
        &mut self,
        ids: &[DocumentId],
        deadline: Instant,
    ) -> Result<Vec<Settled>, String> {
        for id in ids {
            let mut replica = Replica {
                doc: Automerge::new(),
                sync: DocSync::new(),
                unavailable: false,
            };
            let data = replica
                .sync
                .generate(&replica.doc)
                .ok_or("no first sync message for an empty document")?;
            self.docs.insert(*id, replica);
            let message = Message::Request {
                sender_id: self.id.clone(),
                target_id: self.relay_id.clone(),
                document_id: *id,
                data,
            };
            self.send(message).await?;
        }
        self.until_settled(ids, deadline).await
    }

    /// Stay connected doing nothing but answering the relay's pings (keep-alive) until `stop`
    /// changes; `Err` if the relay closes the session first.
    pub async fn idle(
        mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), String> {
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    let _ = self.socket.close(None).await;
                    return Ok(());
                }
                frame = self.socket.next() => match frame {
                    Some(Ok(tungstenite::Message::Close(frame))) => {
                        return Err(format!("the relay closed an idle session: {frame:?}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("idle session: {e}")),
                    None => return Err("the relay closed an idle session".into()),
                }
            }
        }
    }

    /// Close the connection.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }

    fn settled(&self, id: DocumentId) -> Option<Settled> {
        let replica = self.docs.get(&id)?;
        if replica.unavailable {
            Some(Settled::Unavailable)
        } else if replica.sync.in_sync(&replica.doc) && !replica.doc.get_heads().is_empty() {
            Some(Settled::InSync(replica.doc.get_heads()))
        } else {
            None
        }
    }

    async fn until_settled(
        &mut self,
        ids: &[DocumentId],
        deadline: Instant,
    ) -> Result<Vec<Settled>, String> {
        let mut pending: Vec<DocumentId> = ids.to_vec();
        loop {
            pending.retain(|id| self.settled(*id).is_none());
            if pending.is_empty() {
                return ids
                    .iter()
                    .map(|id| self.settled(*id).ok_or_else(|| "unsettled".to_owned()))
                    .collect();
            }
            let message = self.receive(deadline).await.map_err(|e| {
                format!(
                    "{e} ({} of {} documents unsettled)",
                    pending.len(),
                    ids.len()
                )
            })?;
            self.handle(message).await?;
        }
    }

    async fn handle(&mut self, message: Message) -> Result<(), String> {
        match message {
            Message::Sync {
                document_id, data, ..
            }
            | Message::Request {
                document_id, data, ..
            } => {
                let replica = self.docs.entry(document_id).or_insert_with(|| Replica {
                    doc: Automerge::new(),
                    sync: DocSync::new(),
                    unavailable: false,
                });
                replica
                    .sync
                    .receive(&mut replica.doc, &data)
                    .map_err(|e| format!("{document_id}: the relay's sync data: {e}"))?;
                if let Some(data) = replica.sync.generate(&replica.doc) {
                    let reply = Message::Sync {
                        sender_id: self.id.clone(),
                        target_id: self.relay_id.clone(),
                        document_id,
                        data,
                    };
                    self.send(reply).await?;
                }
            }
            Message::DocUnavailable { document_id, .. } => {
                if let Some(replica) = self.docs.get_mut(&document_id) {
                    replica.unavailable = true;
                }
            }
            Message::Error { message } => return Err(format!("the relay said error: {message}")),
            _ => {}
        }
        Ok(())
    }

    async fn send(&mut self, message: Message) -> Result<(), String> {
        let bytes = message.encode();
        self.traffic.messages_sent += 1;
        self.traffic.bytes_sent += bytes.len() as u64;
        self.socket
            .send(tungstenite::Message::Binary(bytes.into()))
            .await
            .map_err(|e| format!("send: {e}"))
    }

    async fn receive(&mut self, deadline: Instant) -> Result<Message, String> {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining == Duration::ZERO {
                return Err("deadline passed waiting for the relay".into());
            }
            let frame = tokio::time::timeout(remaining, self.socket.next())
                .await
                .map_err(|_| "deadline passed waiting for the relay".to_owned())?;
            match frame {
                Some(Ok(tungstenite::Message::Binary(bytes))) => {
                    self.traffic.messages_received += 1;
                    self.traffic.bytes_received += bytes.len() as u64;
                    return Message::decode(&bytes)
                        .map_err(|e| format!("an undecodable frame from the relay: {e}"));
                }
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    return Err(format!("the relay closed the connection: {frame:?}"));
                }
                Some(Err(e)) => return Err(format!("receive: {e}")),
                None => return Err("the relay closed the connection".into()),
                Some(Ok(_)) => continue,
            }
        }
    }
}
