#!/usr/bin/env bash
# Build docker/Dockerfile and smoke-run the image as docs/containers.md says a user does: `mkdir -p outputs`, then
# `run --user "$(id -u):$(id -g)" -v "$PWD/outputs:/outputs" shelltrain debug=smoke`; it passes when the run
# completed and its files on the host belong to that uid. From anywhere:
#   docker/smoke.sh                                # podman, the Dockerfile's default base
#   ENGINE=docker docker/smoke.sh                  # ENGINE may carry options: ENGINE="podman --runtime runc"
#   BASE=localhost/debian-py docker/smoke.sh       # a base you already have (anything with python3 and venv)
#   DEBIAN_SUITE=bookworm BASE=localhost/debian-py docker/smoke.sh
#       # makes that base first with mmdebstrap (as root), for a host that reaches no image registry
# Build arguments pass through from the environment when set: EXTRAS, TORCH_INDEX_URL, USER_UID, and pip's
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT, PIP_CONSTRAINT (a mirror, a proxy's CA bundle). With
# podman, local paths among them (files, folders, file:// indexes) are mounted read-only into the build only.
# The run is as you; under sudo, as the user who called sudo (or RUN_AS=UID:GID). WORK: where outputs/ is made
# (default: a new folder under /tmp). IMAGE: the tag (default localhost/shelltrain).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
read -r -a engine <<<"${ENGINE:-podman}"
image=${IMAGE:-localhost/shelltrain}
work=${WORK:-$(mktemp -d /tmp/shelltrain-smoke.XXXXXX)}
run_as=${RUN_AS:-${SUDO_UID:-$(id -u)}:${SUDO_GID:-$(id -g)}}

if [ -n "${DEBIAN_SUITE:-}" ]; then
    : "${BASE:?DEBIAN_SUITE needs BASE, the name to give the base image}"
    if ! "${engine[@]}" image inspect "$BASE" >/dev/null 2>&1; then
        mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$DEBIAN_SUITE" "$work/base.tar"
        "${engine[@]}" import "$work/base.tar" "$BASE"
        rm "$work/base.tar"
    fi
fi

build_args=() mounts=()
for name in BASE EXTRAS TORCH_INDEX_URL USER_UID PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT \
    PIP_CONSTRAINT; do
    value=${!name:-}
    [ -n "$value" ] || continue
    build_args+=(--build-arg "$name=$value")
    for item in $value; do  # a local index (file:///x/simple) links its files beside it: mount its parent
        path=${item#file://}
        [[ $item == file://* ]] && path=$(dirname "$path")
        [[ $path == /* && -e $path ]] && mounts+=(-v "$path:$path:ro")
    done
done
if [ ${#mounts[@]} -gt 0 ] && [[ " ${engine[*]} " != *" podman "* ]]; then
    echo "docker/smoke.sh: local paths in pip's settings need podman (docker build mounts no folders)" >&2
    exit 2
fi

start=$(date +%s)
"${engine[@]}" build "${build_args[@]}" "${mounts[@]}" -t "$image" -f "$repo/docker/Dockerfile" "$repo"
echo "build: $(($(date +%s) - start)) s"
"${engine[@]}" images "$image"

# As the docs say: make outputs/ yourself first (the engine would make a missing one as root), run as yourself.
outputs=$work/outputs
mkdir -p "$outputs"
[ "$(id -u)" = 0 ] && chown "$run_as" "$outputs"  # what `mkdir -p outputs` by that user gives
start=$(date +%s)
"${engine[@]}" run --rm --user "$run_as" -v "$outputs:/outputs" "$image" debug=smoke
echo "run: $(($(date +%s) - start)) s"
find "$outputs" -maxdepth 3 -printf '%U:%G %p\n' | sort
summary=$(ls "$outputs"/*/*/summary.json)
grep -q '"status": "completed"' "$summary"
owners=$(find "$outputs" -mindepth 1 -printf '%U\n' | sort -u)
[ "$owners" = "${run_as%%:*}" ] || { echo "files owned by uids: $owners, not ${run_as%%:*}" >&2; exit 1; }
echo "smoke run completed: $summary, every file owned by uid ${run_as%%:*}"
