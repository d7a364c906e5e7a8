//! Typed access to the datapath's maps, taken from a loaded [`aya::Ebpf`] (or opened from their
//! bpffs pins), implementing [`MapWriter`] for the sync.

use std::collections::BTreeMap;
use std::path::Path;

use agent_common::{
    COUNTERS_LEN, CT_F_STORED_REVERSED, CtKey, CtValue, DatapathConfig, EndpointInfo, FragKey,
    FragValue, IpcacheValue, PolicyKey, PolicyValue, map_names,
};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use ipnet::IpNet;

use crate::datapath::sizes::MapSizes;
use crate::datapath::{MapWriter, PolicyEntryKey, addr_bytes, net_from_bytes, prefix_bits};

/// Number of counters, as an array length.
pub const COUNTERS: usize = COUNTERS_LEN as usize;
/// Number of host routing counters, as an array length.
pub const HOSTRT_COUNTERS: usize = agent_common::hostrt::COUNTERS_LEN as usize;

/// An error from a map operation, naming the map and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {map} is missing from the loaded datapath object")]
    Missing { map: &'static str },
    #[error("map {map}: {op}: {source}")]
    Op {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: entry with an invalid prefix ({bits} bits)")]
    InvalidPrefix { map: &'static str, bits: u32 },
    #[error("the events ring buffer was already taken")]
    EventsTaken,
}

fn op(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { map, op, source }
}

/// Conntrack entries read or deleted by one `bpf(2)` call of the garbage collector. Large
/// enough for any hash bucket (the kernel refuses a batch smaller than a bucket's entries).
pub const CT_GC_BATCH: usize = 4096;

/// `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_DELETE_BATCH` on the conntrack hash (kernel 5.6), which
/// aya does not wrap.
mod batch {
    use agent_common::{CtKey, CtValue, map_names};
    use aya::maps::MapError;

    use super::MapsError;

    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

    /// `union bpf_attr`'s `batch` member, then zeroes (the kernel checks the unused tail).
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
        _tail: [u64; 9],
    }

    fn call(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
        // SAFETY: `attr` is a valid `union bpf_attr` of the size given; its pointers point at
        // live buffers of `count` keys (and values) and at the batch tokens, all of the map's
        // key and value sizes (checked when the map was opened as `HashMap<CtKey, CtValue>`).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr),
                size_of::<BatchAttr>(),
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn ptr<T>(p: *const T) -> u64 {
        p as usize as u64
    }

    /// Reads up to `keys.len()` entries after the batch token `from` (`None`: the start).
    /// Returns how many were read, the next token, and whether the table's end was reached.
    pub fn lookup(
        fd: i32,
        from: Option<u32>,
        keys: &mut [CtKey],
        values: &mut [CtValue],
    ) -> std::io::Result<(usize, u32, bool)> {
        let in_batch = from.unwrap_or(0);
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            in_batch: if from.is_some() {
                ptr(&raw const in_batch)
            } else {
                0
            },
            out_batch: ptr(&raw mut out_batch),
            keys: ptr(keys.as_mut_ptr()),
            values: ptr(values.as_mut_ptr()),
            count: u32::try_from(keys.len().min(values.len())).unwrap_or(u32::MAX),
            map_fd: fd.cast_unsigned(),
            ..BatchAttr::default()
        };
        match call(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => Ok((attr.count as usize, out_batch, false)),
            // The end of the table: `count` entries were still read.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                Ok((attr.count as usize, out_batch, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes `keys`; a key already gone is skipped. Returns how many were deleted.
    pub fn delete(fd: i32, keys: &[CtKey]) -> std::io::Result<usize> {
        let mut deleted = 0;
        let mut rest = keys;
        while !rest.is_empty() {
            let mut attr = BatchAttr {
                keys: ptr(rest.as_ptr()),
                count: u32::try_from(rest.len()).unwrap_or(u32::MAX),
                map_fd: fd.cast_unsigned(),
                ..BatchAttr::default()
            };
            match call(BPF_MAP_DELETE_BATCH, &mut attr) {
                Ok(()) => return Ok(deleted + attr.count as usize),
                // The kernel stops at a missing key, `count` deleted before it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let done = attr.count as usize;
                    deleted += done;
                    rest = &rest[(done + 1).min(rest.len())..];
                }
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    pub fn error(op: &'static str) -> impl FnOnce(std::io::Error) -> MapsError {
        move |io_error| MapsError::Op {
            map: map_names::CONNTRACK,
            op,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf",
                io_error,
            }),
        }
    }
}

/// What one sweep of the conntrack garbage collector did ([`PinnedMaps::sweep_conntrack`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepStats {
    /// Entries read.
    pub scanned: usize,
    /// Expired entries deleted.
    pub removed: usize,
    #[serde(serialize_with = "micros")]
    pub duration: std::time::Duration,
}

fn micros<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// All datapath maps, owned.
pub struct PinnedMaps {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    ipcache: LpmTrie<MapData, [u8; 16], IpcacheValue>,
    policy_cidrs: LpmTrie<MapData, [u8; 16], IpcacheValue>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    /// The conntrack map's descriptor again, for the batch calls aya does not wrap.
    conntrack_fd: std::os::fd::OwnedFd,
    fragments: HashMap<MapData, FragKey, FragValue>,
    counters: PerCpuArray<MapData, u64>,
    /// `NW_HOSTRT_COUNTERS`; `None` when opened from the pins of an agent that had none.
    hostrt_counters: Option<PerCpuArray<MapData, u64>>,
    config: Array<MapData, DatapathConfig>,
    events: Option<RingBuf<MapData>>,
    /// The kernel's `max_entries` of the sized maps.
    sizes: MapSizes,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps")
            .field("events_taken", &self.events.is_none())
            .finish_non_exhaustive()
    }
}

impl PinnedMaps {
    /// Takes the maps out of a loaded object (they stay pinned if they were).
    ///
    /// # Errors
    /// A map missing from the object or of an unexpected type or size.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        Self::build(|name| ebpf.take_map(name))
    }

    /// Opens the maps an agent pinned in `maps_dir` (`<bpffs dir>/maps`), for commands that read
    /// or clean state without loading the programs.
    ///
    /// # Errors
    /// A pin that is missing or not a compatible map.
    pub fn from_pins(maps_dir: &Path) -> Result<Self, MapsError> {
        let mut opened = BTreeMap::new();
        for name in ALL_MAPS {
            let data = MapData::from_pin(maps_dir.join(name)).map_err(op(name, "open pin"))?;
            let map = Map::from_map_data(data).map_err(op(name, "open pin"))?;
            opened.insert(name, map);
        }
        // Newer than the others: a previous version's pins have no such map.
        let name = map_names::HOSTRT_COUNTERS;
        if let Ok(data) = MapData::from_pin(maps_dir.join(name)) {
            opened.insert(
                name,
                Map::from_map_data(data).map_err(op(name, "open pin"))?,
            );
        }
        Self::build(|name| opened.remove(name))
    }

    fn build(mut take: impl FnMut(&'static str) -> Option<Map>) -> Result<Self, MapsError> {
        let mut get = |map: &'static str| take(map).ok_or(MapsError::Missing { map });
        let endpoints = get(map_names::ENDPOINTS)?;
        let policy = get(map_names::POLICY)?;
        let ipcache = get(map_names::IPCACHE)?;
        let policy_cidrs = get(map_names::POLICY_CIDRS)?;
        let conntrack = get(map_names::CONNTRACK)?;
        let fragments = get(map_names::FRAGMENTS)?;
        let counters = get(map_names::COUNTERS)?;
        let config = get(map_names::CONFIG)?;
        let events = get(map_names::EVENTS)?;
        let hostrt_counters = take(map_names::HOSTRT_COUNTERS)
            .map(PerCpuArray::try_from)
            .transpose()
            .map_err(op(map_names::HOSTRT_COUNTERS, "open"))?;
        let max = |map: &Map, name: &'static str| -> Result<u32, MapsError> {
            let data = match map {
                Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) => d,
                _ => return Err(MapsError::Missing { map: name }),
            };
            Ok(data
                .info()
                .map_err(op(name, "read its info"))?
                .max_entries())
        };
        let conntrack_fd = match &conntrack {
            Map::HashMap(d) | Map::LruHashMap(d) => {
                use std::os::fd::AsFd as _;
                d.fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| MapsError::Op {
                        map: map_names::CONNTRACK,
                        op: "duplicate its descriptor",
                        source: MapError::SyscallError(aya::sys::SyscallError {
                            call: "dup",
                            io_error: e,
                        }),
                    })?
            }
            _ => {
                return Err(MapsError::Missing {
                    map: map_names::CONNTRACK,
                });
            }
        };
        let sizes = MapSizes {
            endpoints: max(&endpoints, map_names::ENDPOINTS)?,
            policy: max(&policy, map_names::POLICY)?,
            ipcache: max(&ipcache, map_names::IPCACHE)?,
            policy_cidrs: max(&policy_cidrs, map_names::POLICY_CIDRS)?,
            conntrack: max(&conntrack, map_names::CONNTRACK)?,
        };
        Ok(Self {
            sizes,
            endpoints: HashMap::try_from(endpoints).map_err(op(map_names::ENDPOINTS, "open"))?,
            policy: LpmTrie::try_from(policy).map_err(op(map_names::POLICY, "open"))?,
            ipcache: LpmTrie::try_from(ipcache).map_err(op(map_names::IPCACHE, "open"))?,
            policy_cidrs: LpmTrie::try_from(policy_cidrs)
                .map_err(op(map_names::POLICY_CIDRS, "open"))?,
            conntrack: HashMap::try_from(conntrack).map_err(op(map_names::CONNTRACK, "open"))?,
            conntrack_fd,
            fragments: HashMap::try_from(fragments).map_err(op(map_names::FRAGMENTS, "open"))?,
            counters: PerCpuArray::try_from(counters).map_err(op(map_names::COUNTERS, "open"))?,
            hostrt_counters,
            config: Array::try_from(config).map_err(op(map_names::CONFIG, "open"))?,
            events: Some(RingBuf::try_from(events).map_err(op(map_names::EVENTS, "open"))?),
        })
    }

    /// Every counter, summed over CPUs (indices are `agent_common::COUNTER_*`).
    ///
    /// # Errors
    /// A failed map read.
    pub fn counters(&self) -> Result<[u64; COUNTERS], MapsError> {
        let mut out = [0u64; COUNTERS];
        for (index, slot) in (0u32..).zip(out.iter_mut()) {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(op(map_names::COUNTERS, "read"))?;
            *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }

    /// The eBPF host routing counters, summed over CPUs (indices are `agent_common::hostrt::*`;
    /// all zero when the map is not there).
    ///
    /// # Errors
    /// A failed map read.
    pub fn hostrt_counters(&self) -> Result<[u64; HOSTRT_COUNTERS], MapsError> {
        let mut out = [0u64; HOSTRT_COUNTERS];
        let Some(map) = &self.hostrt_counters else {
            return Ok(out);
        };
        for (index, slot) in (0u32..).zip(out.iter_mut()) {
            let values = map
                .get(&index, 0)
                .map_err(op(map_names::HOSTRT_COUNTERS, "read"))?;
            *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }

    /// The flow events ring buffer, for the flow reader. Can be taken once.
    ///
    /// # Errors
    /// [`MapsError::EventsTaken`] on a second call.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, MapsError> {
        self.events.take().ok_or(MapsError::EventsTaken)
    }

    /// `NW_CONFIG[0]`.
    ///
    /// # Errors
    /// A failed map read.
    pub fn config(&self) -> Result<DatapathConfig, MapsError> {
        self.config
            .get(&0, 0)
            .map_err(op(map_names::CONFIG, "read"))
    }

    /// Sets `NW_CONFIG[0].flags` (`agent_common::CONFIG_*`), keeping the generation.
    ///
    /// # Errors
    /// A failed map read or write.
    pub fn set_config_flags(&mut self, flags: u32) -> Result<(), MapsError> {
        let mut config = self.config()?;
        config.flags = flags;
        self.config
            .set(0, config, 0)
            .map_err(op(map_names::CONFIG, "write"))
    }

    /// The conntrack table (for diagnostics and tests), each entry keyed by the tuple and
    /// direction of the packet that created it, whichever orientation it is stored in (the
    /// storage bit `CT_F_STORED_REVERSED` is cleared).
    ///
    /// # Errors
    /// A failed map read.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, MapsError> {
        self.conntrack
            .iter()
            .map(|entry| {
                entry.map(|(key, mut value)| {
                    let key = key.original(value.flags);
                    value.flags &= !CT_F_STORED_REVERSED;
                    (key, value)
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(op(map_names::CONNTRACK, "read"))
    }

    /// The conntrack garbage collector: deletes the entries expired at `now_s` (seconds of the
    /// monotonic clock; lifetimes in `agent_common::conntrack`). It reads the table in batches
    /// (`BPF_MAP_LOOKUP_BATCH`, [`CT_GC_BATCH`] entries a call) and deletes the expired keys in
    /// batches too (`BPF_MAP_DELETE_BATCH`): a few hundred system calls for a full table, not
    /// two per entry. A packet that revives a flow between the read and the delete loses its
    /// entry; the flow's next packet is then a new flow, as after any expiry.
    ///
    /// # Errors
    /// A failed map read or delete; what was deleted before it stays deleted.
    pub fn sweep_conntrack(&mut self, now_s: u32) -> Result<SweepStats, MapsError> {
        use std::os::fd::AsRawFd as _;
        let started = std::time::Instant::now();
        let fd = self.conntrack_fd.as_raw_fd();
        let mut stats = SweepStats::default();
        let mut keys = vec![CtKey::default(); CT_GC_BATCH];
        let mut values = vec![CtValue::default(); CT_GC_BATCH];
        let mut expired = Vec::new();
        let mut token: Option<u32> = None;
        loop {
            let (count, next, done) = batch::lookup(fd, token, &mut keys, &mut values)
                .map_err(batch::error("read (batch)"))?;
            for (key, value) in keys.iter().zip(&values).take(count) {
                stats.scanned += 1;
                if agent_common::conntrack::expired(key.protocol, value, now_s) {
                    expired.push(*key);
                }
            }
            if done {
                break;
            }
            token = Some(next);
        }
        for chunk in expired.chunks(CT_GC_BATCH) {
            stats.removed += batch::delete(fd, chunk).map_err(batch::error("delete (batch)"))?;
        }
        stats.duration = started.elapsed();
        Ok(stats)
    }

    /// Writes a conntrack entry as stored (for tests: an entry of another age or state).
    ///
    /// # Errors
    /// A failed map write (`E2BIG` when full).
    pub fn put_conntrack_raw(&mut self, key: &CtKey, value: &CtValue) -> Result<(), MapsError> {
        self.conntrack
            .insert(key, value, 0)
            .map_err(op(map_names::CONNTRACK, "write"))
    }

    /// The conntrack table as stored (keys in their stored orientation, flags untouched).
    ///
    /// # Errors
    /// A failed map read.
    pub fn conntrack_raw(&self) -> Result<Vec<(CtKey, CtValue)>, MapsError> {
        self.conntrack
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op(map_names::CONNTRACK, "read"))
    }

    /// Recorded first fragments (for diagnostics and tests).
    ///
    /// # Errors
    /// A failed map read.
    pub fn fragments(&self) -> Result<Vec<(FragKey, FragValue)>, MapsError> {
        self.fragments
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op(map_names::FRAGMENTS, "read"))
    }

    fn read_prefixes(
        trie: &LpmTrie<MapData, [u8; 16], IpcacheValue>,
        map: &'static str,
    ) -> Result<BTreeMap<IpNet, IpcacheValue>, MapsError> {
        let mut out = BTreeMap::new();
        for entry in trie.iter() {
            let (key, value) = entry.map_err(op(map, "read"))?;
            let bits = key.prefix_len();
            let net =
                net_from_bytes(key.data(), bits).ok_or(MapsError::InvalidPrefix { map, bits })?;
            out.insert(net, value);
        }
        Ok(out)
    }
}

const ALL_MAPS: [&str; 9] = [
    map_names::ENDPOINTS,
    map_names::POLICY,
    map_names::IPCACHE,
    map_names::POLICY_CIDRS,
    map_names::CONNTRACK,
    map_names::FRAGMENTS,
    map_names::EVENTS,
    map_names::COUNTERS,
    map_names::CONFIG,
];

fn prefix_key(prefix: IpNet) -> Key<[u8; 16]> {
    // `IpNet` keeps host bits; the trie wants them cleared so equal prefixes are equal keys.
    let net = prefix.trunc();
    Key::new(prefix_bits(&net), addr_bytes(net.addr()))
}

fn ipcache_value(identity: u32) -> IpcacheValue {
    IpcacheValue { identity, flags: 0 }
}

impl MapWriter for PinnedMaps {
    type Error = MapsError;

    fn capacities(&self) -> MapSizes {
        self.sizes
    }

    fn read_endpoints(&self) -> Result<BTreeMap<u32, EndpointInfo>, MapsError> {
        self.endpoints
            .iter()
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(op(map_names::ENDPOINTS, "read"))
    }

    fn read_policy(&self) -> Result<BTreeMap<PolicyEntryKey, PolicyValue>, MapsError> {
        let mut out = BTreeMap::new();
        for entry in self.policy.iter() {
            let (key, value) = entry.map_err(op(map_names::POLICY, "read"))?;
            out.insert(
                PolicyEntryKey {
                    key: key.data(),
                    prefix_len: key.prefix_len(),
                },
                value,
            );
        }
        Ok(out)
    }

    fn read_ipcache(&self) -> Result<BTreeMap<IpNet, IpcacheValue>, MapsError> {
        Self::read_prefixes(&self.ipcache, map_names::IPCACHE)
    }

    fn read_policy_cidrs(&self) -> Result<BTreeMap<IpNet, u32>, MapsError> {
        Ok(
            Self::read_prefixes(&self.policy_cidrs, map_names::POLICY_CIDRS)?
                .into_iter()
                .map(|(net, v)| (net, v.identity))
                .collect(),
        )
    }

    fn read_generation(&self) -> Result<u32, MapsError> {
        Ok(self.config()?.policy_generation)
    }

    fn put_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<(), MapsError> {
        self.endpoints
            .insert(ifindex, info, 0)
            .map_err(op(map_names::ENDPOINTS, "insert"))
    }

    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), MapsError> {
        self.endpoints
            .remove(&ifindex)
            .map_err(op(map_names::ENDPOINTS, "delete"))
    }

    fn put_policy(&mut self, key: PolicyEntryKey, value: PolicyValue) -> Result<(), MapsError> {
        self.policy
            .insert(&Key::new(key.prefix_len, key.key), value, 0)
            .map_err(op(map_names::POLICY, "insert"))
    }

    fn delete_policy(&mut self, key: PolicyEntryKey) -> Result<(), MapsError> {
        self.policy
            .remove(&Key::new(key.prefix_len, key.key))
            .map_err(op(map_names::POLICY, "delete"))
    }

    fn put_ipcache(&mut self, prefix: IpNet, value: IpcacheValue) -> Result<(), MapsError> {
        self.ipcache
            .insert(&prefix_key(prefix), value, 0)
            .map_err(op(map_names::IPCACHE, "insert"))
    }

    fn delete_ipcache(&mut self, prefix: IpNet) -> Result<(), MapsError> {
        self.ipcache
            .remove(&prefix_key(prefix))
            .map_err(op(map_names::IPCACHE, "delete"))
    }

    fn put_policy_cidr(&mut self, prefix: IpNet, identity: u32) -> Result<(), MapsError> {
        self.policy_cidrs
            .insert(&prefix_key(prefix), ipcache_value(identity), 0)
            .map_err(op(map_names::POLICY_CIDRS, "insert"))
    }

    fn delete_policy_cidr(&mut self, prefix: IpNet) -> Result<(), MapsError> {
        self.policy_cidrs
            .remove(&prefix_key(prefix))
            .map_err(op(map_names::POLICY_CIDRS, "delete"))
    }

    fn set_generation(&mut self, generation: u32) -> Result<(), MapsError> {
        let mut config = self.config()?;
        config.policy_generation = generation;
        self.config
            .set(0, config, 0)
            .map_err(op(map_names::CONFIG, "write"))
    }
}
