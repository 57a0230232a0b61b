#!/usr/bin/env bash
# Installs what is missing, builds everything once (release), and runs every check and test:
# formatting, clippy, unit tests, and the end-to-end tests that load the eBPF programs (root).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test: the end-to-end tests load eBPF programs and need root: sudo $0" >&2
  exit 1
fi
./deploy/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== kubernetes test control plane (built once per Debian version, then cached)"
./deploy/kube-test/cluster.sh build
echo "== format"
cargo fmt --all -- --check
echo "== build (release, once for all tests)"
cargo build --release --all-targets
echo "== clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== tests"
cargo test --release -- --test-threads=2
