"""Bad input through the `shelltrain` command line: every case exits non-zero with one clear line (asserted
word for word where it matters) and leaves no run directory behind.

Each case is a process of its own, forked from a server that has imported torch already (conftest's
shelltrain_forked); test_cli runs the acceptance cases through a fresh interpreter. The data and checkpoint
cases use tiny files made here."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_environment, run_in_process, shelltrain_forked, start_shelltrain
from fixtures_data import make_imagefolder
from PIL import Image

from shelltrain.models import SmallCNN

CPU = ["trainer.device=cpu", "data.num_workers=0"]
FOLDER = ["data=imagefolder", "data.image_size=8", *CPU]

# (id, arguments ({root} is the fixture folder), what the one error line must contain)
CASES = [
    # typos, unknown options and groups
    ("typo-key", ["trainer.epoch=3"], "unknown key 'trainer.epoch' (did you mean 'trainer.epochs'?)"),
    ("typo-group", ["optimzer=adam"], "'optimzer' is not a config group (did you mean 'optimizer'?)"),
    (
        "unknown-model",
        ["model=resnet1800"],
        "model=resnet1800: no such option (did you mean 'resnet18'?). Available model options: cnn,",
    ),
    ("unknown-scheduler", ["scheduler=cosin"], "scheduler=cosin: no such option (did you mean 'cosine'?)"),
    (
        "unknown-dataset",
        ["data=imagenet"],
        "data=imagenet: no such option (did you mean 'imagefolder'?). Available data options: cifar10, cifar100, digits,",
    ),
    ("unparsable", ["trainer.epochs=[1,"], "could not parse the override: no viable alternative at input '[1,'"),
    # wrong types
    ("epochs-not-int", ["trainer.epochs=abc"], "trainer.epochs='abc' has the wrong type"),
    (
        "batch-size-float",
        ["data.batch_size=1.5"],
        "data.batch_size=1.5 has the wrong type; Value '1.5' of type 'float' could not be converted to Integer",
    ),
    (
        "value-for-a-group-of-keys",
        ["trainer.swa=true"],
        "trainer.swa=True: trainer.swa is a group of keys (start_epoch, lr); set one of them, e.g. trainer.swa.start",
    ),
    (
        "bool-not-bool",
        ["trainer.deterministic=maybe"],
        "trainer.deterministic='maybe' has the wrong type; Value 'maybe' is not a valid bool",
    ),
    # out of range
    ("negative-epochs", ["trainer.epochs=-1"], "trainer.epochs=-1 is out of range; it must be >= 0"),
    ("negative-lr", ["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is invalid; the learning rate must be a number > 0"),
    ("zero-lr", ["optimizer.lr=0"], "optimizer.lr=0 is invalid; the learning rate must be a number > 0"),
    ("nan-lr", ["optimizer.lr=nan"], "optimizer.lr=nan is invalid; the learning rate must be a number > 0"),
    ("inf-lr", ["optimizer.lr=inf"], "optimizer.lr=inf is invalid; the learning rate must be a number > 0"),
    ("batch-size-0", ["data.batch_size=0"], "data.batch_size=0 is out of range; it must be >= 1"),
    ("image-size-0", ["data.image_size=0"], "data.image_size=0 is out of range; it must be >= 1"),
    (
        "fractions-sum",
        ["data.val_fraction=0.5", "data.test_fraction=0.5"],
        "data.val_fraction + data.test_fraction = 1 leaves no training data",
    ),
    ("fraction-range", ["data.test_fraction=1.2"], "data.test_fraction=1.2 is out of range; use a fraction in [0, 1)"),
    (
        "label-smoothing",
        ["trainer.label_smoothing=1.5"],
        "trainer.label_smoothing=1.5 is out of range; use a value in [0, 1)",
    ),
    ("precision", ["trainer.precision=fp8"], "trainer.precision='fp8' is invalid; choose one of 32, bf16, 16-mixed"),
    ("device", ["trainer.device=tpu"], "trainer.device='tpu' is invalid; use auto, cpu, cuda or cuda:N"),
    ("channels", ["data.channels=2"], "data.channels=2 is invalid; choose one of 1, 3"),
    (
        "checkpoint-every",
        ["trainer.checkpoint_every_n_steps=-1"],
        "trainer.checkpoint_every_n_steps=-1 is out of range; it must be >= 0",
    ),
    (
        "keep-checkpoints",
        ["trainer.keep_checkpoints=-2"],
        "trainer.keep_checkpoints=-2 is out of range; it must be >= 0",
    ),
    ("mixup-alpha", ["augmentation.mixup_alpha=-1"], "augmentation.mixup_alpha=-1.0 is out of range; it must be >= 0"),
    (
        "synthetic-classes",
        ["data=synthetic", "data.num_classes=1"],
        "data.num_classes=1 is out of range; data=synthetic needs at least 2",
    ),
    # where the output goes
    (
        "output-dir-not-a-dir",
        ["hydra.run.dir={root}/a-file/run"],
        "cannot create or write '{root}/a-file/run': Not a directory; choose a writable place for the run directory with hydra.run.dir=DIR",
    ),
    (  # a place where no folder can be made (a missing mount): /proc takes no new folders
        "output-dir-cannot-be-made",
        ["hydra.run.dir=/proc/shelltrain-test/run"],
        "cannot create or write '/proc/shelltrain-test': No such file or directory; choose a writable place for the run directory with hydra.run.dir=DIR (hydra.sweep.dir=DIR for -m)",
    ),
    # data
    (
        "no-data-root",
        ["data=imagefolder", *CPU],
        "data.root: not set; set data.root to a folder holding an image folder",
    ),
    (
        "folder-missing",
        [*FOLDER, "data.root={root}/nowhere"],
        "data.root: '{root}/nowhere' does not exist; point data.root at a folder laid out as train/<class>/<image>",
    ),
    (
        "data-root-a-file",
        [*FOLDER, "data.root={root}/a-file"],
        "data.root: '{root}/a-file' is a file, not a folder; point data.root at the folder that holds the data",
    ),
    (
        "folder-without-train",
        [*FOLDER, "data.root={root}/empty/train"],
        "data.root: '{root}/empty/train' has no train/ folder; lay the images out as {root}/empty/train/train/<class>/<image>",
    ),
    (
        "cifar-missing",
        ["data=cifar10", "data.root=relative/nowhere"],
        "data.root: '{cwd}/relative/nowhere' does not exist; point data.root at a folder holding CIFAR-10 or set data.download=true",
    ),
    ("folder-empty-classes", [*FOLDER, "data.root={root}/empty"], "data.root: no images in '{root}/empty/train'"),
    (
        "truncated-png",
        [*FOLDER, "data.root={root}/truncated"],
        "data.root: '{root}/truncated/train/cat/0.png' is not a readable image",
    ),
    (
        "not-an-image",
        [*FOLDER, "data.root={root}/text"],
        "data.root: '{root}/text/train/dog/notes.png' is not a readable image",
    ),
    (
        "one-class",
        [*FOLDER, "data.root={root}/one-class"],
        "data.root: '{root}/one-class/train' holds one class folder ['cat']; a classifier needs at least two classes",
    ),
    # config files and a user's own _target_
    (
        "yaml-syntax",
        ["--config-dir", "{root}/confdir", "model=broken"],
        "'{root}/confdir/model/broken.yaml', line 4, column 1: YAML syntax error (while parsing a flow node expected "
        "the node content, but found '<stream end>'); fix that file",
    ),
    (
        "blocked-target",
        ["model=torchvision", *CPU, "+model._target_=builtins.eval"],
        "model._target_='builtins.eval' is refused: Hydra blocks targets that let a config run code",
    ),
    (
        "own-target-argument",
        ["--config-dir", "{root}/confdir", "model=mine", *CPU, "+model.foo=1"],
        "model.foo is not an argument of 'shelltrain.models.SmallCNN' (TypeError: SmallCNN.__init__() got an "
        "unexpected keyword argument 'foo'); remove model.foo or fix model._target_",
    ),
    (
        "image-size-1",
        ["model=cnn", *CPU, "data.image_size=1"],
        "data.image_size=1: the model cannot run on (1, 1, 1) inputs (Given input size: (32x1x1). Calculated output "
        "size: (32x0x0). Output size is too small); use a larger data.image_size",
    ),
    # checkpoints
    (
        "foreign-train-state",
        ["trainer.resume={root}/foreign-state.pt", *CPU],
        "checkpoint '{root}/foreign-state.pt' is not a shelltrain checkpoint: train_state.epoch='two' is not what "
        "shelltrain writes",
    ),
    (
        "resume-missing",
        ["trainer.resume={root}/nowhere.pt"],
        "trainer.resume: '{root}/nowhere.pt' does not exist; give a checkpoint file, a run directory or auto",
    ),
    (
        "resume-not-a-run",
        ["trainer.resume={root}/empty", *CPU],
        "trainer.resume: '{root}/empty' holds no checkpoints/last.pt, so it is not a shelltrain run directory",
    ),
    (
        "other-architecture",
        ["model=cnn", "model.width=8", "trainer.resume={root}/width4.pt", *CPU],
        "checkpoint '{root}/width4.pt' does not match the configured model (it was trained with model=cnn model.width=4): shapes differ: features.0.weight (4, 1, 3, 3) in the checkpoint vs (8, 1, 3, 3) in the model, features.1.weight (4,) in the checkpoint vs (8,) in the model, features.1.bias (4,) in the checkpoint vs (8,) in the model and 13 more. Resume with the model settings it was trained with",
    ),
    (
        "corrupt-checkpoint",
        ["trainer.resume={root}/random.pt", *CPU],
        "checkpoint '{root}/random.pt' cannot be loaded safely (corrupt, truncated or not a shelltrain checkpoint): it is not a complete PyTorch archive (16384 bytes; truncated, or not written by torch.save)",
    ),
    (
        "truncated-checkpoint",
        ["trainer.resume={root}/truncated.pt", *CPU],
        "checkpoint '{root}/truncated.pt' cannot be loaded safely (corrupt, truncated or not a shelltrain checkpoint): it is not a complete PyTorch archive",
    ),
    (
        "bare-state-dict",
        ["trainer.resume={root}/state_dict.pt", *CPU],
        "checkpoint '{root}/state_dict.pt' is not a shelltrain checkpoint: it holds a dict with keys features.0.weight, features.1.weight, features.1.bias and 17 more, not a 'model' state dict",
    ),
    (
        "weights-device",
        ["model=cnn", "model.weights=/dev/zero", *CPU],
        "model.weights: '/dev/zero' is not a regular file (a device, pipe or directory); give a checkpoint file",
    ),
    (
        "evaluate-device",
        ["task=evaluate", "model.weights=/dev/zero", *CPU],
        "checkpoint '/dev/zero' is not a regular file (a device, pipe or directory); give a checkpoint file",
    ),
    (
        "weights-safetensors-header",
        ["model=cnn", "model.weights={root}/huge-header.safetensors", *CPU],
        "model.weights: '{root}/huge-header.safetensors' is not a readable .safetensors file (16 bytes; its header "
        "length does not fit the file: truncated, or not written by safetensors)",
    ),
    (
        "pickled-object",
        ["trainer.resume={root}/pickled.pt", *CPU],
        "checkpoint '{root}/pickled.pt' cannot be loaded safely (corrupt, truncated or not a shelltrain checkpoint): it holds a pickled Python object (test_bad_input.Unsafe), which a weights-only load refuses to run",
    ),
]


class Unsafe:
    """Not a tensor, number, string, list or dict: a weights_only load refuses to build it."""


def make_inputs(root: Path) -> None:
    (root / "a-file").write_text("not a directory\n")
    (root / "empty" / "train" / "cat").mkdir(parents=True)
    (root / "empty" / "train" / "dog").mkdir(parents=True)
    make_imagefolder(root / "truncated", classes=("cat", "dog"), per_class=3, size=(8, 8))
    png = root / "truncated" / "train" / "cat" / "0.png"
    png.write_bytes(png.read_bytes()[:30])
    make_imagefolder(root / "text", classes=("cat", "dog"), per_class=3, size=(8, 8))
    (root / "text" / "train" / "dog" / "notes.png").write_text("this is not an image\n")
    make_imagefolder(root / "one-class", classes=("cat",), per_class=3, size=(8, 8))

    model = SmallCNN(10, 1, width=4).state_dict()
    payload = {"model": model, "epoch": 1, "step": 10, "config": {"model": {"name": "cnn", "width": 4}}}
    torch.save(payload, root / "width4.pt")
    whole = (root / "width4.pt").read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (root / "random.pt").write_bytes(bytes(range(256)) * 64)
    torch.save(model, root / "state_dict.pt")
    torch.save({"model": Unsafe()}, root / "pickled.pt")
    torch.save({**payload, "train_state": {"epoch": "two", "step": 10}}, root / "foreign-state.pt")
    (root / "confdir" / "model").mkdir(parents=True)
    (root / "confdir" / "model" / "broken.yaml").write_text(
        "name: mine\n_target_: shelltrain.models.SmallCNN\nwidth: [1,\n"
    )
    (root / "confdir" / "model" / "mine.yaml").write_text(
        "_target_: shelltrain.models.SmallCNN\nin_channels: 1\nwidth: 4\n"
    )
    (root / "huge-header.safetensors").write_bytes(
        (2**40).to_bytes(8, "little") + b'{"a":1} '
    )  # a real torch.save archive holding an object


def own_argument(args: list[str]) -> str:
    """The argument a case is about: its last one that is not a shared device setting (CPU)."""
    return [a for a in args if a not in CPU][-1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    make_inputs(root)
    return root


@pytest.mark.parametrize("name, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing_behind(root, tmp_path, name, args, expected):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = shelltrain_forked(*[a.format(root=root) for a in args], cwd=cwd, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shelltrain: error: "), lines[0]
    assert expected.format(root=root, cwd=cwd) in lines[0], lines[0]
    key, value = own_argument(args).format(root=root).split("=", 1)
    assert key.lstrip("+") in lines[0] or value in lines[0], f"the error names neither {key} nor {value}: {lines[0]}"
    assert "Traceback" not in result.stdout + result.stderr
    assert list(cwd.iterdir()) == []  # no outputs/, no half-made run directory
    assert not (root / "a-file" / "run").exists()


# A broken image read inside a DataLoader worker (or in the main process with num_workers=0), on every split and
# in a predict input: exit 2 within 30 s with one line, and no process of the job left behind. The default
# selection keeps a representative few; the whole matrix is `-m slow`.
DEFAULT_BROKEN = {("jpeg", "val", 2), ("png", "predict", 2), ("jpeg", "predict", 0)}
BROKEN = [
    pytest.param(kind, where, workers, marks=[] if (kind, where, workers) in DEFAULT_BROKEN else pytest.mark.slow)
    for kind in ("jpeg", "png")
    for where in ("train", "val", "test", "predict")
    for workers in (0, 2)
]
TINY = ["data.image_size=16", "model=cnn", "model.width=4"]
IMAGEFOLDER = ["data=imagefolder", "data.image_size=16", "data.batch_size=4", "trainer.device=cpu", "plots=false"]


def truncated_image(path: Path, kind: str) -> None:
    """A noisy 64x64 image cut in half: a JPEG so cut passes PIL's verify() and fails only when decoded."""
    noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    Image.fromarray(noise.numpy()).save(buffer, "JPEG" if kind == "jpeg" else "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def session_processes(session: int) -> list[int]:
    """The live processes of a session (read from /proc: psutil may not be installed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def run_alone(args: list[str], cwd: Path, timeout: int = 120) -> tuple[subprocess.CompletedProcess, float, list[int]]:
    """The command in a session of its own; returns its result, its wall time and the processes of its session
    still alive once it has exited (then killed, so that a failing test leaves nothing behind either)."""
    started = time.monotonic()
    proc = start_shelltrain(*args, cwd=cwd, new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        left = session_processes(proc.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    return result, time.monotonic() - started, left


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Path:
    """A tiny model trained on 16x16 RGB images of two classes."""
    run_dir = tmp_path_factory.mktemp("predictor")
    run_in_process(run_dir, "data=synthetic", "data.num_classes=2", "data.num_samples=64", *TINY, "debug=smoke")
    return run_dir


@pytest.mark.parametrize("kind, where, workers", BROKEN)
def test_a_broken_image_anywhere_ends_the_job_in_one_line(predictor, tmp_path, kind, where, workers):
    root = make_imagefolder(tmp_path / "images", ("cat", "dog"), per_class=3, splits=("train", "val", "test"))
    folder = "val" if where == "predict" else where
    broken = root / folder / "dog" / f"broken.{'jpg' if kind == 'jpeg' else 'png'}"
    truncated_image(broken, kind)
    args = [*IMAGEFOLDER, f"data.root={root}", f"data.num_workers={workers}", "trainer.epochs=1"]
    if where == "predict":
        args = ["task=predict", f"model.weights={predictor}", f"predict.input={root / 'val'}", *args]
    result, seconds, left = run_alone([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert seconds < 30
    assert left == []  # no worker outlives the job
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    key = "predict.input" if where == "predict" else "data.root"
    assert lines[0].startswith(f"shelltrain: error: {key}: '{broken}' "), lines[0]
    assert lines[0].endswith("; delete or replace it"), lines[0]


def test_loader_workers_die_with_a_killed_main_process(tmp_path):
    """SIGKILL leaves the main process no chance to stop its workers: they notice it is gone, at once."""
    args = ["data=synthetic", "data.num_samples=4000", "data.image_size=16", "model=cnn", "model.width=4"]
    args += ["data.num_workers=2", "data.persistent_workers=true", "trainer.device=cpu", "trainer.epochs=50"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shelltrain", *args, "plots=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=cli_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(session_processes(proc.pid)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(session_processes(proc.pid)) >= 3, "the run did not start its two loader workers"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 2  # torch's own watchdog would take up to 5 s
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session_processes(proc.pid) == []
    finally:
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_an_existing_read_only_run_directory_is_one_line(tmp_path):
    """chmod does not stop root, so as root the directory is made read-only by a read-only bind mount in a mount
    namespace of the command's own (skipped where that is not allowed)."""
    existing = tmp_path / "runs" / "old"
    existing.mkdir(parents=True)
    (existing / "notes.txt").write_text("an earlier run\n")
    command = [sys.executable, "-m", "shelltrain", "model=cnn", "trainer.device=cpu", f"hydra.run.dir={existing}"]
    if os.geteuid() == 0:
        mount = f"mount --bind -o ro {tmp_path / 'runs'} {tmp_path / 'runs'}"
        probe = subprocess.run(["unshare", "--mount", "sh", "-c", mount], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot make a read-only directory for root here: {probe.stderr.decode().strip()}")
        command = ["unshare", "--mount", "sh", "-c", f'{mount} && exec "$@"', "sh", *command]
    else:
        (tmp_path / "runs").chmod(0o555)
        existing.chmod(0o555)
    result = subprocess.run(command, cwd=tmp_path, env=cli_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"shelltrain: error: cannot create or write '{existing}': "  # named before anything is written in it
        f"{'Read-only file system' if os.geteuid() == 0 else 'Permission denied'}; choose a writable place for the "
        "run directory with hydra.run.dir=DIR (hydra.sweep.dir=DIR for -m)"
    ]
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
