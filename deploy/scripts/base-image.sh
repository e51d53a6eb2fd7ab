#!/usr/bin/env bash
# Build the stand-in for the official `python:3.11-slim-bookworm` image, for machines that reach
# no image registry: `debootstrap --variant=minbase bookworm` plus Debian's Python 3.11, imported
# with `docker import`. The Dockerfile takes its base images by ARG, so the same Dockerfile builds
# on the official image (users) and on this one (the end-to-end test).
#
# Why Python goes into the stand-in instead of the Dockerfile: the official image already has
# Python 3.11, so a Dockerfile that installs Python itself would differ between users and this test.
# The stand-in mirrors what the official image provides (Debian bookworm, Python 3.11, venv,
# CA certificates, LANG=C.UTF-8); the Dockerfile only relies on `python3 -m venv`.
#
# The rootfs tarball is cached (CACHE_DIR), so only the first run pays for debootstrap.
#
# usage: DOCKER_HOST=unix:///... base-image.sh [TAG]
set -euo pipefail

TAG=${1:-sepconv/python-standin:3.11-slim-bookworm}
CACHE_DIR=${SEPCONV_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sepconv-serve/e2e}
DOCKER=${DOCKER:-/usr/bin/docker}
SUITE=bookworm
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
tarball="$CACHE_DIR/rootfs-$SUITE-minbase-python3-v2.tar"  # bump when the recipe changes

# The mirror this machine's apt already uses (deb822 .sources or one-line sources.list).
debian_mirror() {
  local uri
  uri=$(grep -hs -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -v -- '-security' | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hs -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
          | awk '{print $2}' | grep -i debian | grep -v -- '-security' | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  echo "base-image: $TAG already present"
  exit 0
fi

mkdir -p "$CACHE_DIR"
if [ ! -s "$tarball" ]; then
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  echo "base-image: debootstrap --variant=minbase $SUITE from $mirror"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" \
    > "$CACHE_DIR/debootstrap.log" 2>&1 \
    || { tail -n 30 "$CACHE_DIR/debootstrap.log" >&2; exit 1; }
  # Keep it slim like the official image: no package caches, lists or docs.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  echo "deb $mirror $SUITE main" > "$rootfs/etc/apt/sources.list"
  # As in Debian's official images: apt keeps no package cache or .bin caches in image layers.
  cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  rm -f "$rootfs"/var/cache/apt/*.bin
  tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi

"$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tarball" "$TAG" >/dev/null
echo "base-image: imported $TAG ($("$DOCKER" image inspect -f '{{.Size}}' "$TAG" | numfmt --to=iec))"
