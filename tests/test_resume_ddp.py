"""Resume under torchrun (issue 12, bug 5): every rank gets its own random generators back
(not rank 0's), the epoch's partial loss sum is the ranks' and not rank 0's, and resuming with
another process count continues the run (on a note that the random streams differ).

The runs are launched with torchrun (2 CPU processes, gloo) through a small driver that
records, at every training step of every rank, what that rank's generator would draw next
(drawn in a forked RNG, so the run itself is undisturbed). The test compares those records.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from rich.console import Console

from helpers import TINY, write_folder

from mmlit_cli.checkpoint import load_checkpoint
from mmlit_cli.train import run_training

DRIVER = textwrap.dedent('''
    import json, os, sys
    import torch
    from mmlit_cli import engine
    from mmlit_cli.train import run_training

    spec = json.loads(sys.argv[1])
    log = open(os.path.join(spec["log_dir"], "rank%s.jsonl" % os.environ["RANK"]), "w")
    train_step = engine.Trainer._train_step

    def recorded(self, images, labels):
        with torch.random.fork_rng(devices=[]):
            draw = torch.rand(4).tolist()
        log.write(json.dumps({"step": self.global_step, "draw": draw}) + "\\n")
        log.flush()
        return train_step(self, images, labels)

    engine.Trainer._train_step = recorded
    run_training(**spec["run"])
''')


def torchrun(tmp_path, name, **run):
    log_dir = tmp_path / f"log-{name}"
    log_dir.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    spec = {"log_dir": str(log_dir), "run": {"quiet": True, "device": "cpu", **run}}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(driver), json.dumps(spec)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return {rank: {row["step"]: row["draw"] for row in map(json.loads, (log_dir / f"rank{rank}.jsonl").open())}
            for rank in (0, 1)}


def history(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2-epoch run and one stopped in the middle of epoch 2 (4 steps an
    epoch: each rank takes 4 of the 33 training images a step)."""
    base = tmp_path_factory.mktemp("ddp")
    folder = write_folder(base / "colours")
    train = dict(kind="finetune", preset="xxs", dataset=str(folder), overrides=TINY, epochs=2, batch_size=4,
                 seed=3)
    full = torchrun(base, "full", out=str(base / "full"), **train)
    part = torchrun(base, "part", out=str(base / "part"), max_steps=6, save_every=0, **train)
    shutil.copytree(base / "part", base / "part-copy")  # the first test resumes "part" itself
    return base, full, part


def test_resume_gives_each_rank_its_own_generators_and_the_uninterrupted_result(runs):
    base, full, part = runs
    assert sorted(part[0]) == [0, 1, 2, 3, 4, 5]
    state = load_checkpoint(base / "part" / "last.safetensors", with_train_state=True).train_info
    assert (state["epoch"], state["step_in_epoch"], state["world_size"]) == (1, 2, 2)

    resumed = torchrun(base, "resumed", kind="finetune", preset=None, dataset=None, resume=str(base / "part"))
    for rank in (0, 1):
        assert sorted(resumed[rank]) == [6, 7]
        for step in (6, 7):  # each rank draws what it drew at that step without the interruption
            assert resumed[rank][step] == full[rank][step], (rank, step)
    for step in (6, 7):
        assert resumed[0][step] != resumed[1][step]  # and the ranks' streams differ

    a, b = history(base / "full"), history(base / "part")
    assert [r["epoch"] for r in b] == [1, 2] and all(r["ranks_in_sync"] for r in b)
    for ra, rb in zip(a, b):  # epoch 2's loss: the ranks' partial sums, not rank 0's twice
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
    wa = load_checkpoint(base / "full" / "last.safetensors").tensors
    wb = load_checkpoint(base / "part" / "last.safetensors").tensors
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_resuming_on_one_process_continues_where_the_two_left_off(runs):
    """torchrun can come back smaller: the images of the epoch already trained on are kept, the
    step count follows the new global batch, and a line says the random streams differ."""
    base, _, _ = runs
    run = base / "part-copy"  # stopped after 2 of epoch 2's 4 steps of 2 x 4 images: 16 images in
    console = Console(record=True, width=300)
    result = run_training("finetune", None, None, resume=run, device="cpu", console=console)
    said = console.export_text()
    assert "resuming " + str(run) + " at epoch 2, step 12" in said  # 8 steps of 4 images an epoch; 16 images = 4
    assert "resumed on 1 process(es), not the 2 this run was trained on: its random streams differ" in said
    assert "global batch is now 4 x 1" in said and "(x 1/2)" in said
    lr = load_checkpoint(base / "part" / "last.safetensors").config.finetune.lr
    assert load_checkpoint(run / "last.safetensors").config.finetune.lr == pytest.approx(lr / 2)  # lr_base x 4/256
    assert result["stopped"] is None and result["global_step"] == 16
    assert [r["epoch"] for r in history(run)] == [1, 2] and [r["world_size"] for r in history(run)] == [2, 1]
