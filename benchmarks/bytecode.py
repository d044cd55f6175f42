"""Benchmarked processes load Python as a user's machine does: byte code cached in __pycache__.

With PYTHONDONTWRITEBYTECODE set (some CI images and containers set it), every process compiles each imported
module of an editable install from source again (about 0.2 s for shelltrain), a cost a user pays once. The
benchmarks drop it for the processes they start and compile the project's modules once before the first round.
"""

import compileall
import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent / "shelltrain"


def cache_bytecode_as_users_do() -> None:
    """Let the processes started from here write and read cached byte code, and compile shelltrain's now."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(PROJECT, quiet=1)
