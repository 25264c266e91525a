"""Initialising a model from a trained UNet's params: the ControlNet's encoder, the joint UNet's branches."""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

log = logging.getLogger(__name__)


def widen_conv_in(kernel: np.ndarray, in_channels: int, source: str) -> np.ndarray:
    """A conv kernel [kh, kw, C, O] widened to `in_channels` inputs: the first C copied, the new ones zero,
    so that the extra inputs (a concatenated condition) start with no effect.
    """
    kernel = np.asarray(kernel)
    have = kernel.shape[2]
    if in_channels < have:
        raise ValueError(f"{source}: cannot narrow conv_in from {have} to {in_channels} input channels")
    pad = np.zeros(kernel.shape[:2] + (in_channels - have,) + kernel.shape[3:], kernel.dtype)
    return np.concatenate([kernel, pad], axis=2)


def copy_from_unet(
    fresh: dict,
    unet_params: dict,
    source_path: Callable[[str], str | None],
    target: str,
    adapt: Callable[[str, np.ndarray, tuple[int, ...]], np.ndarray] | None = None,
    source_name: str = "a UNet",
) -> tuple[dict, list[str]]:
    """Fill `fresh` (a new model's params) from `unet_params` wherever `source_path(path)` names a source param.

    The source's conv_in kernel is widened with zero input channels wherever the target takes more inputs;
    `adapt(target path, source value, target shape)` may reshape any other tensor. Shapes must otherwise
    agree. Paths mapped to None keep their fresh values. Returns (params, sorted copied target paths) and
    logs a summary.
    """
    fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
    source = traverse_util.flatten_dict(unet_params, sep="/")
    out, copied = {}, []
    for path, value in fresh_flat.items():
        src_path = source_path(path)
        if src_path is None:
            out[path] = value
            continue
        if src_path not in source:
            raise ValueError(f"{target} init from {source_name}: its params have no {src_path} (for {path})")
        src = np.asarray(source[src_path])
        if src_path == "conv_in/kernel":
            src = widen_conv_in(src, value.shape[2], f"{target} init, {path}")
        if adapt is not None:
            src = adapt(path, src, tuple(value.shape))
        if src.shape != value.shape:
            raise ValueError(f"{target} init from {source_name}: {src_path} is {src.shape}, {path} is {value.shape}")
        out[path] = jnp.asarray(src, value.dtype)
        copied.append(path)
    roots = sorted({p.split("/")[0] for p in copied})
    log.info("%s initialised from %s: copied %d tensors under %s; %d kept fresh", target, source_name, len(copied),
             ", ".join(roots), len(out) - len(copied))
    return traverse_util.unflatten_dict(out, sep="/"), sorted(copied)
