//! Packet captures with tcpdump inside a lab namespace, to check what crosses the wire.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

use crate::sys;

/// A running `tcpdump -w`; [`Capture::stop`] ends it and returns what it wrote.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    /// Captures whole packets on `iface` in `netns` into `file` (pcap), with a BPF `filter`.
    /// Returns once tcpdump is listening.
    pub fn start(netns: &str, iface: &str, filter: &str, file: &Path) -> Result<Self> {
        let log = file.with_extension("log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", sys::netns_path(netns).display()))
            // Immediate mode: without it, packets still in the kernel's ring when tcpdump is
            // stopped are counted as received but never written.
            .args([
                "--",
                "tcpdump",
                "--immediate-mode",
                "-i",
                iface,
                "-s",
                "0",
                "-U",
                "-n",
                "-w",
            ])
            .arg(file)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting tcpdump (installed by `cargo xtask setup`)")?;
        let mut capture = Self {
            child: Some(child),
            file: file.to_path_buf(),
        };
        // tcpdump says "listening on ..." once its socket is open.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening on") {
                return Ok(capture);
            }
            if let Some(child) = capture.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                anyhow::bail!("tcpdump exited ({status}): {text}");
            }
            ensure!(
                Instant::now() < deadline,
                "tcpdump did not start listening within 5s: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops tcpdump (it flushes on SIGINT) and returns the pcap bytes and tcpdump's one-line
    /// summary of each packet.
    pub fn stop(mut self) -> Result<(Vec<u8>, String)> {
        if let Some(mut child) = self.child.take() {
            sys::signal(child.id(), libc::SIGINT);
            let _ = child.wait();
        }
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .context("tcpdump -r")?;
        Ok((bytes, String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
