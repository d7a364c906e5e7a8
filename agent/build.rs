//! Builds the eBPF programs (`agent-ebpf`) with aya-build, quietly.
//!
//! aya-build relays every line of the inner `cargo build` as a `cargo:warning=`, so a normal
//! build printed about 50 "warning: ... Compiling ..." lines that read like problems. Its
//! directives are written to our stdout, which cargo parses; while it runs, stdout goes to a file,
//! the `rerun-if` directives are passed on, and the relayed lines are printed (on stderr, which
//! cargo shows only when a build script fails) only if the inner build failed. The programs'
//! own warnings are still caught: CI lints `agent-ebpf` for its target with `-D warnings`.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found"))?;
    let root_dir = ebpf_package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf_package.manifest_path))?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let capture = out_dir.join("aya-build.stdout");
    let result = with_stdout_to(&capture, || {
        aya_build::build_ebpf(
            [Package {
                name: ebpf_package.name.as_str(),
                root_dir: root_dir.as_str(),
                ..Default::default()
            }],
            Toolchain::default(),
        )
    })?;
    let captured = std::fs::read_to_string(&capture)
        .with_context(|| format!("reading {}", capture.display()))?;
    let mut relayed = Vec::new();
    for line in captured.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(inner) => relayed.push(inner),
            None => println!("{line}"),
        }
    }
    if result.is_err() {
        for line in relayed {
            eprintln!("{line}");
        }
    }
    result
}

/// Runs `f` with file descriptor 1 pointing at `path`, then restores it.
fn with_stdout_to<T>(path: &std::path::Path, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    std::io::stdout().flush()?;
    // SAFETY: plain descriptor calls on descriptors this process owns; the saved copy of
    // stdout is restored and closed before returning.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        return Err(std::io::Error::last_os_error()).context("redirecting stdout");
    }
    let out = f();
    std::io::stdout().flush()?;
    // SAFETY: as above.
    let restored = unsafe { libc::dup2(saved, 1) };
    unsafe { libc::close(saved) };
    if restored < 0 {
        return Err(std::io::Error::last_os_error()).context("restoring stdout");
    }
    Ok(out)
}
