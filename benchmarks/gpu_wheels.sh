#!/usr/bin/env bash
# Fill benchmarks/wheels/ with shelltrain's dependencies besides torch and torchvision, for a GPU machine that has
# its own torch but no network: benchmarks/gpu.sh installs from that folder offline. Run it on a machine with a
# package index, for the target's Python version and platform, and carry the folder with the checkout.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION] [PLATFORM] [FOLDER]   # defaults: 3.11 manylinux2014_x86_64
#                                                                        #           benchmarks/wheels
# antlr4-python3-runtime 4.9.3 (what hydra-core 1.3 pins) is published only as a source archive: its wheel is
# built here (pure Python, so one wheel fits every target). torch-pruning is fetched without its dependencies
# (torch, numpy: the target has them).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.11}
PLATFORM=${2:-manylinux2014_x86_64} # glibc 2.17 and newer: any current Linux
FOLDER=${3:-benchmarks/wheels}
PY=${PYTHON:-python3}
mkdir -p "$FOLDER"
"$PY" -m pip wheel -q --no-deps --wheel-dir "$FOLDER" "antlr4-python3-runtime==4.9.3"
TARGET=(--only-binary=:all: --python-version "$VERSION" --platform "$PLATFORM" --find-links "$FOLDER" --dest "$FOLDER")
"$PY" -m pip download -q "${TARGET[@]}" "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "rich>=13" \
  "scikit-learn>=1.3" "matplotlib>=3.7" "safetensors>=0.4" PyYAML
"$PY" -m pip download -q "${TARGET[@]}" --no-deps "torch-pruning>=1.6"
echo "$(find "$FOLDER" -name '*.whl' | wc -l) wheels for Python $VERSION on $PLATFORM in $FOLDER/ ($(du -sh "$FOLDER" | cut -f1)):"
echo "carry it with the checkout; benchmarks/gpu.sh installs what the GPU machine lacks from it"
