"""The "add a dataset" recipe of docs/architecture.md, followed by a user: a function of their own that returns
the images, a data/<name>.yaml whose `source` names it, `--config-dir`; no edit to shelltrain."""

from __future__ import annotations

import json
import os
import textwrap

from conftest import shelltrain

MODULE = '''
import torch


def load(num_samples: int = 240, size: int = 16):
    """Two classes a small CNN tells apart at once: class 1 has a bright top half."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(num_samples) % 2
    images = torch.rand(num_samples, 1, size, size, generator=generator) * 0.3
    images[labels == 1, :, : size // 2] += 0.7
    return {"train": (images.clamp(0, 1), labels)}, ["plain", "bright_top"]
'''

DATA_YAML = """
defaults:
  - digits  # every data key a dataset needs, from a built-in option
  - _self_
name: mydata
source:
  _target_: mydataset.load
  num_samples: 240
  size: 16
image_size: 16
mean: null  # measured on the train split
std: null
"""


def test_a_users_dataset_plugs_in_from_yaml(tmp_path):
    code, configs = tmp_path / "code", tmp_path / "configs"
    (configs / "data").mkdir(parents=True)
    code.mkdir()
    (code / "mydataset.py").write_text(textwrap.dedent(MODULE))
    (configs / "data" / "mydata.yaml").write_text(DATA_YAML)
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)
    result = shelltrain(
        "--config-dir",
        str(configs),
        "data=mydata",
        "model=cnn",
        "model.width=8",
        "optimizer=adam",
        "optimizer.lr=0.01",
        "scheduler=none",
        "trainer.epochs=2",
        "trainer.device=cpu",
        "plots=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
        env={"PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.9  # two classes: chance is 0.5
    composed = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "mydataset.load" in composed
