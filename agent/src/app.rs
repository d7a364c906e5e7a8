//! The one place the agent is assembled: source, compiler, datapath, flows, API and metrics.
//! Everything else knows only its inputs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde::Serialize;

use crate::datapath::loader::Datapath;
use crate::datapath::maps::PinnedMaps;
use crate::datapath::service_maps::ServiceMaps;
use crate::datapath::sizes::{FillWatch, MapSizes};
use crate::datapath::sync::{SyncError, SyncStats, Syncer};
use crate::endpoints::Resolver;
use crate::error_chain;
use crate::flows::log::{FlowLog, FlowLogConfig};
use crate::flows::{AddressInfo, Clock, EnrichmentIndex, FlowStore, PolicyRef};
use crate::identity::IdentityAllocator;
use crate::metrics::Metrics;
use crate::policy::{self, PolicyModel};
use crate::services::sync::ServiceSync;
use crate::source::kubernetes::report::PolicyOutcome;
use crate::source::kubernetes::{KubernetesOptions, KubernetesSource};
use crate::source::manifests::ManifestSource;
use crate::source::{Inventory, Source, SourceStatus};

/// Where the objects come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// `--manifests DIR`: standalone mode.
    Manifests(PathBuf),
    /// `--kubernetes [--kubeconfig PATH]`: the API server (in-cluster config by default).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// The agent's configuration, validated once at start-up.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    pub source: SourceConfig,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub api_socket: PathBuf,
    pub metrics_addr: SocketAddr,
    /// `--flows-addr`: the mutual-TLS flows port; `None` keeps flows on the Unix socket only.
    pub flow_api: Option<crate::flowapi::FlowApiConfig>,
    pub cgroup: Option<PathBuf>,
    pub flow_buffer: usize,
    /// `--flow-log DIR`: every flow also goes to rotated JSON-lines files.
    pub flow_log: Option<FlowLogConfig>,
    /// Report every new flow (`--flow-events all`), or only drops (`drops`).
    pub flow_events_all: bool,
    /// eBPF host routing (`--host-routing=ebpf`).
    pub host_routing: bool,
    /// `--devices`: the underlay devices for host routing; empty: found by route.
    pub devices: Vec<String>,
    /// Full resync even without a file event (a safety net for missed notifications).
    pub resync_interval: Duration,
    /// How often the conntrack garbage collector sweeps (`--conntrack-gc-interval`).
    pub ct_gc_interval: Duration,
    /// The mesh CA and trust roots (`--ca-cert`, `--ca-key`, `--trust-bundle`, `--trust-domain`).
    pub ca: crate::ca::CaConfig,
    /// Where workload certificates come from (`--ca-mode`).
    pub ca_mode: crate::ca::CaMode,
    /// Lifetime of workload certificates (`--cert-ttl`).
    pub cert_ttl: Duration,
    /// mTLS mode of pods no `MutualTLS` selects (`--mtls-mode`).
    pub mtls_default: policy::crd::MutualTlsMode,
    pub tunnel: crate::tunnel::TunnelConfig,
    /// Entries of each sized datapath map (`--map-*-entries`, `--map-dynamic-size-ratio`).
    pub map_sizes: MapSizes,
    /// Where pods reach the DNS proxy (`--dns-proxy-addr`); `None`: no proxy, no steering.
    pub dns_proxy: Option<SocketAddr>,
    /// TTL floor, grace and per-name cap of the learned names.
    pub dns_cache: crate::dns::cache::CacheConfig,
    /// `--trace-sample-rate`, `--otlp-endpoint`.
    pub trace: crate::http::trace::TraceConfig,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EndpointStatus {
    pub pod: String,
    pub identity: u32,
    pub ifindex: u32,
    pub interface: String,
    pub attached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Failure {
    pub object: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyStatus {
    pub applied: usize,
    pub failed: Vec<Failure>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MapFill {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
    /// At or past 90% of the capacity: a change that does not fit will be rejected whole.
    pub nearly_full: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncStatus {
    pub at: String,
    pub duration_ms: f64,
    /// Where `duration_ms` went, in order: milliseconds per step of the reconciliation.
    pub phases_ms: Vec<(&'static str, f64)>,
    pub policy_entries_added: usize,
    pub policy_entries_removed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `nodeward status` shows; rebuilt after every sync (counters are read live).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub ready: bool,
    pub node: String,
    /// Policy generation in the datapath (bumped by every change that reached the kernel).
    pub generation: u32,
    /// Number of completed reconciliations (whether or not they changed anything).
    pub syncs: u64,
    pub endpoints: Vec<EndpointStatus>,
    pub policies: PolicyStatus,
    pub manifest_errors: Vec<String>,
    pub maps: Vec<MapFill>,
    /// The kernel's capacity of every sized map (conntrack included, whose fill is not
    /// counted: it would mean walking the whole table).
    pub map_sizes: Option<MapSizes>,
    pub identities: usize,
    pub last_sync: SyncStatus,
    /// Where the objects come from and whether it is reachable (a disconnected API server means
    /// the last known state is enforced).
    pub source: SourceStatus,
    pub services: ServicesStatus,
    pub host_routing: HostRoutingStatus,
    /// The conntrack garbage collector's last sweep; `None` before the first.
    pub conntrack_gc: Option<ConntrackGcStatus>,
}

/// The conntrack garbage collector in `nodeward status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConntrackGcStatus {
    /// The last sweep: entries read, expired ones deleted, and its duration in microseconds.
    pub last: crate::datapath::maps::SweepStats,
    /// Entries left after it.
    pub entries: usize,
    /// Sweeps so far.
    pub runs: u64,
    /// The last failed sweep's error, until one succeeds.
    pub error: Option<String>,
}

/// eBPF host routing in `nodeward status` (its packet counters are added live).
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostRoutingStatus {
    /// `ebpf` or `kernel` (`--host-routing`).
    pub mode: &'static str,
    /// Underlay devices `from_underlay` is attached to.
    pub devices: Vec<String>,
}

/// The Service table in `nodeward status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServicesStatus {
    /// Services with at least one translated port.
    pub services: usize,
    /// `ClusterIP:port/protocol` frontends.
    pub frontends: usize,
    /// Backends new connections may go to, over every frontend.
    pub backends: usize,
    /// Frontends that refuse connects for want of a backend.
    pub without_backends: usize,
    /// Services read but not translated (headless, ExternalName).
    pub not_translated: usize,
    /// The Service translation programs are attached to `--cgroup`.
    pub translating: bool,
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_error: Option<String>,
    /// Every mesh `HTTPRoute`'s conditions on this node (Accepted, ResolvedRefs,
    /// PartiallyInvalid), with the manifest it came from.
    pub routes: Vec<crate::http::routes::RouteStatus>,
}

/// Reads the datapath's per-CPU counters, summed (indices are `agent_common::COUNTER_*`),
/// followed by the host routing counters (at `COUNTERS_LEN + agent_common::hostrt::*`).
pub type CounterReader = Box<dyn Fn() -> Vec<u64> + Send>;

/// State shared by the control loop, the flow reader, the API and metrics.
pub struct Shared {
    pub node: String,
    pub flows: FlowStore,
    pub flow_log: Option<FlowLog>,
    pub index: RwLock<Arc<EnrichmentIndex>>,
    pub status: RwLock<Status>,
    pub ready: AtomicBool,
    pub metrics: Metrics,
    pub counters: Mutex<Option<CounterReader>>,
    pub syncs: AtomicU64,
    /// The mesh's trust roots and where certificates come from, and the certificates of the
    /// local workloads and of this agent.
    pub ca: crate::ca::MeshCa,
    pub certs: crate::ca::manager::CertManager,
    /// The mTLS tunnel, once it runs.
    pub tunnel: std::sync::OnceLock<Arc<crate::tunnel::Context>>,
    /// The flows port's counters (zero while it is off).
    pub flow_api: crate::flowapi::FlowApiStats,
    /// The Service table of the last sync (`nodeward services`, flows' `destination_service`).
    pub services: RwLock<Arc<crate::services::ServiceTable>>,
    /// The DNS allow list of each proxied pod address (`EndpointPolicy::dns`), from the last sync.
    pub dns_allow: RwLock<Arc<std::collections::HashMap<IpAddr, policy::DnsAllow>>>,
}

impl Shared {
    /// Records a flow: metrics, the flow log, the in-memory ring and its followers.
    pub fn record(&self, flow: Arc<crate::flows::Flow>) {
        self.metrics.observe_flow(&flow);
        if let Some(log) = &self.flow_log
            && !log.offer(flow.clone())
        {
            self.flows
                .lost
                .flow_log_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        self.flows.push(flow);
    }

    /// The enrichment index of the last sync.
    #[must_use]
    pub fn index(&self) -> Arc<EnrichmentIndex> {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Shared {
    /// The status with live datapath counters.
    #[must_use]
    pub fn status(&self) -> serde_json::Value {
        let status = self
            .status
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut value = serde_json::to_value(status).unwrap_or_default();
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|read| read())
            .unwrap_or_default();
        let get = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
        let drops: BTreeMap<&str, u64> = (1..agent_common::drop_reason::COUNT)
            .map(|r| {
                (
                    agent_common::drop_reason::describe(r),
                    get(agent_common::COUNTER_DROP_BASE + u32::from(r)),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        value["datapath"] = serde_json::json!({
            "packets": get(agent_common::COUNTER_PACKETS),
            "passed": get(agent_common::COUNTER_PASSED),
            "new_flows": get(agent_common::COUNTER_NEW_FLOWS),
            "service_translations": get(agent_common::COUNTER_SVC_TRANSLATED),
            "service_no_backend": get(agent_common::COUNTER_SVC_NO_BACKEND),
            "drops": drops,
        });
        let routed = |i: u32| get(agent_common::COUNTERS_LEN + i);
        value["host_routing"]["packets"] = serde_json::json!({
            "local_peer": routed(agent_common::hostrt::LOCAL_PEER),
            "underlay_peer": routed(agent_common::hostrt::UNDERLAY_PEER),
            "neigh": routed(agent_common::hostrt::NEIGH),
            "stack": routed(agent_common::hostrt::STACK),
            "fib_miss": routed(agent_common::hostrt::FIB_MISS),
        });
        value["flows"] = serde_json::json!({
            "stored": self.flows.len(),
            "total": self.flows.total.load(Ordering::Relaxed),
            "lost": {
                "kernel_ring_full": get(agent_common::COUNTER_EVENTS_LOST),
                "store_overwritten": self.flows.lost.store_overwritten.load(Ordering::Relaxed),
                "follower_lagged": self.flows.lost.follower_lagged.load(Ordering::Relaxed),
                "flow_log_dropped": self.flows.lost.flow_log_dropped.load(Ordering::Relaxed),
                "flow_log_write_failed": self.flow_log.as_ref().map_or(0, |l| l.status().write_failed),
            },
        });
        if let Some(log) = &self.flow_log {
            value["flow_log"] = serde_json::to_value(log.status()).unwrap_or_default();
        }
        value["flows_api"] = self.flow_api.to_json();
        if let Some(tunnel) = self.tunnel.get() {
            use crate::tunnel::TunnelStats as S;
            let s = &tunnel.stats;
            let view = tunnel.view();
            let meshed_here: BTreeSet<&policy::ObjectRef> = view
                .workloads
                .values()
                .filter(|w| w.local && w.mode.meshed())
                .map(|w| &w.pod)
                .collect();
            value["tunnel"] = serde_json::json!({
                "hbone_addr": tunnel.config.hbone_addr.to_string(),
                "meshed_endpoints": meshed_here.len(),
                "outbound": {"ok": S::get(&s.outbound_ok), "denied": S::get(&s.outbound_denied), "failed": S::get(&s.outbound_failed), "active": S::get(&s.outbound_active)},
                "inbound": {"ok": S::get(&s.inbound_ok), "denied": S::get(&s.inbound_denied), "failed": S::get(&s.inbound_failed), "active": S::get(&s.inbound_active)},
                "pooled_connections": S::get(&s.pool_open),
                "handshake_failures": {"client": S::get(&s.client_handshake_failures), "server": S::get(&s.server_handshake_failures)},
                "time_wait": {"removed": S::get(&s.time_wait_removed), "failed": S::get(&s.time_wait_failed)},
                "local": {"kernel": S::get(&s.local_kernel), "user": S::get(&s.local_user), "redirect_attached": tunnel.local.get().is_some()},
                "redirected_flows": get(agent_common::COUNTER_REDIRECTED),
            });
        }
        value
    }
}

/// Runs the agent until SIGINT or SIGTERM. Pinned state stays behind and keeps enforcing.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating --state-dir {}", config.state_dir.display()))?;
    if let SourceConfig::Manifests(dir) = &config.source
        && !dir.is_dir()
    {
        anyhow::bail!("--manifests {}: not a directory", dir.display());
    }
    // A missing or broken configuration is fatal; an unreachable API server is not (the
    // watchers retry and the pinned state keeps enforcing meanwhile).
    let kube_client = match &config.source {
        SourceConfig::Kubernetes { kubeconfig } => Some(
            crate::source::kubernetes::client(kubeconfig.as_deref())
                .await
                .context("--kubernetes")?,
        ),
        SourceConfig::Manifests(_) => None,
    };
    // A CA file that cannot be read or does not fit stops start-up, before anything changes.
    let (ca, certs) = match &config.ca_mode {
        crate::ca::CaMode::Local => {
            crate::ca::start_for_node(&config.ca, config.cert_ttl, Some(&config.node))
                .context("loading the mesh CA")?
        }
        crate::ca::CaMode::Issuer(issuer) => {
            crate::issuer::client::start(&config.ca, issuer, config.cert_ttl)
                .await
                .context("starting with the certificate issuer (--ca-mode issuer)")?
        }
    };
    let mut datapath = Datapath::open_sized(Some(&config.bpffs_dir), &config.map_sizes)
        .with_context(|| {
            format!(
                "loading the datapath (pinned under {})",
                config.bpffs_dir.display()
            )
        })?;
    // The loader's own handle on the flow event ring is never read: the reader gets its own
    // below. Unmapped, it no longer counts in the agent's memory (2 MiB: a ring buffer's pages
    // are mapped twice, so that a record can run past its end).
    drop(datapath.maps_mut().take_events());
    // The sync and the flow reader get their own handles on the pinned maps; the loader keeps
    // its own for the programs.
    let mut maps = PinnedMaps::from_pins(&config.bpffs_dir.join("maps"))
        .context("opening the pinned datapath maps")?;
    let events = maps
        .take_events()
        .context("opening the flow event ring buffer")?;
    let mut flags = 0;
    if config.flow_events_all {
        flags |= agent_common::CONFIG_EVENTS_ALL_FLOWS;
    }
    if config.host_routing {
        flags |= agent_common::CONFIG_HOST_ROUTING;
    }
    maps.set_config_flags(flags)
        .context("setting the datapath's flow event and host routing flags")?;
    let flow_log = config
        .flow_log
        .clone()
        .map(FlowLog::start)
        .transpose()
        .context("starting the flow log writer")?;
    let map_sizes = crate::datapath::MapWriter::capacities(&maps);
    let syncer = Syncer::adopt(maps).context("reading the pinned maps")?;
    let service_sync = ServiceSync::adopt(
        ServiceMaps::from_pins(&config.bpffs_dir.join("maps"))
            .context("opening the pinned Service maps")?,
    )
    .context("reading the pinned Service maps")?;
    // Translation starts with the maps as the last agent left them (pinned): the programs are
    // replaced make-before-break, so connects to Services keep working across a restart.
    let translating = match &config.cgroup {
        Some(cgroup) => {
            datapath.attach_cgroup(cgroup).with_context(|| {
                format!(
                    "attaching the Service translation programs to --cgroup {}",
                    cgroup.display()
                )
            })?;
            tracing::info!(cgroup = %cgroup.display(), "Service translation attached");
            true
        }
        None => false,
    };
    tracing::info!(
        node = %config.node,
        bpffs = %config.bpffs_dir.display(),
        adopted_endpoints = syncer.endpoints().len(),
        generation = syncer.generation(),
        ipcache_entries = map_sizes.ipcache,
        policy_entries = map_sizes.policy,
        endpoints_entries = map_sizes.endpoints,
        conntrack_entries = map_sizes.conntrack,
        "datapath loaded"
    );
    let syncer = Arc::new(Mutex::new(syncer));
    let metrics = Metrics::new().context("creating metrics")?;
    let shared = Arc::new(Shared {
        node: config.node.clone(),
        flows: FlowStore::new(config.flow_buffer),
        flow_log,
        index: RwLock::new(Arc::new(EnrichmentIndex {
            node_name: config.node.as_str().into(),
            ..EnrichmentIndex::default()
        })),
        status: RwLock::new(Status {
            node: config.node.clone(),
            ..Status::default()
        }),
        ready: AtomicBool::new(false),
        metrics,
        counters: Mutex::new(None),
        syncs: AtomicU64::new(0),
        ca,
        certs,
        tunnel: std::sync::OnceLock::new(),
        flow_api: crate::flowapi::FlowApiStats::default(),
        services: RwLock::default(),
        dns_allow: RwLock::default(),
    });
    {
        let syncer = syncer.clone();
        *shared
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(move || {
            let syncer = syncer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let maps = syncer.maps();
            let mut all = maps
                .counters()
                .map(|c| c.to_vec())
                .unwrap_or_else(|_| vec![0; crate::datapath::maps::COUNTERS]);
            all.extend(maps.hostrt_counters().unwrap_or_default());
            all
        }));
    }

    let listener = crate::api::bind(&config.api_socket).await?;
    tokio::spawn(crate::api::serve(listener, shared.clone()));
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {}", config.metrics_addr))?;
    tokio::spawn(crate::metrics::serve(metrics_listener, shared.clone()));
    if let Some(flows) = &config.flow_api {
        let acceptor = crate::flowapi::acceptor(&shared)
            .map_err(anyhow::Error::msg)
            .context("setting up TLS for --flows-addr")?;
        let listener = tokio::net::TcpListener::bind(flows.addr)
            .await
            .with_context(|| format!("binding --flows-addr {}", flows.addr))?;
        tracing::info!(addr = %flows.addr, allow = %flows.allow, "flows port ready (mutual TLS)");
        tokio::spawn(crate::flowapi::serve(
            listener,
            acceptor,
            flows.clone(),
            shared.clone(),
        ));
    }
    tokio::spawn(read_events(events, shared.clone()));
    let tunnel =
        start_tunnel(&config, &mut datapath, &shared).context("starting the mTLS tunnel")?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let (source, _watcher) = match (&config.source, kube_client) {
        (SourceConfig::Manifests(dir), _) => (
            Source::Manifests(ManifestSource::new(dir)),
            Some(watch(dir, tx).context("watching the manifests directory")?),
        ),
        (SourceConfig::Kubernetes { .. }, Some(client)) => (
            Source::Kubernetes(KubernetesSource::start(
                client,
                &config.node,
                tx,
                &KubernetesOptions::default(),
            )),
            None,
        ),
        (SourceConfig::Kubernetes { .. }, None) => unreachable!("the client was created above"),
    };

    let identities_path = config.state_dir.join("identities.json");
    let identities = IdentityAllocator::load(&identities_path)
        .with_context(|| format!("reading {}", identities_path.display()))?;
    // What the last agent learned from DNS stays allowed until its TTLs run out.
    let names_path = config.state_dir.join("dns-names.json");
    let names = crate::dns::cache::NameCache::load(
        &names_path,
        config.dns_cache,
        std::time::Instant::now(),
        std::time::SystemTime::now(),
    )
    .with_context(|| format!("reading {}", names_path.display()))?;
    let mut control = Control {
        source,
        identities,
        compiler: policy::Compiler::default(),
        identities_path,
        identities_saved: None,
        last_good: BTreeMap::new(),
        reported: BTreeSet::new(),
        round: BTreeSet::new(),
        attached_here: BTreeMap::new(),
        underlay_here: BTreeSet::new(),
        underlay: crate::datapath::underlay::UnderlayDevices::default(),
        host_routing: config.host_routing,
        devices: config.devices.clone(),
        resolver: Resolver::default(),
        syncer,
        shared: shared.clone(),
        node: config.node.clone(),
        mtls_default: config.mtls_default,
        mtls_last_good: BTreeMap::new(),
        traffic: crate::http::traffic::Attached::default(),
        tunnel,
        policy_route: false,
        hbone_routes: crate::tunnel::net::HboneRoutes::default(),
        trim_at: None,
        service_sync,
        translating,
        fill_watch: FillWatch::default(),
        map_sizes,
        services_last: None,
        service_index: Arc::default(),
        names,
        names_path,
        last_view: None,
        addresses: HashMap::new(),
        dns_proxied: config.dns_proxy.is_some(),
        last_compiled: None,
        learn_at: None,
        pending_fast: BTreeSet::new(),
        dns_upstream: None,
        live_peers: None,
    };
    control
        .compiler
        .set_learned_names(Arc::new(control.names.learned()));
    let (dns_tx, mut dns_rx) = tokio::sync::mpsc::channel::<LearnRequest>(256);
    if let Some(addr) = config.dns_proxy {
        start_dns_proxy(addr, &mut datapath, &shared, dns_tx)?;
    }
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let mut ct_gc = tokio::time::interval(config.ct_gc_interval);
    ct_gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    'run: loop {
        control.reconcile(&mut datapath);
        settle_heap();
        let resync = tokio::time::sleep(config.resync_interval);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                _ = rx.recv() => {
                    // Let an editor's write-rename-chmod burst settle into one sync.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    while rx.try_recv().is_ok() {}
                    break;
                }
                () = &mut resync => break,
                () = tokio::time::sleep_until(control.trim_at.unwrap_or_else(tokio::time::Instant::now)),
                    if control.trim_at.is_some() => control.trim(),
                Some(req) = dns_rx.recv() => {
                    // The answer waits for this: the maps hold its addresses before the pod
                    // sees it, so its first connection is never dropped.
                    control.learn(&req.answer, &mut datapath);
                    let _ = req.done.send(());
                }
                () = tokio::time::sleep_until(control.learn_at.unwrap_or_else(tokio::time::Instant::now)),
                    if control.learn_at.is_some() => control.learn_settle(&mut datapath),
                _ = expiry.tick() => {
                    if control.expire_names(&datapath) {
                        control.reconcile(&mut datapath);
                    }
                }
                _ = ct_gc.tick() => control.sweep_conntrack(&mut datapath),
                _ = tokio::signal::ctrl_c() => break 'run,
                _ = term.recv() => break 'run,
            }
        }
    }
    if let Some(log) = &shared.flow_log
        && !log.sync(Duration::from_secs(2))
    {
        tracing::warn!("the flow log writer did not catch up before exit");
    }
    tracing::info!("stopping; pinned programs and maps keep enforcing");
    let _ = std::fs::remove_file(&config.api_socket);
    Ok(())
}

/// Starts the tunnel: the `to_proxy` hook in this network namespace, the outbound listeners
/// (handed to the datapath) and the HBONE server; the policy route follows with the first meshed
/// endpoint (`Control::ensure_policy_route`). Any failure stops start-up with what failed: a
/// node that cannot tunnel must not pretend to be in the mesh.
fn start_tunnel(
    config: &AgentConfig,
    datapath: &mut Datapath,
    shared: &Arc<Shared>,
) -> anyhow::Result<Arc<crate::tunnel::Context>> {
    use crate::tunnel;
    let weak = Arc::downgrade(shared);
    let sink: tunnel::FlowSink = Arc::new(move |record: &crate::flows::TunnelRecord| {
        if let Some(shared) = weak.upgrade() {
            let flow = crate::flows::from_tunnel(record, &shared.index());
            shared.record(Arc::new(flow));
        }
    });
    let ctx = Arc::new(tunnel::Context {
        config: config.tunnel.clone(),
        view: RwLock::new(Arc::default()),
        certs: shared.certs.clone(),
        trust: shared.ca.trust(),
        stats: tunnel::TunnelStats::default(),
        flows: sink,
        live: tunnel::inbound::LiveStreams::default(),
        time_wait: tunnel::timewait::Reaper::default(),
        http: crate::http::HttpShared::default(),
        local: std::sync::OnceLock::new(),
    });
    let weak = Arc::downgrade(shared);
    let _ = ctx
        .http
        .flows
        .set(Arc::new(move |record: &crate::http::HttpRecord| {
            if let Some(shared) = weak.upgrade() {
                let flow = crate::flows::from_http(record, &shared.index());
                shared.record(Arc::new(flow));
            }
        }));
    let trace = crate::http::trace::Tracing::new(&config.trace, &config.node)
        .context("starting the OTLP span exporter")?;
    if config.trace.otlp_endpoint.is_some() {
        tracing::info!(endpoint = ?config.trace.otlp_endpoint, sample_rate = config.trace.sample_rate, "HTTP: spans go to the OTLP collector");
    }
    let _ = ctx.http.tracing.set(trace);
    let (v4, v6) = tunnel::outbound::listeners().context("binding the outbound listeners")?;
    let listeners: Vec<(u32, std::net::TcpListener)> =
        std::iter::once((agent_common::mesh::PROXY_SOCKET_V4, v4))
            .chain(v6.map(|l| (agent_common::mesh::PROXY_SOCKET_V6, l)))
            .collect();
    for (slot, listener) in &listeners {
        use std::os::fd::AsFd as _;
        datapath
            .set_proxy_listener(*slot, listener.as_fd())
            .context("handing the outbound listener to the datapath")?;
    }
    datapath
        .attach_to_proxy()
        .context("attaching the to_proxy hook")?;
    // Same-node connections: bytes joined in the kernel, or copied in user space without it.
    match datapath.local_splice() {
        Ok(kernel) => {
            let _ = ctx.local.set(tunnel::local::Kernel::new(kernel));
        }
        Err(e) => tracing::warn!(
            error = %crate::error_chain(&e),
            "same-node tunnel: the kernel redirect (sockmap) is unavailable; same-node connections are copied in user space (nodeward_tunnel_local_total{{path=\"user\"}})"
        ),
    }
    let acceptor = tunnel::inbound::acceptor(&ctx)
        .map_err(|e| anyhow::anyhow!("the HBONE server's TLS: {e}"))?;
    let hbone = tunnel::net::listener(config.tunnel.hbone_addr)
        .with_context(|| format!("binding --hbone-addr {}", config.tunnel.hbone_addr))?;
    let hbone_addr = hbone.local_addr().context("the HBONE listener's address")?;
    tunnel::run(
        ctx.clone(),
        listeners.into_iter().map(|(_, l)| l).collect(),
        hbone,
        acceptor,
    )
    .context("starting the tunnel's thread")?;
    tracing::info!(hbone = %hbone_addr, "mTLS tunnel ready");
    let _ = shared.tunnel.set(ctx.clone());
    Ok(ctx)
}

fn watch(
    dir: &std::path::Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the manifests is an access event too: only changes count, or every sync
        // would trigger the next.
        let changed = event.is_ok_and(|e| {
            matches!(
                e.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Remove(_)
                    | notify::EventKind::Any
            )
        });
        if changed {
            // Full channel: a sync is already pending and will see this change too.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::Recursive)?;
    Ok(watcher)
}

async fn read_events(ring: aya::maps::RingBuf<aya::maps::MapData>, shared: Arc<Shared>) {
    let clock = Clock::new();
    let mut endpoints = crate::flows::Endpoints::new(shared.index());
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf, and
    // always reports that same fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the flow ring buffer; no flows will be recorded");
            return;
        }
    };
    // The datapath wakes us only when the ring is filling up (see `emit` in agent-ebpf); a
    // short tick drains it otherwise, so a flow shows up within this delay.
    let mut tick = tokio::time::interval(EVENTS_DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let woken = tokio::select! {
            ready = fd.readable_mut() => match ready {
                Ok(guard) => Some(guard),
                Err(e) => {
                    tracing::error!(error = %e, "polling the flow ring buffer failed");
                    return;
                }
            },
            _ = tick.tick() => None,
        };
        if let Some(mut guard) = woken {
            guard.clear_ready();
        }
        endpoints.use_index(&shared.index());
        let ring = fd.get_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<agent_common::FlowEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a FlowEvent (checked size); read_unaligned copes with
            // the ring's 8-byte alignment of records.
            let event: agent_common::FlowEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            shared.record(Arc::new(crate::flows::from_event(
                &event,
                &mut endpoints,
                &clock,
            )));
        }
    }
}

/// The ipcache as the datapath gets it: each prefix's identity, `IPCACHE_MESHED` on the
/// addresses of pods in the mesh (traffic to them is tunnelled) and `IPCACHE_POD` on every
/// pod's (eBPF host routing sends only traffic to pods past the node's stack).
fn ipcache_values(
    compiled: &policy::CompiledState,
    meshed: &std::collections::HashMap<IpAddr, bool>,
) -> BTreeMap<ipnet::IpNet, agent_common::IpcacheValue> {
    compiled
        .ipcache
        .iter()
        .map(|(net, identity)| {
            let host = net.prefix_len() == net.max_prefix_len();
            let meshed = host && meshed.get(&net.addr().to_canonical()) == Some(&true);
            let mut flags = if meshed {
                agent_common::IPCACHE_MESHED
            } else {
                0
            };
            // A pod's address: allocated identity, not one the DNS proxy learned.
            if host
                && *identity >= agent_common::IDENTITY_FIRST_ALLOCATED
                && !compiled.fqdn_identities.contains_key(identity)
            {
                flags |= agent_common::IPCACHE_POD;
            }
            (
                *net,
                agent_common::IpcacheValue {
                    identity: *identity,
                    flags,
                },
            )
        })
        .collect()
}

/// A pod as flows name it: namespace, name and its labels in Hubble's form.
fn address_info(
    r: &policy::ObjectRef,
    pod: &k8s_openapi::api::core::v1::Pod,
    namespace: Arc<str>,
) -> AddressInfo {
    AddressInfo {
        namespace,
        pod_name: r.name.as_str().into(),
        labels: pod
            .metadata
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| format!("k8s:{k}={v}"))
            .chain(std::iter::once(format!(
                "k8s:io.kubernetes.pod.namespace={}",
                r.namespace
            )))
            .collect(),
    }
}

/// Every pod address of the inventory, for flows: an address two pods claim names the last in
/// key order.
fn pod_addresses(inv: &Inventory) -> HashMap<IpAddr, AddressInfo> {
    let mut addresses = HashMap::with_capacity(inv.pods.len());
    let mut namespace: Arc<str> = Arc::default();
    for (r, pod) in &inv.pods {
        let ips = crate::tunnel::view::pod_ips(pod);
        if ips.is_empty() {
            continue;
        }
        // Pods come sorted by namespace: one copy of each namespace's name.
        if *namespace != *r.namespace {
            namespace = r.namespace.as_str().into();
        }
        let info = address_info(r, pod, namespace.clone());
        for ip in ips {
            addresses.insert(ip, info.clone());
        }
    }
    addresses
}

/// [`pod_addresses`] for when only the pods of `changes` (key, previous version) changed since
/// `addresses` was made.
fn patch_addresses(
    addresses: &mut HashMap<IpAddr, AddressInfo>,
    inv: &Inventory,
    changes: &[policy::PodChange],
) {
    let names = |info: &AddressInfo, r: &policy::ObjectRef| {
        *info.namespace == *r.namespace && *info.pod_name == *r.name
    };
    let mut vacated = BTreeSet::new();
    for (r, old) in changes {
        for ip in old.iter().flat_map(|p| crate::tunnel::view::pod_ips(p)) {
            if addresses.get(&ip).is_some_and(|info| names(info, r)) {
                addresses.remove(&ip);
                vacated.insert(ip);
            }
        }
    }
    // In key order: the last claimant of an address keeps it.
    for (r, _) in changes {
        let Some(pod) = inv.pods.get(r) else {
            continue;
        };
        let info = address_info(r, pod, r.namespace.as_str().into());
        for ip in crate::tunnel::view::pod_ips(pod) {
            let held_by_later = addresses.get(&ip).is_some_and(|held| {
                (&*held.namespace, &*held.pod_name) > (r.namespace.as_str(), r.name.as_str())
            });
            if !held_by_later {
                addresses.insert(ip, info.clone());
            }
        }
    }
    // An address a changed pod gave up may have another claimant, before or after any changed
    // pod that claims it now.
    if !vacated.is_empty() {
        for (r, pod) in &inv.pods {
            for ip in crate::tunnel::view::pod_ips(pod) {
                if vacated.contains(&ip) {
                    addresses.insert(ip, address_info(r, pod, r.namespace.as_str().into()));
                }
            }
        }
    }
}

/// Sorts what the last reconciliation freed into glibc's bins now, while nothing waits for it.
/// Its frees sit in the fast bins until a request above the small sizes makes malloc consolidate
/// them, and the next reconciliation's first such request (at 1,000 pods, `opendir`'s 32 KiB
/// buffer in `load`) paid for that on the way to enforcing a change: `load` 2.0-2.15 -> 1.44-1.55
/// ms (medians) in the lab. Memory is not given back here: that is [`Control::trim`], after
/// changes stop.
fn settle_heap() {
    // Above the small-bin sizes and below the mmap threshold: served from the arena.
    drop(std::hint::black_box(Vec::<u8>::with_capacity(64 * 1024)));
}

/// How often the flow reader drains the ring without a wakeup.
const EVENTS_DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// How long the policy must stay unchanged before the agent returns freed memory.
const TRIM_AFTER_IDLE: Duration = Duration::from_secs(2);

/// A policy's last good translation and the object it came from. The source hands out the same
/// `Arc` until the object changes, so an unchanged policy is not translated again.
struct Translated {
    from: Arc<dyn std::any::Any + Send + Sync>,
    model: PolicyModel,
}

/// Times the steps of one reconciliation.
struct Phases {
    started: Instant,
    last: Instant,
    done: Vec<(&'static str, f64)>,
}

impl Phases {
    fn start() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            done: Vec::new(),
        }
    }

    /// Ends the step named `name` (it began where the previous one ended).
    fn end(&mut self, name: &'static str) {
        let now = Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1000.0;
        self.done.push((name, (ms * 1000.0).round() / 1000.0));
        self.last = now;
    }
}

struct Control {
    source: Source,
    identities: IdentityAllocator,
    /// Reuses what the last compilation derived from objects that have not changed.
    compiler: policy::Compiler,
    identities_path: PathBuf,
    /// The allocator revision `identities_path` holds, to write it only when it changes.
    identities_saved: Option<u64>,
    /// The last version of each policy that translated cleanly, by `Kind ns/name`.
    last_good: BTreeMap<String, Translated>,
    /// Error lines already logged, so each is reported once.
    reported: BTreeSet<String>,
    /// Error lines of the current reconciliation.
    round: BTreeSet<String>,
    /// Interfaces this run attached its programs to (by name, with the ifindex they had).
    /// Programs pinned by an earlier agent are replaced once by this run's (an upgrade).
    attached_here: BTreeMap<String, u32>,
    /// Underlay devices this run attached `from_underlay` to (eBPF host routing).
    underlay_here: BTreeSet<String>,
    underlay: crate::datapath::underlay::UnderlayDevices,
    host_routing: bool,
    devices: Vec<String>,
    resolver: Resolver,
    syncer: Arc<Mutex<Syncer<PinnedMaps>>>,
    shared: Arc<Shared>,
    node: String,
    mtls_default: policy::crd::MutualTlsMode,
    /// The last version of each MutualTLS that translated cleanly, by `MutualTLS ns/name`.
    mtls_last_good: BTreeMap<String, policy::mtls::MtlsModel>,
    /// The `TrafficPolicy`s in force (an invalid one keeps its last good version).
    traffic: crate::http::traffic::Attached,
    tunnel: Arc<crate::tunnel::Context>,
    /// The tunnel's policy route is in place (see [`Control::ensure_policy_route`]).
    policy_route: bool,
    /// Delivery of local pods' `podIP:15008` to the HBONE server (see
    /// [`Control::sync_hbone_routes`]).
    hbone_routes: crate::tunnel::net::HboneRoutes,
    /// When to [`Control::trim`]: [`TRIM_AFTER_IDLE`] after the last sync that changed
    /// something (a resync that changes nothing does not postpone it).
    trim_at: Option<tokio::time::Instant>,
    /// The Service translation maps.
    service_sync: ServiceSync<ServiceMaps>,
    /// The translation programs are attached (`--cgroup` given).
    translating: bool,
    /// Which maps are past the fill warning mark (each crossing is logged and counted once).
    fill_watch: FillWatch,
    /// The kernel's sizes of the maps, for the status.
    map_sizes: MapSizes,
    /// What the last service table that reached the maps was built from, and its status.
    services_last: Option<(ServiceInputs, ServicesStatus)>,
    /// Flows' `destination_service` lookup, rebuilt when the service table is.
    service_index: Arc<crate::flows::ServiceIndex>,
    /// What the DNS proxy learned (names to addresses with expiries).
    names: crate::dns::cache::NameCache,
    /// Where `names` is saved after each change (`--state-dir`/dns-names.json).
    names_path: std::path::PathBuf,
    /// The last mesh view built and the modes it was built with, for the next to patch.
    last_view: Option<(
        Arc<crate::tunnel::MeshView>,
        BTreeMap<policy::ObjectRef, policy::MeshMode>,
    )>,
    /// The flows' pod by address, as of the last compilation (patched with its pod changes).
    addresses: HashMap<IpAddr, AddressInfo>,
    /// `--dns-proxy-addr` is set: the datapath is told the proxy's upstream.
    dns_proxied: bool,
    /// The last compiled state the maps hold (for the DNS fast path).
    last_compiled: Option<Arc<policy::CompiledState>>,
    /// When the reconcile that the DNS fast path put off is due.
    learn_at: Option<tokio::time::Instant>,
    /// Addresses the fast path wrote since the last compile.
    pending_fast: BTreeSet<IpAddr>,
    /// The upstream last written to the datapath (`Some(None)`: none known).
    dns_upstream: Option<Option<SocketAddr>>,
    /// When conntrack was last read for live connections, and the learned addresses they
    /// were to (see [`Control::expire_names`]).
    live_peers: Option<(std::time::Instant, std::collections::BTreeSet<IpAddr>)>,
}

/// Flows' lookups of a Service: by the frontend a connection dialled, and by a backend that
/// serves one Service only (one name per Service, shared).
fn service_index(table: &crate::services::ServiceTable) -> crate::flows::ServiceIndex {
    let mut names: BTreeMap<policy::ObjectRef, Arc<crate::flows::ServiceName>> = BTreeMap::new();
    let mut name = |r: &policy::ObjectRef| {
        names
            .entry(r.clone())
            .or_insert_with_key(|r| {
                Arc::new(crate::flows::ServiceName {
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                })
            })
            .clone()
    };
    let frontends = table
        .ports
        .values()
        .map(|p| {
            let f = p.frontend;
            ((f.addr, f.port, f.protocol.number()), name(&p.service))
        })
        .collect();
    let backends = table
        .backend_index()
        .into_iter()
        .map(|(backend, service)| (backend, name(&service)))
        .collect();
    crate::flows::ServiceIndex {
        frontends,
        backends,
    }
}

/// The objects a service table is built from (Services, EndpointSlices, and Pods for named
/// target ports), held so that an unchanged object is recognised by its allocation (`Arc`):
/// holding them keeps a freed object's address from being reused by a new one.
struct ServiceInputs {
    services: Vec<Arc<k8s_openapi::api::core::v1::Service>>,
    slices: Vec<Arc<k8s_openapi::api::discovery::v1::EndpointSlice>>,
    pods: Vec<Arc<k8s_openapi::api::core::v1::Pod>>,
}

impl ServiceInputs {
    fn of(inv: &Inventory) -> Self {
        Self {
            services: inv.services.values().cloned().collect(),
            slices: inv.endpoint_slices.values().cloned().collect(),
            pods: inv.pods.values().cloned().collect(),
        }
    }

    fn same(&self, other: &Self) -> bool {
        fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
        }
        same(&self.services, &other.services)
            && same(&self.slices, &other.slices)
            && same(&self.pods, &other.pods)
    }
}

impl Control {
    /// Records an answer's addresses and makes the kernel allow them; the answer may be
    /// released when this returns. A new address whose FQDN identity the maps already have
    /// (another address of the same selectors was learned before) is written straight into
    /// the ipcache, and the full reconcile (and the save) is left to `learn_at`, shortly after;
    /// otherwise the reconcile runs now.
    fn learn(&mut self, answer: &crate::dns::Answer, datapath: &mut Datapath) {
        let now = std::time::Instant::now();
        let mut new = Vec::new();
        for name in &answer.names {
            for &(ip, ttl) in &answer.addresses {
                if self.names.learn(name, ip, ttl, now) {
                    new.push(ip);
                }
            }
        }
        if new.is_empty() {
            return;
        }
        if self.learn_fast(&answer.names, &new) {
            self.pending_fast.extend(new);
            self.learn_at
                .get_or_insert_with(|| tokio::time::Instant::now() + LEARN_SETTLE);
            return;
        }
        self.learn_settle(datapath);
    }

    /// The full path after learning: the compiler gets the names, the maps the compile, the
    /// state file the names.
    fn learn_settle(&mut self, datapath: &mut Datapath) {
        self.learn_at = None;
        self.pending_fast.clear();
        self.compiler
            .set_learned_names(Arc::new(self.names.learned()));
        self.reconcile(datapath);
        self.save_names();
    }

    /// The fast path of [`Control::learn`]: whether every address of `new` is now allowed
    /// as the next compile will allow it, by direct ipcache writes.
    fn learn_fast(&self, names: &[String], new: &[IpAddr]) -> bool {
        let Some(compiled) = &self.last_compiled else {
            return false;
        };
        let selectors: BTreeSet<&crate::policy::fqdn::FqdnMatch> = self
            .last_good
            .values()
            .flat_map(|t| &t.model.rules)
            .flat_map(|r| &r.peers)
            .filter_map(|p| match p {
                policy::model::Peer::Fqdn(m) => Some(m),
                _ => None,
            })
            .collect();
        // The selectors the answer's names satisfy. An address the last compile did not see
        // has no other names that matter: those it had then matched no selector (it would be
        // in the ipcache), and one learned since through this path is sent to the full path.
        let matched: BTreeSet<&crate::policy::fqdn::FqdnMatch> = selectors
            .iter()
            .copied()
            .filter(|m| names.iter().any(|n| m.matches(n)))
            .collect();
        if matched.is_empty() {
            // No toFQDNs selector takes them: nothing to allow.
            return true;
        }
        let id = compiled
            .fqdn_identities
            .iter()
            .find(|(_, set)| set.len() == matched.len() && set.iter().all(|m| matched.contains(m)))
            .map(|(id, _)| *id);
        let mut writes = Vec::new();
        for &ip in new {
            let net = ipnet::IpNet::from(ip);
            if self.pending_fast.contains(&ip) {
                return false;
            }
            match (id, compiled.ipcache.get(&net)) {
                (Some(id), None) => writes.push((net, id)),
                // Already allowed for at least these selectors.
                (_, Some(have))
                    if compiled
                        .fqdn_identities
                        .get(have)
                        .is_some_and(|set| matched.iter().all(|m| set.contains(*m))) => {}
                // A new set of selectors, or a pod's or node's address: the full path.
                _ => return false,
            }
        }
        let mut syncer = self
            .syncer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (net, identity) in writes {
            let value = agent_common::IpcacheValue { identity, flags: 0 };
            if let Err(e) = syncer.put_ipcache_entry(net, value) {
                tracing::warn!(error = %e, "writing a learned address to the ipcache failed");
                return false;
            }
        }
        true
    }

    /// Saves the learned names for the next agent.
    fn save_names(&self) {
        if let Err(e) = self.names.save(
            &self.names_path,
            std::time::Instant::now(),
            std::time::SystemTime::now(),
        ) {
            tracing::warn!(path = %self.names_path.display(), error = %e, "saving the DNS names failed");
        }
    }

    /// Drops the learned addresses whose TTL ran out, except those a selected pod still has a
    /// live connection to (conntrack, see [`live_peers`]); whether anything was dropped.
    /// Conntrack is read only when an address has expired, and at most every
    /// [`LIVE_RECHECK`] while the expired ones are all held by live connections.
    fn expire_names(&mut self, datapath: &Datapath) -> bool {
        let now = std::time::Instant::now();
        let expired = self.names.expired(now);
        if expired.is_empty() {
            return false;
        }
        let recent = self.live_peers.as_ref().is_some_and(|(at, live)| {
            now.duration_since(*at) < LIVE_RECHECK && expired.is_subset(live)
        });
        if !recent {
            let proxied = self
                .shared
                .dns_allow
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let live = match datapath.maps().conntrack() {
                Ok(flows) => live_peers(&flows, |ip| proxied.contains_key(&ip), monotonic_s()),
                Err(e) => {
                    // Without conntrack, keep what expired rather than cut connections.
                    tracing::warn!(error = %e, "reading conntrack for live connections failed");
                    expired.clone()
                }
            };
            self.live_peers = Some((now, live));
        }
        let live = self.live_peers.as_ref().map(|(_, l)| l);
        let dropped = self
            .names
            .expire(now, |ip| live.is_some_and(|l| l.contains(&ip)));
        if dropped {
            tracing::debug!(
                expired = expired.len(),
                held = live.map_or(0, |l| expired.intersection(l).count()),
                "DNS-learned addresses expired; those held by a live connection stay"
            );
            self.names_changed();
        }
        dropped
    }

    /// One sweep of the conntrack garbage collector (see `PinnedMaps::sweep_conntrack`), into
    /// the metrics and the status.
    fn sweep_conntrack(&mut self, datapath: &mut Datapath) {
        let swept = datapath.maps_mut().sweep_conntrack(monotonic_s());
        let mut status = self
            .shared
            .status
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gc = status.conntrack_gc.get_or_insert_with(Default::default);
        match swept {
            Ok(stats) => {
                self.shared.metrics.observe_ct_gc(&stats);
                tracing::debug!(
                    scanned = stats.scanned,
                    removed = stats.removed,
                    micros = u64::try_from(stats.duration.as_micros()).unwrap_or(u64::MAX),
                    "conntrack swept"
                );
                gc.runs += 1;
                gc.entries = stats.scanned - stats.removed;
                gc.last = stats;
                gc.error = None;
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "conntrack garbage collection failed");
                gc.error = Some(error_chain(&e));
            }
        }
    }

    /// Tells the datapath which resolver the DNS proxy forwards to (when it changed).
    fn sync_dns_upstream(&mut self, datapath: &mut Datapath) {
        if !self.dns_proxied {
            return;
        }
        let upstream = dns_upstream(&self.shared);
        if self.dns_upstream == Some(upstream) {
            return;
        }
        match datapath.set_dns_upstream(upstream) {
            Ok(()) => self.dns_upstream = Some(upstream),
            Err(e) => self.report(format!("naming the DNS upstream: {}", error_chain(&e))),
        }
    }

    /// Hands the learned names to the compiler and saves them for the next agent.
    fn names_changed(&mut self) {
        self.compiler
            .set_learned_names(Arc::new(self.names.learned()));
        self.save_names();
    }

    /// The proxied pods' DNS allow lists, for the DNS proxy.
    fn publish_dns_allow(&self, compiled: &policy::CompiledState) {
        let mut allow = std::collections::HashMap::new();
        for ep in compiled.endpoints.values() {
            if let Some(dns) = &ep.dns {
                for ip in [ep.ipv4.map(IpAddr::V4), ep.ipv6.map(IpAddr::V6)]
                    .into_iter()
                    .flatten()
                {
                    allow.insert(ip, dns.clone());
                }
            }
        }
        *self
            .shared
            .dns_allow
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(allow);
    }

    /// Installs the tunnel's policy route (`tunnel::net::ensure_policy_route`) once some local
    /// endpoint is in the mesh, and keeps it from then on (live tunnelled connections need it).
    /// Not at start-up: once a network namespace has a routing rule of its own, the kernel
    /// looks every route up through the rules, and no longer merges its local and main
    /// tables, a cost every forwarded packet pays, mesh or not. A failure fails the sync, so
    /// the maps never steer a connection to a listener no route delivers it to.
    fn ensure_policy_route(&mut self, compiled: &policy::CompiledState) -> Result<(), String> {
        if self.policy_route || !compiled.endpoints.values().any(|e| e.mesh.meshed()) {
            return Ok(());
        }
        crate::tunnel::net::ensure_policy_route().map_err(|e| e.to_string())?;
        tracing::info!("tunnel policy route installed (the first meshed endpoint)");
        self.policy_route = true;
        Ok(())
    }

    /// Hands port 15008 of every local pod to the HBONE server (`tunnel::net::HboneRoutes`),
    /// so peers can dial the pod's own address as ambient does. The rule goes in with the first
    /// meshed pod anywhere in the cluster (a peer dials only a pod it knows as meshed), for the
    /// same cost reason as [`Control::ensure_policy_route`], and stays; the routes follow every
    /// local pod with an identity, meshed or not, so a mesh change never races a peer's dial.
    ///
    /// `changed`: the addresses of the pods that changed since the last call (old and new
    /// addresses), or `None` when that is not known; only those are looked up while the table
    /// is in step, so a sync costs its changes, not the cluster's pods.
    fn sync_hbone_routes(&mut self, changed: Option<&[std::net::IpAddr]>) {
        if self.tunnel.config.dial != crate::tunnel::HboneDial::Pod {
            self.hbone_routes.clear_once();
            return;
        }
        let view = self.tunnel.view();
        if !self.hbone_routes.active() {
            if !view.workloads.values().any(|w| w.mode.meshed()) {
                return;
            }
            if let Err(e) = self
                .hbone_routes
                .ensure_rule(self.tunnel.config.hbone_addr.port())
            {
                self.report(e.to_string());
                return;
            }
            tracing::info!("HBONE rule installed: local pods' port 15008 goes to the agent");
        }
        let errors = match changed.filter(|_| self.hbone_routes.in_step()) {
            Some(changed) => self.hbone_routes.update(
                changed
                    .iter()
                    .map(|ip| (*ip, view.workloads.get(ip).is_some_and(|w| w.local))),
            ),
            None => {
                let pods: BTreeSet<std::net::IpAddr> = view
                    .workloads
                    .iter()
                    .filter(|(_, w)| w.local)
                    .map(|(ip, _)| *ip)
                    .collect();
                self.hbone_routes.sync(&pods)
            }
        };
        for e in errors {
            self.report(e.to_string());
        }
    }

    /// Gives the memory a compile freed back to the system. glibc keeps freed memory in its
    /// arenas unless asked, and the agent's steady state is far smaller than its peak. Only once
    /// changes have stopped for [`TRIM_AFTER_IDLE`]: the next compile pays a page fault for every
    /// page it touches again, which a burst of changes would pay on each one (at 1,000 pods that
    /// was a third of the time from a manifest change to enforcement).
    fn trim(&mut self) {
        // SAFETY: malloc_trim only releases free memory; it has no preconditions.
        unsafe { libc::malloc_trim(0) };
        self.trim_at = None;
    }

    fn report(&mut self, line: String) {
        self.round.insert(line.clone());
        if self.reported.insert(line.clone()) {
            tracing::error!("{line}");
        }
    }

    fn reconcile(&mut self, datapath: &mut Datapath) {
        if !self.source.synced() {
            // Not everything has been listed yet: syncing now would take enforcement away
            // from what is not read yet. The pinned state keeps enforcing meanwhile.
            self.shared
                .status
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .source = self.source.status();
            return;
        }
        let mut phases = Phases::start();
        let loaded = self.source.load();
        phases.end("load");
        self.round.clear();
        let manifest_errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        for line in &manifest_errors {
            self.report(line.clone());
        }
        let inv = loaded.inventory;
        let mut failures = self.translate_policies(&inv);
        phases.end("translate");

        let mut compiled = self.compiler.compile(
            &self.node,
            &inv,
            self.last_good.values().map(|t| &t.model),
            &mut self.identities,
        );
        phases.end("compile");
        let modes = self.mesh_modes(&inv, &mut failures);
        for (pod, ep) in &mut compiled.endpoints {
            ep.mesh = modes.get(pod).copied().unwrap_or_default();
        }
        let compiled = Arc::new(compiled);
        self.publish_dns_allow(&compiled);
        let meshed =
            crate::tunnel::MeshView::meshed_addresses(self.shared.ca.trust_domain(), &inv, &modes);
        let ipcache = ipcache_values(&compiled, &meshed);
        phases.end("modes");

        let mut endpoints = Vec::new();
        let mut desired = BTreeMap::new();
        let mut interfaces = BTreeMap::new();
        for (pod, ep) in &compiled.endpoints {
            let addr = ep.ipv4.map(IpAddr::V4).or(ep.ipv6.map(IpAddr::V6));
            let mut status = EndpointStatus {
                pod: pod.to_string(),
                identity: ep.identity,
                ..EndpointStatus::default()
            };
            match addr.map(|a| self.resolver.resolve(a)) {
                Some(Ok(iface)) => {
                    status.ifindex = iface.ifindex;
                    status.interface.clone_from(&iface.name);
                    desired.insert(iface.ifindex, ep);
                    interfaces.insert(iface.ifindex, iface.name);
                }
                Some(Err(e)) => status.error = Some(e.to_string()),
                None => status.error = Some("the pod has no IP yet".into()),
            }
            endpoints.push(status);
        }
        let addrs: BTreeSet<IpAddr> = compiled
            .endpoints
            .values()
            .flat_map(|e| [e.ipv4.map(IpAddr::V4), e.ipv6.map(IpAddr::V6)])
            .flatten()
            .collect();
        self.resolver.retain(|a| addrs.contains(a));
        phases.end("endpoints");

        let syncer_handle = self.syncer.clone();
        let mut syncer = syncer_handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The tunnel's policy route goes in before the maps name the first meshed endpoint.
        let result = self.ensure_policy_route(&compiled).and_then(|()| {
            syncer
                .apply(&desired, &ipcache, &compiled.policy_cidrs)
                .map_err(|e| match e {
                    e @ SyncError::Overflow { .. } => format!("policy set rejected: {e}"),
                    e => format!("writing the datapath maps failed: {e}"),
                })
        });
        phases.end("maps");
        match &result {
            Ok(stats) => {
                self.shared.metrics.observe_sync(stats.duration);
                if stats.changed() {
                    tracing::info!(
                        generation = stats.generation,
                        added = stats.policy_added,
                        removed = stats.policy_removed,
                        ipcache = stats.ipcache_changed,
                        endpoints = stats.endpoints_changed,
                        switched = stats.policy_sets_switched,
                        micros = u64::try_from(stats.duration.as_micros()).unwrap_or(u64::MAX),
                        "policy synced"
                    );
                }
            }
            Err(line) => self.report(line.clone()),
        }
        // Programs go on only where the maps already know the endpoint (else its packets
        // would be dropped as unknown), and come off only once the maps forgot it.
        let in_maps: BTreeSet<u32> = syncer.endpoints().keys().copied().collect();
        let fill = syncer.fill();
        let generation = syncer.generation();
        drop(syncer);
        for (map, entries, capacity) in self.fill_watch.crossed(&fill) {
            tracing::warn!(
                map,
                entries,
                capacity,
                flag = crate::datapath::sync::size_flag(map),
                "datapath map is 90% full: a change that does not fit will be rejected whole; raise its size"
            );
            self.shared.metrics.map_fill_warning(map);
        }
        for status in &mut endpoints {
            if !in_maps.contains(&status.ifindex) || status.ifindex == 0 {
                continue;
            }
            if self.attached_here.get(&status.interface) == Some(&status.ifindex) {
                status.attached = true;
                continue;
            }
            match datapath.attach(status.ifindex, &status.interface) {
                Ok(()) => {
                    status.attached = true;
                    self.attached_here
                        .insert(status.interface.clone(), status.ifindex);
                    tracing::info!(pod = %status.pod, interface = %status.interface, "programs attached");
                }
                Err(e) => {
                    let line = format!(
                        "attaching to {} ({}): {}",
                        status.interface,
                        status.pod,
                        error_chain(&e)
                    );
                    self.report(line.clone());
                    status.error = Some(line);
                }
            }
        }
        let wanted: BTreeSet<&str> = interfaces
            .iter()
            .filter(|(i, _)| in_maps.contains(i))
            .map(|(_, n)| n.as_str())
            .collect();
        for name in datapath.attached().unwrap_or_default() {
            if !wanted.contains(name.as_str()) && result.is_ok() {
                match datapath.detach(&name) {
                    Ok(()) => {
                        self.attached_here.remove(&name);
                        tracing::info!(interface = %name, "programs detached");
                    }
                    Err(e) => self.report(format!("detaching from {name}: {}", error_chain(&e))),
                }
            }
        }
        // The previous programs are gone from every endpoint now: what they recorded in a
        // conntrack this start resized is copied over once more (`datapath::migrate`).
        if result.is_ok() && datapath.migrating() {
            match datapath.finish_migrations() {
                Ok(flows) => tracing::info!(flows, "resized conntrack caught up"),
                Err(e) => self.report(format!("resizing conntrack: {}", error_chain(&e))),
            }
        }
        self.sync_underlay(datapath, &inv, &wanted);
        phases.end("attach");
        let mut services = self.sync_services(&inv);
        self.sync_dns_upstream(datapath);
        self.last_compiled = result.is_ok().then(|| compiled.clone());
        phases.end("services");
        // The tunnel's view of this state; it answers from it once the kernel enforces it.
        // Built after the maps are written: nothing in the kernel waits for it.
        // Patched where only pods changed since the last one (`Compiler::pod_changes`).
        let base = self
            .last_view
            .take()
            .filter(|(_, last_modes)| *last_modes == modes);
        let mut view = match (base, self.compiler.pod_changes()) {
            (Some((base, _)), Some(changes)) => base.patch(
                &self.node,
                self.shared.ca.trust_domain(),
                &inv,
                compiled.clone(),
                &modes,
                changes,
            ),
            _ => crate::tunnel::MeshView::build(
                &self.node,
                self.shared.ca.trust_domain(),
                &inv,
                compiled.clone(),
                &modes,
            ),
        };
        view.http = self.sync_routes(&inv, &mut failures, &mut services);
        let view = Arc::new(view);
        self.last_view = Some((view.clone(), modes));
        phases.end("view");
        // Written (and fsynced) only when an identity was allocated or released: most syncs
        // change policy, not identities.
        let revision = self.identities.revision();
        if self.identities_saved != Some(revision) {
            match self.identities.save(&self.identities_path) {
                Ok(()) => self.identities_saved = Some(revision),
                Err(e) => self.report(format!("saving {}: {e}", self.identities_path.display())),
            }
        }
        self.ensure_certificates(&inv, &compiled);
        phases.end("identities");
        if result.as_ref().is_ok_and(SyncStats::changed) {
            self.trim_at = Some(tokio::time::Instant::now() + TRIM_AFTER_IDLE);
        }
        // Forget what no longer fails, so it is reported again if it breaks again.
        let round = std::mem::take(&mut self.round);
        self.reported.retain(|l| round.contains(l));
        self.report_policies(&inv, &failures, result.as_ref().err());
        let synced = result.is_ok();
        // The addresses whose pods changed (old and new), for the HBONE routes.
        let changed_addresses: Option<Vec<std::net::IpAddr>> =
            self.compiler.pod_changes().map(|changes| {
                changes
                    .iter()
                    .flat_map(|(key, old)| {
                        old.iter()
                            .map(|p| p.as_ref())
                            .chain(inv.pods.get(key).map(|p| p.as_ref()))
                            .flat_map(crate::tunnel::view::pod_ips)
                    })
                    .collect()
            });
        match self.compiler.pod_changes() {
            Some(changes) => patch_addresses(&mut self.addresses, &inv, changes),
            None => self.addresses = pod_addresses(&inv),
        }
        self.publish(
            &self.addresses,
            &compiled,
            endpoints,
            failures,
            manifest_errors,
            fill,
            generation,
            &result,
            phases,
            services,
        );
        // After publish: the connections a change revokes are recorded as flows, which name
        // their rule through the index publish just replaced.
        if synced {
            self.tunnel.set_shared_view(view);
            self.sync_hbone_routes(changed_addresses.as_deref());
        } else {
            // The next sync's changes are counted from this one, which the routes did not follow.
            self.hbone_routes.lose_step();
        }
        if synced && !self.shared.ready.swap(true, Ordering::SeqCst) {
            tracing::info!(node = %self.node, "first sync done: ready");
        }
    }

    /// Builds the Service table and writes its difference to the translation maps. A bad field
    /// costs only its port or endpoint; a table that would overflow the maps is refused whole
    /// and the previous one keeps translating.
    /// Attaches `from_underlay` to the underlay devices with eBPF host routing on (once per
    /// run, replacing an earlier agent's program make-before-break), and detaches it where it
    /// is no longer wanted or host routing is off.
    fn sync_underlay(
        &mut self,
        datapath: &mut Datapath,
        inv: &Inventory,
        workload: &BTreeSet<&str>,
    ) {
        let wanted: BTreeSet<String> = if !self.host_routing {
            BTreeSet::new()
        } else if !self.devices.is_empty() {
            self.devices.iter().cloned().collect()
        } else {
            let remote = inv.pods.values().filter_map(|pod| {
                let node = pod.spec.as_ref()?.node_name.as_deref()?;
                if node == self.node {
                    return None;
                }
                let ips = crate::tunnel::view::pod_ips(pod);
                Some(ips.into_iter().map(move |ip| (node, ip)))
            });
            self.underlay.discover(remote.flatten(), workload)
        };
        for dev in &wanted {
            if self.underlay_here.contains(dev) {
                continue;
            }
            match datapath.attach_underlay(dev) {
                Ok(()) => {
                    self.underlay_here.insert(dev.clone());
                    tracing::info!(device = %dev, "host routing: underlay program attached");
                }
                Err(e) => self.report(format!(
                    "attaching host routing to underlay device {dev}: {}",
                    error_chain(&e)
                )),
            }
        }
        for dev in datapath.underlay_attached().unwrap_or_default() {
            if wanted.contains(&dev) {
                continue;
            }
            match datapath.detach_underlay(&dev) {
                Ok(()) => {
                    self.underlay_here.remove(&dev);
                    tracing::info!(device = %dev, "host routing: underlay program detached");
                }
                Err(e) => self.report(format!(
                    "detaching host routing from {dev}: {}",
                    error_chain(&e)
                )),
            }
        }
    }

    fn sync_services(&mut self, inv: &Inventory) -> ServicesStatus {
        let inputs = ServiceInputs::of(inv);
        if let Some((last, status)) = &self.services_last
            && last.same(&inputs)
        {
            // Nothing the table is built from changed, and the maps took it: a resync of a
            // thousand Services costs a comparison of pointers, not a rebuild.
            let status = status.clone();
            for line in &status.errors {
                self.report(line.clone());
            }
            return status;
        }
        let (table, errors) = crate::services::build(inv, &self.node);
        let mut status = ServicesStatus {
            services: table.service_count(),
            frontends: table.ports.len(),
            backends: table.backend_count(),
            without_backends: table
                .ports
                .values()
                .filter(|p| p.backends().is_empty())
                .count(),
            not_translated: table.skipped.len(),
            translating: self.translating,
            ..ServicesStatus::default()
        };
        for e in &errors {
            let file = inv
                .origins
                .get(&e.object)
                .map(|p| format!("{}: ", p.display()))
                .unwrap_or_default();
            let line = format!("{file}{e} (the rest of the object applies)");
            self.report(line.clone());
            status.errors.push(line);
        }
        let kernel = crate::services::sync::kernel_table(&table);
        match self.service_sync.apply(&kernel) {
            Ok(stats) => {
                if stats.changed() {
                    tracing::info!(
                        frontends = kernel.len(),
                        written = stats.frontends_written,
                        removed = stats.frontends_removed,
                        slots_written = stats.slots_written,
                        slots_removed = stats.slots_removed,
                        "services synced"
                    );
                }
                self.service_index = Arc::new(service_index(&table));
                *self
                    .shared
                    .services
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
            }
            Err(e) => {
                let line = format!("service table rejected: {e}");
                self.report(line.clone());
                status.sync_error = Some(line);
            }
        }
        self.services_last = status
            .sync_error
            .is_none()
            .then(|| (inputs, status.clone()));
        status
    }

    /// The HTTP ports and their `HTTPRoute`s, against the Service table the kernel translates
    /// with. A bad field costs its match or rule and is reported with its file; the routes'
    /// conditions go to `status`. A `TrafficPolicy` with a bad field is a failure
    /// (`status.policies.failed`, its status in a cluster) and its last good version stays in
    /// force.
    fn sync_routes(
        &mut self,
        inv: &Inventory,
        failures: &mut Vec<Failure>,
        status: &mut ServicesStatus,
    ) -> Arc<crate::http::RouteTable> {
        let services = self
            .shared
            .services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let traffic = self.traffic.update(&inv.traffic_policies, &inv.services);
        let mut table = crate::http::RouteTable::build_with(
            &inv.services,
            &inv.http_routes,
            traffic.by_service,
            &services,
        );
        table.errors.extend(traffic.errors);
        let mut traffic_failures: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in &table.errors {
            let file = inv
                .origins
                .get(&e.object)
                .map(|p| format!("{}: ", p.display()))
                .unwrap_or_default();
            if e.object.starts_with("TrafficPolicy ") {
                self.report(format!("{file}{e}"));
                traffic_failures
                    .entry(e.object.clone())
                    .or_default()
                    .push(format!("{file}{e}"));
            } else {
                self.report(format!("{file}{e} (the rest of the route applies)"));
            }
        }
        failures.extend(traffic_failures.into_iter().map(|(object, lines)| Failure {
            object,
            error: lines.join("; "),
        }));
        status.routes = table
            .status
            .iter()
            .map(|s| crate::http::routes::RouteStatus {
                file: inv.origins.get(&s.object).map(|p| p.display().to_string()),
                ..s.clone()
            })
            .collect();
        Arc::new(table)
    }

    /// Each pod's place in the mesh, from the MutualTLS objects (an invalid one is reported
    /// and its last good version stays in force) and `--mtls-mode`.
    fn mesh_modes(
        &mut self,
        inv: &Inventory,
        failures: &mut Vec<Failure>,
    ) -> BTreeMap<policy::ObjectRef, policy::MeshMode> {
        let outcomes = inv
            .mutual_tls
            .iter()
            .map(|(r, obj)| {
                (
                    format!("MutualTLS {r}"),
                    Some(policy::mtls::translate_mutual_tls(obj)),
                )
            })
            .collect();
        failures.extend(self.merge_last_good(inv, outcomes, |c| &mut c.mtls_last_good));
        // No MutualTLS object and no mesh by default: no pod is in the mesh, and walking every
        // pod of the cluster to say so cost 0.3-0.7 s per change at 150,000 pods.
        if self.mtls_last_good.is_empty()
            && self.mtls_default == policy::crd::MutualTlsMode::Disable
        {
            return BTreeMap::new();
        }
        let models: Vec<policy::mtls::MtlsModel> = self.mtls_last_good.values().cloned().collect();
        policy::mtls::pod_modes(inv, &models, self.mtls_default)
            .into_iter()
            .map(|(r, mode)| {
                let mode = match mode {
                    policy::crd::MutualTlsMode::Disable => policy::MeshMode::Off,
                    policy::crd::MutualTlsMode::Permissive => policy::MeshMode::Permissive,
                    policy::crd::MutualTlsMode::Strict => policy::MeshMode::Strict,
                };
                (r, mode)
            })
            // Every reader takes a missing pod as off: a cluster without a mesh has an empty map.
            .filter(|(_, mode)| mode.meshed())
            .collect()
    }

    /// `<file>: <error>` and whether the previous version stays, for an object `key` of
    /// `last_good` kind that failed to translate.
    fn failure_line(&self, inv: &Inventory, key: &str, e: &impl std::fmt::Display) -> String {
        let file = inv
            .origins
            .get(key)
            .map(|p| format!("{}: ", p.display()))
            .unwrap_or_default();
        let kept = if self.last_good.contains_key(key) || self.mtls_last_good.contains_key(key) {
            " (the previous version stays enforced)"
        } else {
            ""
        };
        format!("{file}{e}{kept}")
    }

    /// Tells the source how each policy fares on this node (policy status and Events in a
    /// cluster): enforced when its current version compiled and the maps took it.
    fn report_policies(&self, inv: &Inventory, failures: &[Failure], sync_error: Option<&String>) {
        let keys = inv
            .network_policies
            .keys()
            .map(|r| format!("NetworkPolicy {r}"))
            .chain(inv.mesh_policies.keys().map(|r| format!("MeshPolicy {r}")))
            .chain(
                inv.cluster_mesh_policies
                    .keys()
                    .map(|n| format!("ClusterMeshPolicy {n}")),
            );
        let mut outcomes: BTreeMap<String, PolicyOutcome> = keys
            .map(|key| {
                let error = failures
                    .iter()
                    .find(|f| f.object == key)
                    .map(|f| f.error.clone())
                    .or_else(|| sync_error.cloned());
                let outcome = PolicyOutcome {
                    enforced: error.is_none() && self.last_good.contains_key(&key),
                    error,
                };
                (key, outcome)
            })
            .collect();
        // A TrafficPolicy acts in the proxy, not the maps: enforced when it is valid.
        for r in inv.traffic_policies.keys() {
            let key = format!("TrafficPolicy {r}");
            let error = failures
                .iter()
                .find(|f| f.object == key)
                .map(|f| f.error.clone());
            let outcome = PolicyOutcome {
                enforced: error.is_none(),
                error,
            };
            outcomes.insert(key, outcome);
        }
        self.source.report_policies(&outcomes);
    }

    /// Every local endpoint has its workload certificate: issued once here (cheap), renewed in
    /// the background; those of departed workloads are dropped.
    fn ensure_certificates(&mut self, inv: &Inventory, compiled: &policy::CompiledState) {
        let trust_domain = self.shared.ca.trust_domain().to_owned();
        let mut wanted = BTreeSet::new();
        for r in compiled.endpoints.keys() {
            let Some(pod) = inv.pods.get(r) else { continue };
            match crate::ca::spiffe::pod_identity(&trust_domain, &r.namespace, pod) {
                Ok(id) => {
                    wanted.insert(id);
                }
                Err(e) => self.report(format!("Pod {r}: no workload identity: {e}")),
            }
        }
        for (id, e) in self.shared.certs.ensure(&wanted) {
            self.report(format!("certificate for {id}: {e}"));
        }
    }

    /// Translates every policy that changed; a failure keeps the last good version and is
    /// reported.
    fn translate_policies(&mut self, inv: &Inventory) -> Vec<Failure> {
        let mut outcomes = Vec::new();
        for (r, np) in &inv.network_policies {
            let key = format!("NetworkPolicy {r}");
            outcomes.push(self.translate_changed(key, np, policy::translate_network_policy));
        }
        for (r, mp) in &inv.mesh_policies {
            let key = format!("MeshPolicy {r}");
            outcomes.push(self.translate_changed(key, mp, policy::translate_mesh_policy));
        }
        for (name, cmp) in &inv.cluster_mesh_policies {
            let key = format!("ClusterMeshPolicy {name}");
            outcomes.push(self.translate_changed(key, cmp, policy::translate_cluster_mesh_policy));
        }
        self.merge_last_good(inv, outcomes, |c| &mut c.last_good)
    }

    /// `object`'s translation, or `None` when it is the very object `last_good[key]` came from.
    fn translate_changed<T: Send + Sync + 'static>(
        &self,
        key: String,
        object: &Arc<T>,
        translate: fn(&T) -> Result<PolicyModel, policy::PolicyError>,
    ) -> (String, Option<Result<Translated, policy::PolicyError>>) {
        let same = self
            .last_good
            .get(&key)
            .is_some_and(|t| std::ptr::addr_eq(Arc::as_ptr(&t.from), Arc::as_ptr(object)));
        if same {
            return (key, None);
        }
        let outcome = translate(object).map(|model| Translated {
            from: object.clone(),
            model,
        });
        (key, Some(outcome))
    }

    /// Takes translation outcomes into a last-good map: a success replaces the object's
    /// entry, a failure is reported and keeps the previous version, `None` (unchanged) keeps
    /// the entry, and objects no longer in `outcomes` are forgotten. Returns the failures.
    fn merge_last_good<M, E: std::fmt::Display>(
        &mut self,
        inv: &Inventory,
        outcomes: Vec<(String, Option<Result<M, E>>)>,
        last_good: fn(&mut Self) -> &mut BTreeMap<String, M>,
    ) -> Vec<Failure> {
        let mut seen = BTreeSet::new();
        let mut failures = Vec::new();
        for (key, outcome) in outcomes {
            seen.insert(key.clone());
            let Some(outcome) = outcome else { continue };
            match outcome {
                Ok(model) => {
                    last_good(self).insert(key, model);
                }
                Err(e) => {
                    let line = self.failure_line(inv, &key, &e);
                    self.report(line.clone());
                    failures.push(Failure {
                        object: key,
                        error: line,
                    });
                }
            }
        }
        last_good(self).retain(|k, _| seen.contains(k));
        failures
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, assembling one status"
    )]
    fn publish(
        &self,
        addresses: &HashMap<IpAddr, AddressInfo>,
        compiled: &policy::CompiledState,
        endpoints: Vec<EndpointStatus>,
        failures: Vec<Failure>,
        manifest_errors: Vec<String>,
        fill: [(&'static str, usize, u32); 4],
        generation: u32,
        result: &Result<SyncStats, String>,
        mut phases: Phases,
        services: ServicesStatus,
    ) {
        // Flows share the index's text (see `flows::EnrichmentIndex`): each policy, pod and
        // label set is built once here, not copied into every flow.
        let mut index = EnrichmentIndex {
            node_name: self.node.as_str().into(),
            rules: compiled
                .rules
                .iter()
                .map(|(id, rule)| (*id, Arc::new(PolicyRef::from(rule))))
                .collect(),
            ..EnrichmentIndex::default()
        };
        index.addresses = addresses.clone();
        let named = (1..agent_common::IDENTITY_FIRST_ALLOCATED)
            .filter_map(|id| {
                crate::identity::reserved_name(id).map(|n| (id, format!("reserved:{n}")))
            })
            .chain(
                compiled
                    .policy_cidrs
                    .iter()
                    .map(|(net, id)| (*id, format!("cidr:{net}"))),
            )
            .chain(
                compiled
                    .principals
                    .iter()
                    .map(|(principal, id)| (*id, format!("principal:{principal}"))),
            );
        let mut identity_labels: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (id, label) in named {
            identity_labels.entry(id).or_default().push(label);
        }
        index.identity_labels = identity_labels
            .into_iter()
            .map(|(id, labels)| (id, labels.into()))
            .collect();
        index.services = self.service_index.clone();
        *self
            .shared
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(index);
        phases.end("publish");
        let syncs = self.shared.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        let maps: Vec<MapFill> = fill
            .iter()
            .map(|(name, entries, capacity)| MapFill {
                name: (*name).to_owned(),
                entries: *entries,
                capacity: *capacity,
                nearly_full: self.fill_watch.is_warned(name),
            })
            .collect();
        self.shared.metrics.observe_state(
            endpoints.iter().filter(|e| e.attached).count(),
            self.identities.len(),
            &maps,
        );
        let status = Status {
            ready: self.shared.ready.load(Ordering::SeqCst) || result.is_ok(),
            node: self.node.clone(),
            generation,
            syncs,
            endpoints,
            policies: PolicyStatus {
                applied: self.last_good.len(),
                failed: failures,
            },
            manifest_errors,
            maps,
            map_sizes: Some(self.map_sizes),
            identities: self.identities.len(),
            source: self.source.status(),
            services,
            host_routing: HostRoutingStatus {
                mode: if self.host_routing { "ebpf" } else { "kernel" },
                devices: self.underlay_here.iter().cloned().collect(),
            },
            conntrack_gc: self
                .shared
                .status
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .conntrack_gc
                .clone(),
            last_sync: SyncStatus {
                at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                duration_ms: phases.started.elapsed().as_secs_f64() * 1000.0,
                phases_ms: phases.done,
                policy_entries_added: result.as_ref().map_or(0, |s| s.policy_added),
                policy_entries_removed: result.as_ref().map_or(0, |s| s.policy_removed),
                error: result.as_ref().err().cloned(),
            },
        };
        *self
            .shared
            .status
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = status;
    }
}

/// An answer for the control loop to learn; `done` when the maps hold its addresses.
struct LearnRequest {
    answer: crate::dns::Answer,
    done: tokio::sync::oneshot::Sender<()>,
}

/// The agent side of the DNS proxy: allow lists and upstream from the last sync, learning
/// through the control loop.
struct AgentDns {
    shared: Arc<Shared>,
    /// Where pods reach the proxy (the destination of a refused query's flow).
    proxy: SocketAddr,
    tx: tokio::sync::mpsc::Sender<LearnRequest>,
}

impl crate::dns::proxy::DnsPolicy for AgentDns {
    fn allow_for(&self, src: IpAddr) -> policy::DnsAllow {
        self.shared
            .dns_allow
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&src)
            .cloned()
            .unwrap_or(policy::DnsAllow::Any)
    }

    fn learn(
        &self,
        src: IpAddr,
        answer: &crate::dns::Answer,
    ) -> impl std::future::Future<Output = ()> + Send {
        // Only the answers of pods a policy proxies are learned.
        let proxied = self
            .shared
            .dns_allow
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&src);
        let tx = self.tx.clone();
        let answer = answer.clone();
        async move {
            if !proxied {
                return;
            }
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(LearnRequest { answer, done }).await.is_ok() {
                let _ = wait.await;
            }
        }
    }

    fn refused(&self, src: IpAddr, question: &crate::dns::Question) {
        self.shared.metrics.dns_query("refused");
        tracing::info!(
            pod = %src,
            name = %question.name,
            qtype = %question.qtype,
            "DNS query refused: the pod's rules.dns do not allow the name"
        );
    }

    fn upstream(&self, transport: crate::dns::proxy::Transport) -> Option<SocketAddr> {
        match transport {
            crate::dns::proxy::Transport::Udp => dns_upstream(&self.shared),
            crate::dns::proxy::Transport::Tcp => dns_upstream_tcp(&self.shared),
        }
    }

    fn answered(&self, ok: bool) {
        self.shared
            .metrics
            .dns_query(if ok { "forwarded" } else { "servfail" });
    }

    fn replied(&self, record: &crate::dns::proxy::QueryRecord) {
        if !record.refused {
            self.shared
                .metrics
                .dns_proxy_seconds(record.elapsed.as_secs_f64());
        }
        let flow = crate::flows::from_dns(record, self.proxy, &self.shared.index());
        self.shared.record(Arc::new(flow));
    }
}

/// The resolver the DNS proxy forwards to: a backend of kube-system/kube-dns, else of any other
/// Service's UDP port 53.
fn dns_upstream(shared: &Shared) -> Option<SocketAddr> {
    dns_backend(shared, crate::services::Protocol::Udp)
}

/// The resolver the DNS proxy forwards TCP queries to: a backend of the DNS Service's TCP port
/// 53, else the UDP one's address on the same port (resolvers serve both).
fn dns_upstream_tcp(shared: &Shared) -> Option<SocketAddr> {
    dns_backend(shared, crate::services::Protocol::Tcp).or_else(|| dns_upstream(shared))
}

/// A backend of kube-system/kube-dns's port 53 over `protocol`, else of any other Service's.
fn dns_backend(shared: &Shared, protocol: crate::services::Protocol) -> Option<SocketAddr> {
    {
        let table = shared
            .services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        // kube-system/kube-dns first, then any other Service's DNS port.
        let mut ports: Vec<_> = table
            .ports
            .values()
            .filter(|p| p.frontend.port == 53 && p.frontend.protocol == protocol)
            .collect();
        ports.sort_by_key(|p| {
            (
                p.service.namespace != "kube-system",
                p.service.name != "kube-dns",
            )
        });
        ports
            .iter()
            .find_map(|p| p.backends().first().copied())
            .map(|(ip, port)| SocketAddr::new(ip, port))
    }
}

/// How long after a fast-path learn the full reconcile (and the save) runs: answers that
/// come in a burst share one.
const LEARN_SETTLE: Duration = Duration::from_millis(20);

/// How often conntrack is read again while expired learned addresses are all held by live
/// connections.
const LIVE_RECHECK: Duration = Duration::from_secs(5);
/// A TCP flow with no packet for this long no longer holds its address (Cilium's TCP
/// lifetime); other protocols, [`LIVE_IDLE_OTHER`].
const LIVE_IDLE_TCP: u32 = 6 * 3600;
const LIVE_IDLE_OTHER: u32 = 60;

/// The peers of live, allowed connections that a pod `selected(source)` opened: the addresses
/// that stay allowed after their DNS TTL. A flow is live until it closes (FIN or RST seen) or
/// goes idle ([`LIVE_IDLE_TCP`], [`LIVE_IDLE_OTHER`]); `now_s` is the monotonic clock in seconds
/// (`CtValue::last_seen_s`).
fn live_peers(
    flows: &[(agent_common::CtKey, agent_common::CtValue)],
    selected: impl Fn(IpAddr) -> bool,
    now_s: u32,
) -> std::collections::BTreeSet<IpAddr> {
    let ip = |a: [u8; 16]| std::net::Ipv6Addr::from(a).to_canonical();
    flows
        .iter()
        .filter(|(key, value)| {
            let idle = if key.protocol == 6 {
                LIVE_IDLE_TCP
            } else {
                LIVE_IDLE_OTHER
            };
            key.direction == agent_common::DIR_EGRESS
                && value.verdict == agent_common::VERDICT_FORWARDED
                && value.flags & agent_common::CT_F_CLOSING == 0
                && value.last_seen_s != 0
                && now_s.saturating_sub(value.last_seen_s) <= idle
                && selected(ip(key.saddr))
        })
        .map(|(key, _)| ip(key.daddr))
        .collect()
}

/// The monotonic clock in whole seconds, as the datapath's `bpf_ktime_get_ns() / 1e9`.
fn monotonic_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u32::try_from(ts.tv_sec).unwrap_or(u32::MAX)
}

/// Binds the DNS proxy at `addr` (UDP and TCP), hands its sockets to the datapath (pods' DNS to
/// a Service on port 53 goes to it while they are open) and serves them.
fn start_dns_proxy(
    addr: SocketAddr,
    datapath: &mut Datapath,
    shared: &Arc<Shared>,
    tx: tokio::sync::mpsc::Sender<LearnRequest>,
) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let socket = std::net::UdpSocket::bind(addr)
        .with_context(|| format!("binding --dns-proxy-addr {addr} (UDP)"))?;
    socket.set_nonblocking(true)?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding --dns-proxy-addr {addr} (TCP)"))?;
    listener.set_nonblocking(true)?;
    datapath
        .set_dns_proxy(addr, socket.as_fd(), listener.as_fd())
        .context("handing the DNS proxy sockets to the datapath")?;
    let socket = Arc::new(tokio::net::UdpSocket::from_std(socket)?);
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let config = crate::dns::proxy::ProxyConfig {
        // Replaced per query by the kube-dns backend of the last sync.
        upstream: addr,
        timeout: Duration::from_secs(2),
        max_in_flight: 64,
        max_tcp_per_client: 16,
        // CoreDNS's default idle timeout for a TCP client.
        tcp_idle: Duration::from_secs(10),
        refuse_with: crate::dns::RefuseWith::Refused,
    };
    let policy = Arc::new(AgentDns {
        shared: shared.clone(),
        proxy: addr,
        tx,
    });
    let tcp_policy = policy.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::dns::proxy::serve_udp(socket, config, policy).await {
            tracing::error!(error = %e, "the DNS proxy stopped (UDP)");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = crate::dns::proxy::serve_tcp(listener, config, tcp_policy).await {
            tracing::error!(error = %e, "the DNS proxy stopped (TCP)");
        }
    });
    tracing::info!(addr = %addr, "DNS proxy listening; pods' DNS is steered to it");
    Ok(())
}

#[cfg(test)]
mod tests {
    use agent_common::{CT_F_CLOSING, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, VERDICT_DROPPED};

    use super::*;

    fn flow(src: [u8; 4], dst: [u8; 4], protocol: u8, direction: u8) -> CtKey {
        CtKey {
            saddr: std::net::Ipv4Addr::from(src).to_ipv6_mapped().octets(),
            daddr: std::net::Ipv4Addr::from(dst).to_ipv6_mapped().octets(),
            sport_be: 40000u16.to_be(),
            dport_be: 443u16.to_be(),
            protocol,
            direction,
            _pad: [0; 2],
        }
    }

    fn seen(at: u32, verdict: u8, flags: u8) -> CtValue {
        CtValue {
            verdict,
            flags,
            last_seen_s: at,
            ..CtValue::default()
        }
    }

    #[test]
    fn only_open_recent_allowed_connections_of_selected_pods_hold_an_address() {
        let pod = [10, 0, 0, 5];
        let other_pod = [10, 0, 0, 6];
        let fwd = agent_common::VERDICT_FORWARDED;
        let now = 100_000;
        let flows = [
            // Held: an open TCP connection idle for an hour, a UDP flow seen 10 s ago.
            (
                flow(pod, [198, 18, 0, 1], 6, DIR_EGRESS),
                seen(now - 3600, fwd, 0),
            ),
            (
                flow(pod, [198, 18, 0, 2], 17, DIR_EGRESS),
                seen(now - 10, fwd, 0),
            ),
            // Not held: closing, denied, UDP idle past its limit, a pod no FQDN rule selects,
            // an ingress flow, an entry from before the field existed.
            (
                flow(pod, [198, 18, 0, 3], 6, DIR_EGRESS),
                seen(now, fwd, CT_F_CLOSING),
            ),
            (
                flow(pod, [198, 18, 0, 4], 6, DIR_EGRESS),
                seen(now, VERDICT_DROPPED, 0),
            ),
            (
                flow(pod, [198, 18, 0, 5], 17, DIR_EGRESS),
                seen(now - 61, fwd, 0),
            ),
            (
                flow(other_pod, [198, 18, 0, 6], 6, DIR_EGRESS),
                seen(now, fwd, 0),
            ),
            (
                flow(pod, [198, 18, 0, 7], 6, DIR_INGRESS),
                seen(now, fwd, 0),
            ),
            (flow(pod, [198, 18, 0, 8], 6, DIR_EGRESS), seen(0, fwd, 0)),
        ];
        let selected = |ip: IpAddr| ip == IpAddr::from(pod);
        let live: Vec<IpAddr> = live_peers(&flows, selected, now).into_iter().collect();
        assert_eq!(
            live,
            vec![IpAddr::from([198, 18, 0, 1]), IpAddr::from([198, 18, 0, 2])]
        );
    }
}
