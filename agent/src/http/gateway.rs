//! The Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`), as far as nodeward reads it.
//!
//! These mirror the upstream schema field for field (camelCase, the same defaults). They are not
//! the `gateway-api` crate's: its newest release (0.22) is built on kube 4 and k8s-openapi 0.28,
//! and nodeward is on kube 5 and k8s-openapi 0.29; two kube stacks in one binary cost more than
//! these few types. Unknown fields are ignored, so routes written for a newer schema still read.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

pub const API_VERSION: &str = "gateway.networking.k8s.io/v1";
pub const KIND: &str = "HTTPRoute";

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

/// For the Kubernetes source's watch (`ApiResource::erase`).
impl kube::Resource for HttpRoute {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        KIND.into()
    }

    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "gateway.networking.k8s.io".into()
    }

    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "httproutes".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Upstream default `gateway.networking.k8s.io`; GAMMA mesh routes say `""` (core).
    pub group: Option<String>,
    /// Upstream default `Gateway`; mesh routes say `Service`.
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    pub timeouts: Option<HttpRouteTimeouts>,
    /// GEP-1731 (experimental in the upstream schema).
    pub retry: Option<HttpRouteRetry>,
}

/// When a request is sent again (GEP-1731).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    /// Response codes (400-599) that get another attempt. Connection failures always do.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// How many times a request may be sent again (not counting the first).
    pub attempts: Option<u32>,
    /// The wait before each new attempt (a Gateway API duration).
    pub backoff: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HttpQueryParamMatch>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Default `/`.
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeaderMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpQueryParamMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_mirror: Option<RequestMirror>,
}

/// `RequestMirror`: a copy of each request goes to `backendRef`, its answer is discarded.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: MirrorBackendRef,
    /// 0-100; default 100.
    pub percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MirrorBackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// Upstream default `""` (core).
    pub group: Option<String>,
    /// Upstream default `Service`.
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    /// Upstream default 1.
    pub weight: Option<i32>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// A Gateway API duration (GEP-2257: `1h`, `10s`, `500ms`, `1m30s`; `0s` disables).
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// A Gateway API duration (GEP-2257): one to four `<digits><unit>` parts, units `h`, `m`, `s`,
/// `ms`, at most five digits each.
///
/// # Errors
/// Anything else, with what was expected.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a Gateway API duration (like 10s, 500ms, 1m30s)");
    let mut rest = text;
    let mut total = std::time::Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (std::time::Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (std::time::Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (std::time::Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (std::time::Duration::from_secs(n), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_follow_gep_2257() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "1.5s", "10 s", "123456s", "1d", "1s1s1s1s1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
