//! Policy evaluation (ipcache, CIDR identities, the policy LPM trie) and conntrack.

use agent_common::{
    CT_F_STORED_REVERSED, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ENFORCED,
    EP_INGRESS_ENFORCED, EndpointInfo, FlowEvent, IDENTITY_ANY, IDENTITY_WORLD, IpcacheValue,
    POLICY_ALLOW, POLICY_DENY, POLICY_KEY_PREFIX_FULL, PolicyKey, PolicyValue, VERDICT_DROPPED,
    VERDICT_FORWARDED, drop_reason, opposite,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{NW_CONNTRACK, NW_IPCACHE, NW_POLICY, NW_POLICY_CIDRS};

/// The outcome of evaluating policy for one flow.
#[derive(Clone, Copy, Default)]
pub struct Decision {
    pub verdict: u8,
    pub drop_reason: u8,
    pub rule_id: u32,
    pub peer_identity: u32,
    /// The peer's `IPCACHE_*` flags (0 when the ipcache does not know it).
    pub peer_flags: u32,
}

#[inline(always)]
fn lookup_identity(
    trie: &aya_ebpf::maps::LpmTrie<[u8; 16], IpcacheValue>,
    addr: &[u8; 16],
) -> Option<u32> {
    trie.get(Key::new(128, *addr)).map(|v| v.identity)
}

/// The ipcache's identity and flags for `addr` (world and no flags when it has none).
#[inline(always)]
pub fn peer(addr: &[u8; 16]) -> (u32, u32) {
    match NW_IPCACHE.get(Key::new(128, *addr)) {
        Some(v) => (v.identity, v.flags),
        None => (IDENTITY_WORLD, 0),
    }
}

#[inline(always)]
fn lookup_policy(
    set_be: u32,
    peer: u32,
    direction: u8,
    protocol: u8,
    dport_be: u16,
) -> PolicyValue {
    let key = Key::new(
        POLICY_KEY_PREFIX_FULL,
        PolicyKey {
            policy_set_be: set_be,
            peer_identity_be: peer.to_be(),
            direction,
            protocol,
            dport_be,
        },
    );
    // A missing entry reads as verdict 0, which is neither allow nor deny.
    NW_POLICY.get(key).copied().unwrap_or_default()
}

/// Evaluates the policy of endpoint `ep` for the flow whose original packet is `key`, or the
/// reverse of `key` when `reversed` (as conntrack stores it: see `CtKey`). The original's
/// direction is the policy direction; the peer is its destination for egress, its source for
/// ingress.
///
/// Peers tried: the peer's identity (ipcache, default world), its CIDR identity if any, and the
/// wildcard 0; for each, the exact protocol and port, then protocol 0 (any). A deny anywhere
/// wins; else the first allow; else the direction's default.
///
/// A separate BPF function (see [`crate::frame`]); it returns the verdict.
#[inline(never)]
pub fn evaluate(ep: &EndpointInfo, key: &CtKey, reversed: bool, out: &mut Decision) -> u8 {
    decide(ep, key, reversed, out);
    out.verdict
}

#[inline(always)]
fn decide(ep: &EndpointInfo, key: &CtKey, reversed: bool, out: &mut Decision) {
    let (direction, dport_be) = if reversed {
        (opposite(key.direction), key.sport_be)
    } else {
        (key.direction, key.dport_be)
    };
    // The original's destination is the stored source when stored reversed.
    let mut peer = if (direction == DIR_EGRESS) != reversed {
        &key.daddr
    } else {
        &key.saddr
    };
    // A pod's DNS steered to the agent's proxy is judged as going where the proxy sends it.
    let mut dport_be = dport_be;
    if direction == DIR_EGRESS
        && let Some(upstream) = crate::dns::policy_target(key.protocol, peer, dport_be)
    {
        peer = &upstream.addr;
        dport_be = upstream.port_be;
    }
    let (peer_identity, peer_flags) = self::peer(peer);
    // Plain values rather than `Option`s: LLVM may spill the undefined payload of a `None`,
    // which the verifier rejects as a read of an uninitialised register.
    let (has_cidr, cidr_identity) = match lookup_identity(&NW_POLICY_CIDRS, peer) {
        Some(id) => (true, id),
        None => (false, 0),
    };
    let set_be = ep.policy_set.to_be();
    out.peer_identity = peer_identity;
    out.peer_flags = peer_flags;

    let peers = [
        (true, peer_identity),
        (has_cidr, cidr_identity),
        (true, IDENTITY_ANY),
    ];
    let mut allowed = false;
    let mut allow_rule = 0u32;
    for (valid, candidate) in peers {
        if !valid {
            continue;
        }
        for (proto, port) in [(key.protocol, dport_be), (0, 0)] {
            let v = lookup_policy(set_be, candidate, direction, proto, port);
            if v.verdict == POLICY_DENY {
                out.verdict = VERDICT_DROPPED;
                out.drop_reason = drop_reason::POLICY_DENY;
                out.rule_id = v.rule_id;
                return;
            }
            if v.verdict == POLICY_ALLOW && !allowed {
                allowed = true;
                allow_rule = v.rule_id;
            }
        }
    }
    if allowed {
        out.verdict = VERDICT_FORWARDED;
        out.drop_reason = drop_reason::NONE;
        out.rule_id = allow_rule;
        return;
    }
    let (enforced, default_rule) = if direction == DIR_INGRESS {
        (ep.flags & EP_INGRESS_ENFORCED != 0, ep.ingress_default_rule)
    } else {
        (ep.flags & EP_EGRESS_ENFORCED != 0, ep.egress_default_rule)
    };
    if enforced {
        out.verdict = VERDICT_DROPPED;
        out.drop_reason = drop_reason::POLICY_DEFAULT_DENY;
        out.rule_id = default_rule;
    } else {
        out.verdict = VERDICT_FORWARDED;
        out.drop_reason = drop_reason::NONE;
        out.rule_id = 0;
    }
}

/// The conntrack key the packet described by `ev`, seen in `direction`, finds its flow's entry
/// under (see `CtKey`), and whether that is the reverse of the packet's own tuple.
///
/// Built straight from `ev`, its fields picked by pointer: choosing between two whole keys made
/// LLVM split them into bytes and spill each one, past the 512-byte stack.
#[inline(always)]
pub fn ct_stored_key(ev: &FlowEvent, direction: u8) -> (CtKey, bool) {
    let reversed = !CtKey::orders_first(&ev.saddr, ev.sport_be, &ev.daddr, ev.dport_be);
    let (src, sport_be, dst, dport_be, direction) = if reversed {
        (
            &ev.daddr,
            ev.dport_be,
            &ev.saddr,
            ev.sport_be,
            opposite(direction),
        )
    } else {
        (&ev.saddr, ev.sport_be, &ev.daddr, ev.dport_be, direction)
    };
    let key = CtKey {
        saddr: *src,
        daddr: *dst,
        sport_be,
        dport_be,
        protocol: ev.protocol,
        direction,
        _pad: [0; 2],
    };
    (key, reversed)
}

/// Whether a packet that found `value` under its key `reversed` (see [`ct_stored_key`]) is a
/// reply of the flow: the creating packet was stored reversed exactly when its tuple was not
/// canonical, so a packet stored the other way carries the reverse tuple.
#[inline(always)]
pub const fn ct_is_reply(value: &CtValue, reversed: bool) -> bool {
    reversed != (value.flags & CT_F_STORED_REVERSED != 0)
}

/// Stores a new flow; `false` when the table is full (`E2BIG`: a preallocated hash has no
/// free element left).
#[inline(always)]
pub fn ct_insert(key: &CtKey, value: &CtValue) -> bool {
    NW_CONNTRACK.insert(key, value, 0).is_ok()
}

/// The conntrack value recording `decision` for a flow of endpoint `ep` whose original
/// direction is `direction`, with `CT_F_*` `flags`.
#[inline(always)]
pub fn ct_value(
    ep: &EndpointInfo,
    direction: u8,
    decision: &Decision,
    generation: u32,
    flags: u8,
    now_s: u32,
) -> CtValue {
    let (src_identity, dst_identity) = if direction == DIR_EGRESS {
        (ep.identity, decision.peer_identity)
    } else {
        (decision.peer_identity, ep.identity)
    };
    CtValue {
        generation,
        rule_id: decision.rule_id,
        verdict: decision.verdict,
        drop_reason: decision.drop_reason,
        flags,
        _pad: 0,
        src_identity,
        dst_identity,
        last_seen_s: now_s,
    }
}
