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


# The SIMD extensions a machine line may name, widest first (int8 / fp32 matmul speed depends on them).
SIMD_WIDEST_FIRST = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimddp", "asimd")


def cpu_as_linux_tells_it() -> tuple[str, str | None] | None:
    """The first CPU in /proc/cpuinfo as a user reads it there: ("AMD EPYC", "family 25 model 1,
    avx2") - its model name; its family and model (x86) and the widest SIMD extension among its
    flags, when it has those. None where there is no /proc/cpuinfo. Written from the file's
    format, not with `mmlit_cli.runtime.cpu_info`, so that tests can check that function."""
    import platform
    import re

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    first = text.strip().split("\n\n")[0]

    def field(key):
        found = re.search(rf"^{re.escape(key)}\s*:[ \t]*(.*)$", first, re.M)
        return found.group(1).strip() if found else None

    flags = (field("flags") or field("Features") or "").split()
    parts = [f"family {field('cpu family')} model {field('model') or '?'}"] if field("cpu family") else []
    parts += [s for s in SIMD_WIDEST_FIRST if s in flags][:1]
    return field("model name") or platform.processor() or platform.machine(), ", ".join(parts) or None


def tensorboard_events(run_dir: Path):
    """The run's event files as TensorBoard itself reads them (its EventAccumulator, which
    also applies a resumed run's purge): (scalars {tag: [(step, value)]}, image tags, text tags)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, set(tags["images"]), set(tags["tensors"])
