"""Quality gates for CI: `gate.<metric>_min` / `gate.<metric>_max`, checked against a finished run's summary.json.

`<metric>` is a numeric key of summary.json: a headline key (`test_acc`, `test_loss`, `best_val_acc`, `params`,
`wall_seconds`, ...) or `<section>_<key>` for a key of a stage's section (`cv_mean` is `summary["cv"]["mean"]`).
A missed gate ends a single run with exit code 3 (EXIT_GATE_FAILED); in a sweep the job's summary records it.
No torch here: the CLI checks gates after the runner returned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

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
        if limit is None:
            continue
        parsed = parse_key(str(key))
        if parsed is None:  # validate() rejects these before training; kept safe for direct callers
            failures.append(f"gate.{key}: not a <metric>_min or <metric>_max key")
            continue
        metric, bound = parsed
        value = metric_value(summary, metric)
        ok = value is not None and not math.isnan(value) and (value >= limit if bound == "min" else value <= limit)
        checked[str(key)] = {"limit": limit, "value": value, "passed": ok}
        if value is None:
            failures.append(f"gate.{key}={limit:g}: the run reported no numeric '{metric}'")
        elif not ok:
            sign = "<" if bound == "min" else ">"
            failures.append(f"{metric}={value:.6g} {sign} gate.{key}={limit:g}")
    return {"passed": not failures, "checked": checked, "failures": failures}


def active(gates: Mapping[str, Any] | None) -> bool:
    return bool(gates) and any(v is not None for v in gates.values())  # type: ignore[union-attr]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
