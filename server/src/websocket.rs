//! `GET /v1/sync`: authenticate, admit, upgrade, and hand the socket to a [`crate::session`].
//!
//! Everything that can refuse a client happens before the upgrade, as a plain HTTP answer: a
//! missing, unknown, expired or revoked token is `401` (no protocol message is ever exchanged
//! with an unauthenticated client), a full relay or a device over its session cap is `503`.
//!
//! # No revocation gap
//! The token is checked, the session registered, and the token checked *again*. A revocation
//! committed before the second check is seen by it; one committed after it finds the session
//! already registered, where the admin API's revocation and the revocation poller reach it.

use axum::extract::State;
use axum::extract::ws::{
    CloseFrame, Message as WsMessage, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};

use crate::auth::{authenticate, bearer_token, query_token};
use crate::config::{OVERSIZE_FRAME_GRACE_BYTES, WS_READ_BUFFER_BYTES};
use crate::error::Error;
use crate::session::{self, Frame};
use crate::state::AppState;

/// The `/v1/sync` handler.
pub async fn sync_endpoint(
    State(relay): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(token) = bearer_token(&headers).or_else(|| query_token(uri.query())) else {
        return Error::Unauthorized.into_response();
    };
    let principal = match authenticate(relay.storage(), token).await {
        Ok(principal) => principal,
        Err(e) => return e.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let ticket = match relay.sessions().register(principal.device_id.clone()) {
        Ok(ticket) => ticket,
        Err(e) => return e.into_response(),
    };
    // Registered: re-check, so a revocation committed since the first check is not missed.
    let principal = match authenticate(relay.storage(), token).await {
        Ok(again) if again.device_id == principal.device_id => again,
        Ok(_) | Err(Error::Unauthorized) => return Error::Unauthorized.into_response(),
        Err(e) => return e.into_response(),
    };
    // The transport reads a little past the limit so the session can refuse an oversize
    // frame with a clear error; beyond that the transport cuts the connection.
    let max = relay
        .limits()
        .max_frame_bytes
        .saturating_add(OVERSIZE_FRAME_GRACE_BYTES);
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        // Frames are written as they are sent (the session's outbox flushes each one); no
        // 128 KiB staging buffer per connection.
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = socket.split();
            let incoming = stream.map(|message| message.map(from_ws));
            let outgoing =
                sink.with(|frame: Frame| std::future::ready(Ok::<_, axum::Error>(to_ws(frame))));
            session::run(relay, principal, ticket, incoming, Box::pin(outgoing)).await;
        })
}

fn from_ws(message: WsMessage) -> Frame {
    match message {
        WsMessage::Binary(bytes) => Frame::Binary(bytes.into()),
        WsMessage::Text(text) => Frame::Text(text.as_str().to_owned()),
        WsMessage::Ping(bytes) => Frame::Ping(bytes.into()),
        WsMessage::Pong(bytes) => Frame::Pong(bytes.into()),
        WsMessage::Close(frame) => {
            Frame::Close(frame.map(|f| (f.code, f.reason.as_str().to_owned())))
        }
    }
}

fn to_ws(frame: Frame) -> WsMessage {
    match frame {
        Frame::Binary(bytes) => WsMessage::Binary(bytes.into()),
        Frame::Text(text) => WsMessage::Text(text.into()),
        Frame::Ping(bytes) => WsMessage::Ping(bytes.into()),
        Frame::Pong(bytes) => WsMessage::Pong(bytes.into()),
        Frame::Close(frame) => WsMessage::Close(frame.map(|(code, reason)| CloseFrame {
            code,
            reason: reason.into(),
        })),
    }
}
