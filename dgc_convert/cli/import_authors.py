"""``dgc-convert import-authors FILE --out F.safetensors``: the authors' released
DGC checkpoints as models of ours (``dgc_convert.conversion.authors`` does the work).

``import_authors_command`` runs behind the CLI's error handler, so bad input
is one line on stderr and exit code 2. Nothing heavy is imported until the
command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dgc_convert.cli.exits import handles_errors
from dgc_convert.display import output_console

if TYPE_CHECKING:
    from dgc_convert.conversion.authors import AuthorsImport

__all__ = ["IMPORT_AUTHORS_HELP", "import_authors_command"]

IMPORT_AUTHORS_HELP = (
    "Import the authors' released DGC checkpoint FILE (hellozhuo/dgc, .pth.tar; read weights-only) "
    "as a dgc-convert model and save it to --out."
)


def _summary(report: AuthorsImport, out: Path) -> list[str]:
    ratios = sorted({layer.zeta_t for layer in report.layers})
    zeta_t = f"{ratios[0]:.4g}" if len(ratios) == 1 else f"{ratios[0]:.4g}-{ratios[-1]:.4g}"
    lines = [
        f"imported {report.source}: {report.model}, {report.num_classes} classes, {report.tensors} tensors read",
        f"{len(report.layers)} DGC layers (heads {report.heads}, squeeze ratio {report.squeeze_ratio:g}, "
        f"zeta {report.zeta:g}, interleaved, pre-activation): zeta_t {zeta_t} from the checkpoint",
        f"parameters {report.parameters / 1e6:.2f} M; each head keeps exactly k = C - round(zeta_t * C) channels "
        "(dgc-convert's rule, ties to the lower channel)",
    ]
    if report.off_target:
        lines.append(
            f"note: {len(report.off_target)} layers (first {report.off_target[0]}) drop a different number of "
            f"channels than zeta {report.zeta:g} gives; they evaluate at the checkpoint's zeta_t"
        )
    lines.append(f"saved to {out} (load it with dgc_convert.load)")
    return lines


@handles_errors
def import_authors_command(
    file: Annotated[Path, typer.Argument(help="The authors' checkpoint, e.g. imagenet_dyresnet18_h4.tar.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the imported model (.safetensors).")],
    model: Annotated[
        str, typer.Option("--model", help="The torchvision ResNet the checkpoint is: resnet18 or resnet34.")
    ] = "resnet18",
    heads: Annotated[
        int | None,
        typer.Option(
            "--heads",
            min=1,
            help="Heads per layer; must match the checkpoint's headconv_* count. [default: from the file]",
        ),
    ] = None,
    zeta: Annotated[
        float,
        typer.Option("--zeta", help="The layers' target pruning ratio (the authors' 1 - gate_factor)."),
    ] = 0.55,
    squeeze_ratio: Annotated[
        float, typer.Option("--squeeze-ratio", help="The authors' --squeeze-rate (hidden width C // d).")
    ] = 16.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON on stdout and nothing else.")] = False,
) -> None:
    """Import the checkpoint, save it to ``--out`` and print what was read (or ``--json``)."""
    from dgc_convert.cli.render import print_json
    from dgc_convert.conversion.authors import import_authors_checkpoint
    from dgc_convert.conversion.saved_models import save

    net, report = import_authors_checkpoint(file, model=model, heads=heads, zeta=zeta, squeeze_ratio=squeeze_ratio)
    saved = save(net, out)  # written under a temporary name, then renamed
    if json_output:
        print_json({**report.to_dict(), "saved": str(saved)})
        return
    console = output_console()
    for line in _summary(report, saved):
        console.print(line, highlight=False, markup=False)
