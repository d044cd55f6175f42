"""Every float key of every schema refuses NaN and infinity with one line naming the key: a comparison-based range
check lets NaN through (nan < 0 is false), and a NaN temperature, tolerance or rate then silently breaks a run."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from shelltrain.errors import UserError
from shelltrain.schema import SCHEMAS, validate

# Keys of groups without a dataclass (the optimizer is a _target_) whose numbers shelltrain reads itself.
UNSCHEMED = [("optimizer.lr", False), ("optimizer.weight_decay", False)]
# No key takes inf on purpose: where a limit could be lifted, a large number or null says so. compress is null (off)
# by default and holds override sets, checked when its stages validate.
SKIPPED_GROUPS = ("compress",)


def _float_keys(schema: type, prefix: str) -> list[tuple[str, bool]]:
    """(dotted key, whether it is a list of floats) for every float field of `schema` and its nested groups."""
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) else [hint]
        kind = kinds[0] if len(kinds) == 1 else None
        if dataclasses.is_dataclass(kind):
            keys += _float_keys(kind, f"{prefix}{name}.")
        elif kind is float:
            keys.append((f"{prefix}{name}", False))
        elif typing.get_origin(kind) is list and typing.get_args(kind) == (float,):
            keys.append((f"{prefix}{name}", True))
    return keys


FLOAT_KEYS = [
    key for group, schema in SCHEMAS.items() if group not in SKIPPED_GROUPS for key in _float_keys(schema, f"{group}.")
] + UNSCHEMED
CASES = [(key, is_list, value) for key, is_list in FLOAT_KEYS for value in ("nan", "inf", "-inf")]


def test_the_float_keys_are_found():
    found = {key for key, _ in FLOAT_KEYS}
    for key in ("distill.temperature", "trainer.swa.lr", "prune.distill_temperature", "ensemble.temperature"):
        assert key in found
    for key in ("export.tolerance", "data.cache_max_memory", "trainer.l1", "data.mean", "lr_find.end_lr"):
        assert key in found


@pytest.mark.parametrize("key, is_list, value", CASES, ids=[f"{k}={v}" for k, _, v in CASES])
def test_a_float_key_refuses_nan_and_infinity_in_one_line_naming_it(key, is_list, value):
    if is_list:  # the packaged list (or two numbers where it is null) with its first number replaced
        packaged = OmegaConf.select(compose_config(), key) or [1.0, 1.0]
        override = f"{key}=[{','.join([value, *map(str, packaged[1:])])}]"
    else:
        override = f"{key}={value}"
    with pytest.raises(UserError) as caught:
        validate(compose_config(override))
    message = str(caught.value)
    assert message.startswith(key) or f" {key}" in message, message
    assert value.lstrip("-") in message and "\n" not in message, message  # the value it refuses, in one line


IGNORED = [
    (["model.pretrained_file=/weights/model.safetensors"], "model.pretrained_file is read by model.weights=timm only"),
    (["model=resnet18", "model.width=8"], "model.width=8 applies to model=cnn only"),
    (["model.width=0"], "model.width=0 is out of range"),
    (["model.dropout=1.5"], "model.dropout=1.5 is out of range"),
    (["prune.distill_temperature=0"], "prune.distill_temperature=0.0 must be > 0"),  # prune=none reads none of them
]


@pytest.mark.parametrize("overrides, expected", IGNORED, ids=[" ".join(o) for o, _ in IGNORED])
def test_a_value_that_would_be_ignored_or_replaced_is_refused(overrides, expected):
    with pytest.raises(UserError, match=expected):
        validate(compose_config(*overrides))
