"""The package surface: lazy exports, the version, the mode switch, the README's Python snippets."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dgc_convert
from dgc_convert import DGCConv2d, convert, create_model, dgc_layers, dgc_mode

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_trainer_module_does_not_shadow_the_train_function():
    code = (
        "from dgc_convert.training.trainer import TrainResult\n"
        "from dgc_convert import train\n"
        "import dgc_convert.training.trainer\n"
        "assert callable(train) and train is dgc_convert.train, train\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_lazy_name_resolves_and_type_checkers_see_it():
    source = (ROOT / "dgc_convert" / "__init__.py").read_text()
    tree = ast.parse(source)
    seen_by_type_checkers = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for statement in node.body
        if isinstance(statement, ast.ImportFrom)
        for alias in statement.names
    }
    assert seen_by_type_checkers == set(dgc_convert._LAZY)
    for name in dgc_convert.__all__:
        assert getattr(dgc_convert, name) is not None, name


def test_the_version_is_the_installed_distributions():
    from importlib.metadata import version

    assert dgc_convert.__version__ == version("dgc-convert")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{dgc_convert.__version__}"' in pyproject


def test_dgc_mode_sets_and_restores_every_layer_even_on_error():
    model = create_model("resnet18", num_classes=4)
    convert(model, zeta=0.5)
    layers = [layer for _, layer in dgc_layers(model)]
    layers[0].set_zeta_t(0.25)
    layers[1].inference_algorithm = "gather_conv"
    before = [(layer.inference_algorithm, layer.unit_scores, layer.zeta_t_value) for layer in layers]
    with pytest.raises(RuntimeError, match="boom"):
        with dgc_mode(model, algorithm="masked", unit_scores=True, zeta_t=0.0) as switched:
            assert switched == layers
            assert all(
                (layer.inference_algorithm, layer.unit_scores, layer.zeta_t_value) == ("masked", True, 0.0)
                for layer in layers
            )
            raise RuntimeError("boom")
    assert [(layer.inference_algorithm, layer.unit_scores, layer.zeta_t_value) for layer in layers] == before
    assert float(layers[0].zeta_t) == 0.25
    with pytest.raises(ValueError, match="algorithm must be 'auto' or one of"):
        with dgc_mode(model, algorithm="fastest"):
            pass
    assert [(layer.inference_algorithm, layer.unit_scores, layer.zeta_t_value) for layer in layers] == before


def test_inference_algorithm_is_checked_when_set():
    layer = DGCConv2d(16, 16, 3)
    with pytest.raises(ValueError, match="got None"):
        layer.inference_algorithm = None
    assert layer.inference_algorithm == "auto"


def test_docs_links_resolve_and_nothing_points_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "docs/method.md" in readme and (ROOT / "docs" / "method.md").is_file()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), target
    for path in [ROOT / "README.md", *(ROOT / "dgc_convert").rglob("*.py"), *(ROOT / "docs").glob("*.md")]:
        assert "shared/" not in path.read_text(), path


# The README's snippets, run as written except for these size and path changes.
_README_EDITS = {
    '"train.epochs=3"': '"train.epochs=1"',
    '"recipes/': f'"{ROOT}/recipes/',
    '"runs/digits-dgc/best"': '"runs/quick/best"',
    "input_size=224, repeats=10,": 'input_size=32, repeats=1, layers=False, engine="eager",',
}


def test_readme_python_snippets_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 5
    script = "\n".join(blocks)
    for old, new in _README_EDITS.items():
        script = script.replace(old, new)
    (tmp_path / "readme_snippets.py").write_text(script)
    # The authors' checkpoint the import snippet reads: their key layout, made up here.
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_import_authors import authors_state_dict, write_checkpoint
    finally:
        sys.path.pop(0)
    write_checkpoint(tmp_path / "imagenet_dyresnet18_h4.tar", authors_state_dict())
    done = subprocess.run(
        [sys.executable, "readme_snippets.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "quick" / "best").is_dir()
