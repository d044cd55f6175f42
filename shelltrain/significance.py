"""Is one model really better than another on the same test images, or is the difference noise? The paired
statistics the baseline gate (`gate.baseline`) and `shelltrain-compare` report: the accuracy difference with a
paired-bootstrap confidence interval, the exact McNemar test on the images only one model got right, and the
per-class recall changes. Also what pairs two runs' samples: ids that survive moving the data set, and whether two
data fingerprints name the same samples. No torch: numpy only, imported when used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

BOOTSTRAP_RESAMPLES = 10_000  # resamples of the paired differences; drawn as multinomial counts, so cheap
BOOTSTRAP_SEED = 0  # the interval of the same two runs is the same every time it is asked for
SAME_SET_KEYS = ("count", "membership", "content")  # what two fingerprint entries share when they hold the same samples


def relative_ids(paths: Sequence[str]) -> list[str]:
    """File paths relative to their common folder: sample ids that stay the same when a data set is moved."""
    if not paths:
        return []
    root = os.path.commonpath(list(paths)) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(p, root) for p in paths]


def same_split(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two data-fingerprint entries name the same samples with the same labels (and, in memory, order)."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return False
    return all(key in a and key in b and a[key] == b[key] for key in SAME_SET_KEYS)


def mcnemar_exact(new_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value: under "equally good" each image only one model got right is a fair coin,
    so the smaller count is binomial(n, 1/2) in its tail. Summed in log space: no overflow for large n."""
    n = new_only + baseline_only
    if n == 0:
        return 1.0
    k = min(new_only, baseline_only)
    log_half_n = n * math.log(0.5)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n for i in range(k + 1)]
    top = max(terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in terms)
    return min(1.0, 2.0 * tail)


def paired_bootstrap(
    new_correct: np.ndarray, baseline_correct: np.ndarray, level: float, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float, float]:
    """The accuracy difference (new - baseline) and its `level` percentile interval from resampling the images
    with replacement (both models' answers on an image stay together). A resample of n paired differences in
    {-1, 0, +1} is a multinomial draw of their three counts, which is what is drawn."""
    import numpy as np  # imported when two runs are compared, not when the command starts

    diff = new_correct.astype(np.int64) - baseline_correct.astype(np.int64)
    n = len(diff)
    if n == 0:
        return math.nan, math.nan, math.nan
    shares = [float(np.mean(diff == 1)), float(np.mean(diff == -1))]
    counts = np.random.default_rng(BOOTSTRAP_SEED).multinomial(n, [*shares, 1.0 - sum(shares)], size=resamples)
    means = (counts[:, 0] - counts[:, 1]) / n
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(diff.mean()), float(low), float(high)


def class_recalls(true: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict[str, float | None]:
    """Recall of each class (None for a class with no test image)."""
    out: dict[str, float | None] = {}
    for name in classes:
        hits = [p == name for t, p in zip(true, predicted) if t == name]
        out[name] = sum(hits) / len(hits) if hits else None
    return out


def compare_predictions(
    new: Mapping[str, Sequence[Any]], baseline: Mapping[str, Sequence[Any]], alpha: float
) -> dict[str, Any]:
    """The paired comparison of two runs' answers on the same images, in the same order. `new` and `baseline`
    hold the columns `true`, `predicted` and `correct` (0/1); `alpha`: the test's level, the interval is 1 - alpha."""
    import numpy as np

    a, b = np.asarray(new["correct"], dtype=np.int64), np.asarray(baseline["correct"], dtype=np.int64)
    new_only, baseline_only = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    diff, low, high = paired_bootstrap(a, b, 1.0 - alpha)
    p_value = mcnemar_exact(new_only, baseline_only)
    classes = sorted(set(new["true"]) | set(baseline["true"]))
    recall_new = class_recalls(new["true"], new["predicted"], classes)
    recall_base = class_recalls(baseline["true"], baseline["predicted"], classes)
    per_class = {
        c: {"baseline": recall_base[c], "new": recall_new[c], "change": recall_new[c] - recall_base[c]}
        for c in classes
        if recall_new[c] is not None and recall_base[c] is not None
    }
    worst = min(per_class, key=lambda c: per_class[c]["change"], default=None)
    return {
        "samples": len(a),
        "test_acc": float(a.mean()) if len(a) else math.nan,
        "baseline_test_acc": float(b.mean()) if len(b) else math.nan,
        "acc_diff": diff,
        "acc_diff_low": low,
        "acc_diff_high": high,
        "level": 1.0 - alpha,
        "new_only_right": new_only,
        "baseline_only_right": baseline_only,
        "mcnemar_p": p_value,
        "significant": p_value < alpha,
        "max_class_recall_drop": max(0.0, -per_class[worst]["change"]) if worst is not None else 0.0,
        "worst_class": worst,
        "class_recall": per_class,
    }
