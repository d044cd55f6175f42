"""task=audit from the command line, as a user runs it in CI: a test image copied into train/ is a leak listed in
audit.json, and gate.leaks_max=0 fails the job with exit code 3; the clean folder passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shelltrain
from PIL import Image

pytest.importorskip("imagehash")


def _noise_folder(root: Path) -> Path:
    """train/ and test/ of two classes, every image its own random pattern (so no pair is alike by chance)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


AUDIT = ["task=audit", "data=imagefolder", "audit.folds=0", "+gate.leaks_max=0", "plots=true", "data.num_workers=0"]


def test_a_copied_test_image_is_a_leak_that_fails_the_gate(tmp_path):
    root = _noise_folder(tmp_path / "images")
    clean = shelltrain(*AUDIT, f"data.root={root}", "hydra.run.dir=clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert json.loads((tmp_path / "clean" / "audit.json").read_text())["pairs"] == []

    shutil.copy(root / "test" / "b" / "3.png", root / "train" / "b" / "copy.png")
    leaked = shelltrain(*AUDIT, f"data.root={root}", "hydra.run.dir=leaked", cwd=tmp_path)
    assert leaked.returncode == 3, leaked.stderr[-2000:]
    pairs = json.loads((tmp_path / "leaked" / "audit.json").read_text())["pairs"]
    assert (
        len(pairs) == 1 and pairs[0]["leak"] and {pairs[0]["a"]["split"], pairs[0]["b"]["split"]} == {"train", "test"}
    )
    assert (tmp_path / "leaked" / "plots" / "audit_duplicates.png").is_file()
