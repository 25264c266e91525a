"""Our side of a conversion: an orbax checkpoint with one item per model component plus a JSON config.

    <dir>/unet/      params of the "unet" component (orbax StandardSave)
    <dir>/config/    {"format": "diffbody_jax", "version": 1, "layout": "model" | "pipeline",
                      "components": {"unet": <diffusers config.json dict>, ...}}

Orbax writes to a temporary directory and renames it when complete, so a killed write leaves no
half-written checkpoint behind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from diffbody_jax.interop.mapping import ConversionError, flatten_params

FORMAT, VERSION = "diffbody_jax", 1


def is_flax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / "config").is_dir() and (Path(path) / "_CHECKPOINT_METADATA").exists()


def save_components(
    path: str | os.PathLike, components: dict[str, tuple[dict, Any]], layout: str = "pipeline", overwrite: bool = False
) -> Path:
    """Write {name: (diffusers config dict, params)} as one orbax checkpoint."""
    path = Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        import shutil

        shutil.rmtree(path)
    config = {"format": FORMAT, "version": VERSION, "layout": layout,
              "components": {name: cfg for name, (cfg, _) in components.items()}}
    items = {name: ocp.args.StandardSave(params) for name, (_, params) in components.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, ocp.args.Composite(config=ocp.args.JsonSave(config), **items))
    return path


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path).absolute()
    if not is_flax_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a diffbody_jax checkpoint (no config item)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        config = ckptr.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: config item has format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_component(path: str | os.PathLike, name: str, config: dict | None = None) -> tuple[dict, dict]:
    """(diffusers config dict, params as host numpy arrays) of one component.

    config: the checkpoint's config item, if the caller has already read it.
    """
    path = Path(path).absolute()
    config = config or read_config(path)
    if name not in config["components"]:
        raise KeyError(f"{path}: no component {name!r}; it holds {sorted(config['components'])}")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about the items we do not restore
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        params = ckptr.restore(path, ocp.args.Composite(**{name: ocp.args.StandardRestore()}))[name]
    return config["components"][name], params


def check_params(params: dict, expected: dict, source: str) -> None:
    """Raise one ConversionError naming every missing, unexpected or misshapen param."""
    got = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
    want = {k: tuple(v.shape) for k, v in flatten_params(expected).items()}
    unexpected = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    misshapen = [(k, got[k], k, want[k]) for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if unexpected or missing or misshapen:
        raise ConversionError(source, unexpected, missing, misshapen)
