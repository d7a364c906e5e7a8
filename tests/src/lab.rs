//! [`Lab`]: a small cluster on one machine. Nodes are network namespaces joined by a bridge in an
//! underlay namespace; pods are namespaces with a veth to their node; each node may run its own
//! `nodeward agent`. Everything carries the lab's prefix and is removed by [`Lab::down`], which
//! `Drop` calls, so a failing test cleans up too.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::probe::{self, Case, Proto};
use crate::topology::{
    self, DNS_PORT, GATEWAY4, GATEWAY6, HOST_VETH_MAC, HTTP_PORT, LabSpec, LabState, METRICS_PORT,
    NodeState, Owner, PodState,
};
use crate::{manifests, paths, sweep, sys, wait};

/// How long a probe waits before calling a flow denied.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long an agent may take to report ready.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);

mod issuer;
pub use issuer::{ISSUER_ADDR, ISSUER_METRICS_ADDR};

pub struct Lab {
    state: LabState,
    /// Processes this `Lab` spawned, kept to reap them.
    children: HashMap<u32, Child>,
    torn_down: bool,
    /// Whether dropping this `Lab` tears the lab down (not for one merely attached to).
    owned: bool,
    /// Extra arguments for agents started from now on (see [`Lab::set_agent_args`]).
    agent_args: Vec<String>,
    /// `nodeward issuer`, when a test started it (see [`Lab::start_issuer`]).
    issuer_pid: Option<u32>,
}

impl Lab {
    /// Builds a lab (and, with `spec.agents`, starts the agents and waits until they are ready).
    /// Leftovers of crashed earlier runs are swept first. On error, whatever was made is removed.
    pub fn up(spec: &LabSpec) -> Result<Self> {
        sys::ensure_root()?;
        sys::ensure_bpffs()?;
        let cgroup2 = sys::cgroup2_root()?;
        for line in sweep::sweep_stale()? {
            eprintln!("lab: swept leftover {line}");
        }
        let echo = paths::echo_bin()?;
        if spec.agents {
            paths::nodeward_bin()?;
        }
        let root = paths::lab_root();
        let id = match &spec.name {
            Some(name) => name.clone(),
            None => random_id()?,
        };
        topology::validate_id(&id)?;
        let dir = root.join(format!("{}{id}", topology::PREFIX));
        ensure!(
            !dir.join("state.json").exists(),
            "lab {id} is already up ({}); run `cargo xtask lab down --name {id}`",
            dir.display()
        );
        let owner = if spec.persistent {
            None
        } else {
            let pid = std::process::id();
            Some(Owner {
                pid,
                start_time: sys::process_start_time(pid).context("own start time")?,
            })
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let state = topology::plan(
            spec,
            &id,
            &root,
            &cgroup2,
            Path::new(sys::BPFFS_ROOT),
            owner,
            now,
        )?;
        // The state file comes first: from here on, `down` and the sweep know every name.
        std::fs::create_dir_all(&state.dir)
            .with_context(|| format!("creating {}", state.dir.display()))?;
        let mut lab = Self {
            state,
            children: HashMap::new(),
            agent_args: Vec::new(),
            issuer_pid: None,
            torn_down: false,
            owned: true,
        };
        lab.save()?;
        let started = Instant::now();
        if let Err(e) = lab.build(&echo) {
            let _ = lab.down();
            return Err(e.context(format!("building lab {id}")));
        }
        if spec.agents {
            for node in lab.node_names() {
                if let Err(e) = lab.start_agent(&node) {
                    let _ = lab.down();
                    return Err(e);
                }
            }
        }
        eprintln!(
            "lab {id}: {} nodes, {} pods{} up in {:.2?} ({})",
            lab.state.nodes.len(),
            lab.state.pods.len(),
            if spec.agents { " and agents" } else { "" },
            started.elapsed(),
            lab.state.dir.display()
        );
        Ok(lab)
    }

    /// Re-opens a lab made by another process (`cargo xtask lab status|down`). Dropping it leaves
    /// the lab alone; [`Lab::down`] removes it.
    pub fn attach(id: &str) -> Result<Self> {
        let path = paths::lab_root()
            .join(format!("{}{id}", topology::PREFIX))
            .join("state.json");
        let state = load_state(&path)?;
        Ok(Self {
            state,
            children: HashMap::new(),
            agent_args: Vec::new(),
            issuer_pid: None,
            torn_down: false,
            owned: false,
        })
    }

    /// Leaves the lab running when this value is dropped (`cargo xtask lab up`); `down` from
    /// another process removes it.
    pub fn forget(&mut self) {
        self.owned = false;
    }

    pub fn state(&self) -> &LabState {
        &self.state
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    pub fn pods(&self) -> &[PodState] {
        &self.state.pods
    }

    pub fn nodes(&self) -> &[NodeState] {
        &self.state.nodes
    }

    pub fn node_names(&self) -> Vec<String> {
        self.state.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// A pod by `namespace/name`; panics (with the known pods) if there is none.
    pub fn pod(&self, key: &str) -> &PodState {
        self.state.pod(key).unwrap_or_else(|| {
            let known: Vec<String> = self.state.pods.iter().map(PodState::key).collect();
            panic!("no pod {key} in lab {}; pods: {known:?}", self.state.id)
        })
    }

    pub fn node(&self, name: &str) -> &NodeState {
        self.state
            .node(name)
            .unwrap_or_else(|| panic!("no node {name} in lab {}", self.state.id))
    }

    pub fn pods_in(&self, namespace: &str) -> Vec<&PodState> {
        self.state
            .pods
            .iter()
            .filter(|p| p.namespace == namespace)
            .collect()
    }

    pub fn pods_on(&self, node: &str) -> Vec<&PodState> {
        self.state.pods.iter().filter(|p| p.node == node).collect()
    }

    pub fn manifests_dir(&self) -> &Path {
        &self.state.manifests_dir
    }

    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.node(node).agent_log.clone()
    }

    /// The agent's `--flow-log` directory: `<lab>/<node>/flows`.
    pub fn flow_log_dir(&self, node: &str) -> PathBuf {
        self.node(node).state_dir.with_file_name("flows")
    }

    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.node(node).agent_pid.filter(|&p| sys::process_alive(p))
    }

    fn save(&self) -> Result<()> {
        let path = self.state.state_file();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    fn build(&mut self, echo: &Path) -> Result<()> {
        let s = &self.state;
        std::fs::create_dir_all(s.manifests_dir.join("lab"))?;
        std::fs::create_dir_all(s.dir.join("pods"))?;
        std::fs::create_dir_all(s.dir.join("tmp"))?;
        for node in &s.nodes {
            std::fs::create_dir_all(&node.state_dir)?;
        }
        for (file, yaml) in manifests::lab_objects(s) {
            std::fs::write(s.manifests_dir.join("lab").join(file), yaml)?;
        }

        let netns: Vec<String> = s
            .all_netns()
            .iter()
            .map(|n| format!("netns add {n}"))
            .collect();
        sys::ip_batch(None, &netns, false)?;

        let mut underlay = vec![
            "link set lo up".into(),
            "link add br0 type bridge".into(),
            "link set br0 up".into(),
        ];
        for node in &s.nodes {
            let port = &node.underlay_ifname;
            underlay.push(format!(
                "link add {port} type veth peer name eth0 netns {}",
                node.netns
            ));
            underlay.push(format!("link set {port} master br0"));
            underlay.push(format!("link set {port} up"));
        }
        sys::ip_batch(Some(&s.underlay_netns), &underlay, false)?;

        // Veth pairs first (both ends down), then sysctls on the new interfaces, then addresses.
        for node in &s.nodes {
            let mut lines = vec!["link set lo up".to_string()];
            for pod in s.pods.iter().filter(|p| p.node == node.name) {
                lines.push(format!(
                    "link add {} address {HOST_VETH_MAC} type veth peer name eth0 netns {}",
                    pod.host_ifname, pod.netns
                ));
            }
            sys::ip_batch(Some(&node.netns), &lines, false)?;
            let mut settings = vec![
                ("net/ipv4/ip_forward".to_string(), "1"),
                ("net/ipv4/conf/all/rp_filter".to_string(), "0"),
                ("net/ipv4/conf/default/rp_filter".to_string(), "0"),
                ("net/ipv6/conf/all/forwarding".to_string(), "1"),
                ("net/ipv6/conf/eth0/accept_dad".to_string(), "0"),
            ];
            for ifname in sys::netns_interfaces(&node.netns)? {
                settings.push((format!("net/ipv4/conf/{ifname}/rp_filter"), "0"));
            }
            for pod in s.pods.iter().filter(|p| p.node == node.name) {
                let ifname = &pod.host_ifname;
                settings.push((format!("net/ipv4/conf/{ifname}/proxy_arp"), "1"));
                settings.push((format!("net/ipv4/neigh/{ifname}/proxy_delay"), "0"));
                settings.push((format!("net/ipv6/conf/{ifname}/accept_dad"), "0"));
            }
            sys::sysctls(&node.netns, &settings)?;
        }

        for pod in &s.pods {
            sys::sysctls(
                &pod.netns,
                &[("net/ipv6/conf/eth0/accept_dad".to_string(), "0")],
            )?;
            let mut lines = vec![
                "link set lo up".to_string(),
                "link set eth0 up".to_string(),
                format!("addr add {}/32 dev eth0", pod.ip4),
                format!("route add {GATEWAY4} dev eth0 scope link"),
                format!("route add default via {GATEWAY4} dev eth0"),
                format!("neigh replace {GATEWAY4} lladdr {HOST_VETH_MAC} dev eth0 nud permanent"),
            ];
            if s.ipv6 {
                lines.push(format!("addr add {}/128 dev eth0 nodad", pod.ip6));
                lines.push(format!("route add default via {GATEWAY6} dev eth0"));
                lines.push(format!(
                    "neigh replace {GATEWAY6} lladdr {HOST_VETH_MAC} dev eth0 nud permanent"
                ));
            }
            sys::ip_batch(Some(&pod.netns), &lines, false)?;
        }

        for node in &s.nodes {
            let mut lines = vec![format!("addr add {}/24 dev eth0", node.ip4)];
            if s.ipv6 {
                lines.push(format!("addr add {}/64 dev eth0 nodad", node.ip6));
            }
            lines.push("link set eth0 up".into());
            for pod in s.pods.iter().filter(|p| p.node == node.name) {
                let ifname = &pod.host_ifname;
                lines.push(format!("link set {ifname} up"));
                lines.push(format!("route add {}/32 dev {ifname} scope link", pod.ip4));
                if s.ipv6 {
                    lines.push(format!("addr add {GATEWAY6}/64 dev {ifname} nodad"));
                    lines.push(format!("route add {}/128 dev {ifname}", pod.ip6));
                }
            }
            for other in s.nodes.iter().filter(|o| o.name != node.name) {
                lines.push(format!("route add {} via {}", other.pod_cidr4, other.ip4));
                if s.ipv6 {
                    lines.push(format!("route add {} via {}", other.pod_cidr6, other.ip6));
                }
            }
            sys::ip_batch(Some(&node.netns), &lines, false)?;
        }

        // Pods live in a child of their node's cgroup, which the agent gets with --cgroup, so
        // the agent's cgroup programs see the pods' sockets.
        for node in &s.nodes {
            std::fs::create_dir_all(&node.cgroup)
                .with_context(|| format!("creating {}", node.cgroup.display()))?;
            std::fs::create_dir_all(&node.bpffs_dir)
                .with_context(|| format!("creating {}", node.bpffs_dir.display()))?;
        }
        for pod in &s.pods {
            std::fs::create_dir_all(&pod.cgroup)
                .with_context(|| format!("creating {}", pod.cgroup.display()))?;
        }

        for i in 0..self.state.pods.len() {
            let pid = self.start_echo(i, echo)?;
            self.state.pods[i].echo_pid = Some(pid);
        }
        self.save()?;
        let pods: Vec<&PodState> = self.state.pods.iter().collect();
        let ready = probe::parallel(&pods, |pod| {
            wait::eventually(Duration::from_secs(5), Duration::from_millis(20), || {
                probe::tcp_probe(
                    &pod.netns,
                    SocketAddr::new(pod.ip4.into(), HTTP_PORT),
                    Duration::from_millis(200),
                )
            })
        });
        for (pod, ready) in pods.iter().zip(ready) {
            ensure!(
                ready,
                "echo server of {} did not answer: {}",
                pod.key(),
                sys::tail(&pod.log, 10)
            );
        }
        Ok(())
    }

    fn start_echo(&mut self, index: usize, echo: &Path) -> Result<u32> {
        let pod = &self.state.pods[index];
        let log = File::create(&pod.log)?;
        let procs = OpenOptions::new()
            .write(true)
            .open(pod.cgroup.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", pod.cgroup.display()))?;
        let mut tcp_ports = vec![HTTP_PORT.to_string(), METRICS_PORT.to_string()];
        tcp_ports.extend(pod.extra_tcp_ports.iter().map(|(_, port)| port.to_string()));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", sys::netns_path(&pod.netns).display()))
            .arg("--")
            .arg(echo)
            .args([
                "--tcp",
                &tcp_ports.join(","),
                "--udp",
                &DNS_PORT.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let fd = procs.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe write(2) on an inherited descriptor:
        // "0" moves the calling (child) process into the pod's cgroup.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the echo server of {}", pod.key()))?;
        drop(procs);
        let pid = child.id();
        self.children.insert(pid, child);
        Ok(pid)
    }

    /// Extra `nodeward agent` arguments (e.g. `--flow-events drops`) for the agents started from
    /// now on; running agents keep theirs.
    pub fn set_agent_args(&mut self, args: &[&str]) {
        self.agent_args = args.iter().map(|a| (*a).to_string()).collect();
    }

    /// The lab's CA (`<lab>/ca/ca-cert.pem`, `ca-key.pem`), created with `nodeward ca-create`
    /// on first use: every agent gets it, so the nodes trust each other's certificates.
    pub fn ca_files(&self) -> Result<(PathBuf, PathBuf)> {
        let dir = self.state.dir.join("ca");
        let files = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        if !files.0.exists() {
            let bin = paths::nodeward_bin()?;
            sys::run_timeout(
                Command::new(&bin).arg("ca-create").arg("--dir").arg(&dir),
                Duration::from_secs(10),
            )
            .context("creating the lab's CA")?;
        }
        Ok(files)
    }

    /// The lab's observer client files (`<lab>/observer/{cert,key,ca}.pem`), issued by the
    /// lab's CA with `nodeward ca-issue` on first use: `observe --node --tls-dir` with them reads
    /// every agent's flows port.
    pub fn observer_dir(&self) -> Result<PathBuf> {
        let dir = self.state.dir.join("observer");
        if !dir.join("cert.pem").exists() {
            let (cert, key) = self.ca_files()?;
            self.ca_issue(&cert, &key, None, &dir)
                .context("issuing the lab's observer certificate")?;
        }
        Ok(dir)
    }

    /// `nodeward ca-issue --ca-cert CERT --ca-key KEY [--identity ID] --out DIR`.
    pub fn ca_issue(
        &self,
        cert: &Path,
        key: &Path,
        identity: Option<&str>,
        out: &Path,
    ) -> Result<()> {
        let bin = paths::nodeward_bin()?;
        let mut cmd = Command::new(&bin);
        cmd.arg("ca-issue")
            .arg("--ca-cert")
            .arg(cert)
            .arg("--ca-key")
            .arg(key)
            .arg("--out")
            .arg(out);
        if let Some(id) = identity {
            cmd.args(["--identity", id]);
        }
        sys::run_timeout(&mut cmd, Duration::from_secs(10))?;
        Ok(())
    }

    /// Starts `nodeward agent` in the node's namespace and waits until it reports ready.
    pub fn start_agent(&mut self, node: &str) -> Result<Value> {
        if let Some(pid) = self.agent_pid(node) {
            bail!("the agent of {node} is already running (pid {pid})");
        }
        let bin = paths::nodeward_bin()?;
        // Extra arguments may bring their own CA (a foreign one, in tests), or the issuer.
        let ca: Vec<std::ffi::OsString> = if self.agent_args.iter().any(|a| a == "--ca-cert") {
            Vec::new()
        } else if self.agent_args.iter().any(|a| a == "--ca-mode") {
            issuer::agent_token_args(self, node)?
        } else {
            let (cert, key) = self.ca_files()?;
            vec![
                "--ca-cert".into(),
                cert.into(),
                "--ca-key".into(),
                key.into(),
            ]
        };
        let n = self.node(node).clone();
        std::fs::create_dir_all(&n.state_dir)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.agent_log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", sys::netns_path(&n.netns).display()))
            .arg("--")
            .arg(&bin)
            .arg("agent")
            .args(["--node", &n.name])
            .arg("--manifests")
            .arg(&self.state.manifests_dir)
            .arg("--state-dir")
            .arg(&n.state_dir)
            .arg("--bpffs-dir")
            .arg(&n.bpffs_dir)
            .arg("--api-socket")
            .arg(&n.api_socket)
            .args(["--metrics-addr", &n.metrics_addr])
            .args(["--flows-addr", &n.flows_addr])
            .arg("--flow-log")
            .arg(self.flow_log_dir(node))
            .arg("--cgroup")
            .arg(&n.cgroup)
            .args(&ca)
            .args(&self.agent_args)
            .args(host_routing_args(&self.agent_args))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        self.children.insert(pid, child);
        self.node_mut(node).agent_pid = Some(pid);
        self.save()?;
        self.wait_agent_ready(node, AGENT_READY_TIMEOUT)
    }

    fn node_mut(&mut self, node: &str) -> &mut NodeState {
        self.state
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .expect("known node")
    }

    /// Polls `nodeward status` until it says `"ready": true`; the error shows the agent log.
    pub fn wait_agent_ready(&mut self, node: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let pid = self.node(node).agent_pid;
            if pid.is_none_or(|p| !self.reap_is_alive(p)) {
                bail!(
                    "the agent of {node} exited before it was ready; {}:\n{}",
                    self.agent_log(node).display(),
                    sys::tail(&self.agent_log(node), 30)
                );
            }
            let last = match self.status(node) {
                Ok(status) if status["ready"] == Value::Bool(true) => return Ok(status),
                Ok(status) => status.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "the agent of {node} was not ready within {timeout:?} (last status: {last}); {}:\n{}",
                    self.agent_log(node).display(),
                    sys::tail(&self.agent_log(node), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether `pid` runs; reaps it if it is our child and has exited.
    fn reap_is_alive(&mut self, pid: u32) -> bool {
        if let Some(child) = self.children.get_mut(&pid)
            && !matches!(child.try_wait(), Ok(None))
        {
            self.children.remove(&pid);
            return false;
        }
        sys::process_alive(pid)
    }

    /// SIGKILL: the agent gets no chance to clean up (a crash).
    pub fn kill_agent(&mut self, node: &str) -> Result<()> {
        self.signal_agent(node, libc::SIGKILL, Duration::from_secs(5))
    }

    /// SIGTERM, as a DaemonSet rollout would.
    pub fn stop_agent(&mut self, node: &str) -> Result<()> {
        self.signal_agent(node, libc::SIGTERM, Duration::from_secs(10))
    }

    fn signal_agent(&mut self, node: &str, signal: i32, wait: Duration) -> Result<()> {
        let pid = self
            .node(node)
            .agent_pid
            .with_context(|| format!("no agent runs on {node}"))?;
        sys::signal(pid, signal);
        let deadline = Instant::now() + wait;
        while self.reap_is_alive(pid) {
            ensure!(
                Instant::now() < deadline,
                "the agent of {node} (pid {pid}) did not exit within {wait:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.node_mut(node).agent_pid = None;
        self.save()
    }

    fn nodeward(&self, node: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let bin = paths::nodeward_bin()?;
        let socket = &self.node(node).api_socket;
        let (sub, rest) = args.split_first().context("no subcommand")?;
        sys::run_timeout(
            Command::new(&bin)
                .arg(sub)
                .arg("--api-socket")
                .arg(socket)
                .args(rest),
            timeout,
        )
    }

    /// `nodeward status --api-socket S -o json`.
    pub fn status(&self, node: &str) -> Result<Value> {
        let out = self.nodeward(node, &["status", "-o", "json"], Duration::from_secs(5))?;
        serde_json::from_str(out.trim()).with_context(|| format!("nodeward status printed {out:?}"))
    }

    /// `nodeward observe --api-socket S -o json ARGS...`: one flow per line.
    pub fn observe(&self, node: &str, args: &[&str]) -> Result<Vec<Value>> {
        let mut all = vec!["observe", "-o", "json"];
        all.extend_from_slice(args);
        let out = self.nodeward(node, &all, Duration::from_secs(10))?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("nodeward observe printed {l:?}"))
            })
            .collect()
    }

    /// `nodeward observe -o json ARGS...` run inside `node`'s network namespace without a
    /// socket: for `--node ADDR`, which reads agents through their flows ports.
    pub fn observe_in(&self, node: &str, args: &[&str]) -> Result<Vec<Value>> {
        let bin = paths::nodeward_bin()?;
        let out = sys::run_timeout(
            Command::new("nsenter")
                .arg(format!(
                    "--net={}",
                    sys::netns_path(&self.node(node).netns).display()
                ))
                .arg("--")
                .arg(&bin)
                .args(["observe", "-o", "json"])
                .args(args),
            Duration::from_secs(10),
        )?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("nodeward observe printed {l:?}"))
            })
            .collect()
    }

    /// `nodeward observe --tls-dir <observer> --node <each node's flows port> ARGS...`, run in
    /// the first node's namespace (the underlay reaches every node) with this process's stdout:
    /// every node's flows merged in time order. Runs until the command ends (with `--follow`,
    /// until ^C).
    pub fn observe_merged(&self, args: &[String]) -> Result<()> {
        let bin = paths::nodeward_bin()?;
        let observer = self.observer_dir()?;
        let first = self.nodes().first().context("the lab has no nodes")?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", sys::netns_path(&first.netns).display()))
            .arg("--")
            .arg(&bin)
            .arg("observe")
            .arg("--tls-dir")
            .arg(&observer);
        for n in self.nodes() {
            cmd.args(["--node", &n.flows_addr]);
        }
        let status = cmd
            .args(args)
            .status()
            .with_context(|| format!("running {} observe", bin.display()))?;
        ensure!(status.success(), "nodeward observe failed ({status})");
        Ok(())
    }

    /// Starts `nodeward observe -o json --follow ARGS...` against `node`'s agent; its flows
    /// arrive through [`Follow::next_matching`]. The process ends when the handle drops.
    pub fn follow(&self, node: &str, args: &[&str]) -> Result<Follow> {
        let bin = paths::nodeward_bin()?;
        let mut child = Command::new(&bin)
            .arg("observe")
            .arg("--api-socket")
            .arg(&self.node(node).api_socket)
            .args(["-o", "json", "--follow"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} observe --follow", bin.display()))?;
        let stdout = child.stdout.take().context("observe's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Follow { child, lines: rx })
    }

    /// `GET path` on `node`'s agent metrics address (from inside the node's namespace): the
    /// body of a 200 answer.
    pub fn agent_http_get(&self, node: &str, path: &str) -> Result<String> {
        use std::io::{Read as _, Write as _};
        let n = self.node(node);
        let addr: SocketAddr = n.metrics_addr.parse().context("metrics address")?;
        let mut stream = sys::in_netns(&n.netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })?
        .with_context(|| format!("connecting to {addr} in {}", n.netns))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("GET {path}: not an HTTP answer: {text:?}"))?;
        ensure!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "GET {path} on {addr}: {head}"
        );
        Ok(body.to_owned())
    }

    /// `nodeward observe` as a person reads it (`-o compact`), for the demo.
    pub fn observe_text(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["observe", "-o", "compact"];
        all.extend_from_slice(args);
        self.nodeward(node, &all, Duration::from_secs(10))
    }

    /// `nodeward certs` (text), for the demo.
    pub fn certs_text(&self, node: &str) -> Result<String> {
        self.nodeward(node, &["certs"], Duration::from_secs(10))
    }

    /// `nodeward services` (text), for the demo.
    pub fn services_text(&self, node: &str) -> Result<String> {
        self.nodeward(node, &["services"], Duration::from_secs(10))
    }

    /// `nodeward services -o json`.
    pub fn services(&self, node: &str) -> Result<Value> {
        let out = self.nodeward(node, &["services", "-o", "json"], Duration::from_secs(5))?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("nodeward services printed {out:?}"))
    }

    /// `nodeward status` (text), for the demo.
    pub fn status_text(&self, node: &str) -> Result<String> {
        self.nodeward(node, &["status"], Duration::from_secs(10))
    }

    /// Writes `<manifests>/<name>.yaml` atomically (a rename), so the agent never reads half a file.
    pub fn write_manifest(&self, name: &str, yaml: &str) -> Result<PathBuf> {
        let path = self.manifest_path(name);
        let tmp = self
            .state
            .dir
            .join("tmp")
            .join(path.file_name().expect("has a name"));
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        let path = self.manifest_path(name);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// Removes every manifest that is not the lab's own (the policies tests added).
    pub fn clear_manifests(&self) -> Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.state.manifests_dir)? {
            let entry = entry?;
            if entry.file_name() != "lab" {
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        let file = if name.ends_with(".yaml") || name.ends_with(".yml") {
            name.to_string()
        } else {
            format!("{name}.yaml")
        };
        assert!(
            !file.contains('/') && file != "lab",
            "manifest names are plain file names: {name}"
        );
        self.state.manifests_dir.join(file)
    }

    pub fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.pod(pod).ip4), port)
    }

    pub fn addr6(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.pod(pod).ip6), port)
    }

    /// TCP connect + send + read the echo, from inside `from`'s namespace, to `to`'s IPv4 address.
    pub fn tcp_probe(&self, from: &str, to: &str, port: u16, timeout: Duration) -> bool {
        probe::tcp_probe(&self.pod(from).netns, self.addr(to, port), timeout)
    }

    pub fn udp_probe(&self, from: &str, to: &str, port: u16, timeout: Duration) -> bool {
        probe::udp_probe(&self.pod(from).netns, self.addr(to, port), timeout)
    }

    /// A TCP connection from inside `from` (for long-lived traffic).
    pub fn connect(&self, from: &str, to: &str, port: u16, timeout: Duration) -> Result<TcpStream> {
        probe::connect_from(&self.pod(from).netns, self.addr(to, port), timeout)
    }

    /// Runs every case once, in parallel; returns whether each was reachable.
    pub fn probe_all(&self, cases: &[Case]) -> Vec<bool> {
        probe::parallel(cases, |c| match c.proto {
            Proto::Tcp => self.tcp_probe(&c.from, &c.to, c.port, PROBE_TIMEOUT),
            Proto::Udp => self.udp_probe(&c.from, &c.to, c.port, PROBE_TIMEOUT),
        })
    }

    /// Probes until every case has its expected outcome, for at most `within`; panics listing the
    /// cases that never did, with the agents' log tails.
    pub fn expect(&self, cases: &[Case], within: Duration) {
        let mut wrong = Vec::new();
        let ok = wait::eventually(within, Duration::from_millis(100), || {
            let got = self.probe_all(cases);
            wrong = cases
                .iter()
                .zip(got)
                .filter(|(c, got)| c.allowed != *got)
                .map(|(c, _)| c.to_string())
                .collect();
            wrong.is_empty()
        });
        if !ok {
            panic!(
                "lab {}: {} of {} probes still wrong after {within:?}:\n  {}\n{}",
                self.state.id,
                wrong.len(),
                cases.len(),
                wrong.join("\n  "),
                self.agent_logs_tail(15)
            );
        }
    }

    /// The last lines of every agent's log, for failure messages.
    pub fn agent_logs_tail(&self, lines: usize) -> String {
        self.state
            .nodes
            .iter()
            .filter(|n| n.agent_log.exists())
            .map(|n| {
                format!(
                    "--- {} ({}):\n{}\n",
                    n.name,
                    n.agent_log.display(),
                    sys::tail(&n.agent_log, lines)
                )
            })
            .collect()
    }

    /// A human summary: nodes with their agents, pods with their addresses.
    pub fn report(&self) -> String {
        use std::fmt::Write as _;
        let s = &self.state;
        let mut out = format!(
            "lab {} ({})\nmanifests: {}\n",
            s.id,
            s.dir.display(),
            s.manifests_dir.display()
        );
        for node in &s.nodes {
            let agent = match node.agent_pid {
                Some(pid) if sys::process_alive(pid) => match self.status(&node.name) {
                    Ok(st) => format!(
                        "agent pid {pid}, ready={}, generation={}",
                        st["ready"], st["generation"]
                    ),
                    Err(_) => format!("agent pid {pid}, status unavailable"),
                },
                Some(pid) => format!("agent pid {pid} NOT RUNNING"),
                None => "no agent".to_string(),
            };
            let _ = writeln!(
                out,
                "node {:<8} netns {:<24} ip {} / {}  pods {} / {}  {agent}",
                node.name, node.netns, node.ip4, node.ip6, node.pod_cidr4, node.pod_cidr6
            );
        }
        for pod in &s.pods {
            let alive = pod.echo_pid.is_some_and(sys::process_alive);
            let _ = writeln!(
                out,
                "pod  {:<18} on {:<7} ip {:<12} {:<18} veth {:<10} echo {}",
                pod.key(),
                pod.node,
                pod.ip4,
                pod.ip6,
                pod.host_ifname,
                if alive { "up" } else { "DOWN" }
            );
        }
        out
    }

    /// Removes everything: processes, bpffs pins, namespaces (and with them every interface),
    /// cgroups, and the lab directory (kept, with its logs, when a test is panicking).
    pub fn down(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        let started = Instant::now();
        let keep_logs = std::thread::panicking();
        let result = teardown(&self.state, keep_logs);
        for (_, mut child) in self.children.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.torn_down = true;
        if keep_logs {
            eprintln!(
                "lab {}: torn down; logs kept in {}",
                self.state.id,
                self.state.dir.display()
            );
        } else {
            eprintln!(
                "lab {}: torn down in {:.2?}",
                self.state.id,
                started.elapsed()
            );
        }
        result
    }

    /// What of this lab still exists (empty after a clean [`Lab::down`]).
    pub fn leftovers(&self) -> Vec<String> {
        leftovers(&self.state)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = self.down() {
            eprintln!("lab {}: teardown failed: {e:#}", self.state.id);
        }
    }
}

pub(crate) fn load_state(path: &Path) -> Result<LabState> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Teardown from the state alone, so it also works for a lab another (maybe dead) process made.
pub(crate) fn teardown(state: &LabState, keep_logs: bool) -> Result<()> {
    let mut errors = Vec::new();
    // Processes first: every process in one of the lab's namespaces, plus the recorded ones.
    let mut pids: Vec<u32> = state
        .all_netns()
        .iter()
        .flat_map(|ns| sys::netns_pids(ns))
        .collect();
    pids.extend(state.nodes.iter().filter_map(|n| n.agent_pid));
    pids.extend(state.pods.iter().filter_map(|p| p.echo_pid));
    pids.retain(|&p| p != std::process::id() && sys::process_alive(p) && in_lab(state, p));
    pids.sort_unstable();
    pids.dedup();
    sys::terminate(&pids, Duration::from_secs(5));
    // Pinned maps and links keep programs attached; unpin before the interfaces go.
    if let Err(e) = remove_dir_all_if_exists(&state.bpffs_dir) {
        errors.push(format!("removing {}: {e}", state.bpffs_dir.display()));
    }
    let existing = sys::netns_list();
    let del: Vec<String> = state
        .all_netns()
        .into_iter()
        .filter(|n| existing.contains(n))
        .map(|n| format!("netns del {n}"))
        .collect();
    if let Err(e) = sys::ip_batch(None, &del, true) {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = sys::remove_cgroup_tree(&state.cgroup_dir) {
        errors.push(format!("{e:#}"));
    }
    let state_file = state.state_file();
    if keep_logs {
        let _ = std::fs::rename(&state_file, state.dir.join("state.down.json"));
    } else if let Err(e) = remove_dir_all_if_exists(&state.dir) {
        errors.push(format!("removing {}: {e}", state.dir.display()));
    }
    let left = leftovers(state);
    if !left.is_empty() {
        errors.push(format!("still present: {}", left.join(", ")));
    }
    ensure!(
        errors.is_empty(),
        "tearing down lab {}: {}",
        state.id,
        errors.join("; ")
    );
    Ok(())
}

/// A recorded pid is only ours if it still runs in one of the lab's namespaces or is an agent
/// reading this lab's manifests (pids get recycled).
fn in_lab(state: &LabState, pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    state
        .all_netns()
        .iter()
        .any(|ns| sys::netns_pids(ns).contains(&pid))
        || cmdline.contains(&*state.manifests_dir.to_string_lossy())
}

fn remove_dir_all_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn leftovers(state: &LabState) -> Vec<String> {
    let existing = sys::netns_list();
    let mut left: Vec<String> = state
        .all_netns()
        .into_iter()
        .filter(|n| existing.contains(n))
        .map(|n| format!("netns {n}"))
        .collect();
    for path in [&state.cgroup_dir, &state.bpffs_dir] {
        if path.exists() {
            left.push(path.display().to_string());
        }
    }
    left
}

/// Five characters of `[a-z0-9]`.
fn random_id() -> Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 5];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect())
}

/// A running `nodeward observe --follow` (see [`Lab::follow`]).
pub struct Follow {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follow {
    /// The first flow printed before `deadline` for which `want` holds; lines that do not
    /// match are passed over.
    pub fn next_matching(&self, deadline: Instant, want: impl Fn(&Value) -> bool) -> Option<Value> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && want(&v)
            {
                return Some(v);
            }
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--host-routing VALUE` from `NODEWARD_LAB_HOST_ROUTING` (`ebpf` or `kernel`), so the whole
/// lab suite can run once with eBPF host routing off (`cargo xtask test` does), unless a
/// test gives the flag itself.
fn host_routing_args(agent_args: &[String]) -> Vec<String> {
    match std::env::var(HOST_ROUTING_ENV) {
        Ok(mode)
            if !mode.is_empty() && !agent_args.iter().any(|a| a.starts_with("--host-routing")) =>
        {
            vec!["--host-routing".into(), mode]
        }
        _ => Vec::new(),
    }
}

/// The environment variable [`host_routing_args`] reads.
pub const HOST_ROUTING_ENV: &str = "NODEWARD_LAB_HOST_ROUTING";
