#!/usr/bin/env python
"""Training pipeline benchmark: is the input pipeline or the model the bottleneck?

Per preset, three throughputs in images/s:

  bare     the engine's own training step (`engine.Trainer._train_step`: lr schedule, normalize
           on the device, MixUp/CutMix, forward under bf16 autocast on CUDA, loss, backward,
           clip, AdamW) on random uint8 batches already in (pinned, on CUDA) memory: the
           model's ceiling.
  loader   the real input pipeline without the model: `load_split` (decoded once, before
           timing) + `build_train_transform(cfg.finetune.augment, ...)` + `build_loader(...,
           workers=N)`, iterating batches.
  e2e      `run_training("finetune", ...)` (what `mmlit finetune` runs) with `max_steps`,
           timed from the end of its warm-up steps to the end of its last step (the engine's
           `_train_step` is wrapped to take the two timestamps, with a device sync at each),
           so dataset decoding, model building and compilation are excluded.

e2e / bare >= 0.85 means the pipeline keeps up with the model; loader / bare says how much
headroom the loader has on its own (it shares the CPU with the training process in e2e).

    python benchmarks/bench_train.py --quick                         # smoke run on CPU
    python benchmarks/bench_train.py --presets xxs,s --workers 8 --compile   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from mmlit_cli.config import load_config  # noqa: E402
from mmlit_cli.data import ImageData, build_loader, build_train_transform, load_split, set_epoch  # noqa: E402
from mmlit_cli.engine import RunOptions, Trainer  # noqa: E402
from mmlit_cli.tasks import ClassifyTask  # noqa: E402
from mmlit_cli.train import run_training  # noqa: E402

GOOD_RATIO = 0.85


def recipe_config(preset: str, batch: int | None, workers: int | None, num_classes: int):
    """The preset's config with the batch size / workers / class count a run would use."""
    cfg = load_config(preset)
    ft = cfg.finetune
    ft = dataclasses.replace(ft, batch_size=batch or ft.batch_size,
                             workers=ft.workers if workers is None else workers)
    model = dataclasses.replace(cfg.model, num_classes=num_classes)
    return dataclasses.replace(cfg, finetune=ft, model=model)


# --------------------------------------------------------------------------- bare


def bare_step(cfg, classes: list[str], device: torch.device, compile: bool, tmp: Path,
              tune_attention: bool | None = None):
    """(`step(i)`: `Trainer._train_step` on the i-th of 4 random uint8 batches held in (pinned, on
    CUDA) memory, the trainer's device, the trainer's attention note: the kernel layout it chose,
    "" when none; `tune_attention` as `RunOptions`' (None: on CUDA, as a run does))."""
    B, S = cfg.finetune.batch_size, cfg.model.image_size
    fake = ImageData(torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8),
                     torch.randint(0, len(classes), (B,)), classes, "random")
    bare_cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, workers=0))
    torch.manual_seed(0)
    trainer = Trainer(ClassifyTask(bare_cfg, classes), bare_cfg, fake, None,
                      RunOptions(out_dir=tmp / "bare", dataset={}, device=str(device), compile=compile,
                                 tune_attention=tune_attention, quiet=True), Console(quiet=True))
    pin = device.type == "cuda"
    batches = []
    for _ in range(4):
        images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8)
        labels = torch.randint(0, len(classes), (B,))
        batches.append((images.pin_memory(), labels.pin_memory()) if pin else (images, labels))
    trainer.model.train()
    return (lambda i: trainer._train_step(*batches[i % len(batches)])), trainer.device, trainer.attention_note


def bench_bare(cfg, classes: list[str], device: torch.device, args, tmp: Path) -> float:
    """img/s of `Trainer._train_step` on random in-memory uint8 batches."""
    step, dev, note = bare_step(cfg, classes, device, args.compile, tmp)
    if note:
        print(f"   {note}", flush=True)
    for i in range(args.warmup):
        step(i)
    rates = []
    per_round = max(1, args.steps // args.bare_rounds)
    for _ in range(args.bare_rounds):
        dt = common.timed(lambda: [step(i) for i in range(per_round)], dev)
        rates.append(per_round * cfg.finetune.batch_size / dt)
    return common.median(rates)


# --------------------------------------------------------------------------- loader


def _batches(loader) -> Iterator[Any]:
    epoch = 0
    while True:
        set_epoch(loader, epoch)
        yield from loader
        epoch += 1


def bench_loader(cfg, data: ImageData, args) -> float:
    """img/s of the real training loader (augmentation in `workers` processes), no model."""
    B = cfg.finetune.batch_size
    transform = build_train_transform(cfg.finetune.augment, cfg.model.image_size)
    loader = build_loader(data, B, transform, shuffle=True, workers=cfg.finetune.workers,
                          drop_last=len(data) >= B, seed=cfg.finetune.seed)
    it = _batches(loader)
    for _ in range(args.warmup):  # worker start-up
        next(it)
    n = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        images, _ = next(it)
        n += images.shape[0]
    rate = n / (time.perf_counter() - start)
    del it, loader  # stops the persistent workers
    return rate


# --------------------------------------------------------------------------- end to end


@contextlib.contextmanager
def step_clock(first: int, last: int):
    """Wrap `Trainer._train_step` to stamp the time (after a device sync) when the global
    step count reaches `first` and `last`."""
    original = getattr(Trainer, "_train_step", None)
    if original is None:
        raise SystemExit("mmlit_cli.engine.Trainer has no _train_step any more: update bench_train.step_clock")
    marks: dict[int, float] = {}

    def wrapped(self, images, labels):
        loss = original(self, images, labels)
        if self.global_step in (first, last):
            common.sync(self.device)
            marks[self.global_step] = time.perf_counter()
        return loss

    Trainer._train_step = wrapped
    try:
        yield marks
    finally:
        Trainer._train_step = original


def bench_e2e(preset: str, dataset: str, cfg, device: torch.device, args, tmp: Path) -> float:
    B = cfg.finetune.batch_size
    first, last = args.warmup, args.warmup + args.steps
    with step_clock(first, last) as marks:
        result = run_training("finetune", preset, dataset, out=tmp / f"e2e-{preset}", batch_size=B,
                              workers=cfg.finetune.workers, device=str(device), compile=args.compile,
                              max_steps=last, save_every=0, quiet=True, console=Console(quiet=True))
    if first not in marks or last not in marks:
        raise SystemExit(f"e2e run stopped early ({result.get('stopped')}, step {result.get('global_step')})")
    return args.steps * B / (marks[last] - marks[first])


# --------------------------------------------------------------------------- main


def attempt(label: str, errors: dict[str, str], fn, *args) -> float | None:
    """Run one measurement; print and record its error instead of ending the benchmark."""
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001 - e.g. a model that fails under autocast on CUDA
        errors[label] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        print(f"   {label:<16} FAILED: {errors[label]}", flush=True)
        return None
    print(f"   {label:<16} {value:,.0f} img/s", flush=True)
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=None, help="comma-separated presets (default xxs,xs,s; --quick: xxs)")
    p.add_argument("--dataset", default=str(common.DEFAULT_CIFAR),
                   help="image folder (default /tmp/cifar10/train, unpacked from the shared tarball if missing)")
    p.add_argument("--subset", type=int, default=None,
                   help="use only the first N images of each class (symlinked folder; --quick: 300)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's finetune.batch_size)")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: the preset's finetune.workers)")
    p.add_argument("--steps", type=int, default=None, help="timed steps/batches (default 20 CPU, 200 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU, 20 CUDA)")
    p.add_argument("--bare-rounds", type=int, default=3, help="the bare figure is the median of this many chunks")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (bare and e2e)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the main process")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    p.add_argument("--quick", action="store_true", help="smoke run: xxs, 300 images/class, batch 32, 6 steps")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.quick:
        defaults = dict(presets="xxs", subset=300, steps=6, warmup=2, batch=32)
    else:
        defaults = dict(presets="xxs,xs,s", steps=200 if cuda else 20, warmup=20 if cuda else 3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.bare_rounds = max(1, min(args.bare_rounds, args.steps))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    info = common.machine_info(device)
    print(common.machine_line(info), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="mmlit-bench-train-"))
    try:
        dataset = common.ensure_cifar(Path(args.dataset)) if Path(args.dataset) == common.DEFAULT_CIFAR \
            else Path(args.dataset)
        if args.subset:
            dataset = common.subset_folder(dataset, args.subset, tmp / "data")
        rows, results = [], []
        cache: dict[tuple[int, float], ImageData] = {}
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            base = load_config(preset)
            key = (base.model.image_size, base.data.val_fraction)
            if key not in cache:
                start = time.perf_counter()
                cache[key] = load_split(str(dataset), "train", base.model.image_size,
                                        val_fraction=base.data.val_fraction)
                dt = time.perf_counter() - start
                print(f"decoded {len(cache[key]):,} training images of {dataset} in {dt:.1f} s "
                      f"({len(cache[key]) / dt:,.0f} img/s, once; not part of any figure)", flush=True)
            data = cache[key]
            cfg = recipe_config(preset, args.batch, args.workers, data.num_classes)
            B, W = cfg.finetune.batch_size, cfg.finetune.workers
            per_epoch = len(data) // B
            if args.warmup + args.steps > per_epoch:
                print(f"   note: {args.warmup + args.steps} steps > {per_epoch} steps/epoch: the e2e figure "
                      f"includes an end-of-epoch validation", flush=True)
            print(f"-- {preset}: batch {B}, {W} loader worker(s), {args.warmup} warm-up + {args.steps} timed steps",
                  flush=True)
            errors: dict[str, str] = {}
            bare = attempt("bare model step", errors, bench_bare, cfg, data.classes, device, args, tmp)
            loader = attempt("loader only", errors, bench_loader, cfg, data, args)
            e2e = attempt("end to end", errors, bench_e2e, preset, str(dataset), cfg, device, args, tmp)
            nan = float("nan")
            b, ld, e = (nan if x is None else x for x in (bare, loader, e2e))
            if errors:
                verdict = "failed: " + ", ".join(errors)
            elif e / b >= GOOD_RATIO:
                verdict = "ok"
            else:
                verdict = "loader-bound" if ld < 1.2 * b else "contended / overhead"
            rows.append([preset, B, W, common.fmt_num(b), common.fmt_num(ld), common.fmt_num(e),
                         common.fmt_ratio(ld / b), common.fmt_ratio(e / b), verdict])
            results.append({"preset": preset, "batch": B, "workers": W, "bare_img_s": bare, "loader_img_s": loader,
                            "e2e_img_s": e2e, "loader_over_bare": ld / b, "e2e_over_bare": e / b,
                            "verdict": verdict, "errors": errors})
        amp = ", bf16 autocast" if device.type == "cuda" else ""
        print()
        print(common.format_table(
            ["preset", "batch", "workers", "bare img/s", "loader img/s", "e2e img/s", "loader/bare", "e2e/bare",
             "verdict"], rows,
            f"training throughput on {device}{amp}{', compiled' if args.compile else ''} "
            f"({args.steps} timed steps; e2e/bare >= {GOOD_RATIO} = the pipeline keeps up)"))
        print("   verdict: loader-bound = the loader alone is < 1.2x the model's rate; contended / overhead = "
              "the loader is fast alone but the run is slower (CPU shared by workers and the training process, "
              "or per-step overhead)")
        common.save_raw(args.json, info, args, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
