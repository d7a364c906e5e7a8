//! The `nodeward` command line: the agent and the commands that talk to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api::{self, Request};
use crate::flows::filter::PodMatch;
use crate::flows::{Flow, FlowFilter};

const DEFAULT_SOCKET: &str = "/run/nodeward/nodeward.sock";

#[derive(Parser, Debug)]
#[command(
    name = "nodeward",
    version,
    about = "Sidecar-less service mesh enforcement: identity-based L3/L4 policy in the kernel, flows you can follow",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent (one per node).
    Agent(AgentArgs),
    /// Print flows recorded by the local agent.
    Observe(ObserveArgs),
    /// Show whether the datapath is loaded and attached, map fill, policies and errors.
    Status(StatusArgs),
    /// Print the CustomResourceDefinitions of the nodeward.io kinds (or write them to a directory).
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Remove an agent's pinned programs and maps: enforcement on its endpoints STOPS.
    Cleanup {
        /// The agent's --bpffs-dir.
        #[arg(long, default_value = "/sys/fs/bpf/nodeward")]
        bpffs_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// This node's name: pods whose spec.nodeName equals it are this agent's endpoints.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Standalone mode: read every YAML document under DIR (recursively) and watch it.
    #[arg(long, value_name = "DIR", required_unless_present = "kubernetes")]
    manifests: Option<PathBuf>,
    /// Read objects from the Kubernetes API server (not available yet in this build).
    #[arg(long, conflicts_with = "manifests")]
    kubernetes: bool,
    /// CA, identities, flow log and other state.
    #[arg(long, default_value = "/var/lib/nodeward")]
    state_dir: PathBuf,
    /// Where programs, links and maps are pinned (per agent instance).
    #[arg(long, default_value = "/sys/fs/bpf/nodeward")]
    bpffs_dir: PathBuf,
    /// Unix socket of the local control and flow API.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Prometheus metrics and /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:9962")]
    metrics_addr: SocketAddr,
    /// The cgroup (v2 path) for socket-level programs; never the machine's root cgroup.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Flows kept in memory for `observe --last`.
    #[arg(long, default_value_t = 65_536)]
    flow_buffer: usize,
    /// Re-read the manifests this often even without a file event.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    resync_interval: Duration,
    /// Log filter (tracing EnvFilter syntax), also RUST_LOG.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum FlowOutput {
    /// One readable line per flow.
    Compact,
    /// One Hubble-style JSON object per line.
    Json,
    /// Aligned columns.
    Table,
}

#[derive(Args, Debug)]
struct ObserveArgs {
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    #[arg(short, long, value_enum, default_value = "compact")]
    output: FlowOutput,
    /// Keep printing new flows as they happen.
    #[arg(short, long)]
    follow: bool,
    /// Print the last N stored flows first (default 20, or 0 with --follow).
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Only flows since a duration ago (`5m`) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only flows until an RFC 3339 time or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// FORWARDED or DROPPED.
    #[arg(long)]
    verdict: Option<String>,
    /// Source pod, `[namespace/]name-prefix`.
    #[arg(long)]
    from_pod: Option<String>,
    /// Destination pod, `[namespace/]name-prefix`.
    #[arg(long)]
    to_pod: Option<String>,
    /// Either end's pod, `[namespace/]name-prefix`.
    #[arg(long)]
    pod: Option<String>,
    /// Either end's namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Source address or CIDR.
    #[arg(long)]
    from_ip: Option<String>,
    /// Destination address or CIDR.
    #[arg(long)]
    to_ip: Option<String>,
    /// Either port.
    #[arg(long)]
    port: Option<u16>,
    /// TCP, UDP, SCTP, ICMPv4 or ICMPv6.
    #[arg(long)]
    protocol: Option<String>,
    /// Either end's identity.
    #[arg(long)]
    identity: Option<u32>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum StatusOutput {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    #[arg(short, long, value_enum, default_value = "text")]
    output: StatusOutput,
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Agent(args) => runtime.block_on(agent(args)),
        Command::Observe(args) => runtime.block_on(observe(args)),
        Command::Status(args) => runtime.block_on(status(args)),
        Command::Crd { write } => crd(write),
        Command::Cleanup { bpffs_dir } => {
            crate::datapath::loader::Datapath::remove_all(&bpffs_dir)
                .with_context(|| format!("removing {}", bpffs_dir.display()))?;
            println!("removed pinned state under {}", bpffs_dir.display());
            Ok(())
        }
    }
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("--log {:?}", args.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    if args.kubernetes {
        anyhow::bail!(
            "--kubernetes: the Kubernetes API source is not in this build yet; use --manifests DIR"
        );
    }
    if args.node.trim().is_empty() {
        anyhow::bail!("--node: must not be empty");
    }
    let config = crate::app::AgentConfig {
        node: args.node,
        manifests: args.manifests.unwrap_or_default(),
        state_dir: args.state_dir,
        bpffs_dir: args.bpffs_dir,
        api_socket: args.api_socket,
        metrics_addr: args.metrics_addr,
        cgroup: args.cgroup,
        flow_buffer: args.flow_buffer,
        resync_interval: args.resync_interval,
    };
    crate::app::run(config).await
}

fn time_arg(flag: &str, value: &str) -> anyhow::Result<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(value) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(value).with_context(|| {
        format!("{flag} {value:?}: expected a duration like 5m or a time like 2026-11-22T10:00:00Z")
    })?;
    Ok(SystemTime::now() - ago)
}

fn ip_arg(flag: &str, value: &str) -> anyhow::Result<ipnet::IpNet> {
    value
        .parse::<ipnet::IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .with_context(|| format!("{flag} {value:?}: expected an address or a CIDR"))
}

fn filter_of(args: &ObserveArgs) -> anyhow::Result<FlowFilter> {
    let mut filter = FlowFilter {
        verdict: args.verdict.clone(),
        from_pod: args.from_pod.as_deref().map(PodMatch::parse),
        to_pod: args.to_pod.as_deref().map(PodMatch::parse),
        pod: args.pod.as_deref().map(PodMatch::parse),
        namespace: args.namespace.clone(),
        from_ip: args
            .from_ip
            .as_deref()
            .map(|v| ip_arg("--from-ip", v))
            .transpose()?,
        to_ip: args
            .to_ip
            .as_deref()
            .map(|v| ip_arg("--to-ip", v))
            .transpose()?,
        port: args.port,
        protocol: args.protocol.clone(),
        identity: args.identity,
        since: args
            .since
            .as_deref()
            .map(|v| time_arg("--since", v))
            .transpose()?,
        until: args
            .until
            .as_deref()
            .map(|v| time_arg("--until", v))
            .transpose()?,
    };
    filter.validate()?;
    Ok(filter)
}

async fn observe(args: ObserveArgs) -> anyhow::Result<()> {
    let filter = filter_of(&args)?;
    let request = Request::Observe {
        last: args.last,
        follow: args.follow,
        filter: Box::new(filter),
    };
    let output = args.output;
    if output == FlowOutput::Table {
        println!(
            "{:<24} {:<30} {:<30} {:<8} {:<10} SUMMARY",
            "TIME", "SOURCE", "DESTINATION", "DIR", "VERDICT"
        );
    }
    api::call(&args.api_socket, &request, |value| {
        if let Some(n) = value.get("lost_flows") {
            eprintln!("warning: this client fell behind and missed {n} flows");
            return Ok(());
        }
        match output {
            FlowOutput::Json => println!("{value}"),
            FlowOutput::Compact | FlowOutput::Table => {
                let flow: Flow = serde_json::from_value(value).context("decoding a flow")?;
                if output == FlowOutput::Compact {
                    println!("{}", crate::flows::compact(&flow));
                } else {
                    println!("{}", table_row(&flow));
                }
            }
        }
        Ok(())
    })
    .await
}

fn table_row(flow: &Flow) -> String {
    let end = |e: &crate::flows::Endpoint, ip: &std::net::IpAddr, port: Option<u16>| {
        let who = if e.pod_name.is_empty() {
            ip.to_string()
        } else {
            format!("{}/{}", e.namespace, e.pod_name)
        };
        port.filter(|p| *p != 0)
            .map_or(who.clone(), |p| format!("{who}:{p}"))
    };
    let ports = flow.ports();
    format!(
        "{:<24} {:<30} {:<30} {:<8} {:<10} {}",
        flow.time.get(..23).unwrap_or(&flow.time),
        end(&flow.source, &flow.ip.source, ports.map(|p| p.source_port)),
        end(
            &flow.destination,
            &flow.ip.destination,
            ports.map(|p| p.destination_port)
        ),
        flow.traffic_direction,
        flow.verdict,
        flow.summary
    )
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut status = serde_json::Value::Null;
    api::call(&args.api_socket, &Request::Status, |v| {
        status = v;
        Ok(())
    })
    .await?;
    if args.output == StatusOutput::Json {
        println!("{status}");
        return Ok(());
    }
    print!("{}", status_text(&status));
    Ok(())
}

fn status_text(s: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}: {}  (policy generation {}, {} syncs, last took {:.1} ms)",
        s["node"].as_str().unwrap_or("?"),
        if s["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "NOT READY"
        },
        s["generation"],
        s["syncs"],
        s["last_sync"]["duration_ms"].as_f64().unwrap_or(0.0),
    );
    if let Some(e) = s["last_sync"]["error"].as_str() {
        let _ = writeln!(out, "last sync failed: {e}");
    }
    let endpoints = s["endpoints"].as_array().cloned().unwrap_or_default();
    let attached = endpoints.iter().filter(|e| e["attached"] == true).count();
    let _ = writeln!(out, "\nendpoints: {attached}/{} attached", endpoints.len());
    for e in &endpoints {
        let _ = writeln!(
            out,
            "  {:<32} identity {:<8} {:<16} {}",
            e["pod"].as_str().unwrap_or(""),
            e["identity"],
            e["interface"].as_str().unwrap_or(""),
            e["error"].as_str().map_or_else(
                || if e["attached"] == true {
                    "attached".to_owned()
                } else {
                    "not attached".to_owned()
                },
                ToOwned::to_owned
            ),
        );
    }
    let failed = s["policies"]["failed"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "\npolicies: {} applied, {} failed",
        s["policies"]["applied"],
        failed.len()
    );
    for f in &failed {
        let _ = writeln!(out, "  FAILED {}", f["error"].as_str().unwrap_or(""));
    }
    for e in s["manifest_errors"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  manifest error: {}", e.as_str().unwrap_or(""));
    }
    let _ = writeln!(out, "\nmaps:");
    for m in s["maps"].as_array().into_iter().flatten() {
        let entries = m["entries"].as_u64().unwrap_or(0);
        let capacity = m["capacity"].as_u64().unwrap_or(1).max(1);
        #[expect(clippy::cast_precision_loss, reason = "a percentage for people")]
        let pct = entries as f64 * 100.0 / capacity as f64;
        let _ = writeln!(
            out,
            "  {:<14} {entries:>8} / {capacity:<8} ({pct:.1}%)",
            m["name"].as_str().unwrap_or("")
        );
    }
    let d = &s["datapath"];
    let _ = writeln!(
        out,
        "\ndatapath: {} packets, {} passed, {} new flows, drops {}",
        d["packets"], d["passed"], d["new_flows"], d["drops"]
    );
    let f = &s["flows"];
    let _ = writeln!(
        out,
        "flows: {} stored, {} total; lost: kernel ring full {}, overwritten {}, slow followers {}",
        f["stored"],
        f["total"],
        f["lost"]["kernel_ring_full"],
        f["lost"]["store_overwritten"],
        f["lost"]["follower_lagged"]
    );
    out
}

fn crd(write: Option<PathBuf>) -> anyhow::Result<()> {
    match write {
        Some(dir) => {
            crate::policy::crd::write_crds(&dir)
                .with_context(|| format!("writing CRDs to {}", dir.display()))?;
            println!("wrote CRDs to {}", dir.display());
        }
        None => print!("{}", crate::policy::crd::crds_yaml()),
    }
    Ok(())
}
