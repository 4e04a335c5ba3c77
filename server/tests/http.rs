//! The relay's HTTP surface, served for real on 127.0.0.1:0 over in-memory storage: token
//! checks before the WebSocket upgrade, the change feed, the admin API, health, metrics,
//! graceful shutdown. (That a query-string token never reaches a log line is checked in
//! `log_redaction.rs`, alone in its process, because it installs the global log subscriber.)

use std::sync::Arc;
use std::time::Duration;

use fieldchart_core::protocol::{Message, PeerId, PeerMetadata};
use fieldchart_server::config::Limits;
use fieldchart_server::identity::{AgencyId, Role};
use fieldchart_server::storage::{MemoryStorage, Storage};
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
        let agency =
            admin::create_agency(&*storage, &admin::AdminContext::cli("test"), "Riverside")
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
        let user = admin::create_user(
            &*self.storage,
            &admin::AdminContext::cli("test"),
            &self.agency,
            "N",
            role,
        )
        .await
        .expect("user");
        let (device, token) = admin::issue_token(
            &*self.storage,
            &admin::AdminContext::cli("test"),
            &user.id,
            "phone",
            admin::expiry_in_days(1),
        )
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

/// `token` with its last hex digit replaced by a different one (a near miss that must fail).
fn with_last_digit_changed(token: &str) -> String {
    let (head, last) = token.split_at(token.len() - 1);
    let other = if last == "0" { "1" } else { "0" };
    format!("{head}{other}")
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
        ws_connect(&relay, None, Some(&with_last_digit_changed(&token)))
            .await
            .err(),
        Some(401)
    );

    let user = admin::create_user(
        &*relay.storage,
        &admin::AdminContext::cli("test"),
        &relay.agency,
        "N",
        Role::Clinician,
    )
    .await
    .expect("user");
    let (_, expired) = admin::issue_token(
        &*relay.storage,
        &admin::AdminContext::cli("test"),
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
        &admin::AdminContext::cli("test"),
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
        &admin::AdminContext::cli("test"),
        &relay.agency,
        "Ada",
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
    let other = admin::create_agency(
        &*relay.storage,
        &admin::AdminContext::cli("test"),
        "Hillside",
    )
    .await
    .expect("agency");
    let stranger = admin::create_user(
        &*relay.storage,
        &admin::AdminContext::cli("test"),
        &other.id,
        "S",
        Role::Clinician,
    )
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
    // On the public listener, /metrics is for admins only.
    assert_eq!(relay.http("GET", "/metrics", None, None).await.0, 401);
    assert_eq!(
        relay.http("GET", "/metrics", Some(&token), None).await.0,
        403
    );
    let (admin_token, _) = relay.token(Role::Admin).await;
    let (status, metrics) = relay
        .http("GET", "/metrics", Some(&admin_token), None)
        .await;
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

// --- accountable administration, enrollment, offboarding (issues 9 and 7) --------------------

/// A fresh device key pair's public half, as hex (the relay only stores and lists it).
fn public_key_hex(seed: u8) -> String {
    hex_of(&[seed; 32])
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every admin log row of the relay's first agency, via the CLI-side function.
async fn admin_rows(relay: &Relay) -> Vec<Value> {
    let (rows, next) = admin::admin_log(
        &*relay.storage,
        &admin::AdminContext::cli("test"),
        fieldchart_server::storage::AdminLogQuery {
            agency_id: Some(relay.agency.clone()),
            target: None,
            actor: None,
            after_id: 0,
            limit: 10_000,
        },
    )
    .await
    .expect("admin log");
    assert!(next.is_none());
    rows.iter().map(admin::admin_record_json).collect()
}

#[tokio::test]
async fn every_http_admin_operation_writes_a_full_admin_log_row() {
    let relay = Relay::start().await;
    let admin_user = admin::create_user(
        &*relay.storage,
        &admin::AdminContext::cli("ops"),
        &relay.agency,
        "Boss",
        Role::Admin,
    )
    .await
    .expect("admin");
    let (admin_device, admin_token) = admin::issue_token(
        &*relay.storage,
        &admin::AdminContext::cli("ops"),
        &admin_user.id,
        "desk",
        admin::expiry_in_days(1),
    )
    .await
    .expect("admin token");
    let t = Some(admin_token.as_str());

    let (_, nurse) = relay
        .json(
            "POST",
            "/v1/admin/users",
            t,
            Some(json!({"name": "Maria", "role": "clinician"})),
        )
        .await;
    let nurse_id = nurse["userId"].as_str().expect("user").to_owned();
    let (_, patient) = relay
        .json(
            "POST",
            "/v1/admin/patients",
            t,
            Some(json!({"name": "Ada Lovelace"})),
        )
        .await;
    let patient_id = patient["patientId"].as_str().expect("patient").to_owned();
    let team = json!({"userId": nurse_id, "patientId": patient_id});
    assert_eq!(
        relay
            .json("POST", "/v1/admin/assign", t, Some(team.clone()))
            .await
            .0,
        200
    );
    assert_eq!(
        relay
            .json("POST", "/v1/admin/unassign", t, Some(team))
            .await
            .0,
        200
    );
    let (status, token) = relay
        .json(
            "POST",
            "/v1/admin/tokens",
            t,
            Some(json!({"userId": nurse_id, "deviceName": "phone"})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let device_id = token["deviceId"].as_str().expect("device").to_owned();
    let (status, code) = relay
        .json(
            "POST",
            "/v1/admin/enrollments",
            t,
            Some(json!({"userId": nurse_id, "deviceName": "tablet"})),
        )
        .await;
    assert_eq!(status, 201, "{code}");
    let revoke = format!("/v1/admin/devices/{device_id}/revoke");
    assert_eq!(relay.json("POST", &revoke, t, None).await.0, 200);
    let devices = format!("/v1/admin/users/{nurse_id}/devices");
    assert_eq!(relay.json("GET", &devices, t, None).await.0, 200);
    let audit = format!("/v1/admin/audit?patient={patient_id}");
    assert_eq!(relay.json("GET", &audit, t, None).await.0, 200);
    let disable = format!("/v1/admin/users/{nurse_id}/disable");
    assert_eq!(relay.json("POST", &disable, t, None).await.0, 200);
    assert_eq!(relay.json("GET", "/v1/admin/log", t, None).await.0, 200);

    let rows = admin_rows(&relay).await;
    let http_rows: Vec<&Value> = rows.iter().filter(|r| r["source"] == "http").collect();
    let expected = [
        ("create-user", nurse_id.as_str()),
        ("create-patient", patient_id.as_str()),
        ("assign", nurse_id.as_str()),
        ("unassign", nurse_id.as_str()),
        ("issue-token", device_id.as_str()),
        ("enroll", nurse_id.as_str()),
        ("revoke-device", device_id.as_str()),
        ("list-devices", nurse_id.as_str()),
        ("audit-query", patient_id.as_str()),
        ("disable-user", nurse_id.as_str()),
        ("admin-log-query", "*"),
    ];
    assert_eq!(
        http_rows
            .iter()
            .map(|r| (
                r["action"].as_str().unwrap_or(""),
                r["target"].as_str().unwrap_or("")
            ))
            .collect::<Vec<_>>(),
        expected.to_vec(),
        "{rows:#?}"
    );
    for row in &http_rows {
        assert_eq!(row["actor"], json!(admin_user.id), "{row}");
        assert_eq!(row["actorDeviceId"], json!(admin_device.id), "{row}");
        assert_eq!(row["agencyId"], json!(relay.agency), "{row}");
        let remote = row["remoteAddr"].as_str().unwrap_or_default();
        assert!(remote.starts_with("127.0.0.1:"), "{row}");
        assert!(
            row["atMs"].as_i64().unwrap_or(0) > 1_700_000_000_000,
            "{row}"
        );
    }
    // No patient data in the log: the patient's name is in the chart, not in the row.
    assert!(!format!("{rows:?}").contains("Lovelace"));
    // The CLI rows name their operator.
    let cli: Vec<&Value> = rows.iter().filter(|r| r["source"] == "cli").collect();
    assert!(
        cli.iter()
            .any(|r| r["actor"] == "cli:ops" && r["action"] == "issue-token")
    );
    // The device issued over HTTP records who issued it.
    let (_, listed) = relay.json("GET", &devices, t, None).await;
    assert_eq!(
        listed["devices"][0]["enrolledBy"],
        json!(admin_user.id),
        "{listed}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn admins_cannot_obtain_credentials_for_admins_over_http() {
    let relay = Relay::start().await;
    let (admin_token, _) = relay.token(Role::Admin).await;
    let other_admin = admin::create_user(
        &*relay.storage,
        &admin::AdminContext::cli("ops"),
        &relay.agency,
        "Other admin",
        Role::Admin,
    )
    .await
    .expect("admin");
    let t = Some(admin_token.as_str());
    let (status, body) = relay
        .json(
            "POST",
            "/v1/admin/tokens",
            t,
            Some(json!({"userId": other_admin.id, "deviceName": "x"})),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = relay
        .json(
            "POST",
            "/v1/admin/enrollments",
            t,
            Some(json!({"userId": other_admin.id, "deviceName": "x"})),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    // Nothing was provisioned, and nothing was logged as done.
    let (_, devices) = relay
        .json(
            "GET",
            &format!("/v1/admin/users/{}/devices", other_admin.id),
            t,
            None,
        )
        .await;
    assert_eq!(devices["devices"], json!([]));
    let rows = admin_rows(&relay).await;
    assert!(
        !rows
            .iter()
            .any(|r| r["source"] == "http"
                && (r["action"] == "issue-token" || r["action"] == "enroll")),
        "{rows:#?}"
    );
    // Token lifetimes are capped.
    let (nurse_token_status, body) = relay
        .json(
            "POST",
            "/v1/admin/tokens",
            t,
            Some(json!({"userId": other_admin.id, "deviceName": "x", "ttlDays": 100_000})),
        )
        .await;
    assert!(matches!(nurse_token_status, 400 | 403), "{body}");
    let nurse = admin::create_user(
        &*relay.storage,
        &admin::AdminContext::cli("ops"),
        &relay.agency,
        "Nurse",
        Role::Clinician,
    )
    .await
    .expect("nurse");
    let (status, body) = relay
        .json(
            "POST",
            "/v1/admin/tokens",
            t,
            Some(json!({"userId": nurse.id, "deviceName": "x", "ttlDays": 100_000})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    relay.stop().await;
}

/// Redeem an enrollment code: `(status, body)`.
async fn redeem(relay: &Relay, code: &str, key: &str) -> (u16, Value) {
    relay
        .json(
            "POST",
            "/v1/enroll",
            None,
            Some(json!({"code": code, "publicKey": key, "deviceName": "Maria's phone"})),
        )
        .await
}

#[tokio::test]
async fn enrollment_codes_are_single_use_short_lived_and_bind_the_key() {
    let relay = Relay::start().await;
    let (admin_token, _) = relay.token(Role::Admin).await;
    let t = Some(admin_token.as_str());
    let nurse = admin::create_user(
        &*relay.storage,
        &admin::AdminContext::cli("ops"),
        &relay.agency,
        "Maria",
        Role::Clinician,
    )
    .await
    .expect("nurse");
    let (_, issued) = relay
        .json("POST", "/v1/admin/enrollments", t, Some(json!({"userId": nurse.id, "deviceName": "phone", "relayUrl": "https://relay.example"})))
        .await;
    let code = issued["code"].as_str().expect("code").to_owned();
    let qr: Value = serde_json::from_str(issued["qr"].as_str().expect("qr")).expect("qr json");
    assert_eq!(
        (qr["code"].as_str(), qr["relay"].as_str()),
        (Some(code.as_str()), Some("https://relay.example"))
    );

    // A malformed key creates nothing and leaves the code usable.
    assert_eq!(redeem(&relay, &code, "abcd").await.0, 400);
    let (status, enrolled) = redeem(&relay, &code, &public_key_hex(1)).await;
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(enrolled["userId"], json!(nurse.id));
    assert_eq!(enrolled["agencyId"], json!(relay.agency));
    assert_eq!(enrolled["role"], "clinician");
    let token = enrolled["token"].as_str().expect("token").to_owned();
    // Used twice: refused, nothing created.
    let (status, body) = redeem(&relay, &code, &public_key_hex(2)).await;
    assert_eq!(status, 409, "{body}");
    // An unknown code.
    assert_eq!(
        redeem(
            &relay,
            "fce_00000000000000000000000000000000",
            &public_key_hex(3)
        )
        .await
        .0,
        404
    );
    // An expired code (issued with a lifetime already over).
    let expired = "fce_11111111111111111111111111111111";
    relay
        .storage
        .admin_change(
            fieldchart_server::storage::AdminChange::InsertEnrollmentCode(
                fieldchart_server::storage::EnrollmentCode {
                    code_hash: fieldchart_server::auth::hash_secret(expired),
                    user_id: nurse.id.clone(),
                    device_name: "old".into(),
                    created_at: 1,
                    expires_at: fieldchart_server::clock::now_ms() - 1,
                    created_by: "cli:test".into(),
                },
            ),
            admin::AdminContext::cli("test").event(None, "enroll", nurse.id.as_str(), json!({})),
        )
        .await
        .expect("expired code");
    let (status, body) = redeem(&relay, expired, &public_key_hex(4)).await;
    assert_eq!(status, 410, "{body}");

    // Exactly one device, with the key, enrolled by the admin who issued the code.
    let (_, devices) = relay
        .json(
            "GET",
            &format!("/v1/admin/users/{}/devices", nurse.id),
            t,
            None,
        )
        .await;
    assert_eq!(
        devices["devices"].as_array().map(Vec::len),
        Some(1),
        "{devices}"
    );
    assert_eq!(devices["devices"][0]["publicKey"], json!(public_key_hex(1)));
    assert_eq!(devices["devices"][0]["name"], "Maria's phone");
    let admin_id = relay
        .storage
        .device_by_token_hash(fieldchart_server::auth::hash_token(&admin_token))
        .await
        .expect("lookup")
        .expect("admin device")
        .1
        .id;
    assert_eq!(devices["devices"][0]["enrolledBy"], json!(admin_id));
    // The enrollment itself is in the admin log, from the device's address.
    let rows = admin_rows(&relay).await;
    let row = rows
        .iter()
        .find(|r| r["action"] == "enroll-device")
        .expect("enroll-device row");
    assert_eq!(row["actor"], json!(nurse.id));
    assert_eq!(row["target"], enrolled["deviceId"]);
    assert_eq!(row["details"]["enrolledBy"], json!(admin_id));
    assert!(
        row["remoteAddr"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:")
    );

    // The keys list: the new key, then revoked.
    let (status, keys) = relay.json("GET", "/v1/keys", Some(&token), None).await;
    assert_eq!(status, 200, "{keys}");
    assert_eq!(keys["agencyId"], json!(relay.agency));
    let entry = &keys["keys"][0];
    assert_eq!(
        (
            entry["userId"].clone(),
            entry["role"].clone(),
            entry["deviceId"].clone(),
            entry["publicKey"].clone(),
            entry["revokedAtMs"].clone()
        ),
        (
            json!(nurse.id),
            json!("clinician"),
            enrolled["deviceId"].clone(),
            json!(public_key_hex(1)),
            Value::Null
        )
    );
    assert!(entry["enrolledAtMs"].as_i64().unwrap_or(0) > 0);
    let revoke = format!(
        "/v1/admin/devices/{}/revoke",
        enrolled["deviceId"].as_str().expect("id")
    );
    assert_eq!(relay.json("POST", &revoke, t, None).await.0, 200);
    let (_, keys) = relay
        .json("GET", "/v1/keys", Some(&admin_token), None)
        .await;
    let entry = keys["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|e| e["deviceId"] == enrolled["deviceId"]))
        .expect("revoked key still listed");
    assert!(
        entry["revokedAtMs"].as_i64().unwrap_or(0)
            >= entry["enrolledAtMs"].as_i64().unwrap_or(i64::MAX)
    );
    let key = relay
        .storage
        .device_key(fieldchart_server::identity::DeviceId::new(
            enrolled["deviceId"].as_str().expect("id"),
        ))
        .await
        .expect("device key")
        .expect("has a key");
    assert_eq!(key.public_key, [1; 32]);
    assert!(key.revoked_at_ms.is_some());
    assert_eq!(
        relay.json("GET", "/v1/keys", Some(&token), None).await.0,
        401
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_code_enrolls_into_its_own_agency_only() {
    let relay = Relay::start().await;
    let cli = admin::AdminContext::cli("ops");
    let (admin_a, _) = relay.token(Role::Admin).await;
    let agency_b = admin::create_agency(&*relay.storage, &cli, "Hillside")
        .await
        .expect("agency");
    let admin_b = admin::create_user(&*relay.storage, &cli, &agency_b.id, "B admin", Role::Admin)
        .await
        .expect("admin b");
    let (_, admin_b_token) = admin::issue_token(
        &*relay.storage,
        &cli,
        &admin_b.id,
        "desk",
        admin::expiry_in_days(1),
    )
    .await
    .expect("token");
    let nurse_a = admin::create_user(
        &*relay.storage,
        &cli,
        &relay.agency,
        "A nurse",
        Role::Clinician,
    )
    .await
    .expect("nurse");
    // B's admin cannot issue a code for A's user: it looks missing.
    let (status, _) = relay
        .json(
            "POST",
            "/v1/admin/enrollments",
            Some(&admin_b_token),
            Some(json!({"userId": nurse_a.id, "deviceName": "x"})),
        )
        .await;
    assert_eq!(status, 404);
    // A's code, whoever redeems it, makes a device of A's user that sees only agency A.
    let (_, issued) = relay
        .json(
            "POST",
            "/v1/admin/enrollments",
            Some(&admin_a),
            Some(json!({"userId": nurse_a.id, "deviceName": "x"})),
        )
        .await;
    let b_patient = admin::create_patient(&*relay.storage, &cli, &agency_b.id, "B patient")
        .await
        .expect("patient");
    let (status, enrolled) = redeem(
        &relay,
        issued["code"].as_str().expect("code"),
        &public_key_hex(9),
    )
    .await;
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(enrolled["agencyId"], json!(relay.agency));
    let token = enrolled["token"].as_str().expect("token");
    let (_, keys) = relay.json("GET", "/v1/keys", Some(token), None).await;
    assert_eq!(keys["agencyId"], json!(relay.agency));
    assert_eq!(keys["keys"].as_array().map(Vec::len), Some(1), "{keys}");
    let (_, b_keys) = relay
        .json("GET", "/v1/keys", Some(&admin_b_token), None)
        .await;
    assert_eq!(b_keys["keys"], json!([]), "agency B sees none of A's keys");
    let (_, feed) = relay.json("GET", "/v1/changes", Some(token), None).await;
    assert!(
        !feed
            .to_string()
            .contains(&b_patient.chart_document_id.to_string()),
        "{feed}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn disabling_a_user_closes_sessions_within_a_second_and_refuses_new_devices() {
    let relay = Relay::start().await;
    let (admin_token, _) = relay.token(Role::Admin).await;
    let t = Some(admin_token.as_str());
    let cli = admin::AdminContext::cli("ops");
    let nurse = admin::create_user(
        &*relay.storage,
        &cli,
        &relay.agency,
        "Leaving",
        Role::Clinician,
    )
    .await
    .expect("nurse");
    let mut tokens = Vec::new();
    for name in ["phone", "tablet"] {
        tokens.push(
            admin::issue_token(
                &*relay.storage,
                &cli,
                &nurse.id,
                name,
                admin::expiry_in_days(1),
            )
            .await
            .expect("token")
            .1,
        );
    }
    let mut sockets = Vec::new();
    for token in &tokens {
        let mut socket = ws_connect(&relay, Some(token), None)
            .await
            .expect("connect");
        assert!(matches!(join(&mut socket).await, Message::Peer { .. }));
        sockets.push(socket);
    }
    // Last seen is recorded at authentication.
    let devices = format!("/v1/admin/users/{}/devices", nurse.id);
    let (_, listed) = relay.json("GET", &devices, t, None).await;
    assert!(
        listed["devices"][0]["lastSeenAtMs"].as_i64().is_some(),
        "{listed}"
    );

    let started = std::time::Instant::now();
    let (status, disabled) = relay
        .json(
            "POST",
            &format!("/v1/admin/users/{}/disable", nurse.id),
            t,
            None,
        )
        .await;
    assert_eq!(status, 200, "{disabled}");
    assert_eq!(disabled["devicesRevoked"].as_array().map(Vec::len), Some(2));
    for socket in &mut sockets {
        loop {
            match tokio::time::timeout(WAIT, next_message(socket))
                .await
                .expect("the revoked session closed")
            {
                None => break,
                Some(_) => continue,
            }
        }
    }
    // In-process revocation closes sessions at once; a second is the product bound (DESIGN
    // §5), plus 2 s of margin for a loaded 2-core machine.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    for token in &tokens {
        assert_eq!(ws_connect(&relay, Some(token), None).await.err(), Some(401));
    }
    // No new credentials of any kind.
    let (status, _) = relay
        .json(
            "POST",
            "/v1/admin/tokens",
            t,
            Some(json!({"userId": nurse.id, "deviceName": "new"})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = relay
        .json(
            "POST",
            "/v1/admin/enrollments",
            t,
            Some(json!({"userId": nurse.id, "deviceName": "new"})),
        )
        .await;
    assert_eq!(status, 403);
    assert!(matches!(
        admin::issue_token(
            &*relay.storage,
            &cli,
            &nurse.id,
            "cli",
            admin::expiry_in_days(1)
        )
        .await,
        Err(fieldchart_server::Error::Forbidden(_))
    ));
    let (_, listed) = relay.json("GET", &devices, t, None).await;
    assert!(listed["disabledAt"].is_string(), "{listed}");
    assert!(
        listed["devices"]
            .as_array()
            .is_some_and(|d| d.len() == 2 && d.iter().all(|d| d["revokedAt"].is_string())),
        "{listed}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_code_issued_before_disabling_cannot_be_redeemed_after() {
    let relay = Relay::start().await;
    let cli = admin::AdminContext::cli("ops");
    let nurse = admin::create_user(&*relay.storage, &cli, &relay.agency, "N", Role::Clinician)
        .await
        .expect("nurse");
    let issued = admin::enroll(&*relay.storage, &cli, &nurse.id, "phone", None)
        .await
        .expect("code");
    admin::disable_user(&*relay.storage, &cli, &nurse.id)
        .await
        .expect("disable");
    let (status, body) = redeem(&relay, &issued.code, &public_key_hex(5)).await;
    assert!(matches!(status, 403 | 410), "{body}");
    assert_eq!(
        relay
            .storage
            .user_devices(nurse.id.clone())
            .await
            .expect("devices"),
        vec![]
    );
    relay.stop().await;
}

#[tokio::test]
async fn audit_queries_page_with_a_cursor_and_never_truncate() {
    let relay = Relay::start().await;
    let (admin_token, _) = relay.token(Role::Admin).await;
    let cli = admin::AdminContext::cli("ops");
    let patient = admin::create_patient(&*relay.storage, &cli, &relay.agency, "P")
        .await
        .expect("patient");
    // 25 rows, several sharing one millisecond.
    let events: Vec<_> = (0..25)
        .map(|i| fieldchart_server::storage::AuditEvent {
            at_ms: 1_000 + i / 4,
            agency_id: relay.agency.clone(),
            user_id: fieldchart_server::identity::UserId::new("usr_x"),
            device_id: fieldchart_server::identity::DeviceId::new("dev_x"),
            document_id: patient.chart_document_id,
            patient_id: Some(patient.id.clone()),
            action: fieldchart_server::storage::AuditAction::Read,
            heads: vec![],
        })
        .collect();
    relay.storage.append_audit(events).await.expect("append");
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..20 {
        let mut path = format!("/v1/admin/audit?patient={}&limit=10", patient.id);
        if let Some(cursor) = &after {
            path.push_str(&format!("&after={cursor}"));
        }
        let (status, page) = relay.json("GET", &path, Some(&admin_token), None).await;
        assert_eq!(status, 200, "{page}");
        let rows = page["rows"].as_array().cloned().unwrap_or_default();
        assert!(rows.len() <= 10);
        seen.extend(rows.iter().map(|r| r["id"].as_i64().expect("id")));
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(page["more"], true);
                after = Some(next.to_owned());
            }
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        (seen.len(), unique.len()),
        (25, 25),
        "every row exactly once: {seen:?}"
    );
    assert_eq!(
        relay
            .json(
                "GET",
                &format!("/v1/admin/audit?patient={}&limit=0", patient.id),
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
async fn the_metrics_listener_serves_metrics_without_a_token() {
    let storage = Arc::new(MemoryStorage::new());
    let state = AppState::new(storage, Limits::default())
        .await
        .expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fieldchart_server::run_metrics(listener, state, async {
        let _ = stopped.await;
    }));
    let body = reqwest_free_get(addr, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("fieldchart_sessions_active"), "{body}");
    assert!(
        reqwest_free_get(addr, "/v1/changes")
            .await
            .starts_with("HTTP/1.1 404")
    );
    let _ = stop.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("stopped")
        .expect("task")
        .expect("served");
}

/// A plain `GET` over TCP; the raw response.
async fn reqwest_free_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .expect("in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}
