//! `cargo xtask bench http`: on one 2-node lab, HTTP requests from `frontend/web-0` (node-1) to
//! `backend/api-1` (node-2), side by side in one invocation, three ways:
//!
//! - plaintext, no agent: to the pod's address (agents stopped and their pinned state removed),
//! - the L4 tunnel: both namespaces meshed (`MutualTLS` PERMISSIVE), to a Service whose port is
//!   not HTTP (named `tcp`), so the agents carry the bytes over HBONE without parsing them,
//! - the L7 path: the same, to a Service whose port is HTTP with a two-backend weighted
//!   `HTTPRoute` (90/10 to two Services, each the server pod on its own port): the source agent
//!   parses every request, picks the backend and sends it over the tunnel.
//!
//! Each way, for HTTP/1.1 and prior-knowledge h2c, with `h2load` (nghttp2's load generator, its
//! threads unpinned, one fixed server port per backend): latency p50/p99 at a fixed 1,000
//! requests/s, and the highest requests/s with latency at saturation. The server is
//! `nodeward-lab-http` (hyper, HTTP/1.1 and h2c on one port). Rounds in ABBA order, medians over
//! the rounds. The golden metrics of the client's agent prove which path each sample took: they
//! count every L7 request and none of the L4 ones. Both agents' CPU per 1,000 requests comes
//! from `/proc/<pid>/stat` over each sample.
//!
//! Then 100 more Services with one weighted route each: both agents' RSS after the load and as
//! fresh agents.
//!
//! Prints the results and writes them to README's Benchmarks section under "### HTTP"
//! (`--quick` only prints).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nodeward_lab::load::Process;
use nodeward_lab::manifests::{documents, pod_service};
use nodeward_lab::{Lab, PodState, netpol, wait};
use serde_json::json;

use crate::bench::{CLK_TCK, Machine, ReleaseLab, agent_kib, in_pod, median, release_lab};

const CLIENT: &str = "frontend/web-0";
const SERVER: &str = "backend/api-1";
/// The server's ports: the route's two backends, and the L4 Service's (which the no-agent runs
/// dial directly). Each its own: the agent takes a connection to a backend of a routed Service
/// port for a request to that Service (README: HTTP routes, the limitation until the kernel says
/// which Service was dialled), so the L4 path must not reach the route's backends.
const V1_PORT: u16 = 8081;
const V2_PORT: u16 = 8082;
const L4_PORT: u16 = 8083;
/// The 100 routes' Services' target ports (nothing listens there: their routes send to the
/// route's two backends), one each for the same reason.
const ROUTES_FIRST_PORT: u16 = 10_000;
/// ClusterIPs: the route's parent, its two backends, the L4 Service; the 100 routes' Services
/// are 10.96.6.x.
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 5, 1);
const V1_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 5, 2);
const V2_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 5, 3);
const L4_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 5, 4);
const ROUTES: u32 = 100;
/// The fixed rate, over `FIXED_CLIENTS` connections.
const FIXED_RATE: u32 = 1000;
const FIXED_CLIENTS: u32 = 10;
/// h2load's threads (at most its connections: the readiness checks use 2).
const THREADS: u32 = 2;
/// The targets.
const TARGET_P99_ADDED_US: f64 = 500.0;
const TARGET_SATURATION_RATIO: f64 = 0.70;
const TARGET_RSS_KIB: u64 = 60 * 1024;
/// How long the agents get to mesh the pods and apply the routes after a change.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long each measurement runs: the full run, or `--quick` for a smoke run.
#[derive(Clone, Copy)]
struct Durations {
    rounds: usize,
    fixed_secs: u32,
    saturation_secs: u32,
}

impl Durations {
    const FULL: Self = Self {
        rounds: 2,
        fixed_secs: 8,
        saturation_secs: 5,
    };
    const QUICK: Self = Self {
        rounds: 1,
        fixed_secs: 2,
        saturation_secs: 2,
    };
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Way {
    NoAgent,
    L4,
    L7,
}

impl Way {
    fn title(self) -> &'static str {
        match self {
            Self::NoAgent => "plaintext, no agent",
            Self::L4 => "L4 tunnel (port not HTTP)",
            Self::L7 => "L7, weighted route (90/10)",
        }
    }
}

/// ABBA: drift over the run affects every way alike.
const ORDER: [[Way; 3]; 2] = [
    [Way::NoAgent, Way::L4, Way::L7],
    [Way::L7, Way::L4, Way::NoAgent],
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Proto {
    H1,
    H2c,
}

impl Proto {
    const ALL: [Self; 2] = [Self::H1, Self::H2c];

    fn title(self) -> &'static str {
        match self {
            Self::H1 => "HTTP/1.1",
            Self::H2c => "h2c",
        }
    }

    /// h2load's arguments at saturation: HTTP/1.1 clients have one request in flight per
    /// connection (no pipelining, as browsers and most clients); h2c clients multiplex.
    fn saturation_args(self) -> Vec<String> {
        match self {
            Self::H1 => vec![
                "--h1".into(),
                "-c".into(),
                "32".into(),
                "-m".into(),
                "1".into(),
            ],
            Self::H2c => vec!["-c".into(), "8".into(), "-m".into(), "16".into()],
        }
    }

    fn fixed_args(self) -> Vec<String> {
        let mut args = vec![
            "-c".to_string(),
            FIXED_CLIENTS.to_string(),
            "-m".into(),
            "1".into(),
            "--rps".into(),
            (FIXED_RATE / FIXED_CLIENTS).to_string(),
        ];
        if self == Self::H1 {
            args.push("--h1".into());
        }
        args
    }
}

/// One h2load run.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    req_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    succeeded: u64,
    /// Requests that failed, errored, timed out or were not answered 2xx.
    failed: u64,
    /// Both agents' CPU over the run, in seconds (0 without agents).
    agent_cpu_secs: f64,
    /// The client agent's golden metrics' rise for the route's Service over the run.
    counted_l7: u64,
    /// The client agent's `tunnel.outbound.ok` rise over the run: connections it tunnelled.
    tunnelled: u64,
}

impl Run {
    /// Milliseconds of agent CPU per 1,000 requests.
    fn cpu_ms_per_1k(&self) -> f64 {
        if self.succeeded == 0 {
            return f64::NAN;
        }
        self.agent_cpu_secs * 1000.0 / (self.succeeded as f64 / 1000.0)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    fixed: Run,
    saturation: Run,
}

type Samples = BTreeMap<(Proto, Way), Vec<Sample>>;

/// Both agents' memory, in KiB (client node, server node).
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    before_routes: [u64; 2],
    loaded: [u64; 2],
    fresh: [u64; 2],
}

struct Bench {
    lab: Lab,
    nodeward: PathBuf,
    client: PodState,
    server: PodState,
    d: Durations,
    agents: bool,
    log: PathBuf,
}

pub fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let _stats = crate::bench::BpfStats::set(false)?;
    let d = if quick {
        Durations::QUICK
    } else {
        Durations::FULL
    };
    let h2load = which::which("h2load").context(
        "h2load not found: `cargo xtask setup` installs it (Debian package nghttp2-client)",
    )?;
    let ReleaseLab {
        lab,
        nodeward,
        load,
        client,
        server,
    } = release_lab(CLIENT, SERVER)?;
    let http = load.with_file_name("nodeward-lab-http");
    let log = lab.state().dir.join("tmp").join("bench-http-h2load.log");
    std::fs::create_dir_all(log.parent().context("the log's directory")?)?;
    let mut bench = Bench {
        lab,
        nodeward,
        client,
        server,
        d,
        agents: false,
        log,
    };
    let _backends = bench.start_backends(&http)?;
    let result = bench.run_all(&h2load);
    let (samples, memory) = result?;
    drop(bench);

    let report = Report {
        samples,
        memory,
        d,
        runtime: started.elapsed(),
    };
    let table = report.markdown();
    println!("\n{table}");
    if quick {
        println!(
            "--quick: README.md left alone. bench http took {:.0?}",
            started.elapsed()
        );
    } else {
        crate::bench::update_readme_subsection("HTTP", &table)?;
        println!(
            "README.md: Benchmarks / HTTP updated. bench http took {:.0?}",
            started.elapsed()
        );
    }
    Ok(())
}

/// A Service at `vip:80` whose port is named `port_name`, to `target` on `server`.
fn service(name: &str, vip: Ipv4Addr, port_name: &str, target: u16, server: &PodState) -> String {
    pod_service(name, &server.namespace, vip, port_name, target, &[server])
}

/// An `HTTPRoute` on Service `parent` port 80: 90% to `bench-v1`, 10% to `bench-v2`.
fn weighted_route(name: &str, parent: &str, namespace: &str) -> String {
    documents([json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": parent, "port": 80 }],
            "rules": [{ "backendRefs": [
                { "name": "bench-v1", "port": 80, "weight": 90 },
                { "name": "bench-v2", "port": 80, "weight": 10 },
            ]}],
        },
    })])
}

/// The 100 routes' Services: 10.96.6.1 to 10.96.6.100, `bench-route-N`.
fn route_vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 6, u8::try_from(i).unwrap_or(u8::MAX))
}

impl Bench {
    /// The route's two backends on the server pod (`v1`, `v2`) and the L4 Service's, once they
    /// answer.
    fn start_backends(&self, http: &std::path::Path) -> Result<Vec<Process>> {
        let mut backends = Vec::new();
        for (port, name) in [(V1_PORT, "v1"), (V2_PORT, "v2"), (L4_PORT, "l4")] {
            let port_arg = port.to_string();
            backends.push(Process::spawn(
                in_pod(
                    &self.server,
                    http.as_os_str(),
                    &["--port", &port_arg, "--name", name],
                )
                .stdout(Stdio::null()),
                "nodeward-lab-http",
            )?);
            let addr = SocketAddr::from((self.server.ip4, port));
            ensure!(
                wait::eventually(Duration::from_secs(5), Duration::from_millis(20), || {
                    nodeward_lab::probe::connect_from(
                        &self.client.netns,
                        addr,
                        Duration::from_millis(200),
                    )
                    .is_ok()
                }),
                "the HTTP backend does not answer on {addr}"
            );
        }
        Ok(backends)
    }

    fn run_all(&mut self, h2load: &std::path::Path) -> Result<(Samples, Memory)> {
        let ns = [self.client.namespace.clone(), self.server.namespace.clone()];
        for n in &ns {
            self.lab.write_manifest(
                &format!("bench-mtls-{n}"),
                &netpol::mutual_tls(n, "PERMISSIVE"),
            )?;
        }
        let manifests = [
            service("bench-web", WEB_VIP, "http", V1_PORT, &self.server),
            service("bench-v1", V1_VIP, "http", V1_PORT, &self.server),
            service("bench-v2", V2_VIP, "http", V2_PORT, &self.server),
            service("bench-l4", L4_VIP, "tcp", L4_PORT, &self.server),
            weighted_route("bench-canary", "bench-web", &self.server.namespace),
        ];
        self.lab
            .write_manifest("bench-http", &manifests.join("---\n"))?;
        let mut samples = Samples::new();
        for round in 0..self.d.rounds {
            for &way in &ORDER[round % 2] {
                self.enter(way, h2load)?;
                for proto in Proto::ALL {
                    let sample = self.measure(h2load, way, proto)?;
                    eprintln!(
                        "bench: round {} {:<8} {:<28} 1k/s p50 {:>7.1} µs p99 {:>7.1} µs | max {:>7.0} req/s p50 {:>7.1} µs p99 {:>7.1} µs | failed {} | agent CPU {:.1} ms/1k | L7 counted +{} | tunnelled +{}",
                        round + 1,
                        proto.title(),
                        way.title(),
                        sample.fixed.p50_us,
                        sample.fixed.p99_us,
                        sample.saturation.req_per_sec,
                        sample.saturation.p50_us,
                        sample.saturation.p99_us,
                        sample.fixed.failed + sample.saturation.failed,
                        sample.fixed.cpu_ms_per_1k(),
                        sample.fixed.counted_l7 + sample.saturation.counted_l7,
                        sample.fixed.tunnelled + sample.saturation.tunnelled,
                    );
                    samples.entry((proto, way)).or_default().push(sample);
                }
            }
        }
        let memory = self.memory(h2load)?;
        Ok((samples, memory))
    }

    fn nodes(&self) -> [String; 2] {
        [self.client.node.clone(), self.server.node.clone()]
    }

    /// Moves the lab to `way`: agents stopped (and their pinned state removed) or running, with
    /// the pods meshed and the route applied.
    fn enter(&mut self, way: Way, h2load: &std::path::Path) -> Result<()> {
        let t = Instant::now();
        match way {
            Way::NoAgent => self.stop_agents()?,
            Way::L4 | Way::L7 => self.start_agents(h2load)?,
        }
        eprintln!("bench: {} in force ({:.1?})", way.title(), t.elapsed());
        Ok(())
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

    fn start_agents(&mut self, h2load: &std::path::Path) -> Result<()> {
        if self.agents {
            return Ok(());
        }
        for node in self.lab.node_names() {
            self.lab.start_agent(&node)?;
        }
        self.agents = true;
        self.wait_routed(h2load, WEB_VIP, "bench-web")
    }

    /// Waits until requests to `vip` are routed (the client agent's golden metrics count them
    /// for Service `service`) and the L4 Service answers through the tunnel.
    fn wait_routed(&self, h2load: &std::path::Path, vip: Ipv4Addr, service: &str) -> Result<()> {
        let mut last = String::new();
        let ok = wait::eventually(READY_TIMEOUT, Duration::from_millis(200), || {
            let before = self.l7_count(service).unwrap_or(0);
            match self.h2load(h2load, &["-n", "10", "-c", "2", "--h1"], vip, None) {
                Ok(run) => {
                    let counted = self.l7_count(service).unwrap_or(0) - before;
                    last = format!("{} succeeded, {counted} counted", run.succeeded);
                    run.succeeded == 10 && counted == 10
                }
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            }
        });
        ensure!(
            ok,
            "requests to {vip} were not routed as Service {service} within {READY_TIMEOUT:?} \
             (last: {last})\n{}",
            self.lab.agent_logs_tail(20)
        );
        let tunnel = wait::eventually(READY_TIMEOUT, Duration::from_millis(200), || {
            self.h2load(h2load, &["-n", "10", "-c", "2", "--h1"], L4_VIP, None)
                .is_ok_and(|r| r.succeeded == 10)
        });
        ensure!(
            tunnel,
            "the L4 Service {L4_VIP} does not answer within {READY_TIMEOUT:?}\n{}",
            self.lab.agent_logs_tail(20)
        );
        Ok(())
    }

    /// `nodeward_http_requests_total` of the client node's agent for Service `service`, summed
    /// over its series (0 without an agent).
    fn l7_count(&self, service: &str) -> Result<u64> {
        if !self.agents {
            return Ok(0);
        }
        let text = self.lab.agent_http_get(&self.client.node, "/metrics")?;
        let label = format!("destination_service=\"{service}\"");
        Ok(text
            .lines()
            .filter(|l| l.starts_with("nodeward_http_requests_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum())
    }

    /// The client agent's `tunnel.outbound.ok` (0 without an agent).
    fn tunnelled(&self) -> Result<u64> {
        if !self.agents {
            return Ok(0);
        }
        let status = self.lab.status(&self.client.node)?;
        Ok(status["tunnel"]["outbound"]["ok"].as_u64().unwrap_or(0))
    }

    /// Both agents' CPU time so far, in clock ticks.
    fn agent_ticks(&self) -> Result<u64> {
        if !self.agents {
            return Ok(0);
        }
        let mut total = 0;
        for node in self.nodes() {
            let pid = self
                .lab
                .agent_pid(&node)
                .with_context(|| format!("no agent on {node}"))?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("reading /proc/{pid}/stat ({node}'s agent)"))?;
            // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
            total += field(14).unwrap_or(0) + field(15).unwrap_or(0);
        }
        Ok(total)
    }

    /// Runs h2load in the client pod against `vip:80` (or the server pod's first port without
    /// agents) and reads its summary and, with `duration`, its per-request log.
    fn h2load(
        &self,
        h2load: &std::path::Path,
        args: &[&str],
        vip: Ipv4Addr,
        duration: Option<u32>,
    ) -> Result<Run> {
        let url = if self.agents {
            format!("http://{vip}:80/")
        } else {
            format!("http://{}:{L4_PORT}/", self.server.ip4)
        };
        let _ = std::fs::remove_file(&self.log);
        let mut cmd = nodeward_lab::load::in_pod(&self.client, h2load);
        cmd.args(args).args(["-t", &THREADS.to_string()]);
        if let Some(secs) = duration {
            cmd.args(["-D", &secs.to_string(), "--warm-up-time", "1"])
                .arg(format!("--log-file={}", self.log.display()));
        }
        cmd.arg(&url);
        let out = cmd
            .output()
            .with_context(|| format!("running h2load {url}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "h2load {url} failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let mut run =
            parse_h2load(&text).with_context(|| format!("h2load {url} printed {text}"))?;
        if duration.is_some() {
            let log = std::fs::read_to_string(&self.log)
                .with_context(|| format!("reading {}", self.log.display()))?;
            let mut us: Vec<f64> = log
                .lines()
                .filter_map(|l| {
                    let mut cols = l.split('\t');
                    let status = cols.nth(1)?;
                    let took = cols.next()?;
                    status
                        .starts_with('2')
                        .then(|| took.trim().parse::<f64>().ok())
                        .flatten()
                })
                .collect();
            us.sort_by(f64::total_cmp);
            run.p50_us = quantile(&us, 0.50);
            run.p99_us = quantile(&us, 0.99);
        }
        Ok(run)
    }

    /// One way and protocol: the fixed rate, then saturation.
    fn measure(&self, h2load: &std::path::Path, way: Way, proto: Proto) -> Result<Sample> {
        let vip = match way {
            Way::NoAgent | Way::L4 => L4_VIP,
            Way::L7 => WEB_VIP,
        };
        let mut sample = Sample::default();
        for fixed in [true, false] {
            let args = if fixed {
                proto.fixed_args()
            } else {
                proto.saturation_args()
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let secs = if fixed {
                self.d.fixed_secs
            } else {
                self.d.saturation_secs
            };
            let (ticks, counted, tunnelled) = (
                self.agent_ticks()?,
                self.l7_count("bench-web")?,
                self.tunnelled()?,
            );
            let mut run = self.h2load(h2load, &args, vip, Some(secs))?;
            run.agent_cpu_secs = self.agent_ticks()?.saturating_sub(ticks) as f64 / CLK_TCK;
            run.counted_l7 = self.l7_count("bench-web")?.saturating_sub(counted);
            run.tunnelled = self.tunnelled()?.saturating_sub(tunnelled);
            self.check_path(way, proto, &run)?;
            if fixed {
                sample.fixed = run;
            } else {
                sample.saturation = run;
            }
        }
        Ok(sample)
    }

    /// Fails unless the client agent's golden metrics counted the requests exactly on the L7
    /// path: without it an "L7" figure could be the tunnel's, or an "L4" one the parser's.
    fn check_path(&self, way: Way, proto: Proto, run: &Run) -> Result<()> {
        ensure!(
            run.succeeded > 0,
            "{} {}: no request succeeded ({} failed){}",
            proto.title(),
            way.title(),
            run.failed,
            if self.agents {
                format!("\n{}", self.lab.agent_logs_tail(20))
            } else {
                String::new()
            }
        );
        match way {
            Way::NoAgent => {}
            Way::L4 => ensure!(
                run.counted_l7 == 0 && run.tunnelled > 0,
                "{} {}: the route's Service counted {} requests, the client's agent tunnelled \
                 {} connections: not the L4 tunnel",
                proto.title(),
                way.title(),
                run.counted_l7,
                run.tunnelled
            ),
            // Warm-up requests are counted too: at least the measured ones.
            Way::L7 => ensure!(
                run.counted_l7 >= run.succeeded,
                "{} {}: the golden metrics counted {} of {} requests: not routed",
                proto.title(),
                way.title(),
                run.counted_l7,
                run.succeeded
            ),
        }
        Ok(())
    }

    /// The 100 routes: both agents' RSS before them, after a round of load with them, and as
    /// fresh agents.
    fn memory(&mut self, h2load: &std::path::Path) -> Result<Memory> {
        self.start_agents(h2load)?;
        let nodes = self.nodes();
        let rss = |lab: &Lab| -> Result<[u64; 2]> {
            Ok([
                agent_kib(lab, &nodes[0], "VmRSS:")?,
                agent_kib(lab, &nodes[1], "VmRSS:")?,
            ])
        };
        let before_routes = rss(&self.lab)?;
        let mut docs = Vec::new();
        for i in 1..=ROUTES {
            let name = format!("bench-route-{i}");
            let port = ROUTES_FIRST_PORT + u16::try_from(i).unwrap_or(u16::MAX - ROUTES_FIRST_PORT);
            docs.push(service(&name, route_vip(i), "http", port, &self.server));
            docs.push(weighted_route(&name, &name, &self.server.namespace));
        }
        self.lab
            .write_manifest("bench-http-routes", &docs.join("---\n"))?;
        let last = format!("bench-route-{ROUTES}");
        self.wait_routed(h2load, route_vip(ROUTES), &last)?;
        for proto in Proto::ALL {
            let args = proto.saturation_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.h2load(h2load, &args, WEB_VIP, Some(self.d.saturation_secs))?;
        }
        let loaded = rss(&self.lab)?;
        for node in self.lab.node_names() {
            self.lab.stop_agent(&node)?;
            self.lab.start_agent(&node)?;
        }
        self.wait_routed(h2load, route_vip(ROUTES), &last)?;
        let fresh = rss(&self.lab)?;
        Ok(Memory {
            before_routes,
            loaded,
            fresh,
        })
    }
}

/// h2load's summary: requests/s, and the requests that succeeded and failed.
fn parse_h2load(text: &str) -> Result<Run> {
    let mut run = Run::default();
    let number = |s: &str| -> Option<f64> { s.trim().split(' ').next()?.parse().ok() };
    let finished = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .context("no \"finished in\" line")?;
    run.req_per_sec = finished
        .split(", ")
        .nth(1)
        .and_then(number)
        .context("no req/s on the \"finished in\" line")?;
    let requests = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .context("no \"requests:\" line")?;
    let mut not_ok = 0.0;
    for part in requests.split(", ") {
        let value = number(part).unwrap_or(0.0);
        if part.ends_with("succeeded") {
            run.succeeded = value as u64;
        } else if part.ends_with("failed") || part.ends_with("errored") || part.ends_with("timeout")
        {
            not_ok += value;
        }
    }
    let codes = text
        .lines()
        .find_map(|l| l.strip_prefix("status codes: "))
        .context("no \"status codes:\" line")?;
    let two_xx = codes
        .split(", ")
        .find(|p| p.ends_with("2xx"))
        .and_then(number)
        .unwrap_or(0.0) as u64;
    // h2load's "succeeded" is any answer; a 5xx is no success here.
    not_ok += run.succeeded.saturating_sub(two_xx) as f64;
    run.succeeded = two_xx;
    run.failed = not_ok as u64;
    Ok(run)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Report {
    samples: Samples,
    memory: Memory,
    d: Durations,
    runtime: Duration,
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISSED" }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Report {
    fn median(&self, proto: Proto, way: Way, f: impl Fn(&Sample) -> f64) -> f64 {
        median(
            self.samples
                .get(&(proto, way))
                .map(|v| v.iter().map(&f).collect())
                .unwrap_or_default(),
        )
    }

    fn failed(&self) -> u64 {
        self.samples
            .values()
            .flatten()
            .map(|s| s.fixed.failed + s.saturation.failed)
            .sum()
    }

    fn markdown(&self) -> String {
        let m = Machine::read();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "`cargo xtask bench http` ({}, {} cores, {}, kernel {}; {} round{} in ABBA order, \
             medians; the machine was shared with other builds and tests, so absolute figures \
             move from run to run, the ratios less): `frontend/web-0` (node-1) to \
             `backend/api-1` (node-2), [h2load](https://nghttp2.org/documentation/h2load.1.html) \
             with {THREADS} unpinned threads against `nodeward-lab-http` (hyper, HTTP/1.1 and \
             h2c; 2 worker threads). At the fixed rate, {FIXED_RATE} requests/s over {FIXED_CLIENTS} connections \
             for {} s; at saturation, HTTP/1.1 over 32 connections with one request in flight \
             each, h2c over 8 connections with 16 streams each, for {} s. The L4 tunnel is a \
             Service whose port is not HTTP; the L7 path a Service with an `HTTPRoute` sending \
             90/10 to two Services (the server pod on two ports), both meshed (PERMISSIVE); \
             the client agent's golden metrics prove each sample's path.\n",
            m.date,
            m.cores,
            m.cpu,
            m.kernel,
            self.d.rounds,
            if self.d.rounds == 1 { "" } else { "s" },
            self.d.fixed_secs,
            self.d.saturation_secs,
        );
        let _ = writeln!(
            out,
            "| | plaintext, no agent | L4 tunnel | L7, weighted route |\n|---|---:|---:|---:|"
        );
        type Figure = (&'static str, fn(&Sample) -> f64);
        let figures: [Figure; 5] = [
            ("p50 at 1,000 req/s (µs)", |s| s.fixed.p50_us),
            ("p99 at 1,000 req/s (µs)", |s| s.fixed.p99_us),
            ("max req/s", |s| s.saturation.req_per_sec),
            ("p50 at saturation (µs)", |s| s.saturation.p50_us),
            ("p99 at saturation (µs)", |s| s.saturation.p99_us),
        ];
        for proto in Proto::ALL {
            for (title, f) in &figures {
                let base = self.median(proto, Way::NoAgent, f);
                let l4 = self.median(proto, Way::L4, f);
                let l7 = self.median(proto, Way::L7, f);
                let fmt = |v: f64| format!("{v:.0}");
                let _ = writeln!(
                    out,
                    "| {} {title} | {} | {} ({:.2}× no agent) | {} ({:.2}× L4, {:.2}× no agent) |",
                    proto.title(),
                    fmt(base),
                    fmt(l4),
                    l4 / base,
                    fmt(l7),
                    l7 / l4,
                    l7 / base,
                );
            }
        }
        let cpu = |proto, way| self.median(proto, way, |s| s.fixed.cpu_ms_per_1k());
        let cpu_sat = |proto, way| self.median(proto, way, |s| s.saturation.cpu_ms_per_1k());
        for proto in Proto::ALL {
            let _ = writeln!(
                out,
                "| {} agents' CPU per 1,000 requests (ms, both agents; at 1,000 req/s / at saturation) | – | {:.1} / {:.1} | {:.1} / {:.1} ({:.2}× / {:.2}× L4) |",
                proto.title(),
                cpu(proto, Way::L4),
                cpu_sat(proto, Way::L4),
                cpu(proto, Way::L7),
                cpu_sat(proto, Way::L7),
                cpu(proto, Way::L7) / cpu(proto, Way::L4),
                cpu_sat(proto, Way::L7) / cpu_sat(proto, Way::L4),
            );
        }
        let mem = &self.memory;
        let _ = writeln!(
            out,
            "\nAgent RSS (client node / server node) with {ROUTES} more Services with a weighted \
             route each: {:.1} / {:.1} MiB after a saturation run, {:.1} / {:.1} MiB as fresh \
             agents (before the {ROUTES} routes: {:.1} / {:.1} MiB).\n",
            mib(mem.loaded[0]),
            mib(mem.loaded[1]),
            mib(mem.fresh[0]),
            mib(mem.fresh[1]),
            mib(mem.before_routes[0]),
            mib(mem.before_routes[1]),
        );
        let _ = writeln!(out, "Targets:\n");
        for proto in Proto::ALL {
            let added = self.median(proto, Way::L7, |s| s.fixed.p99_us)
                - self.median(proto, Way::L4, |s| s.fixed.p99_us);
            let _ = writeln!(
                out,
                "- {} L7 adds < {TARGET_P99_ADDED_US:.0} µs p99 over the L4 tunnel at 1,000 req/s: \
                 {added:+.0} µs, {}",
                proto.title(),
                pass(added < TARGET_P99_ADDED_US)
            );
        }
        for proto in Proto::ALL {
            let ratio = self.median(proto, Way::L7, |s| s.saturation.req_per_sec)
                / self.median(proto, Way::L4, |s| s.saturation.req_per_sec);
            let _ = writeln!(
                out,
                "- {} L7 at saturation ≥ {:.0}% of the L4 tunnel's req/s: {:.0}%, {}",
                proto.title(),
                TARGET_SATURATION_RATIO * 100.0,
                ratio * 100.0,
                pass(ratio >= TARGET_SATURATION_RATIO)
            );
        }
        let worst = mem
            .loaded
            .iter()
            .chain(&mem.fresh)
            .copied()
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "- agent RSS with {ROUTES} routes < {} MiB: at most {:.1} MiB, {}",
            TARGET_RSS_KIB / 1024,
            mib(worst),
            pass(worst < TARGET_RSS_KIB)
        );
        let failed = self.failed();
        if failed > 0 {
            let _ = writeln!(
                out,
                "\n{failed} requests failed or were not answered 2xx over the run."
            );
        }
        let _ = writeln!(
            out,
            "\nThe run took {:.0} s. Server ports, fixed for the whole run: the route's \
             backends {V1_PORT} and {V2_PORT}, the L4 Service and the no-agent runs {L4_PORT}. \
             The agents' CPU is counted over the whole h2load run, its 1 s warm-up included, \
             and divided by the measured requests only: it overstates the cost per request by \
             up to 1/{} at the fixed rate and 1/{} at saturation, for every way alike.",
            self.runtime.as_secs_f64(),
            self.d.fixed_secs,
            self.d.saturation_secs,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::parse_h2load;

    #[test]
    fn h2load_summary_counts_only_2xx_as_success() {
        let text = "finished in 2.00s, 1000.50 req/s, 120.00KB/s\n\
                    requests: 2001 total, 2001 started, 2001 done, 2000 succeeded, 1 failed, 0 errored, 0 timeout\n\
                    status codes: 1990 2xx, 0 3xx, 0 4xx, 10 5xx\n";
        let run = parse_h2load(text).unwrap();
        assert!((run.req_per_sec - 1000.5).abs() < 1e-9);
        assert_eq!(run.succeeded, 1990);
        assert_eq!(run.failed, 11);
    }
}
