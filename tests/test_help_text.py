"""`--help` output (issue 12, bug 9): markup in help text is not eaten, and flags are shown
as flags, without a value type."""

import os
import re
import subprocess
import sys

import pytest


def help_text(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    r = subprocess.run([sys.executable, "-m", "mmlit_cli", *args, "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def option_line(text: str, option: str) -> str:
    """The row of the options panel that starts with `option`."""
    lines = [line for line in text.splitlines() if re.match(rf"[│|]?\s*{re.escape(option)}\s", line)]
    assert lines, f"{option} not in the help:\n{text}"
    return lines[0]


def test_the_export_extra_is_named_in_the_help():
    assert 'pip install "mmlit[onnx]"' in help_text()
    assert 'pip install "mmlit[onnx]"' in " ".join(help_text("export").split())


@pytest.mark.parametrize("command,flags,valued", [
    ((), ["--debug", "--version", "--help"], []),
    (("finetune",), ["--compile", "--download", "--help"], [("--epochs", "<int>"), ("--dataset", "<str>")]),
    (("eval",), ["--json", "--compile"], [("--split", "<str>")]),
])
def test_flags_take_no_value_and_options_show_their_type(command, flags, valued):
    text = help_text(*command)
    assert "<bool>" not in text
    for flag in flags:
        assert "<" not in option_line(text, flag), option_line(text, flag)
    for option, shown in valued:
        assert shown in option_line(text, option)


def test_pretrain_help_does_not_claim_the_fine_tuning_rules():
    """Pre-training gets no short-run lr factor, batch rule, schedule or clipping fitting
    (its `--print-config` shows lr_base x batch/256 alone): its help must not say otherwise."""
    pretrain, finetune = (" ".join(help_text(c).replace("│", " ").split()) for c in ("pretrain", "finetune"))
    assert "times up to 2" in finetune and "times up to 2" not in pretrain
    assert "schedule, clipping" in finetune and "schedule" not in pretrain


def test_each_command_is_one_line_of_the_command_list():
    """Typer keeps a docstring's line breaks in `mmlit --help`'s command list: a first paragraph
    written over two lines broke mid-sentence there ("Unreadable files are / reported")."""
    from mmlit_cli.cli import app
    import typer.main

    names = list(typer.main.get_command(app).commands)
    text = help_text()
    panel = text[text.index("Commands"):].splitlines()[1:]
    rows = [line for line in panel if line.startswith("│")]
    assert [row.split()[1] for row in rows] == names, text  # no row that continues the one above
