# The two moat images: `docker build --target control -t moat-control .` and
# `docker build --target proxy -t moat-proxy .`. Static (musl) binaries on a distroless base.
FROM rust:1.95-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq musl-tools cmake clang && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p moat-control -p moat-proxy -p moat-cli \
 && mkdir /out \
 && cp target/x86_64-unknown-linux-musl/release/moat-control \
       target/x86_64-unknown-linux-musl/release/moat-proxy \
       target/x86_64-unknown-linux-musl/release/moat /out/

FROM gcr.io/distroless/static-debian12:nonroot AS control
COPY --from=build /out/moat-control /out/moat /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/moat-control"]

# The proxy image also runs the interception init container (`moat-proxy init`), which needs
# iptables; the sidecar itself runs as uid 1337.
FROM debian:bookworm-slim AS proxy
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/moat-proxy /usr/local/bin/
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/moat-proxy"]
