#!/usr/bin/env python
"""Time to accuracy: one real `mmlit finetune` command, its epochs fitted to a wall-time budget.

    python benchmarks/bench_tta.py --data /tmp/c10/s45k --budget-s 300 --device cuda --rates pipeline.json

`--data` is an image folder with `train/` and `val/` (the held-out images: validation each
epoch, never trained on). The number of epochs is chosen so that the whole command (decoding,
compilation, every epoch's validation) should end within `--budget-s`: from the end-to-end
img/s that `bench_pipeline.py --json` measured for the preset (`--rates`; else `--rate`, so
that a pipeline step cut short still leaves this one a length to run), less a fixed allowance
for start-up and decoding, and for compilation when the run is long enough that `mmlit
finetune` compiles by default (`engine.compile_pays`: a run near that length is held just below
it when compiling would leave it fewer epochs). Then the command runs as a user runs it, in a
fresh process, timed from its start to its exit; the table gives its wall time, the held-out
top-1 at its last epoch (the figure the budget is judged by) and at its best epoch, and the
img/s of each epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from mmlit_cli.config import load_config  # noqa: E402
from mmlit_cli.engine import compile_pays  # noqa: E402
from mmlit_cli.recipe import fit_recipe, fit_to_device  # noqa: E402

# seconds a run spends outside its epochs' steps before the first: start-up and decoding, and
# on CUDA compiling s when the run compiles (~80 s on the H200, docs/BENCHMARKS.md)
FIXED_S = {"cpu": (20.0, 20.0), "cuda": (30.0, 110.0)}  # (eager, compiled)


def pipeline_rate(path: str | None, preset: str) -> float | None:
    """The end-to-end device-loader img/s `bench_pipeline.py` measured for `preset`."""
    if not path or not Path(path).is_file():
        return None
    try:
        results = json.loads(Path(path).read_text()).get("results", [])
    except (json.JSONDecodeError, AttributeError):
        return None
    for row in results:
        if row.get("preset") == preset and row.get("e2e_device_img_s"):
            return common.median(row["e2e_device_img_s"])
    return None


def fitted_epochs(budget_s: float, fixed_s: float, rate: float, train_images: int, val_images: int) -> int:
    """Epochs that fit in `budget_s`: each costs its training images at `rate` plus a
    validation pass (about a third of a training image's time per image)."""
    per_epoch = (train_images + val_images / 3) / rate
    return max(1, math.floor((budget_s - fixed_s) / per_epoch))


def planned_steps(preset: str, epochs: int, train_images: int, device: torch.device) -> int:
    """The optimisation steps of `mmlit finetune --preset P --epochs E` on `train_images` on
    `device`: its batch is the one `run_training` fits (the device's, then the recipe's)."""
    cfg = load_config(preset)
    reference = cfg.finetune.epochs
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=epochs))
    cfg = fit_to_device(cfg, "finetune", device.type, train_images, cpus=os.cpu_count() or 1)
    cfg = fit_recipe(cfg, "finetune", reference, train_images)
    return max(train_images // cfg.finetune.batch_size, 1) * epochs


def choose_epochs(budget_s: float, fixed: tuple[float, float], rate: float, train_images: int, val_images: int,
                  steps: Callable[[int], int], compiles: Callable[[int], bool]) -> tuple[int, str]:
    """The most epochs whose run fits in `budget_s`, with the allowance `fixed` (eager,
    compiled) of the way the run will go: (epochs, "eager" or "compiled"). `steps(e)` are
    the steps of `e` epochs, `compiles(steps)` whether such a run compiles by default."""
    eager = fitted_epochs(budget_s, fixed[0], rate, train_images, val_images)
    if not compiles(steps(eager)):
        return eager, "eager"
    compiled = fitted_epochs(budget_s, fixed[1], rate, train_images, val_images)
    if compiles(steps(compiled)):
        return compiled, "compiled"
    # compiling would cost more epochs than it leaves: the longest run that does not compile
    while eager > 1 and compiles(steps(eager)):
        eager -= 1
    return eager, "eager"


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="s")
    p.add_argument("--budget-s", type=float, default=300)
    p.add_argument("--fixed-s", type=float, default=None,
                   help="allowance for start-up, decoding and compilation (default on CUDA 30 s, 110 s when the "
                        "run compiles; 20 s on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rates", default=None, help="bench_pipeline.py --json output")
    p.add_argument("--rate", type=float, default=None, help="end-to-end img/s, when there is no --rates")
    p.add_argument("--epochs", type=int, default=None, help="skip the fitting")
    p.add_argument("--out", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more `mmlit finetune` arguments (after --)")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    data = Path(args.data)
    train_images, val_images = count_images(data / "train"), count_images(data / "val")
    fixed = (args.fixed_s,) * 2 if args.fixed_s is not None else FIXED_S.get(device.type, FIXED_S["cpu"])
    measured = pipeline_rate(args.rates, args.preset)
    rate = measured or args.rate
    if args.epochs:
        epochs, how = args.epochs, "given"
    elif rate:
        epochs, way = choose_epochs(args.budget_s, fixed, rate, train_images, val_images,
                                    lambda e: planned_steps(args.preset, e, train_images, device),
                                    lambda steps: compile_pays(device, steps))
        allowance = fixed[1] if way == "compiled" else fixed[0]
        how = (f"fitted: ({args.budget_s:.0f} s - {allowance:.0f} s) at {rate:,.0f} img/s, "
               + ("measured by bench_pipeline" if measured else "--rate: no measured rate in --rates")
               + f"; {planned_steps(args.preset, epochs, train_images, device):,} steps, {way}")
    else:
        raise SystemExit("no rate to fit the epochs to: give --rates, --rate or --epochs")
    cmd = [sys.executable, "-m", "mmlit_cli", "finetune", "--preset", args.preset, "--dataset", str(data),
           "--epochs", str(epochs), "--device", str(device), "--out", args.out, *args.extra]
    print(common.machine_line(common.machine_info(device)), flush=True)
    print(f"{epochs} epochs ({how}); {train_images:,} training and {val_images:,} held-out images", flush=True)
    print("$ " + " ".join(cmd[1:]).replace(sys.executable, "python"), flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()] \
        if (Path(args.out) / "metrics.jsonl").is_file() else []
    last = rows[-1] if rows else {}
    best = max(rows, key=lambda r: r.get("val_top1", -1)) if rows else {}
    rates = [r["train_img_per_s"] for r in rows]
    steady = common.median(rates[1:]) if len(rates) > 1 else (rates[0] if rates else float("nan"))
    print()
    print(common.format_table(
        ["preset", "epochs", "wall s", "budget s", "last-epoch top-1", "best top-1", "img/s (epochs 2+)", "rc"],
        [[args.preset, len(rows), f"{wall:.0f}", f"{args.budget_s:.0f}",
          f"{last.get('val_top1', float('nan')):.2f} %", f"{best.get('val_top1', float('nan')):.2f} % "
          f"(epoch {best.get('epoch', '-')})", common.fmt_num(steady), rc]],
        f"time to accuracy on {device}: held-out top-1 of `mmlit finetune` within {args.budget_s:.0f} s"))
    print("   img/s per epoch: " + ", ".join(f"{r:,.0f}" for r in rates))
    # what the command spent besides its training steps (compilation is in epoch 1's steps)
    outside = wall - sum(r["epoch_time_s"] for r in rows)
    print(f"   outside the epochs' steps: {outside:.1f} s of {wall:.1f} s (start-up, decoding, validation, "
          f"checkpoints, figures; {outside / max(len(rows), 1):.2f} s per epoch)")
    if args.json:
        common.write_json(args.json, {"epochs": epochs, "wall_s": wall, "budget_s": args.budget_s, "rc": rc,
                                      "rate_used": rate, "outside_steps_s": outside, "rows": rows})
    return rc


if __name__ == "__main__":
    sys.exit(main())
