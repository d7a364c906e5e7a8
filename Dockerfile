# syntax=docker/dockerfile:1
# The nodeward image: `docker build -t nodeward/nodeward:0.1.0 .` (deploy/ expects that name; the
# tag follows agent/Cargo.toml's version). Runs as root with a few capabilities, see
# deploy/daemonset.yaml: a non-root user is not possible, because Kubernetes grants added
# capabilities (BPF, NET_ADMIN, PERFMON) to root processes only.

# ---- builder: stable for the agent, nightly + rust-src + bpf-linker for the eBPF programs ------
FROM rust:1.95-bookworm AS builder

# The nightly that builds agent-ebpf (`-Z build-std=core`). aya-build runs `rustup run nightly`,
# so this dated nightly is linked in as `nightly`. It must stay below 1.98 (see DEVELOPERS.md,
# "Pinned crates"); `rustc +nightly -vV` on a developer machine shows the one CI uses.
ARG NIGHTLY=nightly-2026-05-20
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustc +"$NIGHTLY" --print sysroot)" \
 && rustc +nightly -vV

# bpf-linker built against the nightly's own libLLVM (as `cargo xtask setup` does), so the
# linker and rustc agree on the LLVM bitcode version.
RUN set -eux; \
    sysroot="$(rustc +nightly --print sysroot)"; \
    major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    mkdir -p /opt/llvm-prefix/lib; \
    ln -sf "$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)" /opt/llvm-prefix/lib/libLLVM.so; \
    LLVM_PREFIX=/opt/llvm-prefix \
    RUSTFLAGS="-C link-arg=-Wl,-rpath,$sysroot/lib" \
    cargo install --locked bpf-linker --no-default-features --features "llvm-$major"; \
    bpf-linker --version

WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nodeward \
 && install -D -m 0755 target/release/nodeward /out/nodeward

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim
# iproute2: the agent runs `ip -j route show exact <pod IP>` to find each pod's host-side
# interface, and `ip rule`/`ip route` for the tunnel. nftables: with `--hbone-dial pod` (the
# default) the agent marks connections to port 15008 of its pods by conntrack (`nft`, see
# tunnel::net::HboneRoutes). ca-certificates: TLS to an API server given by --kubeconfig. mount
# (util-linux, already in the base image) is used by the mount-bpffs init container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/nodeward /usr/local/bin/nodeward
# Root on purpose (see the top of this file).
USER 0:0
EXPOSE 9962 15008
ENTRYPOINT ["/usr/local/bin/nodeward"]
CMD ["agent", "--kubernetes"]
