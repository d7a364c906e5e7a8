//! Where the lab finds its binaries and keeps its files.

use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Where lab directories go: `NODEWARD_LAB_ROOT` or `/tmp/nodeward-lab`.
pub fn lab_root() -> PathBuf {
    std::env::var_os("NODEWARD_LAB_ROOT")
        .map_or_else(|| PathBuf::from("/tmp/nodeward-lab"), PathBuf::from)
}

/// The agent: `NODEWARD_BIN` or `<target>/debug/nodeward`.
pub fn nodeward_bin() -> Result<PathBuf> {
    binary("NODEWARD_BIN", "nodeward")
}

/// The pods' echo server: `NODEWARD_ECHO_BIN`, next to the running executable (tests run from
/// `<target>/debug/deps`, xtask from `<target>/debug`), or `<target>/debug/nodeward-lab-echo`.
pub fn echo_bin() -> Result<PathBuf> {
    lab_binary("NODEWARD_ECHO_BIN", "nodeward-lab-echo")
}

/// The load generator (and Service probe): `NODEWARD_LOAD_BIN`, found as [`echo_bin`] is.
pub fn load_bin() -> Result<PathBuf> {
    lab_binary("NODEWARD_LOAD_BIN", "nodeward-lab-load")
}

fn lab_binary(var: &str, name: &str) -> Result<PathBuf> {
    if std::env::var_os(var).is_none()
        && let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let dir = if dir.ends_with("deps") {
            dir.parent().unwrap_or(dir)
        } else {
            dir
        };
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    binary(var, name)
}

fn binary(var: &str, name: &str) -> Result<PathBuf> {
    let path =
        std::env::var_os(var).map_or_else(|| target_dir().join("debug").join(name), PathBuf::from);
    ensure!(
        path.is_file(),
        "{} not found: run `cargo xtask build` (or set {var})",
        path.display()
    );
    Ok(path)
}
