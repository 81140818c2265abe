//! The one network-namespace harness: tests, the demo and the benchmarks build
//! their little clusters with it.
pub mod apiserver;
pub mod cluster;
pub mod deploy;
pub mod interrupt;
pub mod manifests;
pub mod packets;
pub mod probe;
pub mod tc_harness;
pub mod testbed;

pub use testbed::{Host, Testbed};
