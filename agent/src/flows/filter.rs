//! Flow filters, evaluated in the agent so a client receives only what it asked for.

use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{Endpoint, Flow};

/// `[namespace/]name-prefix`; without a namespace any namespace matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMatch {
    pub namespace: Option<String>,
    pub name_prefix: String,
}

impl PodMatch {
    #[must_use]
    pub fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((ns, name)) => Self {
                namespace: Some(ns.to_owned()),
                name_prefix: name.to_owned(),
            },
            None => Self {
                namespace: None,
                name_prefix: s.to_owned(),
            },
        }
    }

    fn matches(&self, e: &Endpoint) -> bool {
        !e.pod_name.is_empty()
            && self.namespace.as_ref().is_none_or(|ns| *ns == *e.namespace)
            && e.pod_name.starts_with(&self.name_prefix)
    }
}

/// The protocols `--protocol` accepts.
pub const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6", "DNS"];
/// The verdicts `--verdict` accepts.
pub const VERDICTS: &[&str] = &["FORWARDED", "DROPPED"];

/// All set fields must match (AND).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowFilter {
    pub verdict: Option<String>,
    pub from_pod: Option<PodMatch>,
    pub to_pod: Option<PodMatch>,
    /// Either end.
    pub pod: Option<PodMatch>,
    /// Either end.
    pub namespace: Option<String>,
    pub from_ip: Option<IpNet>,
    pub to_ip: Option<IpNet>,
    /// Either port.
    pub port: Option<u16>,
    pub protocol: Option<String>,
    pub identity: Option<u32>,
    /// `k8s:key=value` (or `k8s:key` for any value) in the source's labels.
    pub from_label: Option<String>,
    /// The same for the destination.
    pub to_label: Option<String>,
    /// A name the destination was looked up by; `*.example.com` matches any subdomain.
    pub to_fqdn: Option<String>,
    /// `namespace/name` of the Service the destination was reached through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_service: Option<String>,
    /// L7 flows of this HTTP method (`GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_method: Option<String>,
    /// L7 flows whose URL path matches this regular expression (unanchored, as Hubble's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    /// L7 flows with this status code (`404`), or a code starting with it (`5+`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<String>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// Filters that must NOT match (`--not --verdict DROPPED`), each on its own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not: Vec<FlowFilter>,
}

/// `key=value` as the flows hold it: `k8s:key=value`. A source prefix (`k8s:`, `reserved:`)
/// is kept.
fn normalise_label(label: &str) -> String {
    let key = label.split_once('=').map_or(label, |(k, _)| k);
    if key.contains(':') {
        label.to_owned()
    } else {
        format!("k8s:{label}")
    }
}

fn label_matches(want: &str, labels: &[String]) -> bool {
    if want.contains('=') {
        labels.iter().any(|l| l == want)
    } else {
        labels.iter().any(|l| {
            l.strip_prefix(want)
                .is_some_and(|rest| rest.starts_with('='))
                || l == want
        })
    }
}

fn fqdn_matches(pattern: &str, names: &[String]) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    names.iter().any(|n| {
        let name = n.trim_end_matches('.').to_ascii_lowercase();
        match pattern.strip_prefix("*.") {
            Some(suffix) => name
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.')),
            None => name == pattern,
        }
    })
}

/// A filter value that is not one of the accepted ones.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {value:?}: expected one of {}", .valid.join(", "))]
pub struct InvalidFilter {
    pub what: &'static str,
    pub value: String,
    pub valid: Vec<String>,
}

impl FlowFilter {
    /// Normalises case and rejects values that could never match, listing the valid ones.
    pub fn validate(&mut self) -> Result<(), InvalidFilter> {
        if let Some(v) = &self.verdict {
            let upper = v.to_uppercase();
            if !VERDICTS.contains(&upper.as_str()) {
                return Err(InvalidFilter {
                    what: "verdict",
                    value: v.clone(),
                    valid: VERDICTS.iter().map(|s| (*s).to_owned()).collect(),
                });
            }
            self.verdict = Some(upper);
        }
        if let Some(p) = &self.protocol {
            let found = PROTOCOLS.iter().find(|known| {
                known.eq_ignore_ascii_case(p)
                    || (p.eq_ignore_ascii_case("icmp") && **known == "ICMPv4")
            });
            match found {
                Some(known) => self.protocol = Some((*known).to_owned()),
                None => {
                    return Err(InvalidFilter {
                        what: "protocol",
                        value: p.clone(),
                        valid: PROTOCOLS.iter().map(|s| (*s).to_owned()).collect(),
                    });
                }
            }
        }
        for (what, label) in [
            ("from-label", &mut self.from_label),
            ("to-label", &mut self.to_label),
        ] {
            if let Some(l) = label.as_mut() {
                if l.trim().is_empty() || l.starts_with('=') {
                    return Err(InvalidFilter {
                        what,
                        value: l.clone(),
                        valid: vec!["key=value".into(), "k8s:key=value".into(), "key".into()],
                    });
                }
                *l = normalise_label(l.trim());
            }
        }
        if let Some(f) = &self.to_fqdn
            && (f.trim().is_empty() || f.contains(char::is_whitespace))
        {
            return Err(InvalidFilter {
                what: "to-fqdn",
                value: f.clone(),
                valid: vec!["name.example.com".into(), "*.example.com".into()],
            });
        }
        if let Some(s) = &self.to_service
            && s.split_once('/')
                .is_none_or(|(ns, name)| ns.is_empty() || name.is_empty() || name.contains('/'))
        {
            return Err(InvalidFilter {
                what: "to-service",
                value: s.clone(),
                valid: vec!["namespace/name".into()],
            });
        }
        if let Some(m) = &self.http_method {
            self.http_method = Some(m.to_uppercase());
        }
        if let Some(p) = &self.http_path
            && regex::Regex::new(p).is_err()
        {
            return Err(InvalidFilter {
                what: "http-path",
                value: p.clone(),
                valid: vec!["a regular expression".into()],
            });
        }
        if let Some(s) = &self.http_status {
            let digits = s.strip_suffix('+').unwrap_or(s);
            if digits.is_empty()
                || digits.len() > 3
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || (!s.ends_with('+') && digits.len() != 3)
            {
                return Err(InvalidFilter {
                    what: "http-status",
                    value: s.clone(),
                    valid: vec!["a code (404)".into(), "a code prefix (5+)".into()],
                });
            }
        }
        for n in &mut self.not {
            n.validate()?;
        }
        Ok(())
    }

    #[must_use]
    pub fn matches(&self, flow: &Flow) -> bool {
        let ports = flow.ports();
        self.verdict.as_ref().is_none_or(|v| *v == *flow.verdict)
            && self
                .from_pod
                .as_ref()
                .is_none_or(|m| m.matches(&flow.source))
            && self
                .to_pod
                .as_ref()
                .is_none_or(|m| m.matches(&flow.destination))
            && self
                .pod
                .as_ref()
                .is_none_or(|m| m.matches(&flow.source) || m.matches(&flow.destination))
            && self.namespace.as_ref().is_none_or(|ns| {
                *ns == *flow.source.namespace || *ns == *flow.destination.namespace
            })
            && self.from_ip.is_none_or(|net| net.contains(&flow.ip.source))
            && self
                .to_ip
                .is_none_or(|net| net.contains(&flow.ip.destination))
            && self.port.is_none_or(|p| {
                ports.is_some_and(|ports| ports.source_port == p || ports.destination_port == p)
            })
            && self.protocol.as_ref().is_none_or(|p| {
                // `DNS`: the DNS proxy's flows (which are UDP too).
                p == flow.protocol_name()
                    || (p == "DNS" && flow.l7.as_ref().is_some_and(|l| l.dns.is_some()))
            })
            && self
                .identity
                .is_none_or(|id| flow.source.identity == id || flow.destination.identity == id)
            && self
                .since
                .is_none_or(|t| flow.system_time().is_some_and(|ft| ft >= t))
            && self
                .until
                .is_none_or(|t| flow.system_time().is_some_and(|ft| ft <= t))
            && self
                .from_label
                .as_ref()
                .is_none_or(|l| label_matches(l, &flow.source.labels))
            && self
                .to_label
                .as_ref()
                .is_none_or(|l| label_matches(l, &flow.destination.labels))
            && self
                .to_fqdn
                .as_ref()
                .is_none_or(|f| fqdn_matches(f, &flow.destination_names))
            && self.to_service.as_ref().is_none_or(|s| {
                flow.destination_service
                    .as_ref()
                    .is_some_and(|d| s.split_once('/') == Some((&d.namespace, &d.name)))
            })
            && self.http_matches(flow)
            && !self.not.iter().any(|n| n.matches(flow))
    }

    /// The `--http-*` filters: only L7 flows can match one.
    fn http_matches(&self, flow: &Flow) -> bool {
        if self.http_method.is_none() && self.http_path.is_none() && self.http_status.is_none() {
            return true;
        }
        let Some(http) = flow.l7.as_ref().and_then(|l| l.http.as_ref()) else {
            return false;
        };
        self.http_method.as_ref().is_none_or(|m| *m == http.method)
            && self.http_status.as_ref().is_none_or(|s| {
                let code = http.code.to_string();
                match s.strip_suffix('+') {
                    Some(prefix) => code.starts_with(prefix),
                    None => code == *s,
                }
            })
            && self.http_path.as_ref().is_none_or(|p| {
                // Validated on arrival; a rare filter on rare flows, compiled per flow.
                let path = url_path(&http.url);
                regex::Regex::new(p).is_ok_and(|r| r.is_match(path))
            })
    }
}

/// The path of `http://host/path?query` (or of a bare `/path?query`).
fn url_path(url: &str) -> &str {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r.find('/').map_or("/", |i| &r[i..]));
    rest.split(['?', '#']).next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::{Ip, L4, Ports};
    use std::sync::Arc;

    fn flow(src_pod: &str, dst_ip: &str, port: u16, verdict: &'static str) -> Flow {
        Flow {
            time: "2026-11-22T10:00:00.000000000Z".into(),
            verdict: verdict.into(),
            drop_reason_desc: "".into(),
            ip: Ip {
                source: "10.0.0.2".parse().unwrap(),
                destination: dst_ip.parse().unwrap(),
                ip_version: "IPv4".into(),
            },
            l4: L4 {
                tcp: Some(Ports {
                    source_port: 40000,
                    destination_port: port,
                    ..Ports::default()
                }),
                ..L4::default()
            },
            l7: None,
            source: Endpoint {
                namespace: "prod".into(),
                pod_name: src_pod.into(),
                identity: 300,
                ..Endpoint::default()
            }
            .into(),
            destination: Arc::default(),
            traffic_direction: "EGRESS".into(),
            is_reply: false,
            node_name: "n1".into(),
            kind: "L3_L4".into(),
            policy: None,
            destination_names: Vec::new(),
            destination_service: None,
            tunnel_local: false,
            trace_context: None,
            summary: "".into(),
        }
    }

    #[test]
    fn http_filters_match_l7_flows_only() {
        let plain = flow("web-1", "10.0.1.3", 8080, "FORWARDED");
        let mut l7 = plain.clone();
        l7.l7 = Some(Box::new(crate::flows::L7 {
            kind: "RESPONSE".into(),
            latency_ns: 1,
            http: Some(crate::flows::Http {
                code: 503,
                method: "POST".into(),
                url: "http://api.shop/admin/users?x=1".into(),
                protocol: "HTTP/1.1".into(),
                route: String::new(),
            }),
            dns: None,
        }));
        let check = |f: FlowFilter| -> (bool, bool) {
            let mut f = f;
            f.validate().unwrap();
            (f.matches(&plain), f.matches(&l7))
        };
        let method = |m: &str| FlowFilter {
            http_method: Some(m.into()),
            ..FlowFilter::default()
        };
        let status = |s: &str| FlowFilter {
            http_status: Some(s.into()),
            ..FlowFilter::default()
        };
        let path = |p: &str| FlowFilter {
            http_path: Some(p.into()),
            ..FlowFilter::default()
        };
        assert_eq!(check(method("post")), (false, true));
        assert_eq!(check(method("GET")), (false, false));
        assert_eq!(check(status("5+")), (false, true));
        assert_eq!(check(status("503")), (false, true));
        assert_eq!(check(status("404")), (false, false));
        assert_eq!(check(path("^/admin/")), (false, true));
        assert_eq!(
            check(path("^/users")),
            (false, false),
            "the path, not the URL"
        );
        for bad in ["5", "abc", "+", "1234"] {
            assert!(status(bad).validate().is_err(), "{bad}");
        }
        assert!(path("(").validate().is_err());
    }

    #[test]
    fn each_filter_narrows() {
        let a = flow("web-1", "10.0.1.3", 8080, "FORWARDED");
        let b = flow("api-1", "10.0.2.3", 9090, "DROPPED");
        let pick = |f: FlowFilter| -> Vec<bool> { vec![f.matches(&a), f.matches(&b)] };
        assert_eq!(pick(FlowFilter::default()), [true, true]);
        let mut f = FlowFilter {
            verdict: Some("dropped".into()),
            ..FlowFilter::default()
        };
        f.validate().unwrap();
        assert_eq!(pick(f), [false, true]);
        assert_eq!(
            pick(FlowFilter {
                from_pod: Some(PodMatch::parse("prod/web")),
                ..FlowFilter::default()
            }),
            [true, false]
        );
        assert_eq!(
            pick(FlowFilter {
                to_ip: Some("10.0.2.0/24".parse().unwrap()),
                ..FlowFilter::default()
            }),
            [false, true]
        );
        assert_eq!(
            pick(FlowFilter {
                port: Some(8080),
                ..FlowFilter::default()
            }),
            [true, false]
        );
        assert_eq!(
            pick(FlowFilter {
                from_pod: Some(PodMatch::parse("other/web")),
                ..FlowFilter::default()
            }),
            [false, false]
        );
    }

    #[test]
    fn not_negates_its_filter_only() {
        let a = flow("web-1", "10.0.1.3", 8080, "FORWARDED");
        let b = flow("api-1", "10.0.2.3", 9090, "DROPPED");
        let mut f = FlowFilter {
            not: vec![FlowFilter {
                verdict: Some("DROPPED".into()),
                ..FlowFilter::default()
            }],
            ..FlowFilter::default()
        };
        f.validate().unwrap();
        assert_eq!([f.matches(&a), f.matches(&b)], [true, false]);
        // A positive filter and a negated one: both must hold.
        f.port = Some(9090);
        assert_eq!([f.matches(&a), f.matches(&b)], [false, false]);
        // The filter travels to the agent as JSON and keeps its meaning.
        let back: FlowFilter = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn labels_match_with_or_without_the_source_prefix() {
        let mut a = flow("web-1", "10.0.1.3", 8080, "FORWARDED");
        Arc::make_mut(&mut a.source).labels = [
            "k8s:app=web".into(),
            "k8s:io.kubernetes.pod.namespace=prod".into(),
        ]
        .into();
        Arc::make_mut(&mut a.destination).labels = ["k8s:app=api".into()].into();
        for (from, to, want) in [
            (Some("app=web"), None, true),
            (Some("k8s:app=web"), None, true),
            (Some("app"), None, true),
            (Some("app=api"), None, false),
            (Some("ap"), None, false),
            (None, Some("app=api"), true),
            (None, Some("app=web"), false),
        ] {
            let mut f = FlowFilter {
                from_label: from.map(Into::into),
                to_label: to.map(Into::into),
                ..FlowFilter::default()
            };
            f.validate().unwrap();
            assert_eq!(f.matches(&a), want, "{from:?} {to:?}");
        }
    }

    #[test]
    fn to_fqdn_matches_destination_names() {
        let mut a = flow("web-1", "10.0.1.3", 443, "FORWARDED");
        a.destination_names = vec!["api.example.com.".into()];
        let pick = |p: &str, flow: &Flow| {
            FlowFilter {
                to_fqdn: Some(p.into()),
                ..FlowFilter::default()
            }
            .matches(flow)
        };
        assert!(pick("api.example.com", &a));
        assert!(pick("*.example.com", &a));
        assert!(!pick("example.com", &a));
        assert!(!pick("*.api.example.com", &a));
        // A flow without names (no DNS seen) never matches.
        a.destination_names.clear();
        assert!(!pick("api.example.com", &a));
    }

    #[test]
    fn to_service_matches_the_destination_service_and_needs_namespace_and_name() {
        let mut a = flow("web-1", "10.0.1.3", 8080, "FORWARDED");
        a.destination_service = Some(Arc::new(crate::flows::ServiceName {
            name: "db".into(),
            namespace: "prod".into(),
        }));
        let b = flow("web-1", "10.0.1.3", 8080, "FORWARDED");
        let filter = |s: &str| FlowFilter {
            to_service: Some(s.into()),
            ..FlowFilter::default()
        };
        assert!(filter("prod/db").matches(&a));
        assert!(!filter("prod/web").matches(&a));
        assert!(!filter("other/db").matches(&a));
        assert!(!filter("prod/db").matches(&b), "a flow without a Service");
        for bad in ["db", "/db", "prod/", "a/b/c"] {
            let err = filter(bad).validate().unwrap_err().to_string();
            assert!(err.contains("namespace/name"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_values_are_errors_that_list_the_valid_ones() {
        let mut f = FlowFilter {
            protocol: Some("tcpp".into()),
            ..FlowFilter::default()
        };
        let err = f.validate().unwrap_err().to_string();
        assert!(err.contains("TCP, UDP"), "{err}");
        let mut f = FlowFilter {
            verdict: Some("ALLOWED".into()),
            ..FlowFilter::default()
        };
        assert!(
            f.validate()
                .unwrap_err()
                .to_string()
                .contains("FORWARDED, DROPPED")
        );
    }
}
