"""task=audit's parts: confident learning on known probabilities, duplicate and leak pairs on digits with planted
copies (every copy found, no pair on the clean set), and the file checks (zero-byte, unreadable, grey/colour,
outliers, missing classes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from planted_data import planted

from shelltrain.audit import scan
from shelltrain.audit_labels import confident_learning
from shelltrain.audit_scan import duplicate_pairs, health, scan_arrays, scan_files
from shelltrain.schema import defaults

pytest.importorskip("imagehash")


def test_confident_learning_flags_the_images_confidently_of_another_class() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    truth = labels.clone()
    flipped = torch.tensor([5, 50, 100, 200])
    labels[flipped] = (labels[flipped] + 1) % 3
    logits = 0.5 * torch.randn(300, 3, generator=generator) + 3 * torch.nn.functional.one_hot(truth, 3)
    logits[flipped] = 8 * torch.nn.functional.one_hot(truth[flipped], 3).float()  # confidently their true class
    result = confident_learning(logits.softmax(1), labels, "self_confidence")
    assert sorted(result["issues"]) == flipped.tolist()
    assert [result["suggested"][i] for i in flipped.tolist()] == truth[flipped].tolist()
    assert sorted(result["order"][:4]) == flipped.tolist()  # the ranking of every image puts them first
    joint = torch.tensor(result["confident_joint"])
    assert int(joint.sum() - joint.trace()) == 4
    margin = confident_learning(logits.softmax(1), labels, "normalized_margin")
    assert sorted(margin["issues"]) == flipped.tolist()


def _samples(splits: dict) -> list:
    out = []
    for split, (images, labels) in splits.items():
        out += scan_arrays(split, images.numpy(), labels.tolist())
    return out


def test_every_planted_copy_is_a_leak_and_the_clean_set_has_no_pair() -> None:
    settings = defaults("audit")
    splits, _, truth = planted(seed=1, flip=0.0, copies=21)
    pairs = duplicate_pairs(_samples(splits), settings.hash_distance, settings.pixel_tolerance)
    found = {(p["a"]["index"], p["b"]["index"], p["kind"]) for p in pairs if p["leak"]}
    expected = {(t, s, "exact" if kind == "exact" else "near") for t, s, kind in truth["copies"]}
    assert found == expected
    assert not [p for p in pairs if not p["leak"]]
    clean, _, _ = planted(seed=1, flip=0.0, copies=0)
    assert duplicate_pairs(_samples(clean), settings.hash_distance, settings.pixel_tolerance) == []


def test_files_zero_byte_unreadable_grey_colour_and_outliers(tmp_path: Path) -> None:
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        mode, colour = ("RGB", (200, 10, 10)) if i < 2 else ("L", 40 * i)
        Image.new(mode, (40, 30), colour).save(path)
        paths.append(str(path))
    Image.new("L", (400, 30), 7).save(tmp_path / "wide.png")  # ten times wider
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths += [str(tmp_path / name) for name in ("wide.png", "empty.png", "broken.png")]
    samples = scan_files("train", paths, [0, 0, 0, 1, 1, 1, 1, 0, 1])
    report = health(samples, ["a", "b", "c"], factor=4.0)["train"]
    assert {p["problem"] for p in report["problems"]} == {"zero-byte", "unreadable"}
    assert (report["grey"], report["colour"]) == (5, 2)
    assert report["missing_classes"] == ["c"]
    wide = str(tmp_path / "wide.png")
    assert {(o["id"], o["what"]) for o in report["outliers"]} == {(wide, "aspect"), (wide, "area")}


def test_an_image_folder_is_scanned_from_its_files(tmp_path: Path) -> None:
    from fixtures_data import make_imagefolder

    from shelltrain.data import build_data

    root = make_imagefolder(tmp_path / "data", per_class=4, splits=("train", "test"))
    from conftest import compose_config

    cfg = compose_config("data=imagefolder", f"data.root={root}", "data.val_fraction=0.25")
    samples = scan(build_data(cfg.data, cfg.augmentation, 0))
    assert {s.split for s in samples} == {"train", "val", "test"}
    assert all(Path(s.id).is_file() for s in samples)
    pairs = duplicate_pairs(samples, 6, 0.015)  # each class's images are identical: exact pairs, some leaks
    assert pairs and all(p["kind"] == "exact" for p in pairs) and any(p["leak"] for p in pairs)


def test_an_image_folder_with_broken_files_is_scanned_file_by_file(tmp_path: Path) -> None:
    """A run refuses the folder at its first broken file; the audit lists every one and still finds the pairs."""
    from conftest import compose_config
    from fixtures_data import make_imagefolder

    from shelltrain.audit import run_audit

    root = make_imagefolder(tmp_path / "data", per_class=3, splits=("train", "test"))
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    (root / "test" / "dog" / "broken.png").write_bytes(b"not an image")
    cfg = compose_config("data=imagefolder", f"data.root={root}", "audit.folds=0", "plots=true")
    (tmp_path / "run").mkdir()
    run_audit(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    broken = [p for split in ("train", "test") for p in report["health"][split]["problems"]]
    assert sorted((Path(p["id"]).name, p["problem"]) for p in broken) == [
        ("broken.png", "unreadable"),
        ("empty.png", "zero-byte"),
    ]
    assert report["problem_files"] == 2 and report["leaks"] > 0  # each class's images are identical
    assert (tmp_path / "run" / "plots" / "audit_duplicates.png").is_file()
