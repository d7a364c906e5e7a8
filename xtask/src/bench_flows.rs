//! `cargo xtask bench flows`: on one 2-node lab, cross-node pod to pod (client on node-1, server
//! on node-2), what flow events cost and how many the agents keep up with:
//!
//! 1. The highest new-connections rate with zero lost flows: `crr` at 1, 2, 4, 8 threads with
//!    the agents at `--flow-events all`; after each step, both nodes' `datapath.new_flows` delta
//!    against the flows they recorded (`flows.total`) and the loss counters. The same steps
//!    without agents give the lab's own ceiling.
//! 2. The datapath cost of flow events: request/response (`rr`) and `crr` with the agents at
//!    `--flow-events all` versus `drops`, interleaved (ABBA), median of [`ROUNDS`] rounds.
//!
//! Prints a table and writes it to README's Benchmarks section under "### Flows".

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use nodeward_lab::manifests::documents;
use nodeward_lab::{Lab, PodState, sys, wait};
use serde_json::Value;

use crate::bench::{
    Machine, RR_CPU, RR_SECS, ReleaseLab, in_pod, load_server, median, release_lab, rr_args,
};
use crate::bench_rules::{self as rules, Target};

const CLIENT: &str = "frontend/web-0";
const SERVER: &str = "backend/api-1";
const STEPS: [u32; 4] = [1, 2, 4, 8];
const CRR_SECS: f64 = 2.0;
const CRR_THREADS: u32 = 4;
const ROUNDS: usize = 3;
/// The target: no loss at this many new flows per second.
const TARGET_RATE: f64 = 20_000.0;
/// The target: flow events cost under this fraction of the request/response rate.
const TARGET_COST: f64 = 0.02;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Events {
    All,
    Drops,
}

impl Events {
    fn arg(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Drops => "drops",
        }
    }
}

/// The counters of one node's `nodeward status -o json` that matter here.
#[derive(Clone, Copy, Default, Debug)]
struct Counters {
    new_flows: u64,
    total: u64,
    /// kernel_ring_full + follower_lagged + flow_log_dropped: flows never recorded or never
    /// delivered.
    lost: u64,
    /// Flows evicted from the in-memory buffer (`--flow-buffer`) by newer ones: retention, not
    /// loss (they were recorded, counted in `total`, and written to the flow log).
    overwritten: u64,
}

impl Counters {
    fn of(status: &Value) -> Self {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let lost = &status["flows"]["lost"];
        Self {
            new_flows: n(&status["datapath"]["new_flows"]),
            total: n(&status["flows"]["total"]),
            lost: n(&lost["kernel_ring_full"])
                + n(&lost["follower_lagged"])
                + n(&lost["flow_log_dropped"]),
            overwritten: n(&lost["store_overwritten"]),
        }
    }

    fn delta(self, before: Self) -> Self {
        Self {
            new_flows: self.new_flows.saturating_sub(before.new_flows),
            total: self.total.saturating_sub(before.total),
            lost: self.lost.saturating_sub(before.lost),
            overwritten: self.overwritten.saturating_sub(before.overwritten),
        }
    }
}

/// One step of the ladder.
struct Step {
    threads: u32,
    no_agent: f64,
    with_agents: f64,
    /// Server node, then client node.
    server: Counters,
    client: Counters,
}

impl Step {
    fn zero_loss(&self) -> bool {
        [self.server, self.client]
            .iter()
            .all(|c| c.lost == 0 && c.total >= c.new_flows && c.new_flows > 0)
    }
}

#[derive(Clone, Copy, Default)]
struct CostSample {
    rr_per_sec: f64,
    rr_p50_us: f64,
    crr_per_sec: f64,
}

struct Bench {
    lab: Lab,
    load: PathBuf,
    client: PodState,
    server: PodState,
    events: Option<Events>,
    next_sink: u16,
}

/// The load server in the server pod, killed (by pid) on the way out.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let _stats = crate::bench::BpfStats::set(false)?;
    let ReleaseLab {
        lab,
        load,
        client,
        server,
        ..
    } = release_lab(CLIENT, SERVER)?;
    let mut bench = Bench {
        lab,
        load,
        client,
        server,
        events: None,
        next_sink: rules::SINK_PORTS.0,
    };
    let _server = bench.start_server()?;
    sys::sysctls(
        &bench.client.netns,
        &[("net/ipv4/ip_local_port_range".to_string(), "10000 65000")],
    )?;
    bench.write_policy()?;

    // 1. The ladder, first without agents (nothing was ever attached), then with.
    let mut no_agent = Vec::new();
    for threads in STEPS {
        let rate = bench.crr(threads)?;
        eprintln!("bench: no agent, crr {threads} threads: {rate:.0} conn/s");
        no_agent.push(rate);
    }
    bench.agents(Events::All)?;
    let mut steps = Vec::new();
    for (i, threads) in STEPS.into_iter().enumerate() {
        let (s0, c0) = bench.counters()?;
        let rate = bench.crr(threads)?;
        bench.settle()?;
        let (s1, c1) = bench.counters()?;
        let step = Step {
            threads,
            no_agent: no_agent[i],
            with_agents: rate,
            server: s1.delta(s0),
            client: c1.delta(c0),
        };
        eprintln!(
            "bench: events all, crr {threads} threads: {rate:.0} conn/s; server node: {} new flows, {} recorded, {} lost, {} overwritten; client node: {} new, {} recorded, {} lost",
            step.server.new_flows,
            step.server.total,
            step.server.lost,
            step.server.overwritten,
            step.client.new_flows,
            step.client.total,
            step.client.lost
        );
        steps.push(step);
    }

    // 2. Events on versus off, ABBA.
    let mut all = Vec::new();
    let mut drops = Vec::new();
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [Events::All, Events::Drops]
        } else {
            [Events::Drops, Events::All]
        };
        for events in order {
            bench.agents(events)?;
            let sample = bench.cost_sample()?;
            eprintln!(
                "bench: round {} events {:<5} rr {:>7.0}/s p50 {:>6.1} µs  crr {:>6.0} conn/s",
                round + 1,
                events.arg(),
                sample.rr_per_sec,
                sample.rr_p50_us,
                sample.crr_per_sec
            );
            match events {
                Events::All => all.push(sample),
                Events::Drops => drops.push(sample),
            }
        }
    }
    drop(_server);
    drop(bench);

    let table = markdown(&steps, &all, &drops, started.elapsed());
    println!("\n{table}");
    update_readme(&table)?;
    println!(
        "README.md: Benchmarks / Flows updated. bench flows took {:.0?}",
        started.elapsed()
    );
    Ok(())
}

impl Bench {
    fn start_server(&self) -> Result<Server> {
        let server = Server(
            load_server(&self.server, self.load.as_os_str(), rules::SINK_PORTS.1)
                .spawn()
                .context("starting the load server")?,
        );
        let addr = self.server_addr(rules::ECHO_PORT);
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
        Ok(server)
    }

    fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.server.ip4), port)
    }

    /// The client's allow (so the traffic is forwarded by a policy, as in `bench datapath`).
    fn write_policy(&self) -> Result<()> {
        let client_ips = self
            .lab
            .pods()
            .iter()
            .filter(|p| {
                p.namespace == self.client.namespace && p.labels["app"] == self.client.labels["app"]
            })
            .map(|p| p.ip4)
            .collect();
        let t = Target {
            namespace: &self.server.namespace,
            instance: &self.server.labels["instance"],
            ip: self.server.ip4,
            client_namespace: &self.client.namespace,
            client_app: &self.client.labels["app"],
            client_ips,
        };
        let allow = rules::client_allow(&t, "bench-allow-client", &rules::client_ports());
        self.lab
            .write_manifest("bench-allow", &documents([allow]))?;
        Ok(())
    }

    /// (Re)starts both agents at `--flow-events events` (they adopt the pinned state) and waits
    /// until the server's agent has the allow.
    fn agents(&mut self, events: Events) -> Result<()> {
        if self.events == Some(events) {
            return Ok(());
        }
        let t = Instant::now();
        let nodes = self.lab.node_names();
        if self.events.is_some() {
            for node in &nodes {
                self.lab.stop_agent(node)?;
            }
        }
        self.lab.set_agent_args(&["--flow-events", events.arg()]);
        for node in &nodes {
            self.lab.start_agent(node)?;
        }
        self.events = Some(events);
        let mut last = Value::Null;
        let ok = wait::eventually(Duration::from_secs(30), Duration::from_millis(100), || {
            let Ok(status) = self.lab.status(&self.server.node) else {
                return false;
            };
            let applied = status["policies"]["applied"].as_u64().unwrap_or(0) >= 1;
            last = status;
            applied
        });
        ensure!(
            ok,
            "the server's agent did not apply the allow; last status: {last}"
        );
        ensure!(
            self.lab
                .tcp_probe(CLIENT, SERVER, rules::ECHO_PORT, Duration::from_secs(1)),
            "events {}: the client cannot reach the server",
            events.arg()
        );
        eprintln!(
            "bench: agents at --flow-events {} ({:.1?})",
            events.arg(),
            t.elapsed()
        );
        Ok(())
    }

    /// (server node, client node).
    fn counters(&self) -> Result<(Counters, Counters)> {
        Ok((
            Counters::of(&self.lab.status(&self.server.node)?),
            Counters::of(&self.lab.status(&self.client.node)?),
        ))
    }

    /// Waits (at most 3 s) until both agents have recorded everything the datapath reported, or
    /// their counters stop moving.
    fn settle(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut prev = None;
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let (s, c) = self.counters()?;
            let now = (s.total + s.lost, c.total + c.lost);
            if prev == Some(now) || Instant::now() >= deadline {
                return Ok(());
            }
            prev = Some(now);
        }
    }

    /// New connections per second with `threads` threads, on a fresh sink port.
    fn crr(&mut self, threads: u32) -> Result<f64> {
        let Some(port) = (self.next_sink <= rules::SINK_PORTS.1).then_some(self.next_sink) else {
            bail!("out of fresh sink ports");
        };
        self.next_sink += 1;
        let out = self.client_json(&[
            "crr",
            "--addr",
            &self.server_addr(port).to_string(),
            "--threads",
            &threads.to_string(),
            "--secs",
            &CRR_SECS.to_string(),
        ])?;
        let errors = out["errors"].as_u64().unwrap_or(0);
        if errors > 0 {
            eprintln!(
                "bench: warning: {errors} failed connections ({})",
                out["first_error"]
            );
        }
        out["per_sec"].as_f64().context("crr per_sec")
    }

    fn cost_sample(&mut self) -> Result<CostSample> {
        let rr = self.client_json(
            &rr_args(self.server_addr(rules::ECHO_PORT))
                .each_ref()
                .map(String::as_str),
        )?;
        let trips = rr["round_trips"].as_f64().context("rr round_trips")?;
        // rr records after a 10% warm-up.
        let rr_per_sec = trips / (RR_SECS * 0.9);
        let crr_per_sec = self.crr(CRR_THREADS)?;
        Ok(CostSample {
            rr_per_sec,
            rr_p50_us: rr["p50_us"].as_f64().context("rr p50")?,
            crr_per_sec,
        })
    }

    fn client_json(&self, args: &[&str]) -> Result<Value> {
        let out = sys::run_timeout(
            &mut in_pod(&self.client, self.load.as_os_str(), args),
            Duration::from_secs(20),
        )?;
        let last = out.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| format!("nodeward-lab-load printed {out:?}"))
    }
}

/// A cost row: title, the figure, whether higher is better, decimals.
type Row = (&'static str, fn(&CostSample) -> f64, bool, usize);

fn markdown(steps: &[Step], all: &[CostSample], drops: &[CostSample], runtime: Duration) -> String {
    let mut out = String::new();
    let Machine { date, cores, .. } = Machine::read();
    let _ = writeln!(
        out,
        "`cargo xtask bench flows` (it rewrites this subsection). Measured {date} on {cores} \
         cores, same lab and caveats as above; cross-node pod to pod.\n"
    );
    let _ = writeln!(
        out,
        "| crr threads | no agent (conn/s) | agents at `--flow-events all` (conn/s) | server node: new flows / recorded / lost | client node: new flows / recorded / lost | zero loss |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    for s in steps {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {} / {} / {} | {} / {} / {} | {} |",
            s.threads,
            s.no_agent,
            s.with_agents,
            s.server.new_flows,
            s.server.total,
            s.server.lost,
            s.client.new_flows,
            s.client.total,
            s.client.lost,
            if s.zero_loss() { "yes" } else { "**no**" }
        );
    }
    let best = steps
        .iter()
        .filter(|s| s.zero_loss())
        .map(|s| s.with_agents)
        .fold(0.0_f64, f64::max);
    let ceiling = steps.iter().map(|s| s.no_agent).fold(0.0_f64, f64::max);
    let verdict = if best >= TARGET_RATE {
        "met".to_string()
    } else if steps.iter().all(Step::zero_loss) {
        format!(
            "**not reached**: no flow was lost at any step, but with the agents the lab offered \
             at most {:.0} new connections/s (no agent: {ceiling:.0}/s), short of 20,000/s",
            steps.iter().map(|s| s.with_agents).fold(0.0_f64, f64::max)
        )
    } else if ceiling < TARGET_RATE {
        format!(
            "**not reached**: the lab itself peaks at {ceiling:.0} new connections/s without \
             agents, so 20,000/s cannot be offered here"
        )
    } else {
        "**missed**".to_string()
    };
    let _ = writeln!(
        out,
        "\nHighest rate with zero lost flows: **{best:.0} new connections/s** (no agent: up to \
         {ceiling:.0}/s). Target \"no loss at 20,000 new flows per second\": {verdict}.\n"
    );

    let med = |v: &[CostSample], f: fn(&CostSample) -> f64| median(v.iter().map(f).collect());
    let rows: [Row; 3] = [
        ("request/response transactions/s", |s| s.rr_per_sec, true, 0),
        ("request/response p50 (µs)", |s| s.rr_p50_us, false, 1),
        (
            "new TCP connections/s (4 threads)",
            |s| s.crr_per_sec,
            true,
            0,
        ),
    ];
    let _ = writeln!(
        out,
        "| figure | events off (`drops`) | events on (`all`) | cost of events |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    let mut rr_cost = f64::NAN;
    for (title, f, higher_is_better, decimals) in rows {
        let (off, on) = (med(drops, f), med(all, f));
        let cost = if higher_is_better {
            1.0 - on / off
        } else {
            on / off - 1.0
        };
        if rr_cost.is_nan() {
            rr_cost = cost;
        }
        let fmt = |v: f64| format!("{v:.decimals$}");
        let _ = writeln!(
            out,
            "| {title} | {} | {} | {:+.1}% |",
            fmt(off),
            fmt(on),
            cost * 100.0
        );
    }
    let _ = writeln!(
        out,
        "\nTarget \"events cost under 2% of the request/response rate\": {} ({:+.1}%).",
        if rr_cost < TARGET_COST {
            "met"
        } else {
            "**missed**"
        },
        rr_cost * 100.0
    );
    let _ = writeln!(
        out,
        "\nHow: connections/s is `nodeward-lab-load crr` ({CRR_SECS} s per step, a fresh sink \
         port each run); new flows is the node's `datapath.new_flows` delta, recorded its \
         `flows.total` delta (read once the agent stops moving, at most 3 s after the load), \
         lost the sum of `flows.lost.{{kernel_ring_full,follower_lagged,flow_log_dropped}}`; \
         evictions from the in-memory buffer (`store_overwritten`) are retention, not loss, and \
         are left out. Zero loss: nothing lost and recorded >= new flows on both nodes. The cost \
         rows switch the agents between `--flow-events drops` and `all` (restarted on the \
         pinned state), rr then crr per turn, ABBA, median of {ROUNDS} rounds; rr is one \
         connection, 64-byte messages, one in flight, {RR_SECS} s, client and server both on \
         CPU {RR_CPU}. Whole run: {runtime:.0?}."
    );
    out
}

/// Replaces (or appends) the "### Flows" subsection of README's Benchmarks section.
fn update_readme(table: &str) -> Result<()> {
    crate::bench::update_readme_subsection("Flows", table)
}
