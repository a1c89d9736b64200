# Multi-stage build.
# 1. deps: compile the dependency graph alone (Cargo.toml + Cargo.lock with
#    stub sources), so this layer stays cached while only src/ changes; the
#    same idea as cargo-chef without the extra tool.
# 2. build: the real sources; `ingest --version` as a smoke step.
# 3. runtime: Debian slim, non-root user, a writable spool directory.
FROM rust:1-slim-bookworm AS deps
WORKDIR /app
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches examples \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in hot_path pipeline allocations; do echo 'fn main() {}' > benches/$b.rs; done \
 && echo 'fn main() {}' > examples/writer_vs_copy.rs \
 && cargo build --release --locked --bin ingest \
 && rm -rf src

FROM deps AS build
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin ingest \
 && ./target/release/ingest --version

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home ingest \
 && mkdir -p /var/lib/ingest/spool && chown -R 10001:10001 /var/lib/ingest
COPY --from=build /app/target/release/ingest /usr/local/bin/ingest
USER 10001
ENV PORT=3003 NODE_ENV=production SPOOL_DIR=/var/lib/ingest/spool
EXPOSE 3003
RUN ["/usr/local/bin/ingest", "--version"]
ENTRYPOINT ["/usr/local/bin/ingest"]
