"""DiffBody v2 restoration (seed 002): SwinIR -> I_ir; stage 1: the joint UNet (RGB, depth and normal branches on
SD2.1) steered by the stage-1 ControlNet on E(I_ir) -> I_res, depth, normal; stage 2: SDXL steered by the
prior-fusion ControlNet on {I_ir, pose, depth, normal} and by the colour adapter on CLIP features of I_res -> the
restoration.

    pipe = V2Pipeline(stage1, stage2, schedule1, schedule2, SamplerConfig(num_steps=200), SamplerConfig(num_steps=200))
    text = pipe.encode_text(variables, {"sd21": ids, "sdxl": ids_xl, "sdxl_2": ids_xl2}, (H, W))
    out = pipe(variables, key, degraded, pose, text)               # {"restored", "i_ir", "i_res", "depth", ...}

stage1: a `ModelGroup` with swinir, vae, joint_unet, controlnet (the members of configs/stage1_controlnet.py);
stage2: a `ModelGroup` with stage2 (SDXL UNet + prior-fusion ControlNet + Resampler), vae and image_encoder (SDXL's
VAE and the adapter's CLIP vision tower; the members of configs/colour_adapter.py). variables = {"stage1": ...,
"stage2": ...}, each its group's variables. `encode_text` runs the text encoders of both stages on token ids: text
is (SD2.1's context [B, 77, D], SDXL's `SDXLText` with time_ids = the image's size, no crop). The call protocol is
v1's (`pipelines.v1`): `__call__(variables, key, degraded, pose, text, uncond=None, *, mask=None, i_reg=None)`.

Images are NHWC RGB in [0, 1], H and W multiples of both VAE factors. Every stage is a method that jits alone;
`__call__` runs them as one jitted program.

Choices the paper leaves open (docs/restoring.md):
- Stage 1 samples the three branches jointly from independent noise (as it trains them, Eq. 1), one t for all.
- The pose latent is normalised like the training run when `latent_stats` is given (the run's contract carries
  them: the authors' --normalize_dist); the depth and normal latents are mapped back before decoding.
- Stage 2's classifier-free guidance feeds the colour adapter the same image features in both passes
  (uncond_image="keep": training never drops the image, so only the text is guided), or the features of an all-zero
  image (uncond_image="zeros", diffusers' IP-Adapter choice). The contract says which.
- Stage 2 is conditioned on the same prompt as stage 1; the paper re-captions I_res (p' = LLaVA(I_res)): with a
  captioner that is `restore --recaption` (two programs: stage 1; caption I_res on the host; stage 2).
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
from diffbody_jax.conditioning.prompts import sd21_prompt_embeds, sdxl_prompt_embeds, sdxl_time_ids
from diffbody_jax.diffusion.contract import UNCOND_IMAGES
from diffbody_jax.diffusion.losses import normalize_latent
from diffbody_jax.diffusion.samplers import SamplerConfig, make_sampler
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.models.swinir import swinir_regress
from diffbody_jax.models.unet import SDXLText
from diffbody_jax.models.vae import images_to_latents, latents_to_images
from diffbody_jax.pipelines.colour_fix import colour_fix
from diffbody_jax.pipelines.tiles import TileConfig, tiling

Array = jax.Array
STAGE1_MEMBERS = ("swinir", "vae", "joint_unet", "controlnet")
STAGE2_MEMBERS = ("stage2", "vae", "image_encoder")


def _check_members(group, needed: Sequence[str], what: str) -> None:
    missing = [m for m in needed if m not in group.members]
    if missing:
        raise ValueError(f"V2Pipeline: the {what} group lacks {missing}")


class V2Pipeline:
    version = "v2"
    tokenizers = ("sd21", "sdxl", "sdxl_2")
    intermediates = ("i_ir", "i_res", "depth", "normal")
    needs_mask = False

    def __init__(self, stage1, stage2, schedule1: NoiseSchedule, schedule2: NoiseSchedule,
                 sampler1: SamplerConfig | None = None, sampler2: SamplerConfig | None = None, *,
                 latent_stats: Mapping[str, Sequence[float]] | None = None, colour: str = "none",
                 adapter_scale: float = 1.0, conditioning_scale: float = 1.0, on_step=None,
                 tiles: TileConfig | None = None, uncond_image: str = "keep", clip_fit: str = "auto"):
        _check_members(stage1, STAGE1_MEMBERS, "stage-1")
        _check_members(stage2, STAGE2_MEMBERS, "stage-2")
        if uncond_image not in UNCOND_IMAGES:
            raise ValueError(f"V2Pipeline: uncond_image {uncond_image!r}; expected one of {UNCOND_IMAGES}")
        self.stage1, self.stage2 = stage1, stage2
        self.schedule1, self.schedule2 = schedule1, schedule2
        self.sampler1 = sampler1 or SamplerConfig(num_steps=200)
        self.sampler2 = sampler2 or SamplerConfig(num_steps=200)
        self.branches = tuple(stage1.joint_unet.config.branches)
        if "rgb" not in self.branches:
            raise ValueError(f"V2Pipeline: the joint UNet has branches {self.branches}; stage 1 needs 'rgb'")
        self.latent_stats = None if latent_stats is None else tuple(
            (k, tuple(float(x) for x in v)) for k, v in sorted(latent_stats.items()))
        self.colour, self.uncond_image, self.clip_fit = colour, uncond_image, clip_fit
        self.adapter_scale, self.conditioning_scale = adapter_scale, conditioning_scale
        self.factor1, self.factor2 = stage1.vae.config.downsample_factor, stage2.vae.config.downsample_factor
        self.factor = max(self.factor1, self.factor2)
        self.tiles, self.tiling, self.on_step = tiles, tiling(tiles), on_step
        self.tiling.check(self.factor)

        # on_step(stage, step index): a progress bar's hook (None: nothing added to the programs)
        def hook(stage):
            return None if on_step is None else (lambda i: on_step(stage, i))

        self._sample1 = make_sampler(self._eps1, schedule1, self.sampler1, on_step=hook(1))
        self._sample2 = make_sampler(self._eps2, schedule2, self.sampler2, on_step=hook(2))

    # equal pipelines (same models, schedules and settings) are one static argument: jit reuses the program
    def _key(self):
        return (self.stage1, self.stage2, self.schedule1, self.schedule2, self.sampler1, self.sampler2,
                self.latent_stats, self.colour, self.uncond_image, self.clip_fit, self.adapter_scale,
                self.conditioning_scale, self.tiles, self.on_step)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ------------------------------------------------------------------ text and stage 0
    def encode_text(self, variables, ids: Mapping[str, Array], size: tuple[int, int]) -> tuple[Array, SDXLText]:
        """(SD2.1's context [B, 77, D] of ids["sd21"], SDXL's text of ids["sdxl"] and ids["sdxl_2"] with time_ids =
        (size, no crop, size): the photo as the bucket holds it, `sdxl_time_ids` as training builds them)."""
        p1, p2 = variables["stage1"]["params"], variables["stage2"]["params"]
        context = sd21_prompt_embeds(self.stage1.text_encoder, p1["text_encoder"], ids["sd21"])
        text = sdxl_prompt_embeds(self.stage2.text_encoder, p2["text_encoder"], ids["sdxl"],
                                  self.stage2.text_encoder_2, p2["text_encoder_2"], ids["sdxl_2"])
        b = context.shape[0]
        return context, text._replace(time_ids=sdxl_time_ids(size, (0, 0), size, b))

    def regress(self, variables, degraded: Array) -> Array:
        """I_ir = clip(SwinIR(degraded), 0, 1) (`swinir_regress`, as training regresses)."""
        return swinir_regress(self.stage1.swinir, self.stage1.member_variables(variables["stage1"], "swinir"),
                              degraded, self.tiling.image_tiles)

    # ------------------------------------------------------------------ stage 1
    def _normalize(self, z: Array, name: str, inverse: bool = False) -> Array:
        if self.latent_stats is None:
            return z
        return normalize_latent(z, name, dict(self.latent_stats), inverse)

    def _encode1(self, variables, image: Array) -> Array:
        return images_to_latents(self.stage1.vae, variables["stage1"]["params"]["vae"], image,
                                 self.tiling.image_tiles)

    def stage1_condition(self, variables, i_ir: Array, pose: Array) -> tuple[Array, Array]:
        """(c_p, c_r): the pose latent (normalised as in training) and the ControlNet's condition E(I_ir)."""
        return self._normalize(self._encode1(variables, pose), "pose"), self._encode1(variables, i_ir)

    def _eps1(self, params, z, t, cond):
        """z [B, h, w, 4 x branches] (branch-major) -> the joint UNet's prediction, same shape."""
        context, c_p, c_r = cond
        return self.tiling.eps(self._eps1_whole, params, z, t, context, [c_p, c_r], self.factor1)

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
            image = latents_to_images(self.stage1.vae, variables["stage1"]["params"]["vae"],
                                      self._normalize(part, name, inverse=True), self.tiling.image_tiles)
            out["i_res" if name == "rgb" else name] = image.mean(-1, keepdims=True) if name == "depth" else image
        return out

    # ------------------------------------------------------------------ stage 2
    def stage2_priors(self, i_ir: Array, pose: Array, depth: Array | None, normal: Array | None) -> dict[str, Array]:
        """The prior-fusion ControlNet's inputs at image resolution in [0, 1] (a missing prior is zeros, as the
        ControlNet's prior_mask drops one in training); depth on three channels, as training repeats it."""
        zeros = jnp.zeros_like(i_ir)
        depth = zeros if depth is None else jnp.broadcast_to(depth, i_ir.shape)
        return {"ir": i_ir, "pose": pose, "depth": depth, "normal": zeros if normal is None else normal}

    def image_features(self, variables, i_res: Array) -> Array:
        """CLIP vision penultimate states of I_res, with the contract's CLIP fit: the colour adapter's input."""
        return colour_adapter_features(self.stage2.image_encoder, variables["stage2"]["params"]["image_encoder"],
                                       i_res, fit=self.clip_fit)

    def uncond_features(self, variables, features: Array, i_res: Array) -> Array:
        """What CFG's unconditional pass feeds the adapter: the same features ("keep") or those of an all-zero
        image ("zeros")."""
        return features if self.uncond_image == "keep" else self.image_features(variables, jnp.zeros_like(i_res))

    def _eps2(self, params, z, t, cond):
        text, priors, features = cond
        names = sorted(priors)

        def eps(p, zt, tt, c):
            (txt, feats), *maps = c
            return self._eps2_whole(p, zt, tt, (txt, dict(zip(names, maps, strict=True)), feats))

        # tiled, the image-resolution priors ride along the latent grid space-to-depth (pipelines.tiles)
        return self.tiling.eps(eps, params, z, t, (text, features), [priors[n] for n in names], self.factor2,
                               image_factor=[self.factor2] * len(names))

    def _eps2_whole(self, params, z, t, cond):
        text, priors, features = cond
        return self.stage2.stage2.apply({"params": params}, z, t, text, priors, features,
                                        conditioning_scale=self.conditioning_scale, ip_scale=self.adapter_scale)

    def stage2_denoise(self, variables, key: jax.Array, priors: Mapping[str, Array], text: SDXLText,
                       features: Array, uncond: SDXLText | None = None, uncond_features: Array | None = None) -> Array:
        ir = priors["ir"]
        f = self.factor2
        channels = self.stage2.stage2.unet.config.out_channels
        k_noise, k_steps = jax.random.split(key)
        z_t = jax.random.normal(k_noise, (ir.shape[0], ir.shape[1] // f, ir.shape[2] // f, channels), jnp.float32)
        cond = (text, dict(priors), features)
        uncond_triple = None if uncond is None else (
            uncond, dict(priors), features if uncond_features is None else uncond_features)
        return self._sample2(k_steps, z_t, cond, uncond_triple, params=variables["stage2"]["params"]["stage2"]).sample

    def stage2_decode(self, variables, z: Array) -> Array:
        return latents_to_images(self.stage2.vae, variables["stage2"]["params"]["vae"], z, self.tiling.image_tiles)

    # ------------------------------------------------------------------ all of it
    def check_size(self, height: int, width: int) -> None:
        if height % self.factor or width % self.factor:
            raise ValueError(f"V2Pipeline: {height} x {width} is not a multiple of the VAE factor {self.factor}")

    def run_stage1(self, variables, key: jax.Array, degraded: Array, pose: Array, context: Array,
                   uncond: Array | None = None, i_ir: Array | None = None) -> dict[str, Array]:
        """Stage 0 and stage 1: {"i_ir", "i_res", "depth", "normal", "z1"} (a program of its own when stage 2 is
        conditioned on a caption of I_res made on the host)."""
        self.check_size(degraded.shape[1], degraded.shape[2])
        i_ir = self.regress(variables, degraded) if i_ir is None else i_ir
        c_p, c_r = self.stage1_condition(variables, i_ir, pose)
        z1 = self.stage1_denoise(variables, key, c_p, c_r, context, uncond)
        return {"i_ir": i_ir, "z1": z1, **self.stage1_decode(variables, z1)}

    def run_stage2(self, variables, key: jax.Array, stage1: Mapping[str, Array], pose: Array, text: SDXLText,
                   uncond: SDXLText | None = None) -> dict[str, Array]:
        """Stage 2 on stage 1's outputs: {"restored", "z0"}."""
        i_ir, i_res = stage1["i_ir"], stage1["i_res"]
        priors = self.stage2_priors(i_ir, pose, stage1.get("depth"), stage1.get("normal"))
        features = self.image_features(variables, i_res)
        uncond_features = None if uncond is None else self.uncond_features(variables, features, i_res)
        z0 = self.stage2_denoise(variables, key, priors, text, features, uncond, uncond_features)
        return {"restored": colour_fix(self.stage2_decode(variables, z0), i_ir, self.colour), "z0": z0}

    @functools.partial(jax.jit, static_argnums=0)
    def __call__(self, variables, key: jax.Array, degraded: Array, pose: Array, text: tuple[Array, SDXLText],
                 uncond: tuple[Array, SDXLText] | None = None, *, mask: Array | None = None,
                 i_reg: Array | None = None) -> dict[str, Any]:
        """degraded, pose: [B, H, W, 3] in [0, 1]; text (uncond for CFG): `encode_text`'s (context, SDXLText);
        mask: unused (v1's protocol); i_reg: a precomputed `regress(variables, degraded)` (I_ir).
        Returns restored [B, H, W, 3] and the intermediates i_ir, i_res, depth [B, H, W, 1], normal, z0."""
        del mask
        k1, k2 = jax.random.split(key)
        context, text_xl = text
        uncond1, uncond2 = (None, None) if uncond is None else uncond
        first = self.run_stage1(variables, k1, degraded, pose, context, uncond1, i_reg)
        second = self.run_stage2(variables, k2, first, pose, text_xl, uncond2)
        return {**{k: v for k, v in first.items() if k != "z1"}, **second}
