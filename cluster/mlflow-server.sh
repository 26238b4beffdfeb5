#!/usr/bin/env bash
# The MLflow tracking server of a cluster: a database backend and an artifact root, on the head.
#
#   cluster/mlflow-server.sh start [--backend URI] [--artifacts DIR|URI] [--host 127.0.0.1] [--port 5000]
#                                  [--allowed-hosts HOSTS]
#   cluster/mlflow-server.sh restart [the same options] | status | stop
#
# It binds to 127.0.0.1 unless --host says otherwise. The search driver is the only writer
# (`autoprune search --tracking-uri http://127.0.0.1:5000` on the head); people reach the UI
# through an SSH tunnel. Binding another host exposes an unauthenticated server: put it behind
# a proxy with authentication, or MLflow's basic auth (`--app-name basic-auth` via
# MLFLOW_SERVER_EXTRA), and list the names clients use in --allowed-hosts (MLflow 3 answers
# 403 to any other Host header).
#
# `start` may run again (a cluster's setup commands run on every `ray up`): a server already
# running with the same settings is left as it is; one running with other settings is an
# error, and `restart` applies them. MLflow's usage telemetry is off
# (MLFLOW_DISABLE_TELEMETRY=true) unless AUTOPRUNE_TELEMETRY=on or MLFLOW_DISABLE_TELEMETRY is
# set. MLFLOW names the command that runs MLflow (default: `mlflow` on PATH), e.g.
# MLFLOW="python3 -m mlflow" for a given interpreter.
set -euo pipefail

STATE=${AUTOPRUNE_MLFLOW_DIR:-$HOME/.autoprune/mlflow-server}
BACKEND="sqlite:///$STATE/mlflow.db"
ARTIFACTS="$STATE/artifacts"
HOST=127.0.0.1
PORT=5000
ALLOWED=""
MLFLOW=${MLFLOW:-$(command -v mlflow || true)}
read -r -a MLFLOW_CMD <<<"$MLFLOW"

# no usage reports unless asked for, as `import autoprune` does
telemetry=${AUTOPRUNE_TELEMETRY:-}
case "${telemetry,,}" in
  1 | on | true | yes) ;;
  *) export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true} ;;
esac

die() { echo "cluster/mlflow-server.sh: $*" >&2; exit 2; }

cmd=${1:-}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) BACKEND=${2:?--backend needs a database URI}; shift 2 ;;
    --artifacts) ARTIFACTS=${2:?--artifacts needs a folder or bucket URI}; shift 2 ;;
    --host) HOST=${2:?--host needs an address}; shift 2 ;;
    --port) PORT=${2:?--port needs a number}; shift 2 ;;
    --allowed-hosts) ALLOWED=${2:?--allowed-hosts needs a list}; shift 2 ;;
    *) die "unknown option '$1'; options: --backend URI, --artifacts DIR|URI, --host H, --port P, --allowed-hosts LIST" ;;
  esac
done
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
case "$BACKEND" in
  sqlite:///* | postgresql://* | postgresql+*://* | mysql://* | mysql+*://*) ;;
  *) die "--backend must be a database URI (sqlite:///PATH, postgresql://..., mysql://...), got '$BACKEND'" ;;
esac
PIDFILE="$STATE/server.pid"
SETTINGS="$STATE/server.settings" # what the running server was started with

# Read from /proc, not ps/pkill/curl: Ray's container images have neither procps nor curl.
proc_field() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f"$2"; } # after the name: 1 state, 2 parent
running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && [ "$(proc_field "$(cat "$PIDFILE")" 1)" != Z ]; }
children() { # the pids whose parent is $1
  local f
  for f in /proc/[0-9]*/stat; do
    f=${f%/stat}
    [ "$(proc_field "${f#/proc/}" 2)" = "$1" ] && echo "${f#/proc/}"
  done
  return 0
}
healthy() {
  if command -v curl >/dev/null; then
    curl -fsS "http://$HOST:$PORT/health" >/dev/null 2>&1
  else
    wget -q -O /dev/null "http://$HOST:$PORT/health" 2>/dev/null
  fi
}

start() {
  [ -n "$MLFLOW" ] || die "no 'mlflow' on PATH (activate the environment autoprune is installed in)"
  mkdir -p "$STATE"
  case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" && ARTIFACTS=$(cd "$ARTIFACTS" && pwd) ;; esac
  case "$BACKEND" in sqlite:///*) mkdir -p "$(dirname "${BACKEND#sqlite://}")" ;; esac
  local wanted="backend=$BACKEND artifacts=$ARTIFACTS host=$HOST port=$PORT allowed-hosts=$ALLOWED extra=${MLFLOW_SERVER_EXTRA:-}"
  if running; then
    if [ "$(cat "$SETTINGS" 2>/dev/null)" = "$wanted" ]; then
      echo "mlflow server already running (pid $(cat "$PIDFILE")) with these settings; left as it is"
      return 0
    fi
    die "already running (pid $(cat "$PIDFILE")) with other settings (in $SETTINGS); 'restart' applies the new ones"
  fi
  local extra=()
  [ -n "$ALLOWED" ] && extra+=(--allowed-hosts "$ALLOWED")
  # one process serving tracking and artifacts; no job-runner workers
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "${MLFLOW_CMD[@]}" server --backend-store-uri "$BACKEND" \
    --artifacts-destination "$ARTIFACTS" --serve-artifacts --host "$HOST" --port "$PORT" --workers 1 \
    "${extra[@]}" ${MLFLOW_SERVER_EXTRA:-} >"$STATE/server.log" 2>&1 &
  echo $! >"$PIDFILE"
  (umask 077 && echo "$wanted" >"$SETTINGS") # may hold a database password
  for _ in $(seq 1 60); do
    if healthy; then
      echo "mlflow server on http://$HOST:$PORT (backend ${BACKEND/:\/\/*@/://***@}, artifacts $ARTIFACTS); log $STATE/server.log"
      return 0
    fi
    running || { tail -20 "$STATE/server.log" >&2; die "the server exited; its log is above"; }
    sleep 1
  done
  stop >/dev/null
  die "the server did not answer /health within 60 s; log $STATE/server.log"
}

stop() {
  if running; then
    local pid
    pid=$(cat "$PIDFILE")
    kill -TERM $(children "$pid") 2>/dev/null || true # its gunicorn/uvicorn workers
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do running || break; sleep 0.5; done
    running && kill -KILL "$pid" 2>/dev/null || true
    echo "mlflow server stopped"
  else
    echo "mlflow server not running"
  fi
  rm -f "$PIDFILE" "$SETTINGS"
}

case "$cmd" in
  start) start ;;
  restart) stop && start ;;
  stop) stop ;;
  status) if running; then echo "mlflow server: running (pid $(cat "$PIDFILE"))"; else echo "mlflow server: stopped"; exit 3; fi ;;
  *) die "usage: cluster/mlflow-server.sh start|restart [--backend URI] [--artifacts DIR] [--host H] [--port P] | status | stop" ;;
esac
