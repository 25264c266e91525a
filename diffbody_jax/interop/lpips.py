"""LPIPS weights: a torchvision backbone state dict (AlexNet's or VGG16's, `features.N.*`; the classifier is dropped)
plus the lpips package's linear layers (`lin{k}.model.1.weight`, from its wheel's `weights/v0.1/{alex,vgg}.pth`)
<-> `models.lpips.LPIPSNet` params.

    params = lpips_params("alex", torchvision_file, lin_file)    # reads, checks coverage both ways, converts
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from diffbody_jax.interop.mapping import CONV_OIHW_TO_HWIO, MappingTable, Rule, conv2d, torch_to_flax
from diffbody_jax.interop.torch_files import read_state_dict
from diffbody_jax.models.lpips import LPIPSNet

LIN_VERSION = "v0.1"


def backbone_table() -> MappingTable:
    """torchvision's `features.N.{weight,bias}` <-> `features/features_N/{kernel,bias}`; the classifier skipped."""
    return MappingTable(conv2d("features.*", "features/features_*"), skip=[r"^classifier\."])


def lin_table() -> MappingTable:
    """lpips' `lin{k}.model.1.weight` (a 1x1 convolution after a dropout) <-> `lin{k}/kernel`."""
    return MappingTable([Rule("lin*.model.1.weight", "lin*/kernel", CONV_OIHW_TO_HWIO)])


def packaged_lin_weights(backbone: str) -> Path:
    """The lpips wheel's linear layers for `backbone`, found without importing lpips (its import needs
    torchvision, which does not install beside the CPU torch)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the lpips package is not installed (`pip install --no-deps lpips`): its wheel "
                                "carries LPIPS's linear layers; or pass their .pth file")
    path = Path(spec.submodule_search_locations[0]) / "weights" / LIN_VERSION / f"{backbone}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed lpips package")
    return path


def _expected(backbone: str):
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda x: LPIPSNet(backbone).init(jax.random.key(0), x, x), x)["params"]


def lpips_params(backbone: str, backbone_weights: str | os.PathLike, lin_weights: str | os.PathLike | None = None):
    """LPIPSNet params from a torchvision state-dict file of `backbone` ("alex": alexnet-owt-*.pth, "vgg":
    vgg16-*.pth) and lpips' linear-layer file (None: the installed lpips package's). Raises ConversionError naming
    every missing, unexpected or misshapen key."""
    expected = _expected(backbone)
    features = torch_to_flax(read_state_dict(backbone_weights), backbone_table(),
                             {"features": expected["features"]}, source=str(backbone_weights))
    lin_path = lin_weights or packaged_lin_weights(backbone)
    lins = torch_to_flax(read_state_dict(lin_path), lin_table(),
                         {k: v for k, v in expected.items() if k != "features"}, source=str(lin_path))
    return {**features, **lins}
