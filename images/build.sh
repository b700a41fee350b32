#!/usr/bin/env bash
# Build the three DeepMedix images from the repository root (the build context), with the first container engine
# that works: docker (its daemon reachable), podman, or buildah (`buildah bud`). `make images` runs this.
#
#   REGISTRY   image repository prefix                 default ghcr.io/deepmedix
#   VERSION    image tag                               default: the version in pyproject.toml
#   PUSH       1: push each image after building it    default 0
#   IMAGES     which images, in order                  default "data train serving"
#   ENGINE     use this engine (docker, podman or buildah) instead of looking for one
#   BUILD_ARGS extra arguments for every build (word-split), e.g. "--build-arg TORCH_INDEX=..."
#
# Tags: $REGISTRY/deepmedix-<image>:$VERSION (never "latest"). Exit status 2 when no engine can build, with a
# message that names the three engines.
#
# Only bash builtins are used besides the engine itself, so that it can be tested with a PATH holding nothing else.
set -euo pipefail

here="${BASH_SOURCE[0]%/*}"
[[ "$here" == "${BASH_SOURCE[0]}" ]] && here=.
root="$(cd "$here/.." && pwd)"

REGISTRY="${REGISTRY:-ghcr.io/deepmedix}"
PUSH="${PUSH:-0}"
IMAGES="${IMAGES:-data train serving}"
ENGINE="${ENGINE:-}"
BUILD_ARGS="${BUILD_ARGS:-}"

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

# shellcheck disable=SC2206 # BUILD_ARGS is meant to be word-split
extra=($BUILD_ARGS)
for image in $IMAGES; do
  dockerfile="$root/images/$image.Dockerfile"
  [[ -f "$dockerfile" ]] || die "no $dockerfile (IMAGES: data, train, serving)"
  tag="$REGISTRY/deepmedix-$image:$VERSION"
  echo "images/build.sh: $engine: building $tag from images/$image.Dockerfile"
  if [[ "$engine" == buildah ]]; then
    buildah bud --file "$dockerfile" --tag "$tag" --build-arg "VERSION=$VERSION" ${extra[@]+"${extra[@]}"} "$root"
  else
    "$engine" build --file "$dockerfile" --tag "$tag" --build-arg "VERSION=$VERSION" ${extra[@]+"${extra[@]}"} "$root"
  fi
  if [[ "$PUSH" == 1 ]]; then
    echo "images/build.sh: $engine: pushing $tag"
    "$engine" push "$tag"
  fi
done
