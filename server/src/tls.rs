//! TLS for the relay itself (rustls with the `ring` provider): `serve --tls-cert --tls-key`.
//!
//! [`TlsListener`] is an `axum::serve` listener: a task accepts TCP connections and runs each
//! handshake in its own task (bounded by [`MAX_TLS_HANDSHAKES`], each within
//! [`TLS_HANDSHAKE_TIMEOUT`]), so a client that stalls mid-handshake delays nobody. The
//! certificate and key are read from PEM files and reloaded by [`TlsFiles::watch`] on SIGHUP
//! and whenever a file's modification time changes (checked every
//! [`TLS_RELOAD_POLL_INTERVAL`]); a reload that fails keeps the previous certificate and logs
//! why. New connections get the new certificate; open ones keep theirs.
//!
//! The alternative — a TLS-terminating reverse proxy in front of a relay on 127.0.0.1 — works
//! too (see the README); such a proxy must not log query strings, which carry `?token=` for
//! browser clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::admin::RemoteAddr;
use crate::config::{MAX_TLS_HANDSHAKES, TLS_HANDSHAKE_TIMEOUT, TLS_RELOAD_POLL_INTERVAL};
use crate::error::{Error, Result};

/// A rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::BadRequest(format!("TLS certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::BadRequest(
            "TLS certificate: no certificate in the PEM file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| Error::BadRequest(format!("TLS private key: {e}")))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::BadRequest(format!("TLS: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| Error::BadRequest(format!("TLS certificate and key: {e}")))?;
    // WebSocket upgrades are HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate and key files, and the configuration currently served from them.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl TlsFiles {
    /// Load both files; an unreadable or invalid file is an error here, at start.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsFiles> {
        let config = Self::read(cert, key)?;
        Ok(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Arc::new(RwLock::new(config)),
        })
    }

    fn read(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
        server_config(&std::fs::read(cert)?, &std::fs::read(key)?)
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Read the files again; on failure the previous configuration stays.
    pub fn reload(&self) -> Result<()> {
        let config = Self::read(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    fn stamps(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (modified(&self.cert), modified(&self.key))
    }

    /// Reload on SIGHUP and when a file changes, until the task is aborted.
    pub async fn watch(self) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = self.stamps();
        let mut tick = tokio::time::interval(TLS_RELOAD_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            let why = tokio::select! {
                () = hup => "SIGHUP",
                _ = tick.tick() => {
                    let now = self.stamps();
                    if now == seen { continue; }
                    "file change"
                }
            };
            seen = self.stamps();
            match self.reload() {
                Ok(()) => tracing::info!(why, "TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(why, error = %e, "TLS reload failed; keeping the previous certificate");
                }
            }
        }
    }
}

/// A TCP listener that hands `axum::serve` connections whose TLS handshake has completed.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serve TLS on `tcp` with the configuration `files` currently holds.
    pub fn new(tcp: TcpListener, files: TlsFiles) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_TLS_HANDSHAKES);
        let acceptor = tokio::spawn(accept_loop(tcp, files, tx));
        Ok(TlsListener {
            ready,
            local,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    files: TlsFiles,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_TLS_HANDSHAKES));
    loop {
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(files.current());
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended (it only does when aborted): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for RemoteAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        RemoteAddr(*stream.remote_addr())
    }
}
