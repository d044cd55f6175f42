"""data.cache end to end: a second run on the same image folder trains from the decoded cache without decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import shelltrain_forked
from fixtures_data import make_imagefolder

IMAGEFOLDER = [
    "data=imagefolder",
    "data.image_size=16",
    "data.batch_size=8",
    "model=cnn",
    "model.width=8",
    "trainer.device=cpu",
    "trainer.epochs=1",
    "plots=false",
]


def test_a_second_run_reuses_the_decoded_cache_and_trains_alike(tmp_path):
    root = make_imagefolder(tmp_path / "images", per_class=8, splits=("train", "test"))
    cache = [f"data.root={root}", "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    first = shelltrain_forked(*IMAGEFOLDER, *cache, "hydra.run.dir=first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "reused decoded cache" not in first.stdout
    built = (tmp_path / "first" / "train.log").read_text()
    assert built.count("data.cache: decoded 24 images into ") == 2  # train/ and test/, each logged with its path
    second = shelltrain_forked(*IMAGEFOLDER, *cache, "hydra.run.dir=second", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("data.cache: reused decoded cache") == 2  # train/ and test/
    assert "reused decoded cache" in (tmp_path / "second" / "train.log").read_text()
    assert not list(Path(tmp_path / "second").glob("**/*.npy"))  # the cache lives in data.cache_dir only
    plain = shelltrain_forked(
        *IMAGEFOLDER, f"data.root={root}", "data.num_workers=0", "hydra.run.dir=plain", cwd=tmp_path
    )
    assert plain.returncode == 0, plain.stderr
    summaries = [(tmp_path / run / "summary.json").read_text() for run in ("second", "plain")]
    assert _test_acc(summaries[0]) == _test_acc(summaries[1])  # cached images are the decoded files


def _test_acc(text: str) -> float:
    import json

    return json.loads(text)["test_acc"]


@pytest.mark.parametrize("on_device", ["true", "false"])  # false: batches gathered and augmented on the CPU
def test_resume_with_a_cached_folder_and_batched_augmentation_is_exact(tmp_path, on_device):
    from conftest import run_in_process
    from test_resume import EXACT, assert_same_training

    root = make_imagefolder(tmp_path / "images", per_class=12)
    args = [
        *EXACT,
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=16",
        "data.batch_size=4",
        "data.cache=memory",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.on_device={on_device}",
    ]
    straight = tmp_path / "straight"
    run_in_process(straight, *args)
    assert "has no batched form" not in (straight / "train.log").read_text()  # augmentation=seed ran batched
    branch = tmp_path / "branch"
    run_in_process(branch, *args, f"trainer.resume={straight / 'checkpoints/epoch_002.pt'}")
    assert_same_training(straight, branch)


def test_a_damaged_cache_is_rebuilt_and_the_run_trains_alike(tmp_path):
    root = make_imagefolder(tmp_path / "images", per_class=8, splits=("train", "test"))
    cache_dir = tmp_path / "cache"
    cache = [f"data.root={root}", "data.cache=disk", f"data.cache_dir={cache_dir}", "data.num_workers=0"]
    first = shelltrain_forked(*IMAGEFOLDER, *cache, "hydra.run.dir=first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    arrays = sorted(cache_dir.glob("*.npy"))
    assert len(arrays) == 2  # train/ and test/
    arrays[0].write_bytes(arrays[0].read_bytes()[:-50])  # cut short, as by a full disk or a killed copy
    arrays[1].with_suffix(".json").write_text('{"files": ')  # a key file cut short
    second = shelltrain_forked(*IMAGEFOLDER, *cache, "hydra.run.dir=second", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    rebuilt = [line for line in second.stdout.splitlines() if "rebuilding" in line]
    assert len(rebuilt) == 2 and all(line.startswith("data.cache: ") for line in rebuilt), rebuilt
    assert "the cached array is damaged" in rebuilt[0] + rebuilt[1] and "key file" in rebuilt[0] + rebuilt[1]
    summaries = [(tmp_path / run / "summary.json").read_text() for run in ("first", "second")]
    assert _test_acc(summaries[0]) == _test_acc(summaries[1])
