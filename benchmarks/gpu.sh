#!/usr/bin/env bash
# One prepared command for a lent GPU (one H200-class card): training throughput of ResNet-18 (32x32, CIFAR
# stem) and ResNet-50 (224x224) on synthetic data with bf16 + channels_last, eager vs torch.compile, on-device
# data vs DataLoader, shelltrain vs a plain loop; then the CUDA branches of fp16 + GradScaler and of the full
# command (on-device data, pinned memory, checkpointed scaler). No DDP. Every section has its own time limit,
# so the whole script ends within 5 minutes even if one section is slow; each prints its own table.
#
#   bash benchmarks/gpu.sh                     # PYTHON=/path/to/python picks the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
START=$SECONDS
BUDGET=285  # seconds for all sections together
section() {  # section LIMIT_SECONDS TITLE COMMAND...: at most LIMIT, and never past the budget
  local limit=$1 title=$2 left=$((BUDGET - (SECONDS - START)))
  shift 2
  ((limit > left)) && limit=$left
  echo
  echo "== $title  (limit ${limit}s, at $((SECONDS - START))s)"
  ((limit > 5)) || { echo "(skipped: out of time)"; return; }
  timeout "$limit" "$@" || echo "(section ended with exit code $?)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# An editable install made elsewhere may point at another checkout: install this one (offline, no dependencies).
"$PY" -c "import shelltrain.configs" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "shelltrain is not importable here: pip install -e . first"; exit 1; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

BENCH=("$PY" benchmarks/throughput.py --device cuda --data synthetic --precision bf16 --channels-last on --rounds 3)
R18=(--model resnet18 --small-input --image-size 32 --batch-size 512 --samples 16384)
R50=(--model resnet50 --image-size 224 --batch-size 128 --samples 2560 --batches 20)

section 40 "ResNet-18 32x32 bf16: shelltrain vs plain, on-device vs DataLoader (8 workers), eager" \
  "${BENCH[@]}" "${R18[@]}" --workers 8
section 65 "ResNet-18 32x32 bf16 + torch.compile, on-device: shelltrain vs plain" \
  "${BENCH[@]}" "${R18[@]}" --compile on --data-paths device
section 40 "ResNet-50 224x224 bf16: shelltrain vs plain, on-device vs DataLoader (8 workers), eager" \
  "${BENCH[@]}" "${R50[@]}" --workers 8
section 70 "ResNet-50 224x224 bf16 + torch.compile, on-device, shelltrain" \
  "${BENCH[@]}" "${R50[@]}" --compile on --data-paths device --loops shelltrain
section 30 "fp16 + GradScaler vs bf16 on CUDA, ResNet-18 224x224, on-device" \
  "$PY" benchmarks/throughput.py --device cuda --data synthetic --model resnet18 --image-size 224 --batch-size 128 \
  --samples 1280 --batches 10 --rounds 2 --precision 16-mixed bf16 --data-paths device
rm -rf /tmp/shelltrain-gpu-check
section 35 "the full command on CUDA: fp16, grad clipping, on-device data, 2 epochs, checkpointed scaler" \
  "$PY" -m shelltrain model=resnet18 model.small_input=true data=synthetic data.num_samples=4096 \
  'data.mean=[0.5]' 'data.std=[0.29]' data.batch_size=256 data.on_device=true augmentation=basic \
  trainer.precision=16-mixed trainer.grad_clip=1.0 trainer.epochs=2 plots=false hydra.run.dir=/tmp/shelltrain-gpu-check
"$PY" -c "import torch; c = torch.load('/tmp/shelltrain-gpu-check/checkpoints/last.pt', weights_only=True); \
print('checkpoint scaler state:', c['scaler'])" || true
echo
echo "gpu.sh finished in $((SECONDS - START))s"
