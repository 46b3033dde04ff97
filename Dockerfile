# The moat images: `docker build --target control -t moat-control .`,
# `docker build --target proxy -t moat-proxy .` and, for examples/kubernetes,
# `docker build --target demo-app -t moat-demo-app .`. Static (musl) binaries, stripped (the
# release profile keeps line tables for profiling; images do not need them): the control plane
# and the demo app on distroless, the proxy on debian-slim (its init container needs iptables).
# The control plane has the etcd store backend built in (feature `etcd`, which needs protoc).
FROM rust:1.95-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq musl-tools cmake clang protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p moat-control -p moat-proxy -p moat-cli -p moat-demo-app --features moat-control/etcd \
 && mkdir /out \
 && cp target/x86_64-unknown-linux-musl/release/moat-control \
       target/x86_64-unknown-linux-musl/release/moat-proxy \
       target/x86_64-unknown-linux-musl/release/moat \
       target/x86_64-unknown-linux-musl/release/moat-demo-app /out/

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

# The demo's three services (examples/kubernetes/app.yaml).
FROM gcr.io/distroless/static-debian12:nonroot AS demo-app
COPY --from=build /out/moat-demo-app /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/moat-demo-app"]
