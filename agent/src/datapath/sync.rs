//! Writing a compiled state into the maps as a diff, without a window.
//!
//! The guarantee: while a change is being written, a packet that both the old and the new state
//! allow is never dropped, and one that both deny never passes. It rests on three facts:
//!
//! * Within one (endpoint, peer, direction, protocol) slice the compiler emits disjoint port
//!   prefixes, so a longest-prefix lookup in a slice finds at most one entry of the old set and
//!   at most one of the new set, and the datapath's verdict is "any deny, else any allow, else the
//!   default".
//! * A slice that only appears is written denies first, then allows; a slice that only
//!   disappears is removed allows first, then denies. Adds all happen before removals. A slice
//!   whose entries change is written the same way, entry by entry, when no entry only the old
//!   side has overlaps one only the new side has (then each port matches at most one entry of
//!   the two sides together, and the entries behave like slices appearing and disappearing): a
//!   policy change costs map writes in proportion to what changed, not to the endpoint's size.
//! * Anything else (a slice whose old and new prefixes overlap, as when a port range widens, or
//!   a change of default deny) is written as a complete new *policy set* beside the old one; the
//!   endpoint then switches to it with a single map update, and the old set is removed
//!   afterwards.
//!
//! Every change ends with a bump of the policy generation, so conntrack re-evaluates live flows
//! against the final state (a revoked allow stops an established connection).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use agent_common::{
    EP_EGRESS_ENFORCED, EP_HAS_IPV4, EP_HAS_IPV6, EP_INGRESS_ENFORCED, EP_MESHED, EP_MTLS_STRICT,
    EndpointInfo, IpcacheValue, POLICY_ALLOW, POLICY_DENY, POLICY_KEY_PREFIX_NO_PORT, PolicyKey,
    PolicyValue,
};
use ipnet::IpNet;

use super::sizes::MapSizes;
use super::{MapWriter, PolicyEntryKey, addr_bytes};
use crate::policy::{EndpointPolicy, MeshMode, PortEntry, SliceKey};

/// Why a sync was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Checked before anything is written: the previous state stays enforced.
    #[error(
        "map {map} would overflow: {needed} entries needed, capacity {capacity} (raise {flag}); the new policy set was rejected whole and the previous state stays enforced",
        flag = size_flag(map)
    )]
    Overflow {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("writing map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The agent's flag that sizes `map` (a name of [`Syncer::fill`]).
#[must_use]
pub fn size_flag(map: &str) -> &'static str {
    match map {
        "endpoints" => "--map-endpoints-entries",
        "policy" => "--map-policy-entries",
        "ipcache" => "--map-ipcache-entries",
        "policy_cidrs" => "--map-policy-cidr-entries",
        _ => "the map's size",
    }
}

/// What one sync did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    pub policy_added: usize,
    pub policy_removed: usize,
    pub ipcache_changed: usize,
    pub endpoints_changed: usize,
    /// Endpoints that switched to a new policy set (rather than an in-place diff).
    pub policy_sets_switched: usize,
    pub generation: u32,
    #[serde(skip)]
    pub duration: Duration,
}

impl SyncStats {
    #[must_use]
    pub fn changed(&self) -> bool {
        self.policy_added + self.policy_removed + self.ipcache_changed + self.endpoints_changed > 0
    }
}

/// The maps plus a mirror of what they hold, so every sync is a diff.
pub struct Syncer<M: MapWriter> {
    maps: M,
    endpoints: BTreeMap<u32, EndpointInfo>,
    policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    ipcache: BTreeMap<IpNet, IpcacheValue>,
    policy_cidrs: BTreeMap<IpNet, u32>,
    generation: u32,
    /// The maps' capacities, read once when adopting them.
    sizes: MapSizes,
    /// Each endpoint's policy as the last apply wrote it, that apply having succeeded whole:
    /// the same policy again needs no look at its entries.
    written: BTreeMap<u32, EndpointPolicy>,
}

/// The map entries of one slice (or any set of entries), by key.
type Slice = BTreeMap<PolicyEntryKey, PolicyValue>;

fn map_err<E: std::error::Error + Send + Sync + 'static>(
    map: &'static str,
) -> impl Fn(E) -> SyncError {
    move |e| SyncError::Map {
        map,
        source: Box::new(e),
    }
}

impl<M: MapWriter> Syncer<M> {
    /// Adopts what the maps hold now (pinned state from an earlier run, or empty maps).
    pub fn adopt(maps: M) -> Result<Self, SyncError> {
        Ok(Self {
            endpoints: maps.read_endpoints().map_err(map_err("endpoints"))?,
            policy: maps.read_policy().map_err(map_err("policy"))?,
            ipcache: maps.read_ipcache().map_err(map_err("ipcache"))?,
            policy_cidrs: maps.read_policy_cidrs().map_err(map_err("policy_cidrs"))?,
            generation: maps.read_generation().map_err(map_err("config"))?,
            sizes: maps.capacities(),
            maps,
            written: BTreeMap::new(),
        })
    }

    #[must_use]
    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// The endpoints as the maps hold them, by ifindex.
    #[must_use]
    pub fn endpoints(&self) -> &BTreeMap<u32, EndpointInfo> {
        &self.endpoints
    }

    /// Entries per map, for status and metrics: (name, entries, capacity).
    #[must_use]
    pub fn fill(&self) -> [(&'static str, usize, u32); 4] {
        [
            ("endpoints", self.endpoints.len(), self.sizes.endpoints),
            ("policy", self.policy.len(), self.sizes.policy),
            ("ipcache", self.ipcache.len(), self.sizes.ipcache),
            (
                "policy_cidrs",
                self.policy_cidrs.len(),
                self.sizes.policy_cidrs,
            ),
        ]
    }

    #[must_use]
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Writes one ipcache entry ahead of the next [`Syncer::apply`] (which then finds it in
    /// place): the DNS proxy's fast path for a learned address whose identity the policy map
    /// already knows. Returns whether the map changed.
    ///
    /// # Errors
    /// The map refused the entry (full).
    pub fn put_ipcache_entry(
        &mut self,
        prefix: IpNet,
        value: IpcacheValue,
    ) -> Result<bool, SyncError> {
        if self.ipcache.get(&prefix) == Some(&value) {
            return Ok(false);
        }
        self.maps
            .put_ipcache(prefix, value)
            .map_err(map_err("ipcache"))?;
        self.ipcache.insert(prefix, value);
        Ok(true)
    }

    /// Makes the maps hold exactly `endpoints` (by ifindex), `ipcache` and `policy_cidrs`.
    pub fn apply(
        &mut self,
        endpoints: &BTreeMap<u32, &EndpointPolicy>,
        ipcache: &BTreeMap<IpNet, IpcacheValue>,
        policy_cidrs: &BTreeMap<IpNet, u32>,
    ) -> Result<SyncStats, SyncError> {
        let result = self.apply_all(endpoints, ipcache, policy_cidrs);
        if result.is_ok() {
            self.written
                .retain(|ifindex, _| endpoints.contains_key(ifindex));
            for (ifindex, policy) in endpoints {
                if self.written.get(ifindex) != Some(*policy) {
                    self.written.insert(*ifindex, (*policy).clone());
                }
            }
        } else {
            // What the maps hold is only in the mirror now: look at every entry next time.
            self.written.clear();
        }
        result
    }

    fn apply_all(
        &mut self,
        endpoints: &BTreeMap<u32, &EndpointPolicy>,
        ipcache: &BTreeMap<IpNet, IpcacheValue>,
        policy_cidrs: &BTreeMap<IpNet, u32>,
    ) -> Result<SyncStats, SyncError> {
        let started = Instant::now();
        let plan = self.plan(endpoints)?;
        // Adds come before removals, so a map holds the old and the new entries side by side
        // for a moment. Counting what both share costs a lookup per entry: only when the sum
        // does not fit anyway.
        check_peak("ipcache", &self.ipcache, ipcache, self.sizes.ipcache)?;
        check_peak(
            "policy_cidrs",
            &self.policy_cidrs,
            policy_cidrs,
            self.sizes.policy_cidrs,
        )?;
        check_peak(
            "endpoints",
            &self.endpoints,
            endpoints,
            self.sizes.endpoints,
        )?;
        let mut stats = SyncStats::default();

        // Phase A: everything new, denies before allows.
        for verdict in [POLICY_DENY, POLICY_ALLOW] {
            for (key, value) in &plan.add {
                if value.verdict == verdict {
                    self.put_policy(*key, *value)?;
                    stats.policy_added += 1;
                }
            }
        }
        for (prefix, identity) in policy_cidrs {
            if self.policy_cidrs.get(prefix) != Some(identity) {
                self.maps
                    .put_policy_cidr(*prefix, *identity)
                    .map_err(map_err("policy_cidrs"))?;
                self.policy_cidrs.insert(*prefix, *identity);
                stats.ipcache_changed += 1;
            }
        }
        // Phase B: switch endpoints and addresses, each one atomic map update.
        for (ifindex, info) in &plan.endpoints {
            if self.endpoints.get(ifindex) != Some(info) {
                self.maps
                    .put_endpoint(*ifindex, info)
                    .map_err(map_err("endpoints"))?;
                self.endpoints.insert(*ifindex, *info);
                stats.endpoints_changed += 1;
            }
        }
        stats.policy_sets_switched = plan.switched;
        // Both sorted: one pass over the two, no lookup per entry (at 50,000 pods, each pod
        // event would pay two lookups per pod).
        let (changed, stale) = merge_diff(&self.ipcache, ipcache);
        for (prefix, value) in changed {
            self.maps
                .put_ipcache(prefix, value)
                .map_err(map_err("ipcache"))?;
            self.ipcache.insert(prefix, value);
            stats.ipcache_changed += 1;
        }
        // Phase C: everything gone, allows before denies.
        let gone: Vec<u32> = self
            .endpoints
            .keys()
            .filter(|ifindex| !plan.endpoints.contains_key(ifindex))
            .copied()
            .collect();
        for ifindex in gone {
            self.maps
                .delete_endpoint(ifindex)
                .map_err(map_err("endpoints"))?;
            self.endpoints.remove(&ifindex);
            stats.endpoints_changed += 1;
        }
        for prefix in stale {
            self.maps
                .delete_ipcache(prefix)
                .map_err(map_err("ipcache"))?;
            self.ipcache.remove(&prefix);
            stats.ipcache_changed += 1;
        }
        for verdict in [POLICY_ALLOW, POLICY_DENY] {
            for key in &plan.remove {
                if self.policy.get(key).is_some_and(|v| v.verdict == verdict) {
                    self.maps.delete_policy(*key).map_err(map_err("policy"))?;
                    self.policy.remove(key);
                    stats.policy_removed += 1;
                }
            }
        }
        // Whatever is left (an unknown verdict byte from an older agent) goes too.
        for key in &plan.remove {
            if self.policy.remove(key).is_some() {
                self.maps.delete_policy(*key).map_err(map_err("policy"))?;
                stats.policy_removed += 1;
            }
        }
        let stale: Vec<IpNet> = self
            .policy_cidrs
            .keys()
            .filter(|p| !policy_cidrs.contains_key(p))
            .copied()
            .collect();
        for prefix in stale {
            self.maps
                .delete_policy_cidr(prefix)
                .map_err(map_err("policy_cidrs"))?;
            self.policy_cidrs.remove(&prefix);
            stats.ipcache_changed += 1;
        }
        // Phase D: make conntrack look again.
        if stats.changed() {
            self.generation = self.generation.wrapping_add(1);
            self.maps
                .set_generation(self.generation)
                .map_err(map_err("config"))?;
        }
        stats.generation = self.generation;
        stats.duration = started.elapsed();
        Ok(stats)
    }

    fn put_policy(&mut self, key: PolicyEntryKey, value: PolicyValue) -> Result<(), SyncError> {
        self.maps
            .put_policy(key, value)
            .map_err(map_err("policy"))?;
        self.policy.insert(key, value);
        Ok(())
    }

    /// Decides, per endpoint, between an in-place diff and a new policy set, and checks that the
    /// policy map can hold the old and the new entries side by side. Keys order by policy set,
    /// then slice, so each set and each slice of the mirror is one contiguous range: the plan
    /// compares each slice the compiler emitted with its range, and diffs entry by entry only
    /// the slices that differ, instead of regrouping the whole mirror on every sync.
    fn plan(&self, desired: &BTreeMap<u32, &EndpointPolicy>) -> Result<Plan, SyncError> {
        let mut sets = BTreeSet::new();
        let mut last = None;
        for key in self.policy.keys() {
            if last != Some(key.key.policy_set_be) {
                last = Some(key.key.policy_set_be);
                sets.insert(u32::from_be(key.key.policy_set_be));
            }
        }
        let mut next_set = sets
            .iter()
            .chain(self.endpoints.values().map(|e| &e.policy_set))
            .max()
            .copied()
            .unwrap_or(0);
        let mut plan = Plan::default();
        let mut live_sets = BTreeSet::new();
        for (ifindex, policy) in desired {
            let current = self.endpoints.get(ifindex);
            let mut info = endpoint_info(policy);
            let in_place = current.is_some_and(|c| {
                c.flags == info.flags
                    && c.ingress_default_rule == info.ingress_default_rule
                    && c.egress_default_rule == info.egress_default_rule
            });
            let in_place_set = current.map(|c| c.policy_set).filter(|_| in_place);
            // Written whole by the last apply and unchanged since.
            if let Some(set) = in_place_set
                && self.written.get(ifindex) == Some(*policy)
            {
                info.policy_set = set;
                live_sets.insert(set);
                plan.endpoints.insert(*ifindex, info);
                continue;
            }
            if let Some(set) = in_place_set
                && let Some((add, remove)) = self.diff_in_place(set, policy)
            {
                plan.add.extend(add);
                plan.remove.extend(remove);
                info.policy_set = set;
                live_sets.insert(set);
                plan.endpoints.insert(*ifindex, info);
                continue;
            }
            next_set = next_set.wrapping_add(1).max(1);
            for (slice, ports) in &policy.slices {
                plan.add.extend(slice_entries(next_set, slice, ports));
            }
            if current.is_some() {
                plan.switched += 1;
            }
            info.policy_set = next_set;
            live_sets.insert(next_set);
            plan.endpoints.insert(*ifindex, info);
        }
        // Sets no endpoint uses any more (old sets after a switch, removed endpoints, leftovers).
        for set in sets.difference(&live_sets) {
            plan.remove
                .extend(self.policy.range(set_range(*set)).map(|(k, _)| *k));
        }
        let peak = self.policy.len() + plan.add.len();
        check_capacity("policy", peak, self.sizes.policy)?;
        Ok(plan)
    }

    /// The adds and removals that take policy set `set` to `policy` entry by entry, or `None`
    /// when some slice cannot change in place (see [`in_place_safe`]).
    fn diff_in_place(
        &self,
        set: u32,
        policy: &EndpointPolicy,
    ) -> Option<(Slice, Vec<PolicyEntryKey>)> {
        let mut add = Slice::new();
        let mut remove = Vec::new();
        for (slice, ports) in &policy.slices {
            let existing = self.policy.range(slice_range(set, slice));
            let wanted = slice_entries(set, slice, ports);
            if wanted.iter().eq(existing.clone()) {
                continue;
            }
            let existing: Slice = existing.map(|(k, v)| (*k, *v)).collect();
            if !in_place_safe(&existing, &wanted) {
                return None;
            }
            remove.extend(existing.keys().filter(|k| !wanted.contains_key(k)));
            add.extend(
                wanted
                    .into_iter()
                    .filter(|(k, v)| existing.get(k) != Some(v)),
            );
        }
        // Slices the policy no longer has: one lookup per slice, not per entry.
        let mut last: Option<(SliceKey, bool)> = None;
        for key in self.policy.range(set_range(set)).map(|(k, _)| k) {
            let slice = slice_of(&key.key);
            let gone = match last {
                Some((s, gone)) if s == slice => gone,
                _ => {
                    let gone = !policy.slices.contains_key(&slice);
                    last = Some((slice, gone));
                    gone
                }
            };
            if gone {
                remove.push(*key);
            }
        }
        Some((add, remove))
    }
}

#[derive(Default)]
struct Plan {
    add: BTreeMap<PolicyEntryKey, PolicyValue>,
    remove: BTreeSet<PolicyEntryKey>,
    endpoints: BTreeMap<u32, EndpointInfo>,
    switched: usize,
}

/// What makes `current` into `wanted`: the entries to write (new or different) and the keys to
/// delete, in one pass over both (sorted) maps.
fn merge_diff<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    wanted: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let (mut put, mut delete) = (Vec::new(), Vec::new());
    let mut have = current.iter().peekable();
    for (key, value) in wanted {
        while let Some((k, _)) = have.next_if(|(k, _)| *k < key) {
            delete.push(*k);
        }
        match have.next_if(|(k, _)| *k == key) {
            Some((_, v)) if v == value => {}
            _ => put.push((*key, *value)),
        }
    }
    delete.extend(have.map(|(k, _)| *k));
    (put, delete)
}

fn check_capacity(map: &'static str, needed: usize, capacity: u32) -> Result<(), SyncError> {
    if needed > capacity as usize {
        return Err(SyncError::Overflow {
            map,
            needed,
            capacity,
        });
    }
    Ok(())
}

/// Refuses a change that would not fit while `old` and `new` are in the map side by side.
fn check_peak<K: Ord, A, B>(
    map: &'static str,
    old: &BTreeMap<K, A>,
    new: &BTreeMap<K, B>,
    capacity: u32,
) -> Result<(), SyncError> {
    if old.len() + new.len() <= capacity as usize {
        return Ok(());
    }
    let shared = new.keys().filter(|k| old.contains_key(k)).count();
    check_capacity(map, old.len() + new.len() - shared, capacity)
}

/// Whether a slice can change from `old` to `new` entry by entry (adds, then removals) without
/// a window: when no entry that only one side has overlaps one that only the other has, every
/// port matches at most one entry of the union at any moment, so the slice behaves like a set
/// of entries appearing and disappearing (the case the ordering of [`Syncer::apply`] covers).
/// Overlapping prefixes of different lengths would let the longest match hide a deny; those
/// slices go into a new policy set instead.
fn in_place_safe(
    old: &BTreeMap<PolicyEntryKey, PolicyValue>,
    new: &BTreeMap<PolicyEntryKey, PolicyValue>,
) -> bool {
    if old == new {
        return true;
    }
    let ranges = |side: &BTreeMap<PolicyEntryKey, PolicyValue>,
                  other: &BTreeMap<PolicyEntryKey, PolicyValue>| {
        let mut r: Vec<(u32, u32)> = side
            .keys()
            .filter(|k| !other.contains_key(k))
            .map(port_range)
            .collect();
        r.sort_unstable();
        r
    };
    let (gone, came) = (ranges(old, new), ranges(new, old));
    // Each side is disjoint in itself (the compiler's guarantee): a merge finds any overlap.
    let (mut i, mut j) = (0, 0);
    while let (Some(a), Some(b)) = (gone.get(i), came.get(j)) {
        if a.0 <= b.1 && b.0 <= a.1 {
            return false;
        }
        if a.1 < b.1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    true
}

/// The ports an entry covers, as an inclusive range.
fn port_range(key: &PolicyEntryKey) -> (u32, u32) {
    let bits = key
        .prefix_len
        .saturating_sub(POLICY_KEY_PREFIX_NO_PORT)
        .min(16);
    let size = 1u32 << (16 - bits);
    let first = u32::from(u16::from_be(key.key.dport_be)) & !(size - 1);
    (first, first + size - 1)
}

fn slice_of(key: &PolicyKey) -> SliceKey {
    SliceKey {
        peer_identity: u32::from_be(key.peer_identity_be),
        direction: key.direction,
        protocol: key.protocol,
    }
}

/// The map entries of one slice of an endpoint's policy under policy set `set`.
fn slice_entries(set: u32, slice: &SliceKey, ports: &[PortEntry]) -> Slice {
    ports
        .iter()
        .map(|p| {
            let key = PolicyEntryKey {
                key: slice_key(set, slice, p.port.to_be()),
                prefix_len: POLICY_KEY_PREFIX_NO_PORT + u32::from(p.prefix_len),
            };
            let value = PolicyValue {
                verdict: p.verdict,
                _pad: [0; 3],
                rule_id: p.rule_id,
            };
            (key, value)
        })
        .collect()
}

fn slice_key(set: u32, slice: &SliceKey, dport_be: u16) -> PolicyKey {
    PolicyKey {
        policy_set_be: set.to_be(),
        peer_identity_be: slice.peer_identity.to_be(),
        direction: slice.direction,
        protocol: slice.protocol,
        dport_be,
    }
}

/// Every key of `slice` in policy set `set`.
fn slice_range(set: u32, slice: &SliceKey) -> std::ops::RangeInclusive<PolicyEntryKey> {
    let entry = |dport_be, prefix_len| PolicyEntryKey {
        key: slice_key(set, slice, dport_be),
        prefix_len,
    };
    entry(0, 0)..=entry(u16::MAX, u32::MAX)
}

/// Every key of policy set `set`.
fn set_range(set: u32) -> std::ops::RangeInclusive<PolicyEntryKey> {
    let first = PolicyKey {
        policy_set_be: set.to_be(),
        ..PolicyKey::default()
    };
    let last = PolicyKey {
        policy_set_be: set.to_be(),
        peer_identity_be: u32::MAX,
        direction: u8::MAX,
        protocol: u8::MAX,
        dport_be: u16::MAX,
    };
    let entry = |key, prefix_len| PolicyEntryKey { key, prefix_len };
    entry(first, 0)..=entry(last, u32::MAX)
}

/// The endpoint map value for a compiled endpoint (policy set filled in by the caller).
#[must_use]
pub fn endpoint_info(policy: &EndpointPolicy) -> EndpointInfo {
    let mut info = EndpointInfo {
        identity: policy.identity,
        ..EndpointInfo::default()
    };
    if let Some(rule) = policy.ingress_default_deny {
        info.flags |= EP_INGRESS_ENFORCED;
        info.ingress_default_rule = rule;
    }
    if let Some(rule) = policy.egress_default_deny {
        info.flags |= EP_EGRESS_ENFORCED;
        info.egress_default_rule = rule;
    }
    if let Some(v4) = policy.ipv4 {
        info.flags |= EP_HAS_IPV4;
        info.ipv4 = addr_bytes(IpAddr::V4(v4));
    }
    if let Some(v6) = policy.ipv6 {
        info.flags |= EP_HAS_IPV6;
        info.ipv6 = addr_bytes(IpAddr::V6(v6));
    }
    info.flags |= match policy.mesh {
        MeshMode::Off => 0,
        MeshMode::Permissive => EP_MESHED,
        MeshMode::Strict => EP_MESHED | EP_MTLS_STRICT,
    };
    info
}

#[cfg(test)]
mod tests {
    //! The fake maps record every intermediate state; a model of the datapath's lookup checks
    //! that no intermediate state contradicts a verdict on which the old and new states agree.
    use super::*;
    use agent_common::{DIR_EGRESS, DIR_INGRESS, IDENTITY_WORLD};
    use std::cell::RefCell;
    use std::convert::Infallible;
    use std::rc::Rc;

    #[derive(Clone, Default, Debug, PartialEq)]
    struct State {
        endpoints: BTreeMap<u32, EndpointInfo>,
        policy: BTreeMap<PolicyEntryKey, PolicyValue>,
        ipcache: BTreeMap<IpNet, IpcacheValue>,
        cidrs: BTreeMap<IpNet, u32>,
        generation: u32,
    }

    /// Fake maps that hand every intermediate state to an observer.
    struct Fake {
        state: State,
        history: Rc<RefCell<Vec<State>>>,
        sizes: MapSizes,
    }

    impl Fake {
        fn record(&self) {
            self.history.borrow_mut().push(self.state.clone());
        }
    }

    impl MapWriter for Fake {
        type Error = Infallible;
        fn read_endpoints(&self) -> Result<BTreeMap<u32, EndpointInfo>, Infallible> {
            Ok(self.state.endpoints.clone())
        }
        fn read_policy(&self) -> Result<BTreeMap<PolicyEntryKey, PolicyValue>, Infallible> {
            Ok(self.state.policy.clone())
        }
        fn read_ipcache(&self) -> Result<BTreeMap<IpNet, IpcacheValue>, Infallible> {
            Ok(self.state.ipcache.clone())
        }
        fn read_policy_cidrs(&self) -> Result<BTreeMap<IpNet, u32>, Infallible> {
            Ok(self.state.cidrs.clone())
        }
        fn read_generation(&self) -> Result<u32, Infallible> {
            Ok(self.state.generation)
        }
        fn put_endpoint(&mut self, i: u32, info: &EndpointInfo) -> Result<(), Infallible> {
            self.state.endpoints.insert(i, *info);
            self.record();
            Ok(())
        }
        fn delete_endpoint(&mut self, i: u32) -> Result<(), Infallible> {
            self.state.endpoints.remove(&i);
            self.record();
            Ok(())
        }
        fn put_policy(&mut self, k: PolicyEntryKey, v: PolicyValue) -> Result<(), Infallible> {
            self.state.policy.insert(k, v);
            self.record();
            Ok(())
        }
        fn delete_policy(&mut self, k: PolicyEntryKey) -> Result<(), Infallible> {
            self.state.policy.remove(&k);
            self.record();
            Ok(())
        }
        fn put_ipcache(&mut self, p: IpNet, v: IpcacheValue) -> Result<(), Infallible> {
            self.state.ipcache.insert(p, v);
            self.record();
            Ok(())
        }
        fn delete_ipcache(&mut self, p: IpNet) -> Result<(), Infallible> {
            self.state.ipcache.remove(&p);
            self.record();
            Ok(())
        }
        fn put_policy_cidr(&mut self, p: IpNet, id: u32) -> Result<(), Infallible> {
            self.state.cidrs.insert(p, id);
            self.record();
            Ok(())
        }
        fn delete_policy_cidr(&mut self, p: IpNet) -> Result<(), Infallible> {
            self.state.cidrs.remove(&p);
            self.record();
            Ok(())
        }
        fn set_generation(&mut self, g: u32) -> Result<(), Infallible> {
            self.state.generation = g;
            self.record();
            Ok(())
        }
        fn capacities(&self) -> MapSizes {
            self.sizes
        }
    }

    fn longest(map: &BTreeMap<IpNet, u32>, addr: IpAddr) -> Option<u32> {
        map.iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, id)| *id)
    }

    fn lpm_policy(state: &State, key: PolicyKey) -> Option<PolicyValue> {
        let key_bytes = |k: &PolicyKey| -> u128 {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&k.policy_set_be.to_ne_bytes());
            b[4..8].copy_from_slice(&k.peer_identity_be.to_ne_bytes());
            b[8] = k.direction;
            b[9] = k.protocol;
            b[10..12].copy_from_slice(&k.dport_be.to_ne_bytes());
            u128::from_be_bytes(b)
        };
        let probe = key_bytes(&key);
        state
            .policy
            .iter()
            .filter(|(k, _)| {
                let mask = if k.prefix_len == 0 {
                    0
                } else {
                    u128::MAX << (128 - k.prefix_len)
                };
                key_bytes(&k.key) & mask == probe & mask
            })
            .max_by_key(|(k, _)| k.prefix_len)
            .map(|(_, v)| *v)
    }

    /// The datapath's verdict on a new flow, as `agent-ebpf` computes it.
    fn verdict(state: &State, ifindex: u32, dir: u8, peer: IpAddr, proto: u8, port: u16) -> bool {
        let Some(ep) = state.endpoints.get(&ifindex) else {
            return false;
        };
        let identities: BTreeMap<IpNet, u32> = state
            .ipcache
            .iter()
            .map(|(n, v)| (*n, v.identity))
            .collect();
        let peer_id = longest(&identities, peer).unwrap_or(IDENTITY_WORLD);
        let cidr_id = longest(&state.cidrs, peer);
        let mut allow = false;
        for id in [Some(peer_id), cidr_id, Some(0)].into_iter().flatten() {
            for (p, dport) in [(proto, port), (0, 0)] {
                let key = PolicyKey {
                    policy_set_be: ep.policy_set.to_be(),
                    peer_identity_be: id.to_be(),
                    direction: dir,
                    protocol: p,
                    dport_be: dport.to_be(),
                };
                match lpm_policy(state, key).map(|v| v.verdict) {
                    Some(POLICY_DENY) => return false,
                    Some(POLICY_ALLOW) => allow = true,
                    _ => {}
                }
            }
        }
        let enforced = if dir == DIR_INGRESS {
            EP_INGRESS_ENFORCED
        } else {
            EP_EGRESS_ENFORCED
        };
        allow || ep.flags & enforced == 0
    }

    fn entry(port: u16, prefix_len: u8, verdict: u8, rule_id: u32) -> PortEntry {
        PortEntry {
            port,
            prefix_len,
            verdict,
            rule_id,
        }
    }

    fn slice(peer: u32, protocol: u8) -> SliceKey {
        SliceKey {
            peer_identity: peer,
            direction: DIR_INGRESS,
            protocol,
        }
    }

    const PEER_A: &str = "10.0.0.2";
    const PEER_B: &str = "10.0.0.3";

    fn ipcache() -> BTreeMap<IpNet, IpcacheValue> {
        [
            ("10.0.0.2/32", 300),
            ("10.0.0.3/32", 301),
            ("10.0.1.5/32", 302),
        ]
        .into_iter()
        .map(|(n, identity)| (n.parse().unwrap(), IpcacheValue { identity, flags: 0 }))
        .collect()
    }

    /// Probes every (peer, port) through each intermediate state of `old -> new`.
    fn assert_no_window(old: &EndpointPolicy, new: &EndpointPolicy) {
        let history = Rc::new(RefCell::new(Vec::new()));
        let fake = Fake {
            state: State::default(),
            history: history.clone(),
            sizes: MapSizes::COMPILED,
        };
        let mut syncer = Syncer::adopt(fake).unwrap();
        let cache = ipcache();
        syncer
            .apply(&BTreeMap::from([(7, old)]), &cache, &BTreeMap::new())
            .unwrap();
        let before = syncer.maps().state.clone();
        history.borrow_mut().clear();
        let stats = syncer
            .apply(&BTreeMap::from([(7, new)]), &cache, &BTreeMap::new())
            .unwrap();
        let after = syncer.maps().state.clone();
        assert!(stats.changed());
        let peers: Vec<IpAddr> = [PEER_A, PEER_B, "10.0.1.5", "192.0.2.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        for peer in &peers {
            for proto in [6u8, 17] {
                let ports = (0..=20).chain([53, 79, 80, 81, 443, 8080, 8443, 65535]);
                for port in ports {
                    let was = verdict(&before, 7, DIR_INGRESS, *peer, proto, port);
                    let will = verdict(&after, 7, DIR_INGRESS, *peer, proto, port);
                    if was != will {
                        continue;
                    }
                    for (step, state) in history.borrow().iter().enumerate() {
                        assert_eq!(
                            verdict(state, 7, DIR_INGRESS, *peer, proto, port),
                            was,
                            "step {step}: {peer} proto {proto} port {port} was and will be {was}, but flipped in between"
                        );
                    }
                }
            }
        }
    }

    fn policy(default_deny: bool, slices: Vec<(SliceKey, Vec<PortEntry>)>) -> EndpointPolicy {
        EndpointPolicy {
            identity: 400,
            ipv4: Some("10.0.2.2".parse().unwrap()),
            ipv6: None,
            ingress_default_deny: default_deny.then_some(9),
            egress_default_deny: None,
            slices: slices.into_iter().collect(),
            mesh: MeshMode::Off,
            dns: None,
            http_ingress: Vec::new(),
        }
    }

    #[test]
    fn adding_a_peer_never_drops_allowed_traffic() {
        let old = policy(
            true,
            vec![(slice(300, 6), vec![entry(80, 16, POLICY_ALLOW, 1)])],
        );
        let new = policy(
            true,
            vec![
                (slice(300, 6), vec![entry(80, 16, POLICY_ALLOW, 1)]),
                (slice(301, 6), vec![entry(80, 16, POLICY_ALLOW, 1)]),
                (slice(0, 17), vec![entry(53, 16, POLICY_DENY, 2)]),
                // B gets everything but TCP 80, which stays denied through the change.
                (slice(301, 0), vec![entry(0, 0, POLICY_ALLOW, 6)]),
                (slice(0, 6), vec![entry(80, 16, POLICY_DENY, 7)]),
            ],
        );
        assert_no_window(&old, &new);
        assert_no_window(&new, &old);
    }

    #[test]
    fn narrowing_a_port_range_switches_policy_sets_without_a_window() {
        let old = policy(
            true,
            vec![(slice(300, 6), vec![entry(0, 0, POLICY_ALLOW, 1)])],
        );
        let new = policy(
            true,
            vec![(
                slice(300, 6),
                vec![
                    entry(80, 16, POLICY_ALLOW, 1),
                    entry(8080, 15, POLICY_DENY, 3),
                ],
            )],
        );
        assert_no_window(&old, &new);
        assert_no_window(&new, &old);
    }

    /// The benchmark's toggle: one port of a large endpoint's slice moves. Two writes, no new
    /// policy set, no window.
    #[test]
    fn moving_a_port_within_a_slice_writes_only_the_difference() {
        let peers = |port: u16| {
            let mut slices: Vec<(SliceKey, Vec<PortEntry>)> = (1000..1100)
                .map(|peer| (slice(peer, 6), vec![entry(6000, 16, POLICY_ALLOW, 1)]))
                .collect();
            slices.push((
                slice(300, 6),
                vec![
                    entry(7168, 11, POLICY_ALLOW, 2),
                    entry(port, 16, POLICY_ALLOW, 3),
                ],
            ));
            policy(true, slices)
        };
        let (off, on) = (peers(7201), peers(7200));
        assert_no_window(&off, &on);
        assert_no_window(&on, &off);
        let mut syncer = Syncer::adopt(Fake {
            state: State::default(),
            history: Rc::default(),
            sizes: MapSizes::COMPILED,
        })
        .unwrap();
        let cache = ipcache();
        syncer
            .apply(&BTreeMap::from([(7, &off)]), &cache, &BTreeMap::new())
            .unwrap();
        let stats = syncer
            .apply(&BTreeMap::from([(7, &on)]), &cache, &BTreeMap::new())
            .unwrap();
        assert_eq!(
            (
                stats.policy_added,
                stats.policy_removed,
                stats.policy_sets_switched
            ),
            (1, 1, 0)
        );
    }

    /// Random old and new policies over a few slices and the ports 0..=20 (prefixes of every
    /// length, allows and denies, as the compiler emits them): whichever way each slice is
    /// written, no intermediate state contradicts a verdict both sides agree on.
    #[test]
    fn random_policy_changes_have_no_window() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let random_policy = |next: &mut dyn FnMut(u64) -> u64| {
            let mut slices = Vec::new();
            for key in [slice(300, 6), slice(300, 0), slice(0, 6), slice(301, 6)] {
                if next(4) == 0 {
                    continue;
                }
                let mut entries = Vec::new();
                if key.protocol == 0 {
                    let verdict = [POLICY_ALLOW, POLICY_DENY][next(2) as usize];
                    entries.push(entry(0, 0, verdict, 1));
                } else {
                    let mut port = 0u16;
                    while port <= 20 {
                        let len = 1 + u16::try_from(next(6)).unwrap();
                        let last = (port + len - 1).min(20);
                        if next(3) != 0 {
                            let verdict = [POLICY_ALLOW, POLICY_DENY][next(2) as usize];
                            let rule = 10 + u32::try_from(next(3)).unwrap();
                            for (p, bits) in crate::policy::compile::port_range_prefixes(port, last)
                            {
                                entries.push(entry(p, bits, verdict, rule));
                            }
                        }
                        port = last + 1;
                    }
                }
                if !entries.is_empty() {
                    slices.push((key, entries));
                }
            }
            policy(next(3) != 0, slices)
        };
        for _ in 0..120 {
            let old = random_policy(&mut next);
            let new = random_policy(&mut next);
            if old != new {
                assert_no_window(&old, &new);
            }
        }
    }

    #[test]
    fn turning_default_deny_on_and_off_has_no_window() {
        let open = policy(
            false,
            vec![(slice(0, 6), vec![entry(443, 16, POLICY_DENY, 4)])],
        );
        let closed = policy(
            true,
            vec![(slice(300, 0), vec![entry(0, 0, POLICY_ALLOW, 5)])],
        );
        assert_no_window(&open, &closed);
        assert_no_window(&closed, &open);
    }

    #[test]
    fn unchanged_policy_writes_nothing() {
        let history = Rc::new(RefCell::new(Vec::new()));
        let mut syncer = Syncer::adopt(Fake {
            state: State::default(),
            history: history.clone(),
            sizes: MapSizes::COMPILED,
        })
        .unwrap();
        let p = policy(
            true,
            vec![(slice(300, 6), vec![entry(80, 16, POLICY_ALLOW, 1)])],
        );
        let eps = BTreeMap::from([(7, &p)]);
        syncer.apply(&eps, &ipcache(), &BTreeMap::new()).unwrap();
        history.borrow_mut().clear();
        let stats = syncer.apply(&eps, &ipcache(), &BTreeMap::new()).unwrap();
        assert!(!stats.changed(), "{stats:?}");
        assert!(
            history.borrow().is_empty(),
            "an unchanged policy wrote to the maps"
        );
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_and_finds_nothing_to_do() {
        let history = Rc::new(RefCell::new(Vec::new()));
        let mut first = Syncer::adopt(Fake {
            state: State::default(),
            history: history.clone(),
            sizes: MapSizes::COMPILED,
        })
        .unwrap();
        let p = policy(
            true,
            vec![(slice(300, 6), vec![entry(80, 16, POLICY_ALLOW, 1)])],
        );
        let eps = BTreeMap::from([(7, &p)]);
        first.apply(&eps, &ipcache(), &BTreeMap::new()).unwrap();
        let pinned = first.maps().state.clone();
        let mut second = Syncer::adopt(Fake {
            state: pinned.clone(),
            history,
            sizes: MapSizes::COMPILED,
        })
        .unwrap();
        let stats = second.apply(&eps, &ipcache(), &BTreeMap::new()).unwrap();
        assert!(!stats.changed(), "restart rewrote state: {stats:?}");
        assert_eq!(second.maps().state, pinned);
    }

    #[test]
    fn a_policy_set_too_large_is_rejected_whole() {
        let history = Rc::new(RefCell::new(Vec::new()));
        let mut syncer = Syncer::adopt(Fake {
            state: State::default(),
            history: history.clone(),
            sizes: MapSizes::COMPILED,
        })
        .unwrap();
        let entries: Vec<PortEntry> = (0..=u16::MAX)
            .map(|port| entry(port, 16, POLICY_ALLOW, 1))
            .collect();
        let big: Vec<(SliceKey, Vec<PortEntry>)> = (0..5)
            .map(|peer| (slice(1000 + peer, 6), entries.clone()))
            .collect();
        let p = policy(true, big);
        let err = syncer
            .apply(&BTreeMap::from([(7, &p)]), &ipcache(), &BTreeMap::new())
            .unwrap_err();
        assert!(
            matches!(err, SyncError::Overflow { map: "policy", .. }),
            "{err}"
        );
        assert!(
            history.borrow().is_empty(),
            "a rejected set wrote to the maps"
        );
    }

    #[test]
    fn small_maps_warn_first_then_refuse_an_overflow_and_keep_the_previous_state() {
        let history = Rc::new(RefCell::new(Vec::new()));
        let mut syncer = Syncer::adopt(Fake {
            state: State::default(),
            history: history.clone(),
            sizes: MapSizes {
                ipcache: 10,
                ..MapSizes::COMPILED
            },
        })
        .unwrap();
        let mut watch = crate::datapath::sizes::FillWatch::default();
        let p = policy(
            true,
            vec![(slice(300, 6), vec![entry(80, 16, POLICY_ALLOW, 1)])],
        );
        let eps = BTreeMap::from([(7, &p)]);
        let pods = |n: u8, first: u8| -> BTreeMap<IpNet, IpcacheValue> {
            (first..first + n)
                .map(|i| {
                    let net: IpNet = format!("10.1.0.{i}/32").parse().unwrap();
                    (
                        net,
                        IpcacheValue {
                            identity: 300 + u32::from(i),
                            flags: 0,
                        },
                    )
                })
                .collect()
        };
        // 8 of 10: no warning yet.
        syncer.apply(&eps, &pods(8, 1), &BTreeMap::new()).unwrap();
        assert!(
            watch.crossed(&syncer.fill()).is_empty(),
            "80% is no warning"
        );
        // 9 of 10: the warning, while everything is still enforced.
        syncer.apply(&eps, &pods(9, 1), &BTreeMap::new()).unwrap();
        assert_eq!(
            watch.crossed(&syncer.fill()),
            vec![("ipcache", 9, 10)],
            "90% warns"
        );
        let before = syncer.maps().state.clone();
        history.borrow_mut().clear();
        // 11: refused whole, with the map and its capacity named.
        let err = syncer
            .apply(&eps, &pods(11, 1), &BTreeMap::new())
            .unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::Overflow {
                    map: "ipcache",
                    needed: 11,
                    capacity: 10
                }
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("--map-ipcache-entries") && text.contains("previous state stays"),
            "the error says what to do: {text}"
        );
        // Replacing 9 pods by 9 others needs 18 entries for a moment (adds before removals).
        let err = syncer
            .apply(&eps, &pods(9, 100), &BTreeMap::new())
            .unwrap_err();
        assert!(
            matches!(err, SyncError::Overflow { needed: 18, .. }),
            "{err}"
        );
        assert!(
            history.borrow().is_empty(),
            "a refused change wrote to the maps"
        );
        assert_eq!(syncer.maps().state, before, "the previous state stays");
        assert_eq!(syncer.fill()[2], ("ipcache", 9, 10));
    }

    #[test]
    fn removed_endpoints_and_their_entries_are_cleaned_up() {
        let history = Rc::new(RefCell::new(Vec::new()));
        let mut syncer = Syncer::adopt(Fake {
            state: State::default(),
            history,
            sizes: MapSizes::COMPILED,
        })
        .unwrap();
        let p = policy(
            true,
            vec![(slice(300, 6), vec![entry(80, 16, POLICY_ALLOW, 1)])],
        );
        syncer
            .apply(
                &BTreeMap::from([(7, &p), (8, &p)]),
                &ipcache(),
                &BTreeMap::new(),
            )
            .unwrap();
        syncer
            .apply(&BTreeMap::from([(8, &p)]), &ipcache(), &BTreeMap::new())
            .unwrap();
        let state = &syncer.maps().state;
        assert_eq!(state.endpoints.keys().copied().collect::<Vec<_>>(), vec![8]);
        assert_eq!(
            state.policy.len(),
            1,
            "entries of the removed endpoint remain"
        );
        let _ = (PEER_A, PEER_B, DIR_EGRESS);
    }
}
