"""The planted-error experiment at a small scale: digits with 5% of the train labels flipped and 20 test images
copied into train (exact, JPEG re-encoded, resized). The audit must find every planted copy as a leak, no other
pair, and rank the flipped labels far above chance (benchmarks/audit.py runs it at full scale)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from planted_data import planted

from shelltrain.audit import run_audit

pytest.importorskip("imagehash")

SOURCE = "data.source={_target_:planted_data.load,seed:3,limit:700}"
SMALL = [
    "model=cnn",
    "model.width=16",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "scheduler=none",
    "trainer.epochs=6",
    "data.image_size=16",
    "data.cache=memory",
]


def test_the_audit_finds_the_planted_copies_and_flipped_labels(tmp_path: Path) -> None:
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "trainer.device=cpu",
                "data.num_workers=0",
                SOURCE,
                *SMALL,
                "audit.folds=3",
                "report.per_job=line",
            ],
        )
    run_audit(cfg, tmp_path)
    report = json.loads((tmp_path / "audit.json").read_text())
    _, _, truth = planted(seed=3, limit=700)
    copies = {(train, test) for train, test, _ in truth["copies"]}
    assert {(p["a"]["index"], p["b"]["index"]) for p in report["pairs"]} == copies  # every copy, nothing else
    assert report["leaks"] == 20 and report["duplicates"] == 0
    flipped = set(truth["flipped"])
    top = report["ranked"][: len(flipped)]  # the top 5%: as many as were flipped
    precision = len(flipped & set(top)) / len(top)
    print(f"precision in the top {len(top)}: {precision:.2f}")
    assert precision >= 0.4, precision  # chance: 0.05
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["label_issues"] == len(report["candidates"]) > 0
    assert (tmp_path / "plots" / "audit_label_issues.png").is_file()
    assert (tmp_path / "plots" / "audit_duplicates.png").is_file()
