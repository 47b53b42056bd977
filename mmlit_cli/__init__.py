"""mmlit: train, evaluate and ship ultra-light vision transformers (mLiT / mmLiT)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

__version__ = "0.1.0"


def create_model(preset: str | Path = "xs", num_classes: int | None = None, image_size: int | None = None,
                 overrides: list[str] | None = None, **model_kwargs):
    """Build an mLiT classifier from a preset name or YAML path, the way `timm.create_model` does.

    >>> model = create_model("xxs", num_classes=10)
    Keyword arguments override fields of the preset's `model` section (`depth=4`, ...).
    """
    from .config import load_config
    from .model import MLiT

    cfg = load_config(preset, overrides).model
    changes = dict(model_kwargs)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if image_size is not None:
        changes["image_size"] = image_size
    return MLiT(dataclasses.replace(cfg, **changes))


def create_mae(preset: str | Path = "xs", image_size: int | None = None, overrides: list[str] | None = None):
    """Build the masked auto-encoder (mmLiT pre-training) around a preset's encoder."""
    from .config import load_config
    from .mae import MaskedAutoencoder

    cfg = load_config(preset, overrides)
    model_cfg = cfg.model if image_size is None else dataclasses.replace(cfg.model, image_size=image_size)
    return MaskedAutoencoder(model_cfg, cfg.mae)


__all__ = ["__version__", "create_model", "create_mae"]
