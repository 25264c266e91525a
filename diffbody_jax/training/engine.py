"""The training engine: a phase (`training.phases`) plus a config -> a sharded, resumable, multi-host run.

    result = train(load_config("swinir:variant=tiny-diffbir", ["data.manifest=data/sample/manifest.jsonl"]),
                   workdir="runs/swinir")

What `train` does, in order:
1. mesh (config.mesh) and sharding rules; the phase's module (config.model) and optimizer (config.optim);
2. the state's shapes by `jax.eval_shape`, their shardings by the rules, then either the latest checkpoint in
   `workdir` restored into those shardings, or a fresh state initialised inside a jit whose outputs are those
   shardings (and `train.init_from` folders placed leaf by leaf): no param is ever whole on one device;
3. the grain pipeline over config.data (this process's slice of every global batch), its position restored
   with the checkpoint;
4. steps up to `train.steps` (a total: rerunning with a larger value continues), each logged to stdout,
   metrics.jsonl and TensorBoard every `train.log_every` steps, checkpointed every `checkpoint.every` steps and
   at the end; a step with a non-finite loss or gradient stops the run (`NonFiniteLoss`) with the last
   good checkpoint untouched;
5. the trained component (EMA if any) written in the PyTorch layout (`save_pretrained`) to `train.export_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from diffbody_jax.config import load_config
from diffbody_jax.data.degradations import degradation_from_config
from diffbody_jax.data.manifest import MAP_FIELDS, read_manifest
from diffbody_jax.data.pipeline import DataConfig, make_dataset
from diffbody_jax.diffusion.contract import contract_from_config
from diffbody_jax.interop.pretrained import init_from_pretrained_unet, load_weights_for, save_pretrained
from diffbody_jax.models.stage2 import Stage2Model
from diffbody_jax.models.unet import UNet2DConditionModel
from diffbody_jax.parallel.mesh import MeshConfig, make_mesh
from diffbody_jax.parallel.sharding import (
    ShardingRules,
    global_batch,
    host_to_sharded,
    logical_rules,
    param_partition_specs,
    tree_shardings,
)
from diffbody_jax.training.annotated_pose import annotated_pose_hook, pose_style_from
from diffbody_jax.training.cache import EncodedCache
from diffbody_jax.training.checkpoint import Checkpoints
from diffbody_jax.training.metric_writer import MetricWriter
from diffbody_jax.training.optimizer import make_optimizer
from diffbody_jax.training.phases import Phase, get_phase
from diffbody_jax.training.state import TrainState, create_train_state
from diffbody_jax.training.step import PASSED_THROUGH, jit_train_step, make_train_step
from diffbody_jax.training.trainable import merge, partition

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient norm was NaN or Inf; the run stopped before saving anything after it."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int  # optimizer updates done
    metrics: dict[str, Any]  # the last step's
    export: Path | None  # the exported component's folder


# ------------------------------------------------------------------------------------------------ the model
@dataclasses.dataclass
class Setup:
    """The pieces of a run that do not depend on the data: module, mesh, shardings, optimizer."""

    phase: Phase
    subset: Any  # the phase's TrainableSubset under this config
    module: Any
    mesh: Any
    rules: ShardingRules
    tx: Any
    schedule: Callable
    abstract_variables: Any  # unboxed ShapeDtypeStructs
    variable_shardings: Any
    param_specs: Any
    abstract_state: TrainState
    state_shardings: TrainState

    def make_state(self, variables, rng, ema: bool) -> TrainState:
        trainable, frozen = partition(variables["params"], self.subset)
        model_state = {k: v for k, v in variables.items() if k != "params"}
        return create_train_state(trainable, frozen, model_state, self.tx, rng, ema)


def setup(config, mesh=None) -> Setup:
    phase = get_phase(config.phase)
    module = phase.build(config.model)
    mesh = mesh or make_mesh(MeshConfig.from_config(config.mesh))
    rules = ShardingRules.from_config(config.mesh)
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    boxed = module.abstract_variables()
    specs = param_partition_specs(boxed["params"], mesh, rules)
    abstract = nn.unbox(boxed)
    ema = float(config.train.ema_decay) > 0
    partial = Setup(phase, phase.trainable(config), module, mesh, rules, tx, schedule, abstract, None, specs, None,
                    None)
    abstract_state = jax.eval_shape(lambda v, r: partial.make_state(v, r, ema), abstract,
                                    jax.ShapeDtypeStruct((2,), np.uint32))
    return dataclasses.replace(partial, variable_shardings=tree_shardings(abstract, specs, mesh, rules),
                               abstract_state=abstract_state,
                               state_shardings=tree_shardings(abstract_state, specs, mesh, rules))


def _init_sources(spec: str) -> list[tuple[str, str]]:
    """"unet=path,controlnet=unet:path" or "path" -> [(subtree, path)]; a run's workdir means its export/ folder."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        subtree, sep, path = item.partition("=")
        subtree, path = (subtree, path) if sep else ("", item)
        bare = path.removeprefix("unet:")
        if (Path(bare) / "export").is_dir() and not (Path(bare) / "config.json").exists():
            path = path[: len(path) - len(bare)] + str(Path(bare) / "export")
        out.append((subtree, path))
    return out


def _subtree(tree, subtree: str, what: str):
    for part in filter(None, subtree.split("/")):
        if not isinstance(tree, dict) or part not in tree:
            raise ValueError(f"train.init_from: the model's {what} have no subtree {subtree!r}; "
                             f"top level: {sorted(tree) if isinstance(tree, dict) else '(a leaf)'}")
        tree = tree[part]
    return tree


def _replace(tree: dict, subtree: str, value) -> dict:
    if not subtree:
        return value
    head, _, rest = subtree.partition("/")
    return {**tree, head: _replace(tree[head], rest, value)}


def _check_fits(target, loaded, where: str) -> None:
    want = {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype)) for p, x in
            jax.tree_util.tree_flatten_with_path(target)[0]}
    got = {jax.tree_util.keystr(p): (tuple(np.shape(x)), str(np.asarray(x).dtype)) for p, x in
           jax.tree_util.tree_flatten_with_path(loaded)[0]}
    if want != got:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[:5]
        raise ValueError(f"train.init_from {where}: " + "; ".join(
            f"{k}: model {want.get(k)}, file {got.get(k)}" for k in diff))


def _covered(member, target: dict, loaded: dict) -> tuple[dict, dict]:
    """(flat loaded leaves placed at the target's paths, flat target leaves the source may leave untouched).

    Two sources fill only part of a member: a plain UNet into a UNet built with the colour adapter's to_k_ip /
    to_v_ip (those keep their fresh values), and a colour adapter (IP-Adapter-Plus-XL, converted: {"image_proj",
    "ip_adapter"}) into a `Stage2Model` (its Resampler and the UNet's adapter kernels; the rest untouched)."""
    flat_target = traverse_util.flatten_dict(target, sep="/")
    flat = traverse_util.flatten_dict(loaded, sep="/")
    if isinstance(member, Stage2Model) and set(loaded) == {"image_proj", "ip_adapter"}:
        flat = {("image_proj/" + k[len("image_proj/"):]) if k.startswith("image_proj/")
                else "unet/" + k[len("ip_adapter/"):]: v for k, v in flat.items()}
        optional = {k: v for k, v in flat_target.items() if not (k.startswith("image_proj/") or _IP_KERNEL.search(k))}
        return flat, optional
    if isinstance(member, UNet2DConditionModel) and member.ip_adapter and not any(_IP_KERNEL.search(k) for k in flat):
        return flat, {k: v for k, v in flat_target.items() if _IP_KERNEL.search(k)}
    return flat, {}


_IP_KERNEL = re.compile(r"/to_[kv]_ip/")


def _load_into(variables: dict, shardings: dict, subtree: str, path: str, module, rng) -> dict:
    """Place one init source: `path` (`load_weights_for`: a diffusers or converted folder, with BatchNorm statistics
    where the model has them, or an original SwinIR / BPBreID checkpoint file) or `unet:path` (a ControlNet or
    joint UNet started from that UNet's weights)."""
    member = module
    for part in filter(None, subtree.split("/")):
        member = getattr(member, part)
    if not Path(path.removeprefix("unet:")).exists():
        raise FileNotFoundError(f"config train.init_from: {subtree or '(all params)'} = {path}: no such file or "
                                "folder")
    if path.startswith("unet:"):
        loaded, _, _ = init_from_pretrained_unet(path.removeprefix("unet:"), member, rng)
        loaded = {"params": loaded}
    else:
        loaded = load_weights_for(path, member)
    out = dict(variables)
    for collection, tree in loaded.items():
        if collection not in variables:
            raise ValueError(f"train.init_from {path}: holds {collection!r}, which the model has none of")
        target = _subtree(variables[collection], subtree, collection)
        flat, untouched = _covered(member, target, tree)
        flat_target = traverse_util.flatten_dict(target, sep="/")
        where = f"{path} does not fit {collection} {subtree or '(all)'!r}"
        _check_fits({k: v for k, v in flat_target.items() if k not in untouched}, flat, where)
        shard = traverse_util.flatten_dict(_subtree(shardings[collection], subtree, collection), sep="/")
        placed = host_to_sharded(flat, {k: shard[k] for k in flat})
        merged = traverse_util.unflatten_dict({**flat_target, **placed}, sep="/")
        out[collection] = _replace(variables[collection], subtree, merged)
    return out


def init_state(s: Setup, config) -> TrainState:
    """A fresh state, created in its shardings: random init (train.seed), then the train.init_from folders."""
    key = jax.random.PRNGKey(int(config.train.seed))
    init_key, state_key = jax.random.split(key)
    init = jax.jit(lambda k: nn.unbox(s.module.init(k, **s.module.dummy_inputs())),
                   out_shardings=s.variable_shardings)
    variables = init(init_key)
    for index, (subtree, path) in enumerate(_init_sources(config.train.init_from)):
        log.info("init %s from %s", subtree or "all params", path)
        variables = _load_into(variables, s.variable_shardings, subtree, path, s.module,
                               jax.random.fold_in(init_key, index))
    ema = float(config.train.ema_decay) > 0
    make = jax.jit(lambda v, r: s.make_state(v, r, ema), out_shardings=s.state_shardings, donate_argnums=0)
    return make(variables, state_key)


# ------------------------------------------------------------------------------------------------- the data
def make_data_iterator(config, phase: Phase):
    """This process's grain iterator over config.data (global batch split evenly over the processes)."""
    data = config.data
    if not data.manifest:
        raise ValueError("config.data.manifest is empty: set --config.data.manifest=PATH (a JSONL manifest; "
                         "`diffbody data sample-set --out data/sample` writes a small one)")
    processes = jax.process_count()
    if data.batch_size % processes:
        raise ValueError(f"data.batch_size={data.batch_size} (global) is not divisible by {processes} processes")
    annotated = data.get("pose_source", "manifest") == "annotator"  # pose drawn by the host hook instead
    # every line must give its pose map (a file or keypoints; [] = no person) before the run starts, not when the
    # loader draws it hours in
    records = read_manifest(data.manifest, require=tuple(m for m in data.maps if not (annotated and m == "pose")))
    if annotated and data.get("cache"):
        raise ValueError("data.pose_source=annotator draws pose maps each step, data.cache stores encoded ones: "
                         "use one of the two")
    data_config = DataConfig(batch_size=data.batch_size // processes, buckets=tuple(map(tuple, data.buckets)),
                             maps=tuple(m for m in data.maps if not (annotated and m == "pose")),
                             random_crop=data.random_crop, shuffle=data.shuffle, pose_style=pose_style_from(config))
    degradation = degradation_from_config(load_config(f"degradation:kind={data.degradation}"))
    dataset = make_dataset(records, data_config, degradation, seed=int(config.train.seed),
                           num_workers=int(data.num_workers))
    return iter(dataset)


def _loss_inputs(host_batch: dict, phase: Phase, cached: tuple[str, ...] = (),
                 maps: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The fields the step sees: the phase's inputs, the maps config.data.maps asked for (a switch such as
    diffusion.attention=mask reads one), the passed-through and cached fields."""
    missing = [k for k in phase.inputs if k not in host_batch]
    if missing:
        raise ValueError(f"phase {phase.name!r} needs batch field(s) {missing}; the data pipeline gives "
                         f"{sorted(host_batch)} (config.data.maps adds {'/'.join(MAP_FIELDS)})")
    out = {k: host_batch[k] for k in phase.inputs}
    out.update({k: host_batch[k] for k in (*maps, *PASSED_THROUGH, *cached) if k in host_batch})
    return out


# ------------------------------------------------------------------------------------------------ the run
def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_resumable(saved: dict | None, config, where: Path) -> None:
    if saved is None:
        return
    now = _config_json(config)
    for section in ("phase", "model"):
        if saved.get(section) != now.get(section):
            raise ValueError(f"{where}: this workdir holds a run of a different {section} "
                             f"({json.dumps(saved.get(section))[:200]}...); use a new --workdir")


def export_params(s: Setup, state: TrainState, config, workdir: Path) -> Path | None:
    """The trained component, gathered to the host, written by `save_pretrained` (process 0), with the run's
    contract.json beside it (`diffusion.contract`: what restoring must feed the model)."""
    name = s.phase.export
    if name is None:
        return None
    ema = bool(config.train.export_ema) and bool(jax.tree.leaves(state.ema))
    params = merge(state.ema if ema else state.params, state.frozen)  # device arrays: nothing copied yet
    module = s.module
    if callable(name):
        module, params = name(module, params)
    else:
        for part in filter(None, name.split("/")):
            module, params = getattr(module, part), params[part]
    # only the exported component comes to the host (not, say, the frozen SDXL UNet beside a ControlNet)
    params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    folder = Path(config.train.export_dir or workdir / "export")
    if jax.process_index() == 0:
        save_pretrained(folder, module, params)
        contract_from_config(config).write(folder)
    multihost_utils.sync_global_devices("export")
    return folder


def train(config, workdir: str | Path, *, batch_hook: Callable[[int, dict], dict] | None = None,
          mesh=None) -> TrainResult:
    """Run (or resume) `config`'s phase in `workdir` up to `config.train.steps`.

    batch_hook(step, host_batch) -> host_batch: a chance to inspect or alter each step's batch on the host
    (tests inject faults with it).
    """
    workdir = Path(workdir).absolute()
    s = setup(config, mesh)
    checkpoints = Checkpoints(workdir, int(config.checkpoint.every), int(config.checkpoint.keep),
                              bool(config.checkpoint.async_save))
    iterator = make_data_iterator(config, s.phase)
    latest = checkpoints.latest_step()
    if latest is None:
        state = init_state(s, config)
        checkpoints.save_frozen(state.frozen)
    else:
        _check_resumable(checkpoints.saved_config(latest), config, workdir)
        state = checkpoints.restore(latest, s.abstract_state, s.state_shardings, iterator)
    start, total = int(state.step), int(config.train.steps)
    log.info("phase %s: steps %d -> %d, mesh %s, %d trainable / %d frozen params", s.phase.name, start, total,
             dict(s.mesh.shape), sum(x.size for x in jax.tree.leaves(state.params)),
             sum(x.size for x in jax.tree.leaves(state.frozen)))

    step_fn = jit_train_step(
        make_train_step(s.phase.loss_fn(s.module, config), s.tx, s.schedule,
                        grad_accum=int(config.train.grad_accum), ema_decay=float(config.train.ema_decay)),
        s.state_shardings, s.mesh)
    host_hook = s.phase.host(config) if s.phase.host is not None else None
    pose_hook = annotated_pose_hook(config, s.module, state.frozen)
    cache = EncodedCache(config.data.cache, config) if config.data.get("cache") else None
    writer = MetricWriter(workdir, start, total)
    config_json = _config_json(config)
    metrics: dict[str, Any] = {}
    try:
        with jax.set_mesh(s.mesh), logical_rules(s.rules):
            for step in range(start + 1, total + 1):
                began = time.perf_counter()
                host = next(iterator)
                if pose_hook is not None:
                    host = pose_hook(host)
                if host_hook is not None:
                    host = host_hook(host)
                if cache is not None:
                    host = cache.fill(host)
                host = _loss_inputs(host, s.phase, cache.fields if cache is not None else (), tuple(config.data.maps))
                if batch_hook is not None:
                    host = batch_hook(step, host)
                batch = global_batch(host, s.mesh)
                state, out = step_fn(state, batch)
                out = jax.device_get(out)  # one small transfer a step: the finite check needs it now
                if not bool(out["finite"]):
                    checkpoints.wait()
                    raise NonFiniteLoss(
                        f"step {step}: loss {float(out['loss'])}, gradient norm {float(out['grad_norm'])}; stopped "
                        f"without applying it. Last good checkpoint: step {checkpoints.latest_step()} in "
                        f"{checkpoints.manager.directory}")
                elapsed = time.perf_counter() - began
                examples = next(iter(batch.values())).shape[0]
                metrics = {k: v for k, v in out.items() if k != "finite"}
                metrics.update(step_time_s=elapsed, examples_per_s=examples / elapsed,
                               examples_per_s_per_device=examples / elapsed / jax.device_count())
                if step % int(config.train.log_every) == 0 or step == total:
                    writer.write(step, metrics)
                if checkpoints.should_save(step) or step == total:
                    checkpoints.save(step, state, iterator, config_json, force=step == total)
                writer.advance()
        checkpoints.wait()
        export = export_params(s, state, config, workdir)
    finally:
        writer.close()
        checkpoints.close()
    return TrainResult(workdir, int(state.step), metrics, export)
