"""`export`: a checkpoint as a self-contained ONNX classifier.

The ONNX graph takes what an image decoder gives and does the normalisation itself:

* input  `images`: uint8 [N, 3, S, S], RGB, channels first, pixel values 0-255, the image
  already resized to S x S the way mmlit reads files (shorter side to S with bilinear
  resampling, then a centre crop). The graph computes `(images / 255 - mean) / std`.
* output `logits`: float32 [N, C] (apply a softmax for probabilities).

The batch axis N is dynamic. `metadata_props` holds `classes` (JSON list, index = logit),
`mean` and `std` (JSON lists, for information: already applied inside), `image_size`,
`input_format` (the text above in one line), `mmlit_version`, `preset` and `task`.

Exporter: `torch.onnx.export(..., dynamo=True)` (needs `onnxscript`). The legacy TorchScript
exporter (`dynamo=False`) cannot export this model: it fails with "conversion of
scaled_dot_product_attention not implemented if enable_gqa is True" (its opset-14 SDPA
symbolic); the dynamo exporter decomposes grouped-query SDPA into MatMul/Softmax, and the
MoE router's `topk`/`scatter` into TopK/ScatterElements.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .data import Normalize
from .errors import MmlitError, one_line
from .evaluate import load_classifier
from .files import atomic_write

DEFAULT_OPSET = 18  # the dynamo exporter's native opset; lower ones go through a converter
TOLERANCE = 1e-4
PARITY_BATCHES = (1, 3)
_PIP_HINT = 'pip install "mmlit[onnx]"'


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float | None  # ONNX Runtime vs PyTorch logits; None when not checked numerically
    checked_with: str | None  # e.g. "onnxruntime 1.17.1"; None when onnxruntime was not run
    opset: int = DEFAULT_OPSET
    input_format: str = ""


class _Preprocessed(torch.nn.Module):
    """uint8 images -> `data.Normalize` -> classifier logits (what gets exported; the mean/std
    buffers become constants of the graph)."""

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model, self.normalize = model, Normalize(mean, std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def _require(module: str, what: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MmlitError(f"ONNX export needs the '{module}' package ({what}): {_PIP_HINT}") from None


def input_format(image_size: int) -> str:
    return (f"images: uint8 [N, 3, {image_size}, {image_size}] RGB NCHW, 0-255, resized to "
            f"{image_size}x{image_size} (shorter side, bilinear, centre crop); normalisation "
            f"(x/255 - mean)/std is inside the graph; output logits: float32 [N, num_classes]")


def _parity(onnx_path: str, wrapper: torch.nn.Module, image_size: int) -> tuple[float, str]:
    """Max |ORT - PyTorch| over random uint8 batches of sizes PARITY_BATCHES."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in PARITY_BATCHES:
        x = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
        with torch.inference_mode():
            ref = wrapper(x).float()
        (out,) = session.run(["logits"], {"images": x.numpy()})
        if tuple(out.shape) != tuple(ref.shape):
            raise MmlitError(f"ONNX check failed: batch of {n} gave logits {list(out.shape)}, "
                             f"expected {list(ref.shape)}")
        worst = max(worst, float((torch.from_numpy(out) - ref).abs().max()))
    return worst, f"onnxruntime {ort.__version__}"


def output_path(ckpt_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Where an export goes: `out_path`, `<out_path>/<checkpoint stem>.onnx` for a folder, or
    the checkpoint path with `.onnx`."""
    ckpt_path = Path(ckpt_path)
    out = Path(out_path) if out_path is not None else ckpt_path.with_suffix(".onnx")
    return out / (ckpt_path.stem + ".onnx") if out.is_dir() else out


def export_onnx(ckpt_path: str | Path, out_path: str | Path | None = None, opset: int = DEFAULT_OPSET,
                check: bool = True, tolerance: float = TOLERANCE) -> ExportResult:
    """Export a classifier checkpoint to ONNX (see the module docstring for the I/O contract).

    `out_path` defaults to the checkpoint path with `.onnx`; a folder gets `<stem>.onnx`.
    With `check`, the model is validated with `onnx.checker` and, when onnxruntime is
    installed, run against PyTorch on random images at batch sizes 1 and 3: a difference
    above `tolerance` is an `MmlitError`. Nothing is written unless the export (and the
    check) succeeded; an existing file is replaced atomically.
    """
    onnx = _require("onnx", "ONNX model format")
    _require("onnxscript", "used by torch's ONNX exporter")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 14:
        raise MmlitError(f"--opset must be an integer >= 14, got {opset!r}")
    model, ckpt = load_classifier(ckpt_path, "cpu")
    size = ckpt.image_size
    classes = ckpt.class_names
    out = output_path(ckpt_path, out_path)
    wrapper = _Preprocessed(model, ckpt.mean, ckpt.std).eval()
    fmt = input_format(size)
    meta = {
        "classes": json.dumps(classes),
        "mean": json.dumps(list(ckpt.mean)),
        "std": json.dumps(list(ckpt.std)),
        "image_size": str(size),
        "input_format": fmt,
        "mmlit_version": str(ckpt.info.get("mmlit_version", __version__)),
        "exported_by": f"mmlit {__version__}",
        "preset": ckpt.config.name,
        "task": ckpt.task,
    }
    checked: dict = {"diff": None, "with": None}

    def write(tmp: str) -> None:
        example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)  # 2: batch stays symbolic
        batch = torch.export.Dim("batch")
        exporter_log = logging.getLogger("torch.onnx")
        level = exporter_log.level
        exporter_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, (example,), tmp, input_names=["images"], output_names=["logits"],
                                  dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                  external_data=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - exporter errors are many and varied
            raise MmlitError(f"ONNX export of {ckpt_path} failed ({type(exc).__name__}: "
                             f"{one_line(exc, with_type=False, limit=300)})") from exc
        finally:
            exporter_log.setLevel(level)
        proto = onnx.load(tmp)
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = f"mLiT classifier exported by mmlit {__version__}. {fmt}"
        onnx.save(proto, tmp)
        if check:
            try:
                onnx.checker.check_model(tmp, full_check=True)
            except Exception as exc:  # noqa: BLE001
                raise MmlitError(f"the exported ONNX model is invalid "
                                 f"({one_line(exc, with_type=False, limit=300)})") from exc
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                return
            diff, how = _parity(tmp, wrapper, size)
            if not diff <= tolerance:
                raise MmlitError(f"ONNX check failed: outputs differ from PyTorch by {diff:.3g} "
                                 f"(> {tolerance:g}); nothing written to {out}")
            checked["diff"], checked["with"] = diff, how

    try:
        atomic_write(out, write)
    except OSError as exc:
        raise MmlitError(f"cannot write {out} ({one_line(exc, with_type=False, limit=300)})") from None
    return ExportResult(out, checked["diff"], checked["with"], opset, fmt)
