//! `cargo xtask bench tunnel`: on one 2-node lab, cross-node pod to pod (client on node-1,
//! server on node-2), what the mTLS tunnel costs, side by side in one invocation:
//!
//! - plaintext, no agent (agents stopped and their pinned state removed: nothing attached),
//! - plaintext, nodeward L3/L4 only (agents running, no `MutualTLS`: `--mtls-mode DISABLE`),
//! - through the tunnel (agents running, `MutualTLS` PERMISSIVE for the client's and the
//!   server's namespace: both pods meshed, so the agents carry the connection over HBONE),
//!   dialled at the destination node's address (`--hbone-dial node`),
//! - the same dialled at the destination pod's address (`--hbone-dial pod`, the default, as
//!   ambient).
//!
//! And on one node (client and a second server pod both on node-1): plaintext without an agent
//! against the tunnel's same-node fast path (both pods meshed; no TLS, the sockets joined in the
//! kernel), which node-1's `tunnel.local.kernel` counter must show.
//!
//! Each scenario: bulk throughput (iperf3, one stream), request/response latency p50/p99 over one
//! connection, new connections per second. Rounds in ABBA order, median over the rounds. The
//! agents' tunnel counters prove which path the traffic took: they must rise in the tunnel
//! scenario and stay put in the plaintext one.
//!
//! With `--ztunnel PATH`, Istio ambient's ztunnel is one more cross-node scenario in the same
//! rounds: agents stopped as for plaintext, the same pods and load through a pair of ztunnels
//! (`bench_ztunnel`), and its RSS at 1,000 idle connections beside the agents'.
//!
//! Then, with the tunnel on, 1,000 idle tunnelled connections (`nodeward-lab-load hold`): both
//! agents' RSS before and with them open, and their CPU while the connections sit idle.
//!
//! Prints the results and writes them to README's Benchmarks section under "### Tunnel"
//! (`--quick` only prints).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nodeward_lab::{Lab, PodState, netpol, paths, sys, wait};
use serde_json::Value;

use crate::bench::{CLK_TCK, Machine, ReleaseLab, in_pod, median, proc_kib, release_lab};
use crate::bench_rules as rules;
use crate::bench_ztunnel;

const CLIENT: &str = "frontend/web-0";
const SERVER: &str = "backend/api-1";
/// The same-node server: on the client's node, in the server's namespace (so meshed with it).
const LOCAL_SERVER: &str = "backend/api-0";
const CRR_THREADS: u32 = 4;
/// Idle tunnelled connections for the memory and CPU figures.
const HOLD_COUNT: usize = 1000;
/// The targets (issue 30), cross-node against plaintext without an agent, same-node against
/// same-node plaintext.
const TARGET_BULK_RATIO: f64 = 0.5;
const TARGET_P50_RATIO: f64 = 1.6;
const TARGET_CRR_RATIO: f64 = 0.4;
const TARGET_LOCAL_RATIO: f64 = 0.8;
/// How long the agents get to count the meshed pods after a `MutualTLS` change.
const MESH_TIMEOUT: Duration = Duration::from_secs(15);

/// How long each measurement runs: the full run, or `--quick` for a smoke run.
#[derive(Clone, Copy)]
struct Durations {
    rounds: usize,
    crr_secs: f64,
    rr_secs: f64,
    iperf_secs: u32,
    /// CPU is counted over this many seconds, without and with the idle connections.
    idle_secs: u64,
}

impl Durations {
    const FULL: Self = Self {
        rounds: 3,
        crr_secs: 2.0,
        rr_secs: 1.5,
        iperf_secs: 2,
        idle_secs: 5,
    };
    const QUICK: Self = Self {
        rounds: 1,
        crr_secs: 0.5,
        rr_secs: 0.5,
        iperf_secs: 1,
        idle_secs: 2,
    };
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Scenario {
    NoAgent,
    Plaintext,
    Tunnel,
    TunnelPod,
    /// Client and server on one node: plaintext without an agent, and the same-node fast path.
    LocalNoAgent,
    LocalTunnel,
    /// No agent; a pair of ztunnels carries the client's connections (`--ztunnel`).
    Ztunnel,
}

impl Scenario {
    const ALL: [Self; 7] = [
        Self::NoAgent,
        Self::Plaintext,
        Self::Tunnel,
        Self::TunnelPod,
        Self::LocalNoAgent,
        Self::LocalTunnel,
        Self::Ztunnel,
    ];
    /// The cross-node table's columns (ztunnel's only when it ran).
    const CROSS: [Self; 5] = [
        Self::NoAgent,
        Self::Plaintext,
        Self::Tunnel,
        Self::TunnelPod,
        Self::Ztunnel,
    ];
    /// The same-node table's columns.
    const LOCAL: [Self; 2] = [Self::LocalNoAgent, Self::LocalTunnel];

    fn local(self) -> bool {
        matches!(self, Self::LocalNoAgent | Self::LocalTunnel)
    }

    fn short(self) -> &'static str {
        match self {
            Self::NoAgent => "no agent",
            Self::Plaintext => "L3/L4",
            Self::Tunnel => "tunnel",
            Self::TunnelPod => "tunnel, pod dial",
            Self::LocalNoAgent => "same node, no agent",
            Self::LocalTunnel => "same node, tunnel",
            Self::Ztunnel => "ztunnel",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::NoAgent => "plaintext, no agent",
            Self::Plaintext => "plaintext, nodeward L3/L4",
            Self::Tunnel => "nodeward mTLS tunnel, `--hbone-dial node`",
            Self::TunnelPod => "nodeward mTLS tunnel, `--hbone-dial pod` (the default)",
            Self::LocalNoAgent => "same node: plaintext, no agent",
            Self::LocalTunnel => "same node: nodeward tunnel (fast path)",
            Self::Ztunnel => "Istio ztunnel pair (HBONE)",
        }
    }
}

/// ABBA: drift over the run affects every scenario alike; the agents start only twice and the
/// mesh changes twice per pair of rounds. ztunnel runs next to "no agent" (both without agents)
/// and is left out without `--ztunnel`.
const ORDER: [[Scenario; 7]; 2] = [
    [
        Scenario::Ztunnel,
        Scenario::NoAgent,
        Scenario::LocalNoAgent,
        Scenario::Plaintext,
        Scenario::Tunnel,
        Scenario::LocalTunnel,
        Scenario::TunnelPod,
    ],
    [
        Scenario::TunnelPod,
        Scenario::LocalTunnel,
        Scenario::Tunnel,
        Scenario::Plaintext,
        Scenario::LocalNoAgent,
        Scenario::NoAgent,
        Scenario::Ztunnel,
    ],
];

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    gbit_per_sec: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    conn_per_sec: f64,
    /// Connections the client completed (crr, rr, iperf3's control and data connections).
    completed: u64,
    crr_errors: u64,
    /// The tunnel counters' rise over the sample: client node's outbound, server node's inbound.
    tunnel: TunnelDelta,
}

#[derive(Clone, Copy, Debug, Default)]
struct TunnelDelta {
    outbound_ok: u64,
    outbound_failed: u64,
    inbound_ok: u64,
    inbound_failed: u64,
    /// The client node's same-node connections, joined in the kernel or copied.
    local_kernel: u64,
    local_user: u64,
    /// The ztunnels' rise: connections captured on the client side, delivered on the server's.
    ztunnel: bench_ztunnel::Counters,
}

impl TunnelDelta {
    fn add(&mut self, other: Self) {
        self.ztunnel.captured += other.ztunnel.captured;
        self.ztunnel.delivered += other.ztunnel.delivered;
        self.outbound_ok += other.outbound_ok;
        self.outbound_failed += other.outbound_failed;
        self.inbound_ok += other.inbound_ok;
        self.inbound_failed += other.inbound_failed;
        self.local_kernel += other.local_kernel;
        self.local_user += other.local_user;
    }
}

/// One node's `tunnel` counters from `nodeward status -o json` (zeros without a tunnel).
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    outbound_ok: u64,
    outbound_failed: u64,
    outbound_active: u64,
    inbound_ok: u64,
    inbound_failed: u64,
    inbound_active: u64,
    pooled: u64,
    local_kernel: u64,
    local_user: u64,
}

impl Counters {
    fn of(status: &Value) -> Self {
        let t = &status["tunnel"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        Self {
            outbound_ok: n(&t["outbound"]["ok"]),
            outbound_failed: n(&t["outbound"]["failed"]),
            outbound_active: n(&t["outbound"]["active"]),
            inbound_ok: n(&t["inbound"]["ok"]),
            inbound_failed: n(&t["inbound"]["failed"]),
            inbound_active: n(&t["inbound"]["active"]),
            pooled: n(&t["pooled_connections"]),
            local_kernel: n(&t["local"]["kernel"]),
            local_user: n(&t["local"]["user"]),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Figure {
    Bulk,
    P50,
    P99,
    Crr,
}

impl Figure {
    const ALL: [Self; 4] = [Self::Bulk, Self::P50, Self::P99, Self::Crr];

    fn of(self, s: &Sample) -> f64 {
        match self {
            Self::Bulk => s.gbit_per_sec,
            Self::P50 => s.rr_p50_us,
            Self::P99 => s.rr_p99_us,
            Self::Crr => s.conn_per_sec,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Bulk => "bulk throughput (Gbit/s)",
            Self::P50 => "request/response p50 (µs)",
            Self::P99 => "request/response p99 (µs)",
            Self::Crr => "new TCP connections/s",
        }
    }

    fn format(self, v: f64) -> String {
        match self {
            Self::Bulk => format!("{v:.2}"),
            Self::P50 | Self::P99 => format!("{v:.1}"),
            Self::Crr => format!("{v:.0}"),
        }
    }
}

/// One agent at the idle-connections step.
#[derive(Clone, Copy, Debug, Default)]
struct IdleNode {
    /// After the rounds' load, before the agents were restarted.
    rss_loaded_kib: u64,
    rss_before_kib: u64,
    rss_open_kib: u64,
    hwm_open_kib: u64,
    rss_closed_kib: u64,
    cpu_idle_pct: f64,
    cpu_held_pct: f64,
    counters: Counters,
}

struct Idle {
    /// Client node, server node.
    client: IdleNode,
    server: IdleNode,
    opened: u64,
    open_secs: f64,
    alive: u64,
}

/// A process the benchmark started in the lab; killed (by pid) on the way out.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Bench {
    lab: Lab,
    load: PathBuf,
    nodeward: PathBuf,
    client: PodState,
    server: PodState,
    local_server: PodState,
    /// The namespaces the tunnel scenario meshes (the client's and the server's).
    mesh_namespaces: Vec<String>,
    agents: bool,
    /// The running agents dial pods (`--hbone-dial pod`).
    pod_dial: bool,
    meshed: bool,
    sinks: rules::Sinks,
    d: Durations,
    /// `--ztunnel`: the binary, and the pair while the ztunnel scenario is in force.
    ztunnel_bin: Option<PathBuf>,
    ztunnels: Option<bench_ztunnel::Pair>,
}

pub fn run(quick: bool, ports: rules::SinkPorts, ztunnel: Option<PathBuf>) -> Result<()> {
    if let Some(bin) = &ztunnel {
        ensure!(
            bin.is_file(),
            "--ztunnel {}: no such file (build it as DEVELOPERS.md says)",
            bin.display()
        );
    }
    let started = Instant::now();
    let _stats = crate::bench::BpfStats::set(false)?;
    let d = if quick {
        Durations::QUICK
    } else {
        Durations::FULL
    };
    let ReleaseLab {
        lab,
        nodeward,
        load,
        client,
        server,
    } = release_lab(CLIENT, SERVER)?;
    let mut mesh_namespaces = vec![client.namespace.clone(), server.namespace.clone()];
    mesh_namespaces.dedup();
    let local_server = lab.pod(LOCAL_SERVER).clone();
    ensure!(
        local_server.node == client.node && local_server.namespace == server.namespace,
        "{LOCAL_SERVER} must be on {CLIENT}'s node and in {SERVER}'s namespace"
    );
    let mut bench = Bench {
        lab,
        load,
        nodeward,
        client,
        server,
        local_server,
        mesh_namespaces,
        agents: false,
        pod_dial: false,
        meshed: false,
        sinks: rules::Sinks::new(ports),
        d,
        ztunnel_bin: ztunnel,
        ztunnels: None,
    };
    let result = bench.run_all();
    // The lab removes its directory when it drops: keep the agents' logs for a look afterwards.
    let logs = bench.keep_agent_logs();
    let (samples, idle, ztunnel_idle) = result?;
    drop(bench);

    let report = Report {
        samples,
        idle,
        ztunnel_idle,
        d,
        logs: logs.unwrap_or_default(),
        ports,
        runtime: started.elapsed(),
    };
    let table = report.markdown();
    println!("\n{table}");
    if quick {
        println!(
            "--quick: README.md left alone. bench tunnel took {:.0?}",
            started.elapsed()
        );
    } else {
        update_readme(&table)?;
        println!(
            "README.md: Benchmarks / Tunnel updated. bench tunnel took {:.0?}",
            started.elapsed()
        );
    }
    Ok(())
}

type Samples = BTreeMap<Scenario, Vec<Sample>>;
/// The agents' counters (client node, server node) and the ztunnels'.
type Snapshot = ((Counters, Counters), bench_ztunnel::Counters);

impl Bench {
    fn run_all(&mut self) -> Result<(Samples, Idle, Option<Idle>)> {
        let _servers = self.start_servers()?;
        // The client makes tens of thousands of connections over the run: give it every port.
        sys::sysctls(
            &self.client.netns,
            &[("net/ipv4/ip_local_port_range".to_string(), "10000 65000")],
        )?;
        let mut samples = Samples::new();
        for round in 0..self.d.rounds {
            for &scenario in &ORDER[round % 2] {
                if scenario == Scenario::Ztunnel && self.ztunnel_bin.is_none() {
                    continue;
                }
                self.enter(scenario)?;
                let sample = self.measure(scenario)?;
                eprintln!(
                    "bench: round {} {:<26} {:>6.2} Gbit/s  rr p50 {:>6.1} µs p99 {:>6.1} µs  {:>6.0} conn/s ({} failed)  tunnel out ok +{} in ok +{} same-node kernel +{} user +{}",
                    round + 1,
                    scenario.title(),
                    sample.gbit_per_sec,
                    sample.rr_p50_us,
                    sample.rr_p99_us,
                    sample.conn_per_sec,
                    sample.crr_errors,
                    sample.tunnel.outbound_ok,
                    sample.tunnel.inbound_ok,
                    sample.tunnel.local_kernel,
                    sample.tunnel.local_user,
                );
                samples.entry(scenario).or_default().push(sample);
            }
        }
        self.enter(Scenario::Tunnel)?;
        let loaded = [
            self.vm_kib(&self.client.node, "VmRSS:")?,
            self.vm_kib(&self.server.node, "VmRSS:")?,
        ];
        self.restart_agents()?;
        self.enter(Scenario::Tunnel)?;
        let mut idle = self.idle_connections(Scenario::Tunnel)?;
        idle.client.rss_loaded_kib = loaded[0];
        idle.server.rss_loaded_kib = loaded[1];
        let ztunnel_idle = if self.ztunnel_bin.is_some() {
            // A fresh pair, as the agents are fresh for theirs.
            self.ztunnels = None;
            self.enter(Scenario::Ztunnel)?;
            Some(self.idle_connections(Scenario::Ztunnel)?)
        } else {
            None
        };
        self.ztunnels = None;
        Ok((samples, idle, ztunnel_idle))
    }

    /// The load server (sink and echo ports) and iperf3 in both server pods.
    fn start_servers(&self) -> Result<Vec<Guard>> {
        let mut guards = Vec::new();
        for server in [&self.server, &self.local_server] {
            let (load, iperf) = self.start_servers_in(server)?;
            guards.push(load);
            guards.push(iperf);
        }
        Ok(guards)
    }

    fn start_servers_in(&self, server: &PodState) -> Result<(Guard, Guard)> {
        let sink = format!("{}-{}", rules::SINK_PORTS.0, rules::SINK_PORTS.1);
        let echo = rules::ECHO_PORT.to_string();
        let load = Guard(
            in_pod(
                server,
                self.load.as_os_str(),
                &["serve", "--sink", &sink, "--echo", &echo],
            )
            .stdout(Stdio::null())
            .spawn()
            .context("starting the load server")?,
        );
        let port = rules::IPERF_PORT.to_string();
        let iperf = Guard(
            in_pod(server, "iperf3".as_ref(), &["-s", "-p", &port])
                .stdout(Stdio::null())
                .spawn()
                .context("starting iperf3 -s")?,
        );
        for port in [rules::ECHO_PORT, rules::IPERF_PORT] {
            let addr = SocketAddr::new(IpAddr::V4(server.ip4), port);
            ensure!(
                wait::eventually(Duration::from_secs(5), Duration::from_millis(20), || {
                    nodeward_lab::probe::connect_from(
                        &self.client.netns,
                        addr,
                        Duration::from_millis(200),
                    )
                    .is_ok()
                }),
                "the server pod does not answer on {addr}"
            );
        }
        Ok((load, iperf))
    }

    fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.server.ip4), port)
    }

    /// The server pod a scenario measures against.
    fn target(&self, scenario: Scenario) -> &PodState {
        if scenario.local() {
            &self.local_server
        } else {
            &self.server
        }
    }

    /// Moves the lab to `scenario` from wherever it is, and checks which path a connection
    /// takes there.
    fn enter(&mut self, scenario: Scenario) -> Result<()> {
        let t = Instant::now();
        if scenario != Scenario::Ztunnel {
            // Stopped, and the capture rule gone.
            self.ztunnels = None;
        }
        match scenario {
            Scenario::Ztunnel => {
                self.set_mesh(false)?;
                self.stop_agents()?;
                if self.ztunnels.is_none() {
                    let bin = self.ztunnel_bin.as_deref().context("no --ztunnel")?;
                    self.ztunnels = Some(bench_ztunnel::Pair::start(
                        bin,
                        &self.client,
                        self.lab.node(&self.client.node),
                        &self.server,
                        &bench_ztunnel::dir(),
                    )?);
                }
            }
            Scenario::NoAgent | Scenario::LocalNoAgent => {
                self.set_mesh(false)?;
                self.stop_agents()?;
            }
            Scenario::Plaintext => {
                self.start_agents(false)?;
                self.set_mesh(false)?;
            }
            Scenario::Tunnel | Scenario::TunnelPod | Scenario::LocalTunnel => {
                self.start_agents(scenario == Scenario::TunnelPod)?;
                self.set_mesh(true)?;
            }
        }
        let before = self.snapshot()?;
        ensure!(
            self.lab.tcp_probe(
                CLIENT,
                &self.target(scenario).key(),
                rules::ECHO_PORT,
                Duration::from_secs(2)
            ),
            "{}: the client cannot reach the server's echo port{}",
            scenario.title(),
            self.logs_if(self.agents)
        );
        let delta = self.tunnel_delta(before)?;
        self.check_path(scenario, delta, 1)?;
        eprintln!("bench: {} in force ({:.1?})", scenario.title(), t.elapsed());
        Ok(())
    }

    /// Fails unless the tunnel carried (at least `min` connections) exactly in the tunnel
    /// scenario: without the counters a "tunnel" figure could be plaintext's.
    fn check_path(&self, scenario: Scenario, delta: TunnelDelta, min: u64) -> Result<()> {
        match scenario {
            Scenario::NoAgent | Scenario::LocalNoAgent => Ok(()),
            Scenario::Ztunnel => {
                let z = delta.ztunnel;
                ensure!(
                    z.captured >= min && z.delivered >= min,
                    "{}: connections did not go through the ztunnels: {} captured +{}, the \
                     server ztunnel's istio_tcp_connections_opened_total (destination) +{}; \
                     expected at least +{min} on both (logs in {})",
                    scenario.title(),
                    self.client.node,
                    z.captured,
                    z.delivered,
                    bench_ztunnel::dir().display()
                );
                Ok(())
            }
            Scenario::LocalTunnel => {
                // Copies are expected too: a connection whose server closed before the join
                // (crr's server accepts and closes at once) cannot enter the sockmap.
                ensure!(
                    delta.local_kernel >= min,
                    "{}: connections did not take the same-node fast path in the kernel: {} \
                     tunnel.local.kernel +{}, tunnel.local.user +{}; expected at least +{min} \
                     in the kernel{}",
                    scenario.title(),
                    self.client.node,
                    delta.local_kernel,
                    delta.local_user,
                    self.logs_if(true)
                );
                Ok(())
            }
            Scenario::Plaintext => {
                ensure!(
                    delta.outbound_ok == 0 && delta.inbound_ok == 0,
                    "{}: the tunnel carried connections (client node tunnel.outbound.ok +{}, \
                     server node tunnel.inbound.ok +{}), so this is not plaintext",
                    scenario.title(),
                    delta.outbound_ok,
                    delta.inbound_ok
                );
                Ok(())
            }
            Scenario::Tunnel | Scenario::TunnelPod => {
                ensure!(
                    delta.outbound_ok >= min && delta.inbound_ok >= min,
                    "{}: connections did not go through the tunnel: {} tunnel.outbound.ok +{} \
                     (failed +{}), {} tunnel.inbound.ok +{} (failed +{}); expected at least \
                     +{min} on both{}",
                    scenario.title(),
                    self.client.node,
                    delta.outbound_ok,
                    delta.outbound_failed,
                    self.server.node,
                    delta.inbound_ok,
                    delta.inbound_failed,
                    self.logs_if(true)
                );
                Ok(())
            }
        }
    }

    fn logs_if(&self, agents: bool) -> String {
        if agents {
            format!("\n{}", self.lab.agent_logs_tail(15))
        } else {
            String::new()
        }
    }

    /// Fresh agents (adopting the pinned state) for the idle step, so that what the rounds'
    /// load left in their memory does not count as the connections' cost.
    fn restart_agents(&mut self) -> Result<()> {
        self.lab.set_agent_args(&["--hbone-dial", "node"]);
        let mut restarted = Ok(());
        for node in self.lab.node_names() {
            restarted = self
                .lab
                .stop_agent(&node)
                .and_then(|()| self.lab.start_agent(&node).map(|_| ()));
            if restarted.is_err() {
                break;
            }
        }
        self.lab.set_agent_args(&[]);
        restarted?;
        self.agents = true;
        self.pod_dial = false;
        self.wait_meshed()
    }

    fn stop_agents(&mut self) -> Result<()> {
        if !self.agents {
            return Ok(());
        }
        for node in self.lab.node_names() {
            self.lab.stop_agent(&node)?;
            crate::bench::remove_pins(&self.lab, &self.nodeward, &node)?;
        }
        self.agents = false;
        Ok(())
    }

    /// Agents running, dialling pods when `pod_dial`: restarted (on their pinned state) when
    /// they run the other way.
    fn start_agents(&mut self, pod_dial: bool) -> Result<()> {
        if self.agents && self.pod_dial == pod_dial {
            return Ok(());
        }
        // Explicit either way: the agent's default is `pod`.
        self.lab
            .set_agent_args(&["--hbone-dial", if pod_dial { "pod" } else { "node" }]);
        let mut started = Ok(());
        for node in self.lab.node_names() {
            if self.agents {
                started = self.lab.stop_agent(&node);
            }
            started = started.and_then(|()| self.lab.start_agent(&node).map(|_| ()));
            if started.is_err() {
                break;
            }
        }
        self.lab.set_agent_args(&[]);
        started?;
        let restarted = self.agents;
        self.agents = true;
        self.pod_dial = pod_dial;
        if restarted && self.meshed {
            self.wait_meshed()?;
        }
        Ok(())
    }

    /// Writes (or removes) a PERMISSIVE `MutualTLS` for the mesh namespaces and waits until the
    /// agents count the pods.
    fn set_mesh(&mut self, on: bool) -> Result<()> {
        if self.meshed == on {
            return Ok(());
        }
        for ns in &self.mesh_namespaces {
            let name = format!("bench-mtls-{ns}");
            if on {
                self.lab
                    .write_manifest(&name, &netpol::mutual_tls(ns, "PERMISSIVE"))?;
            } else {
                self.lab.remove_manifest(&name)?;
            }
        }
        self.meshed = on;
        if self.agents {
            self.wait_meshed()?;
        }
        Ok(())
    }

    /// Waits until every agent counts exactly its local pods of the mesh namespaces as meshed
    /// (or none, with the mesh off).
    fn wait_meshed(&self) -> Result<()> {
        let on = self.meshed;
        let t = Instant::now();
        for node in self.lab.node_names() {
            let want = if on {
                self.lab
                    .pods_on(&node)
                    .iter()
                    .filter(|p| self.mesh_namespaces.contains(&p.namespace))
                    .count() as u64
            } else {
                0
            };
            let mut last = Value::Null;
            let ok = wait::eventually(MESH_TIMEOUT, Duration::from_millis(50), || {
                let Ok(status) = self.lab.status(&node) else {
                    return false;
                };
                let meshed = status["tunnel"]["meshed_endpoints"].as_u64();
                last = status["tunnel"].clone();
                // No tunnel section at all is "nobody meshed" too.
                meshed == Some(want) || (want == 0 && meshed.is_none())
            });
            ensure!(
                ok,
                "{node}: the agent did not count {want} meshed endpoints within {MESH_TIMEOUT:?}; \
                 last tunnel status: {last}\n{}",
                self.lab.agent_logs_tail(15)
            );
        }
        eprintln!(
            "bench: mesh {} for {} ({:.1?})",
            if on { "on (PERMISSIVE)" } else { "off" },
            self.mesh_namespaces.join(", "),
            t.elapsed()
        );
        Ok(())
    }

    /// (client node, server node); zeros where no agent runs.
    fn counters(&self) -> Result<(Counters, Counters)> {
        if !self.agents {
            return Ok((Counters::default(), Counters::default()));
        }
        Ok((
            Counters::of(&self.lab.status(&self.client.node)?),
            Counters::of(&self.lab.status(&self.server.node)?),
        ))
    }

    /// The agents' counters and the ztunnels' (zeros where none runs).
    fn snapshot(&self) -> Result<Snapshot> {
        let ztunnel = match &self.ztunnels {
            Some(pair) => pair.counters()?,
            None => bench_ztunnel::Counters::default(),
        };
        Ok((self.counters()?, ztunnel))
    }

    fn tunnel_delta(&self, ((c0, s0), z0): Snapshot) -> Result<TunnelDelta> {
        let ((c1, s1), z1) = self.snapshot()?;
        Ok(TunnelDelta {
            ztunnel: bench_ztunnel::Counters {
                captured: z1.captured.saturating_sub(z0.captured),
                delivered: z1.delivered.saturating_sub(z0.delivered),
            },
            outbound_ok: c1.outbound_ok.saturating_sub(c0.outbound_ok),
            outbound_failed: c1.outbound_failed.saturating_sub(c0.outbound_failed),
            inbound_ok: s1.inbound_ok.saturating_sub(s0.inbound_ok),
            inbound_failed: s1.inbound_failed.saturating_sub(s0.inbound_failed),
            local_kernel: c1.local_kernel.saturating_sub(c0.local_kernel),
            local_user: c1.local_user.saturating_sub(c0.local_user),
        })
    }

    /// One sample of every figure, and the path it took.
    fn measure(&mut self, scenario: Scenario) -> Result<Sample> {
        // One port for every run (4-tuples repeat across scenarios, the tunnel's included), or
        // a fresh one per run: `--ports`.
        let port = self.sinks.take()?;
        let target = self.target(scenario).ip4;
        let sink = SocketAddr::new(IpAddr::V4(target), port);
        let before = self.snapshot()?;
        let crr = self.client_json(
            self.load.as_os_str(),
            &[
                "crr",
                "--addr",
                &sink.to_string(),
                "--threads",
                &CRR_THREADS.to_string(),
                "--secs",
                &self.d.crr_secs.to_string(),
            ],
            self.d.crr_secs,
        )?;
        let crr_errors = crr["errors"].as_u64().unwrap_or(0);
        if crr_errors > 0 {
            eprintln!(
                "bench: warning: {}: {crr_errors} failed connections ({})",
                scenario.title(),
                crr["first_error"]
            );
        }
        let rr = self.client_json(
            self.load.as_os_str(),
            &[
                "rr",
                "--addr",
                &SocketAddr::new(IpAddr::V4(target), rules::ECHO_PORT).to_string(),
                "--secs",
                &self.d.rr_secs.to_string(),
                "--size",
                "64",
            ],
            self.d.rr_secs,
        )?;
        let iperf = self.client_json(
            "iperf3".as_ref(),
            &[
                "-c",
                &target.to_string(),
                "-p",
                &rules::IPERF_PORT.to_string(),
                "-t",
                &self.d.iperf_secs.to_string(),
                "-J",
            ],
            f64::from(self.d.iperf_secs),
        )?;
        let bits = iperf["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3 printed no end.sum_received: {iperf}"))?;
        let tunnel = self.tunnel_delta(before)?;
        let connections = crr["connections"].as_u64().context("crr connections")?;
        // crr's, rr's one, iperf3's control and data connections.
        let completed = connections + 3;
        self.check_path(scenario, tunnel, 1)?;
        Ok(Sample {
            gbit_per_sec: bits / 1e9,
            rr_p50_us: rr["p50_us"].as_f64().context("rr p50")?,
            rr_p99_us: rr["p99_us"].as_f64().context("rr p99")?,
            conn_per_sec: crr["per_sec"].as_f64().context("crr per_sec")?,
            completed,
            crr_errors,
            tunnel,
        })
    }

    /// Runs a client in the client pod and parses its (last) JSON output.
    fn client_json(&self, program: &std::ffi::OsStr, args: &[&str], secs: f64) -> Result<Value> {
        crate::bench::pod_json(&self.client, program, args, secs)
    }

    /// The processes that carry `scenario` (the tunnel's agents or the ztunnels): client side,
    /// server side.
    fn carriers(&self, scenario: Scenario) -> Result<[u32; 2]> {
        if scenario == Scenario::Ztunnel {
            return Ok(self
                .ztunnels
                .as_ref()
                .context("no ztunnels running")?
                .pids());
        }
        let pid = |node: &str| {
            self.lab
                .agent_pid(node)
                .with_context(|| format!("no agent on {node}"))
        };
        Ok([pid(&self.client.node)?, pid(&self.server.node)?])
    }

    /// [`HOLD_COUNT`] idle connections through the tunnel (or the ztunnels): RSS before, with
    /// them open and after they closed, CPU over `idle_secs` without and with them, and the
    /// tunnel's open streams.
    fn idle_connections(&mut self, scenario: Scenario) -> Result<Idle> {
        let ztunnel = scenario == Scenario::Ztunnel;
        let pids = self.carriers(scenario)?;
        let nodes = [self.client.node.clone(), self.server.node.clone()];
        // The rounds' connections are gone before "before" is read.
        let (c, s) = (&nodes[0], &nodes[1]);
        let drained = ztunnel
            || wait::eventually(Duration::from_secs(10), Duration::from_millis(100), || {
                self.counters()
                    .is_ok_and(|(cc, sc)| cc.outbound_active == 0 && sc.inbound_active == 0)
            });
        if !drained {
            eprintln!(
                "bench: warning: tunnel streams still open before the idle step: {c} {:?}",
                self.counters().map(|x| x.0)
            );
        }
        let mut idle = [IdleNode::default(), IdleNode::default()];
        for (i, &pid) in pids.iter().enumerate() {
            idle[i].rss_before_kib = proc_kib(pid, "VmRSS:")?;
        }
        let cpu = self.cpu_pct(pids, self.d.idle_secs)?;
        let before = self.snapshot()?;
        for i in 0..2 {
            idle[i].cpu_idle_pct = cpu[i];
        }

        // Held for the CPU window plus room for the status reads around it.
        let hold_secs = self.d.idle_secs + 5;
        let addr = self.server_addr(rules::ECHO_PORT).to_string();
        let mut child = in_pod(
            &self.client,
            self.load.as_os_str(),
            &[
                "hold",
                "--addr",
                &addr,
                "--count",
                &HOLD_COUNT.to_string(),
                "--secs",
                &hold_secs.to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .context("starting nodeward-lab-load hold")?;
        let stdout = child.stdout.take().context("hold's stdout")?;
        let hold = Guard(child);
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = |timeout: Duration| -> Result<Value> {
            let line = lines
                .recv_timeout(timeout)
                .context("nodeward-lab-load hold printed nothing in time")?;
            serde_json::from_str(&line).with_context(|| format!("hold printed {line:?}"))
        };
        let opened_line = line(Duration::from_secs(120))?;
        let held_from = Instant::now();
        let opened = opened_line["opened"].as_u64().unwrap_or(0);
        ensure!(
            opened == HOLD_COUNT as u64,
            "only {opened} of {HOLD_COUNT} connections opened: {opened_line}{}",
            self.logs_if(true)
        );
        let open_secs = opened_line["open_secs"].as_f64().unwrap_or(f64::NAN);
        eprintln!("bench: {opened} connections open and checked in {open_secs:.2} s");
        std::thread::sleep(Duration::from_secs(1));
        let cpu = self.cpu_pct(pids, self.d.idle_secs)?;
        let (cc, sc) = self.counters()?;
        let delta = self.tunnel_delta(before)?;
        for (i, &pid) in pids.iter().enumerate() {
            idle[i].cpu_held_pct = cpu[i];
            idle[i].rss_open_kib = proc_kib(pid, "VmRSS:")?;
            idle[i].hwm_open_kib = proc_kib(pid, "VmHWM:")?;
        }
        idle[0].counters = cc;
        idle[1].counters = sc;
        ensure!(
            held_from.elapsed() < Duration::from_secs(hold_secs),
            "the idle measurements took longer than the hold ({hold_secs} s)"
        );
        if ztunnel {
            ensure!(
                delta.ztunnel.captured >= HOLD_COUNT as u64
                    && delta.ztunnel.delivered >= HOLD_COUNT as u64,
                "the {HOLD_COUNT} connections did not go through the ztunnels: captured +{}, \
                 delivered +{}",
                delta.ztunnel.captured,
                delta.ztunnel.delivered
            );
            eprintln!(
                "bench: idle through ztunnel: {c} RSS {:.1} MiB, {:.1}% CPU; {s} RSS {:.1} MiB, \
                 {:.1}% CPU; {} captured, {} delivered",
                mib(idle[0].rss_open_kib),
                idle[0].cpu_held_pct,
                mib(idle[1].rss_open_kib),
                idle[1].cpu_held_pct,
                delta.ztunnel.captured,
                delta.ztunnel.delivered
            );
        } else {
            ensure!(
                cc.outbound_active >= HOLD_COUNT as u64 && sc.inbound_active >= HOLD_COUNT as u64,
                "the {HOLD_COUNT} connections are not tunnelled: {c} tunnel.outbound.active {}, \
             {s} tunnel.inbound.active {}{}",
                cc.outbound_active,
                sc.inbound_active,
                self.logs_if(true)
            );
            eprintln!(
                "bench: idle: {c} RSS {:.1} MiB, {:.1}% CPU, {} outbound streams over {} pooled connections; {s} RSS {:.1} MiB, {:.1}% CPU, {} inbound streams",
                mib(idle[0].rss_open_kib),
                idle[0].cpu_held_pct,
                cc.outbound_active,
                cc.pooled,
                mib(idle[1].rss_open_kib),
                idle[1].cpu_held_pct,
                sc.inbound_active
            );
        }
        let done = line(Duration::from_secs(hold_secs + 60))?;
        let alive = done["alive"].as_u64().unwrap_or(0);
        if alive < opened {
            eprintln!(
                "bench: warning: {} of {opened} idle connections no longer echo: {done}",
                opened - alive
            );
        }
        drop(hold);
        // Memory once the streams are gone (the pool keeps its connections for its idle time).
        let _ = ztunnel
            || wait::eventually(Duration::from_secs(10), Duration::from_millis(100), || {
                self.counters()
                    .is_ok_and(|(cc, sc)| cc.outbound_active == 0 && sc.inbound_active == 0)
            });
        std::thread::sleep(Duration::from_secs(1));
        for (i, &pid) in pids.iter().enumerate() {
            idle[i].rss_closed_kib = proc_kib(pid, "VmRSS:")?;
        }
        let [client, server] = idle;
        Ok(Idle {
            client,
            server,
            opened,
            open_secs,
            alive,
        })
    }

    /// A `/proc/<agent>/status` field in KiB (`VmRSS:`, `VmHWM:`).
    fn vm_kib(&self, node: &str, field: &str) -> Result<u64> {
        crate::bench::agent_kib(&self.lab, node, field)
    }

    /// The processes' CPU over the next `secs` seconds, in % of one core.
    fn cpu_pct(&self, pids: [u32; 2], secs: u64) -> Result<[f64; 2]> {
        let ticks = |pid: u32| -> Result<u64> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
            Ok(field(14).unwrap_or(0) + field(15).unwrap_or(0))
        };
        let (a0, b0, t0) = (ticks(pids[0])?, ticks(pids[1])?, Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        let (a1, b1) = (ticks(pids[0])?, ticks(pids[1])?);
        let elapsed = t0.elapsed().as_secs_f64();
        let pct = |d: u64| d as f64 / CLK_TCK / elapsed * 100.0;
        Ok([pct(a1.saturating_sub(a0)), pct(b1.saturating_sub(b0))])
    }

    /// Copies both agents' logs to `target/bench-tunnel/` and returns, per node, the number of
    /// WARN and ERROR lines and the first few of them.
    fn keep_agent_logs(&self) -> Result<Vec<LogSummary>> {
        let dir = paths::target_dir().join("bench-tunnel");
        std::fs::create_dir_all(&dir)?;
        let mut out = Vec::new();
        for node in self.lab.node_names() {
            let log = self.lab.agent_log(&node);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let copy = dir.join(format!("{node}.agent.log"));
            std::fs::write(&copy, &text)?;
            let plain = strip_ansi(&text);
            let notable: Vec<&str> = plain
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .collect();
            eprintln!(
                "bench: {node}: {} WARN/ERROR lines in the agent log (copied to {})",
                notable.len(),
                copy.display()
            );
            for l in notable.iter().take(5) {
                eprintln!("  {l}");
            }
            out.push(LogSummary {
                node,
                warnings: notable.iter().filter(|l| l.contains(" WARN ")).count(),
                errors: notable.iter().filter(|l| l.contains(" ERROR ")).count(),
            });
        }
        Ok(out)
    }
}

struct LogSummary {
    node: String,
    warnings: usize,
    errors: usize,
}

/// The log without its colours (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `1000` as `1,000`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Report {
    samples: Samples,
    idle: Idle,
    /// The same through the ztunnels (`--ztunnel`).
    ztunnel_idle: Option<Idle>,
    d: Durations,
    logs: Vec<LogSummary>,
    ports: rules::SinkPorts,
    runtime: Duration,
}

impl Report {
    fn median(&self, scenario: Scenario, figure: Figure) -> f64 {
        median(
            self.samples
                .get(&scenario)
                .into_iter()
                .flatten()
                .map(|s| figure.of(s))
                .collect(),
        )
    }

    fn total<T: Copy + std::iter::Sum<T>>(&self, scenario: Scenario, f: fn(&Sample) -> T) -> T {
        self.samples
            .get(&scenario)
            .into_iter()
            .flatten()
            .map(f)
            .sum()
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        let Machine {
            date,
            cores,
            cpu,
            kernel,
        } = Machine::read();
        let n = thousands(HOLD_COUNT);
        let rounds = match self.d.rounds {
            1 => "One round".to_string(),
            r => format!("Median of {r} rounds"),
        };
        let _ = writeln!(
            out,
            "`cargo xtask bench tunnel` (it rewrites this subsection). Measured {date} on {cores} \
             cores ({cpu}), kernel {kernel}, same lab and caveats as above: a shared and noisy \
             machine, compare the ratios, not the absolute numbers. {rounds} \
             (ABBA order), cross-node pod to pod ({CLIENT} on node-1 to {SERVER} on node-2); \
             ratio to plaintext without an agent in parentheses.\n"
        );
        let cross: Vec<Scenario> = Scenario::CROSS
            .into_iter()
            .filter(|s| self.samples.contains_key(s))
            .collect();
        let titles: Vec<&str> = cross.iter().map(|s| s.title()).collect();
        let _ = writeln!(out, "| figure | {} |", titles.join(" | "));
        let _ = writeln!(out, "| --- |{}", " --- |".repeat(cross.len()));
        for figure in Figure::ALL {
            let base = self.median(Scenario::NoAgent, figure);
            let cells: Vec<String> = cross
                .iter()
                .map(|&s| {
                    let v = self.median(s, figure);
                    if s == Scenario::NoAgent {
                        figure.format(v)
                    } else {
                        format!("{} ({:.2}x)", figure.format(v), v / base)
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", figure.title(), cells.join(" | "));
        }
        let _ = writeln!(
            out,
            "\nSame node ({CLIENT} to {LOCAL_SERVER}, both on node-1); ratio to same-node \
             plaintext without an agent in parentheses:\n"
        );
        let _ = writeln!(
            out,
            "| figure | {} |",
            Scenario::LOCAL.map(Scenario::title).join(" | ")
        );
        let _ = writeln!(out, "| --- |{}", " --- |".repeat(Scenario::LOCAL.len()));
        for figure in Figure::ALL {
            let base = self.median(Scenario::LocalNoAgent, figure);
            let v = self.median(Scenario::LocalTunnel, figure);
            let _ = writeln!(
                out,
                "| {} | {} | {} ({:.2}x) |",
                figure.title(),
                figure.format(base),
                figure.format(v),
                v / base
            );
        }

        let i = &self.idle;
        let (c, s) = (&i.client, &i.server);
        // Per row: nodeward's two agents, then (with `--ztunnel`) the two ztunnels.
        let z = self.ztunnel_idle.as_ref();
        let row = |out: &mut String, title: &str, f: &dyn Fn(&IdleNode) -> String| {
            let mut cells = vec![f(c), f(s)];
            if let Some(z) = z {
                cells.extend([f(&z.client), f(&z.server)]);
            }
            let _ = writeln!(out, "| {title} | {} |", cells.join(" | "));
        };
        let _ = write!(
            out,
            "\n| {n} idle tunnelled connections | node-1 (client's agent) | node-2 \
             (server's agent) |"
        );
        if z.is_some() {
            let _ = write!(
                out,
                " ztunnel, node-1 (client's) | ztunnel in {SERVER}'s namespace (server's) |"
            );
        }
        let _ = writeln!(
            out,
            "\n| --- | --- | --- |{}",
            if z.is_some() { " --- | --- |" } else { "" }
        );
        let _ = writeln!(
            out,
            "| agent RSS after the rounds above (MiB) | {:.1} | {:.1} |{}",
            mib(c.rss_loaded_kib),
            mib(s.rss_loaded_kib),
            if z.is_some() { " | |" } else { "" }
        );
        row(&mut out, "RSS, fresh, before the connections (MiB)", &|x| {
            format!("{:.1}", mib(x.rss_before_kib))
        });
        row(
            &mut out,
            &format!("RSS with {n} open (MiB; peak so far)"),
            &|x| format!("{:.1} ({:.1})", mib(x.rss_open_kib), mib(x.hwm_open_kib)),
        );
        row(&mut out, "RSS after they closed (MiB)", &|x| {
            format!("{:.1}", mib(x.rss_closed_kib))
        });
        row(
            &mut out,
            &format!(
                "CPU over {} s idle, without / with the {n} connections (% of a core)",
                self.d.idle_secs
            ),
            &|x| format!("{:.1}% / {:.1}%", x.cpu_idle_pct, x.cpu_held_pct),
        );
        let _ = writeln!(
            out,
            "| tunnel streams open (`tunnel.outbound.active` / `tunnel.inbound.active`) | {} | {} |{}",
            c.counters.outbound_active,
            s.counters.inbound_active,
            if z.is_some() { " | |" } else { "" }
        );

        let _ = write!(out, "\n{}", self.targets());
        let pod_vs_node: Vec<String> = Figure::ALL
            .iter()
            .map(|&f| {
                format!(
                    "{} {:.2}x",
                    f.title(),
                    self.median(Scenario::TunnelPod, f) / self.median(Scenario::Tunnel, f)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "\nDialling the destination pod's address (`--hbone-dial pod`) against its node's \
             (medians): {}.",
            pod_vs_node.join(", ")
        );

        let mut t = TunnelDelta::default();
        for sample in [Scenario::Tunnel, Scenario::TunnelPod]
            .iter()
            .filter_map(|s| self.samples.get(s))
            .flatten()
        {
            t.add(sample.tunnel);
        }
        let completed = self.total(Scenario::Tunnel, |s| s.completed)
            + self.total(Scenario::TunnelPod, |s| s.completed);
        let errors: Vec<String> = Scenario::ALL
            .iter()
            .map(|&sc| format!("{} {}", sc.short(), self.total(sc, |s| s.crr_errors)))
            .collect();
        let mut local = TunnelDelta::default();
        for sample in self
            .samples
            .get(&Scenario::LocalTunnel)
            .into_iter()
            .flatten()
        {
            local.add(sample.tunnel);
        }
        let _ = writeln!(
            out,
            "\nSame node: over the fast-path rounds node-1's `tunnel.local.kernel` rose by {} \
             and `tunnel.local.user` (user-space copies) by {} for {} connections the client \
             completed; no TLS, the two sockets joined by the sockmap redirect (a connection the \
             server had closed before the join, as crr's do, is copied in user space).",
            local.local_kernel,
            local.local_user,
            self.total(Scenario::LocalTunnel, |s| s.completed)
        );
        let logs: Vec<String> = self
            .logs
            .iter()
            .map(|l| format!("{} {} WARN / {} ERROR", l.node, l.warnings, l.errors))
            .collect();
        let _ = writeln!(
            out,
            "\nThe path, from the agents' counters: over the tunnel rounds node-1's \
             `tunnel.outbound.ok` rose by {} (failed +{}) and node-2's `tunnel.inbound.ok` by {} \
             (failed +{}) for {completed} connections the client completed; in the L3/L4 rounds \
             neither moved. Failed connections in crr: {}. The {n} idle connections opened (each \
             checked by an echo) in {:.2} s over {} pooled HBONE connections, and {} of the {} \
             still echoed after the idle period. Agent log lines over the run: {}.",
            t.outbound_ok,
            t.outbound_failed,
            t.inbound_ok,
            t.inbound_failed,
            errors.join(", "),
            i.open_secs,
            c.counters.pooled,
            i.alive,
            i.opened,
            if logs.is_empty() {
                "not read".to_string()
            } else {
                logs.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "\nHow: no agent is both agents stopped and their pinned state removed (`nodeward \
             cleanup`); L3/L4 is both agents running with no `MutualTLS` (`--mtls-mode DISABLE`, \
             no policy selects the pods); the tunnel is the same agents with a PERMISSIVE \
             `MutualTLS` for {} (entered once both agents' `tunnel.meshed_endpoints` equal their \
             local pods there). Bulk is `iperf3 -t {}`, one stream; request/response is one \
             connection, 64-byte messages, one in flight, {} s (`nodeward-lab-load rr`); \
             connections/s is `nodeward-lab-load crr` ({CRR_THREADS} threads, {} s: connect, \
             the server accepts and closes, the client closes; {}). \
             Every tunnel sample must raise node-1's `tunnel.outbound.ok` and node-2's \
             `tunnel.inbound.ok` and every L3/L4 sample must leave them alone, or the run \
             fails. Idle connections: `nodeward-lab-load hold` opens {n} connections \
             one after another from {CLIENT} to the server's echo port through the tunnel and \
             holds them; RSS is VmRSS (peak VmHWM) of each agent from `/proc/<pid>/status` \
             (the agents are restarted on their pinned state after the rounds, so that what the \
             rounds' load left in their memory is not counted; before is then, with the mesh \
             counted and one probe connection through the tunnel), CPU its utime + stime \
             over {} s, once without connections and once 1 s after all {n} were open; \
             the run fails unless node-1's `tunnel.outbound.active` and node-2's \
             `tunnel.inbound.active` are at least {n} then. The agents are the release build; the \
             client, the server and both agents share the machine's {cores} cores, so the \
             tunnel's user-space copying competes with the load it carries. Whole run: {:.0?}.",
            self.mesh_namespaces_text(),
            self.d.iperf_secs,
            self.d.rr_secs,
            self.d.crr_secs,
            self.ports.describe(),
            self.d.idle_secs,
            self.runtime
        );
        if self.ztunnel_idle.is_some() {
            let mut z = TunnelDelta::default();
            for sample in self.samples.get(&Scenario::Ztunnel).into_iter().flatten() {
                z.add(sample.tunnel);
            }
            let _ = writeln!(
                out,
                "\nztunnel (`--ztunnel PATH`, built outside this project with rustls/ring; \
                 DEVELOPERS.md): the agents stopped as for plaintext, one ztunnel in node-1's \
                 namespace for {CLIENT} (an nftables `dnat` there sends the client pod's TCP to \
                 the server to its port 15001) and one in {SERVER}'s network namespace (HBONE \
                 terminated on 15008, delivered over loopback: ztunnel's inbound accepts a \
                 CONNECT only for the address it was reached at), in dedicated mode with its fake \
                 CA, a static local config (both pods HBONE, no policy), access logs off and \
                 its default 2 worker threads. Over its rounds the capture rule counted {} \
                 connections and the server ztunnel delivered {} \
                 (`istio_tcp_connections_opened_total`), for {} the client completed; every \
                 sample must raise both. Its idle step is the same `hold` through a fresh pair.",
                z.ztunnel.captured,
                z.ztunnel.delivered,
                self.total(Scenario::Ztunnel, |s| s.completed)
            );
        }
        out
    }

    /// Issue 30's targets, each PASS or MISSED with its figures. Cross-node, the tunnel is the
    /// default `--hbone-dial pod`, which dials the destination pod's address as ztunnel does.
    fn targets(&self) -> String {
        let mut out = String::from(
            "Targets (cross-node: the tunnel as it runs by default, `--hbone-dial pod`):\n",
        );
        let verdict = |ok: bool| if ok { "PASS" } else { "**MISSED**" };
        let m = |s, f| self.median(s, f);
        let mut line = |ok: bool, text: String| {
            let _ = writeln!(out, "- {}: {text}", verdict(ok));
        };
        for (figure, at_least, ratio, what) in [
            (Figure::Bulk, true, TARGET_BULK_RATIO, "cross-node bulk"),
            (Figure::P50, false, TARGET_P50_RATIO, "cross-node p50"),
            (
                Figure::Crr,
                true,
                TARGET_CRR_RATIO,
                "cross-node new connections/s",
            ),
        ] {
            let (v, base) = (m(Scenario::TunnelPod, figure), m(Scenario::NoAgent, figure));
            let ok = if at_least {
                v >= ratio * base
            } else {
                v <= ratio * base
            };
            line(
                ok,
                format!(
                    "{what} {} {ratio}x of plaintext: {} against {} ({:.2}x)",
                    if at_least { "at least" } else { "at most" },
                    figure.format(v),
                    figure.format(base),
                    v / base
                ),
            );
        }
        for (figure, what) in [
            (Figure::Bulk, "same-node bulk"),
            (Figure::Crr, "same-node new connections/s"),
        ] {
            let (v, base) = (
                m(Scenario::LocalTunnel, figure),
                m(Scenario::LocalNoAgent, figure),
            );
            line(
                v >= TARGET_LOCAL_RATIO * base,
                format!(
                    "{what} at least {TARGET_LOCAL_RATIO}x of same-node plaintext: {} against \
                     {} ({:.2}x)",
                    figure.format(v),
                    figure.format(base),
                    v / base
                ),
            );
        }
        let Some(z) = &self.ztunnel_idle else {
            let _ = writeln!(
                out,
                "- not measured: the tunnel ahead of ztunnel (run with `--ztunnel PATH`)"
            );
            return out;
        };
        for figure in Figure::ALL {
            let (v, zv) = (m(Scenario::TunnelPod, figure), m(Scenario::Ztunnel, figure));
            let lower_is_better = matches!(figure, Figure::P50 | Figure::P99);
            line(
                if lower_is_better { v < zv } else { v > zv },
                format!(
                    "cross-node {} ahead of ztunnel: nodeward {} against ztunnel {} ({:.2}x)",
                    figure.title(),
                    figure.format(v),
                    figure.format(zv),
                    v / zv
                ),
            );
        }
        let (i, zi) = (&self.idle, z);
        for (what, ours, theirs) in [
            (
                "fresh",
                i.client.rss_before_kib.max(i.server.rss_before_kib),
                zi.client.rss_before_kib.max(zi.server.rss_before_kib),
            ),
            (
                "with the connections open",
                i.client.rss_open_kib.max(i.server.rss_open_kib),
                zi.client.rss_open_kib.max(zi.server.rss_open_kib),
            ),
        ] {
            line(
                ours < theirs,
                format!(
                    "RSS below ztunnel's, {what} (the larger of each pair): nodeward {:.1} MiB \
                     against ztunnel {:.1} MiB",
                    mib(ours),
                    mib(theirs)
                ),
            );
        }
        out
    }

    fn mesh_namespaces_text(&self) -> String {
        let client = CLIENT.split('/').next().unwrap_or_default();
        let server = SERVER.split('/').next().unwrap_or_default();
        if client == server {
            format!("`{client}`")
        } else {
            format!("`{client}` and `{server}`")
        }
    }
}

/// Replaces (or appends) the "### Tunnel" subsection of README's Benchmarks section.
fn update_readme(table: &str) -> Result<()> {
    crate::bench::update_readme_subsection("Tunnel", table)
}
