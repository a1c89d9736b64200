#!/usr/bin/env bash
# scripts/openloop.sh [ROUNDS] — client latency at a fixed rate: the service against the floor.
#
# The setup of scripts/floor.sh (nginx 204 floor, the service and a throw-away PostgreSQL on
# core 0; the load generator on core 1). First the floor's maximum is measured closed-loop with
#   taskset -c 1 wrk -t1 -c$CONNS -d$DURATION -s $WRK_SCRIPT
# (or RATE=N skips that); then alternating rounds (floor, service; default 3 each) send
# FRACTION (default 0.5) of that rate open-loop with examples/openloop.rs: request k is due at
# k/rate whatever happened before, and its latency counts from when it was due (no
# coordinated omission). Prints per round p50/p90/p99/p99.9/max, non-2xx, the service's rows
# against its 2xx, and the medians with the service/floor p99 ratio.
# env: MIX=zipf|uniform UA=none|browser CONNS=64 DURATION=10s SECONDS_PER_ROUND=20 WARMUP=3
#      FRACTION=0.5 RATE= SERVICE_ENV="..." PG_NICE=0 PG_CPU=0 (PostgreSQL's core)
#      ALT_BIN=/path/to/ingest (a third round per round with another build: an A/B of a change)
#      SCHED=1: `perf sched record -C 0` for 4 s in the first service round, then who preempted
#      the request thread (ingest-worker), how often and for how long until it ran again
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
CONNS=${CONNS:-64}; DURATION=${DURATION:-10s}; SECS=${SECONDS_PER_ROUND:-20}; WARMUP=${WARMUP:-3}
FRACTION=${FRACTION:-0.5}
FPORT=${FLOOR_PORT:-18097}; SPORT=${SERVICE_PORT:-18098}; PGPORT=${BENCH_PGPORT:-55503}
SHARED=${SHARED:-$(cd .. && pwd)/shared}; BENCH="$SHARED/bench"
. scripts/lib.sh
pg_ensure_installed
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ingest-openloop.XXXXXX"); chmod 755 "$WORK"
SVC_PID=""
cleanup() {
  [ -n "$SVC_PID" ] && kill -9 "$SVC_PID" 2>/dev/null || true
  NGINX204_STATE="$WORK" "$BENCH/nginx204-stop.sh" "$FPORT" >/dev/null 2>&1 || true
  "$BENCH/pg-down.sh" "$WORK/pg" --purge >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
bench_db "$WORK" "$PGPORT"
cargo build --release --quiet --example openloop
NGINX_PID=$(NGINX204_STATE="$WORK" PIN_CPU=0 "$BENCH/nginx204.sh" "$FPORT" 2>/dev/null)
PG_PID=$(head -1 "$WORK/pg/data/postmaster.pid")
if [ "${PG_NICE:-0}" != 0 ]; then
  # Backends fork from the postmaster: they inherit its nice value and, with
  # kernel.sched_autogroup_enabled=1, its autogroup, whose nice is what weighs
  # PostgreSQL against the service (a plain renice only orders threads inside a group).
  renice -n "$PG_NICE" -p "$PG_PID" $(pgrep -P "$PG_PID") >/dev/null
  [ -w "/proc/$PG_PID/autogroup" ] && echo "$PG_NICE" > "/proc/$PG_PID/autogroup" || true
fi
wrk_script
export FIXTURES="$BENCH/fixtures" MIX=${MIX:-zipf}
if [ "${UA:-none}" = browser ]; then
  export UA="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
else
  unset UA
fi
TICK=$(getconf CLK_TCK)
tree_ticks() {
  local p=$1 total
  total=$(awk '{print $14+$15+$16+$17}' "/proc/$p/stat")
  for c in $(pgrep -P "$p"); do total=$((total + $(awk '{print $14+$15}' "/proc/$c/stat" 2>/dev/null || echo 0))); done
  echo "$total"
}
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
per_req() { echo "scale=2; $1 * 1000000 / $TICK / $2" | bc; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }
res() { echo "$1" | sed -E "s/.* $2=([0-9]+).*/\1/"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

if [ -z "${RATE:-}" ]; then
  MAX=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" -s "$WRK_SCRIPT" "http://127.0.0.1:$FPORT" 2>&1 | grep ^RESULT)
  echo "floor closed-loop maximum: $MAX"
  RATE=$(echo "$(res "$MAX" rps) * $FRACTION / 1" | bc)
fi
echo "open-loop rate: $RATE req/s, $SECS s per round (first $WARMUP s not measured), $CONNS connections"
load() { taskset -c 1 ./target/release/examples/openloop "127.0.0.1:$1" "$RATE" "$SECS" "$CONNS" "$WARMUP" | tee -a "$WORK/timeline" | grep ^RESULT; }

# Preemptions of the request thread in $WORK/sched.data: a switch away from ingest-worker
# while runnable (prev_state R) until it runs again, by what took the core first.
sched_report() {
  echo "== request thread preempted (perf sched, core 0, 4 s) =="
  perf script -i "$WORK/sched.data" -F time,trace 2>/dev/null | awk '
    /prev_comm=ingest-worker / && / prev_state=R/ { t = $1 + 0; n = $0; sub(/.*next_comm=/, "", n); sub(/ .*/, "", n); by = n; next }
    /next_comm=ingest-worker / && t > 0 { d = ($1 - t) * 1000; c[by]++; ms[by] += d; all++; tot += d; if (d > 1) { big++; bigms += d }; t = 0 }
    END {
      printf "%d preemptions, %.1f ms until it ran again; %d over 1 ms (%.1f ms)\n", all, tot, big, bigms
      for (k in c) printf "  first to run: %-20s %6d times %8.1f ms\n", k, c[k], ms[k]
    }'
}

# One service round with build $2 (label $1); appends to the arrays named by prefix $3.
service_round() {
  local label=$1 bin=$2 pre=$3 S0 P0 S1 S2 P1 R ROWS OK
  PSQL -c "TRUNCATE events, metrics_hourly, rejected_events, ingest_batches, event_ids" >/dev/null
  env PORT=$SPORT HOST=127.0.0.1 WORKER_THREADS=1 LOG_LEVEL=warn SPOOL_DIR="$WORK/spool" ${SERVICE_ENV:-} \
    taskset -c 0 "$bin" 2>>"$WORK/service.log" &
  SVC_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$SPORT/health" >/dev/null && break; sleep 0.1; done
  S0=$(ticks "$SVC_PID"); P0=$(tree_ticks "$PG_PID")
  local SCHED_PID=""
  if [ "${SCHED:-0}" = 1 ] && [ "$r" = 1 ] && [ "$pre" = S ]; then
    (sleep $((WARMUP + 3)); perf sched record -q -C 0 -o "$WORK/sched.data" -- sleep 4 >/dev/null 2>&1) &
    SCHED_PID=$!
  fi
  R=$(load "$SPORT")
  S1=$(ticks "$SVC_PID")
  if [ -n "$SCHED_PID" ]; then wait "$SCHED_PID" || true; sched_report; fi
  for _ in $(seq 1 300); do [ "$(curl -s "http://127.0.0.1:$SPORT/health" | field '["pipeline"]["buffered"]')" = 0 ] && break; sleep 0.1; done
  S2=$(ticks "$SVC_PID"); P1=$(tree_ticks "$PG_PID")
  kill -TERM "$SVC_PID"; wait "$SVC_PID" || true; SVC_PID=""
  ROWS=$(PSQL -Atc "SELECT count(*) FROM events")
  OK=$(( $(res "$R" answered) - $(res "$R" non2xx) ))
  eval "${pre}_P99+=(\"$(res "$R" p99_us)\"); ${pre}_P50+=(\"$(res "$R" p50_us)\"); ${pre}_P999+=(\"$(res "$R" p999_us)\")"
  echo "round $r $label: $R rows=$ROWS 2xx=$OK cpu_us_per_req=$(per_req $((S1 - S0)) "$(res "$R" answered)") with_pg_until_committed=$(per_req $((S2 - S0 + P1 - P0)) "$ROWS")"
}

F_P99=(); F_P50=(); S_P99=(); S_P50=(); S_P999=(); F_P999=(); A_P99=(); A_P50=(); A_P999=()
for r in $(seq 1 "$ROUNDS"); do
  C0=$(tree_ticks "$NGINX_PID"); R=$(load "$FPORT"); C1=$(tree_ticks "$NGINX_PID")
  F_P99+=("$(res "$R" p99_us)"); F_P50+=("$(res "$R" p50_us)"); F_P999+=("$(res "$R" p999_us)")
  echo "round $r floor:   $R cpu_us_per_req=$(per_req $((C1 - C0)) "$(res "$R" answered)")"

  service_round "service" ./target/release/ingest S
  if [ -n "${ALT_BIN:-}" ]; then service_round "alt ($ALT_BIN)" "$ALT_BIN" A; fi
done
FP=$(median "${F_P99[@]}"); SP=$(median "${S_P99[@]}")
echo "median floor:   rate=$RATE p50_us=$(median "${F_P50[@]}") p99_us=$FP p999_us=$(median "${F_P999[@]}")"
echo "median service: rate=$RATE p50_us=$(median "${S_P50[@]}") p99_us=$SP p999_us=$(median "${S_P999[@]}")"
echo "ratio service/floor p99: $(echo "scale=2; $SP / $FP" | bc)"
if [ -n "${ALT_BIN:-}" ]; then
  AP=$(median "${A_P99[@]}")
  echo "median alt:     rate=$RATE p50_us=$(median "${A_P50[@]}") p99_us=$AP p999_us=$(median "${A_P999[@]}")"
  echo "ratio alt/floor p99: $(echo "scale=2; $AP / $FP" | bc)"
fi
if [ "${TIMELINE:-0}" = 1 ]; then echo "== per-second latency, all rounds in order =="; grep ^second "$WORK/timeline"; fi
