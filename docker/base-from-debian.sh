#!/bin/sh
# A local stand-in for python:3.11-slim, for a Docker host that reaches a Debian mirror and PyPI but not
# Docker Hub: Debian bookworm (minbase, the base of python:3.11-slim too) with Debian's Python 3.11 as a
# virtual environment at /usr/local, so that `python` and `pip` are on PATH as in the official image, and
# the CA certificates this host trusts locally (/usr/local/share/ca-certificates), for a proxy that
# re-signs TLS. Needs root, debootstrap and a running Docker engine.
#
#   sh docker/base-from-debian.sh [TAG]        # TAG defaults to deepopt-base:bookworm-py3.11
#   docker build --build-arg BASE_IMAGE=deepopt-base:bookworm-py3.11 -f docker/Dockerfile -t deepopt:latest .
#
# DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian).
set -eu

tag=${1:-deepopt-base:bookworm-py3.11}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { echo "base-from-debian: $tool is not installed" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "base-from-debian: debootstrap and chroot need root" >&2; exit 2; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# python3-pip as well: without it, debootstrap failed here to configure python3.11-venv.
debootstrap --variant=minbase --include=ca-certificates,netbase,tzdata,python3.11,python3.11-venv,python3-pip \
    bookworm "$root" "$mirror"
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"   # for pip below; Docker writes the container's own
chroot "$root" python3.11 -m venv /usr/local
chroot "$root" /usr/local/bin/pip install --no-cache-dir --upgrade pip
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/local/bin/Activate.ps1 \
    "$root"/usr/local/bin/activate*
: > "$root/etc/resolv.conf"

tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$tag"
echo "base-from-debian: built $tag ($(docker run --rm "$tag" python --version))"
