//! The edges of the lab: commands, network namespaces, sysctls, cgroups, bpffs and processes.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

pub const NETNS_DIR: &str = "/run/netns";
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Runs a command to completion; an error carries the command line and its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `lines` to `ip [-n NETNS] [-force] -batch -`, one process for many commands.
pub fn ip_batch(netns: Option<&str>, lines: &[String], force: bool) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("spawning ip -batch (is iproute2 installed?)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(lines.join("\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() && !force {
        bail!(
            "ip {}-batch failed: {}\ncommands:\n{}",
            netns.map(|n| format!("-n {n} ")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n")
        );
    }
    Ok(())
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `f` on a new thread that has joined network namespace `netns`, so that sockets it creates
/// live there. The calling thread's namespace never changes. Sockets keep their namespace, so
/// they may be returned and used from any thread.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(netns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: plain syscall on a descriptor we own; it only affects this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns into {}", path.display()));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {netns} panicked"))?
    })
}

/// Writes sysctls (`net/ipv4/ip_forward` style keys) inside `netns`. `/proc/sys/net` answers for
/// the network namespace of the thread that opens it.
pub fn sysctls(netns: &str, settings: &[(String, &str)]) -> Result<()> {
    in_netns(netns, || -> Result<()> {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value)
                .with_context(|| format!("writing {value} to {}", path.display()))?;
        }
        Ok(())
    })?
}

/// Interface names under `/proc/sys/net/ipv4/conf` inside `netns`.
pub fn netns_interfaces(netns: &str) -> Result<Vec<String>> {
    in_netns(netns, || -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir("/proc/sys/net/ipv4/conf")? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    })?
}

pub fn netns_list() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Pids of the processes (thread group leaders) whose network namespace is `netns`.
pub fn netns_pids(netns: &str) -> Vec<u32> {
    let Ok(target) = std::fs::metadata(netns_path(netns)) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .collect()
}

pub fn process_alive(pid: u32) -> bool {
    // A zombie has no namespace links any more; treat it as gone.
    process_start_time(pid).is_some()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !stat_state(&s).starts_with('Z'))
}

fn stat_state(stat: &str) -> &str {
    stat.rsplit_once(')')
        .map_or("", |(_, rest)| rest.trim_start())
}

/// `starttime` (field 22) of `/proc/<pid>/stat`.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    stat_state(&stat).split_whitespace().nth(19)?.parse().ok()
}

pub fn signal(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) with a specific positive pid; never 0 or -1 (no process groups).
    if pid > 0 {
        unsafe { libc::kill(pid, sig) };
    }
}

/// SIGTERM, then SIGKILL whatever is still alive after `grace`.
pub fn terminate(pids: &[u32], grace: Duration) {
    for &pid in pids {
        signal(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|&p| process_alive(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids.iter().filter(|&&p| process_alive(p)) {
        signal(pid, libc::SIGKILL);
    }
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo` (never assumed: hybrid hosts mount it at
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> Result<PathBuf> {
    mount_point("cgroup2")?.context("no cgroup2 mount in /proc/self/mountinfo")
}

/// Whether bpffs is mounted at `/sys/fs/bpf`.
pub fn bpffs_mounted() -> bool {
    mount_points("bpf").is_ok_and(|m| m.iter().any(|p| p == Path::new(BPFFS_ROOT)))
}

pub fn ensure_bpffs() -> Result<()> {
    ensure!(
        bpffs_mounted(),
        "bpffs is not mounted at {BPFFS_ROOT}: run `cargo xtask setup` (or `mount -t bpf bpf {BPFFS_ROOT}`)"
    );
    Ok(())
}

pub fn mount_point(fstype: &str) -> Result<Option<PathBuf>> {
    Ok(mount_points(fstype)?.into_iter().next())
}

pub fn mount_points(fstype: &str) -> Result<Vec<PathBuf>> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == fstype).then(|| PathBuf::from(mount_point))
        })
        .collect())
}

pub fn ensure_root() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the lab needs root (network namespaces, cgroups, bpffs); running as uid {euid}"
    );
    Ok(())
}

/// Removes a cgroup directory and its children, bottom up. Cgroup files are not removable; only
/// the directories are (rmdir), and only once their processes are gone, so retry briefly.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Last `lines` lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Like [`run`], but kills the command if it has not finished within `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Drain both pipes while waiting, or a chatty command would block on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{cmd:?} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}
