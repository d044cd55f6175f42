"""Two finished runs side by side: is the new one significantly better or worse on the same test images?

`shelltrain-compare BASELINE NEW` prints the paired comparison (significance.py), which config keys differ and
whether the data fingerprints match; `gate.baseline=RUN` (gates.py) makes the same comparison when a run ends. Both
read a run through `open_run`, which refuses in one line a directory that is not a finished run, a run without
per-sample predictions (predictions.csv) and, in `compare_runs`, two runs tested on different images. No torch.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shelltrain import rundir, summary
from shelltrain.dataroot import user_path
from shelltrain.errors import EXIT_USER_ERROR, UserError
from shelltrain.gates import BASELINE
from shelltrain.schema import packaged
from shelltrain.significance import compare_predictions, relative_ids, same_split

CONFIG_RECORD = "config.yaml"  # under .hydra/: the composed config Hydra records for each run
FINGERPRINT = "data_fingerprint"  # summary.json's section (shelltrain.data.fingerprint)
UNCOMPARED_KEYS = ("hydra",)  # config sections that say where a run went, not what it did


@dataclass
class Run:
    """What a comparison reads of a finished run: its summary and per-sample predictions."""

    path: Path
    summary: dict[str, Any]
    predictions: dict[str, list[Any]]  # columns of predictions.csv


def open_run(spec: str | Path, key: str) -> Run:
    """A finished run directory, or a one-line UserError naming `key` (the setting or argument that names it)."""
    path = user_path(str(spec))
    if not rundir.summary(path).is_file():
        raise UserError(f"{key}={spec}: not a shelltrain run directory (no {rundir.SUMMARY}); name a finished run")
    recorded = summary.read(path)
    if recorded.get("status") != "completed":
        raise UserError(f"{key}={spec}: the run did not complete (status {recorded.get('status')!r}); name another")
    predictions = path / rundir.PREDICTIONS
    if not predictions.is_file():
        raise UserError(
            f"{key}={spec}: the run has no per-sample predictions ({rundir.PREDICTIONS}); "
            "name a run made by this version of shelltrain, or make one with task=evaluate"
        )
    with open(predictions, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "correct" not in rows[0]:
        raise UserError(f"{key}={spec}: a multi-label run; the paired comparison covers single-label runs")
    columns = {name: [row[name] for row in rows] for name in ("sample", "true", "predicted", "correct", "split")}
    columns["correct"] = [int(v) for v in columns["correct"]]
    return Run(path, recorded, columns)


def _config(path: Path) -> dict[str, Any] | None:
    record = path / rundir.HYDRA / CONFIG_RECORD
    if not record.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(record), resolve=False)  # type: ignore[return-value]


def tested_split(run: Run) -> str:
    """The split the run's predictions are on (a training run's: test)."""
    return run.predictions["split"][0] if run.predictions["split"] else "test"


def compare_runs(new: Run, baseline: Run, alpha: float, key: str) -> dict[str, Any]:
    """The paired comparison of `new` against `baseline` on the same images (refused, naming `key`, when the
    fingerprints say the tested images differ)."""
    split = tested_split(new)
    mine, theirs = _fingerprint(new, split, "this run"), _fingerprint(baseline, split, f"{key}={baseline.path}")
    _require_same_images(f"{key}={baseline.path}", tested_split(baseline), theirs, split, mine)
    paired = _aligned(baseline.predictions, new.predictions, mine.get("kind") == "files", key)
    return {"run": str(baseline.path), "split": split, **compare_predictions(new.predictions, paired, alpha)}


def _require_same_images(who: str, their_split: str, theirs: dict, split: str, mine: dict) -> None:
    """The one refusal of a comparison on other images: the split, or its data fingerprint, differs."""
    if their_split != split or not same_split(mine, theirs):
        raise UserError(
            f"{who}: its {their_split} images differ from this run's {split} images ({theirs.get('count')} vs "
            f"{mine.get('count')} samples, data fingerprints differ); compare runs tested on the same data "
            "(data.*, data.split_seed)"
        )


def _fingerprint(run: Run, split: str, who: str) -> dict[str, Any]:
    section = run.summary.get(FINGERPRINT)
    if not isinstance(section, Mapping) or not isinstance(section.get(split), Mapping):
        raise UserError(
            f"{who} ({run.path}) records no data fingerprint of its {split} split; re-run it with this version "
            "of shelltrain to compare on the same images"
        )
    return dict(section[split])


def _aligned(baseline: dict[str, list[Any]], new: dict[str, list[Any]], files: bool, key: str) -> dict[str, list]:
    """The baseline's predictions in the order of the new run's samples (file ids taken relative to the data
    set's folder, so a moved copy still pairs)."""
    ids = (lambda c: relative_ids(c["sample"])) if files else (lambda c: c["sample"])
    position = {sample: i for i, sample in enumerate(ids(baseline))}
    wanted = ids(new)
    if len(position) != len(wanted) or any(sample not in position for sample in wanted):
        raise UserError(f"{key}: the two runs' predictions.csv name different samples; compare runs of the same data")
    order = [position[sample] for sample in wanted]
    return {column: [values[i] for i in order] for column, values in baseline.items()}


def config_diff(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> list[str]:
    """`key: a -> b` for every config key whose value differs (nested keys dotted)."""
    if a is None or b is None:
        return ["(a run has no .hydra/config.yaml record: configs not compared)"]
    flat_a, flat_b = _flatten(a), _flatten(b)
    keys = sorted(k for k in set(flat_a) | set(flat_b) if k.split(".")[0] not in UNCOMPARED_KEYS)
    missing = "(unset)"
    return [
        f"{k}: {flat_a.get(k, missing)} -> {flat_b.get(k, missing)}"
        for k in keys
        if flat_a.get(k, missing) != flat_b.get(k, missing)
    ]


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def describe(section: Mapping[str, Any]) -> list[str]:
    """The comparison as printed lines."""
    verdict = "significant" if section["significant"] else "not significant"
    lines = [
        f"{section['split']} accuracy {section['test_acc']:.4f} vs baseline {section['baseline_test_acc']:.4f} "
        f"on {section['samples']} paired images: difference {section['acc_diff']:+.4f} "
        f"({section['level']:.0%} paired-bootstrap CI "
        f"{section['acc_diff_low']:+.4f} .. {section['acc_diff_high']:+.4f})",
        f"McNemar exact test: {section['new_only_right']} images right only now, {section['baseline_only_right']} "
        f"only in the baseline, p={section['mcnemar_p']:.4g} ({verdict} at {1 - section['level']:g})",
    ]
    if section["worst_class"] is not None:
        worst = section["class_recall"][section["worst_class"]]
        lines.append(
            f"largest class recall drop: {section['max_class_recall_drop']:.4f} (class {section['worst_class']}: "
            f"{worst['baseline']:.4f} -> {worst['new']:.4f})"
        )
    return lines


def with_baseline(gates: Mapping[str, Any], recorded: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """`recorded` (summary.json) with gate.baseline's comparison added as its `baseline` section, printed."""
    if gates[BASELINE] is None:
        return recorded
    baseline = open_run(gates[BASELINE], "gate.baseline")
    section = compare_runs(open_run(run_dir, "this run"), baseline, float(gates["baseline_alpha"]), "gate.baseline")
    sys.stdout.write("".join(f"baseline: {line}\n" for line in describe(section)))
    return {**recorded, BASELINE: section}


def check_baseline_run(gates: Mapping[str, Any]) -> None:
    """gate.baseline names a finished run with per-sample predictions: said before anything trains."""
    if gates[BASELINE] is not None:
        open_run(gates[BASELINE], "gate.baseline")


def check_test_set(gates: Mapping[str, Any], test_fingerprint: Callable[[], dict[str, Any]]) -> None:
    """gate.baseline was tested on this run's test images (`test_fingerprint` makes their fingerprint entry):
    refused in one line before training, not after it."""
    if gates[BASELINE] is None:
        return
    baseline = open_run(gates[BASELINE], "gate.baseline")
    theirs = _fingerprint(baseline, "test", f"gate.baseline={baseline.path}")
    _require_same_images(f"gate.baseline={baseline.path}", "test", theirs, "test", test_fingerprint())


def main(argv: list[str] | None = None) -> None:
    """`shelltrain-compare BASELINE NEW`: the paired comparison, the config diff and the data fingerprints."""
    parser = argparse.ArgumentParser(prog="shelltrain-compare", description=main.__doc__)
    parser.add_argument("baseline", help="the finished run to compare against")
    parser.add_argument("new", help="the finished run being judged")
    parser.add_argument(
        "--alpha", type=float, default=None, help="the significance level (default: gate.baseline_alpha)"
    )
    args = parser.parse_args(argv)
    if args.alpha is None:
        args.alpha = float(packaged("gate.baseline_alpha"))
    try:
        if not 0.0 < args.alpha < 1.0:
            raise UserError(f"--alpha={args.alpha}: a level between 0 and 1, e.g. --alpha=0.05")
        baseline, new = open_run(args.baseline, "baseline"), open_run(args.new, "new")
        section = compare_runs(new, baseline, args.alpha, "baseline")
    except UserError as exc:
        sys.stderr.write(f"shelltrain-compare: error: {exc}\n")
        sys.exit(EXIT_USER_ERROR)
    out = [f"baseline {baseline.path}", f"new      {new.path}", *describe(section)]
    out += _fingerprint_lines(baseline.summary, new.summary)
    diff = config_diff(_config(baseline.path), _config(new.path))  # shelltrain-compare alone shows it
    out += ["config keys that differ:" if diff else "configs: identical"] + [f"  {line}" for line in diff]
    sys.stdout.write("\n".join(out) + "\n")


def _fingerprint_lines(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    fa, fb = a.get(FINGERPRINT) or {}, b.get(FINGERPRINT) or {}
    lines = []
    for split in ("train", "val", "test"):
        same = same_split(fa.get(split), fb.get(split))
        lines.append(f"data fingerprint {split}: {'same' if same else 'DIFFERENT'}")
    if fa.get("split_seed") != fb.get("split_seed"):
        lines.append(f"data.split_seed: {fa.get('split_seed')} -> {fb.get('split_seed')}")
    return lines
