"""The tiny zoo: every DiffBody model trained from scratch by this engine, in dependency order, on the photos that
installed packages ship (data/zoo_set.py), then assembled into a weights folder `diffbody restore` reads.

    result = train_zoo("zoo")              # zoo/data, zoo/runs/<phase>, zoo/weights, zoo/zoo.json
    result = train_zoo("zoo", steps_scale=0.05)   # a shortened zoo (the slow test's)

Each phase runs as a user would chain real runs (README, "Training"): `diffbody train`'s engine with the phase's
tiny config, `data.manifest` set to the zoo's people or photos manifest, and `train.init_from` naming the exports of
the phases before it. What no phase trains (the CLIP text encoders, the CLIP vision tower) is a stand-in drawn on
the host from a seed (`models.variables.random_variables`) and written once into the weights folder, so every
phase that holds one reads the same weights; zoo.json records its seed and hash. A VAE's export carries the
scaling factor it was calibrated with, which every later phase's VAE member takes as a config override (init_from
refuses a folder whose config differs from the member's).

Resumable: zoo.json is rewritten after each phase with what it measured, and a rerun skips the phases it lists as
done with the same config; a phase stopped midway resumes from its last checkpoint (the engine's resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from diffbody_jax.conditioning.prompts import open_clip_bpe_path, write_clip_tokenizer_files
from diffbody_jax.config import load_config
from diffbody_jax.data.zoo_set import write_zoo_set
from diffbody_jax.files import read_json, write_json
from diffbody_jax.interop.pretrained import INERT_FIELDS
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.variables import random_variables
from diffbody_jax.pipelines.weights import TOKENIZERS, component_location, write_component
from diffbody_jax.training.engine import train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ZooPhase:
    """One run of the zoo. init_from: (subtree, source) with source `run:<name>` (that run's export), `unet:run:<name>`
    (a ControlNet or joint UNet started from that UNet export) or `weights:<component>` (a stand-in of the weights
    folder). vae_run: the run whose VAE this phase's `vae` member is (its architecture and calibrated scaling
    factor become config overrides)."""

    name: str  # runs/<name>, and its key in zoo.json
    config: str  # a config spec, e.g. "vae:variant=zoo"
    components: tuple[str, ...]  # what its export is in the weights folder (pipelines/weights.py COMPONENTS)
    manifest: str  # "people" | "photos" (data/zoo_set.py)
    steps: int  # the full zoo's optimizer steps (sized from measured step times: docs/zoo.md)
    init_from: tuple[tuple[str, str], ...] = ()
    vae_run: str | None = None
    overrides: tuple[str, ...] = ()


# The zoo's one VAE (configs/vae.py:variant=zoo, latents at 1/4) serves both pipelines: the SD2.1-like and
# SDXL-like stand-ins differ in their UNets and text encoders, and one autoencoder run is half the cost of two.
# Stage 2's prior-fusion embedding then downsamples by 4 (three levels) to reach the latents.
_SD21 = (("vae", "run:vae"), ("text_encoder", "weights:sd21/text_encoder"))
_SDXL = (("vae", "run:vae"), ("text_encoder", "weights:sdxl/text_encoder"),
         ("text_encoder_2", "weights:sdxl/text_encoder_2"))
_PRIOR_EMBEDDING = ("model.members.stage2.controlnet.conditioning_embedding_out_channels=[8, 16, 16]",)
ZOO = (
    ZooPhase("vae", "vae:variant=zoo", ("sd21/vae", "sdxl/vae"), "photos", 400),
    ZooPhase("unet_sd21", "base_unet:variant=tiny-sd21", ("sd21/unet",), "people", 800, _SD21, "vae"),
    ZooPhase("unet_sdxl", "base_unet:variant=tiny-sdxl", ("sdxl/unet",), "people", 800, _SDXL, "vae"),
    ZooPhase("swinir", "swinir:variant=tiny-diffbir", ("swinir",), "photos", 600),
    ZooPhase("bodypart", "bodypart:variant=tiny", ("bodypart",), "people", 1000),
    ZooPhase("v1_controlnet", "v1_controlnet:variant=tiny", ("v1_controlnet",), "people", 300,
             (("unet", "run:unet_sd21"), ("controlnet", "unet:run:unet_sd21"), *_SD21, ("swinir", "run:swinir"),
              ("bodypart", "run:bodypart")), "vae"),
    ZooPhase("joint_unet", "stage1_joint_unet:variant=tiny", ("joint_unet",), "people", 300,
             (("joint_unet", "unet:run:unet_sd21"), *_SD21), "vae"),
    ZooPhase("stage1_controlnet", "stage1_controlnet:variant=tiny", ("stage1_controlnet",), "people", 300,
             (("joint_unet", "run:joint_unet"), ("controlnet", "unet:run:joint_unet"), *_SD21,
              ("swinir", "run:swinir")), "vae"),
    ZooPhase("stage2_controlnet", "stage2_controlnet:variant=tiny", ("stage2_controlnet",), "people", 300,
             (("stage2/unet", "run:unet_sdxl"), ("stage2/controlnet", "unet:run:unet_sdxl"), *_SDXL,
              ("swinir", "run:swinir")), "vae", _PRIOR_EMBEDDING),
    ZooPhase("colour_adapter", "colour_adapter:variant=tiny", ("colour_adapter",), "people", 150,
             (("stage2/unet", "run:unet_sdxl"), ("stage2/controlnet", "run:stage2_controlnet"), *_SDXL,
              ("swinir", "run:swinir"), ("image_encoder", "weights:image_encoder")), "vae", _PRIOR_EMBEDDING),
)
# the members no phase trains: (component, phase config and member it is built from)
STAND_INS = (("sd21/text_encoder", "v1_controlnet:variant=tiny", "text_encoder"),
             ("sdxl/text_encoder", "stage2_controlnet:variant=tiny", "text_encoder"),
             ("sdxl/text_encoder_2", "stage2_controlnet:variant=tiny", "text_encoder_2"),
             ("image_encoder", "colour_adapter:variant=tiny", "image_encoder"))


@dataclasses.dataclass
class ZooResult:
    out: Path
    weights: Path
    record: dict[str, Any]  # zoo.json's content


def folder_hash(path: str | Path) -> str:
    """sha256 over a folder's files (relative names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def code_version(repo: Path) -> dict[str, Any]:
    """The git commit of the code, and whether the tree was dirty (then the diff's hash; zoo/code.diff holds it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(diff), "diff": diff}


def write_stand_ins(weights: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Write the random stand-ins (text encoders, vision tower) and CLIP's tokenizer files; {component: seed, hash}."""
    out = {}
    for index, (component, spec, member) in enumerate(STAND_INS):
        module = getattr(build_model(load_config(spec).model), member)
        member_seed = seed * 1000 + index
        folder = write_component(weights, component, module, random_variables(module, member_seed))
        out[component] = {"seed": member_seed, "config": spec, "member": member, "sha256": folder_hash(folder)}
    for folder, pad in TOKENIZERS.values():
        write_clip_tokenizer_files(weights / folder, open_clip_bpe_path(), pad)
    return out


def _source(source: str, out: Path) -> str:
    kind, _, rest = source.partition(":")
    if kind == "unet":
        return "unet:" + _source(rest, out)
    if kind == "run":
        return str(out / "runs" / rest / "export")
    if kind == "weights":
        path, sub = component_location(out / "weights", rest)
        return str(path / sub if sub else path)
    raise ValueError(f"zoo: unknown init source {source!r}")


def phase_overrides(phase: ZooPhase, out: Path, manifests: dict[str, Path], steps: int, seed: int) -> list[str]:
    """The `--config.` overrides that run `phase` inside the zoo at `out`."""
    overrides = [f"data.manifest={manifests[phase.manifest]}", f"train.steps={steps}", f"train.seed={seed}",
                 f"checkpoint.every={max(1, min(100, steps))}", f"train.log_every={max(1, min(50, steps // 20))}",
                 *phase.overrides]
    if phase.init_from:
        overrides.append("train.init_from=" + ",".join(f"{sub}={_source(src, out)}" for sub, src in phase.init_from))
    if phase.vae_run is not None:
        overrides += vae_member_overrides(phase.config, out / "runs" / phase.vae_run / "export" / "config.json")
    return overrides


def vae_member_overrides(spec: str, exported: Path) -> list[str]:
    """Overrides that make the `vae` member of `spec`'s group the VAE of an autoencoder export (its config.json):
    the fields where they differ (architecture, the calibrated scaling factor)."""
    member = load_config(spec).model.members.vae.diffusers
    vae = read_json(exported)
    return [f"model.members.vae.diffusers.{k}={vae[k]!r}" for k in sorted(member.keys())
            if k in vae and vae[k] != member[k] and k not in INERT_FIELDS]


def _final_metrics(workdir: Path) -> dict[str, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return {k: v for k, v in last.items() if isinstance(v, (int, float))}


def train_zoo(out: str | Path, *, steps_scale: float = 1.0, seed: int = 0, annotator=None,
              phases: tuple[ZooPhase, ...] = ZOO, progress: Callable[[str], None] = print,
              repo: Path | None = None) -> ZooResult:
    """Train (or resume) every phase of `phases` under `out` and assemble `out/weights`; returns zoo.json's record.

    steps_scale: each phase trains round(steps * steps_scale) steps (at least 1). annotator: keypoints and masks for
    the zoo's photos (None: the hand-written keypoints)."""
    out = Path(out).absolute()
    weights = out / "weights"
    record_path = out / "zoo.json"
    record = read_json(record_path) if record_path.exists() else {}
    if record and (record.get("seed"), record.get("steps_scale")) != (seed, steps_scale):
        raise ValueError(f"{record_path}: a zoo with seed {record.get('seed')} and steps_scale "
                         f"{record.get('steps_scale')} is there; this run asks for seed {seed}, steps_scale "
                         f"{steps_scale}: use another folder")
    if not record:
        version = code_version(repo or Path(__file__).resolve().parents[2])
        diff = version.pop("diff", "")
        if diff:
            (out / "code.diff").parent.mkdir(parents=True, exist_ok=True)
            (out / "code.diff").write_text(diff)
            version["diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()
        record = {"seed": seed, "steps_scale": steps_scale, "code": version, "phases": {},
                  "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]}}
        progress(f"zoo: photos -> {out / 'data'}")
        manifests = write_zoo_set(out / "data", annotator=annotator)
        record["data"] = {k: str(v.relative_to(out)) for k, v in manifests.items()}
        record["stand_ins"] = write_stand_ins(weights, seed)
        write_json(record, record_path)
    manifests = {k: out / v for k, v in record["data"].items()}
    for index, phase in enumerate(phases):
        steps = max(1, round(phase.steps * steps_scale))
        overrides = phase_overrides(phase, out, manifests, steps, seed + index)
        config = load_config(phase.config, overrides)
        done = record["phases"].get(phase.name)
        if done is not None and done["config"] == json.loads(config.to_json()):
            progress(f"zoo [{index + 1}/{len(phases)}] {phase.name}: done ({done['steps']} steps)")
            continue
        progress(f"zoo [{index + 1}/{len(phases)}] {phase.name}: {phase.config}, {steps} steps")
        began = time.perf_counter()
        result = train(config, out / "runs" / phase.name)
        seconds = time.perf_counter() - began
        record["phases"][phase.name] = {
            "config_spec": phase.config, "overrides": overrides, "config": json.loads(config.to_json()),
            "steps": result.step, "seed": seed + index, "components": list(phase.components),
            "final": _final_metrics(out / "runs" / phase.name), "wall_s": round(seconds, 1)}
        write_json(record, record_path)
    assemble_weights(out, phases)
    record["weights"] = {c: folder_hash(_component_folder(weights, c)) for p in phases for c in p.components}
    write_json(record, record_path)
    return ZooResult(out, weights, record)


def _component_folder(weights: Path, component: str) -> Path:
    path, sub = component_location(weights, component)
    return path / sub if sub else path


def assemble_weights(out: Path, phases: tuple[ZooPhase, ...] = ZOO) -> Path:
    """Copy each phase's export to its component's place in out/weights (beside the stand-ins)."""
    weights = out / "weights"
    for phase in phases:
        for component in phase.components:
            target = _component_folder(weights, component)
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(out / "runs" / phase.name / "export", target)
    return weights
