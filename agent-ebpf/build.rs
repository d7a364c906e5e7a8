use which::which;

/// Building this crate has an undeclared dependency on the `bpf-linker` binary. This would be
/// better expressed by [artifact-dependencies][bindeps] but issues such as
/// https://github.com/rust-lang/cargo/issues/12385 make their use impractical for the time being.
///
/// This file implements an imperfect solution: it causes cargo to rebuild the crate whenever the
/// mtime of `which bpf-linker` changes. `cargo xtask setup` installs it.
///
/// [bindeps]: https://doc.rust-lang.org/nightly/cargo/reference/unstable.html?highlight=feature#artifact-dependencies
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it builds it against the nightly's LLVM)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
    // bpf-linker passes `-bpf-expand-memcpy-in-order` to LLVM by default, and in that mode the
    // BPF backend expands no `memset` inline: every zeroed struct or array (a `FlowEvent`, the
    // prefix of an IPv4-mapped address) becomes a call to a byte-at-a-time loop, about 400
    // instructions per packet. Without it, they are a few 8-byte stores.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
