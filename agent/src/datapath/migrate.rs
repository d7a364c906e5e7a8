//! Moving a pinned map's entries into a map of another size, so that an agent restarted with
//! other `--map-*-entries` adopts the state without a gap in enforcement.
//!
//! A map's `max_entries` is fixed when the kernel creates it. The loader therefore creates the
//! resized map beside the old one (pinned under a temporary name), copies every entry into it
//! before any program that uses it is attached, and renames its pin over the old one. Until the
//! agent re-attaches its programs (make-before-break, in the first reconciliation), the pinned
//! links keep the previous programs running on the old maps, whose entries are unchanged: the
//! only map the kernel writes itself is conntrack, whose entries created in between are copied
//! again once the new programs are attached ([`Migration::catch_up`]).
//!
//! A map that holds more entries than the requested size is refused before anything is created
//! (the agent does not start; the pinned state keeps enforcing): dropping entries would drop
//! policy. A smaller conntrack is filled up to its size instead (the flows left out are new
//! flows to the datapath at their next packet).
//!
//! The same path upgrades the LRU conntrack of the agents before the preallocated hash: same
//! key and value, another map type. Its TCP entries that are not closing are marked answered
//! (`CT_F_SEEN_REPLY`, which the LRU's agents did not record), so a live connection keeps the
//! established lifetime rather than the handshake's.

use std::path::{Path, PathBuf};

use agent_common::{
    CT_F_CLOSING, CT_F_SEEN_REPLY, CtKey, CtValue, EndpointInfo, IpcacheValue, PolicyKey,
    PolicyValue, map_names,
};
use aya::Pod;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError};

/// `BPF_NOEXIST`: insert only what is not there yet.
const BPF_NOEXIST: u64 = 1;

/// One map's entries, read from its old pin.
enum Saved {
    Endpoints(Vec<(u32, EndpointInfo)>),
    Conntrack(Vec<(CtKey, CtValue)>),
    Policy(Vec<(Key<PolicyKey>, PolicyValue)>),
    Prefixes(Vec<(Key<[u8; 16]>, IpcacheValue)>),
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} entries", self.len())
    }
}

impl Saved {
    fn len(&self) -> usize {
        match self {
            Self::Endpoints(v) => v.len(),
            Self::Conntrack(v) => v.len(),
            Self::Policy(v) => v.len(),
            Self::Prefixes(v) => v.len(),
        }
    }
}

/// A map being moved to a new size.
#[derive(Debug)]
pub struct Migration {
    pub name: &'static str,
    /// The map's pin (the old map's until [`Migration::commit`]).
    pub path: PathBuf,
    /// Where the new map is pinned until it replaces the old one.
    pub temp_path: PathBuf,
    pub from: u32,
    pub to: u32,
    saved: Saved,
    /// The old conntrack, kept open to copy what the old programs add after the first copy.
    old_conntrack: Option<MapData>,
    /// The old map is the LRU conntrack of an earlier agent.
    pub from_lru: bool,
}

/// Why a migration failed; the old pins are left as they were.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "pinned map {path} holds {entries} entries, more than the {requested} requested; start \
         with a size of at least {entries} (or run `nodeward cleanup`, which stops enforcement)"
    )]
    TooSmall {
        path: PathBuf,
        entries: usize,
        requested: u32,
    },
    #[error("{op} {path}: {source}")]
    Map {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {0} cannot be resized")]
    NotResizable(String),
    #[error("replacing the pin {path} with the resized map: {source}")]
    Rename {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn open(path: &Path) -> Result<Map, MapError> {
    Map::from_map_data(MapData::from_pin(path)?)
}

fn read_hash<K: Pod, V: Pod>(map: Map) -> Result<Vec<(K, V)>, MapError> {
    let map: HashMap<MapData, K, V> = HashMap::try_from(map)?;
    map.iter().collect()
}

fn read_lpm<K: Pod, V: Pod>(path: &Path) -> Result<Vec<(Key<K>, V)>, MapError> {
    let map: LpmTrie<MapData, K, V> = LpmTrie::try_from(open(path)?)?;
    map.iter().collect()
}

/// Writes `entries`; returns how many were written and how many did not fit (`E2BIG`, only
/// for conntrack, whose flows left out become new flows).
fn write_hash<K: Pod, V: Pod>(
    path: &Path,
    entries: &[(K, V)],
    flags: u64,
    may_skip: bool,
) -> Result<(usize, usize), MapError> {
    let mut map: HashMap<MapData, K, V> = HashMap::try_from(open(path)?)?;
    let (mut written, mut skipped) = (0, 0);
    for (key, value) in entries {
        match map.insert(key, value, flags) {
            Ok(()) => written += 1,
            // Already there (BPF_NOEXIST): the new programs' entry is the newer one.
            Err(MapError::SyscallError(e))
                if flags == BPF_NOEXIST && e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(MapError::SyscallError(e))
                if may_skip && e.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                skipped += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok((written, skipped))
}

/// An old LRU conntrack's entries for the hash: see the module's note on `CT_F_SEEN_REPLY`.
fn mark_answered(entries: &mut [(CtKey, CtValue)]) {
    for (key, value) in entries {
        if key.protocol == 6 && value.flags & CT_F_CLOSING == 0 {
            value.flags |= CT_F_SEEN_REPLY;
        }
    }
}

fn write_lpm<K: Pod, V: Pod>(path: &Path, entries: &[(Key<K>, V)]) -> Result<(), MapError> {
    let mut map: LpmTrie<MapData, K, V> = LpmTrie::try_from(open(path)?)?;
    for (key, value) in entries {
        map.insert(key, value, 0)?;
    }
    Ok(())
}

/// The temporary pin of a resized map: `:` is in no map name (and bpffs refuses only dots).
#[must_use]
pub fn temp_pin(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(":resized");
    path.with_file_name(name)
}

impl Migration {
    /// Reads the entries of the map pinned at `path` (`from` entries large), checks that they
    /// fit in `to`, and clears a leftover temporary pin of an interrupted migration.
    ///
    /// # Errors
    /// The old map cannot be read, or holds more than `to` entries (except conntrack).
    pub fn prepare(
        name: &'static str,
        path: &Path,
        from: u32,
        to: u32,
        from_lru: bool,
    ) -> Result<Self, MigrateError> {
        let err = |op| {
            move |source| MigrateError::Map {
                op,
                path: path.into(),
                source,
            }
        };
        let mut old_conntrack = None;
        let saved = match name {
            map_names::ENDPOINTS => Saved::Endpoints(
                read_hash(open(path).map_err(err("opening"))?).map_err(err("reading"))?,
            ),
            map_names::CONNTRACK => {
                old_conntrack = Some(MapData::from_pin(path).map_err(err("opening"))?);
                let mut entries =
                    read_hash(open(path).map_err(err("opening"))?).map_err(err("reading"))?;
                if from_lru {
                    mark_answered(&mut entries);
                }
                Saved::Conntrack(entries)
            }
            map_names::POLICY => Saved::Policy(read_lpm(path).map_err(err("reading"))?),
            map_names::IPCACHE | map_names::POLICY_CIDRS => {
                Saved::Prefixes(read_lpm(path).map_err(err("reading"))?)
            }
            other => return Err(MigrateError::NotResizable(other.to_owned())),
        };
        if name != map_names::CONNTRACK && saved.len() > to as usize {
            return Err(MigrateError::TooSmall {
                path: path.into(),
                entries: saved.len(),
                requested: to,
            });
        }
        let temp_path = temp_pin(path);
        let _ = std::fs::remove_file(&temp_path);
        Ok(Self {
            name,
            path: path.into(),
            temp_path,
            from,
            to,
            saved,
            old_conntrack,
            from_lru,
        })
    }

    /// Number of entries moved.
    #[must_use]
    pub fn entries(&self) -> usize {
        self.saved.len()
    }

    /// Copies the saved entries into the new map (pinned at the temporary path by the loader)
    /// and renames its pin over the old one. The old map lives on while the old programs use it.
    /// Returns the number of conntrack entries that did not fit.
    ///
    /// # Errors
    /// A failed write or rename; the caller removes the temporary pin.
    pub fn commit(&mut self) -> Result<usize, MigrateError> {
        let path = self.temp_path.clone();
        let err = |source| MigrateError::Map {
            op: "filling",
            path: path.clone(),
            source,
        };
        let skipped = match &self.saved {
            Saved::Endpoints(v) => write_hash(&path, v, 0, false).map(|_| 0),
            // A conntrack smaller than the old one takes what fits.
            Saved::Conntrack(v) => write_hash(&path, v, 0, true).map(|(_, skipped)| skipped),
            Saved::Policy(v) => write_lpm(&path, v).map(|()| 0),
            Saved::Prefixes(v) => write_lpm(&path, v).map(|()| 0),
        }
        .map_err(err)?;
        std::fs::rename(&self.temp_path, &self.path).map_err(|source| MigrateError::Rename {
            path: self.path.clone(),
            source,
        })?;
        Ok(skipped)
    }

    /// Copies into the new conntrack (now at [`Migration::path`]) the flows the old programs
    /// recorded since [`Migration::prepare`], without overwriting what the new programs
    /// recorded; then lets the old map go. Returns the number of entries added.
    ///
    /// # Errors
    /// A failed read or write.
    pub fn catch_up(&mut self) -> Result<usize, MigrateError> {
        let Some(old) = self.old_conntrack.take() else {
            return Ok(0);
        };
        let err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| MigrateError::Map { op, path, source }
        };
        let mut entries: Vec<(CtKey, CtValue)> =
            read_hash(Map::from_map_data(old).map_err(err("opening", &self.path))?)
                .map_err(err("reading the old conntrack", &self.path))?;
        if self.from_lru {
            mark_answered(&mut entries);
        }
        write_hash(&self.path, &entries, BPF_NOEXIST, true)
            .map(|(written, _)| written)
            .map_err(err("filling", &self.path))
    }

    /// Whether [`Migration::catch_up`] has anything left to do.
    #[must_use]
    pub fn needs_catch_up(&self) -> bool {
        self.old_conntrack.is_some()
    }
}
