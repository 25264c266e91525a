"""DiffBody v1 restoration (seed 000): SwinIR -> I_reg; pose map and body attention -> the latent-condition
ControlNet on SD2.1 -> DDPM (or DDIM / DPM++) with optional part-loss guidance (Algorithm 1) -> VAE decode.

    group = build_model(load_config("v1_controlnet:variant=tiny").model)     # the members the v1 phase trains
    pipe = V1Pipeline(group, schedule, SamplerConfig(num_steps=50))        # the paper's preset: DDPM, 50 steps
    text = pipe.encode_text(variables, {"sd21": ids})                      # [B, 77, D]
    out = pipe(variables, key, degraded, pose, text)                       # {"restored", "i_reg", "attention", ...}

The call protocol is the v2 pipeline's too (`pipelines.restore.Restorer` drives either without knowing which):
`tokenizers` names the CLIP tokenizers `encode_text` reads, and `__call__(variables, key, degraded, pose, text,
uncond=None, *, mask=None, i_reg=None)`; i_reg is a precomputed `regress(variables, degraded)` (the restore command
annotates it on the host first, so SwinIR runs once per batch). Every stage is a method of (variables, arrays) that
jits alone: `regress`, `attention`, `condition`, `denoise`, `decode`. Images are NHWC RGB in [0, 1] with H and W
multiples of the VAE factor; tiling enters as a strategy (`pipelines.tiles.WholeImage` / `Tiled`). Colour
correction toward I_reg (`pipelines.colour_fix`) is applied last when asked.

Where I_attn comes from is the run's contract (`diffusion.contract`): "model" (the part network on I_reg, Eq. 3;
a ControlNet trained on the manifest's precomputed maps is fed the same network's maps) or "mask" (the person
mask the caller passes, `conditioning.body_priors.attention_from_mask`: what a ControlNet trained with
diffusion.attention=mask saw).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from diffbody_jax.conditioning.body_priors import attention_from_mask
from diffbody_jax.conditioning.prompts import sd21_prompt_embeds
from diffbody_jax.diffusion.part_guidance import PartLossConfig, make_part_guidance, part_guidance_aux
from diffbody_jax.diffusion.samplers import SamplerConfig, make_sampler
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.models.swinir import swinir_regress
from diffbody_jax.models.vae import images_to_latents, latents_to_images
from diffbody_jax.pipelines.colour_fix import colour_fix
from diffbody_jax.pipelines.tiles import TileConfig, tiling

Array = jax.Array
V1_MEMBERS = ("unet", "controlnet", "vae", "swinir")  # and "bodypart" unless person masks stand in for I_attn
RESTORE_ATTENTION = ("model", "mask")


class V1Pipeline:
    version = "v1"
    tokenizers = ("sd21",)
    intermediates = ("i_reg", "attention")

    def __init__(self, group, schedule: NoiseSchedule, sampler: SamplerConfig | None = None,
                 part_loss: PartLossConfig | None = None, colour: str = "none", on_step=None,
                 tiles: TileConfig | None = None, attention: str | None = None):
        """attention: "model" | "mask" (None: the part network when the group has one, else the mask)."""
        sampler, part_loss = sampler or SamplerConfig(), part_loss or PartLossConfig()
        if tiles is not None and sampler.guidance_scale:
            raise ValueError("part-loss guidance needs the whole decoded image at every step: not with tiles")
        if sampler.guidance_scale and "bodypart" not in group.members:
            raise ValueError("part-loss guidance needs the body-part network; the model group has none")
        missing = [m for m in V1_MEMBERS if m not in group.members]
        if missing:
            raise ValueError(f"V1Pipeline: the model group lacks {missing}")
        attention = attention or ("model" if "bodypart" in group.members else "mask")
        if attention not in RESTORE_ATTENTION:
            raise ValueError(f"V1Pipeline: attention {attention!r}; expected one of {RESTORE_ATTENTION}")
        if attention == "model" and "bodypart" not in group.members:
            raise ValueError("V1Pipeline: I_attn from the part network, and the model group has none")
        self.group, self.schedule, self.sampler_config, self.colour = group, schedule, sampler, colour
        self.part_loss, self.attention_source, self.on_step = part_loss, attention, on_step
        self.factor = group.vae.config.downsample_factor
        self.tiles, self.tiling = tiles, tiling(tiles)
        self.tiling.check(self.factor)
        guidance = make_part_guidance(group.vae, group.bodypart, part_loss) if sampler.guidance_scale else None
        # on_step(stage, step index): a progress bar's hook (None: nothing added to the program); v1 has one stage
        hook = None if on_step is None else (lambda i: on_step(1, i))
        self._sample = make_sampler(self._eps, schedule, sampler, guidance, hook)

    # equal pipelines (same models, schedule and settings) are one static argument: jit reuses the program
    def _key(self):
        return (self.group, self.schedule, self.sampler_config, self.colour, self.part_loss, self.attention_source,
                self.tiles, self.on_step)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def has_part_network(self) -> bool:
        return "bodypart" in self.group.members

    @property
    def needs_mask(self) -> bool:
        """I_attn from the caller's person masks (`__call__`'s mask)."""
        return self.attention_source == "mask"

    # ------------------------------------------------------------------ stages
    def encode_text(self, variables, ids: dict[str, Array], size: tuple[int, int] | None = None) -> Array:
        """SD2.1's context [B, 77, D] of ids["sd21"] [B, 77] (size: unused, the v2 protocol's)."""
        del size
        return sd21_prompt_embeds(self.group.text_encoder, variables["params"]["text_encoder"], ids["sd21"])

    def regress(self, variables, degraded: Array) -> Array:
        """I_reg = clip(SwinIR(degraded), 0, 1) (Eq. 2, `swinir_regress`, as training regresses)."""
        return swinir_regress(self.group.swinir, self.group.member_variables(variables, "swinir"), degraded,
                              self.tiling.image_tiles)

    def attention(self, variables, i_reg: Array, mask: Array | None = None):
        """I_attn at latent and image resolution: the part network's foreground on I_reg (Eq. 3; tiled: on I_reg
        scaled to one tile, `pipelines.tiles.attention_on_small`), or `attention_from_mask` of the person mask
        [B, H, W, 1] when the contract's source is "mask"."""
        if self.attention_source == "mask":
            if mask is None:
                raise ValueError("V1Pipeline: I_attn from person masks, and no mask was given")
            return attention_from_mask(mask, self.factor)
        return self.tiling.attention(self.group.bodypart, self.group.member_variables(variables, "bodypart"), i_reg,
                                     self.factor)

    def encode(self, variables, image: Array) -> Array:
        return images_to_latents(self.group.vae, variables["params"]["vae"], image, self.tiling.image_tiles)

    def condition(self, variables, i_reg: Array, pose: Array, attention_latent: Array) -> Array:
        """The ControlNet's latent condition [E(I_reg), E(I_pose), I_attn]."""
        z_reg = self.encode(variables, i_reg)
        return jnp.concatenate([z_reg, self.encode(variables, pose), attention_latent.astype(z_reg.dtype)], -1)

    def _eps(self, params, z, t, cond):
        context, control = cond
        return self.tiling.eps(self._eps_whole, params, z, t, context, [control], self.factor)

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
        return latents_to_images(self.group.vae, variables["params"]["vae"], z, self.tiling.image_tiles)

    # ------------------------------------------------------------------ all of it
    def check_size(self, height: int, width: int) -> None:
        if height % self.factor or width % self.factor:
            raise ValueError(f"V1Pipeline: {height} x {width} is not a multiple of the VAE factor {self.factor}")

    @functools.partial(jax.jit, static_argnums=0)
    def __call__(self, variables, key: jax.Array, degraded: Array, pose: Array, text: Array,
                 uncond: Array | None = None, *, mask: Array | None = None,
                 i_reg: Array | None = None) -> dict[str, Any]:
        """degraded, pose: [B, H, W, 3] in [0, 1]; text (and uncond for CFG): `encode_text`'s [B, 77, D]; mask
        [B, H, W, 1]: the person mask I_attn is made from when `needs_mask` (ignored otherwise); i_reg: a
        precomputed `regress(variables, degraded)`. Returns restored [B, H, W, 3] and the intermediates i_reg,
        attention (image resolution), z0."""
        self.check_size(degraded.shape[1], degraded.shape[2])
        i_reg = self.regress(variables, degraded) if i_reg is None else i_reg
        attn = self.attention(variables, i_reg, mask)
        control = self.condition(variables, i_reg, pose, attn.latent)
        z0 = self.denoise(variables, key, control, text, uncond, i_reg)
        restored = colour_fix(self.decode(variables, z0), i_reg, self.colour)
        return {"restored": restored, "i_reg": i_reg, "attention": attn.image, "z0": z0}
