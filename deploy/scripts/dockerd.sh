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
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    if kill -TERM "$pid" 2>/dev/null; then
      # dockerd stops its containers and its containerd before it exits.
      for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
      done
      if kill -0 "$pid" 2>/dev/null; then
        echo "dockerd.sh: dockerd $pid did not stop in 30 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
  fi
  # dockerd leaves its network namespace mounted under the exec root; unmount what is left,
  # deepest first, so the run directory can be removed.
  awk -v root="$run_dir/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r \
    | while read -r mnt; do umount "$mnt" 2>/dev/null || umount -l "$mnt"; done
  ;;
*)
  echo "usage: $0 start RUN_DIR DATA_ROOT | stop RUN_DIR" >&2
  exit 2
  ;;
esac
