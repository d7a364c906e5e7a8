//! Services: `v1` Services and `discovery.k8s.io/v1` EndpointSlices into the table the cgroup
//! programs translate from (`ClusterIP:port/protocol` to backend `podIP:targetPort`).
//!
//! Pure: plain objects in, a [`ServiceTable`] and one [`ServiceError`] per bad field out; a bad
//! port or address costs only that port or endpoint, the rest applies. What is translated:
//! every `ClusterIP` (and each of `clusterIPs`) of Services of type `ClusterIP`, `NodePort` and
//! `LoadBalancer`, per TCP or UDP port. Not translated: headless Services (`clusterIP: None`),
//! `ExternalName` Services (DNS only), SCTP ports.
//!
//! Backends, as kube-proxy picks them: the endpoints whose `ready` condition holds (absent
//! means ready); only when there is none, those that are `serving` and `terminating`. With
//! `internalTrafficPolicy: Local`, only endpoints on this node. A frontend with no usable backend
//! stays in the table with none: the kernel refuses its connects at once.
//!
//! The target port of a backend is the EndpointSlice's port of the same name (the endpoints
//! controller resolves named `targetPort`s per pod). A slice without ports (hand-written, in
//! standalone mode) falls back to the Service's `targetPort`: a number, or a container port name
//! looked up in the backend pod (by `targetRef`, else by address).

pub mod sync;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::policy::ObjectRef;
use crate::source::Inventory;

/// `sessionAffinityConfig.clientIP.timeoutSeconds`: the API's default and maximum.
const DEFAULT_AFFINITY_SECS: i32 = 10_800;
const MAX_AFFINITY_SECS: u32 = 86_400;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `IPPROTO_*`.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// A Service address as pods dial it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol.name()),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol.name()),
        }
    }
}

/// One endpoint of a Service port, with its conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `ns/name` of the backend pod, when the slice names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The kernel sends new connections here.
    pub used: bool,
}

/// One port of one Service at one of its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub service: ObjectRef,
    /// The port's name (empty for a single unnamed port).
    pub port_name: String,
    pub frontend: Frontend,
    pub endpoints: Vec<Endpoint>,
    /// `internalTrafficPolicy: Local`.
    pub local_only: bool,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend (0: none).
    pub affinity_secs: u32,
}

impl ServicePort {
    /// Where new connections go, sorted and without duplicates.
    #[must_use]
    pub fn backends(&self) -> Vec<(IpAddr, u16)> {
        let set: BTreeSet<(IpAddr, u16)> = self
            .endpoints
            .iter()
            .filter(|e| e.used)
            .map(|e| (e.addr, e.port))
            .collect();
        set.into_iter().collect()
    }
}

/// Everything the node translates. As JSON (`nodeward services -o json`): `ports` is a list,
/// `skipped` an object keyed by `ns/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceTable {
    #[serde(serialize_with = "values")]
    pub ports: BTreeMap<Frontend, ServicePort>,
    /// Services read but not translated, with why (`headless`, `ExternalName`...).
    #[serde(serialize_with = "display_keys")]
    pub skipped: BTreeMap<ObjectRef, String>,
}

fn values<S: serde::Serializer, K, V: Serialize>(
    map: &BTreeMap<K, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(map.values())
}

fn display_keys<S: serde::Serializer, K: std::fmt::Display, V: Serialize>(
    map: &BTreeMap<K, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|(k, v)| (k.to_string(), v)))
}

impl ServiceTable {
    /// Distinct Services with at least one translated port.
    #[must_use]
    pub fn service_count(&self) -> usize {
        self.ports
            .values()
            .map(|p| &p.service)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Backends new connections may go to, over every frontend.
    #[must_use]
    pub fn backend_count(&self) -> usize {
        self.ports.values().map(|p| p.backends().len()).sum()
    }

    /// The Service a connection to a backend address and port came through, when exactly one
    /// Service has that backend (for flows: the kernel translated before any packet existed).
    #[must_use]
    pub fn backend_index(&self) -> BTreeMap<(IpAddr, u16), ObjectRef> {
        let mut out: BTreeMap<(IpAddr, u16), Option<ObjectRef>> = BTreeMap::new();
        for port in self.ports.values() {
            for backend in port.backends() {
                out.entry(backend)
                    .and_modify(|s| {
                        if s.as_ref() != Some(&port.service) {
                            *s = None;
                        }
                    })
                    .or_insert_with(|| Some(port.service.clone()));
            }
        }
        out.into_iter()
            .filter_map(|(k, v)| v.map(|s| (k, s)))
            .collect()
    }
}

/// A bad field of a Service or EndpointSlice; the rest of the object applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceError {
    /// `Service ns/name` or `EndpointSlice ns/name` (the inventory's origin key).
    pub object: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: field {}: {}", self.object, self.field, self.message)
    }
}

/// The parts of a Service the table reads.
#[must_use]
pub fn slim_service(mut service: Service) -> Service {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let m = service.metadata;
    service.metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        ..ObjectMeta::default()
    };
    service.status = None;
    service
}

/// The parts of an EndpointSlice the table reads.
#[must_use]
pub fn slim_slice(mut slice: EndpointSlice) -> EndpointSlice {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let m = slice.metadata;
    slice.metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        ..ObjectMeta::default()
    };
    for e in &mut slice.endpoints {
        e.hints = None;
        e.deprecated_topology = None;
        e.hostname = None;
    }
    slice
}

struct Errors<'a> {
    object: &'a str,
    out: &'a mut Vec<ServiceError>,
}

impl Errors<'_> {
    fn push(&mut self, field: String, message: impl Into<String>) {
        self.out.push(ServiceError {
            object: self.object.to_owned(),
            field,
            message: message.into(),
        });
    }
}

/// A slice's endpoints that parsed, with the slice's ports.
struct SliceView {
    /// `(name, protocol) -> port`, from `ports` (empty when the slice lists none).
    ports: BTreeMap<(String, Protocol), u16>,
    has_ports: bool,
    endpoints: Vec<SliceEndpoint>,
}

struct SliceEndpoint {
    addr: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    zone: Option<String>,
    pod: Option<ObjectRef>,
}

fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(format!(
            "protocol {other:?} is not translated (TCP and UDP are)"
        )),
    }
}

fn port_number(port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port} is not in 1-65535"))
}

fn parse_slice(key: &str, slice: &EndpointSlice, errors: &mut Vec<ServiceError>) -> SliceView {
    let mut e = Errors {
        object: key,
        out: errors,
    };
    let mut view = SliceView {
        ports: BTreeMap::new(),
        has_ports: slice.ports.as_ref().is_some_and(|p| !p.is_empty()),
        endpoints: Vec::new(),
    };
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        // FQDN slices are deprecated and name no address the kernel can dial.
        return view;
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = match parse_protocol(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(m) => {
                e.push(format!("ports[{i}].protocol"), m);
                continue;
            }
        };
        // A port without a number means "all ports" (not used by Services): skipped.
        let Some(number) = p.port else { continue };
        match port_number(number) {
            Ok(n) => {
                view.ports
                    .insert((p.name.clone().unwrap_or_default(), protocol), n);
            }
            Err(m) => e.push(format!("ports[{i}].port"), m),
        }
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // kube-proxy uses the first address: the others are the same pod's.
        let Some(first) = ep.addresses.first() else {
            e.push(format!("endpoints[{i}].addresses"), "no address");
            continue;
        };
        let addr: IpAddr = match first.parse() {
            Ok(a) => a,
            Err(_) => {
                e.push(
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{first:?} is not an IP address"),
                );
                continue;
            }
        };
        let family_ok = match slice.address_type.as_str() {
            "IPv4" => addr.is_ipv4(),
            _ => addr.is_ipv6(),
        };
        if !family_ok {
            e.push(
                format!("endpoints[{i}].addresses[0]"),
                format!(
                    "{addr} is not of the slice's addressType {}",
                    slice.address_type
                ),
            );
            continue;
        }
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        // An absent `serving` has the value of `ready` (the API's documented default).
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let pod = ep.target_ref.as_ref().and_then(|r| {
            (r.kind.as_deref() == Some("Pod")).then(|| ObjectRef {
                namespace: r
                    .namespace
                    .clone()
                    .or_else(|| slice.metadata.namespace.clone())
                    .unwrap_or_else(|| "default".into()),
                name: r.name.clone().unwrap_or_default(),
            })
        });
        view.endpoints.push(SliceEndpoint {
            addr,
            ready,
            serving,
            terminating,
            node: ep.node_name.clone(),
            zone: ep.zone.clone(),
            pod,
        });
    }
    view
}

/// Builds the table for node `node` from the inventory.
#[must_use]
pub fn build(inv: &Inventory, node: &str) -> (ServiceTable, Vec<ServiceError>) {
    let mut errors = Vec::new();
    let mut table = ServiceTable::default();

    let mut slices: BTreeMap<ObjectRef, Vec<SliceView>> = BTreeMap::new();
    for (r, slice) in &inv.endpoint_slices {
        let key = format!("EndpointSlice {r}");
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            errors.push(ServiceError {
                object: key,
                field: format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                message: "missing: the slice belongs to no Service".into(),
            });
            continue;
        };
        let view = parse_slice(&key, slice, &mut errors);
        slices
            .entry(ObjectRef {
                namespace: r.namespace.clone(),
                name: service.clone(),
            })
            .or_default()
            .push(view);
    }

    let pods_by_ip: BTreeMap<IpAddr, &Arc<Pod>> = inv
        .pods
        .values()
        .flat_map(|pod| {
            crate::tunnel::view::pod_ips(pod)
                .into_iter()
                .map(move |ip| (ip, pod))
        })
        .collect();

    for (r, service) in &inv.services {
        let key = format!("Service {r}");
        let mut e = Errors {
            object: &key,
            out: &mut errors,
        };
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            table
                .skipped
                .insert(r.clone(), "ExternalName (answered by DNS)".into());
            continue;
        }
        let ips: Vec<(String, String)> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
                .collect(),
            _ => spec
                .cluster_ip
                .iter()
                .map(|ip| ("spec.clusterIP".to_owned(), ip.clone()))
                .collect(),
        };
        if ips.is_empty() || ips.iter().any(|(_, ip)| ip == "None") {
            table.skipped.insert(
                r.clone(),
                if ips.is_empty() {
                    "no clusterIP yet".into()
                } else {
                    "headless (clusterIP: None)".into()
                },
            );
            continue;
        }
        let mut addrs = Vec::new();
        for (field, ip) in ips {
            match ip.parse::<IpAddr>() {
                Ok(a) => addrs.push(a),
                Err(_) => e.push(field, format!("{ip:?} is not an IP address")),
            }
        }
        let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
        let affinity_secs = if spec.session_affinity.as_deref() == Some("ClientIP") {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_SECS);
            match u32::try_from(timeout) {
                Ok(t @ 1..=MAX_AFFINITY_SECS) => t,
                _ => {
                    e.push(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!("{timeout} is not in 1-{MAX_AFFINITY_SECS}; the default applies"),
                    );
                    DEFAULT_AFFINITY_SECS.unsigned_abs()
                }
            }
        } else {
            0
        };
        let views = slices.get(r).map(Vec::as_slice).unwrap_or_default();
        let single = spec.ports.as_ref().is_some_and(|p| p.len() == 1);
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            let protocol = match parse_protocol(port.protocol.as_deref()) {
                Ok(p) => p,
                Err(m) => {
                    e.push(format!("spec.ports[{i}].protocol"), m);
                    continue;
                }
            };
            let number = match port_number(port.port) {
                Ok(n) => n,
                Err(m) => {
                    e.push(format!("spec.ports[{i}].port"), m);
                    continue;
                }
            };
            let name = port.name.clone().unwrap_or_default();
            if name.is_empty() && !single {
                e.push(
                    format!("spec.ports[{i}].name"),
                    "a Service with several ports must name each",
                );
                continue;
            }
            let target = match &port.target_port {
                None => Target::Number(number),
                Some(IntOrString::Int(n)) => match port_number(*n) {
                    Ok(n) => Target::Number(n),
                    Err(m) => {
                        e.push(format!("spec.ports[{i}].targetPort"), m);
                        continue;
                    }
                },
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    Ok(n) => match port_number(n) {
                        Ok(n) => Target::Number(n),
                        Err(m) => {
                            e.push(format!("spec.ports[{i}].targetPort"), m);
                            continue;
                        }
                    },
                    Err(_) if s.is_empty() => Target::Number(number),
                    Err(_) => Target::Name(s.clone()),
                },
            };
            let mut endpoints = Vec::new();
            for view in views {
                for ep in &view.endpoints {
                    let target_port = if view.has_ports {
                        view.ports.get(&(name.clone(), protocol)).copied()
                    } else {
                        match &target {
                            Target::Number(n) => Some(*n),
                            Target::Name(n) => named_port(inv, &pods_by_ip, ep, n, protocol),
                        }
                    };
                    let Some(target_port) = target_port else {
                        continue;
                    };
                    endpoints.push(Endpoint {
                        addr: ep.addr,
                        port: target_port,
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        node: ep.node.clone(),
                        zone: ep.zone.clone(),
                        pod: ep.pod.as_ref().map(ToString::to_string),
                        used: false,
                    });
                }
            }
            for addr in &addrs {
                let mut endpoints: Vec<Endpoint> = endpoints
                    .iter()
                    .filter(|ep| ep.addr.is_ipv4() == addr.is_ipv4())
                    .cloned()
                    .collect();
                choose(&mut endpoints, local_only, node);
                endpoints.sort();
                let frontend = Frontend {
                    addr: *addr,
                    port: number,
                    protocol,
                };
                table.ports.insert(
                    frontend,
                    ServicePort {
                        service: r.clone(),
                        port_name: name.clone(),
                        frontend,
                        endpoints,
                        local_only,
                        affinity_secs,
                    },
                );
            }
        }
    }
    (table, errors)
}

enum Target {
    Number(u16),
    Name(String),
}

/// Marks the endpoints new connections go to: the ready ones, else the serving terminating
/// ones (kube-proxy's fallback); only this node's with `internalTrafficPolicy: Local`.
fn choose(endpoints: &mut [Endpoint], local_only: bool, node: &str) {
    let eligible = |e: &Endpoint| !local_only || e.node.as_deref() == Some(node);
    let any_ready = endpoints.iter().any(|e| eligible(e) && e.ready);
    for e in endpoints.iter_mut() {
        e.used = eligible(e)
            && if any_ready {
                e.ready
            } else {
                e.serving && e.terminating
            };
    }
}

/// The container port called `name` of the endpoint's pod.
fn named_port(
    inv: &Inventory,
    pods_by_ip: &BTreeMap<IpAddr, &Arc<Pod>>,
    ep: &SliceEndpoint,
    name: &str,
    protocol: Protocol,
) -> Option<u16> {
    let pod = ep
        .pod
        .as_ref()
        .and_then(|r| inv.pods.get(r))
        .or_else(|| pods_by_ip.get(&ep.addr).copied())?;
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name)
                && parse_protocol(p.protocol.as_deref()).ok() == Some(protocol)
        })
        .and_then(|p| port_number(p.container_port).ok())
}

#[cfg(test)]
mod tests;
