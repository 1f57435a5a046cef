#!/usr/bin/env bash
# Two processes of tests/distributed_script.py on this machine, with 2 CPU devices
# each: one global mesh of 4 devices. Run from the repository root:
#     bash tests/distributed_launch.sh [PORT [OUT]]
# PORT: a free TCP port for the coordinator (process 0); OUT: the folder for the
# results. tests/test_distributed.py runs this file; docs/scaling.md shows it.
set -euo pipefail
PORT="${1:-47311}"
OUT="${2:-distributed-results}"
PYTHON="${PYTHON:-python}"

$PYTHON tests/distributed_script.py --coordinator "localhost:$PORT" --processes 2 \
    --process-id 0 --out "$OUT" &
first=$!
$PYTHON tests/distributed_script.py --coordinator "localhost:$PORT" --processes 2 \
    --process-id 1 --out "$OUT"
wait "$first"
