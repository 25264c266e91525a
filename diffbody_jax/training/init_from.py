"""`train.init_from`: where a fresh run's params come from besides the random init.

    --config.train.init_from="unet=SD21/unet,controlnet=unet:SD21/unet,swinir=RUNS/swinir"

Each item is `subtree=path` (or a bare path for the whole model): a diffusers or converted folder, an original
SwinIR or BPBreID checkpoint file, a run's workdir (its export/), or `unet:path` (a ControlNet or joint UNet
started from that UNet's weights). What a file fills is its interop family's business (`load_weights_for`): a
colour adapter fills only part of a Stage2Model, a plain UNet all of an adapter UNet but its to_k_ip / to_v_ip;
here every source is placed by one rule: the leaves it holds go to their shardings, the paths it leaves untouched
keep their fresh values, and anything else that does not fit is an error naming the path and both shapes.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from diffbody_jax.interop.pretrained import init_from_pretrained_unet, load_weights_for
from diffbody_jax.models.stacked_blocks import to_model_layout
from diffbody_jax.parallel.sharding import host_to_sharded

log = logging.getLogger(__name__)


def init_sources(spec: str) -> list[tuple[str, str]]:
    """"unet=path,controlnet=unet:path" or "path" -> [(subtree, path)]; a run's workdir means its export/ folder."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        subtree, sep, path = item.partition("=")
        subtree, path = (subtree, path) if sep else ("", item)
        bare = path.removeprefix("unet:")
        if (Path(bare) / "export").is_dir() and not (Path(bare) / "config.json").exists():
            path = path[: len(path) - len(bare)] + str(Path(bare) / "export")
        out.append((subtree, path))
    return out


def _subtree(tree, subtree: str, what: str):
    for part in filter(None, subtree.split("/")):
        if not isinstance(tree, dict) or part not in tree:
            raise ValueError(f"train.init_from: the model's {what} have no subtree {subtree!r}; "
                             f"top level: {sorted(tree) if isinstance(tree, dict) else '(a leaf)'}")
        tree = tree[part]
    return tree


def _replace(tree: dict, subtree: str, value) -> dict:
    if not subtree:
        return value
    head, _, rest = subtree.partition("/")
    return {**tree, head: _replace(tree[head], rest, value)}


def _check_fits(target: dict, loaded: dict, where: str) -> None:
    """target, loaded: flat {path: array}; every path in both, with the same shape and dtype."""
    want = {k: (tuple(x.shape), str(x.dtype)) for k, x in target.items()}
    got = {k: (tuple(np.shape(x)), str(np.asarray(x).dtype)) for k, x in loaded.items()}
    if want != got:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[:5]
        raise ValueError(f"train.init_from {where}: " + "; ".join(
            f"{k}: model {want.get(k)}, file {got.get(k)}" for k in diff))


def load_into(variables: dict, shardings: dict, subtree: str, path: str, module, rng: jax.Array,
              filled: set[str] | None = None) -> dict:
    """`variables` with one init source placed at `subtree` of `module` (its member there), in `shardings`.
    filled: a set that gets the "collection/subtree/.../leaf" path of every leaf the source placed."""
    member = module
    for part in filter(None, subtree.split("/")):
        member = getattr(member, part)
    if not Path(path.removeprefix("unet:")).exists():
        raise FileNotFoundError(f"config train.init_from: {subtree or '(all params)'} = {path}: no such file or "
                                "folder")
    if path.startswith("unet:"):
        params, _, _ = init_from_pretrained_unet(path.removeprefix("unet:"), member, rng)
        loaded, untouched = {"params": traverse_util.flatten_dict(params, sep="/")}, (lambda p: False)
    else:
        loaded, untouched = load_weights_for(path, member)
    out = dict(variables)
    for collection, flat in loaded.items():
        # files hold a scanning member's stacks block by block: stack them as the member computes
        flat = traverse_util.flatten_dict(to_model_layout(member, traverse_util.unflatten_dict(flat, sep="/")),
                                          sep="/")
        if collection not in variables:
            raise ValueError(f"train.init_from {path}: holds {collection!r}, which the model has none of")
        target = traverse_util.flatten_dict(_subtree(variables[collection], subtree, collection), sep="/")
        where = f"{path} does not fit {collection} {subtree or '(all)'!r}"
        _check_fits({k: v for k, v in target.items() if not untouched(k)}, flat, where)
        shard = traverse_util.flatten_dict(_subtree(shardings[collection], subtree, collection), sep="/")
        placed = host_to_sharded(flat, {k: shard[k] for k in flat})
        if filled is not None:
            filled.update("/".join(filter(None, (collection, subtree, k))) for k in placed)
        merged = traverse_util.unflatten_dict({**target, **placed}, sep="/")
        out[collection] = _replace(variables[collection], subtree, merged)
    return out


def init_variables_from(module, shardings: dict, key: jax.Array, sources: list[tuple[str, str]]) -> dict:
    """A fresh model's variables in `shardings`: `module`'s random init with every init source placed in order.

    A group's members that a source fills whole start as zeros instead of their compiled init (minutes on a CPU
    for the frozen UNets beside a ControlNet), which changes no value: the other members' keys do not depend on
    it. If a source leaves some leaf of such a member unfilled, everything is initialised after all."""
    placeholders = {sub for sub, _ in sources if sub in getattr(module, "members", {})}
    variables, filled = _init_and_load(module, shardings, key, sources, placeholders)
    unfilled = [k for k in traverse_util.flatten_dict(variables, sep="/")
                if k.split("/")[1] in placeholders and k not in filled]
    if unfilled:
        log.info("init: the sources left %d leaves of %s unfilled (%s, ...): initialising every member",
                 len(unfilled), sorted(placeholders), unfilled[0])
        variables, _ = _init_and_load(module, shardings, key, sources, set())
    return variables


def _init_and_load(module, shardings, key, sources, placeholders: set[str]) -> tuple[dict, set[str]]:
    init = functools.partial(module.init_variables, placeholders=placeholders) if placeholders else \
        module.init_variables
    variables = jax.jit(init, out_shardings=shardings)(key)
    filled: set[str] = set()
    for index, (subtree, path) in enumerate(sources):
        log.info("init %s from %s", subtree or "all params", path)
        variables = load_into(variables, shardings, subtree, path, module, jax.random.fold_in(key, index), filled)
    return variables, filled
