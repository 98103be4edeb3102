"""The CLI starts without the heavy libraries: ``--help`` (of the app and of every command) and
``--version`` import no torch, torchvision or timm, and ``recipe validate`` imports nothing of
torch's compiler or FSDP that the model library it asks does not import itself.

Each case runs in a fresh interpreter (the test process has torch loaded long since). Not timed:
``benchmarks/cli_startup.py`` measures the seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from dgc_convert.cli import app

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "timm")
# torch's compiler stack and FSDP: what `recipe validate` has no use for.
COMPILER_AND_FSDP = ("torch._dynamo", "torch._inductor", "torch.distributed.fsdp")

# Runs the CLI in-process with the given argv, then prints, as the last line, its exit code and the
# imported modules under the prefixes asked for (a module counts when it is a prefix or below one).
_RUN_CLI = """
import json, sys
args, prefixes = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2]))
sys.argv = ["dgc-convert", *args]
from dgc_convert.cli import main
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code
hits = sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in prefixes))
print(json.dumps({"code": code, "modules": hits}))
"""

# The same report for importing one module (the baseline a CLI run is compared with).
_IMPORT = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
prefixes = tuple(json.loads(sys.argv[2]))
print(json.dumps({"modules": sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in prefixes))}))
"""


def _python(script: str, *args: str) -> tuple[dict, str]:
    """Run ``script`` in a fresh interpreter on this source tree; (its last line as JSON, all of stdout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def _cli(args: list[str], prefixes: tuple[str, ...]) -> tuple[dict, str]:
    return _python(_RUN_CLI, json.dumps(args), json.dumps(prefixes))


def _command_paths() -> list[list[str]]:
    """Every command and subcommand of the app, as the argv that names it (``[]``: the app itself)."""
    paths: list[list[str]] = [[]]

    def walk(group: object, prefix: list[str]) -> None:
        for name, command in getattr(group, "commands", {}).items():
            paths.append([*prefix, name])
            walk(command, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_the_app_has_the_commands_this_file_checks():
    # Guards the enumeration below: an empty walk would check nothing.
    names = {" ".join(path) for path in _command_paths()}
    assert {"convert", "train", "bench", "recipe", "recipe validate", "recipe show", "export"} <= names


@pytest.mark.parametrize("path", _command_paths(), ids=lambda path: " ".join(path) or "dgc-convert")
def test_help_imports_no_torch(path):
    report, out = _cli([*path, "--help"], HEAVY)
    assert report["code"] == 0 and "Usage:" in out, out
    roots = sorted({m.split(".")[0] for m in report["modules"]})
    assert roots == [], f"`dgc-convert {' '.join([*path, '--help'])}` imported {roots}"


def test_version_imports_no_torch():
    report, out = _cli(["--version"], HEAVY)
    assert report["code"] == 0 and out.startswith("dgc-convert "), out
    assert sorted({m.split(".")[0] for m in report["modules"]}) == []


def test_recipe_validate_imports_no_compiler_or_fsdp_of_its_own():
    """``recipe validate`` resolves the model's name with the model library (torchvision for
    digits.yaml's resnet18); whatever of torch's compiler stack and FSDP it imports, that library
    imports by itself (torchvision 0.29 does: torchvision.ops imports torch._dynamo), never our code."""
    report, out = _cli(["recipe", "validate", "recipes/digits.yaml"], COMPILER_AND_FSDP)
    assert report["code"] == 0 and "recipes/digits.yaml: OK (resnet18 from torchvision" in out, out
    library, _ = _python(_IMPORT, "torchvision", json.dumps(COMPILER_AND_FSDP))
    ours = sorted(set(report["modules"]) - set(library["modules"]))
    assert ours == [], f"recipe validate imported {ours} beyond what torchvision imports"


def test_recipe_validate_imports_none_of_the_torch_modules_of_ours():
    """Of our own modules, validate loads the schema and the name resolver: none of those that
    build, convert, train, measure or serve a model (each imports torch, most much more)."""
    report, _ = _cli(["recipe", "validate", "recipes/digits.yaml"], ("dgc_convert",))
    builders = {
        "dgc_convert.nn.layer",
        "dgc_convert.conversion.build",
        "dgc_convert.conversion.surgery",
        "dgc_convert.conversion.dense_weights",
        "dgc_convert.measuring.conversion_summary",
        "dgc_convert.measuring.bench",
        "dgc_convert.serving.prepare",
        "dgc_convert.training.data",
        "dgc_convert.training.trainer",
    }
    assert "dgc_convert.conversion.zoo" in report["modules"]  # it did resolve the name
    assert sorted(builders & set(report["modules"])) == []
