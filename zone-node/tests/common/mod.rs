//! Harnesses shared by the process tests and benchmarks.
pub mod region;
