//! Raw `bpf(2)` for tests that put a node's pinned state back into the shape of an earlier
//! agent version (the lab crate does not link aya). Only what those tests need: open a pin,
//! read a map's shape, create a map, copy entries, pin.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;

use anyhow::{Context as _, Result, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `BPF_MAP_TYPE_HASH`.
pub const MAP_TYPE_HASH: u32 = 1;
/// `BPF_MAP_TYPE_LRU_HASH`.
pub const MAP_TYPE_LRU_HASH: u32 = 9;

/// A `union bpf_attr`, zeroed beyond what a command uses (the kernel checks that).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn u32_at(mut self, offset: usize, v: u32) -> Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64_at(mut self, offset: usize, v: u64) -> Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable 128-byte `union bpf_attr`; every pointer in it points
    // at live buffers of the sizes the map's shape gives.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ptr<T>(p: *const T) -> u64 {
    p as usize as u64
}

fn fd_of(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(rc).expect("a file descriptor")) }
}

fn obj_get(pin: &Path) -> Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).context("pin path")?;
    let mut attr = Attr::new().u64_at(0, ptr(path.as_ptr()));
    Ok(fd_of(
        bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", pin.display()))?,
    ))
}

/// A map's (type, key size, value size, max entries).
fn shape(fd: &OwnedFd) -> Result<(u32, u32, u32, u32)> {
    let mut info = [0u8; 96];
    let mut attr = Attr::new()
        .u32_at(0, fd.as_raw_fd().cast_unsigned())
        .u32_at(4, 96)
        .u64_at(8, ptr(info.as_mut_ptr()));
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("reading the map's info")?;
    let word = |i: usize| u32::from_ne_bytes(info[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, ...
    Ok((word(0), word(2), word(3), word(4)))
}

/// The type (`MAP_TYPE_*`) of the map pinned at `pin`.
///
/// # Errors
/// The pin cannot be opened or read.
pub fn pinned_map_type(pin: &Path) -> Result<u32> {
    Ok(shape(&obj_get(pin)?)?.0)
}

/// Replaces the hash map pinned at `pin` by an LRU hash of the same shape holding the same
/// entries, as an agent before the preallocated conntrack left it. Returns the entries copied.
/// Programs that use the old map keep it (they hold it, not its pin).
///
/// # Errors
/// A failed `bpf(2)` call or pin; the pin may then be gone (the test fails anyway).
pub fn replace_with_lru(pin: &Path) -> Result<usize> {
    let old = obj_get(pin)?;
    let (map_type, key_size, value_size, max_entries) = shape(&old)?;
    if map_type != MAP_TYPE_HASH {
        bail!("{} is a map of type {map_type}, not a hash", pin.display());
    }
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"NW_CONNTRACK");
    let mut attr = Attr::new()
        .u32_at(0, MAP_TYPE_LRU_HASH)
        .u32_at(4, key_size)
        .u32_at(8, value_size)
        .u32_at(12, max_entries);
    attr.0[28..44].copy_from_slice(&name);
    let lru = fd_of(bpf(BPF_MAP_CREATE, &mut attr).context("creating the LRU map")?);

    let (ks, vs) = (key_size as usize, value_size as usize);
    let mut key = vec![0u8; ks];
    let mut next = vec![0u8; ks];
    let mut value = vec![0u8; vs];
    let mut copied = 0;
    let mut first = true;
    loop {
        let mut attr = Attr::new()
            .u32_at(0, old.as_raw_fd().cast_unsigned())
            .u64_at(8, if first { 0 } else { ptr(key.as_ptr()) })
            .u64_at(16, ptr(next.as_mut_ptr()));
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("walking the map"),
        }
        first = false;
        key.copy_from_slice(&next);
        let mut attr = Attr::new()
            .u32_at(0, old.as_raw_fd().cast_unsigned())
            .u64_at(8, ptr(key.as_ptr()))
            .u64_at(16, ptr(value.as_mut_ptr()));
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e).context("reading an entry"),
        }
        let mut attr = Attr::new()
            .u32_at(0, lru.as_raw_fd().cast_unsigned())
            .u64_at(8, ptr(key.as_ptr()))
            .u64_at(16, ptr(value.as_ptr()));
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("writing an entry")?;
        copied += 1;
    }

    std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).context("pin path")?;
    let mut attr = Attr::new()
        .u64_at(0, ptr(path.as_ptr()))
        .u32_at(8, lru.as_raw_fd().cast_unsigned());
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning {}", pin.display()))?;
    Ok(copied)
}
