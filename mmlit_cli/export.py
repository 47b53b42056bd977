"""`export`: a checkpoint as a self-contained ONNX classifier, fp32 or int8.

The ONNX graph takes what an image decoder gives and does the normalisation itself:

* input  `images`: uint8 [N, 3, S, S], RGB, channels first, pixel values 0-255, the image
  already resized to S x S the way mmlit reads files (shorter side to S with bilinear
  resampling, then a centre crop). The graph computes `(images / 255 - mean) / std`.
* output `logits`: float32 [N, C] (apply a softmax for probabilities).

The batch axis N is dynamic. `metadata_props` holds `classes` (JSON list, index = logit),
`mean` and `std` (JSON lists, for information: already applied inside), `image_size`,
`input_format` (the text above in one line), `mmlit_version`, `preset`, `task` and
`quantization` ("fp32", "int8 dynamic" or "int8 static"). The exporter's per-node debug
metadata (stack traces with the exporting machine's source paths, 19 % of an fp32 `xxs`
file: docs/BENCHMARKS.md, "Levers measured") is removed.

Exporter: `torch.onnx.export(..., dynamo=True)` (needs `onnxscript`). The legacy TorchScript
exporter (`dynamo=False`) cannot export this model: it fails with "conversion of
scaled_dot_product_attention not implemented if enable_gqa is True" (its opset-14 SDPA
symbolic). The graph is traced with the model's export forms (`export_forms.py`: the same
function and weights, written for ONNX Runtime; its docstring gives what they save).

int8 (`int8=True`): see `quantize.py` for what is quantized and why the router stays float.
Its check compares top-1 predictions and accuracy with PyTorch, and reports router agreement,
instead of a tolerance on raw logits.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import Checkpoint
from .data import Normalize, skipped_warning
from .errors import MmlitError, one_line
from .evaluate import checkpoint_split, held_out_warning, load_classifier, match_classes
from .export_forms import export_forms
from .files import atomic_write, check_utf8
from .onnx_classifier import PIP_HINT

DEFAULT_OPSET = 18  # the dynamo exporter's native opset; lower ones go through a converter
TOLERANCE = 1e-4
PARITY_BATCHES = (1, 3)
CHECK_IMAGES = 1000  # held-out images the int8 check runs on (with --calibrate)
RANDOM_CHECK_IMAGES = 256


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float | None  # ONNX Runtime vs PyTorch logits; None when not checked numerically
    checked_with: str | None  # e.g. "onnxruntime 1.17.1"; None when onnxruntime was not run
    opset: int = DEFAULT_OPSET
    input_format: str = ""
    quantization: str = "fp32"  # or "int8 dynamic" / "int8 static"
    fidelity: object | None = None  # quantize.Fidelity of an int8 model
    note: str | None = None  # e.g. why static int8 fell back to dynamic
    warnings: list[str] = field(default_factory=list)  # e.g. undecodable calibration files left out


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
        raise MmlitError(f"ONNX export needs the '{module}' package ({what}): {PIP_HINT}") from None


def input_format(image_size: int) -> str:
    return (f"images: uint8 [N, 3, {image_size}, {image_size}] RGB NCHW, 0-255, resized to "
            f"{image_size}x{image_size} (shorter side, bilinear, centre crop); normalisation "
            f"(x/255 - mean)/std is inside the graph; output logits: float32 [N, num_classes]")


def _parity(onnx_path: str, wrapper: torch.nn.Module, image_size: int) -> tuple[float, str]:
    """Max |ORT - PyTorch| over random uint8 batches of sizes PARITY_BATCHES."""
    import onnxruntime as ort

    from .onnx_classifier import make_session

    session = make_session(onnx_path)
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


def output_path(ckpt_path: str | Path, out_path: str | Path | None = None, int8: bool = False) -> Path:
    """Where an export goes: `out_path`, `<out_path>/<checkpoint stem>.onnx` for a folder (one
    that exists, or a new one named with a trailing slash), or the checkpoint path with
    `.onnx` (`.int8.onnx` for an int8 export)."""
    ckpt_path = Path(ckpt_path).expanduser()
    name = ckpt_path.stem + (".int8.onnx" if int8 else ".onnx")
    if out_path is not None and not str(out_path).strip():  # an unset variable in a script, not "here"
        raise MmlitError("--out is empty: name a .onnx file or a folder")
    out = Path(out_path).expanduser() if out_path is not None else ckpt_path.with_name(name)
    folder = out.is_dir() or str(out_path).endswith(("/", os.sep))
    if not folder and out.suffix.lower() != ".onnx":  # predict, Netron and ONNX tools tell the file by it
        raise MmlitError(f"--out {out_path}: an ONNX file's name ends in .onnx (a new folder's in /)")
    target = out / name if folder else out
    check_utf8(target, "--out" if out_path is not None else "the export's default name")
    return target


def metadata(ckpt: Checkpoint, quantization: str = "fp32") -> dict[str, str]:
    """The `metadata_props` of an export (see the module docstring)."""
    return {
        "classes": json.dumps(ckpt.class_names),
        "mean": json.dumps(list(ckpt.mean)),
        "std": json.dumps(list(ckpt.std)),
        "image_size": str(ckpt.image_size),
        "input_format": input_format(ckpt.image_size),
        "mmlit_version": str(ckpt.info.get("mmlit_version", __version__)),
        "exported_by": f"mmlit {__version__}",
        "preset": ckpt.config.name,
        "task": ckpt.task,
        "quantization": quantization,
    }


def finish_file(path: str | Path, meta: dict[str, str]) -> None:
    """Drop the exporter's per-node debug metadata and write mmlit's metadata, in place."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
    for info in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        del info.metadata_props[:]
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"mLiT classifier exported by mmlit {__version__}. {meta['input_format']}"
    onnx.save(proto, str(path))


def trace_to_onnx(wrapper: torch.nn.Module, image_size: int, path: str | Path, opset: int, what: str) -> None:
    """`torch.onnx.export` (dynamo) of `wrapper` with a symbolic batch axis, quietly."""
    example = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8)  # 2: batch stays symbolic
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), export_forms(wrapper.model):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                              dynamo=True, external_data=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - exporter errors are many and varied
        raise MmlitError(f"ONNX export of {what} failed ({type(exc).__name__}: "
                         f"{one_line(exc, with_type=False, limit=300)})") from exc
    finally:
        exporter_log.setLevel(level)


def _check_fp32(path: str, wrapper: torch.nn.Module, size: int, tolerance: float, out: Path) -> tuple:
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise MmlitError(f"the exported ONNX model is invalid ({one_line(exc, with_type=False, limit=300)})") from exc
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, None
    diff, how = _parity(path, wrapper, size)
    if not diff <= tolerance:
        raise MmlitError(f"ONNX check failed: outputs differ from PyTorch by {diff:.3g} "
                         f"(> {tolerance:g}); nothing written to {out}")
    return diff, how


def load_int8_data(ckpt: Checkpoint, dataset: str, data_dir: str | None = None, classes_by_position: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, list[str]]:
    """Calibration images (`CALIBRATION_IMAGES` from the train split) and check images with
    labels (up to `CHECK_IMAGES` from the held-out split), uint8 NCHW; the same images every
    time (seeded); and warnings (undecodable files left out)."""
    from .quantize import CALIBRATION_IMAGES

    cfg = ckpt.config
    train, held = (checkpoint_split(ckpt, dataset, split, data_dir) for split in ("train", "val"))
    train, _ = match_classes(train, ckpt.classes, cfg.model.num_classes, dataset, classes_by_position)
    # labels as the model means them
    held, _ = match_classes(held, ckpt.classes, cfg.model.num_classes, dataset, classes_by_position)
    if len(train) == 0 or len(held) == 0:
        raise MmlitError(f"{dataset} has no images to calibrate or check with")
    warnings = [w for w in (skipped_warning(train.skipped), skipped_warning(held.skipped),
                            held_out_warning(ckpt, held, dataset)) if w]
    rng = np.random.default_rng(0)
    calib = train.images[rng.permutation(len(train))[:CALIBRATION_IMAGES]].numpy()
    pick = np.sort(rng.permutation(len(held))[:CHECK_IMAGES])
    return calib, held.images[pick].numpy(), held.labels[pick].numpy(), f"held-out images of {dataset}", warnings


def _int8_into(tmp: str, wrapper, ckpt: Checkpoint, opset: int, scheme: str, data, what: str):
    """Export fp32, quantize into `tmp`, check; static falls back to dynamic if it fails."""
    from .quantize import RANDOM_CHECK_SOURCE, measure_fidelity, quantize_int8, torch_outputs

    size = ckpt.image_size
    if data is None:
        images = np.random.default_rng(0).integers(0, 256, (RANDOM_CHECK_IMAGES, 3, size, size), dtype=np.uint8)
        calib, labels, source = None, None, RANDOM_CHECK_SOURCE
    else:
        calib, images, labels, source, _ = data
    reference = torch_outputs(wrapper.model, images, ckpt.mean, ckpt.std)
    note = None
    with tempfile.TemporaryDirectory(prefix="mmlit-export-") as work:
        fp32 = str(Path(work) / "fp32.onnx")
        trace_to_onnx(wrapper, size, fp32, opset, what)
        finish_file(fp32, metadata(ckpt))
        for attempt in (scheme, "dynamic") if scheme == "static" else (scheme,):
            quantize_int8(fp32, tmp, attempt, calib)
            finish_file(tmp, metadata(ckpt, f"int8 {attempt}"))
            fid = measure_fidelity(tmp, wrapper.model, ckpt.mean, ckpt.std, images, labels, source, reference)
            problems = fid.failures()
            if not problems:
                return f"int8 {attempt}", fid, note
            if attempt == "static":
                note = f"static int8 failed the check ({'; '.join(problems)}): wrote dynamic int8 instead"
    raise MmlitError(f"int8 check failed: {'; '.join(problems)}")


def check_int8_options(int8: bool, calibrate: str | None) -> None:
    """`--calibrate` belongs to `--int8` (checked before anything else, the output's name too)."""
    if calibrate is not None and not int8:
        raise MmlitError("--calibrate is for int8 export: add --int8")


def export_onnx(ckpt_path: str | Path, out_path: str | Path | None = None, opset: int = DEFAULT_OPSET,
                check: bool = True, tolerance: float = TOLERANCE, int8: bool = False,
                calibrate: str | None = None, data_dir: str | None = None, replace: bool = True,
                classes_by_position: bool = False) -> ExportResult:
    """Export a classifier checkpoint to ONNX (see the module docstring for the I/O contract).

    `out_path`: see `output_path`. fp32: with `check`, the model is validated with
    `onnx.checker` and, when onnxruntime is installed, run against PyTorch on random images at
    batch sizes 1 and 3: a difference above `tolerance` is an `MmlitError`.
    `int8`: quantized with ONNX Runtime (dynamic; static QDQ when `calibrate` names a dataset
    whose train split calibrates it) and always checked (`quantize.Fidelity.failures`): on
    held-out images of `calibrate`, else on random images. Nothing is written unless the
    export and its check succeeded; `replace=False` never touches an existing file.
    `classes_by_position`: see `evaluate.match_classes`.
    """
    _require("onnx", "ONNX model format")
    _require("onnxscript", "used by torch's ONNX exporter")
    check_int8_options(int8, calibrate)
    if int8:
        from .onnx_classifier import require_onnxruntime
        require_onnxruntime("int8 export (ONNX Runtime quantization)")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 14:
        raise MmlitError(f"--opset must be an integer >= 14, got {opset!r}")
    model, ckpt = load_classifier(ckpt_path, "cpu")
    out = output_path(ckpt_path, out_path, int8)
    wrapper = _Preprocessed(model, ckpt.mean, ckpt.std).eval()
    data = load_int8_data(ckpt, calibrate, data_dir, classes_by_position) if calibrate is not None else None
    result = ExportResult(out, None, None, opset, input_format(ckpt.image_size), warnings=data[4] if data else [])

    def write(tmp: str) -> None:
        if int8:
            result.quantization, result.fidelity, result.note = _int8_into(
                tmp, wrapper, ckpt, opset, "static" if calibrate else "dynamic", data, str(ckpt_path))
            import onnxruntime
            result.checked_with = f"onnxruntime {onnxruntime.__version__}"
            return
        trace_to_onnx(wrapper, ckpt.image_size, tmp, opset, str(ckpt_path))
        finish_file(tmp, metadata(ckpt))
        if check:
            result.max_abs_diff, result.checked_with = _check_fp32(tmp, wrapper, ckpt.image_size, tolerance, out)

    try:
        atomic_write(out, write, replace=replace)
    except FileExistsError:
        raise MmlitError(f"{out} already exists: choose another --out") from None
    except OSError as exc:
        raise MmlitError(f"cannot write {out} ({one_line(exc, with_type=False, limit=300)})") from None
    return result
