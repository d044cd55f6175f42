"""What an epoch-end checkpoint costs the training thread, on vs_timm.py's work (resnet18, SGD with momentum: a
90 MB checkpoint), the way shelltrain writes it now against the way it did before, in turns.

- before: the non-finite check as an element-wise isfinite per tensor, then last.pt and best.pt each serialized
  bytes written and fsynced in the training thread (two files, two fsyncs);
- now: the non-finite check as one sum per tensor, the bytes handed to the background writer with best.pt a hard
  link to last.pt (one file, one fsync); the training thread waits only for the previous epoch's write, which the
  `--epoch` seconds of simulated training (a sleep: no CPU taken from the writer) normally cover.

    python benchmarks/checkpoint_cost.py [--rounds 5] [--epoch 3.0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from shelltrain.checkpoint import non_finite_entry, serialize
from shelltrain.checkpoint_writer import CheckpointWriter
from shelltrain.rundir import write_atomic


def isfinite_check(model: dict, optimizer: dict) -> bool:
    """The check before: one isfinite tensor per tensor, all() of each, one sync."""
    tensors = [t for t in model.values() if t.is_floating_point()]
    tensors += [v for state in optimizer.values() for v in state.values() if torch.is_tensor(v)]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epoch", type=float, default=3.0, help="seconds of simulated training between checkpoints")
    args = parser.parse_args()
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    times: dict[str, list[float]] = {"before": [], "now": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        writer = CheckpointWriter()
        for _ in range(args.rounds):
            start = time.perf_counter()
            isfinite_check(model.state_dict(), optimizer.state_dict()["state"])
            data = serialize({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
            write_atomic(data, folder / "last_before.pt")
            write_atomic(data, folder / "best_before.pt")
            times["before"].append(time.perf_counter() - start)
            time.sleep(args.epoch)
            start = time.perf_counter()
            non_finite_entry(model.state_dict(), optimizer.state_dict()["state"])
            data = serialize({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
            writer.wait()
            writer.submit([(data, folder / "last.pt"), (folder / "last.pt", folder / "best.pt")])
            times["now"].append(time.perf_counter() - start)
            time.sleep(args.epoch)
        writer.wait()
    size = len(data) / 1e6
    print(f"{size:.0f} MB checkpoint, {args.rounds} rounds in turns; training-thread seconds per epoch-end checkpoint")
    for case, values in times.items():
        print(f"{case}: median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
