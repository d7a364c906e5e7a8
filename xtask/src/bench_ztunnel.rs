//! Istio ambient's ztunnel beside nodeward's tunnel in `cargo xtask bench tunnel --ztunnel PATH`:
//! the same client and server pods, the same load, through a pair of ztunnels.
//!
//! ztunnel is built outside this project from its public source (DEVELOPERS.md says how) and
//! run here as a process, never linked or copied. It runs in its local mode: `FAKE_CA` (its
//! built-in test CA, which needs its `testing` feature) and `LOCAL_XDS_PATH` (a static file
//! naming the two workloads) instead of istiod, in its dedicated proxy mode (one ztunnel per
//! workload), access logs off.
//!
//! - **Client side.** One ztunnel in the client node's namespace, proxying for the client pod.
//!   An nftables rule there captures the client pod's TCP to the server pod and sends it to the
//!   ztunnel's outbound port 15001. It is a `dnat` to the node's own address rather than a
//!   `redirect`: the lab's host-side veths have no IPv4 address, and `redirect` drops what
//!   arrives on an interface without one. ztunnel reads the pod's original destination with
//!   `SO_ORIGINAL_DST` either way, and opens HBONE (mTLS, HTTP/2 CONNECT) to the server pod's
//!   address on port 15008.
//! - **Server side.** One ztunnel in the server pod's network namespace, where dedicated mode
//!   is meant to run. It terminates HBONE on 15008 and connects to the pod's port. ztunnel's
//!   inbound refuses a CONNECT whose target is not the address it was reached at
//!   (`validate_destination`), so it cannot sit in the node's namespace behind a NAT. This
//!   gives ztunnel a loopback hop where nodeward's server agent crosses the pod's veth.
//!
//! What proves the path: the capture rule's packet counter (one packet per captured
//! connection) and the server ztunnel's own `istio_tcp_connections_opened_total` for the
//! connections it delivered.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use nodeward_lab::{NodeState, PodState, sys, wait};
use serde_json::json;

/// ztunnel's outbound (captured) port, in its dedicated mode.
const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's readiness and Prometheus ports.
const READY_PORT: u16 = 15021;
const STATS_PORT: u16 = 15020;
/// The nftables table of the capture rule in the client node's namespace.
const NFT_TABLE: &str = "nwbench_ztunnel";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The two ztunnels and the capture rule; all removed on drop.
pub struct Pair {
    client: Proxy,
    server: Proxy,
    /// The client node's namespace, where the capture rule lives.
    capture_netns: String,
}

/// One ztunnel process, killed by its pid on drop.
struct Proxy {
    child: Child,
    netns: String,
    what: &'static str,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = sys::run(
            Command::new("nsenter")
                .arg(format!(
                    "--net={}",
                    sys::netns_path(&self.capture_netns).display()
                ))
                .args(["nft", "delete", "table", "ip", NFT_TABLE]),
        );
    }
}

/// What the ztunnels counted so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Connections the capture rule sent to the client ztunnel.
    pub captured: u64,
    /// Connections the server ztunnel opened to its pod after terminating HBONE.
    pub delivered: u64,
}

impl Pair {
    /// Starts a ztunnel for `client` in `client_node`'s namespace and one in `server`'s network
    /// namespace, installs the capture rule and waits until both report ready. Their logs go
    /// to `dir`.
    pub fn start(
        bin: &Path,
        client: &PodState,
        client_node: &NodeState,
        server: &PodState,
        dir: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("ztunnel-local.yaml");
        std::fs::write(
            &config,
            serde_json::to_string_pretty(&local_config(&[client, server]))?,
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let client_proxy = Proxy::spawn(bin, &client_node.netns, client, &config, dir, "client")?;
        let server_proxy = Proxy::spawn(bin, &server.netns, server, &config, dir, "server")?;
        let pair = Self {
            client: client_proxy,
            server: server_proxy,
            capture_netns: client_node.netns.clone(),
        };
        pair.capture(client, client_node.ip4, server.ip4)?;
        for proxy in [&pair.client, &pair.server] {
            proxy.wait_ready(dir)?;
        }
        Ok(pair)
    }

    /// `client`'s TCP to `server` goes to the ztunnel's outbound port.
    fn capture(&self, client: &PodState, node_ip: Ipv4Addr, server: Ipv4Addr) -> Result<()> {
        let rules = format!(
            "table ip {NFT_TABLE} {{\n  chain capture {{\n    type nat hook prerouting priority \
             dstnat; policy accept;\n    iifname \"{}\" ip saddr {} ip daddr {server} meta \
             l4proto tcp counter dnat to {node_ip}:{OUTBOUND_PORT}\n  }}\n}}\n",
            client.host_ifname, client.ip4
        );
        let mut child = nsenter(&self.capture_netns, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nft")?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "nft in {} refused the capture rule ({}): {}\n{rules}",
            self.capture_netns,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// The ztunnel processes' pids: (client side, server side).
    pub fn pids(&self) -> [u32; 2] {
        [self.client.child.id(), self.server.child.id()]
    }

    pub fn counters(&self) -> Result<Counters> {
        let listing =
            sys::run(nsenter(&self.capture_netns, "nft").args(["list", "table", "ip", NFT_TABLE]))?;
        let captured = listing
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no packet counter in the capture rule:\n{listing}"))?;
        let metrics = sys::run(nsenter(&self.server.netns, "curl").args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{STATS_PORT}/metrics"),
        ]))
        .context("reading the server ztunnel's metrics")?;
        let delivered = metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"destination\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
        Ok(Counters {
            captured,
            delivered,
        })
    }
}

impl Proxy {
    fn spawn(
        bin: &Path,
        netns: &str,
        workload: &PodState,
        config: &Path,
        dir: &Path,
        what: &'static str,
    ) -> Result<Self> {
        let log = dir.join(format!("ztunnel-{what}.log"));
        let out = std::fs::File::create(&log)?;
        let child = nsenter(netns, bin.as_os_str())
            .env("FAKE_CA", "true")
            .env("LOCAL_XDS_PATH", config)
            // No istiod: empty turns the xDS client off.
            .env("XDS_ADDRESS", "")
            .env("PROXY_MODE", "dedicated")
            .env(
                "PROXY_WORKLOAD_INFO",
                format!(
                    "{}/{}/{}",
                    workload.namespace, workload.name, workload.service_account
                ),
            )
            .env("NODE_NAME", &workload.node)
            // Connect upstream from the proxy's own address (as its dedicated-mode tests do).
            .env("ENABLE_ORIG_SRC", "false")
            // Access logs are `info` events on the `access` target.
            .env("RUST_LOG", "warn,access=off")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            child,
            netns: netns.to_string(),
            what,
        })
    }

    fn wait_ready(&self, dir: &Path) -> Result<()> {
        let url = format!("http://127.0.0.1:{READY_PORT}/healthz/ready");
        let ready = wait::eventually(READY_TIMEOUT, Duration::from_millis(100), || {
            sys::run(nsenter(&self.netns, "curl").args(["-sf", "--max-time", "1", &url])).is_ok()
        });
        let log = dir.join(format!("ztunnel-{}.log", self.what));
        ensure!(
            ready,
            "the {} ztunnel (in {}) was not ready within {READY_TIMEOUT:?}; its log {}:\n{}",
            self.what,
            self.netns,
            log.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Ok(())
    }
}

fn nsenter(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", sys::netns_path(netns).display()))
        .arg("--")
        .arg(program);
    cmd
}

/// ztunnel's static local configuration (its `LocalConfig`; JSON is YAML): the workloads,
/// both speaking HBONE, with their SPIFFE identities in `cluster.local`, no policy.
fn local_config(pods: &[&PodState]) -> serde_json::Value {
    let workloads: Vec<serde_json::Value> = pods
        .iter()
        .map(|p| {
            json!({
                "uid": format!("bench//v1/Pod/{}/{}", p.namespace, p.name),
                "name": p.name,
                "namespace": p.namespace,
                "serviceAccount": p.service_account,
                "trustDomain": "cluster.local",
                "workloadIps": [p.ip4.to_string(), p.ip6.to_string()],
                "protocol": "HBONE",
                "node": p.node,
                "network": "",
                "services": {},
            })
        })
        .collect();
    json!({ "workloads": workloads, "policies": [], "services": [] })
}

/// Where the ztunnels' configuration and logs go (kept after the run).
pub fn dir() -> PathBuf {
    nodeward_lab::paths::target_dir().join("bench-tunnel")
}
