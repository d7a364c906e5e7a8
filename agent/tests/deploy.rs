//! `deploy/` (the cluster install) and the generated CRD schemas, checked without a cluster:
//!
//! - every file parses into its k8s-openapi type with no unknown field (a field serde would drop
//!   shows up as a difference between the input and the re-serialized object);
//! - `deploy/crds.yaml` is what the generator produces;
//! - `deploy/clusterrole.yaml` grants exactly `nodeward::source::rbac::RBAC`;
//! - the DaemonSet and ConfigMap agree with the agent's flags (the binary accepts them);
//! - the CRD schemas are structural and reject what the policy compiler rejects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// The YAML documents of a file, as JSON values (empty documents skipped).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The first place where `have` lacks or changes something of `want` (a dropped unknown field).
fn first_difference(want: &Value, have: &Value, path: &str) -> Option<String> {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().find_map(|(k, wv)| match h.get(k) {
            None => Some(format!(
                "{path}.{k}: unknown field (dropped by the typed object)"
            )),
            Some(hv) => first_difference(wv, hv, &format!("{path}.{k}")),
        }),
        (Value::Array(w), Value::Array(h)) if w.len() == h.len() => w
            .iter()
            .zip(h)
            .enumerate()
            .find_map(|(i, (wv, hv))| first_difference(wv, hv, &format!("{path}[{i}]"))),
        (Value::Number(w), Value::Number(h)) if w.as_f64() == h.as_f64() => None,
        _ if want == have => None,
        _ => Some(format!("{path}: {want} became {have}")),
    }
}

/// Parses `value` as `T` strictly: a wrong type names its path, an unknown field fails.
fn strict<T: DeserializeOwned + Serialize>(file: &str, value: &Value) -> T {
    let typed: T = serde_path_to_error::deserialize(value.clone())
        .unwrap_or_else(|e| panic!("{file}: {}: {}", e.path(), e.inner()));
    let back = serde_json::to_value(&typed).expect("serialize");
    if let Some(d) = first_difference(value, &back, "") {
        panic!("{file}: {d}");
    }
    typed
}

fn kind(v: &Value) -> (&str, &str) {
    (
        v["apiVersion"].as_str().unwrap_or_default(),
        v["kind"].as_str().unwrap_or_default(),
    )
}

/// Every object of `deploy/`, checked strictly, by file name.
fn deploy_objects() -> BTreeMap<String, Vec<Value>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(deploy()).expect("deploy/") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        out.insert(name, documents(&path));
    }
    out
}

fn one<T: DeserializeOwned + Serialize>(file: &str) -> T {
    let docs = documents(&deploy().join(file));
    assert_eq!(docs.len(), 1, "{file}: one object");
    strict(file, &docs[0])
}

#[test]
fn every_deploy_file_parses_into_its_type_with_no_unknown_fields() {
    let objects = deploy_objects();
    let mut kinds = BTreeSet::new();
    for (file, docs) in &objects {
        assert!(!docs.is_empty(), "{file}: no object");
        for doc in docs {
            let (api_version, kind) = kind(doc);
            match (api_version, kind) {
                ("v1", "Namespace") => drop(strict::<Namespace>(file, doc)),
                ("v1", "ServiceAccount") => drop(strict::<ServiceAccount>(file, doc)),
                ("v1", "ConfigMap") => drop(strict::<ConfigMap>(file, doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    drop(strict::<ClusterRole>(file, doc));
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    drop(strict::<ClusterRoleBinding>(file, doc));
                }
                ("apps/v1", "DaemonSet") => drop(strict::<DaemonSet>(file, doc)),
                ("apps/v1", "Deployment") => drop(strict::<Deployment>(file, doc)),
                ("v1", "Service") => drop(strict::<Service>(file, doc)),
                ("policy/v1", "PodDisruptionBudget") => {
                    drop(strict::<PodDisruptionBudget>(file, doc));
                }
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    drop(strict::<CustomResourceDefinition>(file, doc));
                }
                other => panic!("{file}: unexpected object {other:?}"),
            }
            kinds.insert(kind.to_owned());
        }
    }
    for want in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "CustomResourceDefinition",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(want), "deploy/ has no {want}");
    }
    // The strictness check itself catches a dropped field.
    let typo =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dataa": {}});
    let caught = std::panic::catch_unwind(|| strict::<ConfigMap>("typo", &typo));
    assert!(caught.is_err(), "an unknown field must fail");
}

/// `kustomization.yaml`: only the fields used here, and it lists every other file of `deploy/`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "read only to reject unknown fields")]
struct Kustomization {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    namespace: String,
    labels: Vec<Value>,
    resources: Vec<String>,
    images: Vec<KustomizeImage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KustomizeImage {
    name: String,
    #[serde(rename = "newTag")]
    new_tag: String,
}

#[test]
fn the_kustomization_installs_every_file_with_the_crate_version_as_tag() {
    let docs = documents(&deploy().join("kustomization.yaml"));
    let k: Kustomization = serde_path_to_error::deserialize(docs[0].clone())
        .unwrap_or_else(|e| panic!("kustomization.yaml: {}: {}", e.path(), e.inner()));
    assert_eq!(k.kind, "Kustomization");
    assert_eq!(k.namespace, "nodeward-system");
    let listed: BTreeSet<String> = k.resources.into_iter().collect();
    let files: BTreeSet<String> = deploy_objects().into_keys().collect();
    assert_eq!(
        listed, files,
        "kustomization.yaml resources vs the files in deploy/"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(k.images.len(), 1);
    assert_eq!(k.images[0].name, "nodeward/nodeward");
    assert_eq!(
        k.images[0].new_tag, version,
        "image tag = agent/Cargo.toml version"
    );
    let ds: DaemonSet = one("daemonset.yaml");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert_eq!(
            c.image.as_deref(),
            Some(format!("nodeward/nodeward:{version}").as_str()),
            "{}",
            c.name
        );
    }
}

#[test]
fn deployed_crds_are_the_generated_ones() {
    let docs = documents(&deploy().join("crds.yaml"));
    let generated: Vec<Value> = nodeward::policy::crd::crds()
        .iter()
        .map(|c| serde_json::to_value(c).expect("crd"))
        .collect();
    assert_eq!(
        docs, generated,
        "deploy/crds.yaml: regenerate with `nodeward crd`"
    );
    let text = std::fs::read_to_string(deploy().join("crds.yaml")).expect("crds.yaml");
    assert_eq!(text, nodeward::policy::crd::crds_yaml());
}

#[test]
fn the_cluster_role_grants_exactly_what_the_code_uses() {
    let role: ClusterRole = one("clusterrole.yaml");
    let mut have = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "no wildcards");
                    have.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    have.sort();
    let dups = have.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(dups, 0, "a permission listed twice");
    assert_eq!(have, nodeward::source::rbac::triples());

    let binding: ClusterRoleBinding = one("clusterrolebinding.yaml");
    let sa: ServiceAccount = one("serviceaccount.yaml");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

fn agent_container(ds: &DaemonSet) -> Container {
    let pod = ds.spec.clone().unwrap().template.spec.unwrap();
    pod.containers
        .into_iter()
        .find(|c| c.name == "agent")
        .expect("agent container")
}

#[test]
fn the_daemonset_runs_everywhere_with_least_privilege() {
    let ds: DaemonSet = one("daemonset.yaml");
    let ns: Namespace = one("namespace.yaml");
    assert_eq!(ds.metadata.namespace, ns.metadata.name);
    let spec = ds.spec.clone().unwrap();
    let strategy = spec.update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        serde_json::to_value(strategy.rolling_update.unwrap().max_unavailable).unwrap(),
        json!(1)
    );
    let template = spec.template;
    let annotations = template.metadata.unwrap().annotations.unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9962");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let pod = template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.service_account_name.as_deref(), Some("nodeward"));
    assert!(pod.termination_grace_period_seconds.is_some());
    let tolerations = pod.tolerations.unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerate every taint"
    );

    let agent = agent_container(&ds);
    let sc = agent.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), vec!["ALL".to_owned()]);
    let mut add = caps.add.unwrap();
    add.sort();
    assert_eq!(
        add,
        vec!["BPF", "NET_ADMIN", "PERFMON"],
        "exactly these capabilities"
    );
    // Only the bpffs init container is privileged (Bidirectional propagation requires it).
    for init in pod.init_containers.iter().flatten() {
        assert_eq!(init.name, "mount-bpffs");
    }

    let env = agent.env.clone().unwrap();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node.value_from.clone().unwrap().field_ref.unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    let resources = agent.resources.clone().unwrap();
    for key in ["cpu", "memory"] {
        assert!(
            resources.requests.as_ref().unwrap().contains_key(key),
            "request {key}"
        );
    }
    assert!(resources.limits.as_ref().unwrap().contains_key("memory"));

    for (probe, path) in [
        (agent.liveness_probe.clone(), "/healthz"),
        (agent.readiness_probe.clone(), "/readyz"),
    ] {
        let get = probe.unwrap().http_get.unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(serde_json::to_value(&get.port).unwrap(), json!(9962));
    }

    // host paths: where each is mounted in the agent, and the propagation
    let volumes: BTreeMap<String, String> = pod
        .volumes
        .unwrap()
        .into_iter()
        .filter_map(|v| Some((v.name, v.host_path?.path)))
        .collect();
    let mounts: BTreeMap<String, (String, Option<String>)> = agent
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .filter_map(|m| {
            let host = volumes.get(&m.name)?.clone();
            Some((host, (m.mount_path, m.mount_propagation)))
        })
        .collect();
    let want = [
        ("/sys/fs/bpf", "/sys/fs/bpf", Some("HostToContainer")),
        (
            "/sys/fs/cgroup",
            "/host/sys/fs/cgroup",
            Some("HostToContainer"),
        ),
        ("/run/nodeward", "/run/nodeward", None),
        ("/var/lib/nodeward", "/var/lib/nodeward", None),
    ];
    for (host, path, propagation) in want {
        let (have_path, have_prop) = mounts.get(host).unwrap_or_else(|| panic!("mount {host}"));
        assert_eq!(have_path, path, "{host}");
        assert_eq!(have_prop.as_deref(), propagation, "{host}");
    }
    let init = pod.init_containers.unwrap();
    let bpffs = init[0].volume_mounts.as_ref().unwrap();
    assert_eq!(bpffs[0].mount_path, "/sys/fs/bpf");
    assert_eq!(bpffs[0].mount_propagation.as_deref(), Some("Bidirectional"));
}

/// The agent's command line from the DaemonSet, with the ConfigMap as environment, is accepted
/// by the real binary (it stops only at the deliberately empty node name), and every ConfigMap
/// key is a flag's environment variable.
#[test]
fn the_binary_accepts_the_daemonset_args_and_configmap() {
    let ds: DaemonSet = one("daemonset.yaml");
    let cm: ConfigMap = one("configmap.yaml");
    let agent = agent_container(&ds);
    let from = agent.env_from.clone().unwrap();
    assert_eq!(
        from[0].config_map_ref.as_ref().map(|r| r.name.clone()),
        cm.metadata.name.clone()
    );
    let data = cm.data.unwrap();

    let bin = env!("CARGO_BIN_EXE_nodeward");
    let help = Command::new(bin)
        .args(["agent", "--help"])
        .output()
        .expect("run nodeward");
    let help = String::from_utf8_lossy(&help.stdout);
    for key in data.keys() {
        assert!(
            help.contains(&format!("[env: {key}=")),
            "ConfigMap key {key} is no flag's environment variable"
        );
    }

    let args = agent.args.clone().unwrap();
    let out = Command::new(bin)
        .args(&args)
        .env_clear()
        .envs(&data)
        .env("NODE_NAME", " ")
        .output()
        .expect("run nodeward");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--node: must not be empty"),
        "expected only the empty node name to be refused: {stderr}"
    );
    // The fixed paths are the CLI's defaults (so `kubectl exec ... nodeward status` finds the
    // socket without flags).
    for (flag, default) in [
        ("--state-dir", "/var/lib/nodeward"),
        ("--bpffs-dir", "/sys/fs/bpf/nodeward"),
        ("--api-socket", "/run/nodeward/nodeward.sock"),
    ] {
        assert!(args.contains(&format!("{flag}={default}")), "{flag}");
        assert!(
            help.contains(&format!("[default: {default}]")),
            "{flag} default"
        );
    }
    assert!(args.contains(&"--kubernetes".to_owned()));
}

/// Flows leave a node only through the mutual-TLS flows port, which the shipped ConfigMap
/// leaves off; the DaemonSet declares it, and the allow list shipped is the agent's default.
#[test]
fn the_flows_port_is_declared_and_off_until_configured() {
    let ds: DaemonSet = one("daemonset.yaml");
    let cm: ConfigMap = one("configmap.yaml");
    let ports: BTreeMap<String, i32> = agent_container(&ds)
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports.get("flows"),
        Some(&i32::from(nodeward::flowapi::DEFAULT_PORT))
    );
    assert_eq!(ports.get("metrics"), Some(&9962));
    let data = cm.data.unwrap();
    assert!(
        !data.contains_key("NODEWARD_FLOWS_ADDR"),
        "the flows port is off until an operator turns it on"
    );
    assert_eq!(
        data["NODEWARD_FLOWS_ALLOW"],
        nodeward::flowapi::access::default_allow().join(",")
    );
    let text = std::fs::read_to_string(deploy().join("configmap.yaml")).unwrap();
    assert!(
        text.contains("# NODEWARD_FLOWS_ADDR: 0.0.0.0:4244"),
        "configmap.yaml shows how to turn the flows port on"
    );
}

// ---- CRD schemas ---------------------------------------------------------------------------

fn schema_of(kind: &str) -> Value {
    let crd = nodeward::policy::crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let v = serde_json::to_value(&crd.spec.versions[0]).expect("version");
    v["schema"]["openAPIV3Schema"].clone()
}

fn validator(kind: &str) -> jsonschema::Validator {
    jsonschema::validator_for(&schema_of(kind)).expect("schema compiles")
}

/// Kubernetes' structural schema rules (the ones a generator can break): every node has a type
/// (or is int-or-string), logic junctors carry no type/description/default/nullable and only
/// constrain properties the node itself declares.
fn check_structural(s: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(obj) = s.as_object() else {
        errors.push(format!("{path}: not an object"));
        return;
    };
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&json!(true));
    if int_or_string && obj.contains_key("type") {
        errors.push(format!("{path}: int-or-string with a type"));
    }
    if !int_or_string && !obj.contains_key("type") {
        errors.push(format!("{path}: no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        errors.push(format!("{path}: properties and additionalProperties"));
    }
    let props = obj.get("properties").and_then(Value::as_object);
    for (k, v) in props.into_iter().flatten() {
        check_structural(v, &format!("{path}.{k}"), errors);
    }
    if let Some(items) = obj.get("items") {
        check_structural(items, &format!("{path}[]"), errors);
    }
    if let Some(ap @ Value::Object(_)) = obj.get("additionalProperties") {
        check_structural(ap, &format!("{path}{{}}"), errors);
    }
    for j in ["allOf", "anyOf", "oneOf", "not"] {
        if let Some(v) = obj.get(j) {
            let nested: Vec<&Value> = match v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for n in nested {
                check_junctor(n, props, &format!("{path}.{j}"), errors);
            }
        }
    }
}

fn check_junctor(
    s: &Value,
    declared: Option<&serde_json::Map<String, Value>>,
    path: &str,
    errors: &mut Vec<String>,
) {
    let obj = s.as_object().expect("junctor schema");
    for forbidden in [
        "type",
        "description",
        "default",
        "nullable",
        "additionalProperties",
    ] {
        if obj.contains_key(forbidden) {
            errors.push(format!("{path}: {forbidden} inside a junctor"));
        }
    }
    for k in obj
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        if !declared.is_some_and(|d| d.contains_key(k)) {
            errors.push(format!(
                "{path}: property {k} not declared outside the junctor"
            ));
        }
    }
    for j in ["allOf", "anyOf", "oneOf", "not"] {
        if let Some(v) = obj.get(j) {
            let nested: Vec<&Value> = match v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for n in nested {
                check_junctor(n, declared, &format!("{path}.{j}"), errors);
            }
        }
    }
}

#[test]
fn crd_schemas_are_structural() {
    for crd in nodeward::policy::crd::crds() {
        let schema = schema_of(&crd.spec.names.kind);
        let mut errors = Vec::new();
        check_structural(&schema, &crd.spec.names.kind, &mut errors);
        assert!(errors.is_empty(), "{errors:#?}");
        assert!(
            !serde_json::to_string(&schema).unwrap().contains("\"$ref\""),
            "no references"
        );
    }
}

fn mesh_policy(spec: &Value) -> Value {
    json!({
        "apiVersion": "nodeward.io/v1alpha1",
        "kind": "MeshPolicy",
        "metadata": {"name": "p", "namespace": "prod"},
        "spec": spec,
    })
}

/// What the agent says about the object: Ok, or the compiler's error.
fn compiler(object: &Value) -> Result<(), String> {
    let p = nodeward::policy::parse_mesh_policy(object.clone()).map_err(|e| e.to_string())?;
    nodeward::policy::translate_mesh_policy(&p)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn ports(p: &Value) -> Value {
    json!({"ingress": [{"fromEntities": ["world"], "toPorts": [p]}]})
}

fn cidr(c: &str) -> Value {
    json!({"egress": [{"toCIDRSet": [{"cidr": c}]}]})
}

fn principal(p: &str) -> Value {
    json!({"ingress": [{"fromPrincipals": [p]}]})
}

fn service_account(a: &str) -> Value {
    json!({"ingress": [{"fromServiceAccounts": [a]}]})
}

fn expression(e: &Value) -> Value {
    json!({"endpointSelector": {"matchExpressions": [e]}})
}

#[test]
fn the_schema_rejects_what_the_compiler_rejects() {
    let v = validator("MeshPolicy");
    let accepted = [
        json!({}),
        ports(&json!({"port": 80, "protocol": "TCP"})),
        ports(&json!({"port": "80"})),
        ports(&json!({"port": 65535, "protocol": "UDP"})),
        ports(&json!({"port": "http", "protocol": "SCTP"})),
        ports(&json!({"port": "grpc-web2"})),
        ports(&json!({"port": 9000, "endPort": 9099})),
        ports(&json!({"port": "9000", "endPort": 9099, "protocol": "ANY"})),
        ports(&json!({"protocol": "UDP"})),
        cidr("10.0.0.0/8"),
        cidr("10.1.2.3/32"),
        cidr("0.0.0.0/0"),
        cidr("fd00::/64"),
        cidr("::/0"),
        cidr("2001:db8::1/128"),
        cidr("::ffff:10.0.0.0/104"),
        json!({"egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]}]}),
        expression(&json!({"key": "app", "operator": "In", "values": ["web", "api"]})),
        expression(&json!({"key": "app", "operator": "NotIn", "values": ["db"]})),
        expression(&json!({"key": "app", "operator": "Exists"})),
        expression(&json!({"key": "app", "operator": "DoesNotExist", "values": []})),
        json!({"ingress": [{"fromEntities": ["world", "host", "cluster", "remote-node", "kube-apiserver", "all"]}]}),
        json!({"endpointSelector": {"matchLabels": {"app": "web", "tier": ""}}}),
        json!({"ingressDeny": [{}], "enableDefaultDeny": {"ingress": false}}),
        json!({"ingress": [{"fromPrincipals": [
            "spiffe://cluster.local/ns/shop/sa/api",
            "spiffe://cluster.local/ns/.shop/sa/...",
            "spiffe://cluster.local/ns/shop/*",
            "spiffe://cluster.local/ns/shop/sa/api*",
            "spiffe://*",
        ]}]}),
        json!({"ingressDeny": [{"fromServiceAccounts": ["api", "shop/api", "a-1/b2"]}]}),
    ];
    for spec in &accepted {
        let object = mesh_policy(spec);
        let errors: Vec<String> = v.iter_errors(&object).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "schema rejects {spec}: {errors:?}");
        compiler(&object).unwrap_or_else(|e| panic!("compiler rejects {spec}: {e}"));
    }
    let rejected = [
        ports(&json!({"port": 80, "protocol": "TCPX"})),
        ports(&json!({"port": 70000})),
        ports(&json!({"port": "70000"})),
        ports(&json!({"port": 0})),
        ports(&json!({"port": "0"})),
        ports(&json!({"port": -1})),
        ports(&json!({"port": "Http"})),
        ports(&json!({"port": "-http"})),
        ports(&json!({"port": "ht--tp"})),
        ports(&json!({"port": "a-very-long-port-name"})),
        ports(&json!({"port": 80, "endPort": 70000})),
        ports(&json!({"port": 80, "endPort": 0})),
        ports(&json!({"port": "http", "endPort": 90})),
        ports(&json!({"endPort": 90})),
        cidr("10.0.0.0/33"),
        cidr("10.0.0.0"),
        cidr("256.0.0.0/8"),
        cidr("10.0.0/8"),
        cidr("fd00::/129"),
        cidr("fd00:::1/64"),
        cidr("1:2:3:4:5:6:7:8:9/64"),
        cidr("example.com/8"),
        json!({"egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/99"]}]}]}),
        json!({"egress": [{"toCIDRSet": [{"except": ["10.1.0.0/16"]}]}]}),
        json!({"ingress": [{"fromEntities": ["moon"]}]}),
        expression(&json!({"key": "app", "operator": "Like", "values": ["x"]})),
        expression(&json!({"key": "app", "operator": "In"})),
        expression(&json!({"key": "app", "operator": "NotIn", "values": []})),
        expression(&json!({"key": "app", "operator": "Exists", "values": ["x"]})),
        expression(&json!({"key": "app", "operator": "DoesNotExist", "values": ["x"]})),
        expression(&json!({"operator": "Exists"})),
        expression(&json!({"key": "app", "operator": "In", "values": ["bad value!"]})),
        json!({"endpointSelector": {"matchLabels": {"app": "-web"}}}),
        principal("cluster.local/ns/shop/sa/api"),
        principal("spiffe://cluster.local/ns/shop"),
        principal("spiffe://cluster.local/ns/shop/sa/api/x"),
        principal("spiffe://cluster.local/ns/*/sa/api"),
        principal("spiffe://**"),
        principal("spiffe://Cluster.local/ns/shop/sa/api"),
        principal("spiffe://cluster.local/ns/../sa/api"),
        principal("spiffe://cluster.local/ns/shop/sa/."),
        principal("spiffe:///ns/shop/sa/api"),
        service_account("Shop/api"),
        service_account("shop/api/x"),
        service_account("-api"),
        service_account("shop/"),
        service_account("/api"),
        service_account(""),
        service_account("my.sa"),
    ];
    for spec in &rejected {
        let object = mesh_policy(spec);
        assert!(!v.is_valid(&object), "schema accepts {spec}");
        assert!(
            compiler(&object).is_err(),
            "schema rejects {spec} but the compiler accepts it"
        );
    }
}

#[test]
fn the_schemas_accept_the_examples() {
    let dir = root().join("policies/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("policies/examples") {
        let path = entry.expect("entry").path();
        for doc in documents(&path) {
            let (api_version, kind) = kind(&doc);
            if api_version != "nodeward.io/v1alpha1" {
                continue;
            }
            let errors: Vec<String> = validator(kind)
                .iter_errors(&doc)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            checked += 1;
        }
    }
    assert!(checked > 0, "no nodeward.io example");
}

#[test]
fn mutual_tls_schema() {
    let v = validator("MutualTLS");
    let object = |spec: Value| {
        json!({"apiVersion": "nodeward.io/v1alpha1", "kind": "MutualTLS",
               "metadata": {"name": "m", "namespace": "prod"}, "spec": spec})
    };
    for mode in ["STRICT", "PERMISSIVE", "DISABLE"] {
        let o = object(json!({"mode": mode, "selector": {"matchLabels": {"app": "web"}}}));
        assert!(v.is_valid(&o), "{mode}");
        let typed: nodeward::policy::crd::MutualTLS = serde_json::from_value(o).expect("typed");
        assert_eq!(serde_json::to_value(typed.spec.mode).unwrap(), json!(mode));
    }
    assert!(!v.is_valid(&object(json!({"mode": "STRICTER"}))));
    assert!(
        !v.is_valid(&object(json!({"selector": {}}))),
        "mode is required"
    );
    assert!(serde_json::from_value::<nodeward::policy::crd::MutualTLS>(object(json!({}))).is_err());
}

#[test]
fn policy_status_shape() {
    let v = validator("MeshPolicy");
    let mut object = mesh_policy(&json!({}));
    object["status"] = json!({
        "enforcingNodes": 1,
        "nodes": {
            "node-1": {"enforced": true, "observedGeneration": 3},
            "node-2": {"enforced": false, "observedGeneration": 3,
                       "error": "spec.ingress[0].toPorts[0].endPort: endPort 79 is lower than port 80"},
        },
    });
    let errors: Vec<String> = v.iter_errors(&object).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let typed: nodeward::policy::crd::MeshPolicy = serde_json::from_value(object.clone()).unwrap();
    let status = typed.status.expect("status");
    assert_eq!(status.enforcing_nodes, Some(1));
    assert!(!status.nodes["node-2"].enforced);
    object["status"]["nodes"]["node-3"] = json!({"error": "x"});
    assert!(!v.is_valid(&object), "enforced is required");
    for crd in nodeward::policy::crd::crds() {
        let has_status = crd.spec.versions[0]
            .subresources
            .as_ref()
            .is_some_and(|s| s.status.is_some());
        assert_eq!(
            has_status,
            crd.spec.names.kind != "MutualTLS",
            "{}",
            crd.spec.names.kind
        );
    }
}

/// The CIDR pattern against the parser the compiler uses, on generated addresses: what the
/// pattern accepts always parses, and every canonical and expanded form is accepted.
#[test]
fn cidr_pattern_agrees_with_the_parser() {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let v = jsonschema::validator_for(
        &json!({"type": "string", "pattern": nodeward::policy::crd::CIDR_PATTERN}),
    )
    .expect("pattern compiles");
    let parses = |s: &str| s.parse::<ipnet::IpNet>().is_ok();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let r = next();
        let v4 = Ipv4Addr::from(u32::try_from(r >> 32).unwrap());
        let len4 = r % 33;
        let s = format!("{v4}/{len4}");
        assert!(v.is_valid(&json!(s)), "{s}");
        // IPv6 with runs of zero groups, so `::` appears in every position.
        let mut groups = [0u16; 8];
        let mask = next();
        for (i, g) in groups.iter_mut().enumerate() {
            if mask >> (i * 3) & 3 != 0 {
                *g = u16::try_from(next() & 0xffff).unwrap();
            }
        }
        let v6 = Ipv6Addr::from(groups);
        let len6 = next() % 129;
        let canonical = format!("{v6}/{len6}");
        let expanded = format!("{}/{len6}", groups.map(|g| format!("{g:x}")).join(":"));
        let upper = canonical.to_uppercase();
        for s in [canonical, expanded, upper] {
            assert!(v.is_valid(&json!(s)), "{s}");
            assert!(parses(&s), "{s}");
        }
        // Mutations: what the pattern accepts must parse.
        let mut bytes = format!("{v6}/{len6}").into_bytes();
        let at = usize::try_from(next() % bytes.len() as u64).unwrap();
        bytes[at] = b":0123456789abcdef/.x"[usize::try_from(next() % 20).unwrap()];
        let mutated = String::from_utf8(bytes).unwrap();
        if v.is_valid(&json!(mutated)) {
            assert!(
                parses(&mutated),
                "pattern accepts {mutated:?}, the parser does not"
            );
        }
        let mut bytes = format!("{v4}/{len4}").into_bytes();
        let at = usize::try_from(next() % bytes.len() as u64).unwrap();
        bytes[at] = b"0123456789./:"[usize::try_from(next() % 13).unwrap()];
        let mutated = String::from_utf8(bytes).unwrap();
        if v.is_valid(&json!(mutated)) {
            assert!(
                parses(&mutated),
                "pattern accepts {mutated:?}, the parser does not"
            );
        }
    }
    for s in [
        "1:2:3:4:5:6:1.2.3.4/96",
        "::1.2.3.4/128",
        "::ffff:1.2.3.4/128",
        "1::1.2.3.4/64",
        "1:2:3:4:5::1.2.3.4/64",
        "1:2:3:4:5:6:7::/112",
        "::1:2:3:4:5:6:7/16",
    ] {
        assert!(v.is_valid(&json!(s)), "{s}");
        assert!(parses(s), "{s}");
    }
    for s in ["1:2:3:4:5:6:7:1.2.3.4/64", "1.2.3.4/8/8"] {
        assert!(!v.is_valid(&json!(s)), "{s}");
        assert!(!parses(s), "{s}");
    }
    // ipnet's own parser takes these (more than eight groups' worth); the API server
    // (`format: cidr`) and the pattern do not, which is the safe direction.
    for s in ["1:2:3:4:5:6::1.2.3.4/64", "::1:2:3:4:5:6:7:8/64"] {
        assert!(!v.is_valid(&json!(s)), "{s}");
    }
}
