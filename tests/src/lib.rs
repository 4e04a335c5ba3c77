//! Shared pieces of Fieldchart's end-to-end tests and of the benchmark binary.

pub mod fault_proxy;
pub mod postgres;
pub mod reconnect;
pub mod relay_process;
pub mod review;
pub mod soak;
pub mod trace;
