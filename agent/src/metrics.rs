//! Prometheus metrics and the health endpoints on `--metrics-addr`.
//!
//! Label cardinality is bounded: verdicts, directions, drop reasons, map names and loss places
//! only; never IPs, ports or pods.

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
use crate::flows::Flow;

pub struct Metrics {
    registry: Registry,
    flows: IntCounterVec,
    drops: IntCounterVec,
    sync_seconds: HistogramVec,
    endpoints: IntGauge,
    identities: IntGauge,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    lost: IntGaugeVec,
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
        let lost = IntGaugeVec::new(
            Opts::new(
                "lost_events",
                "Flow events lost, by the place they were lost",
            ),
            &["place"],
        )?;
        for c in [
            Box::new(flows.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(drops.clone()),
            Box::new(sync_seconds.clone()),
            Box::new(endpoints.clone()),
            Box::new(identities.clone()),
            Box::new(map_entries.clone()),
            Box::new(map_capacity.clone()),
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
            lost,
        })
    }

    pub fn observe_flow(&self, flow: &Flow) {
        self.flows
            .with_label_values(&[flow.verdict.as_str(), flow.traffic_direction.as_str()])
            .inc();
        if !flow.drop_reason_desc.is_empty() {
            self.drops
                .with_label_values(&[flow.drop_reason_desc.as_str()])
                .inc();
        }
    }

    pub fn observe_sync(&self, took: Duration) {
        self.sync_seconds
            .with_label_values(&[] as &[&str])
            .observe(took.as_secs_f64());
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
        }
    }

    fn render(&self, shared: &Shared) -> String {
        let status = shared.status();
        let lost = &status["flows"]["lost"];
        for place in ["kernel_ring_full", "store_overwritten", "follower_lagged"] {
            self.lost
                .with_label_values(&[place])
                .set(lost[place].as_i64().unwrap_or(0));
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
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

/// Serves `/metrics`, `/healthz` and `/readyz` until the listener fails.
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
