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
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .timeout(crate::driver::HTTP_TIMEOUT)
        .connect_timeout(crate::driver::CONNECT_TIMEOUT)
        .build()
        .map_err(|e| DriverError::Http(e.to_string()))
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

    #[test]
    fn a_pinned_ca_must_be_a_certificate() {
        assert!(matches!(
            client_config_with(&TlsConfig::pinned_ca("not a pem")),
            Err(DriverError::Tls(_))
        ));
    }
}
