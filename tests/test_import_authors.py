"""Importing the authors' released DGC checkpoints (hellozhuo/dgc): `import_authors_checkpoint`
and `dgc-convert import-authors`.

No download: each test writes a checkpoint with the authors' key layout and
shapes for ResNet-18 (random values, 10 classes), as their training script
saves it ({"state_dict": {"module." + key: tensor}, ...}), and checks the
import against their layer's formulas, computed here from their tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from typer.testing import CliRunner

from dgc_convert import DGCConv2d, LoadError, SettingsError, dgc_layers, dgc_mode, load
from dgc_convert.cli import app
from dgc_convert.conversion.authors import import_authors_checkpoint, read_authors_state_dict

runner = CliRunner()

HEADS, SQUEEZE, ZETA, CLASSES = 4, 16, 0.55, 10
PLANES = (64, 128, 256, 512)
BLOCKS = 2  # ResNet-18
DGC_LAYERS = 4 * BLOCKS * 2 + 3  # conv1/conv2 of every block and three downsamples


def _hidden(channels: int) -> int:
    """Their HeadConv: squeeze_rate halved below 80 channels, C // squeeze_rate units."""
    return channels // (SQUEEZE // 2 if channels < 80 else SQUEEZE)


def _blocks():
    """(block name, in channels, planes, stride, has downsample) for their ResNet-18."""
    c_in = 64
    for stage, planes in enumerate(PLANES, 1):
        for index in range(BLOCKS):
            stride = 2 if stage > 1 and index == 0 else 1
            yield f"layer{stage}.{index}", c_in, planes, stride, stride != 1 or c_in != planes
            c_in = planes


def authors_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """Their ResNet-18's state_dict keys and shapes (no ``module.``), random values."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def batch_norm(prefix: str, channels: int) -> None:
        state[f"{prefix}.weight"] = 1 + 0.1 * randn(channels)
        state[f"{prefix}.bias"] = 0.1 * randn(channels)
        state[f"{prefix}.running_mean"] = 0.1 * randn(channels)
        state[f"{prefix}.running_var"] = 0.5 + torch.rand(channels, generator=gen)
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)

    def dynamic_conv(prefix: str, c_in: int, c_out: int, kernel: int) -> None:
        state[f"{prefix}._inactive_channels"] = torch.tensor([float(round(c_in * ZETA))])
        batch_norm(f"{prefix}.norm", c_in)
        hidden = _hidden(c_in)
        for i in range(HEADS):
            head = f"{prefix}.headconv_{i}"
            state[f"{head}.conv.weight"] = randn(c_out // HEADS, c_in, kernel, kernel, scale=(c_in * kernel**2) ** -0.5)
            state[f"{head}.fc1.weight"] = randn(hidden, c_in, scale=0.5 * c_in**-0.5)
            state[f"{head}.fc2.weight"] = randn(c_in, hidden, scale=0.5 * hidden**-0.5)
            state[f"{head}.fc2.bias"] = 1 + 0.2 * randn(c_in)

    state["conv1.weight"] = randn(64, 3, 7, 7, scale=(2 / 147) ** 0.5)
    batch_norm("bn1", 64)
    for block, c_in, planes, _, downsample in _blocks():
        dynamic_conv(f"{block}.conv1", c_in, planes, 3)
        batch_norm(f"{block}.bn1", planes)
        dynamic_conv(f"{block}.conv2", planes, planes, 3)
        batch_norm(f"{block}.bn2", planes)
        if downsample:
            dynamic_conv(f"{block}.downsample.0", c_in, planes, 1)
            batch_norm(f"{block}.downsample.1.norm", planes)
    state["fc.weight"] = randn(CLASSES, 512, scale=512**-0.5)
    state["fc.bias"] = 0.1 * randn(CLASSES)
    return state


def write_checkpoint(path: Path, state: dict[str, Tensor]) -> Path:
    """As their main.py saves it: DataParallel names under 'state_dict', plus training bookkeeping."""
    torch.save({"epoch": 119, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 68.78}, path)
    return path


# -- their forward, written from layers.py and models/dynamic_resnet.py -------


def _bn(x: Tensor, s: dict[str, Tensor], prefix: str) -> Tensor:
    return F.batch_norm(
        x, s[f"{prefix}.running_mean"], s[f"{prefix}.running_var"], s[f"{prefix}.weight"], s[f"{prefix}.bias"]
    )


def authors_dynamic_conv(x: Tensor, s: dict[str, Tensor], prefix: str, stride: int, padding: int) -> Tensor:
    """DynamicMultiHeadConv.forward in eval mode."""
    x = F.relu(_bn(x, s, f"{prefix}.norm"))
    b, c = x.shape[:2]
    pooled = x.mean(dim=(2, 3))
    inactive = int(s[f"{prefix}._inactive_channels"][0])
    masked, weights = [], []
    for i in range(HEADS):
        head = f"{prefix}.headconv_{i}"
        y = F.relu(
            F.linear(F.relu(F.linear(pooled, s[f"{head}.fc1.weight"])), s[f"{head}.fc2.weight"], s[f"{head}.fc2.bias"])
        )
        if inactive > 0:  # drop every channel at or below the inactive-th smallest score
            cut = y.topk(inactive, dim=1, largest=False, sorted=False).values.max(dim=1, keepdim=True).values
            y = torch.where(y <= cut, torch.zeros_like(y), y)
        masked.append(x * y.view(b, c, 1, 1))
        weights.append(s[f"{head}.conv.weight"])
    out = F.conv2d(torch.cat(masked, 1), torch.cat(weights, 0), None, stride, padding, 1, HEADS)
    b, c, h, w = out.shape
    return out.view(b, HEADS, c // HEADS, h, w).transpose(1, 2).reshape(b, c, h, w)


def authors_resnet18(s: dict[str, Tensor], x: Tensor) -> Tensor:
    x = F.max_pool2d(F.relu(_bn(F.conv2d(x, s["conv1.weight"], None, 2, 3), s, "bn1")), 3, 2, 1)
    for block, _, _, stride, downsample in _blocks():
        out = F.relu(_bn(authors_dynamic_conv(x, s, f"{block}.conv1", stride, 1), s, f"{block}.bn1"))
        out = _bn(authors_dynamic_conv(out, s, f"{block}.conv2", 1, 1), s, f"{block}.bn2")
        if downsample:
            x = _bn(authors_dynamic_conv(x, s, f"{block}.downsample.0", stride, 0), s, f"{block}.downsample.1.norm")
        x = F.relu(out + x)
    return F.linear(x.mean(dim=(2, 3)), s["fc.weight"], s["fc.bias"])


@pytest.fixture(scope="module")
def state() -> dict[str, Tensor]:
    return authors_state_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, state: dict[str, Tensor]) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("authors") / "imagenet_dyresnet18_h4.pth.tar", state)


@pytest.fixture(scope="module")
def imported(checkpoint: Path):
    return import_authors_checkpoint(checkpoint, heads=HEADS, zeta=ZETA, squeeze_ratio=SQUEEZE)


# -- the mapping ---------------------------------------------------------------


def test_reading_strips_module_and_takes_the_state_dict(checkpoint: Path, state: dict[str, Tensor]):
    read = read_authors_state_dict(checkpoint)
    assert read.keys() == state.keys()
    assert torch.equal(read["layer1.0.conv1.headconv_0.conv.weight"], state["layer1.0.conv1.headconv_0.conv.weight"])


def test_every_tensor_lands_where_it_should(imported, state: dict[str, Tensor]):
    model, report = imported
    layers = dict(dgc_layers(model))
    assert len(layers) == DGC_LAYERS == len(report.layers)
    assert report.num_classes == CLASSES and report.heads == HEADS and report.tensors == len(state)
    assert report.off_target == []
    for name, layer in layers.items():
        assert layer.interleaved and layer.preact and layer.squeeze_rule == "authors" and layer.gating == "head"
        assert layer.heads == HEADS and layer.zeta == ZETA
        c = layer.in_channels
        n = layer.out_channels // HEADS
        for i in range(HEADS):
            head = f"{name}.headconv_{i}"
            for j in range(n):
                assert torch.equal(layer.weight[j * HEADS + i], state[f"{head}.conv.weight"][j])
            assert torch.equal(layer.saliency_generator.reduce[i], state[f"{head}.fc1.weight"])
            assert torch.equal(layer.saliency_generator.expand[i], state[f"{head}.fc2.weight"])
            assert torch.equal(layer.saliency_generator.beta[i], state[f"{head}.fc2.bias"])
        assert layer.norm is not None
        for key, value in layer.norm.state_dict().items():
            assert torch.equal(value, state[f"{name}.norm.{key}"])
        inactive = round(c * ZETA)
        assert layer.zeta_t.dtype == torch.float64 and float(layer.zeta_t) == inactive / c
        assert layer.kept_channels == c - inactive
    ours = model.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer3.1.bn2.weight", "fc.weight", "fc.bias"):
        assert torch.equal(ours[key], state[key])
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(ours[f"layer2.0.downsample.1.{key}"], state[f"layer2.0.downsample.1.norm.{key}"])
    assert not model.training


def test_eval_output_equals_the_authors_forward(imported, state: dict[str, Tensor]):
    model, _ = imported
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    expected = authors_resnet18(theirs, x)
    double = model.double()
    try:
        for algorithm in ("masked", "gather_conv"):
            with dgc_mode(double, algorithm=algorithm), torch.no_grad():
                got = double(x)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        # And one layer's output on its own, head interleave included.
        layer = double.get_submodule("layer2.0.downsample.0")
        assert isinstance(layer, DGCConv2d)
        inner = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(
                layer(inner), authors_dynamic_conv(inner, theirs, "layer2.0.downsample.0", 2, 0), rtol=1e-9, atol=1e-9
            )
    finally:
        model.float()
    # float32 on the default eval path (the compiled op where it runs).
    with torch.no_grad():
        got32 = model(x.float())
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)


def test_heads_can_be_read_from_the_file(checkpoint: Path):
    _, report = import_authors_checkpoint(checkpoint, heads=None)
    assert report.heads == HEADS


# -- the command -----------------------------------------------------------------


def test_cli_writes_a_file_that_loads_back_equal(imported, checkpoint: Path, tmp_path: Path):
    out = tmp_path / "dgc_resnet18.safetensors"
    result = runner.invoke(
        app,
        ["import-authors", str(checkpoint), "--model", "resnet18", "--heads", "4", "--zeta", "0.55", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert f"{DGC_LAYERS} DGC layers (heads 4, squeeze ratio 16, zeta 0.55" in result.stdout
    assert "zeta_t 0.5469-0.5508" in result.stdout and f"saved to {out}" in result.stdout
    assert not list(tmp_path.glob(".*tmp"))  # written under a temporary name, then renamed
    model, _ = imported
    loaded = load(out)
    ours, back = model.state_dict(), loaded.state_dict()
    assert ours.keys() == back.keys()
    for key, value in ours.items():
        assert torch.equal(back[key], value), key
    for name, layer in dgc_layers(loaded):
        assert layer.interleaved and layer.preact and layer.squeeze_rule == "authors", name
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # Like any saved model of ours: the eval command reads it.
    recipe = tmp_path / "data.yaml"
    recipe.write_text("model: resnet18\ndata: {dataset: synthetic, synthetic_size: 4}\n")
    evaluated = runner.invoke(app, ["eval", str(out), "--data", str(recipe), "--batch-size", "4", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["samples"] == 4


def test_cli_json(checkpoint: Path, tmp_path: Path):
    result = runner.invoke(app, ["import-authors", str(checkpoint), "--out", str(tmp_path / "m.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "resnet18" and len(data["layers"]) == DGC_LAYERS and data["off_target"] == []
    assert data["layers"][0] == {
        "name": "layer1.0.conv1",
        "in_channels": 64,
        "out_channels": 64,
        "heads": 4,
        "hidden": 8,
        "inactive": 35,
        "zeta_t": 35 / 64,
        "kept": 29,
    }


# -- errors: one line, exit 2 ------------------------------------------------------


class NotWeights:
    """A pickled object weights-only loading refuses."""


def _fails(args: list[str]) -> str:
    result = runner.invoke(app, ["import-authors", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:"), result.stderr
    return result.stderr


def test_a_pickled_object_is_refused(tmp_path: Path):
    path = tmp_path / "object.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "args": NotWeights()}, path)
    message = _fails([str(path), "--out", str(tmp_path / "m.safetensors")])
    assert str(path) in message and "NotWeights" in message and "weights-only" in message
    with pytest.raises(LoadError, match="refuses"):
        read_authors_state_dict(path)
    assert not (tmp_path / "m.safetensors").exists()


def test_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "garbage.pth.tar"
    path.write_text("not a checkpoint")
    assert str(path) in _fails([str(path), "--out", str(tmp_path / "m.safetensors")])
    assert "no such file" in _fails([str(tmp_path / "missing.tar"), "--out", str(tmp_path / "m.safetensors")])
    # Text the weights-only unpickler chokes on in other ways (IndexError, KeyError, ...).
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    assert "not a readable PyTorch checkpoint" in _fails([str(passwd), "--out", str(tmp_path / "m.safetensors")])


def test_a_plain_torchvision_checkpoint_is_not_an_authors_one(tmp_path: Path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    assert "no headconv_* tensors" in _fails([str(path), "--out", str(tmp_path / "m.safetensors")])


def _variant(tmp_path: Path, state: dict[str, Tensor], change) -> Path:
    changed = dict(state)
    change(changed)
    return write_checkpoint(tmp_path / "variant.pth.tar", changed)


def test_a_missing_tensor_is_named(tmp_path: Path, state: dict[str, Tensor]):
    path = _variant(tmp_path, state, lambda s: s.pop("layer3.1.conv2.headconv_2.fc1.weight"))
    message = _fails([str(path), "--out", str(tmp_path / "m.safetensors")])
    assert "1 tensors resnet18 needs are not in the checkpoint: layer3.1.conv2.headconv_2.fc1.weight" in message


def test_an_unexpected_tensor_is_named(tmp_path: Path, state: dict[str, Tensor]):
    def add(s: dict[str, Tensor]) -> None:
        s["layer1.0.conv1.extra"] = torch.zeros(3)
        s["layer1.0.conv3.weight"] = torch.zeros(3)

    message = _fails([str(_variant(tmp_path, state, add)), "--out", str(tmp_path / "m.safetensors")])
    assert "2 checkpoint tensors map to nothing in resnet18: layer1.0.conv1.extra, layer1.0.conv3.weight" in message


def test_a_wrong_shape_names_the_key_and_both_shapes(tmp_path: Path, state: dict[str, Tensor]):
    def shrink(s: dict[str, Tensor]) -> None:
        s["layer4.0.conv1.headconv_1.conv.weight"] = torch.zeros(128, 256, 3, 1)

    message = _fails([str(_variant(tmp_path, state, shrink)), "--out", str(tmp_path / "m.safetensors")])
    assert (
        "layer4.0.conv1.headconv_1.conv.weight has shape (128, 256, 3, 1), the model needs (128, 256, 3, 3)" in message
    )
    # A squeeze ratio that does not fit shows in the generators' shapes.
    message = _fails(
        [
            str(_variant(tmp_path, state, lambda s: None)),
            "--squeeze-ratio",
            "8",
            "--out",
            str(tmp_path / "m.safetensors"),
        ]
    )
    assert "fc1.weight has shape (8, 64), the model needs (16, 64)" in message and "--squeeze-ratio 8" in message


def test_heads_must_agree_with_the_file(checkpoint: Path, tmp_path: Path):
    message = _fails([str(checkpoint), "--heads", "2", "--out", str(tmp_path / "m.safetensors")])
    assert "layer layer1.0.conv1 has 4 heads (headconv_0..headconv_3), --heads is 2" in message


def test_unknown_model(checkpoint: Path, tmp_path: Path):
    message = _fails([str(checkpoint), "--model", "resnet50", "--out", str(tmp_path / "m.safetensors")])
    assert "'resnet50'" in message and "resnet18, resnet34" in message
    with pytest.raises(SettingsError):
        import_authors_checkpoint(checkpoint, model="vgg16")


def test_a_bad_inactive_count(tmp_path: Path, state: dict[str, Tensor]):
    def bad(s: dict[str, Tensor]) -> None:
        s["layer1.1.conv2._inactive_channels"] = torch.tensor([64.0])

    with pytest.raises(
        LoadError, match=r"layer1.1.conv2._inactive_channels = 64 is not a whole number of channels in \[0, 64\)"
    ):
        import_authors_checkpoint(_variant(tmp_path, state, bad))
