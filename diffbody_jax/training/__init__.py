"""Training: trainable subsets, losses, phases, the train state and step, optimizer, checkpoints, the engine."""
