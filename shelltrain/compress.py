"""The compression pipeline (`experiment=compress_digits`, any config with a `compress` section): one command
trains an ensemble teacher, distils it into a small student, trains the same student alone as the baseline,
prunes the distilled student, quantizes it to int8, exports it, and writes one table that compares them all.

Each stage is an ordinary sub-run in `<run dir>/compress/<stage>/` made by the runner's own functions
(`train_and_test`, `ensemble_and_test`) on this run's config with the stage's overrides, so every figure can be
re-measured from its sub-run. The models are then reloaded from those sub-runs and measured side by side
(`prune.measure`): parameters, weights size, MACs and CPU latency, all timed in the same loop as the teacher.

An interrupted chain resumes stage by stage (`trainer.resume=<run dir>`): a stage whose sub-run completed is kept
as it is, the interrupted one continues from its last checkpoint, and the later ones run.
"""

from __future__ import annotations

import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.table import Table

from shelltrain import rundir, summary
from shelltrain.console import make_console, say, show
from shelltrain.ensemble import ensemble_and_test
from shelltrain.errors import Interrupted, UserError
from shelltrain.export import INSTALL_HINT
from shelltrain.plots import plot_tradeoff
from shelltrain.prune.measure import LatencySpec, cpu_copy, latency_figures, measure
from shelltrain.prune.report import NOISY_SPREAD
from shelltrain.resume import Resume
from shelltrain.runner import train_and_test, train_settings
from shelltrain.schema import validate
from shelltrain.tasks import export_task
from shelltrain.trained import open_trained

STAGES = ("teacher", "student", "distilled", "pruned", "int8")  # sub-run names, in the order they run


def run_compress(cfg: DictConfig, run_dir: Path, resume: bool = False) -> float:
    """Run every stage in its sub-run (`resume`: continue an interrupted chain), then measure and report; returns
    the int8 student's test accuracy."""
    started = time.perf_counter()
    console = make_console()
    spec = cfg.compress
    missing = [name for name in ("onnx", "onnxscript") if spec.export == "onnx" and find_spec(name) is None]
    if missing:  # said before the stages train, not after
        raise UserError(
            f"compress.export=onnx needs {', '.join(missing)}: {INSTALL_HINT}, or compress.export=torchscript"
        )
    dirs = {stage: rundir.compress_stage_dir(run_dir, stage) for stage in STAGES}
    student = cfg.copy()
    with open_dict(student):
        student.compress = None  # a stage is a plain run
    configs = {
        "teacher": _stage(student, spec.teacher),
        "student": student,
        "distilled": _stage(student, {"distill": {**spec.distill, "teacher": str(dirs["teacher"])}}),
        "pruned": _loaded(student, dirs["distilled"], spec.prune),
        "int8": _loaded(student, dirs["pruned"], spec.quantize),
    }
    for stage in STAGES:
        try:
            _run_stage(stage, configs[stage], dirs[stage], resume, console)
        except Interrupted as exc:  # the chain resumes as a whole, from its own run directory
            raise Interrupted(exc.signum, run_dir, exc.saved) from exc
    exported = _export(cfg, dirs, console)
    rows = measure_stages(dirs, LatencySpec(**spec.latency))
    report = {"rows": rows, "export": exported, "latency_setup": {**spec.latency, "device": "cpu"}}
    report["wall_seconds"] = round(time.perf_counter() - started, 3)
    rundir.write_json(report, rundir.compress_report(run_dir))
    show(console, compress_table(rows))
    noisy = [row["name"] for row in rows if row["latency_spread"] > NOISY_SPREAD]
    if noisy:  # a busy machine: the ratios hold (the models take turns), the absolute times less so
        say(
            console,
            f"compress: latency repeats spread by more than {NOISY_SPREAD:.0%} for {', '.join(noisy)}; "
            "raise compress.latency.repeats or measure on a quieter machine",
        )
    if cfg.plots:
        plot_tradeoff(
            [{**row, "label": row["name"]} for row in rows],
            run_dir / rundir.PLOTS / rundir.COMPRESS_PLOT,
            x="params",
        )
    figures = {"test_acc": rows[-1]["test_acc"], "wall_seconds": report["wall_seconds"], "compress": rows}
    summary.write(summary.build(figures, run_dir), run_dir)
    say(console, f"compress: table in [bold]{rundir.compress_report(run_dir)}[/bold]")
    return rows[-1]["test_acc"]


def _run_stage(stage: str, cfg: DictConfig, out_dir: Path, resume: bool, console: Any) -> None:
    """One stage as its sub-run. Resuming, a stage that completed is kept (its files untouched) and one that was
    interrupted continues from its last checkpoint (the teacher ensemble member by member)."""
    if resume and summary.read(out_dir).get("status") == "completed":
        say(console, f"compress: {stage} completed before; kept as it is in {out_dir}")
        return
    last = rundir.last_checkpoint(out_dir)
    continued = resume and (last.is_file() or stage == "teacher")
    say(console, f"[bold]compress: {stage}[/bold] {'continues' if continued else 'runs'} in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if stage == "teacher":
        ensemble_and_test(cfg, out_dir, resume=resume)
    else:
        train_and_test(cfg, out_dir, label=stage, resume=Resume(last, in_place=True) if continued else None)


def _stage(cfg: DictConfig, overrides: Any) -> DictConfig:
    """This run's config with a stage's overrides, checked like any command line's config."""
    merged = OmegaConf.merge(cfg, overrides)
    validate(merged)
    return merged


def _loaded(student: DictConfig, source: Path, prune: DictConfig) -> DictConfig:
    """A stage that trains nothing: the model in `source`, compressed by the `prune` overrides."""
    return _stage(student, {"model": {"weights": str(source)}, "trainer": {"epochs": 0}, "prune": prune})


def _export(cfg: DictConfig, dirs: dict[str, Path], console: Any) -> dict[str, Any]:
    """The compressed student as a deployable file: the pruned float model in `compress.export` (ONNX by
    default) and the int8 one as TorchScript (torch.ao's int8 modules have no ONNX export), each checked."""
    settings = train_settings(cfg.trainer, torch.device("cpu"))
    found = {}
    for stage, fmt in (("pruned", cfg.compress.export), ("int8", "torchscript")):
        task_cfg = OmegaConf.create(
            {"export": {"format": fmt, "tolerance": cfg.export.tolerance}, "model": {"weights": str(dirs[stage])}}
        )
        found[stage], _ = export_task(task_cfg, dirs[stage], settings, console, open_trained(dirs[stage]))
    return found


def measure_stages(dirs: dict[str, Path], latency: LatencySpec) -> list[dict[str, Any]]:
    """One row per model, reloaded from its sub-run: test accuracy (from its summary), parameters, weights size,
    MACs and CPU latency, every model timed in the same loop as the teacher."""
    members = sorted(p for p in (dirs["teacher"] / rundir.MEMBERS).iterdir() if p.is_dir())
    named = [("teacher ensemble", dirs["teacher"]), *((f"member {p.name}", p) for p in members)]
    named += [("student alone", dirs["student"]), ("distilled student", dirs["distilled"])]
    named += [("pruned", dirs["pruned"]), ("int8", dirs["int8"])]
    entries = [(name, path, rundir.read_json(rundir.summary(path))["test_acc"]) for name, path in named]
    loaded = {name: open_trained(path) for name, path in named}
    models = [trained.module for trained in loaded.values()]
    shape = loaded["student alone"].preprocessing.shape
    twins = [None] * (len(models) - 1) + [models[-2]]  # int8's MACs: its float original runs the same operations
    figures = [measure(cpu_copy(m), shape, macs_model=twin) for m, twin in zip(models, twins)]
    times = latency_figures([cpu_copy(m) for m in models], shape, latency)
    rows = []
    for (name, path, acc), figure, ms in zip(entries, figures, times):
        rows.append(
            {
                "name": name,
                "test_acc": acc,
                "params": figure["params"],
                "size_bytes": figure["size_bytes"],
                "macs": figure["macs"],
                "latency_ms": round(ms.median_ms, 4),
                "latency_spread": round(ms.spread, 4),  # the repeats' interquartile range / median
                "run_dir": str(path),
            }
        )
    return rows


def compress_table(rows: list[dict[str, Any]]) -> Table:
    """The log's table: one row per model, the teacher ensemble first, speed-up against it."""
    table = Table(title="compression: teacher ensemble -> distilled, pruned, int8 student")
    for column in ("model", "test acc", "params", "weights MB", "MACs", "CPU ms (speed-up)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    base = rows[0]["latency_ms"]
    for row in rows:
        table.add_row(
            row["name"],
            f"{row['test_acc']:.4f}",
            f"{row['params']:,}",
            f"{row['size_bytes'] / 1e6:.3f}",
            f"{row['macs']:,}",
            f"{row['latency_ms']:.2f} ({base / row['latency_ms']:.1f}x)",
        )
    return table
