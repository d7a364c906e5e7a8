//! W3C trace context (`traceparent`) for the requests the source agent proxies, and their spans
//! over OTLP.
//!
//! * A request that carries a valid `traceparent` keeps its trace. When it is sampled and a
//!   collector is set (`--otlp-endpoint`), the proxy records a span of its own (kind CLIENT,
//!   from the request's arrival to its response's headers) as the caller's child, and the
//!   backend gets `traceparent` with the proxy's span as its parent, as Envoy does.
//! * A request without one (or with an invalid one, which W3C says to restart) gets a new trace
//!   at `--trace-sample-rate`, sampled; the others go on without a header.
//! * The trace id goes on the request's L7 flow (Hubble's `trace_context.parent.trace_id`),
//!   whether or not a span is exported.
//!
//! Spans are batched by the `opentelemetry` SDK on its own thread and sent as OTLP/HTTP
//! protobuf (`POST <endpoint>/v1/traces`) with the agent's hyper, on the agent's runtime: no
//! other HTTP client, no TLS stack of its own (a collector is a node-local or in-cluster
//! plaintext endpoint).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http::header::HeaderValue;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider};

pub const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The sampling rate of new traces when none is given (`--trace-sample-rate`): 1%, as Istio's
/// default.
pub const DEFAULT_SAMPLE_RATE: f64 = 0.01;

/// A parsed `traceparent` (version 00's fields; later versions are read the same way, as the
/// W3C says a version-00 reader should).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` when it is invalid (W3C Trace Context, level 1,
    /// 3.2.2: lowercase hex, no all-zero ids, version `ff` forbidden, version 00 exactly 55
    /// characters, a later version longer only after a `-`).
    #[must_use]
    pub fn parse(value: &str) -> Option<Self> {
        let b = value.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex::<1>(&b[0..2])?[0];
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let trace_id = hex::<16>(&b[3..35])?;
        let parent_id = hex::<8>(&b[36..52])?;
        let flags = hex::<1>(&b[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    #[must_use]
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The header's value (version 00).
    #[must_use]
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }
}

fn hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[must_use]
pub fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Non-zero random bytes (an id of all zeros is invalid).
fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        for b in &mut id {
            *b = fastrand::u8(..);
        }
        if id != [0; N] {
            return id;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceConfigError {
    #[error("--trace-sample-rate {0}: must be between 0 and 1")]
    SampleRate(f64),
    #[error("--otlp-endpoint {0:?}: {1}")]
    Endpoint(String, String),
}

/// `--trace-sample-rate` and `--otlp-endpoint`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// The share of requests without a `traceparent` that get a new, sampled one.
    pub sample_rate: f64,
    /// The collector's OTLP/HTTP traces URL (`http://host:4318/v1/traces`); `None`: no spans.
    pub otlp_endpoint: Option<http::Uri>,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            sample_rate: DEFAULT_SAMPLE_RATE,
            otlp_endpoint: None,
        }
    }
}

impl TraceConfig {
    /// # Errors
    /// A rate outside 0..=1, an endpoint that is not an `http://` URL.
    pub fn new(sample_rate: f64, otlp_endpoint: Option<&str>) -> Result<Self, TraceConfigError> {
        if !(0.0..=1.0).contains(&sample_rate) {
            return Err(TraceConfigError::SampleRate(sample_rate));
        }
        let otlp_endpoint = match otlp_endpoint.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(text) => {
                let bad = |why: &str| TraceConfigError::Endpoint(text.to_owned(), why.to_owned());
                let uri: http::Uri = text.parse().map_err(|_| bad("not a URL"))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(bad(
                        "an http://host:port URL of the collector's OTLP/HTTP port (4318) is expected; https is not supported",
                    ));
                }
                // The collector's base URL gets the traces path (as OTEL_EXPORTER_OTLP_ENDPOINT).
                let uri = if matches!(uri.path(), "" | "/") {
                    format!(
                        "http://{}/v1/traces",
                        uri.authority().map_or("", |a| a.as_str())
                    )
                    .parse()
                    .map_err(|_| bad("not a URL"))?
                } else {
                    uri
                };
                Some(uri)
            }
        };
        Ok(Self {
            sample_rate,
            otlp_endpoint,
        })
    }
}

/// The agent's tracing: the sampling rate and, with a collector, the span exporter.
pub struct Tracing {
    sample_rate: f64,
    exporter: Option<(SdkTracerProvider, SdkTracer)>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("sample_rate", &self.sample_rate)
            .field("exporting", &self.exporter.is_some())
            .finish()
    }
}

impl Tracing {
    /// Starts the exporter when `config` names a collector; its requests run on the current
    /// tokio runtime.
    ///
    /// # Errors
    /// The exporter could not be built, or there is no runtime to send with.
    pub fn new(config: &TraceConfig, node: &str) -> Result<Self, TraceConfigError> {
        let exporter = match &config.otlp_endpoint {
            None => None,
            Some(uri) => {
                let runtime = tokio::runtime::Handle::try_current()
                    .map_err(|e| TraceConfigError::Endpoint(uri.to_string(), e.to_string()))?;
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(OtlpClient { runtime })
                    .with_endpoint(uri.to_string())
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_timeout(Duration::from_secs(10))
                    .build()
                    .map_err(|e| TraceConfigError::Endpoint(uri.to_string(), e.to_string()))?;
                let processor = BatchSpanProcessor::builder(exporter).build();
                let resource = opentelemetry_sdk::Resource::builder_empty()
                    .with_service_name("nodeward")
                    .with_attribute(KeyValue::new("host.name", node.to_owned()))
                    .build();
                let provider = SdkTracerProvider::builder()
                    .with_span_processor(processor)
                    .with_resource(resource)
                    .build();
                let tracer = provider.tracer("nodeward");
                Some((provider, tracer))
            }
        };
        Ok(Self {
            sample_rate: config.sample_rate,
            exporter,
        })
    }

    /// Sends the spans still queued (blocking: call it off the runtime's workers).
    pub fn flush(&self) {
        if let Some((provider, _)) = &self.exporter
            && let Err(e) = provider.force_flush()
        {
            tracing::debug!(error = %e, "OTLP: flushing spans failed");
        }
    }

    /// At a request's arrival: its trace, continued or new, with the `traceparent` the backend
    /// is to get written into `headers`. `None`: no trace (none came, none was sampled).
    #[must_use]
    pub fn begin(this: Option<&Self>, headers: &mut HeaderMap, name: &str) -> Option<RequestTrace> {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        if incoming.is_none() && headers.contains_key(TRACEPARENT) {
            // Invalid: the trace restarts, and a tracestate without its parent goes too.
            headers.remove(TRACEPARENT);
            headers.remove(TRACESTATE);
        }
        let exporter = this.and_then(|t| t.exporter.as_ref());
        let parent = match incoming {
            Some(p) if !p.sampled() || exporter.is_none() => {
                // Passed on as it came; the flow still names the trace.
                return Some(RequestTrace {
                    trace_id: p.trace_id,
                    span: None,
                });
            }
            Some(p) => Some(p),
            None => {
                let rate = this.map_or(0.0, |t| t.sample_rate);
                if rate <= 0.0 || fastrand::f64() >= rate {
                    return None;
                }
                None
            }
        };
        let Some((_, tracer)) = exporter else {
            // A new trace with nobody recording: the backend's span is its root.
            let new = TraceParent {
                trace_id: random_id(),
                parent_id: random_id(),
                flags: 1,
            };
            set(headers, &new);
            return Some(RequestTrace {
                trace_id: new.trace_id,
                span: None,
            });
        };
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.parent_id),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let span = tracer
            .span_builder(name.to_owned())
            .with_kind(SpanKind::Client)
            .start_with_context(tracer, &cx);
        let sc = span.span_context();
        let ours = TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            parent_id: sc.span_id().to_bytes(),
            flags: parent.map_or(1, |p| p.flags),
        };
        set(headers, &ours);
        Some(RequestTrace {
            trace_id: ours.trace_id,
            span: Some(span),
        })
    }
}

fn set(headers: &mut HeaderMap, tp: &TraceParent) {
    if let Ok(v) = HeaderValue::from_str(&tp.header()) {
        headers.insert(TRACEPARENT, v);
    }
}

/// One request's trace, from its arrival to its response.
pub struct RequestTrace {
    pub trace_id: [u8; 16],
    /// The proxy's span, when it is recorded.
    span: Option<opentelemetry_sdk::trace::Span>,
}

/// What the span of a request says, once answered.
pub struct Finished<'a> {
    pub method: &'a str,
    pub url: &'a str,
    /// `1.1`, `2`.
    pub protocol: &'a str,
    pub code: u16,
    pub route: &'a str,
    pub service: &'a str,
    pub source: &'a str,
    pub destination: std::net::SocketAddr,
    /// Why the agent answered itself, empty when the backend did.
    pub note: &'a str,
    pub end: SystemTime,
}

impl RequestTrace {
    #[must_use]
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// Ends the proxy's span (if recorded) with the request's attributes (OpenTelemetry's HTTP
    /// client conventions, and nodeward's own).
    pub fn finish(self, f: &Finished<'_>) {
        let Some(mut span) = self.span else {
            return;
        };
        span.set_attributes([
            KeyValue::new("http.request.method", f.method.to_owned()),
            KeyValue::new("url.full", f.url.to_owned()),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", f.protocol.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(f.code)),
            KeyValue::new("server.address", f.service.to_owned()),
            KeyValue::new("network.peer.address", f.destination.ip().to_string()),
            KeyValue::new("network.peer.port", i64::from(f.destination.port())),
            KeyValue::new("nodeward.source.spiffe_id", f.source.to_owned()),
        ]);
        if !f.route.is_empty() {
            span.set_attribute(KeyValue::new("nodeward.route", f.route.to_owned()));
        }
        if f.code >= 400 {
            let why = if f.note.is_empty() {
                format!("HTTP {}", f.code)
            } else {
                f.note.to_owned()
            };
            span.set_status(Status::error(why));
        }
        span.end_with_timestamp(f.end);
    }
}

/// OTLP/HTTP requests with hyper, run on the agent's runtime (the SDK's batch processor calls
/// from a thread of its own). One connection per batch: a batch leaves every few seconds.
#[derive(Debug)]
struct OtlpClient {
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let authority = request
                    .uri()
                    .authority()
                    .ok_or("the OTLP endpoint has no host")?
                    .to_string();
                let stream = tokio::net::TcpStream::connect(&authority).await?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(conn);
                let (mut parts, body) = request.into_parts();
                parts
                    .headers
                    .entry(http::header::HOST)
                    .or_insert(HeaderValue::from_str(&authority)?);
                // Origin form on the wire.
                parts.uri = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .parse()?;
                let resp = sender
                    .send_request(http::Request::from_parts(
                        parts,
                        http_body_util::Full::new(body),
                    ))
                    .await?;
                let (parts, body) = resp.into_parts();
                let body =
                    http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 4 << 20))
                        .await?
                        .to_bytes();
                Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
            };
            tokio::time::timeout(Duration::from_secs(10), exchange)
                .await
                .map_err(|_| "no answer from the OTLP collector within 10 s")?
        });
        task.await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_as_w3c_says() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(ok).expect("the spec's example");
        assert_eq!(to_hex(&tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&tp.parent_id), "00f067aa0ba902b7");
        assert!(tp.sampled());
        assert_eq!(tp.header(), ok, "written back the same");
        // A later version may carry more after a dash.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-xyz")
                .is_some_and(|t| !t.sampled())
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?} is invalid");
        }
    }

    #[test]
    fn trace_config_checks_rate_and_endpoint() {
        assert!(TraceConfig::new(1.5, None).is_err());
        assert!(TraceConfig::new(-0.1, None).is_err());
        assert!(TraceConfig::new(0.5, Some("https://collector:4318")).is_err());
        assert!(TraceConfig::new(0.5, Some("collector:4318")).is_err());
        let c = TraceConfig::new(0.5, Some("http://collector:4318")).unwrap();
        assert_eq!(
            c.otlp_endpoint.unwrap().to_string(),
            "http://collector:4318/v1/traces",
            "a base URL gets the traces path"
        );
        let c = TraceConfig::new(0.0, Some("http://c:9/otlp/traces")).unwrap();
        assert_eq!(
            c.otlp_endpoint.unwrap().to_string(),
            "http://c:9/otlp/traces"
        );
        assert_eq!(
            TraceConfig::new(0.0, Some(" ")).unwrap().otlp_endpoint,
            None
        );
    }

    #[test]
    fn a_request_keeps_its_trace_or_gets_one_at_the_rate() {
        let always = Tracing::new(&TraceConfig::new(1.0, None).unwrap(), "n").unwrap();
        // Continued, untouched (no collector: the proxy records nothing).
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, given.parse().unwrap());
        let t = Tracing::begin(Some(&always), &mut h, "GET").unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h[TRACEPARENT], given);
        // None: a new sampled one at rate 1.
        let mut h = HeaderMap::new();
        let t = Tracing::begin(Some(&always), &mut h, "GET").unwrap();
        let sent = TraceParent::parse(h[TRACEPARENT].to_str().unwrap()).unwrap();
        assert_eq!(sent.trace_id, t.trace_id);
        assert!(sent.sampled());
        // Invalid: replaced, its tracestate dropped.
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, "00-zz".parse().unwrap());
        h.insert(TRACESTATE, "a=b".parse().unwrap());
        let t = Tracing::begin(Some(&always), &mut h, "GET").unwrap();
        assert_eq!(
            TraceParent::parse(h[TRACEPARENT].to_str().unwrap()).map(|p| p.trace_id),
            Some(t.trace_id)
        );
        assert!(!h.contains_key(TRACESTATE));
        // Rate 0: nothing made up, nothing added.
        let never = Tracing::new(&TraceConfig::new(0.0, None).unwrap(), "n").unwrap();
        let mut h = HeaderMap::new();
        assert!(Tracing::begin(Some(&never), &mut h, "GET").is_none());
        assert!(h.is_empty());
        // At 0.3, about 30% of 2,000 requests.
        let some = Tracing::new(&TraceConfig::new(0.3, None).unwrap(), "n").unwrap();
        let traced = (0..2000)
            .filter(|_| Tracing::begin(Some(&some), &mut HeaderMap::new(), "GET").is_some())
            .count();
        assert!((500..700).contains(&traced), "{traced} of 2000 at 30%");
    }
}
