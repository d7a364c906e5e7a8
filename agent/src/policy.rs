//! Policy: the front-end types (NetworkPolicy, the `nodeward.io` CRDs), the one internal model
//! they translate into, and the compiler from that model to per-endpoint map contents.

pub mod compiled;
pub mod crd;

pub use compiled::*;
