//! eBPF host routing (`--host-routing=ebpf`): once policy has allowed a packet, send it on
//! without the node's IP forwarding and netfilter, as Cilium's BPF host routing does.
//!
//! - From a local pod to a local pod (`from_workload`): the destination's ingress policy runs
//!   in the same program (as `to_workload` would run it), then `bpf_redirect_peer` puts the
//!   packet straight into the destination pod's network namespace. `to_workload` does not see
//!   it: the peer redirect skips the host-side interface's egress.
//! - From a local pod to a pod of another node (per the ipcache's `IPCACHE_POD`):
//!   `bpf_fib_lookup` finds the device and next hop, `bpf_redirect_neigh` sends it there.
//! - From the underlay device to a local pod (`from_underlay`): ingress policy, then
//!   `bpf_redirect_peer`.
//!
//! Everything else keeps the stack: the node itself and the world (the FIB says "not
//! forwarded", or the address is no pod's: masquerade lives in the stack), fragments, IPv6
//! extension headers, HBONE (TCP port 15008, which the node's agent must receive even when
//! dialled on a local pod's address; TCP from port 15008 too, so that the node's conntrack sees
//! both directions of a pod's own connection from that port and never takes its replies for a
//! new HBONE dial), packets marked for the agent, and whatever the FIB
//! cannot resolve (no route, no neighbour yet, MTU). Each such helper keeps its state in
//! `NW_HOSTRT_SCRATCH` (per CPU), off the classifiers' nearly full stack.

use agent_common::{EndpointInfo, FlowEvent, IPCACHE_POD, hostrt, mesh};
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup,
        bpf_redir_neigh,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_l3_csum_replace, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_store_bytes,
    },
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};

use crate::{
    NW_ENDPOINTS,
    parse::{self, ETH_HLEN},
    policy,
};

/// What [`route`] found for an allowed packet.
pub const STACK: u32 = 0;
/// A local pod: the destination's endpoint and interface are in the scratch ([`endpoint`],
/// [`ifindex`]); the caller runs its ingress policy, then [`peer`].
pub const LOCAL: u32 = 1;
/// A pod on another node, resolved by the FIB: [`neigh`] sends it.
pub const REMOTE: u32 = 2;

/// HBONE's port (`agent_common::mesh`'s tunnel port): never host-routed.
const HBONE_PORT_BE: u16 = 15008u16.to_be();
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[repr(C)]
pub struct Scratch {
    fib: bpf_fib_lookup,
    nh: bpf_redir_neigh,
    ep: EndpointInfo,
}

/// One per CPU, private to the loaded instance (never pinned).
#[map]
static NW_HOSTRT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters by `agent_common::hostrt` index; pinned, read by the agent's metrics.
#[map]
static NW_HOSTRT_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(hostrt::COUNTERS_LEN, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = NW_HOSTRT_COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it concurrently.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's value of a per-CPU array, used by one program run at a time.
    NW_HOSTRT_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The destination endpoint [`route`] found (`LOCAL`), copied so a concurrent map update
/// cannot change it halfway.
#[inline(always)]
pub fn endpoint() -> Option<&'static EndpointInfo> {
    scratch().map(|s| &s.ep)
}

/// The destination's host-side interface [`route`] found (`LOCAL`).
#[inline(always)]
pub fn ifindex() -> u32 {
    scratch().map_or(0, |s| s.fib.ifindex)
}

/// Where an allowed packet `ev` (parsed) goes: [`STACK`], [`LOCAL`] or [`REMOTE`]. `from_pod`:
/// the packet left a local pod (else it came from the underlay, and only [`LOCAL`] is
/// returned). A separate BPF function (see `frame`).
#[inline(never)]
pub fn route(ctx: &TcContext, ev: &FlowEvent, from_pod: bool) -> u32 {
    let kind = classify(ctx, ev, from_pod);
    if kind == STACK {
        count(hostrt::STACK);
    }
    kind
}

#[inline(always)]
fn classify(ctx: &TcContext, ev: &FlowEvent, from_pod: bool) -> u32 {
    // SAFETY: the context pointer the kernel passed to the program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & mesh::MARK_MASK != 0
        || (ev.protocol == parse::IPPROTO_TCP
            && (ev.dport_be == HBONE_PORT_BE || ev.sport_be == HBONE_PORT_BE))
        || !unfragmented(ctx, ev)
    {
        return STACK;
    }
    let Some(s) = scratch() else {
        return STACK;
    };
    // SAFETY: all-zero is a valid `bpf_fib_lookup`; zeroed in place.
    unsafe { core::ptr::write_bytes(&raw mut s.fib, 0, 1) };
    let fib = &mut s.fib;
    fib.l4_protocol = ev.protocol;
    fib.sport = ev.sport_be;
    fib.dport = ev.dport_be;
    // `tot_len` 0: the kernel checks the MTU against the skb itself.
    fib.ifindex = ev.ifindex;
    if ev.family == 4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = word(&ev.saddr, 12);
        fib.__bindgen_anon_4.ipv4_dst = word(&ev.daddr, 12);
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(&ev.saddr);
        fib.__bindgen_anon_4.ipv6_dst = words(&ev.daddr);
    }
    // SAFETY: `fib` is a whole `bpf_fib_lookup` in a map value; the skb is the program's.
    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let resolved = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    let no_neigh = rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
    if !resolved && !no_neigh {
        count(hostrt::FIB_MISS);
        return STACK;
    }
    if let Some(ep) = NW_ENDPOINTS.get_ptr(fib.ifindex) {
        if !resolved {
            // The pod's neighbour entry is not there yet: the stack resolves it.
            count(hostrt::FIB_MISS);
            return STACK;
        }
        // SAFETY: a map value pointer from a successful lookup; copied.
        s.ep = unsafe { *ep };
        return LOCAL;
    }
    if !from_pod || fib.ifindex == ev.ifindex || policy::peer(&ev.daddr).1 & IPCACHE_POD == 0 {
        return STACK;
    }
    REMOTE
}

/// Whether the packet is neither a fragment nor an IPv6 packet with extension headers (those
/// keep the stack, which reassembles or understands them).
#[inline(always)]
fn unfragmented(ctx: &TcContext, ev: &FlowEvent) -> bool {
    let end = ctx.len() as usize;
    if ev.family == 4 {
        // Flags and fragment offset: MF or an offset means a fragment.
        match parse::load::<2>(ctx, ETH_HLEN + 6, end) {
            Ok(b) => b[0] & 0x3f == 0 && b[1] == 0,
            Err(_) => false,
        }
    } else {
        match parse::load::<1>(ctx, ETH_HLEN + 6, end) {
            Ok(b) => matches!(
                b[0],
                parse::IPPROTO_TCP
                    | parse::IPPROTO_UDP
                    | parse::IPPROTO_ICMPV6
                    | parse::IPPROTO_SCTP
            ),
            Err(_) => false,
        }
    }
}

/// The 4 address bytes at `off` as the kernel's `__be32` (memory order).
#[inline(always)]
fn word(a: &[u8; 16], off: usize) -> u32 {
    u32::from_ne_bytes([a[off], a[off + 1], a[off + 2], a[off + 3]])
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [word(a, 0), word(a, 4), word(a, 8), word(a, 12)]
}

/// Puts the packet into the local pod [`route`] found: the pod's MAC and the host side's as
/// the FIB resolved them, then `bpf_redirect_peer`. `kind` is the counter to count it under.
/// A packet that its ingress pass marked for the agent keeps the stack. A separate BPF function.
#[inline(never)]
pub fn peer(ctx: &TcContext, kind: u32) -> i32 {
    // SAFETY: the context pointer the kernel passed to the program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let Some(s) = scratch() else {
        return TC_ACT_OK;
    };
    if mark & mesh::MARK_MASK != 0 || !decrement_ttl(ctx, s.fib.family) {
        count(hostrt::STACK);
        return TC_ACT_OK;
    }
    // SAFETY: 12 bytes of MACs from a map value into the Ethernet header the parser read.
    let stored = unsafe {
        bpf_skb_store_bytes(ctx.skb.skb.cast(), 0, (&raw const s.fib.dmac).cast(), 6, 0) == 0
            && bpf_skb_store_bytes(ctx.skb.skb.cast(), 6, (&raw const s.fib.smac).cast(), 6, 0) == 0
    };
    if !stored {
        count(hostrt::STACK);
        return TC_ACT_OK;
    }
    count(kind);
    // SAFETY: a helper without memory arguments.
    #[allow(clippy::cast_possible_truncation)]
    let action = unsafe { bpf_redirect_peer(s.fib.ifindex, 0) } as i32;
    action
}

/// Decrements the IPv4 TTL (and its header checksum) or the IPv6 hop limit, as forwarding
/// would. False when it is 1 or less (or unreadable): the stack then drops the packet and
/// answers with ICMP time exceeded.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, family: u8) -> bool {
    let end = ctx.len() as usize;
    let skb = ctx.skb.skb.cast();
    if family == AF_INET {
        // TTL and protocol: the 16-bit word the checksum covers.
        let Ok(old) = parse::load::<2>(ctx, ETH_HLEN + 8, end) else {
            return false;
        };
        if old[0] <= 1 {
            return false;
        }
        let new = [old[0] - 1, old[1]];
        // SAFETY: offsets inside the IPv4 header the parser read; `new` lives on the stack for
        // the call.
        unsafe {
            bpf_l3_csum_replace(
                skb,
                (ETH_HLEN + 10) as u32,
                u64::from(u16::from_ne_bytes(old)),
                u64::from(u16::from_ne_bytes(new)),
                2,
            ) == 0
                && bpf_skb_store_bytes(skb, (ETH_HLEN + 8) as u32, (&raw const new).cast(), 1, 0)
                    == 0
        }
    } else {
        let Ok(old) = parse::load::<1>(ctx, ETH_HLEN + 7, end) else {
            return false;
        };
        if old[0] <= 1 {
            return false;
        }
        let new = [old[0] - 1];
        // SAFETY: the hop limit byte of the IPv6 header the parser read.
        unsafe {
            bpf_skb_store_bytes(skb, (ETH_HLEN + 7) as u32, (&raw const new).cast(), 1, 0) == 0
        }
    }
}

/// Sends the packet to the remote pod [`route`] found, by its next hop (the kernel fills in
/// the Ethernet header). A separate BPF function.
#[inline(never)]
pub fn neigh(ctx: &TcContext) -> i32 {
    let Some(s) = scratch() else {
        return TC_ACT_OK;
    };
    if !decrement_ttl(ctx, s.fib.family) {
        count(hostrt::STACK);
        return TC_ACT_OK;
    }
    s.nh.nh_family = u32::from(s.fib.family);
    // SAFETY: plain copies between the unions of two map-value structs; the kernel wrote the
    // next hop into `ipv4_dst`/`ipv6_dst` of the family it was asked.
    unsafe {
        if s.fib.family == AF_INET {
            s.nh.__bindgen_anon_1.ipv4_nh = s.fib.__bindgen_anon_4.ipv4_dst;
        } else {
            s.nh.__bindgen_anon_1.ipv6_nh = s.fib.__bindgen_anon_4.ipv6_dst;
        }
    }
    count(hostrt::NEIGH);
    // SAFETY: `nh` is a whole `bpf_redir_neigh` in a map value.
    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    let action = unsafe {
        bpf_redirect_neigh(
            s.fib.ifindex,
            &raw mut s.nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    } as i32;
    action
}
