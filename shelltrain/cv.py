"""Cross-validation's results: summary.json's `cv` section and the table shown when the folds are done. The folds
themselves are data.cv_fold's; the loop over them is the runner's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from shelltrain.rundir import fold_dir


def section(fold_summaries: list[dict[str, Any]], monitor: str, refit: bool) -> dict[str, Any]:
    """summary.json's `cv` section: each fold's best monitored metric (on its held-out fold) and test accuracy,
    their mean and population std (numpy's default, as in scikit-learn's examples)."""
    folds = len(fold_summaries)
    scores = [float(s[f"best_{monitor}"]) for s in fold_summaries]
    tests = [float(s["test_acc"]) for s in fold_summaries]
    return {
        "folds": folds,
        "metric": f"best_{monitor}",
        "scores": scores,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "test_acc": tests,
        "test_acc_mean": float(np.mean(tests)),
        "test_acc_std": float(np.std(tests)),
        "splitter": f"StratifiedKFold(n_splits={folds}, shuffle=True, random_state=data.split_seed)",
        "fold_dirs": [str(fold_dir(Path(), k)) for k in range(folds)],
        "refit": refit,
    }


def table(results: dict[str, Any], monitor: str) -> Table:
    """Each fold's scores and their mean ± std, as printed at the end of cross-validation."""
    result = Table(title="cross-validation", show_header=True)
    result.add_column("fold", justify="right")
    result.add_column(f"best {monitor} (held-out fold)", justify="right")
    result.add_column("test_acc", justify="right")
    for k, (score, test) in enumerate(zip(results["scores"], results["test_acc"])):
        result.add_row(str(k), f"{score:.4f}", f"{test:.4f}")
    result.add_row(
        "mean ± std",
        f"{results['mean']:.4f} ± {results['std']:.4f}",
        f"{results['test_acc_mean']:.4f} ± {results['test_acc_std']:.4f}",
        style="bold",
    )
    return result
