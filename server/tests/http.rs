//! The relay's HTTP surface, served for real on 127.0.0.1:0 over in-memory storage: token
//! checks before the WebSocket upgrade, the change feed, the admin API, health, metrics,
//! graceful shutdown. (That a query-string token never reaches a log line is checked in
//! `log_redaction.rs`, alone in its process, because it installs the global log subscriber.)

use std::sync::Arc;
use std::time::Duration;

use fieldchart_core::protocol::{Message, PeerId, PeerMetadata};
use fieldchart_server::config::Limits;
use fieldchart_server::identity::{AgencyId, Role};
use fieldchart_server::storage::MemoryStorage;
use fieldchart_server::{AppState, admin};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

/// Longest any test waits; reached only when a test fails.
const WAIT: Duration = Duration::from_secs(10);

struct Relay {
    addr: std::net::SocketAddr,
    storage: Arc<MemoryStorage>,
    agency: AgencyId,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<fieldchart_server::Result<()>>,
}

impl Relay {
    async fn start() -> Relay {
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
        let agency = admin::create_agency(&*storage, "Riverside")
            .await
            .expect("agency")
            .id;
        Relay {
            addr,
            storage,
            agency,
            stop: Some(stop),
            server,
        }
    }

    async fn token(&self, role: Role) -> (String, String) {
        let user = admin::create_user(&*self.storage, &self.agency, "N", role)
            .await
            .expect("user");
        let (device, token) =
            admin::issue_token(&*self.storage, &user.id, "phone", admin::expiry_in_days(1))
                .await
                .expect("token");
        (token, device.id.to_string())
    }

    /// An HTTP request with an optional bearer token, over a plain TCP connection.
    async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
            .await
            .expect("answered in time")
            .expect("read");
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, dechunk(&body))
    }

    async fn json(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (status, body) = self.http(method, path, token, body).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, self.server)
            .await
            .expect("stopped in time")
            .expect("task")
            .expect("served");
    }
}

/// Undo `Transfer-Encoding: chunked` if the body uses it.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            return out;
        }
        if after.len() < size {
            return body.to_owned();
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(
    relay: &Relay,
    header_token: Option<&str>,
    query_token: Option<&str>,
) -> Result<Socket, u16> {
    let query = query_token
        .map(|t| format!("?token={t}"))
        .unwrap_or_default();
    let mut request = format!("ws://{}/v1/sync{query}", relay.addr)
        .into_client_request()
        .expect("request");
    if let Some(token) = header_token {
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("in time")
    {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("unexpected websocket error {e}"),
    }
}

async fn join(socket: &mut Socket) -> Message {
    let join = Message::Join {
        sender_id: PeerId::random("test"),
        peer_metadata: PeerMetadata::default(),
        supported_protocol_versions: vec!["1".into()],
    };
    socket
        .send(tungstenite::Message::Binary(join.encode().into()))
        .await
        .expect("send join");
    next_message(socket).await.expect("an answer")
}

/// The next protocol message, or `None` when the socket closed.
async fn next_message(socket: &mut Socket) -> Option<Message> {
    loop {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("in time")?
        {
            Ok(tungstenite::Message::Binary(bytes)) => {
                return Some(Message::decode(&bytes).expect("valid"));
            }
            Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn the_sync_endpoint_refuses_bad_expired_and_revoked_tokens_before_upgrading() {
    let relay = Relay::start().await;
    let (token, device) = relay.token(Role::Clinician).await;
    assert_eq!(ws_connect(&relay, None, None).await.err(), Some(401));
    assert_eq!(
        ws_connect(&relay, Some("fct_0000"), None).await.err(),
        Some(401)
    );
    assert_eq!(
        ws_connect(
            &relay,
            None,
            Some(&format!("{}0", &token[..token.len() - 1]))
        )
        .await
        .err(),
        Some(401)
    );

    let user = admin::create_user(&*relay.storage, &relay.agency, "N", Role::Clinician)
        .await
        .expect("user");
    let (_, expired) = admin::issue_token(
        &*relay.storage,
        &user.id,
        "old",
        fieldchart_server::clock::now_ms() - 1,
    )
    .await
    .expect("token");
    assert_eq!(
        ws_connect(&relay, Some(&expired), None).await.err(),
        Some(401)
    );

    // Header and query both work.
    let mut socket = ws_connect(&relay, Some(&token), None)
        .await
        .expect("header token");
    assert!(matches!(join(&mut socket).await, Message::Peer { .. }));
    let mut socket = ws_connect(&relay, None, Some(&token))
        .await
        .expect("query token");
    assert!(matches!(join(&mut socket).await, Message::Peer { .. }));

    admin::revoke_device(
        &*relay.storage,
        &fieldchart_server::identity::DeviceId::new(device),
    )
    .await
    .expect("revoke");
    assert_eq!(
        ws_connect(&relay, Some(&token), None).await.err(),
        Some(401)
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_change_feed_needs_a_token_and_lists_the_caseload() {
    let relay = Relay::start().await;
    let (office, _) = relay.token(Role::Office).await;
    assert_eq!(relay.json("GET", "/v1/changes", None, None).await.0, 401);
    assert_eq!(
        relay
            .json("GET", "/v1/changes", Some("fct_nope"), None)
            .await
            .0,
        401
    );
    let patient = admin::create_patient(
        &*relay.storage,
        &relay.agency,
        "Ada",
        &admin::cli_actor(),
        None,
    )
    .await
    .expect("patient");
    let (status, page) = relay.json("GET", "/v1/changes", Some(&office), None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["changes"][0]["documentId"],
        patient.chart_document_id.to_string()
    );
    assert_eq!(page["changes"][0]["kind"], "patient");
    assert_eq!(page["more"], false);
    let next = page["next"].as_str().expect("cursor").to_owned();
    let (_, again) = relay
        .json(
            "GET",
            &format!("/v1/changes?since={next}"),
            Some(&office),
            None,
        )
        .await;
    assert_eq!(again["changes"], json!([]));
    assert_eq!(
        relay
            .json("GET", "/v1/changes?since=garbage", Some(&office), None)
            .await
            .0,
        400
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_admin_api_is_for_admins_of_their_own_agency() {
    let relay = Relay::start().await;
    let (admin_token, _) = relay.token(Role::Admin).await;
    let (office_token, _) = relay.token(Role::Office).await;
    let (status, _) = relay
        .json(
            "POST",
            "/v1/admin/users",
            Some(&office_token),
            Some(json!({"name": "X", "role": "office"})),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        relay
            .json(
                "POST",
                "/v1/admin/users",
                None,
                Some(json!({"name": "X", "role": "office"}))
            )
            .await
            .0,
        401
    );

    let (status, nurse) = relay
        .json(
            "POST",
            "/v1/admin/users",
            Some(&admin_token),
            Some(json!({"name": "Maria", "role": "clinician"})),
        )
        .await;
    assert_eq!(status, 201, "{nurse}");
    let (status, patient) = relay
        .json(
            "POST",
            "/v1/admin/patients",
            Some(&admin_token),
            Some(json!({"name": "Ada"})),
        )
        .await;
    assert_eq!(status, 201, "{patient}");
    let body = json!({"userId": nurse["userId"], "patientId": patient["patientId"]});
    assert_eq!(
        relay
            .json(
                "POST",
                "/v1/admin/assign",
                Some(&admin_token),
                Some(body.clone())
            )
            .await
            .0,
        200
    );
    let (status, token) = relay
        .json(
            "POST",
            "/v1/admin/tokens",
            Some(&admin_token),
            Some(json!({"userId": nurse["userId"], "deviceName": "phone"})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let nurse_token = token["token"].as_str().expect("token").to_owned();

    // The nurse's feed shows the patient's chart; revoking her device over the API closes her
    // open session at once.
    let (_, feed) = relay
        .json("GET", "/v1/changes", Some(&nurse_token), None)
        .await;
    assert_eq!(feed["changes"][0]["documentId"], patient["documentId"]);
    let mut socket = ws_connect(&relay, Some(&nurse_token), None)
        .await
        .expect("connect");
    assert!(matches!(join(&mut socket).await, Message::Peer { .. }));
    let revoke = format!(
        "/v1/admin/devices/{}/revoke",
        token["deviceId"].as_str().expect("device")
    );
    let (status, revoked) = relay.json("POST", &revoke, Some(&admin_token), None).await;
    assert_eq!(
        (
            status,
            revoked["revoked"].clone(),
            revoked["sessionsClosed"].clone()
        ),
        (200, json!(true), json!(1))
    );
    assert!(
        matches!(next_message(&mut socket).await, Some(Message::Error { message }) if message.contains("revoked"))
    );
    assert_eq!(next_message(&mut socket).await, None);

    // Another agency's ids look like missing ids.
    let other = admin::create_agency(&*relay.storage, "Hillside")
        .await
        .expect("agency");
    let stranger = admin::create_user(&*relay.storage, &other.id, "S", Role::Clinician)
        .await
        .expect("user");
    let body = json!({"userId": stranger.id, "patientId": patient["patientId"]});
    assert_eq!(
        relay
            .json("POST", "/v1/admin/assign", Some(&admin_token), Some(body))
            .await
            .0,
        404
    );
    let path = format!("/v1/admin/audit?user={}", stranger.id);
    assert_eq!(
        relay.json("GET", &path, Some(&admin_token), None).await.0,
        404
    );

    // Audit, JSON and CSV, by patient.
    let path = format!(
        "/v1/admin/audit?patient={}",
        patient["patientId"].as_str().expect("id")
    );
    let (status, rows) = relay.json("GET", &path, Some(&admin_token), None).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(
        rows["rows"][0]["action"], "write",
        "creating the chart over the API is a write by the admin's device"
    );
    let (status, csv) = relay
        .http(
            "GET",
            &format!("{path}&format=csv&from=2000-01-01"),
            Some(&admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        csv.starts_with(fieldchart_server::audit::CSV_HEADER),
        "{csv}"
    );
    assert_eq!(
        relay
            .json(
                "GET",
                &format!("{path}&from=2030-01-01&to=2020-01-01"),
                Some(&admin_token),
                None
            )
            .await
            .0,
        400
    );
    relay.stop().await;
}

#[tokio::test]
async fn health_and_metrics_answer() {
    let relay = Relay::start().await;
    let (status, health) = relay.json("GET", "/healthz", None, None).await;
    assert_eq!((status, health["status"].clone()), (200, json!("ok")));
    let (token, _) = relay.token(Role::Office).await;
    let mut socket = ws_connect(&relay, Some(&token), None)
        .await
        .expect("connect");
    join(&mut socket).await;
    let (status, metrics) = relay.http("GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    for name in [
        "fieldchart_sessions_active",
        "fieldchart_messages_received_total",
        "fieldchart_received_bytes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn shutdown_closes_open_sessions_and_returns() {
    let relay = Relay::start().await;
    let (token, _) = relay.token(Role::Office).await;
    let mut socket = ws_connect(&relay, Some(&token), None)
        .await
        .expect("connect");
    join(&mut socket).await;
    let closing = tokio::spawn(async move {
        let mut close_code = None;
        while let Some(Ok(frame)) = socket.next().await {
            if let tungstenite::Message::Close(Some(frame)) = frame {
                close_code = Some(u16::from(frame.code));
            }
        }
        close_code
    });
    relay.stop().await;
    assert_eq!(
        tokio::time::timeout(WAIT, closing)
            .await
            .expect("in time")
            .expect("task"),
        Some(1001)
    );
}
