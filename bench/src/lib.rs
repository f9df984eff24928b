//! serin's benchmarks: peer comparisons against direct, nginx, haproxy and
//! Envoy on one machine in one run (`serin-bench peers`; TLS origination
//! among them, `tls`, and TLS termination, `https`), the open-loop load
//! generator they use for latency, the TLS handshake generator
//! (`handshakes`), and the report they write
//! (`bench/REPORT.md`). The safety benchmarks run the real binary: revert
//! latency and blast radius (`revert`), and fleet mode against a fake
//! Kubernetes API server (`fleet`). The hot-path micro-benchmarks are in
//! `benches/hot_path.rs`.
//!
//! Nothing here installs software: missing tools are named with the command
//! that installs them. Every process started is stopped by its PID.

pub mod fleet;
pub mod handshakes;
pub mod https;
pub mod judge_sim;
pub mod loadgen;
pub mod measure;
pub mod peers;
pub mod procs;
pub mod report;
pub mod results;
pub mod revert;
pub mod run;
pub mod tls;
pub mod tools;
