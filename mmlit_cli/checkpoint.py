"""Self-describing safetensors checkpoints, written atomically.

A checkpoint holds the model's tensors and, in its safetensors metadata (strings only), what
`eval`/`predict`/`export` need to rebuild and feed the model: the resolved config, task,
class names, normalisation, image size and mmlit version. `last.safetensors` additionally
holds the training state (optimizer moments, EMA weights, RNG states) under the
`train_state/` prefix, with the scalar state as JSON in the metadata. Nothing is ever
unpickled: tensors come from safetensors, everything else from JSON that is validated here.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .config import Config, config_from_dict
from .errors import CheckpointError, ConfigError
from .files import atomic_write
from .model import resize_pos_embed

FORMAT = "mmlit-checkpoint/1"
TASKS = ("classify", "mae")
TRAIN_PREFIX = "train_state/"


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]  # model weights
    config: Config
    task: str  # "classify" or "mae"
    classes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # epoch, metrics, preset, version...
    train_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    train_info: dict[str, Any] | None = None

    @property
    def image_size(self) -> int:
        return self.config.model.image_size

    @property
    def mean(self) -> list[float]:
        return self.config.data.mean

    @property
    def std(self) -> list[float]:
        return self.config.data.std

    @property
    def held_out(self) -> bool:
        """Whether its run held validation out of the training split. A `--val test` run (the
        paper protocol) trained on all of it: its "val" split is the test split, as `eval`,
        `benchmark` and `export` then read it (held out, "val" would be images it trained on)."""
        recorded = self.info.get("dataset")
        return not (isinstance(recorded, dict) and recorded.get("validation") == "test")

    @property
    def class_names(self) -> list[str]:
        """The stored class names, or "0", "1", ... when the run had none."""
        return list(self.classes) or [str(i) for i in range(self.config.model.num_classes)]


def _payload(ckpt: Checkpoint, copy: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a checkpoint file holds: its tensors, on the host (copies when `copy`, which a
    CPU tensor is not otherwise), and its metadata strings."""
    meta = {
        "format": FORMAT,
        "mmlit_version": __version__,
        "task": ckpt.task,
        "preset": ckpt.config.name,
        "config": json.dumps(ckpt.config.to_dict()),
        "classes": json.dumps(ckpt.classes),
        "image_size": str(ckpt.config.model.image_size),
        "mean": json.dumps(ckpt.config.data.mean),
        "std": json.dumps(ckpt.config.data.std),
        "info": json.dumps(ckpt.info),
    }
    tensors = {k: v.detach().contiguous().to("cpu", copy=copy) for k, v in ckpt.tensors.items()}
    if ckpt.train_info is not None:
        meta["train_state"] = json.dumps(ckpt.train_info)
        tensors.update({TRAIN_PREFIX + k: v.detach().contiguous().to("cpu", copy=copy)
                        for k, v in ckpt.train_tensors.items()})
    return tensors, meta


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    def save(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=meta)
        except SafetensorError as e:  # a full disk is "I/O error: No space left on device (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), tmp) from None  # named as the user's file

    atomic_write(path, save)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    _write(path, *_payload(ckpt))


class CheckpointWriter:
    """Writes a training run's checkpoints on a background thread, so that the run goes on
    while one is serialized, fsynced and renamed (about 50 ms for preset s's last and best on
    a local SSD, more on a network one: on a GPU, where an epoch of CIFAR takes seconds, a
    few per cent of the run). `save` copies the tensors to the host at once, so the file
    holds the state of that moment; files are written in the order saved, with at most
    `pending` copies of the state waiting in the queue (`save` waits for room). A write that
    failed raises its error at the next `save` or `wait`, and the writes queued behind it
    are dropped (the older files stay whole).
    Used as a context manager, it waits for every write on leaving, raising a write's error
    only when the block itself raised none."""

    def __init__(self, pending: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=pending)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._failed = False  # a write failed: drop the queued ones, until `wait` has seen the queue empty

    def save(self, path: Path, ckpt: Checkpoint) -> None:
        self._raise()
        job = (Path(path), *_payload(ckpt, copy=True))
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mmlit-checkpoints", daemon=True)
            self._thread.start()
        self._jobs.put(job)  # waits while `pending` writes are queued

    def wait(self) -> None:
        """Return once every checkpoint saved so far is on disk; raise a failed write's error."""
        self._jobs.join()
        self._failed = False
        self._raise()

    def close(self, raise_error: bool = True) -> None:
        """Wait, then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)  # behind the queued writes: the thread ends once they are made
            self._thread.join()
            self._thread = None
        self._failed = False
        if raise_error:
            self._raise()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_error=exc_type is None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if not self._failed:
                    _write(*job)
            except BaseException as e:  # raised in the training thread, at its next save or wait
                self._error, self._failed = e, True
            finally:
                self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _json_field(meta: dict[str, str], key: str, kind: type, path: Path) -> Any:
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise CheckpointError(f"{path}: checkpoint metadata has no '{key}'") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata '{key}' is not valid JSON") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: checkpoint metadata '{key}' should be a {kind.__name__}")
    return value


def load_checkpoint(path: str | Path, with_train_state: bool = False) -> Checkpoint:
    """Read and validate a checkpoint; every problem is a one-line `CheckpointError`."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = [p.name for p in (path / "best.safetensors", path / "last.safetensors") if p.is_file()]
        hint = f": pass a checkpoint file in it ({' or '.join(str(path / n) for n in inside)})" if inside else \
            ", not a checkpoint file (.safetensors)"
        raise CheckpointError(f"{path} is a folder{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".onnx":  # `predict` runs these; every other command reads checkpoints
        raise CheckpointError(f"{path} is an exported ONNX file: this needs the .safetensors checkpoint it was "
                              f"exported from (mmlit predict runs ONNX files)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an mmlit checkpoint (no '{FORMAT}' metadata)")
            keys = [k for k in f.keys() if with_train_state or not k.startswith(TRAIN_PREFIX)]
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError) as e:  # truncated or garbage headers raise the last two
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    # training never saves non-finite weights (a diverged run stops first); a file that holds
    # them would give NaN scores and NaN in predict's JSON, which is not JSON
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise CheckpointError(f"{path}: the weights hold NaN or inf ({broken[0]}{more}): not a usable checkpoint")
    task = meta.get("task")
    if task not in TASKS:
        raise CheckpointError(f"{path}: unknown task {task!r} in checkpoint metadata")
    try:
        config = config_from_dict(_json_field(meta, "config", dict, path), f"{path} (metadata)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    classes = _json_field(meta, "classes", list, path)
    if not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: class names must be strings")
    info = _json_field(meta, "info", dict, path)
    epoch = info.get("epoch", 0)  # eval's TensorBoard step, --resume's counter
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(f"{path}: info.epoch must be a whole number >= 0, got {epoch!r}")
    train_tensors = {k[len(TRAIN_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(TRAIN_PREFIX)}
    train_info = _json_field(meta, "train_state", dict, path) if with_train_state and "train_state" in meta else None
    return Checkpoint(tensors, config, task, classes, info, train_tensors, train_info)


def recorded_train_state(path: Path) -> dict | None:
    """The training state a run's last.safetensors records (its metadata alone, no tensor
    read); None for a missing or unreadable file, or one without that state."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        info = json.loads(meta["train_state"]) if meta.get("format") == FORMAT else None
    except (SafetensorError, OSError, ValueError, KeyError):
        return None
    return info if isinstance(info, dict) else None


def encoder_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The encoder weights of a checkpoint, named as in a classifier (`MLiT`)."""
    if ckpt.task == "mae":
        return {k[len("encoder."):]: v for k, v in ckpt.tensors.items() if k.startswith("encoder.")}
    return dict(ckpt.tensors)


@dataclass
class InitReport:
    loaded: list[str]
    skipped: list[str]  # in the checkpoint, not used (decoder, mismatched head...)
    missing: list[str]  # in the model, not in the checkpoint (kept at their initialisation)
    # in both under one name, in other shapes: "blocks.0.attn.qkv.weight [108, 36] there, [216, 72] here"
    mismatched: list[str] = field(default_factory=list)
    resampled: str | None = None  # the position embedding's grid, "12x12 to 8x8 patches", when resized
    unplaced: list[str] = field(default_factory=list)  # of the checkpoint's encoder, with no name in the model


def load_weights_into(model: torch.nn.Module, ckpt: Checkpoint) -> InitReport:
    """`--init`: copy every tensor of the checkpoint's encoder (or classifier) whose name and
    shape fit `model`; resample the position embedding if the image size differs."""
    source = encoder_state(ckpt)
    own = model.state_dict()
    loaded, skipped = [], sorted(k for k in ckpt.tensors if ckpt.task == "mae" and not k.startswith("encoder."))
    to_load, mismatched, resampled = {}, [], None
    for name, tensor in source.items():
        if name == "pos_embed" and name in own and tensor.shape != own[name].shape:
            grids = [f"{round((t.shape[1] - 1) ** 0.5)}" for t in (tensor, own[name])]
            tensor = resize_pos_embed(tensor, own[name].shape[1])
            resampled = f"{grids[0]}x{grids[0]} to {grids[1]}x{grids[1]} patches"
        if name in own and own[name].shape == tensor.shape:
            to_load[name] = tensor
            loaded.append(name)
        else:
            skipped.append(name)
            if name in own:
                mismatched.append(f"{name} {list(tensor.shape)} there, {list(own[name].shape)} here")
    model.load_state_dict(to_load, strict=False)
    missing = sorted(k for k in own if k not in to_load)
    return InitReport(sorted(loaded), sorted(skipped), missing, mismatched,
                      resampled if "pos_embed" in to_load else None, sorted(k for k in source if k not in own))
