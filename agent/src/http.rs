//! HTTP in the mesh: the source agent parses the requests of meshed connections to a Service's
//! HTTP port and routes each one by the Gateway API `HTTPRoute`s attached to that Service
//! (GAMMA), over the same HBONE tunnel the L4 path uses.
//!
//! ```text
//!  pod A ──TCP (kernel already translated ClusterIP→backend)──▶ outbound listener
//!     tunnel::outbound: is the backend one of an HTTP Service port? ([`Dialled`])
//!       no ─▶ the plain L4 tunnel, unchanged
//!       yes ─▶ http::proxy: hyper server (HTTP/1.1 or prior-knowledge h2c) per connection,
//!              per request: route (routes::PortRoutes::select) ─▶ backend Service by weight
//!              ─▶ endpoint ─▶ hyper client over an HBONE CONNECT to that endpoint's node
//!              ─▶ L7 flow + golden metrics
//! ```
//!
//! * [`gateway`]: the `HTTPRoute` types (serde mirrors of the upstream schema).
//! * [`routes`]: HTTP port detection, route compilation and request matching (pure).
//! * [`proxy`]: the per-connection proxy.
//! * [`authz`]: the destination agent's per-request check of `rules.http`.
//! * [`io`]: an HBONE stream as a byte stream for hyper's client.
//! * [`traffic`]: the `TrafficPolicy` (connection pool, outlier detection, fault injection).
//! * [`trace`]: W3C `traceparent` and the spans sent over OTLP.

pub mod authz;
pub mod gateway;
pub mod io;
pub mod proxy;
pub mod routes;
pub mod trace;
pub mod traffic;

#[cfg(test)]
mod proxy_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub use routes::{RouteTable, ServiceKey};

/// Which Service port a meshed connection was dialled at, if it is an HTTP one.
///
/// The cgroup programs translate the ClusterIP before the connection exists, so the outbound
/// listener sees the backend. Today the answer comes from the service table (the backend's
/// Service, when it is a backend of exactly one HTTP Service port); a kernel record of the
/// dialled frontend per socket can answer exactly through the same interface once it exists.
pub trait Dialled {
    fn dialled(&self, client: SocketAddr, backend: SocketAddr) -> Option<ServiceKey>;
}

impl Dialled for RouteTable {
    fn dialled(&self, _client: SocketAddr, backend: SocketAddr) -> Option<ServiceKey> {
        self.by_backend.get(&backend).cloned()
    }
}

/// One request the proxy handled, for the flow store.
#[derive(Clone, Debug)]
pub struct HttpRecord {
    pub source: SocketAddr,
    /// The endpoint the request went to (the dialled backend when none was reached).
    pub destination: SocketAddr,
    pub source_spiffe_id: String,
    pub destination_spiffe_id: String,
    pub source_identity: u32,
    pub destination_identity: u32,
    pub method: String,
    pub url: String,
    /// `HTTP/1.1`, `HTTP/2`...
    pub protocol: &'static str,
    pub code: u16,
    pub latency: Duration,
    /// `ns/name` of the route, empty without one.
    pub route: String,
    /// Why the agent answered itself (`no route matched`...), empty when the backend answered.
    pub note: String,
    /// `DIR_EGRESS` from the source agent's proxy, `DIR_INGRESS` from the destination's
    /// request authorization.
    pub direction: u8,
    /// Set when policy refused the request (`POLICY_DENIED`): the flow is DROPPED.
    pub drop_reason: &'static str,
    /// The policy rule that allowed or refused the request, 0 when none decided.
    pub rule_id: u32,
    /// The request's W3C trace id (32 hex digits), when it carried or was given one.
    pub trace_id: Option<String>,
}

pub type HttpFlowSink = Arc<dyn Fn(&HttpRecord) + Send + Sync>;

/// The golden metrics, per (source workload, destination service, route, code class). The
/// source workload is the client's service account (its identity): bounded, and stable across
/// the pods of one Deployment.
#[derive(Debug)]
pub struct HttpMetrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
}

const LABELS: [&str; 6] = [
    "source_namespace",
    "source_workload",
    "destination_namespace",
    "destination_service",
    "route",
    "code_class",
];

impl HttpMetrics {
    /// # Errors
    /// Never for these constant names; kept as a `Result` for the registry's sake.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("nodeward".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests the source agent routed, by source workload (service account), dialled Service, route and response code class",
            ),
            &LABELS,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time from a request's arrival to its response's headers, same labels as http_requests_total",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &LABELS,
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            registry,
            requests,
            duration,
        })
    }

    pub fn observe(&self, labels: &RequestLabels<'_>, code: u16, latency: Duration) {
        let class = match code {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let values = [
            labels.source_namespace,
            labels.source_workload,
            labels.destination_namespace,
            labels.destination_service,
            labels.route,
            class,
        ];
        self.requests.with_label_values(&values).inc();
        self.duration
            .with_label_values(&values)
            .observe(latency.as_secs_f64());
    }

    #[must_use]
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}

pub struct RequestLabels<'a> {
    pub source_namespace: &'a str,
    pub source_workload: &'a str,
    pub destination_namespace: &'a str,
    pub destination_service: &'a str,
    pub route: &'a str,
}

/// What the HTTP proxy shares across connections (held by the tunnel's context).
pub struct HttpShared {
    pub metrics: HttpMetrics,
    /// Where L7 flows go; set once by `app.rs`.
    pub flows: OnceLock<HttpFlowSink>,
    /// Connection pools and outlier state of the `TrafficPolicy`s.
    pub traffic: traffic::TrafficState,
    /// Trace sampling and the span exporter; set once by `app.rs`. Unset: `traceparent` is
    /// passed on and named on flows, none is made up.
    pub tracing: OnceLock<trace::Tracing>,
}

impl Default for HttpShared {
    fn default() -> Self {
        Self {
            // Constant, valid names: cannot fail.
            metrics: HttpMetrics::new().unwrap_or_else(|e| unreachable!("HTTP metrics: {e}")),
            flows: OnceLock::new(),
            traffic: traffic::TrafficState::default(),
            tracing: OnceLock::new(),
        }
    }
}
