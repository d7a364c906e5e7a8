//! Node-local identities: a small number per distinct set of security labels, and per policy
//! CIDR prefix.
//!
//! Numbers are never reused within a run: freed numbers stay retired and new label sets get
//! fresh ones (so a flow, a conntrack entry or a map entry can never be attributed to the wrong
//! workload). The allocator is persisted in the agent's state dir so numbers survive restarts
//! and match what is pinned in bpffs. Only if a range is exhausted are retired numbers reused,
//! lowest first.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write as _};
use std::path::Path;

use agent_common::{
    IDENTITY_FIRST_ALLOCATED, IDENTITY_HOST, IDENTITY_KUBE_APISERVER, IDENTITY_REMOTE_NODE,
    IDENTITY_UNMANAGED, IDENTITY_WORLD,
};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::{Deserialize, Serialize};

use crate::policy::model::PrincipalMatch;
pub use crate::policy::selector::Labels;
use crate::policy::selector::{
    NAMESPACE_LABEL, NAMESPACE_NAME_LABEL, NS_LABEL_PREFIX, RESERVED_PREFIX, SERVICE_ACCOUNT_LABEL,
};

/// First CIDR identity; label identities stay below.
pub const IDENTITY_FIRST_CIDR: u32 = 1 << 24;
/// One past the last CIDR identity.
const IDENTITY_CIDR_END: u32 = 1 << 30;
/// Label carried by reserved identities in [`IdentityAllocator::labels_of`].
pub const RESERVED_LABEL: &str = "nodeward.io/reserved";
/// Label carried by CIDR identities in [`IdentityAllocator::labels_of`].
pub const CIDR_LABEL: &str = "nodeward.io/cidr";
/// The one label of a principal identity (see [`IdentityAllocator::allocate_principal`]).
pub const PRINCIPAL_LABEL: &str = "nodeward.io/principal";

/// The name of a reserved identity (`host`, `world`, ...), as flows show it.
#[must_use]
pub fn reserved_name(id: u32) -> Option<&'static str> {
    match id {
        IDENTITY_HOST => Some("host"),
        IDENTITY_WORLD => Some("world"),
        IDENTITY_UNMANAGED => Some("unmanaged"),
        IDENTITY_REMOTE_NODE => Some("remote-node"),
        IDENTITY_KUBE_APISERVER => Some("kube-apiserver"),
        _ => None,
    }
}

/// A pod's security labels: its own labels (except any under `nodeward.io/`, which a pod
/// cannot claim), `nodeward.io/namespace=<ns>`, its namespace's labels as
/// `nodeward.io/ns-label.<key>=<value>` (always including `kubernetes.io/metadata.name`), and
/// `nodeward.io/serviceaccount=<sa>` (default `default`).
#[must_use]
pub fn security_labels(pod: &Pod, namespace: Option<&Namespace>) -> Labels {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    security_labels_in(pod, &namespace_labels(ns, namespace))
}

/// The labels every pod of namespace `ns` gets from it (see [`security_labels`]): computed once
/// per namespace when labelling many pods.
#[must_use]
pub fn namespace_labels(ns: &str, namespace: Option<&Namespace>) -> Labels {
    let mut labels = Labels::new();
    labels.insert(NAMESPACE_LABEL.to_owned(), ns.to_owned());
    let ns_labels = namespace.and_then(|n| n.metadata.labels.as_ref());
    for (k, v) in ns_labels.into_iter().flatten() {
        labels.insert(format!("{NS_LABEL_PREFIX}{k}"), v.clone());
    }
    labels.insert(
        format!("{NS_LABEL_PREFIX}{NAMESPACE_NAME_LABEL}"),
        ns.to_owned(),
    );
    labels
}

/// [`security_labels`] with the namespace's part already computed ([`namespace_labels`]).
#[must_use]
pub fn security_labels_in(pod: &Pod, namespace_labels: &Labels) -> Labels {
    let mut labels: Labels = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(namespace_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    labels.insert(SERVICE_ACCOUNT_LABEL.to_owned(), sa.to_owned());
    labels
}

/// A revision number no allocator in this process has had.
fn next_revision() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The allocator. Serializes to a stable JSON document (see [`IdentityAllocator::save`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "Persisted", into = "Persisted")]
pub struct IdentityAllocator {
    labels: BTreeMap<u32, Labels>,
    cidrs: BTreeMap<u32, IpNet>,
    next_label: u32,
    next_cidr: u32,
    /// Hashed: a lookup per pod per sync, and label sets share long prefixes (`nodeward.io/`)
    /// that make ordered comparisons slow.
    by_labels: std::collections::HashMap<Labels, u32>,
    by_cidr: BTreeMap<IpNet, u32>,
    /// Drawn afresh by every allocation and release (not persisted): see [`Self::revision`].
    revision: u64,
}

impl PartialEq for IdentityAllocator {
    /// The same allocations; the revision counter is bookkeeping, not state.
    fn eq(&self, other: &Self) -> bool {
        self.labels == other.labels
            && self.cidrs == other.cidrs
            && self.next_label == other.next_label
            && self.next_cidr == other.next_cidr
    }
}

impl Eq for IdentityAllocator {}

#[derive(Serialize, Deserialize)]
struct Persisted {
    version: u32,
    next_label: u32,
    next_cidr: u32,
    labels: BTreeMap<u32, Labels>,
    cidrs: BTreeMap<u32, IpNet>,
}

impl From<Persisted> for IdentityAllocator {
    fn from(p: Persisted) -> Self {
        // Trust nothing: drop out-of-range numbers and duplicate label sets (first wins), and
        // keep the counters past every number in use.
        let mut a = Self::new();
        for (id, labels) in p.labels {
            if (IDENTITY_FIRST_ALLOCATED..IDENTITY_FIRST_CIDR).contains(&id)
                && !a.by_labels.contains_key(&labels)
            {
                a.by_labels.insert(labels.clone(), id);
                a.labels.insert(id, labels);
            }
        }
        for (id, net) in p.cidrs {
            if (IDENTITY_FIRST_CIDR..IDENTITY_CIDR_END).contains(&id)
                && !a.by_cidr.contains_key(&net)
            {
                a.by_cidr.insert(net, id);
                a.cidrs.insert(id, net);
            }
        }
        let after = |m: Option<u32>| m.map_or(0, |id| id + 1);
        a.next_label = p
            .next_label
            .clamp(IDENTITY_FIRST_ALLOCATED, IDENTITY_FIRST_CIDR)
            .max(after(a.labels.keys().next_back().copied()));
        a.next_cidr = p
            .next_cidr
            .clamp(IDENTITY_FIRST_CIDR, IDENTITY_CIDR_END)
            .max(after(a.cidrs.keys().next_back().copied()));
        a
    }
}

impl From<IdentityAllocator> for Persisted {
    fn from(a: IdentityAllocator) -> Self {
        Self {
            version: 1,
            next_label: a.next_label,
            next_cidr: a.next_cidr,
            labels: a.labels,
            cidrs: a.cidrs,
        }
    }
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityAllocator {
    #[must_use]
    pub fn new() -> Self {
        Self {
            labels: BTreeMap::new(),
            cidrs: BTreeMap::new(),
            next_label: IDENTITY_FIRST_ALLOCATED,
            next_cidr: IDENTITY_FIRST_CIDR,
            by_labels: std::collections::HashMap::new(),
            by_cidr: BTreeMap::new(),
            revision: next_revision(),
        }
    }

    /// Changes whenever an identity is allocated or released, so a caller can tell cheaply
    /// whether there is anything new to save, or whether what it remembers of the allocations
    /// still holds. Unique in the process: two allocators (even a clone and its original, once
    /// either changes) never share one unless they hold the same allocations.
    #[must_use]
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The identity of a label set, allocating a new number the first time it is seen.
    pub fn allocate(&mut self, labels: &Labels) -> u32 {
        if let Some(id) = self.by_labels.get(labels) {
            return *id;
        }
        let id = next_free(
            &mut self.next_label,
            IDENTITY_FIRST_ALLOCATED..IDENTITY_FIRST_CIDR,
            &self.labels,
        );
        self.labels.insert(id, labels.clone());
        self.by_labels.insert(labels.clone(), id);
        self.revision = next_revision();
        id
    }

    /// The identity of a policy CIDR prefix (host bits are ignored).
    pub fn allocate_cidr(&mut self, net: IpNet) -> u32 {
        let net = net.trunc();
        if let Some(id) = self.by_cidr.get(&net) {
            return *id;
        }
        let id = next_free(
            &mut self.next_cidr,
            IDENTITY_FIRST_CIDR..IDENTITY_CIDR_END,
            &self.cidrs,
        );
        self.cidrs.insert(id, net);
        self.by_cidr.insert(net, id);
        self.revision = next_revision();
        id
    }

    /// The identity of a principal peer (`fromPrincipals`, `fromServiceAccounts`): the label set
    /// `nodeward.io/principal=<match>`, which no pod can have (pods cannot claim `nodeward.io/`
    /// labels and always carry `nodeward.io/namespace`), so it is persisted and released like
    /// any other label identity and never shared with a workload.
    pub fn allocate_principal(&mut self, principal: &PrincipalMatch) -> u32 {
        self.allocate(&Labels::from([(
            PRINCIPAL_LABEL.to_owned(),
            principal.to_string(),
        )]))
    }

    /// The identity of a label set, if it has one.
    #[must_use]
    pub fn lookup(&self, labels: &Labels) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    /// The prefix of a CIDR identity.
    #[must_use]
    pub fn cidr_of(&self, id: u32) -> Option<IpNet> {
        self.cidrs.get(&id).copied()
    }

    /// The labels of an identity, for flows: the security labels of an allocated identity,
    /// `nodeward.io/reserved=<name>` for a reserved one, `nodeward.io/cidr=<prefix>` for a CIDR
    /// identity, `nodeward.io/principal=<match>` for a principal identity, `None` for a number
    /// that is not (or no longer) allocated.
    #[must_use]
    pub fn labels_of(&self, id: u32) -> Option<Labels> {
        if let Some(name) = reserved_name(id) {
            return Some(Labels::from([(RESERVED_LABEL.to_owned(), name.to_owned())]));
        }
        if let Some(net) = self.cidrs.get(&id) {
            return Some(Labels::from([(CIDR_LABEL.to_owned(), net.to_string())]));
        }
        self.labels.get(&id).cloned()
    }

    /// Number of allocated (label and CIDR) identities.
    #[must_use]
    pub fn len(&self) -> usize {
        self.labels.len() + self.cidrs.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Releases every identity not in `in_use`. Released numbers are not handed out again in
    /// this run (nor after a restart, since the counters are persisted).
    pub fn gc(&mut self, in_use: &BTreeSet<u32>) {
        let before = self.len();
        self.labels.retain(|id, _| in_use.contains(id));
        self.by_labels.retain(|_, id| in_use.contains(id));
        self.cidrs.retain(|id, _| in_use.contains(id));
        self.by_cidr.retain(|_, id| in_use.contains(id));
        if self.len() != before {
            self.revision = next_revision();
        }
    }

    /// Loads the allocator saved at `path`; a missing file gives an empty allocator.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn load(path: &Path) -> io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::new()),
            Err(e) => Err(e),
        }
    }

    /// Saves atomically: writes a temporary file next to `path`, syncs it, renames it over
    /// `path`, so a crash leaves either the old or the new state.
    ///
    /// # Errors
    /// Writing, syncing or renaming failed.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not fatal where directories cannot be opened.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// The next number of `range` after `next`, or, once the range is exhausted, the lowest number
/// not in use.
fn next_free<T>(next: &mut u32, range: std::ops::Range<u32>, used: &BTreeMap<u32, T>) -> u32 {
    if *next < range.end {
        let id = *next;
        *next += 1;
        return id;
    }
    range
        .clone()
        .find(|id| !used.contains_key(id))
        .expect("an identity range of millions of numbers is never entirely in use")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn same_labels_same_number_and_numbers_are_never_reused() {
        let mut ids = IdentityAllocator::new();
        let a = ids.allocate(&l(&[("app", "a")]));
        let b = ids.allocate(&l(&[("app", "b")]));
        assert_eq!(a, IDENTITY_FIRST_ALLOCATED);
        assert_eq!(b, a + 1);
        assert_eq!(ids.allocate(&l(&[("app", "a")])), a);
        ids.gc(&BTreeSet::from([b]));
        assert_eq!(ids.labels_of(a), None);
        let a2 = ids.allocate(&l(&[("app", "a")]));
        assert_eq!(a2, b + 1, "a released number is not reused");
        let c = ids.allocate_cidr("10.1.2.3/8".parse().expect("cidr"));
        assert_eq!(c, IDENTITY_FIRST_CIDR);
        assert_eq!(ids.cidr_of(c), Some("10.0.0.0/8".parse().expect("cidr")));
        assert_eq!(
            ids.labels_of(IDENTITY_WORLD),
            Some(l(&[(RESERVED_LABEL, "world")]))
        );
    }

    #[test]
    fn principal_identities_are_label_identities_no_pod_can_have() {
        let mut ids = IdentityAllocator::new();
        let sa = PrincipalMatch::ServiceAccount {
            namespace: "shop".into(),
            name: "api".into(),
        };
        let id = ids.allocate_principal(&sa);
        assert_eq!(ids.allocate_principal(&sa), id, "one identity per match");
        assert_eq!(ids.labels_of(id), Some(l(&[(PRINCIPAL_LABEL, "shop/api")])));
        let pod: Pod = serde_yaml_ng::from_str(
            "metadata: {name: p, namespace: shop, labels: {nodeward.io/principal: shop/api}}\nspec: {containers: []}",
        )
        .expect("pod");
        assert_ne!(ids.allocate(&security_labels(&pod, None)), id);
        ids.gc(&BTreeSet::new());
        assert!(ids.is_empty(), "released like the others");
    }

    #[test]
    fn numbers_survive_a_save_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identities.json");
        let mut ids = IdentityAllocator::load(&path).expect("missing file is empty");
        assert!(ids.is_empty());
        let a = ids.allocate(&l(&[("app", "a")]));
        let b = ids.allocate(&l(&[("app", "b")]));
        let c = ids.allocate_cidr("fd00::/64".parse().expect("cidr"));
        ids.gc(&BTreeSet::from([b, c]));
        ids.save(&path).expect("save");
        let mut back = IdentityAllocator::load(&path).expect("load");
        assert_eq!(back, ids);
        assert_eq!(back.lookup(&l(&[("app", "b")])), Some(b));
        let next = back.allocate(&l(&[("app", "a")]));
        assert!(next > b && next != a, "counter persisted: got {next}");
        assert!(!dir.path().join("identities.json.tmp").exists());
    }

    #[test]
    fn security_labels_include_namespace_and_service_account() {
        let pod: Pod = serde_yaml_ng::from_str(
            "metadata: {name: p, namespace: ns1, labels: {app: web, nodeward.io/namespace: evil}}\nspec: {containers: []}",
        )
        .expect("pod");
        let ns: Namespace =
            serde_yaml_ng::from_str("metadata: {name: ns1, labels: {team: a}}").expect("ns");
        assert_eq!(
            security_labels(&pod, Some(&ns)),
            l(&[
                ("app", "web"),
                ("nodeward.io/namespace", "ns1"),
                ("nodeward.io/ns-label.kubernetes.io/metadata.name", "ns1"),
                ("nodeward.io/ns-label.team", "a"),
                ("nodeward.io/serviceaccount", "default"),
            ])
        );
    }
}
