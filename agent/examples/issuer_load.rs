//! The issuer's throughput and memory: `nodeward issuer` as its own process (standalone: a
//! manifests directory with one pod per node, bootstrap tokens), asked for certificates by
//! `CONCURRENCY` agents at once, each request on a fresh TLS connection as an agent's is (a CSR
//! for a new P-256 key made by the client, the issuer's TokenReview replaced by the token file).
//!
//! Prints CSRs per second and the issuer's RSS (VmRSS, and VmHWM, the peak) before and after.
//!
//! `cargo run --release -p nodeward --example issuer_load [REQUESTS] [CONCURRENCY]`
//! (the `nodeward` binary of the same profile must be built: `cargo build --release -p nodeward`)

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodeward::ca::{Authority, CaConfig, SpiffeId};
use nodeward::issuer::client::{IssuerClient, IssuerClientConfig};

const NODES: usize = 8;

fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().map_or(Ok(2000), |a| a.parse())?;
    let concurrency: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let td = "cluster.local";
    // The CA, as the issuer will load it.
    let ca_state = dir.path().join("ca-state");
    let authority = Authority::load_or_create(&CaConfig::generated(&ca_state, td))?;
    let (ca_cert, ca_key) = (
        ca_state.join("ca").join(nodeward::ca::CA_CERT_FILE),
        ca_state.join("ca").join(nodeward::ca::CA_KEY_FILE),
    );
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let mut tokens = String::new();
    for n in 0..NODES {
        std::fs::write(
            manifests.join(format!("pod-{n}.yaml")),
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: api-{n}, namespace: shop}}\n\
                 spec: {{nodeName: node-{n}, serviceAccountName: api, containers: [{{name: c}}]}}\n"
            ),
        )?;
        let token = format!("token-of-node-{n}-0123456789abcdef");
        std::fs::write(dir.path().join(format!("token-{n}")), &token)?;
        tokens.push_str(&format!("node-{n} {token}\n"));
    }
    std::fs::write(dir.path().join("tokens"), tokens)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("nodeward"))
        .expect("target dir");
    let mut issuer = std::process::Command::new(&bin)
        .arg("issuer")
        .args(["--listen", &addr, "--metrics-addr", ""])
        .arg("--ca-cert")
        .arg(&ca_cert)
        .arg("--ca-key")
        .arg(&ca_key)
        .arg("--state-dir")
        .arg(dir.path().join("issuer"))
        .arg("--manifests")
        .arg(&manifests)
        .arg("--bootstrap-tokens")
        .arg(dir.path().join("tokens"))
        .args(["--rate-burst", "100000000", "--rate-per-second", "1000000"])
        .args(["--log", "warn"])
        .spawn()
        .map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
    let pid = issuer.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the issuer did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = rss(pid);
        let trust = authority.trust();
        let clients: Vec<Arc<IssuerClient>> = (0..NODES)
            .map(|n| {
                IssuerClient::new(
                    &trust,
                    IssuerClientConfig {
                        address: addr.clone(),
                        token_file: dir.path().join(format!("token-{n}")),
                        timeout: Duration::from_secs(10),
                    },
                )
                .map(Arc::new)
                .map_err(|e| anyhow::anyhow!(e))
            })
            .collect::<Result<_, _>>()?;
        let id = SpiffeId::workload(td, "shop", "api")?;
        // CSRs made beforehand: the figure is the issuer's, not the client's key generation.
        let csrs: Vec<String> = (0..requests)
            .map(|_| IssuerClient::csr_for(&id).map(|(_, c)| c))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!(e))?;
        let csrs = Arc::new(csrs);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let (client, csrs, next) = (clients[w % NODES].clone(), csrs.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut failed = 0usize;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(csr) = csrs.get(i) else { break };
                    if client.sign(csr).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for t in tasks {
            failed += t.await?;
        }
        let elapsed = started.elapsed();
        let after = rss(pid);
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let rate = requests as f64 / elapsed.as_secs_f64();
        println!(
            "{requests} CSRs from {concurrency} concurrent agents (each on a new TLS connection) in {elapsed:.2?}: {rate:.0} CSRs/s, {failed} failed"
        );
        println!(
            "issuer RSS: {} KiB before, {} KiB after (peak {} KiB)",
            before.0, after.0, after.1
        );
        Ok(())
    });
    let _ = issuer.kill();
    let _ = issuer.wait();
    result
}
