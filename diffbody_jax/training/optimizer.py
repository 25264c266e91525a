"""The optimizer of a run from a config's `optim` section (optax).

    tx, schedule = make_optimizer(config.optim, total_steps=config.train.steps)

optim fields:
  optimizer        adam | adamw (decoupled weight decay, `weight_decay`)
  learning_rate    the peak rate
  schedule         constant | warmup_cosine (linear warm-up over `warmup_steps`, cosine decay to `end_lr_ratio`
                   x peak at the last step)
  warmup_steps     linear warm-up from 0 (both schedules; 0: none)
  b1, b2, eps      Adam's moments
  grad_clip        clip the gradient's global norm to this (0: off)
Params stay float32 (the master weights) whatever the compute dtype: a bf16 model (`model.dtype=bfloat16`) casts
them per op, gradients arrive in float32, and Adam's moments are float32. bf16's exponent range is float32's,
so no loss scaling is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")


def learning_rate_schedule(optim, total_steps: int) -> Callable:
    peak, warmup = float(optim["learning_rate"]), int(optim["warmup_steps"])
    if optim["schedule"] == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    if optim["schedule"] == "warmup_cosine":
        if total_steps <= warmup:
            raise ValueError(f"optim.warmup_steps={warmup} must be below train.steps={total_steps}")
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps,
                                                  end_value=peak * float(optim["end_lr_ratio"]))
    raise ValueError(f"optim.schedule={optim['schedule']!r}; expected one of {SCHEDULES}")


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """(the optax transformation, its learning-rate schedule: step -> rate)."""
    if optim["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer={optim['optimizer']!r}; expected one of {OPTIMIZERS}")
    schedule = learning_rate_schedule(optim, total_steps)
    kw = dict(b1=float(optim["b1"]), b2=float(optim["b2"]), eps=float(optim["eps"]))
    if optim["optimizer"] == "adamw":
        opt = optax.adamw(schedule, weight_decay=float(optim["weight_decay"]), **kw)
    else:
        opt = optax.adam(schedule, **kw)
    clip = float(optim["grad_clip"])
    return (optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt), schedule
