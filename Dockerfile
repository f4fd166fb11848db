# syntax=docker/dockerfile:1
# One image for every mode: picotun controller | webhook | agent (the injected sidecar).
#
#   docker build -t ghcr.io/picotun/picotun:0.1.0 .
#
# The build stage runs scripts/build-image, the same script CI and developers run without a
# Docker engine: one definition of how the binary is built (target, flags, profile).

# The image is linux/amd64 (the binary's target), whatever machine builds it.
#
# Build: a static binary for x86_64-unknown-linux-musl. ring and psm compile C and assembly,
# which for musl wants Debian's musl-gcc (musl-tools).
FROM --platform=linux/amd64 docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools file \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cargo-target \
    CARGO_TARGET_DIR=/cargo-target scripts/build-image --out /out

# Run: no shell, no package manager, no libc -- the binary, CA certificates (the agent's report
# client falls back to them) and /etc/passwd (distroless static), as uid/gid 65532. The
# Deployments in deploy/ and the injected sidecar add a read-only root filesystem, no
# capabilities and seccomp RuntimeDefault.
FROM --platform=linux/amd64 gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/picotun /picotun
USER 65532:65532
ENTRYPOINT ["/picotun"]
