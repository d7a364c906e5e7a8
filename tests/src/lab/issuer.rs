//! `nodeward issuer` in the lab: a process in the underlay namespace (on an address of its own
//! on the underlay bridge, apart from every node), holding the lab's CA key, reading pods from
//! the lab's manifests, and authenticating each node's agent by a bootstrap token.

use std::fs::OpenOptions;
use std::io::Read as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

use super::Lab;
use crate::{paths, sys};

/// The issuer's address on the underlay bridge (the nodes are 10.250.0.10 and up).
pub const ISSUER_ADDR: &str = "10.250.0.2:15012";
/// Its `/metrics`.
pub const ISSUER_METRICS_ADDR: &str = "10.250.0.2:9963";
const ISSUER_CIDR: &str = "10.250.0.2/24";

impl Lab {
    fn issuer_dir(&self) -> PathBuf {
        self.state.dir.join("issuer")
    }

    /// The bootstrap token file of `node`'s agent (as its --issuer-token-file).
    #[must_use]
    pub fn issuer_token_file(&self, node: &str) -> PathBuf {
        self.issuer_dir().join(format!("token-{node}"))
    }

    /// The issuer's log.
    #[must_use]
    pub fn issuer_log(&self) -> PathBuf {
        self.issuer_dir().join("issuer.log")
    }

    /// The agent arguments of `--ca-mode issuer` for every node: the issuer, the lab's root as
    /// the trust bundle, and no CA key (give them to [`Lab::set_agent_args`]; each agent gets
    /// its own node's token file).
    pub fn issuer_agent_args(&self) -> Result<Vec<String>> {
        let (cert, _) = self.ca_files()?;
        Ok(vec![
            "--ca-mode".into(),
            "issuer".into(),
            "--issuer-addr".into(),
            ISSUER_ADDR.into(),
            "--trust-bundle".into(),
            cert.display().to_string(),
        ])
    }

    /// Starts the issuer (with `extra` arguments, e.g. `--cert-ttl 6s`) and waits until it
    /// accepts connections. Writes one bootstrap token per node on first use.
    pub fn start_issuer(&mut self, extra: &[&str]) -> Result<u32> {
        if let Some(pid) = self.issuer_pid
            && sys::process_alive(pid)
        {
            bail!("the issuer is already running (pid {pid})");
        }
        let dir = self.issuer_dir();
        std::fs::create_dir_all(&dir)?;
        let tokens = dir.join("tokens");
        if !tokens.exists() {
            let mut lines = String::new();
            for node in self.node_names() {
                let token = random_token()?;
                std::fs::write(self.issuer_token_file(&node), format!("{token}\n"))?;
                lines.push_str(&format!("{node} {token}\n"));
            }
            std::fs::write(&tokens, lines)?;
        }
        sys::ip_batch(
            Some(&self.state.underlay_netns),
            &[format!("addr replace {ISSUER_CIDR} dev br0")],
            false,
        )?;
        let (cert, key) = self.ca_files()?;
        let bin = paths::nodeward_bin()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.issuer_log())?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!(
            "--net={}",
            sys::netns_path(&self.state.underlay_netns).display()
        ))
        .arg("--")
        .arg(&bin)
        .arg("issuer")
        .args([
            "--listen",
            ISSUER_ADDR,
            "--metrics-addr",
            ISSUER_METRICS_ADDR,
        ])
        .arg("--ca-cert")
        .arg(&cert)
        .arg("--ca-key")
        .arg(&key)
        .arg("--state-dir")
        .arg(&dir)
        .arg("--manifests")
        .arg(&self.state.manifests_dir)
        .arg("--bootstrap-tokens")
        .arg(&tokens)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} issuer", bin.display()))?;
        let pid = child.id();
        self.children.insert(pid, child);
        self.issuer_pid = Some(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = ISSUER_ADDR.parse()?;
        loop {
            let up = sys::in_netns(&self.state.underlay_netns, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(pid);
            }
            ensure!(
                self.reap_is_alive(pid) && Instant::now() < deadline,
                "the issuer did not listen on {ISSUER_ADDR}; {}:\n{}",
                self.issuer_log().display(),
                sys::tail(&self.issuer_log(), 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL to the issuer (a crash, or its node lost), and waits for it to be gone.
    pub fn kill_issuer(&mut self) -> Result<()> {
        let pid = self.issuer_pid.take().context("no issuer runs")?;
        sys::signal(pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.reap_is_alive(pid) {
            ensure!(
                Instant::now() < deadline,
                "the issuer (pid {pid}) did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `nodeward issuer-request` with `node`'s token for `identity`: `Ok` with what was signed,
    /// `Err` with the issuer's refusal.
    pub fn issuer_request(&self, node: &str, identity: &str) -> Result<String> {
        self.issuer_request_to(node, identity, None)
    }

    /// [`Lab::issuer_request`] that also writes the chain and its key to `out/cert.pem` and
    /// `out/key.pem`.
    pub fn issuer_request_to(
        &self,
        node: &str,
        identity: &str,
        out: Option<&std::path::Path>,
    ) -> Result<String> {
        let (cert, _) = self.ca_files()?;
        let bin = paths::nodeward_bin()?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!(
            "--net={}",
            sys::netns_path(&self.state.underlay_netns).display()
        ))
        .arg("--")
        .arg(&bin)
        .args(["issuer-request", "--issuer-addr", ISSUER_ADDR])
        .arg("--token-file")
        .arg(self.issuer_token_file(node))
        .arg("--trust-bundle")
        .arg(&cert)
        .args(["--identity", identity]);
        if let Some(out) = out {
            cmd.arg("--out").arg(out);
        }
        sys::run_timeout(&mut cmd, Duration::from_secs(15))
    }
}

/// With `--ca-mode` among the agent arguments: `node`'s own token file.
pub(super) fn agent_token_args(lab: &Lab, node: &str) -> Result<Vec<std::ffi::OsString>> {
    let file = lab.issuer_token_file(node);
    ensure!(
        file.exists(),
        "{}: no issuer token; start the issuer first (Lab::start_issuer)",
        file.display()
    );
    Ok(vec!["--issuer-token-file".into(), file.into()])
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
