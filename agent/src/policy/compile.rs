//! The compiler: inventory plus translated policies to the [`CompiledState`] of one node.
//!
//! How the datapath reads the output, and the tunnel with it, is [`super::evaluate()`]: the
//! peer's identity is the longest ipcache match of its address (world when none); its CIDR
//! identity is the longest `policy_cidrs` match, if any; over the tunnel, its principal
//! identities are the ones its certificate matches. The endpoint's slices are looked up for
//! peer in {identity, CIDR identity, principal identities, 0} and protocol in {protocol, 0},
//! each with a longest port-prefix match; any deny wins, then any allow; otherwise the
//! endpoint's default deny for that direction applies, if it has one, and the flow passes if
//! not. The tests below check the compiler through that evaluator.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use agent_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_KUBE_APISERVER,
    IDENTITY_REMOTE_NODE, IDENTITY_UNMANAGED, IDENTITY_WORLD, POLICY_ALLOW, POLICY_DENY,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::compiled::{
    CompiledState, DnsAllow, EndpointPolicy, HttpAllow, ObjectRef, PortEntry, RuleInfo, SliceKey,
};
use super::fqdn::{FQDN_LABEL_PREFIX, FqdnMatch, LearnedNames};
use super::mesh::{translate_cluster_mesh_policy, translate_mesh_policy};
use super::model::{
    Action, Direction, Entity, PROTO_TCP, Peer, PolicyError, PolicyModel, PortSpec, PrincipalMatch,
};
use super::netpol::translate_network_policy;
use super::selector::{LabelSelector, Operator};
use crate::identity::{IdentityAllocator, Labels, namespace_labels, security_labels_in};
use crate::source::Inventory;

mod delta;

/// Name of the pseudo-rule that stands for a policy's default deny.
pub const DEFAULT_DENY_RULE: &str = "default-deny";

/// Translates every policy of the inventory (NetworkPolicies, MeshPolicies, then
/// ClusterMeshPolicies, each in key order).
///
/// # Errors
/// Every policy that does not translate; the caller keeps its last good state (never half a
/// policy set).
pub fn translate_inventory(inv: &Inventory) -> Result<Vec<PolicyModel>, Vec<PolicyError>> {
    let results = inv
        .network_policies
        .values()
        .map(|p| translate_network_policy(p))
        .chain(inv.mesh_policies.values().map(|p| translate_mesh_policy(p)))
        .chain(
            inv.cluster_mesh_policies
                .values()
                .map(|p| translate_cluster_mesh_policy(p)),
        );
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok(m) => ok.push(m),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ok)
    } else {
        Err(errors)
    }
}

/// A pod that can send or receive: it has an address and is neither finished nor on the host
/// network.
struct Workload<'a> {
    key: &'a ObjectRef,
    pod: &'a Pod,
    labels: Arc<Labels>,
    identity: u32,
    ips: Vec<IpAddr>,
    local: bool,
}

/// What one compilation reuses from the last, so that a policy change at a thousand pods
/// neither relabels every pod nor resolves every peer again. Each is kept with what it was
/// derived from and used only while that is unchanged:
/// - a pod's workload facts, with the very `Arc`s of the pod and its namespace (the source
///   hands out the same `Arc` until an object changes); the identity among them, while the
///   allocator's revision is the one the last compilation left;
/// - a peer's identities, while the pod identities, policy CIDRs and principals are the same
///   (an identity's labels never change while it is allocated).
///
/// The output is the same as [`compile`]'s from scratch; a test holds it to that.
#[derive(Default)]
pub struct Compiler {
    node: String,
    /// Addresses the DNS proxy learned (see [`Compiler::set_learned_names`]).
    names: Arc<LearnedNames>,
    pods: BTreeMap<ObjectRef, CachedPod>,
    revision: Option<u64>,
    peers: PeerCache,
    /// The last compilation, for the pod-event path (see [`delta`]).
    last: Option<delta::Last>,
    /// The pods the last compilation patched in (see [`Compiler::pod_changes`]).
    changes: Option<Vec<PodChange>>,
}

/// A pod the pod-event path patched in: its key and the version it replaced (`None`: added).
pub type PodChange = (ObjectRef, Option<Arc<Pod>>);

struct CachedPod {
    pod: Arc<Pod>,
    namespace: Option<Arc<Namespace>>,
    /// `None`: not a workload.
    facts: Option<PodFacts>,
}

struct PodFacts {
    labels: Arc<Labels>,
    identity: u32,
    ips: Vec<IpAddr>,
    local: bool,
}

#[derive(Default)]
struct PeerCache {
    identities: BTreeSet<u32>,
    policy_cidrs: BTreeMap<IpNet, u32>,
    principals: BTreeMap<PrincipalMatch, u32>,
    fqdn_identities: BTreeMap<u32, BTreeSet<FqdnMatch>>,
    /// Each peer's identities, with the number of the compilation that last used it.
    resolved: HashMap<Peer, (u64, BTreeSet<u32>)>,
    round: u64,
}

impl PeerCache {
    /// Starts a compilation over the pod identities `identities`: what was resolved against
    /// other identities is forgotten, and so is what the last compilation did not use.
    fn begin(&mut self, identities: impl Iterator<Item = u32> + Clone, state: &CompiledState) {
        let same = self.identities.iter().copied().eq(identities.clone())
            && self.policy_cidrs == state.policy_cidrs
            && self.principals == state.principals
            && self.fqdn_identities == state.fqdn_identities;
        if same {
            let last = self.round;
            self.resolved.retain(|_, (used, _)| *used == last);
        } else {
            self.identities = identities.collect();
            self.policy_cidrs.clone_from(&state.policy_cidrs);
            self.principals.clone_from(&state.principals);
            self.fqdn_identities.clone_from(&state.fqdn_identities);
            self.resolved.clear();
        }
        self.round += 1;
    }

    /// Adds `peer`'s identities to `out`, resolved by `resolve` if not known yet. A hit costs
    /// one hash and no clone of the peer.
    fn extend(
        &mut self,
        out: &mut BTreeSet<u32>,
        peer: &Peer,
        resolve: impl FnOnce() -> BTreeSet<u32>,
    ) {
        if let Some((used, ids)) = self.resolved.get_mut(peer) {
            *used = self.round;
            out.extend(ids.iter().copied());
            return;
        }
        let ids = resolve();
        out.extend(ids.iter().copied());
        self.resolved.insert(peer.clone(), (self.round, ids));
    }
}

/// The workload facts of a pod, or `None` when it is not a workload.
fn pod_facts(
    node_name: &str,
    pod: &Pod,
    ns_labels: &Labels,
    ids: &mut IdentityAllocator,
) -> Option<PodFacts> {
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let spec = pod.spec.as_ref();
    // A host-network pod has the node's address and identity; it is not an endpoint.
    if spec.and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str());
    for ip in status
        .and_then(|s| s.pod_ip.as_deref())
        .into_iter()
        .chain(listed)
    {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return None;
    }
    let labels = security_labels_in(pod, ns_labels);
    Some(PodFacts {
        identity: ids.allocate(&labels),
        labels: Arc::new(labels),
        ips,
        local: spec.and_then(|s| s.node_name.as_deref()) == Some(node_name),
    })
}

impl Compiler {
    /// Every workload of the inventory, from the cache where its pod and namespace are the
    /// ones it was made from.
    fn workloads<'a>(
        &mut self,
        inv: &'a Inventory,
        ids: &mut IdentityAllocator,
    ) -> Vec<Workload<'a>> {
        let identities_hold = self.revision == Some(ids.revision());
        let mut by_namespace: BTreeMap<&str, Labels> = BTreeMap::new();
        let mut out = Vec::new();
        for (key, pod) in &inv.pods {
            let ns = pod.metadata.namespace.as_deref().unwrap_or(&key.namespace);
            let namespace = inv.namespaces.get(ns);
            let cached = self.pods.get_mut(key).filter(|c| {
                Arc::ptr_eq(&c.pod, pod)
                    && c.namespace.as_ref().map(Arc::as_ptr) == namespace.map(Arc::as_ptr)
            });
            let facts = match cached {
                Some(c) => {
                    if let Some(f) = c.facts.as_mut().filter(|_| !identities_hold) {
                        f.identity = ids.allocate(&f.labels);
                    }
                    c.facts.as_ref()
                }
                None => {
                    let ns_labels = by_namespace
                        .entry(ns)
                        .or_insert_with(|| namespace_labels(ns, namespace.map(AsRef::as_ref)));
                    let facts = pod_facts(&self.node, pod, ns_labels, ids);
                    let entry = CachedPod {
                        pod: pod.clone(),
                        namespace: namespace.cloned(),
                        facts,
                    };
                    self.pods.insert(key.clone(), entry);
                    self.pods[key].facts.as_ref()
                }
            };
            if let Some(f) = facts {
                out.push(Workload {
                    key,
                    pod,
                    labels: f.labels.clone(),
                    identity: f.identity,
                    ips: f.ips.clone(),
                    local: f.local,
                });
            }
        }
        // Every pod of the inventory is in the cache now: only a longer cache has stale ones.
        if self.pods.len() != inv.pods.len() {
            self.pods.retain(|key, _| inv.pods.contains_key(key));
        }
        out
    }
}

/// FNV-1a, 32 bits.
fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Stable rule id of `kind/ns/name/rule`: FNV-1a 32, never 0. A collision with an id already
/// taken moves to the next free number (deterministic, since rules are numbered in sorted order).
fn rule_id(rules: &mut BTreeMap<u32, RuleInfo>, info: RuleInfo) -> u32 {
    let mut id = fnv1a(&format!(
        "{}/{}/{}/{}",
        info.kind, info.namespace, info.name, info.rule
    ));
    loop {
        if id != 0 {
            match rules.get(&id) {
                None => break,
                Some(existing) if *existing == info => return id,
                Some(_) => {}
            }
        }
        id = id.wrapping_add(1);
    }
    rules.insert(id, info);
    id
}

/// Compiles the state of node `node_name`. Allocates identities for every pod with an address,
/// every policy CIDR and every principal peer, then releases (`gc`) every identity no longer
/// used. A control loop keeps a [`Compiler`] instead, to reuse what has not changed.
#[must_use]
pub fn compile<'p>(
    node_name: &str,
    inv: &Inventory,
    policies: impl IntoIterator<Item = &'p PolicyModel>,
    ids: &mut IdentityAllocator,
) -> CompiledState {
    Compiler::default().compile(node_name, inv, policies, ids)
}

impl Compiler {
    /// Sets what the DNS proxy has learned; the next compilation gives those addresses FQDN
    /// identities.
    pub fn set_learned_names(&mut self, names: Arc<LearnedNames>) {
        self.names = names;
    }

    /// The pods the last [`Compiler::compile`] found added, changed or removed since the one
    /// before, each with its previous version; `None` when the nodes changed too, or there was
    /// no compilation before (then anything derived from pods must be rebuilt).
    #[must_use]
    pub fn pod_changes(&self) -> Option<&[PodChange]> {
        self.changes.as_deref()
    }

    /// [`compile()`], reusing what the last call derived from unchanged objects.
    #[must_use]
    pub fn compile<'p>(
        &mut self,
        node_name: &str,
        inv: &Inventory,
        policies: impl IntoIterator<Item = &'p PolicyModel>,
        ids: &mut IdentityAllocator,
    ) -> CompiledState {
        if self.node != node_name {
            *self = Self {
                node: node_name.to_owned(),
                names: std::mem::take(&mut self.names),
                ..Self::default()
            };
        }
        let policies: Vec<&PolicyModel> = policies.into_iter().collect();
        match delta::pods_only(self, node_name, inv, &policies, ids) {
            delta::Outcome::Patched(state, changes) => {
                self.changes = Some(changes);
                return state;
            }
            delta::Outcome::Full(changes) => self.changes = changes,
        }
        // No pod changed and the identities hold: the pods' counts stay what they were.
        let counts = self
            .last
            .take()
            .filter(|_| {
                self.changes.as_ref().is_some_and(Vec::is_empty)
                    && self.revision == Some(ids.revision())
            })
            .map(delta::Last::into_counts);
        let state = compile_state(self, node_name, inv, policies.clone(), ids);
        self.revision = Some(ids.revision());
        delta::remember(self, inv, &policies, &state, ids, counts);
        state
    }
}

fn compile_state(
    cache: &mut Compiler,
    node_name: &str,
    inv: &Inventory,
    policies: Vec<&PolicyModel>,
    ids: &mut IdentityAllocator,
) -> CompiledState {
    let mut state = CompiledState::default();
    let workloads = cache.workloads(inv, ids);

    // ipcache: node addresses first, so that they win over a pod claiming the same address.
    for (name, node) in &inv.nodes {
        let id = if name == node_name {
            IDENTITY_HOST
        } else {
            IDENTITY_REMOTE_NODE
        };
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for a in addresses.into_iter().flatten() {
            if let Ok(ip) = a.address.parse::<IpAddr>() {
                state.ipcache.entry(IpNet::from(ip)).or_insert(id);
            }
        }
    }
    for w in &workloads {
        for ip in &w.ips {
            state.ipcache.entry(IpNet::from(*ip)).or_insert(w.identity);
        }
    }

    // Pods by identity, for selectors and named ports.
    let mut by_identity: BTreeMap<u32, Vec<&Workload<'_>>> = BTreeMap::new();
    for w in &workloads {
        by_identity.entry(w.identity).or_default().push(w);
    }

    // Policy CIDRs: every cidr and except prefix gets its own identity. So does every principal
    // peer: its slices are emitted like any peer's, and since no address maps to it the kernel
    // never matches them, while the tunnel evaluates the same slices with the principal
    // identities the peer's certificate matches. One model, two enforcement points.
    for p in &policies {
        for r in &p.rules {
            for peer in &r.peers {
                match peer {
                    Peer::Cidr { net, except } => {
                        for n in std::iter::once(net).chain(except) {
                            state.policy_cidrs.insert(*n, ids.allocate_cidr(*n));
                        }
                    }
                    Peer::Principal(m) if !state.principals.contains_key(m) => {
                        state
                            .principals
                            .insert(m.clone(), ids.allocate_principal(m));
                    }
                    _ => {}
                }
            }
        }
    }

    // FQDN identities: each learned address whose names some `toFQDNs` selector matches gets
    // the identity of the set of selectors it satisfies, unless a node or pod has it.
    let selectors: BTreeSet<&FqdnMatch> = policies
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|r| &r.peers)
        .filter_map(|peer| match peer {
            Peer::Fqdn(m) => Some(m),
            _ => None,
        })
        .collect();
    if !selectors.is_empty() {
        for (ip, names) in cache.names.iter() {
            let matched: BTreeSet<FqdnMatch> = selectors
                .iter()
                .filter(|m| names.iter().any(|n| m.matches(n)))
                .map(|m| (*m).clone())
                .collect();
            if matched.is_empty() || state.ipcache.contains_key(&IpNet::from(*ip)) {
                continue;
            }
            let labels: Labels = matched
                .iter()
                .map(|m| (format!("{FQDN_LABEL_PREFIX}{m}"), String::new()))
                .collect();
            let id = ids.allocate(&labels);
            state.ipcache.insert(IpNet::from(*ip), id);
            state.fqdn_identities.entry(id).or_insert(matched);
        }
    }

    // The kernel keys IPv4 as IPv4-mapped IPv6, so an IPv6 prefix over all of `::ffff:0:0/96`
    // (`::/0` above all) is also the longest match of every IPv4 address that no IPv4 policy
    // prefix covers, and an allow for `::/0` would let IPv4 through. An IPv4 /0 of its own
    // catches those addresses first, and no IPv6 rule includes its identity.
    let mapped = IpNet::V6(Ipv6Net::new(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96).expect("/96"));
    if state.policy_cidrs.keys().any(|n| n.contains(&mapped)) {
        let all_ipv4 = IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0"));
        state
            .policy_cidrs
            .entry(all_ipv4)
            .or_insert_with(|| ids.allocate_cidr(all_ipv4));
    }

    // Built only when a peer is not in the cache.
    let index = std::cell::OnceCell::new();
    cache.peers.begin(by_identity.keys().copied(), &state);

    // Policies in a stable order, with their rule ids.
    let mut order = policies;
    order.sort_by(|a, b| a.origin.cmp(&b.origin));
    let compiled: Vec<CompiledPolicy<'_>> = order
        .iter()
        .map(|p| {
            let info = |rule: &str| RuleInfo {
                kind: p.origin.kind.as_str().to_owned(),
                namespace: p.origin.namespace.clone(),
                name: p.origin.name.clone(),
                rule: rule.to_owned(),
            };
            let default_deny = rule_id(&mut state.rules, info(DEFAULT_DENY_RULE));
            let rules = p
                .rules
                .iter()
                .map(|r| CompiledRule {
                    id: rule_id(&mut state.rules, info(&r.name)),
                    peers: {
                        let mut peers = BTreeSet::new();
                        for peer in &r.peers {
                            cache.peers.extend(&mut peers, peer, || {
                                let index = index.get_or_init(|| IdentityIndex::new(&by_identity));
                                let facts = (
                                    &state.policy_cidrs,
                                    &state.principals,
                                    &state.fqdn_identities,
                                );
                                resolve_peer(peer, &by_identity, index, facts)
                            });
                        }
                        peers
                    },
                    rule: r,
                })
                .collect();
            CompiledPolicy {
                model: p,
                default_deny,
                rules,
            }
        })
        .collect();

    for w in workloads.iter().filter(|w| w.local) {
        let ns = w.key.namespace.as_str();
        let mut ep = EndpointPolicy {
            identity: w.identity,
            ipv4: w.ips.iter().find_map(|ip| match ip {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            }),
            ipv6: w.ips.iter().find_map(|ip| match ip {
                IpAddr::V6(a) => Some(*a),
                IpAddr::V4(_) => None,
            }),
            ..EndpointPolicy::default()
        };
        let mut segments: BTreeMap<SliceKey, Vec<Segment>> = BTreeMap::new();
        let mut http = Vec::new();
        for cp in &compiled {
            let subject = &cp.model.subject;
            if subject.namespace.as_deref().is_some_and(|n| n != ns)
                || !subject.selector.matches(&w.labels)
            {
                continue;
            }
            if cp.model.ingress_enforced && ep.ingress_default_deny.is_none() {
                ep.ingress_default_deny = Some(cp.default_deny);
            }
            if cp.model.egress_enforced && ep.egress_default_deny.is_none() {
                ep.egress_default_deny = Some(cp.default_deny);
            }
            add_dns(&mut ep.dns, cp.model);
            for cr in &cp.rules {
                add_rule(&mut segments, &mut http, cr, w, &by_identity);
            }
        }
        // Only pods with HTTP rules need the list: every other allow then stands for "any
        // request" (see `evaluate::http_rules`).
        if http.iter().any(|a: &HttpAllow| a.http.is_some()) {
            ep.http_ingress = http;
        }
        ep.slices = segments
            .into_iter()
            .map(|(key, segs)| (key, resolve(&segs)))
            .filter(|(_, entries)| !entries.is_empty())
            .collect();
        state.endpoints.insert(w.key.clone(), ep);
    }

    let in_use: BTreeSet<u32> = workloads
        .iter()
        .map(|w| w.identity)
        .chain(state.policy_cidrs.values().copied())
        .chain(state.principals.values().copied())
        .chain(state.fqdn_identities.keys().copied())
        .collect();
    ids.gc(&in_use);
    state
}

struct CompiledPolicy<'a> {
    model: &'a PolicyModel,
    default_deny: u32,
    rules: Vec<CompiledRule<'a>>,
}

struct CompiledRule<'a> {
    rule: &'a super::model::Rule,
    id: u32,
    /// Peer identities (pod, reserved, CIDR; 0 for any).
    peers: BTreeSet<u32>,
}

/// Identities by `key=value` label, so that a selector with an equality (`matchLabels`, `In`)
/// looks only at the identities that could match rather than at all of them: with a thousand
/// peers, each named by its own selector, a full scan per selector is what a policy change
/// would spend its time on.
struct IdentityIndex<'a> {
    by_pair: std::collections::HashMap<(&'a str, &'a str), Vec<u32>>,
}

impl<'a> IdentityIndex<'a> {
    fn new(by_identity: &'a BTreeMap<u32, Vec<&Workload<'_>>>) -> Self {
        let mut by_pair: std::collections::HashMap<(&'a str, &'a str), Vec<u32>> =
            std::collections::HashMap::new();
        for (id, workloads) in by_identity {
            for (k, v) in workloads[0].labels.iter() {
                by_pair
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push(*id);
            }
        }
        Self { by_pair }
    }

    /// The smallest set of identities that can satisfy one of `sel`'s `In` requirements, or
    /// `None` when it has none (then every identity is a candidate).
    fn candidates(&self, sel: &LabelSelector) -> Option<BTreeSet<u32>> {
        // Sized first, collected once: a namespace requirement matches every identity of its
        // namespace, and building that set for each of a thousand selectors is what would cost.
        sel.requirements
            .iter()
            .filter_map(|r| match &r.operator {
                Operator::In(values) => {
                    let size: usize = self.lists(&r.key, values).map(Vec::len).sum();
                    Some((size, &r.key, values))
                }
                _ => None,
            })
            .min_by_key(|(size, _, _)| *size)
            .map(|(_, key, values)| self.lists(key, values).flatten().copied().collect())
    }

    /// The identities of each `key=value` for `values`.
    fn lists<'s>(
        &'s self,
        key: &'s str,
        values: &'s BTreeSet<String>,
    ) -> impl Iterator<Item = &'s Vec<u32>> + 's {
        values
            .iter()
            .filter_map(move |v| self.by_pair.get(&(key, v.as_str())))
    }
}

/// The policy CIDR, principal and FQDN identities of a compilation.
type PeerFactMaps<'a> = (
    &'a BTreeMap<IpNet, u32>,
    &'a BTreeMap<PrincipalMatch, u32>,
    &'a BTreeMap<u32, BTreeSet<FqdnMatch>>,
);

/// The identities a peer stands for, given the identities of the policy CIDRs and principals.
fn resolve_peer(
    peer: &Peer,
    by_identity: &BTreeMap<u32, Vec<&Workload<'_>>>,
    index: &IdentityIndex<'_>,
    (policy_cidrs, principals, fqdn): PeerFactMaps<'_>,
) -> BTreeSet<u32> {
    match peer {
        Peer::Any => BTreeSet::from([IDENTITY_ANY]),
        Peer::Endpoints(sel) => match index.candidates(sel) {
            Some(candidates) => candidates
                .into_iter()
                .filter(|id| {
                    by_identity
                        .get(id)
                        .is_some_and(|ws| sel.matches(&ws[0].labels))
                })
                .collect(),
            None => by_identity
                .iter()
                .filter(|(_, ws)| sel.matches(&ws[0].labels))
                .map(|(id, _)| *id)
                .collect(),
        },
        // An address learned from DNS is still outside the cluster.
        Peer::Entity(Entity::World) => std::iter::once(IDENTITY_WORLD)
            .chain(fqdn.keys().copied())
            .collect(),
        Peer::Entity(Entity::Host) => BTreeSet::from([IDENTITY_HOST]),
        Peer::Entity(Entity::RemoteNode) => BTreeSet::from([IDENTITY_REMOTE_NODE]),
        Peer::Entity(Entity::KubeApiserver) => BTreeSet::from([IDENTITY_KUBE_APISERVER]),
        Peer::Entity(Entity::Cluster) => by_identity
            .keys()
            .copied()
            .chain([IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_UNMANAGED])
            .collect(),
        // Exact under longest-prefix match: an address's longest policy prefix P is inside `net`
        // and inside no except exactly when the address is in `net` and in no except.
        Peer::Cidr { net, except } => policy_cidrs
            .iter()
            .filter(|(p, _)| net.contains(*p) && !except.iter().any(|e| e.contains(*p)))
            .map(|(_, id)| *id)
            .collect(),
        Peer::Principal(m) => principals.get(m).copied().into_iter().collect(),
        Peer::Fqdn(m) => fqdn
            .iter()
            .filter(|(_, selectors)| selectors.contains(m))
            .map(|(id, _)| *id)
            .collect(),
    }
}

/// Folds a selecting policy's DNS rules into the endpoint's: a policy with `toFQDNs` or
/// `rules.dns` puts the pod behind the DNS proxy; `rules.dns` lists (of allow rules) add up,
/// and with none the pod may ask for any name.
fn add_dns(dns: &mut Option<DnsAllow>, model: &PolicyModel) {
    for r in model
        .rules
        .iter()
        .filter(|r| r.direction == Direction::Egress)
    {
        let fqdn_peer = r.peers.iter().any(|p| matches!(p, Peer::Fqdn(_)));
        match (&r.dns, r.action) {
            (Some(list), Action::Allow) => match dns {
                Some(DnsAllow::Only(have)) => {
                    have.extend(
                        list.iter()
                            .filter(|m| !have.contains(m))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                }
                _ => *dns = Some(DnsAllow::Only(list.clone())),
            },
            _ if fqdn_peer || r.dns.is_some() => {
                dns.get_or_insert(DnsAllow::Any);
            }
            _ => {}
        }
    }
}

/// A port interval of one slice with its verdict, before deny-wins resolution.
#[derive(Clone, Copy, Debug)]
struct Segment {
    first: u16,
    last: u16,
    verdict: u8,
    rule_id: u32,
}

const ALL_PORTS: (u16, u16) = (0, u16::MAX);

fn add_rule(
    segments: &mut BTreeMap<SliceKey, Vec<Segment>>,
    http: &mut Vec<HttpAllow>,
    cr: &CompiledRule<'_>,
    endpoint: &Workload<'_>,
    by_identity: &BTreeMap<u32, Vec<&Workload<'_>>>,
) {
    let rule = cr.rule;
    let direction = rule.direction.as_u8();
    let verdict = match rule.action {
        Action::Allow => POLICY_ALLOW,
        Action::Deny => POLICY_DENY,
    };
    let l7 = rule.direction == Direction::Ingress && rule.action == Action::Allow;
    let mut push = |peer: u32, protocol: u8, (first, last): (u16, u16), index: Option<usize>| {
        if l7 {
            http.push(HttpAllow {
                peer_identity: peer,
                protocol,
                first,
                last,
                rule_id: cr.id,
                http: index.and_then(|i| rule.port_http.get(i).cloned().flatten()),
            });
        }
        segments
            .entry(SliceKey {
                peer_identity: peer,
                direction,
                protocol,
            })
            .or_default()
            .push(Segment {
                first,
                last,
                verdict,
                rule_id: cr.id,
            });
    };
    if rule.ports.is_empty() {
        for peer in &cr.peers {
            push(*peer, 0, ALL_PORTS, None);
        }
        return;
    }
    for (index, spec) in rule.ports.iter().enumerate() {
        let index = Some(index);
        match spec {
            PortSpec::AllOf(protocol) => {
                for peer in &cr.peers {
                    push(*peer, *protocol, ALL_PORTS, index);
                }
            }
            PortSpec::Range {
                protocol,
                first,
                last,
            } => {
                for peer in &cr.peers {
                    push(*peer, *protocol, (*first, *last), index);
                }
            }
            PortSpec::Named { protocol, name } => match rule.direction {
                // The port is the endpoint's own.
                Direction::Ingress => {
                    for port in named_ports(endpoint.pod, name, *protocol) {
                        for peer in &cr.peers {
                            push(*peer, *protocol, (port, port), index);
                        }
                    }
                }
                // The port is the peer's: resolve it per peer identity on the pods that have
                // that identity. "Any" stands for every pod identity here; reserved and CIDR
                // identities have no named ports.
                Direction::Egress => {
                    let pods: Box<dyn Iterator<Item = u32>> = if cr.peers.contains(&IDENTITY_ANY) {
                        Box::new(by_identity.keys().copied())
                    } else {
                        Box::new(cr.peers.iter().copied())
                    };
                    for peer in pods {
                        let ports: BTreeSet<u16> = by_identity
                            .get(&peer)
                            .into_iter()
                            .flatten()
                            .flat_map(|w| named_ports(w.pod, name, *protocol))
                            .collect();
                        for port in ports {
                            push(peer, *protocol, (port, port), index);
                        }
                    }
                }
            },
        }
    }
}

/// The numbers of a pod's container ports called `name` with `protocol` (default TCP).
fn named_ports(pod: &Pod, name: &str, protocol: u8) -> BTreeSet<u16> {
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice());
    containers
        .into_iter()
        .flatten()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.name.as_deref() == Some(name))
        .filter(|p| {
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => PROTO_TCP,
                "UDP" => super::model::PROTO_UDP,
                "SCTP" => super::model::PROTO_SCTP,
                _ => 0,
            };
            proto == protocol
        })
        .filter_map(|p| u16::try_from(p.container_port).ok().filter(|n| *n != 0))
        .collect()
}

/// Deny wins: splits the slice's intervals into disjoint pieces, each with the verdict deny if
/// any deny covers it, else allow; merges adjacent pieces of the same verdict (taking the lowest
/// rule id, so the choice is deterministic), and emits minimal port prefixes.
fn resolve(segments: &[Segment]) -> Vec<PortEntry> {
    let mut bounds: Vec<u32> = segments
        .iter()
        .flat_map(|s| [u32::from(s.first), u32::from(s.last) + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    // (first, last, verdict, rule id), disjoint and increasing.
    let mut pieces: Vec<(u32, u32, u8, u32)> = Vec::new();
    for pair in bounds.windows(2) {
        let (lo, hi) = (pair[0], pair[1] - 1);
        let covering = segments
            .iter()
            .filter(|s| u32::from(s.first) <= lo && hi <= u32::from(s.last));
        let mut best: Option<(u8, u32)> = None;
        for s in covering {
            best = Some(match best {
                None => (s.verdict, s.rule_id),
                Some((v, r)) if v == s.verdict => (v, r.min(s.rule_id)),
                Some((v, r)) if v == POLICY_DENY => (v, r),
                Some(_) => (s.verdict, s.rule_id),
            });
        }
        let Some((verdict, rule_id)) = best else {
            continue;
        };
        match pieces.last_mut() {
            Some(last) if last.1 + 1 == lo && last.2 == verdict => {
                last.1 = hi;
                last.3 = last.3.min(rule_id);
            }
            _ => pieces.push((lo, hi, verdict, rule_id)),
        }
    }
    let mut out = Vec::new();
    for (first, last, verdict, rule_id) in pieces {
        let first = u16::try_from(first).expect("ports are 16-bit");
        let last = u16::try_from(last).expect("ports are 16-bit");
        for (port, prefix_len) in port_range_prefixes(first, last) {
            out.push(PortEntry {
                port,
                prefix_len,
                verdict,
                rule_id,
            });
        }
    }
    out
}

/// The minimal list of port prefixes `(port, prefix_len)` covering exactly `first..=last`, in
/// increasing order. `0..=65535` is the single prefix `(0, 0)`.
#[must_use]
pub fn port_range_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut lo = u32::from(first);
    let end = u32::from(last) + 1;
    while lo < end {
        // The largest aligned block starting at `lo` that fits.
        let mut bits = lo.trailing_zeros().min(16);
        while lo + (1 << bits) > end {
            bits -= 1;
        }
        let bits_u8 = u8::try_from(bits).expect("at most 16");
        out.push((u16::try_from(lo).expect("below 65536"), 16 - bits_u8));
        lo += 1 << bits;
    }
    out
}

/// The directions of [`SliceKey::direction`], for readers of the output.
#[must_use]
pub fn direction_name(direction: u8) -> &'static str {
    match direction {
        DIR_INGRESS => "ingress",
        DIR_EGRESS => "egress",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::evaluate::{PeerFacts, Verdict, evaluate};
    use crate::policy::mesh::parse_mesh_policy;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde::Deserialize as _;

    const NODE: &str = "n1";

    /// Namespaces `frontend` (team=fe), `backend` (team=be), `data`; pods on n1 unless said;
    /// one pod (`backend/api-2`) on the other node n2.
    const INVENTORY: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: frontend, labels: {team: fe}}
---
apiVersion: v1
kind: Namespace
metadata: {name: backend, labels: {team: be}}
---
apiVersion: v1
kind: Namespace
metadata: {name: data}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: frontend, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: backend, labels: {app: api, tier: be}}
spec:
  nodeName: n1
  serviceAccountName: api
  containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: metrics, containerPort: 9090}, {name: dns, containerPort: 53, protocol: UDP}]}]
status: {podIP: 10.0.1.2, podIPs: [{ip: 10.0.1.2}, {ip: 'fd00::2'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: backend, labels: {app: api, tier: be}}
spec: {nodeName: n2, serviceAccountName: api, containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: backend, labels: {app: tool}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: data, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]}
status: {podIP: 10.0.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: data, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.1.9, phase: Succeeded}
";

    fn docs(yaml: &str) -> Vec<serde_json::Value> {
        serde_yaml_ng::Deserializer::from_str(yaml)
            .map(|d| serde_json::Value::deserialize(d).expect("test YAML parses"))
            .filter(|v| !v.is_null())
            .collect()
    }

    fn inventory() -> Inventory {
        let mut inv = Inventory::default();
        for v in docs(INVENTORY) {
            let name = v["metadata"]["name"].as_str().expect("name").to_owned();
            let ns = v["metadata"]["namespace"].as_str().unwrap_or("").to_owned();
            let key = ObjectRef {
                namespace: ns,
                name: name.clone(),
            };
            match v["kind"].as_str() {
                Some("Namespace") => {
                    inv.namespaces
                        .insert(name, serde_json::from_value(v).expect("namespace"));
                }
                Some("Node") => {
                    inv.nodes
                        .insert(name, serde_json::from_value(v).expect("node"));
                }
                Some("Pod") => {
                    inv.pods
                        .insert(key, serde_json::from_value(v).expect("pod"));
                }
                other => panic!("unexpected kind {other:?}"),
            }
        }
        inv
    }

    fn models(yaml: &str) -> Vec<PolicyModel> {
        docs(yaml)
            .into_iter()
            .map(|v| match v["kind"].as_str() {
                Some("NetworkPolicy") => {
                    let np: NetworkPolicy = serde_json::from_value(v).expect("NetworkPolicy");
                    translate_network_policy(&np).expect("valid NetworkPolicy")
                }
                Some("MeshPolicy") => {
                    translate_mesh_policy(&parse_mesh_policy(v).expect("MeshPolicy parses"))
                        .expect("valid MeshPolicy")
                }
                Some("ClusterMeshPolicy") => translate_cluster_mesh_policy(
                    &crate::policy::mesh::parse_cluster_mesh_policy(v).expect("parses"),
                )
                .expect("valid ClusterMeshPolicy"),
                other => panic!("unexpected kind {other:?}"),
            })
            .collect()
    }

    /// What the kernel knows about a peer at `ip`, plus the principal identities of its
    /// certificate when it comes through the tunnel.
    fn peer_facts(state: &CompiledState, ip: IpAddr, certificate: Option<&str>) -> PeerFacts {
        PeerFacts {
            identity: state.ipcache_lookup(ip).unwrap_or(IDENTITY_WORLD),
            cidr_identity: state.policy_cidr_lookup(ip),
            principal_identities: certificate
                .map(|uri| state.principal_identities(&uri.parse().expect("test SPIFFE ID")))
                .unwrap_or_default(),
        }
    }

    /// The datapath's decision for one endpoint and one new plaintext flow.
    fn decide(
        state: &CompiledState,
        ep: &EndpointPolicy,
        direction: u8,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> bool {
        evaluate(
            ep,
            direction,
            &peer_facts(state, peer, None),
            protocol,
            port,
        )
        .allowed
    }

    /// Resolves `ns/pod` to its endpoint (if local) and first address, or an IP literal to
    /// itself.
    fn place<'a>(
        state: &'a CompiledState,
        inv: &Inventory,
        who: &str,
    ) -> (Option<&'a EndpointPolicy>, IpAddr) {
        if let Ok(ip) = who.parse() {
            return (None, ip);
        }
        let (namespace, name) = who.split_once('/').expect("ns/pod");
        let key = ObjectRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let pod = inv.pods.get(&key).expect("known pod");
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .expect("pod ip")
            .parse()
            .expect("ip");
        (state.endpoints.get(&key), ip)
    }

    fn protocol(name: &str) -> u8 {
        match name {
            "TCP" => PROTO_TCP,
            "UDP" => super::super::model::PROTO_UDP,
            "SCTP" => super::super::model::PROTO_SCTP,
            other => panic!("protocol {other}"),
        }
    }

    fn allowed(state: &CompiledState, inv: &Inventory, flow: &Flow) -> bool {
        let (src_ep, src_ip) = place(state, inv, flow.0);
        let (dst_ep, dst_ip) = place(state, inv, flow.1);
        let proto = protocol(flow.3);
        let egress_ok =
            src_ep.is_none_or(|ep| decide(state, ep, DIR_EGRESS, dst_ip, proto, flow.2));
        let ingress_ok =
            dst_ep.is_none_or(|ep| decide(state, ep, DIR_INGRESS, src_ip, proto, flow.2));
        egress_ok && ingress_ok
    }

    /// The destination's ingress verdict on a flow from `src` (carrying `certificate` when it
    /// comes through the tunnel) to the local pod `dst`.
    fn ingress_verdict(
        state: &CompiledState,
        inv: &Inventory,
        src: &str,
        certificate: Option<&str>,
        dst: &str,
        port: u16,
    ) -> Verdict {
        let (_, src_ip) = place(state, inv, src);
        let (dst_ep, _) = place(state, inv, dst);
        let ep = dst_ep.expect("the destination is a local endpoint");
        evaluate(
            ep,
            DIR_INGRESS,
            &peer_facts(state, src_ip, certificate),
            PROTO_TCP,
            port,
        )
    }

    /// (source, destination, port, protocol, allowed?)
    type Flow = (&'static str, &'static str, u16, &'static str, bool);

    struct Case {
        name: &'static str,
        policies: &'static str,
        flows: &'static [Flow],
    }

    const CASES: &[Case] = &[
        Case {
            name: "no policy allows all",
            policies: "",
            flows: &[
                ("frontend/web", "backend/api", 8080, "TCP", true),
                ("backend/api", "data/db", 1, "UDP", true),
                ("8.8.8.8", "data/db", 5432, "TCP", true),
            ],
        },
        Case {
            name: "deny-all ingress",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: deny-all, namespace: backend}
spec: {podSelector: {}}
",
            flows: &[
                ("frontend/web", "backend/api", 8080, "TCP", false),
                ("backend/tool", "backend/api", 8080, "TCP", false),
                ("8.8.8.8", "backend/api", 80, "TCP", false),
                ("backend/api", "data/db", 5432, "TCP", true),
                ("frontend/web", "data/db", 5432, "TCP", true),
            ],
        },
        Case {
            name: "allow by namespaceSelector, podSelector, and both",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: api, namespace: backend}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: fe}}}]
    ports: [{port: 8080}]
  - from: [{podSelector: {matchLabels: {app: tool}}}]
    ports: [{port: 9090}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: db, namespace: data}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: backend}}, podSelector: {matchLabels: {app: api}}}]
",
            flows: &[
                ("frontend/web", "backend/api", 8080, "TCP", true),
                ("frontend/web", "backend/api", 9090, "TCP", false),
                ("backend/tool", "backend/api", 9090, "TCP", true),
                ("backend/tool", "backend/api", 8080, "TCP", false),
                ("backend/api", "data/db", 5432, "TCP", true),
                ("backend/api-2", "data/db", 5432, "UDP", true),
                ("backend/tool", "data/db", 5432, "TCP", false),
                ("frontend/web", "data/db", 5432, "TCP", false),
            ],
        },
        Case {
            name: "matchExpressions",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: db, namespace: data}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [db, cache]}]}
  ingress:
  - from:
    - namespaceSelector: {matchExpressions: [{key: team, operator: Exists}]}
      podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [tool]}, {key: legacy, operator: DoesNotExist}]}
",
            flows: &[
                ("frontend/web", "data/db", 5432, "TCP", true),
                ("backend/api", "data/db", 5432, "TCP", true),
                ("backend/tool", "data/db", 5432, "TCP", false),
                ("8.8.8.8", "data/db", 5432, "TCP", false),
            ],
        },
        Case {
            name: "ports, endPort, protocols",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: api, namespace: backend}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - ports: [{port: 8000, endPort: 8099}, {port: 53, protocol: UDP}, {protocol: SCTP}]
",
            flows: &[
                ("frontend/web", "backend/api", 7999, "TCP", false),
                ("frontend/web", "backend/api", 8000, "TCP", true),
                ("frontend/web", "backend/api", 8080, "TCP", true),
                ("frontend/web", "backend/api", 8099, "TCP", true),
                ("frontend/web", "backend/api", 8100, "TCP", false),
                ("frontend/web", "backend/api", 8080, "UDP", false),
                ("frontend/web", "backend/api", 53, "UDP", true),
                ("frontend/web", "backend/api", 53, "TCP", false),
                ("frontend/web", "backend/api", 1, "SCTP", true),
                ("8.8.8.8", "backend/api", 65535, "SCTP", true),
            ],
        },
        Case {
            name: "named ports resolve on the destination pod",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: api, namespace: backend}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{ports: [{port: http}]}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: web-out, namespace: frontend}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{ports: [{port: http}]}]
",
            flows: &[
                ("frontend/web", "backend/api", 8080, "TCP", true),
                ("frontend/web", "backend/api", 9090, "TCP", false),
                ("frontend/web", "backend/api-2", 8081, "TCP", true),
                // api and api-2 share an identity, so egress to either allows the union of
                // their `http` ports (8080 and 8081); the remote pod enforces its own ingress.
                ("frontend/web", "backend/api-2", 8080, "TCP", true),
                ("frontend/web", "backend/api-2", 9090, "TCP", false),
                ("frontend/web", "backend/tool", 8080, "TCP", false),
                ("frontend/web", "1.1.1.1", 80, "TCP", false),
                ("backend/tool", "backend/api", 8080, "TCP", true),
            ],
        },
        Case {
            name: "ipBlock with except",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: api, namespace: backend}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]
  egress:
  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 172.16.0.0/12]}}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: narrow, namespace: backend}
spec:
  podSelector: {matchLabels: {app: nothing}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.1.4/32}}]
",
            flows: &[
                ("backend/api-2", "backend/api", 80, "TCP", true),
                ("frontend/web", "backend/api", 80, "TCP", false),
                ("data/db", "backend/api", 80, "TCP", false),
                ("10.0.9.9", "backend/api", 80, "TCP", true),
                ("8.8.8.8", "backend/api", 80, "TCP", false),
                ("backend/api", "8.8.8.8", 443, "TCP", true),
                ("backend/api", "10.1.2.3", 443, "TCP", false),
                ("backend/api", "172.20.0.1", 443, "TCP", false),
                ("backend/api", "172.32.0.1", 443, "TCP", true),
            ],
        },
        Case {
            name: "egress deny-all then allow",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: deny-egress, namespace: frontend}
spec: {podSelector: {}, policyTypes: [Egress]}
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: web-to-api, namespace: frontend}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {team: be}}, podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080}]
",
            flows: &[
                ("frontend/web", "backend/api", 8080, "TCP", true),
                ("frontend/web", "backend/api", 8081, "TCP", false),
                ("frontend/web", "backend/tool", 8080, "TCP", false),
                ("frontend/web", "8.8.8.8", 53, "UDP", false),
                ("backend/api", "frontend/web", 80, "TCP", true),
            ],
        },
        Case {
            name: "multiple policies add up",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: a, namespace: data}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: fe}}}], ports: [{port: 5432}]}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: b, namespace: data}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: be}}}], ports: [{port: 5433}]}]
",
            flows: &[
                ("frontend/web", "data/db", 5432, "TCP", true),
                ("frontend/web", "data/db", 5433, "TCP", false),
                ("backend/api", "data/db", 5433, "TCP", true),
                ("backend/api", "data/db", 5432, "TCP", false),
            ],
        },
        Case {
            name: "policyTypes egress only leaves ingress open",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: egress-only, namespace: data}
spec:
  podSelector: {}
  policyTypes: [Egress]
  ingress: [{from: [{podSelector: {matchLabels: {app: nobody}}}]}]
",
            flows: &[
                ("frontend/web", "data/db", 5432, "TCP", true),
                ("data/db", "frontend/web", 80, "TCP", false),
            ],
        },
        Case {
            name: "MeshPolicy ingressDeny beats ingress allow, from any policy",
            policies: r"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: api, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [cluster]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: tool}}]
    toPorts: [{port: 9000, endPort: 9099, protocol: TCP}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: allow-all, namespace: backend}
spec:
  podSelector: {}
  ingress: [{}]
",
            flows: &[
                ("backend/tool", "backend/api", 9090, "TCP", false),
                ("backend/tool", "backend/api", 8080, "TCP", true),
                ("backend/tool", "backend/api", 9090, "UDP", true),
                ("frontend/web", "backend/api", 9090, "TCP", true),
                ("8.8.8.8", "backend/api", 9090, "TCP", true),
            ],
        },
        Case {
            name: "entities",
            policies: r"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: api, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [host, remote-node]
  egress:
  - toEntities: [world]
    toPorts: [{port: 443, protocol: TCP}]
  - toEntities: [cluster]
    toPorts: [{port: dns}]
---
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: web, namespace: frontend}
spec:
  endpointSelector: {}
  egress:
  - toEntities: [cluster]
",
            flows: &[
                ("192.168.0.1", "backend/api", 8080, "TCP", true),
                ("192.168.0.2", "backend/api", 8080, "TCP", true),
                ("frontend/web", "backend/api", 8080, "TCP", false),
                ("8.8.8.8", "backend/api", 8080, "TCP", false),
                ("backend/api", "8.8.8.8", 443, "TCP", true),
                ("backend/api", "8.8.8.8", 80, "TCP", false),
                ("backend/api", "frontend/web", 443, "TCP", false),
                ("frontend/web", "data/db", 5432, "TCP", true),
                ("frontend/web", "192.168.0.2", 22, "TCP", true),
                ("frontend/web", "8.8.8.8", 443, "TCP", false),
            ],
        },
        Case {
            name: "CIDR sets with except, and an overlapping deny",
            policies: r"
apiVersion: nodeward.io/v1alpha1
kind: ClusterMeshPolicy
metadata: {name: egress}
spec:
  endpointSelector: {matchLabels: {nodeward.io/namespace: frontend}}
  egress:
  - toCIDRSet: [{cidr: 1.0.0.0/8, except: [1.1.0.0/16]}]
  egressDeny:
  - toCIDRSet: [{cidr: 1.2.3.0/24}]
    toPorts: [{port: 443}]
",
            flows: &[
                ("frontend/web", "1.9.9.9", 443, "TCP", true),
                ("frontend/web", "1.1.1.1", 443, "TCP", false),
                ("frontend/web", "1.2.3.4", 443, "TCP", false),
                ("frontend/web", "1.2.3.4", 443, "UDP", false),
                ("frontend/web", "1.2.3.4", 80, "TCP", true),
                ("frontend/web", "2.2.2.2", 80, "TCP", false),
                ("backend/api", "2.2.2.2", 80, "TCP", true),
            ],
        },
        Case {
            name: "an IPv6 CIDR covering the IPv4-mapped range does not let IPv4 through",
            policies: r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: v6-only, namespace: frontend}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: '::/0'}}]
",
            flows: &[
                ("frontend/web", "2001:db8::1", 443, "TCP", true),
                ("frontend/web", "8.8.8.8", 443, "TCP", false),
                ("frontend/web", "10.0.1.2", 80, "TCP", false),
            ],
        },
        Case {
            name: "MeshPolicy peers default to the policy namespace; enableDefaultDeny off",
            policies: r"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: api, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{}]
---
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: db, namespace: data}
spec:
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {nodeward.io/ns-label.team: fe}}]
",
            flows: &[
                ("backend/tool", "backend/api", 8080, "TCP", true),
                ("frontend/web", "backend/api", 8080, "TCP", false),
                ("frontend/web", "data/db", 5432, "TCP", false),
                ("backend/api", "data/db", 5432, "TCP", true),
                ("8.8.8.8", "data/db", 5432, "TCP", true),
            ],
        },
    ];

    #[test]
    fn policy_table() {
        let inv = inventory();
        let mut failures = Vec::new();
        for case in CASES {
            let mut ids = IdentityAllocator::new();
            let state = compile(NODE, &inv, &models(case.policies), &mut ids);
            for flow in case.flows {
                let got = allowed(&state, &inv, flow);
                if got != flow.4 {
                    failures.push(format!(
                        "{}: {} -> {} {}/{}: expected {}, got {}",
                        case.name,
                        flow.0,
                        flow.1,
                        flow.2,
                        flow.3,
                        if flow.4 { "allow" } else { "deny" },
                        if got { "allow" } else { "deny" },
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// (source, SPIFFE ID of its certificate or `None` for plaintext, local destination,
    /// TCP port, allowed?)
    type TunnelFlow = (&'static str, Option<&'static str>, &'static str, u16, bool);

    const WEB_ID: &str = "spiffe://cluster.local/ns/frontend/sa/default";
    const API_ID: &str = "spiffe://cluster.local/ns/backend/sa/api";
    const TOOL_ID: &str = "spiffe://cluster.local/ns/backend/sa/default";
    const DB_ID: &str = "spiffe://cluster.local/ns/data/sa/default";

    const PRINCIPAL_CASES: &[(&str, &str, &[TunnelFlow])] = &[
        (
            "fromServiceAccounts lets that service account in, and only it",
            r"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: db, namespace: data}
spec:
  ingress:
  - fromServiceAccounts: [backend/api]
",
            &[
                ("backend/api", Some(API_ID), "data/db", 5432, true),
                ("backend/api-2", Some(API_ID), "data/db", 5432, true),
                (
                    "backend/api",
                    Some("spiffe://other.domain/ns/backend/sa/api"),
                    "data/db",
                    5432,
                    true,
                ),
                ("backend/tool", Some(TOOL_ID), "data/db", 5432, false),
                ("frontend/web", Some(WEB_ID), "data/db", 5432, false),
                ("backend/api", None, "data/db", 5432, false),
            ],
        ),
        (
            "fromPrincipals exact and by prefix; a bare service account is the policy's namespace",
            r"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: api, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromPrincipals: [spiffe://cluster.local/ns/frontend/sa/default]
    toPorts: [{port: 8080, protocol: TCP}]
  - fromPrincipals: ['spiffe://cluster.local/ns/data/*']
  - fromServiceAccounts: [default]
    toPorts: [{port: 9090}]
",
            &[
                ("frontend/web", Some(WEB_ID), "backend/api", 8080, true),
                ("frontend/web", Some(WEB_ID), "backend/api", 9090, false),
                (
                    "frontend/web",
                    Some("spiffe://cluster.local/ns/frontend/sa/other"),
                    "backend/api",
                    8080,
                    false,
                ),
                ("data/db", Some(DB_ID), "backend/api", 1, true),
                (
                    "data/db",
                    Some("spiffe://cluster.local/ns/database/sa/default"),
                    "backend/api",
                    1,
                    false,
                ),
                ("backend/tool", Some(TOOL_ID), "backend/api", 9090, true),
                ("backend/tool", Some(TOOL_ID), "backend/api", 8080, false),
                ("frontend/web", None, "backend/api", 8080, false),
                ("data/db", None, "backend/api", 1, false),
            ],
        ),
        (
            "a deny by principal beats an endpoint allow, over the tunnel only",
            r"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: api, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {nodeward.io/namespace: frontend}}]
  ingressDeny:
  - fromPrincipals: ['spiffe://cluster.local/ns/frontend/*']
    toPorts: [{port: 9090, protocol: TCP}]
",
            &[
                ("frontend/web", Some(WEB_ID), "backend/api", 9090, false),
                ("frontend/web", Some(WEB_ID), "backend/api", 8080, true),
                // What STRICT is for: plaintext carries no certificate to deny.
                ("frontend/web", None, "backend/api", 9090, true),
            ],
        ),
        (
            "a named ingress port with a principal peer resolves on the endpoint",
            r"
apiVersion: nodeward.io/v1alpha1
kind: ClusterMeshPolicy
metadata: {name: api-http}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromServiceAccounts: [frontend/default]
    toPorts: [{port: http, protocol: TCP}]
",
            &[
                ("frontend/web", Some(WEB_ID), "backend/api", 8080, true),
                ("frontend/web", Some(WEB_ID), "backend/api", 9090, false),
                ("frontend/web", Some(WEB_ID), "backend/api", 80, false),
                ("backend/tool", Some(TOOL_ID), "backend/api", 8080, false),
                ("frontend/web", None, "backend/api", 8080, false),
            ],
        ),
    ];

    #[test]
    fn principal_table() {
        let inv = inventory();
        let mut failures = Vec::new();
        for (name, policies, flows) in PRINCIPAL_CASES {
            let state = compile(NODE, &inv, &models(policies), &mut IdentityAllocator::new());
            for (src, certificate, dst, port, want) in *flows {
                let got = ingress_verdict(&state, &inv, src, *certificate, dst, *port).allowed;
                if got != *want {
                    failures.push(format!(
                        "{name}: {src} ({}) -> {dst} {port}/TCP: expected {}, got {}",
                        certificate.unwrap_or("plaintext"),
                        if *want { "allow" } else { "deny" },
                        if got { "allow" } else { "deny" },
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn a_deny_by_principal_names_its_rule() {
        let inv = inventory();
        let (_, policies, _) = PRINCIPAL_CASES[2];
        let state = compile(NODE, &inv, &models(policies), &mut IdentityAllocator::new());
        let v = ingress_verdict(
            &state,
            &inv,
            "frontend/web",
            Some(WEB_ID),
            "backend/api",
            9090,
        );
        assert_eq!(v.drop_reason, agent_common::drop_reason::POLICY_DENY);
        assert_eq!(state.rules[&v.rule_id].rule, "ingressDeny[0]");
        let v = ingress_verdict(
            &state,
            &inv,
            "frontend/web",
            Some(WEB_ID),
            "backend/api",
            8080,
        );
        assert!(v.allowed);
        assert_eq!(state.rules[&v.rule_id].rule, "ingress[0]");
    }

    #[test]
    fn principals_get_identities_that_no_address_has_and_gc_keeps() {
        let inv = inventory();
        let mut ids = IdentityAllocator::new();
        let (_, policies, _) = PRINCIPAL_CASES[1];
        let policies = models(policies);
        let state = compile(NODE, &inv, &policies, &mut ids);
        let names: Vec<String> = state.principals.keys().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "spiffe://cluster.local/ns/frontend/sa/default",
                "spiffe://cluster.local/ns/data/*",
                "backend/default",
            ]
        );
        for (m, id) in &state.principals {
            assert!(
                !state.ipcache.values().any(|i| i == id)
                    && !state.policy_cidrs.values().any(|i| i == id),
                "{m}: an address maps to principal identity {id}"
            );
            assert_eq!(
                ids.labels_of(*id),
                Some(crate::identity::Labels::from([(
                    crate::identity::PRINCIPAL_LABEL.to_owned(),
                    m.to_string()
                )])),
                "{m}: flows can name the identity"
            );
        }
        // Compiling again keeps the numbers (gc kept them); without the policy they go.
        assert_eq!(compile(NODE, &inv, &policies, &mut ids), state);
        let ids_before = ids.len();
        let _ = compile(NODE, &inv, [], &mut ids);
        assert_eq!(ids.len(), ids_before - state.principals.len());
        assert!(
            state
                .principals
                .values()
                .all(|id| ids.labels_of(*id).is_none())
        );
    }

    const FQDN_POLICY: &str = r"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: fqdn, namespace: frontend}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toFQDNs: [{matchName: api.example.test}, {matchPattern: '**.svc.example.test'}]
    toPorts: [{port: 443, protocol: TCP}]
  - toEntities: [world]
    toPorts: [{port: 8443, protocol: TCP}]
";

    fn learned(entries: &[(&str, &str)]) -> Arc<LearnedNames> {
        let mut names = LearnedNames::new();
        for (ip, name) in entries {
            names
                .entry(ip.parse().expect("test IP"))
                .or_default()
                .insert((*name).to_owned());
        }
        Arc::new(names)
    }

    #[test]
    fn learned_addresses_of_selected_names_are_allowed_and_only_those() {
        let inv = inventory();
        let policies = models(FQDN_POLICY);
        let mut ids = IdentityAllocator::new();
        let mut compiler = Compiler::default();
        let flow = |state: &CompiledState, ip: &'static str, port| {
            allowed(state, &inv, &("frontend/web", ip, port, "TCP", true))
        };
        let before = compiler.compile(NODE, &inv, &policies, &mut ids);
        assert!(
            !flow(&before, "203.0.113.10", 443),
            "nothing learned yet: denied"
        );
        let web = &before.endpoints[&ObjectRef {
            namespace: "frontend".into(),
            name: "web".into(),
        }];
        assert_eq!(web.dns, Some(DnsAllow::Any), "a toFQDNs policy proxies DNS");

        compiler.set_learned_names(learned(&[
            ("203.0.113.10", "api.example.test"),
            ("203.0.113.11", "other.example.test"),
            ("203.0.113.12", "a.b.svc.example.test"),
            ("203.0.113.13", "x.svc.example.test"),
            ("10.0.1.2", "api.example.test"),
        ]));
        let state = compiler.compile(NODE, &inv, &policies, &mut ids);
        assert!(flow(&state, "203.0.113.10", 443), "matchName");
        assert!(!flow(&state, "203.0.113.10", 80), "toPorts still apply");
        assert!(!flow(&state, "203.0.113.11", 443), "a name not selected");
        assert!(flow(&state, "203.0.113.12", 443), "**. at two levels");
        assert!(flow(&state, "203.0.113.13", 443), "**. at one level");
        assert!(
            flow(&state, "203.0.113.10", 8443),
            "a learned address is still world"
        );
        assert_eq!(
            state.ipcache[&"10.0.1.2/32".parse::<IpNet>().expect("net")],
            ids.lookup(&security_labels_in(
                &inv.pods[&ObjectRef {
                    namespace: "backend".into(),
                    name: "api".into()
                }],
                &namespace_labels("backend", inv.namespaces.get("backend").map(AsRef::as_ref)),
            ))
            .expect("pod identity"),
            "a pod keeps its own identity whatever DNS says"
        );
        assert_eq!(
            state.ipcache[&"203.0.113.12/32".parse::<IpNet>().expect("net")],
            state.ipcache[&"203.0.113.13/32".parse::<IpNet>().expect("net")],
            "addresses with the same selectors share an identity"
        );
        assert_eq!(state.fqdn_identities.len(), 2);
        assert!(
            !state
                .ipcache
                .contains_key(&"203.0.113.11/32".parse::<IpNet>().expect("net")),
            "an address no selector wants stays world"
        );
        assert_eq!(
            compile(NODE, &inv, &policies, &mut ids).ipcache,
            before.ipcache,
            "a fresh compiler without the names"
        );

        // Forgetting the names (TTL expiry) takes the allows and the identities away.
        compiler.set_learned_names(Arc::default());
        let after = compiler.compile(NODE, &inv, &policies, &mut ids);
        assert!(!flow(&after, "203.0.113.10", 443));
        assert!(
            state
                .fqdn_identities
                .keys()
                .all(|id| ids.labels_of(*id).is_none()),
            "released"
        );
    }

    #[test]
    fn dns_rules_add_up_to_the_names_a_pod_may_ask_for() {
        let inv = inventory();
        let policies = models(
            r"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: dns, namespace: frontend}
spec:
  egress:
  - toPorts:
    - port: 53
      protocol: UDP
      rules: {dns: [{matchPattern: '*.example.test'}]}
    - port: 53
      protocol: TCP
      rules: {dns: [{matchName: example.org}]}
---
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: plain, namespace: backend}
spec:
  egress: [{toPorts: [{port: 53}]}]
",
        );
        let state = compile(NODE, &inv, &policies, &mut IdentityAllocator::new());
        let ep = |ns: &str, name: &str| {
            state.endpoints[&ObjectRef {
                namespace: ns.into(),
                name: name.into(),
            }]
                .dns
                .clone()
        };
        let web = ep("frontend", "web").expect("proxied");
        assert!(web.allows("api.example.test"));
        assert!(web.allows("example.org"));
        assert!(!web.allows("example.test"));
        assert!(!web.allows("a.b.example.test"));
        assert!(!web.allows("other.org"));
        assert_eq!(
            ep("backend", "api"),
            None,
            "no FQDN or DNS rule: not proxied"
        );
    }

    #[test]
    fn http_rules_restrict_requests_unless_an_l4_allow_covers_the_same_peer_and_port() {
        let inv = inventory();
        let policies = models(
            r#"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: http, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web, nodeward.io/namespace: frontend}}]
    toPorts:
    - {port: 8080, protocol: TCP, rules: {http: [{method: GET, path: /public}]}}
    - {port: 9090, protocol: TCP}
  - fromEndpoints: [{matchLabels: {app: tool}}]
    toPorts:
    - {port: 8080, rules: {http: [{method: POST}]}}
---
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: l4, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: tool}}]
    toPorts: [{port: 8080}]
"#,
        );
        let state = compile(NODE, &inv, &policies, &mut IdentityAllocator::new());
        let api = &state.endpoints[&ObjectRef {
            namespace: "backend".into(),
            name: "api".into(),
        }];
        let web = peer_facts(&state, "10.0.1.1".parse().unwrap(), None);
        let tool = peer_facts(&state, "10.0.1.3".parse().unwrap(), None);
        let rules = crate::policy::evaluate::http_rules(api, &web, 8080).expect("restricted");
        let none = http::HeaderMap::new();
        assert_eq!(rules.len(), 1);
        assert!(
            rules[0]
                .1
                .iter()
                .any(|m| m.matches("GET", "/public", &none))
        );
        assert!(
            !rules[0]
                .1
                .iter()
                .any(|m| m.matches("POST", "/admin", &none))
        );
        assert_eq!(state.rules[&rules[0].0].rule, "ingress[0]");
        assert_eq!(
            crate::policy::evaluate::http_rules(api, &web, 9090),
            None,
            "a port of the same rule without rules.http: every request"
        );
        assert_eq!(
            crate::policy::evaluate::http_rules(api, &tool, 8080),
            None,
            "an L4 allow of another policy for the same peer and port lets every request through"
        );
        let web_pod = &state.endpoints[&ObjectRef {
            namespace: "frontend".into(),
            name: "web".into(),
        }];
        assert!(
            web_pod.http_ingress.is_empty(),
            "a pod without rules.http keeps no list"
        );
        let bad = parse_mesh_policy(serde_json::json!({
            "apiVersion": "nodeward.io/v1alpha1", "kind": "MeshPolicy",
            "metadata": {"name": "bad", "namespace": "backend"},
            "spec": {"egress": [{"toPorts": [{"port": 80, "rules": {"http": [{"path": "/"}]}}]}]},
        }))
        .unwrap();
        assert_eq!(
            translate_mesh_policy(&bad).unwrap_err().to_string(),
            "MeshPolicy backend/bad: spec.egress[0].toPorts[0].rules.http: HTTP rules list what the selected pods may be asked: only in ingress (allow) rules"
        );
    }

    #[test]
    fn endpoints_ipcache_and_default_deny_rule() {
        let inv = inventory();
        let mut ids = IdentityAllocator::new();
        let policies = models(
            r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: deny-all, namespace: backend}
spec: {podSelector: {}}
",
        );
        let state = compile(NODE, &inv, &policies, &mut ids);
        let names: Vec<String> = state.endpoints.keys().map(ToString::to_string).collect();
        assert_eq!(
            names,
            ["backend/api", "backend/tool", "data/db", "frontend/web"],
            "local, running pods with an address"
        );
        let api = &state.endpoints[&ObjectRef {
            namespace: "backend".into(),
            name: "api".into(),
        }];
        assert_eq!(api.ipv4, Some("10.0.1.2".parse().expect("ip")));
        assert_eq!(api.ipv6, Some("fd00::2".parse().expect("ip")));
        let rule = api.ingress_default_deny.expect("ingress default deny");
        assert_eq!(state.rules[&rule].rule, DEFAULT_DENY_RULE);
        assert_eq!(
            state.rules[&rule].policy(),
            "NetworkPolicy/backend/deny-all"
        );
        assert_eq!(api.egress_default_deny, None);
        let ip = |s: &str| IpNet::from(s.parse::<IpAddr>().expect("ip"));
        assert_eq!(state.ipcache[&ip("192.168.0.1")], IDENTITY_HOST);
        assert_eq!(state.ipcache[&ip("192.168.0.2")], IDENTITY_REMOTE_NODE);
        assert_eq!(state.ipcache[&ip("10.0.1.2")], api.identity);
        assert_eq!(state.ipcache[&ip("fd00::2")], api.identity);
        assert_eq!(
            state.ipcache[&ip("10.0.2.2")],
            api.identity,
            "same labels, same identity"
        );
        assert!(!state.ipcache.contains_key(&ip("10.0.1.9")), "finished pod");
        // Deterministic: compiling again gives the same state.
        assert_eq!(compile(NODE, &inv, &policies, &mut ids), state);
    }

    /// A kept [`Compiler`] must compile exactly what a fresh one does, whatever changed in
    /// between: each step below edits the inventory, the policies or the allocator, and each
    /// would be compiled from stale facts if the cache missed that edit.
    #[test]
    fn a_kept_compiler_compiles_what_a_fresh_one_does() {
        type Step = fn(&mut Inventory, &mut Vec<PolicyModel>, &mut [IdentityAllocator; 2]);
        fn edit_pod(inv: &mut Inventory, key: &str, edit: impl FnOnce(&mut Pod)) {
            let (namespace, name) = key.split_once('/').expect("ns/name");
            let key = ObjectRef {
                namespace: namespace.into(),
                name: name.into(),
            };
            let mut pod = (*inv.pods[&key]).clone();
            edit(&mut pod);
            inv.pods.insert(key, Arc::new(pod));
        }
        fn set_label(pod: &mut Pod, key: &str, value: &str) {
            let labels = pod.metadata.labels.get_or_insert_default();
            labels.insert(key.into(), value.into());
        }
        let policies = r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: api, namespace: backend}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: fe}}, podSelector: {matchLabels: {app: web}}}]
    ports: [{port: http}]
  - from: [{podSelector: {matchLabels: {app: tool}}}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {team: be}}}]
  - to: [{ipBlock: {cidr: 10.9.0.0/16, except: [10.9.1.0/24]}}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: db, namespace: data}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: be}}}], ports: [{port: pg}]}]
";
        let steps: [(&str, Step); 11] = [
            ("first compilation", |_, _, _| {}),
            ("nothing changed", |_, _, _| {}),
            ("a pod's labels", |inv, _, _| {
                edit_pod(inv, "backend/tool", |p| set_label(p, "app", "web"));
            }),
            ("a namespace's labels", |inv, _, _| {
                let mut ns = (*inv.namespaces["backend"]).clone();
                ns.metadata.labels = Some([("team".into(), "fe".into())].into());
                inv.namespaces.insert("backend".into(), Arc::new(ns));
            }),
            ("a namespace goes", |inv, _, _| {
                inv.namespaces.remove("frontend");
            }),
            ("a pod's named port", |inv, _, _| {
                edit_pod(inv, "backend/api", |p| {
                    let spec = p.spec.as_mut().expect("spec");
                    let port = &mut spec.containers[0].ports.as_mut().expect("ports")[0];
                    port.container_port = 8443;
                });
            }),
            (
                "a pod moves to this node and another finishes",
                |inv, _, _| {
                    edit_pod(inv, "backend/api-2", |p| {
                        p.spec.as_mut().expect("spec").node_name = Some(NODE.into());
                    });
                    edit_pod(inv, "data/db", |p| {
                        p.status.as_mut().expect("status").phase = Some("Failed".into());
                    });
                },
            ),
            (
                "a pod goes and one comes with the same name",
                |inv, _, _| {
                    let key = ObjectRef {
                        namespace: "backend".into(),
                        name: "tool".into(),
                    };
                    inv.pods.remove(&key);
                    edit_pod(inv, "frontend/web", |p| set_label(p, "app", "tool"));
                },
            ),
            ("a policy CIDR is added", |_, pols, _| {
                pols.extend(models(
                    r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: out, namespace: frontend}
spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.8.0.0/16}}]}]}
",
                ));
            }),
            ("the policies go", |_, pols, _| pols.clear()),
            (
                "the allocator is replaced by one that numbers differently",
                |_, pols, ids| {
                    *pols = models(
                        r"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: all, namespace: backend}
spec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]}
",
                    );
                    for a in ids.iter_mut() {
                        *a = IdentityAllocator::new();
                        a.allocate(&Labels::from([("other".to_owned(), "x".to_owned())]));
                    }
                },
            ),
        ];
        let mut inv = inventory();
        let mut policies = models(policies);
        // [kept compiler's allocator, fresh compilations' allocator]
        let mut ids = [IdentityAllocator::new(), IdentityAllocator::new()];
        let mut kept = Compiler::default();
        for (what, step) in steps {
            step(&mut inv, &mut policies, &mut ids);
            let [kept_ids, fresh_ids] = &mut ids;
            let fresh = compile(NODE, &inv, &policies, fresh_ids);
            let reused = kept.compile(NODE, &inv, &policies, kept_ids);
            assert_eq!(reused, fresh, "after {what}");
            assert_eq!(kept_ids, fresh_ids, "identities after {what}");
            assert!(!fresh.endpoints.is_empty(), "{what}: something to compare");
        }
    }

    #[test]
    fn deny_wins_within_a_slice_and_entries_are_disjoint() {
        let segs = [
            Segment {
                first: 0,
                last: u16::MAX,
                verdict: POLICY_ALLOW,
                rule_id: 7,
            },
            Segment {
                first: 80,
                last: 80,
                verdict: POLICY_DENY,
                rule_id: 9,
            },
            Segment {
                first: 1000,
                last: 2000,
                verdict: POLICY_ALLOW,
                rule_id: 3,
            },
        ];
        let entries = resolve(&segs);
        for port in [0u16, 79, 80, 81, 1000, 65535] {
            let matching: Vec<_> = entries
                .iter()
                .filter(|e| {
                    let shift = 16 - u32::from(e.prefix_len);
                    e.prefix_len == 0 || (e.port >> shift) == (port >> shift)
                })
                .collect();
            assert_eq!(matching.len(), 1, "port {port}: {matching:?}");
            let want = if port == 80 {
                POLICY_DENY
            } else {
                POLICY_ALLOW
            };
            assert_eq!(matching[0].verdict, want, "port {port}");
        }
        // 81..=65535 merges allows of rules 7 and 3 and takes the lowest; 0..=79 is rule 7's.
        let rule_at = |port: u16| {
            entries
                .iter()
                .filter(|e| {
                    e.prefix_len == 0
                        || (e.port >> (16 - e.prefix_len)) == (port >> (16 - e.prefix_len))
                })
                .map(|e| e.rule_id)
                .next()
        };
        assert_eq!(
            rule_at(81),
            Some(3),
            "a merged allow takes the lowest rule id"
        );
        assert_eq!(rule_at(65535), Some(3));
        assert_eq!(rule_at(0), Some(7));
    }

    #[test]
    fn port_prefixes_cover_exactly_and_minimally() {
        assert_eq!(port_range_prefixes(0, u16::MAX), vec![(0, 0)]);
        assert_eq!(port_range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_range_prefixes(8000, 8007), vec![(8000, 13)]);
        assert_eq!(port_range_prefixes(1, u16::MAX).len(), 16);
        assert_eq!(port_range_prefixes(1, u16::MAX - 1).len(), 30);
        // Exhaustive over a pseudo-random sample: exact cover, disjoint, aligned, and minimal
        // (no two neighbours could merge into one aligned prefix).
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let a = u16::try_from((x >> 8) & 0xffff).expect("16 bits");
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let b = u16::try_from((x >> 8) & 0xffff).expect("16 bits");
            let (first, last) = (a.min(b), a.max(b));
            let prefixes = port_range_prefixes(first, last);
            let mut next = u32::from(first);
            for (i, (port, len)) in prefixes.iter().enumerate() {
                let size = 1u32 << (16 - u32::from(*len));
                assert_eq!(u32::from(*port), next, "contiguous at {first}..={last}");
                assert_eq!(u32::from(*port) % size, 0, "aligned");
                next += size;
                if let Some((p2, l2)) = prefixes.get(i + 1) {
                    let mergeable = l2 == len && u32::from(*port) % (2 * size) == 0;
                    assert!(!mergeable, "{port}/{len} and {p2}/{l2} could merge");
                }
            }
            assert_eq!(next, u32::from(last) + 1, "covers {first}..={last}");
            assert!(prefixes.len() <= 30, "at most 2*16-2 prefixes");
        }
    }

    #[test]
    fn example_policies_translate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples");
        let mut translated = 0;
        for entry in std::fs::read_dir(&dir).expect("policies/examples") {
            let path = entry.expect("dir entry").path();
            let text = std::fs::read_to_string(&path).expect("readable example");
            let policies: String = docs(&text)
                .into_iter()
                // Not policies: the namespaces, the mesh modes, the HTTP routes (80-http.yaml).
                .filter(|v| {
                    !matches!(
                        v["kind"].as_str(),
                        Some("Namespace" | "MutualTLS" | "HTTPRoute")
                    )
                })
                .map(|v| format!("---\n{}", serde_yaml_ng::to_string(&v).expect("yaml")))
                .collect();
            translated += models(&policies).len();
        }
        assert!(translated >= 5, "only {translated} example policies");
    }

    #[test]
    fn rule_ids_are_stable_fnv_hashes() {
        assert_eq!(fnv1a(""), 0x811c_9dc5);
        assert_eq!(fnv1a("a"), 0xe40c_292c);
        let mut rules = BTreeMap::new();
        let info = RuleInfo {
            kind: "NetworkPolicy".into(),
            namespace: "prod".into(),
            name: "allow-web".into(),
            rule: "ingress[0]".into(),
        };
        let id = rule_id(&mut rules, info.clone());
        assert_eq!(id, fnv1a("NetworkPolicy/prod/allow-web/ingress[0]"));
        assert_eq!(rule_id(&mut rules, info), id);
    }
}
