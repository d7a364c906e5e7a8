//! `cargo xtask bench datapath --services`: on one 2-node lab with 1,000 Services and 10,000
//! backends in the agents' tables (plus the lab's own Services), and one target Service whose
//! backend is the server pod on the other node, the same client reaches the server three ways,
//! side by side in one invocation:
//!
//! - to the server's pod IP directly (no Service: the baseline),
//! - to the target's ClusterIP through nodeward's translation (the client runs in the pod's
//!   cgroup, where the agent's connect programs rewrite it to the backend),
//! - to the same ClusterIP through kube-proxy-style iptables DNAT: the 1,001 Services as
//!   KUBE-SERVICES / KUBE-SVC-* / KUBE-SEP-* chains in every node's nat table
//!   (`iptables-restore`, loaded only for this path), the client in a cgroup beside the node's
//!   (same network namespace), so nodeward's translation is not in its path.
//!
//! The agents run the whole time (their TC programs are on every path alike). Each path: new
//! TCP connections per second and request/response latency over one connection, in the same
//! round; rounds in ABBA order, medians over rounds, ratios to the pod IP in the same round.
//! The client node's translation counter proves which path each sample took. Then the agents'
//! RSS with the 1,000 Services, after the load and as fresh agents.
//!
//! Writes README's Benchmarks section under "### Services" (`--quick` only prints).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nodeward_lab::manifests::{SimpleService, bulk_services, documents};
use nodeward_lab::{Lab, PodState, sys, wait};
use serde_json::Value;

use crate::bench::{
    Machine, ReleaseLab, agent_kib, median, median_ratio, pod_json, release_lab, spread_percent,
};
use crate::bench_rules as rules;

const CLIENT: &str = "frontend/web-0";
const SERVER: &str = "backend/api-1";
const BULK_SERVICES: u32 = 1000;
const BULK_BACKENDS: u32 = 10;
const BULK_NAMESPACE: &str = "backend";
/// The target Service's ClusterIP (the lab's own Services are 10.96.0.x, the bulk 10.97.x.x).
const TARGET_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 2, 10);
const TARGET_NAME: &str = "bench-target";
/// Each path's server port for the connections runs, the same in every round, as real clients
/// of a Service meet it. One port per path: the server's TIME_WAIT sockets from one path must not
/// meet another path's connections. A client's TCP timestamps start at an offset the kernel
/// derives from the addresses it dialled (the ClusterIP for iptables, the pod IP otherwise:
/// nodeward rewrites the address before the socket connects), so the server would refuse a
/// reused 4-tuple from the other path (PAWS) and the connection would stall; that cost belongs to
/// switching paths back and forth, which no real client does.
const fn sink_port(path: Path) -> u16 {
    rules::SINK_PORTS.0
        + match path {
            Path::PodIp => 0,
            Path::Nodeward => 1,
            Path::Iptables => 2,
        }
}
const CRR_THREADS: u32 = 4;
const TARGET_RSS_KIB: u64 = 40 * 1024;
/// How long an agent gets to put the whole table into its maps.
const TABLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long each measurement runs: the full run, or `--quick` for a smoke run.
#[derive(Clone, Copy)]
struct Durations {
    rounds: usize,
    crr_secs: f64,
    rr_secs: f64,
}

impl Durations {
    const FULL: Self = Self {
        rounds: 7,
        crr_secs: 2.0,
        rr_secs: 1.5,
    };
    const QUICK: Self = Self {
        rounds: 1,
        crr_secs: 0.5,
        rr_secs: 0.5,
    };
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Path {
    PodIp,
    Nodeward,
    Iptables,
}

impl Path {
    const ALL: [Self; 3] = [Self::PodIp, Self::Nodeward, Self::Iptables];

    fn title(self) -> &'static str {
        match self {
            Self::PodIp => "pod IP (no Service)",
            Self::Nodeward => "ClusterIP, nodeward",
            Self::Iptables => "ClusterIP, iptables DNAT",
        }
    }
}

/// ABBA: drift over the run affects every path alike; the iptables rules load once per pair of
/// rounds.
const ORDER: [[Path; 3]; 2] = [
    [Path::PodIp, Path::Nodeward, Path::Iptables],
    [Path::Iptables, Path::Nodeward, Path::PodIp],
];

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    conn_per_sec: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    crr_errors: u64,
    /// The client node's `service_translations` rise over the sample.
    translated: u64,
    /// Connections the sample completed (crr's and rr's one).
    connections: u64,
}

#[derive(Clone, Copy)]
enum Figure {
    Crr,
    P50,
    P99,
}

impl Figure {
    const ALL: [Self; 3] = [Self::Crr, Self::P50, Self::P99];

    fn of(self, s: &Sample) -> f64 {
        match self {
            Self::Crr => s.conn_per_sec,
            Self::P50 => s.rr_p50_us,
            Self::P99 => s.rr_p99_us,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Crr => "new TCP connections/s",
            Self::P50 => "request/response p50 (µs)",
            Self::P99 => "request/response p99 (µs)",
        }
    }

    fn higher_is_better(self) -> bool {
        matches!(self, Self::Crr)
    }

    fn format(self, v: f64) -> String {
        match self {
            Self::Crr => format!("{v:.0}"),
            Self::P50 | Self::P99 => format!("{v:.1}"),
        }
    }
}

/// One agent's memory, in KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    rss: u64,
    peak: u64,
    /// The parts of `rss`: heap and other private memory, mapped files (the binary's text, the
    /// flow ring buffer).
    anon: u64,
    file: u64,
}

/// A cgroup the benchmark made (beside the nodes' cgroups, under the lab's); removed on drop,
/// and with the lab's tree in any case.
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

struct Bench {
    /// Dropped before the lab: the benchmark's cgroup goes first.
    _outside_cgroup: CgroupDir,
    lab: Lab,
    load: PathBuf,
    client: PodState,
    /// The client pod's network namespace in a cgroup no agent attached to.
    outside: PodState,
    server: PodState,
    d: Durations,
    rules_file: PathBuf,
    iptables_on: bool,
    iptables_nft: bool,
    /// Services and backends in a full table (the lab's, the bulk and the target).
    want_services: u64,
    want_backends: u64,
}

pub fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let _stats = crate::bench::BpfStats::set(false)?;
    let d = if quick {
        Durations::QUICK
    } else {
        Durations::FULL
    };
    let iptables_nft = sys::run(Command::new("iptables").arg("-V"))?.contains("nf_tables");
    let ReleaseLab {
        lab,
        load,
        client,
        server,
        ..
    } = release_lab(CLIENT, SERVER)?;
    let table = service_table(&server);
    let outside_dir = lab.state().cgroup_dir.join("bench-outside");
    std::fs::create_dir_all(&outside_dir)
        .with_context(|| format!("creating {}", outside_dir.display()))?;
    let outside_cgroup = CgroupDir(outside_dir.clone());
    let mut outside = client.clone();
    outside.cgroup = outside_dir;
    let rules_file = lab.state().dir.join("tmp").join("bench-kube-proxy.rules");
    std::fs::create_dir_all(rules_file.parent().context("rules file's directory")?)?;
    std::fs::write(&rules_file, kube_proxy_rules(&table))?;
    let mut bench = Bench {
        _outside_cgroup: outside_cgroup,
        lab,
        load,
        client,
        outside,
        server,
        d,
        rules_file,
        iptables_on: false,
        iptables_nft,
        want_services: 0,
        want_backends: 0,
    };
    let result = bench.run_all(&table);
    // Leave the nodes' nat tables as the lab made them, whatever happened.
    let off = bench.iptables_off();
    let (samples, memory) = result?;
    off?;
    drop(bench);

    let report = Report {
        samples,
        memory,
        d,
        iptables: if iptables_nft {
            "iptables-nft"
        } else {
            "iptables-legacy"
        },
        runtime: started.elapsed(),
    };
    let table = report.markdown(quick);
    println!("\n{table}");
    if quick {
        println!(
            "--quick: README.md left alone. bench datapath --services took {:.0?}",
            started.elapsed()
        );
    } else {
        crate::bench::update_readme_subsection("Services", &table)?;
        println!(
            "README.md: Benchmarks / Services updated. bench datapath --services took {:.0?}",
            started.elapsed()
        );
    }
    Ok(())
}

/// The 1,000 bulk Services and the target (its one backend the server pod, on the sink and echo
/// ports), the target in the middle: in kube-proxy's KUBE-SERVICES half the Services come
/// before it, as for a Service at a random place in the chain.
fn service_table(server: &PodState) -> Vec<SimpleService> {
    let mut table = bulk_services(BULK_NAMESPACE, BULK_SERVICES, BULK_BACKENDS);
    let target = SimpleService {
        namespace: server.namespace.clone(),
        name: TARGET_NAME.to_string(),
        cluster_ip: TARGET_VIP,
        ports: [Path::Nodeward, Path::Iptables]
            .iter()
            .map(|&p| {
                let port = sink_port(p);
                (format!("sink-{port}"), port, port)
            })
            .chain([("echo".to_string(), rules::ECHO_PORT, rules::ECHO_PORT)])
            .collect(),
        backends: vec![server.ip4],
    };
    table.insert(table.len() / 2, target);
    table
}

/// Memory per node after the rounds and as fresh agents, and how long a fresh agent took to
/// get the whole table into its maps.
struct MemoryReport {
    nodes: Vec<String>,
    /// Fresh agents with the lab's own Services only, before the 1,000 are written.
    lab_only: Vec<Memory>,
    loaded: Vec<Memory>,
    fresh: Vec<Memory>,
    fresh_table_secs: Vec<f64>,
    services: u64,
    backends: u64,
}

type Samples = BTreeMap<Path, Vec<Sample>>;

impl Bench {
    fn run_all(&mut self, table: &[SimpleService]) -> Result<(Samples, MemoryReport)> {
        let nodes = self.lab.node_names();
        for node in &nodes {
            self.lab.start_agent(node)?;
        }
        let lab_only = nodes
            .iter()
            .map(|n| self.memory(n))
            .collect::<Result<Vec<_>>>()?;
        self.lab.write_manifest(
            "bench-services",
            &documents(table.iter().flat_map(SimpleService::documents)),
        )?;
        // At least these (the lab's own Services come on top).
        self.want_services = table.len() as u64;
        self.want_backends = table.iter().map(|s| s.backends.len() as u64).sum();
        self.wait_table(&nodes)?;
        let sinks = Path::ALL.map(sink_port);
        let _server = nodeward_lab::load::server(
            &self.load,
            &self.server,
            &[
                "--sink",
                &format!("{}-{}", sinks[0], sinks[2]),
                "--echo",
                &rules::ECHO_PORT.to_string(),
            ],
            &self.client,
            &[sinks[0], sinks[1], sinks[2], rules::ECHO_PORT],
        )?;
        // The client makes tens of thousands of connections over the run: give it every port.
        sys::sysctls(
            &self.client.netns,
            &[("net/ipv4/ip_local_port_range".to_string(), "10000 65000")],
        )?;
        let mut samples = Samples::new();
        for round in 0..self.d.rounds {
            for &path in &ORDER[round % 2] {
                self.enter(path)?;
                let sample = self.measure(path)?;
                eprintln!(
                    "bench: round {} {:<26} {:>7.0} conn/s ({} failed)  rr p50 {:>6.1} µs p99 {:>6.1} µs  translated +{}",
                    round + 1,
                    path.title(),
                    sample.conn_per_sec,
                    sample.crr_errors,
                    sample.rr_p50_us,
                    sample.rr_p99_us,
                    sample.translated,
                );
                samples.entry(path).or_default().push(sample);
            }
        }
        self.iptables_off()?;
        let loaded = nodes
            .iter()
            .map(|n| self.memory(n))
            .collect::<Result<Vec<_>>>()?;
        // Fresh agents adopting the pinned state: memory without what the load left behind.
        let mut fresh_table_secs = Vec::new();
        for node in &nodes {
            self.lab.stop_agent(node)?;
            let t = Instant::now();
            self.lab.start_agent(node)?;
            self.wait_table(std::slice::from_ref(node))?;
            fresh_table_secs.push(t.elapsed().as_secs_f64());
        }
        let fresh = nodes
            .iter()
            .map(|n| self.memory(n))
            .collect::<Result<Vec<_>>>()?;
        let svc = &self.lab.status(&nodes[0])?["services"];
        let memory = MemoryReport {
            lab_only,
            loaded,
            fresh,
            fresh_table_secs,
            services: svc["services"].as_u64().unwrap_or(0),
            backends: svc["backends"].as_u64().unwrap_or(0),
            nodes,
        };
        Ok((samples, memory))
    }

    /// Waits until every agent of `nodes` has the whole table in its maps.
    fn wait_table(&self, nodes: &[String]) -> Result<()> {
        let t = Instant::now();
        for node in nodes {
            let mut last = Value::Null;
            let ok = wait::eventually(TABLE_TIMEOUT, Duration::from_millis(100), || {
                let Ok(status) = self.lab.status(node) else {
                    return false;
                };
                last = status["services"].clone();
                last["services"].as_u64() >= Some(self.want_services)
                    && last["backends"].as_u64() >= Some(self.want_backends)
            });
            ensure!(
                ok && last["sync_error"].is_null(),
                "{node}: the agent did not put {} Services with {} backends into its maps within \
                 {TABLE_TIMEOUT:?}; last services status: {last}\n{}",
                self.want_services,
                self.want_backends,
                self.lab.agent_logs_tail(15)
            );
        }
        eprintln!(
            "bench: {} Services with {} backends in the maps of {} ({:.1?})",
            self.want_services,
            self.want_backends,
            nodes.join(", "),
            t.elapsed()
        );
        Ok(())
    }

    fn memory(&self, node: &str) -> Result<Memory> {
        Ok(Memory {
            rss: agent_kib(&self.lab, node, "VmRSS:")?,
            peak: agent_kib(&self.lab, node, "VmHWM:")?,
            anon: agent_kib(&self.lab, node, "RssAnon:")?,
            file: agent_kib(&self.lab, node, "RssFile:")?,
        })
    }

    /// The kube-proxy rules are in every node's nat table exactly on the iptables path.
    fn enter(&mut self, path: Path) -> Result<()> {
        if path == Path::Iptables {
            self.load_kube_proxy()
        } else {
            self.iptables_off()
        }
    }

    fn load_kube_proxy(&mut self) -> Result<()> {
        if self.iptables_on {
            return Ok(());
        }
        let t = Instant::now();
        for node in self.lab.nodes() {
            sys::run_timeout(
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &node.netns,
                        "iptables-restore",
                        "--noflush",
                    ])
                    .arg(&self.rules_file),
                Duration::from_secs(60),
            )
            .with_context(|| format!("loading the kube-proxy rules into {}", node.name))?;
        }
        self.iptables_on = true;
        eprintln!(
            "bench: kube-proxy rules loaded on every node ({:.1?})",
            t.elapsed()
        );
        Ok(())
    }

    fn iptables_off(&mut self) -> Result<()> {
        if !self.iptables_on {
            return Ok(());
        }
        for node in self.lab.nodes() {
            let ns = node.netns.as_str();
            if self.iptables_nft {
                // The whole table: its base chains would stay hooks on every new connection.
                sys::run(
                    Command::new("ip")
                        .args(["netns", "exec", ns, "nft", "delete", "table", "ip", "nat"]),
                )?;
            } else {
                for flag in ["-F", "-X"] {
                    sys::run(
                        Command::new("ip")
                            .args(["netns", "exec", ns, "iptables", "-t", "nat", flag]),
                    )?;
                }
            }
        }
        self.iptables_on = false;
        Ok(())
    }

    /// The client node's count of connections nodeward translated.
    fn translations(&self) -> Result<u64> {
        let status = self.lab.status(&self.client.node)?;
        status["datapath"]["service_translations"]
            .as_u64()
            .with_context(|| format!("no datapath.service_translations in {status}"))
    }

    /// One connections run and one request/response run on `path`, and the proof of the path.
    fn measure(&self, path: Path) -> Result<Sample> {
        let (pod, ip) = match path {
            Path::PodIp => (&self.client, self.server.ip4),
            Path::Nodeward => (&self.client, TARGET_VIP),
            Path::Iptables => (&self.outside, TARGET_VIP),
        };
        let load = self.load.as_os_str();
        let before = self.translations()?;
        let crr = pod_json(
            pod,
            load,
            &[
                "crr",
                "--addr",
                &SocketAddr::new(ip.into(), sink_port(path)).to_string(),
                "--threads",
                &CRR_THREADS.to_string(),
                "--secs",
                &self.d.crr_secs.to_string(),
            ],
            self.d.crr_secs,
        )?;
        let rr = pod_json(
            pod,
            load,
            &[
                "rr",
                "--addr",
                &SocketAddr::new(ip.into(), rules::ECHO_PORT).to_string(),
                "--secs",
                &self.d.rr_secs.to_string(),
                "--size",
                "64",
            ],
            self.d.rr_secs,
        )?;
        let translated = self.translations()?.saturating_sub(before);
        let crr_errors = crr["errors"].as_u64().unwrap_or(0);
        if crr_errors > 0 {
            eprintln!(
                "bench: warning: {}: {crr_errors} failed connections ({})",
                path.title(),
                crr["first_error"]
            );
        }
        let connections = crr["connections"].as_u64().context("crr connections")? + 1;
        ensure!(
            connections > 1,
            "{}: no connection succeeded ({})",
            path.title(),
            crr["first_error"]
        );
        if path == Path::Nodeward {
            ensure!(
                translated >= connections,
                "{}: nodeward translated {translated} connections of {connections}: some took \
                 another path",
                path.title()
            );
        } else {
            ensure!(
                translated == 0,
                "{}: nodeward translated {translated} connections, so it was in the path",
                path.title()
            );
        }
        Ok(Sample {
            conn_per_sec: crr["per_sec"].as_f64().context("crr per_sec")?,
            rr_p50_us: rr["p50_us"].as_f64().context("rr p50")?,
            rr_p99_us: rr["p99_us"].as_f64().context("rr p99")?,
            crr_errors,
            translated,
            connections,
        })
    }
}

/// FNV-1a, for chain names that depend only on the Service port (kube-proxy hashes the same
/// inputs with SHA-256; any stable hash does here).
fn chain_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

/// `table` as kube-proxy's iptables mode writes it into the nat table (`iptables-restore
/// --noflush`): PREROUTING and OUTPUT jump to KUBE-SERVICES, one rule per Service port there
/// (matched in order) to its KUBE-SVC chain, which picks a KUBE-SEP chain per backend with
/// `statistic --mode random` (1/n, 1/(n-1), ..., the last unconditional); each KUBE-SEP marks
/// hairpin traffic for masquerade and DNATs to the backend; KUBE-SERVICES ends with the
/// node-port jump; KUBE-POSTROUTING masquerades what was marked.
fn kube_proxy_rules(table: &[SimpleService]) -> String {
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-NODEPORTS".to_string(),
        "KUBE-POSTROUTING".to_string(),
        "KUBE-MARK-MASQ".to_string(),
    ];
    let mut services = String::new();
    let mut rules = String::new();
    for svc in table {
        for (port_name, port, target) in &svc.ports {
            let id = format!("{}/{}:{port_name}", svc.namespace, svc.name);
            let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{id}:tcp")));
            let _ = writeln!(
                services,
                "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{id} cluster IP\" -m tcp --dport {port} -j {svc_chain}",
                svc.cluster_ip
            );
            let n = svc.backends.len();
            for (k, backend) in svc.backends.iter().enumerate() {
                let sep = format!(
                    "KUBE-SEP-{}",
                    chain_hash(&format!("{id}:tcp:{backend}:{target}"))
                );
                let pick = if k + 1 < n {
                    format!(
                        "-m statistic --mode random --probability {:.11} ",
                        1.0 / (n - k) as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{id} -> {backend}:{target}\" {pick}-j {sep}"
                );
                let _ = writeln!(
                    rules,
                    "-A {sep} -s {backend}/32 -m comment --comment \"{id}\" -j KUBE-MARK-MASQ\n\
                     -A {sep} -p tcp -m comment --comment \"{id}\" -m tcp -j DNAT --to-destination {backend}:{target}"
                );
                chains.push(sep);
            }
            chains.push(svc_chain);
        }
    }
    let mut out = String::from("*nat\n");
    for chain in &chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE\n",
    );
    out.push_str(&services);
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

struct Report {
    samples: Samples,
    memory: MemoryReport,
    d: Durations,
    iptables: &'static str,
    runtime: Duration,
}

impl Report {
    fn median(&self, path: Path, figure: Figure) -> f64 {
        median(
            self.samples
                .get(&path)
                .into_iter()
                .flatten()
                .map(|s| figure.of(s))
                .collect(),
        )
    }

    /// The median over rounds of `path`'s figure divided by `base`'s in the same round.
    fn ratio(&self, path: Path, base: Path, figure: Figure) -> f64 {
        let of = |p: Path| self.samples.get(&p).map(Vec::as_slice).unwrap_or_default();
        median_ratio(of(path), of(base), |s| figure.of(s))
    }

    /// Run-to-run spread of the pod-IP baseline: (max - min) / median, in percent.
    fn noise(&self, figure: Figure) -> f64 {
        let v: Vec<f64> = self
            .samples
            .get(&Path::PodIp)
            .into_iter()
            .flatten()
            .map(|s| figure.of(s))
            .collect();
        spread_percent(v)
    }

    fn total(&self, path: Path, f: fn(&Sample) -> u64) -> u64 {
        self.samples.get(&path).into_iter().flatten().map(f).sum()
    }

    fn markdown(&self, quick: bool) -> String {
        let mut out = String::new();
        let Machine {
            date,
            cores,
            cpu,
            kernel,
        } = Machine::read();
        let rounds = self.d.rounds;
        if quick {
            let _ = writeln!(
                out,
                "**Smoke run (`--quick`): 1 round of sub-second loads; not figures of record.**\n"
            );
        }
        let _ = writeln!(
            out,
            "`cargo xtask bench datapath --services`. Measured {date} on {cores} cores ({cpu}), \
             kernel {kernel}, a shared and noisy machine: compare the ratios, not the absolute \
             numbers. {} Services with {} backend entries (per Service port) in each agent's \
             maps: 1,000 with 10 backends each, the target, the lab's own. The client pod is on \
             one node, the target's one backend (the server pod) on the other. Median of {rounds} round{} (ABBA order); in \
             parentheses the median over rounds of the ratio to the pod IP in the same round.\n",
            self.memory.services,
            self.memory.backends,
            if rounds == 1 { "" } else { "s" },
        );
        let titles: Vec<&str> = Path::ALL.iter().map(|p| p.title()).collect();
        let _ = writeln!(out, "| figure | {} |", titles.join(" | "));
        let _ = writeln!(out, "| --- |{}", " --- |".repeat(titles.len()));
        for figure in Figure::ALL {
            let cells: Vec<String> = Path::ALL
                .iter()
                .map(|&p| {
                    let v = figure.format(self.median(p, figure));
                    if p == Path::PodIp {
                        v
                    } else {
                        format!("{v} ({:.2}x)", self.ratio(p, Path::PodIp, figure))
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", figure.title(), cells.join(" | "));
        }
        let paths: Vec<String> = Path::ALL
            .iter()
            .map(|&p| {
                format!(
                    "{} {} (of {} connections, {} failed)",
                    p.title(),
                    self.total(p, |s| s.translated),
                    self.total(p, |s| s.connections),
                    self.total(p, |s| s.crr_errors),
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "\nConnections nodeward translated (the client node's `service_translations`, checked \
             every sample): {}.",
            paths.join("; ")
        );
        let noise: Vec<String> = Figure::ALL
            .iter()
            .map(|&f| format!("{} {:.0}%", f.title(), self.noise(f)))
            .collect();
        let _ = writeln!(
            out,
            "Run-to-run spread of the pod-IP baseline ((max - min) / median): {}.\n",
            noise.join(", ")
        );

        let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
        let within: Vec<String> = Figure::ALL
            .iter()
            .filter(|&&f| {
                let r = self.ratio(Path::Nodeward, Path::PodIp, f);
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
            "Target \"through nodeward within 3% of the pod IP\": {}.",
            if within.is_empty() {
                "met".to_string()
            } else {
                format!("**missed** on {}", within.join(", "))
            }
        );
        let ahead: Vec<String> = Figure::ALL
            .iter()
            .map(|&f| {
                let r = self.ratio(Path::Nodeward, Path::Iptables, f);
                let better = if f.higher_is_better() {
                    r > 1.0
                } else {
                    r < 1.0
                };
                format!("{} {r:.2}x ({})", f.title(), verdict(better))
            })
            .collect();
        let _ = writeln!(
            out,
            "Target \"ahead of iptables DNAT\" (nodeward / iptables, median of per-round ratios): \
             {}.\n",
            ahead.join("; ")
        );

        let mib = |kib: u64| kib as f64 / 1024.0;
        let m = &self.memory;
        let _ = writeln!(
            out,
            "| agent (release build) | RSS with the table, after the load (peak) | RSS with the table, fresh agent (peak; anon + file) | baseline: lab's Services only, fresh (peak; anon + file) | table in the maps after start | target |"
        );
        let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
        for (i, node) in m.nodes.iter().enumerate() {
            let (b, l, f) = (m.lab_only[i], m.loaded[i], m.fresh[i]);
            let _ = writeln!(
                out,
                "| {node} | {:.1} MiB ({:.1}) | {:.1} MiB ({:.1}; {:.1} + {:.1}) | {:.1} MiB ({:.1}; {:.1} + {:.1}) | {:.1} s | < 40 MiB: {} |",
                mib(l.rss),
                mib(l.peak),
                mib(f.rss),
                mib(f.peak),
                mib(f.anon),
                mib(f.file),
                mib(b.rss),
                mib(b.peak),
                mib(b.anon),
                mib(b.file),
                m.fresh_table_secs[i],
                verdict(l.rss.max(f.rss) < TARGET_RSS_KIB)
            );
        }
        let _ = writeln!(
            out,
            "\nHow: connections/s is `nodeward-lab-load crr` ({CRR_THREADS} unpinned threads, {} s: \
             connect, the server accepts and closes, the client closes; each path one server port \
             in every round, so 4-tuples repeat as real clients' do, and a port of its own, so \
             the server's TIME_WAIT from one path never meets another's connections); request/response is `nodeward-lab-load \
             rr`, one connection, 64-byte messages, one in flight, {} s, unpinned. Every path \
             has both agents running with the same table. Pod IP: the client (in the pod's \
             cgroup) dials the server pod. nodeward: the same client dials the ClusterIP and the \
             agent's cgroup connect program picks the backend. iptables: the Services as \
             kube-proxy's iptables mode writes them ({}; KUBE-SERVICES with one rule per Service \
             port, the target's in the middle, KUBE-SVC-* picking a KUBE-SEP-* by `statistic \
             --mode random`, DNAT there, KUBE-POSTROUTING masquerade for hairpin), loaded into \
             both nodes' nat tables with `iptables-restore` for this path only and removed \
             after; the client runs in the pod's network namespace but in a cgroup beside the \
             node's, so the agent's connect programs never see it. RSS is `VmRSS` (`VmHWM`; \
             `RssAnon` + `RssFile`), after the rounds and again for fresh agents adopting the \
             pinned state; the baseline is the same agents before the 1,001 Services were \
             written. Whole run: \
             {:.0?}.",
            self.d.crr_secs, self.d.rr_secs, self.iptables, self.runtime
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<SimpleService> {
        let mut table = bulk_services("backend", 1000, 10);
        table.insert(
            500,
            SimpleService {
                namespace: "backend".into(),
                name: TARGET_NAME.into(),
                cluster_ip: TARGET_VIP,
                ports: vec![("sink".into(), 7232, 7232), ("echo".into(), 7000, 7000)],
                backends: vec![Ipv4Addr::new(10, 244, 2, 11)],
            },
        );
        table
    }

    #[test]
    fn kube_proxy_rules_have_a_chain_per_service_port_and_backend_in_kube_proxys_shape() {
        let text = kube_proxy_rules(&table());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        let portals: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        // 1,000 bulk ports, the target's two, then the node-port jump last.
        assert_eq!(portals.len(), 1000 + 2 + 1);
        assert!(portals.last().unwrap().ends_with("-j KUBE-NODEPORTS"));
        assert!(portals[500].contains("-d 10.96.2.10/32") && portals[500].contains("--dport 7232"));
        // Every jumped-to chain is declared once.
        let declared: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let mut unique = declared.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), declared.len());
        assert_eq!(declared.len(), 4 + 1000 * (1 + 10) + 2 * 2);
        assert!(declared.iter().all(|c| c.len() <= 28), "iptables' limit");
        // A bulk Service picks each of its 10 backends with equal chance: 1/10, 1/9, ... 1/2,
        // then the last unconditionally.
        let svc = portals[0].rsplit(' ').next().unwrap();
        let picks: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with(&format!("-A {svc} ")))
            .collect();
        assert_eq!(picks.len(), 10);
        assert!(picks[0].contains("--probability 0.10000000000"));
        assert!(picks[8].contains("--probability 0.50000000000"));
        assert!(!picks[9].contains("statistic"));
        let target_sep = lines
            .iter()
            .find(|l| l.contains("DNAT --to-destination 10.244.2.11:7000"))
            .expect("the target's echo backend");
        assert!(target_sep.starts_with("-A KUBE-SEP-"));
    }
}
