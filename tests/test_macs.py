"""MAC counting: torch's operator counter for dense layers, the method's formula for DGC layers."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
import timm
import torchvision
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from torch import nn
from torch.nn import functional as F

from dgc_convert import DGCConv2d, convert, count_macs, create_model, set_zeta
from dgc_convert.conversion.shapes import normalize_input_size
from dgc_convert.measuring.macs import dgc_layer_macs


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dense_conv_and_linear_macs_match_torchvision_ops(name):
    model = create_model(f"torchvision:{name}")
    report = count_macs(model, 224)
    macs = report.macs_of(nn.Conv2d, nn.Linear, model=model)
    expected = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"] * 1e9
    assert abs(macs - expected) / expected < 0.01


def _published_macs(name: str) -> float:
    return torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"] * 1e9


# Models whose only non-product cost is small: their totals (norms and pools included) sit within 1% of torchvision's
# published figure, which counts products only. swin_t runs its attention as functional matmuls.
@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1", "convnext_tiny", "swin_t"])
def test_dense_totals_match_torchvision_published_ops(name):
    model = create_model(f"torchvision:{name}")
    total = count_macs(model, 224).total_macs
    expected = _published_macs(name)
    assert abs(total - expected) / expected < 0.01


# BatchNorm-heavy models: the norms add 3-10% (4 per element, as thop counts them), so the products alone are
# compared: the total less what the norm and average-pool layers count.
@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "regnet_y_400mf"])
def test_dense_products_match_torchvision_published_ops(name):
    model = create_model(f"torchvision:{name}")
    report = count_macs(model, 224)
    not_products = report.macs_of(nn.BatchNorm2d, nn.LayerNorm, nn.AvgPool2d, nn.AdaptiveAvgPool2d, model=model)
    assert 0 < not_products < 0.15 * report.total_macs
    expected = _published_macs(name)
    assert abs(report.total_macs - not_products - expected) / expected < 0.01


def test_products_are_counted_in_conv_subclasses_and_functional_attention():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = timm.layers.StdConv2d(3, 32, 4, stride=4, padding=0)  # a Conv2d subclass with its own forward
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            tokens = self.conv(x).flatten(2).transpose(1, 2)  # (1, 16, 32)
            attended, _ = self.mha(tokens, tokens, tokens, need_weights=False)
            heads = tokens.view(1, 16, 4, 8).transpose(1, 2)
            return attended, F.scaled_dot_product_attention(heads, heads, heads)

    report = count_macs(Tokens(), 16)
    length, width = 16, 32
    conv = width * length * 3 * 4 * 4
    mha = 4 * length * width * width + 2 * length * length * width  # q, k, v and out projections; q k^T and a v
    sdpa = 2 * length * length * width
    assert report.by_name()["conv"].macs == conv
    assert report.total_macs == conv + mha + sdpa


def test_batchnorm_and_pooling_count_as_thop_counts_them():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    rows = {row.name: row.macs for row in count_macs(model, 10).layers}
    assert rows == {
        "0": 8 * 10 * 10 * 3 * 9,
        "1": 4 * 8 * 10 * 10,  # 2 per element, doubled for the affine part
        "2": 2 * 8 * 10 * 10,
        "3": 0,
        "4": 8 * 10 * 10 + 8 * 5 * 5,  # one add per pooled input, one divide per output
        "5": 8 * 5 * 5 + 8,
        "6": 0,
        "7": 8 * 5,
    }
    assert count_macs(model, 10).total_macs == sum(rows.values())


def test_dgc_layer_follows_the_method_formula():
    layer = DGCConv2d(64, 128, 3, padding=1, heads=4, squeeze_ratio=16, zeta=0.5)
    model = nn.Sequential(nn.Conv2d(3, 64, 1), layer)
    report = count_macs(model, (3, 14, 10))
    row = report.by_name()["1"]
    hidden = 4  # max(64 // 16, 4)
    expected = 4 * (2 * 64 * hidden + 9 * 32 * (128 // 4) * 14 * 10)
    assert row.macs == expected == dgc_layer_macs(layer, 14, 10)
    assert row.kind == "DGCConv2d"


def test_network_gated_macs_are_the_same_formula_marked_expected():
    def model(**settings):
        return nn.Sequential(nn.Conv2d(3, 64, 1), DGCConv2d(64, 128, 3, padding=1, zeta=0.5, **settings))

    head = count_macs(model(), (3, 14, 10))
    network = count_macs(model(gating="network"), (3, 14, 10))
    assert not head.expected and head.to_dict()["expected"] is False
    assert network.expected and network.to_dict()["expected"] is True
    assert network.total_macs == head.total_macs  # the figure is the same: k at the target, an expectation
    assert not count_macs(nn.Sequential(nn.Conv2d(3, 8, 3)), 8).expected


def test_a_preact_layers_own_batchnorm_is_not_counted():
    plain = nn.Sequential(nn.Conv2d(3, 64, 1), DGCConv2d(64, 128, 3, padding=1, zeta=0.5))
    preact = nn.Sequential(nn.Conv2d(3, 64, 1), DGCConv2d(64, 128, 3, padding=1, zeta=0.5, preact=True))
    assert count_macs(preact, (3, 14, 10)).total_macs == count_macs(plain, (3, 14, 10)).total_macs


def test_macs_follow_zeta_t_and_saving_is_close_to_zeta():
    model = create_model("torchvision:resnet18")
    dense = count_macs(model, 224).total_macs
    convert(model, heads=4, zeta=0.55)
    sparse = count_macs(model, 224).total_macs
    # The authors count 0.89 GMACs for ResNet-18-DGC (keep 45%) against 1.82 dense.
    assert 0.85e9 < sparse < 1.0e9
    set_zeta(model, 0.0)
    at_zero = count_macs(model, 224).total_macs
    assert at_zero > dense  # zeta 0 costs the dense convs plus the saliency generators
    assert count_macs(model, 224).total_params == sum(p.numel() for p in model.parameters())


def test_count_macs_restores_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    model.train()
    count_macs(model, 16)
    assert model.training


@pytest.mark.parametrize("value, expected", [(32, (3, 32, 32)), ((20, 30), (3, 20, 30)), ((1, 8, 9), (1, 8, 9))])
def test_normalize_input_size(value, expected):
    assert normalize_input_size(value) == expected


def test_normalize_input_size_refuses_nonsense():
    with pytest.raises(ValueError, match="input_size"):
        normalize_input_size((0, 4))


# --- licences of the runtime dependencies -----------------------------------------------------------

_PERMISSIVE = re.compile(
    r"^(MIT(-CMU|-0)?|BSD(-[0-9]-Clause)?|0BSD|Apache([- ]2\.0)?|Apache Software License|PSF(-2\.0)?|Python-2\.0|ISC( License)?"
    r"|HPND|MPL-2\.0|Zlib|CC0-1\.0|BSL-1\.0|Unlicense|LLVM-exception)$",
    re.IGNORECASE,
)
_PERMISSIVE_CLASSIFIERS = (
    "MIT License",
    "BSD License",
    "Apache Software License",
    "ISC License (ISCL)",
    "Python Software Foundation License",
    "Historical Permission Notice and Disclaimer (HPND)",
    "Mozilla Public License 2.0 (MPL 2.0)",
    "zlib/libpng License",
)
# NVIDIA's CUDA libraries that the Linux torch wheels pull in: redistributable under NVIDIA's licence, neither
# copyleft nor OSI-permissive. Allowed by name pattern only when their metadata says exactly that.
_NVIDIA_PROPRIETARY = re.compile(
    r"^(LicenseRef-NVIDIA-Proprietary|NVIDIA Proprietary Software|Other/Proprietary License)$"
)


def _runtime_distributions() -> dict[str, importlib.metadata.Distribution]:
    """Every installed distribution dgc-convert needs at run time, recursively; extras only where a requirement
    names them (as torch's cuda-toolkit[...]), never dgc-convert's own."""
    found: dict[str, importlib.metadata.Distribution] = {}
    missing: list[str] = []
    stack = [("dgc-convert", frozenset())]
    seen = set()
    while stack:
        name, extras = stack.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            key = canonicalize_name(requirement.name)
            try:
                found[key] = importlib.metadata.distribution(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(f"{requirement.name} (required by {name})")
                continue
            stack.append((requirement.name, frozenset(requirement.extras)))
    assert not missing, f"runtime dependencies not installed: {missing}"
    return found


def _licence(distribution: importlib.metadata.Distribution) -> tuple[str, str]:
    """(verdict, what the metadata says): License-Expression first (PEP 639), then a short License field, then
    the License classifiers; 'metapackage' for a distribution that installs nothing but its own metadata."""
    meta = distribution.metadata
    expression = (meta.get("License-Expression") or "").strip()
    field = (meta.get("License") or "").strip()
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if expression or (field and "\n" not in field and len(field) < 100):
        stated = expression or field
        terms = [t for t in re.split(r"\s+(?:AND|OR|WITH|and|or)\s+|[()]", stated) if t.strip()]
        if any(re.search(r"GPL|General Public", t, re.IGNORECASE) for t in terms):
            return "copyleft", stated
        if _NVIDIA_PROPRIETARY.match(stated):
            return "nvidia-proprietary", stated
        if all(_PERMISSIVE.match(t.strip()) for t in terms):
            return "permissive", stated
        if expression or not classifiers:
            return "unknown", stated
        # A License field that names no licence ("Dual License", python-dateutil's): the classifiers say which.
    if classifiers:
        stated = "classifier: " + "; ".join(classifiers)
        if any("GPL" in c for c in classifiers):
            return "copyleft", stated
        if all(c in _PERMISSIVE_CLASSIFIERS for c in classifiers):
            return "permissive", stated
        if all(_NVIDIA_PROPRIETARY.match(c) for c in classifiers):
            return "nvidia-proprietary", stated
        return "unknown", stated
    own = {str(path).split("/")[0] for path in distribution.files or []}
    if own and all(part.endswith(".dist-info") for part in own):
        return "metapackage", "no licence stated; installs no files besides its metadata"
    return "unknown", "no licence stated"


def test_runtime_dependencies_are_permissively_licensed():
    try:
        importlib.metadata.distribution("dgc-convert")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dgc-convert is not installed (pip install -e .), so its requirements cannot be read")
    verdicts = {name: _licence(dist) for name, dist in _runtime_distributions().items()}
    refused = {
        name: stated
        for name, (verdict, stated) in verdicts.items()
        if not (
            verdict in ("permissive", "metapackage") or (verdict == "nvidia-proprietary" and name.startswith("nvidia-"))
        )
    }
    assert not refused, f"runtime dependencies without a permissive licence: {refused}"
    assert "ultralytics-thop" not in verdicts


def test_any_input_size_is_counted_in_bounded_memory():
    # A 20000 px ResNet-18 would need tens of GB of activations to run for real; counting
    # runs a meta copy on fake tensors. The child's address space is capped, so a
    # regression fails here with an allocation error instead of exhausting the machine.
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
        "from dgc_convert import convert, create_model\n"
        "from dgc_convert.measuring.macs import count_macs\n"
        "model = create_model('resnet18')\n"
        "dense = count_macs(model, 20000).total_macs\n"
        "convert(model, input_size=20000)\n"
        "print(dense, count_macs(model, 20000).total_macs)\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    dense, dgc = map(int, done.stdout.split())
    assert dense == 14_537_000_512_512 and 0 < dgc < dense  # 1.82 G at 224 px, times (20000 / 224)^2


def test_activation_figures_count_module_outputs_once_per_sample():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1))
    report = count_macs(model, (3, 16, 16))
    map_bytes = 16 * 16 * 4  # one float32 channel
    assert report.largest_activation == 8 * map_bytes
    # conv, batch norm and the last conv; the in-place ReLU's output is the norm's own tensor
    assert report.training_activations == (8 + 8 + 4) * map_bytes
