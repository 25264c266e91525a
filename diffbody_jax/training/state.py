"""The train state: everything a step reads and writes, as one pytree.

  step         int32 []: optimizer updates done
  params       the trainable params (a `TrainableSubset` of the model's)
  frozen       the other params: inputs of the loss, never differentiated, absent from the optimizer state
  model_state  the model's other variable collections (BatchNorm statistics of HRNet/BPBreID), used as they are
               (our BatchNorm runs in inference mode, so the statistics are frozen too)
  opt_state    optax state of `params` only
  ema          exponential moving average of `params` ({} when train.ema_decay is 0)
  rng          uint32 [2]: the run's base key; step n draws from fold_in(rng, n), so a resumed run draws the same
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffbody_jax.training.trainable import merge


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    frozen: Any
    model_state: Any
    opt_state: Any
    ema: Any
    rng: jax.Array

    def variables(self, params=None) -> dict[str, Any]:
        """The model's variables for `apply`: trainable (or `params`) and frozen params merged, other collections."""
        return {"params": merge(self.params if params is None else params, self.frozen), **self.model_state}


def create_train_state(params: Any, frozen: Any, model_state: Any, tx: optax.GradientTransformation,
                       rng: jax.Array, ema: bool) -> TrainState:
    """A fresh state at step 0 (jit it with `out_shardings` to create it sharded)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, model_state=model_state,
        opt_state=tx.init(params), ema=jax.tree.map(jnp.copy, params) if ema else {}, rng=rng,
    )
