"""Held-out accuracy of `mmlit finetune`'s recipes against a plain PyTorch loop, at given budgets.

    python benchmarks/bench_recipe.py --data /tmp/c10/s5k --epochs 2 --recipes default,paper,plain
    python benchmarks/bench_recipe.py --data /tmp/c10/s5k --epochs 15 --recipes mmlit-mae:6+10 --seeds 0 1

`--data` is an image folder with `train/` and `val/`: every run trains on `train/` only and is
scored on `val/` at its last epoch (no checkpoint is picked on `val/`). Recipes:

* `default`  - `mmlit finetune --preset P --epochs E` (what a user gets);
* `paper`    - the same with `--recipe paper` (the preset's recipe, not fitted to the run);
* `plain`    - a plain loop written here on mmlit's model: AdamW (lr 2e-3 at batch 128, weight
  decay 0.05), one-cycle lr, random crop (padding 4) + horizontal flip, label smoothing 0.1;
* `plain-loader` - the plain loop with its batches from mmlit's own training loader (crop and
  flip per image in 2 worker processes, `build_loader`): tells the data path from the rest;
* `mmlit-mae:P+F` - `mmlit pretrain` for P epochs, then `mmlit finetune --init` for F epochs
  (mmLiT); the table's time column shows whether it used the same compute as a scratch run;
* `NAME=ARGS` - `mmlit finetune` with extra arguments, e.g. `lr3e-3=--lr 3e-3`.

Each mmlit run is a fresh `python -m mmlit_cli` process (set PYTHONPATH to benchmark another
checkout), scored with `mmlit eval --split val --json`. Rows are appended to `--jsonl` as they
finish, so long sweeps can be combined and resumed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F

from common import format_table, machine_info, machine_line
from mmlit_cli.config import AugmentConfig, load_config
from mmlit_cli.data import build_loader, build_train_transform, load_split, normalize, set_epoch
from mmlit_cli.model import MLiT


def _crop_flip_batches(train, batch_size: int, steps: int, size: int, pad: int):
    """One epoch of the plain loop's own batches: a random order, then per image a random crop
    (reflect padding `pad`) and a horizontal flip with probability 0.5."""
    order = torch.randperm(len(train))
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        padded = F.pad(train.images[idx], (pad,) * 4, mode="reflect")
        dx, dy = torch.randint(0, 2 * pad + 1, (2, len(idx))).tolist()
        flip = (torch.rand(len(idx)) < 0.5).tolist()
        crops = [padded[i, :, y:y + size, x:x + size] for i, (x, y) in enumerate(zip(dx, dy))]
        yield torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip)]), train.labels[idx]


def plain_baseline(data: Path, epochs: int, seed: int, preset: str, batch_size: int = 128,
                   lr: float = 2e-3, mmlit_loader: bool = False) -> dict:
    """The reference loop: nothing mmlit-specific except the model and the decoded pixels
    (and, with `mmlit_loader`, the batches of mmlit's training loader)."""
    cfg = load_config(preset)
    train = load_split(str(data), "train", cfg.model.image_size)
    val = load_split(str(data), "val", cfg.model.image_size)
    torch.manual_seed(seed)
    cfg.model.num_classes = len(train.classes)
    model = MLiT(cfg.model)
    steps_per_epoch = len(train) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    size, pad = cfg.model.image_size, 4
    if mmlit_loader:
        flip_crop = AugmentConfig(crop_padding=pad, hflip=0.5, auto_augment="none", random_erasing=0.0)
        loader = build_loader(train, batch_size, build_train_transform(flip_crop, size), shuffle=True, workers=2,
                              drop_last=True, seed=seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        if mmlit_loader:
            set_epoch(loader, epoch)
            batches = loader
        else:
            batches = _crop_flip_batches(train, batch_size, steps_per_epoch, size, pad)
        for images, labels in batches:
            logits = model(normalize(images, cfg.data.mean, cfg.data.std))
            loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(val), 500):
            x = normalize(val.images[i:i + 500], cfg.data.mean, cfg.data.std)
            correct += (model(x).argmax(1) == val.labels[i:i + 500]).sum().item()
    return {"top1": 100.0 * correct / len(val), "train_s": train_s, "final_train_loss": loss.item()}


def _mmlit(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmlit_cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {shlex.join(cmd)}\n{r.stderr[-2000:]}")
    return r


def _train_seconds(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return sum(r["epoch_time_s"] for r in rows)


def _recipe_line(stdout: str) -> str:
    """The two lines a run prints about its recipe (empty for versions that print none)."""
    lines = stdout.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("recipe")), None)
    return "" if at is None else " / ".join(x.strip() for x in lines[at:at + 2])


def mmlit_finetune(data: Path, epochs: int, seed: int, preset: str, extra: list[str], out: Path) -> dict:
    r = _mmlit("finetune", "--preset", preset, "--dataset", str(data), "--epochs", str(epochs), "--seed", str(seed),
               "--out", str(out), *extra)
    report = json.loads(_mmlit("eval", str(out / "last.safetensors"), "--dataset", str(data), "--split", "val",
                               "--json").stdout)
    return {"top1": report["top1"], "balanced_accuracy": report.get("balanced_accuracy"),
            "train_s": _train_seconds(out), "recipe_line": _recipe_line(r.stdout)}


def mmlit_mae(data: Path, pre_epochs: int, ft_epochs: int, seed: int, preset: str, out: Path) -> dict:
    """mmLiT: MAE pre-training on the training images (labels unused), then fine-tuning from the encoder."""
    # The folder's val/ is the held-out test set: pre-training must not see it, so it gets train/ alone.
    _mmlit("pretrain", "--preset", preset, "--dataset", str(data / "train"), "--epochs", str(pre_epochs),
           "--seed", str(seed), "--out", str(out / "mae"))
    res = mmlit_finetune(data, ft_epochs, seed, preset, ["--init", str(out / "mae" / "last.safetensors")],
                         out / "ft")
    res["train_s"] += _train_seconds(out / "mae")
    return res


def run_one(recipe: str, data: Path, epochs: int, seed: int, preset: str, out_root: Path) -> dict:
    out = out_root / f"{data.name}-e{epochs}-s{seed}-{recipe.split('=')[0].replace(':', '').replace('+', '_')}"
    if recipe in ("plain", "plain-loader"):
        return plain_baseline(data, epochs, seed, preset, mmlit_loader=recipe == "plain-loader")
    if recipe == "default":
        return mmlit_finetune(data, epochs, seed, preset, [], out)
    if recipe == "paper":
        return mmlit_finetune(data, epochs, seed, preset, ["--recipe", "paper"], out)
    if recipe.startswith("mmlit-mae:"):
        pre, ft = (int(x) for x in recipe.split(":", 1)[1].split("+"))
        return mmlit_mae(data, pre, ft, seed, preset, out)
    if "=" in recipe:
        return mmlit_finetune(data, epochs, seed, preset, shlex.split(recipe.split("=", 1)[1]), out)
    raise SystemExit(f"unknown recipe {recipe!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="image folder with train/ and val/")
    ap.add_argument("--epochs", type=int, nargs="+", required=True)
    ap.add_argument("--recipes", default="default,paper,plain")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--preset", default="xxs")
    ap.add_argument("--label", default="", help="a tag stored with each row (e.g. which checkout ran it)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mmlit-bench-recipe"), help="run folders")
    ap.add_argument("--jsonl", type=Path, default=None, help="append one JSON row per run here")
    args = ap.parse_args()
    for part in ("train", "val"):
        if not (args.data / part).is_dir():
            raise SystemExit(f"{args.data} needs {part}/ (train on train/, score on the held-out val/)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine_line(machine_info(torch.device("cpu"))), flush=True)
    n_train = sum(1 for p in (args.data / "train").rglob("*") if p.is_file())
    rows = []
    for epochs in args.epochs:
        for recipe in args.recipes.split(","):
            for seed in args.seeds:
                t0 = time.perf_counter()
                res = run_one(recipe, args.data, epochs, seed, args.preset, args.out)
                row = {"data": str(args.data), "train_images": n_train, "epochs": epochs, "recipe": recipe,
                       "seed": seed, "label": args.label, "wall_s": round(time.perf_counter() - t0, 1), **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    table = [(r["train_images"], r["epochs"], r["recipe"] + (f" [{r['label']}]" if r["label"] else ""), r["seed"],
              f"{r['top1']:.2f}", "" if r.get("balanced_accuracy") is None else f"{r['balanced_accuracy']:.2f}",
              f"{r['train_s']:.0f}") for r in rows]
    print(format_table(["train images", "epochs", "recipe", "seed", "held-out top-1 %", "balanced acc. %", "train s"],
                       table,
                       title=f"{args.preset}, scored on {args.data}/val at the last epoch"))


if __name__ == "__main__":
    main()
