//! A relay on the `samod` crate (0.16) with file storage, for `tests/bench/compare.sh`: the
//! Rust counterpart of the reference JavaScript sync server. Like that server it announces
//! nothing (`announce: false`, the JS `sharePolicy: false`) and lets every peer read and write
//! the documents it names by id. No authentication, no change feed, no classification.
//!
//!   fieldchart-bench-samod-relay <data-dir> [port]
//!
//! Listens on 127.0.0.1 (port 0: any free port), accepts WebSocket upgrades on any path, and
//! prints one JSON line, {"listening":"127.0.0.1:PORT","pid":PID}, once it accepts connections.

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use samod::storage::TokioFilesystemStorage;
use samod::{AcceptorHandle, Repo, ShareConfig};

async fn upgrade(State(acceptor): State<AcceptorHandle>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| async move {
        // The repo drives the connection from here on (the handle is only for observing it).
        if let Err(e) = acceptor.accept_axum(socket, None) {
            eprintln!("the repo stopped: {e:?}");
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: fieldchart-bench-samod-relay <data-dir> [port]")?;
    let port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(0);
    std::fs::create_dir_all(&dir)?;
    let repo = Repo::build_tokio()
        .with_storage(TokioFilesystemStorage::new(&dir))
        .with_share_policy(ShareConfig::read_write().with_announce(false))
        .load()
        .await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let acceptor = repo.make_acceptor(samod::Url::parse(&format!(
        "ws://{}/",
        listener.local_addr()?
    ))?)?;
    let app = Router::new()
        .fallback(upgrade)
        .with_state(acceptor);
    println!(
        "{}",
        serde_json::json!({
            "listening": listener.local_addr()?.to_string(),
            "pid": std::process::id(),
        })
    );
    axum::serve(listener, app).await?;
    Ok(())
}
