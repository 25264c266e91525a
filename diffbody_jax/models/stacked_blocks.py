"""Two layouts of a Transformer2D's blocks, and the conversions between them.

File layout (what converters, exports and checkpoints hold): one subtree per block,
    .../attentions_0/transformer_blocks_0/attn1/to_q/kernel   [C, C]
    .../attentions_0/transformer_blocks_1/attn1/to_q/kernel   [C, C]
Scanned layout (what a module built with `scan_layers=True` holds: its depth > 1 stacks run as one `nn.scan`):
    .../attentions_0/transformer_blocks/attn1/to_q/kernel     [depth, C, C]

    params = to_model_layout(module, file_params)   # after loading: stacked where `module` scans
    file_params = unstack_blocks(params)            # before writing: a no-op on the file layout

Both functions are pure and work on any pytree whose dicts hold the blocks (params, optimizer moments, EMA), on numpy
or jax arrays and on ShapeDtypeStructs. A stack of depth 1 keeps `transformer_blocks_0` in both layouts (a scan over
one block would only add a loop). Stacking copies the arrays (once, after loading); unstacking numpy arrays makes
views.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STACKED = "transformer_blocks"
_BLOCK = re.compile(r"^transformer_blocks_(\d+)$")


def _stack(*leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    if all(isinstance(x, np.ndarray | np.generic) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack(leaf, depth: int) -> list:
    if leaf.shape[:1] != (depth,):
        raise ValueError(f"a stacked block leaf of shape {leaf.shape}: expected a leading axis of {depth}")
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):  # the depth axis goes, the block's own axes stay
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)] * depth
    return [leaf[i] for i in range(depth)]


def _block_keys(node: dict) -> list[str]:
    """The keys transformer_blocks_0 .. _{n-1} of a dict that holds n >= 2 of them, else []; a gap is refused."""
    indices = sorted(int(m.group(1)) for k in node if (m := _BLOCK.match(str(k))))
    if len(indices) < 2:
        return []
    if indices != list(range(len(indices))):
        raise ValueError(f"transformer blocks {indices}: expected 0 .. {len(indices) - 1} without gaps")
    return [f"transformer_blocks_{i}" for i in indices]


def _depth(subtree) -> int:
    leaves = jax.tree.leaves(subtree)
    if not leaves:
        raise ValueError("a stacked 'transformer_blocks' subtree without leaves")
    return int(leaves[0].shape[0])


def _map_dicts(fn, tree):
    """fn on every outermost dict of `tree` (dicts inside optimizer states' named tuples included)."""
    return jax.tree.map(lambda x: fn(x) if isinstance(x, dict) else x, tree, is_leaf=lambda x: isinstance(x, dict))


def _stack_dict(node: dict) -> dict:
    keys = _block_keys(node)
    out = {k: (_stack_dict(v) if isinstance(v, dict) else v) for k, v in node.items() if k not in keys}
    if keys:
        if STACKED in node:
            raise ValueError(f"both '{STACKED}' and {keys[0]}... in one Transformer2D: mixed layouts")
        out[STACKED] = jax.tree.map(_stack, *[node[k] for k in keys])
    return out


def _unstack_dict(node: dict) -> dict:
    out = {}
    for k, v in node.items():
        if k == STACKED and isinstance(v, dict):
            depth = _depth(v)
            per_leaf = jax.tree.map(lambda x, depth=depth: _unstack(x, depth), v)
            for i in range(depth):
                out[f"transformer_blocks_{i}"] = jax.tree.map(lambda parts, i=i: parts[i], per_leaf,
                                                              is_leaf=lambda x: isinstance(x, list))
        else:
            out[k] = _unstack_dict(v) if isinstance(v, dict) else v
    return out


def stack_blocks(tree: Any) -> Any:
    """The scanned layout of `tree`: every dict's `transformer_blocks_0 .. _{n-1}` (n >= 2) become one
    `transformer_blocks` whose leaves are stacked on a new leading axis. A no-op on a stacked tree."""
    return _map_dicts(_stack_dict, tree)


def unstack_blocks(tree: Any) -> Any:
    """The file layout of `tree`: every `transformer_blocks` subtree split along its leading axis into
    `transformer_blocks_<i>`. A no-op on a tree in the file layout."""
    return _map_dicts(_unstack_dict, tree)


def scans_layers(module) -> bool:
    """Whether `module` (a UNet, ControlNet, joint UNet, Stage2Model or a ModelGroup of them) holds any stack in
    the scanned layout."""
    members = getattr(module, "members", None)
    if isinstance(members, dict):
        return any(scans_layers(m) for m in members.values())
    if hasattr(module, "scan_layers"):
        return bool(module.scan_layers)
    return any(scans_layers(getattr(module, f)) for f in ("unet", "controlnet") if hasattr(module, f))


def to_model_layout(module, tree: Any) -> Any:
    """`tree` (params or any tree shaped like them, in either layout) in the layout `module` computes with. In a
    ModelGroup each member's subtree follows its own member; `tree` may hold fewer members than the group."""
    members = getattr(module, "members", None)
    if isinstance(members, dict) and isinstance(tree, dict):
        return {k: (to_model_layout(members[k], v) if k in members else v) for k, v in tree.items()}
    return stack_blocks(tree) if scans_layers(module) else unstack_blocks(tree)
