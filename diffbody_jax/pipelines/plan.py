"""The memory a restoration program needs per device, read from XLA before any weight exists.

    plan = plan_restore("v2", 1024, 512, dtype="bfloat16", batch=1, params="fsdp")   # the paper's models
    print(plan.row())

The version's models are built from the phase configs (`variant=paper`: SD2.1-base, SDXL-base, their ControlNets,
the joint UNet, IP-Adapter-Plus-XL, CLIP, SwinIR, BPBreID, the VAEs) as abstract variables (`jax.eval_shape`: shapes
only), placed on a mesh of the given devices, and the version's whole pipeline (`V1Pipeline` / `V2Pipeline`, all
sampling steps in one jitted program) is lowered and compiled for them. `compiled.memory_analysis()` then gives, per
device, the bytes of the arguments (weights and inputs), the outputs and XLA's temporaries. The figure is the
compiled program's on this machine's backend: on CPU, read it as an estimate for an accelerator (XLA:CPU fuses
differently, and the attention backend stands in for the device's kernel).

params: "replicated" (every device holds every weight), "fsdp" (each weight split over the devices by the
training engine's rule, `parallel.sharding.inference_shardings`) or "auto" (as `diffbody restore` resolves it:
`parallel.sharding.resolve_placement`). dtype, attention, offload: as in `RestoreSettings` (bfloat16: every member
but the VAEs; "bounded" attention, the VAEs' "chunked"; offload: v2's text encoding, stage 1 and stage 2 as three
programs, each holding only its own weights: the plan reports the largest).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.config import load_config
from diffbody_jax.diffusion.samplers import SamplerConfig
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.files import read_json
from diffbody_jax.models.attention import compiling_for
from diffbody_jax.models.group import ModelGroup
from diffbody_jax.models.registry import build_model
from diffbody_jax.parallel.mesh import out_of_memory
from diffbody_jax.parallel.sharding import (
    PLACEMENTS,
    ShardingRules,
    batch_sharding,
    inference_mesh,
    inference_shardings,
    resolve_placement,
    shard_bytes,
    tree_bytes,
)
from diffbody_jax.pipelines.tiles import TileConfig
from diffbody_jax.pipelines.v1 import V1Pipeline
from diffbody_jax.pipelines.v2 import V2Pipeline
from diffbody_jax.pipelines.weights import (
    DEFAULT_SCHEDULERS,
    GUIDANCE_REMAT_MEMBERS,
    TEXT_MEMBERS,
    dtype_kwargs,
    guidance_remat,
    members_of,
)

GIB = 2**30
# the phase configs whose `model` section is each stage's group, per version
_GROUPS = {"v1": ("v1_controlnet",), "v2": ("stage1_controlnet", "colour_adapter")}


@dataclasses.dataclass
class RestorePlan:
    version: str
    height: int
    width: int
    dtype: str
    batch: int
    devices: int
    params: str  # replicated | fsdp (auto resolved)
    steps: int
    variant: str
    attention: str
    offload: bool
    platform: str  # what it was compiled for: cpu (an estimate for an accelerator) or tpu (XLA:TPU's own program)
    weights_gib: float  # all weights, once
    arguments_gib: float  # per device: weights (whole or its shards) and inputs, of the largest program
    outputs_gib: float
    temporaries_gib: float
    compile_s: float  # all programs
    programs: dict[str, float] = dataclasses.field(default_factory=dict)  # each program's total GiB per device
    tile: int | None = None  # --fit tile: the tiles' side in pixels (overlap a quarter of it)
    # the programs XLA:TPU refused for the chip's memory: their temporaries are what its refusal says they need
    refused: list[str] = dataclasses.field(default_factory=list)
    guidance: float = 0.0  # v1's part-loss guidance scale (every step guided)
    remat: tuple[str, ...] = ()  # the members built with remat
    scan_layers: bool = False  # the UNets and ControlNets scan their deep transformer stacks

    @property
    def total_gib(self) -> float:
        return self.arguments_gib + self.outputs_gib + self.temporaries_gib

    def row(self) -> str:
        params = self.params + (", offload" if self.offload else "")
        size = f"{self.height}x{self.width}" + (f", tiles {self.tile}" if self.tile else "")
        over = f" (refused: {', '.join(self.refused)} over the chip's memory)" if self.refused else ""
        return (f"| {self.version} | {size} | {self.dtype} | {self.batch} | {self.devices} "
                f"{params} | {self.weights_gib:.3f} | {self.arguments_gib:.3f} | {self.temporaries_gib:.3f} | "
                f"{self.total_gib:.3f}{over} | {self.compile_s:.0f} |")

    def describe(self) -> str:
        """A few lines for `diffbody restore --plan`."""
        where = self.platform
        tiles = f" on tiles of {self.tile}" if self.tile else ""
        lines = [f"plan: {self.version} {self.height}x{self.width}{tiles} {self.dtype}, batch {self.batch} on "
                 f"{self.devices} {where} device(s), params {self.params}{', offload' if self.offload else ''}, "
                 f"{self.steps} steps" + (f" all guided (s = {self.guidance:g}, remat: "
                                          f"{', '.join(self.remat) or 'none'})" if self.guidance else "") + ", "
                 f"attention {self.attention}{', scanned transformer stacks' if self.scan_layers else ''}, "
                 f"{self.variant} configs",
                 f"weights {self.weights_gib:.2f} GiB in all; per device: arguments {self.arguments_gib:.2f}, "
                 f"outputs {self.outputs_gib:.2f}, temporaries {self.temporaries_gib:.2f}, total "
                 f"{self.total_gib:.2f} GiB" + (" (largest program: " + ", ".join(
                     f"{k} {v:.2f}" for k, v in self.programs.items()) + ")" if len(self.programs) > 1 else ""),
                 f"compiled in {self.compile_s:.0f} s"]
        if self.refused:
            lines.append(f"does not fit: XLA:TPU refused {', '.join(self.refused)} for the chip's memory (its "
                         "temporaries are what the refusal says they need)")
        if where == "cpu":
            lines.append("XLA:CPU's figures: an estimate for an accelerator (docs/scaling.md)")
        return "\n".join(lines)


def _group(phase: str, variant: str, dtype: str, attention: str, remat: Sequence[str], scan_layers: bool
           ) -> ModelGroup:
    model = load_config(f"{phase}:variant={variant}").model
    group = build_model(model)
    unknown = sorted(set(remat) - set(group.members))
    if unknown and phase in _GROUPS["v1"]:
        raise ValueError(f"remat {unknown}: not members of v1's group {sorted(group.members)}")
    members = {}
    for name, member in group.members.items():
        # as restore builds them (the configs' paper variants carry training's settings: bf16 compute, remat)
        changes = {"dtype": jnp.dtype(jnp.float32), "param_dtype": jnp.dtype(jnp.float32), "remat": name in remat,
                   "scan_layers": scan_layers, **dtype_kwargs(name, dtype)}
        # as `pipelines.weights.load_component` builds them: the VAEs' one wide head runs chunked under "bounded"
        changes["attention_backend"] = "chunked" if name == "vae" and attention == "bounded" else attention
        members[name] = _with_settings(member, changes)
    return ModelGroup(**members)


def _with_settings(module: nn.Module, changes: dict) -> nn.Module:
    """`module` cloned with the `changes` it has fields for, and so are the modules it holds as fields (Stage2Model's
    UNet, ControlNet and Resampler: restore loads each as a component of its own, in the dtype asked for)."""
    kwargs = {}
    for f in dataclasses.fields(module):
        value = getattr(module, f.name, None)
        if f.name in changes:
            kwargs[f.name] = changes[f.name]
        elif f.name != "parent" and isinstance(value, nn.Module):
            kwargs[f.name] = _with_settings(value, changes)
    return module.clone(**kwargs)


def _schedule(pipeline: str) -> NoiseSchedule:
    """The bundled scheduler of `pipeline` (sd21, sdxl), as a weights folder without its own uses."""
    path = DEFAULT_SCHEDULERS[pipeline]
    return NoiseSchedule.from_dict(read_json(path), str(path))


def _sharded_like(tree, mesh):
    """ShapeDtypeStructs of a batch-major tree, split over the mesh's batch axes."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, x.ndim)),
                        tree)


def plan_restore(version: str, height: int, width: int, *, dtype: str = "float32", batch: int = 1,
                 steps: int | None = None, params: str = "replicated", variant: str = "paper",
                 devices: Sequence[jax.Device] | None = None, attention: str = "bounded", offload: bool = False,
                 fsdp_min_size: int = ShardingRules.fsdp_min_size, tiles: TileConfig | None = None,
                 guidance: float = 0.0, remat: Sequence[str] | None = None, scan_layers: bool = False) -> RestorePlan:
    """Compile `version`'s restoration for abstract weights and inputs and read its per-device memory.

    height, width: the image (multiples of 64); batch: images per call, split over the devices (a multiple of
    their number); steps: sampling steps per stage (default the papers' 50 / 200); variant: the configs' variant
    (paper, or tiny for a quick check); fsdp_min_size: with params="fsdp", weights of fewer numbers stay whole on
    every device (the training engine's default); devices: default this process's, or a TPU topology's
    (`parallel.mesh.target_devices`: compiled ahead of time by XLA:TPU); tiles: `--fit tile`'s tiles (the
    restoration of a large photo as `diffbody restore` runs it: `RestoreSettings.tiles`); guidance: v1's part-loss
    guidance scale (every step in the window: the program holds the guided step); remat: the group members that
    rematerialise their blocks (default: as `diffbody restore` builds them, `GUIDANCE_REMAT_MEMBERS` with guidance and
    none without: `guidance_remat`); scan_layers: as `RestoreSettings.scan_layers`. Nothing is allocated: the
    weights are shapes only.
    """
    devices = list(devices or jax.local_devices())
    if guidance and version != "v1":
        raise ValueError("part-loss guidance is v1's (seed 000, Algorithm 1); v2 has none")
    if remat is None:
        remat = GUIDANCE_REMAT_MEMBERS if guidance and guidance_remat(devices[0].platform) else ()
    remat = tuple(remat)
    with compiling_for(devices[0].platform):
        return _plan_restore(version, height, width, dtype, batch, steps, params, variant, devices, attention,
                             offload, fsdp_min_size, tiles, guidance, remat, scan_layers)


def _plan_restore(version, height, width, dtype, batch, steps, params, variant, devices, attention, offload,
                  fsdp_min_size, tiles, guidance, remat, scan_layers) -> RestorePlan:
    if version not in _GROUPS:
        raise ValueError(f"version {version!r}; expected one of {sorted(_GROUPS)}")
    if params not in PLACEMENTS:
        raise ValueError(f"params {params!r}; expected one of {PLACEMENTS}")
    if offload and version != "v2":
        raise ValueError("offload moves v2's two stages to the devices one after the other; v1 has one stage")
    if batch % len(devices):
        raise ValueError(f"batch {batch}: must be a multiple of the {len(devices)} device(s)")
    steps = steps or {"v1": 50, "v2": 200}[version]
    groups = [_group(phase, variant, dtype, attention, remat, scan_layers) for phase in _GROUPS[version]]
    abstract = [nn.unbox(g.abstract_variables()) for g in groups]
    params = resolve_placement(params, tree_bytes(abstract), devices)
    mesh = inference_mesh(params, devices)
    rules = ShardingRules(fsdp_min_size=fsdp_min_size)

    def placed(tree):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                            inference_shardings(tree, mesh, rules))

    variables = [placed(v) for v in abstract]
    sampler = SamplerConfig(method="ddpm", num_steps=steps, guidance_scale=guidance)
    if version == "v1":
        pipe = V1Pipeline(groups[0], _schedule("sd21"), sampler, tiles=tiles)
        variables = variables[0]
    else:
        pipe = V2Pipeline(groups[0], groups[1], _schedule("sd21"), _schedule("sdxl"), sampler, sampler, tiles=tiles)
        variables = {"stage1": variables[0], "stage2": variables[1]}
    image = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32, sharding=batch_sharding(mesh, 4))
    ids = {name: jax.ShapeDtypeStruct((batch, 77), jnp.int32) for name in pipe.tokenizers}
    text = _sharded_like(jax.eval_shape(lambda v, i: pipe.encode_text(v, i, (height, width)), variables, ids), mesh)
    key = jax.random.key(0)
    if offload:
        def run1(v, d, p, c):
            return pipe.run_stage1(v, key, d, p, c)

        def run2(v, f, p, t):
            return pipe.run_stage2(v, key, f, p, t)

        stage1 = ({"stage1": variables["stage1"]}, image, image, text[0])
        first = _sharded_like(jax.eval_shape(run1, *stage1), mesh)
        programs = {"text": (lambda v, i: pipe.encode_text(v, i, (height, width)),
                             (members_of(variables, TEXT_MEMBERS), ids)),
                    "stage1": (run1, stage1),
                    "stage2": (run2, ({"stage2": variables["stage2"]}, first, image, text[1]))}
    else:
        programs = {"restore": (lambda v, *a: pipe(v, key, *a), (variables, image, image, text))}
    lowered = {name: (jax.jit(fn).lower(*args), args) for name, (fn, args) in programs.items()}
    start = time.perf_counter()
    analyses = {name: _memory(program, args) for name, (program, args) in lowered.items()}
    seconds = time.perf_counter() - start
    largest = max(analyses, key=lambda k: sum(analyses[k][:3]))
    args, outputs, temporaries, fits = analyses[largest]
    return RestorePlan(version, height, width, dtype, batch, len(devices), params, steps, variant, attention, offload,
                       devices[0].platform,
                       weights_gib=tree_bytes(variables) / GIB, arguments_gib=args / GIB, outputs_gib=outputs / GIB,
                       temporaries_gib=temporaries / GIB, compile_s=seconds,
                       programs={k: sum(v[:3]) / GIB for k, v in analyses.items()},
                       tile=tiles.size if tiles is not None else None,
                       refused=[k for k, v in analyses.items() if not v[3]], guidance=guidance, remat=remat,
                       scan_layers=scan_layers)


def _memory(program, arguments) -> tuple[int, int, int, bool]:
    """(arguments, outputs, temporaries) in bytes per device and whether the program fits: a program XLA:TPU refuses
    for the chip's memory gives the temporaries its refusal names and its arguments' shards (outputs unknown: 0)."""
    try:
        m = program.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        needed = out_of_memory(str(e))
        if needed is None:
            raise
        return shard_bytes(arguments), 0, needed, False
    return m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, True
