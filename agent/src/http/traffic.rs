//! Resilience per Service: the `nodeward.io/v1alpha1` `TrafficPolicy` (Gateway API policy
//! attachment: `spec.targetRefs` of kind Service), with the meaning Istio's DestinationRule
//! (`connectionPool`, `outlierDetection`) and VirtualService (`fault`) give its fields.
//!
//! * [`TrafficPolicy`]: the CRD type (its schema is in `policies/crds/`).
//! * [`compile`]: one object to a [`Resilience`], or every bad field (pure).
//! * [`Attached`]: every policy in force per target Service, keeping an invalid object's last
//!   good version (pure).
//! * [`TrafficState`]: what the proxy counts at run time: the connection-pool semaphores and
//!   each endpoint's outlier state (held by [`super::HttpShared`]).
//!
//! Where it acts (see `proxy.rs`): `fault` on requests to the dialled Service, before they are
//! routed; `connectionPool` and `outlierDetection` on the backend Service a rule picked, when
//! its endpoint is drawn.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::gateway::parse_duration;
use super::routes::{Reason, RouteError};
use crate::policy::ObjectRef;
use crate::policy::crd::PolicyStatus;

/// Connection pool, outlier detection and fault injection for the Services it targets.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodeward.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    singular = "trafficpolicy",
    namespaced,
    shortname = "tp",
    category = "nodeward",
    derive = "PartialEq",
    derive = "Default",
    doc = "Connection pool limits, outlier detection and fault injection for the HTTP ports of the Services it targets (the meaning Istio's DestinationRule and VirtualService give these fields).",
    status = "PolicyStatus",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.targetRefs[*].name",
        description = "the Services it applies to"
    ),
    printcolumn(
        name = "Enforcing",
        type_ = "integer",
        json_path = ".status.enforcingNodes",
        description = "nodes whose agent enforces the current generation"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// The Services (of this namespace) the policy applies to: `{group: "", kind: Service, name}`.
    pub target_refs: Vec<TargetRef>,
    /// Limits on the upstream connections and requests to the Service, from each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejecting endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Delays or aborts for a share of the requests to the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Gateway API `LocalPolicyTargetReference`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// `""` (core).
    #[serde(default)]
    pub group: String,
    /// `Service`.
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Upstream connections busy with a request to the Service at once, per node (an HTTP/1.1
    /// connection carries one request at a time; an h2 request counts as one). A request over
    /// it waits for one (see `maxPendingRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests that may wait for a connection when `maxConnections` are busy; the next one is
    /// answered 503 at once. Unset: no limit (Istio's default). 0: none wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests one upstream connection carries before it is closed (1: no keep-alive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (a connection that cannot be made counts) that eject an
    /// endpoint. Default 5; 0 turns it off.
    #[serde(
        default,
        rename = "consecutive5xxErrors",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502, 503 or 504 answers (or connections that cannot be made) that eject an
    /// endpoint. Default 0: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often an endpoint's ejection count decays by one while it is not ejected (default
    /// 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// An ejection lasts this times the number of times the endpoint was ejected (default
    /// 30s; at most 300s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// The most of the Service's endpoints ejected at once, in percent (default 10; at least
    /// one endpoint may be ejected, and one always stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// Percent of the requests delayed (0 to 100).
    pub percentage: f64,
    /// How long (`500ms`, `2s`).
    pub fixed_delay: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// Percent of the requests answered by the agent with `httpStatus` (0 to 100).
    pub percentage: f64,
    /// 200 to 599.
    pub http_status: u16,
}

/// A policy's connection-pool limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolLimits {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
}

/// A policy's outlier detection, with Istio's defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierRule {
    /// 0: off.
    pub consecutive_5xx: u32,
    /// 0: off.
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// The longest ejection, whatever the count (Istio's default `maxEjectionTime`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// A policy's fault injection.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultRule {
    /// (percent, delay).
    pub delay: Option<(f64, Duration)>,
    /// (percent, status).
    pub abort: Option<(f64, http::StatusCode)>,
}

/// One valid `TrafficPolicy`, as the proxy applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct Resilience {
    /// `ns/name`.
    pub policy: String,
    /// The target Services (`spec.targetRefs`), checked against the inventory later.
    pub targets: Vec<ObjectRef>,
    pub pool: Option<PoolLimits>,
    pub outlier: Option<OutlierRule>,
    pub fault: Option<FaultRule>,
}

/// Reads a `TrafficPolicy` from JSON, naming the field of a wrong type or an unknown one.
///
/// # Errors
/// The field path and what is wrong with it.
pub fn parse(value: serde_json::Value) -> Result<TrafficPolicy, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        (
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

/// Validates one object: every bad field, or the compiled policy.
///
/// # Errors
/// `(field, message)` for each field that cannot be applied; then none of the object applies
/// (its last good version does, see [`Attached`]).
pub fn compile(r: &ObjectRef, obj: &TrafficPolicy) -> Result<Resilience, Vec<(String, String)>> {
    let mut errors: Vec<(String, String)> = Vec::new();
    let spec = &obj.spec;
    let mut targets = Vec::new();
    if spec.target_refs.is_empty() {
        bad(&mut errors, "spec.targetRefs", "names no Service".into());
    }
    for (i, t) in spec.target_refs.iter().enumerate() {
        if !matches!(t.group.as_str(), "" | "core") || t.kind != "Service" {
            let why = format!("only Services are targets, not {:?}/{}", t.group, t.kind);
            bad(&mut errors, &format!("spec.targetRefs[{i}].kind"), why);
            continue;
        }
        targets.push(ObjectRef {
            namespace: r.namespace.clone(),
            name: t.name.clone(),
        });
    }
    let pool = spec.connection_pool.as_ref().map(|p| {
        if p.max_connections == Some(0) {
            let why = "0 would refuse every request; at least 1".into();
            bad(&mut errors, "spec.connectionPool.maxConnections", why);
        }
        if p.max_requests_per_connection == Some(0) {
            let why = "0 is no request at all; at least 1 (1: no keep-alive)".into();
            bad(
                &mut errors,
                "spec.connectionPool.maxRequestsPerConnection",
                why,
            );
        }
        PoolLimits {
            max_connections: p.max_connections,
            max_pending: p.max_pending_requests,
            max_requests_per_connection: p.max_requests_per_connection,
        }
    });
    let outlier = spec.outlier_detection.as_ref().map(|o| {
        let interval = duration(
            &mut errors,
            "spec.outlierDetection.interval",
            o.interval.as_deref(),
            Duration::from_secs(10),
        );
        let base_ejection = duration(
            &mut errors,
            "spec.outlierDetection.baseEjectionTime",
            o.base_ejection_time.as_deref(),
            Duration::from_secs(30),
        );
        if let Some(p) = o.max_ejection_percent.filter(|p| *p > 100) {
            let why = format!("{p} is over 100");
            bad(&mut errors, "spec.outlierDetection.maxEjectionPercent", why);
        }
        OutlierRule {
            consecutive_5xx: o.consecutive_5xx_errors.unwrap_or(5),
            consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
            interval,
            base_ejection,
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10),
        }
    });
    let fault = spec.fault.as_ref().map(|f| {
        let delay = f.delay.as_ref().map(|d| {
            let pct = percentage(&mut errors, "spec.fault.delay.percentage", d.percentage);
            let at = duration(
                &mut errors,
                "spec.fault.delay.fixedDelay",
                Some(&d.fixed_delay),
                Duration::ZERO,
            );
            (pct, at)
        });
        let abort = f.abort.as_ref().map(|a| {
            let pct = percentage(&mut errors, "spec.fault.abort.percentage", a.percentage);
            let status = match http::StatusCode::from_u16(a.http_status) {
                Ok(s) if (200..=599).contains(&a.http_status) => s,
                _ => {
                    let why = format!("{} is not a status from 200 to 599", a.http_status);
                    bad(&mut errors, "spec.fault.abort.httpStatus", why);
                    http::StatusCode::SERVICE_UNAVAILABLE
                }
            };
            (pct, status)
        });
        FaultRule { delay, abort }
    });
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Resilience {
        policy: r.to_string(),
        targets,
        pool,
        outlier,
        fault,
    })
}

fn bad(errors: &mut Vec<(String, String)>, field: &str, message: String) {
    errors.push((field.to_owned(), message));
}

/// A positive duration (`default` when unset, or after reporting a bad one).
fn duration(
    errors: &mut Vec<(String, String)>,
    field: &str,
    text: Option<&str>,
    default: Duration,
) -> Duration {
    let Some(text) = text else { return default };
    match parse_duration(text) {
        Ok(d) if d.is_zero() => {
            bad(
                errors,
                field,
                format!("{text:?} is zero; it must be positive"),
            );
            default
        }
        Ok(d) => d,
        Err(why) => {
            bad(errors, field, why);
            default
        }
    }
}

fn percentage(errors: &mut Vec<(String, String)>, field: &str, value: f64) -> f64 {
    if (0.0..=100.0).contains(&value) {
        value
    } else {
        bad(
            errors,
            field,
            format!("{value} is not a percentage from 0 to 100"),
        );
        0.0
    }
}

/// The policies in force, with the last good version of each object that turned invalid.
#[derive(Debug, Default)]
pub struct Attached {
    last_good: BTreeMap<ObjectRef, (String, Arc<Resilience>)>,
}

/// What [`Attached::update`] gives: the policy of each target Service, and the problems.
#[derive(Debug, Default)]
pub struct AttachedPolicies {
    pub by_service: HashMap<ObjectRef, Arc<Resilience>>,
    /// One per bad field or target (object `TrafficPolicy ns/name`).
    pub errors: Vec<RouteError>,
}

impl Attached {
    /// Compiles every object (`creationTimestamp` orders conflicts: the oldest policy on a
    /// Service wins, then `ns/name`, as Gateway API policy attachment says). An invalid object
    /// keeps its last good version in force; a target Service that does not exist is reported
    /// and the object's other targets apply.
    pub fn update(
        &mut self,
        policies: &BTreeMap<ObjectRef, Arc<TrafficPolicy>>,
        services: &BTreeMap<ObjectRef, Arc<Service>>,
    ) -> AttachedPolicies {
        let mut out = AttachedPolicies::default();
        self.last_good.retain(|r, _| policies.contains_key(r));
        let mut in_force: Vec<(String, ObjectRef, Arc<Resilience>)> = Vec::new();
        for (r, obj) in policies {
            let object = format!("TrafficPolicy {r}");
            let created = obj
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            match compile(r, obj) {
                Ok(c) => {
                    let c = Arc::new(c);
                    self.last_good
                        .insert(r.clone(), (created.clone(), c.clone()));
                    in_force.push((created, r.clone(), c));
                }
                Err(errors) => {
                    let kept = self.last_good.get(r).cloned();
                    let tail = if kept.is_some() {
                        "; the previous version stays enforced"
                    } else {
                        "; the policy is not applied"
                    };
                    for (field, message) in errors {
                        out.errors.push(RouteError {
                            object: object.clone(),
                            field,
                            message: format!("{message}{tail}"),
                            reason: Reason::UnsupportedValue,
                        });
                    }
                    if let Some((created, c)) = kept {
                        in_force.push((created, r.clone(), c));
                    }
                }
            }
        }
        in_force.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut owner: HashMap<ObjectRef, String> = HashMap::new();
        for (_, r, c) in in_force {
            let object = format!("TrafficPolicy {r}");
            for (i, target) in c.targets.iter().enumerate() {
                let field = format!("spec.targetRefs[{i}].name");
                if !services.contains_key(target) {
                    out.errors.push(RouteError {
                        object: object.clone(),
                        field,
                        message: format!("no Service {target}; the other targets apply"),
                        reason: Reason::BackendNotFound,
                    });
                    continue;
                }
                if let Some(first) = owner.get(target) {
                    out.errors.push(RouteError {
                        object: object.clone(),
                        field,
                        message: format!(
                            "Service {target} already has TrafficPolicy {first} (the older one applies)"
                        ),
                        reason: Reason::UnsupportedValue,
                    });
                    continue;
                }
                owner.insert(target.clone(), c.policy.clone());
                out.by_service.insert(target.clone(), c.clone());
            }
        }
        out
    }
}

/// What the proxy keeps across requests for the policies: per Service a connection-pool
/// state, per endpoint its outlier state.
#[derive(Debug, Default)]
pub struct TrafficState {
    pools: Mutex<HashMap<ObjectRef, Arc<PoolState>>>,
    outliers: Mutex<HashMap<ObjectRef, HashMap<SocketAddr, Health>>>,
}

#[derive(Debug)]
struct PoolState {
    limits: PoolLimits,
    connections: Arc<Semaphore>,
    /// `None`: any number may wait.
    pending: Option<Arc<Semaphore>>,
}

/// One endpoint's outlier state.
#[derive(Clone, Copy, Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Ejections, decayed by one per `interval` spent back.
    times: u32,
    /// Ejected until then (or back since then).
    until: Option<Instant>,
}

impl Health {
    fn ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| u > now)
    }
}

/// What an attempt on an endpoint came to, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Any answer under 500.
    Success,
    /// A 5xx other than 502, 503, 504.
    ServerError,
    /// 502, 503, 504, or no connection.
    GatewayError,
}

impl Outcome {
    #[must_use]
    pub fn of(status: http::StatusCode) -> Self {
        match status.as_u16() {
            502..=504 => Self::GatewayError,
            500..=599 => Self::ServerError,
            _ => Self::Success,
        }
    }
}

/// A request the connection pool refused: the agent answers 503.
#[derive(Debug)]
pub struct Overflow(pub String);

impl TrafficState {
    /// A place in `service`'s connection pool: a permit to hold until the exchange ends, or
    /// `None` without a limit. Waits (up to `deadline`) while `maxConnections` are busy and
    /// fewer than `maxPendingRequests` wait; past that, [`Overflow`] at once.
    ///
    /// # Errors
    /// The pool and its waiting room are full, or `deadline` passed while waiting.
    pub async fn admit(
        &self,
        service: &ObjectRef,
        limits: &PoolLimits,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let Some(max) = limits.max_connections else {
            return Ok(None);
        };
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
            let current = pools.get(service).filter(|p| p.limits == *limits).cloned();
            current.unwrap_or_else(|| {
                // A changed limit starts a new count; the requests of the old one finish
                // against it.
                let p = Arc::new(PoolState {
                    limits: *limits,
                    connections: Arc::new(Semaphore::new(max as usize)),
                    pending: limits
                        .max_pending
                        .map(|n| Arc::new(Semaphore::new(n as usize))),
                });
                pools.insert(service.clone(), p.clone());
                p
            })
        };
        if let Ok(permit) = pool.connections.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        let waiting = match &pool.pending {
            Some(pending) => match pending.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    return Err(Overflow(format!(
                        "connection pool of {service} full ({max} connections busy, {} requests waiting)",
                        limits.max_pending.unwrap_or_default()
                    )));
                }
            },
            None => None,
        };
        let acquired = pool.connections.clone().acquire_owned();
        let permit = match deadline {
            Some(at) => tokio::time::timeout_at(at, acquired).await.map_err(|_| {
                Overflow(format!(
                    "no connection of {service}'s pool came free before timeouts.request"
                ))
            })?,
            None => acquired.await,
        };
        drop(waiting);
        // The semaphore is never closed.
        permit
            .map(Some)
            .map_err(|_| Overflow(format!("connection pool of {service} closed")))
    }

    /// `endpoints` without the ejected ones (all of them when none is ejected).
    #[must_use]
    pub fn healthy(&self, service: &ObjectRef, endpoints: &[SocketAddr]) -> Vec<SocketAddr> {
        let now = Instant::now();
        let outliers = self.outliers.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(of) = outliers.get(service) else {
            return endpoints.to_vec();
        };
        endpoints
            .iter()
            .copied()
            .filter(|e| of.get(e).is_none_or(|h| !h.ejected(now)))
            .collect()
    }

    /// Counts an attempt's outcome on `endpoint` (one of `endpoints`, the Service's endpoints
    /// of the moment); returns the ejection time when it ejects the endpoint.
    pub fn record(
        &self,
        service: &ObjectRef,
        endpoint: SocketAddr,
        endpoints: &[SocketAddr],
        rule: &OutlierRule,
        outcome: Outcome,
    ) -> Option<Duration> {
        self.record_at(service, endpoint, endpoints, rule, outcome, Instant::now())
    }

    fn record_at(
        &self,
        service: &ObjectRef,
        endpoint: SocketAddr,
        endpoints: &[SocketAddr],
        rule: &OutlierRule,
        outcome: Outcome,
        now: Instant,
    ) -> Option<Duration> {
        let mut outliers = self.outliers.lock().unwrap_or_else(PoisonError::into_inner);
        if outcome == Outcome::Success {
            if let Some(of) = outliers.get_mut(service)
                && let Some(h) = of.get_mut(&endpoint)
            {
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
                // Forgotten once it has nothing left to remember.
                if h.times == 0 {
                    of.remove(&endpoint);
                    if of.is_empty() {
                        outliers.remove(service);
                    }
                }
            }
            return None;
        }
        // The Service's name is cloned only for its first entry, not per request.
        if !outliers.contains_key(service) {
            outliers.insert(service.clone(), HashMap::new());
        }
        let of = outliers.get_mut(service)?;
        let h = of.entry(endpoint).or_default();
        if h.ejected(now) {
            // Already ejected (a request that was under way): nothing more to count.
            return None;
        }
        h.consecutive_5xx += 1;
        if outcome == Outcome::GatewayError {
            h.consecutive_gateway += 1;
        } else {
            h.consecutive_gateway = 0;
        }
        let tripped = (rule.consecutive_5xx > 0 && h.consecutive_5xx >= rule.consecutive_5xx)
            || (rule.consecutive_gateway > 0 && h.consecutive_gateway >= rule.consecutive_gateway);
        if !tripped {
            return None;
        }
        let ejected = endpoints
            .iter()
            .filter(|e| of.get(e).is_some_and(|o| o.ejected(now)))
            .count();
        if ejected >= ejectable(endpoints.len(), rule.max_ejection_percent) {
            return None;
        }
        let h = of.entry(endpoint).or_default();
        // The count decays by one per interval spent back since the last ejection.
        if let Some(back) = h.until {
            let spent = now.saturating_duration_since(back).as_nanos();
            let decay = spent / rule.interval.as_nanos().max(1);
            h.times = h
                .times
                .saturating_sub(u32::try_from(decay).unwrap_or(u32::MAX));
        }
        h.times = h.times.saturating_add(1);
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        let time = rule.base_ejection.saturating_mul(h.times).min(MAX_EJECTION);
        h.until = Some(now + time);
        Some(time)
    }
}

/// How many of `n` endpoints may be ejected at once: `percent` of them, at least one (Envoy's
/// rule) when `percent` is not 0, and never all of them.
#[must_use]
pub fn ejectable(n: usize, percent: u32) -> usize {
    if percent == 0 || n < 2 {
        return 0;
    }
    let share = n * (percent.min(100) as usize) / 100;
    share.max(1).min(n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> TrafficPolicy {
        let value: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("yaml");
        parse(value).expect("parses")
    }

    fn r(name: &str) -> ObjectRef {
        ObjectRef {
            namespace: "backend".into(),
            name: name.into(),
        }
    }

    const FULL: &str = r"
apiVersion: nodeward.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: backend}
spec:
  targetRefs: [{group: '', kind: Service, name: web}]
  connectionPool: {maxConnections: 10, maxPendingRequests: 2, maxRequestsPerConnection: 100}
  outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 5s, maxEjectionPercent: 50}
  fault:
    delay: {percentage: 10, fixedDelay: 200ms}
    abort: {percentage: 2.5, httpStatus: 503}
";

    #[test]
    fn a_full_policy_compiles_with_its_meanings() {
        let c = compile(&r("web"), &policy(FULL)).expect("valid");
        assert_eq!(c.targets, vec![r("web")]);
        assert_eq!(
            c.pool,
            Some(PoolLimits {
                max_connections: Some(10),
                max_pending: Some(2),
                max_requests_per_connection: Some(100),
            })
        );
        assert_eq!(
            c.outlier,
            Some(OutlierRule {
                consecutive_5xx: 3,
                consecutive_gateway: 2,
                interval: Duration::from_secs(1),
                base_ejection: Duration::from_secs(5),
                max_ejection_percent: 50,
            })
        );
        let fault = c.fault.expect("fault");
        assert_eq!(fault.delay, Some((10.0, Duration::from_millis(200))));
        assert_eq!(
            fault.abort,
            Some((2.5, http::StatusCode::SERVICE_UNAVAILABLE))
        );
    }

    #[test]
    fn outlier_detection_takes_istios_defaults() {
        let p = policy(
            "{apiVersion: nodeward.io/v1alpha1, kind: TrafficPolicy, metadata: {name: a, namespace: backend}, spec: {targetRefs: [{kind: Service, name: web}], outlierDetection: {}}}",
        );
        let o = compile(&r("a"), &p)
            .expect("valid")
            .outlier
            .expect("outlier");
        assert_eq!(o.consecutive_5xx, 5);
        assert_eq!(o.consecutive_gateway, 0);
        assert_eq!(o.interval, Duration::from_secs(10));
        assert_eq!(o.base_ejection, Duration::from_secs(30));
        assert_eq!(o.max_ejection_percent, 10);
    }

    #[test]
    fn every_bad_field_is_named() {
        let p = policy(
            r"
apiVersion: nodeward.io/v1alpha1
kind: TrafficPolicy
metadata: {name: bad, namespace: backend}
spec:
  targetRefs: [{group: apps, kind: Deployment, name: web}]
  connectionPool: {maxConnections: 0, maxRequestsPerConnection: 0}
  outlierDetection: {interval: 0s, baseEjectionTime: -1s, maxEjectionPercent: 101}
  fault:
    delay: {percentage: 100.5, fixedDelay: 0ms}
    abort: {percentage: -1, httpStatus: 99}
",
        );
        let errors = compile(&r("bad"), &p).expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.targetRefs[0].kind",
                "spec.connectionPool.maxConnections",
                "spec.connectionPool.maxRequestsPerConnection",
                "spec.outlierDetection.interval",
                "spec.outlierDetection.baseEjectionTime",
                "spec.outlierDetection.maxEjectionPercent",
                "spec.fault.delay.percentage",
                "spec.fault.delay.fixedDelay",
                "spec.fault.abort.percentage",
                "spec.fault.abort.httpStatus",
            ],
            "{errors:?}"
        );
        assert!(errors[6].1.contains("100.5"), "{errors:?}");
    }

    #[test]
    fn an_unknown_or_mistyped_field_is_named_by_the_parser() {
        let value: serde_json::Value = serde_yaml_ng::from_str(
            "{apiVersion: nodeward.io/v1alpha1, kind: TrafficPolicy, metadata: {name: a}, spec: {targetRefs: [], connectionPool: {maxConnections: -3}}}",
        )
        .expect("yaml");
        let (field, _) = parse(value).expect_err("negative count");
        assert_eq!(field, "spec.connectionPool.maxConnections");
        let value: serde_json::Value = serde_yaml_ng::from_str(
            "{apiVersion: nodeward.io/v1alpha1, kind: TrafficPolicy, metadata: {name: a}, spec: {targetRefs: [], faults: {}}}",
        )
        .expect("yaml");
        let (field, message) = parse(value).expect_err("unknown field");
        assert_eq!(field, "spec.faults", "{message}");
        assert!(message.contains("faults"), "{message}");
    }

    fn services(names: &[&str]) -> BTreeMap<ObjectRef, Arc<Service>> {
        names
            .iter()
            .map(|n| (r(n), Arc::new(Service::default())))
            .collect()
    }

    #[test]
    fn an_invalid_version_keeps_the_last_good_one_and_a_missing_target_is_reported() {
        let mut attached = Attached::default();
        let good = Arc::new(policy(FULL));
        let mut policies = BTreeMap::from([(r("web"), good)]);
        let svc = services(&["web"]);
        let first = attached.update(&policies, &svc);
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        assert!(first.by_service.contains_key(&r("web")));

        let mut broken = policy(FULL);
        broken.spec.fault = Some(Fault {
            abort: Some(FaultAbort {
                percentage: 150.0,
                http_status: 503,
            }),
            delay: None,
        });
        broken.spec.target_refs.push(TargetRef {
            group: String::new(),
            kind: "Service".into(),
            name: "gone".into(),
        });
        policies.insert(r("web"), Arc::new(broken));
        let second = attached.update(&policies, &svc);
        let lines: Vec<String> = second.errors.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0]
                .starts_with("TrafficPolicy backend/web: field spec.fault.abort.percentage: 150")
                && lines[0].ends_with("the previous version stays enforced"),
            "{lines:?}"
        );
        let kept = &second.by_service[&r("web")];
        assert_eq!(
            kept.fault.and_then(|f| f.abort),
            Some((2.5, http::StatusCode::SERVICE_UNAVAILABLE)),
            "the last good version applies"
        );

        // Valid again, with a target that does not exist: the others apply.
        let mut two = policy(FULL);
        two.spec.target_refs.push(TargetRef {
            group: String::new(),
            kind: "Service".into(),
            name: "gone".into(),
        });
        policies.insert(r("web"), Arc::new(two));
        let third = attached.update(&policies, &svc);
        assert_eq!(third.errors.len(), 1, "{:?}", third.errors);
        assert_eq!(third.errors[0].field, "spec.targetRefs[1].name");
        assert!(third.errors[0].message.contains("no Service backend/gone"));
        assert!(third.by_service.contains_key(&r("web")));

        // Deleted: nothing is kept.
        let fourth = attached.update(&BTreeMap::new(), &svc);
        assert!(fourth.by_service.is_empty());
    }

    #[test]
    fn the_older_policy_wins_a_service() {
        let mut a = policy(FULL);
        a.metadata.name = Some("a".into());
        let mut b = policy(FULL);
        b.metadata.name = Some("b".into());
        let policies = BTreeMap::from([(r("a"), Arc::new(a)), (r("b"), Arc::new(b))]);
        let out = Attached::default().update(&policies, &services(&["web"]));
        assert_eq!(out.by_service[&r("web")].policy, "backend/a");
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert_eq!(out.errors[0].object, "TrafficPolicy backend/b");
    }

    #[test]
    fn ejectable_keeps_one_endpoint_and_ejects_at_least_one() {
        assert_eq!(ejectable(1, 100), 0);
        assert_eq!(ejectable(2, 10), 1);
        assert_eq!(ejectable(2, 100), 1);
        assert_eq!(ejectable(10, 30), 3);
        assert_eq!(ejectable(10, 0), 0);
    }

    fn rule() -> OutlierRule {
        OutlierRule {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn consecutive_errors_eject_for_base_times_count_and_a_success_resets() {
        let state = TrafficState::default();
        let svc = r("web");
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let all = [a, b];
        let t0 = Instant::now();
        let rec = |o, at| state.record_at(&svc, a, &all, &rule(), o, at);
        assert_eq!(rec(Outcome::ServerError, t0), None);
        assert_eq!(rec(Outcome::ServerError, t0), None);
        assert_eq!(
            rec(Outcome::Success, t0),
            None,
            "a success resets the count"
        );
        assert_eq!(rec(Outcome::ServerError, t0), None);
        assert_eq!(rec(Outcome::GatewayError, t0), None);
        assert_eq!(
            rec(Outcome::ServerError, t0),
            Some(Duration::from_secs(30)),
            "the third in a row ejects for baseEjectionTime"
        );
        assert_eq!(state.healthy(&svc, &all), vec![b]);
        // Back after 30 s; failing again at once: twice as long.
        let t1 = t0 + Duration::from_secs(31);
        for _ in 0..2 {
            assert_eq!(rec(Outcome::GatewayError, t1), None);
        }
        assert_eq!(
            rec(Outcome::GatewayError, t1),
            Some(Duration::from_secs(60))
        );
        // Long after (more than two intervals back): the count has decayed to nothing.
        let t2 = t1 + Duration::from_secs(60 + 25);
        for _ in 0..2 {
            rec(Outcome::ServerError, t2);
        }
        assert_eq!(rec(Outcome::ServerError, t2), Some(Duration::from_secs(30)));
    }

    #[test]
    fn max_ejection_percent_leaves_an_endpoint() {
        let state = TrafficState::default();
        let svc = r("web");
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let all = [a, b];
        let now = Instant::now();
        for _ in 0..3 {
            state.record_at(&svc, a, &all, &rule(), Outcome::ServerError, now);
        }
        for _ in 0..5 {
            assert_eq!(
                state.record_at(&svc, b, &all, &rule(), Outcome::ServerError, now),
                None,
                "the last endpoint is never ejected"
            );
        }
        assert_eq!(state.healthy(&svc, &all), vec![b]);
    }

    #[test]
    fn gateway_errors_alone_eject_when_only_they_are_counted() {
        let state = TrafficState::default();
        let svc = r("web");
        let rule = OutlierRule {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            ..rule()
        };
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let all = [a, "10.0.0.2:80".parse().unwrap()];
        let now = Instant::now();
        assert_eq!(
            state.record_at(&svc, a, &all, &rule, Outcome::GatewayError, now),
            None
        );
        assert_eq!(
            state.record_at(&svc, a, &all, &rule, Outcome::ServerError, now),
            None
        );
        assert_eq!(
            state.record_at(&svc, a, &all, &rule, Outcome::GatewayError, now),
            None
        );
        assert!(
            state
                .record_at(&svc, a, &all, &rule, Outcome::GatewayError, now)
                .is_some()
        );
    }

    #[tokio::test]
    async fn the_pool_answers_overflow_at_once_past_its_waiting_room() {
        let state = TrafficState::default();
        let svc = r("web");
        let limits = PoolLimits {
            max_connections: Some(1),
            max_pending: Some(1),
            max_requests_per_connection: None,
        };
        let held = state.admit(&svc, &limits, None).await.expect("first");
        assert!(held.is_some());
        let state = Arc::new(state);
        let waiter = {
            let (state, svc) = (state.clone(), svc.clone());
            tokio::spawn(async move { state.admit(&svc, &limits, None).await.map(|p| p.is_some()) })
        };
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = std::time::Instant::now();
        let third = state.admit(&svc, &limits, None).await;
        assert!(third.is_err(), "the third request overflows");
        assert!(started.elapsed() < Duration::from_millis(50), "at once");
        drop(held);
        assert!(
            matches!(waiter.await, Ok(Ok(true))),
            "the waiting request gets the freed connection"
        );
        // A deadline ends a wait.
        let _busy = state.admit(&svc, &limits, None).await.expect("free again");
        let soon = tokio::time::Instant::now() + Duration::from_millis(30);
        assert!(state.admit(&svc, &limits, Some(soon)).await.is_err());
    }
}
