"""DiffBody v1 restoration (seed 000): SwinIR -> I_reg; pose map and body attention -> the latent-condition
ControlNet on SD2.1 -> DDPM (or DDIM / DPM++) with optional part-loss guidance (Algorithm 1) -> VAE decode.

    group = build_model(load_config("v1_controlnet:variant=tiny").model)     # the members the v1 phase trains
    pipe = V1Pipeline(group, schedule, SamplerConfig(num_steps=50))        # the paper's preset: DDPM, 50 steps
    out = pipe(variables, key, degraded, pose, context, uncond=None)       # {"restored", "i_reg", "attention", ...}

Every stage is a method of (variables, arrays) that jits alone: `regress`, `attention`, `condition`, `denoise`,
`decode`; `__call__` runs them in one jitted program and returns the intermediates with the result. Images are
NHWC RGB in [0, 1] with H and W multiples of the VAE factor (the fitting to buckets or tiles comes with the restore
command); context is SD2.1's text conditioning [B, 77, D] (`conditioning.prompts.sd21_conditioning`).
Colour correction toward I_reg (`pipelines.colour_fix`) is applied last when asked.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from diffbody_jax.conditioning.body_priors import attention_from_mask, body_attention_map
from diffbody_jax.diffusion.part_guidance import PartLossConfig, make_part_guidance, part_guidance_aux
from diffbody_jax.diffusion.samplers import SamplerConfig, make_sampler
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.models.tiling import tiled_map
from diffbody_jax.models.vae import decode_latents_tiled, encode_latents_tiled
from diffbody_jax.pipelines.colour_fix import colour_fix
from diffbody_jax.pipelines.tiles import TileConfig, attention_on_small, latent_tiled_eps

Array = jax.Array
V1_MEMBERS = ("unet", "controlnet", "vae", "swinir")  # and "bodypart" unless person masks stand in for I_attn


class V1Pipeline:
    def __init__(self, group, schedule: NoiseSchedule, sampler: SamplerConfig | None = None,
                 part_loss: PartLossConfig | None = None, colour: str = "none", on_step=None,
                 tiles: TileConfig | None = None):
        sampler, part_loss = sampler or SamplerConfig(), part_loss or PartLossConfig()
        if tiles is not None and sampler.guidance_scale:
            raise ValueError("part-loss guidance needs the whole decoded image at every step: not with tiles")
        if sampler.guidance_scale and "bodypart" not in group.members:
            raise ValueError("part-loss guidance needs the body-part network; the model group has none")
        missing = [m for m in V1_MEMBERS if m not in group.members]
        if missing:
            raise ValueError(f"V1Pipeline: the model group lacks {missing}")
        self.group, self.schedule, self.sampler_config, self.colour = group, schedule, sampler, colour
        self.factor = 2 ** (len(group.vae.config.block_out_channels) - 1)
        self.tiles = tiles
        if tiles is not None:
            tiles.check(self.factor)
        guidance = make_part_guidance(group.vae, group.bodypart, part_loss) if sampler.guidance_scale else None
        # on_step(stage, step index): a progress bar's hook (None: nothing added to the program); v1 has one stage
        hook = None if on_step is None else (lambda i: on_step(1, i))
        self._sample = make_sampler(self._eps, schedule, sampler, guidance, hook)

    # ------------------------------------------------------------------ stages
    def regress(self, variables, degraded: Array) -> Array:
        """I_reg = SwinIR(degraded), clipped to [0, 1] (Eq. 2); on overlapping tiles when tiled."""
        def swinir(x):
            return self.group.apply("swinir", variables, x)

        out = swinir(degraded) if self.tiles is None else tiled_map(swinir, degraded, self.tiles.size,
                                                                    self.tiles.overlap, 1.0)
        return jnp.clip(out, 0.0, 1.0)

    @property
    def has_part_network(self) -> bool:
        return "bodypart" in self.group.members

    def attention(self, variables, i_reg: Array, mask: Array | None = None):
        """I_attn: the part network's foreground on I_reg, at latent and image resolution (Eq. 3). Tiled: computed
        on I_reg scaled to one tile's size (a smooth person mask; `pipelines.tiles.attention_on_small`). With a
        person mask [B, H, W, 1] (an annotator's) and no part network: `attention_from_mask`, an approximation."""
        if not self.has_part_network:
            if mask is None:
                raise ValueError("V1Pipeline: no body-part network and no person mask for I_attn")
            return attention_from_mask(mask, self.factor)
        net, net_vars = self.group.bodypart, self.group.member_variables(variables, "bodypart")
        if self.tiles is not None:
            return attention_on_small(net, net_vars, i_reg, self.factor, self.tiles.size)
        return body_attention_map(net, net_vars, i_reg, self.factor)

    def encode(self, variables, image: Array) -> Array:
        if self.tiles is not None:
            return encode_latents_tiled(self.group.vae, variables["params"]["vae"], image * 2.0 - 1.0,
                                        tile=self.tiles.size, overlap=self.tiles.overlap)
        return self.group.apply("vae", variables, image * 2.0 - 1.0, method="encode_latents")

    def condition(self, variables, i_reg: Array, pose: Array, attention_latent: Array) -> Array:
        """The ControlNet's latent condition [E(I_reg), E(I_pose), I_attn]."""
        z_reg = self.encode(variables, i_reg)
        return jnp.concatenate([z_reg, self.encode(variables, pose), attention_latent.astype(z_reg.dtype)], -1)

    def _eps(self, params, z, t, cond):
        if self.tiles is not None:  # MultiDiffusion: every latent tile denoised, the overlaps blended
            return latent_tiled_eps(self._eps_whole, params, z, t, cond[0], cond[1:], self.tiles, self.factor)
        return self._eps_whole(params, z, t, cond)

    def _eps_whole(self, params, z, t, cond):
        context, control = cond
        residuals = self.group.controlnet.apply({"params": params["controlnet"]}, z, t, context, control)
        return self.group.unet.apply({"params": params["unet"]}, z, t, context, down_residuals=residuals.down,
                                     mid_residual=residuals.mid)

    def denoise(self, variables, key: jax.Array, control: Array, context: Array, uncond: Array | None = None,
                i_reg: Array | None = None) -> Array:
        """z_0 from noise, conditioned on (context, control); part-loss guidance toward I_reg when configured."""
        b, h, w, _ = control.shape
        channels = self.group.unet.config.out_channels
        k_noise, k_steps = jax.random.split(key)
        z_t = jax.random.normal(k_noise, (b, h, w, channels), jnp.float32)
        params = {"unet": variables["params"]["unet"], "controlnet": variables["params"]["controlnet"]}
        aux = None
        if self.sampler_config.guidance_scale:
            aux = part_guidance_aux(self.group.bodypart, self.group.member_variables(variables, "bodypart"),
                                    variables["params"]["vae"], i_reg)
        uncond_pair = None if uncond is None else (uncond, control)
        return self._sample(k_steps, z_t, (context, control), uncond_pair, aux=aux, params=params).sample

    def decode(self, variables, z: Array) -> Array:
        if self.tiles is not None:
            image = decode_latents_tiled(self.group.vae, variables["params"]["vae"], z,
                                         tile=self.tiles.size // self.factor, overlap=self.tiles.overlap // self.factor)
        else:
            image = self.group.apply("vae", variables, z, method="decode_latents")
        return jnp.clip((image + 1.0) * 0.5, 0.0, 1.0)

    # ------------------------------------------------------------------ all of it
    @functools.partial(jax.jit, static_argnums=0)
    def __call__(self, variables, key: jax.Array, degraded: Array, pose: Array, context: Array,
                 uncond: Array | None = None, mask: Array | None = None) -> dict[str, Any]:
        """degraded, pose: [B, H, W, 3] in [0, 1]; context (and uncond for CFG): [B, 77, D]; mask [B, H, W, 1]: the
        person mask that stands in for I_attn when the group has no body-part network (ignored when it has one).
        Returns restored [B, H, W, 3] and the intermediates i_reg, attention (image resolution), z0."""
        b, h, w, _ = degraded.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"V1Pipeline: {h} x {w} is not a multiple of the VAE factor {self.factor}")
        i_reg = self.regress(variables, degraded)
        attn = self.attention(variables, i_reg, mask)
        control = self.condition(variables, i_reg, pose, attn.latent)
        z0 = self.denoise(variables, key, control, context, uncond, i_reg)
        restored = colour_fix(self.decode(variables, z0), i_reg, self.colour)
        return {"restored": restored, "i_reg": i_reg, "attention": attn.image, "z0": z0}
