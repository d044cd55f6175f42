"""Where models and tensors live (placement.py), checked on the CPU: the CUDA-only rules are driven through the
code paths the CLI uses, with the run's device redirected to `meta` (a second device type that every machine has)
where a CUDA device would be."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import run_in_process
from torch import nn

from shelltrain import engine, fusion, placement, runner, tasks
from shelltrain.schema import TrainerConfig, defaults

TINY = ["data=synthetic", "data.num_samples=64", "model=cnn", "model.width=8", "data.image_size=16", "scheduler=step"]
META = torch.device("meta")


class _Reached(Exception):
    """Raised by a patched stage: the run got there with what the test inspects."""


def _on_meta(monkeypatch: pytest.MonkeyPatch, module: object) -> None:
    """Resolve every device `module` asks for to `meta`, standing in for CUDA."""
    monkeypatch.setattr(module, "resolve_device", lambda _: META)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_resumed_optimizer_state_sits_beside_its_parameters(tmp_path: Path, monkeypatch, optimizer):
    """Resume on another device (CUDA in real life): the optimizer state restored from the checkpoint must be on the
    device the engine trains on, or the first step mixes devices. Before the fix it stayed on the CPU."""
    run_dir = tmp_path / "run"
    run_in_process(run_dir, *TINY, f"optimizer={optimizer}", "trainer.epochs=1")
    _on_meta(monkeypatch, runner)
    seen: dict[str, list[tuple[str, str]]] = {}

    def fit(model: nn.Module, train, val, optimizer: torch.optim.Optimizer, schedule, settings, **_) -> None:
        engine.trainable(model, settings)  # where fit itself puts the model
        seen["devices"] = [
            (str(value.device), str(param.device))
            for param, state in optimizer.state.items()
            for name, value in state.items()
            if isinstance(value, torch.Tensor) and name != "step"  # Adam keeps its step count on the CPU by design
        ]
        raise _Reached

    monkeypatch.setattr(runner, "fit", fit)
    with pytest.raises(_Reached):
        run_in_process(run_dir, *TINY, f"optimizer={optimizer}", "trainer.epochs=2", f"trainer.resume={run_dir}")
    assert seen["devices"], "the checkpoint restored no optimizer state"
    assert all(state == param == "meta" for state, param in seen["devices"]), seen["devices"]


def _settings(device: str) -> TrainerConfig:
    return defaults("trainer", device=torch.device(device), precision="bf16")


def test_a_quantized_model_is_evaluated_on_the_cpu_whatever_the_runs_device():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    chosen = placement.eval_settings(quantized, _settings("cuda"))
    assert (chosen.device.type, chosen.precision) == ("cpu", "32")
    assert placement.eval_settings(model, _settings("cuda")).device.type == "cuda"


def test_evaluate_task_of_an_int8_checkpoint_runs_it_on_the_cpu(tmp_path: Path, monkeypatch):
    """task=evaluate on a CUDA machine moved an int8 model to CUDA, where no quantized kernels exist; with the run's
    device on `meta`, only a model kept on the CPU yields real logits."""
    trained = tmp_path / "trained"
    run_in_process(trained, *TINY, "trainer.epochs=1", "prune=quantize", "prune.mode=dynamic")
    _on_meta(monkeypatch, runner)
    summary = run_in_process(tmp_path / "eval", *TINY, "task=evaluate", f"model.weights={trained}")
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["device"] == "cpu"  # where it ran, not the run's device
    assert tasks.predict is engine.predict  # the task evaluates through the engine's one placement decision


@pytest.mark.parametrize(
    ("source", "pinned", "target", "expected"),
    [
        ("cpu", True, "cuda", True),  # host -> device from pinned memory: the one safe asynchronous copy
        ("cpu", False, "cuda", False),  # pageable memory: the copy is synchronous anyway
        ("cuda", False, "cpu", False),  # device -> host: the host could read the tensor before it arrived
        ("cpu", False, "cpu", False),
    ],
)
def test_only_host_to_device_copies_from_pinned_memory_are_asynchronous(
    monkeypatch, source: str, pinned: bool, target: str, expected: bool
):
    class Tensor:  # the two facts the decision reads, without a GPU
        device = torch.device(source)

        def is_pinned(self) -> bool:
            return pinned

    assert placement.asynchronous(Tensor(), torch.device(target)) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("stacked", [False, True])
def test_ensemble_evaluation_holds_one_member_or_one_stacked_copy_on_the_device(monkeypatch, stacked: bool):
    """On a GPU every member plus a stacked copy sat on the device, for val and again for test. With the run's
    device on `meta`, whatever predict finds there besides the model it evaluates is memory held for nothing."""
    members = [nn.Sequential(nn.Flatten(), nn.Linear(4, 3)) for _ in range(3)]
    for member in members:  # back from meta there is no data to copy: fresh storage on the CPU stands in for it
        member.cpu = functools.partial(member.to_empty, device="cpu")
    held: list[list[str]] = []

    def predict(model: nn.Module, loader, settings, limit=None) -> tuple[torch.Tensor, torch.Tensor]:
        placement.place(model, placement.eval_settings(model, settings))  # what engine.predict does first
        held.append([str(next(m.parameters()).device) for m in members])
        return (torch.zeros(2, 3, 3) if stacked else torch.zeros(2, 3)), torch.zeros(2)

    monkeypatch.setattr(fusion, "predict", predict)
    for _split in ("val", "test"):
        fusion.member_logits(members, loader=None, settings=_settings("meta"), limit=None, stacked=stacked)
    if stacked:
        assert held == [["cpu"] * 3] * 2  # only the stacked copy went to the device
    else:  # the member being evaluated, and no other
        assert held == [["meta", "cpu", "cpu"], ["cpu", "meta", "cpu"], ["cpu", "cpu", "meta"]] * 2
