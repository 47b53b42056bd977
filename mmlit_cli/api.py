"""The Python API, in timm's terms: name the presets (`list_models`), build a model
(`create_model`, `create_mae`), load a trained one (`load_model`), feed it images the way
training read them (`preprocess`), or get what `mmlit predict` prints (`predict_paths`).

Every classifier made here carries `pretrained_cfg`, the dict timm users read to feed a model
(`input_size`, `mean`, `std`, `interpolation`, `crop_pct`, `crop_mode`, `num_classes`,
`label_names`); `preprocess` reads it, so images are resized and normalised exactly as
`mmlit finetune`, `eval` and `predict` do.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import Config, available_presets, load_config, with_values
from .data import Normalize, decode_one, fit_image
from .errors import MmlitError, one_line
from .evaluate import load_classifier
from .mae import MaskedAutoencoder
from .model import MLiT
from .predict import failure_reason, is_onnx, predict_paths
from .runtime import resolve_device

__all__ = ["list_models", "create_model", "create_mae", "load_model", "preprocess", "predict_paths"]


def pretrained_cfg(cfg: Config, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """What a model of `cfg` expects as input, under timm's `pretrained_cfg` keys. `crop_pct`
    1.0 and "center": the shorter side is resized to the image size and the centre kept."""
    size = cfg.model.image_size
    return {"input_size": (cfg.model.in_chans, size, size), "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "mean": tuple(cfg.data.mean), "std": tuple(cfg.data.std),
            "num_classes": cfg.model.num_classes, "label_names": list(class_names) if class_names else None}


def list_models(pattern: str | None = "*") -> list[str]:
    """The bundled presets whose names match `pattern` (shell-style, as `timm.list_models`; ""
    or None: all of them)."""
    return [name for name in available_presets() if fnmatch.fnmatchcase(name, pattern or "*")]


# timm's names for the same knobs: create_model("xxs", drop_path_rate=0.1) as in timm
_TIMM_ALIASES = {"drop_path_rate": "drop_path"}


def create_model(preset: str | Path = "xs", pretrained: bool = False, num_classes: int | None = None,
                 image_size: int | None = None, overrides: list[str] | str | None = None, **model_kwargs) -> MLiT:
    """Build an mLiT classifier from a preset name or YAML path, the way `timm.create_model` does.

    >>> model = create_model("xxs", num_classes=10)
    Keyword arguments override fields of the preset's `model` section (`depth=4`, ...; timm's
    `drop_path_rate` is `drop_path`), checked as `--set` checks them.
    `pretrained=True` is an error: mmlit ships no weights (train them, then `load_model`).
    """
    load_hint = "load a trained checkpoint with mmlit_cli.load_model(path)"
    if isinstance(pretrained, (str, os.PathLike)) or "checkpoint_path" in model_kwargs:
        raise MmlitError(f"create_model builds a new model: {load_hint}")
    if not isinstance(pretrained, bool):  # create_model("xxs", 10): timm's second argument is `pretrained`
        raise MmlitError(f"create_model's second argument is pretrained, as in timm.create_model: pass "
                         f"num_classes={pretrained!r} by name")
    if pretrained:
        raise MmlitError(f"mmlit has no pretrained weights to download: train a model (mmlit finetune) and "
                         f"{load_hint}")
    cfg = load_config(preset, [overrides] if isinstance(overrides, str) else overrides)
    changes = {_TIMM_ALIASES.get(k, k): v for k, v in model_kwargs.items()}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if image_size is not None:
        changes["image_size"] = image_size
    cfg = with_values(cfg, {"model": changes}, "create_model")
    model = MLiT(cfg.model)
    model.pretrained_cfg = pretrained_cfg(cfg)
    return model


def create_mae(preset: str | Path = "xs", image_size: int | None = None,
               overrides: list[str] | str | None = None, **mae_kwargs) -> MaskedAutoencoder:
    """Build the masked auto-encoder (mmLiT pre-training) around a preset's encoder. Keyword
    arguments override fields of the preset's `mae` section (`mask_ratio=0.5`, ...); the
    encoder's are changed with `overrides` (`"model.depth=4"`)."""
    cfg = load_config(preset, [overrides] if isinstance(overrides, str) else overrides)
    changes: dict[str, Any] = {"mae": mae_kwargs}
    if image_size is not None:
        changes["model"] = {"image_size": image_size}
    cfg = with_values(cfg, changes, "create_mae")
    return MaskedAutoencoder(cfg.model, cfg.mae)


def load_model(checkpoint: str | Path, device: str | torch.device | None = "cpu") -> MLiT:
    """The classifier a checkpoint holds, in eval mode on `device` ("auto": cuda, then mps,
    then cpu), with `class_names` and `pretrained_cfg` set from the checkpoint. Raises
    `MmlitError` for a file that is not an mmlit classifier checkpoint (an MAE-only one included:
    fine-tune it first)."""
    if is_onnx(checkpoint) and Path(checkpoint).is_file():
        raise MmlitError(f"{checkpoint} is an ONNX file: run it with onnxruntime, or get its predictions with "
                         f"mmlit_cli.predict_paths; load_model reads .safetensors checkpoints")
    model, ckpt = load_classifier(checkpoint, resolve_device("cpu" if device is None else str(device)))
    model.class_names = ckpt.class_names
    model.pretrained_cfg = pretrained_cfg(ckpt.config, ckpt.class_names)
    return model


def preprocess(images: Any, model: torch.nn.Module) -> torch.Tensor:
    """Images -> the float batch `model` takes, on its device and in its dtype: [N, 3, S, S], resized and
    normalised as in training (`model.pretrained_cfg`). `images`: one or a list of image file
    paths, Pillow images and uint8 arrays ([H, W, 3] RGB or [H, W] grey). Files are read exactly
    as `mmlit predict` reads them; Pillow images and arrays are converted and resized the same
    way, from their full pixels (for a big JPEG file `predict` lets libjpeg shrink it first: a
    mean of a few grey levels apart, up to about 20 at single pixels). Raises `MmlitError`
    naming the first image that cannot be used."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        raise MmlitError("preprocess needs a classifier from mmlit_cli.load_model or create_model (its "
                         "pretrained_cfg gives the image size and normalisation)")
    if cfg["input_size"][0] != 3:  # images are decoded as RGB, as training decodes them
        raise MmlitError(f"preprocess makes RGB batches [N, 3, S, S]; this model takes {cfg['input_size'][0]} "
                         f"channel(s) (model.in_chans): convert its input yourself")
    if isinstance(images, (str, os.PathLike, np.ndarray)) or _is_pil(images):
        images = [images]
    elif not isinstance(images, Iterable) or isinstance(images, (bytes, bytearray)):
        raise MmlitError(f"expected an image or a list of images, got {type(images).__name__}")
    size = cfg["input_size"][-1]
    pixels = [_pixels(image, size, i) for i, image in enumerate(images)]
    if not pixels:
        raise MmlitError("no image given")
    device = next(model.parameters()).device
    dtype = getattr(model, "input_dtype", torch.float32)  # the model's, after model.to(torch.bfloat16) too
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(device)
    return Normalize(cfg["mean"], cfg["std"], device)(batch).to(dtype)


def _is_pil(image: Any) -> bool:
    from PIL import Image
    return isinstance(image, Image.Image)


def _pixels(image: Any, size: int, index: int) -> np.ndarray:
    """The `index`-th image -> uint8 [S, S, 3]."""
    from PIL import Image
    if isinstance(image, (str, os.PathLike)):
        arr = decode_one(str(image), size)
        if arr is None:
            raise MmlitError(f"{image}: {failure_reason(Path(image))}")
        return arr
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise MmlitError(f"image {index}: expected a uint8 array of shape [H, W, 3] or [H, W], got "
                             f"{image.dtype} {list(image.shape)}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise MmlitError(f"image {index}: expected an image file path, a Pillow image or a uint8 array, got "
                         f"{type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise MmlitError(f"image {index}: empty ({image.width}x{image.height} pixels)")
    try:
        return fit_image(image, size)
    except Exception as e:  # noqa: BLE001 - a mode Pillow cannot convert, a closed or truncated image
        raise MmlitError(f"image {index}: cannot convert it ({one_line(e)})") from None
