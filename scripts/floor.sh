#!/usr/bin/env bash
# scripts/floor.sh [ROUNDS] — the service against a do-nothing HTTP floor, in one run.
#
# Alternating rounds (floor, service, floor, service, ...; default 3 each) with the same
#   taskset -c 1 wrk -t1 -c$CONNS -d$DURATION --latency -s $WRK_SCRIPT
# where MIX=zipf (default: event-zipf.lua, the production-like key mix) or MIX=uniform
# (event.lua, every event a new hourly key: the worst case for the upsert), and UA=none
# (default: the shared script's requests, which carry no User-Agent) or UA=browser
# (scripts/wrk/with-ua.lua: a realistic browser and bot mix; see scripts/lib.sh).
# The floor is nginx answering 204 (../shared/bench/nginx204.sh); the service runs with a
# throw-away PostgreSQL holding the fixture campaigns. The floor, the service and PostgreSQL
# are all pinned to core 0, wrk to core 1 (../shared/bench/README.md).
# Per round it prints req/s, client p50/p99, server CPU per request (floor: nginx; service:
# the service process, and the service plus PostgreSQL per committed event, measured until
# every event is committed), rows/s landed in PostgreSQL, whether every 2xx landed, the
# server-side p99 from /health and the service's RSS; then medians and the service/floor ratios.
# ALT_ENV="ACK_MODE=durable" (say) adds a second service round per round with those settings
# on top of SERVICE_ENV, and prints its medians and its ratios to the floor and to the service.
# ALT_BIN=/path/to/ingest runs the alt rounds with another build (an A/B of a code change).
# EVENT_ID=1 adds a fresh event_id to every request (scripts/wrk/with-id.lua).
# env: CONNS=64 DURATION=10s SERVICE_ENV="..." ALT_ENV="..." PG_NICE=0 (nice value for PostgreSQL, see README)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
CONNS=${CONNS:-64}; DURATION=${DURATION:-10s}
FPORT=${FLOOR_PORT:-18090}; SPORT=${SERVICE_PORT:-18091}; PGPORT=${BENCH_PGPORT:-55497}
SHARED=${SHARED:-$(cd .. && pwd)/shared}; BENCH="$SHARED/bench"
. scripts/lib.sh
pg_ensure_installed
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ingest-floor.XXXXXX"); chmod 755 "$WORK"
SVC_PID=""
cleanup() {
  [ -n "$SVC_PID" ] && kill -9 "$SVC_PID" 2>/dev/null || true
  NGINX204_STATE="$WORK" "$BENCH/nginx204-stop.sh" "$FPORT" >/dev/null 2>&1 || true
  "$BENCH/pg-down.sh" "$WORK/pg" --purge >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
bench_db "$WORK" "$PGPORT"
NGINX_PID=$(NGINX204_STATE="$WORK" PIN_CPU=0 "$BENCH/nginx204.sh" "$FPORT" 2>/dev/null)
PG_PID=$(head -1 "$WORK/pg/data/postmaster.pid")
if [ "${PG_NICE:-0}" != 0 ]; then
  # Backends fork from the postmaster: they inherit its nice value and, with
  # kernel.sched_autogroup_enabled=1, its autogroup, whose nice is what weighs
  # PostgreSQL against the service (a plain renice only orders threads inside a group).
  renice -n "$PG_NICE" -p "$PG_PID" $(pgrep -P "$PG_PID") >/dev/null
  [ -w "/proc/$PG_PID/autogroup" ] && echo "$PG_NICE" > "/proc/$PG_PID/autogroup" || true
fi
TICK=$(getconf CLK_TCK)

# CPU ticks of a process, its live children, and its reaped children.
tree_ticks() {
  local p=$1 total
  total=$(awk '{print $14+$15+$16+$17}' "/proc/$p/stat")
  for c in $(pgrep -P "$p"); do total=$((total + $(awk '{print $14+$15}' "/proc/$c/stat" 2>/dev/null || echo 0))); done
  echo "$total"
}
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# CPU ticks of the threads of process $1 named $2 (ingest-worker, ingest-writer).
thread_ticks() {
  local t total=0
  for t in /proc/"$1"/task/*; do
    [ "$(cat "$t/comm" 2>/dev/null)" = "$2" ] && total=$((total + $(awk '{print $14+$15}' "$t/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }
res() { echo "$1" | sed -E "s/.* $2=([0-9]+).*/\1/"; }
wrk_script
run_wrk() { taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$WRK_SCRIPT" "http://127.0.0.1:$1" 2>&1 | grep ^RESULT; }
DUR_S=$(echo "$DURATION" | sed 's/s$//')

# One service round with extra settings $2 (label $1); appends to the arrays named by prefix $3.
service_round() {
  local label=$1 extra=$2 pre=$3 bin=./target/release/ingest
  if [ "$pre" = A ] && [ -n "${ALT_BIN:-}" ]; then bin=$ALT_BIN; fi
  PSQL -c "TRUNCATE events, metrics_hourly, rejected_events, ingest_batches, event_ids" >/dev/null
  env PORT=$SPORT HOST=127.0.0.1 WORKER_THREADS=1 LOG_LEVEL=warn SPOOL_DIR="$WORK/spool" ${SERVICE_ENV:-} $extra \
    taskset -c 0 "$bin" 2>>"$WORK/service.log" &
  SVC_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$SPORT/health" >/dev/null && break; sleep 0.1; done
  local S0 P0 S1 P1 R RSS H ROWS N BAD SCPU SPCPU RS SP99
  S0=$(ticks "$SVC_PID"); P0=$(tree_ticks "$PG_PID")
  local W0 WR0 W1 WR1
  W0=$(thread_ticks "$SVC_PID" ingest-worker); WR0=$(thread_ticks "$SVC_PID" ingest-writer)
  R=$(run_wrk "$SPORT")
  RSS=$(awk '/VmRSS/{print $2}' "/proc/$SVC_PID/status")
  for _ in $(seq 1 300); do [ "$(curl -s "http://127.0.0.1:$SPORT/health" | field '["pipeline"]["buffered"]')" = 0 ] && break; sleep 0.1; done
  S1=$(ticks "$SVC_PID"); P1=$(tree_ticks "$PG_PID")
  W1=$(thread_ticks "$SVC_PID" ingest-worker); WR1=$(thread_ticks "$SVC_PID" ingest-writer)
  H=$(curl -s "http://127.0.0.1:$SPORT/health")
  kill -TERM "$SVC_PID"; wait "$SVC_PID" || true; SVC_PID=""
  ROWS=$(PSQL -Atc "SELECT count(*) FROM events")
  N=$(res "$R" requests); BAD=$(res "$R" non2xx)
  SCPU=$(echo "scale=2; ($S1 - $S0) * 1000000 / $TICK / $ROWS" | bc)
  SPCPU=$(echo "scale=2; ($S1 - $S0 + $P1 - $P0) * 1000000 / $TICK / $ROWS" | bc)
  RS=$(echo "$ROWS / $DUR_S" | bc)
  local WCPU WRCPU
  WCPU=$(echo "scale=2; ($W1 - $W0) * 1000000 / $TICK / $ROWS" | bc)
  WRCPU=$(echo "scale=2; ($WR1 - $WR0) * 1000000 / $TICK / $ROWS" | bc)
  SP99=$(echo "$H" | field '["latency_us"]["POST /event/impression"]["p99_us"]')
  eval "${pre}_RPS+=(\"$(res "$R" rps)\"); ${pre}_CPU+=(\"$SCPU\"); ${pre}P_CPU+=(\"$SPCPU\"); ${pre}_P99+=(\"$(res "$R" p99_us)\"); ${pre}_P50+=(\"$(res "$R" p50_us)\"); ${pre}_ROWS+=(\"$RS\")"
  echo "round $r $label: $R cpu_us_per_event=$SCPU (request threads $WCPU, write thread $WRCPU) with_pg_cpu_us_per_event=$SPCPU rows=$ROWS rows_per_s=$RS 2xx=$((N - BAD)) server_p99_us=$SP99 rss_kib=$RSS flush_age_ms=$(echo "$H" | field '["pipeline"]["last_flush_age_ms"]')"
}

F_RPS=(); F_CPU=(); F_P99=(); S_RPS=(); S_CPU=(); SP_CPU=(); S_P99=(); S_P50=(); S_ROWS=(); A_RPS=(); A_CPU=(); AP_CPU=(); A_P99=(); A_P50=(); A_ROWS=()
for r in $(seq 1 "$ROUNDS"); do
  # floor
  C0=$(tree_ticks "$NGINX_PID"); R=$(run_wrk "$FPORT"); C1=$(tree_ticks "$NGINX_PID")
  N=$(res "$R" requests)
  FCPU=$(echo "scale=2; ($C1 - $C0) * 1000000 / $TICK / $N" | bc)
  F_RPS+=("$(res "$R" rps)"); F_CPU+=("$FCPU"); F_P99+=("$(res "$R" p99_us)")
  echo "round $r floor:   $R cpu_us_per_req=$FCPU"

  service_round service "" S
  if [ -n "${ALT_ENV:-}${ALT_BIN:-}" ]; then service_round "alt (${ALT_BIN:-} ${ALT_ENV:-})" "${ALT_ENV:-}" A; fi
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
FR=$(median "${F_RPS[@]}"); SR=$(median "${S_RPS[@]}"); FC=$(median "${F_CPU[@]}"); SC=$(median "${S_CPU[@]}"); SPC=$(median "${SP_CPU[@]}")
echo "median floor:   rps=$FR p99_us=$(median "${F_P99[@]}") cpu_us_per_req=$FC"
echo "median service: rps=$SR p50_us=$(median "${S_P50[@]}") p99_us=$(median "${S_P99[@]}") cpu_us_per_event=$SC with_pg=$SPC rows_per_s=$(median "${S_ROWS[@]}")"
echo "ratios service/floor: rps=$(echo "scale=3; $SR / $FR" | bc) cpu=$(echo "scale=3; $SC / $FC" | bc) cpu_with_pg=$(echo "scale=3; $SPC / $FC" | bc)"
if [ -n "${ALT_ENV:-}${ALT_BIN:-}" ]; then
  AR=$(median "${A_RPS[@]}"); AC=$(median "${A_CPU[@]}"); APC=$(median "${AP_CPU[@]}")
  echo "median alt (${ALT_BIN:-} ${ALT_ENV:-}): rps=$AR p50_us=$(median "${A_P50[@]}") p99_us=$(median "${A_P99[@]}") cpu_us_per_event=$AC with_pg=$APC rows_per_s=$(median "${A_ROWS[@]}")"
  echo "ratios alt/floor: rps=$(echo "scale=3; $AR / $FR" | bc) cpu=$(echo "scale=3; $AC / $FC" | bc) cpu_with_pg=$(echo "scale=3; $APC / $FC" | bc)"
  echo "ratios alt/service: rps=$(echo "scale=3; $AR / $SR" | bc) cpu=$(echo "scale=3; $AC / $SC" | bc) cpu_with_pg=$(echo "scale=3; $APC / $SPC" | bc)"
fi
