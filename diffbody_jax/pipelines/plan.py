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

params: "replicated" (every device holds every weight, as `diffbody restore` does today) or "fsdp" (each weight
split over the devices by the training engine's rule, `parallel.sharding.param_partition_specs`).
dtype: as `RestoreSettings.dtype` (bfloat16: every member but the VAEs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffbody_jax.config import load_config
from diffbody_jax.diffusion.samplers import SamplerConfig
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.files import read_json
from diffbody_jax.models.group import ModelGroup
from diffbody_jax.models.registry import build_model
from diffbody_jax.parallel.mesh import MeshConfig, make_mesh
from diffbody_jax.parallel.sharding import ShardingRules, batch_sharding, param_partition_specs
from diffbody_jax.pipelines.v1 import V1Pipeline
from diffbody_jax.pipelines.v2 import V2Pipeline
from diffbody_jax.pipelines.weights import DEFAULT_SCHEDULERS, dtype_kwargs

GIB = 2**30
PLACEMENTS = ("replicated", "fsdp")
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
    params: str
    steps: int
    variant: str
    weights_gib: float  # all weights, once
    arguments_gib: float  # per device: weights (whole or its shards) and inputs
    outputs_gib: float
    temporaries_gib: float
    compile_s: float

    @property
    def total_gib(self) -> float:
        return self.arguments_gib + self.outputs_gib + self.temporaries_gib

    def row(self) -> str:
        return (f"| {self.version} | {self.height}x{self.width} | {self.dtype} | {self.batch} | {self.devices} "
                f"{self.params} | {self.weights_gib:.3f} | {self.arguments_gib:.3f} | {self.temporaries_gib:.3f} | "
                f"{self.total_gib:.3f} | {self.compile_s:.0f} |")


def _group(phase: str, variant: str, dtype: str, attention_backend: str | None) -> ModelGroup:
    model = load_config(f"{phase}:variant={variant}").model
    group = build_model(model)
    members = {}
    for name, member in group.members.items():
        changes = dtype_kwargs(name, dtype)
        if attention_backend:
            changes["attention_backend"] = attention_backend
        fields = {f.name for f in dataclasses.fields(member)}
        members[name] = member.clone(**{k: v for k, v in changes.items() if k in fields})
    return ModelGroup(**members)


def _schedule(pipeline: str) -> NoiseSchedule:
    """The bundled scheduler of `pipeline` (sd21, sdxl), as a weights folder without its own uses."""
    path = DEFAULT_SCHEDULERS[pipeline]
    return NoiseSchedule.from_dict(read_json(path), str(path))


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def plan_restore(version: str, height: int, width: int, *, dtype: str = "float32", batch: int = 1,
                 steps: int | None = None, params: str = "replicated", variant: str = "paper",
                 devices: Sequence[jax.Device] | None = None, attention_backend: str | None = None,
                 fsdp_min_size: int = ShardingRules.fsdp_min_size) -> RestorePlan:
    """Compile `version`'s restoration for abstract weights and inputs and read its per-device memory.

    height, width: the image (multiples of 64); batch: images per call, split over the devices (a multiple of
    their number); steps: sampling steps per stage (default the papers' 50 / 200); variant: the configs' variant
    (paper, or tiny for a quick check); fsdp_min_size: with params="fsdp", weights of fewer numbers stay whole on
    every device (the training engine's default). Nothing is allocated: the weights are shapes only.
    """
    if version not in _GROUPS:
        raise ValueError(f"version {version!r}; expected one of {sorted(_GROUPS)}")
    if params not in PLACEMENTS:
        raise ValueError(f"params {params!r}; expected one of {PLACEMENTS}")
    devices = list(devices or jax.local_devices())
    if batch % len(devices):
        raise ValueError(f"batch {batch}: must be a multiple of the {len(devices)} device(s)")
    steps = steps or {"v1": 50, "v2": 200}[version]
    fsdp = len(devices) if params == "fsdp" else 1
    mesh = make_mesh(MeshConfig(data=len(devices) // fsdp, fsdp=fsdp), devices)
    groups = [_group(phase, variant, dtype, attention_backend) for phase in _GROUPS[version]]
    boxed = [g.abstract_variables() for g in groups]

    def placed(tree):
        if params == "replicated":
            specs = jax.tree.map(lambda _: P(), nn.unbox(tree))
        else:
            specs = param_partition_specs(tree, mesh, ShardingRules(fsdp_min_size=fsdp_min_size))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                            nn.unbox(tree), specs)

    variables = [placed(v) for v in boxed]
    sampler = SamplerConfig(method="ddpm", num_steps=steps)
    if version == "v1":
        pipe = V1Pipeline(groups[0], _schedule("sd21"), sampler)
        variables = variables[0]
    else:
        pipe = V2Pipeline(groups[0], groups[1], _schedule("sd21"), _schedule("sdxl"), sampler, sampler)
        variables = {"stage1": variables[0], "stage2": variables[1]}
    image = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32, sharding=batch_sharding(mesh, 4))
    ids = {name: jax.ShapeDtypeStruct((batch, 77), jnp.int32) for name in pipe.tokenizers}
    text = jax.eval_shape(lambda v, i: pipe.encode_text(v, i, (height, width)), variables, ids)
    text = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, x.ndim)),
                        text)
    start = time.perf_counter()
    compiled = type(pipe).__call__.lower(pipe, variables, jax.random.key(0), image, image, text).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    return RestorePlan(version, height, width, dtype, batch, len(devices), params, steps, variant,
                       weights_gib=_nbytes(variables) / GIB, arguments_gib=m.argument_size_in_bytes / GIB,
                       outputs_gib=m.output_size_in_bytes / GIB, temporaries_gib=m.temp_size_in_bytes / GIB,
                       compile_s=seconds)
