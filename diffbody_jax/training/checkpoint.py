"""Checkpoints of a run (orbax): one item per component, saved asynchronously every N steps, last K kept.

    checkpoints = Checkpoints(workdir, every=1000, keep=3)
    checkpoints.save(step, state, data_iterator, config)       # returns at once; written in the background
    state = checkpoints.restore(step, abstract_state, data_iterator)   # straight into the state's shardings

Layout under `workdir`:
  checkpoints/<step>/params, opt_state, ema, model_state    the arrays of the train state (each its own item)
  checkpoints/<step>/rng                                    the base PRNG key and the step count
  checkpoints/<step>/data                                   the grain iterator state, one file per process
  checkpoints/<step>/config                                 the run's config (JSON)
  checkpoints/<step>/frozen                                 a reference to frozen/ and its shapes
  frozen/                                                   the frozen params, written once (they never change)
Arrays are stored in the file layout (`models.stacked_blocks`): a run that scans its transformer stacks writes
them block by block and stacks them again on restore, so a checkpoint resumes with or without `model.scan_layers`.
orbax writes each step into a temporary folder and renames it when every item is complete, so a run killed during
a save leaves the previous checkpoints as they were; `latest_step` only sees complete ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from diffbody_jax.models.stacked_blocks import stack_blocks, unstack_blocks
from diffbody_jax.training.state import TrainState

ARRAY_ITEMS = ("params", "opt_state", "ema", "model_state")


def _shapes(tree) -> dict[str, list]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): [list(np.shape(x)), str(x.dtype)] for p, x in flat}


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _in_layout(tree, abstract, shardings):
    """A restored (file-layout) tree in the layout of `abstract`, placed in `shardings`: stacked where the run scans
    its transformer stacks (on device, one copy of those leaves while it runs), returned as it is otherwise."""
    if jax.tree.structure(tree) == jax.tree.structure(abstract):
        return tree
    return jax.jit(stack_blocks, out_shardings=shardings)(tree)


class Checkpoints:
    def __init__(self, workdir: str | Path, every: int, keep: int, async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint.every={every} and checkpoint.keep={keep} must be >= 1")
        self.workdir = Path(workdir).absolute()
        self.every = every
        self.frozen_dir = self.workdir / "frozen"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        # every item's handler named up front: a manager that has not saved yet otherwise learns them only from the
        # args of a call, and item_metadata / a partial restore (the saved config alone) warn about every other item
        handlers = {"rng": ocp.StandardCheckpointHandler(), "frozen": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                    **{name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}}
        self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options, item_handlers=handlers)

    # ------------------------------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    # ------------------------------------------------------------------------------------------- saving
    def save_frozen(self, frozen: Any) -> None:
        """The frozen params, once per workdir (atomic: orbax renames a complete temporary folder)."""
        if not jax.tree.leaves(frozen) or self.frozen_dir.exists():
            return
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(self.frozen_dir, unstack_blocks(frozen))
            checkpointer.wait_until_finished()

    def save(self, step: int, state: TrainState, data_iterator=None, config: dict | None = None,
             force: bool = False) -> bool:
        items: dict[str, Any] = {
            "rng": ocp.args.StandardSave({"rng": state.rng, "step": state.step}),
            "frozen": ocp.args.JsonSave({"path": "frozen", "shapes": _shapes(unstack_blocks(state.frozen))}),
        }
        for name in ARRAY_ITEMS:
            tree = getattr(state, name)
            if jax.tree.leaves(tree):
                items[name] = ocp.args.StandardSave(unstack_blocks(tree))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # ---------------------------------------------------------------------------------------- restoring
    def saved_config(self, step: int) -> dict | None:
        """The config a checkpoint was saved with (its "config" item, through orbax's own restore), or None."""
        if "config" not in set(self.manager.item_metadata(step).keys()):
            return None
        return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def restore(self, step: int, abstract: TrainState, shardings: TrainState, data_iterator=None) -> TrainState:
        """The state saved at `step`, each array placed in its sharding as it is read (never whole on one device).
        `data_iterator` (a grain iterator) is set to where that step left off."""
        if step not in self.all_steps():
            raise FileNotFoundError(f"{self.manager.directory}: no checkpoint of step {step}; "
                                    f"saved: {self.all_steps()}")
        # read in the file layout, each block in its own sharding; stacked below where this run scans
        targets = unstack_blocks(_with_shardings(abstract, shardings))
        stored = set(self.manager.item_metadata(step).keys())
        items: dict[str, Any] = {"rng": ocp.args.StandardRestore({"rng": targets.rng, "step": targets.step}),
                                 "frozen": ocp.args.JsonRestore()}
        for name in ARRAY_ITEMS:
            tree = getattr(targets, name)
            if jax.tree.leaves(tree):
                if name not in stored:
                    raise ValueError(f"{self.manager.directory}/{step}: item {name!r} missing; "
                                     "the run's config does not match the checkpoint's")
                items[name] = ocp.args.StandardRestore(tree)
        if data_iterator is not None:
            if "data" not in stored:
                raise ValueError(f"{self.manager.directory}/{step}: no data iterator state saved")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        frozen = abstract.frozen
        if jax.tree.leaves(frozen):
            expected = _shapes(targets.frozen)
            if restored["frozen"]["shapes"] != expected:
                raise ValueError(f"{self.frozen_dir}: frozen params differ in shape from this run's model")
            with ocp.StandardCheckpointer() as checkpointer:
                frozen = _in_layout(checkpointer.restore(self.frozen_dir, targets.frozen), abstract.frozen,
                                    shardings.frozen)
        logging.info("restored step %d from %s", step, self.manager.directory)
        return TrainState(
            step=restored["rng"]["step"], rng=restored["rng"]["rng"], frozen=frozen,
            **{name: _in_layout(restored[name], getattr(abstract, name), getattr(shardings, name))
               if name in items else getattr(abstract, name) for name in ARRAY_ITEMS},
        )
