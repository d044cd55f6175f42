#!/usr/bin/env bash
# Fill benchmarks/wheels/ with the packages a GPU machine without network lacks, for benchmarks/gpu.sh to install
# offline. Run it on a machine with a package index and copy the folder to the GPU machine with the checkout (it
# is about 1.3 MB by default: small enough to travel with a checkout).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION [PACKAGE ...]]   # default: 3.12 and the packages below
#
# The default packages are what a GPU machine's Python that has torch, torchvision and the usual scientific
# packages (numpy, scipy, scikit-learn, matplotlib, pillow, rich, PyYAML, safetensors, packaging) lacks of
# shelltrain's dependencies: hydra-core, omegaconf, antlr4-python3-runtime and torch-pruning, all pure Python, plus
# setuptools to build shelltrain there. Each is fetched without its dependencies (gpu.sh installs them with
# --no-deps): name every further package gpu.sh reports missing. antlr4-python3-runtime 4.9.3 (what hydra-core 1.3
# pins) is published only as a source archive: its wheel is built here (pure Python, one wheel fits every target).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.12}
shift $(($# > 0 ? 1 : 0))
PACKAGES=("$@")
((${#PACKAGES[@]})) || PACKAGES=(hydra-core omegaconf antlr4-python3-runtime torch-pruning setuptools)
FOLDER=benchmarks/wheels
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$FOLDER"
for package in "${PACKAGES[@]}"; do
  case $package in # the versions shelltrain's pyproject asks for
    hydra-core) package="hydra-core>=1.3.2,<1.4" ;;
    omegaconf) package="omegaconf>=2.3,<2.4" ;;
    antlr4-python3-runtime) package=antlr4-python3-runtime==4.9.3 ;;
    torch-pruning) package="torch-pruning>=1.6" ;;
    setuptools) package="setuptools>=70.1" ;;
  esac
  if [[ $package == antlr4-python3-runtime* ]]; then
    "$PY" -m pip wheel -q --no-deps --wheel-dir "$FOLDER" "$package"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
      "${PLATFORMS[@]}" --dest "$FOLDER" "$package"
  fi
done
echo "$(find "$FOLDER" -name '*.whl' | wc -l) wheels for Python $VERSION in $FOLDER/ ($(du -sh "$FOLDER" | cut -f1)):"
echo "carry it with the checkout; benchmarks/gpu.sh installs what the GPU machine lacks from it"
