"""Quality gates for CI: `gate.<metric>_min` / `gate.<metric>_max`, checked against a finished run's summary.json.

`<metric>` is a numeric key of summary.json: a headline key (`test_acc`, `test_loss`, `best_val_acc`, `params`,
`wall_seconds`, ...) or `<section>_<key>` for a key of a stage's section (`cv_mean` is `summary["cv"]["mean"]`).
A missed gate ends a single run with exit code 3 (EXIT_GATE_FAILED); in a sweep the job's summary records it.

`gate.baseline=RUN` compares the run's per-sample test predictions with a finished run's (compare.py): the
comparison goes to summary.json's `baseline` section and the console; `gate.baseline_max_drop` fails only a drop
larger than the limit that McNemar's test finds significant at `gate.baseline_alpha`, and
`gate.class_recall_drop_max` bounds the largest drop of a class's recall. gates.py judges the section; compare.py
makes it (`with_baseline`).
No torch here: the CLI checks gates after the runner returned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from shelltrain.errors import UserError

BASELINE = "baseline"  # summary.json's section, and the gate key naming the run to compare with
BASELINE_SETTINGS = ("baseline", "baseline_alpha")  # gate keys that are settings, not limits
BASELINE_DROP = "baseline_max_drop"  # a limit on the accuracy drop, failed only when the drop is significant
RECALL_DROP = "class_recall_drop_max"  # a limit on the baseline section's max_class_recall_drop
GATE_KEY = re.compile(r"^(?P<metric>[A-Za-z0-9_]+?)_(?P<bound>min|max)$")


def parse_key(key: str) -> tuple[str, str] | None:
    """`test_acc_min` -> ("test_acc", "min"); None when the key does not end in _min or _max."""
    match = GATE_KEY.match(key)
    return (match["metric"], match["bound"]) if match else None


def metric_value(summary: Mapping[str, Any], metric: str) -> float | None:
    """The numeric value `metric` names in a summary: a top-level key, or `<section>_<key>` of a nested section."""
    value = summary.get(metric)
    if _is_number(value):
        return float(value)
    for section, content in summary.items():
        prefix = f"{section}_"
        if isinstance(content, Mapping) and metric.startswith(prefix):
            value = content.get(metric[len(prefix) :])
            if _is_number(value):
                return float(value)
    return None


def check(gates: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate every set gate; returns the `gates` section for summary.json (`passed`, `checked`, `failures`)."""
    checked: dict[str, Any] = {}
    failures: list[str] = []
    for key, limit in gates.items():
        if limit is None or key in BASELINE_SETTINGS:
            continue
        if key == BASELINE_DROP:
            _check_drop(limit, summary, checked, failures)
            continue
        parsed = parse_key(str(key))
        if parsed is None:  # validate() rejects these before training; kept safe for direct callers
            failures.append(f"gate.{key}: not a <metric>_min or <metric>_max key")
            continue
        metric, bound = parsed
        value = metric_value(summary, f"{BASELINE}_max_class_recall_drop" if key == RECALL_DROP else metric)
        ok = value is not None and not math.isnan(value) and (value >= limit if bound == "min" else value <= limit)
        sign = ">=" if bound == "min" else "<="
        text = f"{metric}={value:.6g} {sign} {limit:g}" if value is not None else f"{metric}: none"
        checked[str(key)] = {"limit": limit, "value": value, "passed": ok, "text": text}
        if value is None:
            failures.append(f"gate.{key}={limit:g}: the run reported no numeric '{metric}'")
        elif not ok:
            sign = "<" if bound == "min" else ">"
            failures.append(f"{metric}={value:.6g} {sign} gate.{key}={limit:g}")
    return {"passed": not failures, "checked": checked, "failures": failures}


def _check_drop(limit: float, summary: Mapping[str, Any], checked: dict, failures: list[str]) -> None:
    """gate.baseline_max_drop: missed when the accuracy fell by more than `limit` and the fall is significant."""
    section = summary.get(BASELINE)
    if not isinstance(section, Mapping):
        failures.append(f"gate.{BASELINE_DROP}={limit:g}: no baseline comparison (set gate.baseline=RUN_DIR)")
        return
    drop = -float(section["acc_diff"])
    ok = not (drop > limit and section["significant"])
    p = section["mcnemar_p"]
    text = f"accuracy drop {drop:+.4f} vs limit {limit:g} (McNemar p={p:.3g}, alpha {1 - section['level']:g})"
    checked[BASELINE_DROP] = {"limit": limit, "value": drop, "passed": ok, "text": text}
    if not ok:
        failures.append(f"{text}: a significant drop beyond gate.{BASELINE_DROP}")


def metric_gates(gates: Mapping[str, Any]) -> dict[str, Any]:
    """The gates that are limits on a summary key (<metric>_min / _max), without the baseline's settings."""
    return {k: v for k, v in gates.items() if k not in (*BASELINE_SETTINGS, BASELINE_DROP)}


def check_baseline_settings(gates: Mapping[str, Any]) -> None:
    """gate.baseline (a run directory, or null), gate.baseline_alpha in (0, 1), gate.baseline_max_drop >= 0, and
    no baseline limit without gate.baseline (compare.check_baseline_run opens the run itself)."""
    base, alpha, drop = gates[BASELINE], gates["baseline_alpha"], gates[BASELINE_DROP]
    if base is not None and not isinstance(base, str):
        raise UserError(
            f"gate.baseline={base!r} is invalid; name a finished run directory, e.g. gate.baseline=outputs/base"
        )
    if alpha is not None and (not _is_number(alpha) or not 0.0 < alpha < 1.0):
        raise UserError(f"gate.baseline_alpha={alpha!r} is invalid; a significance level in (0, 1), e.g. 0.05")
    if drop is not None and (not _is_number(drop) or drop < 0):
        raise UserError(f"gate.{BASELINE_DROP}={drop!r} is invalid; an accuracy drop >= 0, e.g. 0.01")
    uses = [k for k in (BASELINE_DROP, RECALL_DROP) if gates[k] is not None]
    if uses and base is None:
        raise UserError(f"gate.{uses[0]} compares with a baseline run; set gate.baseline=RUN_DIR")


def active(gates: Mapping[str, Any] | None) -> bool:
    """Whether any gate is set (gate.baseline_alpha alone compares nothing)."""
    if not gates:
        return False
    limits = [v for k, v in gates.items() if k not in BASELINE_SETTINGS or k == BASELINE]
    return any(v is not None for v in limits)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
