//! A device's first sync (`fieldchart-bench bootstrap`): a nurse's caseload of P patients × V
//! visit notes is on the relay; a new device fetches all of it. Reports time, messages, bytes,
//! and bytes relative to the documents' `save()` size.
//!
//! Against Fieldchart (default) the caseload is seeded by the office's desks and the new
//! device is an enrolled phone with its own store syncing through the device stack (it also
//! fetches the P patient charts); with `plain` (and against `--relay URL`) a
//! [`PlainClient`] fetches the notes by id. The notes are built in memory (root fields, three
//! vitals, a ~1 KB narrative typed in bursts, each burst one change), deterministic from the
//! seed apart from document and actor ids.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{Automerge, ChangeHash, ObjType, ROOT};
use fieldchart_core::protocol::DocumentId;
use fieldchart_mobile::{PassOptions, PassStatus, RelayConfig, SyncClient, TlsConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::plain_client::{PlainClient, Settled};
use crate::relay_process::visit_note;
use crate::relay_stats::{BenchRelay, ProcSample, dir_size, raise_fd_limit};
use crate::storm::{Target, fieldchart_relay};

/// Notes one seeding connection pushes (Fieldchart's rate limits are per device token).
const NOTES_PER_SEEDER: usize = 2_000;
/// Notes in flight at once while seeding or fetching through the plain client.
const WINDOW: usize = 500;

/// The relay process, its data directory and pid, the agency, nurse and patients, the
/// seeders' URLs, the nurse's plain-client URL and her new phone's enrollment code.
type Setup = (
    Option<BenchRelay>,
    Option<PathBuf>,
    Option<u32>,
    String,
    String,
    Vec<String>,
    Vec<String>,
    String,
    Option<String>,
);

/// A bootstrap run.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    /// Patients in the caseload.
    pub patients: usize,
    /// Visit notes per patient.
    pub visits: usize,
    /// Seed.
    pub seed: u64,
    /// Where.
    pub target: Target,
    /// Limit for the timed fetch (and for seeding).
    pub phase_timeout: Duration,
}

/// A visit note as a phone leaves it: root fields, vitals, a narrative typed in bursts.
pub fn seeded_note(rng: &mut StdRng, agency: &str, patient: &str, nurse: &str) -> Automerge {
    let mut doc = visit_note(agency, patient, nurse);
    let e = |e: automerge::AutomergeError| e.to_string();
    let result = (|| -> Result<(), String> {
        let mut tx = doc.transaction();
        let vitals = tx.put_object(ROOT, "vitals", ObjType::List).map_err(e)?;
        for (i, (kind, value)) in [
            (
                "bp",
                format!(
                    "{}/{}",
                    rng.random_range(100..160),
                    rng.random_range(60..95)
                ),
            ),
            ("pulse", rng.random_range(55..110).to_string()),
            (
                "temp",
                format!("{:.1}", 97.0 + rng.random_range(0..30) as f64 / 10.0),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let v = tx.insert_object(&vitals, i, ObjType::Map).map_err(e)?;
            tx.put(&v, "vital", kind).map_err(e)?;
            tx.put(&v, "value", value).map_err(e)?;
        }
        let text = tx
            .put_object(ROOT, "assessment", ObjType::Text)
            .map_err(e)?;
        tx.commit();
        let mut len = 0;
        for _ in 0..rng.random_range(4..=7) {
            let burst: String = (0..rng.random_range(20..36))
                .map(|_| {
                    let w = [
                        "wound",
                        "clean",
                        "dry",
                        "intact",
                        "patient",
                        "alert",
                        "edema",
                        "reviewed",
                        "tolerated",
                        "ambulation",
                        "plan",
                        "continue",
                    ];
                    format!("{} ", w[rng.random_range(0..w.len())])
                })
                .collect();
            let mut tx = doc.transaction();
            tx.splice_text(&text, len, 0, &burst).map_err(e)?;
            tx.commit();
            len += burst.chars().count();
        }
        Ok(())
    })();
    if let Err(e) = result {
        // Building an in-memory document cannot fail short of a bug; keep the root fields.
        eprintln!("seeded note: {e}");
    }
    doc
}

/// Push `docs` through one connection in windows; every note must be confirmed.
async fn seed(
    url: &str,
    docs: Vec<(DocumentId, Automerge)>,
    deadline: Instant,
) -> Result<(), String> {
    let mut client = PlainClient::connect(url, Some("bench-seeder"), deadline).await?;
    let ids: Vec<DocumentId> = docs.iter().map(|(id, _)| *id).collect();
    for (id, doc) in docs {
        client.hold(id, doc);
    }
    for window in ids.chunks(WINDOW) {
        let settled = client.push(window, deadline).await?;
        if !settled.iter().all(|s| matches!(s, Settled::InSync(_))) {
            return Err("the relay refused a seeded note".into());
        }
    }
    client.close().await;
    Ok(())
}

/// Run a bootstrap; one JSON object.
pub async fn run(config: BootstrapConfig) -> Result<Value, String> {
    if config.patients == 0 || config.visits == 0 {
        return Err("need --patients >= 1 and --visits >= 1".into());
    }
    raise_fd_limit()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let total = config.patients * config.visits;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let deadline = Instant::now() + config.phase_timeout;

    // The relay, the nurse and her patients; seeding URLs.
    let (process, data_dir, pid, agency, nurse, patients, seed_urls, nurse_url, enroll_code): Setup = match &config.target {
        Target::Fieldchart { server_bin, .. } => {
            let data = dir.path().join("relay");
            let (relay, agency, admin_token, desks) = fieldchart_relay(
                server_bin.as_deref(),
                &data,
                total.div_ceil(NOTES_PER_SEEDER),
            )
            .await?;
            let http = reqwest::Client::new();
            let base = relay.http_base();
            let call = |path: &str, body: Value| {
                let (http, url, token) = (&http, format!("{base}{path}"), &admin_token);
                async move {
                    let r = http
                        .post(&url)
                        .bearer_auth(token)
                        .json(&body)
                        .send()
                        .await
                        .map_err(|e| format!("POST {url}: {e}"))?;
                    let status = r.status();
                    let text = r.text().await.map_err(|e| e.to_string())?;
                    if !status.is_success() {
                        return Err(format!("POST {url}: {status} {text}"));
                    }
                    serde_json::from_str::<Value>(&text).map_err(|e| e.to_string())
                }
            };
            let nurse = call(
                "/v1/admin/users",
                json!({ "name": "Maria", "role": "clinician" }),
            )
            .await?["userId"]
                .as_str()
                .ok_or("userId")?
                .to_owned();
            let mut patients = Vec::new();
            for i in 0..config.patients {
                let p = call(
                    "/v1/admin/patients",
                    json!({ "name": format!("Patient {i}") }),
                )
                .await?;
                let patient = p["patientId"].as_str().ok_or("patientId")?.to_owned();
                call(
                    "/v1/admin/assign",
                    json!({ "userId": nurse, "patientId": patient }),
                )
                .await?;
                patients.push(patient);
            }
            let code = call(
                "/v1/admin/enrollments",
                json!({ "userId": nurse, "deviceName": "new-phone" }),
            )
            .await?["code"]
                .as_str()
                .ok_or("code")?
                .to_owned();
            let token = call(
                "/v1/admin/tokens",
                json!({ "userId": nurse, "deviceName": "plain-phone" }),
            )
            .await?["token"]
                .as_str()
                .ok_or("token")?
                .to_owned();
            let seed_urls: Vec<String> = desks.split(' ').map(|t| relay.ws_url(t)).collect();
            let nurse_url = relay.ws_url(&token);
            let pid = relay.pid();
            (
                Some(relay),
                Some(data),
                Some(pid),
                agency,
                nurse,
                patients,
                seed_urls,
                nurse_url,
                Some(code),
            )
        }
        Target::External {
            url,
            pid: p,
            data_dir: d,
        } => {
            let patients = (0..config.patients).map(|i| format!("pat_{i}")).collect();
            (
                None,
                d.clone(),
                *p,
                "agency_bench".to_owned(),
                "usr_maria".to_owned(),
                patients,
                vec![url.clone()],
                url.clone(),
                None,
            )
        }
    };

    // Seed the caseload (not timed).
    let mut notes: Vec<(DocumentId, Automerge)> = Vec::new();
    for i in 0..total {
        let patient = &patients[i % patients.len()];
        notes.push((
            DocumentId::random(),
            seeded_note(&mut rng, &agency, patient, &nurse),
        ));
    }
    let expected: Vec<(DocumentId, Vec<ChangeHash>)> = notes
        .iter()
        .map(|(id, doc)| {
            let mut h = doc.get_heads();
            h.sort();
            (*id, h)
        })
        .collect();
    let save_bytes: u64 = notes.iter().map(|(_, d)| d.save().len() as u64).sum();
    let mut rest = notes;
    let mut seeder = 0;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(NOTES_PER_SEEDER));
        let batch = std::mem::replace(&mut rest, tail);
        seed(&seed_urls[seeder % seed_urls.len()], batch, deadline).await?;
        seeder += 1;
    }

    // The first sync.
    let before = pid.and_then(|p| ProcSample::read(p).ok());
    let ids: Vec<DocumentId> = expected.iter().map(|(id, _)| *id).collect();
    let mut out = json!({
        "workload": "bootstrap",
        "relay": config.target.name(),
        "patients": config.patients,
        "visits": config.visits,
        "notes": total,
        "seed": config.seed,
        "notes_save_bytes": save_bytes,
    });
    let (elapsed, messages, bytes, held, extra) = match (&config.target, &process, enroll_code) {
        (Target::Fieldchart { plain: false, .. }, Some(relay), Some(code)) => {
            let path = dir.path().join("new-phone.db");
            let key = fieldchart_core::store::StoreKey::from_bytes(rng.random());
            let store = crate::reconnect::open_store(
                &path,
                &key,
                &nurse,
                "enrolling",
                fieldchart_core::model::Role::Clinician,
            );
            let public = store.device_public_key().map_err(|e| e.to_string())?;
            store.close().map_err(|e| e.to_string())?;
            let done = fieldchart_mobile::enroll(
                &relay.http_base(),
                &code,
                None,
                public,
                &TlsConfig::default(),
            )
            .await
            .map_err(|e| format!("enroll: {e}"))?;
            let store = Arc::new(crate::reconnect::open_store(
                &path,
                &key,
                &nurse,
                &done.device_id,
                fieldchart_core::model::Role::Clinician,
            ));
            let client = SyncClient::new(
                Arc::clone(&store),
                RelayConfig {
                    base_url: relay.http_base(),
                    token: done.token,
                },
            )
            .map_err(|e| e.to_string())?;
            let started = Instant::now();
            let fetch_batch_docs = crate::reconnect::fetch_batch_docs();
            let report = tokio::time::timeout(
                config.phase_timeout,
                client.run_pass(PassOptions {
                    fetch_batch_docs,
                    ..PassOptions::default()
                }),
            )
            .await
            .map_err(|_| {
                format!(
                    "the first sync did not finish within {:?}",
                    config.phase_timeout
                )
            })?;
            let elapsed = started.elapsed();
            let mut held = 0;
            for (id, heads) in &expected {
                if let Ok(mut h) = store.heads(*id) {
                    h.sort();
                    held += usize::from(h == *heads);
                }
            }
            let extra = json!({
                "client": "device-stack",
                "status": format!("{:?}", report.status),
                "complete": report.status == PassStatus::Complete,
                "docs_fetched": report.stats.docs_fetched,
                "round_trips": report.round_trips,
                "http_requests": report.http_requests,
                "fetch_requests": report.fetch_requests,
                "fetch_batch_docs": fetch_batch_docs,
                "docs_batch_fetched": report.stats.docs_batch_fetched,
                "ws_messages": report.messages(),
                "messages_note": "WebSocket messages plus two per HTTP exchange (feed reads, batch fetches: request and answer); bytes: WebSocket payloads and HTTP bodies",
                "db_bytes": dir_size(dir.path()).saturating_sub(data_dir.as_deref().map_or(0, dir_size)),
            });
            let _ = store.close();
            (
                elapsed,
                report.messages() + 2 * report.http_requests,
                report.bytes(),
                held,
                extra,
            )
        }
        _ => {
            let started = Instant::now();
            let mut client = PlainClient::connect(&nurse_url, None, deadline).await?;
            let mut held = 0;
            for (window, want) in ids.chunks(WINDOW).zip(expected.chunks(WINDOW)) {
                let settled = client.fetch(window, deadline).await?;
                for (s, (_, heads)) in settled.into_iter().zip(want) {
                    if let Settled::InSync(mut h) = s {
                        h.sort();
                        held += usize::from(h == *heads);
                    }
                }
            }
            let elapsed = started.elapsed();
            let t = client.traffic();
            client.close().await;
            (
                elapsed,
                t.messages(),
                t.bytes_sent + t.bytes_received,
                held,
                json!({ "client": "plain-v1", "window": WINDOW }),
            )
        }
    };
    let after = pid.and_then(|p| ProcSample::read(p).ok());
    out["elapsed_s"] = json!(elapsed.as_secs_f64());
    out["messages"] = json!(messages);
    out["messages_per_doc"] = json!(messages as f64 / total as f64);
    out["bytes"] = json!(bytes);
    out["bytes_over_save"] = json!(bytes as f64 / save_bytes.max(1) as f64);
    out["held_matching"] = json!(held);
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            out[k] = v;
        }
    }
    if let (Some(b), Some(a)) = (before, after) {
        out["relay_fetch"] = a.since(&b).to_json();
    }
    let complete = out["complete"].as_bool().unwrap_or(true);
    out["ok"] = json!(held == total && complete);
    drop(process);
    Ok(out)
}
