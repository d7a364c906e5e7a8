//! An "external" host for DNS-aware egress: a network namespace outside the pod ranges, behind
//! one node (a veth and a route for [`EXTERNAL_NET`]), answering every address of that network
//! on its loopback. Used by the fqdn test and the demo: names in the lab's DNS zone point there.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, ensure};

use crate::load::Process;
use crate::{Lab, paths};

/// The network the external host answers (no address outside the lab).
pub const EXTERNAL_NET: &str = "198.18.0.0/21";
/// The external host's TCP sink port (accepts and reads).
pub const EXTERNAL_PORT: u16 = 8080;
/// The external host echoes on this port (for a long connection).
pub const EXTERNAL_ECHO_PORT: u16 = 8081;

/// The `i`th address of [`EXTERNAL_NET`] (0 is the network's first).
#[must_use]
pub fn external_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i)
}

/// The external namespace and its server; removed when dropped.
pub struct External {
    netns: String,
    _server: Option<Process>,
}

impl External {
    /// Builds the external host behind `node` (a node name of `lab`), with a TCP sink on
    /// [`EXTERNAL_PORT`] and an echo server on [`EXTERNAL_ECHO_PORT`].
    ///
    /// # Errors
    /// A namespace, link, address or route cannot be made, or the server cannot start.
    pub fn up(lab: &Lab, node: &str) -> Result<Self> {
        let netns = format!("nwl-{}-ext", lab.id());
        let node_ns = &lab.node(node).netns;
        let (host_if, ext_if) = (format!("nw{}x0", lab.id()), format!("nw{}x1", lab.id()));
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .context("running ip")?;
            ensure!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        ip(&["netns", "add", &netns])?;
        // From here on, the guard removes the namespace (and the veth with it).
        let mut guard = Self {
            netns: netns.clone(),
            _server: None,
        };
        guard._server = Some(Process::spawn(
            Command::new("ip")
                .args(["netns", "exec", &netns])
                .arg(paths::load_bin()?)
                .args(["serve", "--sink", &EXTERNAL_PORT.to_string()])
                .args(["--echo", &EXTERNAL_ECHO_PORT.to_string()])
                .stdout(Stdio::null()),
            "the external server",
        )?);
        ip(&[
            "-n", node_ns, "link", "add", &host_if, "type", "veth", "peer", "name", &ext_if,
            "netns", &netns,
        ])?;
        ip(&[
            "-n",
            node_ns,
            "addr",
            "add",
            "192.168.251.1/30",
            "dev",
            &host_if,
        ])?;
        ip(&["-n", node_ns, "link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            node_ns,
            "route",
            "add",
            EXTERNAL_NET,
            "via",
            "192.168.251.2",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            "192.168.251.2/30",
            "dev",
            &ext_if,
        ])?;
        ip(&["-n", &netns, "link", "set", &ext_if, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", EXTERNAL_NET, "dev", "lo"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            "192.168.251.1",
        ])?;
        Ok(guard)
    }
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}
