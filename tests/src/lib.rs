//! Shared pieces of Fieldchart's end-to-end tests and of the benchmark binary.

pub mod bootstrap;
pub mod day_in_the_field;
pub mod fault_proxy;
pub mod plain_client;
pub mod postgres;
pub mod reconnect;
pub mod relay_process;
pub mod relay_stats;
pub mod review;
pub mod sessions;
pub mod soak;
pub mod storm;
pub mod trace;
