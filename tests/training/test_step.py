"""The pure train step, called directly (as in Flax's examples): frozen params, EMA, accumulation, non-finite steps,
and the toy phase (SwinIR's L2 loss) overfitting one batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.models.registry import build_model
from diffbody_jax.training.optimizer import make_optimizer
from diffbody_jax.training.phases import get_phase
from diffbody_jax.training.state import create_train_state
from diffbody_jax.training.step import make_train_step
from diffbody_jax.training.trainable import TrainableSubset, partition
from tests.training.overfit import steps_until_halved


class EncoderHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(16, name="encoder")(x)))


HEAD = TrainableSubset("head", (r"^head/",))


def _toy(rng, tx, batch=8, **step_kw):
    module = EncoderHead()
    params = module.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
    trainable, frozen = partition(params, HEAD)
    state = create_train_state(trainable, frozen, {}, tx, jax.random.PRNGKey(1), ema=step_kw.get("ema_decay", 0) > 0)

    def loss_fn(variables, b, key):
        del key
        return jnp.mean((module.apply(variables, b["x"]) - b["y"]) ** 2), {}

    data = {"x": jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32)}
    return state, jax.jit(make_train_step(loss_fn, tx, **step_kw)), data


def test_frozen_params_stay_bit_identical_and_out_of_the_optimizer(rng):
    state, step, batch = _toy(rng, optax.adam(1e-2))
    frozen0 = jax.tree.map(np.asarray, state.frozen)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert int(state.step) == 3 and bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state.frozen), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert not any("encoder" in p for p in paths)
    assert sum("head" in p for p in paths) == 2 * len(jax.tree.leaves(state.params))  # Adam's mu and nu


def test_ema_follows_its_formula(rng):
    decay = 0.8
    state, step, batch = _toy(rng, optax.adam(5e-2), ema_decay=decay)
    ema = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
    for _ in range(4):
        state, _ = step(state, batch)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * np.asarray(p, np.float64), ema, state.params)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema), strict=True):
        np.testing.assert_allclose(np.asarray(b), a, atol=1e-6, rtol=0)
    moved = max(float(np.abs(np.asarray(e) - np.asarray(p)).max())
                for e, p in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params), strict=True))
    assert moved > 1e-3  # the EMA lags the params: it is not a copy


def test_accumulating_k_micro_batches_equals_one_step_on_the_whole_batch(rng):
    """SGD, so that the params after the step are the gradient itself (Adam's first step is sign-like)."""
    state, step_k, batch = _toy(rng, optax.sgd(0.5), batch=12, grad_accum=4)
    _, step_1, _ = _toy(rng, optax.sgd(0.5), batch=12)
    a, ma = step_k(state, batch)
    b, mb = step_1(state, batch)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
    assert abs(float(ma["loss"]) - float(mb["loss"])) <= 1e-6
    moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(state.params), strict=True))
    assert moved > 1e-3
    with pytest.raises(ValueError, match="grad_accum=5 does not divide the batch of 12"):
        _toy(rng, optax.sgd(0.5), batch=12, grad_accum=5)[1](state, batch)


def test_a_non_finite_step_leaves_the_state_unchanged(rng):
    state, step, batch = _toy(rng, optax.adam(1e-2), ema_decay=0.9)
    state, _ = step(state, batch)
    before = jax.tree.map(np.asarray, state)
    bad = {**batch, "x": batch["x"].at[3, 2].set(jnp.nan)}
    after, metrics = step(state, bad)
    assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_the_toy_phase_overfits_one_batch(rng):
    """SwinIR's L2 loss (stage 0) with the tiny config's optimizer: at most 60 steps to halve the loss."""
    config = load_config("swinir:variant=tiny-diffbir", ["model.swinir.drop_path_rate=0.0"])
    phase, module = get_phase(config.phase), build_model(config.model)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    params = module.init_params(jax.random.key(0))
    state = create_train_state(params, {}, {}, tx, jax.random.PRNGKey(0), ema=False)
    step = jax.jit(make_train_step(phase.loss_fn(module, config), tx, schedule))
    from skimage import data

    photo = data.astronaut()[::8, ::8].astype(np.float32) / 255  # 64 x 64
    corners = rng.integers(0, 32, (4, 2))
    target = np.stack([photo[t: t + 32, left: left + 32] for t, left in corners])
    batch = {"target": target, "degraded": np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32)}
    state, losses = steps_until_halved(step, state, batch, 60)
    assert losses[-1] <= losses[0] / 2, losses[::10]


def test_bf16_compute_keeps_float32_master_params_and_remat_policies_change_nothing(rng):
    """model.dtype=bfloat16: the step's params, moments and gradients stay float32 and the loss is the float32
    loss within bf16 rounding; model.remat=dots (a checkpoint policy) leaves the gradients as they are (1e-6)."""
    target = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    batch = {"target": target, "degraded": np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32)}
    base = ["model.swinir.drop_path_rate=0.0"]
    grads, losses = {}, {}
    for name, extra in [("fp32", []), ("bf16", ["model.dtype=bfloat16"]), ("dots", ["model.remat=dots"])]:
        config = load_config("swinir:variant=tiny-diffbir", base + extra)
        phase, module = get_phase(config.phase), build_model(config.model)
        tx, schedule = make_optimizer(config.optim, config.train.steps)
        state = create_train_state(build_model(load_config("swinir:variant=tiny-diffbir", base).model).init_params(
            jax.random.key(0)), {}, {}, tx, jax.random.PRNGKey(0), ema=False)
        loss_fn = phase.loss_fn(module, config)
        (losses[name], _), grads[name] = jax.jit(jax.value_and_grad(
            lambda p, b, f=loss_fn: f({"params": p}, b, jax.random.key(1)), has_aux=True))(state.params, batch)
        if name == "bf16":
            new, _ = jax.jit(make_train_step(loss_fn, tx, schedule))(state, batch)
            assert {x.dtype for x in jax.tree.leaves((new.params, new.opt_state[1][0].mu))} == {jnp.dtype("float32")}
            assert {x.dtype for x in jax.tree.leaves(grads[name])} == {jnp.dtype("float32")}
    assert abs(float(losses["bf16"]) - float(losses["fp32"])) <= 0.05 * float(losses["fp32"])
    worst = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads["fp32"]),
                                                            jax.tree.leaves(grads["dots"]), strict=True))
    assert worst <= 1e-6, worst
