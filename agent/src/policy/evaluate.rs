//! The verdict on a new flow, computed in user space exactly as the datapath computes it
//! (`evaluate` in `agent-ebpf/src/policy.rs`), from the same [`CompiledState`]. The tunnel uses
//! it for the connections it carries and the compiler's tests use it as their model of the
//! kernel, so both enforcement points read the compiled state one way. A change to either
//! function must be made to the other.
//!
//! They differ only in what they know about the peer ([`PeerFacts`]). The kernel has an address:
//! its identity (longest ipcache match, world when none) and its CIDR identity (longest policy
//! CIDR match). The tunnel also has the peer's certificate, whose SPIFFE ID matches some
//! principal identities ([`CompiledState::principal_identities`]). The compiler emits slices
//! for principal identities like for any peer identity, and no address ever maps to one, so in
//! the kernel they never match: a principal rule needs the tunnel.
//!
//! Lookups follow the kernel's maps: addresses are 128-bit with IPv4 as IPv4-mapped IPv6, so an
//! IPv4 `/n` is the IPv6 prefix `/96+n` (and an IPv6 prefix covering `::ffff:0:0/96` covers
//! IPv4 addresses too, as in the LPM trie).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use agent_common::{DIR_INGRESS, IDENTITY_ANY, POLICY_ALLOW, POLICY_DENY, drop_reason};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::compiled::{CompiledState, EndpointPolicy, PortEntry, SliceKey};
use crate::ca::SpiffeId;

/// What the evaluating side knows about the peer of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerFacts {
    /// The peer's identity: the longest ipcache match of its address
    /// ([`CompiledState::ipcache_lookup`]), `IDENTITY_WORLD` when there is none.
    pub identity: u32,
    /// The longest policy CIDR match of its address ([`CompiledState::policy_cidr_lookup`]).
    pub cidr_identity: Option<u32>,
    /// The principal identities its certificate matches
    /// ([`CompiledState::principal_identities`]); empty for plaintext.
    pub principal_identities: Vec<u32>,
}

/// The outcome for one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// `agent_common::drop_reason`: `NONE` when allowed, else `POLICY_DENY` or
    /// `POLICY_DEFAULT_DENY`.
    pub drop_reason: u8,
    /// The deciding rule (see [`CompiledState::rules`]); 0 when allowed because nothing
    /// enforces the direction.
    pub rule_id: u32,
}

/// Evaluates endpoint `ep`'s policy for a new flow in `direction` (`DIR_INGRESS`: the peer is
/// the source; `DIR_EGRESS`: the destination) to `protocol`/`port`.
///
/// As the kernel: the candidates are the peer's identity, its CIDR identity, its principal
/// identities, then the wildcard 0; for each, the longest port-prefix entry of the slice of the
/// flow's protocol, then of protocol 0. A deny anywhere wins at once; otherwise the first allow
/// seen decides; otherwise the direction's default deny applies, if the endpoint has one.
#[must_use]
pub fn evaluate(
    ep: &EndpointPolicy,
    direction: u8,
    peer: &PeerFacts,
    protocol: u8,
    port: u16,
) -> Verdict {
    let candidates = std::iter::once(peer.identity)
        .chain(peer.cidr_identity)
        .chain(peer.principal_identities.iter().copied())
        .chain(std::iter::once(IDENTITY_ANY));
    let mut allow_rule = None;
    for candidate in candidates {
        // Protocol 0 slices hold one entry for every port, which the kernel looks up with port
        // 0; so does this.
        for (protocol, port) in [(protocol, port), (0, 0)] {
            let key = SliceKey {
                peer_identity: candidate,
                direction,
                protocol,
            };
            let Some(entry) = ep
                .slices
                .get(&key)
                .and_then(|s| longest_port_match(s, port))
            else {
                continue;
            };
            if entry.verdict == POLICY_DENY {
                return Verdict {
                    allowed: false,
                    drop_reason: drop_reason::POLICY_DENY,
                    rule_id: entry.rule_id,
                };
            }
            if entry.verdict == POLICY_ALLOW && allow_rule.is_none() {
                allow_rule = Some(entry.rule_id);
            }
        }
    }
    if let Some(rule_id) = allow_rule {
        return Verdict {
            allowed: true,
            drop_reason: drop_reason::NONE,
            rule_id,
        };
    }
    let default_deny = if direction == DIR_INGRESS {
        ep.ingress_default_deny
    } else {
        ep.egress_default_deny
    };
    match default_deny {
        Some(rule_id) => Verdict {
            allowed: false,
            drop_reason: drop_reason::POLICY_DEFAULT_DENY,
            rule_id,
        },
        None => Verdict {
            allowed: true,
            drop_reason: drop_reason::NONE,
            rule_id: 0,
        },
    }
}

/// The HTTP requests `ep` allows from a peer with these facts on TCP `port`, when some of its
/// ingress allows restrict them (`rules.http`): the (rule id, allowed requests) of every
/// allow that covers the peer and the port. `None` when every request is allowed: the pod has
/// no HTTP rules, or some covering allow has none (an L4 allow lets every request through, as
/// in Cilium), or no allow covers the flow (then [`evaluate`] decided at L4 already).
///
/// The candidates are [`evaluate`]'s, so the two never disagree on who the peer is.
#[must_use]
pub fn http_rules(
    ep: &EndpointPolicy,
    peer: &PeerFacts,
    port: u16,
) -> Option<Vec<(u32, super::l7::HttpRules)>> {
    if ep.http_ingress.is_empty() {
        return None;
    }
    let candidates: Vec<u32> = std::iter::once(peer.identity)
        .chain(peer.cidr_identity)
        .chain(peer.principal_identities.iter().copied())
        .chain(std::iter::once(IDENTITY_ANY))
        .collect();
    let mut out = Vec::new();
    for allow in &ep.http_ingress {
        let covers = candidates.contains(&allow.peer_identity)
            && (allow.protocol == 0 || allow.protocol == super::model::PROTO_TCP)
            && (allow.first..=allow.last).contains(&port);
        if !covers {
            continue;
        }
        match &allow.http {
            None => return None,
            Some(rules) => out.push((allow.rule_id, rules.clone())),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The entry with the longest port prefix covering `port`, as the policy LPM trie finds it.
fn longest_port_match(entries: &[PortEntry], port: u16) -> Option<&PortEntry> {
    entries
        .iter()
        .filter(|e| {
            let ignored = 16 - u32::from(e.prefix_len.min(16));
            // A shift by 16 would overflow a u16: prefix 0 covers every port.
            ignored == 16 || (e.port >> ignored) == (port >> ignored)
        })
        .max_by_key(|e| e.prefix_len)
}

impl CompiledState {
    /// The identity of `ip` in the ipcache (longest prefix match), `None` when no prefix covers
    /// it (the datapath then uses `IDENTITY_WORLD`).
    #[must_use]
    pub fn ipcache_lookup(&self, ip: IpAddr) -> Option<u32> {
        longest_prefix_match(&self.ipcache, ip)
    }

    /// The CIDR identity of `ip` (longest match among the policy CIDRs), if any.
    #[must_use]
    pub fn policy_cidr_lookup(&self, ip: IpAddr) -> Option<u32> {
        longest_prefix_match(&self.policy_cidrs, ip)
    }

    /// The principal identities a certificate with SPIFFE ID `id` matches, in [`Self::principals`]
    /// order. Checking the certificate's chain and trust domain is the TLS handshake's job.
    #[must_use]
    pub fn principal_identities(&self, id: &SpiffeId) -> Vec<u32> {
        self.principals
            .iter()
            .filter(|(m, _)| m.matches(id))
            .map(|(_, identity)| *identity)
            .collect()
    }
}

/// Longest prefix match in the kernel's address space: `ip` as 128 bits (IPv4 mapped), prefixes
/// tried from /128 down, each as the IPv4 prefix it is (from /96 up, for an IPv4-mapped address)
/// or as the IPv6 one: one or two tree lookups per prefix length, whatever the size of the map.
/// The map's prefixes have no host bits set (the compiler truncates them).
fn longest_prefix_match(map: &BTreeMap<IpNet, u32>, ip: IpAddr) -> Option<u32> {
    let v6: Ipv6Addr = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    let v4 = v6.to_ipv4_mapped();
    (0..=128u8).rev().find_map(|bits| {
        let as_v4 = v4
            .filter(|_| bits >= 96)
            .and_then(|a| Ipv4Net::new(a, bits - 96).ok())
            .and_then(|n| map.get(&IpNet::V4(n.trunc())));
        as_v4
            .or_else(|| {
                Ipv6Net::new(v6, bits)
                    .ok()
                    .and_then(|n| map.get(&IpNet::V6(n.trunc())))
            })
            .copied()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::DIR_EGRESS;

    const TCP: u8 = 6;
    const PEER: u32 = 300;
    const CIDR: u32 = 1 << 24;
    const PRINCIPAL: u32 = 400;

    fn allow(port: u16, prefix_len: u8, rule_id: u32) -> PortEntry {
        PortEntry {
            port,
            prefix_len,
            verdict: POLICY_ALLOW,
            rule_id,
        }
    }

    fn deny(port: u16, prefix_len: u8, rule_id: u32) -> PortEntry {
        PortEntry {
            verdict: POLICY_DENY,
            ..allow(port, prefix_len, rule_id)
        }
    }

    fn endpoint(slices: &[(u32, u8, Vec<PortEntry>)]) -> EndpointPolicy {
        EndpointPolicy {
            identity: 256,
            ingress_default_deny: Some(77),
            slices: slices
                .iter()
                .map(|(peer, protocol, entries)| {
                    (
                        SliceKey {
                            peer_identity: *peer,
                            direction: DIR_INGRESS,
                            protocol: *protocol,
                        },
                        entries.clone(),
                    )
                })
                .collect(),
            ..EndpointPolicy::default()
        }
    }

    fn facts(principals: &[u32]) -> PeerFacts {
        PeerFacts {
            identity: PEER,
            cidr_identity: Some(CIDR),
            principal_identities: principals.to_vec(),
        }
    }

    fn ingress(ep: &EndpointPolicy, peer: &PeerFacts, port: u16) -> Verdict {
        evaluate(ep, DIR_INGRESS, peer, TCP, port)
    }

    #[test]
    fn the_first_allow_in_candidate_order_names_the_rule() {
        let mut slices = vec![
            (IDENTITY_ANY, TCP, vec![allow(80, 16, 4)]),
            (PRINCIPAL, TCP, vec![allow(80, 16, 3)]),
            (CIDR, TCP, vec![allow(80, 16, 2)]),
            (PEER, 0, vec![allow(0, 0, 1)]),
        ];
        for want in [1, 2, 3, 4] {
            let v = ingress(&endpoint(&slices), &facts(&[PRINCIPAL]), 80);
            assert_eq!(
                v,
                Verdict {
                    allowed: true,
                    drop_reason: drop_reason::NONE,
                    rule_id: want
                }
            );
            slices.pop();
        }
    }

    #[test]
    fn a_deny_for_any_candidate_wins_over_an_earlier_allow() {
        let ep = endpoint(&[
            (PEER, TCP, vec![allow(0, 0, 1)]),
            (IDENTITY_ANY, 0, vec![deny(0, 0, 9)]),
        ]);
        let v = ingress(&ep, &facts(&[]), 443);
        assert_eq!(
            v,
            Verdict {
                allowed: false,
                drop_reason: drop_reason::POLICY_DENY,
                rule_id: 9
            }
        );
    }

    #[test]
    fn principal_slices_match_only_with_the_principal_identity() {
        let ep = endpoint(&[(PRINCIPAL, TCP, vec![allow(8080, 16, 5)])]);
        assert!(ingress(&ep, &facts(&[PRINCIPAL]), 8080).allowed);
        let plaintext = ingress(&ep, &facts(&[]), 8080);
        assert_eq!(
            plaintext,
            Verdict {
                allowed: false,
                drop_reason: drop_reason::POLICY_DEFAULT_DENY,
                rule_id: 77
            },
            "without a certificate the principal's entries never match"
        );
    }

    #[test]
    fn the_longest_port_prefix_of_a_slice_decides() {
        let ep = endpoint(&[(
            PEER,
            TCP,
            vec![allow(0, 0, 1), deny(8000, 13, 2), allow(8004, 16, 3)],
        )]);
        let rule = |port| ingress(&ep, &facts(&[]), port).rule_id;
        assert_eq!(rule(80), 1);
        assert_eq!(rule(8001), 2);
        assert_eq!(rule(8004), 3);
        assert_eq!(rule(8008), 1);
        assert_eq!(rule(65535), 1);
    }

    #[test]
    fn what_no_entry_matches_follows_the_direction_default() {
        let ep = endpoint(&[(PEER, TCP, vec![allow(80, 16, 1)])]);
        let v = ingress(&ep, &facts(&[]), 81);
        assert_eq!(
            (v.allowed, v.drop_reason, v.rule_id),
            (false, drop_reason::POLICY_DEFAULT_DENY, 77)
        );
        let v = evaluate(&ep, DIR_EGRESS, &facts(&[]), TCP, 81);
        assert_eq!(
            v,
            Verdict {
                allowed: true,
                drop_reason: drop_reason::NONE,
                rule_id: 0
            },
            "egress is not enforced"
        );
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn address_lookups_take_the_longest_prefix_in_the_kernel_address_space() {
        let state = CompiledState {
            ipcache: BTreeMap::from([(net("10.0.1.2/32"), 300), (net("fd00::2/128"), 301)]),
            policy_cidrs: BTreeMap::from([
                (net("10.0.0.0/8"), 1),
                (net("10.0.1.0/24"), 2),
                (net("fd00::/64"), 3),
                (net("::ffff:0:0/96"), 4),
            ]),
            ..CompiledState::default()
        };
        assert_eq!(state.ipcache_lookup(ip("10.0.1.2")), Some(300));
        assert_eq!(
            state.ipcache_lookup(ip("::ffff:10.0.1.2")),
            Some(300),
            "IPv4-mapped"
        );
        assert_eq!(state.ipcache_lookup(ip("fd00::2")), Some(301));
        assert_eq!(state.ipcache_lookup(ip("10.0.1.3")), None);
        assert_eq!(state.policy_cidr_lookup(ip("10.0.1.9")), Some(2));
        assert_eq!(state.policy_cidr_lookup(ip("10.9.9.9")), Some(1));
        assert_eq!(state.policy_cidr_lookup(ip("fd00::9")), Some(3));
        assert_eq!(state.policy_cidr_lookup(ip("fd01::9")), None);
        assert_eq!(
            state.policy_cidr_lookup(ip("192.0.2.1")),
            Some(4),
            "an IPv6 prefix over the IPv4-mapped range covers IPv4, as in the trie"
        );
    }
}
