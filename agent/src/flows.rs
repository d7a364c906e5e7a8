//! Flows: kernel events turned into records a person (and jq) can read, kept in a bounded ring
//! and fanned out to followers.
//!
//! The JSON form follows Hubble's `Flow` field names (`time`, `verdict`, `IP.source`,
//! `l4.TCP.destination_port`, `source.pod_name`, ...) so existing jq habits work.

pub mod filter;
pub mod log;

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use agent_common::{DIR_INGRESS, FlowEvent, VERDICT_DROPPED, drop_reason, tcp_flags};
use serde::{Deserialize, Serialize};

use crate::policy::RuleInfo;

pub use filter::FlowFilter;

/// One end of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    pub identity: u32,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ip {
    pub source: IpAddr,
    pub destination: IpAddr,
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub source_port: u16,
    pub destination_port: u16,
    /// TCP only: `{"SYN": true, "ACK": true}` as Hubble prints them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flags: BTreeMap<String, bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4 {
    #[serde(rename = "TCP", default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Ports>,
    #[serde(rename = "UDP", default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<Ports>,
    #[serde(rename = "SCTP", default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<Ports>,
    #[serde(rename = "ICMPv4", default, skip_serializing_if = "Option::is_none")]
    pub icmpv4: Option<Ports>,
    #[serde(rename = "ICMPv6", default, skip_serializing_if = "Option::is_none")]
    pub icmpv6: Option<Ports>,
    /// Any other IP protocol, by number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u8>,
}

/// The policy that decided a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    pub rule: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// RFC 3339 with nanoseconds.
    pub time: String,
    pub verdict: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub drop_reason_desc: String,
    #[serde(rename = "IP")]
    pub ip: Ip,
    pub l4: L4,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub traffic_direction: String,
    pub is_reply: bool,
    pub node_name: String,
    /// Where this flow was observed (`kernel`, later `tunnel`, `dns`).
    #[serde(rename = "Type")]
    pub kind: String,
    /// For an allow the allowing rule; for a drop the denying rule or the policy whose
    /// selection made the endpoint default-deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    /// Names the destination was looked up by (filled by the DNS proxy), for `--to-fqdn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_names: Vec<String>,
    #[serde(rename = "Summary", default)]
    pub summary: String,
}

impl Flow {
    /// Source and destination ports, whatever the protocol.
    #[must_use]
    pub fn ports(&self) -> Option<&Ports> {
        self.l4
            .tcp
            .as_ref()
            .or(self.l4.udp.as_ref())
            .or(self.l4.sctp.as_ref())
            .or(self.l4.icmpv4.as_ref())
            .or(self.l4.icmpv6.as_ref())
    }

    /// `TCP`, `UDP`, ... as the `--protocol` filter names them.
    #[must_use]
    pub fn protocol_name(&self) -> &'static str {
        if self.l4.tcp.is_some() {
            "TCP"
        } else if self.l4.udp.is_some() {
            "UDP"
        } else if self.l4.sctp.is_some() {
            "SCTP"
        } else if self.l4.icmpv4.is_some() {
            "ICMPv4"
        } else if self.l4.icmpv6.is_some() {
            "ICMPv6"
        } else {
            "OTHER"
        }
    }

    #[must_use]
    pub fn system_time(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.time).ok()
    }
}

/// What the agent knows about an address, for enrichment.
#[derive(Clone, Debug, Default)]
pub struct AddressInfo {
    pub namespace: String,
    pub pod_name: String,
    pub labels: Vec<String>,
}

/// Lookups the enrichment needs, replaced whole after every sync.
#[derive(Clone, Debug, Default)]
pub struct EnrichmentIndex {
    pub node_name: String,
    pub addresses: BTreeMap<IpAddr, AddressInfo>,
    pub ifindex_to_pod: BTreeMap<u32, (String, String)>,
    pub rules: BTreeMap<u32, RuleInfo>,
    pub identity_labels: BTreeMap<u32, Vec<String>>,
}

impl EnrichmentIndex {
    /// One end of a flow: the pod at `addr` if there is one, else what the identity is known by.
    #[must_use]
    pub fn endpoint(&self, addr: IpAddr, identity: u32) -> Endpoint {
        let info = self.addresses.get(&addr);
        Endpoint {
            namespace: info.map(|i| i.namespace.clone()).unwrap_or_default(),
            pod_name: info.map(|i| i.pod_name.clone()).unwrap_or_default(),
            identity,
            labels: info.map(|i| i.labels.clone()).unwrap_or_else(|| {
                self.identity_labels
                    .get(&identity)
                    .cloned()
                    .unwrap_or_default()
            }),
            spiffe_id: None,
        }
    }

    /// The policy and rule a rule id stands for.
    #[must_use]
    pub fn policy(&self, rule_id: u32) -> Option<PolicyRef> {
        self.rules.get(&rule_id).map(|r| PolicyRef {
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            rule: r.rule.clone(),
        })
    }
}

/// Converts `bpf_ktime_get_ns` (CLOCK_MONOTONIC) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall_at_boot: Duration,
}

impl Clock {
    #[must_use]
    pub fn new() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
        let mono = Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        );
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            wall_at_boot: wall.saturating_sub(mono),
        }
    }

    #[must_use]
    pub fn wall(&self, ktime_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.wall_at_boot + Duration::from_nanos(ktime_ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

fn flag_names(flags: u8) -> BTreeMap<String, bool> {
    [
        (tcp_flags::SYN, "SYN"),
        (tcp_flags::ACK, "ACK"),
        (tcp_flags::FIN, "FIN"),
        (tcp_flags::RST, "RST"),
        (tcp_flags::PSH, "PSH"),
        (tcp_flags::URG, "URG"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| (name.to_owned(), true))
    .collect()
}

fn address(bytes: [u8; 16], family: u8) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(bytes);
    match (family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

/// Builds the flow record for a kernel event.
#[must_use]
pub fn from_event(ev: &FlowEvent, index: &EnrichmentIndex, clock: &Clock) -> Flow {
    let src = address(ev.saddr, ev.family);
    let dst = address(ev.daddr, ev.family);
    let ports = Ports {
        source_port: u16::from_be(ev.sport_be),
        destination_port: u16::from_be(ev.dport_be),
        flags: BTreeMap::new(),
    };
    let mut l4 = L4::default();
    match ev.protocol {
        6 => {
            l4.tcp = Some(Ports {
                flags: flag_names(ev.tcp_flags),
                ..ports
            });
        }
        17 => l4.udp = Some(ports),
        132 => l4.sctp = Some(ports),
        1 => l4.icmpv4 = Some(ports),
        58 => l4.icmpv6 = Some(ports),
        other => l4.protocol = Some(other),
    }
    let dropped = ev.verdict == VERDICT_DROPPED;
    let policy = index.policy(ev.rule_id);
    let mut flow = Flow {
        time: humantime::format_rfc3339_nanos(clock.wall(ev.ktime_ns)).to_string(),
        verdict: if dropped { "DROPPED" } else { "FORWARDED" }.into(),
        drop_reason_desc: if dropped {
            drop_reason::describe(ev.drop_reason).into()
        } else {
            String::new()
        },
        ip: Ip {
            source: src,
            destination: dst,
            ip_version: if ev.family == 6 { "IPv6" } else { "IPv4" }.into(),
        },
        l4,
        source: index.endpoint(src, ev.src_identity),
        destination: index.endpoint(dst, ev.dst_identity),
        traffic_direction: if ev.direction == DIR_INGRESS {
            "INGRESS"
        } else {
            "EGRESS"
        }
        .into(),
        is_reply: ev.is_reply != 0,
        node_name: index.node_name.clone(),
        kind: "L3_L4".into(),
        policy,
        destination_names: Vec::new(),
        summary: String::new(),
    };
    flow.summary = summary(&flow);
    flow
}

/// What the tunnel knows about a connection it carried or refused.
#[derive(Clone, Debug)]
pub struct TunnelRecord {
    pub source: std::net::SocketAddr,
    pub destination: std::net::SocketAddr,
    pub source_spiffe_id: String,
    pub destination_spiffe_id: String,
    /// `DIR_INGRESS` on the destination's node, `DIR_EGRESS` on the source's.
    pub direction: u8,
    pub forwarded: bool,
    /// Hubble-style reason for a drop (`POLICY_DENIED`, ...).
    pub drop_reason: &'static str,
    pub rule_id: u32,
    /// Node-local identities, as far as known (0 otherwise).
    pub source_identity: u32,
    pub destination_identity: u32,
    /// Why, in words, for the summary (`denied by node-2`, `connect: refused`).
    pub note: String,
}

/// Builds the flow record for a tunnelled connection (`Type` `TUNNEL`).
#[must_use]
pub fn from_tunnel(rec: &TunnelRecord, index: &EnrichmentIndex) -> Flow {
    let endpoint = |addr: IpAddr, identity: u32, spiffe: &str| Endpoint {
        spiffe_id: (!spiffe.is_empty()).then(|| spiffe.to_owned()),
        ..index.endpoint(addr, identity)
    };
    let (src, dst) = (rec.source.ip(), rec.destination.ip());
    let policy = index.policy(rec.rule_id);
    let mut flow = Flow {
        time: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
        verdict: if rec.forwarded {
            "FORWARDED"
        } else {
            "DROPPED"
        }
        .into(),
        drop_reason_desc: if rec.forwarded {
            String::new()
        } else {
            rec.drop_reason.into()
        },
        ip: Ip {
            source: src,
            destination: dst,
            ip_version: if src.is_ipv6() { "IPv6" } else { "IPv4" }.into(),
        },
        l4: L4 {
            tcp: Some(Ports {
                source_port: rec.source.port(),
                destination_port: rec.destination.port(),
                flags: BTreeMap::new(),
            }),
            ..L4::default()
        },
        source: endpoint(src, rec.source_identity, &rec.source_spiffe_id),
        destination: endpoint(dst, rec.destination_identity, &rec.destination_spiffe_id),
        traffic_direction: if rec.direction == DIR_INGRESS {
            "INGRESS"
        } else {
            "EGRESS"
        }
        .into(),
        is_reply: false,
        node_name: index.node_name.clone(),
        kind: "TUNNEL".into(),
        policy,
        destination_names: Vec::new(),
        summary: String::new(),
    };
    flow.summary = if rec.note.is_empty() {
        "HBONE".to_owned()
    } else {
        format!("HBONE: {}", rec.note)
    };
    flow
}

fn summary(flow: &Flow) -> String {
    match &flow.l4.tcp {
        Some(tcp) if !tcp.flags.is_empty() => {
            let names: Vec<&str> = tcp.flags.keys().map(String::as_str).collect();
            format!("TCP Flags: {}", names.join(", "))
        }
        _ => flow.protocol_name().to_owned(),
    }
}

/// Counters for every place a flow can be lost before a reader sees it.
#[derive(Debug, Default)]
pub struct LossCounters {
    /// Ring buffer full in the kernel (read from the datapath counters).
    pub kernel: AtomicU64,
    /// Evicted from the in-memory ring before anyone read it.
    pub store_overwritten: AtomicU64,
    /// A following client fell behind and missed flows.
    pub follower_lagged: AtomicU64,
    /// The flow log's writer was behind (its queue full) and the flow was not logged.
    pub flow_log_dropped: AtomicU64,
}

/// The in-memory flow ring and the broadcast to followers.
pub struct FlowStore {
    capacity: usize,
    ring: std::sync::Mutex<VecDeque<Arc<Flow>>>,
    tx: tokio::sync::broadcast::Sender<Arc<Flow>>,
    pub lost: LossCounters,
    pub total: AtomicU64,
}

impl FlowStore {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = tokio::sync::broadcast::channel(4096);
        Self {
            capacity: capacity.max(1),
            ring: std::sync::Mutex::new(VecDeque::with_capacity(capacity.min(65_536))),
            tx,
            lost: LossCounters::default(),
            total: AtomicU64::new(0),
        }
    }

    pub fn push(&self, flow: impl Into<Arc<Flow>>) {
        let flow = flow.into();
        {
            let mut ring = self
                .ring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if ring.len() == self.capacity {
                ring.pop_front();
                self.lost.store_overwritten.fetch_add(1, Ordering::Relaxed);
            }
            ring.push_back(flow.clone());
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        // No receivers is fine: nobody is following.
        let _ = self.tx.send(flow);
    }

    /// The last `n` stored flows that match, oldest first.
    #[must_use]
    pub fn last(&self, n: usize, filter: &FlowFilter) -> Vec<Arc<Flow>> {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<Arc<Flow>> = ring
            .iter()
            .rev()
            .filter(|f| filter.matches(f))
            .take(n)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    #[must_use]
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Flow>> {
        self.tx.subscribe()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `Nov 22 10:01:02.123: prod/frontend:41234 -> prod/backend:8080 policy=... FORWARDED (TCP Flags: SYN)`
#[must_use]
pub fn compact(flow: &Flow) -> String {
    let time = flow
        .system_time()
        .map(|t| {
            let s = humantime::format_rfc3339_millis(t).to_string();
            // 2026-11-22T10:01:02.123Z -> 11-22 10:01:02.123
            s.get(5..23).unwrap_or(&s).replace('T', " ")
        })
        .unwrap_or_else(|| flow.time.clone());
    let end = |e: &Endpoint, ip: &IpAddr, port: Option<u16>| {
        let who = if e.pod_name.is_empty() {
            ip.to_string()
        } else {
            format!("{}/{}", e.namespace, e.pod_name)
        };
        match port {
            Some(p) if p != 0 => format!("{who}:{p}"),
            _ => who,
        }
    };
    let ports = flow.ports();
    let policy = flow
        .policy
        .as_ref()
        .map(|p| format!(" policy={}/{}", p.name, p.rule))
        .unwrap_or_default();
    let reason = if flow.drop_reason_desc.is_empty() {
        String::new()
    } else {
        format!(" {}", flow.drop_reason_desc)
    };
    let identities = match (&flow.source.spiffe_id, &flow.destination.spiffe_id) {
        (None, None) => String::new(),
        (s, d) => format!(
            " mtls={} -> {}",
            s.as_deref().unwrap_or("?"),
            d.as_deref().unwrap_or("?")
        ),
    };
    format!(
        "{time}: {} -> {} {}{policy}{identities} {}{reason} ({})",
        end(&flow.source, &flow.ip.source, ports.map(|p| p.source_port)),
        end(
            &flow.destination,
            &flow.ip.destination,
            ports.map(|p| p.destination_port)
        ),
        flow.traffic_direction.to_lowercase(),
        flow.verdict,
        flow.summary,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use agent_common::{DIR_EGRESS, VERDICT_FORWARDED};

    /// A dropped TCP SYN from `prod/web` (10.0.0.2:41234) to 10.0.1.3:8080.
    pub(crate) fn sample() -> Flow {
        from_event(&event(), &index(), &Clock::new())
    }

    fn event() -> FlowEvent {
        FlowEvent {
            saddr: std::net::Ipv4Addr::new(10, 0, 0, 2)
                .to_ipv6_mapped()
                .octets(),
            daddr: std::net::Ipv4Addr::new(10, 0, 1, 3)
                .to_ipv6_mapped()
                .octets(),
            sport_be: 41234u16.to_be(),
            dport_be: 8080u16.to_be(),
            protocol: 6,
            family: 4,
            direction: DIR_EGRESS,
            verdict: VERDICT_DROPPED,
            drop_reason: drop_reason::POLICY_DEFAULT_DENY,
            tcp_flags: tcp_flags::SYN,
            rule_id: 77,
            src_identity: 300,
            dst_identity: 301,
            ..FlowEvent::default()
        }
    }

    fn index() -> EnrichmentIndex {
        let mut index = EnrichmentIndex {
            node_name: "n1".into(),
            ..EnrichmentIndex::default()
        };
        index.addresses.insert(
            "10.0.0.2".parse().unwrap(),
            AddressInfo {
                namespace: "prod".into(),
                pod_name: "web".into(),
                labels: vec!["app=web".into()],
            },
        );
        index.rules.insert(
            77,
            RuleInfo {
                kind: "NetworkPolicy".into(),
                namespace: "prod".into(),
                name: "deny-all".into(),
                rule: "default-deny".into(),
            },
        );
        index
    }

    #[test]
    fn json_uses_hubble_field_names() {
        let flow = from_event(&event(), &index(), &Clock::new());
        let json = serde_json::to_value(&flow).unwrap();
        assert_eq!(json["verdict"], "DROPPED");
        assert_eq!(json["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(json["IP"]["source"], "10.0.0.2");
        assert_eq!(json["IP"]["destination"], "10.0.1.3");
        assert_eq!(json["l4"]["TCP"]["source_port"], 41234);
        assert_eq!(json["l4"]["TCP"]["destination_port"], 8080);
        assert_eq!(json["l4"]["TCP"]["flags"]["SYN"], true);
        assert_eq!(json["source"]["namespace"], "prod");
        assert_eq!(json["source"]["pod_name"], "web");
        assert_eq!(json["source"]["identity"], 300);
        assert_eq!(json["destination"]["identity"], 301);
        assert_eq!(json["traffic_direction"], "EGRESS");
        assert_eq!(json["is_reply"], false);
        assert_eq!(json["node_name"], "n1");
        assert_eq!(json["policy"]["name"], "deny-all");
        assert!(json["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn compact_line_names_pods_policy_and_verdict() {
        let mut ev = event();
        ev.verdict = VERDICT_FORWARDED;
        let line = compact(&from_event(&ev, &index(), &Clock::new()));
        assert!(
            line.contains("prod/web:41234 -> 10.0.1.3:8080 egress policy=deny-all/default-deny FORWARDED (TCP Flags: SYN)"),
            "{line}"
        );
    }

    #[test]
    fn the_ring_keeps_the_newest_and_counts_what_it_overwrote() {
        let store = FlowStore::new(2);
        let flow = from_event(&event(), &index(), &Clock::new());
        for port in [1u16, 2, 3] {
            let mut f = flow.clone();
            f.l4.tcp.as_mut().unwrap().source_port = port;
            store.push(f);
        }
        let last = store.last(10, &FlowFilter::default());
        let ports: Vec<u16> = last
            .iter()
            .map(|f| f.ports().unwrap().source_port)
            .collect();
        assert_eq!(ports, vec![2, 3]);
        assert_eq!(store.lost.store_overwritten.load(Ordering::Relaxed), 1);
    }
}
