#!/usr/bin/env bash
# Fault-tolerant DistLion on one machine (CPU, gloo): torchft's Lighthouse and 3 replica
# groups of one rank each, training launch/torchft/train.py. Kill a group's processes (kill -9)
# and the others go on; start it again (the same line with its REPLICA_GROUP_ID) and it
# rejoins with a live peer's state.
#
#   bash launch/torchft/local.sh                 # 200 steps
#   bash launch/torchft/local.sh --steps 50      # arguments go to launch/torchft/train.py
#
# Environment: DISTLION_VENV (default .venv in the repository), LIGHTHOUSE_PORT (29510),
# GROUPS_N (3), MASTER_PORT_BASE (29600: group g uses MASTER_PORT_BASE + g).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="${DISTLION_VENV:-$repo/.venv}/bin"
port="${LIGHTHOUSE_PORT:-29510}"
groups="${GROUPS_N:-3}"
base="${MASTER_PORT_BASE:-29600}"
cd "$repo"

"$bin/torchft_lighthouse" --bind "[::]:$port" --min_replicas 1 --quorum_tick_ms 100 --join_timeout_ms 10000 \
  >/dev/null 2>&1 &
lighthouse=$!
pids=()
cleanup() { kill "${pids[@]}" "$lighthouse" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

export TORCHFT_LIGHTHOUSE="http://localhost:$port" NUM_REPLICA_GROUPS="$groups" RUST_LOG="${RUST_LOG:-warn}"
for ((g = 0; g < groups; g++)); do
  REPLICA_GROUP_ID=$g "$bin/torchrun" --nnodes 1 --nproc_per_node 1 --master_port $((base + g)) \
    -m launch.torchft.train "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
