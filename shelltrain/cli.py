"""The `shelltrain` command: Hydra composes the config, the runner does the work.

Kept free of torch imports so that `--help` and `--cfg job` answer in a fraction of a second.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra._internal import utils as hydra_internal
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from shelltrain import sweep
from shelltrain.errors import UserError

# Exit codes (README "Using shelltrain in CI"): 0 success; 1 an unexpected error (traceback);
# 2 a config or input mistake; 3 a quality gate missed; 4 one or more jobs of a multirun failed.
EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = sweep.EXIT_GATE_FAILED
EXIT_JOBS_FAILED = sweep.EXIT_JOBS_FAILED

# Sweeper/launcher options that come from the optional `[sweep]` extra, and the plugin providing each.
PLUGIN_OPTIONS = {
    "optuna": "hydra-optuna-sweeper",
    "joblib": "hydra-joblib-launcher",
    "submitit_local": "hydra-submitit-launcher",
    "submitit_slurm": "hydra-submitit-launcher",
    "slurm": "hydra-submitit-launcher",
}


@hydra.main(version_base="1.3", config_path="pkg://shelltrain.configs", config_name="train")
def _task(cfg: DictConfig) -> Any:
    from shelltrain.schema import validate

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started = time.perf_counter()
    try:
        validate(cfg)
        _check_sweeper(hydra_cfg, cfg)
        from shelltrain.runner import run  # imports torch: only once a job really runs

        result = run(cfg, run_dir)
    except UserError as exc:
        if multirun:
            _record_failure(run_dir, exc, started)
            raise  # Hydra records the failed job and goes on with the others; main() prints the sweep table
        if _full_error():
            raise
        _remove_if_unused(run_dir)
        _print_error(str(exc))
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:
        if multirun:
            _record_failure(run_dir, exc, started)
        raise
    missed = _apply_gates(cfg, run_dir)
    if missed and not multirun:  # in a sweep the job's summary.json records it and main() exits 3 at the end
        for line in missed:
            sys.stderr.write(f"shelltrain: gate missed: {line}\n")
        sys.exit(EXIT_GATE_FAILED)
    return result


def main() -> None:
    """Console entry point."""
    if sys.argv[1:2] == ["summarize"]:  # `shelltrain summarize DIR`, the same as `shelltrain-summary DIR`
        from shelltrain.sweep import main as summary_main

        sys.exit(summary_main(sys.argv[2:]))
    hydra_internal.run_and_report = _report_user_errors(hydra_internal.run_and_report)
    _task()


def _report_user_errors(hydra_report: Callable[[Callable[[], Any]], Any]) -> Callable:
    """Wrap Hydra's error reporter: mistakes in the command line become one line naming the fix, and a
    multirun always ends with its summary table (Hydra skips `on_multirun_end` when a job failed)."""

    def report(func: Callable[[], Any]) -> Any:
        try:
            result = hydra_report(func) if _full_error() else func()
        except Exception as exc:
            outcome = sweep.finish()  # a multirun prints its table now, failed jobs included
            if outcome is not None and outcome.exit_code:
                _print_error(sweep.failure_line(outcome))
                if _full_error():
                    raise
                sys.exit(outcome.exit_code)
            if _full_error():
                raise
            message = explain(exc)
            if message is None:
                return hydra_report(lambda: _reraise(exc))  # a bug: keep Hydra's traceback
            _print_error(message)
            sys.exit(EXIT_USER_ERROR)
        outcome = sweep.finish()
        if outcome is not None and outcome.exit_code:
            _print_error(sweep.failure_line(outcome))
            sys.exit(outcome.exit_code)
        return result

    return report


def _record_failure(run_dir: Path, exc: BaseException, started: float) -> None:
    """A failed sweep job still leaves a summary.json: status "failed" and its one-line error."""
    import json

    path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    try:
        if path.is_file():
            summary = json.loads(path.read_text())  # a run that got as far as its report keeps its figures
    except (OSError, ValueError):
        summary = {}
    error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and not isinstance(exc, UserError) and str(cause) not in error:
        error += f" ({type(cause).__name__}: {cause})"  # e.g. what Hydra's InstantiationException wraps
    error = " ".join(error.split()) or type(exc).__name__
    summary.update(
        status="failed",
        error=error if len(error) <= 400 else error[:397] + "...",
        error_type=type(exc).__name__,
        wall_seconds=summary.get("wall_seconds", round(time.perf_counter() - started, 3)),
        run_dir=str(run_dir),
    )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not isinstance(exc, UserError):  # a bug: keep the traceback next to the job for the report
            import traceback

            (run_dir / "error.log").write_text("".join(traceback.format_exception(exc)))
            summary["traceback"] = "error.log"
        tmp = path.with_name(".summary.json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        tmp.replace(path)
    except OSError:
        pass  # the launcher still reports the failure; only the table loses this row's message


def _apply_gates(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Check cfg.gate against the run's summary.json, record the verdict there, return the misses."""
    import json

    from shelltrain.gates import active, check

    gate = cfg.get("gate")
    path = run_dir / "summary.json"
    if not active(gate) or not path.is_file():
        return []
    summary = json.loads(path.read_text())
    verdict = check(gate, summary)
    summary["gates"] = verdict
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    if verdict["passed"]:
        checked = [
            f"{key[:-4]}={c['value']:.6g} {'>=' if key.endswith('_min') else '<='} {c['limit']:g}"
            for key, c in verdict["checked"].items()
        ]
        sys.stdout.write(f"quality gates passed: {'; '.join(checked)}\n")
    return list(verdict["failures"])


def _check_sweeper(hydra_cfg: DictConfig, cfg: DictConfig) -> None:
    """An Optuna search must optimize in the direction of trainer.monitor (the value each job returns)."""
    sweeper = hydra_cfg.get("sweeper")
    if sweeper is None or "optuna" not in str(sweeper.get("_target_", "")).lower():
        return
    direction = str(sweeper.get("direction", "")).rsplit(".", 1)[-1].lower()
    expected = "minimize" if str(cfg.trainer.monitor).endswith("loss") else "maximize"
    if direction in ("minimize", "maximize") and direction != expected:
        raise UserError(
            f"hydra.sweeper.direction={direction} but each job returns trainer.monitor={cfg.trainer.monitor}; "
            f"set hydra.sweeper.direction={expected}"
        )


def explain(exc: BaseException) -> str | None:
    """A one-line message for a config mistake, or None when `exc` is not the user's doing."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        return _explain_missing_option(exc)
    if isinstance(exc, OverrideParseException):
        return f"could not parse the override: {_first_line(str(exc))}"
    if isinstance(exc, ConfigCompositionException):
        return _explain_composition(exc)
    return None


def _explain_missing_option(exc: MissingConfigException) -> str:
    missing = exc.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    # Hydra lists the options for GROUP=OPTION but not for an option inside a list (logger=[csv,foo])
    available = exc.options if exc.options is not None else _group_options(group)
    if not group or not available:
        return _first_line(str(exc))
    options = ", ".join(sorted(available))
    hint = _did_you_mean(option, available)
    if group in ("hydra/sweeper", "hydra/launcher") and option in PLUGIN_OPTIONS:
        return (
            f"{group}={option} needs the {PLUGIN_OPTIONS[option]} plugin, which is not installed; "
            'install the sweep extra: pip install "shelltrain[sweep]"'
        )
    return (
        f"{group}={option}: no such option{hint}. Available {group} options: {options} "
        f"(add your own as DIR/{group}/{option}.yaml with --config-dir DIR)"
    )


def _explain_composition(exc: ConfigCompositionException) -> str:
    text = str(exc)
    match = re.match(r"Could not override '([^']+)'", text)
    if match is None:
        cause = exc.__cause__
        detail = _first_line(str(cause)) if cause is not None else _first_line(text)
        return f"invalid config: {detail}"
    key = match.group(1)
    groups = _known_groups()
    if "." not in key and ("No match in the defaults list" in text or _did_you_mean(key, groups)):
        return (
            f"'{key}' is not a config group{_did_you_mean(key, groups)}; groups: {', '.join(sorted(groups))} "
            f"(to add a new top-level key on purpose use +{key}=...)"
        )
    parent_key, _, leaf = key.rpartition(".")
    siblings = _keys_of(getattr(exc.__cause__, "parent_node", None))
    hint = _did_you_mean(leaf, siblings, prefix=f"{parent_key}." if parent_key else "")
    valid = f" Valid keys of {parent_key or 'the config'}: {', '.join(siblings)}." if siblings else ""
    return (
        f"unknown key '{key}'{hint}.{valid} "
        f"(to add a new key on purpose, e.g. an argument of a custom _target_, use +{key}=...)"
    )


def _keys_of(node: Any) -> list[str]:
    if isinstance(node, DictConfig):
        return [str(k) for k in node.keys() if not str(k).startswith("_") and k != "hydra"]
    return []


def _known_groups() -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return [g for g in loader.list_groups("") if g != "hydra"]


def _group_options(group: str) -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    if not group or not GlobalHydra.instance().is_initialized():
        return []
    return GlobalHydra.instance().config_loader().get_group_options(group)


def _did_you_mean(word: str, candidates: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _remove_if_unused(run_dir: Path) -> None:
    """Drop a run dir that holds only what Hydra wrote at start-up, so failed starts leave no litter.

    A dir with checkpoints or a summary holds results (a resumed run) and is never touched.
    """
    if not run_dir.is_dir():
        return
    produced = {p.name for p in run_dir.iterdir()} - {".hydra", "train.log"}
    if not produced:
        shutil.rmtree(run_dir)
        if not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()  # the empty date folder of the default outputs/DATE/TIME layout


def _print_error(message: str) -> None:
    sys.stderr.write(f"shelltrain: error: {message}\n")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _reraise(exc: BaseException) -> None:
    raise exc

