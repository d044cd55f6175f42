# shellcheck shell=bash
# The sections of benchmarks/gpu.sh, sourced by it. Each section is a function `section_NAME` (the name with - as _)
# that runs the real CLI (python -m shelltrain) and then asserts what it checks, usually by reading the run's
# summary.json with Python (`check`). gpu.sh runs each one in a bash of its own: a session of its own under
# `timeout -k` (a hard limit: whatever the section started is killed with it), `set -euo pipefail`, the working
# directory the install folder, output into logs/NAME.log. A section ends 0 (ok), 77 after a line `SKIP: why`
# (it does not apply to this machine), or anything else (FAIL). `note TEXT` adds a line shown under its result.
#
# The settings a section reads come from gpu.sh (settings.sh in the check's folder): PY, DEVICE (cuda, or cpu in a
# rehearsal), RUNS (where runs go), GPUS, SAMPLES, the argument arrays SMALL (ResNet-18, synthetic 32x32), CNN (a
# small cnn, synthetic), DIGITS (a small cnn, the bundled digits), FOLDER (a small cnn, the generated image folder),
# SYNTH (the synthetic data alone) and the sizes that a CPU rehearsal shrinks.

SECTION_NAMES=()
declare -A SECTION_LIMIT SECTION_ABOUT

register() { # register NAME LIMIT ABOUT: LIMIT is seconds on one GPU (a CPU rehearsal multiplies it)
  SECTION_NAMES+=("$1")
  SECTION_LIMIT[$1]=$2
  SECTION_ABOUT[$1]=$3
}

# In the order they run; a section that needs another's run (a teacher, a trained model) makes it when that
# section was not selected, so every section can run alone.
register resume 40 "resume on CUDA: momentum state restored beside the parameters, 2 epochs in all"
register fp16 25 "16-mixed with a GradScaler and grad clipping: the scaler's state is in the checkpoint"
register bf16 20 "bf16 autocast without channels_last"
register channels-last 20 "bf16 autocast with channels_last"
register on-device 20 "data.on_device=true: data and batched augmentation on the GPU"
register cache 45 "an image folder decoded once (data.cache=disk, on the device), then served from RAM (memory)"
register pinned 35 "data.cache=memory: the profiler sees every large host-to-device copy come from pinned memory"
register ddp 45 "DDP on every GPU (trainer.devices), on-device data; skipped with one GPU"
register int8 30 "an int8 (dynamic) model: task=evaluate with trainer.device=cuda runs it on the CPU"
register ensemble 35 "a weighted ensemble of 3 on digits: ensemble.json says the batched (vmap) evaluation ran"
register ema 30 "EMA and SWA under 16-mixed: ema_* and swa_* test figures finite, 2 epochs averaged"
register averaged 30 "task=evaluate of RUN@ema and RUN@swa: the same test figures as the training run recorded"
register tta 25 "trainer.test_tta=hflip: test_acc_tta and test_loss_tta beside the model's own figures"
register calibrate 25 "trainer.calibrate=temperature: T > 0 in summary.json and best.pt, val NLL not worse"
register distill-cache 30 "distill.cache=true: the teacher's logits cached on the GPU, 2 epochs, loss finite"
register int8-teacher 30 "an int8 run (prune=quantize) as distill.teacher on the GPU, loss finite"
register fused-teacher 30 "a weighted ensemble run as distill.teacher under 16-mixed, loss finite"
register lr-find 40 "task=lr_find under 16-mixed: a suggestion, and near the fp32 one (same data, same seed)"
register profile 25 "trainer.profile=true: profile_trace.json with CUDA kernels"
register timm 30 "model=timm (bf16): trains and tests; skipped when timm is not installed"
register compile 150 "torch.compile (bf16, on-device), 2 epochs: no recompiles, epoch 2 far faster than epoch 1"
register throughput 60 "images/s: ResNet-18 32x32 bf16, on-device vs DataLoader, shelltrain vs a plain loop"

# -- helpers --------------------------------------------------------------------------------------------------
st() { # the real CLI
  "$PY" -m shelltrain "$@"
}

note() { # a line shown under the section's result
  echo "$*" >>"$NOTES"
  echo "note: $*"
}

skip() { # skip WHY: the section does not apply here
  echo "SKIP: $*"
  exit 77
}

# check RUN_DIR [device] <<'PY' ... PY: the Python on stdin asserts about the run (without torch unless it imports
# it), with `s` (summary.json), `rows` (metrics.csv as dicts of strings), `run` (a Path), `cuda` (true on a GPU,
# false in a rehearsal), `finite(x)`, `losses(rows)` (train_loss per epoch) and `note(text)`. Always checked: the
# status is completed; with `device` also: the run reports the check's device, every train_loss and test_loss finite.
CHECK_PY='
import csv, json, math, os, sys
from pathlib import Path
run, cuda, on_device, code = Path(sys.argv[1]), sys.argv[2] == "cuda", sys.argv[3] == "device", sys.argv[4]
s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
rows = list(csv.DictReader(open(run / "metrics.csv"))) if (run / "metrics.csv").is_file() else []
def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
def losses(rows):
    return [float(r["train_loss"]) for r in rows]
def note(text):
    print("note:", text)
    with open(os.environ["NOTES"], "a") as f:
        print(text, file=f)
try:
    assert s.get("status") == "completed", "summary.json: status %r, not completed" % s.get("status")
    if on_device:
        assert s["device"].startswith(sys.argv[2]), "ran on %s, not %s" % (s["device"], sys.argv[2])
        assert rows and all(map(math.isfinite, losses(rows))), "train_loss per epoch %s" % losses(rows)
        assert finite(s.get("test_loss")), "test_loss %s" % s.get("test_loss")
    exec(code)
except AssertionError as e:
    print("check failed (%s): %s" % (run.name, e))
    sys.exit(1)
print("check ok (%s)" % run.name)
'
check() {
  local code
  code=$(cat)
  "$PY" -c "$CHECK_PY" "$1" "$DEVICE" "${2:-}" "$code"
}

ensure() { # ensure RUN_DIR COMMAND...: run COMMAND unless an earlier section already completed RUN_DIR
  if grep -q '"status": "completed"' "$1/summary.json" 2>/dev/null; then
    echo "reusing $1 (made by an earlier section)"
  else
    shift
    "$@"
  fi
}

images() { # a JPEG image folder (4 classes of SAMPLES/16 images, 80x80) for the data.cache sections
  [[ -d $RUNS/images/train ]] && return 0
  "$PY" - "$RUNS/images" $((SAMPLES / 16)) <<'PY'
import os, sys
import numpy as np
from PIL import Image
root, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for c in range(4):
    os.makedirs(f"{root}/train/{c}", exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(f"{root}/train/{c}/{i}.jpg")
PY
}

# The runs several sections share.
int8_run() {
  ensure "$RUNS/int8" st "${CNN[@]}" trainer.epochs=1 prune=quantize prune.mode=dynamic hydra.run.dir="$RUNS/int8"
}
ensemble_run() {
  ensure "$RUNS/ensemble" st "${DIGITS[@]}" ensemble=weighted ensemble.members=3 trainer.epochs="$TEACHER_EPOCHS" \
    "${VMAP[@]}" hydra.run.dir="$RUNS/ensemble"
}
averaged_run() {
  ensure "$RUNS/ema" st "${SMALL[@]}" trainer.precision=16-mixed trainer.ema.decay=0.99 trainer.swa.start_epoch=2 \
    trainer.epochs=3 hydra.run.dir="$RUNS/ema"
}
tta_run() {
  ensure "$RUNS/tta" st "${CNN[@]}" trainer.epochs=2 trainer.test_tta=hflip trainer.calibrate=temperature \
    hydra.run.dir="$RUNS/tta"
}

# -- the sections ---------------------------------------------------------------------------------------------
section_resume() {
  st "${SMALL[@]}" optimizer=momentum scheduler=step trainer.epochs=1 hydra.run.dir="$RUNS/resume"
  st "${SMALL[@]}" optimizer=momentum scheduler=step trainer.epochs=2 trainer.resume="$RUNS/resume"
  check "$RUNS/resume" device <<'PY'
assert s["epochs_completed"] == 2, f"epochs_completed {s['epochs_completed']}"
PY
}

section_fp16() {
  st "${SMALL[@]}" trainer.precision=16-mixed trainer.grad_clip=1.0 trainer.epochs=2 hydra.run.dir="$RUNS/fp16"
  check "$RUNS/fp16" device <<'PY'
import torch
c = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
assert c.get("scaler"), "no GradScaler state in checkpoints/last.pt"
note(f"GradScaler scale {c['scaler'].get('scale')}")
PY
}

section_bf16() {
  st "${SMALL[@]}" trainer.precision=bf16 trainer.channels_last=false trainer.epochs=1 hydra.run.dir="$RUNS/bf16"
  check "$RUNS/bf16" device </dev/null
}

section_channels_last() {
  st "${SMALL[@]}" trainer.precision=bf16 trainer.channels_last=true trainer.epochs=1 \
    hydra.run.dir="$RUNS/channels-last"
  check "$RUNS/channels-last" device </dev/null
}

section_on_device() {
  st "${SMALL[@]}" data.on_device=true augmentation=basic trainer.epochs=2 hydra.run.dir="$RUNS/on-device"
  check "$RUNS/on-device" device </dev/null
}

section_cache() { # batched rotation/scale/crop/flip (augmentation=seed) on the device from the disk cache; then the
  # same folder from RAM (memory: batches gathered on the host and copied), reusing the decoded array
  images
  st "${FOLDER[@]}" data.cache=disk data.on_device=true augmentation=seed trainer.epochs=2 \
    hydra.run.dir="$RUNS/cache-disk"
  st "${FOLDER[@]}" data.cache=memory data.on_device=false augmentation=seed trainer.epochs=2 \
    hydra.run.dir="$RUNS/cache-memory"
  check "$RUNS/cache-disk" device </dev/null
  check "$RUNS/cache-memory" device <<'PY'
assert "reused decoded cache" in (run / "train.log").read_text(), "the memory run decoded the folder again"
PY
}

section_pinned() { # the profiler's trace names the source memory of each copy: Pageable or Pinned
  images
  st "${FOLDER[@]}" data.cache=memory data.on_device=false data.batch_size=$((SAMPLES / 64)) trainer.profile=true \
    trainer.epochs=1 hydra.run.dir="$RUNS/pinned"
  check "$RUNS/pinned" device <<'PY'
trace = run / "profile_trace.json"
assert trace.is_file(), "no profile_trace.json"
if cuda:
    events = json.loads(trace.read_text())["traceEvents"]
    copies = [e for e in events if "HtoD" in str(e.get("name", ""))]
    large = [e for e in copies if e.get("args", {}).get("bytes", 0) >= 65536]
    pageable = [e["name"] for e in large if "Pinned" not in e["name"]]
    note(f"{len(copies)} host-to-device copies profiled, {len(large)} of 64 KiB or more, {len(pageable)} not pinned")
    assert not pageable, f"{len(pageable)} large copies from unpinned memory: {sorted(set(pageable))}"
else:
    note("a CPU rehearsal: no copies to check")
PY
}

section_ddp() {
  local procs=$GPUS
  if [[ $DEVICE == cpu ]]; then
    procs=2 # a rehearsal: two gloo processes on the CPU
  elif ((GPUS < 2)); then
    skip "one GPU"
  fi
  st "${SMALL[@]}" trainer.devices="$procs" data.on_device=true trainer.epochs=2 hydra.run.dir="$RUNS/ddp"
  PROCS=$procs check "$RUNS/ddp" device <<'PY'
assert s["processes"] == int(os.environ["PROCS"]), f"processes {s['processes']}"
PY
}

section_int8() {
  int8_run
  st "${CNN[@]}" task=evaluate model.weights="$RUNS/int8" hydra.run.dir="$RUNS/int8-evaluate"
  check "$RUNS/int8-evaluate" <<'PY'
assert s["device"] == "cpu", f"the int8 model was evaluated on {s['device']}"
assert finite(s.get("test_acc")), "no test_acc"
PY
}

section_ensemble() {
  ensemble_run
  check "$RUNS/ensemble" <<'PY'
e = json.loads((run / "ensemble.json").read_text())
assert e.get("rule") == "weighted", f"rule {e.get('rule')}"
assert e.get("evaluation") == "vmap", f"ensemble.json: evaluation {e.get('evaluation')!r}, not vmap"
assert finite(s.get("test_acc")), "no test_acc"
note(f"fused test_acc {s['test_acc']:.4f} (vmap)")
PY
}

section_ema() {
  averaged_run
  check "$RUNS/ema" device <<'PY'
for key in ("ema_test_acc", "ema_test_loss", "best_ema_val_acc", "swa_test_acc", "swa_test_loss"):
    assert finite(s.get(key)), f"{key} {s.get(key)}"
assert s.get("swa_epochs_averaged") == 2, f"swa_epochs_averaged {s.get('swa_epochs_averaged')}"
for name in ("ema.pt", "swa.pt"):
    assert (run / "checkpoints" / name).is_file(), f"no checkpoints/{name}"
note(f"test_acc {s['test_acc']:.4f}, ema {s['ema_test_acc']:.4f}, swa {s['swa_test_acc']:.4f}")
PY
}

section_averaged() {
  averaged_run
  for which in ema swa; do
    st "${SMALL[@]}" task=evaluate model.weights="$RUNS/ema@$which" hydra.run.dir="$RUNS/evaluate-$which"
    WHICH=$which check "$RUNS/evaluate-$which" <<'PY'
which = os.environ["WHICH"]
trained = json.loads((run.parent / "ema" / "summary.json").read_text())
assert s["weights"].endswith(f"{which}.pt"), f"evaluated {s['weights']}, not checkpoints/{which}.pt"
acc, loss = trained[f"{which}_test_acc"], trained[f"{which}_test_loss"]
assert abs(s["test_acc"] - acc) <= 0.02, f"test_acc {s['test_acc']:.4f}; the run recorded {which}_test_acc {acc:.4f}"
assert abs(s["test_loss"] - loss) <= 0.02 * abs(loss) + 1e-3, f"test_loss {s['test_loss']:.4f}; the run: {loss:.4f}"
note(f"RUN@{which}: test_acc {s['test_acc']:.4f} (the run: {acc:.4f})")
PY
  done
}

section_tta() {
  tta_run
  check "$RUNS/tta" device <<'PY'
assert s.get("test_tta") == "hflip", f"test_tta {s.get('test_tta')}"
for key in ("test_acc_tta", "test_loss_tta"):
    assert finite(s.get(key)), f"{key} {s.get(key)}"
note(f"test_acc {s['test_acc']:.4f}, with hflip {s['test_acc_tta']:.4f}")
PY
}

section_calibrate() {
  tta_run
  check "$RUNS/tta" <<'PY'
import torch
c = s.get("calibration") or {}
t = c.get("temperature")
assert finite(t) and t > 0, f"calibration temperature {t}"
assert c["val_nll_after"] <= c["val_nll_before"] + 1e-3, f"val NLL {c['val_nll_before']} -> {c['val_nll_after']}"
saved = torch.load(run / "checkpoints" / "best.pt", weights_only=True).get("temperature")
assert saved is not None and abs(float(saved) - t) <= 1e-4 * max(1.0, t), f"best.pt temperature {saved}, summary {t}"
note(f"T {t:.3f}, val NLL {c['val_nll_before']:.4f} -> {c['val_nll_after']:.4f}")
PY
}

section_distill_cache() {
  tta_run # the teacher
  st "${CNN[@]}" trainer.epochs=2 distill=logits distill.teacher="$RUNS/tta" distill.cache=true \
    hydra.run.dir="$RUNS/distill-cache"
  check "$RUNS/distill-cache" device <<'PY'
assert "teacher logits cached" in (run / "train.log").read_text(), "train.log does not say the logits are cached"
assert len(rows) == 2, f"{len(rows)} epochs"
PY
}

section_int8_teacher() {
  int8_run # the teacher
  st "${CNN[@]}" trainer.epochs=1 distill=logits distill.teacher="$RUNS/int8" distill.cache=false \
    hydra.run.dir="$RUNS/int8-teacher"
  check "$RUNS/int8-teacher" device </dev/null
}

section_fused_teacher() {
  ensemble_run # the teacher: a weighted ensemble, confident on digits after a few epochs
  st "${DIGITS[@]}" trainer.precision=16-mixed trainer.epochs=2 distill=logits distill.teacher="$RUNS/ensemble" \
    distill.cache=false hydra.run.dir="$RUNS/fused-teacher"
  check "$RUNS/fused-teacher" device <<'PY'
note(f"train_loss per epoch {[round(x, 4) for x in losses(rows)]}")
PY
}

section_lr_find() {
  for precision in 16-mixed 32; do
    st "${DIGITS[@]}" task=lr_find trainer.precision=$precision lr_find.steps="$LR_STEPS" \
      hydra.run.dir="$RUNS/lr-find-$precision"
  done
  check "$RUNS/lr-find-16-mixed" <<'PY'
fp32 = json.loads((run.parent / "lr-find-32" / "summary.json").read_text())
lr, ref = s.get("suggested_lr"), fp32.get("suggested_lr")
assert finite(lr) and lr > 0, f"suggested_lr {lr}"
assert finite(ref) and ref > 0, f"fp32: suggested_lr {ref}"
steps, fp32_steps = s["steps_run"], fp32["steps_run"]
assert steps >= 0.8 * fp32_steps, f"the ramp stopped after {steps} steps, fp32 after {fp32_steps}"
assert ref / 4 <= lr <= ref * 4, f"16-mixed suggests {lr:.3g}, fp32 {ref:.3g}"
note(f"suggested lr: 16-mixed {lr:.3g} ({s['steps_run']} steps), fp32 {ref:.3g} ({fp32['steps_run']} steps)")
PY
}

section_profile() {
  st "${CNN[@]}" data.batch_size=$((SAMPLES / 64)) trainer.profile=true trainer.epochs=1 hydra.run.dir="$RUNS/profile"
  check "$RUNS/profile" device <<'PY'
trace = run / "profile_trace.json"
assert trace.is_file(), "no profile_trace.json"
kinds = {e.get("cat") for e in json.loads(trace.read_text())["traceEvents"]}
assert "cpu_op" in kinds, f"no CPU operators in the trace: {kinds}"
assert not cuda or "kernel" in kinds, f"no CUDA kernels in the trace: {kinds}"
PY
}

section_timm() {
  "$PY" -c "import timm" 2>/dev/null || skip "timm is not installed (pip install 'shelltrain[timm]')"
  st model=timm model.name="$TIMM_MODEL" "${SYNTH[@]}" "${TIMM_PRECISION[@]}" trainer.epochs=1 \
    hydra.run.dir="$RUNS/timm"
  check "$RUNS/timm" device </dev/null
}

section_compile() { # TORCH_LOGS=recompiles: torch logs each recompilation (into this section's log)
  TORCH_LOGS=recompiles st "${SMALL[@]}" trainer.compile=true trainer.precision=bf16 data.on_device=true \
    trainer.epochs=2 hydra.run.dir="$RUNS/compile" 2>&1 | tee "$RUNS/compile.log"
  check "$RUNS/compile" device <<'PY'
first, second = (float(r["seconds"]) for r in rows)
note(f"epoch 1 (compiling) {first:.1f}s, epoch 2 {second:.1f}s")
assert second < first / 2, "epoch 2 was not much faster than epoch 1: compiled again?"
PY
  if grep -i "recompiling" "$RUNS/compile.log"; then
    echo "torch.compile recompiled (above)"
    return 1
  fi
}

section_throughput() {
  [[ $DEVICE == cuda ]] || skip "a CPU rehearsal (images/s on a GPU only)"
  "$PY" "$ROOT/benchmarks/throughput.py" --device cuda --data synthetic --precision bf16 --channels-last on \
    --rounds 2 --model resnet18 --small-input --image-size 32 --batch-size 512 --samples 16384 --workers 8 |
    tee "$RUNS/throughput.txt"
  sed -n '/^variant/,$p' "$RUNS/throughput.txt" >>"$NOTES"
}
