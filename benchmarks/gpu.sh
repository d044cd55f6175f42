#!/usr/bin/env bash
# One prepared command for a lent GPU machine: every CUDA-only path of shelltrain once, small, then training
# throughput against a plain loop. Each section has its own time limit, the whole script ends within 5 minutes,
# one summary table closes it, and the exit status is non-zero when any section failed.
#
#   bash benchmarks/gpu.sh            # PYTHON=/path/to/python picks the interpreter (default python3)
#   REHEARSE=cpu bash benchmarks/gpu.sh   # the same sections on the CPU, smaller, to check the script itself
#
# A bare GPU machine (its own torch, no network) may lack shelltrain's other dependencies: they are installed
# offline from benchmarks/wheels/, which benchmarks/gpu_wheels.sh fills beforehand on a machine with a package
# index. Carry that folder with the checkout. GPU_CHECK_SITE names the folder they and shelltrain go to.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=$ROOT/benchmarks/wheels
SITE=${GPU_CHECK_SITE:-/tmp/shelltrain-gpu-site} # shelltrain and what this machine lacks, installed for the check
OUT=${GPU_CHECK_DIR:-/tmp/shelltrain-gpu-check}
START=$SECONDS
BUDGET=290 # seconds for all sections together
NAMES=() RESULTS=() TIMES=()

section() { # section LIMIT NAME COMMAND...: at most LIMIT seconds, never past the budget; the result is recorded
  local limit=$1 name=$2 left=$((BUDGET - (SECONDS - START))) began=$SECONDS rc
  shift 2
  ((limit > left)) && limit=$left
  echo
  echo "== $name  (limit ${limit}s, at $((SECONDS - START))s)"
  if ((limit <= 5)); then
    rc="FAILED (not run: no time left)"
  else
    if declare -F "$1" >/dev/null; then # a function of this script: timeout runs programs, so a bash runs it
      timeout "$limit" bash -c "$(declare -p ST SMALL CNN OUT PY GPUS DEVICE SAMPLES); $(declare -f); \"\$@\"" _ "$@"
    else
      timeout "$limit" "$@"
    fi
    rc=$?
    case $rc in 0) rc=ok ;; 124) rc="FAILED (over ${limit}s)" ;; *) rc="FAILED (exit $rc)" ;; esac
  fi
  NAMES+=("$name") RESULTS+=("$rc") TIMES+=($((SECONDS - began)))
}

skip() { # skip NAME WHY
  NAMES+=("$1") RESULTS+=("skipped: $2") TIMES+=(0)
}

# -- what this machine needs: shelltrain's dependencies besides torch and torchvision --------------------------
# Everything goes into a folder of its own on PYTHONPATH (pip --target): no write to the system's Python, which may
# be read-only or refuse pip (PEP 668). Missing packages come from benchmarks/wheels/, without their dependencies.
MODULES=(hydra omegaconf antlr4 torch_pruning rich sklearn matplotlib safetensors yaml packaging)
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime torch-pruning rich scikit-learn matplotlib safetensors PyYAML
  packaging)
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, torchvision" || { echo "gpu.sh: $PY has no torch/torchvision; PYTHON=... names one that has"; exit 2; }
missing_packages() {
  local i
  for i in "${!MODULES[@]}"; do
    "$PY" -c "import ${MODULES[$i]}" 2>/dev/null || echo "${PACKAGES[$i]}"
  done
}
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
mapfile -t missing < <(missing_packages)
if ((${#missing[@]})); then
  carry="run 'bash benchmarks/gpu_wheels.sh $pyver ${missing[*]}' on a machine with a package index and carry"
  carry+=" benchmarks/wheels/ here"
  compgen -G "$WHEELS/*.whl" >/dev/null || { echo "gpu.sh: missing ${missing[*]} and no benchmarks/wheels/: $carry"; exit 2; }
  echo "installing ${missing[*]} offline from benchmarks/wheels/ into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --upgrade --find-links "$WHEELS" --target "$SITE" "${missing[@]}" \
    || { echo "gpu.sh: the offline install from benchmarks/wheels/ failed (a package not there?): $carry"; exit 2; }
  mapfile -t missing < <(missing_packages)
  ((${#missing[@]} == 0)) || { echo "gpu.sh: still not importable: ${missing[*]} (or what they need): $carry"; exit 2; }
fi
# This checkout, built into the same folder (setuptools from the environment, else from the wheels); the sections
# then run outside the checkout, so that its source tree (without configs/ inside the package) does not shadow it.
"$PY" -m pip install -q --no-deps --upgrade --no-build-isolation --target "$SITE" . 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --upgrade --no-index --find-links "$WHEELS" --target "$SITE" . \
  || { echo "gpu.sh: shelltrain does not build here (it needs setuptools>=70.1: add it to benchmarks/wheels/)"; exit 2; }
cd "$SITE"
DEVICE=cuda MODEL=(model=resnet18 model.small_input=true) SAMPLES=2048
if [[ ${REHEARSE:-} == cpu ]]; then # no GPU: every section on the CPU with a narrow cnn (throughput is skipped)
  DEVICE=cpu MODEL=(model=cnn model.width=8) SAMPLES=256 GPUS=1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    || { echo "gpu.sh: torch sees no CUDA device"; exit 2; }
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi

# -- the CUDA-only paths, each a small real run -------------------------------------------------------------
rm -rf "$OUT"
ST=("$PY" -m shelltrain)
SMALL=("${MODEL[@]}" data=synthetic data.num_samples=$SAMPLES 'data.mean=[0.5]' 'data.std=[0.29]'
  data.batch_size=128 trainer.device=$DEVICE plots=false)
CNN=(model=cnn model.width=16 data=synthetic data.num_samples=$((SAMPLES / 2)) 'data.mean=[0.5]' 'data.std=[0.29]'
  data.batch_size=128 trainer.device=$DEVICE plots=false)

resume_on_cuda() { # momentum state restored onto the GPU: the first step after resuming must not mix devices
  "${ST[@]}" "${SMALL[@]}" optimizer=momentum scheduler=step trainer.epochs=1 hydra.run.dir="$OUT/resume" &&
    "${ST[@]}" "${SMALL[@]}" optimizer=momentum scheduler=step trainer.epochs=2 trainer.resume="$OUT/resume" &&
    grep -q '"epochs_completed": 2' "$OUT/resume/summary.json"
}
fp16_scaler() { # GradScaler with grad clipping, the scaler's state in the checkpoint
  "${ST[@]}" "${SMALL[@]}" trainer.precision=16-mixed trainer.grad_clip=1.0 trainer.epochs=2 \
    hydra.run.dir="$OUT/fp16" &&
    "$PY" -c "import torch; c = torch.load('$OUT/fp16/checkpoints/last.pt', weights_only=True); \
print('checkpoint scaler state:', c['scaler']); assert c['scaler'], 'no scaler state'"
}
int8_evaluate() { # a dynamic-int8 model evaluated with trainer.device=cuda: it must run on the CPU
  "${ST[@]}" "${CNN[@]}" trainer.epochs=1 prune=quantize prune.mode=dynamic hydra.run.dir="$OUT/int8" &&
    "${ST[@]}" "${CNN[@]}" task=evaluate model.weights="$OUT/int8" hydra.run.dir="$OUT/int8-evaluate" &&
    grep -q '"device": "cpu"' "$OUT/int8-evaluate/summary.json"
}

cached_folder() { # decode a JPEG folder once (data.cache); train on the GPU with batched rotation/scale/crop/flip:
  # first on the device (disk cache, data.on_device), then from RAM (memory: batches gathered on the CPU, copied)
  "$PY" -c "
import numpy as np, os; from PIL import Image
rng = np.random.default_rng(0)
for c in range(4):
    os.makedirs('$OUT/images/train/%d' % c, exist_ok=True)
    for i in range($SAMPLES // 16):
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save('$OUT/images/train/%d/%d.jpg' % (c, i))
" && for run in "first disk true" "second memory false"; do
    set -- $run
    "${ST[@]}" model=cnn model.width=16 data=imagefolder data.root="$OUT/images" data.image_size=64 \
      data.cache="$2" data.cache_dir="$OUT/cache" data.on_device="$3" augmentation=seed trainer.device=$DEVICE \
      trainer.epochs=2 plots=false hydra.run.dir="$OUT/cached-$1" || return 1
  done && grep -q "reused decoded cache" "$OUT/cached-second/train.log"
}

section 40 "resume on CUDA (momentum state)" resume_on_cuda
section 25 "fp16 + GradScaler" fp16_scaler
section 20 "bf16" "${ST[@]}" "${SMALL[@]}" trainer.precision=bf16 trainer.channels_last=false trainer.epochs=1 \
  hydra.run.dir="$OUT/bf16"
section 20 "channels_last (bf16)" "${ST[@]}" "${SMALL[@]}" trainer.precision=bf16 trainer.channels_last=true \
  trainer.epochs=1 hydra.run.dir="$OUT/channels-last"
section 20 "on-device data + augmentation" "${ST[@]}" "${SMALL[@]}" data.on_device=true augmentation=basic \
  trainer.epochs=2 hydra.run.dir="$OUT/on-device"
section 30 "cached image folder (disk on the device, then memory) + batched rotation/scale" cached_folder
if ((GPUS > 1)); then
  section 45 "DDP on $GPUS GPUs, on-device data" "${ST[@]}" "${SMALL[@]}" trainer.devices="$GPUS" data.on_device=true \
    trainer.epochs=2 hydra.run.dir="$OUT/ddp"
else
  skip "DDP" "one GPU"
fi
section 30 "int8 evaluation (runs on the CPU)" int8_evaluate
section 30 "ensemble of 3 (vmap on CUDA)" "${ST[@]}" "${CNN[@]}" ensemble=average ensemble.members=3 trainer.epochs=1 \
  hydra.run.dir="$OUT/ensemble"
section 70 "torch.compile (bf16, on-device)" "${ST[@]}" "${SMALL[@]}" trainer.compile=true trainer.precision=bf16 \
  data.on_device=true trainer.epochs=2 hydra.run.dir="$OUT/compile"
# images/s of shelltrain's engine and of a plain loop, same model and data (the table prints absolute numbers)
if [[ $DEVICE == cuda ]]; then
  section 45 "throughput: ResNet-18 32x32 bf16, on-device vs DataLoader, shelltrain vs plain" \
    "$PY" "$ROOT/benchmarks/throughput.py" --device cuda --data synthetic --precision bf16 --channels-last on --rounds 2 \
    --model resnet18 --small-input --image-size 32 --batch-size 512 --samples 16384 --workers 8
else
  skip "throughput" "a CPU rehearsal"
fi

# -- one table ------------------------------------------------------------------------------------------------
echo
printf '%-62s %-26s %s\n' section result seconds
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-62s %-26s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
  [[ ${RESULTS[$i]} == FAILED* ]] && failed=$((failed + 1))
done
echo "gpu.sh: $failed of ${#NAMES[@]} sections failed, $((SECONDS - START))s (run directories under $OUT)"
((failed == 0))
