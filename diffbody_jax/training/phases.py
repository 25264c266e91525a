"""Training phases: what each one builds, trains and minimises, as data the training engine reads.

A `Phase` is data; its module is the config's `model` section built by `models.registry.build_model`:
  subset                              the trainable params (a `TrainableSubset`, or a function of the config that
                                      returns one; the rest is frozen),
  inputs                              the batch fields its loss reads (taken from the data pipeline's batches),
  make_loss(module, config) -> fn     fn(variables, batch, key) -> (loss, metrics), `variables` = {"params":
                                      trainable + frozen, other collections}; it reads its settings from the config
                                      (prediction type, min-SNR, ...) and refuses, naming the field or variant, a
                                      config or model the phase cannot train (the engine calls it before any init),
  host(config) -> fn(batch) -> batch  on the host, before the batch becomes global arrays (tokenising captions),
  cache(module, variables, batch)     the frozen encodings `diffbody prepare` may store once (None: no cache),
  export                              the param subtree written to the PyTorch layout at the end ("" = all), or
                                      fn(module, params) -> (module, params) choosing what to write,
  calibrate(module, params, batches, config) -> module
                                      the exported module's config, measured on training batches before it is
                                      written (the autoencoder's latent scaling factor; None: as trained).

The engine (`training.engine`) knows nothing else about a phase, so a new phase is a `Phase` registered here plus a
config file. Registered: a pretrained base's autoencoder (L1 + KL) and text-conditional UNet (SD2.1- or
SDXL-like), stage 0 (SwinIR, L2), v1's body-part network (part labels from keypoints), v1's ControlNet (seed 000,
Eq. 4), v2 stage 1's joint UNet and ControlNet (seed 002, Eqs. 1-2) and stage 2's two (Eqs. 3-4).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp

from diffbody_jax.diffusion.contract import contract_from_config
from diffbody_jax.interop.ip_adapter import ColourAdapter, ColourAdapterConfig
from diffbody_jax.models.stage2 import adapter_params
from diffbody_jax.models.swinir import SwinIR
from diffbody_jax.models.vae import AutoencoderKL, latent_scaling_factor
from diffbody_jax.training.losses import (
    autoencoder_loss,
    base_unet_cacheable,
    base_unet_loss,
    body_part_loss,
    stage1_cacheable,
    stage1_loss,
    stage2_cacheable,
    stage2_phase_loss,
    swinir_l2_loss,
    v1_cacheable,
    v1_controlnet_loss,
)
from diffbody_jax.training.trainable import TrainableSubset

# what each stage-2 phase trains, as paths inside the `Stage2Model`; the phases' group holds it as member "stage2"
STAGE2_SUBSETS = {
    "controlnet": TrainableSubset("controlnet", (r"^controlnet/",)),
    "colour_adapter": TrainableSubset("colour_adapter", (r"^image_proj/", r"^unet/.*/to_[kv]_ip/")),
}
STAGE2_INPUTS = ("target", "degraded", "pose", "depth", "normal", "original_size", "crop_top_left", "input_ids",
                 "input_ids_2")


def _in_member(subset: TrainableSubset, member: str) -> TrainableSubset:
    return TrainableSubset(subset.name, tuple(f"^{member}/" + p.removeprefix("^") for p in subset.patterns))


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    subset: TrainableSubset | Callable[[Any], TrainableSubset]
    inputs: tuple[str, ...]
    make_loss: Callable[[Any, Any], Callable]
    export: str | Callable[[Any, Any], tuple[Any, Any]] | None = ""
    host: Callable[[Any], Callable[[dict], dict]] | None = None
    cache: Callable[[Any, Mapping, Mapping[str, Any]], dict] | None = None
    calibrate: Callable[[Any, Any, Iterator[dict], Any], Any] | None = None

    def trainable(self, config) -> TrainableSubset:
        """The trainable subset under `config` (a phase may choose it from a config switch)."""
        return self.subset(config) if callable(self.subset) else self.subset

    def loss_fn(self, module, config) -> Callable:
        """fn(variables, batch, key) -> (loss, metrics) of this phase for `module` under `config`."""
        return self.make_loss(module, config)


def _schedule(config) -> jnp.ndarray:
    """alphas_cumprod of the run's contract (`diffusion.contract`: diffusion.scheduler with the trained prediction
    type), as a jax array indexed by traced timesteps: the schedule restoring samples with is the same object."""
    return jnp.asarray(contract_from_config(config).schedule().alphas_cumprod())


def v1_switches(config) -> dict:
    """The v1 loss's settings from the config; refuses an I_attn source whose map the data does not load."""
    d = config["diffusion"]
    field = {"manifest": "attention", "mask": "mask"}.get(d["attention"])
    if field is not None and field not in config["data"]["maps"]:
        raise ValueError(f"diffusion.attention={d['attention']} reads the data's {field!r} map: add it to "
                         f"data.maps (now {list(config['data']['maps'])})")
    return dict(alphas_cumprod=_schedule(config), prediction_type=d["prediction_type"],
                weighting=d["weighting"], attention=d["attention"])


def _v1_loss(group, config) -> Callable:
    return functools.partial(v1_controlnet_loss, group, **v1_switches(config))


def caption_tokens(config) -> Callable[[dict], dict]:
    """Host hook of the text-conditioned phases: the batch's captions (manifest captions, the fallback for empty
    ones, "" with probability text.drop_prob) as CLIP token ids, batch["input_ids"] [B, 77] int32 (and
    batch["input_ids_2"] by text.tokenizer_2, SDXL's second tokenizer, when the config has one)."""
    from diffbody_jax.conditioning.prompts import load_tokenizer, tokenize
    from diffbody_jax.data.captions import CaptionPolicy

    text = config["text"]
    tokenizers = {"input_ids": load_tokenizer(text["tokenizer"] or None, pad_token=text["pad_token"] or None)}
    if "tokenizer_2" in text:  # SDXL's second text encoder
        tokenizers["input_ids_2"] = load_tokenizer(text["tokenizer_2"] or None, pad_token=text["pad_token_2"] or None)
    policy = CaptionPolicy(fallback=text["fallback"], drop_prob=float(text["drop_prob"]))
    seed = int(config["train"]["seed"])

    def fn(batch: dict) -> dict:
        prompts = policy.prompts(batch["caption"], batch["record"], batch["epoch"], seed)
        return {**batch, **{field: tokenize(tok, prompts) for field, tok in tokenizers.items()}}

    return fn


AUTOENCODER_SUBSETS = {
    "all": TrainableSubset("autoencoder", (r".",)),
    # SD's fine-tuned VAEs (ft-EMA, ft-MSE) retrain only the decoder: the latents every UNet was trained on stay
    "decoder": TrainableSubset("vae_decoder", (r"^decoder/", r"^post_quant_conv/")),
}


def autoencoder_subset(config) -> TrainableSubset:
    """The autoencoder phase's trainable params (config.autoencoder.trainable: all | decoder)."""
    choice = config["autoencoder"]["trainable"]
    if choice not in AUTOENCODER_SUBSETS:
        raise ValueError(f"config autoencoder.trainable={choice!r}; expected one of {sorted(AUTOENCODER_SUBSETS)}")
    return AUTOENCODER_SUBSETS[choice]


def _autoencoder_loss(module: AutoencoderKL, config) -> Callable:
    kl_weight = float(config["autoencoder"]["kl_weight"])
    return lambda variables, batch, key: autoencoder_loss(module, variables["params"], batch["target"], key,
                                                          kl_weight=kl_weight)


def calibrate_latent_scale(module: AutoencoderKL, params, batches: Iterator[dict], config) -> AutoencoderKL:
    """The exported VAE with scaling_factor = 1 / std of its latents over config.autoencoder.calibrate_batches
    training batches (LDM's rescaling, which makes the diffusion model's latents about unit variance), when the
    encoder was trained; a decoder-only run keeps the encoder, and so its scaling factor, as it was."""
    n = int(config["autoencoder"]["calibrate_batches"])
    if config["autoencoder"]["trainable"] == "decoder" or n == 0:
        return module
    images = [next(batches)["target"] for _ in range(n)]
    factor = latent_scaling_factor(module, params, images)
    return module.clone(config=dataclasses.replace(module.config, scaling_factor=factor))


def diffusion_switches(config) -> dict:
    """The plain diffusion loss's settings (schedule, prediction type, noise offset, min-SNR) from `diffusion`."""
    d = config["diffusion"]
    return dict(alphas_cumprod=_schedule(config), prediction_type=d["prediction_type"],
                noise_offset=float(d["noise_offset"]), min_snr_gamma=d["min_snr_gamma"])


def _base_unet_loss(group, config) -> Callable:
    return functools.partial(base_unet_loss, group, **diffusion_switches(config))


BASE_UNET_INPUTS = ("target", "input_ids")


def _body_part_loss(module, config) -> Callable:
    smoothing = float(config["parts"]["label_smoothing"])
    return lambda variables, batch, key: body_part_loss(module, variables, batch["target"], batch["parts"],
                                                        label_smoothing=smoothing)


def _swinir_loss(module: SwinIR, config) -> Callable:
    """Stage 0's L2 loss. SwinIR regresses the clean photo at the degraded input's size (the data pipeline upsamples
    the degraded image back to it), so a super-resolving variant is refused here, before anything compiles."""
    if module.config.scale != 1:
        raise ValueError(f"the swinir phase regresses the clean image at the input's size, but model variant "
                         f"{config.model.get('variant')!r} outputs {module.config.scale}x its input (upscale="
                         f"{module.config.upscale}, unshuffle_scale={module.config.unshuffle_scale}); use a variant "
                         "that keeps the size (diffbir, tiny-diffbir) or set model.swinir.unshuffle_scale to upscale")

    def fn(variables, batch, key):
        loss = swinir_l2_loss(module, variables["params"], batch["degraded"], batch["target"], rng=key)
        return loss, {}

    return fn


def stage2_switches(config) -> dict:
    adapter = config["adapter"] if "adapter" in config else {}
    return dict(**diffusion_switches(config), adapter_image=adapter.get("image", "ir"),
                clip_fit=adapter.get("clip_fit", "auto"))


def _stage2_loss(phase: str) -> Callable:
    return lambda group, config: functools.partial(stage2_phase_loss, group, phase=phase, **stage2_switches(config))


def colour_adapter_export(group, params):
    """The colour adapter of a stage-2 group as IP-Adapter's own model (`interop.ip_adapter.ColourAdapter`): the
    Resampler and the UNet's to_k_ip / to_v_ip, nothing else (params may be device arrays: selected, not copied)."""
    model, params = group.stage2, params["stage2"]
    adapter = ColourAdapter(ColourAdapterConfig(model.unet.config, model.image_proj.config))
    return adapter, adapter_params(params)


JOINT_UNET_TRAINABLE = ("sd_branch", "all")


def joint_unet_subset(config) -> TrainableSubset:
    """stage1_joint_unet's trainable params (config.joint.trainable).

    "sd_branch" (the paper, seed 002 Sec. 4.2: "fine-tuning applied only to the Stable Diffusion branch"): the
      joint UNet's SD UNet, i.e. the RGB branch's own blocks and the shared trunk, time embedding included; the
      depth and normal branches' own blocks and the fusion logits stay frozen. Our reading: the sentence can
      also mean the whole joint UNet as opposed to the ControlNet trained next (that is "all"); docs/training.md.
    "all" (the authors' training script): every joint UNet param.
    """
    choice = config["joint"]["trainable"]
    if choice == "all":
        return TrainableSubset("joint_unet", (r"^joint_unet/",))
    if choice != "sd_branch":
        raise ValueError(f"config joint.trainable={choice!r}; expected one of {JOINT_UNET_TRAINABLE}")
    branches = config["model"]["members"]["joint_unet"]["config"]["branches"]
    if "rgb" not in branches:
        raise ValueError(f"joint.trainable=sd_branch needs an rgb branch; model branches are {list(branches)}")
    rgb = list(branches).index("rgb")
    # every joint UNet path except fusion_logits and the other branches' `<name>_branch_<b>[_<block>]/...`
    return TrainableSubset("joint_unet_sd_branch",
                           (rf"^joint_unet/(?!fusion_logits$)(?![a-z_]+_branch_(?!{rgb}[_/])\d+[_/])",))


def stage1_switches(config) -> dict:
    d = config["diffusion"]
    joint = config["joint"]
    stats = {k: tuple(v) for k, v in joint["latent_stats"].items()} if joint["normalize_latents"] else None
    return dict(alphas_cumprod=_schedule(config), prediction_type=d["prediction_type"],
                branches=tuple(config["model"]["members"]["joint_unet"]["config"]["branches"]), latent_stats=stats)


def _stage1_loss(group, config) -> Callable:
    return functools.partial(stage1_loss, group, **stage1_switches(config))


STAGE1_INPUTS = ("target", "pose", "depth", "normal", "input_ids")

PHASES: dict[str, Phase] = {p.name: p for p in (
    Phase("autoencoder", autoencoder_subset, ("target",), _autoencoder_loss, calibrate=calibrate_latent_scale),
    Phase("base_unet", TrainableSubset("unet", (r"^unet/",)), BASE_UNET_INPUTS, _base_unet_loss, export="unet",
          host=caption_tokens, cache=base_unet_cacheable),
    Phase("base_unet_sdxl", TrainableSubset("unet", (r"^unet/",)),
          BASE_UNET_INPUTS + ("input_ids_2", "original_size", "crop_top_left"), _base_unet_loss, export="unet",
          host=caption_tokens, cache=base_unet_cacheable),
    Phase("swinir", TrainableSubset("swinir", (r".",)), ("degraded", "target"), _swinir_loss),
    Phase("bodypart", TrainableSubset("bodypart", (r".",)), ("target", "parts"), _body_part_loss),
    Phase("v1_controlnet", TrainableSubset("controlnet", (r"^controlnet/",)),
          ("degraded", "target", "pose", "input_ids"), _v1_loss, export="controlnet", host=caption_tokens,
          cache=v1_cacheable),
    Phase("stage1_joint_unet", joint_unet_subset, STAGE1_INPUTS, _stage1_loss, export="joint_unet",
          host=caption_tokens, cache=stage1_cacheable),
    Phase("stage1_controlnet", TrainableSubset("controlnet", (r"^controlnet/",)), STAGE1_INPUTS + ("degraded",),
          _stage1_loss, export="controlnet", host=caption_tokens, cache=stage1_cacheable),
    Phase("stage2_controlnet", _in_member(STAGE2_SUBSETS["controlnet"], "stage2"), STAGE2_INPUTS,
          _stage2_loss("controlnet"), export="stage2/controlnet", host=caption_tokens, cache=stage2_cacheable),
    Phase("colour_adapter", _in_member(STAGE2_SUBSETS["colour_adapter"], "stage2"), STAGE2_INPUTS,
          _stage2_loss("colour_adapter"), export=colour_adapter_export, host=caption_tokens, cache=stage2_cacheable),
)}


def get_phase(name: str) -> Phase:
    if name not in PHASES:
        raise ValueError(f"unknown training phase {name!r}; known: {sorted(PHASES)}")
    return PHASES[name]
