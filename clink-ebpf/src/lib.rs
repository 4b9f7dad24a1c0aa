//! Empty on purpose: the programs are the `clink-ebpf` binary (src/main.rs), built for
//! `bpfel-unknown-none` by clink-agent's build.rs. This library target only lets clink-agent
//! build-depend on the package, so cargo re-runs that build script when the programs or
//! clink-common change.
#![no_std]
