"""The `mmlit` command line. It parses arguments and prints; the work is done by library
functions that tests call directly."""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .config import RESUME_MAY_CHANGE
from .errors import MmlitError, one_line
from .recipe import SAMPLE_EPOCHS

def _flags_show_no_type() -> None:
    """Typer's rich help prints a type after every option, `<bool>` after flags too, as if they
    took a value (typer 0.29; earlier versions left flags bare). A flag takes no value: show
    nothing there, as plain click help does."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "_mmlit_flags_bare", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag and not self.count else shown(self, ctx)

    display_type_rich._mmlit_flags_bare = True
    option.display_type_rich = display_type_rich


_flags_show_no_type()

# click's exceptions, or the copy of click that Typer >= 0.29 carries inside it
_click_errors = sys.modules[typer.BadParameter.__module__]
# click >= 8.2 shows `mmlit` alone's help through this error; older click prints it and exits
_NO_ARGS_HELP = getattr(_click_errors, "NoArgsIsHelpError", ())

app = typer.Typer(
    name="mmlit",
    help="Train, evaluate and ship ultra-light vision transformers (mLiT / mmLiT, arXiv 2407.17783).\n\n"
         "Example:  mmlit finetune --preset xxs   (offline, on the CIFAR-10 sample bundled with mmlit)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# COLUMNS=0 (a wrapper's, a CI runner's) made Rich print nothing at all, errors included
_WIDTH = 80 if os.environ.get("COLUMNS", "").strip().isdigit() and int(os.environ["COLUMNS"]) == 0 else None
console = Console(soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)
_state = {"debug": False, "stop_said": False, "pid": 0}  # stop_said: a command said why it stops at 130

PresetOpt = typer.Option("xs", "--preset", "-p", help="Preset name (xxs, xs, s) or path to a YAML file.")
SetOpt = typer.Option(None, "--set", help="Override a preset value, e.g. --set model.depth=4 (repeatable).")


def _version(value: bool) -> None:
    if value:
        console.print(f"mmlit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug or os.environ.get("MMLIT_DEBUG") == "1"


@app.command("count-params")
def count_params(
    preset: str = PresetOpt,
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classes of the head (default: the preset's)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size (default: the preset's)."),
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Parameters per component, the paper's figure beside ours (xxs and s at 100 classes), and MACs per image.

    Example:  mmlit count-params --preset s --num-classes 100 --json
    """
    from . import create_model
    from .config import load_config
    from .summary import count_macs, paper_params, parameter_breakdown

    cfg = load_config(preset, overrides)
    model = create_model(preset, num_classes=num_classes, image_size=image_size, overrides=overrides)
    breakdown = parameter_breakdown(model)
    macs = count_macs(model)
    paper = paper_params(cfg.name, model.cfg)
    if as_json:
        print(json_text({"preset": cfg.name, "num_classes": model.cfg.num_classes,
                         "image_size": model.cfg.image_size, "components": breakdown.components,
                         "total": breakdown.total, "paper_total": paper, "macs": macs}))
        return
    table = Table(title=f"mLiT-{cfg.name.upper()}: {model.cfg.num_classes} classes, "
                        f"{model.cfg.image_size}x{model.cfg.image_size} input")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for name, n in breakdown.components.items():
        table.add_row(name, f"{n:,}", f"{100 * n / breakdown.total:.1f} %")
    table.add_section()
    table.add_row("[bold]total[/bold]", f"[bold]{breakdown.total:,}[/bold]", "100 %")
    if paper:
        table.add_row("paper (arXiv 2407.17783)", f"≈{paper / 1e6:.2f} M",
                      f"{100 * (breakdown.total - paper) / paper:+.1f} %")
    console.print(table)
    console.print(f"MACs per image (inference): {macs / 1e6:.1f} M")


DatasetOpt = typer.Option(None, "--dataset", "-d",
                           help="cifar10, cifar100, svhn, flowers102, fashion-mnist, tiny-imagenet, sample, an image "
                                "folder, or a label file (.csv: path,label[,split]) (default: sample, the 1,000 CIFAR-10 images bundled with mmlit, for "
                                f"trying it out: {SAMPLE_EPOCHS['finetune']} fine-tuning or {SAMPLE_EPOCHS['pretrain']} "
                                f"pre-training epochs unless --epochs).")
CkptDatasetOpt = typer.Option(None, "--dataset", "-d", help="Dataset name (as for finetune), image folder or label "
                              "file "
                              "(default: the dataset the checkpoint was trained on).")
DataDirOpt = typer.Option(None, "--data-dir", help="Where named datasets live (default: $MMLIT_DATA or ./data).")
DeviceOpt = typer.Option("auto", "--device",
                         help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N (or N: --device 0) or mps.")


def _one_process(command: str) -> None:
    """eval, predict, export and benchmark run in one process: under torchrun each rank would
    do the whole job, printing it twice and writing over the other's files."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise MmlitError(f"mmlit {command} runs in one process: launch it without torchrun (WORLD_SIZE is "
                         f"{os.environ['WORLD_SIZE']!r})")


def _train_command(kind: str, **options) -> None:
    """`options`: the command's parameters by name, which are `run_training`'s keywords."""
    from .report import RunInterrupted, SecondInterrupt
    from .train import resolved_config, run_training

    if options.pop("print_config"):
        keep = ("preset", "dataset", "data_dir", "overrides", "validation", "device", "resume", "epochs",
                "batch_size", "lr", "seed", "workers", "recipe", "loader", "patience", "class_balance", "init", "out")
        print(resolved_config(kind, **{k: options.get(k) for k in keep}), end="")
        return

    try:
        result = run_training(kind, console=console, **options)
    except SecondInterrupt:  # a second Ctrl-C, before the first one's save was done
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # from here, Ctrl-C ends the process (no traceback)
        err_console.print("interrupted again: stopped at once, without saving; the run's last.safetensors holds it "
                          "as it was last saved (--resume continues from there)", highlight=False, soft_wrap=True)
        _state["stop_said"] = True
        raise typer.Exit(130) from None
    except RunInterrupted as stop:  # saved: 130 after Ctrl-C, 143 after SIGTERM (128 + the signal, as
        # shells do). One more Ctrl-C while Python shuts down ends the process at once, where Python's
        # own handler would print a traceback from a finalizer.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _state["stop_said"] = True
        if stop.result["stopped"] != "interrupt" and stop.result.get("main_process", True):
            _said_done(stop.result)  # the signal came as the run ended: its curves are what it cost
        raise typer.Exit(128 + stop.signal) from None
    except KeyboardInterrupt:  # Ctrl-C before the training loop took it over: reading data, building
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        err_console.print("interrupted before training started: nothing was saved (a run being continued keeps its "
                          "last.safetensors as it was)", highlight=False, soft_wrap=True)
        _state["stop_said"] = True
        raise typer.Exit(130) from None
    if result.get("main_process", True):  # under torchrun, rank 0 reports what it wrote
        _said_done(result)


def _said_done(result: dict) -> None:
    """A run's last lines: the files it wrote, and its curves (or why there are none)."""
    out_dir = result["out_dir"]
    if result.get("best_saved", True):
        console.print(escape(f"done: {out_dir}/last.safetensors, {out_dir}/best.safetensors, {out_dir}/metrics.jsonl"),
                      highlight=False)
    else:
        console.print(escape(f"done: {out_dir}/last.safetensors, {out_dir}/metrics.jsonl (no best.safetensors: the "
                             f"validation split is the test split)"), highlight=False)
    if result.get("curves"):
        console.print(escape(f"curves: {result['curves']}"), highlight=False)
    elif result.get("curves_note"):
        console.print(escape(f"note: no curves.png ({result['curves_note']})"), highlight=False)


# Options shared by `finetune` and `pretrain` (each recipe shortcut overrides that command's section).
TrainPresetOpt = typer.Option(None, "--preset", "-p", help="Preset name (xxs, xs, s) or YAML path (default: xs).")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<command>/<preset>, numbered).")
EpochsOpt = typer.Option(None, "--epochs", help="Override the recipe's epochs.")
BatchOpt = typer.Option(None, "--batch-size", "-b", help="Override the recipe's batch_size (per process; "
                        "default: the preset's, raised on a CUDA GPU towards 512 as far as an epoch keeps 32 steps; a "
                        "short fine-tuning run with --recipe auto: images x epochs / 1,500, at least 64, so it takes "
                        "more steps).")


def _lr_option(default: str) -> Any:
    return typer.Option(None, "--lr", help=f"Peak learning rate, used as given at any batch size and length "
                        f"(default: {default}; the run's first lines, and --print-config, show it with its factors).")


def _recipe_option(fitted: str) -> Any:
    return typer.Option(None, "--recipe", help=f"auto (default): {fitted} fitted to the run's length (README, "
                        "\"Training\"); paper: the preset's recipe as written. --print-config shows what either gives.")


# Pre-training fits less than fine-tuning (its optimiser rules were measured for fine-tuning only).
LrOpt = _lr_option("lr_base x global batch / 256, times up to 2 for a short run with --recipe auto")
PretrainLrOpt = _lr_option("lr_base x global batch / 256")
RecipeOpt = _recipe_option("batch, lr, warm-up, schedule, clipping and regularisation")
PretrainRecipeOpt = _recipe_option("warm-up (the preset's share of the run) and regularisation")


SeedOpt = typer.Option(None, "--seed", help="Override the recipe's seed.")
WorkersOpt = typer.Option(None, "--workers", "-j", help="Data-loading processes (with --loader workers; default: "
                          "the preset's, as many as the machine has up to 8 on a CUDA GPU).")
LoaderOpt = typer.Option(None, "--loader", help="Where batches come from: auto (default: device on a CPU, and on "
                         "a CUDA GPU when the split takes under 25% of its free memory; workers elsewhere), device (the decoded split on the training device, shuffled and augmented "
                         "there in batches; no workers) or workers (a DataLoader augmenting image by image).")
ResumeOpt = typer.Option(None, "--resume", help="Continue the run in this directory from last.safetensors. It "
                         f"keeps its recorded config: only {RESUME_MAY_CHANGE} may change.")
ClassesByPositionOpt = typer.Option(
    False, "--classes-by-position",
    help="Score a relabelled dataset whose class names differ from the checkpoint's, taking its classes in order "
         "(without it, differing names are an error; the same names in another order are matched).")
CompileOpt = typer.Option(False, "--compile", help="torch.compile the model.")
TrainCompileOpt = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (default: on a CUDA "
                               "GPU for runs of 3,200 steps or more, which repay its compilation; off elsewhere).")
CompileModeOpt = typer.Option(None, "--compile-mode", help="torch.compile mode: default, reduce-overhead or "
                              "max-autotune (CUDA graphs; implies --compile).")
SaveEveryOpt = typer.Option(200, "--save-every", help="Also checkpoint every N steps within an epoch (0 = off).")
DownloadOpt = typer.Option(False, "--download", help="Download a named dataset if it is missing.")
PatienceOpt = typer.Option(None, "--patience", help="Stop early when the validation figure (top-1; MAE: loss) "
                           "has not improved for N epochs; best.safetensors stays the best epoch (default: 0, never).")
PrintConfigOpt = typer.Option(False, "--print-config", help="Print the config the run would use, its recipe fitted "
                              "to the run, as YAML, and exit: nothing is read or written (the training images are "
                              "counted; an --init file and what --out holds are checked, as the run checks them).")
ValOpt = typer.Option(None, "--val", help="Where validation and best.safetensors come from: auto (default: the "
                      "dataset's validation split, else a stratified data.val_fraction held out of train; the test "
                      "split is never looked at) or test (the paper protocol: train on all of train, validate on the "
                      "test split each epoch, keep no best.safetensors). A resumed run keeps its own.")


@app.command()
def finetune(
    preset: Optional[str] = TrainPresetOpt, dataset: Optional[str] = DatasetOpt, data_dir: Optional[str] = DataDirOpt,
    out: Optional[str] = OutOpt, overrides: Optional[List[str]] = SetOpt, epochs: Optional[int] = EpochsOpt,
    batch_size: Optional[int] = BatchOpt, lr: Optional[float] = LrOpt, recipe: Optional[str] = RecipeOpt,
    seed: Optional[int] = SeedOpt, device: str = DeviceOpt, workers: Optional[int] = WorkersOpt,
    loader: Optional[str] = LoaderOpt,
    init: Optional[str] = typer.Option(None, "--init", help="Start from a checkpoint's weights (MAE encoder or classifier)."),
    resume: Optional[str] = ResumeOpt, compile: Optional[bool] = TrainCompileOpt, compile_mode: Optional[str] = CompileModeOpt,
    save_every: int = SaveEveryOpt, download: bool = DownloadOpt, validation: Optional[str] = ValOpt,
    patience: Optional[int] = PatienceOpt, print_config: bool = PrintConfigOpt,
    class_balance: Optional[str] = typer.Option(
        None, "--class-balance", help="none (default), loss (the loss reweighted by the training split's class "
        "frequencies: logit adjustment) or sampler (class-balanced batches, drawn with replacement)."),
) -> None:
    """Supervised training, from scratch or from a checkpoint (--init). The head gets the dataset's classes.

    Example:  mmlit finetune --preset xxs   (the bundled sample, within two minutes on a CPU)
              mmlit finetune --preset xxs --dataset ./my-images --epochs 30 --out runs/mine
    """
    _train_command("finetune", **locals())


@app.command()
def pretrain(
    preset: Optional[str] = TrainPresetOpt, dataset: Optional[str] = DatasetOpt, data_dir: Optional[str] = DataDirOpt,
    out: Optional[str] = OutOpt, overrides: Optional[List[str]] = SetOpt, epochs: Optional[int] = EpochsOpt,
    batch_size: Optional[int] = BatchOpt, lr: Optional[float] = PretrainLrOpt,
    recipe: Optional[str] = PretrainRecipeOpt,
    seed: Optional[int] = SeedOpt, device: str = DeviceOpt, workers: Optional[int] = WorkersOpt,
    loader: Optional[str] = LoaderOpt,
    resume: Optional[str] = ResumeOpt, compile: Optional[bool] = TrainCompileOpt, compile_mode: Optional[str] = CompileModeOpt,
    save_every: int = SaveEveryOpt, download: bool = DownloadOpt, validation: Optional[str] = ValOpt,
    patience: Optional[int] = PatienceOpt, print_config: bool = PrintConfigOpt,
) -> None:
    """MAE pre-training (mmLiT). Labels are not needed: a folder of images works.

    Example:  mmlit pretrain --preset xs   (the bundled sample)
              mmlit pretrain --preset xs --dataset ./images --epochs 100
    """
    _train_command("pretrain", **locals())


@app.command("eval")
def eval_(
    checkpoint: str = typer.Argument(..., help="A .safetensors checkpoint written by mmlit."),
    dataset: Optional[str] = CkptDatasetOpt,
    data_dir: Optional[str] = DataDirOpt,
    split: str = typer.Option("val", "--split", help="val or test (or train; all: every image of a folder of "
                              "class folders or of a label file, nothing held out)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass: memory and speed "
                                   "only (the figures are the same to float rounding)."),
    device: str = DeviceOpt,
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Where confusion.png (and, with TensorBoard installed, its event file) goes (default: runs/eval/<name>, numbered)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (writes confusion.png only with --out)."),
    compile: bool = CompileOpt,
    compile_mode: Optional[str] = CompileModeOpt,
    classes_by_position: bool = ClassesByPositionOpt,
) -> None:
    """Top-1, top-5, loss, per-class accuracy, confusion matrix and expert usage of a checkpoint.

    Example:  mmlit eval runs/finetune/xxs/best.safetensors   (the dataset it was trained on)
              mmlit eval runs/finetune/xxs/best.safetensors --dataset cifar100 --split test
    """
    _one_process("eval")
    from .evaluate import evaluate_checkpoint, write_eval_files
    from .files import claim_run_dir, removed_if_left_empty

    # where the figures go: made (and a bad --out said) before the evaluation, not after it
    out_dir, made, lock = claim_run_dir(out, "eval", Path(checkpoint).parent.name or "eval") \
        if out is not None or not as_json else (None, (), None)
    with removed_if_left_empty(made, lock):
        report = evaluate_checkpoint(checkpoint, dataset, split, data_dir, batch_size, device, compile=compile,
                                     compile_mode=compile_mode, classes_by_position=classes_by_position)
        if report.dataset_note:
            (err_console if as_json else console).print(escape(report.dataset_note), highlight=False, soft_wrap=True)
        for line in report.warnings:
            _warn(line)
        confusion_path = None
        if out_dir is not None:
            confusion_path, note = write_eval_files(report, out_dir)
            if note:
                err_console.print(escape(f"note: {note}"), highlight=False)
    if as_json:
        print(json_text(report.as_dict()))
        return
    _print_eval(report)
    if confusion_path is not None:
        console.print(escape(f"confusion matrix: {confusion_path}"), highlight=False)


def _print_eval(report) -> None:
    """eval's tables: per-class accuracy (worst first), expert usage, the summary line."""
    r = report.result
    console.print(escape(report.source), highlight=False)
    # a class with no images in the split has no accuracy: listed last, not as the worst
    per_class = sorted(zip(report.classes, r.per_class_accuracy(), r.per_class_images()),
                       key=lambda t: (t[1] is None, t[1] or 0.0))
    table = Table(title="per-class accuracy (worst first)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    table.add_column("images", justify="right")
    gap = ("...", "", "")  # a long list shows its 15 worst and 5 best
    shown = per_class if len(per_class) <= 30 else per_class[:15] + [gap] + per_class[-5:]
    for name, acc, n in shown:
        shown_acc = acc if isinstance(acc, str) else "no images" if acc is None else f"{acc:.1f} %"
        table.add_row(escape(name), shown_acc, str(n))
    console.print(table)
    usage = Table(title="expert usage per layer (share of routed tokens)")
    usage.add_column("layer", justify="right")
    usage.add_column("experts")
    for i, shares in enumerate(r.expert_usage):
        usage.add_row(str(i), "  ".join(f"{100 * x:4.1f}%" for x in shares))
    console.print(usage)
    console.print(f"[bold]top-1 {r.top1:.2f}%[/bold]  top-5 {r.top5:.2f}%  loss {r.loss:.4f}  "
                  f"({r.num_images} images, {report.images_per_s:,.0f} img/s)", highlight=False)
    sizes = [n for n in r.confusion.sum(1).tolist() if n]
    if sizes and max(sizes) != min(sizes):  # on a balanced split, balanced accuracy is top-1
        console.print(f"balanced accuracy {r.balanced_accuracy:.2f}%  macro-F1 {r.macro_f1:.2f}%  (the classes have "
                      f"{min(sizes):,} to {max(sizes):,} images: every class counts the same)", highlight=False)


@app.command()
def predict(
    checkpoint: str = typer.Argument(..., help="A classifier checkpoint (.safetensors) or an ONNX file written "
                                     "by mmlit export (.onnx, run with onnxruntime)."),
    paths: Optional[List[str]] = typer.Argument(None, help="Image files, folders (recursive) or glob patterns "
                                                "(default: one test image per class of the bundled sample)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="How many labels per image."),
    as_json: bool = typer.Option(False, "--json", help='Print a JSON list of {"path", "top": [{"label", "prob"}]}.'),
    csv_path: Optional[str] = typer.Option(None, "--csv", help="Write the predictions to this CSV file "
                                           "('-': standard output)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass: memory and speed "
                                   "only (the probabilities are the same to float rounding; an int8 .onnx file "
                                   "quantises each batch's activations, so an image's can move slightly with "
                                   "its batch-mates)."),
    device: str = DeviceOpt,
    compile: bool = CompileOpt,
    compile_mode: Optional[str] = CompileModeOpt,
) -> None:
    """Top-k labels for images, preprocessed exactly as in training; unreadable files are reported and skipped.

    The exit code is 1 if any file failed.

    Example:  mmlit predict runs/finetune/xxs/best.safetensors photos/ --top-k 3
              mmlit predict xxs.int8.onnx photos/ --json
    """
    _one_process("predict")
    from .predict import check_csv_target, csv_rows, predict_paths, sample_images, write_csv

    shown_from = None  # the table shows the sample's files relative to its folder, named once above it
    if not paths:
        paths = sample_images()
        shown_from = Path(paths[0]).parent.parent
        err_console.print(escape(f"no images given: predicting one test image per class of the bundled sample, "
                                 f"in {shown_from}"), highlight=False, soft_wrap=True)
    if as_json and csv_path:
        raise MmlitError("use --json or --csv, not both")
    if csv_path is not None and not csv_path.strip():
        raise MmlitError("--csv is empty: name a file, or - for standard output")
    csv_path = csv_path and os.path.expanduser(csv_path)  # `--csv=~/p.csv`: the shell leaves that ~ to us
    if csv_path and csv_path != "-":
        check_csv_target(csv_path)
    if csv_path == "-" and sys.stdout is None:  # `>&-`: said before predicting, not an internal error after
        raise MmlitError("--csv -: standard output is closed")
    result = predict_paths(checkpoint, paths, top_k=top_k, batch_size=batch_size, device=device,
                           compile=compile, compile_mode=compile_mode)
    for path, reason in result.failures:
        err_console.print(f"[red]failed[/red] {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)
    if result.repeated:  # a row per file, not per name: say so, or rows zipped with the arguments slip
        err_console.print(f"note: {result.repeated} name(s) of a file already named (a path given twice, or in a "
                          f"folder or pattern given too): each file is predicted once, where first named",
                          highlight=False, soft_wrap=True)
    if as_json:
        print(json_text(result.predictions))
    elif csv_path == "-":  # a pipe's: `mmlit predict ... --csv - | ...`
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(csv_rows(result))
        # UTF-8 as the --csv file is, whatever the terminal's encoding (a name's bytes that are not
        # UTF-8 as they are on disk); not through the output's '?' for what it cannot show
        out = getattr(sys.stdout, "buffer", None)
        if out is None:  # a stream without bytes (a test's capture)
            sys.stdout.write(text.getvalue())
        else:
            sys.stdout.flush()
            out.write(text.getvalue().encode("utf-8", "surrogateescape"))
            out.flush()
    elif csv_path:
        write_csv(result, csv_path)
        console.print(escape(f"{len(result.predictions)} predictions written to {csv_path}"), highlight=False)
    else:
        table = Table(title=f"{len(result.predictions)} images, {result.images_per_s:,.0f} img/s")
        table.add_column("file", overflow="fold")
        table.add_column(f"top-{result.top_k}")
        for p in result.predictions:
            shown = os.path.relpath(p["path"], shown_from) if shown_from else p["path"]
            table.add_row(escape(shown), escape("  ".join(f"{t['label']} {100 * t['prob']:.1f}%" for t in p["top"])))
        console.print(table)
    if result.failures:
        raise typer.Exit(1)


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="A classifier checkpoint (.safetensors)."),
    format: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output .onnx file, or folder (one that exists, or ends in /) (default: the checkpoint "
                                      "path with .onnx, or .int8.onnx with --int8). Never overwritten."),
    int8: bool = typer.Option(False, "--int8", help="int8 weights (ONNX Runtime dynamic quantization; the MoE "
                              "router stays float); checked against PyTorch on top-1 and router agreement."),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", help="With --int8: static int8 calibrated on this "
                                            "dataset's train split, checked on its held-out split (dynamic if "
                                            "static fails the check)."),
    data_dir: Optional[str] = DataDirOpt,
    classes_by_position: bool = ClassesByPositionOpt,
) -> None:
    """Export a classifier to ONNX, checked against PyTorch with onnxruntime. Needs: pip install "mmlit\\[onnx]".

    The file takes any batch size and holds the class names and preprocessing in its metadata.

    Example:  mmlit export runs/finetune/xxs/best.safetensors --int8 --calibrate ./my-images
    """
    _one_process("export")
    from .export import check_int8_options, export_onnx, output_path

    if format != "onnx":
        raise MmlitError(f"unknown export format '{format}': only onnx is supported")
    check_int8_options(int8, calibrate)  # before the output's name: that default depends on --int8
    target = output_path(checkpoint, out, int8)
    if target.exists():
        raise MmlitError(f"{target} already exists: choose another --out")
    result = export_onnx(checkpoint, out, int8=int8, calibrate=calibrate, data_dir=data_dir, replace=False,
                         classes_by_position=classes_by_position)
    size = result.path.stat().st_size
    console.print(f"wrote {escape(str(result.path))} ({result.quantization}, {size / 1e6:.2f} MB; opset "
                  f"{result.opset}; input: {result.input_format})", highlight=False)
    if result.note:
        console.print(f"note: {escape(result.note)}", highlight=False)
    for warning in result.warnings:
        _warn(warning)
    fid = result.fidelity
    if fid is not None:
        acc = (f"; top-1 {fid.top1_onnx:.2f} % vs PyTorch {fid.top1_torch:.2f} %" if fid.labelled else "")
        console.print(f"checked with {result.checked_with} on {fid.images} {escape(fid.source)}: top-1 agrees with "
                      f"PyTorch on {100 * fid.agreement:.2f} %{acc}; router agreement (same top-k experts per "
                      f"token) {100 * fid.router_agreement:.2f} %", highlight=False)
    elif result.max_abs_diff is not None:
        console.print(f"checked with {result.checked_with}: max |onnx - torch| = {result.max_abs_diff:.2e}",
                      highlight=False)
    else:
        console.print("not checked: onnxruntime is not installed", highlight=False)


def _undecodable_bytes_or_question_mark(err: UnicodeError) -> tuple[str | bytes, int]:
    """An output error handler: a file name's bytes that were not UTF-8 (lone surrogates) go out
    as those bytes, as `ls` prints them; anything else the terminal's encoding cannot show is
    a '?'. So a class named 狗 in a Latin-1 terminal, or a `≈` written to a cp1252 file, is
    not an internal error after the work is done."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    c = err.object[err.start]  # one character at a time: the encoder calls again for the rest
    return (bytes([ord(c) - 0xDC00]) if 0xDC80 <= ord(c) <= 0xDCFF else "?"), err.start + 1


codecs.register_error("mmlit-output", _undecodable_bytes_or_question_mark)


def _tolerant_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure"):  # (a test's capture may not be a TextIOWrapper)
            stream.reconfigure(errors="mmlit-output")


class Terminated(BaseException):
    """SIGTERM outside a training loop (which saves and stops on its own, `report.StopRequest`):
    raised, not left to kill the process, so that what the command was writing is cleaned up
    (`files.atomic_write`'s temporary file, a temporary folder, a run folder it made)."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM (or a forked worker's) ends the process at once
    if os.getpid() != _state["pid"]:  # a forked worker (decoding, a loader): it ends as it always did
        os.kill(os.getpid(), signum)
        return
    raise Terminated


def json_text(value: Any) -> str:
    """`--json`'s one object, strict JSON for any parser: a figure that is not finite (the loss
    of a model that overflows) is null, where json.dumps writes NaN, which JSON has not."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(finite(value), allow_nan=False)


def _warn(message: str | None) -> None:
    """A warning on stderr (so that --json output stays one object); nothing for None or ""."""
    if message:
        err_console.print(f"[yellow]warning[/yellow]: {escape(message)}", highlight=False, soft_wrap=True)


def _fmt(value, spec: str, unit: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{unit}"


@app.command()
def benchmark(
    checkpoint: str = typer.Argument(..., help="A classifier checkpoint (.safetensors)."),
    dataset: Optional[str] = CkptDatasetOpt,
    data_dir: Optional[str] = DataDirOpt,
    split: str = typer.Option("val", "--split", help="Split to measure top-1 on: val or test (or train; all: "
                              "every image of a folder or label file)."),
    threads: int = typer.Option(1, "--threads", help="Intra-op threads for every format (default 1: lowest "
                                "batch-1 latency on a small CPU)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Batch for the images/s column."),
    calls: int = typer.Option(300, "--calls", help="Timed batch-1 calls per format (latency = their median)."),
    limit: int = typer.Option(2000, "--limit", help="Images of the split to measure on (a seeded sample)."),
    formats: str = typer.Option("all", "--formats", help="Formats to measure, comma-separated: all, or some of "
                                "pytorch-eager, pytorch-compiled, onnx-fp32, onnx-int8-dynamic, onnx-int8-static."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    classes_by_position: bool = ClassesByPositionOpt,
) -> None:
    """Size, top-1, batch-1 latency and images/s of every format mmlit ships, measured on this machine.

    Formats: PyTorch eager and compiled, ONNX fp32, ONNX int8 dynamic and static, in one process;
    also each one's agreement with PyTorch eager (top-1 and, for ONNX, the router's experts).

    Example:  mmlit benchmark runs/finetune/xxs/best.safetensors --dataset ./my-images --split val
    """
    _one_process("benchmark")
    from .deploy_benchmark import run_benchmark
    from .runtime import cpu_label

    progress = None if as_json else (lambda msg: err_console.print(f"[dim]{escape(msg)}...[/dim]", highlight=False))
    report = run_benchmark(checkpoint, dataset, split, data_dir, threads, batch_size, calls, limit, progress,
                           classes_by_position=classes_by_position, formats=formats)
    for warning in report.warnings:
        _warn(warning)
    if as_json:
        print(json_text(report.as_dict()))
        return
    m = report.machine
    table = Table(title=f"{escape(report.source)}: {report.images} images, {report.threads} thread(s)")
    heads = ["format", "MB", "top-1 %", "agrees %", "router %", "batch-1 ms", "p10-p90 ms", f"img/s b{report.batch_size}"]
    missing = [r for r in report.rows if not r.available]
    for col in heads + (["why not measured"] if missing else []):
        table.add_column(col, justify="left" if col in ("format", "why not measured") else "right")
    for r in report.rows:
        if not r.available:
            table.add_row(r.label, *["-"] * (len(heads) - 1), f"[yellow]{escape(r.note or 'unavailable')}[/yellow]")
            continue
        spread = f"{r.latency_p10_ms:.2f}-{r.latency_p90_ms:.2f}" if r.latency_p10_ms is not None else ""
        table.add_row(r.label, f"{r.size_bytes / 1e6:.2f}", _fmt(r.top1, ".2f"), _fmt(r.agreement, ".2f"),
                      _fmt(r.router_agreement, ".2f"), _fmt(r.latency_ms, ".2f"), spread, _fmt(r.images_per_s, ",.0f"),
                      *([""] if missing else []))
    (console if console.is_terminal else Console(width=160)).print(table)  # a pipe or file: no wrapping
    ratios = [f"{k.replace('onnx-', '')}: {v:.2f}x" for k, v in report.as_dict()["ratios"].items() if v is not None]
    if ratios:
        console.print("latency ratios  " + "  ".join(ratios), highlight=False)
    console.print(f"latency: median of {report.calls} batch-1 calls; agrees/router: same top-1 / same top-k "
                  f"experts per token as PyTorch eager; MB: weights as safetensors for PyTorch, the file for ONNX",
                  highlight=False)
    console.print(f"machine: {cpu_label(m['cpu'], m.get('cpu_id'))}, {m['logical_cores']} logical cores; torch {m['torch']}, onnxruntime "
                  f"{m['onnxruntime'] or 'not installed'}", highlight=False)


@app.command()
def plot(run_dir: str = typer.Argument(..., help="A run directory holding metrics.jsonl.")) -> None:
    """Draw curves.png (loss and accuracy per epoch) for a run. Needs matplotlib.

    Example:  mmlit plot runs/finetune/xxs
    """
    from .plots import plot_curves

    path = plot_curves(run_dir)
    if path is None:
        raise MmlitError(f"{run_dir} has no metrics.jsonl with a finished epoch yet")
    console.print(escape(f"curves: {path}"), highlight=False)


def _usage_error_line(e: Exception) -> str:
    """A mistake on the command line (an unknown option, a value of the wrong type, a missing
    argument) in one line, as mmlit's own errors are, with where to find the options: Typer's
    box around the usage line would be six."""
    ctx = getattr(e, "ctx", None)
    where = f"; see '{ctx.command_path} -h'" if ctx is not None else ""
    return f"{e.format_message().rstrip('.')}{where}"


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    _state["stop_said"], _state["pid"] = False, os.getpid()
    _tolerant_output()
    previous_sigterm = None
    # not under torchrun: its agent's SIGTERM must end a worker that waits in a collective (C code,
    # where a Python handler would not run), as before; the training loop still saves on it
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        with contextlib.suppress(ValueError):  # main() called off the main thread: signals are not ours
            previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _run_app()
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _run_app() -> None:
    try:
        # standalone_mode=False: click hands usage errors to us instead of printing its box
        code = app(standalone_mode=False)
    except _NO_ARGS_HELP as e:  # `mmlit` alone (click >= 8.2 raises this to show the help)
        if e.format_message().strip():  # Typer's rich help has been printed already
            e.show()
        sys.exit(e.exit_code)
    except _click_errors.ClickException as e:
        err_console.print(f"[red]error:[/red] {escape(_usage_error_line(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        err_console.print("interrupted")
        sys.exit(130)
    except (MmlitError, OSError) as e:  # OSError: disk full, permissions... still the user's to fix
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Terminated:
        err_console.print("terminated")
        sys.exit(128 + signal.SIGTERM)
    except Exception as e:  # a bug: still one line, with the way to see more
        if _state["debug"]:
            raise
        from .runtime import compile_failure, is_compile_failure, peer_failure

        lost = peer_failure(e)
        if lost is not None:  # this rank's side of another one dying: the run's checkpoint stands
            err_console.print(f"[red]error:[/red] another process of this run stopped ({escape(lost)}); its last "
                              "checkpoint stands: torchrun --max-restarts continues from it, as does the same "
                              "command again", highlight=False, soft_wrap=True)
            sys.exit(1)
        if is_compile_failure(e):  # on a machine that cannot compile (a training run's first step goes on eagerly)
            err_console.print(f"[red]error:[/red] torch.compile failed ({escape(compile_failure(e))}); run without "
                              "it: drop --compile (eval, predict) or pass --no-compile (finetune, pretrain)",
                              highlight=False, soft_wrap=True)
            sys.exit(2)
        err_console.print(f"[red]internal error:[/red] {escape(one_line(e, limit=500))} "
                          "(rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(1)
    # a command's typer.Exit(code) (and -h, --version: 0) comes back as the code; so does Ctrl-C
    # anywhere else (Typer turns KeyboardInterrupt into Exit(130) before it reaches us)
    if code == 130 and not _state["stop_said"]:
        err_console.print("interrupted")
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
