//! The TC classifiers on crafted packets, through `BPF_PROG_TEST_RUN`.
//!
//! Every test runs in a fresh network namespace of its own thread (a veth pair there gives the
//! `skb->ifindex` the programs key endpoints by), loads a private, unpinned copy of the
//! datapath, and asserts both the TC verdict and what the datapath recorded (event, counter or
//! conntrack). Needs root; fails (never skips) without it. The pinning test also needs bpffs.

use std::ffi::CString;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use agent_common::{
    COUNTER_DROP_BASE, COUNTER_EVENTS_LOST, COUNTER_NEW_FLOWS, COUNTER_PACKETS, COUNTER_PASSED,
    COUNTER_POLICY_REEVALUATED, COUNTER_REDIRECTED, CT_F_CLOSING, CT_F_REDIRECT, CT_F_SEEN_REPLY,
    CT_F_TUNNELED, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ENFORCED, EP_HAS_IPV4, EP_HAS_IPV6,
    EP_INGRESS_ENFORCED, EP_MESHED, EP_MTLS_STRICT, EndpointInfo, FlowEvent, IDENTITY_HOST,
    IPCACHE_MESHED, IpcacheValue, POLICY_ALLOW, POLICY_DENY, POLICY_KEY_PREFIX_FULL,
    POLICY_KEY_PREFIX_NO_PORT, PolicyKey, PolicyValue, VERDICT_DROPPED, VERDICT_FORWARDED,
    conntrack, drop_reason, mesh, program_names, tcp_flags,
};
use aya::maps::{MapData, RingBuf};
use aya::programs::{SchedClassifier, TcAttachType, TestRun as _, TestRunOptions};
use nodeward::datapath::loader::Datapath;
use nodeward::datapath::maps::COUNTERS;
use nodeward::datapath::{MapWriter as _, PolicyEntryKey, addr_bytes};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
const WORLD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);

const POD_IDENTITY: u32 = 1000;
const PEER_IDENTITY: u32 = 1001;
const POLICY_SET: u32 = 7;
const INGRESS_DEFAULT_RULE: u32 = 77;
const EGRESS_DEFAULT_RULE: u32 = 78;

// ---------------------------------------------------------------------------------------------
// Environment

fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "classifier tests need root (BPF_PROG_TEST_RUN, netns, veth); running as uid {euid}"
    );
}

/// Moves the current thread into a fresh network namespace; back to the original on drop.
struct NetNsGuard {
    original: File,
}

impl NetNsGuard {
    fn new() -> Self {
        let original = File::open("/proc/thread-self/ns/net")
            .expect("opening /proc/thread-self/ns/net to restore it later");
        // SAFETY: affects only this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) failed: {}",
            std::io::Error::last_os_error()
        );
        Self { original }
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        // SAFETY: a namespace fd we opened; affects only this thread.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 && !std::thread::panicking() {
            panic!(
                "setns back to the original netns failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// `ip` in the current thread's namespace (a child inherits the calling thread's namespaces).
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip(8)");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).expect("interface name");
    // SAFETY: NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "interface {name} not found in the test netns");
    index
}

/// A private datapath, a veth pair in a private netns, and the events ring.
struct Env {
    dp: Datapath,
    events: RingBuf<MapData>,
    /// Host side of the pod's veth: has an endpoint.
    pod_if: u32,
    /// The other end: no endpoint.
    stranger_if: u32,
    // Last: the namespace goes away after everything in it.
    _ns: NetNsGuard,
}

impl Env {
    fn new() -> Self {
        Self::new_sized(&nodeward::datapath::sizes::MapSizes::COMPILED)
    }

    /// [`Env::new`] with the sized maps `sizes` large.
    fn new_sized(sizes: &nodeward::datapath::sizes::MapSizes) -> Self {
        require_root();
        let ns = NetNsGuard::new();
        ip(&[
            "link", "add", "nwt-host", "type", "veth", "peer", "name", "nwt-pod",
        ]);
        let pod_if = ifindex("nwt-host");
        let stranger_if = ifindex("nwt-pod");
        let mut dp = Datapath::open_sized(None, sizes).expect("loading the datapath (verifier)");
        let events = dp.maps_mut().take_events().expect("events ring");
        // These tests expect forwarded new flows as events, as the agent's default asks.
        dp.maps_mut()
            .set_config_flags(agent_common::CONFIG_EVENTS_ALL_FLOWS)
            .expect("setting the all-flows flag");
        Self {
            dp,
            events,
            pod_if,
            stranger_if,
            _ns: ns,
        }
    }

    /// The pod endpoint with both families and the given `EP_*_ENFORCED` flags.
    fn add_pod(&mut self, enforced: u32) {
        let info = EndpointInfo {
            policy_set: POLICY_SET,
            identity: POD_IDENTITY,
            flags: enforced | EP_HAS_IPV4 | EP_HAS_IPV6,
            ingress_default_rule: INGRESS_DEFAULT_RULE,
            egress_default_rule: EGRESS_DEFAULT_RULE,
            _pad: 0,
            ipv4: addr_bytes(IpAddr::V4(POD_V4)),
            ipv6: addr_bytes(IpAddr::V6(POD_V6)),
        };
        self.dp
            .maps_mut()
            .put_endpoint(self.pod_if, &info)
            .expect("put endpoint");
        for (net, id) in [
            (format!("{PEER_V4}/32"), PEER_IDENTITY),
            (format!("{PEER_V6}/128"), PEER_IDENTITY),
            (format!("{POD_V4}/32"), POD_IDENTITY),
        ] {
            self.put_ipcache(&net, id, 0);
        }
    }

    fn put_ipcache(&mut self, net: &str, identity: u32, flags: u32) {
        self.dp
            .maps_mut()
            .put_ipcache(
                net.parse().expect("prefix"),
                IpcacheValue { identity, flags },
            )
            .expect("put ipcache");
    }

    fn policy_key(
        peer: u32,
        direction: u8,
        protocol: u8,
        port: u16,
        port_bits: u32,
    ) -> PolicyEntryKey {
        PolicyEntryKey {
            key: PolicyKey {
                policy_set_be: POLICY_SET.to_be(),
                peer_identity_be: peer.to_be(),
                direction,
                protocol,
                dport_be: port.to_be(),
            },
            prefix_len: POLICY_KEY_PREFIX_NO_PORT + port_bits,
        }
    }

    fn put_rule(&mut self, key: PolicyEntryKey, verdict: u8, rule_id: u32) {
        self.dp
            .maps_mut()
            .put_policy(
                key,
                PolicyValue {
                    verdict,
                    _pad: [0; 3],
                    rule_id,
                },
            )
            .expect("put policy");
    }

    fn allow(&mut self, peer: u32, direction: u8, protocol: u8, port: u16, rule_id: u32) {
        let bits = if protocol == 0 || port == 0 { 0 } else { 16 };
        self.put_rule(
            Self::policy_key(peer, direction, protocol, port, bits),
            POLICY_ALLOW,
            rule_id,
        );
    }

    fn run_on(&self, program: &'static str, ifindex: u32, packet: &[u8]) -> u32 {
        self.run_marked(program, ifindex, packet, 0).0
    }

    /// Runs `program` on `packet` with `skb->mark` = `mark`; returns the verdict and the mark
    /// the program left.
    fn run_marked(
        &self,
        program: &'static str,
        ifindex: u32,
        packet: &[u8],
        mark: u32,
    ) -> (u32, u32) {
        let prog: &SchedClassifier = self.dp.program(program).expect("program");
        // `struct __sk_buff` up to and including `ifindex` (offset 40): the kernel resolves it in
        // the caller's netns and sets skb->dev from it. `mark` is at offset 8.
        let mut ctx = [0u8; 44];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        // The kernel writes the whole `struct __sk_buff` back (192 bytes on 6.x), or fails
        // with ENOSPC.
        let mut ctx_out = [0u8; 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        };
        let verdict = prog
            .test_run(opts)
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN of {program} on a {}-byte packet failed: {}",
                    packet.len(),
                    error_chain(&e)
                )
            })
            .return_value;
        let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().expect("4 bytes"));
        (verdict, mark)
    }

    /// A packet leaving the pod (TC ingress of its host-side veth).
    fn send_from_pod(&self, packet: &[u8]) -> u32 {
        self.run_on(program_names::FROM_WORKLOAD, self.pod_if, packet)
    }

    /// A packet going to the pod (TC egress of its host-side veth).
    fn send_to_pod(&self, packet: &[u8]) -> u32 {
        self.run_on(program_names::TO_WORKLOAD, self.pod_if, packet)
    }

    /// Attaches both programs to the pod's host-side veth for real traffic. IPv6 is disabled in
    /// the namespace first so the interfaces coming up send nothing of their own.
    fn attach_live(&mut self) {
        for conf in ["all", "default", "nwt-host", "nwt-pod"] {
            let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
            std::fs::write(&path, "1").unwrap_or_else(|e| panic!("writing {path}: {e}"));
        }
        ip(&["link", "set", "nwt-host", "up"]);
        ip(&["link", "set", "nwt-pod", "up"]);
        self.dp
            .attach(self.pod_if, "nwt-host")
            .expect("attach to nwt-host");
    }

    /// Sends `frame` as the pod would (out of `nwt-pod`, into TC ingress of `nwt-host`) and
    /// waits until the datapath has counted it.
    fn inject_from_pod(&self, frame: &[u8]) {
        let before = self.counters()[COUNTER_PACKETS as usize];
        send_raw(self.stranger_if, frame);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.counters()[COUNTER_PACKETS as usize] == before {
            assert!(
                std::time::Instant::now() < deadline,
                "an injected frame never reached the program"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            self.counters()[COUNTER_PACKETS as usize],
            before + 1,
            "exactly the injected frame reached the program"
        );
    }

    fn counters(&self) -> [u64; COUNTERS] {
        self.dp.maps().counters().expect("counters")
    }

    fn drops(&self, reason: u8) -> u64 {
        self.counters()[(COUNTER_DROP_BASE + u32::from(reason)) as usize]
    }

    fn take_events(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            assert!(
                item.len() >= size_of::<FlowEvent>(),
                "event record of {} bytes, expected {}",
                item.len(),
                size_of::<FlowEvent>()
            );
            // SAFETY: length checked; FlowEvent is plain old data.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        out
    }

    /// The one event the last packet produced.
    fn one_event(&mut self) -> FlowEvent {
        let events = self.take_events();
        assert_eq!(
            events.len(),
            1,
            "expected exactly one event, got {events:#?}"
        );
        events[0]
    }

    fn assert_dropped(&mut self, verdict: u32, reason: u8) -> FlowEvent {
        assert_eq!(
            verdict,
            TC_ACT_SHOT,
            "expected a drop ({}), the packet passed",
            drop_reason::describe(reason)
        );
        let ev = self.one_event();
        assert_eq!(ev.verdict, VERDICT_DROPPED, "event verdict: {ev:?}");
        assert_eq!(
            ev.drop_reason,
            reason,
            "expected drop reason {}, event says {}",
            drop_reason::describe(reason),
            drop_reason::describe(ev.drop_reason)
        );
        ev
    }
}

/// Sends a raw Ethernet frame out of `ifindex` (AF_PACKET, in the thread's netns).
fn send_raw(ifindex: u32, frame: &[u8]) {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("family");
    addr.sll_ifindex = i32::try_from(ifindex).expect("ifindex");
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: valid buffer and address of the stated sizes.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            u32::try_from(size_of::<libc::sockaddr_ll>()).expect("size"),
        )
    };
    assert_eq!(
        usize::try_from(sent).ok(),
        Some(frame.len()),
        "sending a {}-byte frame: {}",
        frame.len(),
        std::io::Error::last_os_error()
    );
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Packet builders

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

struct V4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: Vec<u8>,
    id: u16,
    /// Fragment offset in 8-byte units.
    frag_offset: u16,
    more_fragments: bool,
}

impl V4 {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            options: Vec::new(),
            id: 0x1234,
            frag_offset: 0,
            more_fragments: false,
        }
    }

    fn packet(&self, l4: &[u8]) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0, "IPv4 options pad to 4 bytes");
        let hdr_len = 20 + self.options.len();
        let total = u16::try_from(hdr_len + l4.len()).expect("packet size");
        let ihl = u8::try_from(hdr_len / 4).expect("ihl");
        let frag = self.frag_offset | if self.more_fragments { 0x2000 } else { 0 };
        let mut h = vec![0x40 | ihl, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, self.proto, 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let csum = checksum(&h);
        h[10..12].copy_from_slice(&csum.to_be_bytes());
        h.extend_from_slice(l4);
        ether(0x0800, &h)
    }
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&u16::try_from(payload.len()).expect("size").to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    ether(0x86dd, &h)
}

/// An 8-byte IPv6 options header (hop-by-hop or destination options) with PadN.
fn ext_opts(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

fn udp(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&u16::try_from(8 + payload_len).expect("size").to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend(std::iter::repeat_n(0xab, payload_len));
    h
}

fn icmp_echo(kind: u8, id: u16) -> Vec<u8> {
    let mut h = vec![kind, 0, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h
}

fn syn_v4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    V4::new(src, dst, PROTO_TCP).packet(&tcp(sport, dport, tcp_flags::SYN))
}

fn port_be(port: u16) -> u16 {
    port.to_be()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn allowed_tcp_syn_passes_creates_conntrack_and_reports_the_rule() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 11);

    let verdict = env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 40000, 80));
    assert_eq!(verdict, TC_ACT_OK, "an allowed SYN must pass");

    let ev = env.one_event();
    assert_eq!(ev.verdict, VERDICT_FORWARDED);
    assert_eq!(ev.rule_id, 11);
    assert_eq!(ev.direction, DIR_EGRESS);
    assert_eq!(
        (ev.src_identity, ev.dst_identity),
        (POD_IDENTITY, PEER_IDENTITY)
    );
    assert_eq!((ev.sport_be, ev.dport_be), (port_be(40000), port_be(80)));
    assert_eq!(ev.tcp_flags, tcp_flags::SYN);
    assert_eq!((ev.family, ev.protocol, ev.is_reply), (4, PROTO_TCP, 0));
    assert_eq!(ev.ifindex, env.pod_if);

    let c = env.counters();
    assert_eq!(c[COUNTER_NEW_FLOWS as usize], 1);
    assert_eq!(c[COUNTER_PASSED as usize], 1);
    assert_eq!(c[COUNTER_PACKETS as usize], 1);
    let ct = env.dp.maps().conntrack().expect("conntrack");
    assert_eq!(ct.len(), 1, "one conntrack entry: {ct:?}");
    let (key, value) = ct[0];
    assert_eq!(key.direction, DIR_EGRESS);
    assert_eq!(key.saddr, addr_bytes(IpAddr::V4(POD_V4)));
    assert_eq!(key.dport_be, port_be(80));
    assert_eq!((value.verdict, value.rule_id), (VERDICT_FORWARDED, 11));
}

#[test]
fn with_drops_only_events_a_forwarded_flow_is_silent_and_a_drop_is_reported() {
    let mut env = Env::new();
    env.dp
        .maps_mut()
        .set_config_flags(0)
        .expect("clearing the all-flows flag");
    env.add_pod(EP_EGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 11);

    assert_eq!(
        env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 40000, 80)),
        TC_ACT_OK,
        "an allowed SYN must pass"
    );
    assert!(
        env.take_events().is_empty(),
        "a forwarded new flow must not be reported without CONFIG_EVENTS_ALL_FLOWS"
    );
    assert_eq!(env.counters()[COUNTER_NEW_FLOWS as usize], 1);

    assert_eq!(
        env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 40001, 81)),
        TC_ACT_SHOT,
        "a SYN to a port without an allow must be dropped"
    );
    let ev = env.one_event();
    assert_eq!(ev.verdict, VERDICT_DROPPED, "drops are always reported");
}

#[test]
fn reply_to_an_allowed_flow_passes_without_an_ingress_rule() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED | EP_INGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 11);
    assert_eq!(
        env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 40000, 80)),
        TC_ACT_OK
    );
    env.take_events();

    let syn_ack = V4::new(PEER_V4, POD_V4, PROTO_TCP).packet(&tcp(
        80,
        40000,
        tcp_flags::SYN | tcp_flags::ACK,
    ));
    assert_eq!(env.send_to_pod(&syn_ack), TC_ACT_OK, "the reply must pass");
    assert!(
        env.take_events().is_empty(),
        "an established reply is not a new flow"
    );
    let c = env.counters();
    assert_eq!(
        c[COUNTER_NEW_FLOWS as usize], 1,
        "the reply must not create a flow"
    );
    assert_eq!(c[COUNTER_PASSED as usize], 2);
    assert_eq!(env.dp.maps().conntrack().expect("ct").len(), 1);

    // An unrelated inbound SYN is still subject to the ingress default deny.
    let verdict = env.send_to_pod(&syn_v4(PEER_V4, POD_V4, 40001, 22));
    env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
}

#[test]
fn a_new_syn_on_a_remembered_tuple_is_a_new_flow() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 11);
    let syn = syn_v4(POD_V4, PEER_V4, 40000, 80);
    assert_eq!(env.send_from_pod(&syn), TC_ACT_OK);
    env.take_events();
    // Mid-connection packets are not new flows...
    let ack = V4::new(POD_V4, PEER_V4, PROTO_TCP).packet(&tcp(40000, 80, tcp_flags::ACK));
    assert_eq!(env.send_from_pod(&ack), TC_ACT_OK);
    assert!(env.take_events().is_empty(), "an ACK is not a new flow");
    // ...but the client reusing its port for the next connection is one: it is evaluated and
    // reported, as `observe` users expect one flow per connection.
    assert_eq!(env.send_from_pod(&syn), TC_ACT_OK);
    let ev = env.one_event();
    assert_eq!((ev.verdict, ev.rule_id), (VERDICT_FORWARDED, 11));
    assert_eq!(env.counters()[COUNTER_NEW_FLOWS as usize], 2);
    assert_eq!(
        env.dp.maps().conntrack().expect("ct").len(),
        1,
        "the entry is reused"
    );
}

/// Conntrack stores a flow under whichever of its two orientations sorts first, so that a packet
/// and its reply find it with one lookup: a flow's replies must pass with peers on both sides of
/// the pod's address, in both families and both directions, and the entry must read back as the
/// packet that opened it.
#[test]
fn replies_find_their_flow_whichever_way_its_tuple_sorts() {
    let low_v4 = Ipv4Addr::new(10, 100, 0, 1);
    let low_v6 = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
    let cases: [(IpAddr, IpAddr); 4] = [
        (POD_V4.into(), PEER_V4.into()),
        (POD_V4.into(), low_v4.into()),
        (POD_V6.into(), PEER_V6.into()),
        (POD_V6.into(), low_v6.into()),
    ];
    for (pod, peer) in cases {
        let mut env = Env::new();
        env.add_pod(EP_EGRESS_ENFORCED | EP_INGRESS_ENFORCED);
        env.put_ipcache(&format!("{low_v4}/32"), PEER_IDENTITY, 0);
        env.put_ipcache(&format!("{low_v6}/128"), PEER_IDENTITY, 0);
        env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 11);
        env.allow(PEER_IDENTITY, DIR_INGRESS, PROTO_TCP, 8080, 12);
        let packet = |src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8| {
            let l4 = tcp(sport, dport, flags);
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => V4::new(s, d, PROTO_TCP).packet(&l4),
                (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, PROTO_TCP, &l4),
                _ => unreachable!("one family per case"),
            }
        };
        let syn_ack = tcp_flags::SYN | tcp_flags::ACK;

        // The pod connects out (egress allowed; no ingress rule for the replies).
        let out = [
            (true, packet(pod, peer, 40000, 80, tcp_flags::SYN)),
            (false, packet(peer, pod, 80, 40000, syn_ack)),
            (true, packet(pod, peer, 40000, 80, tcp_flags::ACK)),
            (
                false,
                packet(peer, pod, 80, 40000, tcp_flags::FIN | tcp_flags::ACK),
            ),
        ];
        // The peer connects in (ingress allowed; no egress rule for the replies).
        let inbound = [
            (false, packet(peer, pod, 50000, 8080, tcp_flags::SYN)),
            (true, packet(pod, peer, 8080, 50000, syn_ack)),
            (false, packet(peer, pod, 50000, 8080, tcp_flags::ACK)),
            (true, packet(pod, peer, 8080, 50000, tcp_flags::ACK)),
        ];
        for (i, (from_pod, p)) in out.iter().chain(&inbound).enumerate() {
            let verdict = if *from_pod {
                env.send_from_pod(p)
            } else {
                env.send_to_pod(p)
            };
            assert_eq!(verdict, TC_ACT_OK, "{pod} <-> {peer}: packet {i} must pass");
        }
        assert_eq!(
            env.counters()[COUNTER_NEW_FLOWS as usize],
            2,
            "{pod} <-> {peer}: two connections, two new flows"
        );
        let mut ct = env.dp.maps().conntrack().expect("conntrack");
        ct.sort_by_key(|(k, _)| k.direction);
        let opened: Vec<_> = ct
            .iter()
            .map(|(k, v)| {
                (
                    k.direction,
                    k.saddr,
                    k.sport_be,
                    k.daddr,
                    k.dport_be,
                    v.rule_id,
                    v.flags,
                )
            })
            .collect();
        assert_eq!(
            opened,
            vec![
                (
                    DIR_INGRESS,
                    addr_bytes(peer),
                    port_be(50000),
                    addr_bytes(pod),
                    port_be(8080),
                    12,
                    // Answered.
                    CT_F_SEEN_REPLY
                ),
                (
                    DIR_EGRESS,
                    addr_bytes(pod),
                    port_be(40000),
                    addr_bytes(peer),
                    port_be(80),
                    11,
                    // Answered, and the peer's FIN marked it closing.
                    CT_F_SEEN_REPLY | CT_F_CLOSING
                ),
            ],
            "{pod} <-> {peer}: one entry per connection, read back as its first packet"
        );
    }
}

#[test]
fn default_deny_drops_and_reports_reason_and_rule() {
    let mut env = Env::new();
    env.add_pod(EP_INGRESS_ENFORCED);

    let verdict = env.send_to_pod(&syn_v4(WORLD_V4, POD_V4, 5555, 8080));
    let ev = env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    assert_eq!(ev.rule_id, INGRESS_DEFAULT_RULE);
    assert_eq!(ev.direction, DIR_INGRESS);
    assert_eq!(
        (ev.src_identity, ev.dst_identity),
        (agent_common::IDENTITY_WORLD, POD_IDENTITY),
        "unknown source resolves to world"
    );
    assert_eq!(env.drops(drop_reason::POLICY_DEFAULT_DENY), 1);

    // A retried SYN is another connection attempt: evaluated again and reported again.
    let verdict = env.send_to_pod(&syn_v4(WORLD_V4, POD_V4, 5555, 8080));
    env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    assert_eq!(env.drops(drop_reason::POLICY_DEFAULT_DENY), 2);
    assert_eq!(env.counters()[COUNTER_NEW_FLOWS as usize], 2);
    // Any other packet of the denied tuple is dropped from conntrack, and reported too.
    let ack = V4::new(WORLD_V4, POD_V4, PROTO_TCP).packet(&tcp(5555, 8080, tcp_flags::ACK));
    let verdict = env.send_to_pod(&ack);
    env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    assert_eq!(env.counters()[COUNTER_NEW_FLOWS as usize], 2);
}

#[test]
fn unenforced_direction_passes_with_rule_zero() {
    let mut env = Env::new();
    env.add_pod(0);
    let verdict = env.send_to_pod(&syn_v4(WORLD_V4, POD_V4, 5555, 8080));
    assert_eq!(verdict, TC_ACT_OK);
    let ev = env.one_event();
    assert_eq!((ev.verdict, ev.rule_id), (VERDICT_FORWARDED, 0));
}

#[test]
fn deny_beats_allow_across_peer_and_protocol_wildcards() {
    let mut env = Env::new();
    env.add_pod(EP_INGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_INGRESS, PROTO_TCP, 443, 21);
    // A deny of everything from any peer (identity 0, protocol 0).
    env.put_rule(Env::policy_key(0, DIR_INGRESS, 0, 0, 0), POLICY_DENY, 99);

    let verdict = env.send_to_pod(&syn_v4(PEER_V4, POD_V4, 5555, 443));
    let ev = env.assert_dropped(verdict, drop_reason::POLICY_DENY);
    assert_eq!(ev.rule_id, 99, "the deny's rule id");
    assert_eq!(env.drops(drop_reason::POLICY_DENY), 1);
}

#[test]
fn cidr_identity_rules_apply_to_addresses_outside_the_ipcache() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED);
    env.dp
        .maps_mut()
        .put_policy_cidr("192.0.2.0/24".parse().expect("cidr"), 5000)
        .expect("put cidr");
    env.allow(5000, DIR_EGRESS, PROTO_TCP, 443, 31);
    assert_eq!(
        env.send_from_pod(&syn_v4(POD_V4, WORLD_V4, 1234, 443)),
        TC_ACT_OK
    );
    assert_eq!(env.one_event().rule_id, 31);
}

#[test]
fn port_prefix_entries_cover_exactly_their_range() {
    let mut env = Env::new();
    env.add_pod(EP_INGRESS_ENFORCED);
    // 8080..=8087: the top 13 bits of 8080 (0x1f90).
    env.put_rule(
        Env::policy_key(PEER_IDENTITY, DIR_INGRESS, PROTO_TCP, 8080, 13),
        POLICY_ALLOW,
        41,
    );
    for port in [8080, 8083, 8087] {
        let verdict = env.send_to_pod(&syn_v4(PEER_V4, POD_V4, 6000, port));
        assert_eq!(verdict, TC_ACT_OK, "port {port} is inside 8080/13");
        assert_eq!(env.one_event().rule_id, 41);
    }
    for port in [8079, 8088] {
        let verdict = env.send_to_pod(&syn_v4(PEER_V4, POD_V4, 6000, port));
        env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    }
}

#[test]
fn spoofed_source_is_dropped_and_link_local_only_passes_for_neighbour_discovery() {
    let mut env = Env::new();
    env.add_pod(0);

    let verdict = env.send_from_pod(&syn_v4(Ipv4Addr::new(10, 200, 0, 99), PEER_V4, 1000, 80));
    env.assert_dropped(verdict, drop_reason::SPOOFED_SOURCE);

    let spoofed_v6 = ipv6(PEER_V6, POD_V6, PROTO_TCP, &tcp(1, 80, tcp_flags::SYN));
    let verdict = env.send_from_pod(&spoofed_v6);
    env.assert_dropped(verdict, drop_reason::SPOOFED_SOURCE);
    assert_eq!(env.drops(drop_reason::SPOOFED_SOURCE), 2);

    let link_local: Ipv6Addr = "fe80::1".parse().expect("addr");
    let all_routers: Ipv6Addr = "ff02::2".parse().expect("addr");
    // Router solicitation (133) from the link-local address.
    let rs = ipv6(
        link_local,
        all_routers,
        PROTO_ICMPV6,
        &[133, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_eq!(
        env.send_from_pod(&rs),
        TC_ACT_OK,
        "ND from link-local must pass"
    );
    // Neighbour solicitation (135) from the unspecified address (DAD).
    let ns = ipv6(
        Ipv6Addr::UNSPECIFIED,
        all_routers,
        PROTO_ICMPV6,
        &[
            135, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    assert_eq!(env.send_from_pod(&ns), TC_ACT_OK, "DAD from :: must pass");
    assert!(
        env.take_events().is_empty(),
        "ND passes without policy or events"
    );

    // Anything else from link-local is spoofing.
    let echo = ipv6(link_local, PEER_V6, PROTO_ICMPV6, &icmp_echo(128, 9));
    let verdict = env.send_from_pod(&echo);
    env.assert_dropped(verdict, drop_reason::SPOOFED_SOURCE);
}

#[test]
fn truncated_headers_are_dropped_never_passed() {
    let mut env = Env::new();
    // Nothing enforced: anything parsed correctly would pass.
    env.add_pod(0);
    let good = syn_v4(POD_V4, PEER_V4, 1000, 80);
    let v6_good = ipv6(POD_V6, PEER_V6, PROTO_TCP, &tcp(1000, 80, tcp_flags::SYN));

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("IPv4 header cut at 19 bytes", good[..14 + 19].to_vec()),
        ("TCP header cut at 12 bytes", good[..14 + 20 + 12].to_vec()),
        ("IPv6 header cut at 39 bytes", v6_good[..14 + 39].to_vec()),
        (
            "TCP after IPv6 cut at 19 bytes",
            v6_good[..14 + 40 + 19].to_vec(),
        ),
        (
            "UDP header cut at 7 bytes",
            V4::new(POD_V4, PEER_V4, PROTO_UDP).packet(&udp(1, 53, 0))[..14 + 20 + 7].to_vec(),
        ),
    ];
    // IPv4 total length larger than the packet.
    let mut long_total = good.clone();
    long_total[16..18].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("IPv4 total length beyond the packet", long_total));
    // ihl below 5.
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44;
    cases.push(("IPv4 ihl 4", short_ihl));
    // ihl claims options the packet does not have room for before the TCP header ends.
    let mut long_ihl = good.clone();
    long_ihl[14] = 0x4f;
    cases.push(("IPv4 ihl 15 with 20 bytes of TCP", long_ihl));
    // Total length shorter than the TCP header (trailing bytes are not L4).
    let mut short_total = good.clone();
    short_total[16..18].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("IPv4 total length cutting TCP", short_total));
    // IPv6 payload length beyond the packet.
    let mut long_payload = v6_good.clone();
    long_payload[18..20].copy_from_slice(&500u16.to_be_bytes());
    cases.push(("IPv6 payload length beyond the packet", long_payload));
    // An IPv6 hop-by-hop header whose length runs past the payload.
    let mut hbh = vec![PROTO_TCP, 4];
    hbh.extend_from_slice(&[1, 4, 0, 0, 0, 0]);
    cases.push((
        "IPv6 hop-by-hop longer than the packet",
        ipv6(POD_V6, PEER_V6, 0, &hbh),
    ));

    // The kernel's test run refuses packets whose IPv4/IPv6 header is shorter than the fixed
    // header, so these go through the real hook: a pod can send any frame (AF_PACKET), and TC
    // ingress of the host-side veth sees it before any IP validation.
    env.attach_live();
    for (what, packet) in cases {
        let before = env.counters();
        env.inject_from_pod(&packet);
        let after = env.counters();
        assert_eq!(
            after[COUNTER_PASSED as usize], before[COUNTER_PASSED as usize],
            "{what}: must never pass"
        );
        let malformed = (COUNTER_DROP_BASE + u32::from(drop_reason::MALFORMED)) as usize;
        assert_eq!(
            after[malformed],
            before[malformed] + 1,
            "{what}: one MALFORMED drop"
        );
        let ev = env.one_event();
        assert_eq!(
            (ev.verdict, ev.drop_reason),
            (VERDICT_DROPPED, drop_reason::MALFORMED),
            "{what}: {ev:?}"
        );
    }
    // The same path passes the untruncated packets.
    let before = env.counters()[COUNTER_PASSED as usize];
    env.inject_from_pod(&good);
    env.inject_from_pod(&v6_good);
    assert_eq!(
        env.counters()[COUNTER_PASSED as usize],
        before + 2,
        "intact packets pass"
    );
    env.take_events();

    // Shorter than an Ethernet header: the kernel refuses to run the program at all
    // (`bpf_test_init` wants more than ETH_HLEN), so the parser's own Ethernet length check
    // cannot be driven from here; no TC hook on an Ethernet device sees such a frame either.
    let prog = env
        .dp
        .program(program_names::FROM_WORKLOAD)
        .expect("program");
    let short = [0u8; 13];
    let opts = TestRunOptions {
        data_in: Some(&short),
        ..TestRunOptions::default()
    };
    assert!(
        prog.test_run(opts).is_err(),
        "a 13-byte frame is rejected before the program"
    );
    // And the test run agrees on the intact packets.
    assert_eq!(env.send_from_pod(&good), TC_ACT_OK);
    assert_eq!(env.send_from_pod(&v6_good), TC_ACT_OK);
}

#[test]
fn ipv4_options_are_skipped_to_find_the_ports() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 443, 51);
    let mut v4 = V4::new(POD_V4, PEER_V4, PROTO_TCP);
    // Router alert (4 bytes) and NOP/NOP/NOP/EOL: ihl 7.
    v4.options = vec![0x94, 4, 0, 0, 1, 1, 1, 0];
    let verdict = env.send_from_pod(&v4.packet(&tcp(3333, 443, tcp_flags::SYN)));
    assert_eq!(
        verdict, TC_ACT_OK,
        "port 443 behind 8 bytes of options is allowed"
    );
    let ev = env.one_event();
    assert_eq!(
        (ev.sport_be, ev.dport_be, ev.rule_id),
        (port_be(3333), port_be(443), 51)
    );

    // The same options with a disallowed port are dropped: the options are not the port.
    let verdict = env.send_from_pod(&v4.packet(&tcp(3333, 444, tcp_flags::SYN)));
    env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
}

#[test]
fn ipv6_hop_by_hop_and_destination_options_are_followed() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 61);
    let mut payload = ext_opts(60); // hop-by-hop, next: destination options
    payload.extend(ext_opts(PROTO_TCP)); // destination options, next: TCP
    payload.extend(tcp(4444, 80, tcp_flags::SYN));
    let verdict = env.send_from_pod(&ipv6(POD_V6, PEER_V6, 0, &payload));
    assert_eq!(verdict, TC_ACT_OK);
    let ev = env.one_event();
    assert_eq!((ev.family, ev.protocol), (6, PROTO_TCP));
    assert_eq!(
        (ev.sport_be, ev.dport_be, ev.rule_id),
        (port_be(4444), port_be(80), 61)
    );
    assert_eq!(ev.saddr, POD_V6.octets());
}

#[test]
fn ipv6_routing_header_and_too_many_extension_headers_are_dropped() {
    let mut env = Env::new();
    env.add_pod(0);
    // Routing header (type 4, segments left 0) before TCP.
    let mut payload = vec![PROTO_TCP, 0, 4, 0, 0, 0, 0, 0];
    payload.extend(tcp(1, 80, tcp_flags::SYN));
    let verdict = env.send_from_pod(&ipv6(POD_V6, PEER_V6, 43, &payload));
    env.assert_dropped(verdict, drop_reason::IPV6_ROUTING_HEADER);

    // Nine destination-options headers: one more than the parser follows.
    let mut payload = Vec::new();
    for _ in 0..8 {
        payload.extend(ext_opts(60));
    }
    payload.extend(ext_opts(PROTO_TCP));
    payload.extend(tcp(1, 80, tcp_flags::SYN));
    let verdict = env.send_from_pod(&ipv6(POD_V6, PEER_V6, 60, &payload));
    env.assert_dropped(verdict, drop_reason::IPV6_EXT_TOO_DEEP);

    // Eight are fine.
    let mut payload = Vec::new();
    for _ in 0..7 {
        payload.extend(ext_opts(60));
    }
    payload.extend(ext_opts(PROTO_TCP));
    payload.extend(tcp(1, 80, tcp_flags::SYN));
    assert_eq!(
        env.send_from_pod(&ipv6(POD_V6, PEER_V6, 60, &payload)),
        TC_ACT_OK
    );
}

#[test]
fn ipv4_non_first_fragment_needs_its_head() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_UDP, 53, 71);

    // A tail whose head was never seen.
    let mut tail = V4::new(POD_V4, PEER_V4, PROTO_UDP);
    tail.id = 0x4444;
    tail.frag_offset = 2;
    let verdict = env.send_from_pod(&tail.packet(&[0u8; 16]));
    env.assert_dropped(verdict, drop_reason::FRAGMENT_NO_HEAD);

    // Head (offset 0, MF) then tail of another datagram.
    let mut head = V4::new(POD_V4, PEER_V4, PROTO_UDP);
    head.id = 0x5555;
    head.more_fragments = true;
    assert_eq!(
        env.send_from_pod(&head.packet(&udp(1053, 53, 8))),
        TC_ACT_OK,
        "head"
    );
    let ev = env.one_event();
    assert_eq!((ev.dport_be, ev.rule_id), (port_be(53), 71));
    assert_eq!(env.dp.maps().fragments().expect("fragments").len(), 1);

    let mut tail = V4::new(POD_V4, PEER_V4, PROTO_UDP);
    tail.id = 0x5555;
    tail.frag_offset = 2;
    assert_eq!(
        env.send_from_pod(&tail.packet(&[0u8; 16])),
        TC_ACT_OK,
        "tail after head"
    );
    assert!(
        env.take_events().is_empty(),
        "the tail belongs to the head's flow"
    );
    assert_eq!(env.drops(drop_reason::FRAGMENT_NO_HEAD), 1);
}

#[test]
fn ipv6_non_first_fragment_needs_its_head() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_UDP, 53, 72);
    let frag = |offset_units: u16, more: bool, id: u32| {
        let mut h = vec![PROTO_UDP, 0];
        h.extend_from_slice(&((offset_units << 3) | u16::from(more)).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h
    };

    let mut tail = frag(2, false, 0xdead_0001);
    tail.extend_from_slice(&[0u8; 16]);
    let verdict = env.send_from_pod(&ipv6(POD_V6, PEER_V6, 44, &tail));
    env.assert_dropped(verdict, drop_reason::FRAGMENT_NO_HEAD);

    let mut head = frag(0, true, 0xdead_0002);
    head.extend(udp(1053, 53, 8));
    assert_eq!(
        env.send_from_pod(&ipv6(POD_V6, PEER_V6, 44, &head)),
        TC_ACT_OK,
        "head"
    );
    assert_eq!(env.one_event().dport_be, port_be(53));
    let mut tail = frag(2, false, 0xdead_0002);
    tail.extend_from_slice(&[0u8; 16]);
    assert_eq!(
        env.send_from_pod(&ipv6(POD_V6, PEER_V6, 44, &tail)),
        TC_ACT_OK,
        "tail"
    );
}

#[test]
fn policy_generation_bump_revokes_and_restores_an_established_flow() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED | EP_INGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 81);
    let syn = syn_v4(POD_V4, PEER_V4, 40000, 80);
    let ack = V4::new(POD_V4, PEER_V4, PROTO_TCP).packet(&tcp(40000, 80, tcp_flags::ACK));
    let reply = V4::new(PEER_V4, POD_V4, PROTO_TCP).packet(&tcp(80, 40000, tcp_flags::ACK));
    assert_eq!(env.send_from_pod(&syn), TC_ACT_OK);
    assert_eq!(env.send_to_pod(&reply), TC_ACT_OK);
    env.take_events();

    // Remove the allow: without a generation bump the established flow keeps its verdict.
    let key = Env::policy_key(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 16);
    env.dp.maps_mut().delete_policy(key).expect("delete");
    assert_eq!(
        env.send_from_pod(&ack),
        TC_ACT_OK,
        "no bump yet: stored verdict"
    );

    env.dp.maps_mut().set_generation(1).expect("bump");
    let verdict = env.send_from_pod(&ack);
    let ev = env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    assert_eq!(ev.rule_id, EGRESS_DEFAULT_RULE);
    assert_eq!(env.counters()[COUNTER_POLICY_REEVALUATED as usize], 1);
    // The reply direction now drops too, re-evaluated as the egress flow it belongs to.
    let verdict = env.send_to_pod(&reply);
    let ev = env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    assert_eq!((ev.is_reply, ev.direction), (1, DIR_EGRESS));

    // Allow again and bump: the denied flow becomes allowed, with an event for the change.
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 82);
    env.dp.maps_mut().set_generation(2).expect("bump");
    assert_eq!(env.send_to_pod(&reply), TC_ACT_OK, "reply after re-allow");
    let ev = env.one_event();
    assert_eq!(
        (ev.verdict, ev.rule_id, ev.is_reply),
        (VERDICT_FORWARDED, 82, 1)
    );
    assert_eq!(env.send_from_pod(&ack), TC_ACT_OK);
    assert!(env.take_events().is_empty(), "unchanged verdict, no event");
    assert_eq!(env.counters()[COUNTER_POLICY_REEVALUATED as usize], 2);
}

#[test]
fn unknown_interface_is_dropped() {
    let mut env = Env::new();
    env.add_pod(0);
    let verdict = env.run_on(
        program_names::FROM_WORKLOAD,
        env.stranger_if,
        &syn_v4(POD_V4, PEER_V4, 1, 80),
    );
    let ev = env.assert_dropped(verdict, drop_reason::UNKNOWN_ENDPOINT);
    assert_eq!(ev.ifindex, env.stranger_if);
    assert_eq!(env.drops(drop_reason::UNKNOWN_ENDPOINT), 1);
}

#[test]
fn arp_passes_and_other_ethertypes_are_dropped() {
    let mut env = Env::new();
    // ARP passes even where no endpoint is known.
    let arp = ether(0x0806, &[0u8; 28]);
    assert_eq!(
        env.run_on(program_names::TO_WORKLOAD, env.stranger_if, &arp),
        TC_ACT_OK
    );
    assert!(env.take_events().is_empty());

    let lldp = ether(0x88cc, &[0u8; 32]);
    let verdict = env.run_on(program_names::FROM_WORKLOAD, env.pod_if, &lldp);
    env.assert_dropped(verdict, drop_reason::UNSUPPORTED_L3);
    assert_eq!(env.drops(drop_reason::UNSUPPORTED_L3), 1);
}

#[test]
fn icmp_echo_reply_matches_the_request_by_echo_id() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED | EP_INGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_ICMP, 0, 91);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_ICMPV6, 0, 92);

    let request = V4::new(POD_V4, PEER_V4, PROTO_ICMP).packet(&icmp_echo(8, 0x77));
    assert_eq!(env.send_from_pod(&request), TC_ACT_OK);
    let ev = env.one_event();
    assert_eq!(
        (ev.sport_be, ev.dport_be, ev.rule_id),
        (port_be(0x77), port_be(0x77), 91)
    );
    let reply = V4::new(PEER_V4, POD_V4, PROTO_ICMP).packet(&icmp_echo(0, 0x77));
    assert_eq!(env.send_to_pod(&reply), TC_ACT_OK, "echo reply is a reply");
    let other = V4::new(PEER_V4, POD_V4, PROTO_ICMP).packet(&icmp_echo(0, 0x78));
    let verdict = env.send_to_pod(&other);
    env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);

    let request6 = ipv6(POD_V6, PEER_V6, PROTO_ICMPV6, &icmp_echo(128, 0x99));
    assert_eq!(env.send_from_pod(&request6), TC_ACT_OK);
    assert_eq!(env.one_event().rule_id, 92);
    let reply6 = ipv6(PEER_V6, POD_V6, PROTO_ICMPV6, &icmp_echo(129, 0x99));
    assert_eq!(
        env.send_to_pod(&reply6),
        TC_ACT_OK,
        "ICMPv6 echo reply is a reply"
    );
}

#[test]
fn events_are_not_lost_at_a_low_rate() {
    let mut env = Env::new();
    env.add_pod(0);
    let flows: u16 = 2000;
    for i in 0..flows {
        assert_eq!(
            env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 10_000 + i, 80)),
            TC_ACT_OK
        );
    }
    let events = env.take_events();
    assert_eq!(events.len(), usize::from(flows), "one event per new flow");
    let c = env.counters();
    assert_eq!(c[COUNTER_EVENTS_LOST as usize], 0, "no event lost");
    assert_eq!(c[COUNTER_NEW_FLOWS as usize], u64::from(flows));
}

#[test]
fn map_writer_reads_back_what_it_wrote() {
    let mut env = Env::new();
    env.add_pod(EP_INGRESS_ENFORCED);
    env.put_rule(
        Env::policy_key(PEER_IDENTITY, DIR_INGRESS, PROTO_TCP, 8080, 13),
        POLICY_ALLOW,
        5,
    );
    let maps = env.dp.maps_mut();
    maps.put_policy_cidr("10.0.0.0/8".parse().expect("net"), 9)
        .expect("cidr");
    maps.put_policy_cidr("2001:db8::/32".parse().expect("net"), 10)
        .expect("cidr");
    let endpoints = maps.read_endpoints().expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let ipcache = maps.read_ipcache().expect("ipcache");
    assert_eq!(
        ipcache
            .get(&"10.200.1.1/32".parse().expect("net"))
            .map(|v| v.identity),
        Some(PEER_IDENTITY)
    );
    assert_eq!(ipcache.len(), 3);
    let cidrs = maps.read_policy_cidrs().expect("cidrs");
    assert_eq!(cidrs.get(&"10.0.0.0/8".parse().expect("net")), Some(&9));
    assert_eq!(cidrs.get(&"2001:db8::/32".parse().expect("net")), Some(&10));
    let policy = maps.read_policy().expect("policy");
    let key = Env::policy_key(PEER_IDENTITY, DIR_INGRESS, PROTO_TCP, 8080, 13);
    assert_eq!(policy.get(&key).map(|v| v.rule_id), Some(5));
    assert_eq!(maps.read_generation().expect("gen"), 0);
    maps.set_generation(3).expect("gen");
    maps.set_config_flags(1).expect("flags");
    assert_eq!(maps.read_generation().expect("gen"), 3);
    assert_eq!(maps.config().expect("config").flags, 1);
    maps.delete_policy_cidr("10.0.0.0/8".parse().expect("net"))
        .expect("delete");
    assert_eq!(maps.read_policy_cidrs().expect("cidrs").len(), 1);
    let _ = POLICY_KEY_PREFIX_FULL;
}

// ---------------------------------------------------------------------------------------------
// Pinned state and attachment

static PIN_DIRS: AtomicU32 = AtomicU32::new(0);

/// A unique bpffs directory, removed (with everything pinned in it) on drop.
struct BpffsDir(PathBuf);

impl BpffsDir {
    fn new() -> Self {
        let is_bpffs = {
            let c = CString::new("/sys/fs/bpf").expect("path");
            // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
            #[expect(clippy::useless_conversion, reason = "f_type differs by target")]
            let magic = i64::from(st.f_type);
            rc == 0 && magic == 0xcafe_4a11
        };
        assert!(
            is_bpffs,
            "this test needs bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)"
        );
        let n = PIN_DIRS.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/nodeward-test-{}-{n}",
            std::process::id()
        )))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = Datapath::remove_all(&self.0);
    }
}

fn tcx_programs(ifname: &str, attach_type: TcAttachType) -> Vec<u32> {
    let (_, programs) = SchedClassifier::query_tcx(ifname, attach_type).expect("query tcx");
    programs
        .iter()
        .map(aya::programs::ProgramInfo::id)
        .collect()
}

/// Polls until exactly `count` programs are attached: a link whose last pin is removed is
/// released by the kernel after an RCU grace period, not synchronously.
fn wait_for_programs(ifname: &str, attach_type: TcAttachType, count: usize) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let ids = tcx_programs(ifname, attach_type);
        if ids.len() == count {
            return ids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {count} programs at {attach_type:?} of {ifname}, found {ids:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn pinned_state_survives_restart_and_reattach_is_make_before_break() {
    require_root();
    let dir = BpffsDir::new();
    let _ns = NetNsGuard::new();
    ip(&[
        "link", "add", "nwt-a", "type", "veth", "peer", "name", "nwt-b",
    ]);
    let a = ifindex("nwt-a");

    let first_ids = {
        let mut dp = Datapath::open(Some(dir.path())).expect("open pinned");
        dp.maps_mut()
            .put_endpoint(a, &EndpointInfo::default())
            .expect("endpoint");
        dp.maps_mut().set_generation(41).expect("generation");
        dp.attach(a, "nwt-a").expect("attach");
        assert_eq!(dp.attached().expect("attached"), vec!["nwt-a".to_owned()]);
        for suffix in ["ingress", "egress"] {
            let pin = dir.path().join(format!("links/nwt-a-{suffix}"));
            assert!(pin.exists(), "{} must be pinned", pin.display());
        }
        let ids = (
            tcx_programs("nwt-a", TcAttachType::Ingress),
            tcx_programs("nwt-a", TcAttachType::Egress),
        );
        assert_eq!(
            (ids.0.len(), ids.1.len()),
            (1, 1),
            "one program per hook: {ids:?}"
        );
        ids
    };
    // The agent is gone; the pinned links keep the programs attached.
    assert_eq!(tcx_programs("nwt-a", TcAttachType::Ingress), first_ids.0);

    let mut dp = Datapath::open(Some(dir.path())).expect("reopen pinned");
    assert!(
        dp.maps()
            .read_endpoints()
            .expect("endpoints")
            .contains_key(&a),
        "the endpoint written before the restart is adopted"
    );
    assert_eq!(dp.maps().read_generation().expect("generation"), 41);
    let from_pins = nodeward::datapath::maps::PinnedMaps::from_pins(&dir.path().join("maps"))
        .expect("opening the pinned maps without loading");
    assert_eq!(from_pins.read_generation().expect("generation"), 41);
    drop(from_pins);
    dp.attach(a, "nwt-a").expect("re-attach");
    // The new program is attached when `attach` returns; the old one goes once the kernel has
    // released its unpinned link (asynchronously).
    let ingress = wait_for_programs("nwt-a", TcAttachType::Ingress, 1);
    let egress = wait_for_programs("nwt-a", TcAttachType::Egress, 1);
    assert_ne!(ingress, first_ids.0, "the new program replaced the old");
    assert_ne!(egress, first_ids.1, "the new program replaced the old");
    assert_eq!(dp.attached().expect("attached"), vec!["nwt-a".to_owned()]);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("links"))
        .expect("links dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temporary pins left: {leftovers:?}");

    dp.detach("nwt-a").expect("detach");
    wait_for_programs("nwt-a", TcAttachType::Ingress, 0);
    wait_for_programs("nwt-a", TcAttachType::Egress, 0);
    assert!(dp.attached().expect("attached").is_empty());
    drop(dp);

    Datapath::remove_all(dir.path()).expect("remove all");
    assert!(!dir.path().exists(), "remove_all removes the directory");
}

#[test]
fn unpinned_attach_lives_with_the_datapath() {
    let mut env = Env::new();
    env.dp.attach(env.pod_if, "nwt-host").expect("attach");
    assert_eq!(tcx_programs("nwt-host", TcAttachType::Ingress).len(), 1);
    assert_eq!(
        env.dp.attached().expect("attached"),
        vec!["nwt-host".to_owned()]
    );
    let err = env.dp.attach(env.pod_if + 100, "nwt-host");
    assert!(err.is_err(), "a mismatched ifindex is refused");
    env.dp.detach("nwt-host").expect("detach");
    wait_for_programs("nwt-host", TcAttachType::Ingress, 0);
    wait_for_programs("nwt-host", TcAttachType::Egress, 0);
}

// ---------------------------------------------------------------------------------------------
// The mTLS tunnel's interception

/// The `CT_F_*` flags of the conntrack entries of flows from source port `sport`.
fn ct_flags(env: &Env, sport: u16) -> Vec<u8> {
    env.dp
        .maps()
        .conntrack()
        .expect("conntrack")
        .iter()
        .filter(|(k, _)| k.sport_be == port_be(sport))
        .map(|(_, v)| v.flags)
        .collect()
}

#[test]
fn meshed_tcp_to_a_meshed_peer_is_marked_for_the_tunnel_and_the_rest_is_not() {
    let mut env = Env::new();
    env.add_pod(EP_MESHED);
    env.put_ipcache(&format!("{PEER_V4}/32"), PEER_IDENTITY, IPCACHE_MESHED);
    env.put_ipcache(&format!("{PEER_V6}/128"), PEER_IDENTITY, IPCACHE_MESHED);
    let other_mark = 0x0000_0042;

    let (verdict, mark) = env.run_marked(
        program_names::FROM_WORKLOAD,
        env.pod_if,
        &syn_v4(POD_V4, PEER_V4, 40000, 8080),
        other_mark,
    );
    assert_eq!(verdict, TC_ACT_OK, "a meshed SYN passes (to the agent)");
    assert_eq!(
        mark,
        other_mark | mesh::MARK_TO_PROXY,
        "the SYN must carry the to-proxy mark, keeping the bits nodeward does not own"
    );
    assert_eq!(ct_flags(&env, 40000), vec![CT_F_REDIRECT]);
    assert_eq!(env.counters()[COUNTER_REDIRECTED as usize], 1);
    // The rest of the connection follows the SYN.
    let ack = V4::new(POD_V4, PEER_V4, PROTO_TCP).packet(&tcp(40000, 8080, tcp_flags::ACK));
    let (verdict, mark) = env.run_marked(program_names::FROM_WORKLOAD, env.pod_if, &ack, 0);
    assert_eq!((verdict, mark), (TC_ACT_OK, mesh::MARK_TO_PROXY));
    // IPv6 the same.
    let syn6 = ipv6(
        POD_V6,
        PEER_V6,
        PROTO_TCP,
        &tcp(40001, 8080, tcp_flags::SYN),
    );
    let (verdict, mark) = env.run_marked(program_names::FROM_WORKLOAD, env.pod_if, &syn6, 0);
    assert_eq!((verdict, mark), (TC_ACT_OK, mesh::MARK_TO_PROXY));

    // UDP is not tunnelled; neither is TCP to a peer outside the mesh.
    let dgram = V4::new(POD_V4, PEER_V4, PROTO_UDP).packet(&udp(40002, 5353, 8));
    let (verdict, mark) = env.run_marked(program_names::FROM_WORKLOAD, env.pod_if, &dgram, 0);
    assert_eq!((verdict, mark), (TC_ACT_OK, 0), "UDP stays plaintext");
    env.put_ipcache("10.200.1.2/32", PEER_IDENTITY, 0);
    let (verdict, mark) = env.run_marked(
        program_names::FROM_WORKLOAD,
        env.pod_if,
        &syn_v4(POD_V4, Ipv4Addr::new(10, 200, 1, 2), 40003, 9090),
        0,
    );
    assert_eq!(
        (verdict, mark),
        (TC_ACT_OK, 0),
        "an unmeshed peer gets plaintext"
    );
    assert_eq!(ct_flags(&env, 40003), vec![0]);
}

#[test]
fn egress_policy_still_decides_before_the_tunnel() {
    let mut env = Env::new();
    env.add_pod(EP_MESHED | EP_EGRESS_ENFORCED);
    env.put_ipcache(&format!("{PEER_V4}/32"), PEER_IDENTITY, IPCACHE_MESHED);
    let (verdict, mark) = env.run_marked(
        program_names::FROM_WORKLOAD,
        env.pod_if,
        &syn_v4(POD_V4, PEER_V4, 40000, 8080),
        0,
    );
    assert_eq!(mark, 0, "a denied flow is not steered anywhere");
    env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    assert_eq!(env.counters()[COUNTER_REDIRECTED as usize], 0);
}

#[test]
fn strict_drops_plaintext_tcp_but_not_the_tunnel_the_node_or_udp() {
    let mut env = Env::new();
    env.add_pod(EP_MESHED | EP_MTLS_STRICT);
    let host = Ipv4Addr::new(10, 200, 9, 9);
    env.put_ipcache(&format!("{host}/32"), IDENTITY_HOST, 0);

    // Plaintext from a pod.
    let verdict = env.send_to_pod(&syn_v4(PEER_V4, POD_V4, 40000, 8080));
    let ev = env.assert_dropped(verdict, drop_reason::AUTH_REQUIRED);
    assert_eq!(ev.direction, DIR_INGRESS);
    assert_eq!(ev.src_identity, PEER_IDENTITY);

    // The same SYN sent by the agent (a tunnel delivery, authorized by the agent).
    let (verdict, mark) = env.run_marked(
        program_names::TO_WORKLOAD,
        env.pod_if,
        &syn_v4(PEER_V4, POD_V4, 40001, 8080),
        mesh::MARK_FROM_AGENT,
    );
    assert_eq!(verdict, TC_ACT_OK, "the agent's delivery must pass");
    assert_eq!(mark, mesh::MARK_FROM_AGENT, "the delivery keeps its mark");
    assert!(
        env.take_events().is_empty(),
        "the agent reports its own deliveries; the kernel must not duplicate them"
    );
    assert_eq!(ct_flags(&env, 40001), vec![CT_F_TUNNELED]);
    // The pod's replies go back to the agent's socket, not towards the source's node.
    let syn_ack = V4::new(POD_V4, PEER_V4, PROTO_TCP).packet(&tcp(
        8080,
        40001,
        tcp_flags::SYN | tcp_flags::ACK,
    ));
    let (verdict, mark) = env.run_marked(program_names::FROM_WORKLOAD, env.pod_if, &syn_ack, 0);
    assert_eq!((verdict, mark), (TC_ACT_OK, mesh::MARK_TO_PROXY));

    // The node itself (kubelet probes) and UDP are not held to STRICT.
    assert_eq!(
        env.send_to_pod(&syn_v4(host, POD_V4, 40002, 8080)),
        TC_ACT_OK,
        "the node's own probe must pass"
    );
    let dgram = V4::new(PEER_V4, POD_V4, PROTO_UDP).packet(&udp(40003, 5353, 8));
    assert_eq!(env.send_to_pod(&dgram), TC_ACT_OK, "UDP is not tunnelled");
}

#[test]
fn a_pod_cannot_claim_the_agents_mark() {
    let mut env = Env::new();
    env.add_pod(EP_MESHED | EP_MTLS_STRICT);
    // A packet *from* the pod carrying the agent's mark gains nothing: the mark only counts
    // on what goes to a pod (the kernel clears marks crossing namespaces anyway).
    let (verdict, mark) = env.run_marked(
        program_names::FROM_WORKLOAD,
        env.pod_if,
        &syn_v4(POD_V4, PEER_V4, 40000, 8080),
        mesh::MARK_FROM_AGENT,
    );
    assert_eq!((verdict, mark), (TC_ACT_OK, mesh::MARK_FROM_AGENT));
    assert_eq!(ct_flags(&env, 40000), vec![0], "an ordinary egress flow");
}

// ---------------------------------------------------------------------------------------------
// Map sizes

fn pinned_max_entries(dir: &Path, map: &str) -> u32 {
    aya::maps::MapInfo::from_pin(dir.join("maps").join(map))
        .unwrap_or_else(|e| panic!("reading the pinned {map}: {e}"))
        .max_entries()
}

fn sizes(entries: u32) -> nodeward::datapath::sizes::MapSizes {
    nodeward::datapath::sizes::MapSizes {
        endpoints: entries,
        policy: entries,
        ipcache: entries,
        policy_cidrs: entries,
        conntrack: entries,
    }
}

#[test]
fn a_restart_with_other_map_sizes_moves_the_pinned_entries() {
    use aya::maps::{HashMap, Map};
    use nodeward::datapath::sync::Syncer;

    require_root();
    let dir = BpffsDir::new();
    let _ns = NetNsGuard::new();
    ip(&[
        "link", "add", "nwt-a", "type", "veth", "peer", "name", "nwt-b",
    ]);
    let a = ifindex("nwt-a");
    let prefixes: std::collections::BTreeMap<ipnet::IpNet, IpcacheValue> = (1..=40u8)
        .map(|i| {
            let net: ipnet::IpNet = format!("10.9.0.{i}/32").parse().expect("prefix");
            (
                net,
                IpcacheValue {
                    identity: 2000 + u32::from(i),
                    flags: 0,
                },
            )
        })
        .collect();
    let flow = (
        agent_common::CtKey {
            saddr: addr_bytes(IpAddr::V4(POD_V4)),
            daddr: addr_bytes(IpAddr::V4(PEER_V4)),
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            protocol: 6,
            direction: DIR_EGRESS,
            _pad: [0; 2],
        },
        agent_common::CtValue {
            generation: 41,
            verdict: VERDICT_FORWARDED,
            ..agent_common::CtValue::default()
        },
    );
    let conntrack = |dir: &Path| -> HashMap<MapData, agent_common::CtKey, agent_common::CtValue> {
        let data = MapData::from_pin(dir.join("maps/NW_CONNTRACK")).expect("conntrack pin");
        HashMap::try_from(Map::from_map_data(data).expect("map")).expect("hash")
    };

    // A first agent with small maps: the kernel's maps have the sizes asked for.
    let first_ids = {
        let mut dp = Datapath::open_sized(Some(dir.path()), &sizes(64)).expect("open small");
        for map in ["NW_IPCACHE", "NW_POLICY", "NW_ENDPOINTS", "NW_CONNTRACK"] {
            assert_eq!(pinned_max_entries(dir.path(), map), 64, "{map}");
        }
        dp.maps_mut()
            .put_endpoint(
                a,
                &EndpointInfo {
                    identity: POD_IDENTITY,
                    ..EndpointInfo::default()
                },
            )
            .expect("endpoint");
        for (net, value) in &prefixes {
            dp.maps_mut().put_ipcache(*net, *value).expect("ipcache");
        }
        dp.maps_mut().set_generation(41).expect("generation");
        conntrack(dir.path())
            .insert(flow.0, flow.1, 0)
            .expect("conntrack");
        dp.attach(a, "nwt-a").expect("attach");
        let syncer = Syncer::adopt(
            nodeward::datapath::maps::PinnedMaps::from_pins(&dir.path().join("maps"))
                .expect("pins"),
        )
        .expect("adopt");
        assert_eq!(
            syncer.fill()[2],
            ("ipcache", 40, 64),
            "fill against the kernel's size"
        );
        tcx_programs("nwt-a", TcAttachType::Ingress)
    };

    // Asking for fewer entries than a map holds is refused before anything changes.
    let err = Datapath::open_sized(Some(dir.path()), &sizes(32)).expect_err("too small");
    let text = nodeward::error_chain(&err);
    assert!(
        text.contains("NW_IPCACHE") && text.contains("holds 40 entries"),
        "the refusal names the map and what it holds: {text}"
    );
    assert_eq!(
        pinned_max_entries(dir.path(), "NW_IPCACHE"),
        64,
        "left as it was"
    );
    assert_eq!(
        tcx_programs("nwt-a", TcAttachType::Ingress),
        first_ids,
        "the first agent's programs still enforce"
    );

    // A restart with larger maps: the same entries in maps of the new size.
    let mut dp = Datapath::open_sized(Some(dir.path()), &sizes(4096)).expect("open larger");
    for map in ["NW_IPCACHE", "NW_POLICY", "NW_ENDPOINTS", "NW_CONNTRACK"] {
        assert_eq!(pinned_max_entries(dir.path(), map), 4096, "{map} resized");
    }
    let from_pins = nodeward::datapath::maps::PinnedMaps::from_pins(&dir.path().join("maps"))
        .expect("opening the resized pins");
    assert_eq!(from_pins.read_ipcache().expect("ipcache"), prefixes);
    assert_eq!(from_pins.read_generation().expect("generation"), 41);
    assert_eq!(
        from_pins.read_endpoints().expect("endpoints")[&a].identity,
        POD_IDENTITY
    );
    assert_eq!(from_pins.capacities(), sizes(4096));
    assert_eq!(
        conntrack(dir.path()).get(&flow.0, 0).expect("flow moved"),
        flow.1
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("maps"))
        .expect("maps dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(':'))
        .collect();
    assert!(leftovers.is_empty(), "temporary pins left: {leftovers:?}");
    // Until the new programs attach, the old ones keep enforcing (on the old maps).
    assert_eq!(tcx_programs("nwt-a", TcAttachType::Ingress), first_ids);
    assert!(dp.migrating(), "conntrack waits for its catch-up");
    dp.attach(a, "nwt-a").expect("re-attach");
    dp.finish_migrations().expect("catch-up");
    assert!(!dp.migrating());
    let now = wait_for_programs("nwt-a", TcAttachType::Ingress, 1);
    assert_ne!(now, first_ids, "the new program replaced the old");
    drop(from_pins);
    dp.detach("nwt-a").expect("detach");
    drop(dp);
    Datapath::remove_all(dir.path()).expect("remove all");
}

// ---------------------------------------------------------------------------------------------
// Conntrack state, expiry and a full table

/// The monotonic clock in whole seconds, as the datapath's `bpf_ktime_get_ns() / 1e9`.
fn monotonic_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-parameter.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    u32::try_from(ts.tv_sec).expect("uptime in u32 seconds")
}

/// The one conntrack entry of the flow from local port `sport`, as stored.
fn ct_entry(env: &Env, sport: u16) -> (agent_common::CtKey, agent_common::CtValue) {
    let found: Vec<_> = env
        .dp
        .maps()
        .conntrack_raw()
        .expect("conntrack")
        .into_iter()
        .filter(|(k, _)| k.sport_be == port_be(sport) || k.dport_be == port_be(sport))
        .collect();
    assert_eq!(found.len(), 1, "one entry for port {sport}: {found:?}");
    found[0]
}

#[test]
fn conntrack_follows_tcp_state_and_an_expired_entry_is_a_new_flow() {
    let mut env = Env::new();
    env.add_pod(EP_EGRESS_ENFORCED | EP_INGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 11);
    assert_eq!(
        env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 40000, 80)),
        TC_ACT_OK
    );
    env.take_events();
    let lifetime = |env: &Env| {
        let (key, value) = ct_entry(env, 40000);
        conntrack::lifetime_s(key.protocol, &value)
    };
    assert_eq!(
        ct_entry(&env, 40000).1.flags & (CT_F_SEEN_REPLY | CT_F_CLOSING),
        0,
        "a SYN alone: neither answered nor closing"
    );
    assert_eq!(lifetime(&env), conntrack::TCP_OPENING_S);

    let to_pod = |flags| V4::new(PEER_V4, POD_V4, PROTO_TCP).packet(&tcp(80, 40000, flags));
    let from_pod = |flags| V4::new(POD_V4, PEER_V4, PROTO_TCP).packet(&tcp(40000, 80, flags));
    assert_eq!(
        env.send_to_pod(&to_pod(tcp_flags::SYN | tcp_flags::ACK)),
        TC_ACT_OK,
        "the reply passes"
    );
    assert_ne!(
        ct_entry(&env, 40000).1.flags & CT_F_SEEN_REPLY,
        0,
        "answered"
    );
    assert_eq!(lifetime(&env), conntrack::TCP_ESTABLISHED_S);
    // The client's own later packets do not make it unanswered again.
    assert_eq!(env.send_from_pod(&from_pod(tcp_flags::ACK)), TC_ACT_OK);
    assert_eq!(lifetime(&env), conntrack::TCP_ESTABLISHED_S);

    assert_eq!(
        env.send_from_pod(&from_pod(tcp_flags::FIN | tcp_flags::ACK)),
        TC_ACT_OK
    );
    assert_ne!(ct_entry(&env, 40000).1.flags & CT_F_CLOSING, 0, "closing");
    assert_eq!(lifetime(&env), conntrack::TCP_CLOSING_S);
    // Within its lifetime, the peer's FIN is still a reply of the flow.
    assert_eq!(
        env.send_to_pod(&to_pod(tcp_flags::FIN | tcp_flags::ACK)),
        TC_ACT_OK
    );
    assert!(env.take_events().is_empty(), "no new flow while it lives");

    // Past its lifetime the entry is no entry: the peer's late ACK is a new inbound flow,
    // which the ingress default deny drops.
    let (key, mut value) = ct_entry(&env, 40000);
    value.last_seen_s = monotonic_s().saturating_sub(conntrack::TCP_CLOSING_S + 2);
    env.dp
        .maps_mut()
        .put_conntrack_raw(&key, &value)
        .expect("ageing the entry");
    let verdict = env.send_to_pod(&to_pod(tcp_flags::ACK));
    env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    assert_eq!(
        env.dp.maps().conntrack().expect("ct").len(),
        1,
        "the expired entry was overwritten in place"
    );
}

#[test]
fn a_full_conntrack_refuses_new_flows_with_a_counted_reason_and_recovers_as_entries_expire() {
    const SIZE: u16 = 8;
    let mut env = Env::new_sized(&sizes_with_conntrack(u32::from(SIZE)));
    env.add_pod(EP_EGRESS_ENFORCED | EP_INGRESS_ENFORCED);
    env.allow(PEER_IDENTITY, DIR_EGRESS, PROTO_TCP, 80, 11);
    for sport in 41000..41000 + SIZE {
        assert_eq!(
            env.send_from_pod(&syn_v4(POD_V4, PEER_V4, sport, 80)),
            TC_ACT_OK,
            "flow {sport} fits"
        );
    }
    env.take_events();
    assert_eq!(
        env.dp.maps().conntrack().expect("ct").len(),
        usize::from(SIZE)
    );

    // Full: a new allowed flow fails closed, counted and reported with its identities.
    let verdict = env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 42000, 80));
    let ev = env.assert_dropped(verdict, drop_reason::CT_FULL);
    assert_eq!(
        (ev.src_identity, ev.dst_identity),
        (POD_IDENTITY, PEER_IDENTITY)
    );
    assert_eq!(env.drops(drop_reason::CT_FULL), 1, "the drop is counted");
    assert_eq!(
        drop_reason::describe(drop_reason::CT_FULL),
        "CT_MAP_INSERTION_FAILED"
    );
    // A denied flow is dropped for its own reason.
    let verdict = env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 42001, 81));
    env.assert_dropped(verdict, drop_reason::POLICY_DEFAULT_DENY);
    // The flows in the table go on: the peer's replies (ingress is enforced) and the pod's
    // packets.
    let to_pod = |sport, flags| V4::new(PEER_V4, POD_V4, PROTO_TCP).packet(&tcp(80, sport, flags));
    let from_pod =
        |sport, flags| V4::new(POD_V4, PEER_V4, PROTO_TCP).packet(&tcp(sport, 80, flags));
    assert_eq!(
        env.send_to_pod(&to_pod(41000, tcp_flags::SYN | tcp_flags::ACK)),
        TC_ACT_OK,
        "an established flow's reply passes in a full table"
    );
    assert_eq!(
        env.send_from_pod(&from_pod(41000, tcp_flags::ACK)),
        TC_ACT_OK
    );
    // Three flows close.
    for sport in 41001..41004 {
        assert_eq!(
            env.send_from_pod(&from_pod(sport, tcp_flags::RST)),
            TC_ACT_OK
        );
    }
    assert!(env.take_events().is_empty(), "no new flow was created");

    // The garbage collector: nothing has expired yet.
    let now = monotonic_s();
    let stats = env.dp.maps_mut().sweep_conntrack(now).expect("sweep");
    assert_eq!((stats.scanned, stats.removed), (usize::from(SIZE), 0));
    // Past the closing lifetime, the three closed flows go ...
    let stats = env
        .dp
        .maps_mut()
        .sweep_conntrack(now + conntrack::TCP_CLOSING_S + 1)
        .expect("sweep");
    assert_eq!((stats.scanned, stats.removed), (usize::from(SIZE), 3));
    // ... and the refused flow gets in.
    assert_eq!(
        env.send_from_pod(&syn_v4(POD_V4, PEER_V4, 42000, 80)),
        TC_ACT_OK,
        "a new flow passes once the table has room"
    );
    let ev = env.one_event();
    assert_eq!((ev.verdict, ev.rule_id), (VERDICT_FORWARDED, 11));
    // Past the handshake's lifetime only the answered flow is left.
    let stats = env
        .dp
        .maps_mut()
        .sweep_conntrack(now + conntrack::TCP_OPENING_S + 1)
        .expect("sweep");
    assert_eq!((stats.scanned, stats.removed), (6, 5));
    let left = env.dp.maps().conntrack().expect("ct");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0.sport_be, port_be(41000));
    assert_eq!(env.drops(drop_reason::CT_FULL), 1);
}

fn sizes_with_conntrack(entries: u32) -> nodeward::datapath::sizes::MapSizes {
    nodeward::datapath::sizes::MapSizes {
        conntrack: entries,
        ..nodeward::datapath::sizes::MapSizes::COMPILED
    }
}

/// The garbage collector's cost on a full table of the compiled size (262,144 entries): one
/// sweep that keeps everything and one that removes everything. The durations are printed
/// (`--nocapture`) for DEVELOPERS.md; the test checks that the sweep saw and removed every entry.
#[test]
fn the_garbage_collector_sweeps_a_full_size_table() {
    let mut env = Env::new();
    let now = monotonic_s();
    let entries = agent_common::MAX_CONNTRACK;
    let filled = std::time::Instant::now();
    for i in 0..entries {
        let [a, b, c, d] = i.to_be_bytes();
        let key = agent_common::CtKey {
            saddr: addr_bytes(IpAddr::V4(Ipv4Addr::new(10, a, b, 1))),
            daddr: addr_bytes(IpAddr::V4(PEER_V4)),
            sport_be: u16::from_be_bytes([c, d]).to_be(),
            dport_be: 80u16.to_be(),
            protocol: PROTO_TCP,
            direction: DIR_EGRESS,
            _pad: [0; 2],
        };
        let value = agent_common::CtValue {
            verdict: VERDICT_FORWARDED,
            flags: CT_F_SEEN_REPLY,
            last_seen_s: now,
            ..agent_common::CtValue::default()
        };
        env.dp
            .maps_mut()
            .put_conntrack_raw(&key, &value)
            .unwrap_or_else(|e| panic!("entry {i} of {entries}: {}", error_chain(&e)));
    }
    let filled = filled.elapsed();
    let keep = env.dp.maps_mut().sweep_conntrack(now).expect("sweep");
    assert_eq!((keep.scanned, keep.removed), (entries as usize, 0));
    let all = env
        .dp
        .maps_mut()
        .sweep_conntrack(now + conntrack::TCP_ESTABLISHED_S + 1)
        .expect("sweep");
    assert_eq!(
        (all.scanned, all.removed),
        (entries as usize, entries as usize)
    );
    assert!(env.dp.maps().conntrack().expect("ct").is_empty());
    eprintln!(
        "conntrack gc, {entries} entries: fill {filled:.2?}, sweep keeping all {:.2?}, \
         sweep removing all {:.2?}",
        keep.duration, all.duration
    );
}
