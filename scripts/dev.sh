#!/usr/bin/env bash
# scripts/dev.sh — run the service locally on an embedded default database.
#
# Installs the PostgreSQL server if missing, starts (or reuses) a local cluster
# in .pgdata/ (git-ignored) on 127.0.0.1:${PGPORT:-55432}, builds the release
# binary, applies the migrations, seeds three demo campaigns (printed below),
# and runs the service in the foreground on :${PORT:-3003}. Ctrl-C stops the
# service (it drains its buffers first); the cluster keeps running for the next
# start — stop it with: scripts/dev.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

PGDIR="$PWD/.pgdata"
PGPORT=${PGPORT:-55432}
pg_ensure_installed
if [ "${1:-}" = stop ]; then pg_stop "$PGDIR"; echo "stopped PostgreSQL in $PGDIR"; exit 0; fi

echo "==> PostgreSQL in $PGDIR on 127.0.0.1:$PGPORT" >&2
pg_start "$PGDIR" "$PGPORT"
ADMIN="postgres://postgres@127.0.0.1:$PGPORT/postgres"
if [ -z "$(psql_url "$ADMIN" -Atc "SELECT 1 FROM pg_database WHERE datname = 'ingest'")" ]; then
  psql_url "$ADMIN" -c "CREATE DATABASE ingest"
fi
export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/ingest"

echo "==> cargo build --release" >&2
cargo build --release --quiet
./target/release/ingest migrate

psql_url "$DATABASE_URL" <<'SQL'
INSERT INTO campaigns (id, account_id) VALUES
  ('c0000000-0000-4000-8000-000000000001', 'a0000000-0000-4000-8000-000000000001'),
  ('c0000000-0000-4000-8000-000000000002', 'a0000000-0000-4000-8000-000000000001'),
  ('c0000000-0000-4000-8000-000000000003', 'a0000000-0000-4000-8000-000000000002')
ON CONFLICT (id) DO NOTHING;
SQL
PORT=${PORT:-3003}
cat >&2 <<MSG
==> demo campaigns (campaign_id -> account_id):
      c0000000-0000-4000-8000-000000000001 -> a0000000-0000-4000-8000-000000000001
      c0000000-0000-4000-8000-000000000002 -> a0000000-0000-4000-8000-000000000001
      c0000000-0000-4000-8000-000000000003 -> a0000000-0000-4000-8000-000000000002
    try:
      curl -i -X POST "http://localhost:$PORT/event/impression?ad_unit_id=1b4e28ba-2fa1-41d2-883f-0016d3cca427&campaign_id=c0000000-0000-4000-8000-000000000001&creative_id=6f1a9e0c-3d2b-4c5e-9f7a-8b6c5d4e3f21&page_url=https%3A%2F%2Fexample.com%2F"
      curl -s http://localhost:$PORT/health
      psql "$DATABASE_URL" -c 'SELECT * FROM events'
==> starting ingest on :$PORT (Ctrl-C to stop)
MSG
export PORT
exec ./target/release/ingest
