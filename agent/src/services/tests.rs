use std::net::IpAddr;

use super::*;
use crate::source::manifests::ManifestSource;

fn load(yaml: &str) -> (Inventory, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), yaml).unwrap();
    let loaded = ManifestSource::new(dir.path()).load();
    let errors = loaded.errors.iter().map(ToString::to_string).collect();
    (std::sync::Arc::unwrap_or_clone(loaded.inventory), errors)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn frontend(addr: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: ip(addr),
        port,
        protocol,
    }
}

const DB: &str = "
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, 'fd00:96::20']
  ports:
  - {name: pg, port: 5432, targetPort: postgres}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-abc, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports:
- {name: pg, port: 5432, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.1.10]
  conditions: {ready: true}
  nodeName: node-1
  zone: a
- addresses: [10.244.2.10]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-2
- addresses: [10.244.2.11]
  nodeName: node-2
";

#[test]
fn a_service_with_its_slice_translates_each_port_to_the_ready_endpoints() {
    let (inv, errors) = load(DB);
    assert!(errors.is_empty(), "{errors:?}");
    let (table, errors) = build(&inv, "node-1");
    assert!(errors.is_empty(), "{errors:?}");
    let pg = &table.ports[&frontend("10.96.0.20", 5432, Protocol::Tcp)];
    assert_eq!(pg.service.to_string(), "shop/db");
    assert_eq!(pg.port_name, "pg");
    // Absent conditions mean ready; the terminating one is listed but not used.
    assert_eq!(
        pg.backends(),
        vec![(ip("10.244.1.10"), 5432), (ip("10.244.2.11"), 5432)]
    );
    assert_eq!(pg.endpoints.len(), 3);
    let one = pg.endpoints.iter().find(|e| e.addr == ip("10.244.1.10"));
    assert_eq!(one.and_then(|e| e.zone.as_deref()), Some("a"));
    let dns = &table.ports[&frontend("10.96.0.20", 53, Protocol::Udp)];
    assert_eq!(dns.backends().len(), 2);
    assert!(dns.backends().iter().all(|(_, p)| *p == 5353));
    // The IPv6 ClusterIP is a frontend too; the slice has no IPv6 endpoint.
    let v6 = &table.ports[&frontend("fd00:96::20", 5432, Protocol::Tcp)];
    assert!(v6.backends().is_empty());
    assert_eq!(table.service_count(), 1);
}

#[test]
fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
    let yaml = DB
        .replace("conditions: {ready: true}", "conditions: {ready: false}")
        .replace("- addresses: [10.244.2.11]\n  nodeName: node-2\n", "");
    let (inv, _) = load(&yaml);
    let (table, _) = build(&inv, "node-1");
    let pg = &table.ports[&frontend("10.96.0.20", 5432, Protocol::Tcp)];
    assert_eq!(pg.backends(), vec![(ip("10.244.2.10"), 5432)]);
}

#[test]
fn a_service_with_no_ready_endpoint_stays_with_no_backend() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
";
    let (inv, _) = load(yaml);
    let (table, errors) = build(&inv, "node-1");
    assert!(errors.is_empty(), "{errors:?}");
    let port = &table.ports[&frontend("10.96.0.30", 80, Protocol::Tcp)];
    assert!(port.backends().is_empty(), "the kernel must refuse it");
}

#[test]
fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints() {
    let yaml = DB.replace(
        "type: NodePort",
        "type: NodePort\n  internalTrafficPolicy: Local",
    );
    let (inv, _) = load(&yaml);
    let (table, _) = build(&inv, "node-2");
    let pg = &table.ports[&frontend("10.96.0.20", 5432, Protocol::Tcp)];
    assert_eq!(pg.backends(), vec![(ip("10.244.2.11"), 5432)]);
    let (table, _) = build(&inv, "node-3");
    let pg = &table.ports[&frontend("10.96.0.20", 5432, Protocol::Tcp)];
    assert!(pg.backends().is_empty());
}

#[test]
fn a_slice_without_ports_takes_the_target_port_by_number_or_by_the_pods_port_name() {
    let yaml = "
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop}
spec:
  nodeName: node-1
  containers: [{name: pg, ports: [{name: postgres, containerPort: 6543}]}]
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: pg, port: 5432, targetPort: postgres}
  - {name: web, port: 80, targetPort: 8080}
  - {name: same, port: 9090}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-x, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- addresses: [10.244.1.10]
  targetRef: {kind: Pod, name: db-0, namespace: shop}
";
    let (inv, errors) = load(yaml);
    assert!(errors.is_empty(), "{errors:?}");
    let (table, errors) = build(&inv, "node-1");
    assert!(errors.is_empty(), "{errors:?}");
    let backend = |port| table.ports[&frontend("10.96.0.20", port, Protocol::Tcp)].backends();
    assert_eq!(backend(5432), vec![(ip("10.244.1.10"), 6543)]);
    assert_eq!(backend(80), vec![(ip("10.244.1.10"), 8080)]);
    assert_eq!(backend(9090), vec![(ip("10.244.1.10"), 9090)]);
}

#[test]
fn headless_and_external_name_services_are_not_translated() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: h, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: example.com}
";
    let (inv, _) = load(yaml);
    let (table, errors) = build(&inv, "node-1");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(table.ports.is_empty());
    assert_eq!(table.skipped.len(), 2);
}

#[test]
fn bad_fields_name_the_object_and_field_and_the_rest_applies() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIPs: [10.96.0.20, 10.96.0.999]
  ports:
  - {name: ok, port: 80}
  - {name: zero, port: 81, targetPort: 0}
  - {name: sctp, port: 82, protocol: SCTP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-x, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- addresses: [10.244.1.300]
- addresses: [10.244.1.10]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: shop}
addressType: IPv4
endpoints: []
";
    let (inv, errors) = load(yaml);
    assert!(errors.is_empty(), "{errors:?}");
    let (table, errors) = build(&inv, "node-1");
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let has = |want: &str| lines.iter().any(|l| l.contains(want));
    assert!(
        has("Service shop/db: field spec.clusterIPs[1]: \"10.96.0.999\" is not an IP address"),
        "{lines:#?}"
    );
    assert!(
        has("Service shop/db: field spec.ports[1].targetPort: port 0 is not in 1-65535"),
        "{lines:#?}"
    );
    assert!(
        has("Service shop/db: field spec.ports[2].protocol"),
        "{lines:#?}"
    );
    assert!(
        has("EndpointSlice shop/db-x: field endpoints[0].addresses[0]"),
        "{lines:#?}"
    );
    assert!(
        has("EndpointSlice shop/orphan: field metadata.labels[kubernetes.io/service-name]"),
        "{lines:#?}"
    );
    assert_eq!(lines.len(), 5, "{lines:#?}");
    // What is valid still applies.
    assert_eq!(
        table.ports[&frontend("10.96.0.20", 80, Protocol::Tcp)].backends(),
        vec![(ip("10.244.1.10"), 80)]
    );
    assert_eq!(table.ports.len(), 1);
}

#[test]
fn a_service_that_does_not_deserialize_names_file_object_and_field() {
    let (_, errors) = load(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {ports: [{port: eighty}]}\n",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("svc.yaml: Service shop/db: field spec.ports[0].port"),
        "{errors:?}"
    );
}

#[test]
fn the_kernel_table_holds_every_frontend_in_network_order() {
    let (inv, _) = load(DB);
    let (table, _) = build(&inv, "node-1");
    let kernel = sync::kernel_table(&table);
    // 5432/TCP and 53/UDP at the IPv4 and the IPv6 ClusterIP.
    assert_eq!(kernel.len(), 4);
    let key = agent_common::ServiceKey {
        addr: crate::datapath::addr_bytes(ip("10.96.0.20")),
        port_be: 5432u16.to_be(),
        protocol: 6,
        _pad: 0,
    };
    assert_eq!(kernel[&key].backends.len(), 2);
    assert_eq!(kernel[&key].backends[0].port_be, 5432u16.to_be());
    assert_eq!(kernel[&key].affinity_secs, 0);
}

#[test]
fn a_backend_shared_by_one_service_names_it_for_flows() {
    let (inv, _) = load(DB);
    let (table, _) = build(&inv, "node-1");
    let index = table.backend_index();
    assert_eq!(
        index
            .get(&(ip("10.244.1.10"), 5432))
            .map(ToString::to_string),
        Some("shop/db".into())
    );
}

#[test]
fn session_affinity_client_ip_keeps_its_timeout_and_a_bad_one_is_reported() {
    let yaml = DB.replace(
        "type: NodePort",
        "type: NodePort\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
    );
    let (inv, _) = load(&yaml);
    let (table, errors) = build(&inv, "node-1");
    assert!(errors.is_empty(), "{errors:?}");
    let pg = &table.ports[&frontend("10.96.0.20", 5432, Protocol::Tcp)];
    assert_eq!(pg.affinity_secs, 60);
    let (inv, _) = load(&yaml.replace("timeoutSeconds: 60", "timeoutSeconds: 0"));
    let (table, errors) = build(&inv, "node-1");
    let pg = &table.ports[&frontend("10.96.0.20", 5432, Protocol::Tcp)];
    assert_eq!(pg.affinity_secs, 10_800, "the default applies");
    assert!(
        errors[0]
            .to_string()
            .contains("Service shop/db: field spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
        "{errors:?}"
    );
    let (inv, _) = load(DB);
    let (table, _) = build(&inv, "node-1");
    assert_eq!(
        table.ports[&frontend("10.96.0.20", 5432, Protocol::Tcp)].affinity_secs,
        0
    );
}
