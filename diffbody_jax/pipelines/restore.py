"""Batch restoration from a weights folder, data-parallel over the local devices.

    restorer = Restorer("weights/", RestoreSettings(version="v1"))
    out = restorer.restore(key, degraded, pose, prompts)      # numpy: restored [B, H, W, 3] and the intermediates
    i_reg = restorer.regress(degraded)                         # SwinIR alone: what an annotator reads the pose from

`Restorer` loads the models of one version (`pipelines.weights`) and builds its pipeline from the trained runs'
contracts (`diffusion.contract`: noise schedule and prediction type, latent statistics, I_attn source, part loss,
pose style, adapter and text settings), so each model is fed what it trained on; it replicates the variables on a
1-D mesh over the local devices, and splits each batch over it (a batch is padded to a multiple of the device count,
or to `pad_to`, with copies of its last image; the padding is dropped from the outputs). The pipeline is one jitted
program, compiled once per (H, W, padded batch) and reused for every batch of that shape, and by a second Restorer
of equal weights and settings (pipelines hash by value). Prompts are tokenised on the host and encoded by the
pipeline's `encode_text` once per batch. Both pipelines take the same call arguments: the Restorer does not know
which version it drives.

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
import numpy as np

from diffbody_jax.conditioning.prompts import load_tokenizer, tokenize
from diffbody_jax.data.pipeline import PAPER_BUCKETS
from diffbody_jax.data.pose import PoseStyle
from diffbody_jax.diffusion.contract import Contract
from diffbody_jax.diffusion.samplers import SamplerConfig
from diffbody_jax.models.attention import backend_names
from diffbody_jax.parallel.sharding import (
    PLACEMENTS,
    ShardingRules,
    batch_sharding,
    host_to_sharded,
    inference_mesh,
    inference_shardings,
    resolve_placement,
    tree_bytes,
)
from diffbody_jax.pipelines.prompts import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT
from diffbody_jax.pipelines.tiles import TileConfig, tiles_for
from diffbody_jax.pipelines.v1 import V1Pipeline
from diffbody_jax.pipelines.v2 import V2Pipeline
from diffbody_jax.pipelines.weights import (
    DTYPES,
    TEXT_MEMBERS,
    WeightsError,
    component_present,
    guidance_remat,
    load_v1_models,
    load_v2_models,
    members_of,
    restore_contracts,
    tokenizer_folder,
)

VERSIONS = ("v1", "v2")
PRESET_STEPS = {"v1": 50, "v2": 200}  # DDPM steps of the papers' inference (v2: in each stage)
FITS = ("bucket", "tile")
SAMPLERS = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp": "dpmpp_2m"}
# the intermediates each version returns beside "restored" (what --save-intermediates writes)
INTERMEDIATES = {"v1": V1Pipeline.intermediates, "v2": V2Pipeline.intermediates}


@dataclasses.dataclass(frozen=True)
class RestoreSettings:
    """version: v1 | v2. steps: None = the paper's preset. sampler: ddpm | ddim | dpmpp. cfg: classifier-free
    guidance scale (1: off). guidance: part-loss guidance scale s (v1's Algorithm 1; 0: off). colour: none |
    adain | wavelet correction toward I_ir. size: the side of the square bucket; the other buckets keep the
    paper's aspect ratios (512: 512x512, 768x512, 512x768, 1024x512, 512x1024); square_only: only the square
    bucket (one compile for every photo; non-square photos get a wider reflected border). fit: bucket (scale into
    a bucket and back) | tile (restore at the photo's own size on overlapping tiles of `size` pixels with `size / 4`
    overlap in every stage; `pipelines.tiles`). dtype: float32 | bfloat16, the weights and compute of every model
    but the VAEs (`pipelines.weights.FLOAT32_COMPONENTS`); the sampler's arithmetic stays float32. attention: the
    models' attention backend (`models.attention`; "bounded": memory-bounded, chosen per platform; the VAEs'
    single-head attention runs "chunked" under it). params: auto | replicated | fsdp, how the weights lie on the
    local devices (`parallel.sharding.resolve_placement`: auto splits them when a copy would take over half of a
    device). offload: v2's weights stay in host memory, and each stage's go to the devices for its own program
    (the text encoders' for the prompts): device memory then holds one stage at a time. scan_layers: the UNets and
    ControlNets run each transformer stack deeper than one block as one scan (SDXL's: a shorter compile; their
    weights are stacked once after loading; `models.stacked_blocks`, docs/scaling.md)."""

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
    dtype: str = "float32"
    attention: str = "bounded"
    params: str = "auto"
    offload: bool = False
    scan_layers: bool = False

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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}; expected one of {DTYPES}")
        if self.params not in PLACEMENTS:
            raise ValueError(f"params {self.params!r}; expected one of {PLACEMENTS}")
        if self.attention not in backend_names():
            raise ValueError(f"attention {self.attention!r}; expected one of {backend_names()}")
        if self.offload and self.version != "v2":
            raise ValueError("offload moves v2's two stages to the devices one after the other; v1 has one stage")
        if self.fit == "tile" and self.guidance:
            raise ValueError("part-loss guidance decodes the whole image at every step: not with --fit tile")

    @property
    def num_steps(self) -> int:
        return self.steps or PRESET_STEPS[self.version]

    @property
    def tiles(self) -> TileConfig | None:
        return tiles_for(self.fit, self.size)

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        if self.square_only:
            return ((self.size, self.size),)
        return tuple((h * self.size // 512, w * self.size // 512) for h, w in PAPER_BUCKETS)

    def sampler_config(self, guidance: float = 0.0, **window) -> SamplerConfig:
        """window: guidance_start / guidance_end / guidance_schedule (a contract's `guidance_window`)."""
        return SamplerConfig(method=SAMPLERS[self.sampler], num_steps=self.num_steps, cfg_scale=self.cfg,
                             guidance_scale=guidance, **(window if guidance else {}))


def _v1_pipeline(weights, s: RestoreSettings, contracts: dict[str, Contract], on_step, **kwargs):
    """v1's pipeline and variables, built from its ControlNet's contract."""
    c = contracts["v1"]
    group, variables = load_v1_models(weights, **kwargs)
    attention = "mask" if c.attention == "mask" else "model"  # a "manifest" map was the part network's, precomputed
    if attention == "model" and "bodypart" not in group.members:
        if not c.is_default:
            raise WeightsError(f"{c.source}: the ControlNet trained on the part network's I_attn, and "
                               f"{weights}/bodypart is missing (`diffbody convert bodypart-to-flax`)")
        attention = "mask"
    window = c.guidance_window() if c.part_loss is not None else {}
    pipeline = V1Pipeline(group, c.schedule(), s.sampler_config(s.guidance, **window), c.part_loss_config(),
                          s.colour, on_step=on_step, tiles=s.tiles, attention=attention)
    return pipeline, variables


def _v2_pipeline(weights, s: RestoreSettings, contracts: dict[str, Contract], on_step, **kwargs):
    """v2's pipeline and variables, built from the stage-1 and stage-2 contracts."""
    if s.guidance:
        raise ValueError("part-loss guidance (--guidance) is v1's (seed 000, Algorithm 1); v2 has none")
    c1, c2 = contracts["stage1"], contracts["stage2"]
    stage1, stage2, variables = load_v2_models(weights, **kwargs)
    pipeline = V2Pipeline(stage1, stage2, c1.schedule(), c2.schedule(), s.sampler_config(), s.sampler_config(),
                          latent_stats=c1.stats(), colour=s.colour, on_step=on_step, tiles=s.tiles,
                          uncond_image=c2.uncond_image, clip_fit=c2.clip_fit)
    return pipeline, variables


PIPELINES = {"v1": _v1_pipeline, "v2": _v2_pipeline}


# The pipeline is a static argument (pipelines hash by value): a second Restorer of equal weights and settings reuses
# these programs, as it reuses the pipeline's own jitted __call__.
@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_text(pipeline, variables, ids, size):
    return pipeline.encode_text(variables, ids, size)


@functools.partial(jax.jit, static_argnums=0)
def _regress(pipeline, variables, degraded):
    return pipeline.regress(variables, degraded)


@functools.partial(jax.jit, static_argnums=0)
def _run_stage1(pipeline, *args):
    return pipeline.run_stage1(*args)


@functools.partial(jax.jit, static_argnums=0)
def _run_stage2(pipeline, *args):
    return pipeline.run_stage2(*args)


def restore_defaults(weights: str | os.PathLike, version: str) -> tuple[PoseStyle, str]:
    """(pose style, default prompt) of `version` in a weights folder, from its contracts alone (no tensors read):
    what the host side needs before the models load."""
    contracts, _ = restore_contracts(weights, version)
    first = next(iter(contracts.values()))
    return first.pose(), first.fallback_prompt or DEFAULT_PROMPT


class Restorer:
    def __init__(self, weights: str | os.PathLike, settings: RestoreSettings = RestoreSettings(),
                 devices: Sequence[jax.Device] | None = None, on_step: Callable[[int, int], None] | None = None,
                 annotator=None, captioner: Callable[[np.ndarray], str] | None = None,
                 rules: ShardingRules | None = None):
        """annotator: where the callers (`pipelines.jobs.run_jobs`) take pose maps and person masks from for photos
        without given keypoints (`annotators.get_annotator`); None: black pose maps. rules: which weights an fsdp
        placement splits (`fsdp_min_size`; default the training engine's). captioner: image [H, W, 3] in
        [0, 1] -> caption (`annotators.caption.Captioner` on a local folder): v2's stage 2 is then conditioned on
        the caption of I_res, the paper's p' = LLaVA(I_res), and runs as a second program after stage 1."""
        self.settings = s = settings
        self.annotator, self.captioner = annotator, captioner
        devices = list(devices or jax.local_devices())
        self.contracts, self.notes = restore_contracts(weights, s.version)
        kwargs = {"attention_backend": s.attention, "dtype": s.dtype, "scan_layers": s.scan_layers}
        if s.guidance and guidance_remat(devices[0].platform):  # block boundaries only in each step's backward pass
            kwargs["remat"] = True
        self.pipeline, variables = PIPELINES[s.version](weights, s, self.contracts, on_step, **kwargs)
        self.factor = self.pipeline.factor
        first = next(iter(self.contracts.values()))
        self.pose_style = first.pose()  # how pose maps are drawn: as the model's training data drew them
        self.default_prompt = first.fallback_prompt or DEFAULT_PROMPT
        self.notes += self._contract_notes(first)
        if self.needs_mask and annotator is None:
            why = (f"{weights} has no bodypart/ (the body-part network)" if not component_present(weights, "bodypart")
                   else f"{first.source}: the ControlNet trained with I_attn from person masks")
            raise ValueError(f"{why}: v1 then takes I_attn from an annotator's person mask, and no annotator is set "
                             "(install the annotators extra, or add the part network: `diffbody convert "
                             "bodypart-to-flax`)")
        self.tokenizers = {name: load_tokenizer(*tokenizer_folder(weights, name)) for name in self.pipeline.tokenizers}
        self.placement = resolve_placement(s.params, tree_bytes(variables), devices)
        self.mesh = inference_mesh(self.placement, devices)
        self.shardings = inference_shardings(variables, self.mesh, rules or ShardingRules())
        if s.offload:  # placed per program (`_on_devices`)
            self.host_variables, self.variables = variables, None
        else:
            self.variables = host_to_sharded(variables, self.shardings)
        if captioner is not None and not hasattr(self.pipeline, "run_stage2"):
            raise ValueError(f"a captioner re-captions I_res for v2's stage 2; {s.version} has no second stage")

    def _contract_notes(self, c: Contract) -> list[str]:
        s, notes = self.settings, []
        if s.cfg != 1.0 and c.text is not None and not c.text.get("drop_prob"):
            notes.append(f"--cfg {s.cfg:g}: {c.source} trained without empty captions (text.drop_prob 0): "
                         "classifier-free guidance is outside what it learned")
        return notes

    def annotator_warning(self, spec: str | None) -> str | None:
        """One line when poses come from an annotator other than the one the training run drew with."""
        c = next(iter(self.contracts.values()))
        if spec is None or c.pose_source != "annotator" or not c.annotator:
            return None
        if spec.split(":")[0] != str(c.annotator).split(":")[0]:
            return (f"warning: pose maps from annotator {spec!r}; {c.source} trained on poses from "
                    f"{c.annotator!r} (another keypoint style)")
        return None

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def needs_mask(self) -> bool:
        """I_attn from person masks (v1 without the part network, or trained on masks): `restore` needs masks."""
        return self.pipeline.needs_mask

    def _sharded(self, *arrays: np.ndarray, pad_to: int | None = None):
        """Each [B, ...] array padded to `pad_to` (at least B) rounded up to a multiple of the device count, with
        copies of its last row, and split over the mesh."""
        b = arrays[0].shape[0]
        pad = -max(b, pad_to or 0) % self.num_devices + max(0, (pad_to or 0) - b)

        def padded(x):
            x = np.asarray(x, np.float32)
            return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x

        sharding = batch_sharding(self.mesh, 4)
        return pad, [jax.device_put(padded(x), sharding) for x in arrays]

    def regress(self, degraded: np.ndarray) -> np.ndarray:
        """The version's SwinIR stage alone (I_reg of v1, I_ir of v2): [B, H, W, 3] in [0, 1], numpy."""
        _, (images,) = self._sharded(degraded)
        variables = self._on_devices("regress")
        return np.asarray(_regress(self.pipeline, variables, images))[: len(degraded)]

    def conditioning(self, prompts: Sequence[str], size: tuple[int, int], negative: bool = True) -> tuple:
        """(text, uncond or None): the pipeline's text arguments for `prompts` at image `size` (H, W); with CFG (and
        `negative`) the negative prompt's in the same encoder call."""
        s = self.settings
        cfg = s.cfg != 1.0 and negative
        texts = list(prompts) + ([s.negative_prompt] * len(prompts) if cfg else [])
        ids = {name: tokenize(tok, texts) for name, tok in self.tokenizers.items()}
        text = _encode_text(self.pipeline, self._on_devices("text"), ids, tuple(size))
        if not cfg:
            return text, None
        n = len(prompts)
        return jax.tree.map(lambda x: x[:n], text), jax.tree.map(lambda x: x[n:], text)

    def restore(self, key: jax.Array, degraded: np.ndarray, pose: np.ndarray, prompts: Sequence[str],
                mask: np.ndarray | None = None, i_reg: np.ndarray | None = None, pad_to: int | None = None) -> dict:
        """degraded, pose: [B, H, W, 3] float in [0, 1], H and W multiples of `factor`; prompts: B strings; mask
        [B, H, W, 1]: person masks, needed when `needs_mask` (ignored otherwise); i_reg: `regress(degraded)` when
        the caller has it (SwinIR then runs once); pad_to: pad the batch to this size (one compile for every batch
        of a bucket). Returns numpy arrays: restored [B, H, W, 3] and the version's intermediates (INTERMEDIATES)."""
        b, h, w, _ = degraded.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"restore: {h} x {w} is not a multiple of {self.factor} (fit the photo first)")
        if pose.shape != degraded.shape or len(prompts) != b:
            raise ValueError(f"restore: degraded {degraded.shape}, pose {pose.shape}, {len(prompts)} prompts")
        if self.needs_mask and (mask is None or mask.shape != (b, h, w, 1)):
            raise ValueError(f"restore: I_attn comes from person masks here, so v1 needs masks [{b}, {h}, {w}, 1] "
                             f"(an annotator gives them); got {None if mask is None else mask.shape}")
        if i_reg is not None and i_reg.shape != degraded.shape:
            raise ValueError(f"restore: i_reg {i_reg.shape} does not match degraded {degraded.shape}")
        extra = {"mask": mask} if self.needs_mask else {}
        if i_reg is not None:
            extra["i_reg"] = i_reg
        pad, arrays = self._sharded(degraded, pose, *extra.values(), pad_to=pad_to)
        prompts = list(prompts) + [prompts[-1]] * pad
        text, uncond = self.conditioning(prompts, (h, w))
        named = dict(zip(extra, arrays[2:], strict=True))
        if self.captioner is None and not self.settings.offload:
            out = self.pipeline(self.variables, key, arrays[0], arrays[1], text, uncond, **named)
        else:
            out = self._two_programs(key, arrays[0], arrays[1], text, uncond, named.get("i_reg"), (h, w))
        keep = ("restored", *self.pipeline.intermediates, *(("caption",) if self.captioner is not None else ()))
        return {k: (list(out[k]) if k == "caption" else np.asarray(out[k]))[:b] for k in keep}

    def _on_devices(self, part: str):
        """The variables a program needs, on the devices: all of them (held there since __init__), or with
        `offload` only `part`'s (text: the text encoders; regress: SwinIR; stage1, stage2: that stage's), placed
        now from host memory and freed when the caller drops them."""
        if not self.settings.offload:
            return self.variables
        members = {"text": TEXT_MEMBERS, "regress": ("swinir",)}.get(part)

        def select(tree):
            return {part: tree[part]} if members is None else members_of(tree, members)

        return host_to_sharded(select(self.host_variables), select(self.shardings))

    def _two_programs(self, key, degraded, pose, text, uncond, i_reg, size) -> dict:
        """v2 as two programs, stage 1 then stage 2 (the keys split as the one program splits them, so the images
        equal its): with `offload`, each on its own stage's weights; with a captioner, stage 2 on the SDXL text of
        I_res's caption."""
        k1, k2 = jax.random.split(key)
        first = _run_stage1(self.pipeline, self._on_devices("stage1"), k1, degraded, pose, text[0],
                            None if uncond is None else uncond[0], i_reg)
        extra = {}
        if self.captioner is not None:
            captions = [self.captioner(np.asarray(image)) for image in np.asarray(first["i_res"])]
            text, _ = self.conditioning(captions, size, negative=False)  # the negative prompt's is `uncond`
            extra["caption"] = captions
        second = _run_stage2(self.pipeline, self._on_devices("stage2"), k2, first, pose, text[1],
                             None if uncond is None else uncond[1])
        return {**{k: v for k, v in first.items() if k != "z1"}, **second, **extra}
