#!/usr/bin/env python
"""Device-resident data (`--loader device`) against loader workers (`--loader workers`), in one process.

Per preset, with the recipe a run would use (`--recipe paper`: the preset's full augmentation,
crop + flip + TrivialAugment + random erasing per image, mixup/cutmix per batch; `--recipe
auto`: fitted to `--epochs`), in images/s:

  bare          the engine's training step on batches already on the device: the model's ceiling
  aug device    `DeviceLoader` + `BatchAugment` alone: the batches the device path feeds, no model
  aug workers   `build_loader(..., workers=N)` alone: the worker path's batches, no model
  e2e device    `run_training("finetune", ..., loader="device")` (what `mmlit finetune` runs),
                timed between its warm-up and last step (decoding and compilation excluded),
                within the first epoch: the timed steps are cut to end there, so that the
                first epoch's end (validation, the first figures: one-off costs) is not timed
  e2e workers   the same with `loader="workers"`

`--profile N` adds where a bare step's time goes (torch.profiler over N steps: on CUDA the
device's busy share of the step, kernels per step, the top ops and kernels by device time) and
a table of SDPA's attention kernels at the preset's shapes (bench_attention.py).

The e2e runs alternate (device, workers, device, workers, ...) for `--rounds` rounds, so drift
on a shared machine hits both alike; each figure is the median over rounds and the table's
ratio is e2e device / e2e workers. "aug/bare" says how much of a step the augmentation would
take if it ran serially before it (the device path does run it serially, on the same device).

    python benchmarks/bench_pipeline.py --dataset /tmp/c10/s5k --presets xxs --rounds 3        # CPU
    python benchmarks/bench_pipeline.py --device cuda --presets xxs,s --batch 1024 --workers 8  # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attention  # noqa: E402
import common  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from bench_train import _batches, bare_step, bench_bare, bench_loader, step_clock  # noqa: E402
from mmlit_cli.engine import RunOptions, Trainer  # noqa: E402
from mmlit_cli.tasks import ClassifyTask  # noqa: E402
from mmlit_cli.config import load_config  # noqa: E402
from mmlit_cli.data import BatchAugment, DeviceLoader, ImageData, load_split, set_epoch  # noqa: E402
from mmlit_cli.recipe import fit_recipe  # noqa: E402
from mmlit_cli.train import run_training  # noqa: E402


def run_config(preset: str, args, data: ImageData):
    """The config `mmlit finetune --preset P --epochs E [--recipe paper] --batch-size B` trains with."""
    cfg = load_config(preset)
    reference = cfg.finetune.epochs
    ft = dataclasses.replace(cfg.finetune, epochs=args.epochs, recipe=args.recipe,
                             batch_size=args.batch or cfg.finetune.batch_size,
                             workers=cfg.finetune.workers if args.workers is None else args.workers)
    cfg = dataclasses.replace(cfg, finetune=ft, model=dataclasses.replace(cfg.model, num_classes=data.num_classes))
    return fit_recipe(cfg, "finetune", reference, len(data))


def bench_device_augment(cfg, data: ImageData, device: torch.device, args) -> float:
    """img/s of the device path's batches alone: gather + `BatchAugment` on the device."""
    augment = BatchAugment.from_config(cfg.finetune.augment, cfg.model.image_size)
    loader = DeviceLoader(data, cfg.finetune.batch_size, device, augment, shuffle=True, drop_last=True)
    it = _batches(loader)
    for _ in range(args.warmup):
        next(it)
    common.sync(device)
    start = time.perf_counter()
    n = sum(next(it)[0].shape[0] for _ in range(args.steps))
    common.sync(device)
    return n / (time.perf_counter() - start)


def sync_check(cfg, data: ImageData, device: torch.device, args, tmp: Path, steps: int = 6) -> int | None:
    """Host syncs in `steps` device-path training steps (batch, augmentation, `_train_step`),
    counted by CUDA's sync debug mode; None off CUDA."""
    if device.type != "cuda":
        return None
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, loader="device"))
    trainer = Trainer(ClassifyTask(cfg, data.classes), cfg, data, None,
                      RunOptions(out_dir=tmp / "sync", dataset={}, device=str(device), quiet=True), Console(quiet=True))
    batches = trainer.train_loader.batches(0)
    trainer._train_step(*next(batches))  # first step: allocations, cuBLAS handles
    common.sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                trainer._train_step(*next(batches))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught[:5]:
        print(f"   sync: {w.filename}:{w.lineno}: {str(w.message)[:120]}", flush=True)
    return sum("synchroniz" in str(w.message) for w in caught)


def diagnose(preset: str, cfg, classes: list[str], device: torch.device, args, tmp: Path) -> None:
    """--profile: where a bare step's time goes, what the attention kernel layout a run chooses
    is worth to the whole step, and SDPA's kernels at the preset's shapes."""
    tuned = None
    try:  # the step tuned as a CUDA run is (and, for the comparison below, on a CPU too)
        tuned = bare_step(cfg, classes, device, args.compile, tmp, tune_attention=True)
        step, dev, _ = tuned
        lines = common.profile_lines(lambda: step(0), args.profile, dev)  # after a warm-up step of its own
    except Exception as e:  # noqa: BLE001 - a diagnostic's failure is a line, not the end of the run
        lines = [f"profile failed: {type(e).__name__}: {str(e)[:200]}"]
    try:
        lines.append(attention_layout_line(cfg, classes, device, args, tmp, tuned=tuned))
    except Exception as e:  # noqa: BLE001
        lines.append(f"attention layout comparison failed: {type(e).__name__}: {str(e)[:200]}")
    for line in lines:
        print(f"   {line}", flush=True)
    try:
        print(bench_attention.attention_table([preset], device, cfg.finetune.batch_size, steps=10), flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"   attention table failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


def attention_layout_line(cfg, classes: list[str], device: torch.device, args, tmp: Path, rounds: int = 3,
                          tuned=None) -> str:
    """The bare step with the attention layout `runtime.tune_attention` chooses on this device
    (measured here even on a CPU, where runs do not tune) against the layout as built: ms per
    step, alternating rounds of `args.profile` steps, medians. `tuned`: that step, when made
    already (`bare_step(..., tune_attention=True)`)."""
    tuned, dev, note = tuned or bare_step(cfg, classes, device, args.compile, tmp, tune_attention=True)
    if not note:
        return "attention layout: as built (no layout measured at least 10 % faster for one layer)"
    if args.compile:
        return f"attention layout: {note} (the whole-step comparison is left out under --compile)"
    built, _, _ = bare_step(cfg, classes, device, args.compile, tmp, tune_attention=False)
    times: dict[str, list[float]] = {"chosen": [], "built": []}
    for s in (tuned, built):
        s(0)  # warm-up
    for _ in range(rounds):
        for name, s in (("chosen", tuned), ("built", built)):
            times[name].append(1000 * common.timed(lambda: [s(i) for i in range(args.profile)], dev) / args.profile)
    chosen, as_built = common.median(times["chosen"]), common.median(times["built"])
    return (f"attention layout: {note}; whole bare step {chosen:.2f} ms against {as_built:.2f} ms as built "
            f"({as_built / chosen:.2f}x)")


def first_epoch_steps(warmup: int, steps: int, steps_per_epoch: int) -> int:
    """The timed steps of an e2e run: `steps`, cut to end within the first epoch when the
    warm-up leaves room for any."""
    if warmup + steps <= steps_per_epoch or steps_per_epoch - warmup < 1:
        return steps
    return steps_per_epoch - warmup


def bench_e2e(preset: str, dataset: str, cfg, loader: str, device: torch.device, args, out: Path,
              steps: int) -> float:
    B = cfg.finetune.batch_size
    first, last = args.warmup, args.warmup + steps
    with step_clock(first, last) as marks:
        result = run_training("finetune", preset, dataset, out=out, epochs=args.epochs, batch_size=B,
                              recipe=args.recipe, workers=cfg.finetune.workers, loader=loader, device=str(device),
                              compile=args.compile, max_steps=last, save_every=0, quiet=True,
                              console=Console(quiet=True))
    if first not in marks or last not in marks:
        raise SystemExit(f"e2e run stopped early ({result.get('stopped')}, step {result.get('global_step')})")
    return steps * B / (marks[last] - marks[first])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="xxs", help="comma-separated presets (default xxs)")
    p.add_argument("--dataset", default=str(common.DEFAULT_CIFAR), help="image folder (default /tmp/cifar10/train)")
    p.add_argument("--subset", type=int, default=None, help="only the first N images of each class")
    p.add_argument("--device", default="auto")
    p.add_argument("--recipe", default="paper", choices=["paper", "auto"],
                   help="paper (default): the preset's full augmentation; auto: fitted to --epochs")
    p.add_argument("--epochs", type=int, default=300, help="the run's length (what auto fits to; default 300)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--workers", type=int, default=None, help="loader processes of the workers path (default: preset's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CPU, 200 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU, 30 CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="alternating e2e rounds per loader")
    p.add_argument("--bare-rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (bare and e2e)")
    p.add_argument("--skip-e2e", action="store_true", help="only bare and augmentation figures")
    p.add_argument("--sync-check", action="store_true", help="on CUDA: count host syncs in device-path steps")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N bare steps (top ops and kernels), and time SDPA's attention kernels at the "
                        "preset's shapes (bench_attention.py)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.steps = args.steps or (200 if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (30 if cuda else 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    info = common.machine_info(device)
    print(common.machine_line(info), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="mmlit-bench-pipeline-"))
    try:
        dataset = common.ensure_cifar(Path(args.dataset)) if Path(args.dataset) == common.DEFAULT_CIFAR \
            else Path(args.dataset)
        if args.subset:
            dataset = common.subset_folder(dataset, args.subset, tmp / "data")
        rows, results, diagnoses = [], [], []
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            base = load_config(preset)
            data = load_split(str(dataset), "train", base.model.image_size, val_fraction=base.data.val_fraction)
            cfg = run_config(preset, args, data)
            ft = cfg.finetune
            print(f"-- {preset}: {len(data):,} images, batch {ft.batch_size}, recipe {args.recipe} at {args.epochs} "
                  f"epochs: {ft.augment}", flush=True)
            bare = bench_bare(cfg, data.classes, device, args, tmp)
            aug_device = bench_device_augment(cfg, data, device, args)
            aug_workers = bench_loader(cfg, data, args)
            print(f"   bare {bare:,.0f}  aug device {aug_device:,.0f}  aug workers ({ft.workers}) {aug_workers:,.0f} "
                  f"img/s", flush=True)
            syncs = sync_check(cfg, data, device, args, tmp) if args.sync_check else None
            if syncs is not None:
                print(f"   host syncs in 6 device-path steps: {syncs}", flush=True)
            e2e: dict[str, list[float]] = {"device": [], "workers": []}
            result = {"preset": preset, "batch": ft.batch_size, "workers": ft.workers, "recipe": args.recipe,
                      "epochs": args.epochs, "bare_img_s": bare, "aug_device_img_s": aug_device,
                      "aug_workers_img_s": aug_workers, "e2e_device_img_s": e2e["device"],
                      "e2e_workers_img_s": e2e["workers"], "host_syncs": syncs}
            results.append(result)
            steps = first_epoch_steps(args.warmup, args.steps, len(data) // ft.batch_size)
            if steps != args.steps:
                print(f"   e2e: {steps} timed steps after {args.warmup}, not {args.steps}: an epoch has "
                      f"{len(data) // ft.batch_size}", flush=True)
            result["e2e_steps"] = steps
            for r in range(0 if args.skip_e2e else args.rounds):
                for loader in ("device", "workers"):
                    rate = bench_e2e(preset, str(dataset), cfg, loader, device, args, tmp / f"{preset}-{loader}-{r}",
                                     steps)
                    e2e[loader].append(rate)
                    print(f"   round {r + 1}: e2e {loader} {rate:,.0f} img/s", flush=True)
                    # Saved after every run: if the device call is cut short, what was measured
                    # survives (gpu.sh's time-to-accuracy step fits its epochs to these rates).
                    common.save_raw(args.json, info, args, results, quiet=True)
            dev, wrk = (common.median(v) if v else float("nan") for v in (e2e["device"], e2e["workers"]))
            rounds = [d / w for d, w in zip(e2e["device"], e2e["workers"])]
            rows.append([preset, ft.batch_size, ft.workers, common.fmt_num(bare), common.fmt_num(aug_device),
                         common.fmt_num(aug_workers), common.fmt_ratio(bare / aug_device), common.fmt_num(dev),
                         common.fmt_num(wrk), common.fmt_ratio(dev / wrk),
                         " ".join(f"{x:.2f}" for x in rounds) or "-"])
            result["device_over_workers"] = dev / wrk
            common.save_raw(args.json, info, args, results, quiet=True)
            diagnoses.append((preset, cfg, data.classes))
        amp = ", bf16 autocast" if device.type == "cuda" else ""
        print()
        print(common.format_table(
            ["preset", "batch", "workers", "bare", "aug device", "aug workers", "aug/bare", "e2e device",
             "e2e workers", "device/workers", "per round"], rows,
            f"img/s on {device}{amp}{', compiled' if args.compile else ', eager (no torch.compile)'}, recipe {args.recipe} "
            f"({args.steps} timed steps, {args.rounds} alternating rounds)"))
        print("   aug/bare: the augmentation's share of a step's time were it run serially before the step "
              "(= bare img/s / aug device img/s)")
        common.save_raw(args.json, info, args, results)
        # diagnostics after every preset's figures: a device call cut short loses them, not xxs's figures
        for preset, cfg, classes in diagnoses if args.profile else []:
            print(f"-- {preset}: where the step's time goes", flush=True)
            diagnose(preset, cfg, classes, device, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
