"""Parsing of the `file.py:key=value,flag` argument that config files take."""

from __future__ import annotations

import ast


def parse_arg(arg: str | None, **defaults):
    """Parse "variant=sdxl-base,tiny" into a dict, typed by the defaults.

    A bare word sets a boolean default to True. Keys not in `defaults` are refused by name.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.strip().lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            out[key] = type(default)(ast.literal_eval(value))
        else:
            out[key] = value.strip()
    return out


def load_config(spec: str):
    """Import `path/to/config.py[:arg]` and return its `get_config(arg)`, as ml_collections' flags do."""
    import importlib.util
    import pathlib

    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    spec_obj = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    return module.get_config(arg or None)


def model_section(**fields):
    """A config file's `model` section: `fields` plus the run-time choices every UNet-like module reads."""
    import ml_collections

    return ml_collections.ConfigDict(dict(
        **fields,
        dtype="float32",  # compute dtype: float32 | bfloat16
        param_dtype="float32",
        attention_backend="einsum",  # einsum | xla | cudnn | auto | a registered one (TPU splash)
        remat=False,  # rematerialise block activations in the backward pass
    ))
