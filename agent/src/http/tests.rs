//! Route compilation and selection, without a network.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;

use super::routes::{RouteTable, ServiceKey, is_http_port};
use super::{Dialled as _, gateway::HttpRoute};
use crate::policy::ObjectRef;
use crate::services::{Endpoint, Frontend, Protocol, ServicePort, ServiceTable};

fn r(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn key(name: &str, port: u16) -> ServiceKey {
    ServiceKey {
        service: r("shop", name),
        port,
    }
}

/// Services `web` (ClusterIP .10, port 80 `http`, port 9000 `metrics`), `web-v1` (.11:80,
/// backend 10.244.1.1:8080), `web-v2` (.12:80, backend 10.244.2.1:8080); `web`'s backends are
/// both pods.
fn cluster() -> (BTreeMap<ObjectRef, Arc<Service>>, ServiceTable) {
    let service = |name: &str, ports: serde_json::Value| -> (ObjectRef, Arc<Service>) {
        let doc = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"ports": ports},
        });
        (
            r("shop", name),
            Arc::new(serde_json::from_value(doc).unwrap()),
        )
    };
    let services = BTreeMap::from([
        service(
            "web",
            serde_json::json!([{"name": "http", "port": 80}, {"name": "metrics", "port": 9000}]),
        ),
        service("web-v1", serde_json::json!([{"name": "http", "port": 80}])),
        service(
            "web-v2",
            serde_json::json!([{"port": 80, "appProtocol": "kubernetes.io/h2c"}]),
        ),
    ]);
    let port = |name: &str, ip: [u8; 4], port: u16, backends: &[[u8; 4]]| {
        let frontend = Frontend {
            addr: IpAddr::from(ip),
            port,
            protocol: Protocol::Tcp,
        };
        (
            frontend,
            ServicePort {
                service: r("shop", name),
                port_name: String::new(),
                frontend,
                endpoints: backends
                    .iter()
                    .map(|b| Endpoint {
                        addr: IpAddr::from(*b),
                        port: if port == 9000 { 9000 } else { 8080 },
                        ready: true,
                        serving: true,
                        terminating: false,
                        node: None,
                        zone: None,
                        pod: None,
                        used: true,
                    })
                    .collect(),
                local_only: false,
                affinity_secs: 0,
            },
        )
    };
    let (v1, v2) = ([10, 244, 1, 1], [10, 244, 2, 1]);
    let table = ServiceTable {
        ports: BTreeMap::from([
            port("web", [10, 96, 0, 10], 80, &[v1, v2]),
            port("web", [10, 96, 0, 10], 9000, &[v1, v2]),
            port("web-v1", [10, 96, 0, 11], 80, &[v1]),
            port("web-v2", [10, 96, 0, 12], 80, &[v2]),
        ]),
        skipped: BTreeMap::new(),
    };
    (services, table)
}

fn routes(yaml: &str) -> BTreeMap<ObjectRef, Arc<HttpRoute>> {
    if yaml.trim().is_empty() {
        return BTreeMap::new();
    }
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| {
            let route: HttpRoute = serde::Deserialize::deserialize(doc).unwrap();
            let m = &route.metadata;
            (
                r(
                    m.namespace.as_deref().unwrap_or("shop"),
                    m.name.as_deref().unwrap(),
                ),
                Arc::new(route),
            )
        })
        .collect()
}

fn build(yaml: &str) -> RouteTable {
    let (services, table) = cluster();
    RouteTable::build(&services, &routes(yaml), &table)
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

/// The backend names a request is routed to, over every draw of a 100-weight split.
fn backend_of(table: &RouteTable, req: &http::request::Parts) -> Option<String> {
    let rule = table.ports.get(&key("web", 80))?.select(req)?;
    Some(rule.pick(0)?.service.service.name.clone())
}

#[test]
fn http_ports_are_told_by_app_protocol_or_name() {
    assert!(is_http_port(Some("http"), None));
    assert!(is_http_port(Some("http-web"), None));
    assert!(is_http_port(Some("grpc-api"), None));
    assert!(is_http_port(None, Some("http")));
    assert!(is_http_port(None, Some("h2c")));
    assert!(is_http_port(Some("db"), Some("kubernetes.io/h2c")));
    assert!(!is_http_port(Some("https"), None), "TLS is not parsed");
    assert!(
        !is_http_port(Some("http"), Some("kubernetes.io/ws")),
        "appProtocol wins"
    );
    assert!(!is_http_port(Some("postgres"), None));
    assert!(!is_http_port(None, None));
}

#[test]
fn only_backends_of_routed_http_ports_are_parsed() {
    let client: SocketAddr = "10.244.0.5:40000".parse().unwrap();
    let v1: SocketAddr = "10.244.1.1:8080".parse().unwrap();
    // Without a route nothing is parsed: the backend alone cannot tell a dial of the Service
    // from a dial of the pod.
    let table = build("");
    assert_eq!(table.dialled(client, v1), None);
    assert!(table.ports.contains_key(&key("web-v2", 80)), "h2c is HTTP");
    assert!(
        !table.ports.contains_key(&key("web", 9000)),
        "metrics is not"
    );
    // With a route on web (sharing its pods with web-v1 and web-v2), its backends are web's.
    let routed = build(CANARY);
    assert_eq!(routed.dialled(client, v1), Some(key("web", 80)));
    // web:9000 (`metrics`) is not HTTP: its backends stay on the L4 tunnel.
    assert_eq!(
        routed.dialled(client, "10.244.1.1:9000".parse().unwrap()),
        None
    );
    // Two routed Services sharing a pod: ambiguous, left to L4.
    let both = format!(
        "{CANARY}---\n{}",
        CANARY
            .replace("name: canary", "name: other")
            .replace("name: web, port: 80}]", "name: web-v1, port: 80}]")
    );
    assert_eq!(build(&both).dialled(client, v1), None);
    // A request without the header takes the weighted rule (draw 0: web-v1).
    let req = request("GET", "/anything", &[]);
    assert_eq!(backend_of(&routed, &req).as_deref(), Some("web-v1"));
}

const CANARY: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: 'yes'}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - backendRefs:
    - {name: web-v1, port: 80, weight: 90}
    - {name: web-v2, port: 80, weight: 10}
    timeouts: {request: 1500ms}
";

#[test]
fn weights_split_and_a_header_match_wins() {
    let table = build(CANARY);
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    let plain = request("GET", "/", &[]);
    let rule = table.ports[&key("web", 80)].select(&plain).unwrap();
    assert_eq!(rule.route, "shop/canary");
    assert_eq!(rule.timeout, Some(Duration::from_millis(1500)));
    let mut v2 = 0;
    for draw in 0..1000 {
        if rule.pick(draw).unwrap().service.service.name == "web-v2" {
            v2 += 1;
        }
    }
    assert_eq!(v2, 100, "10% of the draws go to web-v2");
    let canary = request("GET", "/", &[("X-Canary", "yes")]);
    assert_eq!(backend_of(&table, &canary).as_deref(), Some("web-v2"));
    let other = request("GET", "/", &[("x-canary", "no")]);
    assert_eq!(backend_of(&table, &other).as_deref(), Some("web-v1"));
}

#[test]
fn matches_follow_gateway_api_precedence() {
    let table = build(
        r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-paths, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: prefix-api, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v2/}}]
    backendRefs: [{name: prefix-api-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /api/v2/items}}]
    backendRefs: [{name: exact, port: 80}]
  - matches: [{path: {type: RegularExpression, value: '/img/.*\.png'}}]
    backendRefs: [{name: regex, port: 80}]
  - matches: [{path: {value: /api}, method: POST}]
    backendRefs: [{name: post, port: 80}]
  - matches: [{path: {value: /api}, method: POST, queryParams: [{name: debug, value: '1'}]}]
    backendRefs: [{name: post-debug, port: 80}]
  - matches: [{path: {value: /api}, method: POST, headers: [{name: x-a, type: RegularExpression, value: 'a+'}]}]
    backendRefs: [{name: post-header, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-paths, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: same-prefix-older-name, port: 80}]
",
    );
    let to = |method: &str, uri: &str, headers: &[(&str, &str)]| {
        backend_of(&table, &request(method, uri, headers))
    };
    assert_eq!(to("GET", "/api/v2/items", &[]).as_deref(), Some("exact"));
    assert_eq!(
        to("GET", "/api/v2/other", &[]).as_deref(),
        Some("prefix-api-v2")
    );
    // Equal prefixes: the route first by name (both have no creation time).
    assert_eq!(
        to("GET", "/api/v1", &[]).as_deref(),
        Some("same-prefix-older-name")
    );
    assert_eq!(
        to("GET", "/apiary", &[]),
        None,
        "a prefix matches whole segments"
    );
    assert_eq!(to("GET", "/img/a/b.png", &[]).as_deref(), Some("regex"));
    assert_eq!(
        to("GET", "/img/a.png.txt", &[]),
        None,
        "a regex matches the whole path"
    );
    assert_eq!(to("POST", "/api", &[]).as_deref(), Some("post"));
    assert_eq!(
        to("POST", "/api", &[("x-a", "aaa")]).as_deref(),
        Some("post-header"),
        "a header match beats a query match"
    );
    assert_eq!(
        to("POST", "/api?x=2&debug=1", &[]).as_deref(),
        Some("post-debug")
    );
}

#[test]
fn bad_fields_are_named_and_the_rest_applies() {
    let table = build(
        r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mixed, namespace: shop}
spec:
  parentRefs:
  - {kind: Service, group: '', name: web}
  - {kind: Service, group: '', name: web, port: 9000}
  - {kind: Service, group: '', name: nosuch}
  rules:
  - matches: [{path: {type: RegularExpression, value: '(unclosed'}}, {path: {value: /ok}}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {value: /mirror}}]
    filters: [{type: URLRewrite}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {value: /ghost}}]
    backendRefs: [{name: ghost, port: 80}]
  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: web-v1, port: 80, weight: 0}]
",
    );
    let fields: Vec<(&str, &str)> = table
        .errors
        .iter()
        .map(|e| (e.object.as_str(), e.field.as_str()))
        .collect();
    for field in [
        "spec.parentRefs[1]",
        "spec.parentRefs[2]",
        "spec.rules[0].matches[0].path.value",
        "spec.rules[1].filters[0].type",
        "spec.rules[2].backendRefs[0]",
    ] {
        assert!(
            fields.contains(&("HTTPRoute shop/mixed", field)),
            "expected an error on {field}, got {fields:?}"
        );
    }
    let routes = &table.ports[&key("web", 80)];
    let ok = routes.select(&request("GET", "/ok/x", &[])).unwrap();
    assert_eq!(ok.pick(7).unwrap().service, key("web-v1", 80));
    let mirror = routes.select(&request("GET", "/mirror", &[])).unwrap();
    assert!(
        mirror.invalid.is_some(),
        "an unsupported filter answers 500"
    );
    let ghost = routes.select(&request("GET", "/ghost", &[])).unwrap();
    assert!(
        !table
            .endpoints
            .contains_key(&ghost.pick(0).unwrap().service)
    );
    let zero = routes.select(&request("GET", "/zero", &[])).unwrap();
    assert_eq!(zero.pick(3), None, "weights all 0: 500");
    // Attached routes answer 404 for what none of them matches.
    assert!(routes.select(&request("GET", "/elsewhere", &[])).is_none());
}

#[test]
fn route_status_has_gamma_conditions_naming_the_fields() {
    let table = build(
        r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mixed, namespace: shop}
spec:
  parentRefs:
  - {kind: Service, group: '', name: web}
  - {kind: Service, group: '', name: nosuch}
  rules:
  - matches: [{path: {type: RegularExpression, value: '(unclosed'}}, {path: {value: /ok}}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {value: /ghost}}]
    backendRefs: [{name: ghost, port: 80}]
  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: web-v1, port: 80, weight: 0}, {name: web-v2, port: 80, weight: 0}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: fine, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web}]
  rules:
  - backendRefs: [{name: web-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orphan, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: nosuch}]
  rules:
  - backendRefs: [{name: web-v1, port: 80, kind: ConfigMap}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gateway-only, namespace: shop}
spec:
  parentRefs: [{name: edge}]
",
    );
    let of = |name: &str| {
        table
            .status
            .iter()
            .find(|s| s.object == format!("HTTPRoute shop/{name}"))
            .unwrap_or_else(|| panic!("no status for {name}: {:?}", table.status))
    };
    let condition =
        |name: &str, kind: &str| of(name).conditions.iter().find(|c| c.kind == kind).cloned();
    assert!(
        !table
            .status
            .iter()
            .any(|s| s.object.ends_with("gateway-only")),
        "a Gateway's route is not the mesh's"
    );
    assert!(of("fine").ok(), "{:?}", of("fine"));

    let mixed = of("mixed");
    assert!(!mixed.ok());
    let accepted = condition("mixed", "Accepted").unwrap();
    assert_eq!(
        (accepted.status, accepted.reason.as_str()),
        ("True", "Accepted")
    );
    assert!(
        accepted.message.contains("spec.parentRefs[1]"),
        "{accepted:?}"
    );
    let refs = condition("mixed", "ResolvedRefs").unwrap();
    assert_eq!(
        (refs.status, refs.reason.as_str()),
        ("False", "BackendNotFound")
    );
    assert!(
        refs.message.contains("spec.rules[1].backendRefs[0]"),
        "{refs:?}"
    );
    let partly = condition("mixed", "PartiallyInvalid").unwrap();
    assert_eq!(
        (partly.status, partly.reason.as_str()),
        ("True", "UnsupportedValue")
    );
    for field in [
        "spec.rules[0].matches[0].path.value",
        "spec.rules[2].backendRefs",
    ] {
        assert!(partly.message.contains(field), "{field} in {partly:?}");
    }
    assert!(partly.message.contains("weight 0"), "{partly:?}");

    let orphan = condition("orphan", "Accepted").unwrap();
    assert_eq!(
        (orphan.status, orphan.reason.as_str()),
        ("False", "NoMatchingParent")
    );
    assert!(
        orphan.message.contains("no Service shop/nosuch"),
        "{orphan:?}"
    );
}

#[test]
fn header_modifiers_set_add_and_remove() {
    let table = build(
        r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: headers, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web}]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-env, value: canary}]
        add: [{name: x-trace, value: two}]
        remove: [x-secret]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-served-by, value: mesh}]}
    backendRefs: [{name: web-v1, port: 80}]
",
    );
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    let rule = table.ports[&key("web", 80)]
        .select(&request("GET", "/", &[]))
        .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-env", "prod".parse().unwrap());
    headers.insert("x-trace", "one".parse().unwrap());
    headers.insert("x-secret", "s".parse().unwrap());
    rule.request_headers.apply(&mut headers);
    assert_eq!(headers["x-env"], "canary");
    assert_eq!(headers.get_all("x-trace").iter().count(), 2);
    assert!(!headers.contains_key("x-secret"));
    let mut out = http::HeaderMap::new();
    rule.response_headers.apply(&mut out);
    assert_eq!(out["x-served-by"], "mesh");
}

#[test]
fn a_route_with_a_wrong_shape_names_its_field() {
    let doc = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {"rules": [{"backendRefs": [{"name": "v1", "weight": "ten"}]}]}
    });
    let (object, field, _) = crate::source::manifests::parse_object(doc).unwrap_err();
    assert_eq!(object.as_deref(), Some("HTTPRoute shop/r"));
    assert_eq!(
        field.as_deref(),
        Some("spec.rules[0].backendRefs[0].weight")
    );
}

#[test]
fn retries_and_backend_timeouts_compile_and_bad_fields_are_named() {
    let table = build(
        r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retry, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web}]
  rules:
  - matches: [{path: {value: /a}}]
    backendRefs: [{name: web-v1, port: 80}]
    retry: {codes: [503, 200], attempts: 3, backoff: 100ms}
    timeouts: {request: 2s, backendRequest: 500ms}
  - matches: [{path: {value: /b}}]
    backendRefs: [{name: web-v1, port: 80}]
    retry: {attempts: 50, backoff: 1.5s}
    timeouts: {backendRequest: soon}
",
    );
    let fields: Vec<&str> = table.errors.iter().map(|e| e.field.as_str()).collect();
    for field in [
        "spec.rules[0].retry.codes[1]",
        "spec.rules[1].retry.attempts",
        "spec.rules[1].retry.backoff",
        "spec.rules[1].timeouts.backendRequest",
    ] {
        assert!(
            fields.contains(&field),
            "expected an error on {field}, got {fields:?}"
        );
    }
    let routes = &table.ports[&key("web", 80)];
    let a = routes.select(&request("GET", "/a", &[])).unwrap();
    assert_eq!(
        a.retry,
        Some(super::routes::Retry {
            attempts: 3,
            codes: vec![503],
            backoff: std::time::Duration::from_millis(100),
        })
    );
    assert_eq!(a.timeout, Some(std::time::Duration::from_secs(2)));
    assert_eq!(
        a.backend_timeout,
        Some(std::time::Duration::from_millis(500))
    );
    let b = routes.select(&request("GET", "/b", &[])).unwrap();
    assert_eq!(b.retry, None, "a bad backoff: no retries");
    assert_eq!(b.backend_timeout, None);
}

#[test]
fn request_mirrors_compile_and_a_missing_mirror_is_named() {
    let table = build(
        r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shadow, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web}]
  rules:
  - backendRefs: [{name: web-v1, port: 80}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: web-v2, port: 80}, percent: 25}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: ghost, port: 80}}}
",
    );
    let fields: Vec<&str> = table.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.rules[0].filters[1].requestMirror.backendRef.name"]
    );
    let rule = table.ports[&key("web", 80)]
        .select(&request("GET", "/", &[]))
        .unwrap();
    assert_eq!(rule.mirrors, [(key("web-v2", 80), 25)]);
    assert!(rule.invalid.is_none(), "a bad mirror costs only itself");
}

/// A `TrafficPolicy` makes its Service's HTTP ports parsed without a route (the policy acts on
/// requests); without one, an unrouted port stays L4.
#[test]
fn a_traffic_policy_makes_its_services_http_port_parsed_without_a_route() {
    let (services, table) = cluster();
    let backend: SocketAddr = "10.244.1.1:8080".parse().unwrap();
    let client: SocketAddr = "10.244.9.9:40000".parse().unwrap();
    let bare = RouteTable::build(&services, &BTreeMap::new(), &table);
    assert_eq!(
        bare.dialled(client, backend),
        None,
        "no route, no policy: L4"
    );
    let policy = super::traffic::Resilience {
        policy: "shop/v1".into(),
        targets: vec![r("shop", "web-v1")],
        pool: None,
        outlier: None,
        fault: None,
    };
    let with = RouteTable::build_with(
        &services,
        &BTreeMap::new(),
        std::collections::HashMap::from([(r("shop", "web-v1"), Arc::new(policy))]),
        &table,
    );
    assert_eq!(with.dialled(client, backend), Some(key("web-v1", 80)));
    // web-v2's pod also backs `web`, which has neither: still one candidate, still L4.
    let other: SocketAddr = "10.244.2.1:8080".parse().unwrap();
    assert_eq!(with.dialled(client, other), None);
}
