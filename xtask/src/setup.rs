//! `cargo xtask setup`: idempotent; each step says whether it was already done.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use nodeward_lab::{paths, sys};

/// Binaries the lab, the tests and the benchmarks run, and the Debian package of each.
const BINARIES: [(&str, &str); 9] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("tcpdump", "tcpdump"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("dnsmasq", "dnsmasq-base"),
    ("h2load", "nghttp2-client"),
];
/// How long apt-get waits for another apt-get or dpkg (unattended upgrades, a second setup)
/// to release the dpkg lock, in seconds.
const DPKG_LOCK_TIMEOUT: &str = "300";

pub fn run() -> Result<()> {
    step("nightly rust-src", nightly_rust_src)?;
    step("bpf-linker", bpf_linker)?;
    step("bpffs at /sys/fs/bpf", bpffs)?;
    step("cgroup v2", || {
        Ok((true, sys::cgroup2_root()?.display().to_string()))
    })?;
    step("Debian packages", packages)?;
    Ok(())
}

/// Runs a step that returns (already done?, detail).
fn step(name: &str, f: impl FnOnce() -> Result<(bool, String)>) -> Result<()> {
    let (already, detail) = f().with_context(|| format!("setup: {name}"))?;
    println!(
        "setup: {name}: {} ({detail})",
        if already { "already done" } else { "done" }
    );
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    sys::run(cmd)
}

fn nightly_rust_src() -> Result<(bool, String)> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.is_empty() {
        sys::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        return Ok((
            false,
            "installed the nightly toolchain with rust-src".into(),
        ));
    }
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok((true, "rust-src is installed".into()));
    }
    sys::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok((
        false,
        "rustup component add rust-src --toolchain nightly".into(),
    ))
}

fn bpf_linker() -> Result<(bool, String)> {
    if let Ok(v) = output(Command::new("bpf-linker").arg("--version")) {
        return Ok((true, v.trim().to_string()));
    }
    // A bpf-linker linked against the nightly's libLLVM without an rpath runs when rustup puts
    // the nightly's lib directory on the library path, which is how aya-build invokes it.
    if let Ok(v) =
        output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
    {
        return Ok((true, format!("{} (with the nightly's libLLVM)", v.trim())));
    }
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in rustc +nightly -vV")?
        .to_string();
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let prefix = paths::target_dir().join("xtask").join("llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib").join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    println!(
        "setup: bpf-linker: building against {} (LLVM {major}); this takes a few minutes",
        libllvm.display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        // So that it also runs outside `rustup run nightly`.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
        )
        .status()?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
    Ok((
        false,
        output(Command::new("bpf-linker").arg("--version"))?
            .trim()
            .to_string(),
    ))
}

fn bpffs() -> Result<(bool, String)> {
    if sys::bpffs_mounted() {
        return Ok((true, "mounted".into()));
    }
    sys::run(Command::new("mount").args(["-t", "bpf", "bpf", sys::BPFFS_ROOT]))?;
    Ok((false, "mount -t bpf bpf /sys/fs/bpf".into()))
}

fn packages() -> Result<(bool, String)> {
    let missing: Vec<&str> = BINARIES
        .iter()
        .filter(|(bin, _)| which::which(bin).is_err())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = BINARIES.iter().map(|(bin, _)| *bin).collect();
        return Ok((true, format!("found {}", names.join(", "))));
    }
    sys::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    sys::run(
        Command::new("apt-get")
            .args(["-o", &format!("DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT}")])
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok((false, format!("apt-get install {}", missing.join(" "))))
}
