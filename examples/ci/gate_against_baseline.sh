#!/usr/bin/env bash
# Gate a change against a stored baseline run: is the new model significantly worse on the same test images?
#
#   examples/ci/gate_against_baseline.sh BASELINE_DIR CANDIDATE_DIR [KEY=VALUE ...]
#
# BASELINE_DIR: a finished run kept between CI jobs (a cache or an artifact); when it holds no run yet, the
# baseline is trained there first with RECIPE. CANDIDATE_DIR: where this change's run goes; KEY=VALUE: the
# change under test (e.g. augmentation=basic). The candidate is trained with the same RECIPE and compared image
# by image with the baseline (gate.baseline, docs/audit-and-gates.md). Exit codes: 0 passed; 3 the accuracy
# fell by more than MAX_DROP and McNemar's test finds the fall significant, or a class lost more than
# MAX_CLASS_DROP of its recall; 2 the two runs were not tested on the same images (or another input mistake).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 BASELINE_DIR CANDIDATE_DIR [KEY=VALUE ...]" >&2
  exit 2
fi
baseline=$1
candidate=$2
shift 2

RECIPE=(model=cnn optimizer=adam optimizer.lr=0.003 scheduler=none trainer.epochs=4 data.num_workers=0 report.html=false)
MAX_DROP=${MAX_DROP:-0.02}
MAX_CLASS_DROP=${MAX_CLASS_DROP:-0.25}

if [ ! -f "$baseline/summary.json" ]; then
  echo "training the baseline in $baseline"
  shelltrain "${RECIPE[@]}" hydra.run.dir="$baseline"
fi

shelltrain "${RECIPE[@]}" "$@" hydra.run.dir="$candidate" \
  gate.baseline="$baseline" gate.baseline_max_drop="$MAX_DROP" gate.class_recall_drop_max="$MAX_CLASS_DROP"
