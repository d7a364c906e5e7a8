//! Prometheus metrics and the health endpoints on `--metrics-addr`.
//!
//! Label cardinality is bounded: verdicts, directions, drop reasons, map names, loss places and
//! policies (one series per policy and verdict) only; never IPs, ports or pods.
//!
//! It serves nothing else: flows leave the node only on the mutual-TLS flows port
//! ([`crate::flowapi`]), never on this address, which anything that reaches the node can read.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::app::{MapFill, Shared};
use crate::flows::{Flow, PerShared};

pub struct Metrics {
    registry: Registry,
    flows: IntCounterVec,
    /// `flows`' four common series, looked up on first use instead of for every flow (a label
    /// lookup hashes the labels under a lock). Indexed by [`flow_series`].
    flow_series: [std::sync::OnceLock<prometheus::IntCounter>; 4],
    drops: IntCounterVec,
    sync_seconds: HistogramVec,
    endpoints: IntGauge,
    identities: IntGauge,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    map_fill_warnings: IntCounterVec,
    lost: IntGaugeVec,
    policy_verdicts: IntCounterVec,
    /// `policy_verdicts`' series by the flows' shared policy, for the same reason.
    policy_series: std::sync::Mutex<PerShared<crate::flows::PolicyRef, PolicySeries>>,
    cert_expiry: prometheus::Gauge,
    cert_renewals: IntCounterVec,
    tunnel_streams: IntCounterVec,
    tunnel_active: IntGaugeVec,
    tunnel_connections: IntCounterVec,
    tunnel_pooled: IntGauge,
    tunnel_handshake_failures: IntCounterVec,
    tunnel_bytes: IntCounterVec,
    flows_api_refused: IntCounterVec,
    flows_api_streams: IntGauge,
    tunnel_time_wait: IntCounterVec,
    tunnel_local: IntCounterVec,
    service_translations: prometheus::IntCounter,
    dns_queries: IntCounterVec,
    dns_proxy_seconds: HistogramVec,
    service_no_backend: prometheus::IntCounter,
    host_routed: IntCounterVec,
    ct_gc_runs: prometheus::IntCounter,
    ct_gc_scanned: prometheus::IntCounter,
    ct_gc_removed: prometheus::IntCounter,
    ct_gc_seconds: HistogramVec,
    services: IntGauge,
    service_backends: IntGauge,
}

/// `policy_verdicts`' FORWARDED and DROPPED series of one policy, looked up on first use.
type PolicySeries = [Option<prometheus::IntCounter>; 2];

/// Policies whose series `policy_series` keeps at most.
const POLICY_SERIES_KEPT: usize = 4096;

/// Where `flows`' series for these (verdict, direction) labels is kept in `flow_series`.
fn flow_series(labels: &[&str; 2]) -> Option<usize> {
    let verdict = ["FORWARDED", "DROPPED"]
        .iter()
        .position(|v| *v == labels[0])?;
    let direction = ["INGRESS", "EGRESS"].iter().position(|d| *d == labels[1])?;
    Some(verdict * 2 + direction)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("nodeward".into()), None)?;
        let flows = IntCounterVec::new(
            Opts::new("flows_total", "Flows recorded, by verdict and direction"),
            &["verdict", "direction"],
        )?;
        let drops = IntCounterVec::new(
            Opts::new("drops_total", "Dropped flows recorded, by reason"),
            &["reason"],
        )?;
        let sync_seconds = HistogramVec::new(
            HistogramOpts::new(
                "map_sync_duration_seconds",
                "Time to write a policy change into the kernel maps",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &[],
        )?;
        let endpoints = IntGauge::new("endpoints", "Local endpoints with programs attached")?;
        let identities = IntGauge::new("identities", "Identities allocated on this node")?;
        let map_entries = IntGaugeVec::new(
            Opts::new("map_entries", "Entries in each datapath map"),
            &["map"],
        )?;
        let map_capacity = IntGaugeVec::new(
            Opts::new("map_capacity", "Capacity of each datapath map"),
            &["map"],
        )?;
        let map_fill_warnings = IntCounterVec::new(
            Opts::new(
                "map_fill_warnings_total",
                "Times a datapath map reached 90% of its capacity (changes that do not fit are \
                 rejected whole)",
            ),
            &["map"],
        )?;
        let lost = IntGaugeVec::new(
            Opts::new(
                "lost_events",
                "Flow events lost, by the place they were lost",
            ),
            &["place"],
        )?;
        let policy_verdicts = IntCounterVec::new(
            Opts::new(
                "policy_verdicts_total",
                "Flows decided by a policy, by policy (kind/namespace/name) and verdict",
            ),
            &["policy", "verdict"],
        )?;
        let cert_expiry = prometheus::Gauge::new(
            "certificate_expiry_seconds",
            "Seconds until the first of this agent's certificates (workloads' and its own) expires; +Inf with none",
        )?;
        let cert_renewals = IntCounterVec::new(
            Opts::new(
                "certificate_renewals_total",
                "Certificate renewals, by result (success, failure)",
            ),
            &["result"],
        )?;
        let tunnel_streams = IntCounterVec::new(
            Opts::new(
                "tunnel_streams_total",
                "Tunnelled connections, by side (outbound: from a local pod; inbound: to one) and result (ok, denied, failed)",
            ),
            &["side", "result"],
        )?;
        let tunnel_active = IntGaugeVec::new(
            Opts::new(
                "tunnel_active_streams",
                "Tunnelled connections open now, by side",
            ),
            &["side"],
        )?;
        let tunnel_connections = IntCounterVec::new(
            Opts::new(
                "tunnel_connections_total",
                "HBONE (mTLS) connections established, by side (client, server)",
            ),
            &["side"],
        )?;
        let tunnel_pooled = IntGauge::new(
            "tunnel_pooled_connections",
            "HBONE client connections open in the pool",
        )?;
        let tunnel_handshake_failures = IntCounterVec::new(
            Opts::new(
                "tunnel_handshake_failures_total",
                "HBONE handshakes refused or failed, by side (client, server)",
            ),
            &["side"],
        )?;
        let tunnel_bytes = IntCounterVec::new(
            Opts::new(
                "tunnel_bytes_total",
                "Payload bytes carried by the tunnel, by direction (into_tunnel: read from a pod; out_of_tunnel: written to one)",
            ),
            &["direction"],
        )?;
        let flows_api_refused = IntCounterVec::new(
            Opts::new(
                "flows_api_refused_total",
                "Clients refused on the flows port, by reason (handshake, identity, followers, connections)",
            ),
            &["reason"],
        )?;
        let flows_api_streams =
            IntGauge::new("flows_api_streams", "Flow streams open on the flows port")?;
        let tunnel_time_wait = IntCounterVec::new(
            Opts::new(
                "tunnel_time_wait_total",
                "TIME_WAITs that closed pod-facing tunnel sockets left in the node's namespace, by result (removed; failed: left to expire, where they can stall plaintext connections reusing the 4-tuple)",
            ),
            &["result"],
        )?;
        let tunnel_local = IntCounterVec::new(
            Opts::new(
                "tunnel_local_total",
                "Meshed connections between two pods of this node (no TLS), by how their bytes moved (kernel: sockets joined by the sockmap redirect; user: copied by the agent, where the kernel side could not be attached)",
            ),
            &["path"],
        )?;
        let dns_queries = IntCounterVec::new(
            Opts::new(
                "dns_queries_total",
                "Queries through the DNS proxy, by result (forwarded: answered by the upstream; refused: a name the pod may not ask for; servfail: the upstream did not answer)",
            ),
            &["result"],
        )?;
        let dns_proxy_seconds = HistogramVec::new(
            HistogramOpts::new(
                "dns_proxy_duration_seconds",
                "Time from a query reaching the DNS proxy to its reply leaving (forwarded queries: the upstream's answer, and writing new addresses into the kernel maps)",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
            ]),
            &[],
        )?;
        let service_translations = prometheus::IntCounter::new(
            "service_translations_total",
            "Connects and datagrams to a Service address that the cgroup programs sent to a backend",
        )?;
        let service_no_backend = prometheus::IntCounter::new(
            "service_no_backend_total",
            "Connects and datagrams to a Service address refused at once (ECONNREFUSED): no usable backend",
        )?;
        let host_routed = IntCounterVec::new(
            Opts::new(
                "host_routed_packets_total",
                "Allowed pod packets by eBPF host routing path: local_peer (pod to local pod, bpf_redirect_peer), underlay_peer (from another node into a local pod), neigh (to a pod on another node, bpf_redirect_neigh), stack and fib_miss (left to the node's stack)",
            ),
            &["path"],
        )?;
        let ct_gc_runs = prometheus::IntCounter::new(
            "conntrack_gc_runs_total",
            "Sweeps of the conntrack garbage collector",
        )?;
        let ct_gc_scanned = prometheus::IntCounter::new(
            "conntrack_gc_entries_scanned_total",
            "Conntrack entries the garbage collector read",
        )?;
        let ct_gc_removed = prometheus::IntCounter::new(
            "conntrack_gc_entries_removed_total",
            "Expired conntrack entries the garbage collector deleted",
        )?;
        let ct_gc_seconds = HistogramVec::new(
            HistogramOpts::new(
                "conntrack_gc_duration_seconds",
                "Time one sweep of the conntrack garbage collector took (read every entry, delete the expired ones)",
            )
            .buckets(vec![0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &[],
        )?;
        let services = IntGauge::new("services", "Services with a translated port on this node")?;
        let service_backends = IntGauge::new(
            "service_backends",
            "Backends new Service connections may go to, over every ClusterIP:port",
        )?;
        for c in [
            Box::new(service_translations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(dns_queries.clone()),
            Box::new(dns_proxy_seconds.clone()),
            Box::new(service_no_backend.clone()),
            Box::new(host_routed.clone()),
            Box::new(ct_gc_runs.clone()),
            Box::new(ct_gc_scanned.clone()),
            Box::new(ct_gc_removed.clone()),
            Box::new(ct_gc_seconds.clone()),
            Box::new(services.clone()),
            Box::new(service_backends.clone()),
            Box::new(flows_api_refused.clone()),
            Box::new(flows_api_streams.clone()),
            Box::new(tunnel_streams.clone()),
            Box::new(tunnel_time_wait.clone()),
            Box::new(tunnel_local.clone()),
            Box::new(tunnel_active.clone()),
            Box::new(tunnel_connections.clone()),
            Box::new(tunnel_pooled.clone()),
            Box::new(tunnel_handshake_failures.clone()),
            Box::new(tunnel_bytes.clone()),
            Box::new(cert_expiry.clone()),
            Box::new(cert_renewals.clone()),
            Box::new(policy_verdicts.clone()),
            Box::new(flows.clone()),
            Box::new(drops.clone()),
            Box::new(sync_seconds.clone()),
            Box::new(endpoints.clone()),
            Box::new(identities.clone()),
            Box::new(map_entries.clone()),
            Box::new(map_capacity.clone()),
            Box::new(map_fill_warnings.clone()),
            Box::new(lost.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Self {
            registry,
            flows,
            drops,
            sync_seconds,
            endpoints,
            identities,
            map_entries,
            map_capacity,
            map_fill_warnings,
            lost,
            policy_verdicts,
            policy_series: std::sync::Mutex::new(PerShared::new(POLICY_SERIES_KEPT)),
            flow_series: Default::default(),
            cert_expiry,
            cert_renewals,
            tunnel_streams,
            tunnel_active,
            tunnel_connections,
            tunnel_pooled,
            tunnel_handshake_failures,
            tunnel_bytes,
            flows_api_refused,
            flows_api_streams,
            tunnel_time_wait,
            tunnel_local,
            service_translations,
            dns_queries,
            dns_proxy_seconds,
            service_no_backend,
            host_routed,
            ct_gc_runs,
            ct_gc_scanned,
            ct_gc_removed,
            ct_gc_seconds,
            services,
            service_backends,
        })
    }

    /// One sweep of the conntrack garbage collector.
    pub fn observe_ct_gc(&self, stats: &crate::datapath::maps::SweepStats) {
        self.ct_gc_runs.inc();
        self.ct_gc_scanned
            .inc_by(u64::try_from(stats.scanned).unwrap_or(u64::MAX));
        self.ct_gc_removed
            .inc_by(u64::try_from(stats.removed).unwrap_or(u64::MAX));
        self.ct_gc_seconds
            .with_label_values(&[] as &[&str])
            .observe(stats.duration.as_secs_f64());
    }

    /// One query through the DNS proxy (`forwarded`, `refused`, `servfail`).
    pub fn dns_proxy_seconds(&self, seconds: f64) {
        self.dns_proxy_seconds
            .with_label_values(&[] as &[&str])
            .observe(seconds);
    }

    pub fn dns_query(&self, result: &str) {
        self.dns_queries.with_label_values(&[result]).inc();
    }

    /// Read at scrape time from the flows port's own counters.
    fn observe_flow_api(&self, stats: &crate::flowapi::FlowApiStats) {
        for (reason, total) in stats.refusals() {
            catch_up(&self.flows_api_refused.with_label_values(&[reason]), total);
        }
        self.flows_api_streams
            .set(i64::try_from(stats.streams.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }

    /// Read at scrape time from the tunnel's own counters.
    fn observe_tunnel(&self, stats: &crate::tunnel::TunnelStats) {
        use crate::tunnel::TunnelStats as S;
        for (side, result, total) in [
            ("outbound", "ok", &stats.outbound_ok),
            ("outbound", "denied", &stats.outbound_denied),
            ("outbound", "failed", &stats.outbound_failed),
            ("inbound", "ok", &stats.inbound_ok),
            ("inbound", "denied", &stats.inbound_denied),
            ("inbound", "failed", &stats.inbound_failed),
        ] {
            catch_up(
                &self.tunnel_streams.with_label_values(&[side, result]),
                S::get(total),
            );
        }
        for (side, gauge) in [
            ("outbound", &stats.outbound_active),
            ("inbound", &stats.inbound_active),
        ] {
            self.tunnel_active
                .with_label_values(&[side])
                .set(i64::try_from(S::get(gauge)).unwrap_or(i64::MAX));
        }
        for (side, made, failed) in [
            (
                "client",
                &stats.client_connections,
                &stats.client_handshake_failures,
            ),
            (
                "server",
                &stats.server_connections,
                &stats.server_handshake_failures,
            ),
        ] {
            catch_up(
                &self.tunnel_connections.with_label_values(&[side]),
                S::get(made),
            );
            catch_up(
                &self.tunnel_handshake_failures.with_label_values(&[side]),
                S::get(failed),
            );
        }
        self.tunnel_pooled
            .set(i64::try_from(S::get(&stats.pool_open)).unwrap_or(i64::MAX));
        for (direction, total) in [
            ("into_tunnel", &stats.bytes_sent),
            ("out_of_tunnel", &stats.bytes_received),
        ] {
            catch_up(
                &self.tunnel_bytes.with_label_values(&[direction]),
                S::get(total),
            );
        }
        for (result, total) in [
            ("removed", &stats.time_wait_removed),
            ("failed", &stats.time_wait_failed),
        ] {
            catch_up(
                &self.tunnel_time_wait.with_label_values(&[result]),
                S::get(total),
            );
        }
        for (path, total) in [("kernel", &stats.local_kernel), ("user", &stats.local_user)] {
            catch_up(&self.tunnel_local.with_label_values(&[path]), S::get(total));
        }
    }

    pub fn observe_flow(&self, flow: &Flow) {
        let labels = [&*flow.verdict, &*flow.traffic_direction];
        match flow_series(&labels) {
            Some(i) => self.flow_series[i]
                .get_or_init(|| self.flows.with_label_values(&labels))
                .inc(),
            None => self.flows.with_label_values(&labels).inc(),
        }
        if !flow.drop_reason_desc.is_empty() {
            self.drops
                .with_label_values(&[&*flow.drop_reason_desc])
                .inc();
        }
        if let Some(p) = &flow.policy {
            let dropped = match &*flow.verdict {
                "FORWARDED" => false,
                "DROPPED" => true,
                other => {
                    self.policy_verdicts
                        .with_label_values(&[p.label(), other])
                        .inc();
                    return;
                }
            };
            let mut series = self
                .policy_series
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            series.get_or_insert_with(p, PolicySeries::default)[usize::from(dropped)]
                .get_or_insert_with(|| {
                    self.policy_verdicts
                        .with_label_values(&[p.label(), &*flow.verdict])
                })
                .inc();
        }
    }

    pub fn observe_sync(&self, took: Duration) {
        self.sync_seconds
            .with_label_values(&[] as &[&str])
            .observe(took.as_secs_f64());
    }

    /// Map `map` reached the fill warning mark.
    pub fn map_fill_warning(&self, map: &str) {
        self.map_fill_warnings.with_label_values(&[map]).inc();
    }

    pub fn observe_state(&self, endpoints: usize, identities: usize, maps: &[MapFill]) {
        self.endpoints
            .set(i64::try_from(endpoints).unwrap_or(i64::MAX));
        self.identities
            .set(i64::try_from(identities).unwrap_or(i64::MAX));
        for m in maps {
            self.map_entries
                .with_label_values(&[m.name.as_str()])
                .set(i64::try_from(m.entries).unwrap_or(i64::MAX));
            self.map_capacity
                .with_label_values(&[m.name.as_str()])
                .set(i64::from(m.capacity));
            // Every map's warning count shows, at 0 until it warns.
            let _ = self.map_fill_warnings.with_label_values(&[m.name.as_str()]);
        }
    }

    /// Read at scrape time: the expiry is "seconds from now", and renewals happen off the
    /// control loop.
    fn observe_certs(&self, certs: &crate::ca::manager::CertManager) {
        let now = std::time::SystemTime::now();
        self.cert_expiry
            .set(certs.earliest_expiry().map_or(f64::INFINITY, |t| {
                t.duration_since(now)
                    .map_or(0.0, |d| d.as_secs_f64().floor())
            }));
        let counts = certs.renewals();
        for (result, total) in [("success", &counts.succeeded), ("failure", &counts.failed)] {
            catch_up(
                &self.cert_renewals.with_label_values(&[result]),
                total.load(Ordering::Relaxed),
            );
        }
    }

    fn render(&self, shared: &Shared) -> String {
        let status = shared.status();
        let lost = &status["flows"]["lost"];
        for place in [
            "kernel_ring_full",
            "store_overwritten",
            "follower_lagged",
            "flow_log_dropped",
            "flow_log_write_failed",
        ] {
            self.lost
                .with_label_values(&[place])
                .set(lost[place].as_i64().unwrap_or(0));
        }
        let datapath = &status["datapath"];
        catch_up(
            &self.service_translations,
            datapath["service_translations"].as_u64().unwrap_or(0),
        );
        catch_up(
            &self.service_no_backend,
            datapath["service_no_backend"].as_u64().unwrap_or(0),
        );
        for (path, total) in status["host_routing"]["packets"]
            .as_object()
            .into_iter()
            .flatten()
        {
            catch_up(
                &self.host_routed.with_label_values(&[path.as_str()]),
                total.as_u64().unwrap_or(0),
            );
        }
        let svc = &status["services"];
        self.services.set(svc["services"].as_i64().unwrap_or(0));
        self.service_backends
            .set(svc["backends"].as_i64().unwrap_or(0));
        self.observe_certs(&shared.certs);
        self.observe_flow_api(&shared.flow_api);
        if let Some(tunnel) = shared.tunnel.get() {
            self.observe_tunnel(&tunnel.stats);
        }
        let mut families = self.registry.gather();
        if let Some(tunnel) = shared.tunnel.get() {
            families.extend(tunnel.http.metrics.gather());
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Brings a Prometheus counter up to a total kept elsewhere (counted off the scrape path).
fn catch_up(counter: &prometheus::IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

fn reply(status: StatusCode, body: String, content_type: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            shared.metrics.render(&shared),
            "text/plain; version=0.0.4",
        ),
        "/healthz" => reply(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if shared.ready.load(Ordering::SeqCst) => {
            reply(StatusCode::OK, "ready\n".into(), "text/plain")
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first sync has not completed\n".into(),
            "text/plain",
        ),
        _ => reply(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` (anything else is 404) until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_verdicts_are_labelled_kind_namespace_name() {
        let metrics = Metrics::new().unwrap();
        let mut flow = crate::flows::tests::sample();
        metrics.observe_flow(&flow);
        flow.policy = Some(Arc::new(crate::flows::PolicyRef::new(
            "ClusterMeshPolicy".into(),
            String::new(),
            "allow-dns".into(),
            "ingress[0]".into(),
        )));
        metrics.observe_flow(&flow);
        let count = |policy: &str| {
            metrics
                .policy_verdicts
                .with_label_values(&[policy, "DROPPED"])
                .get()
        };
        assert_eq!(count("NetworkPolicy/prod/deny-all"), 1, "namespaced policy");
        assert_eq!(
            count("ClusterMeshPolicy/allow-dns"),
            1,
            "cluster-scoped policy"
        );

        // Counted again through the kept series, per verdict; a policy rebuilt by the next
        // sync (another `Arc`, the same label) counts into the same series.
        metrics.observe_flow(&flow);
        flow.verdict = "FORWARDED".into();
        metrics.observe_flow(&flow);
        flow.policy = Some(Arc::new((**flow.policy.as_ref().unwrap()).clone()));
        metrics.observe_flow(&flow);
        flow.verdict = "DROPPED".into();
        metrics.observe_flow(&flow);
        assert_eq!(count("ClusterMeshPolicy/allow-dns"), 3);
        assert_eq!(
            metrics
                .policy_verdicts
                .with_label_values(&["ClusterMeshPolicy/allow-dns", "FORWARDED"])
                .get(),
            2
        );
    }
}
