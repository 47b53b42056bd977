"""`curves.png` from a run's metrics.jsonl and `confusion.png` from an evaluation."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import matplotlib  # noqa: F401 - the [plot] extra is a test requirement: these tests must not be skipped
import pytest
import torch
from PIL import Image

from helpers import train_tiny

from mmlit_cli.errors import MmlitError
from mmlit_cli.evaluate import evaluate_checkpoint
from mmlit_cli.plots import PlotUnavailable, plot_confusion, plot_curves


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("plots"), epochs=3)


def _png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


FIRST, SECOND = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _has(pixels: np.ndarray, colour) -> bool:
    return bool((pixels == np.array(colour, dtype=np.uint8)).all(-1).any())


def test_curves_of_a_classification_run(run):
    _, run_dir = run
    path = plot_curves(run_dir)
    assert path == run_dir / "curves.png"
    w, h = _png(path)
    assert w > h > 100  # loss and accuracy side by side
    assert not list(run_dir.glob(".curves.png.*"))  # no temp file left
    pixels = _pixels(path)
    for half in (pixels[:, : w // 2], pixels[:, w // 2:]):  # train/val loss, then val top-1/top-5
        assert _has(half, FIRST) and _has(half, SECOND)


def test_curves_follow_the_numbers(tmp_path):
    def draw(name, val_top1):
        run_dir = tmp_path / name / "run"  # the folder's name is the figure's title
        run_dir.mkdir(parents=True)
        rows = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_top1": a, "val_top5": 90.0}
                for e, a in enumerate(val_top1, start=1)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return _pixels(plot_curves(run_dir))

    a, b = draw("a", [10.0, 20.0, 30.0]), draw("b", [10.0, 20.0, 30.0])
    c = draw("c", [10.0, 25.0, 30.0])  # the same best epoch (the title), another curve
    assert np.array_equal(a, b)  # drawn from the numbers alone
    assert not np.array_equal(a, c)  # another accuracy: another figure


def test_curves_without_accuracy_and_without_epochs(tmp_path):
    mae = tmp_path / "mae"
    mae.mkdir()
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "expert_usage": [[0.5, 0.5]]}
            for e in (1, 2)]
    (mae / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    w, h = _png(plot_curves(mae))
    assert w < 2 * h  # one panel: loss only
    assert _has(_pixels(mae / "curves.png"), FIRST) and _has(_pixels(mae / "curves.png"), SECOND)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_curves(empty) is None  # no metrics.jsonl yet
    (empty / "metrics.jsonl").write_text("")
    assert plot_curves(empty) is None
    with pytest.raises(MmlitError, match="does not exist"):
        plot_curves(tmp_path / "missing")


def test_confusion_from_an_evaluation(run, tmp_path):
    data, run_dir = run
    report = evaluate_checkpoint(run_dir / "best.safetensors", str(data), "val", device="cpu")
    path = plot_confusion(report.result.confusion, report.classes, tmp_path)
    assert path == tmp_path / "confusion.png"
    _png(path)
    cm = report.result.confusion
    other = plot_confusion(cm.flip(1), report.classes, tmp_path / "other.png")
    same = plot_confusion(cm.clone(), report.classes, tmp_path / "same.png")
    assert np.array_equal(_pixels(path), _pixels(same))
    assert not np.array_equal(_pixels(path), _pixels(other))  # the matrix is what is drawn


def test_confusion_with_many_classes(tmp_path):
    g = torch.Generator().manual_seed(0)
    C = 30
    cm = torch.randint(0, 5, (C, C), generator=g) + torch.diag(torch.randint(10, 40, (C,), generator=g))
    classes = [f"class_with_a_long_name_{i}" for i in range(C)]
    w, h = _png(plot_confusion(cm, classes, tmp_path / "many.png"))
    assert min(w, h) > 500
    _png(plot_confusion(torch.zeros(120, 120, dtype=torch.int64), [], tmp_path / "huge.png"))  # no names
    with pytest.raises(MmlitError, match="2 class names for a 30x30"):
        plot_confusion(cm, ["a", "b"], tmp_path / "bad.png")


def test_class_names_in_a_script_the_font_lacks_draw_without_a_warning_per_glyph(tmp_path):
    """Chinese class names (狗, 猫): matplotlib's default font has no such glyphs, and its
    UserWarning for each, with a source line, filled training's and eval's output. A private-use
    character (U+E000) is in no font a machine has, so the test means something where CJK fonts are
    installed too: plain matplotlib is first shown to warn for it."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmlit_cli.plots import confusion_image

    names = ["狗", "猫\ue000"]
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        figure = Figure()
        FigureCanvasAgg(figure)
        figure.add_subplot().set_title(names[1])
        figure.canvas.draw()
    assert any("Glyph" in str(w.message) for w in plain)  # what the package must keep unsaid
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(torch.eye(2), names, tmp_path / "c.png")
        confusion_image(torch.eye(2), names)
    assert (tmp_path / "c.png").is_file()
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []


def test_missing_matplotlib_raises_plot_unavailable(run, tmp_path, monkeypatch):
    _, run_dir = run
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
    with pytest.raises(PlotUnavailable, match=r'pip install "mmlit\[plot\]"'):
        plot_curves(run_dir)
    with pytest.raises(PlotUnavailable):
        plot_confusion(torch.eye(3, dtype=torch.int64), ["a", "b", "c"], tmp_path / "c.png")
    assert issubclass(PlotUnavailable, MmlitError)



def test_curves_leave_out_lines_that_are_not_rows(tmp_path):
    """A torn write or stray bytes in metrics.jsonl (not UTF-8, an epoch that is not a finite
    number) is left out, as a bad JSON line is: the good rows are still drawn, as without it."""
    rows = [json.dumps({"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e}).encode() for e in (1, 2, 3)]

    def draw(name, stray: bytes):
        run_dir = tmp_path / name / "run"  # the folder's name is the figure's title: the same for all
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_bytes(b"\n".join([rows[0], stray, *rows[1:]]) + b"\n")
        return _pixels(plot_curves(run_dir))

    clean = draw("clean", b"")
    strays = [b"\xff garbage", b'{"epoch": 1e400, "train_loss": 9.0}', b'{"epoch": true, "train_loss": 9.0}',
              '{"epoch": 4, "train_loss": 9.0, "note": "\xe9"}'.encode("latin-1")]
    for i, stray in enumerate(strays):
        assert np.array_equal(draw(f"stray{i}", stray), clean), stray


def test_curves_of_the_current_folder_are_titled_by_its_name(run, monkeypatch):
    _, run_dir = run
    by_path = _pixels(plot_curves(run_dir))
    monkeypatch.chdir(run_dir)
    assert np.array_equal(_pixels(plot_curves(".")), by_path)  # "run: 3 epochs", not ": 3 epochs"
    with pytest.raises(MmlitError, match="no run folder given"):
        plot_curves("")


def test_names_in_square_brackets_are_printed_as_they_are(run, tmp_path):
    """Rich reads `[plot]` or `[exp1]` as markup and drops it: the matplotlib hint lost its
    extra, a run folder its name. Fresh processes, matplotlib made unimportable in one."""
    data, run_dir = run
    exp = tmp_path / "[exp1]"
    shutil.copytree(run_dir, exp)
    plot = subprocess.run([sys.executable, "-m", "mmlit_cli", "plot", str(exp)], capture_output=True, text=True)
    assert plot.returncode == 0 and f"curves: {exp}/curves.png" in plot.stdout, plot.stdout + plot.stderr
    no_matplotlib = ("import sys; sys.modules['matplotlib'] = None; from mmlit_cli.cli import main; "
                     "sys.argv[0] = 'mmlit'; main()")
    ev = subprocess.run([sys.executable, "-c", no_matplotlib, "eval", str(exp / "last.safetensors"), "--dataset",
                         str(data), "--out", str(tmp_path / "ev")], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert 'pip install "mmlit[plot]"' in ev.stderr and "no matplotlib" not in ev.stdout, ev.stderr


def test_a_one_epoch_run_has_one_tick(tmp_path, monkeypatch):
    """matplotlib's integer locator falls back to 0.6, 0.8, ... for a one-epoch axis."""
    from mmlit_cli import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    run_dir = tmp_path / "one"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 2.0, "val_loss": 2.1,
                                                       "val_top1": 20.0, "val_top5": 60.0}) + "\n")
    plot_curves(run_dir)
    assert [list(ax.get_xticks()) for ax in figures[0].axes] == [[1.0], [1.0]]
