#!/usr/bin/env bash
# scripts/drill.sh outage|crash|failover|slow-disk — fault drills under the shared wrk
# load, with figures. MIX=zipf (default, ../shared/bench/wrk/event-zipf.lua) or uniform
# (event.lua); UA=browser for realistic User-Agent headers (scripts/lib.sh).
#
#   outage     PostgreSQL is stopped (-m immediate) OUTAGE_AT_S seconds (default 5) into
#              a LOAD_S-second (default 40) wrk run and started again OUTAGE_S (default
#              15) later. Prints events spooled and replayed, replay time and rate, peak
#              RSS and spool size, and wrk's 2xx next to the rows in `events`. For the
#              10-minute outage: LOAD_S=610 OUTAGE_S=600.
#   crash      The service is killed with SIGKILL KILL_AT_S seconds (default 5) into a
#              10 s wrk run, then started again on the same spool. Prints the 2xx count,
#              the rows after recovery, and the difference: the kill -9 loss. With
#              SERVICE_ENV="ACK_MODE=durable" the journal is read back too (the loss is 0).
#   failover   The primary gets a synchronous standby (pg_basebackup); the service talks
#              to it through the fault proxy (examples/fault_proxy.rs). FREEZE_AT_S
#              (default 5) into a LOAD_S (default 30) run every connection is frozen;
#              FROZEN_S (default 10) later the standby is promoted and the proxy sends
#              new connections to it. Prints the time to reconnect and to drain, the
#              replay, and wrk's 2xx next to the rows on the new primary.
#   slow-disk  SPOOL_DIR on a FUSE file system whose every fsync takes SLOW_FSYNC_S
#              (default 2) seconds (scripts/slowfs.py), PostgreSQL down, LOAD_S (default
#              20) of load. Prints /livez answers (all should be 200), the largest
#              heartbeat age seen, what was spooled and shed; then PostgreSQL starts and
#              the spool replays: wrk's 2xx next to the rows.
#
# Setup as scripts/bench-wrk.sh: throw-away PostgreSQL (../shared/bench/pg-up.sh) with
# the fixture campaigns, release build; service and PostgreSQL on core 0, wrk on core 1.
# All load goes to 127.0.0.1 and is time-bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: drill.sh outage|crash|failover|slow-disk}
PORT=${PORT:-18082}
PGPORT=${BENCH_PGPORT:-55498}
CONNS=${CONNS:-64}
SHARED=${SHARED:-$(cd .. && pwd)/shared}
BENCH="$SHARED/bench"
. scripts/lib.sh
pg_ensure_installed

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ingest-drill.XXXXXX"); chmod 755 "$WORK"
SVC_PID=""; WRK_PID=""; PROXY_PID=""; FUSE_PID=""
cleanup() {
  [ -n "$WRK_PID" ] && kill "$WRK_PID" 2>/dev/null || true
  [ -n "$SVC_PID" ] && kill -9 "$SVC_PID" 2>/dev/null || true
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  [ -n "$FUSE_PID" ] && { umount -l "$WORK/slowmnt" 2>/dev/null; kill "$FUSE_PID" 2>/dev/null; } || true
  "$BENCH/pg-down.sh" "$WORK/pg" --purge >/dev/null 2>&1 || true
  [ -d "$WORK/standby/data" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/standby/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
bench_db "$WORK" "$PGPORT"
pgup() { PIN_CPU=0 "$BENCH/pg-up.sh" "$WORK/pg" "$PGPORT" 2>/dev/null | grep ^export; }
export SPOOL_DIR="$WORK/spool"

start_service() {
  env PORT=$PORT HOST=127.0.0.1 WORKER_THREADS=1 LOG_LEVEL=warn DB_CONNECT_TIMEOUT_MS=500 ${SERVICE_ENV:-} \
    taskset -c 0 ./target/release/ingest 2>>"$WORK/service.log" &
  SVC_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return; sleep 0.1; done
  echo "service did not start" >&2; exit 1
}
health() { curl -s "http://127.0.0.1:$PORT/health"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }
rss_kib() { awk '/VmRSS/{print $2}' "/proc/$SVC_PID/status" 2>/dev/null || echo 0; }
wrk_script
run_wrk() { taskset -c 1 wrk -t1 -c"$CONNS" -d"$1" --latency -s "$WRK_SCRIPT" "http://127.0.0.1:$PORT" >"$WORK/wrk.out" 2>&1 & WRK_PID=$!; }
# `ingest verify` over every stored hour: the summary line and its exit status.
verify() {
  local out rc=0
  out=$(DATABASE_URL=${1:-$DATABASE_URL} LOG_LEVEL=error ./target/release/ingest verify 2>&1) || rc=$?
  echo "$(echo "$out" | tail -1) (exit $rc)"
}
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
wrk_2xx() {
  local r; r=$(grep ^RESULT "$WORK/wrk.out")
  echo $(( $(echo "$r" | sed -E 's/.* requests=([0-9]+).*/\1/') - $(echo "$r" | sed -E 's/.* non2xx=([0-9]+).*/\1/') ))
}

case "$MODE" in
outage)
  LOAD_S=${LOAD_S:-40}; OUTAGE_AT_S=${OUTAGE_AT_S:-5}; OUTAGE_S=${OUTAGE_S:-15}
  start_service
  run_wrk "${LOAD_S}s"
  PEAK_RSS=0; PEAK_SPOOL=0; T0=$(date +%s.%N); STOPPED=0; RESTARTED=0
  while kill -0 "$WRK_PID" 2>/dev/null; do
    NOW=$(echo "$(date +%s.%N) - $T0" | bc)
    if [ $STOPPED = 0 ] && [ "$(echo "$NOW >= $OUTAGE_AT_S" | bc)" = 1 ]; then
      runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate -w stop >/dev/null; STOPPED=1
      echo "t=${NOW}s PostgreSQL stopped (-m immediate)"
    fi
    if [ $STOPPED = 1 ] && [ $RESTARTED = 0 ] && [ "$(echo "$NOW >= $OUTAGE_AT_S + $OUTAGE_S" | bc)" = 1 ]; then
      eval "$(pgup)"; RESTARTED=1; T_UP=$(date +%s.%N); SPOOLED_AT_UP=$(health | field '["spool"]["spooled_events"]')
      echo "t=${NOW}s PostgreSQL started again; events spooled during the outage: $SPOOLED_AT_UP"
    fi
    R=$(rss_kib); [ "$R" -gt "$PEAK_RSS" ] && PEAK_RSS=$R
    S=$(health | field '["spool"]["bytes"]' 2>/dev/null || echo 0); [ "$S" -gt "$PEAK_SPOOL" ] && PEAK_SPOOL=$S
    sleep 0.2
  done
  WRK_PID=""
  # Wait for the replay to finish.
  for _ in $(seq 1 600); do
    H=$(health)
    [ "$(echo "$H" | field '["spool"]["bytes"]')" = 0 ] && [ "$(echo "$H" | field '["pipeline"]["buffered"]')" = 0 ] && break
    sleep 0.2
  done
  T_DONE=$(date +%s.%N)
  H=$(health)
  REPLAYED=$(echo "$H" | field '["spool"]["replayed_events"]')
  SPOOLED=$(echo "$H" | field '["spool"]["spooled_events"]')
  kill -TERM "$SVC_PID"; wait "$SVC_PID" || true; SVC_PID=""
  ROWS=$(PSQL -Atc "SELECT count(*) FROM events")
  grep ^RESULT "$WORK/wrk.out"
  echo "outage_s=$OUTAGE_S spooled_events=$SPOOLED replayed_events=$REPLAYED replay_after_restart_s=$(echo "$T_DONE - $T_UP" | bc)"
  echo "replay_rate_events_per_s=$(echo "$REPLAYED / ($T_DONE - $T_UP)" | bc) peak_rss_kib=$PEAK_RSS peak_spool_bytes=$PEAK_SPOOL"
  echo "wrk_2xx=$(wrk_2xx) events_rows=$ROWS "
  echo "ingest verify: $(verify)"
  echo "damaged/failed: $(echo "$H" | field '["spool"]')"
  ;;
crash)
  KILL_AT_S=${KILL_AT_S:-5}
  start_service
  run_wrk 10s
  sleep "$KILL_AT_S"
  H=$(health)
  kill -9 "$SVC_PID"; SVC_PID=""
  echo "SIGKILL at ${KILL_AT_S}s; last /health before: accepted=$(echo "$H" | field '["pipeline"]["accepted"]') written=$(echo "$H" | field '["pipeline"]["written"]')"
  wait "$WRK_PID" || true; WRK_PID=""
  start_service
  # Settled: the spool replayed, and (ACK_MODE=durable) the journal read back and delivered.
  for _ in $(seq 1 300); do
    H=$(health)
    [ "$(echo "$H" | field '["spool"]["bytes"] == 0 and d["pipeline"]["buffered"] == 0 and d["pipeline"]["written"] + d["event_ids"]["repeated_in_database"] >= d["journal"]["recovered_events"]')" = True ] && break
    sleep 0.2
  done
  echo "journal recovered at restart: $(echo "$H" | field '["journal"]["recovered_events"]') events"
  kill -TERM "$SVC_PID"; wait "$SVC_PID" || true; SVC_PID=""
  ROWS=$(PSQL -Atc "SELECT count(*) FROM events")
  OK=$(grep ^RESULT "$WORK/wrk.out" | sed -E 's/.* requests=([0-9]+).*/\1/')
  grep ^RESULT "$WORK/wrk.out"
  echo "wrk_responses=$OK events_rows=$ROWS lost_acknowledged=$(( OK > ROWS ? OK - ROWS : 0 ))"
  echo "ingest verify: $(verify)"
  ;;
failover)
  LOAD_S=${LOAD_S:-30}; FREEZE_AT_S=${FREEZE_AT_S:-5}; FROZEN_S=${FROZEN_S:-10}
  SBPORT=$((PGPORT + 1)); PXPORT=$((PORT + 1))
  cargo build --release --quiet --example fault_proxy
  mkdir -p "$WORK/standby"; chown postgres: "$WORK/standby"
  runuser -u postgres -- "$PGBIN/pg_basebackup" -D "$WORK/standby/data" -h 127.0.0.1 -p "$PGPORT" -U postgres -R -X stream --checkpoint=fast
  runuser -u postgres -- taskset -c 0 "$PGBIN/pg_ctl" -D "$WORK/standby/data" -l "$WORK/standby/log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $SBPORT -c unix_socket_directories='$WORK/standby'" start >/dev/null
  PSQL -c "ALTER SYSTEM SET synchronous_standby_names = '*'" >/dev/null; PSQL -c "SELECT pg_reload_conf()" >/dev/null
  mkfifo "$WORK/proxy.in"
  taskset -c 0 ./target/release/examples/fault_proxy "$PXPORT" "127.0.0.1:$PGPORT" <"$WORK/proxy.in" >"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  exec 3>"$WORK/proxy.in"
  DATABASE_URL="postgres://postgres@127.0.0.1:$PXPORT/ingest" start_service
  run_wrk "${LOAD_S}s"
  T0=$(now); sleep "$FREEZE_AT_S"
  echo freeze >&3; echo "t=$(since "$T0")s every database connection frozen"
  sleep "$FROZEN_S"
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/standby/data" -w promote >/dev/null
  echo "failover 127.0.0.1:$SBPORT" >&3; T_FO=$(now)
  echo "t=$(since "$T0")s standby promoted, new connections go to it"
  for _ in $(seq 1 600); do [ "$(health | field '["database"]')" = connected ] && break; sleep 0.1; done
  RECONNECT=$(since "$T_FO")
  wait "$WRK_PID" || true; WRK_PID=""
  for _ in $(seq 1 1200); do
    H=$(health)
    [ "$(echo "$H" | field '["spool"]["bytes"]')" = 0 ] && [ "$(echo "$H" | field '["pipeline"]["buffered"]')" = 0 ] && break
    sleep 0.2
  done
  DRAINED=$(since "$T_FO"); H=$(health)
  kill -TERM "$SVC_PID"; wait "$SVC_PID" || true; SVC_PID=""
  NEW() { "$PGBIN/psql" -X -q -At "postgres://postgres@127.0.0.1:$SBPORT/ingest" -c "$1"; }
  grep ^RESULT "$WORK/wrk.out"
  echo "reconnected_after_failover_s=$RECONNECT drained_after_failover_s=$DRAINED spooled_events=$(echo "$H" | field '["spool"]["spooled_events"]') replayed_events=$(echo "$H" | field '["spool"]["replayed_events"]') write_failures=$(echo "$H" | field '["pipeline"]["write_failures"]')"
  echo "wrk_2xx=$(wrk_2xx) rows_on_new_primary=$(NEW "SELECT count(*) FROM events") "
  echo "ingest verify: $(verify "postgres://postgres@127.0.0.1:$SBPORT/ingest")"
  ;;
slow-disk)
  LOAD_S=${LOAD_S:-20}; SLOW_FSYNC_S=${SLOW_FSYNC_S:-2}
  [ -x "$WORK/venv/bin/python" ] || { python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q mfusepy; }
  mkdir -p "$WORK/slowback" "$WORK/slowmnt"
  "$WORK/venv/bin/python" scripts/slowfs.py "$WORK/slowback" "$WORK/slowmnt" "$SLOW_FSYNC_S" >"$WORK/fuse.log" 2>&1 &
  FUSE_PID=$!
  for _ in $(seq 1 50); do mountpoint -q "$WORK/slowmnt" && break; sleep 0.1; done
  mountpoint -q "$WORK/slowmnt" || { cat "$WORK/fuse.log" >&2; exit 1; }
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate -w stop >/dev/null
  SPOOL_DIR="$WORK/slowmnt/spool" start_service
  run_wrk "${LOAD_S}s"
  CHECKS=0; FAILS=0; MAX_BEAT=0; PEAK_RSS=0
  while kill -0 "$WRK_PID" 2>/dev/null; do
    L=$(curl -s -m 2 -w ' %{http_code}' "http://127.0.0.1:$PORT/livez" || echo "{} 000")
    CHECKS=$((CHECKS + 1)); [ "${L##* }" = 200 ] || FAILS=$((FAILS + 1))
    B=$(echo "${L% *}" | python3 -c "import json,sys; d=json.load(sys.stdin); print(max(d.get('coordinator_beat_age_ms',0), d.get('writer_beat_age_ms',0)))" 2>/dev/null || echo 0)
    [ "$B" -gt "$MAX_BEAT" ] && MAX_BEAT=$B
    R=$(rss_kib); [ "$R" -gt "$PEAK_RSS" ] && PEAK_RSS=$R
    sleep 0.2
  done
  WRK_PID=""; H=$(health)
  grep ^RESULT "$WORK/wrk.out"
  echo "fsync_delay_s=$SLOW_FSYNC_S livez_checks=$CHECKS livez_not_200=$FAILS max_heartbeat_age_ms=$MAX_BEAT peak_rss_kib=$PEAK_RSS"
  echo "spooled_events=$(echo "$H" | field '["spool"]["spooled_events"]') shed_503=$(echo "$H" | field '["pipeline"]["shed"]') spool_failures=$(echo "$H" | field '["spool"]["failures"]')"
  eval "$(pgup)"
  for _ in $(seq 1 1200); do
    H=$(health)
    [ "$(echo "$H" | field '["spool"]["bytes"]')" = 0 ] && [ "$(echo "$H" | field '["pipeline"]["buffered"]')" = 0 ] && break
    sleep 0.2
  done
  kill -TERM "$SVC_PID"; wait "$SVC_PID" || true; SVC_PID=""
  echo "after the database returned: wrk_2xx=$(wrk_2xx) events_rows=$(PSQL -Atc "SELECT count(*) FROM events") "
  echo "ingest verify: $(verify)"
  ;;
*) echo "usage: drill.sh outage|crash|failover|slow-disk" >&2; exit 2 ;;
esac
