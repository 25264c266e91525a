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

from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from diffbody_jax.interop.pretrained import init_from_pretrained_unet, load_weights_for
from diffbody_jax.parallel.sharding import host_to_sharded


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


def load_into(variables: dict, shardings: dict, subtree: str, path: str, module, rng: jax.Array) -> dict:
    """`variables` with one init source placed at `subtree` of `module` (its member there), in `shardings`."""
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
        if collection not in variables:
            raise ValueError(f"train.init_from {path}: holds {collection!r}, which the model has none of")
        target = traverse_util.flatten_dict(_subtree(variables[collection], subtree, collection), sep="/")
        where = f"{path} does not fit {collection} {subtree or '(all)'!r}"
        _check_fits({k: v for k, v in target.items() if not untouched(k)}, flat, where)
        shard = traverse_util.flatten_dict(_subtree(shardings[collection], subtree, collection), sep="/")
        placed = host_to_sharded(flat, {k: shard[k] for k in flat})
        merged = traverse_util.unflatten_dict({**target, **placed}, sep="/")
        out[collection] = _replace(variables[collection], subtree, merged)
    return out
