"""The command line, run as a user would (a real subprocess) and in-process."""

import json
import os
import subprocess
import sys

import pytest

SPEC_TOTALS = {"s": 2_364_390, "xs": 1_209_408, "xxs": 658_637}


def mmlit(*args, check=False):
    return subprocess.run([sys.executable, "-m", "mmlit_cli", *args], capture_output=True, text=True, check=check)


@pytest.mark.parametrize("preset", ["s", "xs", "xxs"])
def test_count_params_json_total_is_the_spec_figure_and_the_sum_of_its_parts(preset):
    out = json.loads(mmlit("count-params", "--preset", preset, "--num-classes", "100", "--json", check=True).stdout)
    assert out["total"] == SPEC_TOTALS[preset]
    assert sum(out["components"].values()) == out["total"]
    assert all(n > 0 for n in out["components"].values())


def forward_macs(cfg) -> int:
    """Multiply-accumulates of every matmul one image goes through on the fused path, by hand:
    patch projection; per block the fused qkv projection, q k^T and attention x v over all
    query heads, the output projection, the router, every expert's W1 and the shared V, the
    gate-weighted sum over experts and W2; the head on the class token."""
    T, D, H, KV = cfg.num_patches + 1, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads
    hd = D // H
    macs = cfg.num_patches * cfg.patch_size ** 2 * cfg.in_chans * D
    for hidden, E in zip(cfg.hidden_sizes(), cfg.experts_per_layer()):
        macs += T * D * (H + 2 * KV) * hd + 2 * H * T * T * hd + T * H * hd * D
        macs += T * D * E + T * D * (E + 1) * hidden + T * E * hidden + T * hidden * D
    return macs + D * cfg.num_classes


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
def test_count_params_macs_are_every_matmul_of_the_forward_pass(preset):
    """What `count-params` reports as "MACs per image" (its JSON `macs`), counted by hand."""
    from mmlit_cli import create_model
    from mmlit_cli.summary import count_macs

    model = create_model(preset, num_classes=100)
    assert count_macs(model) == forward_macs(model.cfg)


def test_macs_are_counted_on_shapes_alone_so_a_large_image_size_needs_no_memory():
    """`count-params --image-size 900` was "internal error: ... DefaultCPUAllocator: can't allocate
    memory: you tried to allocate 194404320024 bytes": the count ran a real forward pass."""
    from mmlit_cli import create_model
    from mmlit_cli.summary import count_macs

    model = create_model("xxs", num_classes=10)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    count_macs(model)
    assert seen == ["meta"] and model.training and next(model.parameters()).device.type == "cpu"
    large = create_model("xxs", num_classes=10, image_size=900)
    assert count_macs(large) == forward_macs(large.cfg)
    import torch

    assert count_macs(model.to(torch.bfloat16)) == forward_macs(model.cfg)  # the input in the model's dtype


@pytest.mark.parametrize("env", [{"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},  # an ASCII locale
                                 {"PYTHONIOENCODING": "cp1252"}])  # a Windows console's or file's encoding
def test_a_terminal_that_is_not_utf8_reads_the_presets_and_shows_what_it_can(env):
    """The presets were read in the locale's encoding (their first comment has an em dash), and
    a character the terminal's encoding lacks (count-params' '≈') was an internal error."""
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "count-params", "--preset", "xxs"], capture_output=True,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"MACs per image (inference): 131.3 M" in r.stdout and b"total" in r.stdout


def test_output_a_terminal_cannot_encode_is_shown_as_bytes_or_question_marks():
    from mmlit_cli import cli  # noqa: F401  (registers the handler)

    assert "a狗\udce9≈".encode("latin-1", errors="mmlit-output") == b"a?\xe9?"


def test_columns_zero_still_shows_the_error():
    """COLUMNS=0 (set by some wrappers and CI runners) made Rich print nothing, the error line
    included: exit 2 and no word why."""
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "eval", "/nothere.safetensors"], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "0"})
    assert (r.returncode, r.stderr) == (2, "error: checkpoint not found: /nothere.safetensors\n")


def test_count_params_table_shows_components_and_paper_figure():
    r = mmlit("count-params", "--preset", "xxs", "--num-classes", "100")
    assert r.returncode == 0
    for word in ("per-expert W1", "shared V", "shared W2", "router", "total", "paper", "MACs"):
        assert word in r.stdout


@pytest.mark.parametrize("args, compared", [([], True), (["--set", "model.drop_path=0.1"], True),
                                            (["--set", "model.depth=3"], False), (["--image-size", "24"], False),
                                            (["--num-classes", "10"], False)])
def test_count_params_compares_with_the_paper_only_the_architecture_it_published(args, compared):
    """The paper's 0.67 M is xxs at 100 classes: beside a deeper or shallower model, or another
    input size, its difference would read as our reconstruction's error."""
    base = ["--num-classes", "100"] if "--num-classes" not in args else []
    out = json.loads(mmlit("count-params", "--preset", "xxs", *base, *args, "--json", check=True).stdout)
    assert (out["paper_total"] == 670_000) == compared and (out["paper_total"] is None) != compared


def test_count_params_image_size_and_set():
    from mmlit_cli import create_model

    a = json.loads(mmlit("count-params", "--preset", "xxs", "--image-size", "24", "--json").stdout)
    b = json.loads(mmlit("count-params", "--preset", "xxs", "--set", "model.depth=3", "--json").stdout)
    assert a["image_size"] == 24 and a["components"]["position/class tokens"] == (8 * 8 + 1 + 1) * 108
    assert a["total"] == SPEC_TOTALS["xxs"] - (144 - 64) * 108  # 80 position embeddings fewer
    depth3 = create_model("xxs", overrides=["model.depth=3"])
    assert b["total"] == sum(p.numel() for p in depth3.parameters())  # torch's own count of that model
    assert sum(b["components"].values()) == b["total"]


@pytest.mark.parametrize("args,needle", [
    (["count-params", "--preset", "nope"], "unknown preset"),
    (["count-params", "--set", "model.dept=3"], "did you mean 'depth'"),
    (["count-params", "--set", "model.depth=x"], "expected an integer"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle):
    r = mmlit(*args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_has_examples():
    assert "Example" in mmlit("--help").stdout
    assert "Example" in mmlit("count-params", "--help").stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from helpers import train_tiny

    root = tmp_path_factory.mktemp("cli")
    folder, _ = train_tiny(root)
    return root, folder


def test_eval_and_predict_json_through_the_command_are_the_library_results(trained):
    """The commands print what the library computes (the figures themselves are checked in
    test_predict and test_journeys): every field, every value, JSON floats exact."""
    from mmlit_cli.evaluate import evaluate_checkpoint
    from mmlit_cli.predict import predict_paths

    root, folder = trained
    ckpt = str(root / "run" / "best.safetensors")
    ev = json.loads(mmlit("eval", ckpt, "--dataset", str(folder), "--json", check=True).stdout)
    lib = evaluate_checkpoint(ckpt, str(folder), "val", device="cpu").as_dict()
    assert ev.keys() == lib.keys() == {"top1", "top5", "loss", "balanced_accuracy", "macro_f1", "per_class",
                                       "precision", "recall", "images", "num_images", "images_per_s",
                                       "skipped", "warnings"}
    assert {k: v for k, v in ev.items() if k != "images_per_s"} == {k: v for k, v in lib.items() if k != "images_per_s"}
    assert list(ev["per_class"]) == ["blue", "green", "red"] and ev["num_images"] == 3 and ev["skipped"] == []
    r = mmlit("predict", ckpt, str(folder / "red"), "--json", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)
    assert preds == predict_paths(ckpt, [str(folder / "red")], top_k=2, device="cpu").predictions
    assert len(preds) == 12 and all(len(p["top"]) == 2 for p in preds)


def test_predict_csv_dash_writes_to_standard_output_and_no_file(trained, tmp_path):
    """`--csv -` is standard output (for a pipe), the rows `--csv FILE` writes; no file named -."""
    import csv as csv_module

    root, folder = trained
    ckpt = str(root / "run" / "best.safetensors")
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "predict", ckpt, str(folder / "red"), "--csv", "-",
                        "-k", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    to_file = subprocess.run([sys.executable, "-m", "mmlit_cli", "predict", ckpt, str(folder / "red"), "--csv",
                              "p.csv", "-k", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert to_file.returncode == 0, to_file.stderr
    rows = list(csv_module.reader(r.stdout.splitlines()))
    assert rows == list(csv_module.reader((tmp_path / "p.csv").read_text().splitlines()))
    assert rows[0] == ["path", "label", "prob", "label_2", "prob_2"] and len(rows) == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_eval_lists_a_class_with_no_images_in_the_split_last_as_having_none(trained, tmp_path):
    """A label file whose val rows leave a class out: that class has no accuracy, so the table
    says "no images" and puts it after the scored classes, not first as the worst at 0 %."""
    root, folder = trained
    rows = [f"{p},{p.parent.name},{'val' if p.parent.name != 'green' and p.stem.endswith('0') else 'train'}"
            for p in sorted(folder.rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    r = mmlit("eval", str(root / "run" / "best.safetensors"), "--dataset", str(tmp_path / "labels.csv"),
              "--out", str(tmp_path / "eval"))  # not runs/eval/ in the checkout
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("│")]
    names = [line.split("│")[1].strip() for line in table]
    assert sorted(names[:2]) == ["blue", "red"] and names[2] == "green"
    assert "no images" in table[2] and "%" not in table[2]


def test_predict_reports_bad_files_and_exits_nonzero(trained, tmp_path):
    root, folder = trained
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(folder / "green", mixed)
    (mixed / "readme.txt").write_text("not an image")
    good = next(mixed.glob("*.png")).read_bytes()
    (mixed / "cut.png").write_bytes(good[: len(good) // 3])
    r = mmlit("predict", str(root / "run" / "best.safetensors"), str(mixed), "--json")
    assert r.returncode == 1
    assert "readme.txt" in r.stderr and "cut.png" in r.stderr and "Traceback" not in r.stderr
    assert len(json.loads(r.stdout)) == 12


def test_export_into_a_folder_never_replaces_a_file_there(trained, tmp_path):
    root, _ = trained
    (tmp_path / "best.onnx").write_bytes(b"an earlier export")
    r = mmlit("export", str(root / "run" / "best.safetensors"), "--out", str(tmp_path))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "best.onnx").read_bytes() == b"an earlier export"


def test_a_bare_gpu_number_is_that_cuda_device(monkeypatch):
    """`--device 1` is `cuda:1` (Ultralytics' `device=1`); errors name what the user typed."""
    import torch

    from mmlit_cli.errors import MmlitError
    from mmlit_cli.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MmlitError, match=r"^--device 0: no CUDA GPU is available here"):
        resolve_device("0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("1") == torch.device("cuda", 1) and resolve_device("0") == torch.device("cuda", 0)
    with pytest.raises(MmlitError, match=r"^--device 2: only 2 CUDA device\(s\) present"):
        resolve_device("2")
    for name in ("-1", "\u00b2", "\u0663"):  # a sign; superscript two and Arabic-Indic three are digits to isdigit()
        with pytest.raises(MmlitError, match="unknown device"):
            resolve_device(name)


def test_a_single_process_on_cuda_n_makes_n_the_current_device(monkeypatch):
    """Streams, events and handles taken from "the current device" (the lagged loss's event, the
    pin-memory thread) must be cuda:N's when a run is given --device N, not cuda:0's."""
    import torch

    from mmlit_cli.runtime import setup_distributed

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed("1")[1] == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)]
    for name in ("cuda", "cpu"):
        setup_distributed(name)
    assert made_current == [torch.device("cuda", 1)]  # "cuda" stays the current device, whichever it is


@pytest.mark.parametrize("args, words", [
    (["finetune", "--bogus"], ["No such option: --bogus", "see 'python -m mmlit_cli finetune -h'"]),
    (["finetune", "--epochs", "abc"], ["Invalid value for '--epochs'", "finetune -h"]),
    (["frobnicate"], ["No such command 'frobnicate'", "see 'python -m mmlit_cli -h'"]),
    (["eval"], ["Missing argument", "eval -h"]),
])
def test_a_command_line_mistake_is_one_line_with_where_to_look(args, words):
    """An unknown option or command, a value of the wrong type, a missing argument: one line on
    stderr, as mmlit's own errors are (not Typer's six-line box), exit code 2."""
    r = mmlit(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_help_version_and_the_bare_command_still_print_to_stdout():
    """Usage errors are caught without swallowing what click handles by exiting: -h and
    --version exit 0, `mmlit` alone prints the help (exit 2, click's convention since 8.2)."""
    assert mmlit("-h").returncode == 0 and "finetune" in mmlit("-h").stdout
    version = mmlit("--version")
    assert version.returncode == 0 and version.stdout.startswith("mmlit ")
    bare = mmlit()
    assert bare.returncode in (0, 2) and "finetune" in bare.stdout and "error" not in bare.stderr


@pytest.mark.parametrize("world, said", [("2", "error: another process of this run stopped ("),
                                         ("1", "internal error: RuntimeError: ")])
def test_a_peer_process_that_died_is_said_as_such_not_as_an_internal_error(monkeypatch, capsys, world, said):
    """Under torchrun, the ranks left when one dies (killed, out of memory) fail in a collective
    with gloo's "Connection reset by peer": one line that says so and that the checkpoint stands."""
    import torch.distributed as dist

    from mmlit_cli import cli

    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:21421: Connection reset by peer"
    errors = [RuntimeError(gloo + "\nmore lines of gloo")]
    if hasattr(dist, "DistBackendError") and world == "2":
        errors.append(dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp, remote process exited"))
    for error in errors:
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(cli, "app", fail)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.count("\n") == 1 and err.startswith(said), err
        assert ("more lines" in err) == (world == "1")  # an internal error says all, in one line


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 in the environment, but no RANK or MASTER_ADDR or MASTER_PORT"),
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' in the environment: it must be an integer >= 1"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 in the environment, with 1 process(es)"),
    ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' in the environment: it must be an integer >= 1"),
])
def test_a_launch_environment_set_by_hand_is_checked(env, needle, tmp_path):
    """torchrun's variables set by hand were "internal error: KeyError: 'RANK'", a ZeroDivisionError,
    a traceback from the error handler itself, or a run that printed nothing (RANK=1 alone)."""
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", "finetune", "--preset", "xxs", "--epochs", "1", "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 2 and r.stderr.startswith(f"error: {needle}"), r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_the_one_process_commands_refuse_torchrun(tmp_path):
    """Under torchrun every rank did the whole eval (two folders), and two exports raced for
    one file (one rank failed, torchrun exit 1)."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for command in (["eval", "x.safetensors"], ["predict", "x.safetensors", "a.jpg"], ["export", "x.safetensors"],
                    ["benchmark", "x.safetensors"]):
        r = subprocess.run([sys.executable, "-m", "mmlit_cli", *command], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
        assert r.returncode == 2 and r.stderr == (f"error: mmlit {command[0]} runs in one process: launch it "
                                                  f"without torchrun (WORLD_SIZE is '2')\n"), r.stderr
