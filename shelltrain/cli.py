"""The `shelltrain` command: Hydra composes the config, the runner does the work.

Kept free of torch imports so that `--help` and `--cfg job` answer in a fraction of a second.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra._internal import utils as hydra_internal
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from shelltrain.errors import UserError

EXIT_USER_ERROR = 2


@hydra.main(version_base="1.3", config_path="pkg://shelltrain.configs", config_name="train")
def _task(cfg: DictConfig) -> Any:
    from shelltrain.schema import validate

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        from shelltrain.runner import run  # imports torch: only once a job really runs

        return run(cfg, run_dir)
    except UserError as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN or _full_error():
            raise  # a sweep records the failed job and goes on with the others
        _remove_if_unused(run_dir)
        _print_error(str(exc))
        sys.exit(EXIT_USER_ERROR)


def main() -> None:
    """Console entry point."""
    hydra_internal.run_and_report = _report_user_errors(hydra_internal.run_and_report)
    _task()


def _report_user_errors(hydra_report: Callable[[Callable[[], Any]], Any]) -> Callable:
    """Wrap Hydra's error reporter: mistakes in the command line become one line naming the fix."""

    def report(func: Callable[[], Any]) -> Any:
        if _full_error():
            return hydra_report(func)
        try:
            return func()
        except Exception as exc:
            message = explain(exc)
            if message is None:
                return hydra_report(lambda: _reraise(exc))  # a bug: keep Hydra's traceback
            _print_error(message)
            sys.exit(EXIT_USER_ERROR)

    return report


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

