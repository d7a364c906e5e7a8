//! HTTP in the mesh, in the lab: a Service's HTTP port is routed request by request by the
//! `HTTPRoute` attached to it (GAMMA), by the source agent, over the HBONE tunnel.
//!
//! Pods: `frontend/web-0` (node-1) is the client; `backend/api-0` (node-1) answers as `v1`,
//! `backend/api-1` (node-2) as `v2` (`nodeward-lab-load http-serve` on port 8081). Services in
//! `backend`: `web` (both pods; the route's parent), `web-v1`, `web-v2` (one pod each), `raw`
//! (a plain TCP port to the byte echo on 8080), and `plain` (`backend/api-2`, node-1, an HTTP
//! port without a route: the L4 tunnel, for a latency figure). ClusterIPs 10.96.3.x. The
//! `TrafficPolicy` tests add `od`, `pooled`, `faulty` and `slow` (10.96.3.40-43).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use nodeward_lab::load::{Process, in_pod};
use nodeward_lab::manifests::documents;
use nodeward_lab::shared::shared_lab;
use nodeward_lab::{HTTP_PORT, Lab, PodState, eventually, netpol};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(10);
const BACKEND_PORT: u16 = 8081;

fn load_bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_nodeward-lab-load"))
}

/// Both namespaces meshed, STRICT.
fn mesh_strict(lab: &Lab) {
    for ns in ["frontend", "backend"] {
        lab.write_manifest(&format!("mtls-{ns}"), &netpol::mutual_tls(ns, "STRICT"))
            .unwrap();
    }
}

/// `nodeward-lab-load http-serve` in `pod` on the backend port, answering as `name`, with `extra`
/// arguments; `what` names it in errors. Stops when dropped.
fn http_backend(pod: &PodState, name: &str, extra: &[&str], what: &str) -> Process {
    let port = BACKEND_PORT.to_string();
    let mut args = vec!["http-serve", "--port", &port, "--name", name];
    args.extend_from_slice(extra);
    Process::spawn(
        in_pod(pod, load_bin()).args(args).stdout(Stdio::null()),
        what,
    )
    .unwrap()
}

/// A Service at `vip:80` whose port is named `port_name`, to `target` on `pods`.
fn service(
    lab: &Lab,
    name: &str,
    vip: Ipv4Addr,
    port_name: &str,
    target: u16,
    pods: &[&str],
) -> String {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|pod| {
            let p = lab.pod(pod);
            json!({
                "addresses": [p.ip4.to_string()],
                "conditions": { "ready": true },
                "nodeName": p.node,
                "targetRef": { "kind": "Pod", "name": p.name, "namespace": p.namespace },
            })
        })
        .collect();
    documents([
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": "backend" },
            "spec": {
                "clusterIP": vip.to_string(),
                "ports": [{ "name": port_name, "port": 80, "targetPort": target }],
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-1"), "namespace": "backend",
                "labels": { "kubernetes.io/service-name": name },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{ "name": port_name, "port": target, "protocol": "TCP" }],
        }),
    ])
}

const ROUTE: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: backend}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: 'yes'}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - backendRefs:
    - {name: web-v1, port: 80, weight: 90}
    - {name: web-v2, port: 80, weight: 10}
";

/// `nodeward-lab-load http-get` from `web-0`: its summary line.
fn http_get(lab: &Lab, addr: SocketAddr, count: usize, header: Option<&str>) -> Value {
    let mut cmd = in_pod(lab.pod("frontend/web-0"), load_bin());
    cmd.args([
        "http-get",
        "--addr",
        &addr.to_string(),
        "--count",
        &count.to_string(),
    ]);
    if let Some(h) = header {
        cmd.args(["--header", h]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("running nodeward-lab-load http-get");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("http-get printed {text:?}: {e}"))
}

/// `nodeward_http_requests_total` of node-1's agent for Service `web`, summed over its series.
fn web_requests(lab: &Lab) -> u64 {
    let text = lab
        .agent_http_get("node-1", "/metrics")
        .expect("node-1's metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("nodeward_http_requests_total{")
                && l.contains("destination_service=\"web\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn http_routes_split_by_weight_and_header_and_count_every_request() {
    let lab = shared_lab();
    mesh_strict(&lab);
    let _v1 = http_backend(lab.pod("backend/api-0"), "v1", &[], "the v1 backend");
    let _v2 = http_backend(lab.pod("backend/api-1"), "v2", &[], "the v2 backend");
    let _plain = http_backend(lab.pod("backend/api-2"), "plain", &[], "the plain backend");
    let (web, v1, v2, raw, plain) = (
        Ipv4Addr::new(10, 96, 3, 1),
        Ipv4Addr::new(10, 96, 3, 2),
        Ipv4Addr::new(10, 96, 3, 3),
        Ipv4Addr::new(10, 96, 3, 4),
        Ipv4Addr::new(10, 96, 3, 5),
    );
    let both = ["backend/api-0", "backend/api-1"];
    let manifests = [
        service(&lab, "web", web, "http", BACKEND_PORT, &both),
        service(&lab, "web-v1", v1, "http", BACKEND_PORT, &["backend/api-0"]),
        service(&lab, "web-v2", v2, "http", BACKEND_PORT, &["backend/api-1"]),
        service(&lab, "raw", raw, "tcp-echo", HTTP_PORT, &["backend/api-0"]),
        service(
            &lab,
            "plain",
            plain,
            "http",
            BACKEND_PORT,
            &["backend/api-2"],
        ),
        ROUTE.to_owned(),
    ];
    lab.write_manifest("http-canary", &manifests.join("---\n"))
        .unwrap();
    let web_addr = SocketAddr::from((web, 80));
    // Routed once a header-matched request reaches v2 (meshed, translated and routed: every
    // agent has the manifests).
    let mut last = Value::Null;
    let routed = eventually(SETTLE, Duration::from_millis(200), || {
        last = http_get(&lab, web_addr, 5, Some("x-canary: yes"));
        last["bodies"]["v2"] == 5
    });
    assert!(
        routed,
        "x-canary: yes never went to v2 only: {last}\n{}",
        lab.agent_logs_tail(30)
    );

    let before = web_requests(&lab);
    let split = http_get(&lab, web_addr, 2000, None);
    let header = http_get(&lab, web_addr, 20, Some("x-canary: yes"));
    eprintln!("90/10 over 2,000 requests: {}", split["bodies"]);
    assert_eq!(
        split["codes"]["200"], 2000,
        "every request answered: {split}"
    );
    let to_v2 = split["bodies"]["v2"].as_u64().unwrap_or(0);
    assert!(
        (140..=260).contains(&to_v2),
        "a 90/10 split sent {to_v2} of 2,000 requests to v2 (want 200 ± 60): {split}"
    );
    assert_eq!(
        header["bodies"]["v2"], 20,
        "the header match sends every request to v2: {header}"
    );
    // For the record, not asserted (performance lives in `cargo xtask bench`): the same 2,000
    // sequential keep-alive requests to `plain` (api-2, node-1, no route: the L4 tunnel).
    let l4 = http_get(&lab, SocketAddr::from((plain, 80)), 2000, None);
    eprintln!(
        "2,000 sequential requests: L7 (routed) {:.0} ms, L4 tunnel {:.0} ms",
        split["ms"].as_f64().unwrap_or(0.0),
        l4["ms"].as_f64().unwrap_or(0.0)
    );
    // Counted before the response leaves the agent: the metric is up to date already.
    let counted = web_requests(&lab) - before;
    assert_eq!(
        counted, 2020,
        "the golden metrics counted {counted} of 2,020 requests"
    );

    let flows = lab
        .observe(
            "node-1",
            &[
                "--last",
                "50",
                "--http-method",
                "GET",
                "--http-status",
                "2+",
            ],
        )
        .expect("node-1's flows");
    assert!(
        !flows.is_empty() && flows.iter().all(|f| f["Type"] == "L7"),
        "--http-* selects L7 flows only: {flows:?}"
    );
    let l7 = &flows[0];
    assert_eq!(l7["l7"]["http"]["method"], "GET", "{l7}");
    assert_eq!(l7["l7"]["http"]["code"], 200, "{l7}");
    assert_eq!(l7["l7"]["http"]["route"], "backend/canary", "{l7}");
    assert_eq!(l7["source"]["pod_name"], "web-0", "{l7}");

    // A port that is not HTTP stays a byte pipe: the echo answers what no HTTP server would.
    let (echoed, said) = in_pod_echo(&lab, SocketAddr::from((raw, 80)));
    assert!(echoed, "the raw TCP Service does not echo bytes: {said}");
    let after = lab
        .observe("node-1", &["--last", "200"])
        .expect("node-1's flows");
    assert!(
        !after.iter().any(|f| f["Type"] == "L7"
            && f["IP"]["destination"] == lab.pod("backend/api-0").ip4.to_string()
            && f["l4"]["TCP"]["destination_port"] == HTTP_PORT),
        "a non-HTTP port was parsed as HTTP"
    );
}

/// A TCP round trip from `web-0` (in its cgroup, so translated) through `addr`: whether the
/// bytes came back, and what the probe said.
fn in_pod_echo(lab: &Lab, addr: SocketAddr) -> (bool, String) {
    let out = in_pod(lab.pod("frontend/web-0"), load_bin())
        .args(["probe", "--addr", &addr.to_string(), "--timeout-ms", "2000"])
        .stderr(Stdio::inherit())
        .output()
        .expect("running nodeward-lab-load probe");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = text
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|l| l["ok"] == true);
    (ok, text)
}

/// `rules.http` on the api pods' 8081: `web` may GET `/public...` only.
const AUTHZ: &str = r#"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-http, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web, nodeward.io/namespace: frontend}}]
    toPorts:
    - port: 8081
      protocol: TCP
      rules:
        http:
        - {method: GET, path: "/public(/.*)?"}
"#;

/// A second policy whose path is not a regular expression: reported with its field, and what
/// is enforced stays.
const AUTHZ_BAD: &str = r#"
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-bad, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - port: 8081
      rules:
        http:
        - {path: "/admin("}
"#;

/// `http-get` from `web-0` with `--requests`.
fn http_requests(lab: &Lab, addr: SocketAddr, requests: &str, count: usize) -> Value {
    let out = in_pod(lab.pod("frontend/web-0"), load_bin())
        .args([
            "http-get",
            "--addr",
            &addr.to_string(),
            "--count",
            &count.to_string(),
            "--requests",
            requests,
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("running nodeward-lab-load http-get");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("http-get printed {text:?}: {e}"))
}

#[test]
fn rules_http_allow_get_public_and_refuse_post_admin_with_403_and_a_flow() {
    let lab = shared_lab();
    mesh_strict(&lab);
    // api-1 is on node-2: the request crosses the tunnel to node-2's agent, which checks it.
    let api = lab.pod("backend/api-1");
    let _server = http_backend(api, "api", &[], "the api backend");
    lab.write_manifest("api-http", AUTHZ).unwrap();
    let addr = SocketAddr::from((api.ip4, BACKEND_PORT));
    let sequence = "GET /public,POST /admin,GET /public/x";
    let want = json!(["200", "403", "200"]);
    let mut last = Value::Null;
    let enforced = eventually(SETTLE, Duration::from_millis(200), || {
        last = http_requests(&lab, addr, sequence, 3);
        last["sequence"] == want
    });
    assert!(
        enforced,
        "GET /public, POST /admin, GET /public/x should answer 200, 403, 200: {last}\n{}",
        lab.agent_logs_tail(30)
    );
    assert_eq!(
        last["connections"], 1,
        "the 403 keeps the connection up for the next request: {last}"
    );
    // The same on one node (api-2 is on node-1, with web-0): node-1's agent checks it.
    let _local = http_backend(
        lab.pod("backend/api-2"),
        "api",
        &[],
        "the same-node api backend",
    );
    let local = SocketAddr::from((lab.pod("backend/api-2").ip4, BACKEND_PORT));
    let mut same_node = Value::Null;
    let checked = eventually(SETTLE, Duration::from_millis(200), || {
        same_node = http_requests(&lab, local, sequence, 3);
        same_node["sequence"] == want
    });
    assert!(
        checked,
        "on one node, GET /public, POST /admin, GET /public/x should answer 200, 403, 200: {same_node}"
    );

    let denied = lab
        .observe(
            "node-2",
            &[
                "--last",
                "20",
                "--http-status",
                "403",
                "--http-method",
                "POST",
                // Other tests' refusals (gRPC's POSTs) share the lab's flow history.
                "--http-path",
                "^/admin$",
            ],
        )
        .expect("node-2's flows");
    let flow = denied
        .first()
        .unwrap_or_else(|| panic!("no DROPPED L7 flow for POST /admin on node-2: {denied:?}"));
    assert_eq!(flow["Type"], "L7", "{flow}");
    assert_eq!(flow["verdict"], "DROPPED", "{flow}");
    assert_eq!(flow["drop_reason_desc"], "POLICY_DENIED", "{flow}");
    assert_eq!(flow["traffic_direction"], "INGRESS", "{flow}");
    assert_eq!(flow["source"]["pod_name"], "web-0", "{flow}");
    assert_eq!(flow["destination"]["pod_name"], "api-1", "{flow}");
    assert!(
        flow["l7"]["http"]["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/admin")),
        "{flow}"
    );
    let allowed = lab
        .observe(
            "node-2",
            &[
                "--last",
                "20",
                "--http-status",
                "200",
                "--http-path",
                "/public.*",
            ],
        )
        .expect("node-2's flows");
    assert!(
        allowed
            .iter()
            .any(|f| f["verdict"] == "FORWARDED" && f["l7"]["http"]["method"] == "GET"),
        "no FORWARDED L7 flow for GET /public on node-2: {allowed:?}"
    );

    // A broken policy is reported with its field; what was enforced stays.
    lab.write_manifest("api-bad", AUTHZ_BAD).unwrap();
    let mut status = Value::Null;
    let reported = eventually(SETTLE, Duration::from_millis(100), || {
        status = lab.status("node-2").unwrap();
        status["policies"]["failed"].as_array().is_some_and(|f| {
            f.iter()
                .any(|p| p["object"] == "MeshPolicy backend/api-bad")
        })
    });
    assert!(reported, "backend/api-bad is not reported: {status}");
    let failed = status["policies"]["failed"].to_string();
    assert!(
        failed.contains("spec.ingress[0].toPorts[0].rules.http[0].path"),
        "the error names the field: {failed}"
    );
    let again = http_requests(&lab, addr, sequence, 3);
    assert_eq!(again["sequence"], want, "still enforced: {again}");
}

/// `retry` on the route of `flaky` (api-0, whose server answers 503 to every third request).
const RETRY: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retry, namespace: backend}
spec:
  parentRefs: [{group: '', kind: Service, name: flaky, port: 80}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {codes: [503], attempts: 2, backoff: 5ms}
    timeouts: {request: 5s, backendRequest: 2s}
";

#[test]
fn a_retry_turns_a_backend_failing_one_in_three_into_full_success() {
    let lab = shared_lab();
    mesh_strict(&lab);
    let _flaky = http_backend(
        lab.pod("backend/api-0"),
        "flaky",
        &["--fail-every", "3"],
        "the flaky backend",
    );
    let flaky = Ipv4Addr::new(10, 96, 3, 6);
    let addr = SocketAddr::from((flaky, 80));
    lab.write_manifest(
        "flaky",
        &service(
            &lab,
            "flaky",
            flaky,
            "http",
            BACKEND_PORT,
            &["backend/api-0"],
        ),
    )
    .unwrap();
    // Without a route the failures reach the client: the backend fails one in three.
    let mut bare = Value::Null;
    let fails = eventually(SETTLE, Duration::from_millis(200), || {
        bare = http_get(&lab, addr, 30, None);
        bare["codes"]["503"] == 10
    });
    assert!(
        fails,
        "without a route, 10 of 30 requests should get the backend's 503: {bare}"
    );
    lab.write_manifest("flaky-route", RETRY).unwrap();
    let mut last = Value::Null;
    let routed = eventually(SETTLE, Duration::from_millis(200), || {
        last = http_get(&lab, addr, 6, None);
        last["codes"]["200"] == 6
    });
    assert!(
        routed,
        "the retry never hid the backend's failures: {last}\n{}",
        lab.agent_logs_tail(30)
    );
    let run = http_get(&lab, addr, 300, None);
    assert_eq!(
        run["codes"]["200"], 300,
        "every request succeeds with retries: {run}"
    );
    // A POST with a body is not idempotent: sent once, answered by the backend (200 or its
    // 503), never lost.
    let post = http_requests(&lab, addr, "POST /orders", 3);
    let codes = &post["codes"];
    assert!(
        codes["200"].as_u64().unwrap_or(0) + codes["503"].as_u64().unwrap_or(0) == 3
            && codes["503"].as_u64().unwrap_or(0) >= 1,
        "3 POSTs reach the backend once each (one in three fails, not retried): {post}"
    );
    let flows = lab
        .observe("node-1", &["--last", "20", "--http-status", "200"])
        .expect("node-1's flows");
    assert!(
        flows
            .iter()
            .any(|f| f["l7"]["http"]["route"] == "backend/retry"),
        "the requests went through the route: {flows:?}"
    );
}

/// `nodeward_http_requests_total` of node-1's agent for Service `service` and `code_class`.
fn requests_of(lab: &Lab, service: &str, class: &str) -> u64 {
    let text = lab
        .agent_http_get("node-1", "/metrics")
        .expect("node-1's metrics");
    let (service, class) = (
        format!("destination_service=\"{service}\""),
        format!("code_class=\"{class}\""),
    );
    text.lines()
        .filter(|l| {
            l.starts_with("nodeward_http_requests_total{")
                && l.contains(&service)
                && l.contains(&class)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `count` requests from `web-0`, each on a connection of its own (`connection: close`), so
/// that the kernel draws the backend of each.
fn fresh_connections(lab: &Lab, addr: SocketAddr, count: usize) -> Value {
    http_get(lab, addr, count, Some("connection: close"))
}

/// `od` has a backend that fails everything (api-0, `bad`) and a good one (api-1, `good`).
const OUTLIER: &str = r"
apiVersion: nodeward.io/v1alpha1
kind: TrafficPolicy
metadata: {name: od, namespace: backend}
spec:
  targetRefs: [{group: '', kind: Service, name: od}]
  outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 50}
";

#[test]
fn outlier_detection_ejects_a_failing_endpoint_and_brings_it_back_after_the_ejection_time() {
    let lab = shared_lab();
    mesh_strict(&lab);
    let _bad = http_backend(
        lab.pod("backend/api-0"),
        "bad",
        &["--fail-every", "1"],
        "the failing backend",
    );
    let _good = http_backend(lab.pod("backend/api-1"), "good", &[], "the good backend");
    let od = Ipv4Addr::new(10, 96, 3, 40);
    let both = ["backend/api-0", "backend/api-1"];
    let manifests = [
        service(&lab, "od", od, "http", BACKEND_PORT, &both),
        OUTLIER.to_owned(),
    ];
    lab.write_manifest("traffic-outlier", &manifests.join("---\n"))
        .unwrap();
    let addr = SocketAddr::from((od, 80));
    // Without ejection about half of 20 fresh connections reach `bad`; with it, the third
    // failure in a row ejects it and the rest go to `good`.
    let mut last = Value::Null;
    let ejected = eventually(SETTLE, Duration::from_millis(200), || {
        last = fresh_connections(&lab, addr, 20);
        last["bodies"]["bad"] == 3 && last["bodies"]["good"] == 17
    });
    let ejected_at = std::time::Instant::now();
    assert!(
        ejected,
        "3 failures in a row should eject `bad` and send the rest of 20 to `good`: {last}\n{}",
        lab.agent_logs_tail(30)
    );
    let during = fresh_connections(&lab, addr, 20);
    assert_eq!(
        during["bodies"]["good"], 20,
        "while ejected, every request goes to `good`: {during}"
    );
    // Back after baseEjectionTime (3 s, the first ejection), not before.
    let mut back = Value::Null;
    let returned = eventually(Duration::from_secs(10), Duration::from_millis(250), || {
        back = fresh_connections(&lab, addr, 10);
        back["bodies"]["bad"].as_u64().unwrap_or(0) > 0
    });
    let took = ejected_at.elapsed();
    assert!(returned, "`bad` never came back after its ejection: {back}");
    assert!(
        took >= Duration::from_millis(2500),
        "`bad` came back {took:?} after its ejection, before baseEjectionTime (3s)"
    );
    eprintln!("outlier detection: `bad` back {took:?} after its ejection (baseEjectionTime 3s)");
}

/// `pooled` (api-2, which answers after 0.8 s): one connection, one request waiting.
const POOL: &str = r"
apiVersion: nodeward.io/v1alpha1
kind: TrafficPolicy
metadata: {name: pooled, namespace: backend}
spec:
  targetRefs: [{group: '', kind: Service, name: pooled}]
  connectionPool: {maxConnections: 1, maxPendingRequests: 1}
";

#[test]
fn a_connection_pool_limit_answers_503_at_once_to_the_request_over_it() {
    let lab = shared_lab();
    mesh_strict(&lab);
    let _slow = http_backend(
        lab.pod("backend/api-2"),
        "slow",
        &["--delay-ms", "800"],
        "the slow backend",
    );
    let pooled = Ipv4Addr::new(10, 96, 3, 41);
    let manifests = [
        service(
            &lab,
            "pooled",
            pooled,
            "http",
            BACKEND_PORT,
            &["backend/api-2"],
        ),
        POOL.to_owned(),
    ];
    lab.write_manifest("traffic-pool", &manifests.join("---\n"))
        .unwrap();
    let addr = SocketAddr::from((pooled, 80));
    // Applied once the requests are parsed: an L7 flow for the Service.
    let mut last = Value::Null;
    let parsed = eventually(SETTLE, Duration::from_millis(200), || {
        last = http_requests(&lab, addr, "GET /pool-probe", 1);
        !lab.observe("node-1", &["--last", "20", "--http-path", "/pool-probe"])
            .unwrap_or_default()
            .is_empty()
    });
    assert!(parsed, "requests to `pooled` are never parsed: {last}");
    let before = requests_of(&lab, "pooled", "5xx");
    // Three clients 200 ms apart: the first holds the connection, the second waits for it, the
    // third finds both taken.
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3u64)
            .map(|i| {
                let lab = &lab;
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(200 * i));
                    http_get(lab, addr, 1, None)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let codes: Vec<&Value> = results.iter().map(|r| &r["sequence"][0]).collect();
    assert_eq!(
        codes,
        [&json!("200"), &json!("200"), &json!("503")],
        "one connection, one waiting, the third refused: {results:?}"
    );
    let third_ms = results[2]["ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        third_ms < 300.0,
        "the 503 took {third_ms:.0} ms (want it at once, under 300 ms)"
    );
    let second_ms = results[1]["ms"].as_f64().unwrap_or(0.0);
    assert!(
        second_ms > 1100.0,
        "the waiting request took {second_ms:.0} ms: it should wait for the first one (0.6 s more) then take 0.8 s itself"
    );
    eprintln!("connection pool: 503 in {third_ms:.1} ms; the waiting request {second_ms:.0} ms");
    let refused = requests_of(&lab, "pooled", "5xx") - before;
    assert_eq!(refused, 1, "the golden metrics count the 503 once");
    let flows = lab
        .observe("node-1", &["--last", "20", "--http-status", "503"])
        .expect("node-1's flows");
    assert!(
        flows.iter().any(|f| f["Type"] == "L7"),
        "no L7 flow for the 503: {flows:?}"
    );
}

/// `faulty` (api-0): a quarter of the requests aborted with 500; `slow` (api-2): every request
/// delayed 300 ms. (One pod behind two parsed Services would be left to the L4 tunnel.)
const FAULTS: &str = r"
apiVersion: nodeward.io/v1alpha1
kind: TrafficPolicy
metadata: {name: faulty, namespace: backend}
spec:
  targetRefs: [{group: '', kind: Service, name: faulty}]
  fault: {abort: {percentage: 25, httpStatus: 500}}
---
apiVersion: nodeward.io/v1alpha1
kind: TrafficPolicy
metadata: {name: slow, namespace: backend}
spec:
  targetRefs: [{group: '', kind: Service, name: slow}]
  fault: {delay: {percentage: 100, fixedDelay: 300ms}}
";

#[test]
fn fault_injection_aborts_its_percentage_and_delays_and_a_bad_version_keeps_the_last_good_one() {
    let lab = shared_lab();
    mesh_strict(&lab);
    let _ok = http_backend(lab.pod("backend/api-0"), "ok", &[], "the backend");
    let _ok2 = http_backend(lab.pod("backend/api-2"), "ok", &[], "the delayed backend");
    let (faulty, slow) = (Ipv4Addr::new(10, 96, 3, 42), Ipv4Addr::new(10, 96, 3, 43));
    let manifests = [
        service(
            &lab,
            "faulty",
            faulty,
            "http",
            BACKEND_PORT,
            &["backend/api-0"],
        ),
        service(&lab, "slow", slow, "http", BACKEND_PORT, &["backend/api-2"]),
        FAULTS.to_owned(),
    ];
    lab.write_manifest("traffic-faults", &manifests.join("---\n"))
        .unwrap();
    let addr = SocketAddr::from((faulty, 80));
    let mut last = Value::Null;
    let applied = eventually(SETTLE, Duration::from_millis(200), || {
        last = http_get(&lab, addr, 40, None);
        last["codes"]["500"].as_u64().unwrap_or(0) > 0
    });
    assert!(applied, "no request was ever aborted: {last}");
    let run = http_get(&lab, addr, 2000, None);
    let aborted = run["codes"]["500"].as_u64().unwrap_or(0);
    eprintln!("fault abort 25% of 2,000: {aborted}");
    assert!(
        (440..=560).contains(&aborted),
        "abort 25% hit {aborted} of 2,000 requests (want 500 ± 60, ±3%): {run}"
    );
    assert_eq!(
        run["codes"]["200"].as_u64().unwrap_or(0) + aborted,
        2000,
        "the rest reach the backend: {run}"
    );

    let slow_addr = SocketAddr::from((slow, 80));
    let mut one = Value::Null;
    let delayed = eventually(SETTLE, Duration::from_millis(200), || {
        one = http_get(&lab, slow_addr, 1, None);
        one["ms"].as_f64().unwrap_or(0.0) >= 300.0
    });
    assert!(delayed, "no request to `slow` was delayed: {one}");
    let five = http_get(&lab, slow_addr, 5, None);
    let ms = five["ms"].as_f64().unwrap_or(0.0);
    assert!(
        five["codes"]["200"] == 5 && (1500.0..2500.0).contains(&ms),
        "5 requests delayed 300 ms each took {ms:.0} ms (want 1,500 to 2,500): {five}"
    );

    // A bad version is reported with its field; the last good one stays.
    let bad = [
        manifests[0].clone(),
        manifests[1].clone(),
        FAULTS.replace("percentage: 25", "percentage: 150"),
    ];
    let file = lab
        .write_manifest("traffic-faults", &bad.join("---\n"))
        .unwrap();
    let mut status = Value::Null;
    let reported = eventually(SETTLE, Duration::from_millis(100), || {
        status = lab.status("node-1").unwrap();
        status["policies"]["failed"].as_array().is_some_and(|f| {
            f.iter().any(|p| {
                p["object"] == "TrafficPolicy backend/faulty"
                    && p["error"].as_str().is_some_and(|e| {
                        e.contains("spec.fault.abort.percentage")
                            && e.contains(&file.display().to_string())
                    })
            })
        })
    });
    assert!(
        reported,
        "TrafficPolicy backend/faulty is not reported: {status}"
    );
    let again = http_get(&lab, addr, 400, None);
    let still = again["codes"]["500"].as_u64().unwrap_or(0);
    assert!(
        (60..=140).contains(&still),
        "the last good 25% stays in force: {still} of 400 aborted: {again}"
    );
}

/// `shadowed` (api-0, `main`) mirrors every request to `shadow` (api-2, which fails them all).
const MIRROR: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror, namespace: backend}
spec:
  parentRefs: [{group: '', kind: Service, name: shadowed, port: 80}]
  rules:
  - backendRefs: [{name: shadowed, port: 80}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}}
";

#[test]
fn a_mirror_gets_a_copy_of_every_request_and_its_answer_is_discarded() {
    let lab = shared_lab();
    mesh_strict(&lab);
    let log = std::env::temp_dir().join(format!("nodeward-{}-mirror.log", lab.id()));
    let _ = std::fs::remove_file(&log);
    let _main = http_backend(lab.pod("backend/api-0"), "main", &[], "the main backend");
    let _shadow = http_backend(
        lab.pod("backend/api-2"),
        "shadow",
        &["--fail-every", "1", "--log", &log.display().to_string()],
        "the mirror backend",
    );
    let (shadowed, shadow) = (Ipv4Addr::new(10, 96, 3, 7), Ipv4Addr::new(10, 96, 3, 8));
    let manifests = [
        service(
            &lab,
            "shadowed",
            shadowed,
            "http",
            BACKEND_PORT,
            &["backend/api-0"],
        ),
        service(
            &lab,
            "shadow",
            shadow,
            "http",
            BACKEND_PORT,
            &["backend/api-2"],
        ),
        MIRROR.to_owned(),
    ];
    lab.write_manifest("mirror", &manifests.join("---\n"))
        .unwrap();
    let addr = SocketAddr::from((shadowed, 80));
    let lines = || {
        std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    // Mirrored once the shadow has seen a request.
    let mut last = Value::Null;
    let mirrored = eventually(SETTLE, Duration::from_millis(200), || {
        last = http_get(&lab, addr, 1, None);
        lines() > 0
    });
    assert!(
        mirrored,
        "the mirror never got a request: {last}\n{}",
        lab.agent_logs_tail(30)
    );
    let before = lines();
    let run = http_get(&lab, addr, 50, None);
    assert_eq!(
        run["bodies"]["main"], 50,
        "every answer is the main backend's, the mirror's 503 discarded: {run}"
    );
    let copied = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        lines() - before == 50
    });
    assert!(
        copied,
        "the mirror got {} copies of 50 requests",
        lines() - before
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.lines().all(|l| l.starts_with("GET / HTTP/1.1")),
        "the copies are the requests: {text}"
    );
    let _ = std::fs::remove_file(&log);
}

/// A gRPC Service (port name `grpc`: HTTP by Istio's convention) to api-1's 50051, a route on
/// it, and `rules.http` that let `web` call `/pkg.Echo/Say` only.
const GRPC: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: grpc, namespace: backend}
spec:
  parentRefs: [{group: '', kind: Service, name: grpc, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /pkg.Echo}}]
    backendRefs: [{name: grpc, port: 80}]
---
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: grpc-say, namespace: backend}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web, nodeward.io/namespace: frontend}}]
    toPorts:
    - port: 50051
      protocol: TCP
      rules:
        http:
        - {method: POST, path: "/pkg\\.Echo/Say"}
"#;

const GRPC_PORT: u16 = 50051;

type Spans = std::sync::Arc<
    std::sync::Mutex<
        Vec<(
            Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
            opentelemetry_proto::tonic::trace::v1::Span,
        )>,
    >,
>;

/// A gRPC-shaped echo on `listener`: `/pkg.Echo/*` answers the request's message with
/// `grpc-status: 0` in the trailers, and the `traceparent` it got in `x-seen-traceparent`.
async fn grpc_echo(listener: tokio::net::TcpListener) {
    use http_body_util::{BodyExt as _, Full};
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let seen = req.headers().get("traceparent").cloned();
                    let message = req.into_body().collect().await?.to_bytes();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let body = Full::new(message).with_trailers(async { Some(Ok(trailers)) });
                    let mut resp = http::Response::new(body);
                    resp.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    if let Some(tp) = seen {
                        resp.headers_mut().insert("x-seen-traceparent", tp);
                    }
                    Ok::<_, hyper::Error>(resp)
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An OTLP/HTTP collector on `listener`: every span it is sent, with its resource's attributes.
async fn otlp_collector(listener: tokio::net::TcpListener, spans: Spans) {
    use http_body_util::{BodyExt as _, Full};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    while let Ok((stream, _)) = listener.accept().await {
        let spans = spans.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let spans = spans.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                            for rs in export.resource_spans {
                                let resource =
                                    rs.resource.map(|r| r.attributes).unwrap_or_default();
                                for ss in rs.scope_spans {
                                    for span in ss.spans {
                                        spans.lock().unwrap().push((resource.clone(), span));
                                    }
                                }
                            }
                        }
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(bytes::Bytes::new())))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn span_attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
    {
        Some(V::StringValue(s)) => s.clone(),
        Some(V::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// One unary gRPC call on `client`: (HTTP status, grpc-status, the echoed bytes, the
/// traceparent the backend saw).
async fn grpc_call(
    client: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    method: &str,
) -> Result<(u16, String, Vec<u8>, String), String> {
    use http_body_util::BodyExt as _;
    // One length-prefixed message: not compressed, 5 bytes.
    let framed = bytes::Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://grpc.backend/pkg.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(framed))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.send_request(req))
        .await
        .map_err(|_| "no answer in 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let seen = resp
        .headers()
        .get("x-seen-traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // Trailers-only (the agent's own answer) carries grpc-status in the headers.
    let head = resp.headers().get("grpc-status").cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let grpc = body
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(head)
        .and_then(|v| v.to_str().ok().map(str::to_owned))
        .unwrap_or_default();
    Ok((status, grpc, body.to_bytes().to_vec(), seen))
}

#[test]
fn grpc_over_h2c_is_routed_checked_by_path_traced_and_its_spans_reach_an_otlp_collector() {
    let mut lab = shared_lab();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The collector listens in node-1's namespace, where node-1's agent sends its spans.
    let node1 = lab.node("node-1").clone();
    let collector = nodeward_lab::sys::in_netns(&node1.netns, || {
        std::net::TcpListener::bind((node1.ip4, 4318))
    })
    .unwrap()
    .expect("the collector's port on node-1");
    collector.set_nonblocking(true).unwrap();
    let spans: Spans = std::sync::Arc::default();
    {
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(collector).unwrap();
        rt.spawn(otlp_collector(listener, spans.clone()));
    }
    // node-1's agent traces every request and exports (for this test only: stopped at its end,
    // the next test's reset starts it with the lab's own flags).
    lab.stop_agent("node-1").unwrap();
    let endpoint = format!("http://{}:4318", node1.ip4);
    lab.set_agent_args(&["--otlp-endpoint", &endpoint, "--trace-sample-rate", "1"]);
    let started = lab.start_agent("node-1");
    lab.set_agent_args(&[]);
    started.expect("node-1's agent with --otlp-endpoint");
    mesh_strict(&lab);
    // The gRPC server: api-1 (node-2), so each call crosses the tunnel to node-2's agent,
    // which checks rules.http.
    let api = lab.pod("backend/api-1").clone();
    let server = nodeward_lab::sys::in_netns(&api.netns, || {
        std::net::TcpListener::bind((api.ip4, GRPC_PORT))
    })
    .unwrap()
    .expect("the gRPC port on api-1");
    server.set_nonblocking(true).unwrap();
    {
        let _guard = rt.enter();
        rt.spawn(grpc_echo(
            tokio::net::TcpListener::from_std(server).unwrap(),
        ));
    }
    let grpc_vip = Ipv4Addr::new(10, 96, 3, 9);
    let manifests = [
        service(
            &lab,
            "grpc",
            grpc_vip,
            "grpc",
            GRPC_PORT,
            &["backend/api-1"],
        ),
        GRPC.to_owned(),
    ];
    lab.write_manifest("grpc", &manifests.join("---\n"))
        .unwrap();

    // The client: a connection from web-0's namespace to the pod (steered to node-1's proxy,
    // routed as the `grpc` Service's backend), prior-knowledge h2c.
    let web = lab.pod("frontend/web-0").clone();
    let target = SocketAddr::from((api.ip4, GRPC_PORT));
    let connect = || -> Result<
        hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
        String,
    > {
        let stream = nodeward_lab::sys::in_netns(&web.netns, || {
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        rt.block_on(async {
            let stream = tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())?;
            let (client, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(client)
        })
    };
    let mut last = String::new();
    let mut calls = Vec::new();
    let enforced = eventually(SETTLE, Duration::from_millis(200), || {
        let result = connect().and_then(|mut client| {
            rt.block_on(async {
                let say = grpc_call(&mut client, "Say").await?;
                let admin = grpc_call(&mut client, "Admin").await?;
                let again = grpc_call(&mut client, "Say").await?;
                Ok(vec![say, admin, again])
            })
        });
        match result {
            Ok(c) => {
                last = format!("{c:?}");
                let ok = c[0].1 == "0" && c[1].1 == "7" && c[2].1 == "0";
                calls = c;
                ok
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert!(
        enforced,
        "Say, Admin, Say on one h2c connection should get grpc-status 0, 7 (PERMISSION_DENIED), 0: {last}\n{}",
        lab.agent_logs_tail(30)
    );
    assert_eq!(
        calls[0].2, b"\x00\x00\x00\x00\x05hello",
        "the message echoed"
    );
    assert!(
        calls.iter().all(|c| c.0 == 200),
        "gRPC answers are HTTP 200: {last}"
    );
    // Every request got a new trace at rate 1: the backend saw its traceparent.
    let say_trace = calls[0]
        .3
        .split('-')
        .nth(1)
        .unwrap_or_else(|| panic!("the backend got no traceparent: {last}"))
        .to_owned();

    // Flows: node-1 routed the call (its trace named), node-2 refused Admin.
    let routed = lab
        .observe("node-1", &["--last", "50", "--http-path", "/pkg.Echo/Say"])
        .expect("node-1's flows");
    let flow = routed
        .iter()
        .find(|f| f["trace_context"]["parent"]["trace_id"] == say_trace.as_str())
        .unwrap_or_else(|| panic!("no L7 flow on node-1 names trace {say_trace}: {routed:?}"));
    assert_eq!(flow["l7"]["http"]["protocol"], "HTTP/2", "{flow}");
    assert_eq!(flow["l7"]["http"]["route"], "backend/grpc", "{flow}");
    assert_eq!(flow["verdict"], "FORWARDED", "{flow}");
    let denied = lab
        .observe(
            "node-2",
            &[
                "--last",
                "50",
                "--http-path",
                "/pkg.Echo/Admin",
                "--http-status",
                "403",
            ],
        )
        .expect("node-2's flows");
    let refused = denied
        .iter()
        .find(|f| f["verdict"] == "DROPPED")
        .unwrap_or_else(|| panic!("no DROPPED flow for /pkg.Echo/Admin on node-2: {denied:?}"));
    assert_eq!(refused["drop_reason_desc"], "POLICY_DENIED", "{refused}");
    assert!(
        refused["trace_context"]["parent"]["trace_id"].is_string(),
        "the destination's flow names the trace too: {refused}"
    );

    // The spans: the batch leaves within the SDK's 5 s.
    let got = eventually(Duration::from_secs(10), Duration::from_millis(200), || {
        spans
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| super_hex(&s.trace_id) == say_trace)
    });
    let all = spans.lock().unwrap().clone();
    assert!(
        got,
        "no span of trace {say_trace} reached the collector ({} spans)",
        all.len()
    );
    let (resource, span) = all
        .iter()
        .find(|(_, s)| super_hex(&s.trace_id) == say_trace)
        .unwrap();
    assert_eq!(span_attr(resource, "service.name"), "nodeward");
    assert_eq!(span_attr(resource, "host.name"), "node-1");
    assert_eq!(span_attr(&span.attributes, "http.request.method"), "POST");
    assert_eq!(
        span_attr(&span.attributes, "http.response.status_code"),
        "200"
    );
    assert_eq!(
        span_attr(&span.attributes, "nodeward.route"),
        "backend/grpc"
    );
    assert!(
        span_attr(&span.attributes, "url.full").ends_with("/pkg.Echo/Say"),
        "{span:?}"
    );
    assert_eq!(
        super_hex(&span.span_id),
        calls[0].3.split('-').nth(2).unwrap_or_default(),
        "the backend's parent is the proxy's span"
    );

    // Back to the lab's own flags for the next test.
    lab.stop_agent("node-1").unwrap();
}

fn super_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
