"""Every config default has one home, the packaged YAML: no code restates one with `.get("<key>", default)` on a
config node, and the docs' key tables list every schema key with the packaged default option's value."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from shelltrain.schema import SCHEMAS, packaged

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "shelltrain"
TOP = set(OmegaConf.load(ROOT / "configs" / "train.yaml")) - {"defaults", "hydra"}
# Receivers that hold a config node: the composed config, a group, a nested section (trainer.ema, compress.latency).
GROUPS = {*SCHEMAS, "ema", "swa", "latency"}

# (file, receiver, key) -> why a `.get` there is not a restated default. A stale entry fails the test.
ALLOWED = {
    ("shelltrain/checks.py", "cfg.model", "weights"): "a `_target_` model is the user's free-form group (no schema)",
    ("shelltrain/checks.py", "cfg.model", "name"): "a `_target_` model is the user's free-form group (no schema)",
    ("shelltrain/schema.py", "cfg.model", "weights"): "a `_target_` model is the user's free-form group (no schema)",
    ("shelltrain/prune/stage.py", "cfg.model", "name"): "a `_target_` model is the user's free-form group",
    ("shelltrain/runner.py", "cfg.model", "name"): "a `_target_` model is the user's free-form group",
    ("shelltrain/runner.py", "cfg.model", "strict"): "a `_target_` model is the user's free-form group",
    ("shelltrain/ensemble.py", "cfg.model", "weights"): "a `_target_` model is the user's free-form group",
    ("shelltrain/members.py", "self.cfg.model", "name"): "a `_target_` model is the user's free-form group",
    ("shelltrain/checkpoint.py", "config", "model"): "a checkpoint's recorded config (any version, or foreign)",
    ("shelltrain/checkpoint.py", "model_cfg", "name"): "a checkpoint's recorded config; a `_target_` model has none",
    ("shelltrain/checkpoint.py", "model_cfg", "width"): "a checkpoint's recorded config; only cnn has a width",
    ("shelltrain/prune/__init__.py", "config", "data"): "a checkpoint's recorded config (any version)",
    ("shelltrain/resume_auto.py", "config", "trainer"): "a saved run's plain config (.hydra/config.yaml, any version)",
    ("shelltrain/prune/__init__.py", "config.get('data') or {}", "image_size"): "a checkpoint's recorded config",
    ("shelltrain/members.py", "trained.config", "data"): "a trained model's recorded config (any version)",
    ("shelltrain/trained.py", "self.config", "model"): "a trained model's recorded config (any version)",
    ("shelltrain/trained.py", "model", "name"): "a trained model's recorded config; a `_target_` model has none",
    ("shelltrain/transfer.py", "config", "model"): "a checkpoint's recorded config (any version, or foreign)",
    ("shelltrain/transfer.py", "config", "data"): "a checkpoint's recorded config (any version, or foreign)",
    ("shelltrain/transfer.py", "config.get('data', {})", "mean"): "a checkpoint's recorded config (older ones)",
    ("shelltrain/transfer.py", "data", "image_size"): "a checkpoint's recorded config (older ones)",
    ("shelltrain/transfer.py", "model", "name"): "a checkpoint's recorded config; a `_target_` model has none",
    ("shelltrain/transfer.py", "model_cfg", "weights"): "a `_target_` model is the user's free-form group",
    ("shelltrain/transfer.py", "model_cfg", "name"): "a `_target_` model is the user's free-form group",
    ("shelltrain/transfer.py", "model_cfg", "library"): "a `_target_` model is the user's free-form group",
    ("shelltrain/sweep_table.py", "cv", "mean"): "summary.json's cv section, not the cv group",
    ("shelltrain/sweep_table.py", "cv", "std"): "summary.json's cv section, not the cv group",
    ("shelltrain/distill.py", "report", "weights"): "ensemble.json, not the report group",
}


def _fields(schema: type, prefix: str = "") -> list[str]:
    """A dataclass's keys, nested sections flattened (trainer: ema.decay, ...)."""
    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        nested = dataclasses.is_dataclass(hints[f.name])
        keys += _fields(hints[f.name], f"{prefix}{f.name}.") if nested else [f"{prefix}{f.name}"]
    return keys


SCHEMA_KEYS = (
    TOP | set(SCHEMAS) | {part for schema in SCHEMAS.values() for key in _fields(schema) for part in key.split(".")}
)


def _receiver(node: ast.AST) -> str | None:
    """The name a `.get` is called on: `cfg.model.get` -> model, `(cfg.get("x") or {}).get` -> cfg."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _receiver(node.func.value)
    if isinstance(node, ast.BoolOp):
        return _receiver(node.values[0])
    return None


def _config_gets() -> set[tuple[str, str, str]]:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
                continue
            key = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            name = _receiver(node.func.value)
            if key in SCHEMA_KEYS and name and (name in ("cfg", "config") or name.endswith("_cfg") or name in GROUPS):
                found.add((str(path.relative_to(ROOT)), ast.unparse(node.func.value), key))
    return found


def test_no_config_get_restates_a_default():
    found = _config_gets()
    restated = sorted(found - set(ALLOWED))
    assert not restated, f"use attribute access, the YAML holds the default: {restated}"
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"allowed .get calls that no longer exist; remove them from ALLOWED: {stale}"


# ---- the docs' key tables against the packaged defaults

# docs page, section heading -> the group its table describes ("" : keys are dotted from the top)
TABLES = {
    ("configuration.md", "### model"): "model",
    ("configuration.md", "### data"): "data",
    ("configuration.md", "### augmentation"): "augmentation",
    ("configuration.md", "### trainer"): "trainer",
    ("configuration.md", "### finetune"): "finetune",
    ("configuration.md", "### prune"): "prune",
    ("configuration.md", "### ensemble"): "ensemble",
    ("configuration.md", "## Plain blocks"): "",
    ("distillation.md", "## The `distill` group"): "distill",
}
# Cells that say the value varies by option instead of giving one.
VARIES = {"the option", "the group", "per data set"}


def _rows(page: str, heading: str) -> list[tuple[list[str], str | None]]:
    """(keys, default cell) of the first table under `heading`; default None where the table has no such column."""
    lines = (ROOT / "docs" / page).read_text().split(heading + "\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start:])]
    split = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in table]
    column = next((i for i, cell in enumerate(split[0]) if cell.startswith("default")), None)
    return [(re.findall(r"`([^`]+)`", cells[0]), cells[column] if column is not None else None) for cells in split[2:]]


def _documented_values(cell: str, count: int) -> list[str] | None:
    """The values a default cell gives for `count` keys (one value may stand for all), or None where it varies."""
    values = re.findall(r"`([^`]+)`", cell) or [v.strip() for v in cell.split(",")]
    if cell in VARIES:
        return None
    return values[:count] if len(values) >= count else values * count


def _documented() -> dict[str, str | None]:
    """Every documented key, dotted from the top (trainer.ema.decay), with its documented default."""
    documented = {}
    for (page, heading), group in TABLES.items():
        for keys, cell in _rows(page, heading):
            values = _documented_values(cell, len(keys)) if cell is not None else None
            for i, key in enumerate(keys):
                documented[f"{group}.{key}" if group else key] = values[i] if values else None
    return documented


def _value(text: str) -> object:
    """A documented value as the YAML would read it (OmegaConf's loader: 1e-6 is a float)."""
    value = OmegaConf.create(f"v: {text}").v
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def test_the_docs_tables_list_every_key_with_its_packaged_default():
    documented = _documented()
    wanted = [f"{group}.{key}" for group, schema in SCHEMAS.items() if group != "compress" for key in _fields(schema)]
    missing = [key for key in wanted if key not in documented]
    assert not missing, f"keys missing from the docs' tables: {missing}"
    assert "compress" in documented  # off by default; experiment=compress_digits sets and describes its keys
    root = packaged()
    wrong = []
    for key, value in documented.items():
        if value is None or "<" in key or "._" in key or key.split(".")[0] not in TOP | set(SCHEMAS):  # hydra.*
            continue
        actual = OmegaConf.select(root, key)
        actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
        if _value(value) != actual:
            wrong.append(f"{key}: docs {value}, YAML {actual!r}")
    assert not wrong, f"documented defaults that differ from the packaged YAML: {wrong}"


@pytest.mark.parametrize("group", sorted(set(SCHEMAS) - {"compress"}))
def test_every_schema_group_has_a_docs_table(group):
    assert any(key.startswith(f"{group}.") for key in _documented()), group
