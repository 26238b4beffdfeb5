#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine, on 127.0.0.1: one head and N worker raylets,
# each with its own CPU count. Token authentication stays on: the token is created once (or
# reused) under the state folder, and `env` prints what a client needs.
#
#   cluster/local.sh up [--workers N] [--worker-cpus C] [--head-cpus C] [--port P]
#   cluster/local.sh status | env | down
#   eval "$(cluster/local.sh env)"     # what a client needs: address, token, loopback setting
#
# Every server of the cluster listens on 127.0.0.1 only (see LOOPBACK below). Ports: P the GCS,
# P+1 the dashboard (and job submission), P+2 the Ray Client server, P+10 the head's dashboard
# agent and P+10+i worker i's; every other port is a free one Ray picks, on 127.0.0.1 too.
# `up` checks the fixed ports before it starts anything.
#
# State (token, pids, logs) lives in $AUTOPRUNE_CLUSTER_DIR (default ~/.autoprune/local-cluster).
# Each node's `ray start` runs in a session of its own, whose id (the recorded pid) every
# process of the node inherits, the agents Ray renames and those outliving a killed raylet
# included. `down` stops this user's processes of those sessions and nothing else (no
# `ray stop`), keeps Ray's logs under $AUTOPRUNE_CLUSTER_DIR/logs/ray-<time>, and removes the
# Ray temp folder, /tmp/apray-<port>. Ctrl-C or SIGTERM during `up` stops what it started.
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
PIDS="$STATE/pids"    # one line per node: the pid of its `ray start`, the id of the node's session
INFO="$STATE/cluster" # port, temp folder, boot id; each node's pid, its start time, raylet, node id
PY=$(dirname "${RAY:-.}")/python # the Python that `ray` runs with
[ -x "$PY" ] || PY=python3

# LOOPBACK. Ray binds every server (GCS, raylets, workers and drivers, dashboard agents and
# their metrics exporters, runtime-env agents, the autoscaler's and dashboard's metrics, Ray
# Client) to 127.0.0.1 when the node's address is 127.0.0.1, and to all interfaces otherwise.
# `ray start --node-ip-address 127.0.0.1` would replace 127.0.0.1 by the host's address, unless
# Ray's multi-node switch is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); off, every Ray process
# (they inherit it) keeps 127.0.0.1, and a client must have it too (`env` prints it). The
# autoscaler's and dashboard's metrics servers take a free port, not their fixed 44217 and
# 44227, which another Ray on this machine may hold.
LOOPBACK=(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 AUTOSCALER_METRIC_PORT=0 DASHBOARD_METRIC_PORT=0)
# On SIGTERM a node stops at once, rather than first draining for up to 30 s (for Ray Serve)
NO_DRAIN=RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

# `ray start` in a session of its own. With the multi-node switch off, `ray start --address`
# also refuses to start a worker node, so this one process turns the switch back on for itself
# and keeps its node's address 127.0.0.1 by hand; the processes it starts inherit the switch
# off. The two Ray internals it sets are checked to exist: after a Ray upgrade that renames
# them the node fails to start, naming the missing one, rather than binding all interfaces.
LAUNCH='import os, sys
os.setsid()
from ray._private import ray_constants, services
from ray.scripts.scripts import main
getattr(ray_constants, "ENABLE_RAY_CLUSTER"), getattr(services, "get_node_ip_address")
ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
sys.argv[0] = "ray"
main()'

client_env() {
  echo "export RAY_ADDRESS=127.0.0.1:$(sed -n 's/^port=//p' "$INFO" 2>/dev/null)"
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$TOKEN"
  echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" # see LOOPBACK
}

started() { # a process's start time, in clock ticks since boot (field 22 of /proc/PID/stat)
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  set -- $stat
  echo "${20}"
}

ours() { # this user's live processes that `up` started: the recorded `ray start` processes and
  # every process of their sessions. Linux frees a session id only once every process of the
  # session is gone, so a member of a recorded session is ours; a live process under a recorded
  # pid but with another start time (or after a reboot) took a freed pid and is not.
  [ -s "$PIDS" ] || return 0
  [ "$(sed -n 's/^boot=//p' "$INFO" 2>/dev/null)" = "$(cat /proc/sys/kernel/random/boot_id)" ] || return 0
  local sids=" " pid
  while read -r pid; do
    if [ -e "/proc/$pid" ] && [ "$(started "$pid")" != "$(sed -n "s/^started_$pid=//p" "$INFO")" ]; then continue; fi
    sids+="$pid "
  done <"$PIDS"
  # (a zombie has exited: it only waits to be reaped, which a container's pid 1 may never do)
  ps -e -o pid=,sid=,uid=,stat= | awk -v uid="$(id -u)" -v sids="$sids" \
    '$3 == uid && $4 !~ /^Z/ && (index(sids, " " $1 " ") || index(sids, " " $2 " ")) { print $1 }'
}

start_node() { # name, then `ray start` arguments; records the node's `ray start` process
  local name=$1
  shift
  nohup "$PY" -c "$LAUNCH" start --block "$@" >"$STATE/logs/$name.log" 2>&1 &
  echo "$!" >>"$PIDS"
  printf '%s=%s\nstarted_%s=%s\n' "$name" "$!" "$!" "$(started $!)" >>"$INFO"
  disown "$!" # `down` stops it, not this shell: no job-status line when it goes
  stop_if_interrupted
}

check_ports() { # every fixed port `up` binds is free on 127.0.0.1, before anything starts
  local -A role=([$PORT]="the GCS (--port)" [$((PORT + 1))]="the dashboard (--port + 1)"
    [$((PORT + 2))]="the Ray Client server (--port + 2)" [$((PORT + 10))]="the head's dashboard agent (--port + 10)")
  local i taken
  for i in $(seq 1 "$WORKERS"); do role[$((PORT + 10 + i))]="worker $i's dashboard agent (--port + $((10 + i)))"; done
  taken=$("$PY" - "${!role[@]}" <<'EOF'
import socket, sys
for port in sorted(map(int, sys.argv[1:])):
    with socket.socket() as s:  # as Ray's servers bind: SO_REUSEADDR, on 127.0.0.1
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            print(port)
            break
EOF
  )
  [ -z "$taken" ] || die "port $taken on 127.0.0.1, for ${role[$taken]}, is taken; choose another --port"
}

up() {
  [ -n "$RAY" ] || die "no 'ray' on PATH (activate the environment autoprune is installed in)"
  if [ -n "$(ours)" ]; then
    die "a local cluster is already up ($(sed -n 's/^port=//p' "$INFO")); run 'cluster/local.sh down' first"
  fi
  check_ports
  mkdir -p "$STATE/logs"
  chmod 700 "$STATE"
  if [ ! -s "$TOKEN" ]; then # created once, then reused: clients keep working across up/down
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN")
  fi
  keep_logs >/dev/null # an earlier cluster's, if its `down` never ran
  local tmp="/tmp/apray-$PORT"
  rm -rf "$tmp"
  : >"$PIDS"
  printf 'port=%s\ntmp=%s\nworkers=%s\nboot=%s\n' "$PORT" "$tmp" "$WORKERS" "$(cat /proc/sys/kernel/random/boot_id)" >"$INFO"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" "${LOOPBACK[@]}" "$NO_DRAIN"
  trap 'STOPPING=INT' INT
  trap 'STOPPING=TERM' TERM
  start_node head --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
    --temp-dir "$tmp" --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port $((PORT + 1)) \
    --ray-client-server-port $((PORT + 2)) --disable-usage-stats --dashboard-agent-listen-port $((PORT + 10)) \
    --min-worker-port 0 --max-worker-port 0
  wait_for 120 head head_ready
  for i in $(seq 1 "$WORKERS"); do
    # one at a time: raylets registering all at once on a small machine can miss the GCS's
    # deadline. Several raylets on one host: each its own agent port, worker ports at random
    start_node "worker$i" --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus "$WORKER_CPUS" \
      --num-gpus 0 --temp-dir "$tmp" --disable-usage-stats --dashboard-agent-listen-port $((PORT + 10 + i)) \
      --min-worker-port 0 --max-worker-port 0
    NEED=$((i + 1)) wait_for 90 "worker$i" nodes_ready
  done
  local name pid raylet
  for name in head $(seq -f 'worker%g' 1 "$WORKERS"); do # each node's raylet and Ray node id
    pid=$(sed -n "s/^$name=//p" "$INFO")
    raylet=$(pgrep -P "$pid" -f 'raylet/raylet' | head -1 || true)
    [ -n "$raylet" ] || continue
    echo "${name}_raylet=$raylet" >>"$INFO"
    echo "${name}_node=$(tr '\0' '\n' <"/proc/$raylet/cmdline" | sed -n 's/^--node_id=//p')" >>"$INFO"
  done
  stop_if_interrupted
  trap - INT TERM
  echo "local cluster up: head 127.0.0.1:$PORT ($HEAD_CPUS CPUs) + $WORKERS worker(s) x $WORKER_CPUS CPU"
  echo "dashboard (and job submission): http://127.0.0.1:$((PORT + 1)); clients: eval \"\$(cluster/local.sh env)\""
}

head_ready() { grep -q "Ray runtime started" "$STATE/logs/head.log"; }

nodes_ready() {
  local alive
  alive=$("$PY" - "$PORT" <<'EOF' 2>/dev/null
import sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
print("alive", sum(1 for n in ray.nodes() if n["Alive"]))
EOF
  ) || return 1
  alive=$(echo "$alive" | sed -n 's/^alive //p' | tail -1)
  [ "${alive:-0}" -ge "${NEED:-$((WORKERS + 1))}" ]
}

wait_for() { # seconds, node name, check: until the check passes; else stops all and exits
  local deadline=$((SECONDS + $1)) pid why=""
  pid=$(sed -n "s/^$2=//p" "$INFO")
  until $3; do
    stop_if_interrupted
    if [[ ! $(ps -o stat= -p "$pid" 2>/dev/null) =~ ^[^Z] ]]; then
      why="its 'ray start' exited: $(grep -v '^[[:space:]]*$' "$STATE/logs/$2.log" | tail -1)"
    elif [ $SECONDS -ge $deadline ]; then
      why="did not come up within $1 s"
    fi
    if [ -n "$why" ]; then
      down >/dev/null
      echo "cluster/local.sh: $2 $why; stopped what had started; logs in $KEPT" >&2
      exit 1
    fi
    sleep 1
  done
}

stop_if_interrupted() { # after Ctrl-C or SIGTERM during `up`: stop what started, then exit
  [ -n "${STOPPING:-}" ] || return 0
  down >/dev/null
  echo "cluster/local.sh: interrupted (SIG$STOPPING); stopped what had started; logs in $KEPT" >&2
  [ "$STOPPING" = INT ] && exit 130
  exit 143
}

KEPT=""
keep_logs() { # once nothing of the cluster runs: its logs to $STATE/logs/ray-<time>, then its temp folder goes
  local tmp logs
  tmp=$(sed -n 's/^tmp=//p' "$INFO" 2>/dev/null || true)
  [ -z "$(ours)" ] || return 0
  compgen -G "$STATE/logs/*.log" >/dev/null || [ -d "$tmp" ] || return 0
  KEPT="$STATE/logs/ray-$(date +%Y%m%d-%H%M%S)"
  [ ! -e "$KEPT" ] || KEPT+="-$$"
  mkdir -p "$KEPT"
  for logs in "$tmp"/session_2*/logs; do # Ray's own (one session)
    if [ -d "$logs" ]; then cp -a "$logs/." "$KEPT/"; fi
  done
  mv "$STATE"/logs/*.log "$KEPT/" 2>/dev/null || true # each node's `ray start` output
  [[ $tmp =~ ^/tmp/apray-[0-9]+$ ]] && rm -rf "$tmp"
  echo "Ray's logs: $KEPT"
}

down() {
  local pids
  pids=$(ours)
  if [ -z "$pids" ]; then
    echo "no local cluster processes running"
  else
    # TERM first (each `ray start --block` stops its node), then KILL whatever is left
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
      [ -z "$(ours)" ] && break
      sleep 0.5
    done
    pids=$(ours)
    if [ -n "$pids" ]; then
      kill -KILL $pids 2>/dev/null || true
      sleep 0.5
    fi
    echo "local cluster down"
  fi
  keep_logs
  [ -n "$(ours)" ] || rm -f "$PIDS"
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
