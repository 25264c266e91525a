"""Where params, optimizer state, batches and activations live on the mesh.

    rules = ShardingRules(fsdp_min_size=2**18)
    specs = param_partition_specs(module.abstract_variables()["params"], mesh, rules)   # PartitionSpec tree
    state_shardings = tree_shardings(abstract_state, specs, mesh, rules)                   # every state leaf
    batch = global_batch(host_batch, mesh)       # this host's slice -> one global jax.Array per field

Two rules, applied in order to each param:
1. Logical axes (flax's logical partitioning): the names on every kernel (models/layers.py) map to mesh axes by
   `rules.logical`: attention heads and MLP hidden units go to "tensor" (Megatron-style column/row splits);
   every other name is replicated. A dimension the mesh axis does not divide stays replicated.
2. FSDP: a param with at least `fsdp_min_size` elements is also split over "fsdp" on its largest dimension that
   rule 1 left free and that the fsdp size divides (ties: the last such dimension); smaller params (biases,
   norms) are replicated, since gathering them costs more than storing them.
Optimizer moments and the EMA follow their param's spec (matched by the param path inside the state); any
other leaf gets rule 2 by shape alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffbody_jax.parallel.mesh import BATCH_AXES, MeshConfig, make_mesh

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
    ("vocab", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("length", None),
    ("layers", None),  # the leading axis of a scanned transformer stack (models/stacked_blocks.py): never sharded
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    logical: tuple[tuple[str, Any], ...] = LOGICAL_RULES
    fsdp_min_size: int = 2**18  # elements: 1 MiB in fp32

    @classmethod
    def from_config(cls, section) -> ShardingRules:
        """A config's `mesh` section: fsdp_min_size, and logical_rules ({logical axis: mesh axis, list of axes or
        None}) merged over LOGICAL_RULES (None or {}: the table as it is), e.g.
        --config.mesh.logical_rules="{'heads': None}" to keep attention heads whole on a tensor axis."""
        overrides = dict(section.get("logical_rules") or {})
        known = dict(LOGICAL_RULES)
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"config mesh.logical_rules: unknown logical axes {unknown}; known: {sorted(known)}")
        mesh_axes = {"data", "fsdp", "tensor"}
        for name, axes in overrides.items():
            listed = [axes] if isinstance(axes, str) else list(axes or [])
            if set(listed) - mesh_axes:
                raise ValueError(f"config mesh.logical_rules[{name!r}] = {axes!r}: mesh axes are {sorted(mesh_axes)}")
            known[name] = tuple(listed) if len(listed) > 1 else (listed[0] if listed else None)
        return cls(logical=tuple(known.items()), fsdp_min_size=int(section["fsdp_min_size"]))


def _axis_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _fsdp(shape: Sequence[int], spec: list, mesh: Mesh, rules: ShardingRules, names=None) -> list:
    """`spec` with the largest free dimension on the fsdp axis; a scanned stack's "layers" axis is neither free nor
    counted in the size, so each block is split as it would be unstacked (the scan slices one block per step)."""
    fsdp = mesh.shape.get("fsdp", 1)
    layers = [d for d, name in enumerate(names or ()) if name == "layers"]
    size = int(np.prod([n for d, n in enumerate(shape) if d not in layers], dtype=np.int64))
    if fsdp == 1 or size < rules.fsdp_min_size:
        return spec
    free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0 and d not in layers]
    if free:
        best = max(free, key=lambda d: (shape[d], d))
        spec[best] = "fsdp"
    return spec


def leaf_spec(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh, rules: ShardingRules) -> P:
    """The PartitionSpec of one array of `shape` whose dimensions carry logical `names` (or None)."""
    spec: list = [None] * len(shape)
    if names is not None:
        logical = nn.logical_to_mesh_axes(tuple(names), rules.logical)
        for d, axes in enumerate(logical):
            size = _axis_size(mesh, axes)
            if axes is not None and size > 1 and shape[d] % size == 0:
                spec[d] = axes
    return P(*_fsdp(shape, spec, mesh, rules, names))


def param_partition_specs(boxed_params: Any, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
    """PartitionSpecs of an `abstract_variables(...)` tree (nn.Partitioned boxes of ShapeDtypeStructs), unboxed."""

    def spec(leaf):
        if isinstance(leaf, nn.Partitioned):
            return leaf_spec(leaf.value.shape, leaf.names, mesh, rules)
        return leaf_spec(np.shape(leaf), None, mesh, rules)

    return jax.tree.map(spec, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _dict_path(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def tree_shardings(abstract_tree: Any, param_specs: Mapping, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """NamedShardings for any tree holding params (train state, optimizer moments, EMA): a leaf whose dict-key
    path is a param's path takes that param's spec; any other leaf is placed by rule 2 on its shape."""
    by_path = {_dict_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, P))[0]}

    def place(path, leaf):
        shape = np.shape(leaf)
        spec = by_path.get(_dict_path(path))
        if spec is None or len(spec) != len(shape):
            spec = leaf_spec(shape, None, mesh, rules)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Batch-major arrays split over (data, fsdp) on their first axis, replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global array per field from each process's slice (all processes call this with equal-shaped slices)."""
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


def host_to_sharded(tree: Any, shardings: Any) -> Any:
    """Place host (numpy) arrays leaf by leaf into their shardings; each device receives only its own slice, so
    a model larger than one device's memory loads (every process passes the full host array)."""

    def put(array, sharding):
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return jax.tree.map(put, tree, shardings)


def logical_rules(rules: ShardingRules = ShardingRules()):
    """The context that turns the modules' activation constraints on (use inside `jax.set_mesh(mesh)`)."""
    return nn.logical_axis_rules(rules.logical)


# ------------------------------------------------------------------------------------------ inference placement
PLACEMENTS = ("auto", "replicated", "fsdp")
# "auto" splits the weights once they pass this share of one device's memory: the rest is left to activations
# (v2 at 1024x512 in bfloat16 holds 15 GiB of weights and 13 GiB of temporaries; docs/scaling.md)
AUTO_FSDP_SHARE = 0.5


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in `tree`."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def shard_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes of one device's shards of the arrays (or ShapeDtypeStructs) in `tree`, split as `shardings` says (a
    matching tree of Shardings; default each leaf's own `.sharding`)."""
    leaves = jax.tree.leaves(tree)
    splits = [x.sharding for x in leaves] if shardings is None else jax.tree.leaves(
        shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return int(sum(np.prod(s.shard_shape(x.shape), dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x, s in zip(leaves, splits, strict=True)))


def device_memory(device: jax.Device) -> int | None:
    """Bytes one device can hold (`memory_stats()["bytes_limit"]` on GPU and TPU); None where the backend does not
    say (CPU: host memory, shared by all forced devices)."""
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def resolve_placement(placement: str, weight_bytes: int, devices: Sequence[jax.Device]) -> str:
    """replicated | fsdp for `placement` (auto | replicated | fsdp): "auto" splits the weights over the devices
    (the training engine's FSDP rule) when there are several and a whole copy would take over AUTO_FSDP_SHARE of one
    device's memory; with one device, or a backend that does not report memory, it replicates."""
    if placement not in PLACEMENTS:
        raise ValueError(f"params placement {placement!r}; expected one of {PLACEMENTS}")
    if placement != "auto":
        return placement
    limit = device_memory(devices[0])
    if len(devices) > 1 and limit is not None and weight_bytes > AUTO_FSDP_SHARE * limit:
        return "fsdp"
    return "replicated"


def inference_mesh(placement: str, devices: Sequence[jax.Device]) -> Mesh:
    """The mesh a restoration runs on: replicated, a data axis over `devices`; fsdp, an fsdp axis over them (the
    batch is split over both either way)."""
    return make_mesh(MeshConfig(data=1, fsdp=-1) if placement == "fsdp" else MeshConfig(), list(devices))


def inference_shardings(tree: Any, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
    """NamedShardings of a loaded variables tree on `inference_mesh`: every leaf replicated on a data mesh; on an
    fsdp mesh, split by rule 2 on its shape (a tensor axis of 1 leaves rule 1 nothing to split)."""
    if mesh.shape.get("fsdp", 1) == 1:
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), None, mesh, rules)), tree)
