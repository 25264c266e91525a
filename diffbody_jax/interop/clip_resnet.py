"""OpenAI CLIP ResNet checkpoints (the layout of OpenAI's `RN50.pt` and of open_clip's `RN50` state dicts) <-> our
`models.clip_resnet.CLIPResNet` (image tower) and `models.clip.CLIPTextModel` with projection (text tower).

    model = read_clip_resnet("RN50.pt")      # configs, variables of both towers, logit scale; coverage checked

The architecture is read from the tensors' shapes, as OpenAI's `build_model` reads it: image width from
`layer1.0.conv1`, blocks per stage from the key names, input resolution from the attention pool's positional
embedding, heads = width * 32 / 64; text width from `ln_final`, heads = width / 64, layers from the key names.
Image-tower keys map by name (`layer1.0.downsample.1.running_mean` <-> batch_stats `layer1_0/downsample_1/mean`);
the text tower's fused `in_proj_weight` is split into q, k and v and the rest renamed to transformers' CLIP layout,
which `interop.clip` then maps. `text_projection` is stored [width, embed] (x @ P) by OpenAI, [embed, width] by
transformers. A TorchScript archive (OpenAI's own files) is read through torch.jit.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.interop.clip import clip_text_table
from diffbody_jax.interop.hrnet import torch_key
from diffbody_jax.interop.mapping import (
    IDENTITY,
    LINEAR_T,
    MappingTable,
    Rule,
    flatten_params,
    torch_to_flax,
)
from diffbody_jax.interop.torch_files import read_state_dict, torch_to_numpy
from diffbody_jax.models.clip import CLIPTextConfig, CLIPTextModel
from diffbody_jax.models.clip_resnet import CLIPResNetConfig, init_shapes

_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out_0": "c_proj"}


@dataclasses.dataclass
class CLIPResNetCheckpoint:
    """Both towers of a ResNet CLIP: configs, Flax variables ({"params", "batch_stats"} for the image tower,
    {"params"} for the text tower) and the logit scale (exp of the stored `logit_scale`: 100 for OpenAI's)."""

    vision: CLIPResNetConfig
    vision_variables: dict
    text: CLIPTextConfig
    text_params: dict
    logit_scale: float


def vision_table(variables: dict, prefix: str = "visual.") -> MappingTable:
    """A row per leaf of the image tower's variables (or their shapes); `num_batches_tracked` is dropped."""
    rows = []
    for path in flatten_params(variables):
        _, *module, leaf = path.split("/")
        if module[0] == "attnpool":
            key = ("attnpool.positional_embedding" if leaf == "positional_embedding"
                   else f"attnpool.{_ATTN[module[2]]}.{'weight' if leaf == 'kernel' else 'bias'}")
            transform = LINEAR_T if leaf == "kernel" else IDENTITY
        else:  # convolutions and BatchNorms: named as torch's modules, as HRNet's are
            key, transform = torch_key(path)
        rows.append(Rule(prefix + key, path, transform))
    return MappingTable(rows, skip=[r"num_batches_tracked$"])


def vision_config(state: dict, prefix: str = "visual.") -> CLIPResNetConfig:
    """The image tower's config from its tensors (OpenAI's `build_model` rules)."""
    layers = tuple(len({k.split(".")[2] for k in state if k.startswith(f"{prefix}layer{i}.")}) for i in (1, 2, 3, 4))
    width = state[f"{prefix}layer1.0.conv1.weight"].shape[0]
    grid = round((state[f"{prefix}attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return CLIPResNetConfig(layers=layers, width=width, output_dim=state[f"{prefix}attnpool.c_proj.weight"].shape[0],
                            heads=width * 32 // 64, input_resolution=grid * 32)


def text_config(state: dict) -> CLIPTextConfig:
    width = state["ln_final.weight"].shape[0]
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    return CLIPTextConfig(vocab_size=state["token_embedding.weight"].shape[0], hidden_size=width,
                          intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                          projection_dim=state["text_projection"].shape[1], num_hidden_layers=layers,
                          num_attention_heads=width // 64,
                          max_position_embeddings=state["positional_embedding"].shape[0], with_projection=True)


_TEXT_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias"}
_TEXT_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
_NOT_TEXT = re.compile(r"^(visual\.|logit_scale$|input_resolution$|context_length$|vocab_size$)")


def text_state_to_transformers(state: dict) -> dict[str, np.ndarray]:
    """OpenAI's text-tower keys -> transformers' CLIPTextModelWithProjection keys (in_proj split into q, k, v).
    A key of neither tower raises ValueError naming it."""
    out, unknown = {}, []
    for key, value in state.items():
        block = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        fused = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if key in _TEXT_TOP:
            out[_TEXT_TOP[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = np.ascontiguousarray(np.asarray(value).T)
        elif fused:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0), strict=True):
                out[f"text_model.encoder.layers.{fused.group(1)}.self_attn.{name}.{fused.group(2)}"] = part
        elif block and block.group(2) in _TEXT_BLOCK:
            layer, module, kind = block.groups()
            out[f"text_model.encoder.layers.{layer}.{_TEXT_BLOCK[module]}.{kind}"] = value
        elif not _NOT_TEXT.match(key):
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys of neither CLIP tower: {sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}")
    return out


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        return read_state_dict(path)
    except Exception as first:  # noqa: BLE001 - OpenAI's own files are TorchScript archives
        import torch

        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception:  # noqa: BLE001
            raise ValueError(f"{path}: neither a state dict nor a TorchScript archive ({first})") from None
        return {k: torch_to_numpy(v) for k, v in module.state_dict().items()}


def read_clip_resnet(path: str | os.PathLike) -> CLIPResNetCheckpoint:
    """Both towers of an OpenAI-layout ResNet CLIP checkpoint (`visual.*`, `transformer.*`, ...); open_clip's state
    dicts are the same layout. Raises ConversionError naming every missing, unexpected or misshapen key."""
    path = Path(path)
    state = _read(path)
    if "state_dict" in state:
        state = state["state_dict"]
    if "visual.attnpool.positional_embedding" not in state:
        raise ValueError(f"{path}: not a ResNet CLIP checkpoint (no visual.attnpool.positional_embedding; ViT CLIPs "
                         "are not what CLIP-IQA scores with)")
    vision = vision_config(state)
    shapes = init_shapes(vision)
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    vision_variables = torch_to_flax(visual, vision_table(shapes), shapes, source=f"{path} (image tower)")
    text = text_config(state)
    ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
    text_shapes = jax.eval_shape(lambda i: CLIPTextModel(text).init(jax.random.key(0), i), ids)["params"]
    try:
        text_state = text_state_to_transformers(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    text_params = torch_to_flax(text_state, clip_text_table(text), text_shapes, source=f"{path} (text tower)")
    scale = float(np.exp(np.asarray(state["logit_scale"], np.float64))) if "logit_scale" in state else 100.0
    return CLIPResNetCheckpoint(vision, vision_variables, text, text_params, scale)
