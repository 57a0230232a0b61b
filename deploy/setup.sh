#!/usr/bin/env bash
# Installs everything Surge's build, demo and tests need on a fresh Debian 12 machine, and mounts the
# kernel filesystems the agent uses. Idempotent: when everything is present it returns in seconds.
# Run as root (the eBPF programs and the mounts need it).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (installs packages, mounts bpffs/tracefs); try: sudo $0"
  exit 1
fi

# Debian packages: the BPF-capable rustc and its prebuilt core, LLVM 22 for bpf-linker, protoc for
# the gRPC code, and the real peers the tests and benchmarks use.
APT_PACKAGES=(
  rustc-web libstd-rust-web-dev-bpf
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  protobuf-compiler pkg-config build-essential
  iproute2 curl wrk haproxy prometheus
  # A real browser for the scaler's web page test.
  chromium
  # A gRPC core client (the C library under Python, Ruby, PHP and C# clients) for the hold tests.
  python3-grpcio
  # kube-proxy's part (a Service's ClusterIP routed to its endpoints) in the Kubernetes hold test.
  nftables
  # A real Kubernetes API server for the tests, built from Debian's source (deploy/kube-test/cluster.sh).
  golang-go etcd-server dpkg-dev make openssl ca-certificates golang-github-modern-go-reflect2-dev
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's prometheus package starts a system service; the tests run their own servers.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  # Likewise etcd-server's service: the Kubernetes tests start their own etcd on free ports.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now etcd >/dev/null 2>&1 || true; fi
  pkill -x prometheus 2>/dev/null || true
fi

# bpf-linker, built against Debian's LLVM 22 (aya's own install path downloads a toolchain we cannot reach).
BPF_LINKER_VERSION=0.13.0
export PATH="$HOME/.cargo/bin:$PATH"
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about a minute)"
  PATH="/usr/lib/llvm-22/bin:$PATH" LLVM_PREFIX=/usr/lib/llvm-22 \
    cargo install --quiet --locked bpf-linker --version "$BPF_LINKER_VERSION" \
      --no-default-features --features llvm-22
fi

# Kernel filesystems: bpffs for pinned maps, tracefs for tracepoints.
mounted() { awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; }
if ! mounted /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpffs /sys/fs/bpf
fi
if ! mounted /sys/kernel/tracing && ! mounted /sys/kernel/debug/tracing; then
  log "mounting tracefs at /sys/kernel/tracing"
  mount -t tracefs nodev /sys/kernel/tracing
fi
if ! awk '$3 == "cgroup2" { found = 1 } END { exit !found }' /proc/mounts; then
  log "no cgroup v2 hierarchy is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) and run again"
  exit 1
fi

log "ready"
