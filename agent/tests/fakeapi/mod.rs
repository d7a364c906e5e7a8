//! An in-process Kubernetes API server for tests: list and watch as the real one does them, for
//! the resources nodeward reads, plus server-side-apply of `status` and Event creation.
//!
//! What is faithful:
//! - one cluster-wide `resourceVersion` counter; every write bumps it and is logged;
//! - `GET` list with `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `k`, `!k`), `fieldSelector`
//!   (`=`, `==`, `!=` on any dotted path, e.g. `spec.nodeName`, `metadata.name`), `limit` and
//!   `continue` (pages served from a snapshot taken at the first page's version); items of
//!   built-in kinds carry no `apiVersion`/`kind`, as the real server sends them;
//! - `?watch=true&resourceVersion=N`: a chunked stream of `WatchEvent` JSON lines for every
//!   logged change after `N` (ADDED/MODIFIED/DELETED, selectors applied; an object that stops
//!   matching a selector is sent as DELETED), `BOOKMARK`s when `allowWatchBookmarks=true`,
//!   closed after `timeoutSeconds`; `resourceVersion` 0 or absent starts with a synthetic ADDED
//!   per object; a version older than the compacted history gets an `ERROR` event with a
//!   `410 Expired` Status, as the real server's watch cache answers;
//! - stopping closes the listener and every open connection; starting again listens on the same
//!   address with the same state.
//!
//! Simplified: no authentication, no admission or schema validation, server-side apply merges
//! the applied `status` and removes what the same field manager applied before and no longer
//! applies (no conflict detection between managers), no protobuf, no HTTP/2.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the fake"
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

/// `(apiVersion, kind, plural, namespaced)` of what the fake serves.
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "Node", "nodes", false),
    ("v1", "Pod", "pods", true),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    (
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
    ),
    ("nodeward.io/v1alpha1", "MeshPolicy", "meshpolicies", true),
    (
        "nodeward.io/v1alpha1",
        "ClusterMeshPolicy",
        "clustermeshpolicies",
        false,
    ),
    ("nodeward.io/v1alpha1", "MutualTLS", "mutualtlses", true),
    (
        "nodeward.io/v1alpha1",
        "TrafficPolicy",
        "trafficpolicies",
        true,
    ),
    ("v1", "Service", "services", true),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    ("events.k8s.io/v1", "Event", "events", true),
    (
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "httproutes",
        true,
    ),
];

fn kind_of(api_version: &str, plural: &str) -> Option<(&'static str, bool)> {
    KINDS
        .iter()
        .find(|(a, _, p, _)| *a == api_version && *p == plural)
        .map(|(_, k, _, n)| (*k, *n))
}

fn plural_of(api_version: &str, kind: &str) -> Option<&'static str> {
    KINDS
        .iter()
        .find(|(a, k, _, _)| *a == api_version && *k == kind)
        .map(|(_, _, p, _)| *p)
}

/// `apiVersion/plural`, the key of a resource.
fn resource_key(api_version: &str, plural: &str) -> String {
    format!("{api_version}/{plural}")
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: String,
    kind: &'static str,
    object: Value,
    /// The object before the change (for selector transitions); `None` when created.
    before: Option<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// `resource` → `(namespace, name)` → object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    log: Vec<Change>,
    /// Watches from a version below this get `410 Expired`.
    compacted: u64,
    /// While set, watches deliver nothing newer than this version.
    held_at: Option<u64>,
    continues: HashMap<String, (u64, Vec<Value>)>,
    next_uid: u64,
    /// Fields each `(object path, manager)` applied last (status only).
    applied: HashMap<(String, String), BTreeSet<Vec<String>>>,
    /// Every request as `METHOD path?query`.
    pub requests: Vec<String>,
    /// Status applies: `(object path, field manager, body)`.
    pub status_applies: Vec<(String, String, Value)>,
    /// `410 Expired` errors sent to watches.
    pub expired_sent: u64,
    /// Tokens TokenReview knows.
    tokens: HashMap<String, FakeToken>,
    /// Resources (`apiVersion/plural`) answered 404, as a cluster without their CRD does.
    unserved: BTreeSet<String>,
}

/// A ServiceAccount token as TokenReview sees it.
#[derive(Clone, Debug)]
pub struct FakeToken {
    pub username: String,
    pub audiences: Vec<String>,
    pub expires: std::time::SystemTime,
    /// `user.extra` (the pod binding: `authentication.kubernetes.io/pod-name`, `pod-uid`,
    /// `node-name`).
    pub extra: BTreeMap<String, Vec<String>>,
}

struct Inner {
    state: Mutex<State>,
    changed: Notify,
    /// Watches end when this is notified (expiry, shutdown).
    close_watches: Notify,
    bookmark_interval: Duration,
}

/// The fake API server. Dropping it stops it.
pub struct FakeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

impl FakeApi {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake API server");
        let addr = listener.local_addr().expect("local address");
        let mut fake = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    rv: 100,
                    next_uid: 1,
                    ..State::default()
                }),
                changed: Notify::new(),
                close_watches: Notify::new(),
                bookmark_interval: Duration::from_millis(300),
            }),
            addr,
            server: None,
            connections: Arc::default(),
        };
        fake.serve(listener);
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("a valid URL"));
        kube::Client::try_from(config).expect("a kube client")
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let inner = self.inner.clone();
        let connections = self.connections.clone();
        self.server = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let inner = inner.clone();
                let task = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(&inner, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                let mut list = connections.lock().unwrap_or_else(PoisonError::into_inner);
                list.retain(|t| !t.is_finished());
                list.push(task);
            }
        }));
    }

    /// The API server goes away: the listener and every open connection close.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        for task in self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
        self.inner.close_watches.notify_waiters();
    }

    /// The API server comes back on the same address, with the same state.
    pub async fn restart(&mut self) {
        self.stop();
        // The old listener's socket is closed once the aborted task is dropped; retry briefly.
        for _ in 0..100 {
            if let Ok(listener) = tokio::net::TcpListener::bind(self.addr).await {
                self.serve(listener);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("could not listen on {} again", self.addr);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `token` known to TokenReview.
    pub fn add_token(&self, token: &str, info: FakeToken) {
        self.state().tokens.insert(token.to_owned(), info);
    }

    /// Creates or replaces an object (like `kubectl apply` of a whole object); bumps
    /// `metadata.generation` when anything but metadata and status changed.
    pub fn apply(&self, object: &impl serde::Serialize) {
        let mut object = serde_json::to_value(object).expect("an object serializes");
        let api_version = object["apiVersion"]
            .as_str()
            .expect("apiVersion")
            .to_owned();
        let kind = object["kind"].as_str().expect("kind").to_owned();
        let plural = plural_of(&api_version, &kind).expect("a kind the fake serves");
        let (_, namespaced) = kind_of(&api_version, plural).expect("known");
        if namespaced && object["metadata"]["namespace"].is_null() {
            object["metadata"]["namespace"] = "default".into();
        }
        let mut state = self.state();
        let resource = resource_key(&api_version, plural);
        let key = object_key(&object);
        let before = state
            .objects
            .get(&resource)
            .and_then(|m| m.get(&key))
            .cloned();
        let spec_of = |v: &Value| {
            let mut v = v.clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("metadata");
                m.remove("status");
            }
            v
        };
        let generation = match &before {
            Some(b) if spec_of(b) == spec_of(&object) => b["metadata"]["generation"].as_i64(),
            Some(b) => b["metadata"]["generation"].as_i64().map(|g| g + 1),
            None => Some(1),
        };
        let uid = match &before {
            Some(b) => b["metadata"]["uid"].clone(),
            None => {
                state.next_uid += 1;
                format!("uid-{}", state.next_uid).into()
            }
        };
        object["metadata"]["uid"] = uid;
        object["metadata"]["generation"] = generation.into();
        if let Some(b) = &before
            && object.get("status").is_none()
            && let Some(status) = b.get("status")
        {
            // Writing the main resource does not touch the status subresource.
            object["status"] = status.clone();
        }
        state.write(
            &resource,
            kind_static(&api_version, &kind),
            key,
            Some(object),
        );
        drop(state);
        self.inner.changed.notify_waiters();
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) {
        let plural = plural_of(api_version, kind).expect("a kind the fake serves");
        let resource = resource_key(api_version, plural);
        let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
        let mut state = self.state();
        state.write(&resource, kind_static(api_version, kind), key, None);
        drop(state);
        self.inner.changed.notify_waiters();
    }

    /// The current object, if any.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let plural = plural_of(api_version, kind)?;
        let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
        self.state()
            .objects
            .get(&resource_key(api_version, plural))?
            .get(&key)
            .cloned()
    }

    /// Open watches stop receiving changes (they are still logged) until [`Self::release`].
    pub fn hold(&self) {
        let mut state = self.state();
        state.held_at = Some(state.rv);
    }

    pub fn release(&self) {
        self.state().held_at = None;
        self.inner.changed.notify_waiters();
    }

    /// The history is compacted away and every open watch ends (as at its timeout): watchers
    /// resuming from any version seen so far get `410 Expired` and must relist.
    pub fn expire(&self) {
        {
            let mut state = self.state();
            state.compacted = state.rv + 1;
            state.log.clear();
            state.held_at = None;
        }
        self.inner.close_watches.notify_waiters();
    }

    /// `apiVersion/plural` is answered 404 (its CRD is not installed), or served again.
    pub fn set_served(&self, api_version: &str, plural: &str, served: bool) {
        let key = resource_key(api_version, plural);
        let mut state = self.state();
        if served {
            state.unserved.remove(&key);
        } else {
            state.unserved.insert(key);
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    pub fn expired_sent(&self) -> u64 {
        self.state().expired_sent
    }

    pub fn status_applies(&self) -> Vec<(String, String, Value)> {
        self.state().status_applies.clone()
    }

    /// Events created so far (events.k8s.io/v1, any namespace).
    pub fn events(&self) -> Vec<Value> {
        self.state()
            .objects
            .get("events.k8s.io/v1/events")
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

fn kind_static(api_version: &str, kind: &str) -> &'static str {
    KINDS
        .iter()
        .find(|(a, k, _, _)| *a == api_version && *k == kind)
        .map_or("Unknown", |(_, k, _, _)| k)
}

fn object_key(object: &Value) -> (String, String) {
    (
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned(),
    )
}

impl State {
    /// Stores (or deletes, with `None`) an object at a new version and logs the change.
    fn write(
        &mut self,
        resource: &str,
        kind: &'static str,
        key: (String, String),
        object: Option<Value>,
    ) {
        self.rv += 1;
        let rv = self.rv;
        let objects = self.objects.entry(resource.to_owned()).or_default();
        let before = objects.get(&key).cloned();
        let logged = match object {
            Some(mut object) => {
                object["metadata"]["resourceVersion"] = rv.to_string().into();
                objects.insert(key, object.clone());
                object
            }
            None => {
                let Some(mut old) = objects.remove(&key) else {
                    self.rv -= 1;
                    return;
                };
                old["metadata"]["resourceVersion"] = rv.to_string().into();
                old
            }
        };
        let deleted = !objects.contains_key(&object_key(&logged));
        self.log.push(Change {
            rv,
            resource: resource.to_owned(),
            kind,
            object: if deleted {
                json!({"__deleted": logged})
            } else {
                logged
            },
            before,
        });
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn status_error(code: u16, reason: &str, message: &str) -> Response<Body> {
    respond(
        StatusCode::from_u16(code).expect("a status code"),
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        }),
    )
}

fn query(req: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a path addresses.
struct Target {
    api_version: String,
    plural: String,
    kind: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some((*ns).to_owned()), {
            let mut v = vec![*plural];
            v.extend_from_slice(rest);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (plural, name, subresource) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => return None,
    };
    let (kind, _) = kind_of(&api_version, plural)?;
    Some(Target {
        api_version,
        plural: plural.to_owned(),
        kind,
        namespace,
        name,
        subresource,
    })
}

async fn handle(inner: &Arc<Inner>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let q = query(&req);
    inner
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .requests
        .push(format!(
            "{} {}?{}",
            req.method(),
            path,
            req.uri().query().unwrap_or_default()
        ));
    if path == "/version" {
        return respond(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "fake",
                "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
                "compiler": "gc", "platform": "linux/amd64",
            }),
        );
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && req.method() == Method::POST {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let Ok(review) = body.map(|b| serde_json::from_slice::<Value>(&b).unwrap_or_default())
        else {
            return status_error(400, "BadRequest", "no body");
        };
        return respond(StatusCode::CREATED, &token_review(inner, &review));
    }
    let Some(target) = target(&path) else {
        return status_error(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    let unserved = inner
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .unserved
        .contains(&resource_key(&target.api_version, &target.plural));
    if unserved {
        return status_error(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    }
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    match (method, &target.name, target.subresource.as_deref()) {
        (Method::GET, None, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(inner, &target, &q)
        }
        (Method::GET, None, None) => list(inner, &target, &q),
        (Method::GET, Some(name), None) => {
            let state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            let key = (target.namespace.clone().unwrap_or_default(), name.clone());
            match state
                .objects
                .get(&resource_key(&target.api_version, &target.plural))
                .and_then(|m| m.get(&key))
            {
                Some(o) => respond(StatusCode::OK, o),
                None => status_error(
                    404,
                    "NotFound",
                    &format!("{} {name} not found", target.plural),
                ),
            }
        }
        (Method::PATCH, Some(name), Some("status")) => {
            apply_status(inner, &target, name, &q, &content_type, &body)
        }
        (Method::POST, None, None) if target.kind == "Event" => {
            let Ok(mut event) = serde_json::from_slice::<Value>(&body) else {
                return status_error(400, "BadRequest", "not JSON");
            };
            event["apiVersion"] = "events.k8s.io/v1".into();
            event["kind"] = "Event".into();
            if event["metadata"]["namespace"].is_null() {
                event["metadata"]["namespace"] =
                    target.namespace.clone().unwrap_or_default().into();
            }
            let key = object_key(&event);
            let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.write("events.k8s.io/v1/events", "Event", key.clone(), Some(event));
            let stored = state.objects["events.k8s.io/v1/events"][&key].clone();
            respond(StatusCode::CREATED, &stored)
        }
        (Method::PATCH, Some(_), None) if target.kind == "Event" => {
            // Event series updates: accepted, not merged.
            respond(
                StatusCode::OK,
                &serde_json::from_slice(&body).unwrap_or(json!({})),
            )
        }
        (m, _, _) => status_error(
            405,
            "MethodNotAllowed",
            &format!("{m} {path} is not served by the fake"),
        ),
    }
}

/// What the real API server answers a TokenReview: unknown and expired tokens and tokens for
/// none of the requested audiences are not authenticated (with an error); otherwise the user
/// and the audiences both sides share.
fn token_review(inner: &Arc<Inner>, review: &Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let known = inner
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .tokens
        .get(token)
        .cloned();
    let status = match known {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(t) if t.expires <= std::time::SystemTime::now() => {
            json!({"authenticated": false, "error": "invalid bearer token, token has expired"})
        }
        Some(t) => {
            let shared: Vec<&String> = if wanted.is_empty() {
                t.audiences.iter().collect()
            } else {
                wanted.iter().filter(|a| t.audiences.contains(a)).collect()
            };
            if shared.is_empty() {
                json!({"authenticated": false, "error": "invalid bearer token, token audiences are invalid"})
            } else {
                json!({
                    "authenticated": true,
                    "audiences": shared,
                    "user": {"username": t.username, "uid": "fake-uid", "extra": t.extra},
                })
            }
        }
    };
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {},
        "spec": review["spec"].clone(),
        "status": status,
    })
}

/// A parsed `labelSelector` or `fieldSelector`.
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Splits at commas outside parentheses.
fn split_selector(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        parts.push(current);
    }
    parts
}

fn parse_selector(s: &str) -> Vec<Requirement> {
    let set = |v: &str| -> Vec<String> {
        v.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|x| x.trim().to_owned())
            .collect()
    };
    split_selector(s)
        .iter()
        .map(|part| {
            let part = part.trim();
            if let Some((k, v)) = part.split_once(" notin ") {
                Requirement::NotIn(k.trim().to_owned(), set(v))
            } else if let Some((k, v)) = part.split_once(" in ") {
                Requirement::In(k.trim().to_owned(), set(v))
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().to_owned())
            } else {
                Requirement::Exists(part.to_owned())
            }
        })
        .collect()
}

fn matches(requirements: &[Requirement], get: impl Fn(&str) -> Option<String>) -> bool {
    requirements.iter().all(|r| match r {
        Requirement::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
        // As in Kubernetes: `!=` also matches objects without the key.
        Requirement::NotEq(k, v) => get(k).as_deref() != Some(v.as_str()),
        Requirement::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
        Requirement::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
        Requirement::Exists(k) => get(k).is_some(),
        Requirement::NotExists(k) => get(k).is_none(),
    })
}

struct Selectors {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
    namespace: Option<String>,
}

impl Selectors {
    fn of(target: &Target, q: &HashMap<String, String>) -> Self {
        Self {
            labels: parse_selector(q.get("labelSelector").map_or("", String::as_str)),
            fields: parse_selector(q.get("fieldSelector").map_or("", String::as_str)),
            namespace: target.namespace.clone(),
        }
    }

    fn select(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && object["metadata"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let labels = &object["metadata"]["labels"];
        matches(&self.labels, |k| labels[k].as_str().map(str::to_owned))
            && matches(&self.fields, |path| {
                let mut v = object;
                for part in path.split('.') {
                    v = &v[part];
                }
                match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Null => Some(String::new()),
                    other => Some(other.to_string()),
                }
            })
    }
}

/// What the real server sends in a list: built-in kinds without `apiVersion`/`kind` per item.
fn list_item(target: &Target, object: &Value) -> Value {
    let mut item = object.clone();
    if !target.api_version.contains("nodeward.io")
        && let Some(m) = item.as_object_mut()
    {
        m.remove("apiVersion");
        m.remove("kind");
    }
    item
}

fn list(inner: &Arc<Inner>, target: &Target, q: &HashMap<String, String>) -> Response<Body> {
    let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
    let (rv, mut items) = if let Some(token) = q.get("continue").filter(|t| !t.is_empty()) {
        match state.continues.remove(token) {
            Some(page) => page,
            None => {
                return status_error(410, "Expired", "the provided continue parameter is too old");
            }
        }
    } else {
        let selectors = Selectors::of(target, q);
        let items: Vec<Value> = state
            .objects
            .get(&resource_key(&target.api_version, &target.plural))
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| selectors.select(o))
            .map(|o| list_item(target, o))
            .collect();
        (state.rv, items)
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut continue_token = None;
    if let Some(limit) = limit
        && items.len() > limit
    {
        let rest = items.split_off(limit);
        let token = format!("page-{rv}-{}", state.continues.len() + 1);
        state.continues.insert(token.clone(), (rv, rest));
        continue_token = Some(token);
    }
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if let Some(token) = continue_token {
        metadata["continue"] = token.into();
    }
    respond(
        StatusCode::OK,
        &json!({
            "apiVersion": target.api_version,
            "kind": format!("{}List", target.kind),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": type_, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(inner: &Arc<Inner>, target: &Target, q: &HashMap<String, String>) -> Response<Body> {
    let selectors = Selectors::of(target, q);
    let resource = resource_key(&target.api_version, &target.plural);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let from = q
        .get("resourceVersion")
        .filter(|v| !v.is_empty())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let inner = inner.clone();
    let api_version = target.api_version.clone();
    let kind = target.kind;
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut cursor = from;
        // Version 0: the current objects first, as synthetic ADDED events. A version older
        // than the history: one ERROR event with a 410 Status, then the end of the stream.
        let initial: Result<Vec<Value>, Value> = {
            let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            if from != 0 && from < state.compacted {
                state.expired_sent += 1;
                Err(json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", state.compacted),
                    "reason": "Expired", "code": 410,
                }))
            } else if from == 0 {
                cursor = state.rv;
                Ok(state
                    .objects
                    .get(&resource)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|o| selectors.select(o))
                    .cloned()
                    .collect())
            } else {
                Ok(Vec::new())
            }
        };
        let initial = match initial {
            Ok(objects) => objects,
            Err(status) => {
                let _ = tx.send(event_line("ERROR", &status)).await;
                return;
            }
        };
        for object in initial {
            if tx.send(event_line("ADDED", &object)).await.is_err() {
                return;
            }
        }
        loop {
            let changed = inner.changed.notified();
            let closed = inner.close_watches.notified();
            let lines: Vec<Bytes> = {
                let state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
                let upto = state.held_at.unwrap_or(state.rv);
                let mut lines = Vec::new();
                let from = cursor;
                for change in state.log.iter().filter(|c| c.rv > from && c.rv <= upto) {
                    cursor = change.rv;
                    if change.resource != resource {
                        continue;
                    }
                    let was = change.before.as_ref().is_some_and(|b| selectors.select(b));
                    if let Some(deleted) = change.object.get("__deleted") {
                        if was {
                            lines.push(event_line("DELETED", deleted));
                        }
                        continue;
                    }
                    let now = selectors.select(&change.object);
                    match (was, now) {
                        (false, true) => lines.push(event_line("ADDED", &change.object)),
                        (true, true) => lines.push(event_line("MODIFIED", &change.object)),
                        // No longer selected: the watcher must forget it.
                        (true, false) => lines.push(event_line("DELETED", &change.object)),
                        (false, false) => {}
                    }
                }
                if state.held_at.is_none() {
                    cursor = cursor.max(state.rv);
                }
                lines
            };
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                () = changed => {}
                () = closed => return,
                () = tokio::time::sleep_until(deadline) => return,
                () = tokio::time::sleep(inner.bookmark_interval), if bookmarks => {
                    let rv = {
                        let state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
                        if state.held_at.is_some() { continue; }
                        state.rv
                    };
                    let bookmark = json!({
                        "apiVersion": api_version, "kind": kind,
                        "metadata": { "resourceVersion": rv.to_string() },
                    });
                    if tx.send(event_line("BOOKMARK", &bookmark)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(StreamBody::new(stream).boxed())
        .expect("a valid response")
}

/// Every leaf path of a JSON value.
fn leaves(value: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(k.clone());
                leaves(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

fn remove_path(value: &mut Value, path: &[String]) {
    match path {
        [] => {}
        [last] => {
            if let Some(m) = value.as_object_mut() {
                m.remove(last);
            }
        }
        [first, rest @ ..] => {
            if let Some(child) = value.get_mut(first) {
                remove_path(child, rest);
            }
        }
    }
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

fn apply_status(
    inner: &Arc<Inner>,
    target: &Target,
    name: &str,
    q: &HashMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Response<Body> {
    if content_type != "application/apply-patch+yaml" {
        return status_error(
            415,
            "UnsupportedMediaType",
            "the fake only serves server-side apply",
        );
    }
    let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()) else {
        return status_error(
            400,
            "BadRequest",
            "fieldManager is required for apply patch",
        );
    };
    // kube sends JSON, which is YAML.
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return status_error(400, "BadRequest", "not JSON");
    };
    let resource = resource_key(&target.api_version, &target.plural);
    let key = (
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    );
    let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(mut object) = state
        .objects
        .get(&resource)
        .and_then(|m| m.get(&key))
        .cloned()
    else {
        return status_error(
            404,
            "NotFound",
            &format!("{} {name} not found", target.plural),
        );
    };
    let path = format!("{resource}/{}/{name}", key.0);
    let new_status = patch.get("status").cloned().unwrap_or(Value::Null);
    let mut fields = BTreeSet::new();
    leaves(&new_status, &mut vec![], &mut fields);
    let previous = state
        .applied
        .insert((path.clone(), manager.clone()), fields.clone())
        .unwrap_or_default();
    let mut status = object.get("status").cloned().unwrap_or(json!({}));
    for gone in previous.difference(&fields) {
        remove_path(&mut status, gone);
    }
    merge(&mut status, &new_status);
    object["status"] = status;
    state.status_applies.push((path, manager.clone(), patch));
    state.write(&resource, target.kind, key.clone(), Some(object));
    let stored = state.objects[&resource][&key].clone();
    drop(state);
    inner.changed.notify_waiters();
    respond(StatusCode::OK, &stored)
}
