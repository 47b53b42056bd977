#!/usr/bin/env python
"""The card's commands, cold, in an empty folder: wall time and exit code of each.

    python benchmarks/bench_card.py                      # this checkout's mmlit
    python benchmarks/bench_card.py --mmlit /tmp/fv/bin/mmlit   # an installed copy (a fresh venv)

Each command runs as its own process, exactly as a new user types it, in a new empty folder,
with no data directory ($MMLIT_DATA unset) and nothing appended: `mmlit finetune --preset xxs`
and `mmlit pretrain --preset xs` train on the bundled sample at its default length, then `eval`
and `predict` use what fine-tuning wrote. Issue 25's target: each ends (exit 0) within
`--limit-s` (120 s) on a 2-core CPU; `eval --dataset cifar100` without its files must end with
a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

COMMANDS = [  # (command, expected exit code)
    ("mmlit pretrain --preset xs", 0),
    ("mmlit finetune --preset xxs", 0),
    ("mmlit eval runs/finetune/xxs/best.safetensors", 0),
    ("mmlit predict runs/finetune/xxs/best.safetensors", 0),
    ("mmlit count-params --preset xxs", 0),
    ("mmlit eval runs/finetune/xxs/best.safetensors --dataset cifar100", 2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmlit", help="the mmlit program to run (default: this checkout, as python -m mmlit_cli)")
    ap.add_argument("--limit-s", type=float, default=120.0)
    ap.add_argument("--device", default=None, help="CUDA_VISIBLE_DEVICES for the commands (default: inherited)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()

    program = shlex.split(args.mmlit) if args.mmlit else [sys.executable, "-m", "mmlit_cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("MMLIT_DATA", "MMLIT_DEBUG")}
    if not args.mmlit:
        env["PYTHONPATH"] = str(common.REPO)
    if args.device is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.device
    info = common.machine_info(common.pick_device("cpu"))
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="mmlit-card-") as home:
        for command, expected in COMMANDS:
            start = time.perf_counter()
            r = subprocess.run(program + shlex.split(command)[1:], cwd=home, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            err = r.stderr.strip().splitlines()
            ok = r.returncode == expected and wall <= args.limit_s and (expected == 0 or len(err) == 1)
            rows.append([command, r.returncode, f"{wall:.1f}", "yes" if ok else "NO"])
            results.append({"command": command, "exit": r.returncode, "wall_s": wall, "ok": ok,
                            "last_line": (err or r.stdout.strip().splitlines() or [""])[-1]})
            if r.returncode != expected:
                print(f"$ {command}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}", file=sys.stderr)
    print(common.format_table(["command (empty folder, cold)", "exit", "wall s", f"ok (<= {args.limit_s:g} s)"],
                              rows, title="The card's commands"))
    print(common.machine_line(info))
    common.save_raw(args.json, info, args, results)
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
