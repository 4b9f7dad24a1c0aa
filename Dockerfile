# syntax=docker/dockerfile:1
#
# The clink-agent image for users with Docker (or podman/buildah):
#
#   docker build -t clusterlink-rs/clink-agent:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE="$(git remote get-url origin)" .
#
# NOT BUILT OR TESTED HERE: the project's build machines cannot pull base images (the rust
# image below), so neither CI nor any test runs this file. The tested way is
# `cargo xtask image`, which builds the same image (same files and paths, entrypoint,
# environment and labels) as an OCI archive without a container engine and checks it; a test
# (xtask/src/image/tests.rs) fails when this file and xtask's image definition disagree.

# Build: stable Rust for the agent, nightly with rust-src and bpf-linker for the eBPF programs
# that clink-agent's build.rs compiles and embeds (README, "Quick start").
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# The nightly the project builds its eBPF programs with (1.97, LLVM 22).
ARG NIGHTLY_DATE=2026-05-20
# musl-tools: musl-gcc, which the cc crate finds, compiles aws-lc's and ring's C and assembly
# for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
# build.rs runs `rustup run nightly`: the dated nightly is made the `nightly` toolchain by a
# link, as `rustup toolchain link` does for its own names.
RUN rustup target add x86_64-unknown-linux-musl \
 && rustup toolchain install "nightly-${NIGHTLY_DATE}" --profile minimal --component rust-src \
 && ln -s "nightly-${NIGHTLY_DATE}-x86_64-unknown-linux-gnu" \
      "${RUSTUP_HOME}/toolchains/nightly-x86_64-unknown-linux-gnu"
# bpf-linker against the nightly's own LLVM, through a prefix of links (what
# `cargo xtask setup` does).
RUN set -eu; \
    lib="$(ls "$(rustc +nightly --print sysroot)"/lib/libLLVM.so.*)"; \
    mkdir -p /opt/clink-llvm/lib; \
    ln -s "$lib" /opt/clink-llvm/lib/libLLVM.so; \
    ln -s "$lib" "/opt/clink-llvm/lib/$(basename "$lib")"; \
    major="$(basename "$lib" | sed 's/^libLLVM\.so\.\([0-9]*\).*/\1/')"; \
    LLVM_PREFIX=/opt/clink-llvm cargo install bpf-linker --version '^0.13' \
      --no-default-features --features "llvm-${major}"
WORKDIR /src
COPY . .
# The image's file system in /rootfs: the static binaries and the empty directories the chart
# mounts over and the agent writes to.
RUN cargo build --locked --profile dist --target x86_64-unknown-linux-musl -p clink-agent --bins \
 && mkdir -p /rootfs/usr/local/bin /rootfs/etc/clusterlink/certs /rootfs/run/clusterlink \
      /rootfs/run/clusterlink/cgroupv2 /rootfs/var/lib/clusterlink \
 && cp target/x86_64-unknown-linux-musl/dist/clink-agent \
      target/x86_64-unknown-linux-musl/dist/clink /rootfs/usr/local/bin/

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=
COPY --from=build /rootfs/ /
ENV PATH=/usr/local/bin
LABEL org.opencontainers.image.title="clink-agent" \
      org.opencontainers.image.description="ClusterLink-rs gateway agent (clink-agent) and CLI (clink)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
ENTRYPOINT ["/usr/local/bin/clink-agent"]
