//! `cargo xtask bench dns`: DNS through the agent's proxy against straight to the resolver,
//! side by side in one run, on a one-node lab with the release build.
//!
//! dnsmasq serves a zone from `backend/api-0` behind `kube-system/kube-dns`; the client
//! `frontend/web-0` is selected by a `toFQDNs` policy, so the agent steers its queries to the
//! ClusterIP to its proxy (`--dns-proxy-addr`). The baseline asks dnsmasq at its pod address,
//! through the same datapath, with no proxy in the way. Each query is one A query from an
//! unconnected UDP socket, as a stub resolver sends (`nodeward-lab-load resolve`).
//!
//! 1. Latency, [`ROUNDS`] rounds, the two ways interleaved (ABBA): a name the proxy has seen
//!    (no new address: the answer goes straight back), and a new name with a new address (the
//!    proxy writes the address into the kernel maps before it releases the answer).
//! 2. The highest query rate with no failure: 1, 2, 4, 8 clients at once, each its own names.
//!
//! Prints a table (ratios to the baseline); the README's figures come from a run of it.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nodeward_lab::dns::{self, KUBE_DNS};
use nodeward_lab::load::Process;
use nodeward_lab::{Lab, LabSpec, PodState, paths};
use serde_json::Value;

use crate::bench::{Machine, median};

const CLIENT: &str = "frontend/web-0";
const RESOLVER: &str = "backend/api-0";
const ROUNDS: usize = 4;
/// Queries per latency run.
const QUERIES: usize = 500;
/// Names in the zone, each with its own address (new names for every run and client).
const ZONE: usize = 40_000;
const CLIENTS: [usize; 4] = [1, 2, 4, 8];
/// Queries per client in a rate step.
const RATE_QUERIES: usize = 1000;
/// The issue's target: added latency at p50 for a new address.
const TARGET_ADDED_US: f64 = 200.0;

const POLICY: &str = r#"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata:
  name: web-fqdn
  namespace: frontend
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toFQDNs:
    - matchPattern: "**.bench.test"
    toPorts:
    - {port: 8080, protocol: TCP}
  - toEndpoints:
    - matchLabels: {app: api, nodeward.io/namespace: backend}
    toPorts:
    - port: 53
      protocol: UDP
      rules:
        dns:
        - matchPattern: "**.bench.test"
"#;

fn name(i: usize) -> String {
    format!("n{i}.bench.test")
}

fn addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + u32::try_from(i).unwrap_or(0))
}

/// One latency run or rate step: per-query milliseconds and failures.
#[derive(Default, Debug)]
struct Run {
    ms: Vec<f64>,
    failed: usize,
    secs: f64,
}

impl Run {
    fn p(&self, p: f64) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    fn rate(&self) -> f64 {
        (self.ms.len() + self.failed) as f64 / self.secs
    }
}

/// `resolve` from the client: `names` against `dns`, `clients` processes at once, each its own
/// slice of `names`.
fn resolve(
    client: &PodState,
    load: &std::path::Path,
    dns: &str,
    names: &[String],
    clients: usize,
) -> Result<Run> {
    let per = names.len().div_ceil(clients);
    let started = Instant::now();
    let children = names
        .chunks(per)
        .map(|chunk| {
            nodeward_lab::load::in_pod(client, load)
                .args(["resolve", "--dns", dns, "--timeout-ms", "2000"])
                .args(["--names", &chunk.join(",")])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting nodeward-lab-load resolve")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut run = Run::default();
    for child in children {
        let out = child.wait_with_output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line).with_context(|| format!("{line:?}"))?;
            match (v["rcode"].as_u64(), v["dns_ms"].as_f64()) {
                (Some(0), Some(ms)) if !v["addrs"].as_array().is_none_or(Vec::is_empty) => {
                    run.ms.push(ms);
                }
                _ => run.failed += 1,
            }
        }
    }
    run.secs = started.elapsed().as_secs_f64();
    ensure!(
        run.ms.len() + run.failed == names.len(),
        "resolve answered {} of {} names",
        run.ms.len() + run.failed,
        names.len()
    );
    Ok(run)
}

fn dnsmasq(lab: &Lab, pod: &PodState) -> Result<Process> {
    let mut conf = String::new();
    for i in 0..ZONE {
        writeln!(conf, "host-record={},{}", name(i), addr(i))?;
    }
    dns::dnsmasq(lab, pod, &conf, &["--local-ttl=3600", "--cache-size=0"])
}

pub(crate) fn run() -> Result<()> {
    crate::cargo(&["build", "--release", "--bins"])?;
    let release = paths::target_dir().join("release");
    // SAFETY: set before any thread starts; the lab reads it to find the agent.
    unsafe { std::env::set_var("NODEWARD_BIN", release.join("nodeward")) };
    let load = release.join("nodeward-lab-load");
    let mut lab = Lab::up(&LabSpec {
        nodes: 1,
        namespaces: 2,
        pods: 1,
        agents: false,
        ipv6: false,
        ..LabSpec::default()
    })?;
    let client = lab.pod(CLIENT).clone();
    let resolver = lab.pod(RESOLVER).clone();
    let _dns = dnsmasq(&lab, &resolver)?;
    lab.write_manifest("kube-dns", &dns::kube_dns(&resolver))?;
    lab.write_manifest("web-fqdn", POLICY)?;
    let node = lab.nodes()[0].clone();
    lab.set_agent_args(&["--dns-proxy-addr", &format!("{}:53", node.ip4)]);
    lab.start_agent(&node.name)?;
    let proxy = format!("{KUBE_DNS}:53");
    let direct = format!("{}:53", resolver.ip4);

    // Warm up and check both ways answer; the proxy has seen `n0` from here on.
    let mut ok = false;
    for _ in 0..50 {
        let r = resolve(&client, &load, &proxy, &[name(0)], 1)?;
        if r.failed == 0 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(ok, "DNS through the proxy never answered");
    ensure!(
        resolve(&client, &load, &direct, &[name(0)], 1)?.failed == 0,
        "DNS straight to the resolver failed"
    );

    let mut next = 1;
    let mut fresh = |n: usize| -> Vec<String> {
        let v = (next..next + n).map(name).collect();
        next += n;
        v
    };
    let seen: Vec<String> = vec![name(0); QUERIES];
    // (direct seen, proxy seen, direct new, proxy new) per round.
    let mut rounds: Vec<[Run; 4]> = Vec::new();
    for round in 0..ROUNDS {
        let new_direct = fresh(QUERIES);
        let new_proxy = fresh(QUERIES);
        let one = |dns: &str, names: &[String]| resolve(&client, &load, dns, names, 1);
        let r = if round % 2 == 0 {
            let a = one(&direct, &seen)?;
            let b = one(&proxy, &seen)?;
            let d = one(&proxy, &new_proxy)?;
            let c = one(&direct, &new_direct)?;
            [a, b, c, d]
        } else {
            let b = one(&proxy, &seen)?;
            let a = one(&direct, &seen)?;
            let c = one(&direct, &new_direct)?;
            let d = one(&proxy, &new_proxy)?;
            [a, b, c, d]
        };
        eprintln!(
            "round {round}: p50 ms direct {:.3} / proxy {:.3} (seen), direct {:.3} / proxy {:.3} (new)",
            r[0].p(50.0),
            r[1].p(50.0),
            r[2].p(50.0),
            r[3].p(50.0)
        );
        rounds.push(r);
    }
    let med = |i: usize, p: f64| median(rounds.iter().map(|r| r[i].p(p)).collect());
    let fails = |i: usize| rounds.iter().map(|r| r[i].failed).sum::<usize>();

    let mut rates = Vec::new();
    for clients in CLIENTS {
        let d = resolve(
            &client,
            &load,
            &direct,
            &fresh(clients * RATE_QUERIES),
            clients,
        )?;
        let p = resolve(
            &client,
            &load,
            &proxy,
            &fresh(clients * RATE_QUERIES),
            clients,
        )?;
        eprintln!(
            "{clients} clients: direct {:.0}/s ({} failed), proxy {:.0}/s ({} failed)",
            d.rate(),
            d.failed,
            p.rate(),
            p.failed
        );
        rates.push((clients, d, p));
    }
    let best = |proxy: bool| {
        rates
            .iter()
            .map(|(_, d, p)| if proxy { p } else { d })
            .filter(|r| r.failed == 0)
            .map(Run::rate)
            .fold(0.0, f64::max)
    };
    lab.stop_agent(&node.name)?;

    let machine = Machine::read();
    let mut out = String::new();
    writeln!(
        out,
        "Run of `cargo xtask bench dns` ({}, {} cores, {}, kernel {}; release build; one node; \
         {ROUNDS} rounds of {QUERIES} sequential queries each way, interleaved; medians of the \
         rounds):\n",
        machine.date, machine.cores, machine.cpu, machine.kernel
    )?;
    writeln!(
        out,
        "| DNS query | straight to dnsmasq p50 / p99 | through the proxy p50 / p99 | added p50 | ratio p50 |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for (label, a, b) in [
        ("a name already seen", 0, 1),
        ("a new name, new address (learned before the answer)", 2, 3),
    ] {
        writeln!(
            out,
            "| {label} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:+.0} µs | {:.2}x |",
            med(a, 50.0) * 1000.0,
            med(a, 99.0) * 1000.0,
            med(b, 50.0) * 1000.0,
            med(b, 99.0) * 1000.0,
            (med(b, 50.0) - med(a, 50.0)) * 1000.0,
            med(b, 50.0) / med(a, 50.0),
        )?;
    }
    writeln!(
        out,
        "\nFailures in the latency runs: direct {} + {}, proxy {} + {}. Target: under {TARGET_ADDED_US:.0} µs added at p50 for a new address.\n",
        fails(0),
        fails(2),
        fails(1),
        fails(3)
    )?;
    writeln!(
        out,
        "| clients at once | straight to dnsmasq queries/s (failed) | through the proxy queries/s (failed) | ratio |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    for (clients, d, p) in &rates {
        writeln!(
            out,
            "| {clients} | {:.0} ({}) | {:.0} ({}) | {:.2}x |",
            d.rate(),
            d.failed,
            p.rate(),
            p.failed,
            p.rate() / d.rate()
        )?;
    }
    writeln!(
        out,
        "\nHighest rate with no failure: straight {:.0}/s, through the proxy {:.0}/s ({:.2}x); every proxied query here is a new name with a new address.",
        best(false),
        best(true),
        best(true) / best(false).max(1.0)
    )?;
    println!("{out}");
    Ok(())
}
