#!/usr/bin/env bash
# Build docker/Dockerfile with podman on a machine without a reachable image registry, then smoke-run it as the
# image's non-root user with /outputs mounted (docs/containers.md, "Built and run here"). Run as root from anywhere:
#   sudo docker/build_local.sh            # apt-get install -y podman runc mmdebstrap first
# WORK (default /tmp/shelltrain-container) holds the Debian base tarball, containers.conf and the mounted outputs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/shelltrain-container}
image=${IMAGE:-localhost/shelltrain}
mkdir -p "$work"

# crun (podman's default runtime) fails here on setrlimit and the cgroup layout: runc with cgroupfs runs.
printf '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\n' >"$work/containers.conf"
export CONTAINERS_CONF=$work/containers.conf
podman_() { podman --runtime runc "$@"; }

# The base: Debian bookworm with python3 and venv, made locally (no registry to pull from).
if ! podman_ image exists localhost/bookworm-py; then
    [ -f "$work/base.tar" ] || nice -n 10 mmdebstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates bookworm "$work/base.tar"
    podman_ import "$work/base.tar" localhost/bookworm-py
fi

# This machine's pip settings become build arguments; local folders and the CA bundle are mounted read-only
# into the build at the same paths. Nothing of them stays in the image.
pip_get() { python3 -m pip config list 2>/dev/null | sed -n "s/^global\.$1='\(.*\)'\$/\1/p" | tail -n1; }
build_args=() mounts=()
find_links=$(pip_get find-links) extra_index=$(pip_get extra-index-url) cert=${PIP_CERT:-$(pip_get cert)}
for folder in $find_links; do
    [ -d "$folder" ] && mounts+=(-v "$folder:$folder:ro")
done
for url in $extra_index; do  # a local index (file:///x/simple) links its files beside it: mount its parent
    folder=$(dirname "${url#file://}")
    [[ $url == file://* && -d $folder ]] && mounts+=(-v "$folder:$folder:ro")
done
[ -n "$find_links" ] && build_args+=(--build-arg "PIP_FIND_LINKS=$find_links")
[ -n "$extra_index" ] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra_index")
[ -n "$cert" ] && mounts+=(-v "$cert:/etc/pip-host-ca.crt:ro") && build_args+=(--build-arg PIP_CERT=/etc/pip-host-ca.crt)

# The machine's constraints (e.g. caps at the torch releases it holds) apply to the build too. torch is the CUDA
# build from PyPI: PyPI's torchvision wheels need it (with a CPU torch their C ops fail to load).
constraint=$(pip_get constraint)
[ -n "$constraint" ] && mounts+=(-v "$constraint:/etc/pip-constraints.txt:ro") \
    && build_args+=(--build-arg PIP_CONSTRAINT=/etc/pip-constraints.txt)

start=$(date +%s)
nice -n 10 podman --runtime runc build --build-arg BASE=localhost/bookworm-py "${build_args[@]}" "${mounts[@]}" \
    -t "$image" -f "$repo/docker/Dockerfile" "$repo"
echo "build: $(($(date +%s) - start)) s"
podman_ images "$image"

# Smoke run as the image's user (uid 1000): the mounted folder must be writable by that uid.
outputs=$work/outputs
rm -rf "$outputs" && mkdir -p "$outputs" && chown 1000:1000 "$outputs"
start=$(date +%s)
podman_ run --rm -v "$outputs:/outputs" "$image" debug=smoke
echo "run: $(($(date +%s) - start)) s"
find "$outputs" -maxdepth 3 -printf '%U:%G %p\n' | sort
summary=$(ls "$outputs"/*/*/summary.json)
grep -q '"status": "completed"' "$summary" && [ "$(stat -c %u "$summary")" = 1000 ]
echo "smoke run completed: $summary, owned by uid 1000 on the host"
