#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine, on 127.0.0.1: one head and N worker raylets,
# each with its own CPU count. Token authentication stays on: the token is created once (or
# reused) under the state folder, and `env` prints what a client needs.
#
#   cluster/local.sh up [--workers N] [--worker-cpus C] [--head-cpus C] [--port P]
#   cluster/local.sh status | env | down
#   eval "$(cluster/local.sh env)"     # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH for clients
#
# State (token, pids, logs) lives in $AUTOPRUNE_CLUSTER_DIR (default ~/.autoprune/local-cluster).
# Every process `up` starts runs under its own Ray temp folder, $AUTOPRUNE_CLUSTER_DIR's
# `ray` link to /tmp/apray-<port>; `down` stops exactly those processes (by recorded pid and
# by that folder in their command line), never anyone else's Ray: no `ray stop`.
set -euo pipefail

STATE=${AUTOPRUNE_CLUSTER_DIR:-$HOME/.autoprune/local-cluster}
RAY=${RAY:-$(command -v ray || true)}
WORKERS=2
WORKER_CPUS=1
HEAD_CPUS=0
PORT=6390 # the GCS port; Ray's worker ports are 10002-19999, so stay below them

die() { echo "cluster/local.sh: $*" >&2; exit 2; }

cmd=${1:-}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=${2:?--workers needs a number}; shift 2 ;;
    --worker-cpus) WORKER_CPUS=${2:?--worker-cpus needs a number}; shift 2 ;;
    --head-cpus) HEAD_CPUS=${2:?--head-cpus needs a number}; shift 2 ;;
    --port) PORT=${2:?--port needs a number}; shift 2 ;;
    *) die "unknown option '$1'; options: --workers N, --worker-cpus C, --head-cpus C, --port P" ;;
  esac
done
for v in WORKERS WORKER_CPUS HEAD_CPUS PORT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "${v,,} must be a whole number >= 0, got '${!v}'"
done
[ "$PORT" -ge 1024 ] && [ "$PORT" -lt 10002 ] || die "--port must be in 1024-10001 (Ray's worker ports start at 10002), got $PORT"

TOKEN="$STATE/auth_token"
PIDS="$STATE/pids"
INFO="$STATE/cluster"

client_env() {
  echo "export RAY_ADDRESS=127.0.0.1:$(cat "$INFO" 2>/dev/null | sed -n 's/^port=//p')"
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$TOKEN"
}

ours() { # pids of live processes this cluster started: recorded, running under its temp folder, or
  # holding files in it (Ray's agents rename themselves, ray::DashboardAgent, and outlive a killed raylet)
  local tmp
  tmp=$(sed -n 's/^tmp=//p' "$INFO" 2>/dev/null || true)
  {
    [ -f "$PIDS" ] && cat "$PIDS"
    if [ -n "$tmp" ]; then
      pgrep -f -- "$tmp" || true
      find /proc/[0-9]*/fd -maxdepth 1 -lname "$tmp/*" 2>/dev/null | cut -d/ -f3
    fi
  } | sort -un | while read -r pid; do
    # (a zombie has exited: it only waits to be reaped, which a container's pid 1 may never do)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]] && echo "$pid"
  done || true
}

start_node() { # name, then `ray start` arguments; records the blocking process and its tree
  local name=$1
  shift
  nohup "$RAY" start --block "$@" >"$STATE/logs/$name.log" 2>&1 &
  echo $! >>"$PIDS"
  echo "$name=$!" >>"$INFO"
}

up() {
  [ -n "$RAY" ] || die "no 'ray' on PATH (activate the environment autoprune is installed in)"
  if [ -n "$(ours)" ]; then
    die "a local cluster is already up ($(sed -n 's/^port=//p' "$INFO")); run 'cluster/local.sh down' first"
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT on 127.0.0.1 is taken; choose another with --port"
  fi
  mkdir -p "$STATE/logs"
  chmod 700 "$STATE"
  if [ ! -s "$TOKEN" ]; then # created once, then reused: clients keep working across up/down
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN")
  fi
  local tmp="/tmp/apray-$PORT"
  rm -rf "$tmp"
  : >"$PIDS"
  printf 'port=%s\ntmp=%s\nworkers=%s\n' "$PORT" "$tmp" "$WORKERS" >"$INFO"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"
  start_node head --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
    --temp-dir "$tmp" --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port $((PORT + 1)) \
    --ray-client-server-port $((PORT + 2)) --disable-usage-stats --dashboard-agent-listen-port $((PORT + 10)) \
    --min-worker-port 0 --max-worker-port 0
  wait_for 60 "the head" head_ready
  for i in $(seq 1 "$WORKERS"); do
    # one at a time: raylets registering all at once on a small machine can miss the GCS's
    # deadline. Several raylets on one host: each its own agent port, worker ports at random
    start_node "worker$i" --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus "$WORKER_CPUS" \
      --num-gpus 0 --temp-dir "$tmp" --disable-usage-stats --dashboard-agent-listen-port $((PORT + 10 + i)) \
      --min-worker-port 0 --max-worker-port 0
    NEED=$((i + 1)) wait_for 90 "worker $i" nodes_ready
  done
  local name pid raylet
  for name in head $(seq -f 'worker%g' 1 "$WORKERS"); do # each node's raylet and Ray node id
    pid=$(sed -n "s/^$name=//p" "$INFO")
    raylet=$(pgrep -P "$pid" -f 'raylet/raylet' | head -1 || true)
    [ -n "$raylet" ] || continue
    echo "${name}_raylet=$raylet" >>"$INFO"
    echo "${name}_node=$(tr '\0' '\n' <"/proc/$raylet/cmdline" | sed -n 's/^--node_id=//p')" >>"$INFO"
  done
  echo "local cluster up: head 127.0.0.1:$PORT ($HEAD_CPUS CPUs) + $WORKERS worker(s) x $WORKER_CPUS CPU"
  echo "dashboard (and job submission): http://127.0.0.1:$((PORT + 1)); clients: eval \"\$(cluster/local.sh env)\""
}

head_ready() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

nodes_ready() {
  local alive
  alive=$(RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" "$(dirname "$RAY")/python" - "$PORT" <<'EOF' 2>/dev/null
import sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
print("alive", sum(1 for n in ray.nodes() if n["Alive"]))
EOF
  ) || return 1
  alive=$(echo "$alive" | sed -n 's/^alive //p' | tail -1)
  [ "${alive:-0}" -ge "${NEED:-$((WORKERS + 1))}" ]
}

wait_for() { # seconds, what, check
  local deadline=$((SECONDS + $1))
  until $3; do
    if [ $SECONDS -ge $deadline ]; then
      echo "cluster/local.sh: $2 did not come up within $1 s; logs in $STATE/logs; stopping what started" >&2
      down >/dev/null
      exit 1
    fi
    sleep 1
  done
}

down() {
  local pids
  pids=$(ours)
  if [ -z "$pids" ]; then
    echo "no local cluster processes running"
  else
    # the blocking `ray start` processes first (they stop their node), then whatever is left
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
      [ -z "$(ours)" ] && break
      sleep 0.5
    done
    pids=$(ours)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    sleep 0.5
    echo "local cluster down"
  fi
  local tmp
  tmp=$(sed -n 's/^tmp=//p' "$INFO" 2>/dev/null || true)
  [ -n "$tmp" ] && [ -z "$(ours)" ] && rm -rf "$tmp"
  rm -f "$PIDS"
}

status() {
  local pids
  pids=$(ours)
  if [ -z "$pids" ]; then
    echo "local cluster: down"
    return 3
  fi
  echo "local cluster: up, $(echo "$pids" | wc -l) processes; $(grep -E '^(port|workers)=' "$INFO" | tr '\n' ' ')"
  grep -E '^(head|worker[0-9]+)=' "$INFO" | while IFS== read -r name pid; do
    if [[ -n $(ps -o stat= -p "$pid" 2>/dev/null) && $(ps -o stat= -p "$pid") != Z* ]]; then
      echo "  $name: pid $pid running"
    else
      echo "  $name: pid $pid gone"
    fi
  done
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) client_env ;;
  *) die "usage: cluster/local.sh up [--workers N] [--worker-cpus C] [--head-cpus C] [--port P] | status | env | down" ;;
esac
