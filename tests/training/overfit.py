"""Shared by the phase tests: run a phase's train step on one fixed batch until the loss halves."""

import jax
import numpy as np
import optax
from flax import linen as nn

from diffbody_jax.models.registry import build_model
from diffbody_jax.training.phases import get_phase
from diffbody_jax.training.state import create_train_state
from diffbody_jax.training.step import make_train_step
from diffbody_jax.training.trainable import partition


def steps_until_halved(step, state, batch, max_steps: int):
    """(state, losses): `step(state, batch)` repeated until the loss is at most half the first one, or max_steps."""
    losses = []
    for _ in range(max_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if losses[-1] <= losses[0] / 2:
            break
    return state, losses


def overfit_phase(config, batch: dict, max_steps: int, variables=None):
    """Adam on `config`'s phase with the loss's key pinned (fixed t and noise) over one batch.

    Returns (losses, frozen_changed: the frozen leaves (params and other collections) that differ from the start,
    trainable top-level member names, frozen member names)."""
    phase, module = get_phase(config.phase), build_model(config.model)
    if variables is None:
        variables = nn.unbox(module.init(jax.random.key(0)))
    trainable, frozen = partition(variables["params"], phase.trainable(config))
    tx = optax.adam(float(config.optim.learning_rate))
    loss = phase.loss_fn(module, config)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    state = create_train_state(trainable, frozen, model_state, tx, jax.random.PRNGKey(0), ema=False)
    step = jax.jit(make_train_step(lambda v, b, k: loss(v, b, jax.random.key(3)), tx))
    batch = {k: v for k, v in batch.items() if k in phase.inputs}
    before = jax.tree_util.tree_flatten_with_path((state.frozen, state.model_state))[0]
    state, losses = steps_until_halved(step, state, batch, max_steps)
    after = jax.tree.leaves((state.frozen, state.model_state))
    changed = [jax.tree_util.keystr(p) for (p, a), b in zip(before, after, strict=True)
               if not np.array_equal(np.asarray(a), np.asarray(b))]
    return losses, changed, sorted(trainable), sorted(frozen)
