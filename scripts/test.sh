#!/usr/bin/env bash
# scripts/test.sh — the whole test suite, from a fresh machine.
#
# Installs the PostgreSQL server and Chromium (for the browser test) if
# missing, starts a throw-away cluster on a
# free port in a temporary folder, runs fmt/clippy checks and every test
# against it (each integration test creates its own database), and removes
# the cluster afterwards, whatever happened. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
pg_ensure_installed
# The real-browser test (tests/browser.rs) drives Debian's headless Chromium;
# the TLS test (tests/tls.rs) makes its certificates with openssl; the partition
# test (tests/scale.rs) loads pg_partman.
MISSING=()
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || MISSING+=(chromium)
command -v openssl >/dev/null || MISSING+=(openssl)
# The pg_partman test (tests/scale.rs) needs the extension for this server's version.
PGVER=$(basename "$(dirname "$PGBIN")")
[ -f "/usr/share/postgresql/$PGVER/extension/pg_partman.control" ] || MISSING+=("postgresql-$PGVER-partman")
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "==> installing ${MISSING[*]} (Debian packages) for the browser and TLS tests" >&2
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}" >&2
fi

PGDIR=$(mktemp -d "${TMPDIR:-/tmp}/ingest-test-pg.XXXXXX")
PORT=$(free_port)
cleanup() { pg_stop "$PGDIR"; rm -rf "$PGDIR"; }
trap cleanup EXIT
echo "==> throw-away PostgreSQL on 127.0.0.1:$PORT ($PGDIR)"
pg_start "$PGDIR" "$PORT"
export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
export PGBIN PGDIR PGPORT=$PORT

if [ "${SKIP_LINT:-0}" != 1 ]; then
  echo "==> cargo fmt --check"
  cargo fmt --all -- --check
  echo "==> cargo clippy --all-targets -- -D warnings"
  cargo clippy --all-targets --quiet -- -D warnings
  echo "==> cargo doc --no-deps (broken intra-doc links denied)"
  RUSTDOCFLAGS="-D rustdoc::broken_intra_doc_links -D rustdoc::private_intra_doc_links" cargo doc --no-deps --quiet
fi
echo "==> layer rules (scripts/check-layers.sh)"
scripts/check-layers.sh
echo "==> cargo test"
cargo test "$@"
# The container image: built from the Dockerfile with podman and run (about 3 min the
# first time, mostly making the base images). Needs root; SKIP_IMAGE=1 skips it.
if [ "${SKIP_IMAGE:-0}" != 1 ] && [ $# -eq 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> scripts/image-test.sh"
    scripts/image-test.sh
  else
    echo "==> scripts/image-test.sh skipped: it needs root (debootstrap, mount, chroot)"
  fi
fi
