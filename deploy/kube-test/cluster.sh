#!/usr/bin/env bash
# A real Kubernetes 1.20 control plane on loopback, for Surge's tests only (1.20 is long out of
# support: never expose it). See ../../../shared/kubernetes-test-cluster.md for why it is built this way.
#
#   cluster.sh build            build kube-apiserver, kube-controller-manager and kube-scheduler from
#                               Debian bookworm's `kubernetes` source package, once; the binaries are
#                               cached outside the repository in $SURGE_KUBE_CACHE/<debian version>/bin
#   cluster.sh start DIR        start etcd + kube-apiserver (+ controller-manager) with state in DIR;
#                               prints the kubeconfig path (DIR/kubeconfig) when /readyz answers
#                               With SURGE_KUBE_ENDPOINTSLICE_V1=1, discovery.k8s.io/v1 EndpointSlices
#                               are served (a CRD stand-in: 1.20 only has v1beta1, which is turned off)
#   cluster.sh stop DIR         stop what `start DIR` started and remove DIR
#   cluster.sh bin              print the directory holding the cached binaries (building if missing)
#
# Build: about 5 minutes cold on 2 cores (nice'd), seconds when cached. Start: about 5 s.
set -euo pipefail

KUBE_DEB_VERSION="${SURGE_KUBE_DEB_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}"
CACHE_ROOT="${SURGE_KUBE_CACHE:-/var/cache/surge-kube}"
CACHE="$CACHE_ROOT/$KUBE_DEB_VERSION"
BIN="$CACHE/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

log() { printf 'kube-test: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

have_binaries() {
  local b
  for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}

# The Debian mirror this machine already uses (deb822 or one-line sources), for the deb-src lines.
debian_mirror() {
  local suite_pattern="$1" default="$2" uri
  uri=$(grep -hs -B3 -A3 "Suites:.*$suite_pattern" /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ { print $2; exit }')
  if [ -z "$uri" ]; then
    uri=$(awk -v s="$suite_pattern" '$1 == "deb" && $3 ~ s { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  fi
  printf '%s\n' "${uri:-$default}"
}

build() {
  have_binaries && return 0
  mkdir -p "$CACHE_ROOT"
  exec 9>"$CACHE_ROOT/.lock"
  log "waiting for the build lock $CACHE_ROOT/.lock"
  flock 9
  have_binaries && return 0
  local tool
  for tool in go etcd dpkg-source make openssl apt-get; do
    command -v "$tool" >/dev/null || die "$tool is missing: run deploy/setup.sh (as root)"
  done
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] \
    || die "golang-github-modern-go-reflect2-dev is missing: run deploy/setup.sh (as root)"

  local work="$CACHE/work"
  rm -rf "$work"
  mkdir -p "$work/lists/partial" "$work/archives/partial"
  local main security
  main=$(debian_mirror 'bookworm( |$)' http://deb.debian.org/debian)
  security=$(debian_mirror 'bookworm-security' http://deb.debian.org/debian-security)
  printf 'deb-src %s bookworm main\ndeb-src %s bookworm-security main\n' "$main" "$security" >"$work/sources.list"
  local apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives" -o APT::Sandbox::User=root)
  log "fetching the source of kubernetes=$KUBE_DEB_VERSION from $main and $security"
  apt-get -qq "${apt_opts[@]}" update
  (cd "$work" && apt-get -qq "${apt_opts[@]}" source --download-only "kubernetes=$KUBE_DEB_VERSION")
  (cd "$work" && dpkg-source -x --no-check ./kubernetes_*.dsc src >/dev/null)
  local src="$work/src"

  # Fix 1: Go 1.19 wants the wildcard replacements ("# module => replacement") at the end of
  # vendor/modules.txt, or it stops with "updates to go.mod needed, disabled by -mod=vendor".
  awk '$1 == "#" && $3 == "=>" { tail[n++] = $0; next } { print } END { for (i = 0; i < n; i++) print tail[i] }' \
    "$src/vendor/modules.txt" >"$src/vendor/modules.txt.new"
  mv "$src/vendor/modules.txt.new" "$src/vendor/modules.txt"
  # Fix 2: the vendored reflect2 1.0.1 is unsafe on Go >= 1.18; use Debian's 1.0.2.
  local r2="$src/vendor/github.com/modern-go/reflect2"
  rm -f "$r2"/*.go "$r2"/*.s
  find /usr/share/gocode/src/github.com/modern-go/reflect2 -maxdepth 1 \( -name '*.go' -o -name '*.s' \) \
    ! -name '*_test.go' -exec cp {} "$r2/" \;

  export GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on CGO_ENABLED=0
  export GOCACHE="$work/gocache" GOPATH="$work/gopath"
  log "building openapi-gen and the generated OpenAPI definitions"
  (cd "$src" && nice -n 10 go build -o _output/local/bin/linux/amd64/openapi-gen ./vendor/k8s.io/kube-openapi/cmd/openapi-gen)
  (cd "$src" && nice -n 10 make gen_openapi >"$work/gen_openapi.log" 2>&1) \
    || { tail -20 "$work/gen_openapi.log" >&2; die "make gen_openapi failed (log: $work/gen_openapi.log)"; }
  log "building ${BINARIES[*]} (about 5 minutes on 2 cores)"
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v1.20.2"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=20"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  mkdir -p "$work/out"
  (cd "$src" && nice -n 10 go build -tags selinux,notest -trimpath -ldflags "$ldflags" -o "$work/out/" \
    ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler)
  mkdir -p "$BIN"
  local b
  for b in "${BINARIES[@]}"; do mv "$work/out/$b" "$BIN/$b"; done
  # The source tree and the Go build cache (~1.4 GB) are not needed once the binaries exist.
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
  log "built into $BIN"
}

# Sets PORT to a loopback port nobody holds, below the kernel's ephemeral range (so no connection can be given
# it as its source port between this check and the bind), and not handed out before by this script.
PICKED=" "
free_port() {
  local low p
  low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  while :; do
    p=$((10000 + RANDOM % (low - 10000)))
    case "$PICKED" in *" $p "*) continue ;; esac
    ss -Htan "sport = :$p" 2>/dev/null | grep -q . && continue
    PICKED+="$p "
    PORT=$p
    return
  done
}

# Starts a detached process whose pid goes to DIR/pids; output to DIR/NAME.log.
spawn() {
  local dir="$1" name="$2"; shift 2
  setsid "$@" </dev/null >"$dir/$name.log" 2>&1 &
  echo "$! $name" >>"$dir/pids"
}

# Starts etcd on the given ports with its data in DIR/etcd; fails, with its log, if it does not
# answer /health within 20 s.
start_etcd() {
  local dir="$1" port="$2" peer="$3"
  rm -rf "$dir/etcd"
  spawn "$dir" etcd etcd --name surge-test --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "surge-test=http://127.0.0.1:$peer"
  wait_answering "$dir" etcd 20 curl -fsS "http://127.0.0.1:$port/health"
}

# Starts kube-apiserver on API_PORT against the etcd on ETCD_PORT; fails, with its log, if it
# exits or does not answer /readyz within 60 s (a loaded 2-core machine can take that long).
start_apiserver() {
  local dir="$1" pki="$2" etcd_port="$3" api_port="$4"
  local runtime_config=()
  [ "${SURGE_KUBE_ENDPOINTSLICE_V1:-0}" = 1 ] && runtime_config=(--runtime-config=discovery.k8s.io/v1beta1=false)
  spawn "$dir" kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" --insecure-port=0 \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none "${runtime_config[@]}"
  wait_answering "$dir" kube-apiserver 60 curl -fsS --cacert "$pki/ca.crt" \
    -H "Authorization: Bearer $(cut -d, -f1 "$pki/tokens.csv")" "https://127.0.0.1:$api_port/readyz"
}

# Runs CHECK... every 0.25 s until it succeeds (0), the process NAME started in DIR exits, or
# SECONDS pass (1, with the end of NAME's log).
wait_answering() {
  local dir="$1" name="$2" seconds="$3" pid i
  shift 3
  pid=$(awk -v n="$name" '$2 == n { p = $1 } END { print p }' "$dir/pids")
  for i in $(seq 1 $((seconds * 4))); do
    "$@" >/dev/null 2>&1 && { log "$name answered after $((i / 4)) s"; return 0; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  log "$name did not answer (${*: -1}); the end of its log:"
  tail -20 "$dir/$name.log" >&2 || true
  return 1
}

start() {
  local dir="$1"
  build
  [ -e "$dir/pids" ] && die "$dir already holds a cluster; stop it first"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local pki="$dir/pki"
  mkdir -p "$pki"
  # A CA, a serving certificate for 127.0.0.1, the service-account key pair, an admin token.
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=surge-test-ca \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$pki/apiserver.key" \
    -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$pki/san.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/san.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  local token
  token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s,admin,admin,system:masters\n' "$token" >"$pki/tokens.csv"

  # Stop with the process that asked for the cluster (a test binary), whatever way it ends.
  if [ -n "${SURGE_KUBE_OWNER_PID:-}" ]; then
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" stop "$3"' _ \
      "$SURGE_KUBE_OWNER_PID" "$0" "$dir" </dev/null >/dev/null 2>&1 &
  fi
  # A port taken between the check and the bind makes etcd or the API server exit at once:
  # then start again on other ports.
  local attempt etcd_port peer_port api_port
  for attempt in 1 2 3; do
    free_port; etcd_port=$PORT; free_port; peer_port=$PORT; free_port; api_port=$PORT
    start_etcd "$dir" "$etcd_port" "$peer_port" && start_apiserver "$dir" "$pki" "$etcd_port" "$api_port" && break
    log "attempt $attempt: could not start on ports $etcd_port, $peer_port and $api_port"
    [ "$attempt" = 3 ] && { stop "$dir"; die "etcd or kube-apiserver did not start (logs above)"; }
    stop_processes "$dir"
  done
  cat >"$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
  - name: surge-test
    cluster:
      server: https://127.0.0.1:$api_port
      certificate-authority: $pki/ca.crt
users:
  - name: admin
    user:
      token: $token
contexts:
  - name: surge-test
    context: {cluster: surge-test, user: admin}
current-context: surge-test
KUBECONFIG
  if [ "${SURGE_KUBE_ENDPOINTSLICE_V1:-0}" = 1 ]; then
    endpointslice_v1 "https://127.0.0.1:$api_port" "$pki/ca.crt" "$token" || { stop "$dir"; die "EndpointSlice v1 stand-in failed"; }
  fi
  printf '%s\n' "$dir/kubeconfig"
}

# Serves discovery.k8s.io/v1 EndpointSlices on 1.20 (which has only v1beta1, turned off by the
# caller): a schemaless CRD of that name. The tests write the slices themselves.
endpointslice_v1() {
  local server="$1" ca="$2" token="$3" i
  local crd='{"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition",
    "metadata":{"name":"endpointslices.discovery.k8s.io",
      "annotations":{"api-approved.kubernetes.io":"https://github.com/kubernetes/enhancements/pull/1"}},
    "spec":{"group":"discovery.k8s.io","scope":"Namespaced",
      "names":{"kind":"EndpointSlice","listKind":"EndpointSliceList","plural":"endpointslices","singular":"endpointslice"},
      "versions":[{"name":"v1","served":true,"storage":true,
        "schema":{"openAPIV3Schema":{"type":"object","x-kubernetes-preserve-unknown-fields":true}}}]}}'
  curl -fsS --cacert "$ca" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -X POST "$server/apis/apiextensions.k8s.io/v1/customresourcedefinitions" -d "$crd" >/dev/null || return 1
  for i in $(seq 1 80); do
    curl -fsS --cacert "$ca" -H "Authorization: Bearer $token" \
      "$server/apis/discovery.k8s.io/v1/endpointslices" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  return 1
}

# Stops what DIR/pids lists, newest first (the API server before etcd), and forgets it.
stop_processes() {
  local dir="$1" pid name
  [ -f "$dir/pids" ] || return 0
  tac "$dir/pids" | while read -r pid name; do
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$dir/pids"
}

stop() {
  local dir="$1"
  stop_processes "$dir"
  rm -rf "$dir"
}

case "${1:-}" in
  build) build ;;
  bin) build; printf '%s\n' "$BIN" ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 build | bin | start DIR | stop DIR" ;;
esac
