# shellcheck shell=bash
# Shared settings and process helpers for platform/local/{up,down,env}. Sourced, never run.
#
# Everything is bound to 127.0.0.1; AUNET_BIND_HOST opens the dashboard and MLflow only (Ray's
# own ports stay on loopback). Processes are tracked by recorded pid + start time (not by name),
# because `ray stop` / `pkill ray` would also kill Ray processes that other users or test
# sessions started on the same machine.

set -euo pipefail

AUNET_PLATFORM_DIR="${AUNET_PLATFORM_DIR:-$PWD/.platform}"
mkdir -p "$AUNET_PLATFORM_DIR"
STATE_DIR="$(cd "$AUNET_PLATFORM_DIR" && pwd -P)"

BIND_HOST="${AUNET_BIND_HOST:-127.0.0.1}"
RAY_GCS_PORT="${AUNET_RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${AUNET_RAY_DASHBOARD_PORT:-8265}"
RAY_CLIENT_PORT="${AUNET_RAY_CLIENT_PORT:-10001}"
RAY_AGENT_PORT="${AUNET_RAY_AGENT_PORT:-52365}"
RAY_AUTOSCALER_METRIC_PORT="${AUNET_RAY_AUTOSCALER_METRIC_PORT:-44217}"
RAY_DASHBOARD_METRIC_PORT="${AUNET_RAY_DASHBOARD_METRIC_PORT:-44227}"
MLFLOW_PORT="${AUNET_MLFLOW_PORT:-5000}"
START_TIMEOUT="${AUNET_START_TIMEOUT:-120}"
STOP_TIMEOUT="${AUNET_STOP_TIMEOUT:-30}"

# Clients connect over loopback when the services listen on every interface.
case "$BIND_HOST" in
  0.0.0.0 | :: | "") CONNECT_HOST=127.0.0.1 ;;
  *) CONNECT_HOST="$BIND_HOST" ;;
esac

DASHBOARD_URL="http://$CONNECT_HOST:$RAY_DASHBOARD_PORT"
MLFLOW_URL="http://$CONNECT_HOST:$MLFLOW_PORT"
TOKEN_FILE="$STATE_DIR/ray/auth_token"
RAY_PIDFILE="$STATE_DIR/ray/ray.pid"
MLFLOW_PIDFILE="$STATE_DIR/mlflow/mlflow.pid"
RAY_LOG="$STATE_DIR/ray/ray.log"
MLFLOW_LOG="$STATE_DIR/mlflow/mlflow.log"
# Ray's own pointer to "the current cluster" (ray._common.utils.get_default_ray_temp_dir).
RAY_CLUSTER_FILE="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray/ray_current_cluster"

die() {
  echo "error: $*" >&2
  exit 1
}

# Start time of a live, non-zombie pid ("" if gone): guards against pid reuse.
proc_start() {
  local pid="$1" stat
  stat="$(ps -o stat= -p "$pid" 2>/dev/null)" || return 0
  [[ -z "$stat" || "$stat" == Z* ]] && return 0
  ps -o lstart= -p "$pid" 2>/dev/null | tr -s ' ' || true
}

# Writes "<pid>\n<start time>" so a later pid reuse is not mistaken for our process.
record_pid() {
  local pid="$1" file="$2"
  printf '%s\n%s\n' "$pid" "$(proc_start "$pid")" >"$file"
}

# Prints the recorded pid if that exact process is still alive, nothing otherwise.
live_pid() {
  local file="$1" pid start
  [[ -f "$file" ]] || return 0
  pid="$(sed -n 1p "$file")"
  start="$(sed -n 2p "$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  [[ -n "$start" && "$(proc_start "$pid")" == "$start" ]] && echo "$pid"
  return 0
}

# Live processes of service $1 (ray or mlflow) started by this platform, wherever they were
# re-parented: spawn puts AUNET_PLATFORM_DIR=$STATE_DIR and AUNET_PLATFORM_SERVICE=$1 in the
# service's environment, and every process below it inherits both (a shell that merely exported
# AUNET_PLATFORM_DIR, like `up` itself, has no service).
service_pids() {
  local f
  {  # grep exits 1 when nothing matches: not an error here
    for f in /proc/[0-9]*/environ; do
      [[ -r "$f" ]] && echo "$f"
    done | xargs -r grep -lzxF "AUNET_PLATFORM_DIR=$STATE_DIR" 2>/dev/null |
      xargs -r grep -lzxF "AUNET_PLATFORM_SERVICE=$1" 2>/dev/null | cut -d/ -f3 | sort -un
  } || true
}

# Alive (non-zombie) processes among: the given pids, every process in session $1 (the
# setsid leader), and all their descendants. Ray workers get their own process group and
# job drivers their own session, so neither the group nor the session alone covers them.
proc_closure() {
  local sid="$1"
  shift
  ps -e -o pid=,ppid=,sid=,stat= | awk -v sid="$sid" -v known="$*" '
    BEGIN { n = split(known, k, " "); for (i = 1; i <= n; i++) K[k[i]] = 1 }
    $4 !~ /^Z/ { pid[NR] = $1; ppid[NR] = $2; s[NR] = $3; alive[$1] = 1 }
    END {
      for (i in pid) if (s[i] == sid) K[pid[i]] = 1
      do { changed = 0
           for (i in pid) if ((ppid[i] in K) && !(pid[i] in K)) { K[pid[i]] = 1; changed = 1 } }
      while (changed)
      for (p in K) if (p in alive) print p
    }'
}

# HTTP status code of a GET (000 when nothing answers). The Ray token is passed through a
# curl config on stdin so it never shows up in `ps`.
http_code() {
  local url="$1" token="${2:-}"
  if [[ -n "$token" ]]; then
    printf 'header = "Authorization: Bearer %s"\n' "$token" |
      curl -s -o /dev/null -w '%{http_code}' --max-time 3 -K - "$url" || true
  else
    curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$url" || true
  fi
}

# True if something accepts TCP connections on host:port.
port_busy() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

print_exports() {
  local gcs=""
  [[ -f "$STATE_DIR/ray/gcs_address" ]] && gcs="$(cat "$STATE_DIR/ray/gcs_address")"
  echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL"
  # RAY_ADDRESS must be the GCS address: ray.init() rejects an http:// RAY_ADDRESS, and the
  # job CLI prefers RAY_API_SERVER_ADDRESS anyway.
  [[ -n "$gcs" ]] && echo "export RAY_ADDRESS=$gcs"
  # The head's node IP is 127.0.0.1; without this, ray.init() rewrites a 127.0.0.1 address to
  # the machine's IP, where nothing listens (docs/platform.md).
  echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
  echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
}

# Processes of service $1 whose recorded leader is $2: with the leader alive ($3 non-empty), its
# tree (see proc_closure) given the ones known so far ($4...). With the leader dead (e.g. `ray
# start` failing half-way), what that service left: its session's members while the leader's pid
# has not been reused (a pid is not reused while a session bears its id), which also finds Ray's
# agents whose retitling (setproctitle) overwrote their environment, plus every process carrying
# the service's environment (service_pids), which finds those that left the session.
tree_of() {
  local name="$1" pid="$2" alive="$3" sid="-"
  shift 3
  if [[ -n "$alive" ]]; then
    proc_closure "$pid" "$@"
  else
    [[ "$pid" =~ ^[0-9]+$ && -z "$(proc_start "$pid")" ]] && sid="$pid"
    { proc_closure "$sid" "$@"; service_pids "$name"; } | sort -un
  fi
  return 0
}

# Stops the process tree of a recorded setsid leader: SIGTERM to the leader only (Ray's
# `ray start --block` then drains and stops its children in ~4 s; signalling the whole group
# at once kills the GCS first and stalls the drain for 30 s), or to the orphans of a dead
# leader, wait up to STOP_TIMEOUT for the whole tree to exit, then SIGKILL whatever is left.
# Prints how it went (on stdout).
stop_tree() {
  local name="$1" pidfile="$2" pid alive known deadline t0
  [[ -f "$pidfile" ]] || return 0
  pid="$(sed -n 1p "$pidfile")"
  alive="$(live_pid "$pidfile")"
  known=""
  if [[ -n "$alive" ]]; then
    known="$(tree_of "$name" "$pid" "$alive" "$pid" | tr '\n' ' ')"
  else  # the leader is gone (its pid may even have been reused)
    known="$(tree_of "$name" "$pid" "" | tr '\n' ' ')"
  fi
  if [[ -z "$known" ]]; then
    echo "$name: not running (removing stale $pidfile)"
    rm -f "$pidfile"
    return 0
  fi
  t0=$SECONDS
  if [[ -n "$alive" ]]; then
    kill -TERM "$pid" 2>/dev/null || true
  else
    echo "$name: leader $pid is gone, stopping what it left: $known"
    # shellcheck disable=SC2086
    kill -TERM $known 2>/dev/null || true
  fi
  deadline=$((SECONDS + STOP_TIMEOUT))
  while [[ -n "$known" && $SECONDS -lt $deadline ]]; do
    sleep 0.2
    # shellcheck disable=SC2086
    known="$(tree_of "$name" "$pid" "$alive" $known | tr '\n' ' ')"
  done
  if [[ -n "$known" ]]; then
    echo "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL to: $known"
    # shellcheck disable=SC2086
    kill -KILL $known 2>/dev/null || true
    sleep 1
    # shellcheck disable=SC2086
    known="$(tree_of "$name" "$pid" "$alive" $known | tr '\n' ' ')"
  fi
  if [[ -n "$known" ]]; then
    echo "$name: processes still alive: $known" >&2
    return 1
  fi
  rm -f "$pidfile"
  echo "$name: stopped pid $pid and its children in $((SECONDS - t0))s"
}
