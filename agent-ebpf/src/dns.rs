//! DNS steering: a datagram, UDP connect or TCP connect to a Service frontend on port 53 goes
//! to the agent's DNS proxy instead of a backend, but only while the proxy's socket for that
//! transport is open.
//!
//! `NW_DNS_SOCKET` holds the proxy's UDP socket (slot 0) and TCP listener (slot 1), never
//! pinned: the kernel drops an entry when its socket closes (the agent stops or dies), and
//! from then on DNS goes straight to a kube-dns backend again, so a restart loses no query. `NW_DNS_PROXY` holds the address the
//! pods reach the proxy at (slot 0) and the resolver the proxy forwards to (slot 1); the agent
//! writes them. Policy judges a pod's datagram to the proxy as going to that resolver
//! ([`policy_target`]), so a rule allowing DNS to kube-dns covers steered DNS too.

use agent_common::{Backend, RevNatKey, ServiceKey};
use aya_ebpf::{
    helpers::generated::{bpf_map_lookup_elem, bpf_sk_release},
    macros::map,
    maps::{Array, SockMap},
};

#[map]
static NW_DNS_SOCKET: SockMap = SockMap::with_max_entries(2, 0);

#[map]
static NW_DNS_PROXY: Array<Backend> = Array::with_max_entries(2, 0);

/// `NW_DNS_PROXY` slots.
const SLOT_PROXY: u32 = 0;
const SLOT_UPSTREAM: u32 = 1;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT_BE: u16 = 53u16.to_be();

/// The proxy's address when `key` is a DNS frontend and the proxy is up; the caller rewrites
/// the destination to it and records `rev` so the reply shows the frontend.
#[inline(always)]
pub fn steer(key: &ServiceKey) -> Option<Backend> {
    if key.port_be != DNS_PORT_BE {
        return None;
    }
    // The `NW_DNS_SOCKET` slot of the transport's socket.
    let slot: u32 = match key.protocol {
        IPPROTO_UDP => 0,
        IPPROTO_TCP => 1,
        _ => return None,
    };
    let proxy = *NW_DNS_PROXY.get(SLOT_PROXY)?;
    if proxy.port_be == 0 {
        return None;
    }
    // SAFETY: a lookup in a sockmap by a key on the stack; the kernel returns a referenced
    // socket or null, and the reference is released at once (only its presence matters).
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::addr_of!(NW_DNS_SOCKET).cast_mut().cast(),
            core::ptr::addr_of!(slot).cast(),
        );
        if sk.is_null() {
            return None;
        }
        bpf_sk_release(sk.cast());
    }
    Some(proxy)
}

/// The reverse-translation key for a socket steered to `proxy`.
#[inline(always)]
pub fn revnat(cookie: u64, proxy: Backend) -> RevNatKey {
    RevNatKey {
        cookie,
        backend: proxy,
        _pad: [0; 4],
    }
}

/// Where policy should see a pod's UDP datagram or TCP connection to `peer`:`dport_be` going:
/// the resolver the proxy forwards to when `peer` is the DNS proxy (and the agent has named a
/// resolver), else `None` (the destination itself).
#[inline(always)]
pub fn policy_target(protocol: u8, peer: &[u8; 16], dport_be: u16) -> Option<&'static Backend> {
    if protocol != IPPROTO_UDP && protocol != IPPROTO_TCP {
        return None;
    }
    let proxy = NW_DNS_PROXY.get(SLOT_PROXY)?;
    if proxy.port_be == 0 || proxy.port_be != dport_be || !crate::addr_eq(&proxy.addr, peer) {
        return None;
    }
    let upstream = NW_DNS_PROXY.get(SLOT_UPSTREAM)?;
    if upstream.port_be == 0 {
        return None;
    }
    Some(upstream)
}
