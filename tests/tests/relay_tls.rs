//! The device over TLS to the real relay (`serve --tls-cert --tls-key`), with a test CA minted
//! by `rcgen`: a sync pass succeeds when the device pins that CA, and fails clearly — a
//! certificate error, nothing synced — when it pins another CA or trusts only public roots.
//!
//! Build the relay first when running only this file: `cargo build -p fieldchart-server`.

use std::path::Path;
use std::sync::Arc;

use fieldchart_core::model::Role;
use fieldchart_core::store::StoreKey;
use fieldchart_mobile::{PassOptions, PassStatus, RelayConfig, SyncClient, TlsConfig};
use fieldchart_tests::reconnect::open_store;
use fieldchart_tests::relay_process::{Admin, RelayProcess};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA certificate (PEM), with what it takes to sign server certificates.
struct TestCa {
    pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn test_ca(name: &str) -> TestCa {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    TestCa {
        pem: cert.pem(),
        cert,
        key,
    }
}

/// A server certificate for 127.0.0.1 signed by `ca`, written as PEM files: (cert, key).
fn server_cert(ca: &TestCa, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    let key = KeyPair::generate().expect("server key");
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .expect("server certificate");
    let (cert_path, key_path) = (dir.join("relay.crt"), dir.join("relay.key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path)
}

#[tokio::test]
async fn a_device_syncs_over_tls_with_the_pinned_ca_and_refuses_any_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    let ca = test_ca("Riverside Home Health CA");
    let (cert, key) = server_cert(&ca, dir.path());
    let admin = Admin::new(&data);
    let agency = admin.create_agency("Riverside");
    let nurse = admin.create_user(&agency, "Ana", "clinician");
    let (patient, chart) = admin.create_patient(&agency, "Grace Hopper");
    admin.assign(&nurse, &patient);
    let token = admin.issue_token(&nurse, "phone").token;
    let relay = RelayProcess::start_tls(&data, &cert, &key);
    assert!(relay.http_base().starts_with("https://"));

    let pass = |name: &str, tls: TlsConfig| {
        let store = Arc::new(open_store(
            &dir.path().join(format!("{name}.db")),
            &StoreKey::random(),
            &nurse,
            name,
            Role::Clinician,
        ));
        let client = SyncClient::with_tls(
            Arc::clone(&store),
            RelayConfig {
                base_url: relay.http_base(),
                token: token.clone(),
            },
            &tls,
        )
        .expect("client");
        async move { (client.run_pass(PassOptions::default()).await, store) }
    };

    // The right CA: the chart arrives over https + wss.
    let (report, store) = pass("pinned", TlsConfig::pinned_ca(ca.pem.clone())).await;
    assert_eq!(report.status, PassStatus::Complete, "{report:?}");
    assert_eq!(
        store.patient_chart(chart).expect("chart synced").patient_id,
        patient
    );

    // Another CA, and the public roots: a certificate error, nothing synced.
    let other = test_ca("Somebody else's CA");
    for (name, tls) in [
        ("wrong-ca", TlsConfig::pinned_ca(other.pem.clone())),
        ("public-roots", TlsConfig::default()),
    ] {
        let (report, store) = pass(name, tls).await;
        match &report.status {
            PassStatus::Interrupted(error) => assert!(
                error.to_lowercase().contains("certificate"),
                "{name}: the error should say it is the certificate: {error}"
            ),
            other => panic!("{name}: expected a certificate failure, got {other:?}"),
        }
        assert!(
            store.patient_chart(chart).is_err(),
            "{name}: nothing synced"
        );
    }
}
