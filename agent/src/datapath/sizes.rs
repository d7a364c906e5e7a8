//! How many entries each datapath map holds, chosen at start-up rather than compiled in.
//!
//! The eBPF object declares every map with the compiled defaults of `agent_common`
//! (`MAX_*`); the loader overrides `max_entries` of the maps named here before it creates them
//! (`EbpfLoader::map_max_entries`), and a pinned map of another size is migrated (see
//! `loader`). The defaults fit Kubernetes' documented limits: 150,000 pods dual-stack in the
//! ipcache, and conntrack sized from the node's memory as Cilium's
//! `bpf-map-dynamic-size-ratio` does.

use agent_common::{
    MAX_CONNTRACK, MAX_ENDPOINTS, MAX_IPCACHE_ENTRIES, MAX_POLICY_CIDRS, MAX_POLICY_ENTRIES,
};

/// Entries of each resizable map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapSizes {
    /// `NW_ENDPOINTS`: the node's pods (one entry per workload interface).
    pub endpoints: u32,
    /// `NW_POLICY`: the local endpoints' policy entries, old and new side by side during a
    /// change.
    pub policy: u32,
    /// `NW_IPCACHE`: an entry per pod address in the cluster, per node address and per CIDR.
    pub ipcache: u32,
    /// `NW_POLICY_CIDRS`: the CIDRs that policies name.
    pub policy_cidrs: u32,
    /// `NW_CONNTRACK`: live flows (an LRU: a full table evicts the least recently used).
    pub conntrack: u32,
}

/// Default `NW_IPCACHE` entries: 512k, Cilium's default. 150,000 pods dual-stack are 300,000
/// host entries; the rest is room for nodes, CIDRs and a rollout's old and new pods side by side.
pub const DEFAULT_IPCACHE: u32 = 524_288;
/// Default `NW_POLICY` entries. The trie allocates entries as they are written
/// (`BPF_F_NO_PREALLOC` is required for LPM tries), so a large maximum costs nothing until used.
pub const DEFAULT_POLICY: u32 = 1_048_576;
/// Default `NW_POLICY_CIDRS` entries (an LPM trie too, allocated as used).
pub const DEFAULT_POLICY_CIDRS: u32 = 65_536;
/// Default `NW_ENDPOINTS` entries: far above kubelet's default of 110 pods per node; the hash
/// map is preallocated, but an entry is small (about 100 bytes with the kernel's overhead).
pub const DEFAULT_ENDPOINTS: u32 = MAX_ENDPOINTS;
/// Default share of the node's memory for conntrack (Cilium's `bpf-map-dynamic-size-ratio`).
pub const DEFAULT_DYNAMIC_SIZE_RATIO: f64 = 0.0025;
/// Kernel memory of one conntrack entry, for sizing from memory: a 40-byte key, a 24-byte
/// value and the LRU hash's element header, rounded up.
pub const CONNTRACK_ENTRY_BYTES: u64 = 128;
/// Bounds of the conntrack size derived from memory.
pub const CONNTRACK_MIN: u32 = 65_536;
pub const CONNTRACK_MAX: u32 = 4_194_304;

/// The share of a map's capacity at which the agent warns (log and metric), well before a
/// change is rejected for want of room.
pub const FILL_WARNING_RATIO: f64 = 0.9;

impl MapSizes {
    /// The sizes compiled into the eBPF object (what the datapath gets when nothing overrides
    /// them: tests and the examples).
    pub const COMPILED: Self = Self {
        endpoints: MAX_ENDPOINTS,
        policy: MAX_POLICY_ENTRIES,
        ipcache: MAX_IPCACHE_ENTRIES,
        policy_cidrs: MAX_POLICY_CIDRS,
        conntrack: MAX_CONNTRACK,
    };

    /// The size of map `name` (`agent_common::map_names`), for the maps sized here.
    #[must_use]
    pub fn of(&self, name: &str) -> Option<u32> {
        use agent_common::map_names as n;
        match name {
            n::ENDPOINTS => Some(self.endpoints),
            n::POLICY => Some(self.policy),
            n::IPCACHE => Some(self.ipcache),
            n::POLICY_CIDRS => Some(self.policy_cidrs),
            n::CONNTRACK => Some(self.conntrack),
            _ => None,
        }
    }

    /// Every sized map and its size, by map name.
    #[must_use]
    pub fn by_name(&self) -> [(&'static str, u32); 5] {
        use agent_common::map_names as n;
        [
            (n::ENDPOINTS, self.endpoints),
            (n::POLICY, self.policy),
            (n::IPCACHE, self.ipcache),
            (n::POLICY_CIDRS, self.policy_cidrs),
            (n::CONNTRACK, self.conntrack),
        ]
    }
}

/// Conntrack entries for a node with `memory_bytes` of memory: `ratio` of it, at
/// [`CONNTRACK_ENTRY_BYTES`] an entry, within [`CONNTRACK_MIN`]..=[`CONNTRACK_MAX`].
#[must_use]
pub fn conntrack_from_memory(memory_bytes: u64, ratio: f64) -> u32 {
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an estimate; the result is clamped to a u32 range"
    )]
    let entries = (memory_bytes as f64 * ratio) as u64 / CONNTRACK_ENTRY_BYTES;
    u32::try_from(entries)
        .unwrap_or(u32::MAX)
        .clamp(CONNTRACK_MIN, CONNTRACK_MAX)
}

/// The node's memory (`MemTotal` of `/proc/meminfo`), in bytes.
///
/// # Errors
/// `/proc/meminfo` unreadable or without `MemTotal`.
pub fn node_memory() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| std::io::Error::other("/proc/meminfo has no MemTotal line"))
}

/// Whether `entries` of `capacity` is at or past [`FILL_WARNING_RATIO`].
#[must_use]
pub fn nearly_full(entries: usize, capacity: u32) -> bool {
    #[expect(clippy::cast_precision_loss, reason = "map sizes are far below 2^52")]
    let fill = entries as f64 / f64::from(capacity.max(1));
    fill >= FILL_WARNING_RATIO
}

/// Remembers which maps are past the warning mark, so each crossing is logged and counted once
/// (and again after the map went back below [`FILL_WARNING_RATIO`]).
#[derive(Debug, Default)]
pub struct FillWatch {
    warned: std::collections::BTreeSet<&'static str>,
}

impl FillWatch {
    /// The maps of `fill` (name, entries, capacity) that crossed the mark since the last call.
    pub fn crossed(
        &mut self,
        fill: &[(&'static str, usize, u32)],
    ) -> Vec<(&'static str, usize, u32)> {
        let mut out = Vec::new();
        for &(name, entries, capacity) in fill {
            if nearly_full(entries, capacity) {
                if self.warned.insert(name) {
                    out.push((name, entries, capacity));
                }
            } else {
                self.warned.remove(name);
            }
        }
        out
    }

    /// Whether map `name` is past the mark now.
    #[must_use]
    pub fn is_warned(&self, name: &str) -> bool {
        self.warned.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_follows_memory_within_bounds() {
        let gib = 1024 * 1024 * 1024;
        // 16 GiB at 0.25%: 42.9 MB, 335,544 entries of 128 bytes.
        assert_eq!(conntrack_from_memory(16 * gib, 0.0025), 335_544);
        assert_eq!(conntrack_from_memory(gib, 0.0025), CONNTRACK_MIN);
        assert_eq!(conntrack_from_memory(4096 * gib, 0.0025), CONNTRACK_MAX);
    }

    #[test]
    fn the_fill_warning_fires_once_per_crossing() {
        let mut watch = FillWatch::default();
        assert!(watch.crossed(&[("ipcache", 89, 100)]).is_empty());
        assert_eq!(
            watch.crossed(&[("ipcache", 90, 100)]),
            vec![("ipcache", 90, 100)]
        );
        assert!(watch.crossed(&[("ipcache", 95, 100)]).is_empty(), "once");
        assert!(watch.is_warned("ipcache"));
        assert!(watch.crossed(&[("ipcache", 50, 100)]).is_empty());
        assert!(!watch.is_warned("ipcache"));
        assert_eq!(watch.crossed(&[("ipcache", 99, 100)]).len(), 1, "again");
    }

    #[test]
    fn node_memory_is_read() {
        assert!(node_memory().expect("MemTotal") > 64 * 1024 * 1024);
    }
}
