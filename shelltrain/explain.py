"""Config and command-line mistakes as one line naming the fix: an unknown key or option (with the closest
match), an unparsable override, a plugin that is not installed, a run directory that cannot be written.

Kept free of torch: the CLI explains mistakes before a job starts.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig
from omegaconf.errors import ValidationError

from shelltrain.checks import wrong_type
from shelltrain.errors import UserError
from shelltrain.rundir import PLACE_ERRNOS, place_error

# Sweeper/launcher options that come from the optional `[sweep]` extra, and the plugin providing each.
PLUGIN_OPTIONS = {
    "optuna": "hydra-optuna-sweeper",
    "joblib": "hydra-joblib-launcher",
    "submitit_local": "hydra-submitit-launcher",
    "submitit_slurm": "hydra-submitit-launcher",
    "slurm": "hydra-submitit-launcher",
}


def explain(exc: BaseException) -> str | None:
    """A one-line message for a config mistake, or None when `exc` is not the user's doing."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        return _explain_missing_option(exc)
    if isinstance(exc, OverrideParseException):
        return f"could not parse the override: {first_line(str(exc))}"
    if isinstance(exc, ConfigCompositionException):
        return _explain_composition(exc)
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = " ".join(f"{exc.context or ''} {exc.problem or ''}".split())
        where = f"'{mark.name}', line {mark.line + 1}, column {mark.column + 1}"
        return f"{where}: YAML syntax error ({problem}); fix that file"
    if isinstance(exc, InstantiationException):
        return explain_instantiation(exc)
    if isinstance(exc, ValueError) and str(exc).startswith("Unable to configure handler"):
        exc = exc.__cause__ or exc  # logging could not open train.log in an existing run directory
    if isinstance(exc, OSError) and exc.errno in PLACE_ERRNOS:
        return place_error(exc)
    return None


def explain_instantiation(exc: BaseException, key: str | None = None) -> str:
    """One line for Hydra's InstantiationException of the `_target_` under `key`: a target Hydra blocks (it could
    run arbitrary code), one that cannot be imported, or arguments its call refuses. Without `key` (caught only
    by the CLI) the line names the target alone."""
    text = " ".join(str(exc).split())
    blocked = re.match(r"Target '([^']+)' is blocklisted", text)
    if blocked:
        where = f"{key}._target_" if key else "_target_"
        return (
            f"{where}='{blocked.group(1)}' is refused: Hydra blocks targets that let a config run code; "
            "name the class or function that builds it"
        )
    target = re.search(r"target '([^']+)'", text)
    cause = exc.__cause__
    reason = f"{type(cause).__name__}: {' '.join(str(cause).split())}" if cause is not None else text
    named = f"'{target.group(1)}'" if target else "its _target_"
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", reason)
    if key and unexpected:
        name = f"{key}.{unexpected.group(1)}"
        return f"{name} is not an argument of {named} ({reason[:300]}); remove {name} or fix {key}._target_"
    fix = f"fix {key}._target_ or the arguments (the keys of {key})" if key else "fix that _target_ or its arguments"
    return f"{key + ': ' if key else ''}cannot build {named} ({reason[:300]}); {fix}"


def _explain_missing_option(exc: MissingConfigException) -> str:
    missing = exc.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    # Hydra lists the options for GROUP=OPTION but not for an option inside a list (logger=[csv,foo])
    available = exc.options if exc.options is not None else _group_options(group)
    if not group or not available:
        return first_line(str(exc))
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
        if isinstance(cause, ValidationError):  # a value of the wrong type for its group's schema
            return wrong_type(cause)
        detail = first_line(str(cause)) if cause is not None else first_line(text)
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


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
