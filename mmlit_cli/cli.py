"""The `mmlit` command line. It parses arguments and prints; the work is done by library
functions that tests call directly."""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import MmlitError

app = typer.Typer(
    name="mmlit",
    help="Train, evaluate and ship ultra-light vision transformers (mLiT / mmLiT, arXiv 2407.17783).\n\n"
         "Example:  mmlit count-params --preset xxs",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

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
    """Parameters per component, the paper's figure beside ours, and MACs per image.

    Example:  mmlit count-params --preset s --num-classes 100 --json
    """
    from . import create_model
    from .config import load_config
    from .summary import PAPER_PARAMS, count_macs, parameter_breakdown

    cfg = load_config(preset, overrides)
    model = create_model(preset, num_classes=num_classes, image_size=image_size, overrides=overrides)
    breakdown = parameter_breakdown(model)
    macs = count_macs(model)
    paper = PAPER_PARAMS.get(cfg.name) if model.cfg.num_classes == 100 else None
    if as_json:
        print(json.dumps({"preset": cfg.name, "num_classes": model.cfg.num_classes,
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


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except MmlitError as e:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # a bug: still one line, with the way to see more
        if _state["debug"]:
            raise
        err_console.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
