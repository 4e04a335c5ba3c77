//! Shared pieces of Fieldchart's end-to-end tests and of the benchmark binary.

pub mod reconnect;
pub mod relay_process;
pub mod review;
pub mod trace;
