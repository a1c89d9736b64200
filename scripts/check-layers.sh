#!/usr/bin/env bash
# scripts/check-layers.sh — the one-way data flow, enforced (run by scripts/test.sh).
#
# The request side (server, http, event, shard, admission, coordinator) must not
# name the write side (writer, accounts, db, spool, pgcopy, tls, write_side): what it
# needs to know from there comes through the status handle wired in `serve`.
# The write side must not name the request side's internals: it sees `batch` only.
# `batch`, `stats`, `config` and `telemetry` are shared and name neither side.
# A violation prints the file, line and rule, and exits 1.
set -euo pipefail
cd "$(dirname "$0")/../src"

REQUEST=(server.rs server http event.rs event_ids.rs journal.rs ivt.rs shard.rs admission.rs coordinator.rs)
WRITE=(writer pgcopy.rs spool.rs accounts.rs db.rs tls.rs maintenance.rs)
SHARED=(batch.rs stats.rs telemetry.rs ipset.rs recent.rs)
WRITE_MODS='writer|accounts|db|spool|pgcopy|tls|write_side|maintenance'
REQUEST_MODS='server|http|event|event_ids|journal|ivt|shard|admission|coordinator'

fail=0
check() { # check RULE PATTERN FILES...
  local rule=$1 pattern=$2; shift 2
  local hits
  # Any path to a forbidden module: `use crate::x`, `crate::x::y` inline, `super::x` from a sibling.
  if hits=$(grep -rnE "$pattern" "$@" 2>/dev/null); then
    echo "layer rule broken ($rule):" >&2
    echo "$hits" | sed 's/^/  src\//' >&2
    fail=1
  fi
}
check "the request side imports nothing from the write side" "crate::(\\{[^}]*)?\\b($WRITE_MODS)\\b" "${REQUEST[@]}"
check "the write side sees batches, never the request side" "crate::(\\{[^}]*)?\\b($REQUEST_MODS)\\b" "${WRITE[@]}"
check "shared modules name neither side" "crate::($WRITE_MODS|$REQUEST_MODS)\\b" "${SHARED[@]}"
# `config` is shared too; it may name `tls` only, to validate DATABASE_URL's sslmode at start.
check "config names no side but tls" "crate::(writer|accounts|db|spool|pgcopy|write_side|maintenance|$REQUEST_MODS)\\b" config.rs
if [ $fail -ne 0 ]; then
  echo "see src/lib.rs (the module map) for which side each module is on" >&2
  exit 1
fi
echo "layers: ok (request side → batch → write side, one way)"
