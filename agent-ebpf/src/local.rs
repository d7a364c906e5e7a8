//! The tunnel's same-node fast path: when both ends of a meshed connection are pods of this
//! node, the agent authorizes it and then joins its two pod-facing sockets (the outbound
//! listener's accepted socket and the transparent connect to the destination) in the kernel, so
//! no byte crosses user space (Cilium's sockmap acceleration, between the agent's own sockets).
//!
//! `NW_LOCAL_PEERS` holds each joined socket under its *peer's* socket cookie, so the verdict
//! program finds where a socket's data goes by that socket's own cookie. A socket whose peer is
//! not (yet, or no longer) in the map keeps its data (`SK_PASS`): the agent reads it and sends it
//! on itself. `NW_LOCAL_BYTES` counts, per socket cookie, the bytes redirected from it, so the
//! agent can tell when the peer has sent them before it passes on a FIN. Neither map is pinned:
//! the sockets belong to the running agent, and the kernel drops an entry when its socket
//! closes. This program is its own file and touches no classifier map: the TC programs' stack is
//! near its limit and stays untouched.

use agent_common::MAX_LOCAL_SOCKETS;
use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};

#[map]
static NW_LOCAL_PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_LOCAL_SOCKETS, 0);

#[map]
static NW_LOCAL_BYTES: HashMap<u64, u64> = HashMap::with_max_entries(MAX_LOCAL_SOCKETS, 0);

/// Stream verdict of every socket in `NW_LOCAL_PEERS`: its data goes out of its peer socket.
#[stream_verdict]
pub fn local_splice(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context's own `__sk_buff`; the kernel gives the socket the data arrived on.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN. The agent passes it on itself once the data before it left; sent to the
        // peer, it would fail there after that shutdown and set an error on the peer socket.
        return SK_DROP;
    }
    let verdict = NW_LOCAL_PEERS.redirect_skb(&ctx, &mut cookie, 0);
    if verdict != i64::from(SK_PASS) {
        // No peer: the data stays on this socket for the agent to read.
        return SK_PASS;
    }
    if let Some(bytes) = NW_LOCAL_BYTES.get_ptr_mut(cookie) {
        // SAFETY: a valid, aligned pointer into the map's value. No atomic add needed: one
        // socket's data is handed to this program under that socket's lock, so only one CPU
        // counts for a cookie at a time.
        unsafe { *bytes += len };
    }
    SK_PASS
}
