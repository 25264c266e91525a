"""Helpers for parity tests against PyTorch references: random weights, layout moves, configs."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from diffbody_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def unet_diffusers_config(variant: str) -> dict:
    return dict(load_config(f"{REPO}/configs/unet.py:variant={variant}").model.diffusers.to_dict())


def bodypart_config(variant: str = "tiny", **fields):
    """BodyPartConfig of configs/bodypart.py's `variant`, with field overrides."""
    from diffbody_jax.models.registry import build_model

    net = build_model(load_config(f"{REPO}/configs/bodypart.py:variant={variant}").model)
    return dataclasses.replace(net.config, **fields)


def hrnet_config(variant: str = "tiny", **fields):
    """The HRNet backbone of configs/bodypart.py's `variant` (tiny: TINY_HRNET, with its incre head), overridden."""
    return dataclasses.replace(bodypart_config(variant).hrnet, **fields)


def resampler_config(**fields):
    """The Resampler of configs/stage2.py:variant=tiny (CLIP width 24, 32 out), with field overrides."""
    from diffbody_jax.models.ip_adapter import ResamplerConfig

    section = load_config(f"{REPO}/configs/stage2.py:variant=tiny").model.resampler.to_dict()
    return dataclasses.replace(ResamplerConfig.from_dict(section, "stage2:variant=tiny"), **fields)


def randomize_(module, seed: int = 0) -> None:
    """Overwrite every parameter with values that make a layout mix-up visible.

    Kernels ~ N(0, 1/fan_in); norm scales 1 + N(0, 0.1); biases N(0, 0.1). Zero-initialised layers
    (ControlNet outputs, etc.) and unit norms would hide a transposed or swapped tensor.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def randomize_batch_norm_stats_(module, seed: int = 0) -> None:
    """Running means ~ 0.1 N(0, 1) and variances ~ U(0.5, 1.5), so a swapped mean/var would show."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))


def state_dict_numpy(module) -> dict[str, np.ndarray]:
    from diffbody_jax.interop.torch_files import torch_to_numpy

    return {k: torch_to_numpy(v) for k, v in module.state_dict().items()}


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def vae_diffusers_config(variant: str) -> dict:
    return dict(load_config(f"{REPO}/configs/vae.py:variant={variant}").model.diffusers.to_dict())


def controlnet_diffusers_config(variant: str) -> dict:
    return dict(load_config(f"{REPO}/configs/controlnet.py:variant={variant}").model.diffusers.to_dict())


def torch_controlnet(config: dict, seed: int = 0):
    """diffusers' ControlNetModel for a config of ours, random weights (output convs included).

    A "latent" conditioning embedding has no diffusers class: the twin's embedding is the single 3x3
    conv that ours is, under the key ours exports (`controlnet_cond_embedding.conv_out`).
    """
    import diffusers
    import torch

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    latent = config.pop("conditioning_embedding_type", "pixel") == "latent"
    ref = diffusers.ControlNetModel.from_config(config).eval()
    if latent:
        class LatentConditioning(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv_out = torch.nn.Conv2d(config["conditioning_channels"], ref.config.block_out_channels[0], 3,
                                                padding=1)

            def forward(self, x):
                return self.conv_out(x)

        ref.controlnet_cond_embedding = LatentConditioning()
    randomize_(ref, seed)
    return ref


def assert_coverage(ref_meta, ours, table, n_keys: int, n_params: int, source: str) -> None:
    """Every key of a PyTorch module (built on the meta device) maps both ways onto `ours` with equal shapes,
    and both sides hold the measured key and parameter counts. No weights, no memory."""
    from diffbody_jax.interop.mapping import flatten_params, plan_import

    torch_shapes = {k: tuple(v.shape) for k, v in ref_meta.state_dict().items()}
    assert len(torch_shapes) == n_keys
    flax_shapes = {k: tuple(v.shape) for k, v in flatten_params(ours.param_shapes()).items()}
    assert sum(int(np.prod(s)) for s in flax_shapes.values()) == n_params
    plan = plan_import(torch_shapes, flax_shapes, table, source)  # raises on any gap
    assert len(plan) == len(torch_shapes) == len(flax_shapes)
    for path, shape in flax_shapes.items():  # export direction
        key, transform = table.torch_key(path)
        assert torch_shapes[key] == transform.torch_shape(shape), path


class _Dummy(type):
    """A class whose every attribute is another dummy class: enough for module-level uses of torchvision."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy(name, (), {})

    def __call__(cls, *args, **kwargs):
        return cls


def import_with_torchvision_stub(module: str, path: str | None = None):
    """Import `module` while `import torchvision[.x.y]` gives dummy modules, then remove every trace.

    torchvision cannot be installed beside the CPU torch; spandrel imports it for architectures we never
    build. The stub is taken away afterwards so that transformers/diffusers still see no torchvision.
    path: load the module from this file alone, without running its package's __init__.
    """
    import importlib
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import sys
    import types

    class Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Dummy(name, (), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Module(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        if path is None:
            return importlib.import_module(module)
        spec = importlib.util.spec_from_file_location(module, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def spandrel_swinir_class():
    """The official SwinIR definition as spandrel 0.4 carries it."""
    return import_with_torchvision_stub("spandrel.architectures.SwinIR.__arch.SwinIR").SwinIR


def timm_hrnet_or_skip():
    """timm's HRNet module (the HRNet and BPBreID reference), imported past the torchvision stub; skips the
    calling test module when timm is not installed."""
    import pytest

    try:
        return import_with_torchvision_stub("timm.models.hrnet")
    except ImportError as e:
        pytest.skip(f"timm is needed for the reference: {e}", allow_module_level=True)


def basicsr_degradations_or_skip():
    """basicsr's `data/degradations.py` (Real-ESRGAN's kernels, noise and JPEG), loaded from its file alone:
    basicsr's package __init__ imports every architecture and dataset. Skips the calling module without it."""
    import importlib.util
    import pathlib

    import pytest

    spec = importlib.util.find_spec("basicsr")
    if spec is None or spec.origin is None:
        pytest.skip("basicsr is needed for the reference (pip install --no-deps basicsr==1.4.2)",
                    allow_module_level=True)
    path = pathlib.Path(spec.origin).parent / "data" / "degradations.py"
    return import_with_torchvision_stub("basicsr_degradations", str(path))


def optional(name: str):
    """The module `name`, or None when it is not installed (the torch extra's packages in mixed test modules)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _have(*names: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(n) is not None for n in names)


def _needs(*names: str, what: str):
    import pytest

    return pytest.mark.skipif(not _have(*names), reason=f"needs {what}")


# Marks for the tests of a module that need the PyTorch references; the module's pure-JAX tests run without them.
needs_torch = _needs("torch", "diffusers", "transformers",
                     what="the torch extra (torch, diffusers, transformers): pip install -e '.[torch]'")


def pyiqa_module(name: str):
    """pyiqa's module `name` ("archs.musiq_arch", "data.multiscale_trans_util"), imported with the modules it needs
    but without running pyiqa's package __init__s (they import every metric, torchvision among them); skips the
    calling test module without pyiqa. The parent packages are bare modules that exist only during the import."""
    import importlib
    import importlib.util
    import sys
    import types
    from pathlib import Path

    import pytest

    spec = importlib.util.find_spec("pyiqa")
    if spec is None:
        pytest.skip("pyiqa's architectures are the reference (pip install --no-deps pyiqa)", allow_module_level=True)
    root = Path(spec.submodule_search_locations[0])
    packages = ("pyiqa", "pyiqa.archs", "pyiqa.utils", "pyiqa.matlab_utils", "pyiqa.data")
    saved = {n: sys.modules.get(n) for n in packages}
    before = set(sys.modules)
    for package in packages:
        bare = types.ModuleType(package)
        bare.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
        sys.modules[package] = bare
    try:
        padding = import_with_torchvision_stub("pyiqa.matlab_utils.padding")
        sys.modules["pyiqa.matlab_utils"].ExactPadding2d = padding.ExactPadding2d
        sys.modules["pyiqa.matlab_utils"].exact_padding_2d = padding.exact_padding_2d
        return import_with_torchvision_stub(f"pyiqa.{name}")
    finally:
        for added in [n for n in set(sys.modules) - before if n.startswith("pyiqa.")]:
            del sys.modules[added]
        for package, module in saved.items():
            if module is None:
                sys.modules.pop(package, None)
            else:
                sys.modules[package] = module
