"""Creating a model's variables, one way for every top module.

    variables = init_variables(module, rng)        # {"params": ..., ["batch_stats": ...]}: plain pytrees
    abstract = abstract_variables(module)          # the same as nn.Partitioned boxes of ShapeDtypeStruct:
    specs = nn.get_partition_spec(abstract)        #   logical axis names kept, no memory used
    shapes = param_shapes(module)                  # unboxed ShapeDtypeStructs of the params
    variables = random_variables(module, seed=0)   # stand-in weights made on the host: demos and tests

Every top module defines `dummy_inputs(batch=1) -> dict` of keyword arguments that trace its `__call__`;
`ModelVariables` gives it `init_params`, `param_shapes`, `init_variables` and `abstract_variables` methods that
call these functions (one implementation, used by interop, the sharding rules and the tests).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np


def abstract_variables(module, batch: int = 1) -> dict[str, Any]:
    """eval_shape of `module.init` on its dummy inputs: boxed (nn.Partitioned, logical names kept), no memory."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), **module.dummy_inputs(batch)))


def init_variables(module, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
    """Every variable collection of a fresh module ("params", and "batch_stats" where it has BatchNorm), unboxed."""
    return nn.unbox(module.init(rng, **module.dummy_inputs(batch)))


def param_shapes(module) -> dict[str, Any]:
    """The params' ShapeDtypeStructs (unboxed), without allocating memory."""
    return nn.unbox(abstract_variables(module))["params"]


def random_variables(module_or_abstract, seed: int = 0) -> dict[str, Any]:
    """Random stand-in weights drawn on the host with numpy: norms' scales 1, biases 0, BatchNorm statistics
    (0, 1), every other leaf N(0, 1/fan_in) (fan_in = the product of all but the last dimension; 1-D leaves and
    embedding tables N(0, 0.02^2)).

    Not the training init (`init_variables`: zero-initialised ControlNet outputs, truncated normals): a stand-in
    for demos and pipeline tests where only shapes and a working forward matter. Why: compiling `module.init`
    costs 20-35 s for the tiny SDXL UNet on a 2-core CPU (one truncated-normal kernel per leaf) against
    milliseconds here. Takes a module (traced with `abstract_variables`) or an abstract/unboxed variables tree.
    """
    abstract = module_or_abstract
    if not isinstance(abstract, dict):
        abstract = abstract.abstract_variables()
    abstract = nn.unbox(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if name in ("scale", "var"):
            return np.ones(shape, dtype)
        if name in ("bias", "mean"):
            return np.zeros(shape, dtype)
        std = 0.02 if len(shape) < 2 or "embed" in name else 1.0 / np.sqrt(np.prod(shape[:-1]))
        return (rng.standard_normal(shape, np.float32) * std).astype(dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def unnamed_leaves(abstract: dict[str, Any]) -> list[str]:
    """Paths of the leaves of `abstract_variables` that carry no logical axis names (an nn.Partitioned box
    with one name, possibly None, per dimension)."""
    out = []
    flat = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in flat:
        if not isinstance(leaf, nn.Partitioned) or len(leaf.names) != len(leaf.value.shape):
            out.append(jax.tree_util.keystr(path))
    return out


class ModelVariables:
    """Mixin of the top Flax modules: variable creation through the functions above."""

    def init_variables(self, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
        return init_variables(self, rng, batch)

    def abstract_variables(self, batch: int = 1) -> dict[str, Any]:
        return abstract_variables(self, batch)

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        """Random params as a plain pytree (logical-axis boxes removed)."""
        return init_variables(self, rng)["params"]

    def param_shapes(self) -> dict[str, Any]:
        return param_shapes(self)

    def variable_shapes(self) -> dict[str, Any]:
        return nn.unbox(abstract_variables(self))
