//! DNS steering: a datagram (or UDP connect) to a Service frontend on port 53 goes to the
//! agent's DNS proxy instead of a backend, but only while the proxy's socket is open.
//!
//! `NW_DNS_SOCKET` holds the proxy's UDP socket, never pinned: the kernel drops the entry when
//! the socket closes (the agent stops or dies), and from then on DNS goes straight to a
//! kube-dns backend again, so a restart loses no query. `NW_DNS_PROXY` holds the address the
//! pods reach the proxy at (the agent writes both).

use agent_common::{Backend, RevNatKey, ServiceKey};
use aya_ebpf::{
    helpers::generated::{bpf_map_lookup_elem, bpf_sk_release},
    macros::map,
    maps::{Array, SockMap},
};

#[map]
static NW_DNS_SOCKET: SockMap = SockMap::with_max_entries(1, 0);

#[map]
static NW_DNS_PROXY: Array<Backend> = Array::with_max_entries(1, 0);

const IPPROTO_UDP: u8 = 17;
const DNS_PORT_BE: u16 = 53u16.to_be();

/// The proxy's address when `key` is a DNS frontend and the proxy is up; the caller rewrites
/// the destination to it and records `rev` so the reply shows the frontend.
#[inline(always)]
pub fn steer(key: &ServiceKey) -> Option<Backend> {
    if key.protocol != IPPROTO_UDP || key.port_be != DNS_PORT_BE {
        return None;
    }
    let proxy = *NW_DNS_PROXY.get(0)?;
    if proxy.port_be == 0 {
        return None;
    }
    let slot: u32 = 0;
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
