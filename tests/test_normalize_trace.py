"""Normalisation cannot be captured by a trace: an export (which traces `normalize`) must not
change what eager code computes afterwards, in the same process (issue 12, bug 1)."""

import dataclasses
import subprocess
import sys

import torch

from helpers import TINY

from mmlit_cli.checkpoint import Checkpoint, save_checkpoint
from mmlit_cli.config import load_config
from mmlit_cli.data import normalize
from mmlit_cli.model import MLiT


def reference(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x.double() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class Wrapper(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return normalize(x, self.mean, self.std)


def test_eager_normalize_is_right_after_a_trace_ran_it_first():
    # Statistics no other test uses: whatever normalize keeps, its first use is the trace's.
    mean, std = (0.123, 0.456, 0.789), (0.321, 0.654, 0.987)
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.export.export(Wrapper(mean, std), (x,))
    torch.testing.assert_close(normalize(x, mean, std).double(), reference(x, mean, std), rtol=1e-6, atol=1e-6)


def test_the_normalize_module_exports_its_statistics_as_constants():
    from mmlit_cli.data import Normalize

    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    program = torch.export.export(Normalize(mean, std), (x,))
    torch.testing.assert_close(program.module()(x).double(), reference(x, mean, std), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Normalize(mean, std)(x).double(), reference(x, mean, std), rtol=1e-6, atol=1e-6)


def test_export_in_a_fresh_process_passes_its_check(tmp_path):
    """`mmlit export` as the process's first use of the normalisation: the exporter traces it
    first, then compares ONNX Runtime with eager PyTorch."""
    cfg = load_config("xxs", TINY)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=3))
    torch.manual_seed(0)
    model = MLiT(cfg.model)
    torch.nn.init.normal_(model.head.weight)  # a zero head would hide any input error
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, Checkpoint(model.state_dict(), cfg, "classify", ["a", "b", "c"], {}))

    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "export", str(ckpt)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "checked with onnxruntime" in r.stdout and (tmp_path / "model.onnx").is_file()
