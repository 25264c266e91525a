"""IP-Adapter-Plus weights (the colour adapter's initialisation) between PyTorch files and our params.

Our adapter params are one tree:

    {"image_proj": <Resampler params>,
     "ip_adapter": <the UNet's param tree cut down to every attn2/to_k_ip and attn2/to_v_ip>}

`with_ip_adapter(unet_params, adapter)` (in diffbody_jax.models.ip_adapter) puts the second half into the
params of a `UNet2DConditionModel(ip_adapter=True)`; `ip_adapter_of(unet_params)` takes it out.
Two PyTorch layouts are read:

  "original"   the file users download (ip-adapter-plus_sdxl_vit-h.bin / .safetensors): `image_proj` with the
               Resampler's own names (layers.i.0 = attention with norm1, norm2, to_q, a fused to_kv, to_out;
               layers.i.1.{0,1,3} = LayerNorm, Linear, Linear) and `ip_adapter` with `N.to_k_ip.weight`, N counting
               the UNet's attention processors in diffusers' order (down, up, mid blocks; attn1 then attn2), so
               cross-attentions have odd N. A .bin holds the two dicts; a .safetensors prefixes keys with
               "image_proj." and "ip_adapter.".
  "diffusers"  what `UNet2DConditionModel._load_ip_adapter_weights` builds: `encoder_hid_proj.
               image_projection_layers.0.*` (IPAdapterPlusImageProjection) and `<attn2>.processor.to_k_ip.0.weight`.

Export writes the original layout (`original_state_dict`), so a user's downloaded weights work unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffbody_jax.interop import torch_files
from diffbody_jax.interop.mapping import (
    LINEAR_T,
    ConversionError,
    MappingTable,
    Rule,
    flax_to_torch,
    linear,
    nest,
    norm,
    torch_to_flax,
)
from diffbody_jax.models.ip_adapter import IP_KERNELS, Resampler, ResamplerConfig, ip_adapter_of
from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig

_KV = re.compile(r"^(image_proj\.layers\.\d+\.0\.)to_kv\.weight$")
DIFFUSERS_PROJ = "encoder_hid_proj.image_projection_layers.0"


# ------------------------------------------------------------------------------ attention numbering
def ip_attention_paths(config: UNetConfig) -> list[str]:
    """Flax paths of the UNet's cross-attentions (attn2) in diffusers' `attn_processors` order.

    That order follows module registration: down blocks, up blocks, then the mid block (diffusers creates the
    up_blocks list before the mid block); inside each, attentions, transformer blocks, attn1 then attn2.
    """
    paths = []

    def block(prefix: str, attentions: int, depth: int):
        for j in range(attentions):
            for k in range(depth):
                paths.append(f"{prefix}/attentions_{j}/transformer_blocks_{k}/attn2")

    for i, kind in enumerate(config.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            block(f"down_blocks_{i}", config.layers[i], config.transformer_depths[i])
    for i, kind in enumerate(config.up_block_types):
        if kind == "CrossAttnUpBlock2D":
            block(f"up_blocks_{i}", config.layers[::-1][i] + 1, config.up_transformer_depths[i])
    block("mid_block", 1, config.transformer_depths[-1])
    return paths


# -------------------------------------------------------------------------------------- tables
def _resampler_rules(original: bool) -> list[Rule]:
    rows = [Rule("latents", "latents")] + linear("proj_in", "proj_in") + linear("proj_out", "proj_out")
    rows += norm("norm_out", "norm_out")
    if original:
        attn, t = "layers.*.0", lambda n: f"layers.*.0.{n}"
        rows += norm(t("norm1"), "layers_*/ln0") + norm(t("norm2"), "layers_*/ln1")
        # to_kv is split into these two halves before the table is read (and fused again on export)
        rows += linear(t("to_q"), "layers_*/attn/to_q", bias=False)
        rows += [Rule(f"{attn}.to_kv.weight[k]", "layers_*/attn/to_k/kernel", LINEAR_T)]
        rows += [Rule(f"{attn}.to_kv.weight[v]", "layers_*/attn/to_v/kernel", LINEAR_T)]
        rows += linear(t("to_out"), "layers_*/attn/to_out_0", bias=False)
        rows += norm("layers.*.1.0", "layers_*/ff_0")
        rows += linear("layers.*.1.1", "layers_*/ff_1/net_0/proj", bias=False)
        rows += linear("layers.*.1.3", "layers_*/ff_1/net_2", bias=False)
    else:
        rows += norm("layers.*.ln0", "layers_*/ln0") + norm("layers.*.ln1", "layers_*/ln1")
        for n in ("to_q", "to_k", "to_v"):
            rows += linear(f"layers.*.attn.{n}", f"layers_*/attn/{n}", bias=False)
        rows += linear("layers.*.attn.to_out.0", "layers_*/attn/to_out_0", bias=False)
        rows += norm("layers.*.ff.0", "layers_*/ff_0")
        rows += linear("layers.*.ff.1.net.0.proj", "layers_*/ff_1/net_0/proj", bias=False)
        rows += linear("layers.*.ff.1.net.2", "layers_*/ff_1/net_2", bias=False)
    return rows


def adapter_table(config: UNetConfig, layout: str = "original") -> MappingTable:
    """Rows between our adapter tree ({"image_proj", "ip_adapter"}) and a flat PyTorch layout."""
    if layout == "original":
        rows = nest("image_proj", "image_proj", _resampler_rules(original=True))
        for n, path in enumerate(ip_attention_paths(config)):
            for name in IP_KERNELS:
                rows += linear(f"ip_adapter.{2 * n + 1}.{name}", f"ip_adapter/{path}/{name}", bias=False)
        return MappingTable(rows)
    if layout == "diffusers":
        rows = nest(DIFFUSERS_PROJ, "image_proj", _resampler_rules(original=False))
        for block in ("down_blocks.*", "up_blocks.*", "mid_block"):
            flax_block = block.replace(".", "_")
            for name in IP_KERNELS:
                rows += linear(
                    f"{block}.attentions.*.transformer_blocks.*.attn2.processor.{name}.0",
                    f"ip_adapter/{flax_block}/attentions_*/transformer_blocks_*/attn2/{name}", bias=False,
                )
        return MappingTable(rows)
    raise ValueError(f"IP-Adapter layout {layout!r}; expected 'original' or 'diffusers'")


# --------------------------------------------------------------------------------- the Flax side
def adapter_shapes(unet, resampler: Resampler) -> dict:
    """The adapter tree's param shapes for `unet` (built with ip_adapter=True) and `resampler`: no memory."""
    if not getattr(unet, "ip_adapter", False):
        raise ValueError("adapter_shapes: build the UNet with ip_adapter=True")
    return {"image_proj": resampler.param_shapes(), "ip_adapter": ip_adapter_of(unet.param_shapes())}


# ---------------------------------------------------------------------------- PyTorch state dicts
def split_kv(flat: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The original layout's fused to_kv [2 I, D] as two halves (`...to_kv.weight[k]` and `[v]`)."""
    out = {}
    for key, value in flat.items():
        m = _KV.match(key)
        if m is None:
            out[key] = value
            continue
        if value.shape[0] % 2:
            raise ConversionError(source, misshapen=[(key, tuple(value.shape), "to_k + to_v", "an even first axis")])
        out[key + "[k]"], out[key + "[v]"] = np.split(np.asarray(value), 2, axis=0)
    return out


def fuse_kv(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v for k, v in flat.items() if not k.endswith(("[k]", "[v]"))}
    for key in flat:
        if key.endswith("[k]"):
            base = key[:-3]
            out[base] = np.concatenate([flat[key], flat[base + "[v]"]], axis=0)
    return dict(sorted(out.items()))


def detect_layout(flat: Mapping[str, Any], source: str) -> str:
    if any(k.startswith("image_proj.") for k in flat):
        return "original"
    if any(k.startswith(DIFFUSERS_PROJ + ".") for k in flat):
        return "diffusers"
    raise ValueError(
        f"{source}: not an IP-Adapter state dict: expected keys under 'image_proj.'/'ip_adapter.' (original) or "
        f"'{DIFFUSERS_PROJ}.' (diffusers); first keys: {sorted(flat)[:5]}"
    )


def infer_resampler_config(flat: Mapping[str, Any], source: str = "state dict", dim_head: int = 64) -> ResamplerConfig:
    """The Resampler's shape from its weights (either layout). The head count is not stored: it is the query
    width // dim_head, as diffusers' converter assumes (dim_head 64)."""
    prefix = "image_proj." if detect_layout(flat, source) == "original" else DIFFUSERS_PROJ + "."
    try:
        latents = flat[prefix + "latents"]
        proj_in, proj_out = flat[prefix + "proj_in.weight"], flat[prefix + "proj_out.weight"]
    except KeyError as e:
        msg = f"{source}: IP-Adapter-Plus Resampler key {e.args[0]} missing (is this IP-Adapter Plus?)"
        raise ValueError(msg) from None
    layer = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    depth = 1 + max(int(m.group(1)) for k in flat if (m := layer.match(k)))
    q = flat[prefix + ("layers.0.0.to_q.weight" if prefix == "image_proj." else "layers.0.attn.to_q.weight")]
    ff = flat[prefix + ("layers.0.1.1.weight" if prefix == "image_proj." else "layers.0.ff.1.net.0.proj.weight")]
    hidden = latents.shape[2]
    if q.shape[0] % dim_head or ff.shape[0] % hidden:
        raise ValueError(f"{source}: query width {q.shape[0]} is not a multiple of dim_head {dim_head}")
    return ResamplerConfig(
        embed_dims=proj_in.shape[1], output_dims=proj_out.shape[0], hidden_dims=hidden, depth=depth,
        dim_head=dim_head, heads=q.shape[0] // dim_head, num_queries=latents.shape[1], ffn_ratio=ff.shape[0] // hidden,
    )


def adapter_from_state_dict(
    flat: Mapping[str, np.ndarray], unet, resampler: Resampler, source: str = "state dict", dtype: Any = None
) -> dict:
    """Our adapter tree from a flat IP-Adapter state dict of either layout (detected from its keys).

    unet: the `UNet2DConditionModel(ip_adapter=True)` the kernels are for; resampler: the `Resampler` to fill.
    A diffusers UNet state dict may be passed whole: its plain UNet keys are ignored here.
    Every key must fit: missing, unexpected and misshapen keys are listed in one `ConversionError`.
    """
    layout = detect_layout(flat, source)
    if layout == "original":
        flat = split_kv(flat, source)
    else:
        flat = {k: v for k, v in flat.items() if k.startswith(DIFFUSERS_PROJ) or ".processor.to_" in k}
    table = adapter_table(unet.config, layout)
    return torch_to_flax(flat, table, adapter_shapes(unet, resampler), f"{source} ({layout} IP-Adapter)", dtype)


def original_state_dict(adapter: Mapping[str, Any], unet_config: UNetConfig) -> dict[str, np.ndarray]:
    """Our adapter tree -> the original IP-Adapter layout, flat with "image_proj." / "ip_adapter." prefixes."""
    return fuse_kv(flax_to_torch(adapter, adapter_table(unet_config, "original"), "IP-Adapter params"))


def diffusers_state_dict(adapter: Mapping[str, Any], unet_config: UNetConfig) -> dict[str, np.ndarray]:
    """Our adapter tree -> the keys `_load_ip_adapter_weights` adds to a diffusers UNet's state dict."""
    return flax_to_torch(adapter, adapter_table(unet_config, "diffusers"), "IP-Adapter params")


# ----------------------------------------------------------------------------------------- files
def read_ip_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat state dict from an IP-Adapter file: the original .bin ({"image_proj": {...}, "ip_adapter": {...}},
    flattened to "image_proj.*" / "ip_adapter.*"), its .safetensors (keys already prefixed), or a diffusers UNet
    weights file or folder holding the adapter."""
    return torch_files.read_state_dict(path)


def write_ip_adapter(path: str | os.PathLike, flat: Mapping[str, np.ndarray]) -> Path:
    """Write the original layout: .safetensors with prefixed keys, or .bin with the two nested dicts (what
    IP-Adapter's and diffusers' loaders read). Written to a temporary name, then renamed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        torch_files.write_safetensors(dict(flat), path)
        return path
    nested: dict[str, dict[str, np.ndarray]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part not in nested:
            raise ValueError(f"{path}: key {key!r} is neither under image_proj. nor ip_adapter.")
        nested[part][rest] = value
    torch_files.write_torch(nested, path)
    return path


def load_ip_adapter(
    path: str | os.PathLike, unet_config: UNetConfig, dim_head: int = 64, dtype: Any = None, **resampler_kwargs
) -> tuple[Resampler, dict]:
    """(Resampler module, adapter params) from an IP-Adapter-Plus file of either layout, for a UNet of
    `unet_config`; the Resampler's shape is read from the file (heads = query width // dim_head).
    resampler_kwargs: run-time fields of the Resampler (dtype=jnp.bfloat16, attention_backend=...)."""

    flat = read_ip_adapter(path)
    resampler = Resampler(infer_resampler_config(flat, str(path), dim_head), **resampler_kwargs)
    unet = UNet2DConditionModel(unet_config, ip_adapter=True)
    return resampler, adapter_from_state_dict(flat, unet, resampler, str(path), dtype)


# ------------------------------------------------------------------------------ as a model family
@dataclasses.dataclass(frozen=True)
class ColourAdapterConfig:
    """What the colour adapter's weights fit: the UNet whose cross-attentions get to_k_ip/to_v_ip, and the
    Resampler. Its config.json: {"_class_name": "IPAdapterPlus", "unet": <diffusers UNet config>, "resampler": ...}."""

    unet: UNetConfig
    resampler: ResamplerConfig

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "IPAdapterPlus", "unet": self.unet.to_dict(), "resampler": self.resampler.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> ColourAdapterConfig:
        missing = sorted({"unet", "resampler"} - set(d))
        if missing:
            raise ValueError(f"{source}: an IPAdapterPlus config needs {missing}")
        return cls(UNetConfig.from_dict(dict(d["unet"]), f"{source} (unet)"),
                   ResamplerConfig.from_dict({k: v for k, v in dict(d["resampler"]).items() if not k.startswith("_")},
                                             f"{source} (resampler)"))


@dataclasses.dataclass(frozen=True)
class ColourAdapter:
    """The colour adapter's weights as one loadable model: params {"image_proj": Resampler params, "ip_adapter":
    the to_k_ip/to_v_ip of `config.unet`}, as `load_ip_adapter` returns them. `resampler` is the module to run
    the first part with; `with_ip_adapter(unet_params, params)` puts the second into a UNet's params.
    A folder of this family holds IP-Adapter's original layout in `ip_adapter.safetensors`."""

    config: ColourAdapterConfig
    resampler_kwargs: tuple[tuple[str, Any], ...] = ()  # run-time fields of the Resampler (dtype, backend)

    @property
    def resampler(self) -> Resampler:
        return Resampler(self.config.resampler, **dict(self.resampler_kwargs))

    def param_shapes(self) -> dict:
        return adapter_shapes(UNet2DConditionModel(self.config.unet, ip_adapter=True), self.resampler)
