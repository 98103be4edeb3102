"""Two processes under torchrun (gloo on CPU): identical weights (and DGC-G thresholds) on both ranks, one checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def test_two_process_gloo_run_ends_with_identical_weights_and_one_checkpoint(tmp_path):
    # DGC-G, so the ranks must also agree on the learned threshold (one all-reduce a step).
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(
        "model: resnet18\n"
        "convert: {heads: 4, zeta: 0.5, gating: network}\n"
        "train: {epochs: 2, batch_size: 16, lr: 0.02}\n"
        "data: {dataset: synthetic, synthetic_size: 64, augmentation: crop_flip}\n"
        f"output: {{directory: {tmp_path / 'run'}}}\n"
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "ddp_worker.py"),
        str(recipe),
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # 64 samples, global batch 16 = 8 per rank: 4 iterations per epoch on each rank.
    assert "rank 0 finished 8" in done.stdout and "rank 1 finished 8" in done.stdout
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    thresholds = [key for key in rank0 if key.endswith(".threshold")]
    assert len(thresholds) == 19 and float(rank0[thresholds[0]]) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    saved = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    for key in rank0:
        assert torch.equal(saved[key], rank0[key]), key
    # Rank 0 alone writes: one checkpoint of each kind, one metrics line per epoch.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best",
        "curves.png",
        "last",
        "metrics.jsonl",
        "recipe.yaml",
    ]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["training_state"]["rng"]["torch_cpu"]) == 2


def test_one_process_collectives_are_identities():
    from dgc_convert.training.distributed import Processes

    alone = Processes.single()
    assert not alone.distributed and alone.main and alone.device == torch.device("cpu")
    state = torch.get_rng_state()
    [gathered] = alone.gather(state)
    assert torch.equal(gathered, state)
    assert alone.all_reduce([1.0, 2.5]) == [1.0, 2.5]
