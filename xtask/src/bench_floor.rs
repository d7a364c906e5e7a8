//! The hooks' floor for `bench datapath`: a TC program that does nothing but pass the packet
//! (`r0 = TC_ACT_OK; exit`), attached with tcx where nodeward attaches its classifiers (ingress
//! and egress of every pod's host-side interface, on every node). No program at those hooks can
//! cost less, so the gap between this scenario and no agent is what the architecture itself
//! costs on this machine, and nodeward's gap above it is what its programs do.
//!
//! Loaded with raw `bpf(2)` calls: two instructions need no object file, and the benchmark
//! should not depend on the datapath it measures against.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result};
use nodeward_lab::{Lab, sys};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `enum bpf_attach_type` (include/uapi/linux/bpf.h).
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`; the kernel
/// takes the fields it is not given as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr`'s `link_create` with its `tcx` member (append after whatever is attached).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T, what: &str) -> Result<OwnedFd> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, valid for
    // `size_of::<T>()` bytes; the pointers inside it point to memory the caller keeps alive.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    let fd = i32::try_from(fd).context("bpf(2) returned an fd out of range")?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `r0 = 0 (TC_ACT_OK); exit`, as BPF instructions (code, dst/src registers, offset, imm).
fn pass_program() -> [u64; 2] {
    let insn = |code: u8, imm: i32| u64::from(code) | (u64::from(imm.cast_unsigned()) << 32);
    // BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
    [insn(0xb7, 0), insn(0x95, 0)]
}

/// The pass-only programs attached to pods' interfaces; dropping this detaches them (the links
/// are not pinned: they live as long as their descriptors).
pub(crate) struct PassPrograms {
    links: Vec<OwnedFd>,
}

impl PassPrograms {
    /// Loads the program and attaches it at tcx ingress and egress of every pod's host-side
    /// interface in `lab`, in the pod's node's network namespace: where the agents attach
    /// their classifiers.
    pub(crate) fn attach(lab: &Lab) -> Result<Self> {
        let insns = pass_program();
        let license = c"GPL";
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: u32::try_from(insns.len())?,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: *b"bench_nop\0\0\0\0\0\0\0",
            ..ProgLoadAttr::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &mut load, "loading the pass-only TC program")?;
        let prog_fd = u32::try_from(prog.as_raw_fd())?;
        let mut links = Vec::new();
        for pod in lab.pods() {
            let node_netns = &lab.node(&pod.node).netns;
            let ifname = pod.host_ifname.clone();
            let attached = sys::in_netns(node_netns, move || -> Result<Vec<OwnedFd>> {
                let name = std::ffi::CString::new(ifname.clone())?;
                // SAFETY: a NUL-terminated name; the lookup is in this thread's namespace.
                let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
                anyhow::ensure!(ifindex != 0, "no interface {ifname}");
                [BPF_TCX_INGRESS, BPF_TCX_EGRESS]
                    .into_iter()
                    .map(|attach_type| {
                        let mut link = LinkCreateAttr {
                            prog_fd,
                            target_ifindex: ifindex,
                            attach_type,
                            ..LinkCreateAttr::default()
                        };
                        bpf(
                            BPF_LINK_CREATE,
                            &mut link,
                            &format!("attaching the pass-only program to {ifname}"),
                        )
                    })
                    .collect()
            })??;
            links.extend(attached);
        }
        Ok(Self { links })
    }

    pub(crate) fn count(&self) -> usize {
        self.links.len()
    }
}
