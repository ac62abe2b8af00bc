"""Training VITA without detectron2: config and recipes, optimiser and schedule, the loop, checkpoints."""
