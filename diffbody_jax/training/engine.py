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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffbody_jax.data.degradations import degradation_config, degradation_from_config
from diffbody_jax.data.manifest import MAP_FIELDS, read_manifest
from diffbody_jax.data.pipeline import DataConfig, make_dataset
from diffbody_jax.data.prefetch import Prefetched
from diffbody_jax.diffusion.contract import contract_from_config
from diffbody_jax.interop.pretrained import family_for_module, save_pretrained
from diffbody_jax.models.registry import build_model
from diffbody_jax.parallel.mesh import MeshConfig, make_mesh
from diffbody_jax.parallel.sharding import (
    ShardingRules,
    global_batch,
    logical_rules,
    param_partition_specs,
    tree_shardings,
)
from diffbody_jax.training.annotated_pose import annotated_pose_hook
from diffbody_jax.training.cache import EncodedCache
from diffbody_jax.training.checkpoint import Checkpoints
from diffbody_jax.training.init_from import init_sources, init_variables_from
from diffbody_jax.training.metric_writer import MetricWriter
from diffbody_jax.training.optimizer import make_optimizer
from diffbody_jax.training.phases import Phase, get_phase
from diffbody_jax.training.state import TrainState, create_train_state
from diffbody_jax.training.step import PASSED_THROUGH, jit_train_step, make_train_step
from diffbody_jax.training.trainable import TrainableSubset, merge, partition

log = logging.getLogger(__name__)
MANIFEST_THREADS = 16


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient norm was NaN or Inf; the run stopped before saving anything after it."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int  # optimizer updates done
    metrics: dict[str, Any]  # the last step's
    export: Path | None  # the exported component's folder


# ------------------------------------------------------------------------------------------------ the model
@dataclasses.dataclass(frozen=True)
class Setup:
    """The pieces of a run that do not depend on the data: phase, module and its loss, mesh, shardings, optimizer."""

    phase: Phase
    subset: TrainableSubset  # the phase's trainable params under this config
    module: nn.Module
    loss_fn: Callable  # fn(variables, batch, key) -> (loss, metrics)
    mesh: Mesh
    rules: ShardingRules
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    ema: bool  # train.ema_decay > 0
    abstract_variables: Any  # unboxed ShapeDtypeStructs
    variable_shardings: Any
    param_specs: Any
    abstract_state: TrainState
    state_shardings: TrainState

    def make_state(self, variables, rng) -> TrainState:
        return make_state(self.subset, self.tx, variables, rng, self.ema)


def make_state(subset: TrainableSubset, tx, variables, rng, ema: bool) -> TrainState:
    """A train state from a model's variables: params split into the trainable subset and the frozen rest."""
    trainable, frozen = partition(variables["params"], subset)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return create_train_state(trainable, frozen, model_state, tx, rng, ema)


def setup(config, mesh=None) -> Setup:
    phase = get_phase(config.phase)
    module = build_model(config.model)
    loss_fn = phase.loss_fn(module, config)  # refuses a config or model the phase cannot train, before any init
    mesh = mesh or make_mesh(MeshConfig.from_config(config.mesh))
    rules = ShardingRules.from_config(config.mesh)
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    subset = phase.trainable(config)
    boxed = module.abstract_variables()
    specs = param_partition_specs(boxed["params"], mesh, rules)
    abstract = nn.unbox(boxed)
    ema = float(config.train.ema_decay) > 0
    abstract_state = jax.eval_shape(lambda v, r: make_state(subset, tx, v, r, ema), abstract,
                                    jax.ShapeDtypeStruct((2,), np.uint32))
    return Setup(phase, subset, module, loss_fn, mesh, rules, tx, schedule, ema, abstract,
                 tree_shardings(abstract, specs, mesh, rules), specs, abstract_state,
                 tree_shardings(abstract_state, specs, mesh, rules))


def init_state(s: Setup, config) -> TrainState:
    """A fresh state, created in its shardings: random init (train.seed), then the train.init_from folders."""
    key = jax.random.PRNGKey(int(config.train.seed))
    init_key, state_key = jax.random.split(key)
    variables = init_variables_from(s.module, s.variable_shardings, init_key, init_sources(config.train.init_from))
    make = jax.jit(s.make_state, out_shardings=s.state_shardings, donate_argnums=0)
    return make(variables, state_key)


# ------------------------------------------------------------------------------------------------- the data
def make_data_iterator(config, phase: Phase, cache: EncodedCache | None = None):
    """This process's grain iterator over config.data (global batch split evenly over the processes); cache: the
    run's `EncodedCache` of config.data.cache when the caller has opened it already."""
    data = config.data
    if not data.manifest:
        raise ValueError("config.data.manifest is empty: set --config.data.manifest=PATH (a JSONL manifest; "
                         "`diffbody data sample-set --out data/sample` writes a small one)")
    processes = jax.process_count()
    if data.batch_size % processes:
        raise ValueError(f"data.batch_size={data.batch_size} (global) is not divisible by {processes} processes")
    annotated = data.get("pose_source", "manifest") == "annotator"  # pose drawn by the host hook instead
    # every line must give its pose map (a file or keypoints; [] = no person) before the run starts, not when the
    # loader draws it hours in; headers only, on many threads: every host reads the manifest at every start, and a
    # file that fails to decode when drawn is skipped and logged (data.pipeline.ExampleLoader)
    records = read_manifest(data.manifest, require=tuple(m for m in data.maps if not (annotated and m == "pose")),
                            decode=False, workers=MANIFEST_THREADS)
    if annotated and data.get("cache"):
        raise ValueError("data.pose_source=annotator draws pose maps each step, data.cache stores encoded ones: "
                         "use one of the two")
    data_config = DataConfig.from_config(config, batch_size=data.batch_size // processes,
                                         maps=tuple(m for m in data.maps if not (annotated and m == "pose")))
    degradation = degradation_from_config(degradation_config(config))
    # caption tokens and a prepare cache's arrays are filled in the data workers (pure functions of the batch)
    transforms = [phase.host(config)] if phase.host is not None else []
    if data.get("cache"):
        transforms.append(cache if cache is not None else EncodedCache(data.cache, config))
    dataset = make_dataset(records, data_config, degradation, seed=int(config.train.seed),
                           num_workers=int(data.num_workers), batch_transforms=transforms)
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
    """The config saved with each checkpoint, with the degradation's definition (its ops or ranges, not only the
    name data.degradation) under data.degradation_definition, so a run records exactly what degraded its inputs."""
    out = json.loads(config.to_json_best_effort())
    out["data"]["degradation_definition"] = json.loads(degradation_config(config).to_json_best_effort())
    return out


def _without_layout(section):
    """A saved config section without its scan_layers choices: checkpoints hold the file layout either way."""
    if isinstance(section, dict):
        return {k: _without_layout(v) for k, v in section.items() if k != "scan_layers"}
    return section


def _check_resumable(saved: dict | None, config, where: Path) -> None:
    if saved is None:
        return
    now = _config_json(config)
    for section in ("phase", "model"):
        if _without_layout(saved.get(section)) != _without_layout(now.get(section)):
            raise ValueError(f"{where}: this workdir holds a run of a different {section} "
                             f"({json.dumps(saved.get(section))[:200]}...); use a new --workdir")


def export_params(s: Setup, state: TrainState, config, workdir: Path,
                  batches: Iterator[dict] | None = None) -> Path | None:
    """The trained component, gathered to the host, written by `save_pretrained` (process 0), with the run's
    contract.json beside it (`diffusion.contract`: what restoring must feed the model). A phase with a `calibrate`
    hook measures its export's config on `batches` (this process's host batches) first."""
    name = s.phase.export
    if name is None:
        return None
    ema = bool(config.train.export_ema) and bool(jax.tree.leaves(state.ema))
    params = merge(state.ema if ema else state.params, state.frozen)  # device arrays: nothing copied yet
    module, model_state = s.module, dict(state.model_state)
    if callable(name):
        module, params = name(module, params)
    else:
        for part in filter(None, name.split("/")):
            module, params = getattr(module, part), params[part]
            model_state = {c: tree[part] for c, tree in model_state.items() if part in tree}
    # only the exported component comes to the host (not, say, the frozen SDXL UNet beside a ControlNet)
    params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    if family_for_module(module).variables:  # BatchNorm statistics are written with the params
        model_state = jax.tree.map(np.asarray, multihost_utils.process_allgather(model_state, tiled=True))
        params = {"params": params, **model_state}
    if s.phase.calibrate is not None:
        if batches is None:
            raise ValueError(f"phase {s.phase.name!r} calibrates its export on training batches: pass batches")
        module = s.phase.calibrate(module, params, batches, config)
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
    cache = EncodedCache(config.data.cache, config) if config.data.get("cache") else None
    iterator = make_data_iterator(config, s.phase, cache)
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
        make_train_step(s.loss_fn, s.tx, s.schedule,
                        grad_accum=int(config.train.grad_accum), ema_decay=float(config.train.ema_decay)),
        s.state_shardings, s.mesh)
    pose_hook = annotated_pose_hook(config, s.module, state.frozen)
    writer = MetricWriter(workdir, start, total)
    config_json = _config_json(config)
    metrics: dict[str, Any] = {}
    skipped = 0
    # the host's work for step k+1 (drawing; the annotated-pose hook) runs on a thread while the devices run step k
    batches = Prefetched(iterator, pose_hook)
    try:
        with jax.set_mesh(s.mesh), logical_rules(s.rules):
            for step in range(start + 1, total + 1):
                began = time.perf_counter()
                host = next(batches)
                # unreadable records this host's loader passed over (each logged where it happened), since start
                skipped += int(np.sum(host.get("skipped", 0)))
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
                metrics["skipped_records"] = skipped
                metrics.update(step_time_s=elapsed, examples_per_s=examples / elapsed,
                               examples_per_s_per_device=examples / elapsed / jax.device_count())
                if step % int(config.train.log_every) == 0 or step == total:
                    writer.write(step, metrics)
                if checkpoints.should_save(step) or step == total:
                    checkpoints.save(step, state, batches, config_json, force=step == total)
                writer.advance()
        checkpoints.wait()
        batches.close()
        export = export_params(s, state, config, workdir, iterator)
    finally:
        batches.close()
        if pose_hook is not None:
            pose_hook.close()
        writer.close()
        checkpoints.close()
    return TrainResult(workdir, int(state.step), metrics, export)
