"""The package's layering (docs/ARCHITECTURE.md): a module imports only from its own layer or
the layers below it, and evaluating or using a checkpoint never loads the training engine.

The imports are read from the source (every `import`, module-level or inside a function, also
under `if TYPE_CHECKING:`), so a lazy import cannot hide an upward dependency. A module that
is in no layer fails the test: a new module is placed in the table, and in ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmlit_cli"

# Bottom to top, as in docs/ARCHITECTURE.md. `data` stands for the whole data/ package.
LAYERS = [
    ["errors", "files", "config"],
    ["model", "mae", "runtime", "onnx_classifier", "data"],
    ["checkpoint", "metrics", "summary"],
    ["evaluate", "plots", "events"],
    ["predict", "export", "export_forms", "quantize", "deploy_benchmark", "api"],
    ["recipe", "optim", "train_state", "run_record", "report", "tasks"],
    ["engine"],
    ["train"],
    ["cli", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
TRAINING = {"optim", "train_state", "run_record", "report", "tasks", "engine", "train", "recipe"}


def room(module: str) -> str:
    """`mmlit_cli.data.decode` -> "data"; `mmlit_cli.engine` -> "engine"; the package -> ""."""
    parts = module.split(".")[1:]
    return parts[0] if parts else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every mmlit_cli module `path` imports, with relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import engine`
    return {m for m in found if m.split(".")[0] == "mmlit_cli"}


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "presets" not in p.parts)


def test_every_module_is_in_a_layer():
    rooms = {room(module_name(p)) for p in package_modules()} - {""}
    assert rooms <= set(LAYER), f"place {sorted(rooms - set(LAYER))} in LAYERS and in docs/ARCHITECTURE.md"


def test_no_module_imports_upward():
    upward = []
    for path in package_modules():
        own = room(module_name(path))
        for target in imported_modules(path):
            other = room(target)  # `from . import __version__` gives "__version__": in no layer, skipped
            if other in LAYER and own in LAYER and LAYER[other] > LAYER[own]:
                upward.append(f"{module_name(path)} imports {target}")
    assert not upward, "\n".join(upward)


def test_using_a_checkpoint_never_loads_the_trainer():
    """In a fresh interpreter, importing evaluation, predict, export and the Python API (and
    running nothing) leaves every training module unloaded."""
    code = ("import json, sys; import mmlit_cli.evaluate, mmlit_cli.predict, mmlit_cli.export, "
            "mmlit_cli.quantize, mmlit_cli.deploy_benchmark, mmlit_cli.api; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mmlit_cli'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = {room(m) for m in json.loads(r.stdout)}
    assert {"evaluate", "predict", "export", "runtime", "api"} <= loaded
    assert not loaded & TRAINING, sorted(loaded & TRAINING)


def test_importing_the_package_loads_nothing_until_the_api_is_used():
    """`import mmlit_cli` stays cheap (torch is not imported); `mmlit_cli.load_model` and the
    rest of the Python API load on first use."""
    code = ("import sys, mmlit_cli; before = 'torch' in sys.modules; f = mmlit_cli.load_model; "
            "print(before, 'torch' in sys.modules, f.__module__, sorted(mmlit_cli.__all__))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split(" ", 3) == ["False", "True", "mmlit_cli.api",
                                      "['__version__', 'create_mae', 'create_model', 'list_models', 'load_model', 'predict_paths', "
                                      "'preprocess']\n"]


def test_the_checkpoint_commands_never_load_the_trainer(tmp_path):
    """As a user runs them, each in a fresh process: `eval`, `predict` and `export` on a
    trained checkpoint end with no training module loaded (a command that borrowed a helper
    from `train` would load the whole engine; `eval` did). `benchmark` is left out for time (it
    compiles a model): its command imports `deploy_benchmark` and `runtime` only, which the
    tests above keep clear of training."""
    from helpers import train_tiny

    data, run = train_tiny(tmp_path)
    ckpt = str(run / "best.safetensors")
    commands = {"evaluate": ["eval", ckpt, "--dataset", str(data), "--out", str(tmp_path / "eval")],
                "predict": ["predict", ckpt, str(data / "red")],
                "export": ["export", ckpt, "--out", str(tmp_path / "model.onnx")]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    for name, argv in commands.items():
        modules = tmp_path / f"{name}.json"
        code = ("import atexit, json, sys; out = sys.argv[1]; atexit.register(lambda: open(out, 'w').write("
                "json.dumps(sorted(m for m in sys.modules if m.startswith('mmlit_cli'))))); "
                "sys.argv = ['mmlit', *sys.argv[2:]]; from mmlit_cli.cli import main; main()")
        r = subprocess.run([sys.executable, "-c", code, str(modules), *argv], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        loaded = {room(m) for m in json.loads(modules.read_text())}
        assert name in loaded  # the command's own module (the key), loaded as it ran
        # cli's help texts read `recipe`'s numbers (it imports only config: no torch, no engine)
        assert not loaded & (TRAINING - {"recipe"}), (name, sorted(loaded & TRAINING))
