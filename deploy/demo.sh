#!/usr/bin/env bash
# Installs what is missing, builds, and runs the local demo: the scaler, the agent and a sample
# HTTP service on this machine; sends load and shows what the kernel counted beside what was sent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: the agent loads eBPF programs and needs root: sudo $0" >&2
  exit 1
fi
./deploy/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "demo: building (the first build takes a few minutes)"
cargo build --release --quiet
BIN=target/release
WEB=127.0.0.1:18081
API=127.0.0.1:18080
GRPC=127.0.0.1:18051
LOGS=$(mktemp -d)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/surge-sample" --listen "$WEB" >"$LOGS/sample.log" 2>&1 & pids+=($!)
"$BIN/surge-scaler" --observe "web=$WEB" --http-listen "$API" --grpc-listen "$GRPC" >"$LOGS/scaler.log" 2>&1 & pids+=($!)
sleep 0.5
"$BIN/surge-agent" --scaler "http://$GRPC" --report-interval 200ms >"$LOGS/agent.log" 2>&1 & pids+=($!)

field() { curl -s "http://$API/api/v1/services/web" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
for _ in $(seq 1 50); do [ "$(field reported 2>/dev/null)" = "True" ] && break; sleep 0.2; done
[ "$(field reported)" = "True" ] || { echo "demo: the agent never reported; logs in $LOGS" >&2; tail -5 "$LOGS"/*.log >&2; exit 1; }

sent=0
printf '%-34s %10s %16s %16s\n' "phase" "sent" "kernel counted" "peak rate (rps)"
phase() {
  local name=$1; shift
  "$BIN/surge-load" --target "$WEB" "$@" >/dev/null & local load=$!
  local peak=0 r
  while kill -0 "$load" 2>/dev/null; do
    r=$(field request_rate); peak=$(python3 -c "print(max($peak, $r))"); sleep 0.2
  done
  wait "$load"
  local n; n=$(printf '%s\n' "$@" | awk 'prev=="--requests"{print} {prev=$0}')
  sent=$((sent + n))
  sleep 0.6
  printf '%-34s %10d %16s %16.0f\n' "$name" "$sent" "$(field requests_total)" "$peak"
}
phase "100000 keep-alive requests"         --requests 100000 --workers 4
phase "20000 new connections"              --requests 20000 --workers 4 --new-connections
phase "200000 keep-alive, 8 workers"       --requests 200000 --workers 8
phase "800 slow requests (20 ms each)"     --requests 800 --workers 8 --path "/sleep?ms=20"
echo
echo "scaler API:     curl http://$API/api/v1/services"
echo "Prometheus:     curl http://$API/metrics"
curl -s "http://$API/metrics" | grep -E '^surge_service_(requests|responses)_total'
