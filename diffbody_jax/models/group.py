"""Several Flax modules that a training phase holds as one model: one variables tree, one set of shardings.

    group = ModelGroup(unet=unet, controlnet=controlnet, vae=vae, swinir=swinir)
    variables = group.init(rng)               # {"params": {"unet": ..., "controlnet": ..., ...}, ...}
    eps = group.apply("unet", variables, z_t, t, context)
    group.controlnet                          # a member module (the engine exports members by name)

A phase whose frozen encoders (VAE, text encoder, SwinIR, body-part network) run inside the train step builds a
group; its trainable subset names the member(s) it trains (`^controlnet/`). Collections other than params
(BatchNorm statistics) are keyed by member the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ModelGroup:
    def __init__(self, **members):
        if not members:
            raise ValueError("ModelGroup: no members")
        self.members = dict(members)

    def __getattr__(self, name: str):
        members = self.__dict__.get("members", {})
        if name in members:
            return members[name]
        raise AttributeError(f"ModelGroup has no member {name!r}; members: {sorted(members)}")

    # by value, as Flax modules are: a pipeline holding an equal group hashes equal, so jit reuses its program
    def __eq__(self, other) -> bool:
        return isinstance(other, ModelGroup) and self.members == other.members

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.members.items())))

    def init(self, rng: jax.Array, placeholders: Collection[str] = ()) -> dict[str, Any]:
        """Every member's variables (boxed, as `Module.init` returns them), keyed by collection, then member.

        placeholders: members given zeros of their shapes instead of an init, for a caller that fills them
        from a file next (compiling a member's init costs far more than its zeros); the other members' values do
        not depend on which are placeholders."""
        out: dict[str, dict] = {}
        for (name, module), key in zip(self.members.items(), jax.random.split(rng, len(self.members)), strict=True):
            def init(key=key, module=module):
                return module.init(key, **module.dummy_inputs())

            if name in placeholders:
                tree = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))
            else:
                tree = init()
            for collection, member_tree in tree.items():
                out.setdefault(collection, {})[name] = member_tree
        return out

    def init_variables(self, rng: jax.Array, placeholders: Collection[str] = ()) -> dict[str, Any]:
        """Every member's fresh variables, unboxed, as `ModelVariables.init_variables` gives a single module's."""
        return nn.unbox(self.init(rng, placeholders))

    def abstract_variables(self, batch: int = 1) -> dict[str, Any]:
        del batch
        return jax.eval_shape(lambda: self.init(jax.random.key(0)))

    def member_variables(self, variables: Mapping[str, Any], name: str) -> dict[str, Any]:
        return {collection: tree[name] for collection, tree in variables.items() if name in tree}

    def apply(self, name: str, variables: Mapping[str, Any], *args, **kwargs):
        """`members[name].apply` on that member's share of `variables`."""
        return self.members[name].apply(self.member_variables(variables, name), *args, **kwargs)
