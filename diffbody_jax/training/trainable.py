"""Trainable subsets of a param tree, named by regexes over "/"-joined param paths.

    subset = TrainableSubset("stage2_controlnet", (r"^controlnet/",))
    trainable, frozen = partition(params, subset)          # grads and optimizer state for `trainable` only
    loss = loss_fn(merge(trainable, frozen))
    optax.masked(optimizer, subset.mask(params))            # or keep one tree and mask the optimizer

Partitioning (rather than masking gradients) is what keeps a frozen SDXL UNet out of the backward pass's
outputs and out of the optimizer state: for stage 2, 2.6 B frozen params against 1.25 B trained.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class TrainableSubset:
    """A named set of params: those whose path matches any of `patterns` (re.search)."""

    name: str
    patterns: tuple[str, ...]

    def __post_init__(self):
        for p in self.patterns:
            re.compile(p)

    def matches(self, path: str) -> bool:
        return any(re.search(p, path) for p in self.patterns)

    def mask(self, params: Mapping[str, Any]) -> dict:
        """A tree of bools shaped like `params`: True where trainable (optax.masked's mask)."""
        flat = traverse_util.flatten_dict(dict(params), sep="/")
        if not any(self.matches(k) for k in flat):
            raise ValueError(f"trainable subset {self.name!r}: no param path matches {self.patterns}; "
                             f"top-level keys are {sorted(params)}")
        return traverse_util.unflatten_dict({k: self.matches(k) for k in flat}, sep="/")

    def count(self, params: Mapping[str, Any]) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        flat = traverse_util.flatten_dict(dict(params), sep="/")
        size = lambda v: int(getattr(v, "size", 0))  # noqa: E731
        return sum(size(v) for k, v in flat.items() if self.matches(k)), sum(size(v) for v in flat.values())


def partition(params: Mapping[str, Any], subset: TrainableSubset) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts whose union is `params`."""
    mask = traverse_util.flatten_dict(subset.mask(params), sep="/")
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    trainable = {k: v for k, v in flat.items() if mask[k]}
    frozen = {k: v for k, v in flat.items() if not mask[k]}
    return traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """The inverse of `partition`; frozen leaves pass through `jax.lax.stop_gradient`."""
    flat = {k: jax.lax.stop_gradient(v) for k, v in traverse_util.flatten_dict(dict(frozen), sep="/").items()}
    overlap = set(flat) & set(traverse_util.flatten_dict(dict(trainable), sep="/"))
    if overlap:
        raise ValueError(f"merge: params both trainable and frozen: {sorted(overlap)[:5]}")
    flat.update(traverse_util.flatten_dict(dict(trainable), sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")
