//! nodeward's TC classifiers, attached to the host-side interface of every local workload:
//! `from_workload` at TC ingress (packets leaving the pod, direction egress for the endpoint) and
//! `to_workload` at TC egress (packets going to the pod, direction ingress).
//!
//! Each packet: parse (fail closed), find the endpoint by interface, anti-spoofing for what the
//! pod sends, conntrack, and for a new flow (or a flow whose verdict predates the current policy
//! generation) the policy lookup. Every drop and every new flow becomes a `FlowEvent`.
#![no_std]
#![no_main]

mod parse;
mod policy;

use agent_common::{
    CONFIG_EVENTS_ALL_FLOWS, COUNTER_DROP_BASE, COUNTER_EVENTS_LOST, COUNTER_NEW_FLOWS,
    COUNTER_PACKETS, COUNTER_PASSED, COUNTER_POLICY_REEVALUATED, COUNTERS_LEN, CtKey, CtValue,
    DIR_EGRESS, DIR_INGRESS, DatapathConfig, EP_HAS_IPV4, EP_HAS_IPV6, EVENTS_RING_BYTES,
    EndpointInfo, FlowEvent, FragKey, FragValue, IpcacheValue, MAX_CONNTRACK, MAX_ENDPOINTS,
    MAX_FRAGMENTS, MAX_IPCACHE_ENTRIES, MAX_POLICY_CIDRS, MAX_POLICY_ENTRIES, PolicyKey,
    PolicyValue, VERDICT_DROPPED, VERDICT_FORWARDED, drop_reason, tcp_flags,
};
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
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

#[map]
static NW_CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);

#[map]
static NW_FRAGMENTS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

#[map]
static NW_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map]
static NW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map]
static NW_CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[classifier]
pub fn from_workload(ctx: TcContext) -> i32 {
    run(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn to_workload(ctx: TcContext) -> i32 {
    run(&ctx, DIR_INGRESS)
}

/// The thin entry shared by both programs: counts, and turns every error into a counted,
/// reported drop.
#[inline(always)]
fn run(ctx: &TcContext, direction: u8) -> i32 {
    count(COUNTER_PACKETS);
    let mut ev = FlowEvent {
        direction,
        // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        ..FlowEvent::default()
    };
    match process(ctx, direction, &mut ev) {
        Ok(action) => {
            count(COUNTER_PASSED);
            action
        }
        Err(reason) => {
            count(COUNTER_DROP_BASE + u32::from(reason));
            ev.verdict = VERDICT_DROPPED;
            ev.drop_reason = reason;
            emit(&mut ev);
            TC_ACT_SHOT
        }
    }
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

    let info = if ethertype == ETH_P_IP {
        parse::parse_ipv4(ctx, ev)?
    } else {
        parse::parse_ipv6(ctx, ev)?
    };

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

    conntrack_and_policy(&ep, direction, ev)
}

/// ICMPv6 ND/RD/MLD is link-local control traffic: it passes without policy in both directions
/// (dropping it would cut the pod's IPv6 off its own link).
#[inline(always)]
const fn link_control(info: &L4Info) -> bool {
    info.icmpv6_link_control
}

/// Not inlined: a separate BPF function keeps each frame under the 512-byte stack limit.
#[inline(never)]
fn conntrack_and_policy(ep: &EndpointInfo, direction: u8, ev: &mut FlowEvent) -> Result<i32, u8> {
    let (generation, flags) = match NW_CONFIG.get(0) {
        Some(cfg) => (cfg.policy_generation, cfg.flags),
        None => (0, 0),
    };
    // Forwarded new flows are reported only when the agent asked for every flow; drops always
    // are (by `run`).
    let all_flows = flags & CONFIG_EVENTS_ALL_FLOWS != 0;
    let key = policy::ct_key(ev, direction);
    let reverse = policy::ct_reverse_key(ev, direction);

    // A SYN without ACK opens a connection, even on a tuple conntrack still remembers (a client
    // reusing its port after a close): evaluate and report it as the new flow it is.
    let opens = ev.protocol == parse::IPPROTO_TCP
        && ev.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    let hit = if opens {
        None
    } else {
        policy::ct_lookup(&key, &reverse)
    };
    let Some(hit) = hit else {
        // A new flow, evaluated in this packet's direction.
        let mut decision = Decision::default();
        policy::evaluate(ep, &key, &mut decision);
        let value = policy::ct_value(ep, direction, &decision, generation);
        policy::ct_insert(&key, &value);
        count(COUNTER_NEW_FLOWS);
        return report(ev, &value, false, all_flows);
    };

    let original: &CtKey = if hit.is_reply { &reverse } else { &key };
    // SAFETY: a map value pointer from a successful lookup, valid for this program run.
    let stored = unsafe { *hit.value };
    if stored.generation == generation {
        return report(ev, &stored, hit.is_reply, false);
    }

    // Policy changed since the verdict: evaluate again, for the entry's original direction, with
    // this endpoint as the subject.
    let mut decision = Decision::default();
    policy::evaluate(ep, original, &mut decision);
    let value = policy::ct_value(ep, original.direction, &decision, generation);
    // SAFETY: as above; a plain store into the map value.
    unsafe { *hit.value = value };
    count(COUNTER_POLICY_REEVALUATED);
    report(
        ev,
        &value,
        hit.is_reply,
        all_flows && value.verdict != stored.verdict,
    )
}

/// Applies a conntrack verdict to the packet: fills the event, emits it for a pass when `notify`
/// (drops are reported by [`run`]).
#[inline(always)]
fn report(ev: &mut FlowEvent, value: &CtValue, is_reply: bool, notify: bool) -> Result<i32, u8> {
    // Stored identities follow the original tuple; a reply travels the other way.
    if is_reply {
        ev.direction = policy::opposite(ev.direction);
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
    Ok(TC_ACT_OK)
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
