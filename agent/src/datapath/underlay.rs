//! The underlay devices of eBPF host routing: where packets from other nodes' pods arrive, so
//! `from_underlay` at their TC ingress can put the packets for local pods straight into the
//! pods. Chosen by `--devices`, or else by the routes in the agent's network namespace to one
//! pod of each other node (the route a reply to that pod takes is the device its packets come
//! in on, in the symmetric underlays nodes have).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;

#[derive(serde::Deserialize)]
struct RouteGet {
    dev: Option<String>,
}

/// Never an underlay device, whatever a route says.
const NEVER: &[&str] = &["lo"];

/// The device of the route to `addr` (`ip route get`), if there is one.
///
/// # Errors
/// `ip` cannot run.
pub fn route_device(addr: IpAddr) -> std::io::Result<Option<String>> {
    let output = Command::new("ip")
        .args(["-j", "route", "get", &addr.to_string()])
        .output()?;
    if !output.status.success() {
        // No route ("Network is unreachable") is an answer, not a failure.
        return Ok(None);
    }
    Ok(parse_route_get(&output.stdout))
}

fn parse_route_get(json: &[u8]) -> Option<String> {
    let routes: Vec<RouteGet> = serde_json::from_slice(json).ok()?;
    routes
        .into_iter()
        .find_map(|r| r.dev)
        .filter(|d| !NEVER.contains(&d.as_str()))
}

/// The devices toward other nodes' pods, remembered per (node, family) so a reconciliation
/// forks `ip` only for a node it has not seen.
#[derive(Debug, Default)]
pub struct UnderlayDevices {
    by_node: BTreeMap<(String, bool), Option<String>>,
}

impl UnderlayDevices {
    /// The devices of the routes to `remote` (a node name and one of its pods' addresses,
    /// any number per node: the first of each family is asked), minus `workload` interfaces.
    pub fn discover<'a>(
        &mut self,
        remote: impl IntoIterator<Item = (&'a str, IpAddr)>,
        workload: &BTreeSet<&str>,
    ) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        for (node, addr) in remote {
            let key = (node.to_owned(), addr.is_ipv4());
            if !seen.insert(key.clone()) {
                continue;
            }
            self.by_node.entry(key).or_insert_with(|| {
                route_device(addr).unwrap_or_else(|e| {
                    tracing::warn!(%addr, error = %e, "ip route get failed");
                    None
                })
            });
        }
        self.by_node.retain(|k, _| seen.contains(k));
        self.by_node
            .values()
            .flatten()
            .filter(|d| !workload.contains(d.as_str()))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_get_names_the_device_and_never_lo() {
        let via = br#"[{"dst":"10.244.2.5","gateway":"10.0.0.2","dev":"eth0","prefsrc":"10.0.0.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(parse_route_get(via).as_deref(), Some("eth0"));
        let local = br#"[{"type":"local","dst":"10.0.0.1","dev":"lo","prefsrc":"10.0.0.1","flags":[],"uid":0,"cache":["local"]}]"#;
        assert_eq!(parse_route_get(local), None);
        assert_eq!(parse_route_get(b"not json"), None);
    }
}
