//! Socket-level Service translation: cgroup `sock_addr` programs on the agent's `--cgroup`.
//!
//! A connect (TCP, or UDP `connect`) or an unconnected datagram to a Service frontend
//! (`ClusterIP:port/protocol`) is rewritten to one backend chosen at random before the kernel
//! looks up a route, so no packet ever carries the `ClusterIP` and every later hook (the TC
//! classifiers, policy, the tunnel) sees the backend pod. The application keeps seeing the
//! `ClusterIP`: `getpeername` and the source of UDP replies are mapped back through
//! `NW_SVC_REVNAT`. A frontend with no usable backend refuses at once with `ECONNREFUSED`, as
//! kube-proxy's reject rule does. Layout and write order: `agent_common::ServiceKey`.
//!
//! The `*6` programs do the same for IPv6 sockets; an IPv6 socket dialling an IPv4-mapped
//! address (`::ffff:10.96.0.10`) finds the IPv4 frontend, since the maps hold IPv4 in that form.

use agent_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, COUNTER_SVC_NO_BACKEND,
    COUNTER_SVC_TRANSLATED, FlowEvent, MAX_SERVICE_AFFINITY, MAX_SERVICE_BACKENDS,
    MAX_SERVICE_CONNS, MAX_SERVICE_REVNAT, MAX_SERVICES, ServiceKey, ServiceValue, SvcConnKey,
};
use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};

use crate::count;

#[map]
static NW_SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map]
static NW_SVC_BACKENDS: HashMap<BackendKey, Backend> =
    HashMap::with_max_entries(MAX_SERVICE_BACKENDS, 0);

/// Per translated socket (cookie) and backend: the frontend the application asked for.
#[map]
static NW_SVC_REVNAT: LruHashMap<agent_common::RevNatKey, ServiceKey> =
    LruHashMap::with_max_entries(MAX_SERVICE_REVNAT, 0);

/// `sessionAffinity: ClientIP`: each client's (pod's) backend per frontend.
#[map]
static NW_SVC_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(MAX_SERVICE_AFFINITY, 0);

/// Translated TCP connections by 5-tuple (as their packets leave the pod): the frontend each
/// dialled, so the flow the classifier reports names the Service exactly, even when one backend
/// serves several Services. Written by `svc_sock_ops` once the socket has its source port.
#[map]
static NW_SVC_CONNS: LruHashMap<SvcConnKey, ServiceKey> =
    LruHashMap::with_max_entries(MAX_SERVICE_CONNS, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const ECONNREFUSED: i32 = 111;
/// `sock_addr` verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn svc_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn svc_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn svc_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false);
    // recvmsg programs may only allow.
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn svc_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn svc_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn svc_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn svc_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn svc_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true);
    ALLOW
}

/// The socket address (the maps' 16-byte form: IPv4-mapped for IPv4) and port (network order)
/// of the context, if it is of the program's family.
#[inline(always)]
fn read_addr(ctx: &SockAddrContext, v6: bool) -> Option<([u8; 16], u16)> {
    // SAFETY: `sock_addr` is the context pointer the kernel passed to the program; these
    // fields are readable in every sock_addr attach type used here (the `*4` programs read
    // the IPv4 field, the `*6` ones the IPv6 words, each with 4-byte loads).
    unsafe {
        let sa = ctx.sock_addr;
        let family = (*sa).user_family;
        // The port is in network order in the low 16 bits.
        let port = (*sa).user_port as u16;
        if v6 {
            if family != AF_INET6 {
                return None;
            }
            let w = [
                (*sa).user_ip6[0].to_ne_bytes(),
                (*sa).user_ip6[1].to_ne_bytes(),
                (*sa).user_ip6[2].to_ne_bytes(),
                (*sa).user_ip6[3].to_ne_bytes(),
            ];
            Some((
                [
                    w[0][0], w[0][1], w[0][2], w[0][3], w[1][0], w[1][1], w[1][2], w[1][3],
                    w[2][0], w[2][1], w[2][2], w[2][3], w[3][0], w[3][1], w[3][2], w[3][3],
                ],
                port,
            ))
        } else {
            if family != AF_INET {
                return None;
            }
            let o = (*sa).user_ip4.to_ne_bytes();
            Some((
                [
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
                ],
                port,
            ))
        }
    }
}

/// Writes an address of [`read_addr`]'s form and a port back into the context.
#[inline(always)]
fn write_addr(ctx: &SockAddrContext, v6: bool, a: &[u8; 16], port_be: u16) {
    // SAFETY: the context pointer; `user_ip4`/`user_ip6` and `user_port` are writable in
    // connect, sendmsg, recvmsg and getpeername programs of their family.
    unsafe {
        let sa = ctx.sock_addr;
        if v6 {
            (*sa).user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
            (*sa).user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
            (*sa).user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
            (*sa).user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        } else {
            (*sa).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        }
        (*sa).user_port = u32::from(port_be);
    }
}

#[inline(always)]
fn refuse() -> i32 {
    count(COUNTER_SVC_NO_BACKEND);
    // SAFETY: plain helper call; allowed in cgroup connect and sendmsg programs (5.18+).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some((addr, port_be)) = read_addr(ctx, v6) else {
        return ALLOW;
    };
    // SAFETY: the context pointer; `protocol` is readable in every sock_addr program.
    let protocol = unsafe { (*ctx.sock_addr).protocol } as u8;
    let key = ServiceKey {
        addr,
        port_be,
        protocol,
        _pad: 0,
    };
    let service = match NW_SERVICES.get_ptr(key) {
        // SAFETY: a value pointer from a successful lookup, read once.
        Some(p) => unsafe { *p },
        None => return ALLOW, // not a Service address
    };
    // SAFETY: the context pointer; socket cookies are available to sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some(proxy) = crate::dns::steer(&key) {
        let _ = NW_SVC_REVNAT.insert(crate::dns::revnat(cookie, proxy), key, 0);
        write_addr(ctx, v6, &proxy.addr, proxy.port_be);
        count(COUNTER_SVC_TRANSLATED);
        return ALLOW;
    }
    if service.count == 0 {
        return refuse();
    }
    let (slot, backend) = match sticky(ctx, key, &service) {
        Some(kept) => kept,
        None => {
            // SAFETY: plain helper call.
            let pick = unsafe { bpf_get_prandom_u32() } % service.count + 1;
            match NW_SVC_BACKENDS.get_ptr(BackendKey {
                service: key,
                slot: pick,
            }) {
                // SAFETY: as above.
                Some(p) => (pick, unsafe { *p }),
                // A slot past the count while the agent shrinks a set: take the first, which is
                // written before any count that includes it.
                None => match NW_SVC_BACKENDS.get_ptr(BackendKey {
                    service: key,
                    slot: 1,
                }) {
                    // SAFETY: as above.
                    Some(p) => (1, unsafe { *p }),
                    None => return refuse(),
                },
            }
        }
    };
    if service.affinity_secs != 0 {
        remember(ctx, key, slot, backend);
    }
    let rev = agent_common::RevNatKey {
        cookie,
        backend,
        _pad: [0; 4],
    };
    // Without the entry the translation still works; only the peer name would show the pod.
    let _ = NW_SVC_REVNAT.insert(rev, key, 0);
    write_addr(ctx, v6, &backend.addr, backend.port_be);
    count(COUNTER_SVC_TRANSLATED);
    ALLOW
}

/// The client's backend under session affinity, if it has one that is recent and still in its
/// slot.
#[inline(always)]
fn sticky(
    ctx: &SockAddrContext,
    key: ServiceKey,
    service: &ServiceValue,
) -> Option<(u32, Backend)> {
    if service.affinity_secs == 0 {
        return None;
    }
    let akey = AffinityKey {
        // SAFETY: the context pointer; the netns cookie is available to sock_addr programs.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        service: key,
        _pad: [0; 4],
    };
    // SAFETY: a value pointer from a successful lookup, copied.
    let kept = unsafe { *NW_SVC_AFFINITY.get_ptr(akey)? };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(kept.last_ns) > u64::from(service.affinity_secs) * 1_000_000_000
        || kept.slot == 0
        || kept.slot > service.count
    {
        return None;
    }
    // SAFETY: as above.
    let current = unsafe {
        *NW_SVC_BACKENDS.get_ptr(BackendKey {
            service: key,
            slot: kept.slot,
        })?
    };
    (current == kept.backend).then_some((kept.slot, kept.backend))
}

/// Records (or refreshes) the client's backend under session affinity.
#[inline(always)]
fn remember(ctx: &SockAddrContext, key: ServiceKey, slot: u32, backend: Backend) {
    let akey = AffinityKey {
        // SAFETY: as in `sticky`.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        service: key,
        _pad: [0; 4],
    };
    let value = AffinityValue {
        backend,
        slot,
        // SAFETY: plain helper call.
        last_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Without the entry the next connect picks anew: affinity is best effort under pressure.
    let _ = NW_SVC_AFFINITY.insert(akey, value, 0);
}

/// Shows a translated socket's peer (or a reply datagram's source) as the frontend.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, v6: bool) {
    let Some((addr, port_be)) = read_addr(ctx, v6) else {
        return;
    };
    // SAFETY: as in `translate`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rev = agent_common::RevNatKey {
        cookie,
        backend: Backend {
            addr,
            port_be,
            _pad: [0; 2],
        },
        _pad: [0; 4],
    };
    let Some(p) = NW_SVC_REVNAT.get_ptr(rev) else {
        return;
    };
    // SAFETY: a value pointer from a successful lookup.
    let front = unsafe { *p };
    write_addr(ctx, v6, &front.addr, front.port_be);
}

/// `sock_ops` on the same cgroup. At `TCP_CONNECT_CB` (the source port is bound, the SYN not
/// sent yet) a socket the connect program translated has a `NW_SVC_REVNAT` entry for its backend:
/// its 5-tuple and that frontend go into `NW_SVC_CONNS`. Any other connect removes a stale entry
/// for its tuple, so a later direct connection that reuses it is not named after a Service.
#[sock_ops]
pub fn svc_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        record_connection(&ctx);
    }
    // The return value is ignored for this op; 1 is sock_ops' "ok".
    1
}

#[inline(always)]
fn record_connection(ctx: &SockOpsContext) {
    // Every field is read, at its own constant offset, whatever the family: the verifier
    // refuses a load through a context pointer the compiler offset in one branch and shared.
    // SAFETY: the context pointer the kernel passed; these fields are readable at 4 bytes in
    // every sock_ops op with a full socket (TCP_CONNECT_CB has one).
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        let o = ctx.ops;
        (
            core::ptr::read_volatile(&raw const (*o).family),
            core::ptr::read_volatile(&raw const (*o).local_ip4),
            core::ptr::read_volatile(&raw const (*o).remote_ip4),
            [
                core::ptr::read_volatile(&raw const (*o).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*o).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*o).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*o).local_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&raw const (*o).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*o).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*o).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*o).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&raw const (*o).local_port),
            core::ptr::read_volatile(&raw const (*o).remote_port),
        )
    };
    let (saddr, daddr) = match family {
        AF_INET => (mapped(l4.to_ne_bytes()), mapped(r4.to_ne_bytes())),
        AF_INET6 => (words(&l6), words(&r6)),
        _ => return,
    };
    // `remote_port` holds the port in network order in its upper 16 bits (little-endian
    // kernels shift it there); `local_port` is in host order.
    let dport_be = (rport >> 16) as u16;
    let sport_be = (lport as u16).to_be();
    let key = SvcConnKey {
        saddr,
        daddr,
        sport_be,
        dport_be,
        protocol: 6,
        _pad: [0; 3],
    };
    // SAFETY: the context pointer the kernel passed; socket cookies are available to sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let rev = agent_common::RevNatKey {
        cookie,
        backend: Backend {
            addr: daddr,
            port_be: dport_be,
            _pad: [0; 2],
        },
        _pad: [0; 4],
    };
    match NW_SVC_REVNAT.get_ptr(rev) {
        Some(p) => {
            // SAFETY: a value pointer from a successful lookup, copied.
            let front = unsafe { *p };
            // Without the entry the flow falls back to naming the Service by its backend.
            let _ = NW_SVC_CONNS.insert(key, front, 0);
        }
        None => {
            let _ = NW_SVC_CONNS.remove(key);
        }
    }
}

#[inline(always)]
fn mapped(o: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
    ]
}

#[inline(always)]
fn words(w: &[u32; 4]) -> [u8; 16] {
    let w = [
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    ];
    [
        w[0][0], w[0][1], w[0][2], w[0][3], w[1][0], w[1][1], w[1][2], w[1][3], w[2][0], w[2][1],
        w[2][2], w[2][3], w[3][0], w[3][1], w[3][2], w[3][3],
    ]
}

/// Fills a new flow's event with the frontend its connection dialled, if the cgroup programs
/// translated it (TCP; see `NW_SVC_CONNS`).
#[inline(always)]
pub fn dialled(ev: &mut FlowEvent) {
    if ev.is_reply != 0 || ev.protocol != 6 {
        return;
    }
    let key = SvcConnKey {
        saddr: ev.saddr,
        daddr: ev.daddr,
        sport_be: ev.sport_be,
        dport_be: ev.dport_be,
        protocol: 6,
        _pad: [0; 3],
    };
    if let Some(p) = NW_SVC_CONNS.get_ptr(key) {
        // SAFETY: a value pointer from a successful lookup, copied.
        let front = unsafe { *p };
        ev.svc_addr = front.addr;
        ev.svc_port_be = front.port_be;
        ev.svc_protocol = front.protocol;
    }
}
