//! `cargo xtask`: the project's developer commands.

mod bench;
mod bench_dns;
mod bench_flip;
mod bench_floor;
mod bench_flows;
mod bench_http;
mod bench_rules;
mod bench_services;
mod bench_tunnel;
mod bench_ztunnel;
mod demo;
mod setup;

use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use nodeward_lab::{Lab, LabSpec, paths};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nodeward developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and the lab need (idempotent): nightly rust-src, bpf-linker, bpffs,
    /// Debian packages.
    Setup,
    /// Build the workspace binaries (the agent and the lab's helpers).
    Build,
    /// Build, start, inspect or remove a local lab.
    Lab {
        #[command(subcommand)]
        action: LabCmd,
    },
    /// A lab with the example policies: allowed and denied traffic, and the flows the agents saw.
    Demo,
    /// Everything CI runs: setup, fmt, clippy, build, all tests.
    Test,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build a lab and start one agent per node; it stays up until `lab down`.
    Up(UpArgs),
    /// Remove a lab (and the leftovers of crashed runs).
    Down {
        #[arg(long, default_value = "dev")]
        name: String,
        /// Remove every lab, including other persistent ones.
        #[arg(long)]
        all: bool,
    },
    /// Show a lab's nodes, pods, addresses and agents.
    Status {
        #[arg(long, default_value = "dev")]
        name: String,
    },
    /// Every node's flows merged in time order (`nodeward observe --node` for each node); the
    /// other arguments are observe's (`--follow`, `-o json`, filters).
    Observe {
        #[arg(long, default_value = "dev")]
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Lab id, 1 to 6 characters of [a-z0-9].
    #[arg(long, default_value = "dev")]
    name: String,
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    #[arg(long, default_value_t = 3)]
    namespaces: usize,
    /// Pods per namespace.
    #[arg(long, default_value_t = 3)]
    pods: usize,
    /// Only the network: no agents.
    #[arg(long)]
    no_agent: bool,
    #[arg(long)]
    no_ipv6: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Cross-node pod to pod, side by side in one run: no agent, pass-only programs at
    /// nodeward's hooks (the floor), nodeward with 1 policy and with 10k rules, its datapath
    /// alone, iptables with 10k rules (connections/s, request/response latency, throughput);
    /// then policy change latency and agent RSS with 1,000 pods. Rewrites README's Benchmarks.
    /// The Services scenario runs on its own: --services.
    Datapath {
        /// Only the control-plane figures (policy change latency and agent RSS, at the lab's
        /// size and with 1,000 pods and 10k rules), printed; README.md is left alone.
        #[arg(long)]
        control_plane: bool,
        /// Only this scenario, held while the connections test repeats (for a profiler such
        /// as `perf record -a` in another shell); prints each run. README.md is left alone.
        #[arg(long, value_name = "SCENARIO", conflicts_with = "control_plane")]
        hold: Option<bench::Scenario>,
        /// Connection test runs under --hold (2 s each).
        #[arg(long, default_value_t = 12, requires = "hold")]
        runs: usize,
        /// The server port of the connections runs: `reuse` one port for every run, as real
        /// clients meet a service (4-tuples repeat), or a `fresh` one per run.
        #[arg(long, value_enum, default_value_t = bench_rules::SinkPorts::Reuse)]
        ports: bench_rules::SinkPorts,
        /// Instead of the scenarios above, the Services scenario (its own lab and run, about 2
        /// minutes, so not part of every datapath run): 1,000 Services with 10,000 backends,
        /// the client reaching a Service's backend on the other node by its ClusterIP through
        /// nodeward's translation, by the same ClusterIP through kube-proxy-style iptables DNAT,
        /// and by its pod IP (connections/s, request/response latency), then agent RSS.
        /// Rewrites README's Benchmarks / Services. Each way has its own fixed server port
        /// (--ports does not apply).
        #[arg(long, conflicts_with_all = ["control_plane", "hold"])]
        services: bool,
        /// A smoke run that only prints its results and leaves README.md alone: 2 rounds of
        /// the scenarios (with --services: 1 round, sub-second loads).
        #[arg(long, conflicts_with_all = ["control_plane", "hold"])]
        quick: bool,
    },
    /// DNS through the agent's proxy against straight to the resolver (dnsmasq), side by
    /// side on a one-node lab: latency p50/p99 for a name seen before and for a new name with
    /// a new address (learned into the maps before the answer), and the highest query rate
    /// with no failure. Prints a table; README.md is left alone.
    Dns,
    /// Flow events: the highest new-connections rate with zero lost flows, and the datapath
    /// cost of `--flow-events all` versus `drops`. Rewrites README's Benchmarks / Flows.
    Flows,
    /// The mTLS tunnel against plaintext (no agent, and nodeward L3/L4 only), cross-node pod to
    /// pod: throughput, request/response latency, connections/s; then agent RSS and CPU at
    /// 1,000 idle tunnelled connections. Rewrites README's Benchmarks / Tunnel.
    Tunnel {
        /// A short smoke run (1 round, sub-second loads, 2 s CPU windows) that only prints its
        /// results and leaves README.md alone. Also NODEWARD_BENCH_QUICK=1.
        #[arg(long)]
        quick: bool,
        /// The server port of the connections runs: `reuse` one port for every run and scenario
        /// (4-tuples repeat, also from the tunnel to plaintext), or a `fresh` one per run.
        #[arg(long, value_enum, default_value_t = bench_rules::SinkPorts::Reuse)]
        ports: bench_rules::SinkPorts,
        /// Also run Istio ambient's ztunnel (a binary built outside this project with its
        /// `tls-ring,testing` features; DEVELOPERS.md says how) as a column: the same pods and
        /// load through a pair of ztunnels (fake CA, static local config, dedicated mode), and
        /// its RSS at 1,000 idle connections.
        #[arg(long, value_name = "PATH")]
        ztunnel: Option<std::path::PathBuf>,
    },
    /// HTTP requests cross-node pod to pod, side by side in one run: plaintext with no agent,
    /// the L4 tunnel (a Service port that is not HTTP) and the L7 path (a two-backend weighted
    /// HTTPRoute), for HTTP/1.1 and h2c with h2load: latency p50/p99 at 1,000 requests/s and at
    /// saturation, the highest requests/s, the agents' CPU per 1,000 requests; then agent RSS
    /// with 100 routes. Checks the targets. Rewrites README's Benchmarks / HTTP.
    Http {
        /// A short smoke run (1 round, 2 s loads) that only prints its results and leaves
        /// README.md alone.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build(),
        Cmd::Lab { action } => lab(action),
        Cmd::Demo => {
            setup::run()?;
            build()?;
            demo::run()
        }
        Cmd::Test => test(),
        Cmd::Bench {
            what:
                BenchCmd::Datapath {
                    control_plane,
                    hold,
                    runs,
                    ports,
                    services,
                    quick,
                },
        } => {
            setup::run()?;
            if services {
                bench_services::run(quick)
            } else if let Some(scenario) = hold {
                bench::run_held(scenario, runs, ports)
            } else if control_plane {
                bench::run_control_plane()
            } else {
                bench::run(ports, quick)
            }
        }
        Cmd::Bench {
            what: BenchCmd::Dns,
        } => {
            setup::run()?;
            bench_dns::run()
        }
        Cmd::Bench {
            what: BenchCmd::Flows,
        } => {
            setup::run()?;
            bench_flows::run()
        }
        Cmd::Bench {
            what: BenchCmd::Http { quick },
        } => {
            setup::run()?;
            bench_http::run(quick)
        }
        Cmd::Bench {
            what:
                BenchCmd::Tunnel {
                    quick,
                    ports,
                    ztunnel,
                },
        } => {
            setup::run()?;
            let quick = quick
                || std::env::var("NODEWARD_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
            bench_tunnel::run(quick, ports, ztunnel)
        }
    }
}

/// Prints and runs `cargo ARGS` in the workspace root; fails if it fails.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

/// Prints and runs a command in the workspace root; fails if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let program = std::path::Path::new(cmd.get_program());
    let line = std::iter::once(program.file_name().unwrap_or(program.as_os_str()))
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    println!("\n==> {line}");
    let started = Instant::now();
    let status = cmd
        .current_dir(paths::workspace_root())
        .status()
        .with_context(|| format!("running {line}"))?;
    if !status.success() {
        bail!("`{line}` failed ({status}) after {:.1?}", started.elapsed());
    }
    println!("==> ok: {line} ({:.1?})", started.elapsed());
    Ok(())
}

fn build() -> Result<()> {
    // The default members: everything but agent-ebpf, which agent/build.rs builds for the kernel.
    cargo(&["build", "--bins"])
}

fn lab(action: LabCmd) -> Result<()> {
    match action {
        LabCmd::Up(args) => {
            setup::run()?;
            cargo(&["build", "--bins"])?;
            let spec = LabSpec {
                name: Some(args.name),
                nodes: args.nodes,
                namespaces: args.namespaces,
                pods: args.pods,
                agents: !args.no_agent,
                ipv6: !args.no_ipv6,
                persistent: true,
            };
            let mut lab = Lab::up(&spec)?;
            print!("{}", lab.report());
            // A persistent lab outlives this process: only `lab down` removes it.
            lab.forget();
            Ok(())
        }
        LabCmd::Status { name } => {
            let lab = Lab::attach(&name)?;
            print!("{}", lab.report());
            Ok(())
        }
        LabCmd::Observe { name, args } => Lab::attach(&name)?.observe_merged(&args),
        LabCmd::Down { name, all } => {
            let started = Instant::now();
            if all {
                for line in nodeward_lab::sweep::sweep_all()? {
                    println!("removed {line}");
                }
            } else {
                match Lab::attach(&name) {
                    Ok(mut lab) => {
                        lab.down()?;
                        println!("lab {name}: removed");
                    }
                    Err(e) => println!("lab {name}: not up ({e:#})"),
                }
                for line in nodeward_lab::sweep::sweep_stale()? {
                    println!("removed leftover {line}");
                }
            }
            println!("down in {:.2?}", started.elapsed());
            Ok(())
        }
    }
}

/// Lab test files `cargo xtask test` runs a second time with `--host-routing kernel`: policy
/// in both directions, Services, the tunnel, flows, and host routing's own test.
const HOST_ROUTING_OFF_FILES: [&str; 5] = ["policy", "services", "tunnel", "flows", "hostrouting"];

fn test() -> Result<()> {
    let started = Instant::now();
    setup::run()?;
    cargo(&["fmt", "--all", "--check"])?;
    // agent-ebpf is `no_std` for the kernel: linted for its own target, the rest for the host.
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    run(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "-p",
        "agent-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/bpf-clippy",
        "--",
        "-D",
        "warnings",
    ]))?;
    cargo(&["build"])?;
    // Unit and privileged tests of every crate but the lab, in parallel ...
    cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "nodeward-lab",
        "--exclude",
        "agent-ebpf",
    ])?;
    // ... then the lab's: one lab per test binary, tests taking turns with it.
    cargo(&["test", "-p", "nodeward-lab", "--", "--test-threads=1"])?;
    // ... and the datapath's lab files once more with eBPF host routing off, the path every
    // packet took before it (the whole suite twice would add some ten minutes).
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo_bin)
        .env(nodeward_lab::lab::HOST_ROUTING_ENV, "kernel")
        .args(["test", "-p", "nodeward-lab"])
        .args(HOST_ROUTING_OFF_FILES.iter().flat_map(|f| ["--test", f]))
        .args(["--", "--test-threads=1"]))?;
    println!(
        "\n==> cargo xtask test: all passed in {:.1?}",
        started.elapsed()
    );
    Ok(())
}
