//! The nodeward lab: a small cluster on one machine, built from network namespaces, for the
//! integration tests, `cargo xtask lab`, the demo and the benchmarks.
//!
//! ```no_run
//! use nodeward_lab::{Lab, LabSpec, Case};
//! let lab = Lab::up(&LabSpec::default())?;
//! lab.expect(&[Case::tcp("frontend/web-0", "backend/api-1", 8080, true)], std::time::Duration::from_secs(5));
//! # anyhow::Ok(())
//! ```

pub mod bpf;
pub mod capture;
pub mod dns;
pub mod external;
pub mod lab;
pub mod load;
pub mod manifests;
pub mod netpol;
pub mod paths;
pub mod probe;
pub mod shared;
pub mod sweep;
pub mod sys;
pub mod topology;
pub mod wait;

pub use lab::{ISSUER_ADDR, ISSUER_METRICS_ADDR, Lab, PROBE_TIMEOUT};
pub use probe::{Case, Proto};
pub use topology::{DNS_PORT, HTTP_PORT, LabSpec, LabState, METRICS_PORT, NodeState, PodState};
pub use wait::{eventually, poll};
