#!/usr/bin/env bash
# The GPU check: one prepared command that runs every CUDA path of shelltrain once, small, through the real CLI,
# asserts what each is for, then measures training throughput against a plain loop. One ok/FAIL line per section
# (a failure shows the end of its log), one summary table at the end, exit status 1 when a section failed.
#
#   bash benchmarks/gpu.sh                      # every section, within 6 minutes on one GPU, the install included
#   bash benchmarks/gpu.sh --list               # the sections, their time limits and what each checks
#   SECTIONS="ema tta" bash benchmarks/gpu.sh   # only these (or: bash benchmarks/gpu.sh ema tta)
#   REHEARSE=cpu bash benchmarks/gpu.sh         # the same sections on the CPU, tiny, to check the script itself
#
# The sections are in benchmarks/gpu_sections.sh. Each runs in a session of its own under `timeout -k`: at its limit
# it gets SIGTERM, 5 s later SIGKILL, and whatever it started is killed before the next section begins. The limits
# are clipped to what is left of the total budget (GPU_CHECK_BUDGET seconds from the start, the install included).
#
# Everything goes under one folder, GPU_CHECK_DIR (default /tmp/shelltrain-gpu-check): site/ (shelltrain and what
# the machine lacks, kept for the next call), runs/ (one run directory per run), logs/ (one log per section),
# cache/ (compile caches, kept), tmp/ and summary.txt. PYTHON picks the interpreter (default python3).
#
# A bare GPU machine (its own torch, no network) may lack shelltrain's other dependencies: they are installed
# offline from benchmarks/wheels/, which benchmarks/gpu_wheels.sh fills beforehand on a machine with a package
# index. Carry that folder with the checkout. Nothing is installed into the machine's Python: packages and
# shelltrain go into site/ (pip --target; GPU_CHECK_SITE names another folder), which is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
PY=${PYTHON:-python3}
WHEELS=$ROOT/benchmarks/wheels
OUT=${GPU_CHECK_DIR:-/tmp/shelltrain-gpu-check}
SITE=${GPU_CHECK_SITE:-$OUT/site}
RUNS=$OUT/runs LOGS=$OUT/logs
source "$ROOT/benchmarks/gpu_sections.sh" # SECTION_NAMES, SECTION_LIMIT, SECTION_ABOUT and the section_* functions

# -- which sections -------------------------------------------------------------------------------------------
case ${1:-} in
  -l | --list)
    for name in "${SECTION_NAMES[@]}"; do
      printf '%-14s %4ss  %s\n' "$name" "${SECTION_LIMIT[$name]}" "${SECTION_ABOUT[$name]}"
    done
    exit 0
    ;;
  -h | --help)
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
esac
read -ra asked <<<"$(echo "${SECTIONS:-} $*" | tr , ' ')" # names separated by spaces or commas
SELECTED=()
for name in "${SECTION_NAMES[@]}"; do
  if ((${#asked[@]} == 0)) || [[ " ${asked[*]} " == *" $name "* ]]; then SELECTED+=("$name"); fi
done
for name in "${asked[@]}"; do
  [[ -n ${SECTION_LIMIT[$name]:-} ]] && continue
  echo "gpu.sh: no section '$name'; the sections: ${SECTION_NAMES[*]}"
  exit 2
done

# -- what this machine needs: shelltrain's dependencies besides torch and torchvision --------------------------
# Everything goes into a folder of its own on PYTHONPATH (pip --target): no write to the system's Python, which may
# be read-only or refuse pip (PEP 668). Missing packages come from benchmarks/wheels/, without their dependencies.
MODULES=(hydra omegaconf antlr4 torch_pruning rich sklearn matplotlib safetensors yaml packaging)
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime torch-pruning rich scikit-learn matplotlib safetensors PyYAML
  packaging)
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, torchvision" \
  || { echo "gpu.sh: $PY has no torch/torchvision; PYTHON=... names one that has"; exit 2; }
missing_packages() { # the packages of the modules this Python cannot import, in one process
  local i
  for i in "${!MODULES[@]}"; do echo "${MODULES[$i]} ${PACKAGES[$i]}"; done | "$PY" -c '
import importlib, sys
for line in sys.stdin:
    module, package = line.split()
    try:
        importlib.import_module(module)
    except Exception:
        print(package)'
}
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
mapfile -t missing < <(missing_packages)
carry="run 'bash benchmarks/gpu_wheels.sh $pyver ${missing[*]}' on a machine with a package index and carry"
carry+=" benchmarks/wheels/ here"
if ((${#missing[@]})) && ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu.sh: missing ${missing[*]} and no benchmarks/wheels/: $carry"
  exit 2
fi
mkdir -p "$OUT/tmp" "$OUT/cache" "$SITE"
export TMPDIR=$OUT/tmp XDG_CACHE_HOME=$OUT/cache TORCH_HOME=$OUT/cache/torch MPLCONFIGDIR=$OUT/cache/matplotlib \
  TORCHINDUCTOR_CACHE_DIR=$OUT/cache/inductor TRITON_CACHE_DIR=$OUT/cache/triton PIP_NO_CACHE_DIR=1
pip_install() { # at most 120 s
  timeout -k 5 120 "$PY" -m pip install -q --no-deps --upgrade --target "$SITE" "$@"
}
if ((${#missing[@]})); then
  echo "installing ${missing[*]} offline from benchmarks/wheels/ into $SITE"
  pip_install --no-index --find-links "$WHEELS" "${missing[@]}" \
    || { echo "gpu.sh: the offline install from benchmarks/wheels/ failed (a package not there?): $carry"; exit 2; }
  mapfile -t missing < <(missing_packages)
  ((${#missing[@]} == 0)) || { echo "gpu.sh: still not importable: ${missing[*]} (or what they need): $carry"; exit 2; }
fi
# This checkout, built from a copy (the build's files stay out of the checkout) into the same folder (setuptools from
# the environment, else from the wheels). The sections run in that folder, so that the checkout's source tree
# (without configs/ inside the package) does not shadow it; shelltrain.configs must import from there.
rm -rf "$OUT/src" && mkdir -p "$OUT/src" && cp -r pyproject.toml README.md shelltrain configs "$OUT/src/"
build() {
  pip_install --no-build-isolation . 2>/dev/null || pip_install --no-index --find-links "$WHEELS" .
}
(cd "$OUT/src" && build) ||
  { echo "gpu.sh: shelltrain does not build here (it needs setuptools>=70.1: add it to benchmarks/wheels/)"; exit 2; }
cd "$SITE"
"$PY" -c '
import importlib.resources, os, sys
import shelltrain, shelltrain.configs
where = os.path.realpath(shelltrain.__file__)
assert where.startswith(os.path.realpath(sys.argv[1]) + os.sep), f"shelltrain imports from {where}"
assert importlib.resources.files("shelltrain.configs").joinpath("train.yaml").is_file(), "no train.yaml"
' "$SITE" || { echo "gpu.sh: the installed shelltrain lacks shelltrain.configs (above): the build went wrong"; exit 2; }
INSTALL_SECONDS=$((SECONDS - START))
echo "shelltrain installed into $SITE (${INSTALL_SECONDS}s)"

# -- the settings the sections read ---------------------------------------------------------------------------
if [[ ${REHEARSE:-} == cpu ]]; then # no GPU: every section on the CPU, tiny, with 4x the limits
  DEVICE=cpu GPUS=1 SCALE=4 BUDGET=${GPU_CHECK_BUDGET:-2400}
  MODEL=(model=cnn model.width=8) SAMPLES=256 WIDTH=8 TEACHER_EPOCHS=1 LR_STEPS=20
  DIGITS_LIMIT=(data.limit_samples=300) VMAP=(ensemble.vmap=true) TIMM_MODEL=test_resnet TIMM_PRECISION=()
else
  DEVICE=cuda SCALE=1 BUDGET=${GPU_CHECK_BUDGET:-345}
  MODEL=(model=resnet18 model.small_input=true) SAMPLES=2048 WIDTH=16 TEACHER_EPOCHS=6 LR_STEPS=100
  DIGITS_LIMIT=() VMAP=() TIMM_MODEL=resnet10t TIMM_PRECISION=(trainer.precision=bf16)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch as t; print('torch', t.__version__, 'cuda', t.version.cuda, t.cuda.get_device_name(0))" ||
    { echo "gpu.sh: torch sees no CUDA device"; exit 2; }
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi
SYNTH=(data=synthetic data.num_samples=$SAMPLES 'data.mean=[0.5]' 'data.std=[0.29]' data.batch_size=128
  trainer.device=$DEVICE plots=false)
SMALL=("${MODEL[@]}" "${SYNTH[@]}")
CNN=(model=cnn model.width=$WIDTH data=synthetic data.num_samples=$((SAMPLES / 2)) 'data.mean=[0.5]' 'data.std=[0.29]'
  data.batch_size=128 trainer.device=$DEVICE plots=false)
DIGITS=(model=cnn model.width=$WIDTH data=digits "${DIGITS_LIMIT[@]}" trainer.device=$DEVICE plots=false)
FOLDER=(model=cnn model.width=$WIDTH data=imagefolder data.root="$RUNS/images" data.image_size=64
  data.cache_dir="$RUNS/cache" trainer.device=$DEVICE plots=false)
rm -rf "$RUNS" "$LOGS" "$OUT/summary.txt"
mkdir -p "$RUNS" "$LOGS"
declare -p PY ROOT RUNS DEVICE GPUS SAMPLES SYNTH SMALL CNN DIGITS FOLDER TEACHER_EPOCHS LR_STEPS VMAP TIMM_MODEL \
  TIMM_PRECISION >"$OUT/settings.sh"

# -- running a section ----------------------------------------------------------------------------------------
if command -v setsid >/dev/null; then
  SETSID=(setsid)
else # a session of its own through Python
  SETSID=("$PY" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])')
fi
NAMES=(install) RESULTS=(ok) TIMES=("$INSTALL_SECONDS") LIMITS=(120)
CURRENT=
stop() { # Ctrl-C or SIGTERM: end the running section and everything it started
  [[ -n $CURRENT ]] && kill -KILL -- "-$CURRENT" 2>/dev/null
  echo
  echo "gpu.sh: stopped after $((SECONDS - START))s (logs under $LOGS)"
  exit 130
}
trap stop INT TERM

run_section() { # run_section NAME: section_NAME at most its limit (clipped to the budget); one result line
  local name=$1 log=$LOGS/$1.log notes=$LOGS/$1.notes began=$SECONDS limit left rc result word
  limit=$((SECTION_LIMIT[$name] * SCALE)) left=$((BUDGET - (SECONDS - START) - 5))
  ((limit > left)) && limit=$left
  : >"$notes"
  if ((limit < 10)); then
    result="FAIL (not run: the ${BUDGET}s budget is spent)"
  else
    NOTES=$notes "${SETSID[@]}" timeout -k 5 "$limit" bash -c \
      'set -euo pipefail; source "$1"; source "$2"; cd "$3"; "section_${4//-/_}"' \
      _ "$ROOT/benchmarks/gpu_sections.sh" "$OUT/settings.sh" "$SITE" "$name" >"$log" 2>&1 </dev/null &
    CURRENT=$!
    wait "$CURRENT"
    rc=$?
    kill -KILL -- "-$CURRENT" 2>/dev/null # what the section left running (a run finishing after SIGTERM, workers)
    CURRENT=
    case $rc in
      0) result=ok ;;
      77) result="skipped: $(sed -n 's/^SKIP: //p' "$log" | tail -n 1)" ;;
      124 | 137)
        result="FAIL (over ${limit}s)"
        echo "gpu.sh: stopped at the section's limit, ${limit}s" >>"$log"
        ;;
      *) result="FAIL (exit $rc)" ;;
    esac
  fi
  NAMES+=("$name") RESULTS+=("$result") TIMES+=($((SECONDS - began))) LIMITS+=("$limit")
  case $result in ok) word=ok ;; skipped*) word=skip ;; *) word=FAIL ;; esac
  printf '%-4s %-14s %4ss  %s\n' "$word" "$name" $((SECONDS - began)) "${SECTION_ABOUT[$name]}"
  if [[ $result == FAIL* ]]; then
    echo "     $result; the end of $log:"
    tail -n 15 "$log" 2>/dev/null | sed 's/^/     | /'
  elif [[ $result == skipped* ]]; then
    echo "     $result"
  fi
  sed 's/^/     · /' "$notes"
}

echo "sections: ${SELECTED[*]} (on $DEVICE; ${BUDGET}s in all from the start, $((SECONDS - START))s spent)"
for name in "${SELECTED[@]}"; do
  run_section "$name"
done

# -- one table ------------------------------------------------------------------------------------------------
failed=0 skipped=0
{
  echo
  printf '%-14s %-50s %7s %6s\n' section result seconds limit
  for i in "${!NAMES[@]}"; do
    printf '%-14s %-50s %7s %6s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}" "${LIMITS[$i]}"
  done
} | tee "$OUT/summary.txt"
for result in "${RESULTS[@]}"; do
  [[ $result == FAIL* ]] && failed=$((failed + 1))
  [[ $result == skipped* ]] && skipped=$((skipped + 1))
done
echo "gpu.sh: $failed of ${#SELECTED[@]} sections failed, $skipped skipped, $((SECONDS - START))s in all on $DEVICE" \
  "(runs, logs and this table under $OUT)" | tee -a "$OUT/summary.txt"
((failed == 0))
