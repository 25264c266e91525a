"""The train step: a pure function (state, batch) -> (state, metrics), and its sharded jit.

    step = make_train_step(loss_fn, tx, schedule, grad_accum=2, ema_decay=0.9999)
    state, metrics = step(state, batch)                            # plain call, as in Flax's examples
    step = jit_train_step(step, state_shardings, mesh)      # sharded, state buffers donated

loss_fn(variables, batch, key) -> (loss, metrics): `variables` is {"params": trainable + frozen, ...}.

Gradient accumulation is a `lax.scan` over `grad_accum` micro-batches inside one step, not optax.MultiSteps:
a step stays one optimizer update, so `train.steps`, the checkpoint cadence and the learning-rate schedule count
updates, each step consumes one global batch of the data pipeline, and no extra gradient buffer lives in the
optimizer state (and in every checkpoint). Micro-batch j holds examples j, j + k, j + 2k, ... of the batch, which
keeps every micro-batch split evenly over the batch axes of the mesh.

A step whose loss or gradient is not finite leaves the state unchanged (step included) and reports
`finite = False`; the engine stops the run there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffbody_jax.parallel.sharding import batch_sharding
from diffbody_jax.training.state import TrainState

PASSED_THROUGH = ("record",)  # batch fields returned in the metrics (which examples a step saw)


def _micro_batches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"train.grad_accum={k} does not divide the batch of {x.shape[0]}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return {name: split(x) for name, x in batch.items()}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable | None = None, *,
                    grad_accum: int = 1, ema_decay: float = 0.0) -> Callable[[TrainState, Any], tuple]:
    """The step function. EMA: ema <- decay * ema + (1 - decay) * params after each update (when decay > 0)."""
    if grad_accum < 1:
        raise ValueError(f"train.grad_accum={grad_accum} must be >= 1")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={ema_decay} must lie in [0, 1)")

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        inputs = {k: v for k, v in batch.items() if k not in PASSED_THROUGH}
        key = jax.random.fold_in(state.rng, state.step)

        def loss_of(params, micro, micro_key):
            return loss_fn(state.variables(params), micro, micro_key)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(state.params, inputs, key)
        else:
            def accumulate(total, xs):
                index, micro = xs
                (micro_loss, micro_metrics), g = grad_fn(state.params, micro, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, total, g), (micro_loss, micro_metrics)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            xs = (jnp.arange(grad_accum), _micro_batches(inputs, grad_accum))
            grads, (losses, metrics) = jax.lax.scan(accumulate, zeros, xs)
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss, metrics = losses.mean(), jax.tree.map(lambda m: m.mean(0), metrics)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        @jax.named_scope("optimizer_update")  # the name profiles find it by (bench/profile_ops.py)
        def update(state):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema
            if ema_decay > 0:
                ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema, params)
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)

        # a cond, not a where over old and new state: the select kept both copies of the params and moments alive
        # (3.7 GiB more temporaries for SD2.1-base's step on XLA:CPU, bench/README.md "Training step")
        new = jax.lax.cond(finite, update, lambda state: state, state)

        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics.update({k: batch[k] for k in PASSED_THROUGH if k in batch})
        return new, metrics

    return train_step


def jit_train_step(train_step: Callable, state_shardings: Any, mesh) -> Callable:
    """`train_step` jitted over `mesh`: the state in and out in `state_shardings` (its buffers donated), every
    batch field split over (data, fsdp) on its first axis (one sharding as a prefix of the whole batch, whatever
    fields and ranks it has), the metrics replicated."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)
