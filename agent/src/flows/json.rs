//! A flow's JSON line, written straight into a buffer: the flow log writes one for every flow
//! the datapath reports, where serde's derived serializer spent most of its time escaping the
//! same keys and labels again for every line.
//!
//! The output is byte for byte what `serde_json::to_vec(&flow)` gives (the tests compare them),
//! so readers and `Flow`'s `Deserialize` are unchanged. Each writer names every field of its
//! type, so a field added to `Flow` or its parts does not compile until it is written here (and
//! it belongs in `every_field_and_escape_matches_serde`'s flows too).

use std::io::Write as _;
use std::sync::Arc;

use super::{Endpoint, Flow, Ip, L4, PerShared, PolicyRef, Ports};

/// Writes the flow log's lines, rendering once each end and each policy that flows share
/// (`flows::Endpoints`, the enrichment index's policies): their names and labels are most of a
/// line's text.
#[derive(Debug)]
pub struct LineWriter {
    ends: PerShared<Endpoint, Vec<u8>>,
    policies: PerShared<PolicyRef, Vec<u8>>,
}

/// Values kept rendered at most, of each kind.
pub(crate) const RENDERED_KEPT: usize = 1024;

impl Default for LineWriter {
    fn default() -> Self {
        Self {
            ends: PerShared::new(RENDERED_KEPT),
            policies: PerShared::new(RENDERED_KEPT),
        }
    }
}

impl LineWriter {
    /// Appends `flow` as JSON (no newline) to `out`.
    pub fn write_flow(&mut self, out: &mut Vec<u8>, flow: &Flow) {
        flow_with(out, flow, self);
    }
}

/// Appends `value`'s JSON, rendered once per shared value.
fn shared<T>(
    out: &mut Vec<u8>,
    kept: &mut PerShared<T, Vec<u8>>,
    value: &Arc<T>,
    render: fn(&mut Vec<u8>, &T),
) {
    // Only the flow holds it (a tunnel flow's end, say): not worth keeping, and not kept (an
    // entry would hold a reference too).
    if Arc::strong_count(value) == 1 {
        render(out, value);
        return;
    }
    let json = kept.get_or_insert_with(value, || {
        let mut json = Vec::with_capacity(256);
        render(&mut json, value);
        json
    });
    out.extend_from_slice(json);
}

fn flow_with(out: &mut Vec<u8>, flow: &Flow, w: &mut LineWriter) {
    // Every field by name: a field added to `Flow` does not compile until it is written here.
    let Flow {
        time,
        verdict,
        drop_reason_desc,
        ip:
            Ip {
                source: ip_source,
                destination: ip_destination,
                ip_version,
            },
        l4: layer4,
        l7: layer7,
        source,
        destination,
        traffic_direction,
        is_reply,
        node_name,
        kind,
        policy,
        destination_names,
        destination_service,
        tunnel_local,
        trace_context,
        summary,
    } = flow;
    out.extend_from_slice(b"{\"time\":");
    string(out, time);
    out.extend_from_slice(b",\"verdict\":");
    string(out, verdict);
    if !drop_reason_desc.is_empty() {
        out.extend_from_slice(b",\"drop_reason_desc\":");
        string(out, drop_reason_desc);
    }
    out.extend_from_slice(b",\"IP\":{\"source\":\"");
    // An address's text never needs escaping.
    address(out, *ip_source);
    out.extend_from_slice(b"\",\"destination\":\"");
    address(out, *ip_destination);
    out.extend_from_slice(b"\",\"ipVersion\":");
    string(out, ip_version);
    out.extend_from_slice(b"},\"l4\":");
    l4(out, layer4);
    if let Some(l7) = layer7 {
        out.extend_from_slice(b",\"l7\":");
        // Rare (one per proxied request or DNS query) and small: serde's own output.
        let _ = serde_json::to_writer(&mut *out, l7);
    }
    out.extend_from_slice(b",\"source\":");
    shared(out, &mut w.ends, source, endpoint);
    out.extend_from_slice(b",\"destination\":");
    shared(out, &mut w.ends, destination, endpoint);
    out.extend_from_slice(b",\"traffic_direction\":");
    string(out, traffic_direction);
    out.extend_from_slice(if *is_reply {
        b",\"is_reply\":true,\"node_name\":"
    } else {
        b",\"is_reply\":false,\"node_name\":"
    });
    string(out, node_name);
    out.extend_from_slice(b",\"Type\":");
    string(out, kind);
    if let Some(p) = policy {
        out.extend_from_slice(b",\"policy\":");
        shared(out, &mut w.policies, p, self::policy);
    }
    if !destination_names.is_empty() {
        out.extend_from_slice(b",\"destination_names\":");
        strings(out, destination_names);
    }
    if let Some(svc) = destination_service {
        out.extend_from_slice(b",\"destination_service\":{\"name\":");
        string(out, &svc.name);
        out.extend_from_slice(b",\"namespace\":");
        string(out, &svc.namespace);
        out.push(b'}');
    }
    if *tunnel_local {
        out.extend_from_slice(b",\"tunnel_local\":true");
    }
    if let Some(t) = trace_context {
        out.extend_from_slice(b",\"trace_context\":{\"parent\":{\"trace_id\":");
        string(out, &t.parent.trace_id);
        out.extend_from_slice(b"}}");
    }
    out.extend_from_slice(b",\"Summary\":");
    string(out, summary);
    out.push(b'}');
}

fn policy(out: &mut Vec<u8>, p: &PolicyRef) {
    // `label` is the metrics' and is not serialized.
    let PolicyRef {
        kind,
        namespace,
        name,
        rule,
        label: _,
    } = p;
    out.extend_from_slice(b"{\"kind\":");
    string(out, kind);
    if !namespace.is_empty() {
        out.extend_from_slice(b",\"namespace\":");
        string(out, namespace);
    }
    out.extend_from_slice(b",\"name\":");
    string(out, name);
    out.extend_from_slice(b",\"rule\":");
    string(out, rule);
    out.push(b'}');
}

fn l4(out: &mut Vec<u8>, l4: &L4) {
    let L4 {
        tcp,
        udp,
        sctp,
        icmpv4,
        icmpv6,
        protocol,
    } = l4;
    let mut first = true;
    let mut key = |out: &mut Vec<u8>, name: &[u8]| {
        out.extend_from_slice(if first { b"{\"" } else { b",\"" });
        first = false;
        out.extend_from_slice(name);
        out.extend_from_slice(b"\":");
    };
    for (name, ports) in [
        (&b"TCP"[..], tcp),
        (b"UDP", udp),
        (b"SCTP", sctp),
        (b"ICMPv4", icmpv4),
        (b"ICMPv6", icmpv6),
    ] {
        if let Some(p) = ports {
            key(out, name);
            self::ports(out, p);
        }
    }
    if let Some(protocol) = protocol {
        key(out, b"protocol");
        number(out, *protocol);
    }
    if first {
        out.push(b'{');
    }
    out.push(b'}');
}

fn ports(out: &mut Vec<u8>, p: &Ports) {
    let Ports {
        source_port,
        destination_port,
        flags,
    } = p;
    out.extend_from_slice(b"{\"source_port\":");
    number(out, *source_port);
    out.extend_from_slice(b",\"destination_port\":");
    number(out, *destination_port);
    if !flags.is_empty() {
        out.extend_from_slice(b",\"flags\":");
        for (i, name) in flags.names().enumerate() {
            out.push(if i == 0 { b'{' } else { b',' });
            string(out, name);
            out.extend_from_slice(b":true");
        }
        out.push(b'}');
    }
    out.push(b'}');
}

fn endpoint(out: &mut Vec<u8>, e: &Endpoint) {
    let Endpoint {
        namespace,
        pod_name,
        identity,
        labels,
        spiffe_id,
    } = e;
    out.push(b'{');
    if !namespace.is_empty() {
        out.extend_from_slice(b"\"namespace\":");
        string(out, namespace);
        out.push(b',');
    }
    if !pod_name.is_empty() {
        out.extend_from_slice(b"\"pod_name\":");
        string(out, pod_name);
        out.push(b',');
    }
    out.extend_from_slice(b"\"identity\":");
    number(out, *identity);
    out.extend_from_slice(b",\"labels\":");
    strings(out, labels);
    if let Some(id) = spiffe_id {
        out.extend_from_slice(b",\"spiffe_id\":");
        string(out, id);
    }
    out.push(b'}');
}

fn strings(out: &mut Vec<u8>, items: &[String]) {
    out.push(b'[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, s);
    }
    out.push(b']');
}

fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A JSON string, escaped as serde_json escapes it: `"` and `\`, the short forms `\b \f \n \r
/// \t`, `\u00XX` for the other control characters; everything else as it is.
fn string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.push(b'"');
    // Nearly all text needs no escaping. A pass without an early exit, which the compiler
    // turns into vector instructions, tells.
    if bytes
        .iter()
        .fold(false, |dirty, &b| dirty | needs_escape(b))
    {
        escaped(out, bytes);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

fn needs_escape(b: u8) -> bool {
    (b < 0x20) | (b == b'"') | (b == b'\\')
}

fn escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// An address as its `Display` writes it; IPv4 (the common case) without the formatter.
fn address(out: &mut Vec<u8>, addr: std::net::IpAddr) {
    match addr {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, octet);
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::flows::TcpFlags;

    fn written(flow: &Flow) -> String {
        let mut out = Vec::new();
        LineWriter::default().write_flow(&mut out, flow);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn golden_flows_are_written_as_serde_writes_them() {
        for line in crate::flows::tests::GOLDEN {
            let flow: Flow = serde_json::from_str(line).unwrap();
            assert_eq!(written(&flow), *line);
        }
    }

    /// Each character that must be escaped, and its neighbours that must not, at every offset
    /// of strings longer and shorter than a vector register.
    #[test]
    fn strings_are_escaped_as_serde_escapes_them_at_every_offset() {
        let specials = [
            '"', '\\', '\n', '\r', '\t', '\u{8}', '\u{c}', '\u{0}', '\u{1}', '\u{1f}', ' ', '!',
            '#', '[', ']', '\u{7f}', 'é', '日', '🚀',
        ];
        for c in specials {
            for at in 0..20 {
                let mut text: String = "abcdefghijklmnopqrstu".chars().take(at).collect();
                text.push(c);
                text.push_str("vwxyz0123456789");
                for s in [text.as_str(), &text[..text.len() - 9]] {
                    let mut out = Vec::new();
                    string(&mut out, s);
                    assert_eq!(
                        String::from_utf8(out).unwrap(),
                        serde_json::to_string(s).unwrap(),
                        "{c:?} at {at}"
                    );
                }
            }
        }
    }

    /// Every optional field both ways, every kind of string escape, every L4 variant.
    #[test]
    fn every_field_and_escape_matches_serde() {
        let tricky = "q\"b\\s/\u{8}\u{c}\n\r\t\u{1}\u{1f}\u{7f} é 日本 🚀";
        let endpoint = |full: bool| Endpoint {
            namespace: if full { tricky.into() } else { "".into() },
            pod_name: if full { "web-0".into() } else { "".into() },
            identity: if full { u32::MAX } else { 0 },
            labels: if full {
                vec![tricky.to_owned(), String::new(), "a=b".to_owned()].into()
            } else {
                Vec::new().into()
            },
            spiffe_id: full.then(|| format!("spiffe://x/{tricky}")),
        };
        let ports = |flags: bool| Ports {
            source_port: 0,
            destination_port: u16::MAX,
            flags: TcpFlags::from_bits(if flags { u8::MAX } else { 0 }),
        };
        let l4s = [
            L4::default(),
            L4 {
                tcp: Some(ports(true)),
                ..L4::default()
            },
            L4 {
                udp: Some(ports(false)),
                ..L4::default()
            },
            L4 {
                sctp: Some(ports(false)),
                ..L4::default()
            },
            L4 {
                icmpv4: Some(ports(false)),
                ..L4::default()
            },
            L4 {
                icmpv6: Some(ports(false)),
                ..L4::default()
            },
            L4 {
                protocol: Some(255),
                ..L4::default()
            },
            L4 {
                tcp: Some(ports(false)),
                udp: Some(ports(true)),
                protocol: Some(0),
                ..L4::default()
            },
        ];
        for (i, l4) in l4s.into_iter().enumerate() {
            let full = i % 2 == 0;
            let flow = Flow {
                time: tricky.to_owned(),
                verdict: "FORWARDED".into(),
                drop_reason_desc: if full { tricky.into() } else { "".into() },
                ip: Ip {
                    source: "10.0.0.1".parse().unwrap(),
                    destination: "2001:db8::ffff:1".parse().unwrap(),
                    ip_version: "IPv6".into(),
                },
                l4,
                l7: full.then(|| {
                    // HTTP on every other full flow, DNS on the rest.
                    let http = i % 4 == 0;
                    Box::new(super::super::L7 {
                        kind: "RESPONSE".into(),
                        latency_ns: 1234,
                        http: http.then(|| super::super::Http {
                            code: 200,
                            method: "GET".into(),
                            url: tricky.to_owned(),
                            protocol: "HTTP/1.1".into(),
                            route: String::new(),
                        }),
                        dns: (!http).then(|| super::super::Dns {
                            query: tricky.to_owned(),
                            qtypes: vec!["A".into()],
                            rcode: 0,
                            ips: vec!["198.18.0.10".parse().unwrap()],
                            cnames: vec![tricky.to_owned()],
                        }),
                    })
                }),
                source: endpoint(full).into(),
                destination: endpoint(!full).into(),
                traffic_direction: tricky.to_owned().into(),
                is_reply: full,
                node_name: tricky.into(),
                kind: "TUNNEL".into(),
                policy: Some(Arc::new(PolicyRef::new(
                    tricky.into(),
                    if full { tricky.into() } else { String::new() },
                    "n".into(),
                    String::new(),
                )))
                .filter(|_| i != 3),
                destination_names: if full {
                    vec![tricky.to_owned(), "api.example.com.".to_owned()]
                } else {
                    Vec::new()
                },
                destination_service: full.then(|| {
                    Arc::new(super::super::ServiceName {
                        name: tricky.to_owned(),
                        namespace: "shop".into(),
                    })
                }),
                tunnel_local: full,
                trace_context: full.then(|| super::super::TraceContext {
                    parent: super::super::TraceParent {
                        trace_id: tricky.to_owned(),
                    },
                }),
                summary: tricky.to_owned().into(),
            };
            assert_eq!(
                written(&flow),
                serde_json::to_string(&flow).unwrap(),
                "flow {i}"
            );
        }
    }
}
