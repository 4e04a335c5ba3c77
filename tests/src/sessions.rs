//! Idle sessions (`fieldchart-bench sessions --count N`): N authenticated sessions, each with
//! its own device token, join and then stay connected doing nothing but answering the relay's
//! keep-alive pings. Reports the relay's resident memory per session (RSS after all joined
//! minus RSS before, over N) and handshakes per second (WebSocket upgrade + `join`/`peer`,
//! `concurrency` at a time). Every session must still be open when the run ends (`ok`).

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::plain_client::PlainClient;
use crate::relay_stats::{ProcSample, raise_fd_limit};
use crate::storm::{Target, fieldchart_relay};

/// Handshakes in flight at once.
const HANDSHAKE_CONCURRENCY: usize = 64;
/// Token requests in flight at once while provisioning.
const PROVISION_CONCURRENCY: usize = 16;

/// Run; one JSON object.
pub async fn run(
    count: usize,
    target: &Target,
    progress: bool,
    timeout: Duration,
) -> Result<Value, String> {
    if count == 0 {
        return Err("need --count >= 1".into());
    }
    let fd_limit = raise_fd_limit()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (relay, urls, pid) = match target {
        Target::Fieldchart { server_bin, .. } => {
            let data = dir.path().join("relay");
            let (relay, _agency, admin_token, _) =
                fieldchart_relay(server_bin.as_deref(), &data, 1).await?;
            let http = reqwest::Client::new();
            let base = relay.http_base();
            let users_url = format!("{base}/v1/admin/users");
            let nurse: Value = http
                .post(&users_url)
                .bearer_auth(&admin_token)
                .json(&json!({ "name": "Maria", "role": "clinician" }))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let nurse = nurse["userId"].as_str().ok_or("userId")?.to_owned();
            let bar = progress_bar(progress, count, "tokens");
            let tokens: Vec<Result<String, String>> = futures::stream::iter(0..count)
                .map(|i| {
                    let (http, base, admin_token, nurse, bar) =
                        (&http, &base, &admin_token, &nurse, &bar);
                    async move {
                        let r = http
                            .post(format!("{base}/v1/admin/tokens"))
                            .bearer_auth(admin_token)
                            .json(&json!({ "userId": nurse, "deviceName": format!("phone-{i}") }))
                            .send()
                            .await
                            .map_err(|e| e.to_string())?;
                        let status = r.status();
                        let v: Value = r.json().await.map_err(|e| e.to_string())?;
                        bar.inc(1);
                        v["token"]
                            .as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| format!("issue token: {status} {v}"))
                    }
                })
                .buffer_unordered(PROVISION_CONCURRENCY)
                .collect()
                .await;
            bar.finish_and_clear();
            let urls = tokens
                .into_iter()
                .map(|t| t.map(|t| relay.ws_url(&t)))
                .collect::<Result<Vec<_>, _>>()?;
            let pid = relay.pid();
            (Some(relay), urls, Some(pid))
        }
        Target::External { url, pid, .. } => (None, vec![url.clone(); count], *pid),
    };

    let before = pid.map(ProcSample::read).transpose()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let deadline = Instant::now() + timeout;
    let bar = progress_bar(progress, count, "sessions");
    let started = Instant::now();
    let joined: Vec<Result<PlainClient, String>> = futures::stream::iter(urls.iter().enumerate())
        .map(|(i, url)| {
            let bar = bar.clone();
            async move {
                let c = PlainClient::connect(url, Some(&format!("idle-{i}")), deadline).await;
                bar.inc(1);
                c
            }
        })
        .buffer_unordered(HANDSHAKE_CONCURRENCY)
        .collect()
        .await;
    let handshake_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut idle = Vec::new();
    let mut failed = Vec::new();
    for client in joined {
        match client {
            Ok(client) => idle.push(tokio::spawn(client.idle(stop_rx.clone()))),
            Err(e) => failed.push(e),
        }
    }
    let after = pid.map(ProcSample::read).transpose()?;
    let mut out = json!({
        "workload": "sessions",
        "relay": target.name(),
        "count": count,
        "joined": idle.len(),
        "failed": failed.len(),
        "first_failure": failed.first(),
        "handshake_s": handshake_s,
        "handshakes_per_s": idle.len() as f64 / handshake_s.max(1e-9),
        "fd_limit": fd_limit,
    });
    if let (Some(b), Some(a)) = (before, after) {
        out["relay_rss_before_bytes"] = json!(b.rss);
        out["relay_rss_bytes"] = json!(a.rss);
        out["relay_peak_rss_bytes"] = json!(a.peak_rss);
        out["relay_rss_per_session_bytes"] =
            json!(a.rss.saturating_sub(b.rss) as f64 / idle.len().max(1) as f64);
        out["relay_cpu_s"] = json!(a.cpu_s - b.cpu_s);
    }
    // Every session is still open: stop them and see that each ended on our signal.
    let _ = stop_tx.send(true);
    let mut dropped = 0;
    for task in idle {
        if !matches!(task.await, Ok(Ok(()))) {
            dropped += 1;
        }
    }
    out["dropped_while_idle"] = json!(dropped);
    out["ok"] = json!(failed.is_empty() && dropped == 0);
    drop(relay);
    Ok(out)
}

fn progress_bar(progress: bool, len: usize, what: &str) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_message(what.to_owned());
    bar
}
