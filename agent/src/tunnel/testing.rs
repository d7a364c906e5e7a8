//! Fixtures shared by the tunnel's and the HTTP proxy's tests: a `frontend/web` client at
//! [`CLIENT`] calling a `backend/api` pod at [`POD`].

use agent_common::{DIR_INGRESS, POLICY_ALLOW};

use super::Workload;
use crate::ca::SpiffeId;
use crate::policy::{CompiledState, EndpointPolicy, MeshMode, ObjectRef, PortEntry, SliceKey};

pub(crate) const TD: &str = "cluster.local";
pub(crate) const POD: &str = "127.0.0.1";
pub(crate) const CLIENT: &str = "127.0.0.2";
pub(crate) const CLIENT_IDENTITY: u32 = 301;
/// The rule that admits the client.
pub(crate) const ALLOW_RULE: u32 = 7;

pub(crate) fn workload(ns: &str, sa: &str, ip: &str, local: bool) -> Workload {
    Workload {
        pod: ObjectRef {
            namespace: ns.into(),
            name: format!("{sa}-0"),
        },
        identity: SpiffeId::workload(TD, ns, sa).unwrap(),
        mode: MeshMode::Permissive,
        local,
        host_ips: vec![ip.parse().unwrap()],
    }
}

/// The destination's (`backend/api-0`) compiled policy: ingress default deny under rule
/// `default_deny` when given, and, when `allow_client`, an allow ([`ALLOW_RULE`]) of TCP from the
/// client's identity; the ipcache maps [`CLIENT`] to that identity.
pub(crate) fn compiled(default_deny: Option<u32>, allow_client: bool) -> CompiledState {
    let mut ep = EndpointPolicy {
        identity: 300,
        ingress_default_deny: default_deny,
        mesh: MeshMode::Permissive,
        ..EndpointPolicy::default()
    };
    if allow_client {
        ep.slices.insert(
            SliceKey {
                peer_identity: CLIENT_IDENTITY,
                direction: DIR_INGRESS,
                protocol: 6,
            },
            vec![PortEntry {
                port: 0,
                prefix_len: 0,
                verdict: POLICY_ALLOW,
                rule_id: ALLOW_RULE,
            }],
        );
    }
    let mut state = CompiledState::default();
    state.endpoints.insert(
        ObjectRef {
            namespace: "backend".into(),
            name: "api-0".into(),
        },
        ep,
    );
    state
        .ipcache
        .insert(format!("{CLIENT}/32").parse().unwrap(), CLIENT_IDENTITY);
    state
}
