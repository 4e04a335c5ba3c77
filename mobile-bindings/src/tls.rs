//! The device's TLS configuration: rustls with the `ring` provider and the webpki root
//! certificates, shared by the WebSocket and the change-feed client.
//!
//! Named explicitly rather than left to each library's defaults, so the two network paths
//! cannot drift apart (or pick up OpenSSL through a feature flag), and a process that links
//! another rustls provider does not make the choice ambiguous.

use std::sync::Arc;

use rustls::ClientConfig;

use crate::DriverError;

/// A rustls client configuration trusting the webpki (Mozilla) roots.
pub fn client_config() -> Result<Arc<ClientConfig>, DriverError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| DriverError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_configuration_builds_with_roots() {
        let config = super::client_config().expect("TLS configuration");
        assert!(config.alpn_protocols.is_empty());
        assert!(!webpki_roots::TLS_SERVER_ROOTS.is_empty());
    }
}
