"""The training engine end to end on the bundled sample set (4 photos, one 64 x 64 bucket, global batch 4):
logs, NaN stop, export and init from the export."""

import json
import logging

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from diffbody_jax.config import load_config
from diffbody_jax.data.degradations import degradation_from_config
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.interop.pretrained import load_pretrained
from diffbody_jax.training.checkpoint import Checkpoints
from diffbody_jax.training.engine import NonFiniteLoss, init_state, setup, train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_sample_set(tmp_path_factory.mktemp("sample"))


def _config(manifest, *overrides):
    return load_config("swinir:variant=tiny-diffbir", [f"data.manifest={manifest}", "train.log_every=1",
                                                       "checkpoint.every=2", "train.ema_decay=0.5",
                                                       "data.degradation=blur2-noise40", *overrides])


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(workdir, step, manifest):
    s = setup(_config(manifest))
    checkpoints = Checkpoints(workdir, 1, 5)
    assert checkpoints.saved_config(step)["train"]["steps"] >= step
    state = checkpoints.restore(step, s.abstract_state, s.state_shardings)
    return jax.tree.map(np.asarray, state)


def test_a_run_logs_exports_its_ema_and_a_new_run_starts_from_it(manifest, tmp_path, caplog):
    """(Resuming with more steps, bit-identical: tests/training/test_kill_resume.py.)"""
    straight = train(_config(manifest, "train.steps=6"), tmp_path / "straight")
    assert straight.step == 6
    with caplog.at_level(logging.WARNING):
        a = _params(tmp_path / "straight", 6, manifest)  # a fresh manager reads the config, then the state
    assert not [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
    rows = _rows(tmp_path / "straight")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(len(r["record"]) == 4 for r in rows)
    assert {"loss", "grad_norm", "learning_rate", "step_time_s", "examples_per_s",
            "examples_per_s_per_device"} <= set(rows[0])
    assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))
    # the saved config (read back through orbax) carries the degradation's ops, not only its name
    definition = Checkpoints(tmp_path / "straight", 1, 5).saved_config(6)["data"]["degradation_definition"]
    assert definition["kind"] == "blur2-noise40"
    ops = definition["mixtures"]["blur2-noise40"]["ops"]
    assert [(op["kind"], op["sigma"]) for op in ops] == [("blur", 2.0), ("noise", 40.0)]
    assert degradation_from_config(load_config("degradation:kind=blur2-noise40")).ops == tuple(
        degradation_from_config(ConfigDict(definition)).ops)  # the saved definition rebuilds the same ops
    # the export is the EMA, in the PyTorch layout, and a new run can start from it
    module, exported = load_pretrained(straight.export)
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(a.ema), strict=True):
        np.testing.assert_array_equal(x, y)
    config = _config(manifest, f"train.init_from={tmp_path / 'straight'}")
    started = init_state(setup(config), config)
    for x, y in zip(jax.tree.leaves(started.params), jax.tree.leaves(a.ema), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    with pytest.raises(ValueError, match="different model"):
        train(load_config("swinir:variant=tiny-diffbir", [f"data.manifest={manifest}", "train.steps=8",
                                                          "model.swinir.embed_dim=12"]),
              tmp_path / "straight")


def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(manifest, tmp_path):
    def poison(step, batch):
        if step == 3:
            batch = {**batch, "degraded": np.full_like(batch["degraded"], np.nan)}
        return batch

    with pytest.raises(NonFiniteLoss, match=r"step 3: loss nan.*Last good checkpoint: step 2"):
        train(_config(manifest, "train.steps=6", "checkpoint.every=1"), tmp_path, batch_hook=poison)
    assert Checkpoints(tmp_path, 1, 5).all_steps() == [1, 2]
    state = _params(tmp_path, 2, manifest)
    assert int(state.step) == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]


def test_config_errors_name_the_field(manifest, tmp_path):
    with pytest.raises(ValueError, match="data.manifest is empty"):
        train(load_config("swinir:variant=tiny-diffbir"), tmp_path)
    with pytest.raises(ValueError, match="optim.schedule='cosine'"):
        train(_config(manifest, "optim.schedule=cosine"), tmp_path)
    with pytest.raises(ValueError, match="mesh .* needs 2 devices; there are 1"):
        train(_config(manifest, "mesh.data=2"), tmp_path)

