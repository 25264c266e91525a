"""Reading and writing PyTorch-side weight files as flat {key: numpy array} dicts.

Reads .safetensors and .bin/.pt/.pth, single or sharded (`*.index.json`); writes .safetensors atomically.
Only .bin reading needs torch (the `torch` extra); safetensors work without it.
"""

from __future__ import annotations

import json
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from diffbody_jax.files import atomic_write

# Weight file names that diffusers and transformers write, in the order we look for them.
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin.index.json",
)


def find_weights(folder: str | os.PathLike, preferred: str | None = None) -> Path:
    """The weights file of a model folder: `preferred` (a family's own name) first, then the usual names."""
    folder = Path(folder)
    for name in ((preferred,) if preferred else ()) + tuple(WEIGHT_NAMES):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder}: no weight file found (looked for {', '.join(WEIGHT_NAMES)})")


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy, keeping bfloat16 (numpy has none; ml_dtypes provides it)."""
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def numpy_to_torch(array: np.ndarray):
    """A numpy array as a CPU torch tensor, keeping ml_dtypes' bfloat16 as torch.bfloat16."""
    import ml_dtypes
    import torch

    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # views of jax arrays are read-only; torch wants to own writable memory
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class _Inert(dict):
    """Stands in for a pickled object whose class we do not import (torchreid stores its yacs config in
    every checkpoint): it keeps its arguments and state as data and runs no code from the file."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.__dict__["args"] = args

    def __setstate__(self, state):
        self.__dict__["state"] = state


def _load_with_inert_objects(path: Path):
    """torch.load for a training checkpoint holding objects `weights_only` refuses. Globals outside torch's
    own weights-only allow-list become `_Inert` placeholders, so unpickling executes nothing new; the
    tensors come back as usual."""
    import torch
    from torch import _weights_only_unpickler

    allowed = _weights_only_unpickler._get_allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            obj = allowed.get(f"{module}.{name}")
            return obj if obj is not None else type(name, (_Inert,), {"__module__": module})

    restricted = types.SimpleNamespace(__name__="inert_pickle", Unpickler=Unpickler,
                                       load=lambda f, **kw: Unpickler(f, **kw).load())
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading .bin checkpoints needs torch: pip install 'diffbody_jax[torch]'") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = _load_with_inert_objects(path)
    # Training checkpoints nest the weights: KAIR/BasicSR under params_ema (preferred, as their test
    # scripts do) or params, Lightning under state_dict.
    for container in ("params_ema", "params", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(container), Mapping):
            obj = obj[container]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return _flatten_tensors(obj, torch.Tensor)


def _flatten_tensors(obj: Mapping, tensor_type, prefix: str = "") -> dict[str, np.ndarray]:
    """Tensors of a (possibly nested) dict, keys joined by "." (IP-Adapter's .bin holds {"image_proj": {...},
    "ip_adapter": {...}}); entries that are neither tensors nor dicts (step counters, configs) are dropped."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, tensor_type):
            out[prefix + str(key)] = torch_to_numpy(value)
        elif isinstance(value, Mapping) and not isinstance(value, _Inert):
            out.update(_flatten_tensors(value, tensor_type, f"{prefix}{key}."))
    return out


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str = "module.") -> dict[str, np.ndarray]:
    """Drop `prefix` from every key when every key has it (DataParallel's "module.", Lightning's "model.")."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def write_torch(obj: Mapping, path: str | os.PathLike) -> None:
    """torch.save a (possibly nested) dict of numpy arrays as torch tensors, atomically."""
    import torch

    def to_torch(value):
        return {k: to_torch(v) for k, v in value.items()} if isinstance(value, Mapping) else numpy_to_torch(value)

    tensors = to_torch(obj)
    atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat state dict from a weight file, a sharded index, or a folder holding one of those."""
    path = Path(path)
    if path.is_dir():
        path = find_weights(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weight file")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        if "weight_map" not in index:
            raise ValueError(f"{path}: a sharded index needs a 'weight_map'")
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_state_dict(path.parent / shard))
        missing = sorted(set(index["weight_map"]) - set(out))
        if missing:
            raise ValueError(f"{path}: keys listed in the index but absent from the shards: {missing}")
        return out
    if path.suffix == ".safetensors":
        try:
            return safetensors.numpy.load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".tar"):  # .pth.tar: torchreid's checkpoints
        return _read_bin(path)
    raise ValueError(f"{path}: unknown weight format {path.suffix!r} (expected .safetensors, .bin, .pt, .pth)")




def write_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=metadata))



