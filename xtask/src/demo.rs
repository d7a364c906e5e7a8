//! `cargo xtask demo`: a lab with the example policies, traffic that they allow and deny (pod to
//! pod, through a Service, to names resolved through the agents' DNS proxy, and HTTP requests
//! routed and authorized one by one), and the flows the agents recorded.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nodeward_lab::dns::{self, KUBE_DNS};
use nodeward_lab::external::{EXTERNAL_PORT, External};
use nodeward_lab::topology::{DEBUG_PORT, POSTGRES_PORT};
use nodeward_lab::{
    Case, HTTP_PORT, Lab, LabSpec, METRICS_PORT, PodState, load, manifests, paths, wait,
};
use serde_json::Value;

/// The demo's DNS: the resolver's pod, the client, and the zone (names -> external addresses).
const DNS_POD: &str = "frontend/web-2";
const DNS_CLIENT: &str = "frontend/web-0";
const ZONE: &str =
    "host-record=api.example.test,198.18.0.10\nhost-record=other.example.test,198.18.0.20\n";

pub fn run() -> Result<()> {
    let mut lab = Lab::up(&LabSpec {
        name: Some("demo".into()),
        agents: false,
        ..LabSpec::default()
    })?;
    // Every agent runs its DNS proxy on its node's address (70-web-fqdn.yaml needs it).
    for node in lab.nodes().to_vec() {
        lab.set_agent_args(&["--dns-proxy-addr", &format!("{}:53", node.ip4)]);
        lab.start_agent(&node.name)?;
    }
    print!("{}", lab.report());
    // kube-dns: dnsmasq in a pod, and "external" hosts behind the client's node for its names.
    let _resolver = dns::dnsmasq(&lab, lab.pod(DNS_POD), ZONE, &["--local-ttl=60"])?;
    lab.write_manifest("kube-dns", &dns::kube_dns(lab.pod(DNS_POD)))?;
    let _external = External::up(&lab, &lab.pod(DNS_CLIENT).node)?;

    let examples = paths::workspace_root().join("policies").join("examples");
    let mut applied = 0;
    for entry in
        std::fs::read_dir(&examples).with_context(|| format!("reading {}", examples.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let name = path
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            let yaml = std::fs::read_to_string(&path)?;
            // The lab writes its own Namespaces (same names, with `team` and `tier` labels).
            let parsed = manifests::without_namespaces(&yaml)
                .with_context(|| format!("parsing {}", path.display()))?;
            match parsed {
                Some(yaml) => {
                    lab.write_manifest(&name, &yaml)?;
                    println!("applied {}", path.display());
                    applied += 1;
                }
                None => println!(
                    "skipped {} (the lab defines the namespaces)",
                    path.display()
                ),
            }
        }
    }
    if applied == 0 {
        println!(
            "no policies in {}: every flow is allowed",
            examples.display()
        );
    }
    // Let the agents pick the policies up.
    std::thread::sleep(Duration::from_secs(2));
    for node in lab.node_names() {
        let status = lab.status(&node)?;
        println!(
            "{node}: generation {} policies {}",
            status["generation"],
            serde_json::to_string(&status["policies"])?
        );
    }

    // What the examples intend (see the comments in policies/examples/).
    let cases = [
        Case::tcp("frontend/web-0", "backend/api-1", HTTP_PORT, true),
        Case::tcp("frontend/web-1", "backend/api-0", HTTP_PORT, true),
        Case::tcp("frontend/web-0", "backend/api-0", METRICS_PORT, false),
        Case::tcp("backend/api-2", "backend/api-1", METRICS_PORT, true),
        Case::tcp("frontend/web-0", "backend/api-0", DEBUG_PORT, false),
        Case::tcp("backend/api-0", "data/db-1", POSTGRES_PORT, true),
        Case::tcp("backend/api-1", "data/db-0", POSTGRES_PORT, true),
        Case::tcp("backend/api-0", "data/db-1", HTTP_PORT, false),
        Case::tcp("frontend/web-1", "data/db-0", POSTGRES_PORT, false),
        Case::tcp("frontend/web-0", "data/db-2", HTTP_PORT, false),
        Case::tcp("data/db-0", "frontend/web-1", HTTP_PORT, true),
        Case::tcp("backend/api-1", "frontend/web-0", HTTP_PORT, true),
        // backend is STRICT (60-mtls.yaml): plaintext from outside the mesh never reaches it.
        Case::tcp("data/db-1", "backend/api-0", METRICS_PORT, false),
    ];
    let verdict = |allowed: bool| if allowed { "ALLOWED" } else { "DENIED" };
    println!("\ntraffic:");
    let mut unexpected = 0;
    for (case, reached) in cases.iter().zip(lab.probe_all(&cases)) {
        let (from, to) = (lab.pod(&case.from), lab.pod(&case.to));
        let note = if reached == case.allowed {
            String::new()
        } else {
            unexpected += 1;
            format!("  <-- the examples intend {}", verdict(case.allowed))
        };
        println!(
            "  {:<16} ({}) -> {:<16} ({}) tcp/{:<5} {}{note}",
            case.from,
            from.node,
            case.to,
            to.node,
            case.port,
            verdict(reached)
        );
    }
    unexpected += services(&lab)?;
    unexpected += fqdn(&lab)?;
    unexpected += http(&lab)?;
    for node in lab.node_names() {
        println!("\n$ nodeward status   # on {node}");
        match lab.status_text(&node) {
            Ok(text) => print!("{text}"),
            Err(e) => println!("  unavailable: {e:#}"),
        }
        println!("\n$ nodeward observe --last 20   # on {node}");
        match lab.observe_text(&node, &["--last", "20"]) {
            Ok(text) => print!("{text}"),
            Err(e) => println!("  unavailable: {e:#}"),
        }
    }
    let first_node = lab.node_names().into_iter().next();
    if let Some(node) = &first_node {
        println!("\n$ nodeward certs   # on {node}: the workloads' SPIFFE certificates");
        match lab.certs_text(node) {
            Ok(text) => print!("{text}"),
            Err(e) => println!("  unavailable: {e:#}"),
        }
        println!(
            "\n$ nodeward observe -o json --last 100 | jq 'select(.Type==\"TUNNEL\")' | tail -1   # on {node}: a tunnelled connection"
        );
        match lab.observe(node, &["--last", "100"]) {
            Ok(flows) => match flows.iter().rev().find(|f| f["Type"] == "TUNNEL") {
                Some(f) => println!("{f}"),
                None => println!("  no tunnelled connection recorded"),
            },
            Err(e) => println!("  unavailable: {e:#}"),
        }
    }
    if let Some(node) = first_node {
        println!(
            "\n$ nodeward observe -o json --verdict DROPPED --last 1   # on {node}, Hubble field names"
        );
        match lab.observe(&node, &["--verdict", "DROPPED", "--last", "1"]) {
            Ok(flows) => flows.iter().for_each(|f| println!("{f}")),
            Err(e) => println!("  unavailable: {e:#}"),
        }
    }
    drop(lab);
    if unexpected > 0 {
        bail!(
            "demo: {unexpected} outcomes (of {} flows, the Service, the DNS queries and the HTTP requests) differ from what the examples intend",
            cases.len()
        );
    }
    println!(
        "\ndemo: all {} flows, the Service, the DNS queries and the HTTP requests as the examples intend",
        cases.len()
    );
    Ok(())
}

/// DNS-aware egress (70-web-fqdn.yaml): web-0 resolves three names through kube-dns, which its
/// node's DNS proxy answers, and connects to each answer at once. Returns the number of
/// unexpected outcomes.
fn fqdn(lab: &Lab) -> Result<usize> {
    let from = lab.pod(DNS_CLIENT);
    println!(
        "\ndns: {} ({}) asks kube-dns ({KUBE_DNS}) for three names, through its node's DNS proxy, \
         and connects to each answer's tcp/{EXTERNAL_PORT} at once (`nodeward-lab-load resolve`)",
        from.key(),
        from.node
    );
    // (name, answered, connection allowed): what 70-web-fqdn.yaml intends.
    let intended = [
        ("api.example.test", true, true),
        ("other.example.test", true, false),
        ("forbidden.test", false, false),
    ];
    let names: Vec<&str> = intended.iter().map(|(n, ..)| *n).collect();
    let out = load::in_pod(from, &paths::load_bin()?)
        .args(["resolve", "--dns", &format!("{KUBE_DNS}:53")])
        .args(["--names", &names.join(",")])
        .args(["--connect-port", &EXTERNAL_PORT.to_string()])
        .output()
        .context("running nodeward-lab-load resolve")?;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_default())
        .collect();
    let mut unexpected = 0;
    for (name, answered, allowed) in intended {
        let v = lines
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_default();
        let rcode = match v["rcode"].as_u64() {
            Some(0) => "NOERROR",
            Some(5) => "REFUSED",
            Some(3) => "NXDOMAIN",
            Some(_) => "an error",
            None => "no answer",
        };
        let connect = match v["connected"].as_bool() {
            Some(true) => format!(", tcp/{EXTERNAL_PORT} ALLOWED"),
            Some(false) => format!(", tcp/{EXTERNAL_PORT} DENIED"),
            None => String::new(),
        };
        let ok = (v["rcode"] == 0) == answered && (v["connected"] == true) == allowed;
        if !ok {
            unexpected += 1;
        }
        println!(
            "  {name:<20} -> {rcode} {}{connect}{}",
            v["addrs"],
            if ok {
                ""
            } else {
                "  <-- not what 70-web-fqdn.yaml intends"
            }
        );
    }
    println!(
        "\n$ nodeward observe --protocol dns --last 3   # on {}: the queries, what they learned, the refused one",
        from.node
    );
    match lab.observe_text(&from.node, &["--protocol", "dns", "--last", "3"]) {
        Ok(text) => print!("{text}"),
        Err(e) => println!("  unavailable: {e:#}"),
    }
    println!(
        "\n$ nodeward observe --verdict DROPPED --to-ip 198.18.0.20 --last 1   # on {}: other.example.test's address, never allowed",
        from.node
    );
    match lab.observe_text(
        &from.node,
        &[
            "--verdict",
            "DROPPED",
            "--to-ip",
            "198.18.0.20",
            "--last",
            "1",
        ],
    ) {
        Ok(text) => print!("{text}"),
        Err(e) => println!("  unavailable: {e:#}"),
    }
    Ok(unexpected)
}

/// A pod reaches another through its Service: web-0 dials the `api` Service's ClusterIP, the
/// cgroup programs of its node send it to an api pod before the first packet (through the
/// tunnel: both namespaces are meshed), and the flow names both the Service and the pod.
/// Returns the number of unexpected outcomes.
fn services(lab: &Lab) -> Result<usize> {
    let vip = manifests::cluster_ip(1);
    let from = lab.pod("frontend/web-0");
    println!(
        "\nservices: {} ({}) dials the api Service at {vip}:80 (`nodeward-lab-load probe`, a process \
         in the pod's cgroup)",
        from.key(),
        from.node
    );
    let out = load::in_pod(from, &paths::load_bin()?)
        .args(["probe", "--addr", &format!("{vip}:80"), "--count", "3"])
        .output()
        .context("running nodeward-lab-load probe")?;
    let mut unexpected = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let ok = v["ok"] == true && v["peer"] == format!("{vip}:80").as_str();
        if !ok {
            unexpected += 1;
        }
        println!(
            "  connect {vip}:80 -> {} (the application's peer: {}){}",
            if v["ok"] == true { "ALLOWED" } else { "FAILED" },
            v["peer"].as_str().unwrap_or("-"),
            if ok {
                ""
            } else {
                "  <-- expected to reach an api pod"
            }
        );
    }
    println!("\n$ nodeward services   # on {}", from.node);
    match lab.services_text(&from.node) {
        Ok(text) => print!("{text}"),
        Err(e) => println!("  unavailable: {e:#}"),
    }
    println!(
        "\n$ nodeward observe -o json --to-service backend/api --last 1   # on {}: the backend pod and the Service",
        from.node
    );
    match lab.observe(&from.node, &["--to-service", "backend/api", "--last", "1"]) {
        Ok(flows) if !flows.is_empty() => flows.iter().for_each(|f| println!("{f}")),
        Ok(_) => {
            unexpected += 1;
            println!("  no flow names the Service  <-- expected one");
        }
        Err(e) => println!("  unavailable: {e:#}"),
    }
    Ok(unexpected)
}

/// The HTTP servers of 80-http.yaml's Services, on the `api` pods: (pod, answers as, fails
/// every Nth request).
const HTTP_BACKENDS: [(&str, &str, u32); 3] = [
    ("backend/api-0", "v1", 0),
    ("backend/api-1", "v2", 0),
    ("backend/api-2", "flaky", 3),
];
const HTTP_BACKEND_PORT: u16 = 8081;
const CANARY_REQUESTS: usize = 1000;
/// The v2 share a 90/10 split gives 1,000 requests, within about ±3.5 standard deviations.
const CANARY_V2: std::ops::RangeInclusive<u64> = 65..=135;
const RETRY_REQUESTS: usize = 30;

/// `nodeward-lab-load http-get` from `from`: its summary line.
fn http_get(from: &PodState, addr: SocketAddr, args: &[&str]) -> Result<Value> {
    let out = load::in_pod(from, &paths::load_bin()?)
        .args(["http-get", "--addr", &addr.to_string()])
        .args(args)
        .output()
        .context("running nodeward-lab-load http-get")?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("http-get printed {text:?}"))
}

/// The routes and the request authorization of 80-http.yaml, from web-0: a 90/10 canary, a
/// backend failing one request in three answered in full through the route's retry, and a
/// path refused with 403, each shown as the agents' L7 flows. Returns the number of unexpected
/// outcomes.
fn http(lab: &Lab) -> Result<usize> {
    let from = lab.pod("frontend/web-0");
    let mut servers = Vec::new();
    for (pod, name, fail_every) in HTTP_BACKENDS {
        let mut cmd = load::in_pod(lab.pod(pod), &paths::load_bin()?);
        cmd.args(["http-serve", "--port", &HTTP_BACKEND_PORT.to_string()])
            .args(["--name", name, "--fail-every", &fail_every.to_string()])
            .stdout(Stdio::null());
        servers.push(load::Process::spawn(&mut cmd, name)?);
    }
    let (canary, v1, v2, flaky) = (
        Ipv4Addr::new(10, 96, 1, 1),
        Ipv4Addr::new(10, 96, 1, 2),
        Ipv4Addr::new(10, 96, 1, 3),
        Ipv4Addr::new(10, 96, 1, 4),
    );
    let pods = |keys: &[&str]| keys.iter().map(|k| lab.pod(k)).collect::<Vec<_>>();
    let services = [
        (
            "api-canary",
            canary,
            pods(&["backend/api-0", "backend/api-1"]),
        ),
        ("api-v1", v1, pods(&["backend/api-0"])),
        ("api-v2", v2, pods(&["backend/api-1"])),
        ("api-flaky", flaky, pods(&["backend/api-2"])),
    ]
    .map(|(name, vip, pods)| {
        manifests::pod_service(name, "backend", vip, "http", HTTP_BACKEND_PORT, &pods)
    });
    lab.write_manifest("http-services", &services.join("---\n"))?;
    println!(
        "\nhttp: {} ({}) calls HTTP Services (80-http.yaml's routes; servers on api-0 (v1, {}), \
         api-1 (v2, {}), api-2 (flaky, {}), port {HTTP_BACKEND_PORT}; `nodeward-lab-load http-get`)",
        from.key(),
        from.node,
        lab.pod("backend/api-0").node,
        lab.pod("backend/api-1").node,
        lab.pod("backend/api-2").node,
    );
    let canary_addr = SocketAddr::from((canary, 80));
    // Routed once the agents have the Services, the routes and the policies.
    let mut last = Value::Null;
    let ready = wait::eventually(Duration::from_secs(15), Duration::from_millis(200), || {
        last = http_get(from, canary_addr, &["--count", "5"]).unwrap_or_default();
        last["codes"]["200"] == 5
    });
    let mut unexpected = 0;
    if !ready {
        println!("  the canary Service never answered 5 of 5 requests: {last}  <-- expected 200s");
        return Ok(1);
    }

    let split = http_get(
        from,
        canary_addr,
        &["--count", &CANARY_REQUESTS.to_string()],
    )?;
    let to_v2 = split["bodies"]["v2"].as_u64().unwrap_or(0);
    let ok = split["codes"]["200"] == CANARY_REQUESTS && CANARY_V2.contains(&to_v2);
    unexpected += usize::from(!ok);
    println!(
        "  canary: {CANARY_REQUESTS} GETs to api-canary -> v1 {}, v2 {to_v2} (90/10){}",
        split["bodies"]["v1"],
        if ok {
            String::new()
        } else {
            format!("  <-- expected all 200 and v2 in {CANARY_V2:?}: {split}")
        }
    );
    // The client's agent records each routed request as an L7 flow naming its route.
    let flows = lab.observe(&from.node, &["--http-method", "GET", "--last", "5000"])?;
    let mut by_pod = std::collections::BTreeMap::<String, usize>::new();
    for f in flows
        .iter()
        .filter(|f| f["l7"]["http"]["route"] == "backend/api-canary")
    {
        let pod = f["destination"]["pod_name"].as_str().unwrap_or("?");
        *by_pod.entry(pod.to_owned()).or_default() += 1;
    }
    let routed_flows: usize = by_pod.values().sum();
    if routed_flows < CANARY_REQUESTS {
        unexpected += 1;
    }
    println!(
        "          L7 flows of route backend/api-canary on {}: {routed_flows} ({}){}",
        from.node,
        by_pod
            .iter()
            .map(|(pod, n)| format!("{pod} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        if routed_flows < CANARY_REQUESTS {
            format!("  <-- expected at least {CANARY_REQUESTS}")
        } else {
            String::new()
        }
    );
    observe_shown(
        lab,
        &from.node,
        &["--http-method", "GET", "--last", "2"],
        "the last canary requests, as the client's agent routed them",
    );

    let flaky_pod = lab.pod("backend/api-2");
    let routed = http_get(
        from,
        SocketAddr::from((flaky, 80)),
        &["--count", &RETRY_REQUESTS.to_string()],
    )?;
    // The flaky pod's agent checks rules.http on its port, so it records every attempt.
    let failed_attempts = lab
        .observe(&flaky_pod.node, &["--http-status", "503", "--last", "1000"])?
        .iter()
        .filter(|f| f["destination"]["pod_name"] == flaky_pod.name.as_str())
        .count();
    let ok = routed["codes"]["200"] == RETRY_REQUESTS && failed_attempts > 0;
    unexpected += usize::from(!ok);
    println!(
        "  retry:  {RETRY_REQUESTS} GETs to api-flaky (fails 1 in 3; the route retries 503) -> {}, \
         after {failed_attempts} attempts answered 503{}",
        routed["codes"],
        if ok {
            ""
        } else {
            "  <-- expected every request answered 200 and some attempts 503"
        }
    );
    observe_shown(
        lab,
        &flaky_pod.node,
        &["--http-status", "503", "--last", "2"],
        "attempts the flaky pod answered 503, each retried by the client's agent",
    );

    let authz = http_get(
        from,
        canary_addr,
        &[
            "--count",
            "3",
            "--requests",
            "GET /public,GET /admin,GET /public/x",
        ],
    )?;
    let ok = authz["sequence"] == serde_json::json!(["200", "403", "200"]);
    unexpected += usize::from(!ok);
    println!(
        "  authz:  GET /public, GET /admin, GET /public/x -> {} on {} connection(s){}",
        authz["sequence"],
        authz["connections"],
        if ok {
            ""
        } else {
            "  <-- expected 200, 403, 200"
        }
    );

    let mut denied = None;
    for node in lab.node_names() {
        let found = lab.observe(
            &node,
            &[
                "--http-status",
                "403",
                "--verdict",
                "DROPPED",
                "--last",
                "1",
            ],
        )?;
        if !found.is_empty() {
            denied = Some(node);
            break;
        }
    }
    match denied {
        Some(node) => {
            observe_shown(
                lab,
                &node,
                &[
                    "--http-status",
                    "403",
                    "--verdict",
                    "DROPPED",
                    "--last",
                    "1",
                ],
                "GET /admin, refused by rules.http on the answering pod's node",
            );
        }
        None => {
            unexpected += 1;
            println!("  no DROPPED L7 flow with 403 on any node  <-- expected GET /admin's");
        }
    }
    drop(servers);
    Ok(unexpected)
}

/// Prints `nodeward observe ARGS` on `node` as a user would run it, and what it shows.
fn observe_shown(lab: &Lab, node: &str, args: &[&str], what: &str) {
    println!(
        "\n$ nodeward observe {}   # on {node}: {what}",
        args.join(" ")
    );
    match lab.observe_text(node, args) {
        Ok(text) => print!("{text}"),
        Err(e) => println!("  unavailable: {e:#}"),
    }
}
