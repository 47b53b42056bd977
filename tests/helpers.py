"""Shared test helpers: a tiny model config and a learnable image folder in the real layout."""

from pathlib import Path

import numpy as np
from PIL import Image

TINY = ["model.depth=3", "model.embed_dim=24", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_hidden_first=16", "model.mlp_hidden_last=8", "model.image_size=12", "model.patch_size=3",
        "mae.decoder_dim=16", "mae.decoder_heads=2", "mae.decoder_kv_heads=1", "mae.decoder_mlp_hidden=16",
        "finetune.warmup_epochs=1", "pretrain.warmup_epochs=1", "finetune.workers=0", "pretrain.workers=0"]


def train_tiny(base: Path, epochs: int = 1) -> tuple[Path, Path]:
    """A colour image folder under `base` and a tiny classifier run trained on it: (folder, run dir)."""
    from mmlit_cli.train import run_training

    data = write_folder(base / "colours")
    run_training("finetune", "xxs", str(data), out=base / "run", overrides=TINY, epochs=epochs, batch_size=8,
                 quiet=True)
    return data, base / "run"


def write_folder(root: Path, classes=("red", "green", "blue"), per_class=12, size=10, labelled=True):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            pixels[..., c] += 150  # class-dependent colour: learnable in a few steps
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root
