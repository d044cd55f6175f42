"""benchmarks/gpu.sh on a machine that lacks shelltrain's dependencies: it must say in one line what to carry and
stop, not run its sections into import errors (a GPU session has minutes of device time)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_without_wheels_names_the_command_and_exits_2(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "gpu.sh", checkout / "benchmarks" / "gpu.sh")  # no benchmarks/wheels/ beside
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
