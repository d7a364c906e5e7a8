//! Types shared by the eBPF programs and the agent.
//!
//! Every map key and value, every event record and every constant that both sides read lives
//! here, `#[repr(C)]` with explicit padding, so the kernel and user space agree on the bytes.
//! Fields in network byte order say so in their name (`dport_be`).
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one LPM
//! trie serves both families and an IPv4 `/n` is the IPv6 prefix `/96+n`.
#![no_std]

/// Identity 0 matches any peer in a policy key.
pub const IDENTITY_ANY: u32 = 0;
/// The node itself (its addresses, and traffic from the host network namespace).
pub const IDENTITY_HOST: u32 = 1;
/// Anything outside the cluster: the default for an address the ipcache does not know.
pub const IDENTITY_WORLD: u32 = 2;
/// A cluster address that no manifest describes (a pod IP range without a known pod).
pub const IDENTITY_UNMANAGED: u32 = 3;
/// Another node of the cluster.
pub const IDENTITY_REMOTE_NODE: u32 = 4;
/// The Kubernetes API server.
pub const IDENTITY_KUBE_APISERVER: u32 = 5;
/// First identity the agent allocates for a label set; lower numbers are reserved.
pub const IDENTITY_FIRST_ALLOCATED: u32 = 256;

/// Directions, from the endpoint's point of view.
pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

/// The other direction.
#[inline(always)]
#[must_use]
pub const fn opposite(direction: u8) -> u8 {
    if direction == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    }
}

/// Flow verdicts (values follow Hubble's `Verdict` enum).
pub const VERDICT_FORWARDED: u8 = 1;
pub const VERDICT_DROPPED: u8 = 2;

/// Policy entry verdicts.
pub const POLICY_ALLOW: u8 = 1;
pub const POLICY_DENY: u8 = 2;

/// Why a packet was dropped. Index into the drop part of [`COUNTERS`](self) as
/// `COUNTER_DROP_BASE + reason`.
pub mod drop_reason {
    pub const NONE: u8 = 0;
    /// A rule of an `ingressDeny`/`egressDeny` section matched.
    pub const POLICY_DENY: u8 = 1;
    /// The endpoint is selected by a policy and no rule allows the flow.
    pub const POLICY_DEFAULT_DENY: u8 = 2;
    /// The source address of a packet leaving a pod is not the pod's.
    pub const SPOOFED_SOURCE: u8 = 3;
    /// A header is shorter than it says or than the packet.
    pub const MALFORMED: u8 = 4;
    /// A non-first fragment whose first fragment was never seen.
    pub const FRAGMENT_NO_HEAD: u8 = 5;
    /// An ethertype other than IPv4, IPv6 or ARP.
    pub const UNSUPPORTED_L3: u8 = 6;
    /// The interface carries our program but the agent has no endpoint for it.
    pub const UNKNOWN_ENDPOINT: u8 = 7;
    /// More IPv6 extension headers than the parser follows.
    pub const IPV6_EXT_TOO_DEEP: u8 = 8;
    /// IPv6 routing header (type 0 is deprecated, others are not expected from pods).
    pub const IPV6_ROUTING_HEADER: u8 = 9;
    /// Plaintext TCP to a pod in mTLS STRICT mode (only the tunnel may reach it).
    pub const AUTH_REQUIRED: u8 = 10;
    /// A connection to be tunnelled found no outbound listener (the agent is not running).
    pub const PROXY_UNAVAILABLE: u8 = 11;
    /// A new flow that policy allows found the conntrack table full: refused (fail closed)
    /// until the garbage collector frees entries; established flows go on.
    pub const CT_FULL: u8 = 12;
    pub const COUNT: u8 = 13;

    /// Hubble-style description for flows and metrics.
    #[must_use]
    pub fn describe(reason: u8) -> &'static str {
        match reason {
            NONE => "",
            POLICY_DENY => "POLICY_DENY",
            POLICY_DEFAULT_DENY => "POLICY_DENIED",
            SPOOFED_SOURCE => "INVALID_SOURCE_IP",
            MALFORMED => "INVALID_PACKET_DROPPED",
            FRAGMENT_NO_HEAD => "FRAGMENT_NO_HEAD",
            UNSUPPORTED_L3 => "UNSUPPORTED_L3_PROTOCOL",
            UNKNOWN_ENDPOINT => "UNKNOWN_ENDPOINT",
            IPV6_EXT_TOO_DEEP => "IPV6_EXTENSION_HEADERS_TOO_DEEP",
            IPV6_ROUTING_HEADER => "IPV6_ROUTING_HEADER",
            AUTH_REQUIRED => "AUTH_REQUIRED",
            PROXY_UNAVAILABLE => "PROXY_REDIRECTION_FAILED",
            CT_FULL => "CT_MAP_INSERTION_FAILED",
            _ => "UNKNOWN_REASON",
        }
    }
}

/// Per-CPU counters, indices into the `COUNTERS` array.
pub const COUNTER_PACKETS: u32 = 0;
pub const COUNTER_PASSED: u32 = 1;
pub const COUNTER_EVENTS_LOST: u32 = 2;
pub const COUNTER_NEW_FLOWS: u32 = 3;
pub const COUNTER_POLICY_REEVALUATED: u32 = 4;
/// New TCP flows steered to the agent's outbound listener (the mTLS tunnel).
pub const COUNTER_REDIRECTED: u32 = 5;
/// Socket connects and datagrams to a Service address rewritten to a backend (cgroup programs).
pub const COUNTER_SVC_TRANSLATED: u32 = 6;
/// Connects and datagrams to a Service with no usable backend, refused with `ECONNREFUSED`.
pub const COUNTER_SVC_NO_BACKEND: u32 = 7;
pub const COUNTER_DROP_BASE: u32 = 16;
pub const COUNTERS_LEN: u32 = 32;

/// eBPF host routing (`--host-routing=ebpf`): per-CPU counters of `NW_HOSTRT_COUNTERS`, by what
/// happened to a packet that policy allowed.
pub mod hostrt {
    /// From a local pod to a local pod: `bpf_redirect_peer` into the destination pod.
    pub const LOCAL_PEER: u32 = 0;
    /// From the underlay device to a local pod: `bpf_redirect_peer` into the pod.
    pub const UNDERLAY_PEER: u32 = 1;
    /// From a local pod to a pod on another node: `bpf_fib_lookup` plus `bpf_redirect_neigh`.
    pub const NEIGH: u32 = 2;
    /// Left to the node's stack: not a pod destination, the node itself, a fragment, HBONE,
    /// steered to the agent.
    pub const STACK: u32 = 3;
    /// Left to the stack because the FIB lookup did not resolve (no route, no neighbour yet,
    /// MTU, forwarding off).
    pub const FIB_MISS: u32 = 4;
    pub const COUNTERS_LEN: u32 = 8;
}

/// Map capacities. The agent refuses (whole) a policy set that would not fit.
pub const MAX_ENDPOINTS: u32 = 4096;
pub const MAX_POLICY_ENTRIES: u32 = 262_144;
pub const MAX_IPCACHE_ENTRIES: u32 = 65_536;
pub const MAX_POLICY_CIDRS: u32 = 16_384;
pub const MAX_CONNTRACK: u32 = 262_144;
pub const MAX_FRAGMENTS: u32 = 8192;
/// Sockets the tunnel's same-node fast path joins in the kernel at once (two per connection);
/// a connection beyond them is carried in user space.
pub const MAX_LOCAL_SOCKETS: u32 = 16_384;
pub const EVENTS_RING_BYTES: u32 = 1024 * 1024;
/// Service frontends (`ClusterIP:port/protocol`).
pub const MAX_SERVICES: u32 = 16_384;
/// Backend slots over all frontends.
pub const MAX_SERVICE_BACKENDS: u32 = 131_072;
/// Sockets whose peer was translated (for `getpeername` and UDP reply sources).
pub const MAX_SERVICE_REVNAT: u32 = 65_536;
/// Clients' backends under `sessionAffinity: ClientIP`.
pub const MAX_SERVICE_AFFINITY: u32 = 65_536;
/// Translated TCP connections, by 5-tuple, with the frontend they dialled (for flows).
pub const MAX_SERVICE_CONNS: u32 = 65_536;

/// Map names, as pinned in bpffs; the agent opens them by these names.
pub mod map_names {
    pub const ENDPOINTS: &str = "NW_ENDPOINTS";
    pub const POLICY: &str = "NW_POLICY";
    pub const IPCACHE: &str = "NW_IPCACHE";
    pub const POLICY_CIDRS: &str = "NW_POLICY_CIDRS";
    pub const CONNTRACK: &str = "NW_CONNTRACK";
    pub const FRAGMENTS: &str = "NW_FRAGMENTS";
    pub const EVENTS: &str = "NW_EVENTS";
    pub const COUNTERS: &str = "NW_COUNTERS";
    pub const CONFIG: &str = "NW_CONFIG";
    pub const PROXY_SOCKETS: &str = "NW_PROXY_SOCKETS";
    /// The same-node fast path's joined sockets and their redirected bytes (never pinned).
    pub const LOCAL_PEERS: &str = "NW_LOCAL_PEERS";
    pub const LOCAL_BYTES: &str = "NW_LOCAL_BYTES";
    pub const SERVICES: &str = "NW_SERVICES";
    pub const SERVICE_BACKENDS: &str = "NW_SVC_BACKENDS";
    pub const SERVICE_REVNAT: &str = "NW_SVC_REVNAT";
    pub const SERVICE_AFFINITY: &str = "NW_SVC_AFFINITY";
    pub const SERVICE_CONNS: &str = "NW_SVC_CONNS";
    pub const HOSTRT_COUNTERS: &str = "NW_HOSTRT_COUNTERS";
}

/// Program names (the function names in `agent-ebpf`).
pub mod program_names {
    /// TC ingress of the host-side interface: packets leaving the pod.
    pub const FROM_WORKLOAD: &str = "from_workload";
    /// TC egress of the host-side interface: packets going to the pod.
    pub const TO_WORKLOAD: &str = "to_workload";
    /// TC ingress of the node's underlay device(s) (eBPF host routing): packets from other
    /// nodes to local pods, judged as `to_workload` would and put straight into the pod.
    pub const FROM_UNDERLAY: &str = "from_underlay";
    /// `sk_lookup` of the agent's network namespace: hands new tunnelled connections to the
    /// agent's outbound listener.
    pub const TO_PROXY: &str = "to_proxy";
    /// `sk_skb` stream verdict of `NW_LOCAL_PEERS`: the same-node fast path's byte mover.
    pub const LOCAL_SPLICE: &str = "local_splice";
    /// cgroup `connect4`: a connect to a Service address goes to one of its backends.
    pub const SVC_CONNECT4: &str = "svc_connect4";
    /// cgroup `sendmsg4`: a datagram to a Service address goes to one of its backends.
    pub const SVC_SENDMSG4: &str = "svc_sendmsg4";
    /// cgroup `recvmsg4`: a datagram from a translated backend shows the Service address.
    pub const SVC_RECVMSG4: &str = "svc_recvmsg4";
    /// cgroup `getpeername4`: a translated socket's peer is the Service address.
    pub const SVC_GETPEERNAME4: &str = "svc_getpeername4";
    /// The same four for IPv6 sockets.
    pub const SVC_CONNECT6: &str = "svc_connect6";
    pub const SVC_SENDMSG6: &str = "svc_sendmsg6";
    pub const SVC_RECVMSG6: &str = "svc_recvmsg6";
    pub const SVC_GETPEERNAME6: &str = "svc_getpeername6";
    /// cgroup `sock_ops`: when a translated TCP socket has its source port (before its SYN),
    /// records its 5-tuple with the frontend it dialled, for the flow the classifier reports.
    pub const SVC_SOCK_OPS: &str = "svc_sock_ops";
}

/// Socket-level Service translation (cgroup `sock_addr` programs on the agent's `--cgroup`).
///
/// `NW_SERVICES` maps a frontend (`ClusterIP`, port, protocol) to its number of usable backends;
/// `NW_SVC_BACKENDS` holds them in slots `1..=count` of that frontend. The agent writes a change
/// slots first, then the count, then removes slots past the count, so a reader never picks an
/// empty slot. A count of 0 refuses the connect (`ECONNREFUSED`), as kube-proxy's reject rule
/// does. `NW_SVC_REVNAT` remembers, per socket cookie and backend, the frontend the application
/// asked for, so `getpeername` and a UDP reply's source show the `ClusterIP`.
///
/// A Service frontend. `addr` is IPv4-mapped for IPv4 (the maps' one address form).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Usable backends, in slots `1..=count` of `NW_SVC_BACKENDS`.
    pub count: u32,
    /// `sessionAffinity: ClientIP`: a client (a pod: its network namespace) keeps its backend
    /// for this many seconds after its last connect; 0 picks anew every time.
    pub affinity_secs: u32,
}

/// A client's backend under session affinity: the client is its network namespace (a pod), which
/// is what `ClientIP` means for pods and is known before the socket has a source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service: ServiceKey,
    pub _pad: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: Backend,
    /// The slot it was in; the entry holds only while that slot still holds it.
    pub slot: u32,
    /// `bpf_ktime_get_ns` of the last connect that used it.
    pub last_ns: u64,
}

/// One backend slot of a frontend (`slot` counts from 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub service: ServiceKey,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub _pad: [u8; 2],
}

/// A translated socket's backend, by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub backend: Backend,
    pub _pad: [u8; 4],
}

/// A translated TCP connection as the classifiers see its packets leaving the pod (addresses
/// IPv4-mapped for IPv4); the value of `NW_SVC_CONNS` is the frontend it dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcConnKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// The mTLS tunnel's interception. A new TCP flow from a meshed pod to a meshed pod is marked in
/// conntrack (`CT_F_REDIRECT`) and every packet of it gets [`MARK_TO_PROXY`]; a policy route
/// (`ip rule add fwmark MARK_TO_PROXY/MARK_MASK lookup ROUTE_TABLE` with
/// `local default dev lo table ROUTE_TABLE`) delivers them locally, where the `to_proxy`
/// `sk_lookup` program gives the first packet to the agent's transparent listener (the accepted
/// socket's local address is the original destination) and the kernel finds the rest by their
/// 4-tuple. Replies to the connections the agent opens to pods (tunnel deliveries, sent with
/// [`MARK_FROM_AGENT`] from the original source address) are marked the same way, so they reach
/// the agent rather than being routed towards the source's node.
pub mod mesh {
    /// The bits of `skb->mark` nodeward owns.
    pub const MARK_MASK: u32 = 0x0f00_0000;
    /// Deliver locally (to the agent), by the policy route.
    pub const MARK_TO_PROXY: u32 = 0x0100_0000;
    /// Sent by the agent itself (`SO_MARK`): a tunnel delivery, already authorized by the agent.
    pub const MARK_FROM_AGENT: u32 = 0x0200_0000;
    /// A connection to port 15008 of a pod, in its first direction (set by the agent's
    /// `nodeward_hbone` nftables chain from netfilter's conntrack in `--hbone-dial pod`): routed
    /// by the HBONE rule, to the agent where the pod is local. Replies to a pod's own connection
    /// from port 15008 never carry it.
    pub const MARK_HBONE: u32 = 0x0300_0000;
    /// Routing table of the policy route, and the priority of its rule.
    pub const ROUTE_TABLE: u32 = 0x4e57;
    pub const RULE_PRIORITY: u32 = 90;
    /// The agent's outbound listeners: `127.0.0.1:OUTBOUND_PORT` and `[::1]:OUTBOUND_PORT`.
    pub const OUTBOUND_PORT: u16 = 15001;
    /// `NW_PROXY_SOCKETS` slots.
    pub const PROXY_SOCKET_V4: u32 = 0;
    pub const PROXY_SOCKET_V6: u32 = 1;
}

/// `EndpointInfo::flags`.
pub const EP_INGRESS_ENFORCED: u32 = 1 << 0;
pub const EP_EGRESS_ENFORCED: u32 = 1 << 1;
pub const EP_HAS_IPV4: u32 = 1 << 2;
pub const EP_HAS_IPV6: u32 = 1 << 3;
/// The pod is in the mesh (mTLS PERMISSIVE or STRICT): its new TCP flows to meshed pods go
/// through the agent's tunnel.
pub const EP_MESHED: u32 = 1 << 4;
/// mTLS STRICT: new plaintext TCP flows to the pod are dropped (`AUTH_REQUIRED`) unless the
/// agent delivers them from the tunnel or they come from the node itself (kubelet probes).
pub const EP_MTLS_STRICT: u32 = 1 << 5;

/// `IpcacheValue::flags`: the address is a pod in the mesh, so traffic to it is tunnelled.
pub const IPCACHE_MESHED: u32 = 1 << 0;
/// `IpcacheValue::flags`: the address is a pod's (of this node or another): eBPF host routing
/// may send traffic to it straight out of the destination's device.
pub const IPCACHE_POD: u32 = 1 << 1;

/// `CtValue::flags`: the flow goes to the agent's outbound listener (every packet is marked).
pub const CT_F_REDIRECT: u8 = 1 << 0;
/// `CtValue::flags`: the agent opened this flow to the pod (a tunnel delivery): replies are
/// marked for local delivery to the agent.
pub const CT_F_TUNNELED: u8 = 1 << 1;
/// `CtValue::flags`: the entry is stored under the reverse of the tuple that created it (see
/// [`CtKey`]); [`CtKey::original`] turns a stored key back.
pub const CT_F_STORED_REVERSED: u8 = 1 << 2;
/// `CtValue::flags`: a TCP FIN or RST was seen: the connection is closing, so it no longer
/// keeps a DNS-learned address allowed (a new SYN on the tuple makes a fresh entry).
pub const CT_F_CLOSING: u8 = 1 << 3;
/// `CtValue::flags`: a packet of the flow went the other way (a reply): a TCP connection is
/// past its handshake and gets [`conntrack::TCP_ESTABLISHED_S`] instead of
/// [`conntrack::TCP_OPENING_S`].
pub const CT_F_SEEN_REPLY: u8 = 1 << 4;

/// Conntrack lifetimes (`NW_CONNTRACK` is a preallocated hash, not an LRU: nothing leaves it
/// unless it expires). An entry idle (no packet, by `CtValue::last_seen_s`) for longer than
/// its lifetime is treated as absent by the datapath (the next packet is a new flow and
/// overwrites it in place) and deleted by the agent's garbage collector. Cilium's defaults.
pub mod conntrack {
    use super::{CT_F_CLOSING, CT_F_SEEN_REPLY, CtValue};

    /// A TCP connection past its handshake.
    pub const TCP_ESTABLISHED_S: u32 = 6 * 3600;
    /// A TCP flow nothing answered yet (a SYN, or a flow seen in one direction only).
    pub const TCP_OPENING_S: u32 = 60;
    /// A TCP connection after a FIN or RST.
    pub const TCP_CLOSING_S: u32 = 10;
    /// UDP, ICMP and everything else.
    pub const OTHER_S: u32 = 60;

    /// The lifetime of an entry of `protocol` with `value`'s flags.
    #[inline(always)]
    #[must_use]
    pub const fn lifetime_s(protocol: u8, value: &CtValue) -> u32 {
        if protocol != 6 {
            OTHER_S
        } else if value.flags & CT_F_CLOSING != 0 {
            TCP_CLOSING_S
        } else if value.flags & CT_F_SEEN_REPLY != 0 {
            TCP_ESTABLISHED_S
        } else {
            TCP_OPENING_S
        }
    }

    /// Whether the entry, last seen at `value.last_seen_s`, has expired at `now_s` (both in
    /// seconds of the monotonic clock). An entry of an agent that did not record the time
    /// (0) ages from the clock's start.
    #[inline(always)]
    #[must_use]
    pub const fn expired(protocol: u8, value: &CtValue, now_s: u32) -> bool {
        now_s.saturating_sub(value.last_seen_s) > lifetime_s(protocol, value)
    }
}

/// `NW_ENDPOINTS` value, keyed by the `u32` ifindex of the pod's host-side interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Which policy set (first field of [`PolicyKey`]) holds this endpoint's rules. Changing it
    /// switches the endpoint to another complete set in one map update.
    pub policy_set: u32,
    /// The endpoint's own identity (source identity of what it sends).
    pub identity: u32,
    pub flags: u32,
    /// Rule id reported for a default deny, per direction (the policy that selected the pod).
    pub ingress_default_rule: u32,
    pub egress_default_rule: u32,
    pub _pad: u32,
    /// IPv4-mapped IPv6 when `EP_HAS_IPV4`.
    pub ipv4: [u8; 16],
    pub ipv6: [u8; 16],
}

/// `NW_POLICY` LPM trie data. All fields big-endian so that the trie matches most significant
/// bits first: policy set, peer, direction, protocol, then the port prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub policy_set_be: u32,
    pub peer_identity_be: u32,
    pub direction: u8,
    pub protocol: u8,
    pub dport_be: u16,
}

/// Bits of [`PolicyKey`] before the port.
pub const POLICY_KEY_PREFIX_NO_PORT: u32 = 80;
/// All bits of [`PolicyKey`].
pub const POLICY_KEY_PREFIX_FULL: u32 = 96;

/// `NW_POLICY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub verdict: u8,
    pub _pad: [u8; 3],
    pub rule_id: u32,
}

/// `NW_IPCACHE` and `NW_POLICY_CIDRS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// `IPCACHE_*` bits (always 0 in `NW_POLICY_CIDRS`).
    pub flags: u32,
}

/// `NW_CONNTRACK` key: the tuple of the packet that created the entry, plus the direction it was
/// evaluated in at this node, stored in one canonical orientation so that a packet and its reply
/// find the entry with one lookup.
///
/// A flow's two orientations are the tuple as its first packet carried it (`A -> B`, direction
/// `d`) and the reverse (`B -> A`, the opposite direction), which is how its replies arrive at
/// the same endpoint. The entry is stored under the orientation whose source (address, port)
/// sorts first; `CT_F_STORED_REVERSED` in the value says it is the reverse of the original.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The other orientation of the same flow: the tuple reversed, in the opposite direction.
    #[inline(always)]
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            protocol: self.protocol,
            direction: opposite(self.direction),
            _pad: [0; 2],
        }
    }

    /// Whether this orientation is the stored one: see [`CtKey::orders_first`].
    #[inline(always)]
    #[must_use]
    pub const fn is_canonical(&self) -> bool {
        Self::orders_first(&self.saddr, self.sport_be, &self.daddr, self.dport_be)
    }

    /// Whether a tuple from (`saddr`, `sport_be`) to (`daddr`, `dport_be`) is stored as it is:
    /// its source sorts before its destination, or equals it. The order is arbitrary but fixed
    /// (two native-endian 64-bit words, then the port as stored): no byte swaps and no `memcmp`,
    /// which the BPF backend lacks. Only the datapath orders keys; readers of the map use
    /// `CT_F_STORED_REVERSED`.
    #[inline(always)]
    #[must_use]
    pub const fn orders_first(
        saddr: &[u8; 16],
        sport_be: u16,
        daddr: &[u8; 16],
        dport_be: u16,
    ) -> bool {
        let (s0, s1) = addr_words(saddr);
        let (d0, d1) = addr_words(daddr);
        if s0 != d0 {
            return s0 < d0;
        }
        if s1 != d1 {
            return s1 < d1;
        }
        sport_be <= dport_be
    }

    /// The key of the packet that created the entry stored under `self` with `flags`.
    #[inline(always)]
    #[must_use]
    pub const fn original(&self, flags: u8) -> Self {
        if flags & CT_F_STORED_REVERSED != 0 {
            self.reversed()
        } else {
            *self
        }
    }
}

/// An address as two native-endian words, for ordering.
#[inline(always)]
const fn addr_words(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// `NW_CONNTRACK` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `NW_CONFIG.policy_generation` when the verdict was computed; a different current
    /// generation makes the next packet re-evaluate policy, so a revoked allow stops live flows.
    pub generation: u32,
    pub rule_id: u32,
    pub verdict: u8,
    pub drop_reason: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// When a packet of the flow was last seen, in whole seconds of the monotonic clock
    /// (`bpf_ktime_get_ns() / 1e9`, `CLOCK_MONOTONIC` in user space); written at most once a
    /// second per flow. 0 in entries made before the field existed. The agent reads it to keep
    /// the DNS-learned address of a live connection allowed after its TTL.
    pub last_seen_s: u32,
}

/// `NW_FRAGMENTS` key: IPv4 fragments are matched to their first fragment by this.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// `NW_FRAGMENTS` value: the ports read from the first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// `NW_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Bumped by the agent after every policy change.
    pub policy_generation: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
}

/// Emit a flow event for every new flow (not only drops).
pub const CONFIG_EVENTS_ALL_FLOWS: u32 = 1 << 0;
/// eBPF host routing: allowed pod traffic to pods bypasses the node's IP forwarding
/// (`bpf_redirect_peer`, `bpf_fib_lookup` plus `bpf_redirect_neigh`).
pub const CONFIG_HOST_ROUTING: u32 = 1 << 1;

/// One record in the `NW_EVENTS` ring buffer: a verdict on a new flow, or a drop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub ktime_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    /// 4 or 6.
    pub family: u8,
    pub direction: u8,
    pub verdict: u8,
    pub drop_reason: u8,
    pub tcp_flags: u8,
    pub is_reply: u8,
    pub _pad: u8,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule_id: u32,
    pub _pad2: u32,
    /// The Service frontend the connection dialled, when the cgroup programs translated it
    /// (`NW_SVC_CONNS`); port 0 when not known.
    pub svc_addr: [u8; 16],
    pub svc_port_be: u16,
    pub svc_protocol: u8,
    pub _pad3: u8,
    pub _pad4: u32,
}

/// TCP flag bits as in the header's 13th byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

#[cfg(feature = "user")]
mod user {
    use super::{
        AffinityKey, AffinityValue, Backend, BackendKey, CtKey, CtValue, DatapathConfig,
        EndpointInfo, FlowEvent, FragKey, FragValue, IpcacheValue, PolicyKey, PolicyValue,
        RevNatKey, ServiceKey, ServiceValue, SvcConnKey,
    };

    // SAFETY: all are `#[repr(C)]`, `Copy`, made only of integers and byte arrays, with every
    // padding byte an explicit field, so any bit pattern is valid.
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for SvcConnKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EndpointInfo>(), 56);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 24);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FlowEvent>(), 96);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<BackendKey>(), 24);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<RevNatKey>(), 32);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(size_of::<AffinityValue>(), 32);
        assert_eq!(size_of::<SvcConnKey>(), 40);
        assert_eq!(POLICY_KEY_PREFIX_FULL as usize, size_of::<PolicyKey>() * 8);
    }

    fn key(saddr: [u8; 16], sport: u16, daddr: [u8; 16], dport: u16) -> CtKey {
        CtKey {
            saddr,
            daddr,
            sport_be: sport.to_be(),
            dport_be: dport.to_be(),
            protocol: 6,
            direction: DIR_EGRESS,
            _pad: [0; 2],
        }
    }

    #[test]
    fn exactly_one_orientation_of_a_flow_is_canonical_and_original_undoes_the_storage() {
        let mut low = [0u8; 16];
        low[15] = 1;
        let mut high = low;
        high[15] = 2;
        // The second word decides here, the first in the next case; equal addresses, the port.
        let mut first_word = low;
        first_word[0] = 1;
        for k in [
            key(low, 40000, high, 80),
            key(high, 40000, low, 80),
            key(first_word, 1, high, 2),
            key(low, 80, low, 40000),
            key(low, 40000, low, 80),
        ] {
            let r = k.reversed();
            assert_eq!(r.direction, DIR_INGRESS);
            assert_eq!(r.reversed(), k, "reversing twice is the identity");
            assert_ne!(k.is_canonical(), r.is_canonical(), "{k:?}");
            let (stored, flags) = if k.is_canonical() {
                (k, 0)
            } else {
                (r, CT_F_STORED_REVERSED)
            };
            assert_eq!(stored.original(flags), k);
        }
    }
}
