//! # fieldchart-core
//!
//! The client core of Fieldchart, offline-first charting for home health: the clinical
//! document model on the [`automerge`] CRDT ([`model`]), the encrypted local store
//! ([`store`]), the automerge-repo sync protocol as sans-IO code ([`protocol`]), and the device's
//! sync pass as a state machine ([`sync`]). It does no network I/O and starts no threads: the
//! relay and the mobile layer (`fieldchart-mobile`, which runs passes over tokio and rustls) drive
//! it.
//!
//! ```
//! use fieldchart_core::model::{Actor, NoteText, Role, VisitStart};
//! use fieldchart_core::store::{Store, StoreConfig, StoreKey};
//!
//! # fn main() -> fieldchart_core::Result<()> {
//! let dir = tempfile::tempdir().expect("temp dir");
//! let nurse = Actor { user_id: "nurse-ana".into(), device_id: "phone-1".into() };
//! let store = Store::open(StoreConfig {
//!     path: dir.path().join("chart.db"),
//!     key: StoreKey::random(), // in the app: from the Keychain / Keystore
//!     actor: nurse,
//!     role: Role::Clinician,
//!     keystroke_journal: true,
//! })?;
//! let note = store.start_visit(&VisitStart {
//!     agency_id: "agency-1".into(),
//!     patient_id: "patient-7".into(),
//!     service_type: "skilled-nursing".into(),
//!     date: "2026-11-27".into(),
//!     location: "12 Elm St".into(),
//!     started_at_ms: 1_764_230_400_000,
//!     start_monotonic_ms: 81_000,
//! })?;
//! store.update_text(note, NoteText::Assessment, "Alert and oriented. Lungs clear.")?;
//! store.splice_text(note, NoteText::Assessment, 0, 0, "Pt ")?; // UTF-16 positions
//! store.sign(note)?;
//! assert!(store.update_text(note, NoteText::Plan, "too late").is_err()); // signed: addenda only
//! store.add_addendum(note, "Late entry: daughter present during visit.")?;
//! assert_eq!(store.drafts()?.len(), 0);
//! # Ok(())
//! # }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod error;
pub mod model;
pub mod protocol;
pub mod store;
pub mod sync;
pub mod text;

pub use error::{Error, Result};
