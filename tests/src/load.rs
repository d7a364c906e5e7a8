//! The load generator (`nodeward-lab-load`) in lab pods: a server that lives as long as its
//! guard, and a connections client whose per-interval reports are read while it runs.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::{PodState, sys};

/// `program` run as a process of `pod`: in its cgroup (so the agent's socket programs see it)
/// and its network namespace.
pub fn in_pod(pod: &PodState, program: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(pod.cgroup.join("cgroup.procs"))
        .arg("nsenter")
        .arg(format!("--net={}", sys::netns_path(&pod.netns).display()))
        .arg("--")
        .arg(program)
        .stdin(Stdio::null());
    cmd
}

/// A process started here; killed (by its pid) and reaped when dropped.
pub struct Process(Child);

impl Process {
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<Self> {
        cmd.spawn()
            .map(Self)
            .with_context(|| format!("starting {what}"))
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Its standard output, when it was piped (once).
    pub fn stdout(&mut self) -> Option<ChildStdout> {
        self.0.stdout.take()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nodeward-lab-load serve ARGS` in `pod`, once it answers on `ports` from `client`.
pub fn server(
    load: &Path,
    pod: &PodState,
    args: &[&str],
    client: &PodState,
    ports: &[u16],
) -> Result<Process> {
    let process = Process::spawn(
        in_pod(pod, load)
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "the load server",
    )?;
    for &port in ports {
        let addr = std::net::SocketAddr::new(pod.ip4.into(), port);
        ensure!(
            crate::eventually(Duration::from_secs(5), Duration::from_millis(20), || {
                answers(&client.netns, addr)
            }),
            "the load server in {} does not answer on {addr}",
            pod.key()
        );
    }
    Ok(process)
}

/// A whole exchange with a sink or drain port: connect, send our FIN, read the server's. A
/// connect alone proves nothing where the tunnel carries the pods: the source agent accepts
/// before the server is asked.
fn answers(netns: &str, addr: std::net::SocketAddr) -> bool {
    use std::io::Read as _;
    let Ok(mut stream) = crate::probe::connect_from(netns, addr, Duration::from_millis(200)) else {
        return false;
    };
    let mut buf = [0u8; 64];
    stream.shutdown(std::net::Shutdown::Write).is_ok()
        && stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .is_ok()
        && matches!(stream.read(&mut buf), Ok(0))
}

/// A running `nodeward-lab-load crr --report-ms ...`: every interval line is handed to `sink`
/// as it arrives; [`Crr::finish`] stops it (the stop file) and returns its summary line.
pub struct Crr {
    process: Process,
    reader: Option<std::thread::JoinHandle<Option<Value>>>,
    stop_file: PathBuf,
}

impl Crr {
    /// Starts `crr` in `pod` with `args` (the address, threads, `--close` ...), reporting every
    /// `report_ms`, stopping at `--secs` or when [`Crr::finish`] is called. `stop_file` must not
    /// exist yet.
    pub fn start(
        load: &Path,
        pod: &PodState,
        args: &[&str],
        report_ms: u64,
        stop_file: PathBuf,
        sink: impl Fn(&Value) + Send + 'static,
    ) -> Result<Self> {
        let _ = std::fs::remove_file(&stop_file);
        let mut process = Process::spawn(
            in_pod(pod, load)
                .arg("crr")
                .args(args)
                .args(["--report-ms", &report_ms.to_string(), "--stop-file"])
                .arg(&stop_file)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
            "the connections client",
        )?;
        let stdout: ChildStdout = process.0.stdout.take().context("crr's stdout")?;
        let reader = std::thread::spawn(move || {
            let mut summary = None;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if value["interval"] == true {
                    sink(&value);
                } else {
                    summary = Some(value);
                }
            }
            summary
        });
        Ok(Self {
            process,
            reader: Some(reader),
            stop_file,
        })
    }

    /// Stops the client and returns its summary (`connections`, `errors`, `slow`, `max_ms`, ...).
    pub fn finish(mut self) -> Result<Value> {
        std::fs::write(&self.stop_file, b"stop")
            .with_context(|| format!("writing {}", self.stop_file.display()))?;
        let summary = self
            .reader
            .take()
            .context("finished twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("the crr reader panicked"))?;
        let status = self.process.0.wait()?;
        let _ = std::fs::remove_file(&self.stop_file);
        ensure!(status.success(), "crr failed ({status})");
        summary.context("crr printed no summary")
    }
}
