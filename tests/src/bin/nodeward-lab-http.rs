//! An HTTP backend for the benchmarks and the demo, run inside a lab pod's network namespace:
//! HTTP/1.1 (keep-alive) and prior-knowledge h2c on one port (hyper's auto connection, as a
//! gRPC server or any modern HTTP server answers both), on a small multi-threaded runtime.
//!
//! `nodeward-lab-http --port P --name NAME [--fail-every N]`: every answer is `200` with the
//! body `NAME` and the header `x-backend: NAME`; with `--fail-every N`, every Nth request (over
//! all connections) is answered `503` instead. Serves until killed.
//!
//! Unlike `nodeward-lab-load http-serve` (a handful of lines of HTTP/1.1 on threads, for the
//! tests), this one keeps up with a load generator: its cost must not hide the agents'.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Worker threads: the lab's machines have a few cores, shared with the client and the agents.
const WORKERS: usize = 2;

struct Config {
    port: u16,
    name: Bytes,
    fail_every: u64,
}

fn parse(args: &[String]) -> anyhow::Result<Config> {
    let (mut port, mut name, mut fail_every) = (None, None, 0);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => port = Some(value.parse().with_context(|| format!("--port {value}"))?),
            "--name" => name = Some(Bytes::from(value.clone())),
            "--fail-every" => {
                fail_every = value
                    .parse()
                    .with_context(|| format!("--fail-every {value}"))?;
            }
            other => bail!("unknown flag {other} (--port P --name NAME [--fail-every N])"),
        }
    }
    Ok(Config {
        port: port.context("--port is required")?,
        name: name.context("--name is required")?,
        fail_every,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = Arc::new(parse(&args)?);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()?
        .block_on(serve(config))
}

async fn serve(config: Arc<Config>) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await.context("accepting")?;
        let _ = stream.set_nodelay(true);
        let (config, served) = (config.clone(), served.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                let status = if config.fail_every > 0 && n.is_multiple_of(config.fail_every) {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                let mut answer = Response::new(Full::new(config.name.clone()));
                *answer.status_mut() = status;
                if let Ok(value) = hyper::header::HeaderValue::from_bytes(&config.name) {
                    answer.headers_mut().insert("x-backend", value);
                }
                async move { Ok::<_, Infallible>(answer) }
            });
            // A client that goes away mid-request is no error of the server's.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
