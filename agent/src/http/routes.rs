//! The route table: which Service ports speak HTTP, the `HTTPRoute`s attached to them (GAMMA:
//! `parentRefs` of kind Service), compiled into an ordered match list per Service port, and the
//! endpoints of every Service port a route can send to.
//!
//! Pure: an inventory and a service table in, a [`RouteTable`] and one [`RouteError`] per bad
//! field out. A bad match, filter or backend costs its match or rule, never the other routes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http::header::HeaderValue;
use k8s_openapi::api::core::v1::Service;
use regex::Regex;

use super::gateway::{self, HeaderModifier, HttpRoute, HttpRouteMatch};
use super::traffic::Resilience;
use crate::policy::ObjectRef;
use crate::services::{Protocol, ServiceTable};

/// A Service port: the Service and its port number (`spec.ports[].port`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub service: ObjectRef,
    pub port: u16,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

/// Whether a Service port speaks HTTP: `appProtocol` `http`, `h2c` or `kubernetes.io/h2c`, or
/// (without an `appProtocol`) a name starting with `http` or `grpc`, Istio's convention. An
/// `appProtocol` that says something else (`https`, `kubernetes.io/ws`...) wins over the name.
#[must_use]
pub fn is_http_port(name: Option<&str>, app_protocol: Option<&str>) -> bool {
    match app_protocol {
        Some(p) => matches!(
            p.to_ascii_lowercase().as_str(),
            "http" | "h2c" | "kubernetes.io/h2c" | "grpc"
        ),
        None => name.is_some_and(|n| {
            let n = n.to_ascii_lowercase();
            n.starts_with("http") && !n.starts_with("https") || n.starts_with("grpc")
        }),
    }
}

/// The HTTP ports of a Service (TCP only).
fn http_ports(service: &Service) -> Vec<u16> {
    service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter(|p| is_http_port(p.name.as_deref(), p.app_protocol.as_deref()))
        .filter_map(|p| u16::try_from(p.port).ok())
        .collect()
}

/// A bad field of an `HTTPRoute`; the rest of it, and every other route, applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteError {
    /// `HTTPRoute ns/name`.
    pub object: String,
    pub field: String,
    pub message: String,
    /// The Gateway API condition reason it sets (see [`RouteStatus`]).
    pub reason: Reason,
}

/// Why a route's condition is not the happy one (Gateway API reasons, as GAMMA uses them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Reason {
    /// `Accepted: False`: a Service parent that does not exist or has no such HTTP port.
    NoMatchingParent,
    /// `ResolvedRefs: False`: a backendRef to a Service that does not exist (its share of the
    /// requests answers 500).
    BackendNotFound,
    /// `ResolvedRefs: False`: a backendRef that is not a Service.
    InvalidKind,
    /// `PartiallyInvalid: True`: a field the agent cannot apply (a bad regular expression,
    /// weights that are all 0, an unsupported filter...); the rest of the route applies.
    UnsupportedValue,
}

/// One condition of a route's status, as `metav1.Condition` has it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `True` or `False`.
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

/// A route's status on this node, per Gateway API: `Accepted`, `ResolvedRefs` and, when some
/// of its rules could not be applied, `PartiallyInvalid`. The messages name the fields.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RouteStatus {
    /// `HTTPRoute ns/name`.
    pub object: String,
    /// The manifest it was read from (standalone mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The Service ports it attached to (`ns/name:port`).
    pub parents: Vec<String>,
    pub conditions: Vec<Condition>,
}

impl RouteStatus {
    /// The conditions of `object`, from its errors (`errors` holds only this route's).
    fn of(object: String, parents: Vec<String>, errors: &[&RouteError]) -> Self {
        let said = |reasons: &[Reason]| -> Option<(Reason, String)> {
            let hits: Vec<&&RouteError> = errors
                .iter()
                .filter(|e| reasons.contains(&e.reason))
                .collect();
            let first = hits.first()?;
            let message = hits
                .iter()
                .map(|e| format!("field {}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            Some((first.reason, message))
        };
        let condition = |kind, ok: bool, reason: String, message: String| Condition {
            kind,
            status: if ok { "True" } else { "False" },
            reason,
            message,
        };
        let mut conditions = Vec::new();
        conditions.push(match said(&[Reason::NoMatchingParent]) {
            Some((r, m)) if parents.is_empty() => condition("Accepted", false, format!("{r:?}"), m),
            Some((_, m)) => condition(
                "Accepted",
                true,
                "Accepted".into(),
                format!(
                    "attached to {}; not to every parent: {m}",
                    parents.join(", ")
                ),
            ),
            None => condition(
                "Accepted",
                true,
                "Accepted".into(),
                format!("attached to {}", parents.join(", ")),
            ),
        });
        conditions.push(
            match said(&[Reason::BackendNotFound, Reason::InvalidKind]) {
                Some((r, m)) => condition("ResolvedRefs", false, format!("{r:?}"), m),
                None => condition("ResolvedRefs", true, "ResolvedRefs".into(), String::new()),
            },
        );
        if let Some((r, m)) = said(&[Reason::UnsupportedValue]) {
            conditions.push(condition("PartiallyInvalid", true, format!("{r:?}"), m));
        }
        Self {
            object,
            file: None,
            parents,
            conditions,
        }
    }

    /// Whether every condition is the happy one.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.conditions.iter().all(|c| match c.kind {
            "PartiallyInvalid" => c.status == "False",
            _ => c.status == "True",
        })
    }
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: field {}: {}", self.object, self.field, self.message)
    }
}

#[derive(Clone, Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            // Gateway API: a prefix matches whole path elements (`/foo` matches `/foo/bar`, not
            // `/foobar`); a trailing slash is ignored.
            Self::Prefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || path == p
                    || path.strip_prefix(p).is_some_and(|r| r.starts_with('/'))
            }
            Self::Regex(r) => r.is_match(path),
        }
    }

    /// Precedence (Gateway API): Exact, then the longest prefix. Regular expressions are
    /// implementation-specific; here they rank below every prefix.
    fn rank(&self) -> (u8, usize) {
        match self {
            Self::Exact(p) => (2, p.len()),
            Self::Prefix(p) => (1, p.len()),
            Self::Regex(_) => (0, 0),
        }
    }
}

#[derive(Clone, Debug)]
enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => v == value,
            Self::Regex(r) => r.is_match(value),
        }
    }
}

/// One compiled `matches[]` entry.
#[derive(Clone, Debug)]
struct Match {
    path: PathMatch,
    method: Option<http::Method>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

impl Match {
    fn matches(&self, req: &http::request::Parts) -> bool {
        if !self.path.matches(req.uri.path()) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != req.method) {
            return false;
        }
        let headers_ok = self.headers.iter().all(|(name, m)| {
            req.headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        });
        if !headers_ok {
            return false;
        }
        self.query.iter().all(|(name, m)| {
            // The first value of a repeated parameter counts (Gateway API leaves it open).
            query_pairs(req.uri.query().unwrap_or_default())
                .find(|(k, _)| k == name)
                .is_some_and(|(_, v)| m.matches(v))
        })
    }
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Header changes (`RequestHeaderModifier`, `ResponseHeaderModifier`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderChanges {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderChanges {
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A rule's `retry` (GEP-1731), compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retry {
    /// Attempts after the first.
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

/// At most this many attempts after the first, whatever a route asks (a retry storm is bounded).
pub const MAX_RETRIES: u32 = 10;

/// A `backendRefs[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub service: ServiceKey,
    pub weight: u32,
}

/// One rule of one route, as the proxy applies it.
#[derive(Clone, Debug, Default)]
pub struct Rule {
    /// `ns/name` of the route (the metrics' `route` label); empty for the default route.
    pub route: String,
    pub backends: Vec<Backend>,
    pub request_headers: HeaderChanges,
    pub response_headers: HeaderChanges,
    /// `timeouts.request`; `None` waits as long as the client does. It covers every attempt.
    pub timeout: Option<Duration>,
    /// `timeouts.backendRequest`: the time one attempt may take (to the response's headers).
    pub backend_timeout: Option<Duration>,
    /// `retry`; `None`: one attempt.
    pub retry: Option<Retry>,
    /// `RequestMirror` filters: (Service, percent of requests).
    pub mirrors: Vec<(ServiceKey, u32)>,
    /// Why the rule cannot be applied (an unsupported filter...): it still matches, and answers
    /// 500, as the Gateway API specifies for an invalid rule.
    pub invalid: Option<String>,
}

impl Rule {
    /// The backend for a draw in `0..u64::MAX`, by weight; `None` when every weight is 0 (the
    /// Gateway API answers 500).
    #[must_use]
    pub fn pick(&self, draw: u64) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut at = draw % total;
        self.backends.iter().find(|b| {
            let w = u64::from(b.weight);
            if at < w {
                true
            } else {
                at -= w;
                false
            }
        })
    }

    /// The rule every HTTP port has without a route: all requests to the dialled Service.
    fn default_for(service: &ServiceKey) -> Self {
        Self {
            backends: vec![Backend {
                service: service.clone(),
                weight: 1,
            }],
            ..Self::default()
        }
    }
}

/// Ordering key of one match, most specific first (Gateway API `HTTPRouteRule` precedence):
/// path kind and length, a method, more header matches, more query matches; then the older
/// route, then `ns/name`, then the rule's and the match's order.
type Precedence = (
    std::cmp::Reverse<(u8, usize)>,
    std::cmp::Reverse<bool>,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
    String,
    String,
    usize,
    usize,
);

/// Each HTTP Service port's matches while they are compiled, with their precedence.
type PortEntries = BTreeMap<ServiceKey, Vec<(Match, Arc<Rule>, Precedence)>>;

/// The routes of one HTTP Service port, in match order.
#[derive(Clone, Debug, Default)]
pub struct PortRoutes {
    entries: Vec<(Match, Arc<Rule>)>,
}

impl PortRoutes {
    /// The rule for a request; `None` when routes are attached and none matches (404).
    #[must_use]
    pub fn select(&self, req: &http::request::Parts) -> Option<&Arc<Rule>> {
        self.entries
            .iter()
            .find(|(m, _)| m.matches(req))
            .map(|(_, r)| r)
    }
}

/// Everything the proxy needs, swapped whole after every sync.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    /// Every HTTP Service port, with its routes (the default one when none is attached).
    pub ports: HashMap<ServiceKey, Arc<PortRoutes>>,
    /// Which HTTP Service port a connection to a backend address came through (see
    /// [`super::Dialled`]): the one HTTP port with routes the backend serves. Backends of no
    /// routed port, or of several, are left to the L4 tunnel.
    pub by_backend: HashMap<SocketAddr, ServiceKey>,
    /// The endpoints new requests may go to, per Service port (of every Service, so a route
    /// can send to a port that is not itself HTTP).
    pub endpoints: HashMap<ServiceKey, Arc<[SocketAddr]>>,
    /// Attached routes, by `ns/name` (for `status`).
    pub routes: BTreeMap<String, Vec<String>>,
    /// The `TrafficPolicy` of each Service that has one (see [`super::traffic`]).
    pub traffic: HashMap<ObjectRef, Arc<Resilience>>,
    pub errors: Vec<RouteError>,
    /// Every mesh route's conditions, in the order of `ns/name`.
    pub status: Vec<RouteStatus>,
}

impl RouteTable {
    /// Compiles the routes of `routes` against the Services of `services` and the table the
    /// kernel translates with.
    #[must_use]
    pub fn build(
        services: &BTreeMap<ObjectRef, Arc<Service>>,
        routes: &BTreeMap<ObjectRef, Arc<HttpRoute>>,
        table: &ServiceTable,
    ) -> Self {
        Self::build_with(services, routes, HashMap::new(), table)
    }

    /// [`Self::build`] with the `TrafficPolicy` of each Service: the HTTP ports of a Service
    /// with one are parsed even without a route (the policy acts on requests).
    #[must_use]
    pub fn build_with(
        services: &BTreeMap<ObjectRef, Arc<Service>>,
        routes: &BTreeMap<ObjectRef, Arc<HttpRoute>>,
        traffic: HashMap<ObjectRef, Arc<Resilience>>,
        table: &ServiceTable,
    ) -> Self {
        let mut out = Self {
            traffic,
            ..Self::default()
        };
        let mut endpoints: BTreeMap<ServiceKey, Vec<SocketAddr>> = BTreeMap::new();
        for port in table.ports.values() {
            if port.frontend.protocol != Protocol::Tcp {
                continue;
            }
            let key = ServiceKey {
                service: port.service.clone(),
                port: port.frontend.port,
            };
            let list = endpoints.entry(key).or_default();
            for (ip, p) in port.backends() {
                let addr = SocketAddr::new(ip, p);
                if !list.contains(&addr) {
                    list.push(addr);
                }
            }
        }
        let mut http: PortEntries = BTreeMap::new();
        for (r, service) in services {
            for port in http_ports(service) {
                http.entry(ServiceKey {
                    service: r.clone(),
                    port,
                })
                .or_default();
            }
        }
        for (r, route) in routes {
            compile_route(r, route, services, &mut http, &mut out);
        }
        // Each mesh route's conditions (a route with Gateway parents only is another
        // controller's).
        for (r, route) in routes {
            if !route
                .spec
                .parent_refs
                .iter()
                .any(|p| p.kind.as_deref() == Some("Service"))
            {
                continue;
            }
            let object = format!("HTTPRoute {r}");
            let errors: Vec<&RouteError> =
                out.errors.iter().filter(|e| e.object == object).collect();
            let parents = out.routes.get(&r.to_string()).cloned().unwrap_or_default();
            let status = RouteStatus::of(object, parents, &errors);
            out.status.push(status);
        }
        // Which HTTP port a backend's connections came through. Without the kernel's record
        // of the dialled frontend, a backend address alone cannot say whether the pod dialled
        // the Service or the pod itself, nor which of several Services sharing the pod: only
        // ports with routes are parsed (the user asked for HTTP there), and a backend of
        // several routed ports is left to the L4 tunnel. The canary's apex Service `web` and
        // its version Services `web-v1`, `web-v2` share pods; only `web` has the route.
        let mut candidates: HashMap<SocketAddr, Vec<&ServiceKey>> = HashMap::new();
        for (key, entries) in &http {
            if entries.is_empty() && !out.traffic.contains_key(&key.service) {
                continue;
            }
            for addr in endpoints.get(key).into_iter().flatten() {
                candidates.entry(*addr).or_default().push(key);
            }
        }
        out.by_backend = candidates
            .into_iter()
            .filter_map(|(addr, keys)| match keys.as_slice() {
                [only] => Some((addr, (*only).clone())),
                _ => None,
            })
            .collect();
        for (key, mut entries) in http {
            if entries.is_empty() {
                entries.push((
                    Match {
                        path: PathMatch::Prefix("/".into()),
                        method: None,
                        headers: Vec::new(),
                        query: Vec::new(),
                    },
                    Arc::new(Rule::default_for(&key)),
                    (
                        std::cmp::Reverse((0, 0)),
                        std::cmp::Reverse(false),
                        std::cmp::Reverse(0),
                        std::cmp::Reverse(0),
                        String::new(),
                        String::new(),
                        0,
                        0,
                    ),
                ));
            }
            entries.sort_by(|a, b| a.2.cmp(&b.2));
            let routes = PortRoutes {
                entries: entries.into_iter().map(|(m, r, _)| (m, r)).collect(),
            };
            out.ports.insert(key, Arc::new(routes));
        }
        out.endpoints = endpoints
            .into_iter()
            .map(|(k, v)| (k, Arc::from(v)))
            .collect();
        out
    }

    /// The endpoints of `service` in `family`'s address family (both when it has none there).
    #[must_use]
    pub fn endpoints_of(&self, service: &ServiceKey, family: IpAddr) -> Vec<SocketAddr> {
        let all = self
            .endpoints
            .get(service)
            .map(|e| e.to_vec())
            .unwrap_or_default();
        let same: Vec<SocketAddr> = all
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == family.is_ipv4())
            .collect();
        if same.is_empty() { all } else { same }
    }
}

fn compile_route(
    r: &ObjectRef,
    route: &HttpRoute,
    services: &BTreeMap<ObjectRef, Arc<Service>>,
    http: &mut PortEntries,
    out: &mut RouteTable,
) {
    let object = format!("HTTPRoute {r}");
    let mut error_as = |reason: Reason, field: String, message: String| {
        out.errors.push(RouteError {
            object: object.clone(),
            field,
            message,
            reason,
        });
    };
    // Parents: the Service ports this route attaches to.
    let mut parents: Vec<ServiceKey> = Vec::new();
    for (i, parent) in route.spec.parent_refs.iter().enumerate() {
        let kind = parent.kind.as_deref().unwrap_or("Gateway");
        if kind != "Service" {
            // A Gateway's route: not the mesh's business (no error, as another controller
            // owns it).
            continue;
        }
        let group = parent.group.as_deref().unwrap_or("");
        if !matches!(group, "" | "core") {
            error_as(
                Reason::NoMatchingParent,
                format!("spec.parentRefs[{i}].group"),
                format!("a Service parent is in the core group \"\", not {group:?}"),
            );
            continue;
        }
        let service = ObjectRef {
            namespace: parent
                .namespace
                .clone()
                .unwrap_or_else(|| r.namespace.clone()),
            name: parent.name.clone(),
        };
        let ports: Vec<ServiceKey> = http
            .keys()
            .filter(|k| k.service == service && parent.port.is_none_or(|p| p == k.port))
            .cloned()
            .collect();
        if ports.is_empty() {
            let why = if services.contains_key(&service) {
                match parent.port {
                    Some(p) => format!(
                        "Service {service} has no HTTP port {p} (an HTTP port has appProtocol http or h2c, or a name starting with http or grpc)"
                    ),
                    None => format!(
                        "Service {service} has no HTTP port (appProtocol http or h2c, or a name starting with http or grpc)"
                    ),
                }
            } else {
                format!("no Service {service}")
            };
            error_as(
                Reason::NoMatchingParent,
                format!("spec.parentRefs[{i}]"),
                why,
            );
        }
        parents.extend(ports);
    }
    if parents.is_empty() {
        return;
    }
    let created = route
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let name = r.to_string();
    for (ri, rule) in route.spec.rules.iter().enumerate() {
        let at = |f: &str| format!("spec.rules[{ri}].{f}");
        let mut compiled = Rule {
            route: name.clone(),
            ..Rule::default()
        };
        for (fi, filter) in rule.filters.iter().enumerate() {
            let field = at(&format!("filters[{fi}]"));
            let modifier = match filter.kind.as_str() {
                "RequestHeaderModifier" => filter
                    .request_header_modifier
                    .as_ref()
                    .map(|m| (m, &mut compiled.request_headers, "requestHeaderModifier")),
                "ResponseHeaderModifier" => filter
                    .response_header_modifier
                    .as_ref()
                    .map(|m| (m, &mut compiled.response_headers, "responseHeaderModifier")),
                "RequestMirror" => {
                    let Some(m) = &filter.request_mirror else {
                        let why = "type RequestMirror needs its requestMirror field".to_owned();
                        error_as(Reason::UnsupportedValue, field, why.clone());
                        compiled.invalid = Some(why);
                        continue;
                    };
                    let b = &m.backend_ref;
                    let group = b.group.as_deref().unwrap_or("");
                    let kind = b.kind.as_deref().unwrap_or("Service");
                    let service = ObjectRef {
                        namespace: b.namespace.clone().unwrap_or_else(|| r.namespace.clone()),
                        name: b.name.clone(),
                    };
                    let bad = if !matches!(group, "" | "core") || kind != "Service" {
                        Some((
                            "kind",
                            format!("only Services are mirrors, not {group:?}/{kind}"),
                        ))
                    } else if b.port.is_none() {
                        Some(("port", "a Service mirror needs its port".to_owned()))
                    } else if !services.contains_key(&service) {
                        Some(("name", format!("no Service {service}; nothing is mirrored")))
                    } else if m.percent.is_some_and(|p| p > 100) {
                        Some(("percent", "more than 100; nothing is mirrored".to_owned()))
                    } else {
                        None
                    };
                    match (bad, b.port) {
                        (None, Some(port)) => compiled
                            .mirrors
                            .push((ServiceKey { service, port }, m.percent.unwrap_or(100))),
                        (Some((f, why)), _) => {
                            let f = if f == "percent" {
                                format!("{field}.requestMirror.percent")
                            } else {
                                format!("{field}.requestMirror.backendRef.{f}")
                            };
                            error_as(Reason::UnsupportedValue, f, why);
                        }
                        (None, None) => {}
                    }
                    continue;
                }
                other => {
                    let why = format!(
                        "filter type {other:?} is not supported yet (RequestHeaderModifier, ResponseHeaderModifier and RequestMirror are); the rule answers 500"
                    );
                    error_as(
                        Reason::UnsupportedValue,
                        format!("{field}.type"),
                        why.clone(),
                    );
                    compiled.invalid = Some(why);
                    continue;
                }
            };
            let Some((modifier, changes, part)) = modifier else {
                let why = format!("type {} needs its {{}} field", filter.kind);
                error_as(Reason::UnsupportedValue, field, why.clone());
                compiled.invalid = Some(why);
                continue;
            };
            match header_changes(modifier) {
                Ok(c) => {
                    changes.set.extend(c.set);
                    changes.add.extend(c.add);
                    changes.remove.extend(c.remove);
                }
                Err((f, why)) => {
                    error_as(
                        Reason::UnsupportedValue,
                        format!("{field}.{part}.{f}"),
                        why.clone(),
                    );
                    compiled.invalid = Some(why);
                }
            }
        }
        for (bi, b) in rule.backend_refs.iter().enumerate() {
            let field = at(&format!("backendRefs[{bi}]"));
            let group = b.group.as_deref().unwrap_or("");
            let kind = b.kind.as_deref().unwrap_or("Service");
            if !matches!(group, "" | "core") || kind != "Service" {
                error_as(
                    Reason::InvalidKind,
                    format!("{field}.kind"),
                    format!("only Services are backends, not {group:?}/{kind}"),
                );
                continue;
            }
            let Some(port) = b.port else {
                error_as(
                    Reason::UnsupportedValue,
                    format!("{field}.port"),
                    "a Service backend needs its port".into(),
                );
                continue;
            };
            let weight = b.weight.unwrap_or(1);
            let Ok(weight) = u32::try_from(weight) else {
                error_as(
                    Reason::UnsupportedValue,
                    format!("{field}.weight"),
                    format!("{weight} is negative"),
                );
                continue;
            };
            if !b.filters.is_empty() {
                error_as(
                    Reason::UnsupportedValue,
                    format!("{field}.filters"),
                    "filters on a backendRef are not supported yet; ignored".into(),
                );
            }
            let service = ObjectRef {
                namespace: b.namespace.clone().unwrap_or_else(|| r.namespace.clone()),
                name: b.name.clone(),
            };
            if !services.contains_key(&service) {
                // Kept: its share of the requests gets 500, as the Gateway API specifies.
                error_as(
                    Reason::BackendNotFound,
                    field.clone(),
                    format!("no Service {service}; its share of the requests answers 500"),
                );
            }
            compiled.backends.push(Backend {
                service: ServiceKey { service, port },
                weight,
            });
        }
        if !compiled.backends.is_empty() && compiled.backends.iter().all(|b| b.weight == 0) {
            error_as(
                Reason::UnsupportedValue,
                at("backendRefs"),
                "every backendRef has weight 0; the rule answers 500".into(),
            );
        }
        if let Some(t) = &rule.timeouts
            && let Some(request) = &t.request
        {
            match gateway::parse_duration(request) {
                Ok(d) if d.is_zero() => {}
                Ok(d) => compiled.timeout = Some(d),
                Err(why) => error_as(Reason::UnsupportedValue, at("timeouts.request"), why),
            }
        }
        if let Some(t) = &rule.timeouts
            && let Some(backend) = &t.backend_request
        {
            match gateway::parse_duration(backend) {
                Ok(d) if d.is_zero() => {}
                Ok(d) => compiled.backend_timeout = Some(d),
                Err(why) => error_as(Reason::UnsupportedValue, at("timeouts.backendRequest"), why),
            }
        }
        if let Some(retry) = &rule.retry {
            compiled.retry = compile_retry(retry, &at("retry"), &mut |f, m| {
                error_as(Reason::UnsupportedValue, f, m);
            });
        }
        let rule_arc = Arc::new(compiled);
        let default_match = [HttpRouteMatch::default()];
        let matches: &[HttpRouteMatch] = if rule.matches.is_empty() {
            &default_match
        } else {
            &rule.matches
        };
        for (mi, m) in matches.iter().enumerate() {
            match compile_match(m) {
                Ok(m) => {
                    let key: Precedence = (
                        std::cmp::Reverse(m.path.rank()),
                        std::cmp::Reverse(m.method.is_some()),
                        std::cmp::Reverse(m.headers.len()),
                        std::cmp::Reverse(m.query.len()),
                        created.clone(),
                        name.clone(),
                        ri,
                        mi,
                    );
                    for parent in &parents {
                        if let Some(list) = http.get_mut(parent) {
                            list.push((m.clone(), rule_arc.clone(), key.clone()));
                        }
                    }
                }
                Err((f, why)) => error_as(
                    Reason::UnsupportedValue,
                    at(&format!("matches[{mi}].{f}")),
                    why,
                ),
            }
        }
    }
    out.routes
        .insert(name, parents.iter().map(ToString::to_string).collect());
}

fn compile_match(m: &HttpRouteMatch) -> Result<Match, (String, String)> {
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" | "PathPrefix" if !value.starts_with('/') => {
                    return Err((
                        "path.value".into(),
                        format!("{value:?} does not start with /"),
                    ));
                }
                "Exact" => PathMatch::Exact(value),
                "PathPrefix" => PathMatch::Prefix(value),
                "RegularExpression" => {
                    PathMatch::Regex(anchored(&value).map_err(|e| ("path.value".into(), e))?)
                }
                other => {
                    return Err((
                        "path.type".into(),
                        format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
                    ));
                }
            }
        }
    };
    let method = m
        .method
        .as_deref()
        .map(|s| {
            http::Method::from_bytes(s.as_bytes())
                .map_err(|_| ("method".to_owned(), format!("{s:?} is not an HTTP method")))
        })
        .transpose()?;
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            (
                format!("headers[{i}].name"),
                format!("{:?} is not a header name", h.name),
            )
        })?;
        let value = value_match(h.kind.as_deref(), &h.value)
            .map_err(|(f, e)| (format!("headers[{i}].{f}"), e))?;
        headers.push((name, value));
    }
    let mut query = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let value = value_match(q.kind.as_deref(), &q.value)
            .map_err(|(f, e)| (format!("queryParams[{i}].{f}"), e))?;
        query.push((q.name.clone(), value));
    }
    Ok(Match {
        path,
        method,
        headers,
        query,
    })
}

fn value_match(kind: Option<&str>, value: &str) -> Result<ValueMatch, (String, String)> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(ValueMatch::Exact(value.to_owned())),
        "RegularExpression" => anchored(value)
            .map(ValueMatch::Regex)
            .map_err(|e| ("value".into(), e)),
        other => Err((
            "type".into(),
            format!("{other:?} is not Exact or RegularExpression"),
        )),
    }
}

/// A rule's `retry`: `None` (no retries) when it asks for none or a field is wrong (reported).
fn compile_retry(
    retry: &gateway::HttpRouteRetry,
    at: &str,
    error: &mut impl FnMut(String, String),
) -> Option<Retry> {
    let attempts = retry.attempts.unwrap_or(1);
    if attempts > MAX_RETRIES {
        error(
            format!("{at}.attempts"),
            format!("{attempts} is over {MAX_RETRIES}; {MAX_RETRIES} apply"),
        );
    }
    let mut codes = Vec::new();
    for (i, code) in retry.codes.iter().enumerate() {
        if (400..=599).contains(code) {
            codes.push(*code);
        } else {
            error(
                format!("{at}.codes[{i}]"),
                format!("{code} is not a code from 400 to 599; ignored"),
            );
        }
    }
    let backoff = match retry.backoff.as_deref().map(gateway::parse_duration) {
        None => Duration::ZERO,
        Some(Ok(d)) => d,
        Some(Err(why)) => {
            error(format!("{at}.backoff"), why);
            return None;
        }
    };
    (attempts > 0).then(|| Retry {
        attempts: attempts.min(MAX_RETRIES),
        codes,
        backoff,
    })
}

/// A regular expression that must match the whole value (as Envoy's RE2 matches do).
fn anchored(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 16)
        .build()
        .map_err(|e| format!("{pattern:?} is not a regular expression: {e}"))
}

fn header_changes(m: &HeaderModifier) -> Result<HeaderChanges, (String, String)> {
    let pair = |list: &[gateway::HttpHeader], what: &str| {
        list.iter()
            .enumerate()
            .map(|(i, h)| {
                let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    (
                        format!("{what}[{i}].name"),
                        format!("{:?} is not a header name", h.name),
                    )
                })?;
                let value = HeaderValue::from_str(&h.value).map_err(|_| {
                    (
                        format!("{what}[{i}].value"),
                        format!("{:?} is not a header value", h.value),
                    )
                })?;
                Ok((name, value))
            })
            .collect::<Result<Vec<_>, (String, String)>>()
    };
    let remove = m
        .remove
        .iter()
        .enumerate()
        .map(|(i, n)| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                (
                    format!("remove[{i}]"),
                    format!("{n:?} is not a header name"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HeaderChanges {
        set: pair(&m.set, "set")?,
        add: pair(&m.add, "add")?,
        remove,
    })
}
