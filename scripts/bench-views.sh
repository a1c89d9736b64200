#!/usr/bin/env bash
# scripts/bench-views.sh [ROUNDS] — does flooding the operator views slow the events?
#
# The service with a throw-away PostgreSQL (fixture campaigns), both on core 0; on core 1
#   wrk -t1 -c64 -d$DURATION -s $WRK_SCRIPT   (the events; zipf mix by default)
# and, at the same time and on the same core, a second wrk with 8 connections flooding one
# endpoint: none, /livez (the control: a cheap answer), /health, /metrics. Rounds alternate
# the four cases; per case it prints the event rate (median of ROUNDS, default 3), the flood's
# own rate, and the event rate relative to the control and to no flood.
# env: DURATION=10s MIX=zipf|uniform PORT=18083 SERVICE_ENV="VIEW_CACHE_MS=0 ..."
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${DURATION:-10s}
PORT=${PORT:-18083}; PGPORT=${BENCH_PGPORT:-55496}
SHARED=${SHARED:-$(cd .. && pwd)/shared}; BENCH="$SHARED/bench"
. scripts/lib.sh
wrk_script
pg_ensure_installed
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ingest-views.XXXXXX"); chmod 755 "$WORK"
SVC_PID=""
cleanup() {
  [ -n "$SVC_PID" ] && kill -9 "$SVC_PID" 2>/dev/null || true
  "$BENCH/pg-down.sh" "$WORK/pg" --purge >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
bench_db "$WORK" "$PGPORT"
env PORT=$PORT HOST=127.0.0.1 WORKER_THREADS=1 LOG_LEVEL=warn SPOOL_DIR="$WORK/spool" ${SERVICE_ENV:-} \
  taskset -c 0 ./target/release/ingest 2>>"$WORK/service.log" &
SVC_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
res() { echo "$1" | sed -E "s/.* $2=([0-9]+).*/\1/"; }
declare -A EV FL
for r in $(seq 1 "$ROUNDS"); do
  for target in none /livez /health /metrics; do
    if [ "$target" != none ]; then
      taskset -c 1 wrk -t1 -c8 -d"$DURATION" "http://127.0.0.1:$PORT$target" >"$WORK/flood.out" 2>&1 &
      FPID=$!
    fi
    R=$(taskset -c 1 wrk -t1 -c64 -d"$DURATION" --latency -s "$WRK_SCRIPT" "http://127.0.0.1:$PORT" 2>&1 | grep ^RESULT)
    F=0
    if [ "$target" != none ]; then
      wait "$FPID" || true
      F=$(awk '/Requests\/sec/{printf "%d", $2}' "$WORK/flood.out")
    fi
    EV[$target]="${EV[$target]:-} $(res "$R" rps)"; FL[$target]="${FL[$target]:-} $F"
    echo "round $r flood=$target events_rps=$(res "$R" rps) non2xx=$(res "$R" non2xx) p99_us=$(res "$R" p99_us) flood_rps=$F"
  done
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
NONE=$(median ${EV[none]}); CTRL=$(median ${EV[/livez]})
for target in none /livez /health /metrics; do
  E=$(median ${EV[$target]})
  echo "median flood=$target events_rps=$E flood_rps=$(median ${FL[$target]}) vs_no_flood=$(echo "scale=3; $E / $NONE" | bc) vs_livez_control=$(echo "scale=3; $E / $CTRL" | bc)"
done
echo "renders: $(curl -s "http://127.0.0.1:$PORT/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["views"]["renders"])')"
