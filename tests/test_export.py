"""`export`: ONNX graph with uint8 input, normalisation inside, dynamic batch, metadata, parity."""

import json
import shutil
import sys

import numpy as np
import onnx  # the [onnx] extra is part of the test requirements: these tests must not be skipped
import onnxruntime as ort
import pytest
import torch

from helpers import TINY, train_tiny

from mmlit_cli.data import normalize
from mmlit_cli.errors import CheckpointError, MmlitError
from mmlit_cli.export import export_onnx
from mmlit_cli.evaluate import load_classifier
from mmlit_cli.predict import predict_paths
from mmlit_cli.train import run_training


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny classifier checkpoint and its ONNX export at the default path."""
    base = tmp_path_factory.mktemp("export")
    data, run = train_tiny(base)
    ckpt = base / "model.safetensors"
    shutil.copy(run / "best.safetensors", ckpt)
    result = export_onnx(ckpt)
    return data, ckpt, result


def test_export_writes_the_default_path_and_checks_parity(exported):
    _, ckpt, result = exported
    assert result.path == ckpt.with_suffix(".onnx") and result.path.is_file()
    assert result.checked_with.startswith("onnxruntime ")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.is_file()) == ["model.onnx", "model.safetensors"]


def test_onnx_runtime_matches_pytorch_with_a_dynamic_batch(exported):
    _, ckpt, result = exported
    model, meta = load_classifier(ckpt)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    S = meta.image_size
    assert inp.name == "images" and inp.type == "tensor(uint8)" and out.name == "logits"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, S, S]  # symbolic batch axis
    gen = torch.Generator().manual_seed(123)
    for n in (1, 3, 8):
        x = torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=gen)
        with torch.inference_mode():
            ref = model(normalize(x, meta.mean, meta.std)).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (n, meta.config.model.num_classes)
        assert np.abs(got - ref).max() <= 1e-4


def test_onnx_agrees_with_predict_on_image_files(exported):
    """The documented input contract: decode/resize as mmlit does, feed uint8 NCHW."""
    from mmlit_cli.data import decode_one as _decode_one

    data, ckpt, result = exported
    pred = predict_paths(ckpt, [str(data)], top_k=3, device="cpu")
    assert len(pred.predictions) == 36 and not pred.failures
    size = load_classifier(ckpt)[1].image_size
    x = np.stack([_decode_one(p["path"], size) for p in pred.predictions]).transpose(0, 3, 1, 2)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": np.ascontiguousarray(x)})[0])
    probs = logits.softmax(1)
    classes = load_classifier(ckpt)[1].classes
    for p, row in zip(pred.predictions, probs):
        for t in p["top"]:
            assert abs(t["prob"] - row[classes.index(t["label"])].item()) < 1e-4


def test_onnx_metadata(exported):
    _, ckpt, result = exported
    _, meta = load_classifier(ckpt)
    model = onnx.load(str(result.path))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == meta.classes == ["blue", "green", "red"]
    assert json.loads(props["mean"]) == meta.mean and json.loads(props["std"]) == meta.std
    assert props["image_size"] == str(meta.image_size)
    assert props["preset"] == "xxs" and props["task"] == "classify" and props["mmlit_version"]
    assert "uint8" in props["input_format"] and "inside the graph" in props["input_format"]
    onnx.checker.check_model(model)


def test_mae_checkpoint_and_missing_onnx_are_one_line_errors(exported, tmp_path, monkeypatch):
    data, ckpt, _ = exported
    run_training("pretrain", "xxs", str(data), out=tmp_path / "mae", overrides=TINY, epochs=1, batch_size=8,
                 quiet=True, max_steps=1)
    with pytest.raises(CheckpointError, match="MAE pre-training checkpoint"):
        export_onnx(tmp_path / "mae" / "last.safetensors", tmp_path / "mae.onnx")
    assert not (tmp_path / "mae.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(MmlitError, match=r'pip install "mmlit\[onnx\]"'):
        export_onnx(ckpt, tmp_path / "x.onnx")


def test_a_failed_check_writes_nothing(exported, tmp_path):
    _, ckpt, _ = exported
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    with pytest.raises(MmlitError, match="ONNX check failed: outputs differ"):
        export_onnx(ckpt, out, tolerance=-1.0)  # no difference passes a negative tolerance
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left
