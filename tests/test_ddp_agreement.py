"""Under torchrun the ranks decide together: a loss that diverges on one rank only stops every
rank with the one-line error (not one rank stopping while the others wait for it), and ranks
that do not start from the same checkpoint (an --out not shared between machines) are an
error on every rank, not a hang. Two CPU processes (gloo), through a small driver that lets
each rank be told apart; every job is bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from helpers import TINY, write_folder

from mmlit_cli.train import run_training

ROOT = Path(__file__).resolve().parent.parent

DRIVER = textwrap.dedent('''
    import json, os, sys
    from mmlit_cli import tasks
    from mmlit_cli.errors import MmlitError
    from mmlit_cli.train import run_training

    spec = json.loads(sys.argv[1])
    rank = int(os.environ["RANK"])
    if spec.get("nan_on_rank") == rank:  # this rank's loss reads NaN at its 3rd step, the other's does not
        loss, calls = tasks.ClassifyTask.loss, []

        def nan_here(self, *args):  # + a constant NaN: the gradients, and so the weights, stay finite
            calls.append(1)
            value = loss(self, *args)
            return value + float("nan") if len(calls) == 3 else value

        tasks.ClassifyTask.loss = nan_here
    if spec.get("no_room_on_rank") == rank:  # as a GPU with less free memory: `loader: auto` picks workers here
        from mmlit_cli.data import pipeline
        pipeline.choose_loader = lambda device, nbytes: ("workers", "no room on this device")
    if spec.get("show_loader"):
        from mmlit_cli import engine
        build = engine.build_loaders

        def showing(recipe, *args, **kwargs):
            print(f"rank {rank}: loader {recipe.loader}", flush=True)
            return build(recipe, *args, **kwargs)

        engine.build_loaders = showing
    if "fastest_layout_by_rank" in spec:  # each rank's GPU times another layout fastest
        from mmlit_cli import engine, runtime
        fastest = tuple(spec["fastest_layout_by_rank"][rank])
        runtime._time_layout = lambda module, layout, *args: 0.001 if layout == fastest else 0.003
        fit = engine.Trainer.fit

        def showing_layouts(self):
            print(f"rank {rank}: layouts {sorted(set(runtime.attention_layouts(self.model)))}", flush=True)
            return fit(self)

        engine.Trainer.fit = showing_layouts
    run = dict(spec["run"], out=spec["out"][rank])
    try:
        run_training(**run)
    except MmlitError as e:
        print(f"rank {rank}: error: {e}", flush=True)
        sys.exit(2)
''')


def torchrun(tmp_path: Path, spec: dict) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(driver), json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # a hang: the whole group goes, workers included
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the job hung\n{stdout}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_a_loss_that_diverges_on_one_rank_stops_every_rank(tmp_path):
    data = write_folder(tmp_path / "data", per_class=40)
    run = dict(kind="finetune", preset="xxs", dataset=str(data), overrides=TINY, epochs=3, batch_size=4,
               device="cpu", save_every=0, quiet=True)
    r = torchrun(tmp_path, {"run": run, "out": [str(tmp_path / "run")] * 2, "nan_on_rank": 1})
    assert r.returncode != 0
    for rank in (0, 1):  # both ranks stop with the error at the same step
        assert f"rank {rank}: error: the loss became nan at step 10; stopped" in r.stdout, r.stdout + r.stderr[-3000:]


def test_ranks_that_start_from_different_checkpoints_are_an_error_on_every_rank(tmp_path):
    """Rank 0 finds a stopped run in its --out, rank 1 an empty folder (as on two machines that
    do not share the folder): both stop at once, naming the cause."""
    data = write_folder(tmp_path / "data", per_class=8)
    run = dict(kind="finetune", preset="xxs", dataset=str(data), overrides=TINY, epochs=3, batch_size=4,
               device="cpu")
    run_training(**run, out=tmp_path / "run", max_steps=4, console=Console(quiet=True))  # rank 0's folder
    r = torchrun(tmp_path, {"run": {**run, "quiet": True}, "out": [str(tmp_path / "run"), str(tmp_path / "other")]})
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: error: the processes do not start at the same step" in r.stdout, \
            r.stdout + r.stderr[-3000:]


def test_ranks_use_one_loader_when_the_data_fits_on_some_of_their_devices_only(tmp_path):
    """`loader: auto` asks each rank's device for room; one rank without it must not leave the
    others augmenting on their devices (other batches than the recorded loader's): all use workers."""
    data = write_folder(tmp_path / "data", per_class=8)
    run = dict(kind="finetune", preset="xxs", dataset=str(data), overrides=TINY, epochs=1, batch_size=4,
               device="cpu", save_every=0, quiet=True)
    r = torchrun(tmp_path, {"run": run, "out": [str(tmp_path / "run")] * 2, "no_room_on_rank": 1, "show_loader": True})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "rank 0: loader workers" in r.stdout and "rank 1: loader workers" in r.stdout, r.stdout
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "loader: workers" in config, config


def test_ranks_run_rank_0s_attention_layout_whatever_their_own_gpu_timed(tmp_path):
    """Each rank times the attention's kernel layouts on its own device; rank 0's choice (the
    one its printed note names) is the one every rank runs."""
    data = write_folder(tmp_path / "data", per_class=8)
    run = dict(kind="finetune", preset="xxs", dataset=str(data), overrides=TINY, epochs=1, batch_size=4,
               device="cpu", save_every=0, quiet=True, tune_attention=True)
    r = torchrun(tmp_path, {"run": run, "out": [str(tmp_path / "run")] * 2,
                            "fastest_layout_by_rank": [[8, True], [6, True]]})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: layouts [(8, True)]" in r.stdout, r.stdout
