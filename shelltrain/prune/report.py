"""The prune report: `prune.json` (also `summary.json["prune"]`), its flat summary keys, the log line, and the
trade-off picture `plots/prune_tradeoff.png` (accuracy against size and latency, step by step)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from shelltrain import rundir
from shelltrain.plots import plot_tradeoff
from shelltrain.prune.context import Context, Outcome

NOISY_SPREAD = 0.25  # a latency whose repeats spread by more than this share of their median is flagged

TRADEOFF_PLOT = "prune_tradeoff.png"


def build_report(
    ctx: Context, outcome: Outcome, before: dict[str, Any], after: dict[str, Any], acc_after: dict[str, float]
) -> dict[str, Any]:
    """What prune.json holds: the model before and after on the same footing, the accuracy at each stage, the
    rounds and the method's details. `before`/`after` come from `measure` with their latency added."""
    cfg = ctx.cfg
    layers = _layer_table(before.pop("layers"), after.pop("layers"), ctx.chosen)
    return {
        "method": cfg.name,
        "schedule": cfg.schedule,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "before": before,
        "after": after,
        "change": _change(before, after, ctx.acc_before, acc_after),
        "accuracy": {"before": ctx.acc_before, "pruned": ctx.acc_pruned or acc_after, "finetuned": acc_after},
        "rounds": ctx.rounds,
        "details": outcome.details,
        "layers": layers,
        "notes": outcome.notes,
    }


def chain_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several compression steps (prune.then) as one report: the trained model (the first step's `before`)
    against the last step's result; each step's own report, measured against its input, under "steps"."""
    first, last = reports[0], reports[-1]
    acc = {
        "before": first["accuracy"]["before"],
        "pruned": last["accuracy"]["pruned"],
        "finetuned": last["accuracy"]["finetuned"],
    }
    return {
        **last,
        "method": "+".join(r["method"] for r in reports),
        "before": first["before"],
        "change": _change(first["before"], last["after"], acc["before"], acc["finetuned"]),
        "accuracy": acc,
        "rounds": [row for r in reports for row in r["rounds"]],
        "steps": reports,
    }


def write_report(report: dict[str, Any], run_dir: Path, plots: bool = True) -> None:
    """prune.json in the run directory and, with `plots`, plots/prune_tradeoff.png."""
    rundir.write_json(report, Path(run_dir) / rundir.PRUNE_REPORT)
    if plots:
        path = Path(run_dir) / rundir.PLOTS / TRADEOFF_PLOT
        plot_tradeoff(tradeoff_rows(report), path, x="size_mb", y="val_acc", latency="latency_ms")


def tradeoff_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per model: the trained one, each pruning round (after its fine-tuning), the final one.
    Latency is measured for the first and the last only."""
    before, after, acc = report["before"], report["after"], report["accuracy"]
    rows = [
        {
            "label": "before",
            "size_mb": before["size_bytes"] / 1e6,
            "latency_ms": before["latency_ms"],
            "val_acc": acc["before"]["val"],
        }
    ]
    for record in report["rounds"]:
        if "size_bytes" in record:
            val = record.get("val_acc_finetuned", record["val_acc_pruned"])
            rows.append({"label": record["round"], "size_mb": record["size_bytes"] / 1e6, "val_acc": val})
    rows.append(
        {
            "label": "final",
            "size_mb": after["size_bytes"] / 1e6,
            "latency_ms": after["latency_ms"],
            "val_acc": acc["finetuned"]["val"],
        }
    )
    return rows


def describe(report: dict[str, Any]) -> str:
    """One line: what pruning did to parameters, MACs, size, latency and accuracy."""
    b, a, c, acc = report["before"], report["after"], report["change"], report["accuracy"]
    if any("val_acc_finetuned" in record for record in report["rounds"]):
        steps = f"{acc['pruned']['val']:.4f} (pruned) -> {acc['finetuned']['val']:.4f} (fine-tuned)"
    else:  # quantization, or prune.finetune_epochs=0: nothing was fine-tuned
        steps = f"{acc['finetuned']['val']:.4f} ({report['method']}, not fine-tuned)"
    return (
        f"prune: {report['method']} ({report['schedule']}): params {_si(b['params'])} -> {_si(a['params'])} "
        f"({c['params']:.2f}x), sparsity {a['sparsity']:.3f}, MACs {_si(b['macs'])} -> {_si(a['macs'])}, "
        f"size {b['size_bytes'] / 1e6:.2f} -> {a['size_bytes'] / 1e6:.2f} MB ({c['size']:.2f}x), "
        f"CPU latency {b['latency_ms']:.1f} -> {a['latency_ms']:.1f} ms ({speed_change(b, a, c['speedup'])}), "
        f"val acc {acc['before']['val']:.4f} -> {steps}, test acc {acc['before']['test']:.4f} -> "
        f"{acc['finetuned']['test']:.4f}"
    )


def speed_change(before: dict[str, Any], after: dict[str, Any], speedup: float) -> str:
    """The measured speed-up in words that never contradict it: faster, slower, or no change the repeats' spread
    can tell apart from noise."""
    noise = max(before.get("latency_spread", 0.0), after.get("latency_spread", 0.0))
    if math.isnan(speedup) or abs(speedup - 1.0) <= noise:
        return f"no measurable change: {speedup:.2f}x within the repeats' spread of {noise:.0%}"
    if speedup > 1.0:
        return f"{speedup:.2f}x faster"
    return f"{1 / speedup:.2f}x slower"


def summary_keys(report: dict[str, Any]) -> dict[str, Any]:
    """The flat `summary.json` keys of a prune report (the nested report goes under "prune")."""
    a, c, acc = report["after"], report["change"], report["accuracy"]
    return {
        "prune_method": report["method"],
        "prune_params": a["params"],
        "prune_sparsity": a["sparsity"],
        "prune_macs": a["macs"],
        "prune_size_ratio": c["size"],
        "prune_speedup": c["speedup"],
        "prune_latency_ms": a["latency_ms"],
        "prune_latency_spread": a.get("latency_spread"),
        "prune_test_acc_before": acc["before"]["test"],
        "prune_test_acc_pruned": acc["pruned"]["test"],
    }


def _change(before: dict, after: dict, acc_before: dict, acc_after: dict) -> dict[str, float]:
    def ratio(key: str) -> float:
        return after[key] / before[key] if before[key] else math.nan

    return {
        "params": ratio("params"),
        "nonzero_params": ratio("nonzero_params"),
        "macs": ratio("macs"),
        "size": ratio("size_bytes"),
        "speedup": before["latency_ms"] / after["latency_ms"] if after["latency_ms"] else math.nan,
        "val_acc": acc_after["val"] - acc_before["val"],
        "test_acc": acc_after["test"] - acc_before["test"],
    }


def _layer_table(before: dict[str, dict], after: dict[str, dict], chosen: set[str]) -> list[dict[str, Any]]:
    """One row per conv/linear layer: `chosen`: prune.modules / prune.exclude let the method touch it;
    `changed`: it was removed, lost channels or gained zeros (quantization changes values, not these)."""
    rows = []
    for name, b in before.items():
        a = after.get(name)
        rows.append(
            {
                "name": name,
                "shape_before": b["shape"],
                "shape_after": a["shape"] if a else None,  # None: the layer was removed
                "sparsity": a["sparsity"] if a else 1.0,
                "chosen": name in chosen,
                "changed": a is None or a["shape"] != b["shape"] or a["sparsity"] != b["sparsity"],
            }
        )
    return rows


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"
