//! The service table into the kernel's maps (`NW_SERVICES`, `NW_SVC_BACKENDS`) as a diff.
//!
//! Each frontend's backends sit in slots `1..=count`. A change keeps every staying backend in
//! its slot, fills the slot of a departed one with the last backend, appends new ones, and is
//! written in an order that never lets a connect pick an empty slot or a departed backend once
//! its slot is rewritten: changed slots first, then the count, then the slots past the new count.
//! A frontend that goes away loses its count first (connects are no longer translated), then
//! its slots. A table that would not fit the maps is refused whole; the previous one stays.

use std::collections::BTreeMap;

use agent_common::{
    Backend, BackendKey, MAX_SERVICE_BACKENDS, MAX_SERVICES, ServiceKey, ServiceValue,
};

use super::ServiceTable;
use crate::datapath::addr_bytes;

/// What the kernel holds for one frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelEntry {
    /// The backends in slot order (slot = index + 1).
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` seconds (0: none).
    pub affinity_secs: u32,
}

/// What the kernel holds: each frontend's entry.
pub type KernelTable = BTreeMap<ServiceKey, KernelEntry>;

/// The map operations the sync needs; [`crate::datapath::maps::ServiceMaps`] in the agent, a
/// checking fake in the tests.
pub trait ServiceMapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn read(&self) -> Result<KernelTable, Self::Error>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Self::Error>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), Self::Error>;
    fn put_backend(&mut self, key: BackendKey, backend: Backend) -> Result<(), Self::Error>;
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceSyncError<E: std::error::Error + 'static> {
    #[error(
        "the service table needs {frontends} frontends and {backends} backend slots; the maps hold \
         {MAX_SERVICES} and {MAX_SERVICE_BACKENDS} (the previous table stays)"
    )]
    Overflow { frontends: usize, backends: usize },
    #[error(transparent)]
    Map(E),
}

/// What one [`ServiceSync::apply`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceSyncStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub slots_written: usize,
    pub slots_removed: usize,
}

impl ServiceSyncStats {
    #[must_use]
    pub const fn changed(&self) -> bool {
        self.frontends_written + self.frontends_removed + self.slots_written + self.slots_removed
            > 0
    }
}

/// The kernel's form of a table: every frontend with its backends of the same family.
#[must_use]
pub fn kernel_table(table: &ServiceTable) -> KernelTable {
    table
        .ports
        .values()
        .map(|p| {
            let key = ServiceKey {
                addr: addr_bytes(p.frontend.addr),
                port_be: p.frontend.port.to_be(),
                protocol: p.frontend.protocol.number(),
                _pad: 0,
            };
            let backends = p
                .backends()
                .into_iter()
                .map(|(addr, port)| Backend {
                    addr: addr_bytes(addr),
                    port_be: port.to_be(),
                    _pad: [0; 2],
                })
                .collect();
            (
                key,
                KernelEntry {
                    backends,
                    affinity_secs: p.affinity_secs,
                },
            )
        })
        .collect()
}

/// Owns the service maps and remembers what they hold.
#[derive(Debug)]
pub struct ServiceSync<W> {
    maps: W,
    current: KernelTable,
    /// A write failed midway: `current` may not be what the maps hold; re-read them first.
    dirty: bool,
}

impl<W: ServiceMapWriter> ServiceSync<W> {
    /// Adopts what the maps hold (a restarted agent changes only what differs).
    ///
    /// # Errors
    /// A failed map read.
    pub fn adopt(maps: W) -> Result<Self, W::Error> {
        let current = maps.read()?;
        Ok(Self {
            maps,
            current,
            dirty: false,
        })
    }

    #[must_use]
    pub const fn current(&self) -> &KernelTable {
        &self.current
    }

    #[must_use]
    pub const fn maps(&self) -> &W {
        &self.maps
    }

    /// Makes the maps hold `desired`, writing only the difference.
    ///
    /// # Errors
    /// [`ServiceSyncError::Overflow`] before any write; a map error midway (the next apply
    /// starts again from what was written).
    pub fn apply(
        &mut self,
        desired: &KernelTable,
    ) -> Result<ServiceSyncStats, ServiceSyncError<W::Error>> {
        if self.dirty {
            self.current = self.maps.read().map_err(ServiceSyncError::Map)?;
            self.dirty = false;
        }
        let result = self.write(desired);
        self.dirty = matches!(result, Err(ServiceSyncError::Map(_)));
        result
    }

    fn write(
        &mut self,
        desired: &KernelTable,
    ) -> Result<ServiceSyncStats, ServiceSyncError<W::Error>> {
        let backends: usize = desired.values().map(|e| e.backends.len()).sum();
        if desired.len() > MAX_SERVICES as usize || backends > MAX_SERVICE_BACKENDS as usize {
            return Err(ServiceSyncError::Overflow {
                frontends: desired.len(),
                backends,
            });
        }
        let mut stats = ServiceSyncStats::default();
        // Gone frontends first: frees room in the maps for the new ones.
        let gone: Vec<ServiceKey> = self
            .current
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .copied()
            .collect();
        for key in gone {
            self.maps
                .delete_service(key)
                .map_err(ServiceSyncError::Map)?;
            stats.frontends_removed += 1;
            let slots = self.current.remove(&key).unwrap_or_default().backends;
            for slot in 1..=slots.len() {
                self.maps
                    .delete_backend(backend_key(key, slot))
                    .map_err(ServiceSyncError::Map)?;
                stats.slots_removed += 1;
            }
        }
        for (key, wanted) in desired {
            let old = self.current.get(key);
            let old_slots = old.map_or(&[][..], |e| e.backends.as_slice());
            let entry = KernelEntry {
                backends: relayout(old_slots, &wanted.backends),
                affinity_secs: wanted.affinity_secs,
            };
            if old == Some(&entry) {
                continue;
            }
            let layout = &entry.backends;
            for (i, backend) in layout.iter().enumerate() {
                if old_slots.get(i) != Some(backend) {
                    self.maps
                        .put_backend(backend_key(*key, i + 1), *backend)
                        .map_err(ServiceSyncError::Map)?;
                    stats.slots_written += 1;
                }
            }
            if old.is_none_or(|o| {
                o.backends.len() != layout.len() || o.affinity_secs != entry.affinity_secs
            }) {
                let count = u32::try_from(layout.len()).unwrap_or(u32::MAX);
                let value = ServiceValue {
                    count,
                    affinity_secs: entry.affinity_secs,
                };
                self.maps
                    .put_service(*key, value)
                    .map_err(ServiceSyncError::Map)?;
                stats.frontends_written += 1;
            }
            for slot in layout.len() + 1..=old_slots.len() {
                self.maps
                    .delete_backend(backend_key(*key, slot))
                    .map_err(ServiceSyncError::Map)?;
                stats.slots_removed += 1;
            }
            self.current.insert(*key, entry);
        }
        Ok(stats)
    }
}

fn backend_key(service: ServiceKey, slot: usize) -> BackendKey {
    BackendKey {
        service,
        slot: u32::try_from(slot).unwrap_or(u32::MAX),
    }
}

/// The new slot order: staying backends keep their slots, a departed one's slot takes the last
/// backend, new ones are appended.
fn relayout(old: &[Backend], wanted: &[Backend]) -> Vec<Backend> {
    let wanted_set: std::collections::BTreeSet<&Backend> = wanted.iter().collect();
    let mut layout: Vec<Backend> = old.to_vec();
    let mut i = 0;
    while i < layout.len() {
        if wanted_set.contains(&layout[i]) {
            i += 1;
        } else {
            layout.swap_remove(i);
        }
    }
    let present: std::collections::BTreeSet<Backend> = layout.iter().copied().collect();
    layout.extend(wanted.iter().filter(|b| !present.contains(b)).copied());
    layout
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The maps in memory; after every write it checks what a connect could pick.
    #[derive(Default)]
    struct Fake {
        services: BTreeMap<ServiceKey, ServiceValue>,
        slots: BTreeMap<BackendKey, Backend>,
        /// Backends a connect could have picked at some point, per frontend.
        ever_picked: BTreeMap<ServiceKey, std::collections::BTreeSet<Backend>>,
        fail_after: Option<usize>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("injected failure")]
    struct Injected;

    impl Fake {
        fn check(&mut self) -> Result<(), Injected> {
            for (key, value) in &self.services {
                for slot in 1..=value.count {
                    let b = self
                        .slots
                        .get(&BackendKey {
                            service: *key,
                            slot,
                        })
                        .unwrap_or_else(|| {
                            panic!("slot {slot} of a count {} is empty", value.count)
                        });
                    self.ever_picked.entry(*key).or_default().insert(*b);
                }
            }
            if let Some(n) = &mut self.fail_after {
                if *n == 0 {
                    return Err(Injected);
                }
                *n -= 1;
            }
            Ok(())
        }
    }

    impl ServiceMapWriter for Fake {
        type Error = Injected;
        fn read(&self) -> Result<KernelTable, Injected> {
            Ok(self
                .services
                .iter()
                .map(|(k, v)| {
                    let backends = (1..=v.count)
                        .filter_map(|slot| {
                            self.slots.get(&BackendKey { service: *k, slot }).copied()
                        })
                        .collect();
                    (
                        *k,
                        KernelEntry {
                            backends,
                            affinity_secs: v.affinity_secs,
                        },
                    )
                })
                .collect())
        }
        fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Injected> {
            self.services.insert(key, value);
            self.check()
        }
        fn delete_service(&mut self, key: ServiceKey) -> Result<(), Injected> {
            self.services.remove(&key);
            self.check()
        }
        fn put_backend(&mut self, key: BackendKey, backend: Backend) -> Result<(), Injected> {
            self.slots.insert(key, backend);
            self.check()
        }
        fn delete_backend(&mut self, key: BackendKey) -> Result<(), Injected> {
            self.slots.remove(&key);
            self.check()
        }
    }

    fn front(n: u8) -> ServiceKey {
        ServiceKey {
            addr: addr_bytes(std::net::Ipv4Addr::new(10, 96, 0, n).into()),
            port_be: 80u16.to_be(),
            protocol: 6,
            _pad: 0,
        }
    }

    fn be(n: u8) -> Backend {
        Backend {
            addr: addr_bytes(std::net::Ipv4Addr::new(10, 244, 1, n).into()),
            port_be: 8080u16.to_be(),
            _pad: [0; 2],
        }
    }

    fn table(entries: &[(u8, &[u8])]) -> KernelTable {
        entries
            .iter()
            .map(|(f, bs)| (front(*f), entry(bs.iter().map(|b| be(*b)).collect())))
            .collect()
    }

    fn entry(backends: Vec<Backend>) -> KernelEntry {
        KernelEntry {
            backends,
            affinity_secs: 0,
        }
    }

    fn same_sets(a: &KernelTable, b: &KernelTable) -> bool {
        let norm = |t: &KernelTable| -> BTreeMap<ServiceKey, std::collections::BTreeSet<Backend>> {
            t.iter()
                .map(|(k, v)| (*k, v.backends.iter().copied().collect()))
                .collect()
        };
        norm(a) == norm(b)
    }

    #[test]
    fn a_removed_backend_is_never_picked_after_its_slot_is_rewritten_and_writes_are_a_diff() {
        let mut sync = ServiceSync::adopt(Fake::default()).unwrap();
        let first = table(&[(1, &[1, 2, 3]), (2, &[4])]);
        let stats = sync.apply(&first).unwrap();
        assert_eq!(stats.slots_written, 4);
        assert!(same_sets(&sync.maps.read().unwrap(), &first));
        // Backend 1 leaves service 1, backend 5 joins; service 2 is untouched.
        sync.maps.ever_picked.clear();
        let second = table(&[(1, &[2, 3, 5]), (2, &[4])]);
        let stats = sync.apply(&second).unwrap();
        assert!(same_sets(&sync.maps.read().unwrap(), &second));
        assert_eq!(
            (
                stats.slots_written,
                stats.frontends_written,
                stats.slots_removed
            ),
            (2, 0, 0),
            "slot 1 takes the last backend, 5 is appended: {stats:?}"
        );
        // Only the old set or the new set was ever visible, and 1 only before its slot moved:
        // after the apply, nothing can pick it.
        let slots = &sync.current()[&front(1)].backends;
        assert!(!slots.contains(&be(1)));
        // An unchanged table writes nothing.
        assert!(!sync.apply(&second).unwrap().changed());
    }

    #[test]
    fn shrinking_to_zero_keeps_the_frontend_with_count_zero_and_removal_deletes_it() {
        let mut sync = ServiceSync::adopt(Fake::default()).unwrap();
        sync.apply(&table(&[(1, &[1, 2])])).unwrap();
        sync.apply(&table(&[(1, &[])])).unwrap();
        assert_eq!(sync.maps.services[&front(1)].count, 0);
        assert!(sync.maps.slots.is_empty());
        sync.apply(&table(&[])).unwrap();
        assert!(sync.maps.services.is_empty());
    }

    #[test]
    fn a_table_too_big_is_refused_whole_and_the_previous_stays() {
        let mut sync = ServiceSync::adopt(Fake::default()).unwrap();
        let small = table(&[(1, &[1])]);
        sync.apply(&small).unwrap();
        let mut big = KernelTable::new();
        for i in 0..=MAX_SERVICES {
            let mut key = front(0);
            key.addr[12..16].copy_from_slice(&(0x0a60_0000 + i).to_be_bytes());
            big.insert(key, entry(vec![be(1)]));
        }
        let err = sync.apply(&big).unwrap_err();
        assert!(matches!(err, ServiceSyncError::Overflow { .. }), "{err}");
        assert!(err.to_string().contains("the previous table stays"));
        assert!(same_sets(&sync.maps.read().unwrap(), &small));
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_and_writes_nothing_for_the_same_table() {
        let mut sync = ServiceSync::adopt(Fake::default()).unwrap();
        let t = table(&[(1, &[1, 2, 3]), (2, &[4, 5])]);
        sync.apply(&t).unwrap();
        let maps = sync.maps;
        let mut again = ServiceSync::adopt(maps).unwrap();
        assert!(!again.apply(&t).unwrap().changed());
    }

    #[test]
    fn random_changes_converge_and_every_intermediate_state_is_consistent() {
        // A small deterministic generator: no dependency, reproducible.
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % n
        };
        let mut sync = ServiceSync::adopt(Fake::default()).unwrap();
        for _ in 0..200 {
            let mut desired = KernelTable::new();
            for f in 0..4u8 {
                if next(4) == 0 {
                    continue;
                }
                let bs: std::collections::BTreeSet<u8> = (0..next(6))
                    .map(|_| u8::try_from(next(8)).unwrap())
                    .collect();
                desired.insert(front(f), entry(bs.into_iter().map(be).collect()));
            }
            sync.apply(&desired).unwrap();
            assert!(same_sets(&sync.maps.read().unwrap(), &desired));
            assert!(same_sets(sync.current(), &desired));
        }
    }

    #[test]
    fn an_affinity_change_rewrites_the_frontend_only() {
        let mut sync = ServiceSync::adopt(Fake::default()).unwrap();
        let mut t = table(&[(1, &[1, 2])]);
        sync.apply(&t).unwrap();
        t.get_mut(&front(1)).unwrap().affinity_secs = 30;
        let stats = sync.apply(&t).unwrap();
        assert_eq!((stats.frontends_written, stats.slots_written), (1, 0));
        assert_eq!(sync.maps.services[&front(1)].affinity_secs, 30);
        assert_eq!(sync.maps.read().unwrap(), *sync.current());
    }

    #[test]
    fn a_failed_write_is_resumed_by_the_next_apply() {
        let fake = Fake {
            fail_after: Some(2),
            ..Fake::default()
        };
        let mut sync = ServiceSync::adopt(fake).unwrap();
        let t = table(&[(1, &[1, 2, 3])]);
        assert!(sync.apply(&t).is_err());
        sync.maps.fail_after = None;
        sync.apply(&t).unwrap();
        assert!(same_sets(&sync.maps.read().unwrap(), &t));
    }
}
