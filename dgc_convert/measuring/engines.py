"""The engines ``benchmark`` times a model with, in one place (no torch: the CLI checks ``--engine`` before any import)."""

from __future__ import annotations

__all__ = ["BENCH_ENGINES"]

# eager: the model as it is; compile: torch.compile with inductor freezing; auto: compile when it
# works, and the faster of the two engines for the DGC model.
BENCH_ENGINES: tuple[str, ...] = ("auto", "eager", "compile")
