//! The uniffi layer: what Kotlin, Swift and Python see. Thin wrappers with one-line
//! delegations to `fieldchart-core` and the sync driver, plus type and error conversion; no
//! SQL, no automerge calls, no business rules here.

pub mod error;
pub mod records;
pub mod schedule;
pub mod store;
pub mod sync;
