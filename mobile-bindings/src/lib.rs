//! # fieldchart-mobile
//!
//! The mobile layer of Fieldchart: the sync driver, which runs the core's sans-IO
//! [`SyncPass`](fieldchart_core::sync::SyncPass) over a WebSocket to the relay's `/v1/sync`
//! (tokio-tungstenite) and reads its change feed (reqwest), both over rustls — no OpenSSL on
//! the device's network path — and the uniffi bindings in [`ffi`], which expose the store, the
//! driver and enrollment to Kotlin, Swift and Python (see `mobile-bindings/README.md`).
//! A device joins a relay with [`enroll`] (a one-time code and its public key) and can pin its
//! agency's CA ([`TlsConfig`]).
//!
//! The driver only moves bytes and keeps time: what to ask, what to send and what to store
//! is decided by the core. Store calls run on tokio's blocking pool, never on the async
//! threads, and no lock is held across an `.await`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use fieldchart_mobile::{PassOptions, RelayConfig, SyncClient};
//! # async fn demo(store: Arc<fieldchart_core::store::Store>) -> Result<(), fieldchart_mobile::DriverError> {
//! let client = SyncClient::new(store, RelayConfig {
//!     base_url: "https://relay.example-agency.org".into(),
//!     token: "fct_…".into(), // from the device's sign-in
//! })?;
//! // An iOS background task: about 30 seconds.
//! let report = client
//!     .run_pass(PassOptions { time_budget: Some(Duration::from_secs(25)), ..PassOptions::default() })
//!     .await;
//! println!("{:?}: {} of {} documents", report.status, report.stats.docs_done, report.stats.docs_total);
//! # Ok(())
//! # }
//! ```

pub mod backoff;
pub mod driver;
pub mod enrollment;
mod failure_report;
pub mod ffi;
pub mod tls;

uniffi::setup_scaffolding!();

pub use backoff::Backoff;
pub use driver::{
    DriverError, PassOptions, PassReport, Progress, ProgressCallback, RelayConfig, SyncClient,
    SyncEvent, run_pass,
};
pub use enrollment::{Enrollment, QrEnrollment, enroll, fetch_device_keys, parse_qr_payload};
pub use fieldchart_core::sync::{PassStats, PassStatus};
pub use tls::TlsConfig;
