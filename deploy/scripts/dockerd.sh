#!/usr/bin/env bash
# Start or stop a private Docker engine (Debian's docker.io) that touches nothing of the host's:
# its own data root, exec root, pid file and unix socket, and no networking of its own (no docker0
# bridge, no iptables/NAT rules). Containers can only use `network_mode: host` or none.
#
# usage: dockerd.sh start RUN_DIR DATA_ROOT   (prints the DOCKER_HOST to use)
#        dockerd.sh stop RUN_DIR
set -euo pipefail
cmd=${1:?start|stop}
run_dir=${2:?RUN_DIR}

case "$cmd" in
start)
  data_root=${3:?DATA_ROOT}
  mkdir -p "$run_dir" "$data_root"
  command -v dockerd >/dev/null || { echo "dockerd.sh: dockerd not found (apt-get install docker.io)" >&2; exit 1; }
  dockerd \
    --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
    --data-root "$data_root" \
    --exec-root "$run_dir/exec" \
    --pidfile "$run_dir/dockerd.pid" \
    --host "unix://$run_dir/docker.sock" \
    > "$run_dir/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do
    if /usr/bin/docker -H "unix://$run_dir/docker.sock" version >/dev/null 2>&1; then
      echo "unix://$run_dir/docker.sock"
      exit 0
    fi
    sleep 0.5
  done
  echo "dockerd.sh: dockerd did not come up; last log lines:" >&2
  tail -n 20 "$run_dir/dockerd.log" >&2
  exit 1
  ;;
stop)
  pidfile="$run_dir/dockerd.pid"
  [ -s "$pidfile" ] || exit 0
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || exit 0
  # dockerd stops its containers and its containerd before it exits.
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || exit 0
    sleep 0.5
  done
  echo "dockerd.sh: dockerd $pid did not stop in 30 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  ;;
*)
  echo "usage: $0 start RUN_DIR DATA_ROOT | stop RUN_DIR" >&2
  exit 2
  ;;
esac
