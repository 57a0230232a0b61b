//! Builds the kernel programs (`agent-ebpf`, target bpfel-unknown-none) and hands the object to
//! the agent, which embeds it: one `cargo build` makes a self-contained `surge-agent`.
//!
//! aya-build expects a rustup nightly with rust-src; Debian instead ships a BPF-capable rustc
//! (`rustc-web`) with a prebuilt `core` for the BPF targets, and `bpf-linker` is built against
//! LLVM 22. This script runs the inner cargo itself with that rustc and its own target directory.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_TARGET: &str = "bpfel-unknown-none";
const SETUP_HINT: &str = "run deploy/setup.sh as root to install the kernel toolchain";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("agent/ sits in the workspace root")
        .to_path_buf();
    let ebpf_dir = root.join("agent-ebpf");
    for p in ["src", "common/src", "Cargo.toml", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }

    check_toolchain();

    let target_dir = root.join("target").join("ebpf");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--target",
            BPF_TARGET,
            "-p",
            "surge-agent-ebpf",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // What the outer cargo exports would point the inner build at the host toolchain.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUSTC", BPF_RUSTC).env("RUSTC_BOOTSTRAP", "1");
    // BTF with function info: bpf_loop callbacks (the HTTP framing loop) need it.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-C\x1fdebuginfo=2\x1f-C\x1flink-arg=--btf",
    );
    // bpf-linker is installed by `cargo install`, which may not be on a build's PATH.
    if let (Some(path), Some(home)) = (env::var_os("PATH"), env::var_os("HOME")) {
        let mut paths: Vec<PathBuf> = env::split_paths(&path).collect();
        paths.push(Path::new(&home).join(".cargo/bin"));
        if let Ok(joined) = env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo for the eBPF programs: {e}; {SETUP_HINT}"));
    if !status.success() {
        panic!("building the eBPF programs (agent-ebpf) failed: {status}; if the toolchain is missing, {SETUP_HINT}");
    }
    let object = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join("surge-agent-ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("surge.bpf.o");
    std::fs::copy(&object, &out).unwrap_or_else(|e| panic!("copying {} failed: {e}", object.display()));
}

/// Fails the build with one clear line when a piece of the kernel toolchain is missing.
fn check_toolchain() {
    let missing = |what: &str| -> ! { panic!("{what} is missing: {SETUP_HINT}") };
    if !Path::new(BPF_RUSTC).exists() {
        missing("Debian's rustc-web (/usr/bin/rustc)");
    }
    if !Path::new("/usr/lib/rustlib").join(BPF_TARGET).exists() {
        missing("the BPF core library (Debian package libstd-rust-web-dev-bpf)");
    }
    let linker_found = env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|p| p.join("bpf-linker").exists()))
        .unwrap_or(false)
        || env::var_os("HOME").is_some_and(|h| Path::new(&h).join(".cargo/bin/bpf-linker").exists());
    if !linker_found {
        missing("bpf-linker");
    }
}
