"""Training throughput (images/s) of DGC (zeta 0.5) against dense, through the real trainer.

Usage: python benchmarks/train_throughput.py [--repeats 3] [--iterations 12]

Each case trains a recipe with ``dgc_convert.training.trainer`` on synthetic data for one
epoch of ``--iterations`` iterations, with the schedule set so that zeta_t is
at its target from the first iteration (warm-up 0, fine-tune 1: the steady
state of a DGC run). The trainer's own figure is used: training images per
second of wall time, data loading, schedule, sparsity loss and optimizer step
included; set-up, evaluation and checkpoints excluded. Repeats of DGC and dense
are interleaved so machine noise hits both alike; medians are printed.

Cases: the digits model (ResNet-18 at 32x32, batch 64, as in recipes/digits.yaml)
and ResNet-18 at 64x64, batch 32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from dgc_convert.training.recipe import recipe_from_dict
from dgc_convert.training.trainer import train

CASES = [("digits model: resnet18 32x32", 32, 64), ("resnet18 64x64", 64, 32)]


def images_per_second(image_size: int, batch: int, iterations: int, dgc: bool) -> float:
    """Training images/s of one epoch of ``iterations`` iterations."""
    with tempfile.TemporaryDirectory() as directory:
        recipe = recipe_from_dict(
            {
                "model": {"name": "resnet18"},
                "convert": {"enabled": dgc, "heads": 4, "zeta": 0.5},
                "train": {
                    "epochs": 1,
                    "batch_size": batch,
                    "lr": 0.02,
                    "warmup_fraction": 0.0,
                    "finetune_fraction": 1.0,
                },
                "data": {"dataset": "synthetic", "synthetic_size": batch * iterations, "image_size": image_size},
                "output": {"directory": directory},
            }
        )
        result = train(recipe)
        assert result.final is not None and (not dgc or result.final.zeta_t == 0.5)
        return result.final.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=12)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats")
    print(f"{'case':<30} {'batch':>5} | {'dense img/s':>11} {'DGC img/s':>10} | {'DGC/dense':>9}")
    for name, size, batch in CASES:
        dense, dgc = [], []
        for _ in range(args.repeats):
            dense.append(images_per_second(size, batch, args.iterations, dgc=False))
            dgc.append(images_per_second(size, batch, args.iterations, dgc=True))
        d, g = statistics.median(dense), statistics.median(dgc)
        print(f"{name:<30} {batch:>5} | {d:>11.1f} {g:>10.1f} | {g / d:>9.2f}")


if __name__ == "__main__":
    main()
