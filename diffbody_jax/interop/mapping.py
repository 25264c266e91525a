"""Mapping tables between flat PyTorch state dicts and nested Flax param trees.

A table is data: ordered rows of (PyTorch key pattern, Flax path pattern, transform). In a pattern `*`
stands for a block index (digits); the indices captured on one side fill the other side's `*` in order:

    Rule("down_blocks.*.resnets.*.conv1.weight", "down_blocks_*/resnets_*/conv1/kernel", CONV)

Import and export read the same rows, so a round trip is the identity. Every conversion checks coverage
both ways (unused PyTorch keys, unfilled Flax params, shape mismatches) and raises one `ConversionError`
listing all of them. PyTorch keys that are meant to be dropped are named by explicit `skip` regexes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from flax.core import meta

Shape = tuple[int, ...]


# -------------------------------------------------------------------------------------- transforms
@dataclasses.dataclass(frozen=True)
class Transform:
    """A named layout change from PyTorch to Flax: an axis permutation, or none (a rename only)."""

    name: str
    perm: tuple[int, ...] | None = None

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        return x if self.perm is None else np.transpose(x, self.perm)

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return x if self.perm is None else np.transpose(x, np.argsort(self.perm))

    def flax_shape(self, torch_shape: Shape) -> Shape:
        return tuple(torch_shape) if self.perm is None else tuple(torch_shape[i] for i in self.perm)

    def torch_shape(self, flax_shape: Shape) -> Shape:
        if self.perm is None:
            return tuple(flax_shape)
        return tuple(flax_shape[i] for i in np.argsort(self.perm))


IDENTITY = Transform("identity")
NORM_WEIGHT_TO_SCALE = Transform("norm_weight_to_scale")  # LayerNorm/GroupNorm `weight` is Flax's `scale`
LINEAR_T = Transform("linear_t", (1, 0))  # [out, in] -> [in, out]
CONV_OIHW_TO_HWIO = Transform("conv_oihw_to_hwio", (2, 3, 1, 0))


# ------------------------------------------------------------------------------------------- rules
def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + r"(\d+)".join(re.escape(part) for part in pattern.split("*")) + "$")


def _fill(pattern: str, indices: tuple[str, ...]) -> str:
    parts = pattern.split("*")
    if len(parts) - 1 != len(indices):
        raise ValueError(f"pattern {pattern!r} has {len(parts) - 1} indices, got {len(indices)}")
    out = parts[0]
    for index, part in zip(indices, parts[1:], strict=True):
        out += index + part
    return out


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row. `import_only` rows read legacy PyTorch names but are never written on export."""

    torch: str
    flax: str
    transform: Transform = IDENTITY
    import_only: bool = False

    def __post_init__(self):
        if self.torch.count("*") != self.flax.count("*"):
            raise ValueError(f"rule {self.torch!r} <-> {self.flax!r}: index counts differ")


def linear(t: str, f: str, bias: bool = True) -> list[Rule]:
    rows = [Rule(f"{t}.weight", f"{f}/kernel", LINEAR_T)]
    return rows + [Rule(f"{t}.bias", f"{f}/bias")] if bias else rows


def conv2d(t: str, f: str) -> list[Rule]:
    return [Rule(f"{t}.weight", f"{f}/kernel", CONV_OIHW_TO_HWIO), Rule(f"{t}.bias", f"{f}/bias")]


def norm(t: str, f: str) -> list[Rule]:
    return [Rule(f"{t}.weight", f"{f}/scale", NORM_WEIGHT_TO_SCALE), Rule(f"{t}.bias", f"{f}/bias")]


def nest(torch_prefix: str, flax_prefix: str, rules: Iterable[Rule]) -> list[Rule]:
    """The same rules under a sub-module: `nest("mid_block.resnets.*", "mid_block/resnets_*", rows)`.

    An empty prefix on either side leaves that side's keys as they are.
    """
    join = lambda prefix, key, sep: f"{prefix}{sep}{key}" if prefix else key  # noqa: E731
    return [
        dataclasses.replace(r, torch=join(torch_prefix, r.torch, "."), flax=join(flax_prefix, r.flax, "/"))
        for r in rules
    ]


def import_only(rules: Iterable[Rule]) -> list[Rule]:
    """The same rows, used to read legacy key names only."""
    return [dataclasses.replace(r, import_only=True) for r in rules]


class MappingTable:
    """Ordered rules (first match wins) plus regexes of PyTorch keys that are dropped on import."""

    def __init__(self, rules: Iterable[Rule], skip: Iterable[str] = ()):
        self.rules = tuple(rules)
        self.skip = tuple(re.compile(s) for s in skip)
        self._torch = [(_compile(r.torch), r) for r in self.rules]
        self._flax = [(_compile(r.flax), r) for r in self.rules if not r.import_only]

    def __add__(self, other: MappingTable) -> MappingTable:
        """Layer a variant table on top: its rules are tried first."""
        return MappingTable(other.rules + self.rules, [s.pattern for s in other.skip + self.skip])

    def flax_path(self, torch_key: str) -> tuple[str, Transform] | None:
        for regex, rule in self._torch:
            m = regex.match(torch_key)
            if m:
                return _fill(rule.flax, m.groups()), rule.transform
        return None

    def torch_key(self, flax_path: str) -> tuple[str, Transform] | None:
        for regex, rule in self._flax:
            m = regex.match(flax_path)
            if m:
                return _fill(rule.torch, m.groups()), rule.transform
        return None

    def skipped(self, torch_key: str) -> bool:
        return any(s.search(torch_key) for s in self.skip)


# --------------------------------------------------------------------------------------- coverage
class ConversionError(ValueError):
    """Every key that did not map, was left unfilled, or had the wrong shape, in one message."""

    def __init__(self, source: str, unexpected=(), missing=(), misshapen=(), duplicate=()):
        self.source, self.unexpected, self.missing = source, list(unexpected), list(missing)
        self.misshapen, self.duplicate = list(misshapen), list(duplicate)
        lines = [f"{source}: weights do not fit the model"]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected PyTorch keys (no rule or no such Flax param):")
            lines += [f"    {k}" for k in self.unexpected]
        if self.missing:
            lines.append(f"  {len(self.missing)} Flax params left unfilled:")
            lines += [f"    {k}" for k in self.missing]
        if self.misshapen:
            lines.append(f"  {len(self.misshapen)} shape mismatches (PyTorch key, shape -> Flax path, expected):")
            lines += [f"    {t} {ts} -> {f} {fs}" for t, ts, f, fs in self.misshapen]
        if self.duplicate:
            lines.append(f"  {len(self.duplicate)} Flax params filled twice:")
            lines += [f"    {k}" for k in self.duplicate]
        super().__init__("\n".join(lines))


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested Flax params (boxed or not) -> {"a/b/kernel": leaf}."""
    return traverse_util.flatten_dict(meta.unbox(params), sep="/")


def plan_import(
    torch_shapes: Mapping[str, Shape],
    flax_shapes: Mapping[str, Shape],
    table: MappingTable,
    source: str,
) -> dict[str, tuple[str, Transform]]:
    """Check that `torch_shapes` fills `flax_shapes` exactly; returns torch key -> (flax path, transform).

    Both arguments are flat {key: shape}: no tensor data is needed, so this also checks real-size
    architectures built on the meta device against `jax.eval_shape` of ours.
    """
    plan, unexpected, misshapen, duplicate, filled = {}, [], [], [], set()
    for key, shape in torch_shapes.items():
        if table.skipped(key):
            continue
        hit = table.flax_path(key)
        if hit is None or hit[0] not in flax_shapes:
            unexpected.append(key if hit is None else f"{key} (-> {hit[0]})")
            continue
        path, transform = hit
        want = tuple(flax_shapes[path])
        if transform.flax_shape(tuple(shape)) != want:
            misshapen.append((key, tuple(shape), path, want))
        if path in filled:
            duplicate.append(path)
        filled.add(path)
        plan[key] = (path, transform)
    missing = sorted(set(flax_shapes) - filled)
    if unexpected or missing or misshapen or duplicate:
        raise ConversionError(source, sorted(unexpected), missing, misshapen, duplicate)
    return plan


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    table: MappingTable,
    expected: Mapping[str, Any],
    source: str = "state dict",
    dtype: Any = None,
) -> dict[str, Any]:
    """Flat PyTorch state dict (numpy arrays, NCHW layouts) -> nested Flax params.

    `expected` is the Flax param tree (or its `jax.eval_shape`) that the result must fill exactly.
    `dtype` casts every tensor; None keeps the stored dtype (so a round trip is bit-exact).
    """
    flax_shapes = {k: tuple(v.shape) for k, v in flatten_params(expected).items()}
    plan = plan_import({k: tuple(v.shape) for k, v in state_dict.items()}, flax_shapes, table, source)
    flat = {}
    for key, (path, transform) in plan.items():
        value = np.ascontiguousarray(transform.to_flax(np.asarray(state_dict[key])))
        flat[path] = value if dtype is None else value.astype(dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def flax_to_torch(params: Mapping[str, Any], table: MappingTable, source: str = "params") -> dict[str, np.ndarray]:
    """Nested Flax params -> flat PyTorch state dict of contiguous numpy arrays."""
    out, unmapped = {}, []
    for path, value in flatten_params(params).items():
        hit = table.torch_key(path)
        if hit is None:
            unmapped.append(path)
            continue
        key, transform = hit
        out[key] = np.ascontiguousarray(transform.to_torch(np.asarray(value)))
    if unmapped:
        raise ConversionError(source, missing=[f"{p} (no rule maps this Flax param to PyTorch)" for p in unmapped])
    return out
