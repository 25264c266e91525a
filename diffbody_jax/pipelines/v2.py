"""DiffBody v2 restoration (seed 002): SwinIR -> I_ir; stage 1: the joint UNet (RGB, depth and normal branches on
SD2.1) steered by the stage-1 ControlNet on E(I_ir) -> I_res, depth, normal; stage 2: SDXL steered by the
prior-fusion ControlNet on {I_ir, pose, depth, normal} and by the colour adapter on CLIP features of I_res -> the
restoration.

    pipe = V2Pipeline(stage1, stage2, schedule1, schedule2, SamplerConfig(num_steps=200), SamplerConfig(num_steps=200))
    out = pipe(variables, key, degraded, pose, context, text_xl)   # {"restored", "i_ir", "i_res", "depth", ...}

stage1: a `ModelGroup` with swinir, vae, joint_unet, controlnet (the members of configs/stage1_controlnet.py);
stage2: a `ModelGroup` with stage2 (SDXL UNet + prior-fusion ControlNet + Resampler), vae and image_encoder (SDXL's
VAE and the adapter's CLIP vision tower; the members of configs/colour_adapter.py). variables = {"stage1": ...,
"stage2": ...}, each its group's variables. Text encoders are not run here: context is SD2.1's [B, 77, D] and
text_xl an `SDXLText` (`pipelines.restore` encodes prompts once per batch).

Images are NHWC RGB in [0, 1], H and W multiples of both VAE factors. Every stage is a method that jits alone;
`__call__` runs them as one jitted program.

Choices the paper leaves open (docs/restoring.md):
- Stage 1 samples the three branches jointly from independent noise (as it trains them, Eq. 1), one t for all.
- The pose latent is normalised like the training run when `latent_stats` is given (the authors' --normalize_dist);
  the depth and normal latents are mapped back before decoding.
- The depth prior handed to stage 2 is the decoded depth branch's channel mean, repeated on three channels (the
  prior-fusion ControlNet's depth input is a 3-channel image, as in training).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from diffbody_jax.conditioning.clip_image import colour_adapter_features
from diffbody_jax.diffusion.losses import normalize_latent
from diffbody_jax.diffusion.samplers import SamplerConfig, make_sampler
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.models.tiling import tiled_map
from diffbody_jax.models.unet import SDXLText
from diffbody_jax.models.vae import decode_latents_tiled, encode_latents_tiled
from diffbody_jax.pipelines.colour_fix import colour_fix
from diffbody_jax.pipelines.tiles import TileConfig, latent_tiled_eps

Array = jax.Array
STAGE1_MEMBERS = ("swinir", "vae", "joint_unet", "controlnet")
STAGE2_MEMBERS = ("stage2", "vae", "image_encoder")


def _factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _check_members(group, needed: Sequence[str], what: str) -> None:
    missing = [m for m in needed if m not in group.members]
    if missing:
        raise ValueError(f"V2Pipeline: the {what} group lacks {missing}")


class V2Pipeline:
    def __init__(self, stage1, stage2, schedule1: NoiseSchedule, schedule2: NoiseSchedule,
                 sampler1: SamplerConfig | None = None, sampler2: SamplerConfig | None = None, *,
                 latent_stats: Mapping[str, Sequence[float]] | None = None, colour: str = "none",
                 adapter_scale: float = 1.0, conditioning_scale: float = 1.0, on_step=None,
                 tiles: TileConfig | None = None):
        _check_members(stage1, STAGE1_MEMBERS, "stage-1")
        _check_members(stage2, STAGE2_MEMBERS, "stage-2")
        self.stage1, self.stage2 = stage1, stage2
        self.sampler1 = sampler1 or SamplerConfig(num_steps=200)
        self.sampler2 = sampler2 or SamplerConfig(num_steps=200)
        self.branches = tuple(stage1.joint_unet.config.branches)
        if "rgb" not in self.branches:
            raise ValueError(f"V2Pipeline: the joint UNet has branches {self.branches}; stage 1 needs 'rgb'")
        self.latent_stats, self.colour = latent_stats, colour
        self.adapter_scale, self.conditioning_scale = adapter_scale, conditioning_scale
        self.factor = max(_factor(stage1.vae), _factor(stage2.vae))
        self.tiles = tiles
        if tiles is not None:
            tiles.check(self.factor)
        # on_step(stage, step index): a progress bar's hook (None: nothing added to the programs)
        def hook(stage):
            return None if on_step is None else (lambda i: on_step(stage, i))

        self._sample1 = make_sampler(self._eps1, schedule1, self.sampler1, on_step=hook(1))
        self._sample2 = make_sampler(self._eps2, schedule2, self.sampler2, on_step=hook(2))

    # ------------------------------------------------------------------ stage 0
    def regress(self, variables, degraded: Array) -> Array:
        """I_ir = SwinIR(degraded), clipped to [0, 1]; on overlapping tiles when tiled."""
        def swinir(x):
            return self.stage1.apply("swinir", variables["stage1"], x)

        out = swinir(degraded) if self.tiles is None else tiled_map(swinir, degraded, self.tiles.size,
                                                                    self.tiles.overlap, 1.0)
        return jnp.clip(out, 0.0, 1.0)

    # ------------------------------------------------------------------ stage 1
    def _normalize(self, z: Array, name: str, inverse: bool = False) -> Array:
        return z if self.latent_stats is None else normalize_latent(z, name, self.latent_stats, inverse)

    def _encode1(self, variables, image: Array) -> Array:
        if self.tiles is not None:
            return encode_latents_tiled(self.stage1.vae, variables["stage1"]["params"]["vae"], image * 2.0 - 1.0,
                                        tile=self.tiles.size, overlap=self.tiles.overlap)
        return self.stage1.apply("vae", variables["stage1"], image * 2.0 - 1.0, method="encode_latents")

    def _decode(self, stage: str, variables, z: Array) -> Array:
        group = self.stage1 if stage == "stage1" else self.stage2
        if self.tiles is not None:
            f = _factor(group.vae)
            return decode_latents_tiled(group.vae, variables[stage]["params"]["vae"], z, tile=self.tiles.size // f,
                                        overlap=self.tiles.overlap // f)
        return group.apply("vae", variables[stage], z, method="decode_latents")

    def stage1_condition(self, variables, i_ir: Array, pose: Array) -> tuple[Array, Array]:
        """(c_p, c_r): the pose latent (normalised as in training) and the ControlNet's condition E(I_ir)."""
        return self._normalize(self._encode1(variables, pose), "pose"), self._encode1(variables, i_ir)

    def _eps1(self, params, z, t, cond):
        """z [B, h, w, 4 x branches] (branch-major) -> the joint UNet's prediction, same shape."""
        if self.tiles is not None:  # MultiDiffusion over the latent (pipelines.tiles)
            return latent_tiled_eps(self._eps1_whole, params, z, t, cond[0], cond[1:], self.tiles,
                                    _factor(self.stage1.vae))
        return self._eps1_whole(params, z, t, cond)

    def _eps1_whole(self, params, z, t, cond):
        context, c_p, c_r = cond
        parts = jnp.split(z, len(self.branches), axis=-1)
        inputs = [jnp.concatenate([p, c_p.astype(p.dtype)], axis=-1) for p in parts]
        residuals = self.stage1.controlnet.apply({"params": params["controlnet"]}, inputs[self.branches.index("rgb")],
                                                 t, context, c_r)
        return self.stage1.joint_unet.apply({"params": params["joint_unet"]}, jnp.concatenate(inputs, axis=-1), t,
                                            context, down_residuals=residuals.down, mid_residual=residuals.mid)

    def stage1_denoise(self, variables, key: jax.Array, c_p: Array, c_r: Array, context: Array,
                       uncond: Array | None = None) -> Array:
        """The branches' latents [B, h, w, 4 x branches] from independent noise."""
        b, h, w, _ = c_p.shape
        channels = self.stage1.joint_unet.config.unet.out_channels * len(self.branches)
        k_noise, k_steps = jax.random.split(key)
        z_t = jax.random.normal(k_noise, (b, h, w, channels), jnp.float32)
        p = variables["stage1"]["params"]
        params = {"joint_unet": p["joint_unet"], "controlnet": p["controlnet"]}
        uncond_triple = None if uncond is None else (uncond, c_p, c_r)
        return self._sample1(k_steps, z_t, (context, c_p, c_r), uncond_triple, params=params).sample

    def stage1_decode(self, variables, z: Array) -> dict[str, Array]:
        """Each branch decoded to [B, H, W, 3] in [0, 1]: {"i_res", "depth" (channel mean, [B, H, W, 1]), "normal"}."""
        out = {}
        for name, part in zip(self.branches, jnp.split(z, len(self.branches), axis=-1), strict=True):
            image = self._decode("stage1", variables, self._normalize(part, name, inverse=True))
            image = jnp.clip((image + 1.0) * 0.5, 0.0, 1.0)
            out["i_res" if name == "rgb" else name] = image.mean(-1, keepdims=True) if name == "depth" else image
        return out

    # ------------------------------------------------------------------ stage 2
    def stage2_priors(self, i_ir: Array, pose: Array, depth: Array | None, normal: Array | None) -> dict[str, Array]:
        """The prior-fusion ControlNet's inputs at image resolution in [0, 1] (a missing prior is zeros, as the
        ControlNet's prior_mask drops one in training)."""
        zeros = jnp.zeros_like(i_ir)
        depth = zeros if depth is None else jnp.broadcast_to(depth, i_ir.shape)
        return {"ir": i_ir, "pose": pose, "depth": depth, "normal": zeros if normal is None else normal}

    def image_features(self, variables, i_res: Array) -> Array:
        """CLIP vision penultimate states of I_res: the colour adapter's input."""
        return colour_adapter_features(self.stage2.image_encoder, variables["stage2"]["params"]["image_encoder"],
                                       i_res)

    def _eps2(self, params, z, t, cond):
        if self.tiles is not None:  # MultiDiffusion; the image-resolution priors ride along space-to-depth
            text, priors, features = cond
            names = sorted(priors)
            f = _factor(self.stage2.vae)

            def eps(p, zt, tt, c):
                (txt, feats), *maps = c
                return self._eps2_whole(p, zt, tt, (txt, dict(zip(names, maps, strict=True)), feats))

            return latent_tiled_eps(eps, params, z, t, (text, features), [priors[n] for n in names], self.tiles, f,
                                    image_factor=[f] * len(names))
        return self._eps2_whole(params, z, t, cond)

    def _eps2_whole(self, params, z, t, cond):
        text, priors, features = cond
        return self.stage2.stage2.apply({"params": params}, z, t, text, priors, features,
                                        conditioning_scale=self.conditioning_scale, ip_scale=self.adapter_scale)

    def stage2_denoise(self, variables, key: jax.Array, priors: Mapping[str, Array], text: SDXLText,
                       features: Array, uncond: SDXLText | None = None) -> Array:
        ir = priors["ir"]
        f = _factor(self.stage2.vae)
        channels = self.stage2.stage2.unet.config.out_channels
        k_noise, k_steps = jax.random.split(key)
        z_t = jax.random.normal(k_noise, (ir.shape[0], ir.shape[1] // f, ir.shape[2] // f, channels), jnp.float32)
        cond = (text, dict(priors), features)
        uncond_triple = None if uncond is None else (uncond, dict(priors), features)
        return self._sample2(k_steps, z_t, cond, uncond_triple, params=variables["stage2"]["params"]["stage2"]).sample

    def stage2_decode(self, variables, z: Array) -> Array:
        image = self._decode("stage2", variables, z)
        return jnp.clip((image + 1.0) * 0.5, 0.0, 1.0)

    # ------------------------------------------------------------------ all of it
    def check_size(self, height: int, width: int) -> None:
        if height % self.factor or width % self.factor:
            raise ValueError(f"V2Pipeline: {height} x {width} is not a multiple of the VAE factor {self.factor}")

    @functools.partial(jax.jit, static_argnums=0)
    def __call__(self, variables, key: jax.Array, degraded: Array, pose: Array, context: Array, text: SDXLText,
                 uncond: Array | None = None, uncond_xl: SDXLText | None = None) -> dict[str, Any]:
        """degraded, pose: [B, H, W, 3] in [0, 1]; context (uncond): SD2.1's [B, 77, D]; text (uncond_xl): SDXL's.
        Returns restored [B, H, W, 3] and the intermediates i_ir, i_res, depth [B, H, W, 1], normal."""
        self.check_size(degraded.shape[1], degraded.shape[2])
        k1, k2 = jax.random.split(key)
        i_ir = self.regress(variables, degraded)
        c_p, c_r = self.stage1_condition(variables, i_ir, pose)
        branches = self.stage1_decode(variables, self.stage1_denoise(variables, k1, c_p, c_r, context, uncond))
        priors = self.stage2_priors(i_ir, pose, branches.get("depth"), branches.get("normal"))
        features = self.image_features(variables, branches["i_res"])
        z0 = self.stage2_denoise(variables, k2, priors, text, features, uncond_xl)
        restored = colour_fix(self.stage2_decode(variables, z0), i_ir, self.colour)
        return {"restored": restored, "i_ir": i_ir, "z0": z0, **branches}
