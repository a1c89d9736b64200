# Multi-stage build: dependencies are compiled in their own layer (cached while
# only src/ changes), the runtime image is Debian slim with a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /app
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
 && echo 'fn main() {}' > benches/hot_path.rs \
 && cargo build --release --locked && rm -rf src benches
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
 && ./target/release/ingest --version

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home ingest
COPY --from=build /app/target/release/ingest /usr/local/bin/ingest
USER 10001
ENV PORT=3003 NODE_ENV=production
EXPOSE 3003
RUN ["/usr/local/bin/ingest", "--version"]
ENTRYPOINT ["/usr/local/bin/ingest"]
