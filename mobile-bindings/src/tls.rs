//! The device's TLS configuration: rustls with the `ring` provider, shared by the WebSocket and
//! the change-feed client.
//!
//! Named explicitly rather than left to each library's defaults, so the two network paths
//! cannot drift apart (or pick up OpenSSL through a feature flag), and a process that links
//! another rustls provider does not make the choice ambiguous.
//!
//! By default the webpki (Mozilla) roots are trusted. An agency that runs its own CA pins it
//! ([`TlsConfig::pinned_ca`]): then that CA, and only it, is trusted, so a certificate from any
//! public CA — a mis-issued one, or a TLS-inspecting proxy's — is refused.

use std::fmt;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::DriverError;

/// Which certificates the device trusts for the relay.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM of the agency's CA certificate(s). When set, only these are trusted.
    pub ca_pem: Option<String>,
}

impl TlsConfig {
    /// Trust only the CA(s) in `pem`.
    pub fn pinned_ca(pem: impl Into<String>) -> TlsConfig {
        TlsConfig {
            ca_pem: Some(pem.into()),
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("pinned_ca", &self.ca_pem.is_some())
            .finish()
    }
}

/// A rustls client configuration trusting the webpki (Mozilla) roots.
pub fn client_config() -> Result<Arc<ClientConfig>, DriverError> {
    client_config_with(&TlsConfig::default())
}

/// A rustls client configuration for `tls`: the pinned CA alone, or the webpki roots.
pub fn client_config_with(tls: &TlsConfig) -> Result<Arc<ClientConfig>, DriverError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_pem {
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| DriverError::Tls(format!("pinned CA: {e}")))?;
            if certs.is_empty() {
                return Err(DriverError::Tls(
                    "pinned CA: no certificate in the PEM".into(),
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| DriverError::Tls(format!("pinned CA: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| DriverError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An HTTP client over `tls`, with the driver's timeouts.
pub(crate) fn http_client(tls: &ClientConfig) -> Result<reqwest::Client, DriverError> {
    http_client_builder(tls)
        .build()
        .map_err(|e| DriverError::Http(e.to_string()))
}

/// [`http_client`] that never reuses a connection: every request opens its own. For the
/// second attempt of a read whose first failed on a pooled connection — after a network
/// change every pooled connection may be dead, and a pooled retry can pick the next dead one.
pub(crate) fn http_client_unpooled(tls: &ClientConfig) -> Result<reqwest::Client, DriverError> {
    http_client_builder(tls)
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| DriverError::Http(e.to_string()))
}

fn http_client_builder(tls: &ClientConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .timeout(crate::driver::HTTP_TIMEOUT)
        .connect_timeout(crate::driver::CONNECT_TIMEOUT)
}

/// An error and its causes, `: `-joined: reqwest's own text ("error sending request") hides
/// the cause a user needs ("invalid peer certificate: UnknownIssuer").
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_builds_with_roots() {
        let config = client_config().expect("TLS configuration");
        assert!(config.alpn_protocols.is_empty());
        assert!(!webpki_roots::TLS_SERVER_ROOTS.is_empty());
    }

    /// Connections a plain HTTP/1.1 server on 127.0.0.1 accepts while `client` sends
    /// `requests` GETs one after another (every answer keeps its connection alive).
    async fn connections_for(client: &reqwest::Client, requests: usize) -> usize {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("address"));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = tokio::spawn({
            let accepted = Arc::clone(&accepted);
            async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        let mut buffer = [0u8; 4096];
                        // Each read holds one whole request here (small GETs on loopback).
                        while let Ok(n) = socket.read(&mut buffer).await {
                            if n == 0 {
                                return;
                            }
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if socket.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        for _ in 0..requests {
            let response = client.get(&url).send().await.expect("request");
            assert_eq!(response.text().await.expect("body"), "ok");
        }
        server.abort();
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The retry of a read after a dead pooled connection must not take the next pooled one:
    /// the unpooled client opens a connection per request, the pooled one reuses it.
    #[tokio::test]
    async fn the_retry_client_opens_a_fresh_connection_for_every_request() {
        let tls = client_config().expect("TLS configuration");
        let pooled = http_client(&tls).expect("client");
        let unpooled = http_client_unpooled(&tls).expect("client");
        assert_eq!(connections_for(&pooled, 3).await, 1);
        assert_eq!(connections_for(&unpooled, 3).await, 3);
    }

    #[test]
    fn a_pinned_ca_must_be_a_certificate() {
        assert!(matches!(
            client_config_with(&TlsConfig::pinned_ca("not a pem")),
            Err(DriverError::Tls(_))
        ));
    }
}
