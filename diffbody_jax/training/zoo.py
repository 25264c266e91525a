"""The tiny zoo: every DiffBody model trained from scratch by this engine, in dependency order, on the photos that
installed packages ship (data/zoo_set.py), then assembled into a weights folder `diffbody restore` reads.

    result = train_zoo("zoo")              # zoo/data, zoo/runs/<phase>, zoo/weights, zoo/zoo.json
    result = train_zoo("zoo", steps_scale=0.05)   # a shortened zoo (the slow test's)
    result = train_zoo("zoo", budget="full")      # the committed zoo's budget (hours; resumable over sittings)

Each phase runs as a user would chain real runs (README, "Training"): `diffbody train`'s engine with the phase's
tiny config, `data.manifest` set to the zoo's people or photos manifest, and `train.init_from` naming the exports of
the phases before it. What no phase trains (the CLIP text encoders, the CLIP vision tower) is a stand-in drawn on
the host from a seed (`models.variables.random_variables`) and written once into the weights folder, so every
phase that holds one reads the same weights; zoo.json records its seed and hash. A VAE's export carries the
scaling factor it was calibrated with, which every later phase's VAE member takes as a config override (init_from
refuses a folder whose config differs from the member's).

Budgets: "quick" (each phase's `steps`, the whole zoo within 45 minutes on 2 CPU cores) and "full" (its
`full_steps`: what the committed zoo was trained with, hours on 2 cores, to be spread over sittings).

Resumable: zoo.json is rewritten after each phase with what it measured, and a rerun skips the phases it lists as
done with the same config and the same inputs (the hashes of the exports it starts from); a phase stopped midway
resumes from its last checkpoint (the engine's resume), and a phase given more steps continues its run. A phase whose
inputs changed (an earlier phase was retrained) starts afresh: its old run is moved to runs/<name>.replaced-<k>.
Each phase records the code version that trained it.
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
from diffbody_jax.interop.torch_files import read_state_dict, write_safetensors
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.variables import random_variables
from diffbody_jax.pipelines.weights import TOKENIZERS, component_folder, write_component
from diffbody_jax.training.engine import train

log = logging.getLogger(__name__)


BUDGETS = ("quick", "full")  # module docstring


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
    steps: int  # optimizer steps in the quick budget (sized from measured step times: docs/zoo.md)
    full_steps: int  # optimizer steps in the full budget, the committed zoo's
    step_s: float  # seconds per step on the 2-core CI VM (the estimates of `budget_minutes`): vae, the base UNets
    # and swinir measured in the full-budget zoo of 2026-12-03 (machine otherwise idle), the others in the first zoo
    init_from: tuple[tuple[str, str], ...] = ()
    vae_run: str | None = None
    overrides: tuple[str, ...] = ()

    def steps_for(self, budget: str) -> int:
        if budget not in BUDGETS:
            raise ValueError(f"zoo budget {budget!r}: not one of {BUDGETS}")
        return self.steps if budget == "quick" else self.full_steps


# The zoo's one VAE (configs/vae.py:variant=zoo, latents at 1/4) serves both pipelines: the SD2.1-like and
# SDXL-like stand-ins differ in their UNets and text encoders, and one autoencoder run is half the cost of two.
# Stage 2's prior-fusion embedding then downsamples by 4 (three levels) to reach the latents.
_SD21 = (("vae", "run:vae"), ("text_encoder", "weights:sd21/text_encoder"))
_SDXL = (("vae", "run:vae"), ("text_encoder", "weights:sdxl/text_encoder"),
         ("text_encoder_2", "weights:sdxl/text_encoder_2"))
_PRIOR_EMBEDDING = ("model.members.stage2.controlnet.conditioning_embedding_out_channels=[8, 16, 16]",)
# Every diffusion model of the zoo predicts v (as SD2.1-768 does), not the papers' eps: measured on the held-out
# portrait, v1 sampled from an eps base and ControlNet scored 9.5 dB (DDIM 20), from v ones trained as long 11.8 dB.
# An eps model's x0 estimate at high noise divides its eps error by sqrt(alpha_bar_t) (0.07 at t = 950), so a
# briefly trained model commits early to an image of its own; v keeps that estimate bounded (docs/zoo.md).
_V = ("diffusion.prediction_type=v_prediction",)
# Twelve photos hold few colours: trained on them as they are, the VAE and SwinIR shifted the held-out portrait's
# blue background by -12/255 and v1's ControlNet reproduced its condition far worse there than on its training
# crops. Permuting each clean crop's RGB channels (data.colour_permutation) shows every phase that restores colour
# all six orders; not the base UNets and the joint UNet (priors whose captions name colours, and whose stand-in
# depth and normal maps are drawn from the unpermuted luminance) nor stage 1's ControlNet (its targets are those maps).
_PERMUTE = ("data.colour_permutation=True",)
# The zoo's SwinIR: the tiny DiffBIR variant twice as wide (embed 48: its pixel-unshuffle x4 hands the Swin body 48
# numbers per token, which embed 24 halved), at 5e-4 and batch 8 (at 2e-3 and batch 4 it stayed below its input
# even on its training crops). KAIR's denoising head (output = input + body) was tried instead and did worse at
# equal steps (docs/zoo.md).
# The restoration models (SwinIR, v1's and stage 2's ControlNets, the colour adapter) train on every photo, the
# scenes with an empty pose map: v1's ControlNet trained on the two people alone reproduced its condition on their
# crops and 1.4 dB worse on the held-out portrait (docs/zoo.md); the priors (base and joint UNets, stage 1's
# ControlNet, whose targets are the stand-in maps of people) stay on the people.
_SWINIR = ("model.swinir.embed_dim=48", "optim.learning_rate=5e-4", "data.batch_size=8", *_PERMUTE)
ZOO = (
    ZooPhase("vae", "vae:variant=zoo", ("sd21/vae", "sdxl/vae"), "photos", 300, 3000, 0.72, overrides=_PERMUTE),
    ZooPhase("unet_sd21", "base_unet:variant=tiny-sd21", ("sd21/unet",), "people", 350, 3000, 0.57, _SD21, "vae", _V),
    ZooPhase("unet_sdxl", "base_unet:variant=tiny-sdxl", ("sdxl/unet",), "people", 350, 3000, 0.75, _SDXL, "vae", _V),
    ZooPhase("swinir", "swinir:variant=tiny-diffbir", ("swinir",), "photos", 200, 2000, 1.2, overrides=_SWINIR),
    ZooPhase("bodypart", "bodypart:variant=tiny", ("bodypart",), "people", 400, 1000, 0.05),
    ZooPhase("v1_controlnet", "v1_controlnet:variant=tiny", ("v1_controlnet",), "photos", 300, 3000, 0.28,
             (("unet", "run:unet_sd21"), ("controlnet", "unet:run:unet_sd21"), *_SD21, ("swinir", "run:swinir"),
              ("bodypart", "run:bodypart")), "vae", _V + _PERMUTE),
    ZooPhase("joint_unet", "stage1_joint_unet:variant=tiny", ("joint_unet",), "people", 300, 1000, 0.3,
             (("joint_unet", "unet:run:unet_sd21"), *_SD21), "vae", _V),
    ZooPhase("stage1_controlnet", "stage1_controlnet:variant=tiny", ("stage1_controlnet",), "people", 300, 1500, 0.38,
             (("joint_unet", "run:joint_unet"), ("controlnet", "unet:run:joint_unet"), *_SD21,
              ("swinir", "run:swinir")), "vae", _V),
    ZooPhase("stage2_controlnet", "stage2_controlnet:variant=tiny", ("stage2_controlnet",), "photos", 300, 3000, 0.36,
             (("stage2/unet", "run:unet_sdxl"), ("stage2/controlnet", "unet:run:unet_sdxl"), *_SDXL,
              ("swinir", "run:swinir")), "vae", _PRIOR_EMBEDDING + _V + _PERMUTE),
    ZooPhase("colour_adapter", "colour_adapter:variant=tiny", ("colour_adapter",), "photos", 100, 500, 0.28,
             (("stage2/unet", "run:unet_sdxl"), ("stage2/controlnet", "run:stage2_controlnet"), *_SDXL,
              ("swinir", "run:swinir"), ("image_encoder", "weights:image_encoder")), "vae",
             _PRIOR_EMBEDDING + _V + _PERMUTE),
)
# the members no phase trains: (component, phase config and member it is built from)
STAND_INS = (("sd21/text_encoder", "v1_controlnet:variant=tiny", "text_encoder"),
             ("sdxl/text_encoder", "stage2_controlnet:variant=tiny", "text_encoder"),
             ("sdxl/text_encoder_2", "stage2_controlnet:variant=tiny", "text_encoder_2"),
             ("image_encoder", "colour_adapter:variant=tiny", "image_encoder"))


PHASE_OVERHEAD_S = 130  # compiling, data, the export and its calibration: the mean on the CI VM's first zoo


def budget_minutes(budget: str, steps_scale: float = 1.0, phases: tuple[ZooPhase, ...] = ZOO) -> float:
    """The estimated wall time of training `phases` from scratch on 2 CPU cores."""
    return sum(PHASE_OVERHEAD_S + max(1, round(p.steps_for(budget) * steps_scale)) * p.step_s for p in phases) / 60


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
        return str(component_folder(out / "weights", rest))
    raise ValueError(f"zoo: unknown init source {source!r}")


def phase_overrides(phase: ZooPhase, out: Path, manifests: dict[str, Path], steps: int, seed: int) -> list[str]:
    """The `--config.` overrides that run `phase` inside the zoo at `out`."""
    overrides = [f"data.manifest={manifests[phase.manifest]}", f"train.steps={steps}", f"train.seed={seed}",
                 f"checkpoint.every={max(1, min(100, steps))}", f"train.log_every={max(1, min(50, steps // 20))}",
                 *phase.overrides]
    if phase.init_from:
        overrides.append("train.init_from=" + ",".join(f"{sub}={_source(src, out)}" for sub, src in phase.init_from))
    if phase.vae_run is not None:
        overrides += member_overrides(phase.config, "vae", out / "runs" / phase.vae_run / "export" / "config.json")
    for subtree, source in phase.init_from:
        exported = Path(_source(source, out)) / "config.json"
        if subtree == "swinir" and exported.is_file():  # not yet trained: init_from will name the mismatch
            overrides += member_overrides(phase.config, "swinir", exported)
    return overrides


# the config section of a group member that holds its architecture, as an export's config.json lists it
MEMBER_ARCHITECTURE = {"vae": "diffusers", "swinir": "swinir"}


def member_overrides(spec: str, member: str, exported: Path) -> list[str]:
    """Overrides that make `member` (vae or swinir) of `spec`'s group the model of an export (its config.json): the
    fields where they differ (the architecture; a VAE's calibrated scaling factor)."""
    section = MEMBER_ARCHITECTURE[member]
    fields = load_config(spec).model.members[member][section]
    config = read_json(exported)
    return [f"model.members.{member}.{section}.{k}={config[k]!r}" for k in sorted(fields.keys())
            if k in config and config[k] != fields[k] and k not in INERT_FIELDS]


def _final_metrics(workdir: Path) -> dict[str, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return {k: v for k, v in last.items() if isinstance(v, (int, float))}


def phase_inputs(phase: ZooPhase, out: Path) -> dict[str, str]:
    """{source folder relative to out: sha256} of what `phase` starts from (init exports, stand-ins, its VAE)."""
    folders = [_source(src, out).removeprefix("unet:") for _, src in phase.init_from]
    if phase.vae_run is not None:
        folders.append(str(out / "runs" / phase.vae_run / "export"))
    return {str(Path(f).relative_to(out)): folder_hash(f) for f in sorted(set(folders))}


def _set_aside(workdir: Path) -> Path:
    """Move a run that no longer fits its phase's inputs to <workdir>.replaced-<k> (nothing is deleted)."""
    k = 1
    while (target := workdir.with_name(f"{workdir.name}.replaced-{k}")).exists():
        k += 1
    workdir.rename(target)
    return target


def _code_record(version: dict[str, Any], out: Path, tag: str) -> dict[str, Any]:
    """A `code_version`, its diff (if the tree was dirty) written to out/code-<tag>.diff and replaced by its hash."""
    version = dict(version)
    diff = version.pop("diff", "")
    if diff:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"code-{tag}.diff").write_text(diff)
        version["diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()
    return version


def train_zoo(out: str | Path, *, budget: str = "quick", steps_scale: float = 1.0, seed: int = 0, annotator=None,
              phases: tuple[ZooPhase, ...] = ZOO, progress: Callable[[str], None] = print,
              repo: Path | None = None) -> ZooResult:
    """Train (or resume) every phase of `phases` under `out` and assemble `out/weights`; returns zoo.json's record.

    budget: "quick" or "full" (module docstring). steps_scale: each phase trains round(its budget's steps *
    steps_scale) steps (at least 1). annotator: keypoints and masks for the zoo's photos (None: the hand-written
    keypoints)."""
    if budget not in BUDGETS:
        raise ValueError(f"zoo budget {budget!r}: not one of {BUDGETS}")
    out = Path(out).absolute()
    repo = repo or Path(__file__).resolve().parents[2]
    weights = out / "weights"
    record_path = out / "zoo.json"
    record = read_json(record_path) if record_path.exists() else {}
    if "shipped" in record:
        raise ValueError(f"{record_path}: a packed zoo (what `diffbody zoo --pack` writes, not a training folder); "
                         "train into another --out")
    if record and record.get("seed") != seed:
        raise ValueError(f"{record_path}: a zoo with seed {record.get('seed')} is there; this run asks for seed "
                         f"{seed}: use another folder")
    # the code this process runs: read once, before any phase (a commit made while it trains is not its code)
    code = code_version(repo)
    if not record:
        record = {"seed": seed, "code": _code_record(code, out, "start"), "phases": {},
                  "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]}}
        progress(f"zoo: photos -> {out / 'data'}")
        manifests = write_zoo_set(out / "data", annotator=annotator)
        record["data"] = {k: str(v.relative_to(out)) for k, v in manifests.items()}
        record["stand_ins"] = write_stand_ins(weights, seed)
    # a zoo's budget may grow (quick, then full: each phase continues or restarts as its inputs say)
    record.update(budget=budget, steps_scale=steps_scale)
    write_json(record, record_path)
    manifests = {k: out / v for k, v in record["data"].items()}
    for index, phase in enumerate(phases):
        steps = max(1, round(phase.steps_for(budget) * steps_scale))
        overrides = phase_overrides(phase, out, manifests, steps, seed + index)
        config = load_config(phase.config, overrides)
        inputs = phase_inputs(phase, out)
        done = record["phases"].get(phase.name)
        if done is not None and done["config"] == json.loads(config.to_json()) and done.get("inputs") == inputs:
            progress(f"zoo [{index + 1}/{len(phases)}] {phase.name}: done ({done['steps']} steps)")
            continue
        workdir = out / "runs" / phase.name
        started = read_json(workdir / "zoo_inputs.json") if (workdir / "zoo_inputs.json").exists() else None
        if workdir.exists() and started != inputs:
            progress(f"zoo: {phase.name}'s inputs changed; its old run moved to {_set_aside(workdir).name}")
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(inputs, workdir / "zoo_inputs.json")
        progress(f"zoo [{index + 1}/{len(phases)}] {phase.name}: {phase.config}, {steps} steps")
        earlier = done["wall_s"] if done is not None and done.get("inputs") == inputs else 0.0  # a run continued
        began = time.perf_counter()
        result = train(config, workdir)
        seconds = time.perf_counter() - began
        record["phases"][phase.name] = {
            "config_spec": phase.config, "overrides": overrides, "config": json.loads(config.to_json()),
            "steps": result.step, "seed": seed + index, "components": list(phase.components), "inputs": inputs,
            "code": _code_record(code, out, phase.name), "final": _final_metrics(workdir),
            "wall_s": round(earlier + seconds, 1)}
        write_json(record, record_path)
    assemble_weights(out, phases)
    record["weights"] = {c: folder_hash(component_folder(weights, c)) for p in phases for c in p.components}
    write_json(record, record_path)
    return ZooResult(out, weights, record)


def _replace_folder(source: Path, target: Path) -> None:
    """target becomes a copy of source (whatever was at target is removed first)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)


def assemble_weights(out: Path, phases: tuple[ZooPhase, ...] = ZOO) -> Path:
    """Copy each phase's export to its component's place in out/weights (beside the stand-ins)."""
    weights = out / "weights"
    for phase in phases:
        for component in phase.components:
            _replace_folder(out / "runs" / phase.name / "export", component_folder(weights, component))
    return weights


# ------------------------------------------------------------------------------------------ shipping a zoo
SHIPPED_DTYPE = "float16"


HELD_OUT_FILES = ("held_out.jsonl", "held_out", "held_out_mask")  # under data/: what the demo scores with


def pack_zoo(zoo: str | Path, dest: str | Path) -> dict[str, Any]:
    """Write a trained zoo's trained components at half precision to dest/weights (the weights-folder layout), its
    held-out photos and their keypoints to dest/data, its code-<phase>.diff files (if a dirty tree trained it), and
    dest/zoo.json: zoo.json's record plus "shipped" (dtype and each component folder's hash). The stand-ins are
    left out: `unpack_zoo` rebuilds them from their recorded seeds. Returns the written record."""
    zoo, dest = Path(zoo), Path(dest)
    record = read_json(zoo / "zoo.json")
    if "weights" not in record:
        raise ValueError(f"{zoo / 'zoo.json'}: the zoo is not finished (no \"weights\" hashes); train it first")
    hashes = {}
    for component in record["weights"]:
        source, target = component_folder(zoo / "weights", component), component_folder(dest / "weights", component)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for f in sorted(p for p in source.iterdir() if p.is_file()):
            if f.suffix == ".safetensors":
                tensors = read_state_dict(f)
                write_safetensors({k: v.astype(SHIPPED_DTYPE) if v.dtype.kind == "f" else v
                                   for k, v in tensors.items()}, target / f.name, metadata={"format": "pt"})
            else:
                shutil.copy2(f, target / f.name)
        hashes[component] = folder_hash(target)
    for diff in sorted(zoo.glob("code-*.diff")):  # the uncommitted changes a dirty tree trained with
        shutil.copy2(diff, dest / diff.name)
    for name in HELD_OUT_FILES:
        source, target = zoo / "data" / name, dest / "data" / name
        if source.is_dir():
            _replace_folder(source, target)
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    record = {**record, "shipped": {"dtype": SHIPPED_DTYPE, "weights": hashes}}
    write_json(record, dest / "zoo.json")
    return record


def unpack_zoo(shipped: str | Path, out: str | Path) -> Path:
    """A zoo folder (what `train_zoo` leaves, less its runs) from a packed one: out/weights with its components
    (checked against the hashes in its zoo.json) and the stand-ins rebuilt from their recorded seeds (checked
    against the hashes of the files that trained it), out/data's held-out photos, out/zoo.json. Returns
    out/weights."""
    shipped, out = Path(shipped), Path(out)
    weights = out / "weights"
    record = read_json(shipped / "zoo.json")
    for component, expected in record["shipped"]["weights"].items():
        source = component_folder(shipped / "weights", component)
        if not source.is_dir() or folder_hash(source) != expected:
            raise ValueError(f"{source}: missing or not the files {shipped / 'zoo.json'} lists (sha256 {expected})")
        _replace_folder(source, component_folder(weights, component))
    rebuilt = write_stand_ins(weights, record["seed"])
    for component, stand_in in record["stand_ins"].items():
        if rebuilt[component]["sha256"] != stand_in["sha256"]:
            raise ValueError(f"{weights / component}: the stand-in rebuilt from seed {stand_in['seed']} differs from "
                             f"the one the zoo was trained with (sha256 {stand_in['sha256']}); this jax draws other "
                             "random numbers")
    if (shipped / "data").is_dir():
        shutil.copytree(shipped / "data", out / "data", dirs_exist_ok=True)
    write_json(record, out / "zoo.json")
    return weights

