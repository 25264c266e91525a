"""A trained run's contract: what restoring must feed a model so that it sees the inputs it was trained on.

    contract = contract_from_config(config)            # the training side: a phase's config
    contract.write(export_folder)                      # beside the weights, as contract.json
    contract = read_contract(folder)                   # the restoring side (None: a component without one)
    schedule = contract.schedule()                     # NoiseSchedule with the trained prediction type

Every phase's export writes one (`training.engine.export_params`); the weights folder keeps it per component
(`pipelines.weights`), and the pipelines are built from it. What it holds, each where a phase has it:

  phase, component     the training phase and the weights-folder component its export fills (PHASE_COMPONENTS)
  scheduler            the diffusers scheduler config the loss noised with, prediction_type as trained
  latent_stats         v2 stage 1: the (mean, std) per prior the latents were normalised with; None: raw latents
  attention            v1: where I_attn came from (model | manifest | mask)
  part_loss            v1: Eq. 6's distance, temperature, part weights and Algorithm 1's window and schedule
  pose_style           how keypoints were drawn (`data.pose.PoseStyle`)
  pose_source, annotator   pose maps from the manifest's keypoints, or drawn each step by that annotator spec
  buckets              the (H, W) training crops
  adapter              stage 2: the colour adapter's training image (ir | target), its CLIP fit, and what CFG's
                       unconditional pass feeds it (keep: the same image features, as in training where images
                       are never dropped; zeros: the features of an all-zero image, diffusers' IP-Adapter choice)
  text                 tokenizer(s), pad tokens, the fallback caption (the prompt an uncaptioned photo trained
                       with), and the caption drop probability (0: the model never saw an empty prompt, so CFG
                       is outside its training)

One table maps each phase to its component (PHASE_COMPONENTS) and each frozen member a phase trains beside to
the component it reads (MEMBER_COMPONENTS): `weights check`, the stand-in folders and any assembly read these.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffbody_jax.config import CONFIG_DIR
from diffbody_jax.data.pose import PoseStyle
from diffbody_jax.diffusion.part_guidance import PartLossConfig
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.files import read_json, write_json

CONTRACT_FILE = "contract.json"
FORMAT = 1

# training phase -> the weights-folder component its export fills
PHASE_COMPONENTS = {
    "autoencoder": "vae",  # sd21/vae or sdxl/vae: the VAE of the pipeline whose base it trains
    "base_unet": "sd21/unet",
    "base_unet_sdxl": "sdxl/unet",
    "swinir": "swinir",
    "bodypart": "bodypart",
    "v1_controlnet": "v1_controlnet",
    "stage1_joint_unet": "joint_unet",
    "stage1_controlnet": "stage1_controlnet",
    "stage2_controlnet": "stage2_controlnet",
    "colour_adapter": "colour_adapter",
}
# (phase config, member) -> the component that member is (frozen there, or the exported one): what a stand-in
# folder writes and what a run's init_from reads
MEMBER_COMPONENTS = {
    ("v1_controlnet", "swinir"): "swinir",
    ("v1_controlnet", "bodypart"): "bodypart",
    ("v1_controlnet", "unet"): "sd21/unet",
    ("v1_controlnet", "vae"): "sd21/vae",
    ("v1_controlnet", "text_encoder"): "sd21/text_encoder",
    ("v1_controlnet", "controlnet"): "v1_controlnet",
    ("stage1_controlnet", "swinir"): "swinir",  # v1 and v2 share SwinIR and SD2.1's VAE and text encoder
    ("stage1_controlnet", "vae"): "sd21/vae",
    ("stage1_controlnet", "text_encoder"): "sd21/text_encoder",
    ("stage1_controlnet", "joint_unet"): "joint_unet",
    ("stage1_controlnet", "controlnet"): "stage1_controlnet",
    ("colour_adapter", "vae"): "sdxl/vae",
    ("colour_adapter", "text_encoder"): "sdxl/text_encoder",
    ("colour_adapter", "text_encoder_2"): "sdxl/text_encoder_2",
    ("colour_adapter", "image_encoder"): "image_encoder",
}
# the SD pipeline whose scheduler a component samples with when it has no contract
BASE_PIPELINE = {"v1_controlnet": "sd21", "joint_unet": "sd21", "stage1_controlnet": "sd21",
                 "stage2_controlnet": "sdxl", "colour_adapter": "sdxl"}
ATTENTION_SOURCES = ("model", "manifest", "mask")
UNCOND_IMAGES = ("keep", "zeros")
# fields two components restored together must agree on, per pair (e.g. a stage-1 ControlNet trained against a
# joint UNet with other latent statistics)
SHARED_FIELDS = ("scheduler", "latent_stats", "pose_style")
PAPER_BUCKETS = ((512, 512), (768, 512), (512, 768), (1024, 512), (512, 1024))


def bundled_scheduler(name: str) -> dict[str, Any]:
    """configs/diffusers/<name>/scheduler/scheduler_config.json (sd21-base, sd21-768v, sdxl-base)."""
    path = CONFIG_DIR / "diffusers" / name / "scheduler" / "scheduler_config.json"
    if not path.exists():
        known = sorted(p.parent.parent.name for p in CONFIG_DIR.glob("diffusers/*/scheduler/scheduler_config.json"))
        raise ValueError(f"diffusion.scheduler={name!r}: no {path} (known: {known})")
    return read_json(path)


@dataclasses.dataclass(frozen=True)
class Contract:
    phase: str
    scheduler: Mapping[str, Any] | None = None
    latent_stats: Mapping[str, tuple[float, float]] | None = None
    attention: str | None = None
    part_loss: Mapping[str, Any] | None = None
    pose_style: Mapping[str, Any] = dataclasses.field(default_factory=lambda: PoseStyle().to_dict())
    pose_source: str = "manifest"
    annotator: str | None = None
    buckets: tuple[tuple[int, int], ...] = PAPER_BUCKETS
    adapter: Mapping[str, Any] | None = None
    text: Mapping[str, Any] | None = None
    source: str = ""  # where it was read from, or "default (...)" for a component without one

    def __post_init__(self):
        if self.phase not in PHASE_COMPONENTS:
            raise ValueError(f"{self.source or 'contract'}: phase {self.phase!r}; known: {sorted(PHASE_COMPONENTS)}")
        if self.attention is not None and self.attention not in ATTENTION_SOURCES:
            raise ValueError(f"{self.source or 'contract'}: attention {self.attention!r}; known: {ATTENTION_SOURCES}")
        if self.adapter is not None and self.adapter.get("uncond_image", "keep") not in UNCOND_IMAGES:
            raise ValueError(f"{self.source or 'contract'}: adapter.uncond_image {self.adapter['uncond_image']!r}; "
                             f"known: {UNCOND_IMAGES}")
        PoseStyle.from_dict(dict(self.pose_style))  # refuses unknown fields, naming them

    @property
    def component(self) -> str:
        return PHASE_COMPONENTS[self.phase]

    @property
    def is_default(self) -> bool:
        return self.source.startswith("default")

    # -------------------------------------------------------------------------------- what restoring builds
    def schedule(self) -> NoiseSchedule:
        """The noise schedule and prediction type the model trained with."""
        if self.scheduler is None:
            raise ValueError(f"{self.source}: phase {self.phase} has no noise schedule")
        return NoiseSchedule.from_dict(dict(self.scheduler), self.source or "contract scheduler")

    def pose(self) -> PoseStyle:
        return PoseStyle.from_dict(dict(self.pose_style))

    def part_loss_config(self) -> PartLossConfig:
        p = dict(self.part_loss or {})
        return PartLossConfig(**{k: p[k] for k in ("distance", "temperature", "visibility") if k in p})

    def guidance_window(self) -> dict[str, Any]:
        """SamplerConfig's guidance_start, guidance_end and guidance_schedule as trained / configured."""
        p = dict(self.part_loss or {})
        return {"guidance_start": float(p.get("start", 1.0)), "guidance_end": float(p.get("end", 0.0)),
                "guidance_schedule": str(p.get("schedule", "constant"))}

    def stats(self) -> dict[str, tuple[float, float]] | None:
        return None if self.latent_stats is None else {k: tuple(v) for k, v in self.latent_stats.items()}

    @property
    def uncond_image(self) -> str:
        return (self.adapter or {}).get("uncond_image", "keep")

    @property
    def clip_fit(self) -> str:
        return (self.adapter or {}).get("clip_fit", "auto")

    @property
    def fallback_prompt(self) -> str | None:
        return None if self.text is None else self.text.get("fallback")

    # ---------------------------------------------------------------------------------------------- files
    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "component": self.component}
        for f in dataclasses.fields(self):
            if f.name != "source":
                value = getattr(self, f.name)
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "contract") -> Contract:
        d = dict(d)
        if d.pop("format", FORMAT) != FORMAT:
            raise ValueError(f"{source}: contract format {d.get('format')!r}; this version reads {FORMAT}")
        component = d.pop("component", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown contract field(s) {unknown}")
        if "phase" not in d:
            raise ValueError(f"{source}: no 'phase'")
        d["buckets"] = tuple(tuple(b) for b in d.get("buckets", PAPER_BUCKETS))
        contract = cls(**d, source=source)
        if component is not None and component != contract.component:
            raise ValueError(f"{source}: component {component!r} does not match phase {contract.phase!r}")
        return contract

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / CONTRACT_FILE
        write_json(self.to_json(), path)  # atomic (files.write_json)
        return path

    def describe(self) -> str:
        """One line for `diffbody weights check`."""
        parts = []
        if self.scheduler is not None:
            s = self.scheduler
            parts.append(f"{s.get('prediction_type', 'epsilon')}, {s.get('beta_schedule')} "
                         f"{s.get('beta_start')}-{s.get('beta_end')}")
        if self.latent_stats is not None:
            parts.append("normalised latents (" + ", ".join(f"{k} {v[0]:.3g}/{v[1]:.3g}"
                                                           for k, v in self.latent_stats.items()) + ")")
        if self.attention is not None:
            parts.append(f"I_attn from {self.attention}")
        if self.part_loss is not None:
            parts.append(f"part loss {self.part_loss_config().distance}")
        st = self.pose()
        parts.append(f"pose {self.pose_source}" + (f" ({self.annotator})" if self.annotator else "")
                     + f", threshold {st.threshold:g}, hands {'on' if st.hands else 'off'}, "
                       f"face {'on' if st.face else 'off'}")
        if self.adapter is not None:
            parts.append(f"adapter image {self.adapter.get('image')}, CLIP fit {self.clip_fit}, "
                         f"CFG uncond image {self.uncond_image}")
        if self.text is not None:
            parts.append(f"caption drop {self.text.get('drop_prob', 0.0):g}")
        parts.append("buckets " + " ".join(f"{h}x{w}" for h, w in self.buckets))
        return "; ".join(parts)


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def read_contract(folder: str | os.PathLike) -> Contract | None:
    """The contract.json in `folder`, or None when there is none (a converted or diffusers folder)."""
    path = Path(folder) / CONTRACT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return Contract.from_json(data, str(path))


def contract_from_config(config) -> Contract:
    """The contract of a training config (a phase config file's ConfigDict, overrides applied)."""
    phase = config["phase"]
    data = config.get("data", {})
    fields: dict[str, Any] = {"phase": phase}
    if "data" in config:
        fields["buckets"] = tuple(tuple(int(x) for x in b) for b in data["buckets"])
        fields["pose_style"] = dict(data.get("pose_style", PoseStyle().to_dict()))
        fields["pose_source"] = data.get("pose_source", "manifest")
        fields["annotator"] = data.get("annotator") if fields["pose_source"] == "annotator" else None
    if "diffusion" in config and "scheduler" in config["diffusion"]:
        d = config["diffusion"]
        fields["scheduler"] = {**bundled_scheduler(d["scheduler"]), "prediction_type": d["prediction_type"]}
        if "attention" in d:
            fields["attention"] = d["attention"]
    if "joint" in config:
        joint = config["joint"]
        if joint["normalize_latents"]:
            fields["latent_stats"] = {k: [float(x) for x in v] for k, v in joint["latent_stats"].items()}
    if "guidance" in config:
        fields["part_loss"] = dict(config["guidance"])
    if "adapter" in config:
        fields["adapter"] = dict(config["adapter"])
    if "text" in config:
        t = config["text"]
        fields["text"] = {k: t[k] for k in t.keys()}
    return Contract(**fields, source=f"config of phase {phase}")


def default_contract(component: str, scheduler: Mapping[str, Any], has_part_network: bool = True) -> Contract:
    """What a diffusion component without a contract.json (converted weights) is restored with: the base SD
    pipeline's scheduler, I_attn from the part network when there is one (else the person mask), the default
    pose style and part loss."""
    phase = next(p for p, c in PHASE_COMPONENTS.items() if c == component)
    extra: dict[str, Any] = {}
    if component == "v1_controlnet":
        extra["attention"] = "model" if has_part_network else "mask"
    if component in ("stage2_controlnet", "colour_adapter"):
        extra["adapter"] = {"image": "ir", "clip_fit": "auto", "uncond_image": "keep"}
    return Contract(phase, scheduler=dict(scheduler), source=f"default ({BASE_PIPELINE[component]} scheduler, "
                    "no contract.json)", **extra)


def disagreements(a: Contract, b: Contract, fields=SHARED_FIELDS) -> list[str]:
    """The fields two contracts restored together differ in, each as "field: a's value vs b's"."""
    out = []
    for name in fields:
        va, vb = _plain(getattr(a, name)), _plain(getattr(b, name))
        if va != vb:
            out.append(f"{name}: {json.dumps(va)[:120]} ({a.source}) vs {json.dumps(vb)[:120]} ({b.source})")
    return out
