"""data=manifest end to end: a label file with relative paths and a split column trains and is evaluated again from
its run directory; a group column keeps every group on one side of the carved splits and of the CV folds; each bad
row is exit 2 with one line naming file:line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config, run_in_process, shelltrain_forked
from fixtures_data import make_manifest_images, write_manifest

TINY = [
    "model=cnn",
    "model.width=8",
    "data.image_size=16",
    "scheduler=none",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "data.batch_size=8",
]
CLASSES = ("cat", "dog", "fox")


def _with_splits(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every fifth image of each class in test, every fifth (shifted) in val, the rest in train."""
    for i, row in enumerate(rows):
        row["split"] = {0: "test", 1: "val"}.get(i % 5, "train")
    return rows


def test_manifest_with_relative_paths_and_a_split_column_trains_and_evaluates(tmp_path, capsys):
    root = tmp_path / "data"
    manifest = write_manifest(root / "labels.csv", _with_splits(make_manifest_images(root, CLASSES, per_class=20)))
    data = ["data=manifest", f"data.manifest={manifest}"]
    run_dir = tmp_path / "run"
    trained = run_in_process(run_dir, *TINY, *data, "trainer.epochs=4")
    assert sum(c["support"] for c in trained["per_class"].values()) == 12  # the rows marked test, no more
    assert trained["test_acc"] > 1 / len(CLASSES) + 0.2  # flat grey levels per class: learnable, well above chance
    again = run_in_process(tmp_path / "eval", "task=evaluate", f"model.weights={run_dir}")
    assert again["test_acc"] == trained["test_acc"] and again["test_loss"] == trained["test_loss"]
    assert "data: manifest as the run was trained on" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_tsv_and_json_lines_manifests_with_a_data_root_and_the_decoded_cache(tmp_path, suffix, capsys):
    root = tmp_path / "data"
    manifest = write_manifest(tmp_path / f"labels{suffix}", make_manifest_images(root, CLASSES, per_class=8))
    common = [*TINY, "debug=smoke", "data=manifest", f"data.manifest={manifest}", f"data.root={root}"]
    cached = [*common, "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_in_process(tmp_path / "run", *cached)["status"] == "completed"
    assert "data.cache: decoded 24 images into" in capsys.readouterr().out  # one array for the one source split
    assert run_in_process(tmp_path / "again", *cached)["status"] == "completed"
    assert "data.cache: reused decoded cache" in capsys.readouterr().out


def _groups_of(dataset, group_of: dict[str, str]) -> set[str]:
    return {group_of[path] for path in dataset.paths}


def test_groups_never_cross_the_carved_splits_or_the_cv_folds(tmp_path):
    from shelltrain.data import build_data, cv_fold

    root = tmp_path / "data"
    rows = make_manifest_images(root, CLASSES, per_class=24, groups=6)  # 18 groups of 4 images
    manifest = write_manifest(root / "labels.csv", rows)
    group_of = {str(root / row["path"]): row["group"] for row in rows}
    cfg = compose_config(*TINY, "data=manifest", f"data.manifest={manifest}", "data.val_fraction=0.2")
    bundle = build_data(cfg.data, cfg.augmentation, seed=0)
    sides = [_groups_of(split.dataset, group_of) for split in (bundle.train, bundle.val, bundle.test)]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert set().union(*sides) == set(group_of.values())
    assert {label for label in bundle.test.dataset.labels.tolist()} == {0, 1, 2}  # stratified: every class tested
    train = bundle.train.dataset
    held_out = []
    for k in range(3):
        fold = cv_fold(bundle, folds=3, fold=k, seed=0)
        fit = {group_of[train.paths[i]] for i in fold.train.dataset.indices}
        val = {group_of[train.paths[i]] for i in fold.val.dataset.indices}
        assert val and not fit & val
        held_out += fold.val.dataset.indices
    assert sorted(held_out) == list(range(len(train)))


def test_a_cv_run_on_a_grouped_manifest(tmp_path):
    root = tmp_path / "data"
    manifest = write_manifest(root / "labels.csv", make_manifest_images(root, CLASSES, per_class=12, groups=4))
    args = [*TINY, "debug=smoke", "data=manifest", f"data.manifest={manifest}", "cv.folds=2", "cv.refit=false"]
    summary = run_in_process(tmp_path / "run", *args)
    assert summary["cv"]["folds"] == 2 and len(summary["cv"]["scores"]) == 2


def _bad_manifests(root: Path) -> dict[str, tuple[Path, list[str], str]]:
    """case -> (manifest, extra arguments, what the one error line must contain)."""
    rows = make_manifest_images(root, ("cat", "dog"), per_class=4)
    cases = {
        "missing-file": ([*rows[:3], {"path": "images/gone.png", "label": "cat"}, *rows[3:]], [], "labels.csv:5:"),
        "unknown-label": (rows[:5] + [{**rows[5], "label": "cow"}] + rows[6:], ["data.classes=[cat,dog]"], ":7:"),
        "duplicate": ([*rows, rows[2]], [], "labels.csv:10: 'images/cat_2.png' is listed twice"),
        "empty-label": (rows[:1] + [{**rows[1], "label": ""}] + rows[2:], [], "labels.csv:3: empty label"),
        "unknown-split": ([{**row, "split": "train"} for row in rows[:-1]] + [{**rows[-1], "split": "dev"}], [], ":9:"),
    }
    made = {}
    for case, (case_rows, extra, expected) in cases.items():
        (root / case).mkdir()
        made[case] = (write_manifest(root / case / "labels.csv", case_rows), extra, expected)
        (root / case / "images").symlink_to(root / "images")
    return made


def test_each_bad_row_is_one_line_naming_it_and_exit_2(tmp_path):
    cases = _bad_manifests(tmp_path / "data")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for case, (manifest, extra, expected) in cases.items():
        args = [*TINY, "debug=smoke", "trainer.device=cpu", "data=manifest", f"data.manifest={manifest}", *extra]
        result = shelltrain_forked(*args, cwd=cwd, timeout=120)
        assert result.returncode == 2, (case, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (case, result.stderr)
        assert lines[0].startswith("shelltrain: error: data.manifest: "), lines[0]
        assert expected in lines[0] and "data.manifest_errors=skip" in lines[0], (case, lines[0])
        assert list(cwd.iterdir()) == [], case  # no run directory left behind


def test_manifest_errors_skip_leaves_bad_rows_out_and_counts_them(tmp_path, capsys):
    cases = _bad_manifests(tmp_path / "data")
    manifest, extra, _ = cases["missing-file"]
    args = [*TINY, "debug=smoke", "data=manifest", f"data.manifest={manifest}", "data.manifest_errors=skip", *extra]
    summary = run_in_process(tmp_path / "run", *args)
    assert summary["status"] == "completed"
    out = capsys.readouterr().out
    assert "data.manifest_errors=skip: skipped 1 rows (1 missing file); first: labels.csv:5:" in out
