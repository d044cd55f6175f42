"""benchmarks/gpu.sh on a machine that lacks shelltrain's dependencies: it must say in one line what to carry and
stop, not run its sections into import errors (a GPU session has minutes of device time)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("gpu.sh", "gpu_sections.sh")


def test_gpu_check_without_wheels_names_the_command_and_exits_2(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    for script in SCRIPTS:  # no benchmarks/wheels/ beside them
        shutil.copy(REPO / "benchmarks" / script, checkout / "benchmarks" / script)
    hidden = tmp_path / "hidden"  # this Python then lacks hydra and torch_pruning, as the GPU image does
    hidden.mkdir()
    for module in ("hydra", "torch_pruning"):
        (hidden / f"{module}.py").write_text("raise ImportError('not installed here')\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(hidden), "GPU_CHECK_SITE": str(tmp_path / "site")}
    done = subprocess.run(
        ["bash", str(checkout / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert f"bash benchmarks/gpu_wheels.sh {version} hydra-core torch-pruning" in lines[0]
    assert "carry benchmarks/wheels/" in lines[0]
    assert not (tmp_path / "site").exists()  # nothing installed, nothing run


def _check(*args, **env):
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout.strip().splitlines()


def test_gpu_check_lists_its_sections_without_installing(tmp_path):
    rc, lines = _check("--list", GPU_CHECK_DIR=str(tmp_path / "check"))
    assert rc == 0
    names = [line.split()[0] for line in lines]
    for name in ("resume", "ensemble", "ema", "averaged", "tta", "calibrate", "distill-cache", "int8-teacher"):
        assert name in names
    for name in ("fused-teacher", "lr-find", "profile", "timm", "pinned", "compile", "throughput"):
        assert name in names
    assert len(names) == len(set(names))
    assert not (tmp_path / "check").exists()


def test_gpu_check_refuses_an_unknown_section_in_one_line_before_installing(tmp_path):
    rc, lines = _check(GPU_CHECK_DIR=str(tmp_path / "check"), SECTIONS="ema,tta emma")
    assert rc == 2
    assert len(lines) == 1 and "no section 'emma'" in lines[0] and "distill-cache" in lines[0], lines
    assert not (tmp_path / "check").exists()
