//! Who is asking: the node an agent runs on, proven by its token.
//!
//! In a cluster the agent sends its projected ServiceAccount token (audience
//! [`DEFAULT_AUDIENCE`], short lived). The issuer has the API server review it (TokenReview):
//! the token must be valid, unexpired and for our audience, it must be the agent's service
//! account, and its pod binding names the node (`authentication.kubernetes.io/node-name`, or
//! the bound pod's `spec.nodeName`). In standalone mode and the lab, a file holds one
//! bootstrap token per node.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;

use super::check::Refusal;

/// The audience agents request their issuer tokens for.
pub const DEFAULT_AUDIENCE: &str = "nodeward-issuer";
/// The TokenReview's extra keys of a pod-bound ServiceAccount token.
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How the issuer authenticates agents.
pub enum NodeAuth {
    /// TokenReview against the API server.
    Kubernetes {
        client: kube::Client,
        audience: String,
        /// `system:serviceaccount:<ns>:<name>` of the agents.
        agent_user: String,
    },
    /// Tokens from a file: one `NODE TOKEN` pair a line.
    Bootstrap {
        file: PathBuf,
        tokens: Vec<(String, String)>,
    },
}

impl std::fmt::Debug for NodeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kubernetes {
                audience,
                agent_user,
                ..
            } => f
                .debug_struct("Kubernetes")
                .field("audience", audience)
                .field("agent_user", agent_user)
                .finish_non_exhaustive(),
            Self::Bootstrap { file, tokens } => f
                .debug_struct("Bootstrap")
                .field("file", file)
                .field("nodes", &tokens.len())
                .finish(),
        }
    }
}

/// A bootstrap token file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct TokenFileError {
    pub file: PathBuf,
    pub reason: String,
}

/// Reads a bootstrap token file: `NODE TOKEN` a line, `#` comments and blank lines ignored.
///
/// # Errors
/// The file cannot be read, a line is malformed, a token is shorter than 16 characters or used
/// twice.
pub fn read_token_file(file: &Path) -> Result<Vec<(String, String)>, TokenFileError> {
    let fail = |reason: String| TokenFileError {
        file: file.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(file).map_err(|e| fail(format!("cannot read: {e}")))?;
    let mut tokens: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(node), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(fail(format!("line {}: expected `NODE TOKEN`", n + 1)));
        };
        if token.len() < 16 {
            return Err(fail(format!(
                "line {}: the token of {node} is shorter than 16 characters",
                n + 1
            )));
        }
        if tokens.iter().any(|(_, t)| t == token) {
            return Err(fail(format!("line {}: a token is used twice", n + 1)));
        }
        tokens.push((node.to_owned(), token.to_owned()));
    }
    if tokens.is_empty() {
        return Err(fail("no `NODE TOKEN` line".into()));
    }
    Ok(tokens)
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl NodeAuth {
    /// The node whose agent holds `token`.
    ///
    /// # Errors
    /// [`Refusal::Unauthenticated`] saying why, or [`Refusal::Unavailable`] when the API server
    /// cannot be asked.
    pub async fn node_of(&self, token: &str) -> Result<String, Refusal> {
        match self {
            Self::Bootstrap { tokens, .. } => {
                let mut found = None;
                for (node, t) in tokens {
                    if same(t.as_bytes(), token.as_bytes()) {
                        found = Some(node.clone());
                    }
                }
                found.ok_or_else(|| Refusal::Unauthenticated("unknown bootstrap token".into()))
            }
            Self::Kubernetes {
                client,
                audience,
                agent_user,
            } => review(client, audience, agent_user, token).await,
        }
    }
}

async fn review(
    client: &kube::Client,
    audience: &str,
    agent_user: &str,
    token: &str,
) -> Result<String, Refusal> {
    let unauthenticated = |m: String| Refusal::Unauthenticated(m);
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..TokenReview::default()
    };
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let answer = api
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| Refusal::Unavailable(format!("TokenReview: {e}")))?;
    let status = answer.status.unwrap_or_default();
    if let Some(error) = status.error.filter(|e| !e.is_empty()) {
        return Err(unauthenticated(format!("the API server says: {error}")));
    }
    if status.authenticated != Some(true) {
        return Err(unauthenticated(
            "the API server did not authenticate the token".into(),
        ));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(unauthenticated(format!(
            "the token is not for audience {audience}"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if username != agent_user {
        return Err(unauthenticated(format!(
            "{username} is not the agents' service account {agent_user}"
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    if let Some(node) = first(EXTRA_NODE_NAME).filter(|n| !n.is_empty()) {
        return Ok(node);
    }
    // API servers before 1.30 bind the pod but do not name its node: ask for the pod.
    let Some(pod_name) = first(EXTRA_POD_NAME) else {
        return Err(unauthenticated(
            "the token is not bound to a pod (use a projected ServiceAccount token)".into(),
        ));
    };
    let namespace = agent_user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split(':').next())
        .unwrap_or_default();
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let pod = pods
        .get_opt(&pod_name)
        .await
        .map_err(|e| Refusal::Unavailable(format!("reading pod {namespace}/{pod_name}: {e}")))?
        .ok_or_else(|| {
            unauthenticated(format!("the token's pod {namespace}/{pod_name} is gone"))
        })?;
    if let Some(uid) = first(EXTRA_POD_UID)
        && pod.metadata.uid.as_deref() != Some(uid.as_str())
    {
        return Err(unauthenticated(format!(
            "the token's pod {namespace}/{pod_name} was replaced"
        )));
    }
    pod.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            unauthenticated(format!(
                "the token's pod {namespace}/{pod_name} has no node"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_and_its_mistakes_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(
            &file,
            "# node token\nnode-1 aaaaaaaaaaaaaaaaaaaa\n\nnode-2   bbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        let tokens = read_token_file(&file).unwrap();
        assert_eq!(tokens.len(), 2);
        let auth = NodeAuth::Bootstrap {
            file: file.clone(),
            tokens,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            rt.block_on(auth.node_of("bbbbbbbbbbbbbbbbbbbb")).unwrap(),
            "node-2"
        );
        let e = rt
            .block_on(auth.node_of("bbbbbbbbbbbbbbbbbbbc"))
            .unwrap_err();
        assert_eq!(e.result(), "unauthenticated");
        for (text, why) in [
            ("node-1\n", "line 1: expected `NODE TOKEN`"),
            ("node-1 short\n", "shorter than 16"),
            (
                "a aaaaaaaaaaaaaaaaaaaa\nb aaaaaaaaaaaaaaaaaaaa\n",
                "line 2: a token is used twice",
            ),
            ("# nothing\n", "no `NODE TOKEN` line"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = read_token_file(&file).unwrap_err().to_string();
            assert!(
                e.starts_with(&file.display().to_string()) && e.contains(why),
                "{text:?}: {e}"
            );
        }
    }
}
