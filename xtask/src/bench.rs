//! `cargo xtask bench datapath`: on one 2-node lab, cross-node pod to pod (client on node-1,
//! server on node-2), side by side in one invocation:
//!
//! - no agent (agents stopped and their pinned state removed: nothing attached),
//! - the hooks' floor: no agent, a pass-only program where nodeward attaches its classifiers
//!   (`bench_floor`), the least any program at those hooks can cost,
//! - nodeward with 1 policy (the client's allow),
//! - nodeward with 10,000 rules over 1,000 identities (plus the client's allow),
//! - the same 10,000 rules with both agents stopped: the pinned programs and maps keep enforcing
//!   and nobody reads flow events, which splits nodeward's cost into the datapath's and the
//!   agents',
//! - no agent, the same 10,000 rules as iptables in the server node's FORWARD chain, with the
//!   conntrack shortcut first.
//!
//! Each scenario: new TCP connections per second (connect, accept, close), request/response
//! latency p50/p99 over one connection, bulk throughput (iperf3). Scenarios run in rounds in
//! ABBA order and each figure is the median over the rounds. Then, with 1,000 pods in the
//! manifests: policy change to enforcement latency, and the agents' RSS.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use nodeward_lab::manifests::documents;
use nodeward_lab::{Lab, LabSpec, PodState, paths, sys, wait};
use serde_json::Value;

use crate::bench_flip::Prober;
use crate::bench_floor::PassPrograms;
use crate::bench_rules::{self as rules, Target};

const CLIENT: &str = "frontend/web-0";
const SERVER: &str = "backend/api-1";
/// Same namespace as the server's client, but not allowed: the "is anything enforced" check.
const OUTSIDER: &str = "backend/api-0";
const ROUNDS: usize = 7;
const CRR_SECS: f64 = 2.0;
const CRR_THREADS: u32 = 4;
pub(crate) const RR_SECS: f64 = 1.5;
/// Both ends of the request/response test run on this CPU: a round trip is then the path's own
/// cost, without waking an idle CPU of this VM (which alone takes about 100 µs here, at random).
pub(crate) const RR_CPU: &str = "0";
const IPERF_SECS: u32 = 2;
const FLIP_CHANGES: usize = 20;
const IPT_CHAIN: &str = "NWBENCH";
/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux architecture this runs on.
pub(crate) const CLK_TCK: f64 = 100.0;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// Agents stopped, nothing attached.
    NoAgent,
    /// No agent, a pass-only program at every hook nodeward uses.
    Floor,
    /// The agents with the client's allow.
    #[value(name = "nodeward-1")]
    Nodeward1,
    /// The agents with 10k rules over 1,000 identities, and the client's allow.
    #[value(name = "nodeward-10k")]
    Nodeward10k,
    /// As nodeward-10k with eBPF host routing off (`--host-routing kernel`).
    #[value(name = "nodeward-10k-kernel")]
    Nodeward10kKernel,
    /// The 10k rules pinned and enforcing, both agents stopped.
    #[value(name = "datapath-10k")]
    Datapath10k,
    /// No agent, the 10k rules as iptables rules.
    #[value(name = "iptables-10k")]
    Iptables10k,
}

impl Scenario {
    const ALL: [Self; 7] = [
        Self::NoAgent,
        Self::Floor,
        Self::Nodeward1,
        Self::Nodeward10k,
        Self::Nodeward10kKernel,
        Self::Datapath10k,
        Self::Iptables10k,
    ];

    fn title(self) -> &'static str {
        match self {
            Self::NoAgent => "no agent",
            Self::Floor => "pass-only programs (the hooks' floor)",
            Self::Nodeward1 => "nodeward, 1 policy",
            Self::Nodeward10k => "nodeward, 10k rules",
            Self::Nodeward10kKernel => "nodeward, 10k rules, host routing off",
            Self::Datapath10k => "datapath only, 10k rules (agents stopped)",
            Self::Iptables10k => "iptables, 10k rules",
        }
    }
}

/// ABBA: drift over the run affects every scenario alike. Every round ends or starts with 10k
/// rules and the agents running, which is where the figures after the rounds are taken.
const ORDER: [[Scenario; 7]; 2] = [
    [
        Scenario::NoAgent,
        Scenario::Floor,
        Scenario::Iptables10k,
        Scenario::Nodeward1,
        Scenario::Datapath10k,
        Scenario::Nodeward10kKernel,
        Scenario::Nodeward10k,
    ],
    [
        Scenario::Nodeward10k,
        Scenario::Nodeward10kKernel,
        Scenario::Datapath10k,
        Scenario::Nodeward1,
        Scenario::Iptables10k,
        Scenario::Floor,
        Scenario::NoAgent,
    ],
];

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    conn_per_sec: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    gbit_per_sec: f64,
    /// CPU of both agents during the connections test, in % of one core.
    agent_cpu_pct: f64,
}

/// What the TC programs cost per connection, by the kernel's own accounting.
struct BpfCost {
    conn_per_sec: f64,
    runs_per_conn: f64,
    ns_per_run: f64,
    /// The request/response run's p50 (with the accounting's own cost in it).
    rr_p50_us: f64,
    runs_per_trip: f64,
    rr_ns_per_run: f64,
    cores: f64,
}

/// `kernel.bpf_stats_enabled` set while this lives; the previous value back on drop. The
/// accounting reads the clock twice per program run (an expensive read in a VM): it is off for
/// the rounds, whatever the machine had, and on only where the benchmark asks for it.
pub(crate) struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(crate) fn set(on: bool) -> Result<Self> {
        let previous =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        let value = if on { "1" } else { "0" };
        std::fs::write(BPF_STATS, value)
            .with_context(|| format!("writing {value} to {BPF_STATS}"))?;
        Ok(Self {
            previous: previous.trim().to_string(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.previous) {
            eprintln!("bench: restoring {BPF_STATS} to {}: {e}", self.previous);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Figure {
    Crr,
    P50,
    P99,
    Bulk,
}

impl Figure {
    const ALL: [Self; 4] = [Self::Crr, Self::P50, Self::P99, Self::Bulk];

    fn of(self, s: &Sample) -> f64 {
        match self {
            Self::Crr => s.conn_per_sec,
            Self::P50 => s.rr_p50_us,
            Self::P99 => s.rr_p99_us,
            Self::Bulk => s.gbit_per_sec,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Crr => "new TCP connections/s",
            Self::P50 => "request/response p50 (µs)",
            Self::P99 => "request/response p99 (µs)",
            Self::Bulk => "bulk throughput (Gbit/s)",
        }
    }

    fn higher_is_better(self) -> bool {
        matches!(self, Self::Crr | Self::Bulk)
    }

    fn format(self, v: f64) -> String {
        match self {
            Self::Crr => format!("{v:.0}"),
            Self::P50 | Self::P99 => format!("{v:.1}"),
            Self::Bulk => format!("{v:.2}"),
        }
    }
}

/// Where the lab is: which of the four set-ups is in force.
#[derive(Default)]
struct Setup {
    agents: bool,
    /// The agents' pinned programs and maps are in bpffs (enforcing even with the agents
    /// stopped).
    pinned: bool,
    iptables: bool,
    ten_k: bool,
    /// The agents (running or last run) have eBPF host routing off (`--host-routing kernel`).
    kernel_routing: bool,
    /// The pass-only programs, attached while this is held.
    floor: Option<PassPrograms>,
}

/// The processes the benchmark started in the lab; killed (by pid) on the way out.
#[derive(Default)]
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Bench {
    lab: Lab,
    load: PathBuf,
    nodeward: PathBuf,
    client: PodState,
    server: PodState,
    outsider: PodState,
    server_node: String,
    target_ips: Vec<std::net::Ipv4Addr>,
    setup: Setup,
    sinks: rules::Sinks,
    iptables_nft: bool,
}

/// The release binaries (`nodeward`, `nodeward-lab-load`, ...) and the benchmarks' lab.
pub(crate) struct ReleaseLab {
    pub lab: Lab,
    pub nodeward: PathBuf,
    pub load: PathBuf,
    pub client: PodState,
    pub server: PodState,
}

/// Builds the release binaries and a 2-node lab without agents (the benchmarks start and stop
/// them), with `client` and `server` (`namespace/name`) on different nodes.
pub(crate) fn release_lab(client: &str, server: &str) -> Result<ReleaseLab> {
    crate::cargo(&["build", "--release", "--bins"])?;
    let release = paths::target_dir().join("release");
    let nodeward = release.join("nodeward");
    // SAFETY: set before the benchmark starts any thread; the lab reads these to find its
    // binaries, and a benchmark measures the release build.
    unsafe {
        std::env::set_var("NODEWARD_BIN", &nodeward);
        std::env::set_var("NODEWARD_ECHO_BIN", release.join("nodeward-lab-echo"));
    }
    let lab = Lab::up(&LabSpec {
        name: None,
        nodes: 2,
        namespaces: 2,
        pods: 2,
        agents: false,
        ipv6: false,
        persistent: false,
    })?;
    let client = lab.pod(client).clone();
    let server = lab.pod(server).clone();
    ensure!(
        client.node != server.node,
        "the client and the server must be on different nodes"
    );
    Ok(ReleaseLab {
        lab,
        nodeward,
        load: release.join("nodeward-lab-load"),
        client,
        server,
    })
}

/// What the figures were measured on, for the README.
pub(crate) struct Machine {
    pub date: String,
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
}

impl Machine {
    pub(crate) fn read() -> Self {
        let date = sys::run(Command::new("date").args(["-u", "+%Y-%m-%d"]))
            .map(|d| d.trim().to_string())
            .unwrap_or_default();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
        let kernel = sys::run(Command::new("uname").arg("-r"))
            .map(|k| k.trim().to_string())
            .unwrap_or_default();
        Self {
            date,
            cores,
            cpu,
            kernel,
        }
    }
}

/// `cargo xtask bench datapath --control-plane`: the policy change latency and the agents' RSS,
/// at the lab's size and with 1,000 pods and 10k rules, printed (a quick loop for work on the
/// agent's reconciliation; the full run measures the same things the same way).
pub fn run_control_plane() -> Result<()> {
    let started = Instant::now();
    // No connections runs here: the port choice does not matter.
    let (mut bench, servers) = Bench::up(rules::SinkPorts::Reuse)?;
    bench.enter(Scenario::Nodeward1)?;
    let small = bench.change_latency()?;
    let rss_small = bench.rss()?;
    bench.enter(Scenario::Nodeward10k)?;
    let large = bench.change_latency()?;
    let rss_large = bench.rss()?;
    let status = bench.lab.status(&bench.server_node)?;
    let line = |latencies: &[Duration], rss: Rss| {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "change to enforced p50 {:.1} / p99 {:.1} ms; server agent RSS {:.1} MiB (peak {:.1}; anon {:.1}, file-backed {:.1})",
            ms(percentile(latencies, 50.0)),
            ms(percentile(latencies, 99.0)),
            rss.server_kib as f64 / 1024.0,
            rss.server_peak_kib as f64 / 1024.0,
            rss.server_anon_kib as f64 / 1024.0,
            rss.server_file_kib as f64 / 1024.0,
        )
    };
    println!("lab only: {}", line(&small, rss_small));
    println!(
        "1,000 pods, 10k rules: {}; last sync {} ms, phases {}",
        line(&large, rss_large),
        status["last_sync"]["duration_ms"],
        status["last_sync"]["phases_ms"],
    );
    drop(servers);
    drop(bench);
    println!(
        "bench datapath --control-plane took {:.0?}",
        started.elapsed()
    );
    Ok(())
}

impl Bench {
    /// The release lab with the load servers running in the server pod.
    fn up(ports: rules::SinkPorts) -> Result<(Self, Servers)> {
        let iptables_nft = sys::run(Command::new("iptables").arg("-V"))?.contains("nf_tables");
        let ReleaseLab {
            lab,
            nodeward,
            load,
            client,
            server,
        } = release_lab(CLIENT, SERVER)?;
        let outsider = lab.pod(OUTSIDER).clone();
        let target_ips = lab
            .pods()
            .iter()
            .filter(|p| p.namespace == client.namespace && p.labels["app"] == client.labels["app"])
            .map(|p| p.ip4)
            .collect();
        let bench = Bench {
            server_node: server.node.clone(),
            lab,
            load,
            nodeward,
            client,
            server,
            outsider,
            target_ips,
            setup: Setup::default(),
            sinks: rules::Sinks::new(ports),
            iptables_nft,
        };
        let servers = bench.start_servers()?;
        // The client makes ~100k connections over the run: give it every port.
        sys::sysctls(
            &bench.client.netns,
            &[("net/ipv4/ip_local_port_range".to_string(), "10000 65000")],
        )?;
        Ok((bench, servers))
    }
}

/// `cargo xtask bench datapath --hold SCENARIO`: puts the lab into one scenario and repeats the
/// connections test `runs` times, printing each rate, so a profiler (`perf record -a`) can watch
/// the machine under that load; then one sample of every figure. README.md is left alone.
pub fn run_held(scenario: Scenario, runs: usize, ports: rules::SinkPorts) -> Result<()> {
    let _stats = BpfStats::set(false)?;
    let (mut bench, servers) = Bench::up(ports)?;
    bench.enter(scenario)?;
    for run in 1..=runs {
        let crr = bench.crr()?;
        let rate = crr["per_sec"].as_f64().context("crr per_sec")?;
        println!("{} run {run}/{runs}: {rate:.0} conn/s", scenario.title());
    }
    let s = bench.measure()?;
    println!(
        "{}: {:.0} conn/s, rr p50 {:.2} µs p99 {:.2} µs, {:.2} Gbit/s",
        scenario.title(),
        s.conn_per_sec,
        s.rr_p50_us,
        s.rr_p99_us,
        s.gbit_per_sec
    );
    drop(servers);
    Ok(())
}

pub fn run(ports: rules::SinkPorts, quick: bool) -> Result<()> {
    let rounds = if quick { 2 } else { ROUNDS };
    let started = Instant::now();
    let _stats = BpfStats::set(false)?;
    let (mut bench, servers) = Bench::up(ports)?;
    eprintln!("bench: connections runs: {}", ports.describe());

    let mut samples: BTreeMap<Scenario, Vec<Sample>> = BTreeMap::new();
    let mut flip_small = None;
    let mut rss_small = None;
    for round in 0..rounds {
        for &scenario in &ORDER[round % 2] {
            bench.enter(scenario)?;
            if round == rounds - 1 && scenario == Scenario::Nodeward1 {
                // Reference figures at the lab's own size, before the 1,000 pods arrive.
                flip_small = Some(bench.change_latency()?);
                rss_small = Some(bench.rss()?);
            }
            let sample = bench.measure()?;
            eprintln!(
                "bench: round {} {:<22} {:>8.0} conn/s  rr p50 {:>6.1} µs p99 {:>6.1} µs  {:>6.2} Gbit/s  agents {:>3.0}% CPU",
                round + 1,
                scenario.title(),
                sample.conn_per_sec,
                sample.rr_p50_us,
                sample.rr_p99_us,
                sample.gbit_per_sec,
                sample.agent_cpu_pct
            );
            samples.entry(scenario).or_default().push(sample);
        }
    }
    // The last round ends (or, with --quick, starts) with 10k rules.
    bench.enter(Scenario::Nodeward10k)?;
    let flip_large = bench.change_latency()?;
    let rss_large = bench.rss()?;
    let bpf = bench.bpf_cost()?;
    eprintln!(
        "bench: BPF at 10k rules: {:.1} program runs per connection, {:.0} ns per run; \
         {:.1} runs per round trip, {:.0} ns per run",
        bpf.runs_per_conn, bpf.ns_per_run, bpf.runs_per_trip, bpf.rr_ns_per_run
    );
    let status = bench.lab.status(&bench.server_node)?;
    let entries = policy_entries(&status);
    let identities = status["identities"].as_u64().unwrap_or(0);
    let flows_stored = status["flows"]["stored"].as_u64().unwrap_or(0);
    let sync_ms = status["last_sync"]["duration_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);
    // Memory at the same size without the flows the load left in the agents' buffers: fresh
    // agents adopting the pinned state.
    bench.stop_agents(false)?;
    bench.start_agents()?;
    bench.wait_applied(true)?;
    let rss_fresh = bench.rss()?;

    let report = Report {
        samples,
        flip_small: flip_small.context("no small-size change latency")?,
        flip_large,
        rss_small: rss_small.context("no small-size RSS")?,
        rss_large,
        bpf,
        rss_fresh,
        flows_stored,
        sync_ms,
        policy_entries: entries,
        identities,
        iptables: if bench.iptables_nft {
            "iptables-nft"
        } else {
            "iptables-legacy"
        },
        ports: bench.sinks.mode(),
        runtime: started.elapsed(),
    };
    drop(servers);
    drop(bench);
    let table = report.markdown();
    println!("\n{table}");
    if quick {
        println!("--quick: README.md left alone.");
        return Ok(());
    }
    update_readme(&table)?;
    println!(
        "README.md: Benchmarks updated. bench datapath took {:.0?}",
        started.elapsed()
    );
    Ok(())
}

impl Bench {
    /// The load server (sink and echo ports) and iperf3 in the server pod.
    fn start_servers(&self) -> Result<Servers> {
        let mut servers = Servers::default();
        servers.0.push(
            load_server(&self.server, self.load.as_os_str(), rules::TOGGLE_PORT)
                .spawn()
                .context("starting the load server")?,
        );
        let port = rules::IPERF_PORT.to_string();
        let mut iperf = in_pod(&self.server, "iperf3".as_ref(), &["-s", "-p", &port]);
        servers.0.push(
            iperf
                .stdout(Stdio::null())
                .spawn()
                .context("starting iperf3 -s")?,
        );
        for port in [rules::ECHO_PORT, rules::IPERF_PORT, rules::TOGGLE_PORT] {
            let addr = self.server_addr(port);
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
        Ok(servers)
    }

    fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.server.ip4), port)
    }

    fn target(&self) -> Target<'_> {
        Target {
            namespace: &self.server.namespace,
            instance: &self.server.labels["instance"],
            ip: self.server.ip4,
            client_namespace: &self.client.namespace,
            client_app: &self.client.labels["app"],
            client_ips: self.target_ips.clone(),
        }
    }

    /// Moves the lab to `scenario` from wherever it is, and checks that it took.
    fn enter(&mut self, scenario: Scenario) -> Result<()> {
        let t = Instant::now();
        if scenario != Scenario::Floor {
            // Detaches them.
            self.setup.floor = None;
        }
        match scenario {
            Scenario::NoAgent | Scenario::Iptables10k | Scenario::Floor => {
                self.stop_agents(true)?;
                if scenario == Scenario::Iptables10k {
                    self.iptables_on()?;
                } else {
                    self.iptables_off()?;
                }
                if scenario == Scenario::Floor && self.setup.floor.is_none() {
                    let programs = PassPrograms::attach(&self.lab)?;
                    eprintln!("bench: {} pass-only tcx links attached", programs.count());
                    self.setup.floor = Some(programs);
                }
            }
            Scenario::Nodeward1
            | Scenario::Nodeward10k
            | Scenario::Nodeward10kKernel
            | Scenario::Datapath10k => {
                let ten_k = scenario != Scenario::Nodeward1;
                let kernel = scenario == Scenario::Nodeward10kKernel;
                self.iptables_off()?;
                if self.setup.pinned && self.setup.kernel_routing != kernel {
                    // The routing mode is the agent's start-up flag: restart them with it.
                    self.stop_agents(false)?;
                    self.setup.pinned = false;
                }
                let args: &[&str] = if kernel {
                    &["--host-routing", "kernel"]
                } else {
                    &[]
                };
                self.lab.set_agent_args(args);
                self.setup.kernel_routing = kernel;
                if !(ten_k && self.setup.ten_k && self.setup.pinned) {
                    self.write_policies(ten_k)?;
                    self.start_agents()?;
                }
                if scenario == Scenario::Datapath10k {
                    if self.setup.agents {
                        self.wait_applied(true)?;
                    }
                    self.stop_agents(false)?;
                } else {
                    self.start_agents()?;
                    self.wait_applied(ten_k)?;
                }
            }
        }
        // Allowed stays allowed; the outsider gets through only without enforcement.
        let enforced = !matches!(scenario, Scenario::NoAgent | Scenario::Floor);
        let http = rules::LAB_HTTP_PORT;
        ensure!(
            self.lab
                .tcp_probe(CLIENT, SERVER, http, Duration::from_secs(1)),
            "{}: the client cannot reach the server",
            scenario.title()
        );
        let outsider_ok = self.lab.tcp_probe(
            &self.outsider.key(),
            SERVER,
            http,
            Duration::from_millis(300),
        );
        ensure!(
            outsider_ok != enforced,
            "{}: the outsider {} reach the server",
            scenario.title(),
            if outsider_ok { "can" } else { "cannot" }
        );
        eprintln!("bench: {} in force ({:.1?})", scenario.title(), t.elapsed());
        Ok(())
    }

    /// Stops the agents; with `unpin`, also removes their pinned state, so nothing is attached.
    fn stop_agents(&mut self, unpin: bool) -> Result<()> {
        if self.setup.agents {
            for node in self.lab.node_names() {
                self.lab.stop_agent(&node)?;
            }
            self.setup.agents = false;
        }
        if !unpin || !self.setup.pinned {
            return Ok(());
        }
        for node in self.lab.node_names() {
            crate::bench::remove_pins(&self.lab, &self.nodeward, &node)?;
        }
        self.setup.pinned = false;
        Ok(())
    }

    fn start_agents(&mut self) -> Result<()> {
        if self.setup.agents {
            return Ok(());
        }
        for node in self.lab.node_names() {
            self.lab.start_agent(&node)?;
        }
        self.setup.agents = true;
        self.setup.pinned = true;
        Ok(())
    }

    fn write_policies(&mut self, ten_k: bool) -> Result<()> {
        let t = self.target();
        let allow = rules::client_allow(&t, "bench-allow-client", &rules::client_ports());
        // The toggled policy starts "off": it allows a port nothing uses.
        let toggle = self.toggle_policy(false);
        let rules_yaml = ten_k.then(|| documents(rules::rule_policies(&t)));
        self.lab
            .write_manifest("bench-allow", &documents([allow]))?;
        self.lab.write_manifest("bench-toggle", &toggle)?;
        if let Some(yaml) = rules_yaml {
            self.lab
                .write_manifest("bench-peers", &documents(rules::peer_objects()))?;
            self.lab.write_manifest("bench-rules", &yaml)?;
        } else if self.setup.ten_k {
            self.lab.remove_manifest("bench-rules")?;
            self.lab.remove_manifest("bench-peers")?;
        }
        self.setup.ten_k = ten_k;
        Ok(())
    }

    fn toggle_policy(&self, on: bool) -> String {
        let port = if on {
            rules::TOGGLE_PORT
        } else {
            rules::TOGGLE_PORT + 1
        };
        documents([rules::client_allow(
            &self.target(),
            "bench-toggle",
            &[(port, None)],
        )])
    }

    /// Waits until the server's agent has the policies in its maps.
    fn wait_applied(&self, ten_k: bool) -> Result<()> {
        let min_entries = if ten_k { rules::rule_count() } else { 1 };
        let max_entries = if ten_k { usize::MAX } else { 100 };
        let policies = if ten_k { 2 + rules::POLICIES } else { 2 };
        let mut last = Value::Null;
        let ok = wait::eventually(Duration::from_secs(30), Duration::from_millis(100), || {
            let Ok(status) = self.lab.status(&self.server_node) else {
                return false;
            };
            let entries = policy_entries(&status);
            let applied = status["policies"]["applied"].as_u64() == Some(policies as u64);
            last = status;
            applied && entries >= min_entries && entries <= max_entries
        });
        ensure!(
            ok,
            "the agent of {} did not apply the benchmark's policies; last status: {last}",
            self.server_node
        );
        let failed = &last["policies"]["failed"];
        ensure!(
            failed.as_array().is_none_or(Vec::is_empty)
                && last["manifest_errors"] == serde_json::json!([]),
            "policy errors: {failed} {}",
            last["manifest_errors"]
        );
        Ok(())
    }

    fn node_netns(&self) -> String {
        self.lab.node(&self.server_node).netns.clone()
    }

    fn iptables_on(&mut self) -> Result<()> {
        if self.setup.iptables {
            return Ok(());
        }
        let text = rules::iptables_restore(&self.target(), IPT_CHAIN);
        let path = self
            .lab
            .state()
            .dir
            .join("tmp")
            .join("bench-iptables.rules");
        std::fs::write(&path, text)?;
        let t = Instant::now();
        sys::run_timeout(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.node_netns(),
                    "iptables-restore",
                    "--noflush",
                ])
                .arg(&path),
            Duration::from_secs(60),
        )
        .context("loading the iptables rules into the server's node")?;
        eprintln!(
            "bench: {} iptables rules loaded in {:.1?}",
            rules::rule_count() + 4,
            t.elapsed()
        );
        self.setup.iptables = true;
        Ok(())
    }

    fn iptables_off(&mut self) -> Result<()> {
        if !self.setup.iptables {
            return Ok(());
        }
        let ns = self.node_netns();
        if self.iptables_nft {
            // The whole table: an empty base chain would still be a hook on every packet.
            sys::run(Command::new("ip").args([
                "netns", "exec", &ns, "nft", "delete", "table", "ip", "filter",
            ]))?;
        } else {
            for args in [
                vec!["-D", "FORWARD", "-j", IPT_CHAIN],
                vec!["-F", IPT_CHAIN],
                vec!["-X", IPT_CHAIN],
            ] {
                sys::run(
                    Command::new("ip")
                        .args(["netns", "exec", &ns, "iptables"])
                        .args(&args),
                )?;
            }
        }
        self.setup.iptables = false;
        Ok(())
    }

    /// One sample of every figure.
    fn measure(&mut self) -> Result<Sample> {
        let (cpu0, t0) = (self.agent_cpu_ticks(), Instant::now());
        let crr = self.crr()?;
        let ticks = self.agent_cpu_ticks().saturating_sub(cpu0);
        let agent_cpu_pct = ticks as f64 / CLK_TCK / t0.elapsed().as_secs_f64() * 100.0;
        let errors = crr["errors"].as_u64().unwrap_or(0);
        if errors > 0 {
            eprintln!(
                "bench: warning: {errors} failed connections ({})",
                crr["first_error"]
            );
        }
        let rr = self.rr()?;
        let iperf = self.client_json(
            "iperf3".as_ref(),
            &[
                "-c",
                &self.server.ip4.to_string(),
                "-p",
                &rules::IPERF_PORT.to_string(),
                "-t",
                &IPERF_SECS.to_string(),
                "-J",
            ],
            f64::from(IPERF_SECS),
        )?;
        let bits = iperf["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3 printed no end.sum_received: {iperf}"))?;
        Ok(Sample {
            conn_per_sec: crr["per_sec"].as_f64().context("crr per_sec")?,
            rr_p50_us: rr["p50_us"].as_f64().context("rr p50")?,
            rr_p99_us: rr["p99_us"].as_f64().context("rr p99")?,
            gbit_per_sec: bits / 1e9,
            agent_cpu_pct,
        })
    }

    /// The request/response test (`nodeward-lab-load rr`) on one connection to the echo port.
    fn rr(&self) -> Result<Value> {
        self.client_json(
            self.load.as_os_str(),
            &rr_args(self.server_addr(rules::ECHO_PORT))
                .each_ref()
                .map(String::as_str),
            RR_SECS,
        )
    }

    /// The connections test (`nodeward-lab-load crr`) against the sink port `--ports` picks.
    fn crr(&mut self) -> Result<Value> {
        let port = self.sinks.take()?;
        let sink = self.server_addr(port);
        self.client_json(
            self.load.as_os_str(),
            &[
                "crr",
                "--addr",
                &sink.to_string(),
                "--threads",
                &CRR_THREADS.to_string(),
                "--secs",
                &CRR_SECS.to_string(),
            ],
            CRR_SECS,
        )
    }

    /// One more connections run and one more request/response run with the kernel's
    /// per-program accounting on: what the TC programs of both nodes cost per connection (new
    /// flows) and per round trip (packets of an established flow).
    fn bpf_cost(&mut self) -> Result<BpfCost> {
        let _stats = BpfStats::set(true)?;
        let (runs0, ns0) = self.prog_stats();
        let crr = self.crr()?;
        let (runs1, ns1) = self.prog_stats();
        let rr = self.rr()?;
        let (runs2, ns2) = self.prog_stats();
        let connections = crr["connections"].as_f64().context("crr connections")?;
        let trips = rr["round_trips"].as_f64().context("rr round_trips")?;
        let runs = runs1.saturating_sub(runs0) as f64;
        let rr_runs = runs2.saturating_sub(runs1) as f64;
        ensure!(
            connections > 0.0 && runs > 0.0 && trips > 0.0 && rr_runs > 0.0,
            "nothing to measure: {connections} connections with {runs} program runs, \
             {trips} round trips with {rr_runs}"
        );
        Ok(BpfCost {
            conn_per_sec: crr["per_sec"].as_f64().context("crr per_sec")?,
            runs_per_conn: runs / connections,
            ns_per_run: ns1.saturating_sub(ns0) as f64 / runs,
            rr_p50_us: rr["p50_us"].as_f64().context("rr p50")?,
            runs_per_trip: rr_runs / trips,
            rr_ns_per_run: ns2.saturating_sub(ns1) as f64 / rr_runs,
            cores: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
        })
    }

    /// `run_cnt` and `run_time_ns` summed over the TC programs (`prog_type` 3) the running
    /// agents hold, from their `/proc/PID/fdinfo`.
    fn prog_stats(&self) -> (u64, u64) {
        let mut total = (0, 0);
        for pid in self
            .lab
            .node_names()
            .iter()
            .filter_map(|n| self.lab.agent_pid(n))
        {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
                continue;
            };
            for info in fds.flatten() {
                let Ok(text) = std::fs::read_to_string(info.path()) else {
                    continue;
                };
                let field = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                };
                if field("prog_type:") == Some(3) {
                    total.0 += field("run_cnt:").unwrap_or(0);
                    total.1 += field("run_time_ns:").unwrap_or(0);
                }
            }
        }
        total
    }

    /// utime + stime of every running agent, in clock ticks.
    fn agent_cpu_ticks(&self) -> u64 {
        self.lab
            .node_names()
            .iter()
            .filter_map(|n| self.lab.agent_pid(n))
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| {
                // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let f: Vec<&str> = rest.split_whitespace().collect();
                let field = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
                field(14).unwrap_or(0) + field(15).unwrap_or(0)
            })
            .sum()
    }

    /// Runs a client in the client pod and parses its (last) JSON output.
    fn client_json(&self, program: &std::ffi::OsStr, args: &[&str], secs: f64) -> Result<Value> {
        pod_json(&self.client, program, args, secs)
    }

    /// Toggles a policy that allows the client on the toggle port, [`FLIP_CHANGES`] times.
    fn change_latency(&mut self) -> Result<Vec<Duration>> {
        let prober = Prober::start(&self.client.netns, self.server_addr(rules::TOGGLE_PORT));
        let mut latencies = Vec::new();
        let mut on = false;
        // The toggle starts off: confirm the prober sees that first.
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..FLIP_CHANGES {
            on = !on;
            prober.clear();
            std::thread::sleep(Duration::from_millis(60));
            let yaml = self.toggle_policy(on);
            self.lab.write_manifest("bench-toggle", &yaml)?;
            let changed = Instant::now();
            let latency = prober
                .wait_flip(changed, on, Duration::from_secs(5))
                .with_context(|| format!("policy change {}", i + 1))?;
            latencies.push(latency);
            // Let the agents settle; vary the phase against the agents' timers.
            std::thread::sleep(Duration::from_millis(50 + (i as u64 * 37) % 60));
        }
        drop(prober);
        if on {
            self.lab
                .write_manifest("bench-toggle", &self.toggle_policy(false))?;
        }
        latencies.sort();
        eprintln!(
            "bench: policy change to enforced ({} changes): p50 {:.1?} p99 {:.1?}",
            latencies.len(),
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0)
        );
        Ok(latencies)
    }

    /// (VmRSS, VmHWM) in KiB of the server node's agent and the largest over all agents.
    fn rss(&self) -> Result<Rss> {
        let mut rss = Rss::default();
        for node in self.lab.node_names() {
            let pid = self
                .lab
                .agent_pid(&node)
                .with_context(|| format!("no agent on {node}"))?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let (now, peak) = (field("VmRSS:"), field("VmHWM:"));
            if node == self.server_node {
                rss.server_kib = now;
                rss.server_peak_kib = peak;
                rss.server_anon_kib = field("RssAnon:");
                rss.server_file_kib = field("RssFile:");
            }
            rss.max_kib = rss.max_kib.max(now);
        }
        Ok(rss)
    }
}

#[derive(Clone, Copy, Default)]
struct Rss {
    server_kib: u64,
    server_peak_kib: u64,
    /// The server agent's heap and other private memory, and its mapped files (the binary's
    /// text, the flow ring buffer), which together are `server_kib`.
    server_anon_kib: u64,
    server_file_kib: u64,
    max_kib: u64,
}

/// `sh -c` puts itself into the pod's cgroup (where the agents' cgroup programs see it, as they
/// see the pod's own processes), then becomes `nsenter --net=<pod> -- program args`.
/// `nodeward-lab-load serve` in `pod`: sinks on the ports from `rules::SINK_PORTS.0` to
/// `last_sink`, and the echo port answered on [`RR_CPU`], where the request/response client
/// runs too.
pub(crate) fn load_server(pod: &PodState, load: &std::ffi::OsStr, last_sink: u16) -> Command {
    let sink = format!("{}-{last_sink}", rules::SINK_PORTS.0);
    let echo = rules::ECHO_PORT.to_string();
    let mut cmd = in_pod(
        pod,
        load,
        &[
            "serve",
            "--sink",
            &sink,
            "--echo",
            &echo,
            "--echo-cpu",
            RR_CPU,
        ],
    );
    cmd.stdout(Stdio::null());
    cmd
}

/// Runs `program args` as a process of `pod` (a load client running about `secs`) and parses its
/// (last) JSON output line.
pub(crate) fn pod_json(
    pod: &PodState,
    program: &std::ffi::OsStr,
    args: &[&str],
    secs: f64,
) -> Result<Value> {
    let out = sys::run_timeout(
        &mut in_pod(pod, program, args),
        Duration::from_secs_f64(secs + 15.0),
    )?;
    serde_json::from_str(out.trim())
        .or_else(|_| {
            let last = out.lines().last().unwrap_or_default();
            serde_json::from_str(last)
        })
        .with_context(|| format!("{} printed {out:?}", Path::new(program).display()))
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:` ...) of `node`'s agent.
pub(crate) fn agent_kib(lab: &Lab, node: &str, field: &str) -> Result<u64> {
    let pid = lab
        .agent_pid(node)
        .with_context(|| format!("no agent on {node}"))?;
    proc_kib(pid, field).with_context(|| format!("{node}'s agent"))
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:` ...) of any process.
pub(crate) fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("/proc/{pid}/status has no {field}"))
}

pub(crate) fn in_pod(pod: &PodState, program: &std::ffi::OsStr, args: &[&str]) -> Command {
    let mut cmd = nodeward_lab::load::in_pod(pod, std::path::Path::new(program));
    cmd.args(args).stderr(Stdio::null());
    cmd
}

fn policy_entries(status: &Value) -> usize {
    status["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            let name = m["name"].as_str().unwrap_or("").to_ascii_lowercase();
            name.contains("polic") && !name.contains("cidr")
        })
        .filter_map(|m| m["entries"].as_u64())
        .map(|e| usize::try_from(e).unwrap_or(usize::MAX))
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `nodeward-lab-load`'s arguments for the request/response test every benchmark runs: one
/// connection to `addr`, 64-byte messages, one in flight, `RR_SECS`, pinned to `RR_CPU`.
pub(crate) fn rr_args(addr: SocketAddr) -> [String; 9] {
    [
        "rr",
        "--addr",
        &addr.to_string(),
        "--secs",
        &RR_SECS.to_string(),
        "--size",
        "64",
        "--cpu",
        RR_CPU,
    ]
    .map(str::to_owned)
}

/// The median over rounds of `figure(x) / figure(base)`, `xs` and `bases` paired by round.
pub(crate) fn median_ratio<T>(xs: &[T], bases: &[T], figure: impl Fn(&T) -> f64) -> f64 {
    median(
        xs.iter()
            .zip(bases)
            .map(|(x, base)| figure(x) / figure(base))
            .collect(),
    )
}

/// Run-to-run spread of a baseline's samples: (max - min) / median, in percent.
pub(crate) fn spread_percent(v: Vec<f64>) -> f64 {
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    (max - min) / median(v) * 100.0
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Report {
    samples: BTreeMap<Scenario, Vec<Sample>>,
    flip_small: Vec<Duration>,
    flip_large: Vec<Duration>,
    rss_small: Rss,
    rss_large: Rss,
    bpf: BpfCost,
    rss_fresh: Rss,
    flows_stored: u64,
    sync_ms: f64,
    policy_entries: usize,
    identities: u64,
    iptables: &'static str,
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

    /// The median over rounds of `scenario`'s figure divided by no agent's in the same round:
    /// the two ran minutes apart at most, so a slow spell of the machine affects both.
    fn ratio(&self, scenario: Scenario, figure: Figure) -> f64 {
        self.ratio_to(scenario, Scenario::NoAgent, figure)
    }

    /// As [`Report::ratio`], against `base` instead of no agent.
    fn ratio_to(&self, scenario: Scenario, base: Scenario, figure: Figure) -> f64 {
        let of = |s: Scenario| self.samples.get(&s).map(Vec::as_slice).unwrap_or_default();
        median_ratio(of(scenario), of(base), |s| figure.of(s))
    }

    /// Run-to-run spread of the baseline: (max - min) / median, in percent.
    fn noise(&self, figure: Figure) -> f64 {
        let v: Vec<f64> = self
            .samples
            .get(&Scenario::NoAgent)
            .into_iter()
            .flatten()
            .map(|s| figure.of(s))
            .collect();
        spread_percent(v)
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        let Machine {
            date,
            cores,
            cpu,
            kernel,
        } = Machine::read();
        let _ = writeln!(
            out,
            "Measured {date} on {cores} cores ({cpu}), kernel {kernel}, a shared and noisy \
             machine: compare the ratios, not the absolute numbers. Median of {} rounds \
             (ABBA order), cross-node pod to pod; in parentheses the median over rounds of the \
             ratio to no agent in the same round.\n",
            self.samples.get(&Scenario::NoAgent).map_or(0, Vec::len)
        );
        let titles: Vec<&str> = Scenario::ALL.iter().map(|s| s.title()).collect();
        let _ = writeln!(out, "| figure | {} |", titles.join(" | "));
        let _ = writeln!(out, "| --- |{}", " --- |".repeat(titles.len()));
        for figure in Figure::ALL {
            let cells: Vec<String> = Scenario::ALL
                .iter()
                .map(|&s| {
                    let v = figure.format(self.median(s, figure));
                    if s == Scenario::NoAgent {
                        v
                    } else {
                        format!("{v} ({:.2}x)", self.ratio(s, figure))
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", figure.title(), cells.join(" | "));
        }
        let cpu: Vec<String> = Scenario::ALL
            .iter()
            .map(|&s| {
                let v = median(
                    self.samples
                        .get(&s)
                        .into_iter()
                        .flatten()
                        .map(|x| x.agent_cpu_pct)
                        .collect(),
                );
                format!("{v:.0}%")
            })
            .collect();
        let _ = writeln!(
            out,
            "| agents' CPU during the connections test (% of a core) | {} |",
            cpu.join(" | ")
        );
        let b = &self.bpf;
        let per_conn_us = b.runs_per_conn * b.ns_per_run / 1000.0;
        let _ = writeln!(
            out,
            "\nThe programs' own time at 10k rules (`kernel.bpf_stats_enabled` during one more \
             connections run, {} connections/s): {:.1} runs per connection at {:.0} ns each, \
             {:.1} µs of BPF per connection, {:.0}% of the {} cores' time.",
            Figure::Crr.format(b.conn_per_sec),
            b.runs_per_conn,
            b.ns_per_run,
            per_conn_us,
            per_conn_us * b.conn_per_sec / 1e6 / b.cores * 100.0,
            b.cores,
        );
        // The same medians as the table's: what the programs' time per round trip explains of
        // the p50 nodeward adds.
        let p50_gap_us = self.median(Scenario::Nodeward10k, Figure::P50)
            - self.median(Scenario::NoAgent, Figure::P50);
        let _ = writeln!(
            out,
            "In one more request/response run ({} µs p50 with the accounting on): {:.1} runs per \
             round trip at {:.0} ns each, {:.2} µs of BPF per round trip, against {:.2} µs that \
             nodeward at 10k rules adds to the p50 above.",
            Figure::P50.format(b.rr_p50_us),
            b.runs_per_trip,
            b.rr_ns_per_run,
            b.runs_per_trip * b.rr_ns_per_run / 1000.0,
            p50_gap_us,
        );
        // eBPF host routing's targets: with it, faster than no agent; without it, within 3% of
        // the hooks' floor. As speed (the baseline's latency over this one for p50/p99), so
        // that above 1.00x is better everywhere.
        let speed = |s: Scenario, base: Scenario, f: Figure| {
            let r = self.ratio_to(s, base, f);
            if f.higher_is_better() { r } else { 1.0 / r }
        };
        let _ = writeln!(
            out,
            "\nHost routing at 10k rules, as speed relative to the baseline in the same round \
             (median over rounds; for latency the baseline's over nodeward's):\n\n\
             | figure | on, against no agent | target | off, against the hooks' floor | target |\n\
             | --- | --- | --- | --- | --- |"
        );
        let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
        for f in Figure::ALL {
            let on = speed(Scenario::Nodeward10k, Scenario::NoAgent, f);
            let off = speed(Scenario::Nodeward10kKernel, Scenario::Floor, f);
            let on_target = if f == Figure::P99 {
                "-".to_owned()
            } else {
                format!(">= 1.00x: {}", verdict(on >= 1.0))
            };
            let _ = writeln!(
                out,
                "| {} | {on:.2}x | {on_target} | {off:.2}x | >= 0.97x: {} |",
                f.title(),
                verdict(off >= 0.97)
            );
        }
        let noise: Vec<String> = Figure::ALL
            .iter()
            .map(|&f| format!("{} {:.0}%", f.title(), self.noise(f)))
            .collect();
        let _ = writeln!(
            out,
            "\nRun-to-run spread of the no-agent baseline ((max - min) / median): {}.\n",
            noise.join(", ")
        );

        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let (p50l, p99l) = (
            percentile(&self.flip_large, 50.0),
            percentile(&self.flip_large, 99.0),
        );
        let target_verdict = |ok: bool| if ok { "met" } else { "**missed**" };
        let _ = writeln!(
            out,
            "| figure | 1,000 pods, 10k rules | lab only (4 pods, 1 policy) | target |"
        );
        let _ = writeln!(out, "| --- | --- | --- | --- |");
        let _ = writeln!(
            out,
            "| manifest change to enforced, p50 / p99 ({} changes) | {:.1} / {:.1} ms | {:.1} / {:.1} ms | p99 < 50 ms: {} |",
            self.flip_large.len(),
            ms(p50l),
            ms(p99l),
            ms(percentile(&self.flip_small, 50.0)),
            ms(percentile(&self.flip_small, 99.0)),
            target_verdict(p99l < Duration::from_millis(50))
        );
        let _ = writeln!(
            out,
            "| agent RSS, server node (peak), after the load ({} flows in its buffer) | {:.1} MiB ({:.1}) | | < 40 MiB: {} |",
            self.flows_stored,
            mib(self.rss_large.server_kib),
            mib(self.rss_large.server_peak_kib),
            target_verdict(self.rss_large.max_kib < 40 * 1024)
        );
        let _ = writeln!(
            out,
            "| agent RSS, server node (peak), fresh agent before any load | {:.1} MiB ({:.1}) | {:.1} MiB ({:.1}) | < 40 MiB: {} |",
            mib(self.rss_fresh.server_kib),
            mib(self.rss_fresh.server_peak_kib),
            mib(self.rss_small.server_kib),
            mib(self.rss_small.server_peak_kib),
            target_verdict(self.rss_fresh.max_kib < 40 * 1024)
        );
        let _ = writeln!(
            out,
            "\nThe server agent's own last sync at 1,000 pods took {:.1} ms (`last_sync.duration_ms`).",
            self.sync_ms
        );
        let within: Vec<String> = Figure::ALL
            .iter()
            .filter(|&&f| {
                let r = self.ratio(Scenario::Nodeward10k, f);
                if f.higher_is_better() {
                    r < 0.97
                } else {
                    r > 1.03
                }
            })
            .map(|f| f.title().to_string())
            .collect();
        let _ = writeln!(
            out,
            "\nTarget \"nodeward at 10,000 rules within 3% of no agent on every figure\": {}.",
            if within.is_empty() {
                "met".to_string()
            } else {
                format!("**missed** on {}", within.join(", "))
            }
        );
        // What the hooks alone cost, and what nodeward costs on top of them, per figure.
        let floor: Vec<String> = Figure::ALL
            .iter()
            .map(|&f| {
                format!(
                    "{} {:.2}x of no agent, nodeward at 10k rules {:.2}x of the floor",
                    f.title(),
                    self.ratio(Scenario::Floor, f),
                    self.ratio_to(Scenario::Nodeward10k, Scenario::Floor, f),
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "\nThe hooks' floor (a program that only returns `TC_ACT_OK`, at tcx ingress and egress \
             of every pod's host-side interface, as nodeward attaches; medians of per-round \
             ratios): {}.",
            floor.join("; ")
        );
        let _ = writeln!(
            out,
            "\nHow: connections/s is `nodeward-lab-load crr` ({CRR_THREADS} threads, {CRR_SECS} s: \
             connect, the server accepts and closes, the client closes; {}); request/response is one connection, 64-byte messages, \
             one in flight, {RR_SECS} s, client and server both on CPU {RR_CPU} \
             (`nodeward-lab-load rr`); bulk is `iperf3 -t {IPERF_SECS}`, one stream. The 10k \
             rules are 10 NetworkPolicies on the server allowing 1,000 remote pods (1,000 \
             identities) x 10 ports ({} policy map entries, {} identities on the server's \
             node); iptables ({}) has the same rules in the server node's FORWARD \
             chain after an ESTABLISHED,RELATED accept, the client's rule after them. Datapath \
             only is the same 10k rules with both agents stopped: their pinned programs and maps \
             keep enforcing (the outsider is refused every round) and nobody reads flow events, \
             so its gap to no agent is the kernel side of nodeward's cost and the rest is the \
             agents'. The hooks' floor has no agent and a two-instruction program (`r0 = 0; \
             exit`) attached where nodeward's classifiers are: no program there can cost less. \
             A change \
             is the rename of a manifest toggling an allow; enforced is the first fresh connect \
             from the client with the new outcome (probed every ~1 ms). Whole run: {:.0?}.",
            self.ports.describe(),
            self.policy_entries,
            self.identities,
            self.iptables,
            self.runtime
        );
        out
    }
}

/// Replaces the "## Benchmarks" section's table (everything after its first paragraph, up to the
/// next section).
fn update_readme(table: &str) -> Result<()> {
    let path = paths::workspace_root().join("README.md");
    let text = std::fs::read_to_string(&path)?;
    let start = text
        .find("## Benchmarks\n")
        .context("README.md has no \"## Benchmarks\" section")?;
    let end = text[start + 1..]
        .find("\n## ")
        .map_or(text.len(), |i| start + 1 + i + 1);
    let intro = "## Benchmarks\n\n`cargo xtask bench datapath` measures, on the lab, nodeward side \
                 by side with the baselines in one run and reports ratios (it rewrites this \
                 section).\n\n";
    // The other benches own the "### " subsections (`bench flows`, `bench tunnel`): keep them.
    let subsections = text[start..end]
        .find("\n### ")
        .map_or("", |i| &text[start + i + 1..end]);
    let table = if subsections.is_empty() {
        table.to_string()
    } else {
        format!("{table}\n{}\n", subsections.trim_end())
    };
    let updated = format!("{}{intro}{table}\n{}", &text[..start], &text[end..]);
    if updated.matches("## Benchmarks").count() != 1 {
        bail!("README.md: could not replace the Benchmarks section cleanly");
    }
    std::fs::write(&path, updated)?;
    Ok(())
}

/// Replaces (or appends at the end) the "### {title}" subsection of README's Benchmarks
/// section with `body`, up to the next subsection or section; the rest stays as it is.
pub(crate) fn update_readme_subsection(title: &str, body: &str) -> Result<()> {
    let path = paths::workspace_root().join("README.md");
    let text = std::fs::read_to_string(&path)?;
    let updated = replace_subsection(&text, title, body).context("README.md")?;
    std::fs::write(&path, updated)?;
    Ok(())
}

fn replace_subsection(text: &str, title: &str, body: &str) -> Result<String> {
    let start = text
        .find("## Benchmarks\n")
        .context("no \"## Benchmarks\" section")?;
    let end = text[start + 1..]
        .find("\n## ")
        .map_or(text.len(), |i| start + 1 + i + 1);
    let section = &text[start..end];
    let heading = format!("### {title}\n");
    let (before, after) = match section.find(&heading) {
        Some(i) => {
            let next = section[i..]
                .find("\n### ")
                .map_or(section.len(), |j| i + j + 1);
            (section[..i].trim_end(), section[next..].trim_end())
        }
        None => (section.trim_end(), ""),
    };
    let mut new_section = format!("{before}\n\n{heading}\n{}\n", body.trim_end());
    if !after.is_empty() {
        new_section = format!("{new_section}\n{after}\n");
    }
    let updated = format!("{}{new_section}\n{}", &text[..start], &text[end..]);
    ensure!(
        updated.matches(heading.as_str()).count() == 1,
        "could not replace the {title} subsection cleanly"
    );
    Ok(updated)
}

/// Removes `node`'s pinned agent state: a stopped agent keeps enforcing from bpffs, and "no
/// agent" means none of that left.
pub(crate) fn remove_pins(lab: &Lab, nodeward: &std::path::Path, node: &str) -> Result<()> {
    let dir = lab.node(node).bpffs_dir.clone();
    sys::run(
        Command::new(nodeward)
            .args(["cleanup", "--bpffs-dir"])
            .arg(&dir),
    )?;
    std::fs::create_dir_all(&dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::replace_subsection;

    const README: &str =
        "# x\n\n## Benchmarks\n\nintro\n\n### Flows\n\nold flows\n\n## Development\n\nend\n";

    #[test]
    fn a_new_subsection_goes_after_the_others_and_keeps_them() {
        let once = replace_subsection(README, "Tunnel", "tunnel 1\n").unwrap();
        assert_eq!(
            once,
            "# x\n\n## Benchmarks\n\nintro\n\n### Flows\n\nold flows\n\n### Tunnel\n\ntunnel 1\n\n## Development\n\nend\n"
        );
        // Rewriting one subsection leaves its neighbours alone, whichever comes first.
        let flows = replace_subsection(&once, "Flows", "new flows").unwrap();
        assert_eq!(flows, once.replace("old flows", "new flows"));
        let tunnel = replace_subsection(&flows, "Tunnel", "tunnel 2").unwrap();
        assert_eq!(tunnel, flows.replace("tunnel 1", "tunnel 2"));
    }
}
