//! Policy: the front-end types (NetworkPolicy, the `nodeward.io` CRDs), the one internal model
//! they translate into, and the compiler from that model to per-endpoint map contents.

pub mod compile;
pub mod compiled;
pub mod crd;
pub mod evaluate;
pub mod fqdn;
pub mod l7;
pub mod mesh;
pub mod model;
pub mod mtls;
pub mod netpol;
pub mod selector;

pub use compile::{Compiler, PodChange, compile, translate_inventory};
pub use compiled::*;
pub use evaluate::{PeerFacts, Verdict, evaluate};
pub use mesh::{
    parse_cluster_mesh_policy, parse_mesh_policy, translate_cluster_mesh_policy,
    translate_mesh_policy,
};
pub use model::{PolicyError, PolicyModel, PrincipalMatch};
pub use mtls::{MtlsModel, parse_mutual_tls, pod_modes, translate_mutual_tls};
pub use netpol::translate_network_policy;
