//! # fieldchart-core
//!
//! The client core of Fieldchart, offline-first charting for home health: the clinical
//! document model on the [`automerge`] CRDT ([`model`]), the encrypted local store
//! ([`store`]), the automerge-repo sync protocol as sans-IO code ([`protocol`]), and the device's
//! sync pass as a state machine ([`sync`]). It does no network I/O and starts no threads: the
//! relay and the mobile layer (`fieldchart-mobile`, which runs passes over tokio and rustls) drive
//! it.
//!
//! # Signing
//! Each device makes an Ed25519 key pair in its store ([`store::Store::device_public_key`]) and
//! enrolls the public key with the relay; `sign` appends a signature over a versioned payload
//! (document, heads, hash of the canonical rendering at those heads, signer, device, role, time)
//! to the note's `signatures` list. Signed-ness is read from history, not from the current value
//! ([`model::NoteLedger`]): deleting or altering a signature, forging one, or moving the note
//! never unsigns it or changes what is rendered as signed — it is listed for review, as are
//! edits concurrent with the signing. Verification ([`model::signing::verify`]) uses the agency's
//! published keys ([`store::Store::set_key_directory`]); the relay runs the same code before it
//! stores anything. See [`model::signing`].
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
