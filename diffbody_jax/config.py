"""Config machinery in one place: config files and their arguments, overrides, sections, and the codec between
our config dataclasses and diffusers/transformers config.json dicts.

    config = load_config("unet:variant=tiny-sd21", overrides=["model.dtype=bfloat16"])
    config = load_config("configs/stage2_controlnet.py:variant=tiny")   # a path works too

A config file (big_vision/MaxDiffusion style) is a Python file with `get_config(arg) -> ConfigDict`; `arg` is the
text after ":" in the spec, parsed by `parse_arg` against the file's defaults. A bare name ("unet", "unet.py")
is looked up in the project's configs/ folder, so specs work from any working directory.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def parse_arg(arg: str | None, **defaults):
    """Parse "variant=sdxl-base,tiny" into a dict, typed by the defaults.

    A bare word sets a boolean default to True. Keys not in `defaults` are refused by name.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.strip().lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            out[key] = type(default)(ast.literal_eval(value))
        else:
            out[key] = value.strip()
    return out


def config_path(name_or_path: str) -> pathlib.Path:
    """A config file: the path as given if it exists, else `<name>[.py]` in this project's configs/ folder."""
    file = pathlib.Path(name_or_path)
    if file.is_file():
        return file
    # "unet", "unet.py" and "configs/unet.py" (as the docs write it, from any working directory)
    name = name_or_path.removeprefix("configs/")
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.py"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
    raise FileNotFoundError(f"config file {name_or_path} not found (nor in {CONFIG_DIR}: {', '.join(known)})")


def load_config(spec: str, overrides: Sequence[str] = ()):
    """`get_config(arg)` of `name_or_path[:arg]`, then `overrides` ("model.dtype=bfloat16") applied."""
    path, _, arg = spec.partition(":")
    file = config_path(path)
    spec_obj = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    return apply_overrides(module.get_config(arg or None), overrides)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: Sequence[str]):
    """Set "a.b.c=value" fields (as `--config.a.b.c=value` flags do); values are Python literals or strings.
    An unknown field or a value of the wrong type is an error that names the field."""
    for item in overrides:
        item = item.removeprefix("--config.").removeprefix("config.")
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r}: expected field=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ValueError(f"config override {key!r}: no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"config override {key!r}: no field {leaf!r}; fields: {sorted(node.keys())}")
        try:
            node[leaf] = _literal(value)
        except TypeError as e:
            raise ValueError(f"config override {key!r}: {e}") from None
    return config


def model_section(**fields):
    """A config file's `model` section: `fields` (`name` picks the builder) plus the run-time choices every
    module reads."""
    if "name" not in fields:
        raise ValueError("model_section: a model section needs a `name` (the builder of models/registry.py)")
    return ml_collections.ConfigDict(dict(
        **fields,
        dtype="float32",  # compute dtype: float32 | bfloat16
        param_dtype="float32",
        attention_backend="einsum",  # einsum | xla | cudnn | auto | a registered one (TPU splash)
        remat="none",  # none | full | dots | dots_no_batch: what the backward pass recomputes (models.layers)
        scan_layers=False,  # UNet family: scan deep transformer stacks (models/stacked_blocks.py; docs/scaling.md)
    ))

# `at_scale`: the members whose blocks the backward pass recomputes (the diffusion networks: the gradient of every
# diffusion phase flows through them, trained or frozen) and those kept in float32 compute (the VAE: its latents
# are restoring's inputs, which restore encodes in float32)
SCALE_REMAT_MEMBERS = ("unet", "controlnet", "joint_unet", "stage2")
SCALE_FLOAT32_MEMBERS = ("vae",)


def at_scale(model, *, dtype: str = "bfloat16", attention: str = "bounded", remat: str = "full",
             scan_layers: bool = True):
    """A phase group's run-time settings for the papers' batch sizes (docs/scaling.md, "Training at scale"): every
    member computes in `dtype` but the VAE (params stay `param_dtype`, float32: the optimizer's master weights),
    runs memory-bounded `attention` (models.attention "bounded": cuDNN flash on GPU, chunked or splash on TPU), and
    the diffusion networks rematerialise each block (`remat`) and scan their deep transformer stacks (`scan_layers`:
    SDXL's; SD2.1's have one block each). Returns `model` (its members' sections, changed)."""
    for name, section in model.members.items():
        if "dtype" in section and name not in SCALE_FLOAT32_MEMBERS:
            section.dtype = dtype
        if "attention_backend" in section:
            section.attention_backend = attention
        if "remat" in section and name in SCALE_REMAT_MEMBERS:
            section.remat = remat
            section.scan_layers = scan_layers
    return model


def member_sections(table: dict[str, dict[str, str]], variant: str, phase: str) -> ml_collections.ConfigDict:
    """The `model` sections of a phase's members for one variant: `table` is {variant: {member: config spec}},
    e.g. {"tiny": {"unet": "unet:variant=tiny-sd21", ...}}; an unknown variant is refused, naming the known ones."""
    if variant not in table:
        raise ValueError(f"{phase}: unknown variant {variant!r}; known: {sorted(table)}")
    return ml_collections.ConfigDict({name: load_config(spec).model for name, spec in table[variant].items()})


def group_section(table: dict[str, dict[str, str]], variant: str, phase: str) -> ml_collections.ConfigDict:
    """A phase config's `model` section: the group (models/group.py) of `member_sections(table, variant, phase)`."""
    return model_section(name="group", variant=variant, members=member_sections(table, variant, phase))


def _remat(value) -> bool | str:
    """A config's remat choice as the modules take it; booleans from older configs still work."""
    return value if isinstance(value, bool) else {"none": False, "full": True}.get(value, value)


def runtime_kwargs(model_config, scan_layers: bool = False) -> dict[str, Any]:
    """dtype, param_dtype, attention_backend and remat from a config file's `model` section, and its scan_layers
    (off where the section has none) when `scan_layers` (the UNet family's builders: only they scan)."""
    kwargs = dict(
        dtype=jnp.dtype(model_config["dtype"]),
        param_dtype=jnp.dtype(model_config["param_dtype"]),
        attention_backend=model_config["attention_backend"],
        remat=_remat(model_config["remat"]),
    )
    if scan_layers:
        kwargs["scan_layers"] = bool(model_config.get("scan_layers", False))
    return kwargs


def dataclass_from_dict(
    cls,
    config: dict[str, Any],
    *,
    kind: str,
    source: str,
    feature_off: dict[str, tuple[Any, ...]] | None = None,
    ignored: tuple[str, ...] = (),
):
    """`cls(**fields)` from a config dict.

    Keys starting with "_" and those in `ignored` are dropped. A key in `feature_off` is accepted only at
    one of its listed values (the ones that mean "feature off"). Any other key must be a field of `cls`.
    Every refused key is named in one ValueError, prefixed by `source` (the file it came from).
    Lists become tuples so that configs stay hashable.
    """
    feature_off = feature_off or {}
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs, problems = {}, []
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in known:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in feature_off:
            off = feature_off[key]
            if isinstance(value, list):
                value = any(value)
            if value not in off:
                problems.append(f"{key}={value!r} (supported: {' or '.join(map(repr, off))})")
        else:
            problems.append(f"{key} (unknown field)")
    if problems:
        raise ValueError(f"{source}: {kind} config fields not supported: " + "; ".join(problems))
    return cls(**kwargs)


def dataclass_to_dict(obj, class_name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"_class_name": class_name}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def text_section(tokenizer: str, pad_token: str, tokenizer_2: str | None = None, pad_token_2: str | None = None):
    """A text-conditioned phase's `text` section: the CLIP tokenizer folder(s) ("": CLIP's, built offline) with
    their pad tokens, and the caption policy (`data.captions.CaptionPolicy`)."""
    fields = dict(tokenizer=tokenizer, pad_token=pad_token)
    if tokenizer_2 is not None:  # SDXL's second text encoder
        fields.update(tokenizer_2=tokenizer_2, pad_token_2=pad_token_2)
    return ml_collections.ConfigDict(dict(**fields, fallback="a photo of a person", drop_prob=0.0))


TINY_TRAINING = dict(steps=100, batch_size=4, learning_rate=1e-3)  # the diffusion phases' tiny variants


def tiny_training_sections(config, maps: Sequence[str]):
    """`training_sections` of a diffusion phase's tiny variant: 100 steps of batch 4 at lr 1e-3 on one 64 x 64
    bucket with `maps`, logged every 10 steps, checkpointed every 50: seconds per step on a CPU."""
    return training_sections(config, **TINY_TRAINING, **{"data.buckets": [[64, 64]], "data.maps": list(maps),
                                                         "train.log_every": 10, "checkpoint.every": 50})


def training_sections(config, *, steps: int, batch_size: int, learning_rate: float, **fields):
    """Add the sections the training engine reads (`train`, `optim`, `data`, `mesh`, `checkpoint`) to a config
    file's config, with the phase's numbers and defaults for the rest. `fields` override any of them by
    "section.field" name, e.g. training_sections(c, ..., **{"data.buckets": [[64, 64]]})."""
    config.train = ml_collections.ConfigDict(dict(
        steps=steps,  # total optimizer updates; a rerun in the same workdir resumes and continues to this
        seed=0,  # params init, data order and degradations, per-step keys
        grad_accum=1,  # micro-batches per step (a lax.scan inside the step; the batch is the global batch)
        ema_decay=0.0,  # 0: no EMA; else ema <- d * ema + (1 - d) * params every step
        log_every=50,
        init_from="",  # "[subtree=]folder,...": load_pretrained folders (diffusers, converted, a run's export/)
        export_dir="",  # where the trained component goes at the end in the PyTorch layout ("": <workdir>/export)
        export_ema=True,  # export the EMA params when there is an EMA
    ))
    config.optim = ml_collections.ConfigDict(dict(
        optimizer="adam", learning_rate=learning_rate, schedule="constant", warmup_steps=0, end_lr_ratio=0.0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
    ))
    config.data = ml_collections.ConfigDict(dict(
        manifest="",  # a JSONL manifest (diffbody_jax/data/manifest.py); `diffbody data sample-set` writes one
        batch_size=batch_size,  # global: split over processes and the (data, fsdp) mesh axes
        buckets=[[512, 512], [768, 512], [512, 768], [1024, 512], [512, 1024]],  # (H, W): the paper's five
        maps=[],  # pose, depth, normal, attention, mask
        # "manifest": pose maps from the manifest's keypoints / pose files; "annotator": drawn each step from
        # `annotator`'s keypoints on I_reg = SwinIR(degraded) (the papers: DWPose(I_reg), MMPose(I_ir))
        pose_source="manifest",
        annotator="auto",  # "backend[:key=value,...]" (diffbody_jax/annotators), e.g. "onnx-dwpose:det=..,pose=.."
        pose_workers=-1,  # annotator processes for pose_source=annotator (0: none; -1: as num_workers)
        # how keypoints become pose maps (data.pose.PoseStyle); the export's contract carries it to restore
        pose_style=dict(threshold=0.3, hands=True, face=True),
        degradation="real-esrgan",  # a kind of configs/degradation.py
        random_crop=True,
        shuffle=True,
        colour_permutation=False,  # permute each clean image's RGB channels at random (data.pipeline.DataConfig)
        # grain worker processes decoding and degrading (0: in the training process; -1: data.pipeline.auto_workers,
        # one per two cores up to 16 on machines of more than 4 cores, else none)
        num_workers=-1,
        cache="",  # a `diffbody prepare` folder: stored latents / text embeddings instead of encoding each step
    ))
    config.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1,  # device mesh axes; -1: the devices left over
        fsdp_min_size=2**18,  # params with at least this many elements are split over fsdp
        # {logical axis: mesh axes} over parallel.sharding.LOGICAL_RULES (None: that table as it is)
        logical_rules=None,
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
    return apply_overrides(config, [f"{k}={v!r}" for k, v in fields.items()])
