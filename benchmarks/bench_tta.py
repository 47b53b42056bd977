#!/usr/bin/env python
"""Time to accuracy: one real `mmlit finetune` command, its epochs fitted to a wall-time budget.

    python benchmarks/bench_tta.py --data /tmp/c10/s45k --budget-s 300 --device cuda --rates pipeline.json

`--data` is an image folder with `train/` and `val/` (the held-out images: validation each
epoch, never trained on). The number of epochs is chosen so that the whole command (decoding,
compilation, every epoch's validation) should end within `--budget-s`: from the end-to-end
img/s that `bench_pipeline.py --json` measured for the preset (`--rates`; else `--rate`, so
that a pipeline step cut short still leaves this one a length to run), less
a fixed allowance for decoding and compilation. Then the command runs as a user runs it, in a
fresh process, timed from its start to its exit; the table gives its wall time, the held-out
top-1 at its last epoch (the figure the budget is judged by) and at its best epoch, and the
img/s of each epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


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


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="s")
    p.add_argument("--budget-s", type=float, default=300)
    p.add_argument("--fixed-s", type=float, default=None,
                   help="allowance for decoding and compilation (default 110 on CUDA, 20 on CPU)")
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
    fixed = args.fixed_s if args.fixed_s is not None else (110.0 if device.type == "cuda" else 20.0)
    measured = pipeline_rate(args.rates, args.preset)
    rate = measured or args.rate
    if args.epochs:
        epochs, how = args.epochs, "given"
    elif rate:
        epochs = fitted_epochs(args.budget_s, fixed, rate, train_images, val_images)
        how = (f"fitted: ({args.budget_s:.0f} s - {fixed:.0f} s) at {rate:,.0f} img/s, "
               + ("measured by bench_pipeline" if measured else "--rate: no measured rate in --rates"))
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
