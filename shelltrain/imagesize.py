"""An image size as (height, width): the one reader of `data.image_size` (one int for a square, or [H, W] for
non-square input) and of the sizes checkpoints, exported files and pretrained weights record. Torch-free: the
config check uses it before anything loads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shelltrain.errors import UserError

KEY = "data.image_size"
FORMS = "one int for a square, e.g. 32, or [height, width], e.g. [16, 24]"


def size_hw(value: Any, key: str = KEY) -> tuple[int, int]:
    """(height, width) of an image size: an int is a square, a list of two ints is [height, width]. Anything else
    is one line naming `key`, so a typo fails before data loads, not as a shape error deep in a transform."""
    listed = isinstance(value, Sequence) and not isinstance(value, str)
    sides = list(value) if listed else [value]
    if len(sides) not in (1, 2) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
        raise UserError(f"{key}={sides if listed else repr(value)} is not an image size; give {FORMS}")
    if min(sides) < 1:
        raise UserError(f"{key}={sides if listed else value} is out of range; it must be >= 1 ({FORMS})")
    if listed and len(sides) == 1:
        raise UserError(f"{key}={sides} gives one side; give {FORMS}")
    return int(sides[0]), int(sides[-1])


def check_size(value: Any, key: str = KEY) -> None:
    """A configured size: null (taken from the weights) or a valid size."""
    if value is not None:
        size_hw(value, key)


def plain_size(value: Any) -> int | list[int]:
    """How a size is written down (configs, checkpoints, exported metadata, summary.json): one int for a square, as
    every earlier shelltrain wrote it and reads it back, else [height, width]."""
    height, width = size_hw(value)
    return height if height == width else [height, width]


def covering(have: tuple[int, int], size: Any) -> tuple[int, int]:
    """The (height, width) an image of `have` pixels is scaled to, keeping its aspect ratio, so that it just covers
    `size` (then center-cropped to it); for a square size the shorter side becomes that size, as torchvision's
    resize to one int gives it."""
    height, width = size_hw(size)
    have_h, have_w = have
    if height * have_w >= width * have_h:  # the height binds: the width follows the aspect ratio
        return height, max(width, int(height * have_w / have_h))
    return max(height, int(width * have_h / have_w)), width


def size_text(value: Any) -> str:
    """A size for people: '32x32' or '16x24' (height x width)."""
    height, width = size_hw(value)
    return f"{height}x{width}"
