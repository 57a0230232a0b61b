#!/usr/bin/env bash
# Installs what is missing, builds, and runs the local demo (about two minutes): the scaler runs a
# sample HTTP service's replicas on this machine with its local actuator, the agent measures them
# in the kernel and balances each connection to the service address over the ready replicas, and a
# load generator ramps from nothing to a burst and back to idle. The scaling shows live, then a
# summary. It uses the shipped programs and an ordinary config and policy (deploy/examples/demo).
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
DEMO=deploy/examples/demo
SERVICE=127.0.0.1:18000      # the service address in $DEMO/surge.yaml
API=${SURGE_DEMO_API:-127.0.0.1:18080}      # override if these ports are taken
GRPC=${SURGE_DEMO_GRPC:-127.0.0.1:18051}
LOGS=$(mktemp -d)

if curl -s -o /dev/null "http://$API/healthz"; then
  echo "demo: something already answers on $API; stop it first, or set SURGE_DEMO_API and SURGE_DEMO_GRPC" >&2
  exit 1
fi

scaler=""; agent=""; loads=()
cleanup() {
  for p in "${loads[@]}" $agent $scaler; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # The agent leaves its load balancer pinned for the next agent; the demo is over, so remove it.
  [ -n "$agent" ] && "$BIN/surge-agent" --cleanup >>"$LOGS/agent.log" 2>&1 || true
}
trap cleanup EXIT

"$BIN/surge-scaler" --config "$DEMO/surge.yaml" --policy-dir "$DEMO/policies" \
  --http-listen "$API" --grpc-listen "$GRPC" --tick 500ms >"$LOGS/scaler.log" 2>&1 & scaler=$!
sleep 0.5
"$BIN/surge-agent" --scaler "http://$GRPC" --report-interval 200ms >"$LOGS/agent.log" 2>&1 & agent=$!
echo "watch it in a browser: http://$API/"

# One JSON read of the scaler's API per call, printed as "desired ready|line".
status() {
  curl -s "http://$API/api/v1/services/web" | python3 -c '
import json, sys
v = json.load(sys.stdin)
r = v.get("replicas") or {}
d = v.get("last_decision") or {}
print("%s %s|replicas %2s/%-2s  rps %6.0f  concurrency %5.1f  mode %-10s %s" % (
    r.get("desired", "-"), r.get("ready", "-"), r.get("desired", "-"), r.get("ready", "-"),
    v.get("request_rate", 0), v.get("concurrency", 0), d.get("mode", "-"), d.get("reason", "")))
' 2>/dev/null || echo "- -|(scaler not answering)"
}

# The service starts at zero: wait until the agent has reported it to the scaler.
reported() { curl -s "http://$API/api/v1/services/web" | python3 -c "import json,sys; print(json.load(sys.stdin)['reported'])" 2>/dev/null; }
for _ in $(seq 1 100); do
  [ "$(reported)" = "True" ] && break
  sleep 0.2
done
[ "$(reported)" = "True" ] || {
  echo "demo: the agent never reported; logs in $LOGS" >&2; tail -n 5 "$LOGS"/*.log >&2; exit 1; }

echo
echo "demo: the service starts with no replica. Clients connect to $SERVICE: while no replica is"
echo "      ready the agent holds their connections (and asks for one at once); then the kernel"
echo "      sends each connection to a ready replica directly."
echo "      Policy: $DEMO/policies/demo.yaml (2 requests in flight per replica, 1 to 6 replicas)."
echo
printf '%-6s %-10s %-5s %s\n' "time" "phase" "load" "replicas desired/ready, measured in the kernel, last decision"
# name, closed-loop clients (each with a 50 ms request in flight), seconds
phases=("idle 0 6" "warm-up 1 12" "ramp 3 10" "ramp 6 10" "burst 12 22" "cool-down 3 10" "trickle 1 8" "idle 0 40")
start=$(date +%s); peak=0; n=0
for p in "${phases[@]}"; do
  read -r name workers secs <<<"$p"
  if [ "$workers" -gt 0 ]; then
    "$BIN/surge-load" --target "$SERVICE" --duration "${secs}s" --workers "$workers" \
      --new-connections --path "/sleep?ms=50" >"$LOGS/load-$n.log" 2>&1 & loads+=($!)
  fi
  for _ in $(seq 1 "$secs"); do
    sleep 1 & tick=$!   # one line a second, however long the API read takes
    s=$(status); desired=${s%% *}
    [ "$desired" != "-" ] && [ "$desired" -gt "$peak" ] && peak=$desired
    t=$(( $(date +%s) - start ))
    printf '%2d:%02d  %-10s %-5s %s\n' $((t / 60)) $((t % 60)) "$name" "$workers" "${s#*|}"
    wait "$tick"
  done
  n=$((n + 1))
done
for l in "${loads[@]}"; do wait "$l" || true; done
loads=()

sent=0; ok=0; failed=0
for f in "$LOGS"/load-*.log; do
  read -r s a x < <(awk '/^sent/ {print $2, $4, $6}' "$f")
  sent=$((sent + ${s:-0})); ok=$((ok + ${a:-0})); failed=$((failed + ${x:-0}))
done
read -r counted probes < <(curl -s "http://$API/api/v1/services/web" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["requests_total"], s["probe_requests_total"])')
pids=$(curl -s "http://$API/api/v1/services/web/replicas" | python3 -c 'import json,sys; print(" ".join(str(r["pid"]) for r in json.load(sys.stdin)["replicas"] if r["pid"]))')
events=$(grep -c '"scaling"\|scaling service=web' "$LOGS/scaler.log" || true)

kill "$scaler"; wait "$scaler" 2>/dev/null || true; scaler=""
left=0
for p in $pids; do kill -0 "$p" 2>/dev/null && left=$((left + 1)); done

echo
echo "summary"
echo "  requests sent through $SERVICE:  $sent ($ok answered, $failed failed)"
echo "  requests counted in the kernel:    $counted (and $probes readiness probes, counted apart)"
echo "  replicas: peak $peak, scaling decisions applied: $events"
echo "  after the scaler stopped: $left replica processes left running"
echo "  logs: $LOGS"
