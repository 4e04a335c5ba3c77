//! One structured log line per HTTP request: method, path, status, latency.
//!
//! Only the path is logged, never the query string: browsers pass the device token as
//! `/v1/sync?token=…`, and a token in a log file is a token anyone with the log can use. This
//! middleware is the relay's only request log, so the redaction holds for every line.

use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

/// The request-logging middleware (`axum::middleware::from_fn(log_request)`).
pub async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    if response.status().is_server_error() {
        tracing::warn!(%method, %path, status, latency_ms, "request");
    } else {
        tracing::info!(%method, %path, status, latency_ms, "request");
    }
    response
}
