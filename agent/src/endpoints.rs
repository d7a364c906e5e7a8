//! Finding the host-side interface of each local pod: the device of the exact host route
//! (`/32` or `/128`) to the pod's IP in the agent's network namespace, as CNI plugins in the
//! Calico style set it up.
//!
//! Only an exact host route counts: a pod IP that is merely reachable through a default or
//! subnet route (the underlay, `eth0`) must never get the pod's programs attached.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;

/// Where a pod's traffic enters and leaves the node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("running `ip route show exact {addr}`: {source}")]
    Ip {
        addr: IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no host route to {addr} in this network namespace (the pod's interface is not here yet)"
    )]
    NoHostRoute { addr: IpAddr },
    #[error("the host route to {addr} uses {dev}, which is not a pod interface")]
    NotAPodInterface { addr: IpAddr, dev: String },
    #[error("interface {dev} (route to {addr}) has no ifindex: {source}")]
    NoIfindex {
        addr: IpAddr,
        dev: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(serde::Deserialize)]
struct Route {
    dev: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Interfaces that are never a pod's, whatever a route says.
const NEVER: &[&str] = &["lo", "eth0"];

/// Looks up the interface of the exact host route to `addr`.
pub fn host_route_interface(addr: IpAddr) -> Result<Interface, EndpointError> {
    let (family, prefix) = match addr {
        IpAddr::V4(_) => ("-4", format!("{addr}/32")),
        IpAddr::V6(_) => ("-6", format!("{addr}/128")),
    };
    let output = Command::new("ip")
        .args(["-j", family, "route", "show", "exact", &prefix])
        .output()
        .map_err(|source| EndpointError::Ip { addr, source })?;
    if !output.status.success() {
        return Err(EndpointError::Ip {
            addr,
            source: std::io::Error::other(
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ),
        });
    }
    let routes: Vec<Route> = serde_json::from_slice(&output.stdout).unwrap_or_default();
    let dev = routes
        .into_iter()
        .filter(|r| r.kind.as_deref().is_none_or(|k| k == "unicast"))
        .find_map(|r| r.dev)
        .ok_or(EndpointError::NoHostRoute { addr })?;
    if NEVER.contains(&dev.as_str()) {
        return Err(EndpointError::NotAPodInterface { addr, dev });
    }
    let ifindex = ifindex_of(&dev).map_err(|source| EndpointError::NoIfindex {
        addr,
        dev: dev.clone(),
        source,
    })?;
    Ok(Interface { name: dev, ifindex })
}

/// `if_nametoindex(3)`.
pub fn ifindex_of(name: &str) -> std::io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

/// Remembers lookups so a sync does not fork `ip` for every pod every time; an entry is
/// re-checked (cheaply, by name) before it is trusted.
#[derive(Debug, Default)]
pub struct Resolver {
    cache: BTreeMap<IpAddr, Interface>,
}

impl Resolver {
    pub fn resolve(&mut self, addr: IpAddr) -> Result<Interface, EndpointError> {
        if let Some(known) = self.cache.get(&addr)
            && ifindex_of(&known.name).ok() == Some(known.ifindex)
        {
            return Ok(known.clone());
        }
        let found = host_route_interface(addr);
        match &found {
            Ok(iface) => {
                self.cache.insert(addr, iface.clone());
            }
            Err(_) => {
                self.cache.remove(&addr);
            }
        }
        found
    }

    /// Forgets addresses no longer in use.
    pub fn retain(&mut self, keep: impl Fn(&IpAddr) -> bool) {
        self.cache.retain(|a, _| keep(a));
    }
}
