//! Removing what crashed runs left behind, by the lab prefix.
//!
//! A lab is live while its state file says it is persistent (`cargo xtask lab up`) or its owner
//! process still runs. Everything else carrying the prefix is a leftover: labs whose owner died
//! are torn down from their state file; namespaces, cgroups and bpffs directories with no live lab
//! are removed directly.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::lab::{load_state, teardown};
use crate::topology::{LabState, PREFIX};
use crate::{paths, sys};

fn owner_alive(state: &LabState) -> bool {
    state
        .owner
        .as_ref()
        .is_none_or(|o| sys::process_start_time(o.pid) == Some(o.start_time))
}

/// Labs (by state file) in the lab root.
pub fn labs() -> Vec<LabState> {
    let Ok(entries) = std::fs::read_dir(paths::lab_root()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
        .filter_map(|e| load_state(&e.path().join("state.json")).ok())
        .collect()
}

/// The lab id in a prefixed name: `nwl-<id>-...` or `nwl-<id>`.
fn id_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    Some(rest.split('-').next().unwrap_or(rest))
}

/// Removes leftovers of labs whose owner is gone; returns what it removed.
pub fn sweep_stale() -> Result<Vec<String>> {
    sweep(owner_alive)
}

/// Removes every lab, live or not (`cargo xtask lab down --all`).
pub fn sweep_all() -> Result<Vec<String>> {
    sweep(|_| false)
}

fn sweep(keep: impl Fn(&LabState) -> bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut live = BTreeSet::new();
    for state in labs() {
        if keep(&state) {
            live.insert(state.id.clone());
        } else {
            // One lab that will not go away must not stop the others (or the next lab) from
            // being made: say so and go on; the namespace sweep below still runs.
            match teardown(&state, false) {
                Ok(()) => removed.push(format!("lab {}", state.id)),
                Err(e) => eprintln!("sweep: {e:#}"),
            }
        }
    }
    let is_leftover = |name: &str| id_of(name).is_some_and(|id| !live.contains(id));
    let orphans: Vec<String> = sys::netns_list()
        .into_iter()
        .filter(|n| is_leftover(n))
        .collect();
    let pids: Vec<u32> = orphans.iter().flat_map(|ns| sys::netns_pids(ns)).collect();
    sys::terminate(&pids, Duration::from_secs(3));
    for root in [
        Some(Path::new(sys::BPFFS_ROOT).to_path_buf()),
        sys::cgroup2_root().ok(),
    ]
    .into_iter()
    .flatten()
    {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_leftover(&name) {
                let path = entry.path();
                if root == Path::new(sys::BPFFS_ROOT) {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    sys::remove_cgroup_tree(&path)?;
                }
                removed.push(path.display().to_string());
            }
        }
    }
    let del: Vec<String> = orphans.iter().map(|n| format!("netns del {n}")).collect();
    sys::ip_batch(None, &del, true)?;
    removed.extend(orphans.into_iter().map(|n| format!("netns {n}")));
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::id_of;

    #[test]
    fn lab_ids_are_read_from_prefixed_names() {
        assert_eq!(id_of("nwl-ab12c-node-1"), Some("ab12c"));
        assert_eq!(id_of("nwl-dev"), Some("dev"));
        assert_eq!(id_of("other-ns"), None);
    }
}
