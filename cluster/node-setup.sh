#!/usr/bin/env bash
# What the nodes of a cloud cluster (cluster/aws.yaml, cluster/gcp.yaml) run to set themselves
# up. The Ray autoscaler runs it inside each node's container, through `bash --login -c -i`,
# after copying this checkout to ~/autoprune and the cluster's token to ~/.ray/auth_token.
# Every step may run again (each `ray up` that changes the checkout runs them all) and ends in
# the same state.
#
#   cluster/node-setup.sh install      every node: autoprune from ~/autoprune into the Python on
#                                      PATH, and the settings every later shell gets (~/.bashrc)
#   cluster/node-setup.sh head aws|gcp the head: the cloud SDK its autoscaler needs, and the
#                                      MLflow server (left running if it already is)
#
# The head's MLflow store comes from the container's environment (the YAML's docker
# head_run_options): AUTOPRUNE_MLFLOW_BACKEND, a database URI (default: SQLite on the
# persistent disk mounted at /mnt/autoprune-mlflow), AUTOPRUNE_MLFLOW_ARTIFACTS, a folder or a
# bucket URI (default: that disk), AUTOPRUNE_MLFLOW_PORT (default 5000). A SQLite file or an
# artifact folder on the head's own disk is refused, since `ray down` deletes that disk with
# everything on it; AUTOPRUNE_MLFLOW_EPHEMERAL=1 accepts it for a throwaway cluster.
# Telemetry: Ray's usage stats and MLflow's telemetry stay off unless AUTOPRUNE_TELEMETRY=on.
set -euo pipefail

SRC=${AUTOPRUNE_SRC:-$HOME/autoprune}
VOLUME=/mnt/autoprune-mlflow
PYTHON=$(command -v python3 || command -v python || true)
MARK_BEGIN="# >>> autoprune (cluster/node-setup.sh) >>>"
MARK_END="# <<< autoprune (cluster/node-setup.sh) <<<"

die() { echo "cluster/node-setup.sh: $*" >&2; exit 2; }

pip_install() { # what to install; pinned to the versions the test suite passed with, when known
  local constraints=()
  [ -f "$SRC/.ci/constraints.txt" ] && constraints=(-c "$SRC/.ci/constraints.txt")
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "${constraints[@]}" "$@"
}

shell_settings() { # the block ~/.bashrc gets: this Python first on PATH, token auth, no telemetry
  local bin
  bin=$(dirname "$PYTHON")
  echo "$MARK_BEGIN"
  echo "case \":\$PATH:\" in *\":$bin:\"*) ;; *) export PATH=\"$bin:\$PATH\" ;; esac"
  echo 'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$HOME/.ray/auth_token"'
  local telemetry=${AUTOPRUNE_TELEMETRY:-}
  case "${telemetry,,}" in
    1 | on | true | yes) ;;
    *) echo 'export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true' ;;
  esac
  echo "$MARK_END"
}

setup_node() {
  [ -n "$PYTHON" ] || die "no python3 on PATH"
  [ -f "$SRC/pyproject.toml" ] || die "no checkout at $SRC (the config's file_mounts copy it there)"
  [ -s "$HOME/.ray/auth_token" ] || die "no token at ~/.ray/auth_token (the config's file_mounts copy it there)"
  chmod 600 "$HOME/.ray/auth_token"
  pip_install "$SRC"
  # the block is replaced, never appended twice
  touch "$HOME/.bashrc"
  sed -i "\|^$MARK_BEGIN\$|,\|^$MARK_END\$|d" "$HOME/.bashrc"
  shell_settings >>"$HOME/.bashrc"
  echo "autoprune installed into $PYTHON; shell settings in ~/.bashrc"
}

on_own_disk() { # true when a path would live on the same filesystem as this node's home
  local dir=$1
  while [ ! -e "$dir" ]; do dir=$(dirname "$dir"); done
  [ "$(stat -c %d "$dir")" = "$(stat -c %d "$HOME")" ]
}

check_outlives_head() { # backend URI, artifacts: refuse what `ray down` would delete
  local backend=$1 artifacts=$2 path
  [ "${AUTOPRUNE_MLFLOW_EPHEMERAL:-0}" = 1 ] && return 0
  for path in "${backend#sqlite://}" "$artifacts"; do
    case "$path" in *://*) continue ;; esac
    if on_own_disk "$path"; then
      die "MLflow would keep $path on the head's own disk, which 'ray down' deletes: mount the" \
        "persistent disk at $VOLUME (see the top of the cluster's YAML), or set AUTOPRUNE_MLFLOW_BACKEND" \
        "to a database server and AUTOPRUNE_MLFLOW_ARTIFACTS to a bucket (AUTOPRUNE_MLFLOW_EPHEMERAL=1 accepts it)"
    fi
  done
}

setup_head() { # aws|gcp
  local cloud=${1:-} packages
  case "$cloud" in
    aws) packages=(boto3) ;;                                            # the autoscaler; s3:// artifacts
    gcp) packages=(google-api-python-client google-cloud-storage) ;;  # the autoscaler; gs:// artifacts
    *) die "head needs the cloud: aws or gcp, got '$cloud'" ;;
  esac
  local backend=${AUTOPRUNE_MLFLOW_BACKEND:-sqlite:///$VOLUME/mlflow.db}
  local artifacts=${AUTOPRUNE_MLFLOW_ARTIFACTS:-$VOLUME/artifacts}
  check_outlives_head "$backend" "$artifacts"
  pip_install "${packages[@]}"
  MLFLOW="$PYTHON -m mlflow" bash "$SRC/cluster/mlflow-server.sh" start --backend "$backend" \
    --artifacts "$artifacts" --port "${AUTOPRUNE_MLFLOW_PORT:-5000}"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  install) [ $# -eq 0 ] || die "install takes no options, got '$*'"; setup_node ;;
  head) [ $# -eq 1 ] || die "usage: cluster/node-setup.sh head aws|gcp"; setup_head "$1" ;;
  *) die "usage: cluster/node-setup.sh install | head aws|gcp" ;;
esac
