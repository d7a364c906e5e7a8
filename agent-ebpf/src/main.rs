//! nodeward's TC classifiers, attached to the host-side interface of every local workload:
//! `from_workload` at TC ingress (packets leaving the pod, direction egress for the endpoint) and
//! `to_workload` at TC egress (packets going to the pod, direction ingress).
//!
//! Each packet: parse (fail closed), find the endpoint by interface, anti-spoofing for what the
//! pod sends, conntrack, and for a new flow (or a flow whose verdict predates the current policy
//! generation) the policy lookup. Every drop and every new flow becomes a `FlowEvent`.
//!
//! The mTLS tunnel (see `agent_common::mesh`): a new TCP flow from a meshed pod to a meshed pod
//! that egress policy allows is marked for local delivery, and `to_proxy` (`sk_lookup` in the
//! agent's network namespace) hands it to the agent's outbound listener. What the agent sends to
//! a pod with `MARK_FROM_AGENT` is a tunnel delivery it has already authorized: it passes without
//! kernel policy, and its replies are marked back to the agent.
#![no_std]
#![no_main]

mod dns;
mod frame;
mod hostrt;
mod local;
mod parse;
mod policy;
mod service;

use agent_common::{
    CONFIG_EVENTS_ALL_FLOWS, CONFIG_HOST_ROUTING, COUNTER_DROP_BASE, COUNTER_EVENTS_LOST,
    COUNTER_NEW_FLOWS, COUNTER_PACKETS, COUNTER_PASSED, COUNTER_POLICY_REEVALUATED,
    COUNTER_REDIRECTED, COUNTERS_LEN, CT_F_CLOSING, CT_F_REDIRECT, CT_F_SEEN_REPLY,
    CT_F_STORED_REVERSED, CT_F_TUNNELED, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, DatapathConfig,
    EP_HAS_IPV4, EP_HAS_IPV6, EP_MESHED, EP_MTLS_STRICT, EVENTS_RING_BYTES, EndpointInfo,
    FlowEvent, FragKey, FragValue, IDENTITY_HOST, IPCACHE_MESHED, IpcacheValue, MAX_CONNTRACK,
    MAX_ENDPOINTS, MAX_FRAGMENTS, MAX_IPCACHE_ENTRIES, MAX_POLICY_CIDRS, MAX_POLICY_ENTRIES,
    PolicyKey, PolicyValue, VERDICT_DROPPED, VERDICT_FORWARDED, conntrack, drop_reason, mesh,
    opposite, tcp_flags,
};
use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_OK, TC_ACT_SHOT,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, sk_lookup},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockMap},
    programs::{SkLookupContext, TcContext},
};

use crate::{
    parse::{ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, L4Info},
    policy::Decision,
};

// Maps are declared unpinned: the loader pins each one by name under the agent's bpffs
// directory (`EbpfLoader::map_pin_path`), so tests can load private copies and two agents on one
// machine never share maps.

#[map]
static NW_ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// `LpmTrie` adds `BPF_F_NO_PREALLOC`, which the kernel requires for LPM tries.
#[map]
static NW_POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);

#[map]
static NW_IPCACHE: LpmTrie<[u8; 16], IpcacheValue> =
    LpmTrie::with_max_entries(MAX_IPCACHE_ENTRIES, 0);

#[map]
static NW_POLICY_CIDRS: LpmTrie<[u8; 16], IpcacheValue> =
    LpmTrie::with_max_entries(MAX_POLICY_CIDRS, 0);

/// A preallocated hash, not an LRU: an insert takes a free element without walking an LRU list
/// (a third of the BPF time of a new connection went there). Entries leave by expiry (see
/// `agent_common::conntrack`): the datapath treats an expired entry as absent and the agent's
/// garbage collector deletes it. A full table refuses new flows (`drop_reason::CT_FULL`).
#[map]
static NW_CONNTRACK: HashMap<CtKey, CtValue> = HashMap::with_max_entries(MAX_CONNTRACK, 0);

#[map]
static NW_FRAGMENTS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

#[map]
static NW_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map]
static NW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map]
static NW_CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// The packet's `FlowEvent` while the program runs: per CPU, off the 512-byte stack that the
/// call chain down to the policy lookup already nearly fills. Private to each loaded instance,
/// never pinned; a program run never outlives its CPU's use of it.
#[map]
static NW_SCRATCH_EVENT: PerCpuArray<FlowEvent> = PerCpuArray::with_max_entries(1, 0);

/// The agent's outbound listeners (`mesh::PROXY_SOCKET_V4`, `PROXY_SOCKET_V6`). Private to each
/// loaded instance, never pinned: the sockets live and die with the agent process.
#[map]
static NW_PROXY_SOCKETS: SockMap = SockMap::with_max_entries(2, 0);

#[classifier]
pub fn from_workload(ctx: TcContext) -> i32 {
    run(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn to_workload(ctx: TcContext) -> i32 {
    run(&ctx, DIR_INGRESS)
}

/// TC ingress of the node's underlay device, with eBPF host routing: a packet for a local pod
/// is judged as `to_workload` would judge it at the pod's interface (same endpoint, conntrack,
/// policy and events) and put straight into the pod (`bpf_redirect_peer`). Anything else, and
/// anything it does not understand, goes on to the stack untouched: there `to_workload` still
/// judges what reaches a pod.
#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    if !host_routing() {
        return TC_ACT_OK;
    }
    let Some(ev) = NW_SCRATCH_EVENT.get_ptr_mut(0) else {
        return TC_ACT_OK;
    };
    // SAFETY: as in `run`.
    let ev = unsafe {
        core::ptr::write_bytes(ev, 0, 1);
        &mut *ev
    };
    ev.direction = DIR_INGRESS;
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    ev.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match from_underlay_to_pod(&ctx, ev) {
        Ok(action) => action,
        Err(reason) => dropped(ev, reason),
    }
}

#[inline(always)]
fn from_underlay_to_pod(ctx: &TcContext, ev: &mut FlowEvent) -> Result<i32, u8> {
    let mut info = L4Info::default();
    let parsed = match parse::ethertype(ctx) {
        Ok(ETH_P_IP) => parse::parse_ipv4(ctx, ev, &mut info),
        Ok(ETH_P_IPV6) => parse::parse_ipv6(ctx, ev, &mut info),
        _ => return Ok(TC_ACT_OK),
    };
    if parsed != drop_reason::NONE
        || link_control(&info)
        || hostrt::route(ctx, ev, false) != hostrt::LOCAL
    {
        return Ok(TC_ACT_OK);
    }
    let Some(dst) = hostrt::endpoint() else {
        return Ok(TC_ACT_OK);
    };
    count(COUNTER_PACKETS);
    ev.ifindex = hostrt::ifindex();
    ev.dst_identity = dst.identity;
    frame::result(conntrack_and_policy(ctx, dst, DIR_INGRESS, ev))?;
    count(COUNTER_PASSED);
    Ok(hostrt::peer(ctx, agent_common::hostrt::UNDERLAY_PEER))
}

/// Whether the agent turned eBPF host routing on (`CONFIG_HOST_ROUTING`).
#[inline(always)]
fn host_routing() -> bool {
    NW_CONFIG
        .get(0)
        .is_some_and(|cfg| cfg.flags & CONFIG_HOST_ROUTING != 0)
}

/// The thin entry shared by both programs: counts, and turns every error into a counted,
/// reported drop.
#[inline(always)]
fn run(ctx: &TcContext, direction: u8) -> i32 {
    count(COUNTER_PACKETS);
    let Some(ev) = NW_SCRATCH_EVENT.get_ptr_mut(0) else {
        // Cannot happen (an array's index 0 always exists); fail closed if it ever did.
        count(COUNTER_DROP_BASE + u32::from(drop_reason::MALFORMED));
        return TC_ACT_SHOT;
    };
    // SAFETY: a per-CPU map value pointer, valid and this CPU's alone for this program run;
    // zeroed in place (all-zero is `FlowEvent::default()`) rather than built on the stack.
    let ev = unsafe {
        core::ptr::write_bytes(ev, 0, 1);
        &mut *ev
    };
    ev.direction = direction;
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    ev.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match process(ctx, direction, ev) {
        Ok(action) => {
            count(COUNTER_PASSED);
            action
        }
        Err(reason) => dropped(ev, reason),
    }
}

/// Counts a drop for `reason` and reports it with `ev`: the action that drops the packet.
#[inline(always)]
fn dropped(ev: &mut FlowEvent, reason: u8) -> i32 {
    count(COUNTER_DROP_BASE + u32::from(reason));
    ev.verdict = VERDICT_DROPPED;
    ev.drop_reason = reason;
    emit(ev);
    TC_ACT_SHOT
}

/// The fallible body: `Ok(action)` to pass (events for passes already emitted), `Err(reason)` to
/// drop, with `ev` describing as much of the packet as was understood.
#[inline(always)]
fn process(ctx: &TcContext, direction: u8, ev: &mut FlowEvent) -> Result<i32, u8> {
    let ethertype = parse::ethertype(ctx)?;
    match ethertype {
        ETH_P_ARP => return Ok(TC_ACT_OK),
        ETH_P_IP | ETH_P_IPV6 => {}
        _ => return Err(drop_reason::UNSUPPORTED_L3),
    }

    let ep = match NW_ENDPOINTS.get_ptr(ev.ifindex) {
        // SAFETY: a map value pointer from a successful lookup; copied so a concurrent update
        // cannot change the endpoint halfway through the packet.
        Some(p) => unsafe { *p },
        None => return Err(drop_reason::UNKNOWN_ENDPOINT),
    };
    if direction == DIR_EGRESS {
        ev.src_identity = ep.identity;
    } else {
        ev.dst_identity = ep.identity;
    }

    let mut info = L4Info::default();
    frame::result(if ethertype == ETH_P_IP {
        parse::parse_ipv4(ctx, ev, &mut info)
    } else {
        parse::parse_ipv6(ctx, ev, &mut info)
    })?;

    if direction == DIR_EGRESS && !source_is_endpoint(&ep, ev) {
        // Unspecified and link-local sources are what neighbour and router discovery and MLD
        // use before (and besides) the pod's own address.
        if info.icmpv6_link_control && is_unspecified_or_link_local(&ev.saddr) {
            return Ok(TC_ACT_OK);
        }
        return Err(drop_reason::SPOOFED_SOURCE);
    }
    if link_control(&info) {
        return Ok(TC_ACT_OK);
    }

    frame::result(conntrack_and_policy(ctx, &ep, direction, ev))?;
    if direction == DIR_EGRESS && host_routing() {
        return host_route(ctx, ev);
    }
    Ok(TC_ACT_OK)
}

/// eBPF host routing of a packet its pod's egress policy allowed (see [`hostrt`]). To a local
/// pod, the destination's ingress pass runs here, exactly as `to_workload` would run it (the
/// peer redirect skips that program): its endpoint, conntrack entry, policy and event.
#[inline(always)]
fn host_route(ctx: &TcContext, ev: &mut FlowEvent) -> Result<i32, u8> {
    match hostrt::route(ctx, ev, true) {
        hostrt::LOCAL => {
            let Some(dst) = hostrt::endpoint() else {
                return Ok(TC_ACT_OK);
            };
            count(COUNTER_PACKETS);
            ev.direction = DIR_INGRESS;
            ev.ifindex = hostrt::ifindex();
            ev.src_identity = 0;
            ev.dst_identity = dst.identity;
            ev.verdict = 0;
            ev.drop_reason = 0;
            ev.is_reply = 0;
            ev.rule_id = 0;
            frame::result(conntrack_and_policy(ctx, dst, DIR_INGRESS, ev))?;
            Ok(hostrt::peer(ctx, agent_common::hostrt::LOCAL_PEER))
        }
        hostrt::REMOTE => Ok(hostrt::neigh(ctx)),
        _ => Ok(TC_ACT_OK),
    }
}

/// ICMPv6 ND/RD/MLD is link-local control traffic: it passes without policy in both directions
/// (dropping it would cut the pod's IPv6 off its own link).
#[inline(always)]
const fn link_control(info: &L4Info) -> bool {
    info.icmpv6_link_control
}

/// Conntrack, and policy for new flows: `NONE` passes the packet, marked for local delivery to
/// the agent when it belongs to a tunnelled flow (or is a reply to one the agent opened); a
/// drop reason drops it. A separate BPF function (see [`frame`]).
#[inline(never)]
fn conntrack_and_policy(
    ctx: &TcContext,
    ep: &EndpointInfo,
    direction: u8,
    ev: &mut FlowEvent,
) -> u8 {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    // Only the node's own stack can set a mark on what goes to a pod: the kernel clears it on
    // packets that cross from another network namespace (a pod, another node's wire).
    let from_agent = direction == DIR_INGRESS && mark & mesh::MARK_MASK == mesh::MARK_FROM_AGENT;
    let steer = conntrack_verdict(ep, direction, from_agent, ev);
    if steer == Ok(true) {
        ctx.set_mark((mark & !mesh::MARK_MASK) | mesh::MARK_TO_PROXY);
    }
    frame::code(steer.map(|_| ()))
}

/// The verdict of [`conntrack_and_policy`]: `Ok(true)` to pass marked for the agent, `Ok(false)`
/// to pass as is, `Err(reason)` to drop.
#[inline(always)]
fn conntrack_verdict(
    ep: &EndpointInfo,
    direction: u8,
    from_agent: bool,
    ev: &mut FlowEvent,
) -> Result<bool, u8> {
    let (generation, flags) = match NW_CONFIG.get(0) {
        Some(cfg) => (cfg.policy_generation, cfg.flags),
        None => (0, 0),
    };
    // Forwarded new flows are reported only when the agent asked for every flow; drops always
    // are (by `run`).
    let all_flows = flags & CONFIG_EVENTS_ALL_FLOWS != 0;

    // A SYN without ACK opens a connection, even on a tuple conntrack still remembers (a client
    // reusing its port after a close): evaluate and report it as the new flow it is.
    let opens = ev.protocol == parse::IPPROTO_TCP
        && ev.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    // One lookup finds the flow in either direction (see `CtKey`).
    let (stored_key, reversed) = policy::ct_stored_key(ev, direction);
    let now = now_s();
    let entry = NW_CONNTRACK.get_ptr_mut(stored_key);
    // An expired entry is no entry: the packet opens a new flow that overwrites it in place.
    let (hit, remembered) = match entry {
        // SAFETY: a map value pointer from a successful lookup, valid for this program run.
        Some(p) if !opens && !conntrack::expired(ev.protocol, unsafe { &*p }, now) => {
            (Some(p), None)
        }
        other => (None, other),
    };
    let Some(hit) = hit else {
        // A new flow, evaluated in this packet's direction.
        count(COUNTER_NEW_FLOWS);
        let mut decision = Decision::default();
        let (ct_flags, notify) = if from_agent {
            // A tunnel delivery: the agent checked this pod's ingress policy against the
            // peer's certificate, which the kernel cannot see. The agent reports the flow.
            (decision.peer_identity, _) = policy::peer(&ev.saddr);
            decision.verdict = VERDICT_FORWARDED;
            (CT_F_TUNNELED, false)
        } else {
            policy::evaluate(ep, &stored_key, reversed, &mut decision);
            (
                mesh_decision(ep, direction, ev.protocol, &mut decision),
                all_flows,
            )
        };
        if ct_flags & CT_F_REDIRECT != 0 {
            count(COUNTER_REDIRECTED);
        }
        let stored_flags = if reversed { CT_F_STORED_REVERSED } else { 0 };
        let mut value = policy::ct_value(
            ep,
            direction,
            &decision,
            generation,
            ct_flags | stored_flags,
            now,
        );
        match remembered {
            // The tuple's old entry is overwritten in place: cheaper than a map update,
            // which takes a fresh element and frees the old one.
            // SAFETY: a map value pointer from a successful lookup; a plain store into it.
            Some(p) => unsafe { *p = value },
            None => {
                // A full table fails closed for an allowed new flow: without an entry its
                // replies would meet the other direction's policy. A denied one is dropped
                // for its own reason anyway.
                if !policy::ct_insert(&stored_key, &value) && value.verdict == VERDICT_FORWARDED {
                    value.verdict = VERDICT_DROPPED;
                    value.drop_reason = drop_reason::CT_FULL;
                    value.rule_id = 0;
                }
            }
        }
        report(ev, &value, false, notify)?;
        return Ok(ct_flags & CT_F_REDIRECT != 0);
    };

    // SAFETY: a map value pointer from a successful lookup, valid for this program run.
    let stored = unsafe { *hit };
    let is_reply = policy::ct_is_reply(&stored, reversed);
    let closing = touch(hit, ev.protocol, ev.tcp_flags, now, is_reply);

    // Replies of a tunnel delivery go back to the agent; the packets of a redirected flow go on
    // to it.
    let steer_bit = if is_reply {
        CT_F_TUNNELED
    } else {
        CT_F_REDIRECT
    };
    if stored.generation == generation || stored.flags & CT_F_TUNNELED != 0 {
        // Tunnel deliveries keep the agent's verdict: the kernel cannot re-check a certificate.
        report(ev, &stored, is_reply, false)?;
        return Ok(stored.flags & steer_bit != 0);
    }

    // Policy changed since the verdict: evaluate again, for the entry's original direction, with
    // this endpoint as the subject. A flow keeps the path it started on (tunnelled or not): a
    // live connection cannot move between the two.
    let original_direction = if is_reply {
        opposite(direction)
    } else {
        direction
    };
    let mut decision = Decision::default();
    policy::evaluate(
        ep,
        &stored_key,
        stored.flags & CT_F_STORED_REVERSED != 0,
        &mut decision,
    );
    let _ = mesh_decision(ep, original_direction, ev.protocol, &mut decision);
    // The entry stays where it is stored; a denied flow loses the tunnel's redirect.
    let kept = if decision.verdict == VERDICT_FORWARDED {
        CT_F_STORED_REVERSED | CT_F_REDIRECT | CT_F_CLOSING | CT_F_SEEN_REPLY
    } else {
        CT_F_STORED_REVERSED | CT_F_CLOSING | CT_F_SEEN_REPLY
    };
    let ct_flags = (stored.flags | closing) & kept;
    let value = policy::ct_value(ep, original_direction, &decision, generation, ct_flags, now);
    // SAFETY: as above; a plain store into the map value.
    unsafe { *hit = value };
    count(COUNTER_POLICY_REEVALUATED);
    report(
        ev,
        &value,
        is_reply,
        all_flows && value.verdict != stored.verdict,
    )?;
    Ok(value.flags & steer_bit != 0)
}

/// The mesh's part of a new flow's verdict, after policy: plaintext TCP to a STRICT pod is
/// dropped (except from the node itself: kubelet probes), and allowed TCP from a meshed pod to a
/// meshed pod goes to the tunnel (`CT_F_REDIRECT`). Returns the conntrack flags.
#[inline(always)]
fn mesh_decision(ep: &EndpointInfo, direction: u8, protocol: u8, decision: &mut Decision) -> u8 {
    if decision.verdict != VERDICT_FORWARDED || protocol != parse::IPPROTO_TCP {
        return 0;
    }
    if direction == DIR_INGRESS {
        if ep.flags & EP_MTLS_STRICT != 0 && decision.peer_identity != IDENTITY_HOST {
            decision.verdict = VERDICT_DROPPED;
            decision.drop_reason = drop_reason::AUTH_REQUIRED;
            decision.rule_id = 0;
        }
        return 0;
    }
    if ep.flags & EP_MESHED != 0 && decision.peer_flags & IPCACHE_MESHED != 0 {
        return CT_F_REDIRECT;
    }
    0
}

/// Applies a conntrack verdict to the packet: fills the event, emits it for a pass when `notify`
/// (drops are reported by [`run`]).
#[inline(always)]
fn report(ev: &mut FlowEvent, value: &CtValue, is_reply: bool, notify: bool) -> Result<(), u8> {
    // Stored identities follow the original tuple; a reply travels the other way.
    if is_reply {
        ev.direction = opposite(ev.direction);
        ev.src_identity = value.dst_identity;
        ev.dst_identity = value.src_identity;
    } else {
        ev.src_identity = value.src_identity;
        ev.dst_identity = value.dst_identity;
    }
    ev.is_reply = u8::from(is_reply);
    ev.rule_id = value.rule_id;
    if value.verdict != VERDICT_FORWARDED {
        return Err(value.drop_reason);
    }
    if notify {
        ev.verdict = VERDICT_FORWARDED;
        emit(ev);
    }
    Ok(())
}

/// `sk_lookup` in the agent's network namespace: a new connection the classifiers redirected
/// (conntrack says `CT_F_REDIRECT` for its tuple, as the pod sent it) goes to the agent's
/// outbound listener, whatever its destination address and port. Everything else is left to
/// the normal lookup. The kernel runs this only for listener lookups (a SYN, or a SYN on a
/// tuple in TIME_WAIT), after established sockets had their chance, so the packets of an
/// accepted connection find it by their 4-tuple.
#[sk_lookup]
pub fn to_proxy(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer the kernel passed; each field is read on its own, at its own
    // width, as the verifier requires of this context.
    let (protocol, family) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.lookup).protocol),
            core::ptr::read_volatile(&raw const (*ctx.lookup).family),
        )
    };
    if protocol != u32::from(parse::IPPROTO_TCP) {
        return SK_PASS;
    }
    let mut key = CtKey {
        protocol: parse::IPPROTO_TCP,
        direction: DIR_EGRESS,
        ..CtKey::default()
    };
    let slot = if family == AF_INET {
        // SAFETY: as above.
        let (remote, local) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*ctx.lookup).remote_ip4),
                core::ptr::read_volatile(&raw const (*ctx.lookup).local_ip4),
            )
        };
        key.saddr = parse::ipv4_mapped(remote.to_ne_bytes());
        key.daddr = parse::ipv4_mapped(local.to_ne_bytes());
        mesh::PROXY_SOCKET_V4
    } else if family == AF_INET6 {
        // SAFETY: as above.
        let (remote, local) = unsafe {
            let l = ctx.lookup;
            (
                [
                    core::ptr::read_volatile(&raw const (*l).remote_ip6[0]),
                    core::ptr::read_volatile(&raw const (*l).remote_ip6[1]),
                    core::ptr::read_volatile(&raw const (*l).remote_ip6[2]),
                    core::ptr::read_volatile(&raw const (*l).remote_ip6[3]),
                ],
                [
                    core::ptr::read_volatile(&raw const (*l).local_ip6[0]),
                    core::ptr::read_volatile(&raw const (*l).local_ip6[1]),
                    core::ptr::read_volatile(&raw const (*l).local_ip6[2]),
                    core::ptr::read_volatile(&raw const (*l).local_ip6[3]),
                ],
            )
        };
        key.saddr = words_to_bytes(remote);
        key.daddr = words_to_bytes(local);
        mesh::PROXY_SOCKET_V6
    } else {
        return SK_PASS;
    };
    // SAFETY: as above. `remote_port` is in network order, `local_port` in host order.
    let (remote_port, local_port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.lookup).remote_port),
            core::ptr::read_volatile(&raw const (*ctx.lookup).local_port),
        )
    };
    key.sport_be = remote_port;
    key.dport_be = (local_port as u16).to_be();
    if !redirected(&key) {
        return SK_PASS;
    }
    match NW_PROXY_SOCKETS.redirect_sk_lookup(&ctx, slot, 0) {
        Ok(()) => SK_PASS,
        // No listener (the agent is not running): refuse now, so the client fails fast
        // rather than reaching whatever else listens on the destination port here.
        Err(_) => {
            count(COUNTER_DROP_BASE + u32::from(drop_reason::PROXY_UNAVAILABLE));
            SK_DROP
        }
    }
}

/// Whether conntrack marked the flow `key` (as the pod opened it) for the tunnel. A separate BPF
/// function: inlined, LLVM merged `to_proxy`'s context reads into one computed address, which
/// the verifier refuses ("dereference of modified ctx ptr").
#[inline(never)]
fn redirected(key: &CtKey) -> bool {
    let reversed = !key.is_canonical();
    let stored_key = if reversed { key.reversed() } else { *key };
    NW_CONNTRACK.get_ptr(stored_key).is_some_and(|v| {
        // SAFETY: a map value pointer from a successful lookup.
        let v = unsafe { &*v };
        !policy::ct_is_reply(v, reversed) && v.flags & CT_F_REDIRECT != 0
    })
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Four 32-bit words as they lie in memory (network order) into 16 address bytes.
#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = w.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn source_is_endpoint(ep: &EndpointInfo, ev: &FlowEvent) -> bool {
    if ev.family == 4 {
        ep.flags & EP_HAS_IPV4 != 0 && addr_eq(&ep.ipv4, &ev.saddr)
    } else {
        ep.flags & EP_HAS_IPV6 != 0 && addr_eq(&ep.ipv6, &ev.saddr)
    }
}

/// `::` or `fe80::/10`.
#[inline(always)]
fn is_unspecified_or_link_local(a: &[u8; 16]) -> bool {
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || addr_eq(a, &[0; 16])
}

/// Compares two addresses without a `memcmp` call (the BPF backend has none).
#[inline(always)]
fn addr_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a0, a1) = halves(a);
    let (b0, b1) = halves(b);
    a0 == b0 && a1 == b1
}

#[inline(always)]
fn halves(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// Liveness and state: records that a packet of the flow stored at `hit` was seen `now`
/// (`CtValue::last_seen_s`, one store a second per flow at most), that the flow was answered
/// (`CT_F_SEEN_REPLY` on a reply) and that it is closing (`CT_F_CLOSING` on a TCP FIN or RST).
/// These pick the entry's lifetime (`agent_common::conntrack`). Returns `CT_F_CLOSING` when
/// this packet closes it, else 0. A separate BPF function (see [`frame`]).
#[inline(never)]
fn touch(hit: *mut CtValue, protocol: u8, flags: u8, now: u32, is_reply: bool) -> u8 {
    let closing =
        if protocol == parse::IPPROTO_TCP && flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
            CT_F_CLOSING
        } else {
            0
        };
    let set = if is_reply {
        closing | CT_F_SEEN_REPLY
    } else {
        closing
    };
    // SAFETY: a map value pointer from a successful lookup, valid for this program run; plain
    // loads and stores.
    unsafe {
        let old = (*hit).flags;
        if (*hit).last_seen_s != now || old & set != set {
            (*hit).last_seen_s = now;
            (*hit).flags = old | set;
        }
    }
    closing
}

/// Whole seconds of the monotonic clock (`CtValue::last_seen_s`).
#[inline(always)]
fn now_s() -> u32 {
    // SAFETY: a helper without preconditions.
    let ns = unsafe { bpf_ktime_get_ns() };
    // Truncation wraps after 136 years of uptime.
    #[allow(clippy::cast_possible_truncation)]
    let s = (ns / 1_000_000_000) as u32;
    s
}

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = NW_COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it concurrently.
        unsafe { *p += 1 };
    }
}

/// Unread bytes in the ring beyond which an event wakes the reader (about 800 events).
const EVENTS_WAKEUP_BYTES: u64 = 64 * 1024;

#[inline(always)]
fn emit(ev: &mut FlowEvent) {
    // SAFETY: a helper without preconditions.
    ev.ktime_ns = unsafe { bpf_ktime_get_ns() };
    service::dialled(ev);
    // Waking the reader for every event costs more than the event (a context switch per new
    // flow). The agent drains the ring on a short timer anyway, so only a ring that is filling
    // up wakes it early.
    let flags = if NW_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if NW_EVENTS
        .output::<FlowEvent>(&*ev, u64::from(flags))
        .is_err()
    {
        count(COUNTER_EVENTS_LOST);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
