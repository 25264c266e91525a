"""Training utilities shared by the phases: trainable subsets of a param tree."""
