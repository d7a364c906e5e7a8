//! Socket-level Service translation: cgroup `sock_addr` programs on the agent's `--cgroup`.
//!
//! A connect (TCP, or UDP `connect`) or an unconnected datagram to a Service frontend
//! (`ClusterIP:port/protocol`) is rewritten to one backend chosen at random before the kernel
//! looks up a route, so no packet ever carries the `ClusterIP` and every later hook (the TC
//! classifiers, policy, the tunnel) sees the backend pod. The application keeps seeing the
//! `ClusterIP`: `getpeername` and the source of UDP replies are mapped back through
//! `NW_SVC_REVNAT`. A frontend with no usable backend refuses at once with `ECONNREFUSED`, as
//! kube-proxy's reject rule does. Layout and write order: `agent_common::ServiceKey`.

use agent_common::{
    Backend, BackendKey, COUNTER_SVC_NO_BACKEND, COUNTER_SVC_TRANSLATED, MAX_SERVICE_BACKENDS,
    MAX_SERVICE_REVNAT, MAX_SERVICES, ServiceKey, ServiceValue,
};
use aya_ebpf::{
    helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
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

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;
/// `sock_addr` verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn svc_connect4(ctx: SockAddrContext) -> i32 {
    translate4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn svc_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn svc_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    // recvmsg programs may only allow.
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn svc_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    ALLOW
}

/// IPv4 as the maps' IPv4-mapped form; `ip4` is in network order (its bytes are the octets).
#[inline(always)]
fn mapped(ip4: u32) -> [u8; 16] {
    let o = ip4.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
    ]
}

/// The frontend the socket address names, if the address is IPv4.
#[inline(always)]
fn frontend(ctx: &SockAddrContext) -> Option<ServiceKey> {
    // SAFETY: `sock_addr` is the context pointer the kernel passed to the program; the fields
    // read are readable in every sock_addr attach type used here.
    let (family, ip4, port, protocol) = unsafe {
        let sa = ctx.sock_addr;
        (
            (*sa).user_family,
            (*sa).user_ip4,
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    if family != AF_INET {
        return None;
    }
    Some(ServiceKey {
        addr: mapped(ip4),
        // The port is in network order in the low 16 bits.
        port_be: port as u16,
        protocol: protocol as u8,
        _pad: 0,
    })
}

#[inline(always)]
fn translate4(ctx: &SockAddrContext) -> i32 {
    let Some(key) = frontend(ctx) else {
        return ALLOW;
    };
    let backends = match NW_SERVICES.get_ptr(key) {
        // SAFETY: a value pointer from a successful lookup, read once.
        Some(p) => unsafe { (*p).count },
        None => return ALLOW, // not a Service address
    };
    if backends == 0 {
        count(COUNTER_SVC_NO_BACKEND);
        // SAFETY: plain helper call; allowed in cgroup sock_addr programs (kernel 5.18+).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    // SAFETY: plain helper call.
    let pick = unsafe { bpf_get_prandom_u32() } % backends;
    let slot = BackendKey {
        service: key,
        slot: pick + 1,
    };
    let backend = match NW_SVC_BACKENDS.get_ptr(slot) {
        // SAFETY: as above.
        Some(p) => unsafe { *p },
        // A slot past the count while the agent shrinks a set: take the first, which is
        // written before any count that includes it.
        None => match NW_SVC_BACKENDS.get_ptr(BackendKey {
            service: key,
            slot: 1,
        }) {
            // SAFETY: as above.
            Some(p) => unsafe { *p },
            None => {
                count(COUNTER_SVC_NO_BACKEND);
                // SAFETY: plain helper call.
                unsafe { bpf_set_retval(-ECONNREFUSED) };
                return REJECT;
            }
        },
    };
    // SAFETY: the context pointer; socket cookies are available to sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rev = agent_common::RevNatKey {
        cookie,
        backend,
        _pad: [0; 4],
    };
    // Without the entry the translation still works; only the peer name would show the pod.
    let _ = NW_SVC_REVNAT.insert(rev, key, 0);
    let a = backend.addr;
    // SAFETY: `user_ip4` and `user_port` are writable in connect4 and sendmsg4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        (*ctx.sock_addr).user_port = u32::from(backend.port_be);
    }
    count(COUNTER_SVC_TRANSLATED);
    ALLOW
}

/// Shows a translated socket's peer (or a reply datagram's source) as the frontend.
#[inline(always)]
fn reverse4(ctx: &SockAddrContext) {
    // SAFETY: the context pointer, as in `frontend`.
    let (family, ip4, port) = unsafe {
        let sa = ctx.sock_addr;
        ((*sa).user_family, (*sa).user_ip4, (*sa).user_port)
    };
    if family != AF_INET {
        return;
    }
    // SAFETY: as in `translate4`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rev = agent_common::RevNatKey {
        cookie,
        backend: Backend {
            addr: mapped(ip4),
            port_be: port as u16,
            _pad: [0; 2],
        },
        _pad: [0; 4],
    };
    let Some(p) = NW_SVC_REVNAT.get_ptr(rev) else {
        return;
    };
    // SAFETY: a value pointer from a successful lookup.
    let front = unsafe { *p };
    let a = front.addr;
    // SAFETY: `user_ip4` and `user_port` are writable in recvmsg4 and getpeername4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        (*ctx.sock_addr).user_port = u32::from(front.port_be);
    }
}
