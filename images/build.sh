#!/usr/bin/env bash
# Build the three DeepMedix images from the repository root (the build context), with the first container engine
# that works: docker (its daemon reachable), podman, or buildah (`buildah bud`, daemonless: chroot isolation, and
# the vfs storage driver where overlay does not work). `make images` runs this.
#
#   REGISTRY   image repository prefix                 default ghcr.io/deepmedix
#   VERSION    image tag                               default: the version in pyproject.toml
#   PUSH       1: push each image after building it    default 0
#   IMAGES     which images, in order                  default "data train serving"
#   ENGINE     use this engine (docker, podman or buildah) instead of looking for one
#   BASE       the base image of every Dockerfile: empty for each Dockerfile's default
#              (docker.io/library/python:3.11.15-slim-bookworm), "debian" for a Python 3.11 base built from
#              Debian packages by images/debian-base.sh (no registry; DEBIAN_MIRROR etc. there), or any image
#   HOST_PIP   1 (default): the host's pip configuration, index URLs and CA bundle reach the build as build secrets
#              (images/pip_secrets.py; local index folders as read-only volumes with podman and buildah); 0: not
#   BUILD_ARGS extra arguments for every build (word-split), e.g. "--build-arg TORCH_INDEX=..."
#
# Tags: $REGISTRY/deepmedix-<image>:$VERSION (never "latest"). Exit status 2 when no engine can build, with a
# message that names the three engines. Proxy variables (HTTP_PROXY, HTTPS_PROXY, NO_PROXY and lower case) reach
# the builds' RUN steps without entering the image: podman and buildah pass them by default (--http-proxy), and
# for docker they are given as its predefined build arguments, which it leaves out of the image's history.
#
# Besides the engine, only bash builtins, python3 (the secrets; without it none are passed) and, for BASE=debian,
# mmdebstrap are used, so that it can be tested with a PATH holding fake engines.
set -euo pipefail
set -f  # no globbing: IMAGES and BUILD_ARGS are word-split, and cuda-toolkit[nvcc,cccl] is a pattern

here="${BASH_SOURCE[0]%/*}"
[[ "$here" == "${BASH_SOURCE[0]}" ]] && here=.
root="$(cd "$here/.." && pwd)"

REGISTRY="${REGISTRY:-ghcr.io/deepmedix}"
PUSH="${PUSH:-0}"
IMAGES="${IMAGES:-data train serving}"
ENGINE="${ENGINE:-}"
BUILD_ARGS="${BUILD_ARGS:-}"
BASE="${BASE:-}"
HOST_PIP="${HOST_PIP:-1}"
DEBIAN_BASE_TAG="${DEBIAN_BASE_TAG:-localhost/deepmedix-python:3.11-bookworm}"

die() {
  echo "images/build.sh: $*" >&2
  exit 2
}

project_version() {
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ ^version[[:space:]]*=[[:space:]]*\"([^\"]+)\" ]]; then
      echo "${BASH_REMATCH[1]}"
      return 0
    fi
  done < "$root/pyproject.toml"
  return 1
}

VERSION="${VERSION:-$(project_version)}" || die "no version = \"...\" line in $root/pyproject.toml; set VERSION"
[[ -n "$VERSION" && "$VERSION" != latest ]] || die "VERSION must be a version, not '${VERSION}'"

# An engine "works" when it can talk to what builds: the docker CLI alone, without a daemon, does not.
engine_works() {
  case "$1" in
    docker) command -v docker > /dev/null 2>&1 && docker info > /dev/null 2>&1 ;;
    podman) command -v podman > /dev/null 2>&1 && podman info > /dev/null 2>&1 ;;
    buildah) command -v buildah > /dev/null 2>&1 && buildah version > /dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}

find_engine() {
  local e found=""
  for e in docker podman buildah; do
    if engine_works "$e"; then
      echo "$e"
      return 0
    fi
    command -v "$e" > /dev/null 2>&1 && found+=" $e"
  done
  {
    echo "images/build.sh: no container engine can build here: install and start one of docker, podman or buildah"
    echo "  (tried docker: 'docker info', podman: 'podman info', buildah: 'buildah version')"
    [[ -n "$found" ]] && echo "  found but not working:$found (for docker: is the daemon running and reachable?)"
  } >&2
  return 1
}

if [[ -n "$ENGINE" ]]; then
  case "$ENGINE" in
    docker | podman | buildah) ;;
    *) die "ENGINE must be docker, podman or buildah, not '$ENGINE'" ;;
  esac
  engine_works "$ENGINE" || die "ENGINE=$ENGINE does not work here (not on PATH, or no daemon / service)"
  engine="$ENGINE"
else
  engine="$(find_engine)" || exit 2
fi

for image in $IMAGES; do
  [[ -f "$root/images/$image.Dockerfile" ]] || die "no $root/images/$image.Dockerfile (IMAGES: data, train, serving)"
done

# buildah without a daemon: chroot isolation (no OCI runtime needed), and vfs storage where overlay fails
if [[ "$engine" == buildah ]]; then
  export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
  if [[ -z "${STORAGE_DRIVER:-}" ]] && ! buildah info > /dev/null 2>&1; then
    export STORAGE_DRIVER=vfs
    echo "images/build.sh: buildah: the default storage driver does not work here; using vfs"
  fi
fi

opts=(--build-arg "VERSION=$VERSION")
case "$BASE" in
  "") ;;
  debian)
    "$BASH" "$root/images/debian-base.sh" "$engine" "$DEBIAN_BASE_TAG" \
      || die "BASE=debian: the Debian base did not build"
    opts+=(--build-arg "BASE=$DEBIAN_BASE_TAG")
    ;;
  *) opts+=(--build-arg "BASE=$BASE") ;;
esac

if [[ "$engine" == docker ]]; then
  export DOCKER_BUILDKIT=1  # RUN --mount=type=secret and --secret need BuildKit (the default since Docker 23)
  for var in HTTP_PROXY HTTPS_PROXY NO_PROXY FTP_PROXY http_proxy https_proxy no_proxy ftp_proxy; do
    [[ -n "${!var:-}" ]] && opts+=(--build-arg "$var")
  done
fi

secrets=""
cleanup() {
  [[ -n "$secrets" ]] && python3 -c 'import shutil, sys; shutil.rmtree(sys.argv[1], ignore_errors=True)' "$secrets"
  return 0
}
trap cleanup EXIT
if [[ "$HOST_PIP" == 1 ]]; then
  if command -v python3 > /dev/null 2>&1; then
    secrets="$(python3 -c 'import tempfile; print(tempfile.mkdtemp(prefix="deepmedix-pip-"))')"
    local_flag=()
    [[ "$engine" == docker ]] && local_flag=(--no-local)
    mounts="$(python3 "$root/images/pip_secrets.py" "$secrets" ${local_flag[@]+"${local_flag[@]}"})" \
      || die "could not read the host's pip configuration (HOST_PIP=0 builds without it)"
    opts+=(--secret "id=pip.conf,src=$secrets/pip.conf" --secret "id=ca.crt,src=$secrets/ca.crt")
    while IFS= read -r dir; do
      [[ -n "$dir" ]] && opts+=(--volume "$dir:$dir:ro")
    done <<< "$mounts"
    echo "images/build.sh: the host's pip configuration and CA bundle go to the builds as secrets"
  else
    echo "images/build.sh: no python3 here: the builds use pip's defaults, not the host's pip configuration" >&2
  fi
fi

# shellcheck disable=SC2206 # BUILD_ARGS is meant to be word-split
extra=($BUILD_ARGS)
for image in $IMAGES; do
  dockerfile="$root/images/$image.Dockerfile"
  tag="$REGISTRY/deepmedix-$image:$VERSION"
  echo "images/build.sh: $engine: building $tag from images/$image.Dockerfile"
  if [[ "$engine" == buildah ]]; then
    buildah bud --layers --file "$dockerfile" --tag "$tag" "${opts[@]}" ${extra[@]+"${extra[@]}"} "$root"
  else
    "$engine" build --file "$dockerfile" --tag "$tag" "${opts[@]}" ${extra[@]+"${extra[@]}"} "$root"
  fi
  if [[ "$PUSH" == 1 ]]; then
    echo "images/build.sh: $engine: pushing $tag"
    "$engine" push "$tag"
  fi
done
