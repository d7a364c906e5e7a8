//! The local control and flow API: newline-delimited JSON over a Unix socket.
//!
//! A client writes one [`Request`] line; the agent answers with JSON lines and closes (or, for a
//! follow, keeps streaming). A client that reads slowly misses flows (counted, and told with a
//! `{"lost_flows": n}` line) rather than slowing the agent or other clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::app::Shared;
use crate::flows::FlowFilter;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Status,
    /// The certificates the agent holds (`nodeward certs`).
    Certs,
    /// The Service table (`nodeward services`).
    Services,
    Observe {
        /// Stored flows to send first (default 20 when not following, 0 when following).
        last: Option<usize>,
        follow: bool,
        #[serde(default)]
        filter: Box<FlowFilter>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("creating API socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another agent is serving {path}; give this one its own --api-socket")]
    InUse { path: PathBuf },
}

/// Binds the socket, refusing to steal one a live agent still serves.
pub async fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ApiError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::InUse {
                path: path.to_path_buf(),
            });
        }
        // A stale socket from an agent that died.
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Serves clients until the listener fails.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &shared).await {
                        tracing::debug!(error = %e, "API client went away");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an API client failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn write_json(
    w: &mut (impl AsyncWriteExt + Unpin),
    value: &impl Serialize,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle(stream: UnixStream, shared: &Shared) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // Requests are small; a client that sends an endless line is cut off.
    let n = BufReader::new(read.take(64 * 1024))
        .read_line(&mut line)
        .await?;
    if n == 0 {
        return Ok(());
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return write_json(
                &mut write,
                &serde_json::json!({"error": format!("bad request: {e}")}),
            )
            .await;
        }
    };
    match request {
        Request::Status => write_json(&mut write, &shared.status()).await,
        Request::Certs => write_json(&mut write, &certs_reply(shared)).await,
        Request::Services => {
            let table = shared
                .services
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            write_json(&mut write, &*table).await
        }
        Request::Observe {
            last,
            follow,
            mut filter,
        } => {
            if let Err(e) = filter.validate() {
                return write_json(&mut write, &serde_json::json!({"error": e.to_string()})).await;
            }
            // Subscribe before reading the ring so nothing falls between the two.
            let mut rx = follow.then(|| shared.flows.subscribe());
            let last = last.unwrap_or(if follow { 0 } else { 20 });
            for flow in shared.flows.last(last, &filter) {
                write_json(&mut write, &*flow).await?;
            }
            let Some(rx) = rx.as_mut() else {
                return write.flush().await;
            };
            write.flush().await?;
            loop {
                match rx.recv().await {
                    Ok(flow) if filter.matches(&flow) => write_json(&mut write, &*flow).await?,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        shared
                            .flows
                            .lost
                            .follower_lagged
                            .fetch_add(n, Ordering::Relaxed);
                        write_json(&mut write, &serde_json::json!({"lost_flows": n})).await?;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}

/// The answer to [`Request::Certs`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertsReply {
    pub trust_domain: String,
    /// The issuing CA's subject, or the issuer service's identity (`--ca-mode issuer`).
    pub issuer: String,
    /// Where certificates come from: `generated in DIR` or `loaded from FILE` (the agent's own
    /// CA), or `issuer at ADDRESS` (no CA key on the node).
    pub ca: String,
    pub trust_roots: usize,
    pub certificates: Vec<crate::ca::manager::CertInfo>,
}

fn certs_reply(shared: &Shared) -> CertsReply {
    let ca = &shared.ca;
    CertsReply {
        trust_domain: ca.trust_domain().to_owned(),
        issuer: ca.issuer_name().to_owned(),
        ca: ca.source().to_owned(),
        trust_roots: ca.roots().len(),
        certificates: shared.certs.info(),
    }
}

use tokio::io::AsyncReadExt as _;

/// Client side: sends `request` and calls `on_line` for every JSON line until the agent closes.
pub async fn call(
    socket: &Path,
    request: &Request,
    mut on_line: impl FnMut(serde_json::Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `nodeward agent` running? --api-socket sets the path)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    write_json(&mut write, request).await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("agent sent a line that is not JSON: {line}"))?;
        if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("{error}");
        }
        on_line(value)?;
    }
    Ok(())
}
