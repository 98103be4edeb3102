"""Training: the recipe, the three-stage schedule, data, the run with its checkpoints, lock and events."""
