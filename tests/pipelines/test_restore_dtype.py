"""`--dtype bfloat16`: every model's weights and compute in bfloat16 but the VAEs' (float32), and the restoration
stays that of float32 within bfloat16's error. Its cost in quality on trained weights: docs/scaling.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.pipelines.restore import Restorer, RestoreSettings
from diffbody_jax.pipelines.weights import FLOAT32_COMPONENTS, dtype_kwargs

PROMPTS = ["a man on a bench", "a girl running"]
MEMBER_OF = {"vae": "sd21/vae"}  # v1's group member -> its weights component
# measured over 12 draws of inputs and keys: mean abs 0.0013-0.0014, max 0.0097-0.013 (of [0, 1])
BF16_MEAN, BF16_MAX = 0.004, 0.04


def _dtypes(variables) -> dict[str, set[str]]:
    """member -> the dtypes of its floating-point params."""
    return {member: {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
            for member, tree in variables["params"].items()}


def test_an_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="dtype 'float16'"):
        RestoreSettings(dtype="float16")
    with pytest.raises(ValueError, match="dtype 'float16'"):
        dtype_kwargs("sd21/unet", "float16")


def test_bfloat16_keeps_the_vae_float32_and_restores_close_to_float32(stand_in_weights, rng):
    settings = RestoreSettings(version="v1", steps=2, sampler="ddim", size=64)
    degraded = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    pose = (rng.uniform(0, 1, (2, 64, 64, 3)) > 0.95).astype(np.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    full = Restorer(stand_in_weights, settings)
    half = Restorer(stand_in_weights, RestoreSettings(**{**settings.__dict__, "dtype": "bfloat16"}))

    assert all(kinds == {"float32"} for kinds in _dtypes(full.variables).values())
    for member, kinds in _dtypes(half.variables).items():
        want = "float32" if MEMBER_OF.get(member) in FLOAT32_COMPONENTS else "bfloat16"
        assert kinds == {want}, (member, kinds)

    a = full.restore(key, degraded, pose, PROMPTS)["restored"]
    b = half.restore(key, degraded, pose, PROMPTS)["restored"]
    assert b.dtype == np.float32 and np.isfinite(b).all()
    err = np.abs(a - b)
    print(f"bfloat16 against float32 on the stand-ins: mean abs {err.mean():.4f}, max {err.max():.4f}")
    assert err.mean() <= BF16_MEAN and err.max() <= BF16_MAX, (err.mean(), err.max())
    assert err.max() > 0  # it did run in bfloat16
