//! Loading the datapath object, adopting pinned maps, and attaching the classifiers with tcx to
//! workload interfaces.
//!
//! Pinned layout under the agent's bpffs directory (`--bpffs-dir`):
//!
//! ```text
//! <dir>/maps/NW_*                 every map, by name; adopted by the next load
//! <dir>/links/<ifname>-ingress    tcx link of `from_workload` (TC ingress of the interface)
//! <dir>/links/<ifname>-egress     tcx link of `to_workload` (TC egress)
//! <dir>/links/<ifname>-underlay   tcx link of `from_underlay` (TC ingress of an underlay device,
//!                                 eBPF host routing)
//! <dir>/links/to_proxy            sk_lookup link of `to_proxy` (the agent's network namespace)
//! <dir>/links/svc_*               cgroup links of the Service translation programs (`--cgroup`),
//!                                 and of `svc_sock_ops` (the translated connections' tuples)
//! ```
//!
//! `NW_PROXY_SOCKETS` (the agent's outbound listeners) and the same-node fast path's
//! `NW_LOCAL_PEERS` / `NW_LOCAL_BYTES` are never pinned: their sockets belong to the running
//! agent.
//!
//! Pinned links keep enforcing while no agent runs; a restarted agent re-attaches its (possibly
//! newer) programs make-before-break over them.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use agent_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, COUNTERS_LEN, CtKey, CtValue, DatapathConfig,
    EVENTS_RING_BYTES, EndpointInfo, FragKey, FragValue, IpcacheValue, MAX_FRAGMENTS,
    MAX_SERVICE_AFFINITY, MAX_SERVICE_BACKENDS, MAX_SERVICE_CONNS, MAX_SERVICE_REVNAT,
    MAX_SERVICES, PolicyKey, PolicyValue, RevNatKey, ServiceKey, ServiceValue, SvcConnKey,
    map_names, program_names,
};
use aya::maps::{MapData, SockHash, SockMap};
use aya::maps::{MapError, MapInfo, MapType};
use aya::programs::links::{FdLink, LinkError};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, SkLookup, SkSkb,
    SockOps, TcAttachType, sk_skb::SkSkbLink,
};
use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::datapath::maps::{MapsError, PinnedMaps};
use crate::datapath::migrate::{MigrateError, Migration};
use crate::datapath::sizes::MapSizes;

/// The compiled `agent-ebpf` object, built by `build.rs` through aya-build.
static DATAPATH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Where bpffs is normally mounted; mounted by [`Datapath::open`] when it is not.
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// `statfs(2)` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// An error of the loader, with the object it concerned.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("mounting bpffs at {BPFFS_ROOT}: {0}")]
    MountBpffs(#[source] io::Error),
    #[error("{path} is not on a bpf filesystem (pinning needs bpffs)")]
    NotBpffs { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned map {path} does not match this datapath ({detail}); run `nodeward cleanup` to \
         drop the old state"
    )]
    IncompatiblePinnedMap { path: PathBuf, detail: String },
    #[error("loading the datapath programs: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("program {0} is missing from the datapath object")]
    MissingProgram(&'static str),
    #[error("program {program}: {op}: {source}")]
    Program {
        program: &'static str,
        op: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("interface {ifname} has ifindex {actual}, not the expected {expected}")]
    InterfaceMismatch {
        ifname: String,
        expected: u32,
        actual: u32,
    },
    #[error("invalid interface name {0:?}")]
    InvalidInterfaceName(String),
    #[error("attaching {program} to {ifname}: {source}")]
    Attach {
        program: &'static str,
        ifname: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("pinning the {program} link of {ifname} at {path}: {detail}")]
    PinLink {
        program: &'static str,
        ifname: String,
        path: PathBuf,
        detail: String,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// One of the two classifiers and where it attaches.
#[derive(Clone, Copy, Debug)]
struct Hook {
    program: &'static str,
    attach_type: TcAttachType,
    suffix: &'static str,
}

const HOOKS: [Hook; 2] = [
    Hook {
        program: program_names::FROM_WORKLOAD,
        attach_type: TcAttachType::Ingress,
        suffix: "ingress",
    },
    Hook {
        program: program_names::TO_WORKLOAD,
        attach_type: TcAttachType::Egress,
        suffix: "egress",
    },
];

/// `from_underlay` on an underlay device (eBPF host routing); its pin suffix is no workload
/// hook's, so [`Datapath::attached`] does not list underlay devices as workloads.
const UNDERLAY_HOOK: Hook = Hook {
    program: program_names::FROM_UNDERLAY,
    attach_type: TcAttachType::Ingress,
    suffix: "underlay",
};

/// Removes a link pin (detaching its program); a missing pin is not an error.
fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            what: "removing link pin",
            path: path.into(),
            source,
        }),
    }
}

/// The interfaces that have a link of one of `hooks`: those `held` by this instance, and those
/// pinned under `bpffs_dir`; sorted, each once.
fn pinned_ifnames(
    bpffs_dir: Option<&Path>,
    held: impl Iterator<Item = String>,
    hooks: &[Hook],
) -> Result<Vec<String>, DatapathError> {
    let mut names: Vec<String> = held.collect();
    if let Some(dir) = bpffs_dir {
        let links = links_dir(dir);
        let listing = |source| DatapathError::Io {
            what: "listing",
            path: links.clone(),
            source,
        };
        for entry in std::fs::read_dir(&links).map_err(listing)? {
            let file = entry
                .map_err(listing)?
                .file_name()
                .to_string_lossy()
                .into_owned();
            let stem = hooks
                .iter()
                .find_map(|h| file.strip_suffix(&format!("-{}", h.suffix)));
            if let Some(stem) = stem {
                names.push(ifname_from_pin_stem(stem));
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The Service translation programs (cgroup `sock_addr`), each pinned at `links/<name>`.
const SERVICE_PROGRAMS: [&str; 8] = [
    program_names::SVC_CONNECT4,
    program_names::SVC_SENDMSG4,
    program_names::SVC_RECVMSG4,
    program_names::SVC_GETPEERNAME4,
    program_names::SVC_CONNECT6,
    program_names::SVC_SENDMSG6,
    program_names::SVC_RECVMSG6,
    program_names::SVC_GETPEERNAME6,
];

/// The same-node fast path's kernel side ([`Datapath::local_splice`]): the sockets it joins,
/// the bytes it moved per socket, and the verdict program's attachment (detached on drop).
pub struct LocalSplice {
    pub peers: SockHash<MapData, u64>,
    pub bytes: aya::maps::HashMap<MapData, u64, u64>,
    pub link: SkSkbLink,
}

/// The loaded programs, their maps, and the links this instance made.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    maps: PinnedMaps,
    /// `Some(dir)`: maps and links pinned under it. `None`: nothing pinned (tests).
    bpffs_dir: Option<PathBuf>,
    /// Links held in memory when not pinning, by interface name.
    unpinned_links: BTreeMap<String, Vec<FdLink>>,
    /// `from_underlay` links when not pinning, by device name.
    unpinned_underlay: BTreeMap<String, FdLink>,
    /// The `to_proxy` link when not pinning.
    unpinned_to_proxy: Option<FdLink>,
    /// The cgroup links when not pinning.
    unpinned_cgroup: Vec<FdLink>,
    /// Pinned maps this load resized, until [`Datapath::finish_migrations`].
    migrations: Vec<Migration>,
}

impl Datapath {
    /// Loads the programs. With `Some(dir)`, mounts bpffs at `/sys/fs/bpf` if it is not mounted,
    /// creates `dir/maps` and `dir/links`, and pins every map by name in `dir/maps`, adopting
    /// the maps already pinned there (their state survives agent restarts). With `None`, the
    /// maps are private to this instance.
    ///
    /// # Errors
    /// bpffs unavailable, an incompatible pinned map, or a load (verifier) failure.
    pub fn open(bpffs_dir: Option<&Path>) -> Result<Self, DatapathError> {
        Self::open_sized(bpffs_dir, &MapSizes::COMPILED)
    }

    /// [`Datapath::open`] with the sized maps made `sizes` large (`max_entries` is set before
    /// the maps are created).
    ///
    /// # Errors
    /// As [`Datapath::open`].
    pub fn open_sized(bpffs_dir: Option<&Path>, sizes: &MapSizes) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        for (name, entries) in sizes.by_name() {
            loader.map_max_entries(name, entries);
        }
        let expected_maps = expected_maps(sizes);
        let pin_paths: Vec<(&'static str, PathBuf)>;
        let mut migrations = Vec::new();
        if let Some(dir) = bpffs_dir {
            ensure_bpffs_mounted()?;
            // Check before creating anything, so a wrong path leaves no directories behind.
            let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
            if !is_bpffs(existing) {
                return Err(DatapathError::NotBpffs { path: dir.into() });
            }
            for sub in [maps_dir(dir), links_dir(dir)] {
                std::fs::create_dir_all(&sub).map_err(|source| DatapathError::Io {
                    what: "creating",
                    path: sub.clone(),
                    source,
                })?;
            }
            if !is_bpffs(dir) {
                return Err(DatapathError::NotBpffs { path: dir.into() });
            }
            pin_paths = expected_maps
                .iter()
                .map(|m| (m.name, maps_dir(dir).join(m.name)))
                .collect();
            // Every map is read before anything is created: a map too large for its new size
            // stops here, with the pinned state untouched.
            for (expected, (name, path)) in expected_maps.iter().zip(&pin_paths) {
                if let Some((from, from_lru)) = check_pinned_map(path, expected)? {
                    migrations.push(Migration::prepare(
                        name,
                        path,
                        from,
                        expected.max_entries,
                        from_lru,
                    )?);
                }
            }
        } else {
            pin_paths = Vec::new();
        }
        for (name, path) in &pin_paths {
            match migrations.iter().find(|m| m.name == *name) {
                Some(m) => loader.map_pin_path(name, m.temp_path.clone()),
                None => loader.map_pin_path(name, path.as_path()),
            };
        }

        let loaded = Self::load(&mut loader, &mut migrations);
        if loaded.is_err() {
            for m in &migrations {
                let _ = std::fs::remove_file(&m.temp_path);
            }
        }
        let (ebpf, maps) = loaded?;
        Ok(Self {
            ebpf,
            maps,
            bpffs_dir: bpffs_dir.map(Path::to_path_buf),
            unpinned_links: BTreeMap::new(),
            unpinned_underlay: BTreeMap::new(),
            unpinned_to_proxy: None,
            unpinned_cgroup: Vec::new(),
            migrations,
        })
    }

    /// Loads the object and its programs, and moves the entries of resized maps into their new
    /// maps (before anything attaches the programs that use them).
    fn load(
        loader: &mut EbpfLoader<'_>,
        migrations: &mut [Migration],
    ) -> Result<(Ebpf, PinnedMaps), DatapathError> {
        let mut ebpf = loader
            .load(DATAPATH_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for program in HOOKS
            .iter()
            .map(|h| h.program)
            .chain([program_names::FROM_UNDERLAY])
        {
            let prog = classifier_mut(&mut ebpf, program)?;
            prog.load().map_err(|source| DatapathError::Program {
                program,
                op: "loading (verifier)",
                source: Box::new(source),
            })?;
        }
        sk_lookup_mut(&mut ebpf)?
            .load()
            .map_err(|source| DatapathError::Program {
                program: program_names::TO_PROXY,
                op: "loading (verifier)",
                source: Box::new(source),
            })?;
        for program in SERVICE_PROGRAMS {
            cgroup_mut(&mut ebpf, program)?
                .load()
                .map_err(|source| DatapathError::Program {
                    program,
                    op: "loading (verifier)",
                    source: Box::new(source),
                })?;
        }
        sock_ops_mut(&mut ebpf)?
            .load()
            .map_err(|source| DatapathError::Program {
                program: program_names::SVC_SOCK_OPS,
                op: "loading (verifier)",
                source: Box::new(source),
            })?;
        let maps = PinnedMaps::from_ebpf(&mut ebpf)?;
        for m in migrations.iter_mut() {
            let started = std::time::Instant::now();
            let skipped = m.commit()?;
            tracing::info!(
                map = m.name,
                from = m.from,
                to = m.to,
                from_lru = m.from_lru,
                entries = m.entries(),
                skipped,
                micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "pinned map resized: its entries moved to a new map"
            );
        }
        Ok((ebpf, maps))
    }

    /// After the programs were attached again: copies the flows that the previous programs
    /// recorded in a resized conntrack since the start into the new one (see
    /// `datapath::migrate`). Does nothing when nothing was resized or once done.
    ///
    /// # Errors
    /// A failed map read or write.
    pub fn finish_migrations(&mut self) -> Result<usize, DatapathError> {
        let mut added = 0;
        for m in &mut self.migrations {
            added += m.catch_up()?;
        }
        self.migrations.clear();
        Ok(added)
    }

    /// Whether [`Datapath::finish_migrations`] has work left.
    #[must_use]
    pub fn migrating(&self) -> bool {
        self.migrations.iter().any(Migration::needs_catch_up)
    }

    /// Attaches the Service translation programs to the cgroup (v2 directory) `cgroup`, pinned at
    /// `links/<program>` when pinning, replacing a previous agent's links make-before-break (a
    /// cgroup runs every linked program of a hook; the old one leaves once the new one is in
    /// place, and both read the same pinned maps).
    ///
    /// # Errors
    /// The cgroup cannot be opened, or an attach or pin failure.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let file = std::fs::File::open(cgroup).map_err(|source| DatapathError::Io {
            what: "opening the cgroup",
            path: cgroup.into(),
            source,
        })?;
        let target = cgroup.display().to_string();
        for program in SERVICE_PROGRAMS {
            let attach_err = |source| DatapathError::Attach {
                program,
                ifname: target.clone(),
                source: Box::new(source),
            };
            let prog = cgroup_mut(&mut self.ebpf, program)?;
            // `Single` is flags 0, which `bpf_link_create` requires for cgroups (any other value
            // is EINVAL); a bpf_link on a cgroup always sits beside the hook's other programs.
            let id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            self.keep_cgroup_link(link, program, &target)?;
        }
        let program = program_names::SVC_SOCK_OPS;
        let attach_err = |source| DatapathError::Attach {
            program,
            ifname: target.clone(),
            source: Box::new(source),
        };
        let prog = sock_ops_mut(&mut self.ebpf)?;
        let id = prog
            .attach(&file, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        self.keep_cgroup_link(link, program, &target)
    }

    /// Keeps the new cgroup link of `program`: pinned at `links/<program>` (replacing a previous
    /// agent's) when pinning, else held for the agent's lifetime.
    fn keep_cgroup_link<L>(
        &mut self,
        link: L,
        program: &'static str,
        target: &str,
    ) -> Result<(), DatapathError>
    where
        FdLink: TryFrom<L, Error = LinkError>,
    {
        let link = FdLink::try_from(link).map_err(|e| DatapathError::PinLink {
            program,
            ifname: target.to_owned(),
            path: PathBuf::new(),
            detail: format!("not a bpf link: {}", crate::error_chain(&e)),
        })?;
        match &self.bpffs_dir {
            Some(dir) => pin_replacing(link, &links_dir(dir).join(program), program, target)?,
            None => self.unpinned_cgroup.push(link),
        }
        Ok(())
    }

    /// Attaches `to_proxy` (`sk_lookup`) to the current network namespace, pinned at
    /// `links/to_proxy` when pinning, replacing a previous agent's link make-before-break.
    ///
    /// # Errors
    /// Attach or pin failure.
    pub fn attach_to_proxy(&mut self) -> Result<(), DatapathError> {
        let program = program_names::TO_PROXY;
        let netns_path = PathBuf::from("/proc/thread-self/ns/net");
        let netns = std::fs::File::open(&netns_path).map_err(|source| DatapathError::Io {
            what: "opening",
            path: netns_path,
            source,
        })?;
        let attach_err = |source| DatapathError::Attach {
            program,
            ifname: "(network namespace)".into(),
            source: Box::new(source),
        };
        let prog = sk_lookup_mut(&mut self.ebpf)?;
        let id = prog.attach(&netns).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let link = FdLink::from(link);
        match &self.bpffs_dir {
            Some(dir) => pin_replacing(
                link,
                &links_dir(dir).join(TO_PROXY_PIN),
                program,
                "(network namespace)",
            ),
            None => {
                self.unpinned_to_proxy = Some(link);
                Ok(())
            }
        }
    }

    /// Loads `local_splice` (the tunnel's same-node fast path, `sk_skb` stream verdict),
    /// attaches it to `NW_LOCAL_PEERS` and hands both of its maps to the caller. Loaded apart
    /// from the other programs: where the kernel refuses it, the datapath works as before and
    /// the tunnel copies same-node bytes in user space.
    ///
    /// # Errors
    /// The program or a map is missing, the verifier refuses it, or the attach fails.
    pub fn local_splice(&mut self) -> Result<LocalSplice, DatapathError> {
        let program = program_names::LOCAL_SPLICE;
        let prog: &mut SkSkb = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram(program))?;
        prog.load().map_err(|source| DatapathError::Program {
            program,
            op: "loading (verifier)",
            source: Box::new(source),
        })?;
        let take = |ebpf: &mut Ebpf, map: &'static str| {
            ebpf.take_map(map).ok_or(MapsError::Missing { map })
        };
        let peers: SockHash<MapData, u64> = take(&mut self.ebpf, map_names::LOCAL_PEERS)?
            .try_into()
            .map_err(|source| MapsError::Op {
                map: map_names::LOCAL_PEERS,
                op: "open",
                source,
            })?;
        let bytes: aya::maps::HashMap<MapData, u64, u64> =
            take(&mut self.ebpf, map_names::LOCAL_BYTES)?
                .try_into()
                .map_err(|source| MapsError::Op {
                    map: map_names::LOCAL_BYTES,
                    op: "open",
                    source,
                })?;
        let attach_err = |source| DatapathError::Attach {
            program,
            ifname: map_names::LOCAL_PEERS.into(),
            source: Box::new(source),
        };
        let prog: &mut SkSkb = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram(program))?;
        let id = prog.attach(peers.fd()).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        Ok(LocalSplice { peers, bytes, link })
    }

    /// Puts the agent's outbound listener in slot `slot` of `NW_PROXY_SOCKETS`
    /// (`agent_common::mesh::PROXY_SOCKET_V4` or `PROXY_SOCKET_V6`). The kernel drops the entry
    /// when the socket closes.
    ///
    /// # Errors
    /// The map is missing or refuses the socket (it must be a listening TCP socket).
    pub fn set_proxy_listener(
        &mut self,
        slot: u32,
        listener: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), DatapathError> {
        self.set_socket(
            map_names::PROXY_SOCKETS,
            slot,
            listener,
            "insert the outbound listener",
        )
    }

    /// Puts `socket` in slot `slot` of the unpinned sockmap `name`; `op` names the step in the
    /// error.
    fn set_socket(
        &mut self,
        name: &'static str,
        slot: u32,
        socket: std::os::fd::BorrowedFd<'_>,
        op: &'static str,
    ) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(MapsError::Missing { map: name })?;
        let mut sockets = SockMap::try_from(map).map_err(|source| MapsError::Op {
            map: name,
            op: "open",
            source,
        })?;
        sockets
            .set(slot, &socket, 0)
            .map_err(|source| MapsError::Op {
                map: name,
                op,
                source,
            })?;
        Ok(())
    }

    /// Steers pods' DNS (UDP datagrams and TCP connections to a Service frontend on port 53) to
    /// the DNS proxy: `addr` is where pods reach it, `udp` its UDP socket and `tcp` its TCP
    /// listener, both bound to `addr`. Neither map is pinned: the kernel drops a socket when it
    /// closes, and that transport's DNS goes straight to the backends again.
    ///
    /// # Errors
    /// A map is missing or refuses an entry (a bound UDP socket, a listening TCP socket).
    pub fn set_dns_proxy(
        &mut self,
        addr: std::net::SocketAddr,
        udp: std::os::fd::BorrowedFd<'_>,
        tcp: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), DatapathError> {
        self.set_dns_slot(0, Some(addr), "set the DNS proxy address")?;
        self.set_socket("NW_DNS_SOCKET", 0, udp, "insert the DNS proxy's UDP socket")?;
        self.set_socket(
            "NW_DNS_SOCKET",
            1,
            tcp,
            "insert the DNS proxy's TCP listener",
        )
    }

    /// Names the resolver the DNS proxy forwards to (`None`: none known): policy judges a
    /// pod's datagram to the proxy as going there, so a rule allowing DNS to kube-dns covers
    /// steered DNS and `host` need not be allowed.
    ///
    /// # Errors
    /// The map is missing or refuses the entry.
    pub fn set_dns_upstream(
        &mut self,
        upstream: Option<std::net::SocketAddr>,
    ) -> Result<(), DatapathError> {
        self.set_dns_slot(1, upstream, "set the DNS upstream")
    }

    /// Writes slot `slot` of `NW_DNS_PROXY` (0 the proxy, 1 its upstream; port 0 when `None`).
    fn set_dns_slot(
        &mut self,
        slot: u32,
        addr: Option<std::net::SocketAddr>,
        op: &'static str,
    ) -> Result<(), DatapathError> {
        let backend = addr.map_or_else(Backend::default, |addr| {
            let ip = match addr.ip() {
                std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
                std::net::IpAddr::V6(a) => a,
            };
            Backend {
                addr: ip.octets(),
                port_be: addr.port().to_be(),
                _pad: [0; 2],
            }
        });
        let name = "NW_DNS_PROXY";
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(MapsError::Missing { map: name })?;
        let mut proxy =
            aya::maps::Array::<_, Backend>::try_from(map).map_err(|source| MapsError::Op {
                map: name,
                op: "open",
                source,
            })?;
        proxy
            .set(slot, backend, 0)
            .map_err(|source| MapsError::Op {
                map: name,
                op,
                source,
            })?;
        Ok(())
    }

    #[must_use]
    pub const fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    pub const fn maps_mut(&mut self) -> &mut PinnedMaps {
        &mut self.maps
    }

    /// A loaded classifier by name (`agent_common::program_names`), e.g. for
    /// `BPF_PROG_TEST_RUN`.
    ///
    /// # Errors
    /// [`DatapathError::MissingProgram`] for an unknown name.
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .ok_or(DatapathError::MissingProgram(name))
    }

    /// Attaches `from_workload` at tcx ingress and `to_workload` at tcx egress of `ifname`,
    /// which must have index `ifindex` in the current network namespace. When pinning, each link
    /// is pinned at `links/<ifname>-<ingress|egress>`; a link already pinned there (a previous
    /// agent's) is replaced make-before-break: the new program is attached and pinned under a
    /// temporary name, renamed over the old pin, and only then does the old link go away.
    ///
    /// # Errors
    /// Unknown or mismatched interface, attach or pin failure.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> Result<(), DatapathError> {
        check_ifname(ifname)?;
        let actual = ifindex_of(ifname)?;
        if actual != ifindex {
            return Err(DatapathError::InterfaceMismatch {
                ifname: ifname.to_owned(),
                expected: ifindex,
                actual,
            });
        }
        let mut held = Vec::new();
        for hook in HOOKS {
            if let Some(link) = self.attach_hook(hook, ifname)? {
                held.push(link);
            }
        }
        if self.bpffs_dir.is_none() {
            // Replacing the entry drops (detaches) links of an earlier attach, after the new
            // ones are in place.
            self.unpinned_links.insert(ifname.to_owned(), held);
        }
        Ok(())
    }

    /// Attaches `hook`'s program to `ifname` with tcx, after whatever is attached there; pins
    /// the link (make-before-break over an earlier one), or returns it when not pinning.
    fn attach_hook(&mut self, hook: Hook, ifname: &str) -> Result<Option<FdLink>, DatapathError> {
        let prog = classifier_mut(&mut self.ebpf, hook.program)?;
        let attach_err = |source| DatapathError::Attach {
            program: hook.program,
            ifname: ifname.to_owned(),
            source: Box::new(source),
        };
        // Appended after whatever is attached, so during a replacement the old program
        // still decides until its link is gone.
        let id = prog
            .attach_with_options(
                ifname,
                hook.attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(|e| DatapathError::PinLink {
            program: hook.program,
            ifname: ifname.to_owned(),
            path: PathBuf::new(),
            detail: format!("not a bpf link: {}", crate::error_chain(&e)),
        })?;
        match &self.bpffs_dir {
            Some(dir) => {
                pin_replacing(link, &link_pin(dir, ifname, hook), hook.program, ifname)?;
                Ok(None)
            }
            None => Ok(Some(link)),
        }
    }

    /// Attaches `from_underlay` at tcx ingress of the underlay device `ifname` (eBPF host
    /// routing), pinned at `links/<ifname>-underlay`. Nothing else on the device is touched:
    /// tcx appends the program after whatever is attached there.
    ///
    /// # Errors
    /// Unknown interface, attach or pin failure.
    pub fn attach_underlay(&mut self, ifname: &str) -> Result<(), DatapathError> {
        check_ifname(ifname)?;
        ifindex_of(ifname)?;
        if let Some(link) = self.attach_hook(UNDERLAY_HOOK, ifname)? {
            self.unpinned_underlay.insert(ifname.to_owned(), link);
        }
        Ok(())
    }

    /// Detaches `from_underlay` from `ifname`; not attached is not an error.
    ///
    /// # Errors
    /// A pin that cannot be removed.
    pub fn detach_underlay(&mut self, ifname: &str) -> Result<(), DatapathError> {
        check_ifname(ifname)?;
        self.unpinned_underlay.remove(ifname);
        if let Some(dir) = &self.bpffs_dir {
            remove_pin(&link_pin(dir, ifname, UNDERLAY_HOOK))?;
        }
        Ok(())
    }

    /// Underlay devices with an attached `from_underlay` (pinned, or held), sorted.
    ///
    /// # Errors
    /// The links directory cannot be read.
    pub fn underlay_attached(&self) -> Result<Vec<String>, DatapathError> {
        let held = self.unpinned_underlay.keys().cloned();
        pinned_ifnames(self.bpffs_dir.as_deref(), held, &[UNDERLAY_HOOK])
    }

    /// Detaches both programs from `ifname` (removing the pins). Detaching an interface that
    /// is not attached is not an error.
    ///
    /// # Errors
    /// A pin that cannot be removed.
    pub fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        check_ifname(ifname)?;
        self.unpinned_links.remove(ifname);
        if let Some(dir) = &self.bpffs_dir {
            for hook in HOOKS {
                remove_pin(&link_pin(dir, ifname, hook))?;
            }
        }
        Ok(())
    }

    /// Interfaces with an attached (pinned, or held by this instance) link, sorted. The
    /// `to_proxy` link is not an interface's and is not listed.
    ///
    /// # Errors
    /// The links directory cannot be read.
    pub fn attached(&self) -> Result<Vec<String>, DatapathError> {
        let held = self.unpinned_links.keys().cloned();
        pinned_ifnames(self.bpffs_dir.as_deref(), held, &HOOKS)
    }

    /// Removes everything an agent pinned under `dir` (links first, which detaches the
    /// programs, then maps), and `dir` itself. A missing `dir` is not an error.
    ///
    /// # Errors
    /// A pin or directory that cannot be removed.
    pub fn remove_all(dir: &Path) -> Result<(), DatapathError> {
        for sub in [links_dir(dir), maps_dir(dir)] {
            match std::fs::remove_dir_all(&sub) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DatapathError::Io {
                        what: "removing",
                        path: sub,
                        source,
                    });
                }
            }
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Io {
                what: "removing",
                path: dir.into(),
                source,
            }),
        }
    }
}

fn maps_dir(dir: &Path) -> PathBuf {
    dir.join("maps")
}

fn links_dir(dir: &Path) -> PathBuf {
    dir.join("links")
}

/// bpffs refuses names with a dot (they are reserved for its own files), and interface names
/// may have one (`eth0.100`) but never a colon: pin names swap the two.
fn pin_stem(ifname: &str) -> String {
    ifname.replace('.', ":")
}

fn ifname_from_pin_stem(stem: &str) -> String {
    stem.replace(':', ".")
}

/// Marks a pin being made; never a suffix of a final pin name, as `:` is not in interface names.
const TEMP_PIN_SUFFIX: &str = ":new";
/// The `to_proxy` link's pin in `links/`; no interface pin ends like this (see [`HOOKS`]).
const TO_PROXY_PIN: &str = "to_proxy";

fn link_pin(dir: &Path, ifname: &str, hook: Hook) -> PathBuf {
    links_dir(dir).join(format!("{}-{}", pin_stem(ifname), hook.suffix))
}

/// Pins `link` at `final_path`, replacing (make-before-break) a link pinned there before.
fn pin_replacing(
    link: FdLink,
    final_path: &Path,
    program: &'static str,
    ifname: &str,
) -> Result<(), DatapathError> {
    let mut temp_name = final_path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(TEMP_PIN_SUFFIX);
    let temp_path = final_path.with_file_name(temp_name);
    let pin_err = |path: &Path, detail: String| DatapathError::PinLink {
        program,
        ifname: ifname.to_owned(),
        path: path.into(),
        detail,
    };
    // A leftover from an interrupted attach.
    let _ = std::fs::remove_file(&temp_path);
    let pinned = link
        .pin(&temp_path)
        .map_err(|e| pin_err(&temp_path, crate::error_chain(&e)))?;
    // rename(2) replaces the old pin atomically; the old link loses its last reference and is
    // released (detached) only now, after the new program is attached.
    if let Err(e) = std::fs::rename(&temp_path, final_path) {
        // Dropping `pinned` would leave the temp pin attached: remove it.
        let _ = std::fs::remove_file(&temp_path);
        return Err(pin_err(final_path, format!("renaming the new pin: {e}")));
    }
    drop(pinned);
    Ok(())
}

fn cgroup_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
        .ok_or(DatapathError::MissingProgram(name))
}

fn sock_ops_mut(ebpf: &mut Ebpf) -> Result<&mut SockOps, DatapathError> {
    ebpf.program_mut(program_names::SVC_SOCK_OPS)
        .and_then(|p| <&mut SockOps>::try_from(p).ok())
        .ok_or(DatapathError::MissingProgram(program_names::SVC_SOCK_OPS))
}

fn sk_lookup_mut(ebpf: &mut Ebpf) -> Result<&mut SkLookup, DatapathError> {
    ebpf.program_mut(program_names::TO_PROXY)
        .and_then(|p| <&mut SkLookup>::try_from(p).ok())
        .ok_or(DatapathError::MissingProgram(program_names::TO_PROXY))
}

fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        .ok_or(DatapathError::MissingProgram(name))
}

fn check_ifname(ifname: &str) -> Result<(), DatapathError> {
    // IFNAMSIZ is 16 with the NUL; a name is also a file name under links/.
    if ifname.is_empty()
        || ifname.len() >= 16
        || ifname == "."
        || ifname == ".."
        || ifname.contains(['/', ':', '\0'])
        || ifname.contains(char::is_whitespace)
    {
        return Err(DatapathError::InvalidInterfaceName(ifname.to_owned()));
    }
    Ok(())
}

fn ifindex_of(ifname: &str) -> Result<u32, DatapathError> {
    let c = CString::new(ifname).map_err(|_| DatapathError::InvalidInterfaceName(ifname.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(DatapathError::Io {
            what: "looking up interface",
            path: PathBuf::from(ifname),
            source: io::Error::last_os_error(),
        });
    }
    Ok(index)
}

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: zeroed `statfs` is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    #[expect(
        clippy::useless_conversion,
        reason = "f_type is i64 on some targets, u32/i32 on others"
    )]
    (rc == 0).then(|| i64::from(st.f_type))
}

fn is_bpffs(path: &Path) -> bool {
    statfs_magic(path) == Some(BPF_FS_MAGIC)
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is already a bpf mount.
fn ensure_bpffs_mounted() -> Result<(), DatapathError> {
    let root = Path::new(BPFFS_ROOT);
    if is_bpffs(root) {
        return Ok(());
    }
    let source = c"bpf";
    let target = c"/sys/fs/bpf";
    let fstype = c"bpf";
    // SAFETY: all pointers are NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::MountBpffs(io::Error::last_os_error()));
    }
    Ok(())
}

/// What a pinned map must look like for this datapath to adopt it.
struct ExpectedMap {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

/// LPM trie keys carry the 32-bit prefix length before the data.
const LPM_PREFIX: usize = 4;

fn expected_maps(sizes: &MapSizes) -> [ExpectedMap; 15] {
    [
        ExpectedMap {
            name: map_names::ENDPOINTS,
            map_type: MapType::Hash,
            key_size: size_of::<u32>(),
            value_size: size_of::<EndpointInfo>(),
            max_entries: sizes.endpoints,
        },
        ExpectedMap {
            name: map_names::POLICY,
            map_type: MapType::LpmTrie,
            key_size: LPM_PREFIX + size_of::<PolicyKey>(),
            value_size: size_of::<PolicyValue>(),
            max_entries: sizes.policy,
        },
        ExpectedMap {
            name: map_names::IPCACHE,
            map_type: MapType::LpmTrie,
            key_size: LPM_PREFIX + 16,
            value_size: size_of::<IpcacheValue>(),
            max_entries: sizes.ipcache,
        },
        ExpectedMap {
            name: map_names::POLICY_CIDRS,
            map_type: MapType::LpmTrie,
            key_size: LPM_PREFIX + 16,
            value_size: size_of::<IpcacheValue>(),
            max_entries: sizes.policy_cidrs,
        },
        ExpectedMap {
            name: map_names::CONNTRACK,
            map_type: MapType::Hash,
            key_size: size_of::<CtKey>(),
            value_size: size_of::<CtValue>(),
            max_entries: sizes.conntrack,
        },
        ExpectedMap {
            name: map_names::FRAGMENTS,
            map_type: MapType::LruHash,
            key_size: size_of::<FragKey>(),
            value_size: size_of::<FragValue>(),
            max_entries: MAX_FRAGMENTS,
        },
        ExpectedMap {
            name: map_names::EVENTS,
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: EVENTS_RING_BYTES,
        },
        ExpectedMap {
            name: map_names::COUNTERS,
            map_type: MapType::PerCpuArray,
            key_size: size_of::<u32>(),
            value_size: size_of::<u64>(),
            max_entries: COUNTERS_LEN,
        },
        ExpectedMap {
            name: map_names::HOSTRT_COUNTERS,
            map_type: MapType::PerCpuArray,
            key_size: size_of::<u32>(),
            value_size: size_of::<u64>(),
            max_entries: agent_common::hostrt::COUNTERS_LEN,
        },
        ExpectedMap {
            name: map_names::CONFIG,
            map_type: MapType::Array,
            key_size: size_of::<u32>(),
            value_size: size_of::<DatapathConfig>(),
            max_entries: 1,
        },
        ExpectedMap {
            name: map_names::SERVICES,
            map_type: MapType::Hash,
            key_size: size_of::<ServiceKey>(),
            value_size: size_of::<ServiceValue>(),
            max_entries: MAX_SERVICES,
        },
        ExpectedMap {
            name: map_names::SERVICE_BACKENDS,
            map_type: MapType::Hash,
            key_size: size_of::<BackendKey>(),
            value_size: size_of::<Backend>(),
            max_entries: MAX_SERVICE_BACKENDS,
        },
        ExpectedMap {
            name: map_names::SERVICE_REVNAT,
            map_type: MapType::LruHash,
            key_size: size_of::<RevNatKey>(),
            value_size: size_of::<ServiceKey>(),
            max_entries: MAX_SERVICE_REVNAT,
        },
        ExpectedMap {
            name: map_names::SERVICE_AFFINITY,
            map_type: MapType::LruHash,
            key_size: size_of::<AffinityKey>(),
            value_size: size_of::<AffinityValue>(),
            max_entries: MAX_SERVICE_AFFINITY,
        },
        ExpectedMap {
            name: map_names::SERVICE_CONNS,
            map_type: MapType::LruHash,
            key_size: size_of::<SvcConnKey>(),
            value_size: size_of::<ServiceKey>(),
            max_entries: MAX_SERVICE_CONNS,
        },
    ]
}

/// Refuses to adopt a pinned map of another shape (an older agent's layout): the programs
/// would read it with the wrong sizes. A missing pin is fine (it is created). A map of
/// [`MapSizes`] that differs only in its size is to be migrated: `Some((its size, false))`; so
/// is the LRU conntrack of the agents before the preallocated hash (same key and value):
/// `Some((its size, true))`.
fn check_pinned_map(
    path: &Path,
    expected: &ExpectedMap,
) -> Result<Option<(u32, bool)>, DatapathError> {
    if !path.exists() {
        return Ok(None);
    }
    let mismatch = |detail: String| DatapathError::IncompatiblePinnedMap {
        path: path.into(),
        detail,
    };
    let info = MapInfo::from_pin(path).map_err(|e: MapError| mismatch(e.to_string()))?;
    let map_type = info.map_type().map_err(|e| mismatch(e.to_string()))?;
    let found = (
        map_type,
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    );
    let wanted = (
        expected.map_type,
        expected.key_size,
        expected.value_size,
        expected.max_entries,
    );
    if found == wanted {
        return Ok(None);
    }
    let resizable = MapSizes::COMPILED.of(expected.name).is_some();
    if resizable && (found.0, found.1, found.2) == (wanted.0, wanted.1, wanted.2) {
        return Ok(Some((found.3, false)));
    }
    if expected.name == map_names::CONNTRACK
        && (found.0, found.1, found.2) == (MapType::LruHash, wanted.1, wanted.2)
    {
        return Ok(Some((found.3, true)));
    }
    Err(mismatch(format!(
        "found (type, key, value, max entries) {found:?}, expected {wanted:?}"
    )))
}
