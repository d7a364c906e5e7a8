//! A resolver in the lab: dnsmasq in a pod's network namespace, and the `kube-system/kube-dns`
//! Service that sends the cluster's DNS to it.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::load::Process;
use crate::manifests::documents;
use crate::{Lab, PodState, sys};

/// The `kube-dns` Service's cluster IP.
pub const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Starts dnsmasq in `pod`'s network namespace, on port 53 of the pod's address, answering only
/// from `conf` (dnsmasq.conf lines; no upstream, no `/etc/hosts`), written beside the lab's
/// manifests. `args` adds options (a TTL, the cache size). Stops when the process is dropped.
///
/// # Errors
/// The configuration cannot be written or dnsmasq cannot be started.
pub fn dnsmasq(lab: &Lab, pod: &PodState, conf: &str, args: &[&str]) -> Result<Process> {
    let path = lab
        .manifests_dir()
        .parent()
        .context("lab dir")?
        .join("dnsmasq.conf");
    std::fs::write(&path, conf).context("writing dnsmasq.conf")?;
    Process::spawn(
        Command::new("nsenter")
            .arg(format!("--net={}", sys::netns_path(&pod.netns).display()))
            .arg("--")
            .arg("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--pid-file=",
                "--port=53",
                "--bind-interfaces",
                &format!("--listen-address={}", pod.ip4),
            ])
            .args(args)
            .arg(format!("--conf-file={}", path.display()))
            .stdout(Stdio::null()),
        "dnsmasq",
    )
}

/// The manifests of the `kube-system/kube-dns` Service at [`KUBE_DNS`] (UDP/53 and TCP/53) and of its
/// EndpointSlice, whose one ready endpoint is `pod`.
#[must_use]
pub fn kube_dns(pod: &PodState) -> String {
    documents([
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": "kube-dns", "namespace": "kube-system" },
            "spec": {
                "clusterIP": KUBE_DNS.to_string(),
                "ports": [
                    { "name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP" },
                    { "name": "dns-tcp", "port": 53, "targetPort": 53, "protocol": "TCP" },
                ],
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-1",
                "namespace": "kube-system",
                "labels": { "kubernetes.io/service-name": "kube-dns" },
            },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": [pod.ip4.to_string()],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": pod.node,
                "targetRef": { "kind": "Pod", "name": pod.name, "namespace": pod.namespace },
            }],
            "ports": [
                { "name": "dns", "port": 53, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
            ],
        }),
    ])
}
