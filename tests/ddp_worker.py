"""Run by tests/test_distributed.py under torchrun: train a recipe, then save this rank's weights."""

import os
import sys

from safetensors.torch import save_file

from dgc_convert.training.recipe import load_recipe
from dgc_convert.training.trainer import train

if __name__ == "__main__":
    recipe_path, weights_dir = sys.argv[1], sys.argv[2]
    result = train(load_recipe(recipe_path))
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, os.path.join(weights_dir, f"rank{os.environ['RANK']}.safetensors"))
    print(f"rank {os.environ['RANK']} {result.status} {result.iteration}")
