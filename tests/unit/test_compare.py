"""shelltrain-compare and the baseline gate's reading of runs: refusals (not a run, no predictions.csv, other test
images) in one line, samples paired by id when the order or the data set's folder differ, and the config diff."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from shelltrain.compare import compare_runs, config_diff, main, open_run
from shelltrain.errors import UserError

TEST_SET = {"kind": "files", "count": 4, "membership": "m1", "content": "c1", "mtimes": "t1"}


def make_run(path: Path, rows: list[tuple[str, str, str]], test: dict | None = None, predictions: bool = True) -> Path:
    """A finished run directory: summary.json with a data fingerprint, and (sample, true, predicted) rows."""
    path.mkdir(parents=True)
    fingerprint = {"split_seed": 0, "train": TEST_SET, "val": TEST_SET, "test": test or TEST_SET}
    (path / "summary.json").write_text(json.dumps({"status": "completed", "data_fingerprint": fingerprint}))
    if predictions:
        with open(path / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["sample", "true", "predicted", "probability", "true_probability", "loss", "correct", "split"]
            )
            for sample, true, guess in rows:
                writer.writerow([sample, true, guess, 0.9, 0.5, 0.1, int(true == guess), "test"])
    return path


ROWS = [
    ("/d/test/a/1.png", "a", "a"),
    ("/d/test/a/2.png", "a", "a"),
    ("/d/test/b/3.png", "b", "b"),
    ("/d/test/b/4.png", "b", "a"),
]


def test_samples_pair_by_id_across_order_and_folder(tmp_path: Path) -> None:
    base = make_run(tmp_path / "base", ROWS)
    # the new run read a moved copy, in another order, and now gets image 2 wrong and image 4 right
    moved = [
        ("/copy/test/b/4.png", "b", "b"),
        ("/copy/test/a/2.png", "a", "b"),
        ("/copy/test/a/1.png", "a", "a"),
        ("/copy/test/b/3.png", "b", "b"),
    ]
    new = make_run(tmp_path / "new", moved)
    section = compare_runs(open_run(new, "new"), open_run(base, "base"), 0.05, "gate.baseline")
    assert section["acc_diff"] == 0.0
    assert (section["new_only_right"], section["baseline_only_right"]) == (1, 1)  # 4 and 2, paired correctly
    assert section["class_recall"]["a"]["change"] == -0.5 and section["class_recall"]["b"]["change"] == 0.5


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.mkdir(), "not a shelltrain run directory"),
        (lambda p: make_run(p, ROWS, predictions=False), "no per-sample predictions"),
    ],
)
def test_a_run_that_cannot_be_compared_is_refused_in_one_line(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path / "run")
    with pytest.raises(UserError, match=message) as info:
        open_run(tmp_path / "run", "gate.baseline")
    assert "\n" not in str(info.value) and "gate.baseline=" in str(info.value)


def test_other_test_images_are_refused(tmp_path: Path) -> None:
    base = make_run(tmp_path / "base", ROWS, test={**TEST_SET, "membership": "other"})
    new = make_run(tmp_path / "new", ROWS)
    with pytest.raises(UserError, match="differ from this run's test images"):
        compare_runs(open_run(new, "new"), open_run(base, "gate.baseline"), 0.05, "gate.baseline")


def test_config_diff_names_the_keys_that_differ() -> None:
    a = {"trainer": {"seed": 0, "epochs": 3}, "hydra": {"run": {"dir": "x"}}, "model": {"name": "cnn"}}
    b = {"trainer": {"seed": 1, "epochs": 3}, "hydra": {"run": {"dir": "y"}}, "model": {"name": "cnn", "width": 8}}
    assert config_diff(a, b) == ["model.width: (unset) -> 8", "trainer.seed: 0 -> 1"]


def test_compare_command_prints_the_comparison_and_exits_2_on_bad_input(tmp_path: Path, capsys) -> None:
    base = make_run(tmp_path / "base", ROWS)
    new = make_run(tmp_path / "new", [(s, t, t) for s, t, _ in ROWS])
    main([str(base), str(new), "--alpha", "0.1"])
    out = capsys.readouterr().out
    assert "difference +0.2500" in out and "1 images right only now, 0 only in the baseline" in out
    assert "data fingerprint test: same" in out
    with pytest.raises(SystemExit) as info:
        main([str(base), str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
