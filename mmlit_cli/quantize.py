"""int8 ONNX models (ONNX Runtime quantization) and how faithful they are to PyTorch.

What is quantized: the weight matmuls (attention qkv/proj, the experts' W1/V, W2, the head)
get int8 weights. What stays float, on purpose:

* the MoE **router** (its MatMul/Add feeding each TopK, the TopK and the gate softmax): the
  router decides discretely, and a token whose two largest router logits are close would
  switch experts under int8 rounding. Its weights are 0.6 % of the model, so keeping them
  float costs nothing measurable in size;
* matmuls of two activations (attention scores and values, the gate-weighted expert sum):
  they have no weights to shrink, and quantizing attention probabilities to 8 bits is lossy;
* in static mode, also the **head**: its input scale is fixed by calibration, and int8 there
  flips near-tie predictions (measured on CIFAR-10: 99.40 % top-1 agreement with the head
  quantized, 99.80 % without; see docs/BENCHMARKS.md). It is 0.1 % of the weights.

Two schemes: "dynamic" (weights int8, activations quantized per call from their own range;
no data needed) and "static" (QDQ, activation ranges calibrated once on training images; the
matmul outputs stay float, so ONNX Runtime runs each as QuantizeLinear -> QGemm with a float
result instead of adding a requantize and a DequantizeLinear pass). `mmlit export --int8`
uses dynamic: it needs no data, and on ONNX Runtime's CPU provider it is as fast as static or
slightly faster (figures in docs/BENCHMARKS.md). `--calibrate DATASET` builds the static model
for runtimes that want fixed activation scales, and falls back to dynamic when static fails
the check.

Faithfulness is measured, not assumed: top-1 agreement with PyTorch, top-1 accuracy when
labels are known, and **router agreement**, the fraction of (image, token, layer) slots whose
top-k expert set is the same as PyTorch's (read from extra graph outputs on the TopK nodes).
An export's last MoE layer routes the class token only (see `export_forms._ExportMLiT`), so
there that one slot per image is compared.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import Normalize
from .errors import MmlitError, one_line
from .onnx_classifier import make_session, require_onnxruntime
from .runtime import forward_batch

SCHEMES = ("dynamic", "static")
MIN_AGREEMENT = 0.99  # top-1 agreement with PyTorch on real images
MAX_TOP1_DROP = 0.5  # accuracy points int8 may lose against PyTorch on labelled images
MIN_AGREEMENT_RANDOM = 0.95  # on random images (no dataset): a coarse check for gross errors
CALIBRATION_IMAGES = 256
RANDOM_CHECK_SOURCE = "random images"


@dataclass
class GraphRoles:
    """Node names of an exported mLiT graph by role (see the module docstring)."""

    router: list[str]
    activation_matmuls: list[str]
    head: list[str]
    topk_indices: list[str]  # the TopK index outputs, one per MoE layer, in layer order


def graph_roles(model) -> GraphRoles:
    """Find the router chains (MatMul [+ Add] -> TopK), the matmuls without an initializer
    operand, and the node producing `logits`, in an `onnx.ModelProto`."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    router, topk = [], []
    for node in g.node:
        if node.op_type != "TopK":
            continue
        topk.append(node.output[1])
        src = producer.get(node.input[0])
        while src is not None and src.op_type in ("Add", "MatMul", "Gemm"):
            router.append(src.name)
            if src.op_type != "Add":
                break
            src = next((producer[i] for i in src.input if i in producer), None)
    act = [n.name for n in g.node if n.op_type == "MatMul" and not all(i in inits for i in n.input[1:])]
    head = [producer[o.name].name for o in g.output if o.name in producer]
    return GraphRoles(router, act, head, topk)


@contextmanager
def _quiet():
    """onnxruntime.quantization logs advice at WARNING on the root logger: keep the CLI clean.
    Its module-level `logging.warning` also gives the root logger a handler where it had none
    (`logging.basicConfig`), after which the caller's own `basicConfig` does nothing: taken away."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


class _Images:
    """CalibrationDataReader over uint8 images, in batches."""

    def __init__(self, images: np.ndarray, batch: int = 32):
        self._batches = iter([{"images": np.ascontiguousarray(images[i:i + batch])}
                              for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(src: str | Path, dst: str | Path, scheme: str = "dynamic",
                  calibration: np.ndarray | None = None) -> GraphRoles:
    """Write the int8 version of the fp32 export `src` to `dst`; returns the graph's roles.
    `static` needs `calibration` images (uint8 [N, 3, S, S])."""
    import onnx

    require_onnxruntime("int8 quantization")
    from onnxruntime import quantization as oq

    if scheme not in SCHEMES:
        raise MmlitError(f"unknown int8 scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    roles = graph_roles(onnx.load(str(src)))
    exclude = roles.router + roles.activation_matmuls
    ops = ["MatMul", "Gemm"]
    with _quiet():
        if scheme == "dynamic":
            oq.quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops, nodes_to_exclude=exclude,
                                per_channel=False, weight_type=oq.QuantType.QInt8)
        else:
            if calibration is None or len(calibration) == 0:
                raise MmlitError("static int8 quantization needs calibration images (--calibrate DATASET)")
            oq.quantize_static(str(src), str(dst), _Images(calibration), quant_format=oq.QuantFormat.QDQ,
                               op_types_to_quantize=ops, nodes_to_exclude=exclude + roles.head,
                               per_channel=False, activation_type=oq.QuantType.QUInt8,
                               weight_type=oq.QuantType.QInt8, calibrate_method=oq.CalibrationMethod.MinMax,
                               extra_options={"MatMulConstBOnly": True,  # float matmul outputs, see above
                                              "OpTypesToExcludeOutputQuantization": ops})
    return roles


# --------------------------------------------------------------------------------------------
# Faithfulness: logits and routes of PyTorch and of an ONNX file, side by side
# --------------------------------------------------------------------------------------------

def with_route_outputs(path: str | Path) -> bytes:
    """The model at `path` with every TopK index tensor added as a graph output (layer order),
    serialised: run it with `make_session(bytes)` to read the experts each token chose."""
    import onnx

    model = onnx.load(str(path))
    for name in graph_roles(model).topk_indices:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    return model.SerializeToString()


def _sorted_routes(idx) -> np.ndarray:
    """Top-k expert indices [..., k] -> the sets as sorted uint8 [..., k] (order-free compare)."""
    return np.sort(np.asarray(idx), axis=-1).astype(np.uint8)


def torch_outputs(model, images: np.ndarray, mean, std, batch: int = 250) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [N, C] and per MoE layer the chosen expert sets [N, T, k] of a PyTorch classifier
    (forward hooks on the routers; eval mode, no noise, so these are the routes it uses)."""
    layers = model.moe_layers()
    caught: list[torch.Tensor] = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out, k=m.top_k: caught.append(out.topk(k, dim=-1)[1]))
             for m in layers]
    logits, routes = [], [[] for _ in layers]
    normalize = Normalize(mean, std)
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                caught.clear()
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch]))
                logits.append(forward_batch(model, x, normalize, torch.device("cpu"), None).float().numpy())
                for layer, idx in enumerate(caught):
                    routes[layer].append(_sorted_routes(idx.numpy()))
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(logits), [np.concatenate(r) for r in routes]


def onnx_outputs(route_model: bytes, images: np.ndarray, batch: int = 250) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and expert sets of a model made by `with_route_outputs`."""
    session = make_session(route_model)
    logits, routes = [], None
    for i in range(0, len(images), batch):
        out = session.run(None, {"images": np.ascontiguousarray(images[i:i + batch])})
        logits.append(out[0])
        routes = routes or [[] for _ in out[1:]]
        for layer, idx in enumerate(out[1:]):
            routes[layer].append(_sorted_routes(idx))
    return np.concatenate(logits), [np.concatenate(r) for r in routes or []]


def route_agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Fraction of (image, token, layer) slots with the same top-k expert set. Where one side
    routes one token in a layer and the other all of them (an export's last MoE layer routes
    only the class token, the first), that token's slot is compared."""
    if len(a) != len(b) or not a:
        raise MmlitError(f"cannot compare routes of {len(a)} and {len(b)} MoE layers")
    pairs = []
    for layer, (x, y) in enumerate(zip(a, b)):
        tokens = min(x.shape[1], y.shape[1])
        if x.shape[0] != y.shape[0] or x.shape[1] != y.shape[1] and tokens != 1:
            raise MmlitError(f"cannot compare routes of MoE layer {layer}: shapes {list(x.shape)} and {list(y.shape)}")
        pairs.append((x[:, :tokens], y[:, :tokens]))
    same = sum(int((x == y).all(-1).sum()) for x, y in pairs)
    return same / sum(x.shape[0] * x.shape[1] for x, _ in pairs)


@dataclass
class Fidelity:
    """An ONNX model against PyTorch on `images` images from `source`."""

    images: int
    source: str
    agreement: float  # fraction of images with the same top-1 class
    router_agreement: float
    top1_torch: float | None = None  # percent; None without labels
    top1_onnx: float | None = None
    labelled: bool = False

    def failures(self) -> list[str]:
        """Why this model fails the int8 tolerance (empty: it passes)."""
        need = MIN_AGREEMENT_RANDOM if self.source == RANDOM_CHECK_SOURCE else MIN_AGREEMENT
        out = []
        if self.agreement < need:
            out.append(f"top-1 agrees with PyTorch on {100 * self.agreement:.2f} % of {self.images} "
                       f"{self.source} (< {100 * need:g} %)")
        if self.top1_torch is not None and self.top1_torch - self.top1_onnx > MAX_TOP1_DROP:
            out.append(f"top-1 {self.top1_onnx:.2f} % vs PyTorch {self.top1_torch:.2f} % "
                       f"(more than {MAX_TOP1_DROP:g} points lower)")
        return out


def measure_fidelity(path: str | Path, model, mean, std, images: np.ndarray, labels: np.ndarray | None,
                     source: str, reference: tuple[np.ndarray, list[np.ndarray]] | None = None) -> Fidelity:
    """Compare the ONNX file at `path` with the PyTorch `model` on uint8 `images`
    (`reference`: PyTorch's `torch_outputs` for these images, if already computed)."""
    ref_logits, ref_routes = reference if reference is not None else torch_outputs(model, images, mean, std)
    try:
        logits, routes = onnx_outputs(with_route_outputs(path), images)
    except MmlitError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors
        raise MmlitError(f"onnxruntime cannot run {path} ({one_line(exc, with_type=False, limit=300)})") from None
    ref_top, top = ref_logits.argmax(1), logits.argmax(1)
    fid = Fidelity(len(images), source, float((ref_top == top).mean()), route_agreement(ref_routes, routes))
    if labels is not None:
        fid.labelled = True
        fid.top1_torch = 100 * float((ref_top == labels).mean())
        fid.top1_onnx = 100 * float((top == labels).mean())
    return fid
