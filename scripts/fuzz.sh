#!/usr/bin/env bash
# scripts/fuzz.sh [SECONDS] — fuzz the query parser with libFuzzer for a bounded time (default 60 s).
# Installs cargo-fuzz if missing. cargo-fuzz needs nightly features (sanitizers); on a stable
# toolchain RUSTC_BOOTSTRAP=1 enables them for this build only. Crashes land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
mkdir -p fuzz/corpus/parse_event
# Seed corpus: a valid query and a few near misses.
printf '%s' 'ad_unit_id=1b4e28ba-2fa1-41d2-883f-0016d3cca427&campaign_id=fe5dd6f6-5d04-4969-b606-7ae6ac125000&creative_id=6f1a9e0c-3d2b-4c5e-9f7a-8b6c5d4e3f21&page_url=https%3A%2F%2Fnews.example.com%2Fa&timestamp=1717200000000' > fuzz/corpus/parse_event/valid
printf '%s' 'ad_unit_id=%zz&page_url=%E2%28&timestamp=-1&timestamp=2' > fuzz/corpus/parse_event/broken
cd fuzz
RUSTC_BOOTSTRAP=1 cargo fuzz run parse_event corpus/parse_event -- -max_total_time="$SECONDS_TO_RUN" -max_len=4096
