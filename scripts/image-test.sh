#!/usr/bin/env bash
# scripts/image-test.sh — builds the Dockerfile, unchanged, with podman and runs the image.
#
# No image registry is reachable from the development machines, so the two base images
# the Dockerfile names are made locally when missing, from Debian packages:
#   debian:bookworm-slim   debootstrap --variant=minbase bookworm
#   rust:1-slim-bookworm   the same plus gcc/libc6-dev/ca-certificates, this machine's
#                          Rust toolchain (rustc --print sysroot) and cargo settings
# Then `podman build --isolation chroot` builds the image. `podman run` needs a container
# runtime these sandboxes may refuse, so the image is run the way the Kubernetes manifest
# runs it, without one: a container's file system (`podman create` + `podman mount`) as
# the root of a chroot, as the image's non-root user (chroot --userspec 10001), against a
# throw-away PostgreSQL: `ingest migrate`, the service, events posted with curl, the rows
# checked, SIGTERM, the drain report read. Prints how long each step took.
#
# Needs root (debootstrap, mount, chroot) and crates.io (the build stage fetches crates).
# One command; not in CI (it takes minutes, see the README).
# env: KEEP_IMAGES=1 keeps the base images for the next run (default: kept).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, mount, chroot)" >&2; exit 1; }
SUDO=""
need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
pg_ensure_installed

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ingest-image.XXXXXX"); chmod 755 "$WORK"
MNT=""; CID=""; SVC_PID=""
cleanup() {
  [ -n "$SVC_PID" ] && kill -9 "$SVC_PID" 2>/dev/null || true
  if [ -n "$MNT" ]; then umount "$MNT/proc" 2>/dev/null || true; umount "$MNT/dev" 2>/dev/null || true; fi
  [ -n "$CID" ] && { podman umount "$CID" >/dev/null 2>&1 || true; podman rm -f "$CID" >/dev/null 2>&1 || true; }
  pg_stop "$WORK/pg"
  rm -rf "$WORK"
}
trap cleanup EXIT
t0=$(date +%s)
step() { echo "==> [$(( $(date +%s) - t0 )) s] $*"; }
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if ! podman image exists debian:bookworm-slim; then
  step "making debian:bookworm-slim with debootstrap"
  debootstrap --variant=minbase bookworm "$WORK/slim" "$MIRROR" >"$WORK/debootstrap-slim.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap-slim.log" >&2; exit 1; }
  tar -C "$WORK/slim" -c . | podman import - debian:bookworm-slim >/dev/null
  rm -rf "$WORK/slim"
fi
if ! podman image exists rust:1-slim-bookworm; then
  step "making rust:1-slim-bookworm: debootstrap + a C compiler + this machine's toolchain"
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$WORK/rust" "$MIRROR" \
    >"$WORK/debootstrap-rust.log" 2>&1 || { tail -20 "$WORK/debootstrap-rust.log" >&2; exit 1; }
  SYSROOT=$(rustc --print sysroot)   # a rustup toolchain: bin/{cargo,rustc}, lib/
  mkdir -p "$WORK/rust/usr/local/rust" "$WORK/rust/usr/local/cargo"
  tar -C "$SYSROOT" --exclude=./share/doc -c . | tar -C "$WORK/rust/usr/local/rust" -x
  if [ -f "${CARGO_HOME:-$HOME/.cargo}/config.toml" ]; then
    cp "${CARGO_HOME:-$HOME/.cargo}/config.toml" "$WORK/rust/usr/local/cargo/"
  fi
  # This machine's certificate authorities (a sandbox's egress proxy may sign
  # crates.io's certificate), so cargo inside the build trusts what it trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rust/etc/ssl/certs/ca-certificates.crt"
  tar -C "$WORK/rust" -c . | podman import \
    --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    - rust:1-slim-bookworm >/dev/null
  rm -rf "$WORK/rust"
fi
# The Dockerfile's short names resolve to these, never to a registry.
podman tag localhost/debian:bookworm-slim docker.io/library/debian:bookworm-slim
podman tag localhost/rust:1-slim-bookworm docker.io/library/rust:1-slim-bookworm

step "podman build --isolation chroot (the Dockerfile as it is)"
B0=$(date +%s)
podman build --isolation chroot --pull=never -t analytics-ingest:test . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; exit 1; }
BUILD_S=$(( $(date +%s) - B0 ))
podman image inspect analytics-ingest:test --format '{{.Config.User}} {{.Config.Entrypoint}} {{.Size}}' \
  | { read -r user entry size; echo "    built in ${BUILD_S} s: user $user, entrypoint $entry, $((size / 1048576)) MiB"; }

step "the image's file system, as its user 10001"
CID=$(podman create analytics-ingest:test)
MNT=$(podman mount "$CID")
mount --bind /proc "$MNT/proc"; mount --bind /dev "$MNT/dev"
mkdir -p "$MNT/tmp"; chmod 1777 "$MNT/tmp"
PORT=$(free_port)
pg_start "$WORK/pg" "$PORT"
DB="postgres://postgres@127.0.0.1:$PORT/postgres"
in_image() { chroot --userspec=10001:10001 "$MNT" env -i PATH=/usr/local/bin:/usr/bin:/bin \
  NODE_ENV=production SPOOL_DIR=/var/lib/ingest/spool DATABASE_URL="$DB" "$@"; }
in_image /usr/local/bin/ingest --version
in_image /usr/local/bin/ingest migrate 2>&1 | tail -1
PSQL() { "$PGBIN/psql" -X -q -At "$DB" "$@"; }
C=c0000000-0000-4000-8000-000000000001
PSQL -c "INSERT INTO campaigns VALUES ('$C', 'a0000000-0000-4000-8000-000000000001')"
SPORT=$(free_port)
chroot --userspec=10001:10001 "$MNT" env -i PATH=/usr/local/bin:/usr/bin:/bin NODE_ENV=production \
  SPOOL_DIR=/var/lib/ingest/spool DATABASE_URL="$DB" PORT="$SPORT" HOST=127.0.0.1 FLUSH_INTERVAL_MS=200 \
  /usr/local/bin/ingest >"$WORK/service.log" 2>&1 &
SVC_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$SPORT/readyz" >/dev/null && break; sleep 0.1; done
step "posting 100 events to the image's service"
# curl's own User-Agent is a bot by the counting rules (README, Counting rules): a pixel is
# fetched by a browser, so post as one and expect every impression billed.
BROWSER_UA='Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36'
OK=0
for i in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -A "$BROWSER_UA" \
    "http://127.0.0.1:$SPORT/event/impression?ad_unit_id=1b4e28ba-2fa1-41d2-883f-0016d3cca427&campaign_id=$C&creative_id=6f1a9e0c-3d2b-4c5e-9f7a-8b6c5d4e3f21&page_url=https%3A%2F%2Fe.x%2F$i")
  [ "$code" = 204 ] && OK=$((OK + 1))
done
kill -TERM "$SVC_PID"; wait "$SVC_PID"; CODE=$?; SVC_PID=""
ROWS=$(PSQL -c "SELECT count(*) FROM events")
IMPRESSIONS=$(PSQL -c "SELECT sum(impressions) FROM metrics_hourly")
INVALID=$(PSQL -c "SELECT sum(invalid_impressions) FROM metrics_hourly")
REPORT=$(grep -F '"drain report"' "$WORK/service.log" || true)
echo "    2xx=$OK rows=$ROWS impressions=$IMPRESSIONS invalid=$INVALID exit=$CODE"
echo "    $REPORT"
[ "$OK" = 100 ] && [ "$ROWS" = 100 ] && [ "$IMPRESSIONS" = 100 ] && [ "$INVALID" = 0 ] && [ "$CODE" = 0 ] && [ -n "$REPORT" ] \
  || { echo "image test FAILED" >&2; tail -20 "$WORK/service.log" >&2; exit 1; }
step "image test passed (build ${BUILD_S} s)"
