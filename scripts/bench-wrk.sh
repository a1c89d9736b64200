#!/usr/bin/env bash
# scripts/bench-wrk.sh — end-to-end throughput with the shared wrk load.
#
# Starts a throw-away PostgreSQL (../shared/bench/pg-up.sh) with the 500
# fixture campaigns, the release service, both pinned to core 0, and runs
#   taskset -c 1 wrk -t1 -c$CONNS -d$DURATION --latency -s $WRK_SCRIPT
# (MIX=zipf, the default: event-zipf.lua; MIX=uniform: event.lua; UA=browser adds
# realistic User-Agent headers, scripts/wrk/with-ua.lua)
# against it. Then it stops the service with SIGTERM (drain), and prints wrk's
# RESULT line, the 2xx count, the rows in `events`, and the server's /health
# latency just before shutdown. All load goes to 127.0.0.1 and is time-bounded.
#
# Usage: scripts/bench-wrk.sh [ROUNDS]     env: CONNS=64 DURATION=10s PORT=18081
#        SERVICE_ENV="FLUSH_MAX_EVENTS=50000 ..." extra service settings
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
CONNS=${CONNS:-64}
DURATION=${DURATION:-10s}
PORT=${PORT:-18081}
PGPORT=${BENCH_PGPORT:-55499}
SHARED=${SHARED:-$(cd .. && pwd)/shared}
BENCH="$SHARED/bench"
[ -f "$BENCH/wrk/event.lua" ] || { echo "shared bench not found at $BENCH (set SHARED=...)" >&2; exit 1; }
. scripts/lib.sh
wrk_script
pg_ensure_installed

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ingest-bench.XXXXXX"); chmod 755 "$WORK"
SVC_PID=""
cleanup() {
  [ -n "$SVC_PID" ] && kill "$SVC_PID" 2>/dev/null || true
  "$BENCH/pg-down.sh" "$WORK/pg" --purge >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

bench_db "$WORK" "$PGPORT"

for round in $(seq 1 "$ROUNDS"); do
  PSQL -c "TRUNCATE events, metrics_hourly, rejected_events" >/dev/null
  env PORT=$PORT HOST=127.0.0.1 WORKER_THREADS=${WORKER_THREADS:-1} LOG_LEVEL=warn ${SERVICE_ENV:-} \
    taskset -c 0 ./target/release/ingest 2>"$WORK/service.log" &
  SVC_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  CPU0=$(awk '{print $14+$15}' "/proc/$SVC_PID/stat")
  OUT=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$WRK_SCRIPT" "http://127.0.0.1:$PORT" 2>&1)
  CPU1=$(awk '{print $14+$15}' "/proc/$SVC_PID/stat")
  RSS=$(awk '/VmRSS/{print $2}' "/proc/$SVC_PID/status")
  HEALTH=$(curl -s "http://127.0.0.1:$PORT/health")
  START=$(date +%s.%N)
  kill -TERM "$SVC_PID"; wait "$SVC_PID" || true; SVC_PID=""
  DRAIN=$(echo "$(date +%s.%N) - $START" | bc)
  RESULT=$(echo "$OUT" | grep ^RESULT)
  REQS=$(echo "$RESULT" | sed -E 's/.* requests=([0-9]+).*/\1/')
  NON2XX=$(echo "$RESULT" | sed -E 's/.* non2xx=([0-9]+).*/\1/')
  ROWS=$(PSQL -Atc "SELECT count(*) FROM events")
  AGG=$(PSQL -Atc "SELECT coalesce(sum(impressions + clicks), 0) FROM metrics_hourly")
  TICKS=$(getconf CLK_TCK)
  CPU_US=$(echo "scale=1; ($CPU1 - $CPU0) * 1000000 / $TICKS / $ROWS" | bc)
  echo "round $round: $RESULT"
  echo "round $round: 2xx=$((REQS - NON2XX)) events_rows=$ROWS metrics_sum=$AGG service_cpu_us_per_event=$CPU_US rss_kib=$RSS drain_s=$DRAIN"
  echo "round $round: server latency POST /event/impression: $(echo "$HEALTH" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["latency_us"]["POST /event/impression"])')"
  grep -iE "error|warn" "$WORK/service.log" | head -5 || true
done
