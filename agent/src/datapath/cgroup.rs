//! Which cgroup the socket-level programs attach to. `--cgroup auto` (the DaemonSet's default)
//! finds the cgroup the kubelet puts every pod in: `kubepods.slice` (systemd cgroup driver) or
//! `kubepods` (cgroupfs driver) under a cgroup v2 mount of this process (`/proc/self/mountinfo`;
//! in the DaemonSet, the host's hierarchy at `/host/sys/fs/cgroup`). Never the root cgroup.

use std::path::{Path, PathBuf};

/// The `--cgroup` value that asks for discovery.
pub const AUTO: &str = "auto";

/// The kubelet's pod cgroups, in the order they are looked for.
const KUBEPODS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// `--cgroup` as given, or the discovered pod cgroup for [`AUTO`].
///
/// # Errors
/// `auto` and no pod cgroup under any cgroup v2 mount, or mountinfo unreadable.
pub fn resolve(arg: &Path) -> Result<PathBuf, String> {
    if arg != Path::new(AUTO) {
        return Ok(arg.to_path_buf());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("--cgroup auto: reading /proc/self/mountinfo: {e}"))?;
    kubepods(&mountinfo, Path::is_dir)
}

/// The first `kubepods.slice` or `kubepods` directory under the cgroup v2 mounts of
/// `mountinfo`, as `is_dir` sees the file system.
///
/// # Errors
/// None found: the message names the mounts searched and what to set instead.
pub fn kubepods(mountinfo: &str, is_dir: impl Fn(&Path) -> bool) -> Result<PathBuf, String> {
    let mounts = cgroup2_mounts(mountinfo);
    for mount in &mounts {
        for name in KUBEPODS {
            let candidate = mount.join(name);
            if is_dir(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let searched = if mounts.is_empty() {
        "no cgroup2 mount in /proc/self/mountinfo".to_owned()
    } else {
        mounts
            .iter()
            .map(|m| m.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(format!(
        "--cgroup auto: no kubepods.slice or kubepods cgroup under the cgroup v2 mounts \
         ({searched}); mount the host's /sys/fs/cgroup into the container, or set --cgroup \
         (NODEWARD_CGROUP) to the cgroup v2 directory that holds every pod"
    ))
}

/// Mount points of `cgroup2` file systems, in mountinfo order (`proc(5)`: the fifth field is
/// the mount point, the file system type follows the ` - ` separator).
fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4))
                .flatten()
                .map(|m| PathBuf::from(unescape(m)))
        })
        .collect()
}

/// mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINER: &str = "\
2426 2404 0:341 / / rw,relatime - overlay overlay rw,lowerdir=/l
2430 2426 0:28 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw,nsdelegate
2441 2426 0:28 / /host/sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw,nsdelegate
2442 2426 0:5 / /sys/fs/bpf rw - bpf bpf rw
";

    #[test]
    fn auto_finds_the_systemd_drivers_kubepods_slice_under_the_hosts_mount() {
        let found = kubepods(CONTAINER, |p| {
            p == Path::new("/host/sys/fs/cgroup/kubepods.slice")
        });
        assert_eq!(
            found,
            Ok(PathBuf::from("/host/sys/fs/cgroup/kubepods.slice"))
        );
    }

    #[test]
    fn auto_finds_the_cgroupfs_drivers_kubepods() {
        let found = kubepods(CONTAINER, |p| {
            p == Path::new("/host/sys/fs/cgroup/kubepods")
        });
        assert_eq!(found, Ok(PathBuf::from("/host/sys/fs/cgroup/kubepods")));
    }

    #[test]
    fn auto_without_a_pod_cgroup_is_an_error_naming_the_mounts_and_never_the_root() {
        // Every directory exists, except the kubelet's: the root cgroups must not be taken.
        let err = kubepods(CONTAINER, |p| {
            !p.ends_with("kubepods.slice") && !p.ends_with("kubepods")
        })
        .expect_err("no pod cgroup");
        assert!(err.contains("/sys/fs/cgroup, /host/sys/fs/cgroup"), "{err}");
        assert!(err.contains("NODEWARD_CGROUP"), "{err}");
        let none = kubepods("1 0 0:1 / / rw - ext4 /dev/sda rw\n", |_| true).expect_err("no mount");
        assert!(none.contains("no cgroup2 mount"), "{none}");
    }

    #[test]
    fn a_mount_point_with_a_space_is_unescaped() {
        let info = "7 1 0:9 / /host/sys\\040fs/cgroup rw - cgroup2 cgroup rw\n";
        assert_eq!(
            kubepods(info, |p| p.ends_with("kubepods")),
            Ok(PathBuf::from("/host/sys fs/cgroup/kubepods"))
        );
    }

    #[test]
    fn a_given_path_is_taken_as_is() {
        assert_eq!(
            resolve(Path::new("/sys/fs/cgroup/lab/node-1")),
            Ok(PathBuf::from("/sys/fs/cgroup/lab/node-1"))
        );
    }
}
