"""build_data on every source and augmentation option, using the real YAML files and tiny real-format datasets."""

import os
import signal
from pathlib import Path

import pytest
import torch
from fixtures_data import label_of, make_cifar10, make_cifar100, make_fashion_mnist, make_imagefolder, make_mnist
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from shelltrain.data import DataBundle, build_data
from shelltrain.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
AUGMENTATIONS = sorted(path.stem for path in (CONFIGS / "augmentation").glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny per-sample tensors gain nothing from intra-op threads; on a busy machine their wake-ups cost ~10 ms/op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(data: str = "digits", augmentation: str = "none", *overrides: str) -> DictConfig:
    """Both groups as Hydra composes them (over their schemas) under one root, so ${data.image_size} resolves;
    overrides as on the CLI."""
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        composed = compose("train", overrides=[f"data={data}", f"augmentation={augmentation}", *overrides])
    cfg = OmegaConf.masked_copy(composed, ["data", "augmentation"])
    OmegaConf.set_struct(cfg, True)  # as Hydra does: reading a key an option lacks is an error
    return cfg


def build(cfg: DictConfig, seed: int = 0) -> DataBundle:
    return build_data(cfg.data, cfg.augmentation, seed)


def user_error(cfg: DictConfig, *fragments: str) -> str:
    with pytest.raises(UserError) as info:
        build(cfg)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def assert_labels_match_pixels(bundle: DataBundle) -> None:
    for loader in (bundle.train, bundle.val, bundle.test):
        images, labels = all_batches(loader)
        decoded = [label_of(image, bundle.num_classes, bundle.mean, bundle.std) for image in images]
        assert decoded == labels.tolist()


def image_keys(dataset) -> list[bytes]:
    return [image.numpy().tobytes() for image in dataset.images]


# Sources


def test_digits_defaults():
    bundle = build(make_cfg())
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [1293, 144, 360]
    assert bundle.classes == [str(k) for k in range(10)] and bundle.num_classes == 10
    assert (bundle.in_channels, bundle.image_size) == (1, (32, 32))
    images, labels = next(iter(bundle.train))
    assert images.shape == (32, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64
    everything = torch.cat([loader.dataset.labels for loader in (bundle.train, bundle.val, bundle.test)])
    for loader in (bundle.train, bundle.val, bundle.test):  # stratified: each split keeps the class proportions
        expected = torch.bincount(everything, minlength=10) * len(loader.dataset) / len(everything)
        assert (torch.bincount(loader.dataset.labels, minlength=10) - expected).abs().max() <= 1.5


def test_cifar10(tmp_path, monkeypatch):
    make_cifar10(tmp_path, n_train=100, n_test=40, monkeypatch=monkeypatch)
    cfg = make_cfg("cifar10", "none", f"data.root={tmp_path}", "data.num_workers=0", "data.test_fraction=0")
    bundle = build(cfg)  # test_fraction is unused: CIFAR has its own test split
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [90, 10, 40]
    assert bundle.classes == [f"class{k}" for k in range(10)] and bundle.in_channels == 3
    assert next(iter(bundle.train))[0].shape == (90, 3, 32, 32)
    assert_labels_match_pixels(bundle)


def test_cifar_files_that_fail_torchvisions_checksum_say_so(tmp_path):
    make_cifar10(tmp_path, n_train=20, n_test=10)  # real pickles, not the real download: torchvision's md5 differs
    cfg = make_cfg("cifar10", "none", f"data.root={tmp_path}", "data.num_workers=0")
    with pytest.raises(UserError, match=r"fail torchvision's checksum \(md5\).*delete '.*cifar-10-batches-py'"):
        build(cfg)


def test_cifar100(tmp_path, monkeypatch):
    make_cifar100(tmp_path, n_train=300, n_test=100, monkeypatch=monkeypatch)
    bundle = build(make_cfg("cifar100", "none", f"data.root={tmp_path}", "data.num_workers=0"))
    assert bundle.num_classes == 100 and bundle.classes[:2] == ["fine0", "fine1"]
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [270, 30, 100]
    assert_labels_match_pixels(bundle)


@pytest.mark.parametrize(
    "name, make, first_class", [("mnist", make_mnist, "0 - zero"), ("fashion_mnist", make_fashion_mnist, "T-shirt/top")]
)
def test_mnist_family(tmp_path, name, make, first_class):
    make(tmp_path, n_train=100, n_test=40)
    bundle = build(make_cfg(name, "none", f"data.root={tmp_path}", "data.num_workers=0"))
    assert (bundle.num_classes, bundle.classes[0], bundle.in_channels, bundle.image_size) == (
        10,
        first_class,
        1,
        (28, 28),
    )
    assert next(iter(bundle.test))[0].shape == (40, 1, 28, 28)
    assert_labels_match_pixels(bundle)


def test_imagefolder_carves_missing_splits(tmp_path):
    make_imagefolder(tmp_path, classes=("cat", "dog", "fox"), per_class=10)
    bundle = build(make_cfg("imagefolder", "none", f"data.root={tmp_path}", "data.num_workers=0"))
    assert bundle.classes == ["cat", "dog", "fox"] and (bundle.in_channels, bundle.image_size) == (3, (64, 64))
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [21, 3, 6]
    paths = [set(loader.dataset.paths) for loader in (bundle.train, bundle.val, bundle.test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert len(set.union(*paths)) == 30
    assert next(iter(bundle.train))[0].shape == (21, 3, 64, 64)  # 40x30 PNGs made square
    assert_labels_match_pixels(bundle)


def test_imagefolder_uses_given_splits(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), per_class=4, splits=("train", "val", "test"), mode="L")
    bundle = build(make_cfg("imagefolder", "none", f"data.root={tmp_path}", "data.num_workers=0", "data.channels=1"))
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [8, 8, 8]
    assert all("/val/" in path for path in bundle.val.dataset.paths)
    assert next(iter(bundle.val))[0].shape == (8, 1, 64, 64)
    assert_labels_match_pixels(bundle)


def test_grey_folders_get_one_channel_and_the_log_says_what_the_data_became(tmp_path, capsys):
    from conftest import run_in_process

    make_imagefolder(tmp_path / "grey", classes=("a", "b"), per_class=6, size=(32, 32), mode="L")
    bundle = build(make_cfg("imagefolder", "none", f"data.root={tmp_path / 'grey'}", "data.num_workers=0"))
    assert bundle.in_channels == 1 and next(iter(bundle.train))[0].shape[1:] == (1, 64, 64)
    make_imagefolder(tmp_path / "rgb", classes=("a", "b"), per_class=6, size=(32, 32))
    assert build(make_cfg("imagefolder", "none", f"data.root={tmp_path / 'rgb'}")).in_channels == 3

    root = tmp_path / "grey"
    run_in_process(
        tmp_path / "run", "data=imagefolder", f"data.root={root}", "model=cnn", "model.width=8", "debug=smoke"
    )
    lines = capsys.readouterr().out.splitlines()
    said = next(line for line in lines[:4] if line.startswith("preprocessing:"))
    assert "64x64 px (data.image_size, upscaled from 32 px), 1 channel (grey, data.channels=null: grey" in said
    assert "(measured)" in said and "mean/std 0." in said


def test_synthetic():
    bundle = build(make_cfg("synthetic", "none", "data.num_samples=200", "data.num_classes=4"))
    assert bundle.num_classes == 4 and bundle.in_channels == 3
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [144, 16, 40]
    assert next(iter(bundle.train))[0].shape == (128, 3, 32, 32)


# Splits


def test_splits_are_disjoint_and_fixed_by_split_seed():
    def splits(*overrides: str, seed: int = 0) -> list[list[bytes]]:
        bundle = build(make_cfg("synthetic", "none", "data.num_samples=300", *overrides), seed=seed)
        return [image_keys(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)]

    train, val, test = splits()
    assert len(set(train + val + test)) == 300  # random images: each one lands in exactly one split
    assert splits(seed=1) == [train, val, test]  # the trainer seed does not move the splits
    other = splits("data.split_seed=1")
    assert set(other[2]) != set(test) and len(set(sum(other, []))) == 300


def test_limit_samples_caps_each_split_stratified():
    full = build(make_cfg())
    bundle = build(make_cfg("digits", "none", "data.limit_samples=50"))
    for limited, whole in zip((bundle.train, bundle.val, bundle.test), (full.train, full.val, full.test)):
        assert len(limited.dataset) == 50
        assert set(image_keys(limited.dataset)) <= set(image_keys(whole.dataset))
        per_class = torch.bincount(limited.dataset.labels, minlength=10)
        assert per_class.min() >= 4 and per_class.max() <= 6


# Channels, size, normalization


def test_grey_to_rgb_and_resize():
    bundle = build(make_cfg("digits", "none", "data.channels=3", "data.image_size=16"))
    assert (bundle.in_channels, bundle.image_size, len(bundle.mean)) == (3, (16, 16), 3)
    images, _ = next(iter(bundle.test))
    assert images.shape == (64, 3, 16, 16)
    assert torch.equal(images[:, 0], images[:, 2])


def test_rgb_to_grey(tmp_path, monkeypatch):
    make_cifar10(tmp_path, monkeypatch=monkeypatch)
    root = f"data.root={tmp_path}"
    user_error(make_cfg("cifar10", "none", root, "data.channels=1"), "data.mean", "data.mean=null")
    cfg = make_cfg("cifar10", "none", root, "data.channels=1", "data.mean=null", "data.std=null", "data.num_workers=0")
    bundle = build(cfg)
    assert bundle.in_channels == 1 and next(iter(bundle.train))[0].shape[1] == 1
    assert_labels_match_pixels(bundle)


def test_normalized_train_split_is_centered():
    images, _ = all_batches(build(make_cfg()).train)  # hardcoded digits constants
    assert abs(images.mean()) < 0.05 and abs(images.std() - 1) < 0.05
    images, _ = all_batches(build(make_cfg("synthetic", "none", "data.num_samples=300")).train)  # measured
    per_channel = images.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.02 and (per_channel.std(1) - 1).abs().max() < 0.02


# Augmentation and batching


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_augmentations_run_on_grey_and_rgb(tmp_path, monkeypatch, augmentation):
    make_cifar10(tmp_path, n_train=50, n_test=10, monkeypatch=monkeypatch)
    for cfg in (
        make_cfg("digits", augmentation, "data.limit_samples=20"),
        make_cfg("cifar10", augmentation, f"data.root={tmp_path}", "data.num_workers=0"),
    ):
        bundle = build(cfg)
        assert len(bundle.train.dataset.transform.transforms) == len(cfg.augmentation.train) + 1  # + NormalizedFloat
        images, labels = next(iter(bundle.train))
        assert images.shape[1:] == (bundle.in_channels, 32, 32) and images.dtype == torch.float32
        assert torch.isfinite(images).all() and labels.dtype == torch.int64


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixup_cutmix_give_soft_train_labels_only(mixup, cutmix):
    torch.manual_seed(0)  # num_workers=0: the mixing draws from the global RNG
    cfg = make_cfg("digits", "basic", f"augmentation.mixup_alpha={mixup}", f"augmentation.cutmix_alpha={cutmix}")
    bundle = build(cfg)
    images, labels = next(iter(bundle.train))
    assert images.shape == (32, 1, 32, 32) and labels.shape == (32, 10) and labels.dtype == torch.float32
    assert torch.allclose(labels.sum(1), torch.ones(32)) and (labels < 1).any()
    assert next(iter(bundle.val))[1].dtype == torch.int64


def test_shuffle_order_is_a_function_of_the_generator_seed():
    bundle = build(make_cfg("digits", "none", "data.limit_samples=100"), seed=3)

    def epoch(seed: int) -> torch.Tensor:
        bundle.train.generator.manual_seed(seed)
        return all_batches(bundle.train)[0]

    first = epoch(3)
    fresh = build(make_cfg("digits", "none", "data.limit_samples=100"), seed=3)
    assert torch.equal(all_batches(fresh.train)[0], first)
    assert not torch.equal(epoch(4), first)
    assert torch.equal(epoch(3), first)


def test_two_workers_are_deterministic_per_generator_seed():
    overrides = ("data.num_workers=2", "data.limit_samples=64", "data.batch_size=16", "augmentation.mixup_alpha=0.2")
    bundle = build(make_cfg("digits", "basic", *overrides))

    def epoch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        bundle.train.generator.manual_seed(seed)
        return all_batches(bundle.train)

    images, labels = epoch(7)
    assert images.shape == (64, 1, 32, 32) and labels.shape == (64, 10)
    again = epoch(7)  # augmentation and mixing run in workers seeded from the loader's generator
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)


# Errors the user can fix


def test_missing_root_hints_download(tmp_path):
    cfg = make_cfg("cifar10", "none", f"data.root={tmp_path / 'nope'}")
    user_error(cfg, "data.root", "does not exist", "data.download=true")


def test_corrupt_or_absent_torchvision_files(tmp_path):
    make_cifar10(tmp_path)  # not trusted: md5 differs from the real download, as with a broken copy
    cfg = make_cfg("cifar10", "none", f"data.root={tmp_path}")
    user_error(cfg, "data.root", "cifar-10-batches-py", "data.download=true")
    user_error(make_cfg("mnist", "none", f"data.root={tmp_path}"), "data.root", "MNIST/raw/", "data.download=true")


def test_imagefolder_root_required(tmp_path):
    user_error(make_cfg("imagefolder"), "data.root", "not set")
    user_error(make_cfg("imagefolder", "none", f"data.root={tmp_path}"), "data.root", "no train/ folder")


def test_truncated_png_is_named(tmp_path):
    make_imagefolder(tmp_path, per_class=3)
    broken = tmp_path / "train" / "dog" / "1.png"
    broken.write_bytes(broken.read_bytes()[:-30])
    user_error(make_cfg("imagefolder", "none", f"data.root={tmp_path}"), "data.root", str(broken))


def test_non_image_file_is_named(tmp_path):
    make_imagefolder(tmp_path, per_class=3, splits=("train", "test"))
    fake = tmp_path / "test" / "cat" / "notes.png"
    fake.write_text("not an image")
    user_error(make_cfg("imagefolder", "none", f"data.root={tmp_path}"), "data.root", str(fake))


def test_single_class_rejected(tmp_path):
    make_imagefolder(tmp_path, classes=("only",), per_class=5)
    user_error(make_cfg("imagefolder", "none", f"data.root={tmp_path}"), "data.root", "at least two")


def test_classes_must_match_across_splits(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), per_class=3)
    make_imagefolder(tmp_path, classes=("a", "c"), per_class=3, splits=("val",))
    user_error(make_cfg("imagefolder", "none", f"data.root={tmp_path}"), "data.root", "val/", "differ")


def test_class_folder_without_images(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), per_class=3)
    (tmp_path / "train" / "empty").mkdir()
    user_error(make_cfg("imagefolder", "none", f"data.root={tmp_path}"), "data.root", "no images")


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.name=svhn", "data.name"),
        ("data.channels=2", "data.channels"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.test_fraction=0", "data.test_fraction"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.limit_samples=0", "data.limit_samples"),
        ("data.std=[0.0]", "data.std"),
    ],
)
def test_bad_values(override, key):
    user_error(make_cfg("digits", "none", override), key)


def test_bad_transforms():
    cfg = make_cfg("digits", "basic")
    cfg.augmentation.train[0]._target_ = "torchvision.transforms.v2.RandomCropp"
    user_error(cfg, "augmentation.train[0]", "RandomCropp")
    cfg = make_cfg("digits", "basic")
    cfg.augmentation.train[0].padding = 0
    cfg.augmentation.train[0].size = 64  # larger than the 32x32 images
    user_error(cfg, "augmentation.train:", "64")


def test_persistent_workers_replay_an_epoch_exactly_like_fresh_workers():
    """Workers kept across epochs (the default) must not freeze the augmentation seeds of their first epoch: a run
    resumed at epoch k (fresh workers) draws what the uninterrupted one (long-lived workers) drew."""
    overrides = ("data.num_workers=2", "data.persistent_workers=true", "data.limit_samples=64", "data.batch_size=16")
    kept = build(make_cfg("digits", "basic", *overrides))
    assert kept.train.persistent_workers and kept.val.persistent_workers

    def epoch(bundle, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        bundle.train.generator.manual_seed(seed)
        return all_batches(bundle.train)

    first, second = epoch(kept, 7), epoch(kept, 8)
    assert not torch.equal(first[0], second[0])
    fresh = build(make_cfg("digits", "basic", *overrides))
    assert torch.equal(epoch(fresh, 8)[0], second[0]) and torch.equal(epoch(kept, 7)[0], first[0])


def test_num_workers_auto_is_the_cores_of_the_process_capped():
    from shelltrain.data.loader import AUTO_WORKERS_CAP, worker_count

    assert worker_count("auto") == min(len(os.sched_getaffinity(0)), AUTO_WORKERS_CAP)
    assert worker_count(3) == 3
    user_error(make_cfg("digits", "none", "data.num_workers=many"), "data.num_workers='many'", "auto")


def test_a_cv_fold_with_workers_draws_per_sample_seeds_too():
    from shelltrain.data import cv_fold

    overrides = ("data.num_workers=2", "data.limit_samples=60", "data.batch_size=16")
    fold = cv_fold(build(make_cfg("digits", "basic", *overrides)), folds=2, fold=0, seed=0)
    fold.train.generator.manual_seed(5)
    first = all_batches(fold.train)
    fold.train.generator.manual_seed(5)
    assert torch.equal(all_batches(fold.train)[0], first[0]) and len(first[0]) == len(fold.train.dataset)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX feature")
def test_a_named_pipe_among_the_images_is_refused_without_waiting(tmp_path):
    make_imagefolder(tmp_path, per_class=3)
    pipe = tmp_path / "train" / "cat" / "pipe.png"
    os.mkfifo(pipe)  # opening it for reading waits for a writer that never comes

    def too_slow(signum, frame):
        raise TimeoutError("the image folder's named pipe was opened and the run waits on it")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        user_error(make_cfg("imagefolder", "none", f"data.root={tmp_path}"), "data.root", str(pipe), "regular file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
