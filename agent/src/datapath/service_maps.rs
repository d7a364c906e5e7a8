//! The Service translation maps (`NW_SERVICES`, `NW_SVC_BACKENDS`), opened from their pins,
//! for [`crate::services::sync`].

use std::path::Path;

use agent_common::{Backend, BackendKey, ServiceKey, ServiceValue, map_names};
use aya::maps::{HashMap, Map, MapData, MapError};

use crate::datapath::maps::MapsError;
use crate::services::sync::{KernelEntry, KernelTable, ServiceMapWriter};

pub struct ServiceMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
}

impl std::fmt::Debug for ServiceMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMaps").finish_non_exhaustive()
    }
}

fn op(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { map, op, source }
}

fn open<K: aya::Pod, V: aya::Pod>(
    maps_dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, MapsError> {
    let data = MapData::from_pin(maps_dir.join(name)).map_err(op(name, "open pin"))?;
    let map = Map::from_map_data(data).map_err(op(name, "open pin"))?;
    HashMap::try_from(map).map_err(op(name, "open"))
}

/// A delete of an entry that is not there (a retry after a failed write) is not an error.
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl ServiceMaps {
    /// Opens the maps an agent pinned in `maps_dir` (`<bpffs dir>/maps`).
    ///
    /// # Errors
    /// A pin that is missing or not a compatible map.
    pub fn from_pins(maps_dir: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            services: open(maps_dir, map_names::SERVICES)?,
            backends: open(maps_dir, map_names::SERVICE_BACKENDS)?,
        })
    }
}

impl ServiceMapWriter for ServiceMaps {
    type Error = MapsError;

    fn read(&self) -> Result<KernelTable, MapsError> {
        let mut out = KernelTable::new();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(op(map_names::SERVICES, "read"))?;
            let mut slots = Vec::new();
            for slot in 1..=value.count {
                match self.backends.get(&BackendKey { service: key, slot }, 0) {
                    Ok(b) => slots.push(b),
                    Err(MapError::KeyNotFound) => break,
                    Err(e) => return Err(op(map_names::SERVICE_BACKENDS, "read")(e)),
                }
            }
            out.insert(
                key,
                KernelEntry {
                    backends: slots,
                    affinity_secs: value.affinity_secs,
                },
            );
        }
        Ok(out)
    }

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapsError> {
        self.services
            .insert(key, value, 0)
            .map_err(op(map_names::SERVICES, "insert"))
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapsError> {
        absent_ok(self.services.remove(&key)).map_err(op(map_names::SERVICES, "delete"))
    }

    fn put_backend(&mut self, key: BackendKey, backend: Backend) -> Result<(), MapsError> {
        self.backends
            .insert(key, backend, 0)
            .map_err(op(map_names::SERVICE_BACKENDS, "insert"))
    }

    fn delete_backend(&mut self, key: BackendKey) -> Result<(), MapsError> {
        absent_ok(self.backends.remove(&key)).map_err(op(map_names::SERVICE_BACKENDS, "delete"))
    }
}
