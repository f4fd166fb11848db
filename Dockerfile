# syntax=docker/dockerfile:1
# One image for every mode: picotun controller | webhook | agent (the injected sidecar).
#
#   docker build -t ghcr.io/picotun/picotun:0.1.0 .                              (linux/amd64)
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/picotun/picotun:0.1.0 .
#
# The build stage runs scripts/build-image, the same script CI and developers run without a
# Docker engine: one definition of how the binary is built (target, flags, profile).
#
# Build: on linux/amd64 whatever the image's platform (emulated on other machines), a static
# binary for TARGETARCH, the platform's architecture -- x86_64-unknown-linux-musl for amd64,
# aarch64-unknown-linux-musl for arm64 (a cross build, not an emulated one). ring, psm and
# mimalloc compile C and assembly: for amd64 with Debian's musl-gcc (musl-tools); for arm64 with
# zig through cargo-zigbuild, which scripts/build-image installs from PyPI (python3-venv).
FROM --platform=linux/amd64 docker.io/library/rust:1.95-bookworm AS build
ARG TARGETARCH
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools file python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cargo-target \
    --mount=type=cache,target=/root/.cache/picotun/zigbuild \
    CARGO_TARGET_DIR=/cargo-target scripts/build-image --target "${TARGETARCH:-amd64}" --out /out

# Run: no shell, no package manager, no libc -- the binary, CA certificates (the agent's report
# client falls back to them) and /etc/passwd (distroless static, of the image's platform), as
# uid/gid 65532: a numeric USER, so the kubelet can check runAsNonRoot without a fixed runAsUser
# in the pod (the injected sidecar sets none; OpenShift assigns its own). The Deployments in
# deploy/ and the injected sidecar add a read-only root filesystem, no capabilities and seccomp
# RuntimeDefault.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/picotun /picotun
USER 65532:65532
ENTRYPOINT ["/picotun"]
