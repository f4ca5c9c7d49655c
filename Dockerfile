# syntax=docker/dockerfile:1
# Switchyard's container image: built with Debian's Rust image, run on distroless (glibc, CA
# certificates, no shell), as a non-root user.
#
#   docker build -t switchyard .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/deploy/container/switchyard.toml:/etc/switchyard/switchyard.toml:ro" \
#     -e SWITCHYARD_ADMIN_KEY=change-me-at-least-16-chars -e EASTUS_KEY -e WESTUS_KEY switchyard
#
# See docs/deploy.md.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The profile-guided build the benchmarks measure (bench/pgo.sh: an instrumented build, about
# 40 s of training against the built-in simulator on the build container's loopback, then the
# optimised build; about 17 % fewer instructions a request, 10 % less CPU). It adds rustup's
# llvm-tools and uses python3 for free ports; should any step fail, the image gets the plain
# release build and the build log says so. `--build-arg PGO=0` builds the plain one directly
# (one build instead of two: minutes faster).
# Cache mounts keep the registry and the build trees between builds; the binary is copied out
# of the cached tree. Debug info is dropped (symbol names stay, for panic backtraces).
ARG PGO=1
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo; \
    if [ "$PGO" = 1 ] && bin=$(bash bench/pgo.sh); then \
      cp "$bin" /switchyard; \
    else \
      echo "switchyard: the plain release build (PGO=$PGO)" >&2; \
      cargo build --release --locked --bin switchyard && cp target/release/switchyard /switchyard; \
    fi

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /switchyard /usr/local/bin/switchyard
# The config is mounted here (a ConfigMap in Kubernetes); secrets come in as environment
# variables that it names as ${VAR}.
WORKDIR /etc/switchyard
USER nonroot:nonroot
EXPOSE 8080 9090
# No curl in distroless: the binary checks its own admin listener.
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/switchyard", "health", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["serve", "--config", "/etc/switchyard/switchyard.toml"]
