"""The memory of a training phase's step per device, read from XLA before any weight exists.

    plan = plan_train_step(load_config("v1_controlnet"), height=1024, width=512, mesh=MeshConfig(data=1, fsdp=-1))
    print(plan.row())

The phase's state (trainable params, frozen params, optimizer moments, EMA) is built with `jax.eval_shape` and
placed by the engine's own rules (`training.engine.setup`: the config's mesh and FSDP rule); the step
(`training.step.make_train_step`: forward, loss, backward, optimizer update, at the config's gradient accumulation)
is lowered for an abstract global batch of the config's size and compiled. The compiled program gives:
  - per device: the state's bytes by part (from its shardings), the batch, XLA's temporaries, the total;
  - the collectives XLA placed, by kind (all-gather, reduce-scatter, all-reduce, ...);
  - the FSDP layout, from the scheduled program: the peak of gathered weights alive at once (each all-gather's
    result from its definition to its last use), against the largest layer's full weights, and any all-gather
    that does not sit inside a model layer's named scope (flax names each module's ops by its path).
On CPU every figure is XLA:CPU's: an estimate for an accelerator, with the configured attention backend standing in
for the device's kernel.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffbody_jax.models.attention import compiling_for
from diffbody_jax.parallel.mesh import MeshConfig, make_mesh, out_of_memory
from diffbody_jax.parallel.sharding import batch_sharding, logical_rules, shard_bytes
from diffbody_jax.training.engine import setup
from diffbody_jax.training.step import make_train_step

GIB = 2**30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
TOKENS = 77  # CLIP's sequence
# batch fields by channels ([B, H, W, C] float32 in [0, 1]; data.pipeline's layout)
IMAGE_CHANNELS = {"target": 3, "degraded": 3, "pose": 3, "normal": 3, "depth": 1, "attention": 1, "mask": 1,
                  "parts": 1}


@dataclasses.dataclass
class TrainPlan:
    phase: str
    variant: str
    platform: str  # cpu (an estimate for an accelerator) or tpu (XLA:TPU's own program)
    mesh: dict[str, int]
    batch: int  # global, per optimizer update
    height: int
    width: int
    grad_accum: int
    dtype: str  # compute
    remat: str
    attention: str
    params_gib: float  # per device: trainable params
    frozen_gib: float
    optimizer_gib: float
    ema_gib: float
    batch_gib: float
    temporaries_gib: float
    outputs_gib: float
    compile_s: float
    collectives: dict[str, int]
    largest_layer_gib: float  # the largest layer's full params (all devices' shards), float32
    largest_layer: str
    gathered_peak_gib: float  # the most gathered weights alive at once on a device
    gathers_outside_layers: list[str]
    # False: XLA:TPU refused the program for the chip's memory; temporaries_gib is then what it said they need, and
    # the program's other figures (collectives, gathers) are unknown
    fits: bool = True

    @property
    def devices(self) -> int:
        return int(np.prod(list(self.mesh.values())))

    @property
    def state_gib(self) -> float:
        return self.params_gib + self.frozen_gib + self.optimizer_gib + self.ema_gib

    @property
    def total_gib(self) -> float:
        """Arguments (state and batch), temporaries, and outputs beyond the donated state (the metrics)."""
        return self.state_gib + self.batch_gib + self.temporaries_gib

    @property
    def layout_ok(self) -> bool | None:
        """XLA gathered weights layer by layer: never more than two layers' worth alive, each gather in a layer
        (None: no program to read)."""
        if not self.fits:
            return None
        return self.gathered_peak_gib <= 2 * self.largest_layer_gib and not self.gathers_outside_layers

    def row(self) -> str:
        mesh = "x".join(str(v) for v in self.mesh.values())
        kinds = ", ".join(f"{k} {v}" for k, v in self.collectives.items() if v) if self.fits else "-"
        gathered = f"{self.gathered_peak_gib:.3f}" if self.fits else "-"
        over = "" if self.fits else " (does not fit: XLA:TPU's count)"
        return (f"| {self.phase} | {self.batch} at {self.height}x{self.width} (accum {self.grad_accum}) | {mesh} | "
                f"{self.dtype}, remat {self.remat}, {self.attention} | {self.params_gib:.2f} | {self.frozen_gib:.2f} | "
                f"{self.optimizer_gib + self.ema_gib:.2f} | {self.temporaries_gib:.2f} | {self.total_gib:.2f}{over} | "
                f"{gathered} / {self.largest_layer_gib:.3f} | {kinds} | {self.compile_s:.0f} |")


def abstract_batch(config, fields, height: int, width: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a global batch of config.data.batch_size at height x width holding `fields`."""
    b = int(config.data.batch_size)
    out = {}
    for name in fields:
        if name in IMAGE_CHANNELS:
            out[name] = jax.ShapeDtypeStruct((b, height, width, IMAGE_CHANNELS[name]), jnp.float32)
        elif name in ("input_ids", "input_ids_2"):
            out[name] = jax.ShapeDtypeStruct((b, TOKENS), jnp.int32)
        elif name in ("original_size", "crop_top_left"):
            out[name] = jax.ShapeDtypeStruct((b, 2), jnp.int32)
        else:
            raise ValueError(f"abstract_batch: no shape known for batch field {name!r}")
    return out


def _shard_gib(tree, shardings) -> float:
    return shard_bytes(tree, shardings) / GIB


def largest_layer(params) -> tuple[str, int]:
    """(path, float32 bytes) of the module whose own params are the largest (a Conv's kernel and bias, an attention
    projection): the unit FSDP gathers."""
    sizes: dict[str, int] = collections.defaultdict(int)
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        sizes[path.rsplit("/", 1)[0]] += int(np.prod(leaf.shape, dtype=np.int64)) * 4
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


# ------------------------------------------------------------------------------------------ the compiled program
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _shape_bytes(text: str) -> int:
    return sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
               for t, dims in _SHAPE.findall(text))


def _result_arrays(shape: str) -> list[tuple[int, int]]:
    """(elements, bytes) of each array of an instruction's result (one, or a tuple's: an async start holds its
    operands and results, and XLA combines several gathers into one)."""
    out = []
    for dtype, dims in _SHAPE.findall(shape):
        n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
        out.append((n, n * _BYTES[dtype]))
    return out


def _computations(hlo: str) -> list[list[tuple[str, str, int, str, list[tuple[int, int]]]]]:
    """Each computation's instructions in the printed (scheduled) order: (name, opcode, result bytes, the text after
    the opcode, the result's arrays as (elements, bytes))."""
    out, current = [], None
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and ("->" in line or line.startswith(("ENTRY", "%"))):
            current = []
            out.append(current)
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            name, shape, opcode, rest = m.groups()
            current.append((name, opcode, _shape_bytes(shape), rest, _result_arrays(shape)))
    return out


def collective_counts(hlo: str) -> dict[str, int]:
    counts = dict.fromkeys(COLLECTIVES, 0)
    for computation in _computations(hlo):
        for _, opcode, _, _, _ in computation:
            kind = opcode.removesuffix("-start")
            if kind in counts:
                counts[kind] += 1
    return counts


def gathered_peak(hlo: str, weight_sizes=None) -> tuple[int, list[str]]:
    """(bytes, op names): the most all-gather results alive at once in any computation of the scheduled program
    (alive from the gather to the last instruction reading it or a view of it), and the op_name of each.
    weight_sizes: count only the gathered arrays of one of these element counts (the params' full sizes: the
    partitioner also gathers activations, e.g. a batch-split tensor before a reshape; XLA:TPU may gather a weight
    reshaped, so sizes, not shapes)."""
    peak, names = 0, []
    aliases = ("get-tuple-element", "bitcast", "copy", "all-gather-done", "reshape", "transpose", "convert")
    for computation in _computations(hlo):
        root_of: dict[str, str] = {}
        born, size, last = {}, {}, {}
        for index, (name, opcode, nbytes, rest, arrays) in enumerate(computation):
            operands = re.findall(r"%([\w.\-]+)", rest.split("metadata=")[0])
            if opcode in ("all-gather", "all-gather-start"):
                counted = nbytes if weight_sizes is None else sum(b for n, b in arrays if n in weight_sizes)
                if not counted:
                    continue
                root_of[name], born[name], size[name], last[name] = name, index, counted, index
                names.append((_OP_NAME.search(rest) or [None, ""])[1])
                continue
            for operand in operands:
                if operand in root_of:
                    last[root_of[operand]] = index
                    if opcode in aliases:
                        root_of[name] = root_of[operand]
        if born:
            events = sorted([(born[g], size[g]) for g in born] + [(last[g] + 1, -size[g]) for g in born])
            alive = 0
            for _, delta in events:
                alive += delta
                peak = max(peak, alive)
    return peak, names


def plan_train_step(config, *, height: int | None = None, width: int | None = None, mesh: MeshConfig | None = None,
                    devices=None) -> TrainPlan:
    """Compile `config`'s train step for abstract state and batch on `mesh` (default the config's) over `devices`
    (default all; or a TPU topology's, `parallel.mesh.target_devices`), at height x width (default the config's first
    bucket), and read its memory and collectives."""
    devices = list(devices or jax.devices())
    with compiling_for(devices[0].platform):
        return _plan_train_step(config, height, width, mesh, devices)


def _plan_train_step(config, height, width, mesh, devices) -> TrainPlan:
    mesh = make_mesh(mesh or MeshConfig.from_config(config.mesh), devices)
    s = setup(config, mesh)
    h, w = height or config.data.buckets[0][0], width or config.data.buckets[0][1]
    fields = tuple(dict.fromkeys((*s.phase.inputs, *config.data.maps)))
    batch = abstract_batch(config, fields, h, w)
    shardings = {k: batch_sharding(mesh, x.ndim) for k, x in batch.items()}
    step = make_train_step(s.loss_fn, s.tx, s.schedule, grad_accum=int(config.train.grad_accum),
                           ema_decay=float(config.train.ema_decay))
    jitted = jax.jit(step, in_shardings=(s.state_shardings, shardings),
                     out_shardings=(s.state_shardings, jax.sharding.NamedSharding(mesh, jax.P())), donate_argnums=0)
    start = time.perf_counter()
    fits, temporaries, outputs, hlo = True, 0, 0, ""
    with jax.set_mesh(mesh), logical_rules(s.rules):
        try:
            compiled = jitted.lower(s.abstract_state, batch).compile()
            m = compiled.memory_analysis()
            temporaries, outputs, hlo = m.temp_size_in_bytes, m.output_size_in_bytes, compiled.as_text()
        except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program over the chip's memory, and says so
            needed = out_of_memory(str(e))
            if needed is None:
                raise
            fits, temporaries = False, needed
    seconds = time.perf_counter() - start
    params = {**_flat_params(s.abstract_state.params), **_flat_params(s.abstract_state.frozen)}
    peak, gather_names = gathered_peak(hlo, {int(np.prod(x.shape)) for x in params.values()})
    layer, layer_bytes = largest_layer(traverse_util.unflatten_dict(params, sep="/"))
    state, st = s.abstract_state, s.state_shardings
    outside = gathers_outside_layers(gather_names, params)
    model = config.model
    sections = [m for m in (model.members.values() if "members" in model else [model]) if "dtype" in m]

    def setting(field):  # the members' settings, each once ("bfloat16/float32": the VAE kept in float32)
        return "/".join(dict.fromkeys(str(m[field]) for m in sections if field in m))

    return TrainPlan(
        phase=config.phase, variant=str(model.get("variant", "")), platform=devices[0].platform,
        mesh=dict(mesh.shape),
        batch=int(config.data.batch_size), height=h, width=w, grad_accum=int(config.train.grad_accum),
        dtype=setting("dtype"), remat=setting("remat"), attention=setting("attention_backend"),
        params_gib=_shard_gib(state.params, st.params), frozen_gib=_shard_gib(state.frozen, st.frozen),
        optimizer_gib=_shard_gib(state.opt_state, st.opt_state), ema_gib=_shard_gib(state.ema, st.ema),
        batch_gib=_shard_gib(batch, shardings), temporaries_gib=temporaries / GIB,
        outputs_gib=outputs / GIB, compile_s=seconds, collectives=collective_counts(hlo),
        largest_layer_gib=layer_bytes / GIB, largest_layer=layer, gathered_peak_gib=peak / GIB,
        gathers_outside_layers=outside, fits=fits)


def _flat_params(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def gathers_outside_layers(op_names, param_paths) -> list[str]:
    """The op names (each once) of all-gathers not made inside a layer: flax names a layer's ops by its module
    path, so a gather of a weight made where its layer runs carries "/<module>/" for some module of the model
    (".../jvp(UNet2DConditionModel)/conv_in/conv_general_dilated", ".../jvp(CLIPTextModel)/embeddings/add"); one
    at the step's top level (the optimizer's update, the loss) or one XLA added without a name does not."""
    scopes = {f"/{module}/" for path in param_paths for module in path.split("/")[1:-1]}
    return sorted({name or "(no op_name)" for name in op_names if not any(scope in name for scope in scopes)})
