#!/usr/bin/env bash
# scripts/hyper204.sh [ROUNDS] [ARGS_A] [ARGS_B] — bare hyper (examples/hyper204.rs) A/B.
#
# Alternating rounds (default 5 each) of examples/hyper204 with ARGS_A (default: none,
# a current-thread runtime) and ARGS_B (default: "timer", hyper's per-request header
# read timeout), pinned to core 0, under
#   taskset -c 1 wrk -t1 -c64 -d10s -s ../shared/bench/wrk/$MIX.lua   (MIX=event-zipf)
# Prints req/s and the server's CPU per request (/proc/PID/stat) per round, then medians.
# What hyper and tokio cost on this load, apart from anything the service adds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}; A=${2:-}; B=${3:-timer}
SHARED=${SHARED:-$(cd .. && pwd)/shared}; WRK_DIR="$SHARED/bench/wrk"; MIX=${MIX:-event-zipf}
PORT=${HYPER_PORT:-18110}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release --quiet --example hyper204
TICK=$(getconf CLK_TCK)
PID=""
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
A_CPU=(); B_CPU=(); A_RPS=(); B_RPS=()
for r in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    args=$A; [ $side = B ] && args=$B
    # shellcheck disable=SC2086
    taskset -c 0 ./target/release/examples/hyper204 "127.0.0.1:$PORT" $args & PID=$!
    sleep 0.5
    t0=$(awk '{print $14+$15}' "/proc/$PID/stat")
    out=$(cd "$WRK_DIR" && taskset -c 1 wrk -t1 -c64 -d10s -s "$MIX.lua" "http://127.0.0.1:$PORT" 2>&1)
    t1=$(awk '{print $14+$15}' "/proc/$PID/stat")
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    cpu=$(echo "scale=3; ($t1 - $t0) * 1000000 / $TICK / $n" | bc)
    echo "round $r $side (${args:-default}): rps=$rps cpu_us_per_req=$cpu"
    eval "${side}_CPU+=($cpu); ${side}_RPS+=($rps)"
  done
done
echo "median A (${A:-default}): rps=$(median "${A_RPS[@]}") cpu_us_per_req=$(median "${A_CPU[@]}")"
echo "median B (${B:-default}): rps=$(median "${B_RPS[@]}") cpu_us_per_req=$(median "${B_CPU[@]}")"
