"""Export a model to ONNX or TorchScript and check that the file reproduces PyTorch's logits.

Plain functions on any `nn.Module` (a trained, pruned, quantized or ensembled model): pruning masks
(`torch.nn.utils.prune`) are made permanent in a copy first; int8 modules of `torch.ao` have no ONNX
export here, so ONNX refuses them with a one-line error and TorchScript takes them.
The class names and preprocessing travel inside the file (`export_metadata` reads them back).
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shelltrain.errors import UserError
from shelltrain.rundir import write_atomic
from shelltrain.silence import quiet_torchscript

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}  # format -> file name in the run dir
METADATA_KEY = "shelltrain"  # ONNX metadata_props key / TorchScript extra file holding the metadata JSON
EXTRA_FILE = f"{METADATA_KEY}.json"
INSTALL_HINT = 'pip install "shelltrain[export]"'
INPUT_NAME, OUTPUT_NAME = "images", "logits"
RESIZE = (
    "decode to uint8 RGB (channels 3) or L (channels 1); image_size is one int (a square) or [height, width]; unless "
    "already that size, resize the uint8 C x H x W tensor (interpolation, antialias, keeping its aspect ratio) until "
    "it covers image_size (for a square: the shorter side to image_size) and center-crop to image_size"
)  # data.transforms.fit_size, as training, evaluation and task=predict prepare every image
NORMALIZE = "float32 (pixel / 255 - mean) / std per channel, batched N x C x H x W"


def inference_metadata(
    classes: list[str], preprocessing: dict[str, Any], source: str, thresholds: list[float] | None = None
) -> dict[str, Any]:
    """What the exported file carries so that it can be used without shelltrain: the class names in output order,
    the full preprocessing (Preprocessing.as_dict: size, channels, mean/std, interpolation, antialias) and how it is
    applied, the input and output names, and the checkpoint it came from (docs/reports-and-tasks.md's snippet).
    A multi-label model (`thresholds`) also carries `multi_label: true` and its per-class thresholds."""
    output = f"{OUTPUT_NAME}: N x {len(classes)}; softmax gives the probabilities"
    metadata = {
        "classes": [str(name) for name in classes],
        "preprocessing": {**preprocessing, "resize": RESIZE, "normalize": NORMALIZE},
        "input": INPUT_NAME,
        "output": output,
        "source": source,
    }
    if thresholds is not None:
        metadata["output"] = f"{OUTPUT_NAME}: N x {len(classes)}; sigmoid gives each class's probability"
        metadata.update(multi_label=True, thresholds=[float(t) for t in thresholds])
        metadata["decision"] = "class k is predicted when sigmoid(logits[k]) >= thresholds[k]"
    return metadata


def export_model(model: nn.Module, fmt: str, path: Path, example: torch.Tensor, metadata: dict[str, Any]) -> nn.Module:
    """Write `model` in format `fmt` to `path`, traced on `example` (its batch size stays free);
    returns the exported copy of the model (CPU, eval mode, masks made permanent) it was made from."""
    if fmt not in FORMATS:
        raise UserError(f"export.format={fmt!r} is invalid; choose one of {', '.join(FORMATS)}")
    model = frozen_copy(model)
    if fmt == "onnx":
        data = _export_onnx(model, example, metadata)
    else:
        buffer = io.BytesIO()  # serialized in memory: torch.jit.save aborts the process on a full disk
        with quiet_torchscript():
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(metadata)})
        data = buffer.getvalue()
    write_atomic(data, path)  # a temporary name, then a rename: never a truncated model file
    return model


def run_exported(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor | None:
    """Logits of the exported file on `images` (CPU, float32); None when ONNX Runtime is missing."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0])
    with quiet_torchscript(), torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu")(images).float()


def export_metadata(fmt: str, path: Path) -> dict[str, Any]:
    """The metadata written into an exported file (classes, preprocessing, source)."""
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    extra = {EXTRA_FILE: ""}
    with quiet_torchscript():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[EXTRA_FILE])


def frozen_copy(model: nn.Module) -> nn.Module:
    """A CPU eval-mode copy with `torch.nn.utils.prune` masks folded into the weights."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model).cpu().eval()
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether the model holds int8 modules of torch.ao (static or dynamic quantization)."""
    return any(".quantized" in type(module).__module__ for module in model.modules())


def _export_onnx(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """The model as the bytes of an ONNX file (weights inside it)."""
    if is_quantized(model):
        raise UserError(
            "export.format=onnx cannot take this quantized model (torch.ao int8 modules have no ONNX export); "
            "use export.format=torchscript"
        )
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript; name the extra before it fails inside)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(f"export.format=onnx needs the {exc.name} package: {INSTALL_HINT}") from None
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    except Exception as exc:  # torch.export rejects some Python constructs; the model, not shelltrain, must change
        reason = " ".join(str(exc).split())[:300]
        raise UserError(
            f"export.format=onnx: torch.onnx.export failed for this model ({reason}); try export.format=torchscript"
        ) from exc
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    return program.model_proto.SerializeToString()
