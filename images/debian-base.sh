#!/usr/bin/env bash
# A Python 3.11 base image made from Debian packages alone (mmdebstrap), for builds that reach a Debian mirror and
# a package index but no container registry: `make images BASE=debian` (images/build.sh) runs this.
#
#   images/debian-base.sh ENGINE TAG
#
#   DEBIAN_MIRROR           default http://deb.debian.org/debian (an internal mirror: its URL)
#   DEBIAN_SECURITY_MIRROR  default http://deb.debian.org/debian-security
#   DEBIAN_SUITE            default bookworm (Python 3.11 is bookworm's python3)
#
# It is laid out as the official python:3.11-slim image is, as far as the Dockerfiles see it: `python`, `python3`
# and `python3.11` on PATH (/usr/local/bin links to Debian's /usr/bin/python3.11), venv and ensurepip, the C
# headers (python3.11-dev), CA certificates, LANG=C.UTF-8 and CMD python3. Documentation and translations are left
# out (dpkg path-exclude, kept for later installs in the image). The mirror is what the image's apt sources name;
# proxy variables (http_proxy, ...) reach apt from the environment, never the image.
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: images/debian-base.sh ENGINE TAG" >&2; exit 2; }
engine="$1"
tag="$2"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
suite="${DEBIAN_SUITE:-bookworm}"

for url in "$mirror" "$security"; do
  if [[ "$url" =~ ://[^/@]+:[^/@]+@ ]]; then
    echo "images/debian-base.sh: a mirror URL with credentials would be written into the image's apt sources;" \
      "give the bare URL and the credentials in /etc/apt/auth.conf.d/ (apt_auth.conf(5))" >&2
    exit 2
  fi
done

command -v mmdebstrap > /dev/null 2>&1 || {
  echo "images/debian-base.sh: mmdebstrap is not installed (Debian: apt-get install mmdebstrap)" >&2
  exit 2
}

work="$(mktemp -d "${TMPDIR:-/tmp}/deepmedix-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT

packages=ca-certificates,netbase,tzdata,python3.11,python3.11-venv,python3.11-dev
echo "images/debian-base.sh: mmdebstrap $suite from $mirror ($packages)"
# shellcheck disable=SC2016 # mmdebstrap expands $1 (the new root) in its hooks
mmdebstrap --variant=minbase --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='mkdir -p "$1/usr/local/bin"' \
  --customize-hook='for n in python python3 python3.11; do ln -sf /usr/bin/python3.11 "$1/usr/local/bin/$n"; done' \
  --customize-hook='rm -f "$1"/etc/apt/apt.conf.d/99mmdebstrap "$1"/var/cache/ldconfig/aux-cache' \
  "$suite" "$work/rootfs.tar" \
  "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main"

env_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
case "$engine" in
  buildah)
    ctr="$(buildah from scratch)"
    buildah add "$ctr" "$work/rootfs.tar" / > /dev/null
    buildah config --env LANG=C.UTF-8 --env "PATH=$env_path" --cmd python3 \
      --label org.opencontainers.image.description="Python 3.11 on Debian $suite from Debian packages (mmdebstrap)" \
      "$ctr"
    buildah commit --quiet "$ctr" "$tag" > /dev/null
    buildah rm "$ctr" > /dev/null
    ;;
  docker | podman)
    "$engine" import --change 'ENV LANG=C.UTF-8' --change "ENV PATH=$env_path" --change 'CMD ["python3"]' \
      "$work/rootfs.tar" "$tag" > /dev/null
    ;;
  *)
    echo "images/debian-base.sh: ENGINE must be docker, podman or buildah, not '$engine'" >&2
    exit 2
    ;;
esac
echo "images/debian-base.sh: $engine: $tag"
