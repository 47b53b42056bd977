"""mmlit: train, evaluate and ship ultra-light vision transformers (mLiT / mmLiT).

The Python API (`mmlit_cli.api`) is imported on first use, so that `mmlit --help` and the
commands that need no model start without importing torch's model code:

    list_models                 the bundled presets (xxs, xs, s), as timm.list_models
    create_model, create_mae    build a model from a preset, as timm.create_model does
    load_model                  a trained classifier from a checkpoint (class_names, pretrained_cfg)
    preprocess                  image files / Pillow images / arrays -> the batch the model takes
    predict_paths               top-k predictions for files and folders, as `mmlit predict`
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("list_models", "create_model", "create_mae", "load_model", "preprocess", "predict_paths")


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'mmlit_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
