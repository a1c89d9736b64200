#!/usr/bin/env bash
# scripts/profile.sh — where core 0's time goes while the service runs the wrk load.
#
# The same setup as scripts/floor.sh (service and a throw-away PostgreSQL on core 0, wrk on
# core 1, MIX/UA/EVENT_ID as there), with `perf record -C 0` sampling everything on core 0
# for the middle of the run. Prints the share of core 0 per thread (service request threads,
# write thread, each PostgreSQL backend kind, kernel idle) and the hottest symbols of the
# service and of PostgreSQL. Needs `perf` (apt: linux-tools / linux-perf).
# PERF_RECORD="-F 499 --call-graph dwarf,8192" unwinds through code built without frame
# pointers (the release build), for CALLERS.
# CALLERS=symbol adds the call chains into that symbol on the request thread (e.g.
# CALLERS=__memmove_avx512_unaligned_erms: who copies).
# env: DURATION=20s CONNS=64 SERVICE_ENV="..." TOP=40 RATE=  (RATE=N: oha-style fixed rate is not
# used here; this is the closed-loop saturated profile)
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-64}; DURATION=${DURATION:-20s}; TOP=${TOP:-40}
SPORT=${SERVICE_PORT:-18093}; PGPORT=${BENCH_PGPORT:-55499}
SHARED=${SHARED:-$(cd .. && pwd)/shared}; BENCH="$SHARED/bench"
. scripts/lib.sh
pg_ensure_installed
command -v perf >/dev/null || { echo "profile.sh needs perf" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ingest-profile.XXXXXX"); chmod 755 "$WORK"
SVC_PID=""
cleanup() {
  [ -n "$SVC_PID" ] && kill -9 "$SVC_PID" 2>/dev/null || true
  "$BENCH/pg-down.sh" "$WORK/pg" --purge >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
bench_db "$WORK" "$PGPORT"
wrk_script
env PORT=$SPORT HOST=127.0.0.1 WORKER_THREADS=1 LOG_LEVEL=warn SPOOL_DIR="$WORK/spool" ${SERVICE_ENV:-} \
  taskset -c 0 ./target/release/ingest 2>>"$WORK/service.log" &
SVC_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$SPORT/health" >/dev/null && break; sleep 0.1; done
DUR_S=${DURATION%s}
taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$WRK_SCRIPT" "http://127.0.0.1:$SPORT" >"$WORK/wrk.out" 2>&1 &
WRK=$!
sleep 2
perf record -q -C 0 ${PERF_RECORD:--F 1999 -g} -o "$WORK/perf.data" -- sleep $((DUR_S - 4)) 2>/dev/null
wait "$WRK"
grep ^RESULT "$WORK/wrk.out"
echo "== core 0 by thread (comm) =="
perf report -i "$WORK/perf.data" --no-children --sort comm --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -15 || true
echo "== core 0 by thread and binary =="
perf report -i "$WORK/perf.data" --no-children --sort comm,dso --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -25 || true
for comm in ingest-worker ingest-writer postgres; do
  echo "== hottest symbols: $comm (share of core 0) =="
  perf report -i "$WORK/perf.data" --no-children --comm "$comm" --sort sym --stdio -g none 2>/dev/null \
    | grep -E "^ +[0-9]" | head -"$TOP" || true
done
if [ -n "${CALLERS:-}" ]; then
  echo "== callers of $CALLERS on ingest-worker =="
  perf report -i "$WORK/perf.data" --no-children --comm ingest-worker --symbols "$CALLERS" \
    --stdio -G --percent-limit 0.05 2>/dev/null | grep -v "^#" | grep -v "^$" | head -${CALLER_LINES:-300} || true
fi
