"""The multi-branch joint UNet of DiffBody v2 stage 1 (seed 002, Eq. 1): one denoiser for RGB, depth and normal.

The authors' module is not published; this is our design, after HyperHuman's latent structural diffusion
and the authors' training script (branch_num, copy_first_n_block, copy_last_n_block, fusion="learn").

Inputs. `sample` [B, H, W, n_branches * C_in]: branch b's input in channels [b * C_in, (b + 1) * C_in), in the
order of `config.branches` (default rgb, depth, normal). Each is the branch's own noisy latent concatenated
with the pose latent (C_in = 8; conv_in is SD's widened from 4 inputs, the new 4 zero). One timestep per
example for all branches; text features and the optional size conditioning (`time_ids`) are shared.

Per branch (n = copy_first_n_block, m = copy_last_n_block; both may be 0, and they may differ):
  conv_in and down blocks 0 .. n-1;  up blocks N-m .. N-1, conv_norm_out and conv_out.
Shared: down blocks n .. N-1, the mid block, up blocks 0 .. N-m-1, the time (and size) embedding.

Fusion. w = softmax(fusion_logits) over branches, the logits a learned [n_branches] vector initialised
to zero (equal weights), so three identical branches behave exactly like one UNet. Where the branches enter
the shared trunk (after their first n down blocks, or after conv_in when n = 0) the trunk input is
h = sum_b w_b h_b.

Skips. Skip positions are numbered as in the UNet: conv_in's output, then every ResNet and downsampler.
Positions produced per branch are fused with the same w wherever a shared up block consumes them. A
per-branch up block consumes its own branch's skips at per-branch positions and the shared skips at
shared positions. Every per-branch up path starts from the shared trunk's output (the last shared up block,
or the mid block when m = N).

Output. Each branch's prediction (v in the authors' runs), concatenated on channels in branch order:
[B, H, W, n_branches * out_channels].

Stage-1 ControlNet (Eq. 2 only says that it conditions all three branches; the routing is our choice): a
ControlNet built from the same UNet config with a latent condition E(I_ir) (configs/controlnet.py variant
diffbody-v2-stage1) sees the RGB branch's 8-channel input. Its down residual at skip position p is added to
that position's skip in every branch and to the fused skip (fused from the branches' raw skips, then the
residual added), and its mid residual to the shared mid block's output.

PyTorch layout (`interop.joint_unet.joint_unet_table`), block indices those of the plain UNet:
  conv_in_branch.{b}, down_blocks_branch.{b}.{j} (j < n), down_blocks.{j} (j >= n), mid_block,
  up_blocks.{j} (j < N - m), up_blocks_branch.{b}.{j} (j >= N - m), conv_norm_out_branch.{b},
  conv_out_branch.{b}, time_embedding, add_embedding (size conditioning only), fusion_logits.
Blocks inside keep diffusers' names, so a plain SD UNet's shared blocks load under unchanged keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.config import runtime_kwargs
from diffbody_jax.models.layers import Array, conv
from diffbody_jax.models.param_copy import copy_from_unet
from diffbody_jax.models.unet import (
    UNetConfig,
    UNetModule,
    add_residuals,
    down_block,
    dummy_unet_inputs,
    mid_block,
    output_head,
    time_embedding,
    up_block,
)

_JOINT_FIELDS = ("branches", "copy_first_n_block", "copy_last_n_block")


@dataclasses.dataclass(frozen=True)
class JointUNetConfig:
    """The per-branch UNet (`unet`: in_channels and out_channels per branch) and how it splits into branches."""

    unet: UNetConfig
    branches: tuple[str, ...] = ("rgb", "depth", "normal")
    copy_first_n_block: int = 1
    copy_last_n_block: int = 1

    def __post_init__(self):
        n = self.unet.num_blocks
        for name in ("copy_first_n_block", "copy_last_n_block"):
            value = getattr(self, name)
            if not 0 <= value <= n:
                raise ValueError(f"JointUNet config: {name}={value} is outside 0..{n} (the UNet has {n} levels)")
        if not self.branches or len(set(self.branches)) != len(self.branches):
            raise ValueError(f"JointUNet config: branches must be distinct names, got {self.branches}")
        object.__setattr__(self, "branches", tuple(self.branches))

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def num_branch_skips(self) -> int:
        """Skip positions produced per branch: conv_in's plus those of the first n down blocks."""
        n = self.copy_first_n_block
        last = self.unet.num_blocks - 1
        return 1 + sum(self.unet.layers[:n]) + sum(1 for i in range(n) if i < last)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config") -> JointUNetConfig:
        """From our config.json: the UNet's diffusers fields plus branches, copy_first_n_block, copy_last_n_block."""
        config = {k: v for k, v in config.items() if k != "_class_name"}
        joint = {k: config.pop(k) for k in _JOINT_FIELDS if k in config}
        return cls(UNetConfig.from_dict(config, source), **joint)

    def to_dict(self) -> dict[str, Any]:
        d = self.unet.to_dict()
        d["_class_name"] = "JointUNet"
        d.update(branches=list(self.branches), copy_first_n_block=self.copy_first_n_block,
                 copy_last_n_block=self.copy_last_n_block)
        return d

    @classmethod
    def from_unet(cls, unet: UNetConfig, *, in_channels: int = 8, num_time_ids: int = 0,
                  addition_time_embed_dim: int = 256, **joint) -> JointUNetConfig:
        """The joint UNet over a plain SD UNet: conv_in widened to `in_channels`, optional size conditioning
        with `num_time_ids` values (6 as SDXL; 8 with aesthetic score and watermark probability).
        """
        fields: dict[str, Any] = {"in_channels": in_channels}
        if num_time_ids:
            fields.update(addition_embed_type="time", addition_time_embed_dim=addition_time_embed_dim,
                          projection_class_embeddings_input_dim=num_time_ids * addition_time_embed_dim)
        return cls(dataclasses.replace(unet, **fields), **joint)


class JointUNet(UNetModule):
    """Multi-branch UNet over a `JointUNetConfig`; see the module docstring for the design."""

    @nn.compact
    def __call__(
        self,
        sample: Array,
        timesteps: Array,
        encoder_hidden_states: Array,
        *,
        text_embeds: Array | None = None,
        time_ids: Array | None = None,
        down_residuals: Sequence[Array] | None = None,
        mid_residual: Array | None = None,
    ) -> Array:
        """sample: [B, H, W, n_branches * in_channels]; timesteps: [B] or scalar;
        encoder_hidden_states: [B, S, cross_attention_dim]; time_ids: [B, num_time_ids] with size conditioning;
        down_residuals / mid_residual: a ControlNet's residuals, routed as in the module docstring.
        Returns [B, H, W, n_branches * out_channels].
        """
        jc, c = self.config, self.config.unet
        nb, n_first, n_shared_up = jc.num_branches, jc.copy_first_n_block, c.num_blocks - jc.copy_last_n_block
        if sample.shape[-1] != nb * c.in_channels:
            raise ValueError(
                f"JointUNet: sample has {sample.shape[-1]} channels; expected {nb} branches x {c.in_channels} "
                f"({', '.join(jc.branches)})"
            )
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        temb = time_embedding(self, c, timesteps, x.shape[0], text_embeds, time_ids)
        if c.center_input_sample:
            x = 2 * x - 1.0

        logits = self.param("fusion_logits", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                            (nb,), self.param_dtype)
        weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)

        def fuse(tensors):
            return sum(weights[b] * tensors[b] for b in range(nb))

        branch_h, branch_skips = [], []
        for b, h in enumerate(jnp.split(x, nb, axis=-1)):
            h = conv(self, c.block_out_channels[0], c.conv_in_kernel, f"conv_in_branch_{b}")(h)
            skips = [h]
            for i in range(n_first):
                h, block_skips = down_block(self, c, i, f"down_blocks_branch_{b}_{i}")(h, temb, context)
                skips.extend(block_skips)
            branch_h.append(h)
            branch_skips.append(skips)

        x = fuse(branch_h)
        shared = []
        for i in range(n_first, c.num_blocks):
            x, block_skips = down_block(self, c, i, f"down_blocks_{i}")(x, temb, context)
            shared.extend(block_skips)
        fused = [fuse([s[p] for s in branch_skips]) for p in range(jc.num_branch_skips)]

        trunk_skips = add_residuals(fused + shared, down_residuals)
        branch_skips = [add_residuals(s + shared, down_residuals) for s in branch_skips]

        x = mid_block(self, c)(x, temb, context)
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)

        counts = c.skips_per_up_block
        end = len(trunk_skips)
        for i in range(n_shared_up):
            block_skips, end = trunk_skips[end - counts[i]: end], end - counts[i]
            size = tuple(trunk_skips[end - 1].shape[1:3]) if end else None
            x = up_block(self, c, i, size, f"up_blocks_{i}")(x, tuple(block_skips), temb, context)

        outputs = []
        for b, skips in enumerate(branch_skips):
            h, e = x, end
            for i in range(n_shared_up, c.num_blocks):
                block_skips, e = skips[e - counts[i]: e], e - counts[i]
                size = tuple(skips[e - 1].shape[1:3]) if e else None
                h = up_block(self, c, i, size, f"up_blocks_branch_{b}_{i}")(h, tuple(block_skips), temb, context)
            outputs.append(output_head(self, c, h, suffix=f"_branch_{b}"))
        return jnp.concatenate(outputs, axis=-1)

    def dummy_inputs(self, batch: int = 1, size: int | None = None) -> dict[str, Array]:
        c = self.config.unet
        return dummy_unet_inputs(self, c, self.config.num_branches * c.in_channels, batch, size)

    def fusion_weights(self, params: dict) -> dict[str, float]:
        """The current softmax fusion weights by branch name, for logging."""
        w = jax.nn.softmax(jnp.asarray(params["fusion_logits"], jnp.float32))
        return {name: float(w[b]) for b, name in enumerate(self.config.branches)}


_BRANCH_ROOT = re.compile(r"^(conv_in|conv_norm_out|conv_out)_branch_\d+/")
_BRANCH_BLOCK = re.compile(r"^(down|up)_blocks_branch_\d+_(\d+)/")


def _unet_path(path: str) -> str | None:
    """The plain UNet param a joint UNet param starts from (None: keep the fresh value)."""
    if path == "fusion_logits":
        return None
    path = _BRANCH_ROOT.sub(r"\1/", path)
    return _BRANCH_BLOCK.sub(r"\1_blocks_\2/", path)


def joint_unet_from_unet(unet_params: dict, joint: JointUNet, rng: jax.Array) -> tuple[dict, list[str]]:
    """JointUNet params from a plain UNet's params: every branch copy and every shared block starts from the
    same SD block; conv_in widened with zero input channels; fusion logits zero (equal weights).

    A size-conditioning `add_embedding` that the UNet lacks starts fresh with its output layer zeroed, so
    the joint UNet initially predicts exactly what the UNet predicts for each branch's own latent.
    Returns (params, the copied Flax paths).
    """
    has_add = "add_embedding" in unet_params

    def source(path: str) -> str | None:
        if path.startswith("add_embedding/") and not has_add:
            return None
        return _unet_path(path)

    params, copied = copy_from_unet(joint.init_params(rng), unet_params, source, "JointUNet")
    if "add_embedding" in params and not has_add:
        linear_2 = params["add_embedding"]["linear_2"]
        params["add_embedding"]["linear_2"] = jax.tree.map(jnp.zeros_like, linear_2)
    return params, copied


def branch_unet_params(joint_params: dict, config: JointUNetConfig, branch: str = "rgb") -> dict:
    """One branch of a joint UNet as plain UNet params (`config.unet`'s layout): the branch's conv_in (its pose
    input channels included), down blocks, up blocks and output head, with the shared trunk, time and size
    embeddings. The fusion logits are dropped. The stage-1 ControlNet starts from this (RGB) view."""
    if branch not in config.branches:
        raise ValueError(f"JointUNet has no branch {branch!r}; branches: {', '.join(config.branches)}")
    b = config.branches.index(branch)
    own = re.compile(rf"^(conv_in|conv_norm_out|conv_out)_branch_{b}$|^(down|up)_blocks_branch_{b}_(\d+)$")
    other = re.compile(r"_branch_\d+")
    out = {}
    for name, value in joint_params.items():
        m = own.match(name)
        if m:
            out[m.group(1) or f"{m.group(2)}_blocks_{m.group(3)}"] = value
        elif name != "fusion_logits" and not other.search(name):
            out[name] = value
    return out


def build_joint_unet(model_config) -> JointUNet:
    """The module described by a `configs/joint_unet.py` `model` section."""

    return JointUNet(JointUNetConfig.from_dict(dict(model_config["config"]), "model.config"),
                     **runtime_kwargs(model_config, scan_layers=True))
