"""Running an exported ONNX classifier with ONNX Runtime (optional: `pip install "mmlit[onnx]"`).

`OnnxClassifier` opens a file written by `mmlit export` (fp32 or int8), reads what the
exporter put in its metadata (class names, image size, normalisation) and returns logits for
uint8 images, so `predict` and `benchmark` feed it exactly what the exporter documents.
Nothing here imports onnxruntime at module import time: the package works without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MmlitError, one_line

PIP_HINT = 'pip install "mmlit[onnx]"'


def require_onnxruntime(what: str = "running ONNX models"):
    """`import onnxruntime`, or an `MmlitError` that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise MmlitError(f"{what} needs the 'onnxruntime' package: {PIP_HINT}") from None
    return onnxruntime



def make_session(model: str | Path | bytes, threads: int = 1, optimized_model_path: str | None = None,
                 profile_prefix: str | None = None):
    """A CPU `InferenceSession`: `threads` intra-op threads (1: no thread pool at all, the
    lowest batch-1 latency on a small CPU), sequential execution, every graph optimisation.
    `optimized_model_path` saves the graph ONNX Runtime actually runs (after its fusions);
    `profile_prefix` turns on ONNX Runtime's per-node profiler (`session.end_profiling()`)."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if optimized_model_path:
        opts.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


@dataclass
class OnnxClassifier:
    """An mmlit ONNX export ready to run: `logits(uint8 [N, 3, S, S])` -> float32 [N, C]."""

    path: Path
    session: object
    classes: list[str]
    image_size: int
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, threads: int = 1) -> "OnnxClassifier":
        """Open and validate an exported file; every problem is one `MmlitError` line."""
        path = Path(path)
        if not path.is_file():
            raise MmlitError(f"{path}: no such file")
        require_onnxruntime()
        try:
            session = make_session(path, threads)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise MmlitError(f"{path} is not an ONNX model onnxruntime can load "
                             f"({one_line(exc, with_type=False, limit=300)})") from None
        meta = dict(session.get_modelmeta().custom_metadata_map)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if ([i.name for i in inputs] != ["images"] or inputs[0].type != "tensor(uint8)"
                or "logits" not in [o.name for o in outputs]):
            raise MmlitError(f"{path} is not an mmlit export (expected input 'images' uint8 and output 'logits')")
        try:
            classes = json.loads(meta["classes"])
            size = int(meta["image_size"])
            mean, std = json.loads(meta.get("mean", "[]")), json.loads(meta.get("std", "[]"))
        except (KeyError, ValueError) as exc:
            raise MmlitError(f"{path} has no usable mmlit metadata ({type(exc).__name__}: {exc}); "
                             "export it with mmlit export") from None
        if (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or size < 1
                or inputs[0].shape[1:] != [3, size, size]):
            raise MmlitError(f"{path}: its metadata does not match its input {inputs[0].shape}")
        width = next(o for o in outputs if o.name == "logits").shape[-1]  # an int, or a name if dynamic
        if isinstance(width, int) and width != len(classes):
            raise MmlitError(f"{path}: its metadata names {len(classes)} classes where its output 'logits' has "
                             f"{width}")
        return cls(path, session, classes, size, mean, std, meta)

    @property
    def quantization(self) -> str:
        """"fp32", or the int8 scheme the exporter recorded ("int8 dynamic", "int8 static")."""
        return self.metadata.get("quantization", "fp32")

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 [N, 3, S, S] (RGB, resized as mmlit reads files) -> float32 logits [N, C]."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        parts = [self.session.run(["logits"], {"images": images[i:i + batch_size]})[0]
                 for i in range(0, len(images), batch_size)]
        if not parts:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(parts)
