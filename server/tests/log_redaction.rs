//! A device token passed as `?token=` (what browsers must do) never reaches a log line, at any
//! level, from any crate. Alone in its test binary because it installs the process-wide log
//! subscriber (a thread-local one misses lines when tests run in parallel). The client side
//! upgrades by hand, so that the only code that could log the URL is the relay's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldchart_core::protocol::{Message, PeerId, PeerMetadata};
use fieldchart_server::config::Limits;
use fieldchart_server::identity::Role;
use fieldchart_server::storage::MemoryStorage;
use fieldchart_server::{AppState, admin};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite;

const WAIT: Duration = Duration::from_secs(10);

/// Send a WebSocket upgrade request for `path` on a fresh connection; returns the HTTP status
/// and, on 101, the connection as a client WebSocket.
async fn upgrade(
    addr: std::net::SocketAddr,
    path: &str,
) -> (
    u16,
    Option<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("in time")
            .expect("read");
        assert!(n == 1 && head.len() < 16_384, "incomplete response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    if status != 101 {
        return (status, None);
    }
    let socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        stream,
        tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    (status, Some(socket))
}

/// A `tracing` writer that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_token_in_the_query_string_never_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let storage = Arc::new(MemoryStorage::new());
    let state = AppState::new(storage.clone(), Limits::default())
        .await
        .expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fieldchart_server::run(listener, state, async {
        let _ = stopped.await;
    }));
    let agency = admin::create_agency(&*storage, &admin::AdminContext::cli("test"), "A")
        .await
        .expect("agency");
    let user = admin::create_user(
        &*storage,
        &admin::AdminContext::cli("test"),
        &agency.id,
        "U",
        Role::Office,
    )
    .await
    .expect("user");
    let (_, token) = admin::issue_token(
        &*storage,
        &admin::AdminContext::cli("test"),
        &user.id,
        "browser",
        admin::expiry_in_days(1),
    )
    .await
    .expect("token");

    // A good token: upgrade, join, a protocol exchange, close.
    let (status, socket) = upgrade(addr, &format!("/v1/sync?token={token}")).await;
    assert_eq!(status, 101);
    let mut socket = socket.expect("upgraded");
    let join = Message::Join {
        sender_id: PeerId::random("browser"),
        peer_metadata: PeerMetadata::default(),
        supported_protocol_versions: vec!["1".into()],
    };
    socket
        .send(tungstenite::Message::Binary(join.encode().into()))
        .await
        .expect("send");
    let answer = tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("in time");
    assert!(matches!(answer, Some(Ok(tungstenite::Message::Binary(_)))));
    socket.close(None).await.expect("close");

    // A well-formed but unknown token: refused.
    let bad = format!("fct_{}", "ab".repeat(32));
    assert_eq!(upgrade(addr, &format!("/v1/sync?token={bad}")).await.0, 401);

    let _ = stop.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("stopped")
        .expect("task")
        .expect("served");

    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
    assert!(
        logs.contains("path=/v1/sync status=101"),
        "the upgrade was logged:\n{logs}"
    );
    assert!(
        logs.contains("path=/v1/sync status=401"),
        "the refusal was logged:\n{logs}"
    );
    for secret in [&token, &bad] {
        assert!(
            !logs.contains(secret.as_str()),
            "a token leaked into the logs:\n{logs}"
        );
        assert!(
            !logs.contains(&secret[4..24]),
            "part of a token leaked into the logs:\n{logs}"
        );
    }
}
