//! Packet parsing: Ethernet, IPv4 (options skipped, fragments), IPv6 (extension headers with a
//! constant bound) and the L4 ports. Every read goes through [`load`], which checks the offset
//! against the end of the L3 packet, then reads the skb's linear data directly (headers are
//! there in practice; a helper call per header was a third of an established packet's cost) and
//! falls back to `bpf_skb_load_bytes` otherwise, so non-linear skbs parse the same as linear ones
//! and a truncated header is an error, never a read past the end.

use agent_common::{FlowEvent, FragKey, FragValue, drop_reason};
use aya_ebpf::programs::TcContext;

use crate::{NW_FRAGMENTS, frame};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

/// Extension headers the IPv6 parser follows before it gives up (`IPV6_EXT_TOO_DEEP`).
pub const MAX_IPV6_EXT_HEADERS: u32 = 8;

/// What a packet carries beyond the fields that go into its [`FlowEvent`].
#[derive(Clone, Copy, Default)]
pub struct L4Info {
    /// ICMPv6 neighbour discovery, router discovery or MLD: link-local control traffic that
    /// passes without policy.
    pub icmpv6_link_control: bool,
}

/// The one bounds-checked access to packet bytes: the `N` bytes at `off`, which must lie before
/// `end` (the end of the L3 packet as its header says, itself checked against the skb length).
/// Any failure is a malformed packet.
#[inline(always)]
pub fn load<const N: usize>(ctx: &TcContext, off: usize, end: usize) -> Result<[u8; N], u8> {
    let last = off.checked_add(N).ok_or(drop_reason::MALFORMED)?;
    if last > end {
        return Err(drop_reason::MALFORMED);
    }
    // In place when the bytes are in the linear data; the bound on `off` is for the verifier (a
    // packet pointer's offset must stay small).
    if off <= DIRECT_MAX_OFF {
        let p = ctx.data() + off;
        if p + N <= ctx.data_end() {
            // SAFETY: `p..p + N` lies inside the skb's linear data (checked against `data_end`
            // just above); a byte array has no alignment and every value is valid.
            return Ok(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) });
        }
    }
    ctx.load::<[u8; N]>(off).map_err(|_| drop_reason::MALFORMED)
}

/// Offsets up to which [`load`] reads the linear data directly.
const DIRECT_MAX_OFF: usize = 1024;

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// The ethertype, in host order.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Result<u16, u8> {
    let b: [u8; 2] = load(ctx, 12, ctx.len() as usize)?;
    Ok(be16(b[0], b[1]))
}

#[inline(always)]
pub fn ipv4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Parses an IPv4 packet into `ev` (addresses, protocol, ports, TCP flags) and `info`; a
/// separate BPF function (see [`frame`]).
#[inline(never)]
pub fn parse_ipv4(ctx: &TcContext, ev: &mut FlowEvent, info: &mut L4Info) -> u8 {
    frame::code(ipv4(ctx, ev).map(|i| *info = i))
}

/// Parses an IPv6 packet into `ev`, following extension headers; separate, as above.
#[inline(never)]
pub fn parse_ipv6(ctx: &TcContext, ev: &mut FlowEvent, info: &mut L4Info) -> u8 {
    frame::code(ipv6(ctx, ev).map(|i| *info = i))
}

#[inline(always)]
fn ipv4(ctx: &TcContext, ev: &mut FlowEvent) -> Result<L4Info, u8> {
    let skb_len = ctx.len() as usize;
    let hdr: [u8; 20] = load(ctx, ETH_HLEN, skb_len)?;
    if hdr[0] >> 4 != 4 {
        return Err(drop_reason::MALFORMED);
    }
    // Options are skipped, not interpreted: ihl*4 is where L4 starts.
    let hdr_len = usize::from(hdr[0] & 0x0f) * 4;
    if hdr_len < 20 {
        return Err(drop_reason::MALFORMED);
    }
    let total_len = usize::from(be16(hdr[2], hdr[3]));
    if total_len < hdr_len {
        return Err(drop_reason::MALFORMED);
    }
    let end = ETH_HLEN + total_len;
    if end > skb_len {
        return Err(drop_reason::MALFORMED);
    }

    ev.family = 4;
    ev.protocol = hdr[9];
    ev.saddr = ipv4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    ev.daddr = ipv4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);

    let frag = be16(hdr[6], hdr[7]);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    let id = u32::from(be16(hdr[4], hdr[5]));

    if frag_offset != 0 {
        // RFC 1858: a TCP fragment at offset 8 bytes can only serve to overwrite the header of
        // the first one.
        if frag_offset == 1 && ev.protocol == IPPROTO_TCP {
            return Err(drop_reason::MALFORMED);
        }
        ports_from_head(ev, id)?;
        return Ok(L4Info::default());
    }

    let info = parse_l4(ctx, ev, ETH_HLEN + hdr_len, end)?;
    if more_fragments {
        record_head(ev, id);
    }
    Ok(info)
}

#[inline(always)]
fn ipv6(ctx: &TcContext, ev: &mut FlowEvent) -> Result<L4Info, u8> {
    let skb_len = ctx.len() as usize;
    let hdr: [u8; 40] = load(ctx, ETH_HLEN, skb_len)?;
    if hdr[0] >> 4 != 6 {
        return Err(drop_reason::MALFORMED);
    }
    let payload_len = usize::from(be16(hdr[4], hdr[5]));
    // A payload length of 0 is a jumbogram (the length is in a hop-by-hop option): bound by the
    // skb instead.
    let end = if payload_len == 0 {
        skb_len
    } else {
        ETH_HLEN + 40 + payload_len
    };
    if end > skb_len {
        return Err(drop_reason::MALFORMED);
    }

    ev.family = 6;
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr.copy_from_slice(&hdr[8..24]);
    daddr.copy_from_slice(&hdr[24..40]);
    ev.saddr = saddr;
    ev.daddr = daddr;

    let mut next = hdr[6];
    let mut off = ETH_HLEN + 40;
    // Not an `Option`: see `policy::evaluate` on undefined payloads and the verifier.
    let mut is_head = false;
    let mut head_id = 0u32;
    let mut found_l4 = false;
    // Constant bound: one iteration per extension header, plus one to see the L4 protocol.
    for _ in 0..MAX_IPV6_EXT_HEADERS + 1 {
        match next {
            IPV6_HOP_BY_HOP | IPV6_DEST_OPTS => {
                let h: [u8; 2] = load(ctx, off, end)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            IPV6_AUTH => {
                let h: [u8; 2] = load(ctx, off, end)?;
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let h: [u8; 8] = load(ctx, off, end)?;
                next = h[0];
                off += 8;
                let frag_offset = be16(h[2], h[3]) >> 3;
                let more_fragments = h[3] & 1 != 0;
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if frag_offset != 0 {
                    // Not the first fragment: no L4 header here. The key uses the fragment
                    // header's next header, which is the L4 protocol unless the first fragment
                    // carried more extension headers after this one (then no head matches and
                    // the fragment is dropped: fail closed).
                    ev.protocol = next;
                    ports_from_head(ev, id)?;
                    return Ok(L4Info::default());
                }
                if more_fragments {
                    is_head = true;
                    head_id = id;
                }
            }
            IPV6_ROUTING => return Err(drop_reason::IPV6_ROUTING_HEADER),
            _ => {
                found_l4 = true;
                break;
            }
        }
    }
    if !found_l4 {
        return Err(drop_reason::IPV6_EXT_TOO_DEEP);
    }
    if off > end {
        return Err(drop_reason::MALFORMED);
    }

    ev.protocol = next;
    let info = parse_l4(ctx, ev, off, end)?;
    if is_head {
        record_head(ev, head_id);
    }
    Ok(info)
}

/// Ports (and TCP flags) of TCP, UDP and SCTP; the echo id of ICMP and ICMPv6 echo request and
/// reply as both ports, so the reply's reversed tuple finds the request's conntrack entry.
/// Protocol 59 (no next header) and anything else: no ports.
#[inline(always)]
fn parse_l4(ctx: &TcContext, ev: &mut FlowEvent, off: usize, end: usize) -> Result<L4Info, u8> {
    let mut info = L4Info::default();
    match ev.protocol {
        IPPROTO_TCP => {
            let h: [u8; 20] = load(ctx, off, end)?;
            if h[12] >> 4 < 5 {
                return Err(drop_reason::MALFORMED);
            }
            ev.sport_be = u16::from_ne_bytes([h[0], h[1]]);
            ev.dport_be = u16::from_ne_bytes([h[2], h[3]]);
            ev.tcp_flags = h[13];
        }
        IPPROTO_UDP => {
            let h: [u8; 8] = load(ctx, off, end)?;
            ev.sport_be = u16::from_ne_bytes([h[0], h[1]]);
            ev.dport_be = u16::from_ne_bytes([h[2], h[3]]);
        }
        IPPROTO_SCTP => {
            let h: [u8; 12] = load(ctx, off, end)?;
            ev.sport_be = u16::from_ne_bytes([h[0], h[1]]);
            ev.dport_be = u16::from_ne_bytes([h[2], h[3]]);
        }
        IPPROTO_ICMP if ev.family == 4 => {
            let h: [u8; 8] = load(ctx, off, end)?;
            // 8 echo request, 0 echo reply.
            if h[0] == 8 || h[0] == 0 {
                let id = u16::from_ne_bytes([h[4], h[5]]);
                ev.sport_be = id;
                ev.dport_be = id;
            }
        }
        IPPROTO_ICMPV6 if ev.family == 6 => {
            let h: [u8; 8] = load(ctx, off, end)?;
            match h[0] {
                // Echo request and reply.
                128 | 129 => {
                    let id = u16::from_ne_bytes([h[4], h[5]]);
                    ev.sport_be = id;
                    ev.dport_be = id;
                }
                // MLD query/report/done, router and neighbour discovery, redirect, MLDv2
                // report.
                130..=137 | 143 => info.icmpv6_link_control = true,
                _ => {}
            }
        }
        _ => {}
    }
    Ok(info)
}

#[inline(always)]
fn frag_key(ev: &FlowEvent, id: u32) -> FragKey {
    FragKey {
        saddr: ev.saddr,
        daddr: ev.daddr,
        id,
        protocol: ev.protocol,
        _pad: [0; 3],
    }
}

/// Remembers the ports of a first fragment for the fragments that follow it.
#[inline(always)]
fn record_head(ev: &FlowEvent, id: u32) {
    let value = FragValue {
        sport_be: ev.sport_be,
        dport_be: ev.dport_be,
    };
    // A failed insert only means the later fragments will be dropped: fail closed.
    let _ = NW_FRAGMENTS.insert(frag_key(ev, id), value, 0);
}

/// Ports of a non-first fragment, from its first fragment.
#[inline(always)]
fn ports_from_head(ev: &mut FlowEvent, id: u32) -> Result<(), u8> {
    match NW_FRAGMENTS.get_ptr(frag_key(ev, id)) {
        Some(p) => {
            // SAFETY: a map value pointer from a successful lookup, valid for this program run.
            let v = unsafe { *p };
            ev.sport_be = v.sport_be;
            ev.dport_be = v.dport_be;
            Ok(())
        }
        None => Err(drop_reason::FRAGMENT_NO_HEAD),
    }
}
