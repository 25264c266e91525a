"""Batch restoration from a weights folder, data-parallel over the local devices.

    restorer = Restorer("weights/", RestoreSettings(version="v1"))
    out = restorer.restore(key, degraded, pose, prompts)      # numpy: restored [B, H, W, 3] and the intermediates
    i_reg = restorer.regress(degraded)                         # SwinIR alone: what an annotator reads the pose from

`Restorer` loads the models of one version (`pipelines.weights`), replicates their variables on a 1-D mesh over
the local devices, and splits each batch over it (a batch is padded to a multiple of the device count with copies
of its last image; the padding is dropped from the outputs). The pipeline is one jitted program, compiled once
per (H, W, padded batch) and reused for every batch of that shape. Prompts are tokenised on the host and encoded
by the version's text encoders once per batch (SD2.1's context for v1 and v2 stage 1; SDXL's prompt and pooled
embeddings for stage 2, with size conditioning = the image's size, no crop).

Pose maps come from the caller: given keypoints, or an annotator on `regress`'s output (`pipelines.annotate`; the
restore command does this by default). v1 without the body-part network's weights takes a person mask [B, H, W, 1]
as I_attn (`conditioning.body_priors.attention_from_mask`, an approximation).

Presets are the papers' settings: v1 DDPM with 50 steps (seed 000), v2 DDPM with 200 steps in both stages
(seed 002). Faster samplers (DDIM, DPM++ 2M) and fewer steps are options.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffbody_jax.conditioning.prompts import load_tokenizer, sd21_prompt_embeds, sdxl_prompt_embeds, tokenize
from diffbody_jax.data.pipeline import PAPER_BUCKETS
from diffbody_jax.diffusion.part_guidance import PartLossConfig
from diffbody_jax.diffusion.samplers import SamplerConfig
from diffbody_jax.parallel.mesh import MeshConfig, make_mesh
from diffbody_jax.parallel.sharding import batch_sharding
from diffbody_jax.pipelines.prompts import DEFAULT_NEGATIVE_PROMPT
from diffbody_jax.pipelines.tiles import TileConfig
from diffbody_jax.pipelines.v1 import V1Pipeline
from diffbody_jax.pipelines.v2 import V2Pipeline
from diffbody_jax.pipelines.weights import load_schedule, load_v1_models, load_v2_models, tokenizer_folder

VERSIONS = ("v1", "v2")
PRESET_STEPS = {"v1": 50, "v2": 200}  # DDPM steps of the papers' inference (v2: in each stage)
FITS = ("bucket", "tile")
SAMPLERS = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp": "dpmpp_2m"}
# the intermediates each version returns beside "restored" (what --save-intermediates writes)
INTERMEDIATES = {"v1": ("i_reg", "attention"), "v2": ("i_ir", "i_res", "depth", "normal")}


@dataclasses.dataclass(frozen=True)
class RestoreSettings:
    """version: v1 | v2. steps: None = the paper's preset. sampler: ddpm | ddim | dpmpp. cfg: classifier-free
    guidance scale (1: off). guidance: part-loss guidance scale s (v1's Algorithm 1; 0: off). colour: none |
    adain | wavelet correction toward I_ir. size: the side of the square bucket; the other buckets keep the
    paper's aspect ratios (512: 512x512, 768x512, 512x768, 1024x512, 512x1024); square_only: only the square
    bucket (one compile for every photo; non-square photos get a wider reflected border). fit: bucket (scale into
    a bucket and back) | tile (restore at the photo's own size on overlapping tiles of `size` pixels with `size / 4`
    overlap in every stage; `pipelines.tiles`)."""

    version: str = "v1"
    steps: int | None = None
    sampler: str = "ddpm"
    cfg: float = 1.0
    guidance: float = 0.0
    colour: str = "none"
    size: int = 512
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    square_only: bool = False
    fit: str = "bucket"

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(f"version {self.version!r}; expected one of {VERSIONS}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}; expected one of {sorted(SAMPLERS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be at least 1")
        if self.size % 64 or self.size < 64:
            raise ValueError(f"size={self.size}: must be a positive multiple of 64")
        if self.fit not in FITS:
            raise ValueError(f"fit {self.fit!r}; expected one of {FITS}")
        if self.fit == "tile" and self.guidance:
            raise ValueError("part-loss guidance decodes the whole image at every step: not with --fit tile")

    @property
    def num_steps(self) -> int:
        return self.steps or PRESET_STEPS[self.version]

    @property
    def tiles(self) -> TileConfig | None:
        return TileConfig(self.size, self.size // 4) if self.fit == "tile" else None

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        if self.square_only:
            return ((self.size, self.size),)
        return tuple((h * self.size // 512, w * self.size // 512) for h, w in PAPER_BUCKETS)

    def sampler_config(self, guidance: float = 0.0) -> SamplerConfig:
        return SamplerConfig(method=SAMPLERS[self.sampler], num_steps=self.num_steps, cfg_scale=self.cfg,
                             guidance_scale=guidance)


class Restorer:
    def __init__(self, weights: str | os.PathLike, settings: RestoreSettings = RestoreSettings(),
                 devices: Sequence[jax.Device] | None = None, on_step: Callable[[int, int], None] | None = None,
                 annotator=None):
        """annotator: where the callers (`cli.restore.run_jobs`) take pose maps and person masks from for photos
        without given keypoints (`annotators.get_annotator`); None: black pose maps."""
        self.settings = s = settings
        self.annotator = annotator
        self.mesh = make_mesh(MeshConfig(), list(devices or jax.local_devices()))
        # tiles bound memory only if no attention matrix spans a whole tile: chunked is the same math in blocks
        kwargs = {"attention_backend": "chunked"} if s.fit == "tile" else {}
        if s.version == "v1":
            group, variables = load_v1_models(weights, **kwargs)
            self.pipeline = V1Pipeline(group, load_schedule(weights, "sd21"), s.sampler_config(s.guidance),
                                       PartLossConfig(), s.colour, on_step=on_step, tiles=s.tiles)
        else:
            if s.guidance:
                raise ValueError("part-loss guidance (--guidance) is v1's (seed 000, Algorithm 1); v2 has none")
            stage1, stage2, variables = load_v2_models(weights, **kwargs)
            self.pipeline = V2Pipeline(stage1, stage2, load_schedule(weights, "sd21"), load_schedule(weights, "sdxl"),
                                       s.sampler_config(), s.sampler_config(), colour=s.colour, on_step=on_step,
                                       tiles=s.tiles)
            group = stage1
        self.factor = self.pipeline.factor
        if self.needs_mask and annotator is None:
            raise ValueError(f"{weights}: no bodypart/ (the body-part network): v1 then takes I_attn from an "
                             "annotator's person mask, and no annotator is set (install the annotators extra, or add "
                             "the part network: `diffbody convert bodypart-to-flax`)")
        self.tokenizers = {name: load_tokenizer(*tokenizer_folder(weights, name))
                           for name in (("sd21",) if s.version == "v1" else ("sd21", "sdxl", "sdxl_2"))}
        replicated = NamedSharding(self.mesh, P())
        self.variables = jax.device_put(variables, replicated)
        self._sd21 = jax.jit(functools.partial(sd21_prompt_embeds, group.text_encoder))
        self._regress = jax.jit(self.pipeline.regress)
        if s.version == "v2":
            self._sdxl = jax.jit(functools.partial(_sdxl_embeds, stage2.text_encoder, stage2.text_encoder_2))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def needs_mask(self) -> bool:
        """v1 without the body-part network: `restore` needs person masks for I_attn."""
        return self.settings.version == "v1" and not self.pipeline.has_part_network

    def _sharded(self, *arrays: np.ndarray):
        """Each [B, ...] array padded to a multiple of the device count and split over the mesh."""
        b = arrays[0].shape[0]
        pad = -b % self.num_devices

        def padded(x):
            x = np.asarray(x, np.float32)
            return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x

        sharding = batch_sharding(self.mesh, 4)
        return pad, [jax.device_put(padded(x), sharding) for x in arrays]

    def regress(self, degraded: np.ndarray) -> np.ndarray:
        """The version's SwinIR stage alone (I_reg of v1, I_ir of v2): [B, H, W, 3] in [0, 1], numpy."""
        _, (images,) = self._sharded(degraded)
        return np.asarray(self._regress(self.variables, images))[: len(degraded)]

    def _text_params(self, name: str):
        if self.settings.version == "v1":
            return self.variables["params"]
        return self.variables["stage1" if name == "sd21" else "stage2"]["params"]

    def conditioning(self, prompts: Sequence[str], size: tuple[int, int]) -> tuple:
        """The text arguments of the version's pipeline call for `prompts` at image `size` (H, W)."""
        s = self.settings
        texts = list(prompts) + ([s.negative_prompt] * len(prompts) if s.cfg != 1.0 else [])
        ids = tokenize(self.tokenizers["sd21"], texts)
        context = self._sd21(self._text_params("sd21")["text_encoder"], ids)
        context, uncond = (context, None) if s.cfg == 1.0 else jnp.split(context, 2)
        if s.version == "v1":
            return context, uncond
        p = self._text_params("sdxl")
        text = self._sdxl(p["text_encoder"], tokenize(self.tokenizers["sdxl"], texts), p["text_encoder_2"],
                          tokenize(self.tokenizers["sdxl_2"], texts), jnp.asarray([*size, 0, 0, *size], jnp.float32))
        uncond_xl = None
        if s.cfg != 1.0:
            text, uncond_xl = (type(text)(*(jnp.split(x, 2)[i] for x in text)) for i in (0, 1))
        return context, text, uncond, uncond_xl

    def restore(self, key: jax.Array, degraded: np.ndarray, pose: np.ndarray, prompts: Sequence[str],
                mask: np.ndarray | None = None) -> dict:
        """degraded, pose: [B, H, W, 3] float in [0, 1], H and W multiples of `factor`; prompts: B strings; mask
        [B, H, W, 1]: person masks, needed when `needs_mask` (ignored otherwise).
        Returns numpy arrays: restored [B, H, W, 3] and the version's intermediates (INTERMEDIATES)."""
        b, h, w, _ = degraded.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"restore: {h} x {w} is not a multiple of {self.factor} (fit the photo first)")
        if pose.shape != degraded.shape or len(prompts) != b:
            raise ValueError(f"restore: degraded {degraded.shape}, pose {pose.shape}, {len(prompts)} prompts")
        if self.needs_mask and (mask is None or mask.shape != (b, h, w, 1)):
            raise ValueError(f"restore: the weights have no body-part network, so v1 needs person masks [{b}, {h}, "
                             f"{w}, 1] for I_attn (an annotator gives them); got "
                             f"{None if mask is None else mask.shape}")
        pad, arrays = self._sharded(degraded, pose, *((mask,) if self.needs_mask else ()))
        prompts = list(prompts) + [prompts[-1]] * pad
        text = self.conditioning(prompts, (h, w))
        if self.settings.version == "v1":
            out = self.pipeline(self.variables, key, arrays[0], arrays[1], *text,
                                mask=arrays[2] if self.needs_mask else None)
        else:
            context, text_xl, uncond, uncond_xl = text
            out = self.pipeline(self.variables, key, *arrays, context, text_xl, uncond, uncond_xl)
        keep = ("restored", *INTERMEDIATES[self.settings.version])
        return {k: np.asarray(out[k])[:b] for k in keep}


def _sdxl_embeds(encoder_1, encoder_2, params_1, ids_1, params_2, ids_2, size_row):
    text = sdxl_prompt_embeds(encoder_1, params_1, ids_1, encoder_2, params_2, ids_2)
    return text._replace(time_ids=jnp.broadcast_to(size_row, text.time_ids.shape))
