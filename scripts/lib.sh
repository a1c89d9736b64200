# scripts/lib.sh — shared by dev.sh and test.sh: find or install PostgreSQL,
# start a private cluster in a folder, stop it. Source it; don't run it.
#
#   pg_ensure_installed          installs the server from Debian packages if missing
#   pg_start DIR PORT            initdb (once) + start on 127.0.0.1:PORT, trust auth
#   pg_stop DIR                  fast stop (idempotent)
#   free_port                    prints a free TCP port on 127.0.0.1
#   bench_db WORK PGPORT         for the bench scripts: release build, a throw-away
#                                PostgreSQL pinned to core ${PG_CPU:-0} (shared/bench/pg-up.sh) in
#                                WORK/pg, migrated, with the 500 fixture campaigns;
#                                exports DATABASE_URL and defines PSQL (`events` is
#                                partitioned by day: migration V6 creates it so)
#
# As root the server runs as OS user `postgres` (PostgreSQL refuses root).

pg_bin_dir() {
  local d
  for d in ${PGBIN:-} /usr/lib/postgresql/17/bin /usr/lib/postgresql/16/bin /usr/lib/postgresql/15/bin /usr/lib/postgresql/14/bin; do
    [ -n "$d" ] && [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

pg_ensure_installed() {
  if PGBIN=$(pg_bin_dir); then export PGBIN; return 0; fi
  echo "==> PostgreSQL server not found: installing it from Debian packages" >&2
  local SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to apt-get install postgresql" >&2; return 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
  # Debian's package starts a cluster on 5432; we do not use it.
  PGBIN=$(pg_bin_dir) || { echo "PostgreSQL installed but initdb not found" >&2; return 1; }
  export PGBIN
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; return 1; }
  fi
  if as_pg "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    if "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$port"; then return 0; fi
    as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='$dir' -c max_connections=200 ${PG_EXTRA_OPTS:-}" start >/dev/null \
    || { tail -20 "$dir/postgres.log" >&2; return 1; }
  local i
  for i in $(seq 1 60); do
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$port" && return 0
    sleep 0.5
  done
  echo "PostgreSQL did not become ready on port $port" >&2
  return 1
}

pg_stop() {
  local dir=$1
  [ -f "$dir/data/PG_VERSION" ] || return 0
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}

psql_url() {
  "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -q "$@"
}

bench_db() {
  local work=$1 port=$2
  : "${BENCH:?BENCH must point at shared/bench}"
  command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
  cargo build --release --quiet
  eval "$(PIN_CPU="${PG_CPU:-0}" "$BENCH/pg-up.sh" "$work/pg" "$port" 2>/dev/null | grep ^export)"
  export DATABASE_URL
  PSQL() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
  ./target/release/ingest migrate 2>/dev/null
  PSQL -f "$BENCH/fixtures/fixtures.sql" >/dev/null
}

# wrk_script: WRK_SCRIPT for the load. MIX=zipf (default: ../shared/bench/wrk/event-zipf.lua,
# the production-like key mix) or uniform (event.lua, the worst case); UA=none (default: the
# shared script as it is, no User-Agent, so every event is `no_user_agent` invalid traffic) or
# browser (scripts/wrk/with-ua.lua around it: a realistic browser/bot mix of agents).
wrk_script() {
  local lua
  case "${MIX:-zipf}" in zipf) lua=event-zipf.lua ;; uniform) lua=event.lua ;; *) echo "MIX is zipf or uniform" >&2; exit 2 ;; esac
  case "${UA:-none}" in
    none) WRK_SCRIPT="$BENCH/wrk/$lua" ;;
    browser) export BASE_LUA="$BENCH/wrk/$lua"; WRK_SCRIPT="$PWD/scripts/wrk/with-ua.lua" ;;
    *) echo "UA is none or browser" >&2; exit 2 ;;
  esac
  if [ "${EVENT_ID:-0}" = 1 ]; then
    export ID_BASE_LUA="$WRK_SCRIPT"; WRK_SCRIPT="$PWD/scripts/wrk/with-id.lua"
  fi
  echo "key mix: ${MIX:-zipf} ($lua), user agents: ${UA:-none}, event_id: ${EVENT_ID:-0}"
}
