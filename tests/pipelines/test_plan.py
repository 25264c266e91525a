"""`pipelines.plan.plan_restore`: the per-device memory of a restoration program, compiled for abstract weights."""

import json

import jax
import numpy as np
import pytest
from flax import linen as nn

from diffbody_jax.config import load_config
from diffbody_jax.models.registry import build_model
from diffbody_jax.pipelines import plan as plan_mod
from diffbody_jax.pipelines.plan import GIB, plan_restore


def _weights_gib(dtype: str, skip: tuple[str, ...] = ()) -> float:
    """The tiny v1 group's weights counted from its own abstract variables: params at 4 bytes per number, or 2 under
    bfloat16 but the VAE's; BatchNorm statistics at 4 bytes (they stay float32); members in `skip` left out."""
    group = build_model(load_config("v1_controlnet:variant=tiny").model)
    variables = nn.unbox(group.abstract_variables())
    total = 0
    for collection, tree in variables.items():
        for name, member in tree.items():
            if name in skip:
                continue
            half = dtype == "bfloat16" and collection == "params" and name != "vae"
            total += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(member)) * (2 if half else 4)
    return total / GIB


@pytest.fixture(scope="module")
def plans():
    return {dtype: plan_restore("v1", 64, 64, dtype=dtype, steps=2, variant="tiny") for dtype in ("float32",
                                                                                                     "bfloat16")}


def test_a_plan_counts_the_weights_in_its_dtype_and_holds_them_in_its_arguments(plans):
    for dtype, plan in plans.items():
        assert plan.weights_gib == pytest.approx(_weights_gib(dtype), rel=1e-6), dtype
        # the program's arguments: the weights but the text encoder's (the prompts are encoded by their own program,
        # `encode_text`) and the inputs (two 64 x 64 images, the text embedding: under 0.1 MiB). XLA also drops the
        # few weights the pipeline never reads (measured: 0.4% of the rest), hence the 1% below.
        held = _weights_gib(dtype, skip=("text_encoder",))
        assert 0.99 * held <= plan.arguments_gib <= held + 0.1 / 1024, (dtype, plan.arguments_gib, held)
        assert plan.temporaries_gib > 0 and plan.compile_s > 0
    assert plans["bfloat16"].weights_gib < 0.75 * plans["float32"].weights_gib


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="version 'v3'"):
        plan_restore("v3", 64, 64)
    with pytest.raises(ValueError, match="params 'tp'"):
        plan_restore("v1", 64, 64, params="tp")
    with pytest.raises(ValueError, match="batch 3: must be a multiple"):
        plan_restore("v1", 64, 64, batch=3, devices=[jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match="part-loss guidance is v1's"):
        plan_restore("v2", 64, 64, guidance=1.0)
    with pytest.raises(ValueError, match=r"remat \['unet2'\]: not members of v1's group"):
        plan_restore("v1", 64, 64, variant="tiny", guidance=1.0, remat=("unet2",))


def test_fsdp_splits_the_weights_over_eight_devices(eight_devices):
    """On 8 forced host devices: the replicated program holds every weight on each device; FSDP holds those of at
    least 256 numbers split 8 ways and the others (biases, norms) whole, so each device holds less than a quarter."""
    folder, _ = eight_devices
    from tests.eight_devices import outputs

    with open(outputs(folder, "restore_plan") + ".json") as f:
        plans = json.load(f)
    replicated, fsdp = plans["replicated"], plans["fsdp"]
    assert replicated["devices"] == fsdp["devices"] == 8
    assert replicated["arguments_gib"] >= 0.5 * replicated["weights_gib"]
    assert fsdp["arguments_gib"] < 0.25 * replicated["arguments_gib"], (fsdp, replicated)


def _stage_gib(phase: str) -> float:
    """Bytes of a tiny v2 stage's weights (float32), from its group's own abstract variables."""
    group = build_model(load_config(f"{phase}:variant=tiny").model)
    return sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(nn.unbox(group.abstract_variables()))) / GIB


def test_an_offloaded_v2_holds_one_stage_at_a_time():
    """With offload, v2 compiles three programs (the prompts, stage 1, stage 2) and none holds more than its own
    stage's weights; the plan reports the largest."""
    plan = plan_restore("v2", 64, 64, steps=1, variant="tiny", offload=True)
    stages = {"stage1": _stage_gib("stage1_controlnet"), "stage2": _stage_gib("colour_adapter")}
    assert set(plan.programs) == {"text", "stage1", "stage2"}
    assert plan.weights_gib == pytest.approx(sum(stages.values()), rel=1e-6)
    inputs = 0.1 / 1024  # two 64 x 64 images, text embeddings, stage 1's outputs: under 0.1 MiB
    assert plan.arguments_gib <= max(stages.values()) + inputs, (plan, stages)
    assert plan.total_gib == pytest.approx(max(plan.programs.values()))
    assert plan.offload and "offload" in plan.row()
    with pytest.raises(ValueError, match="v1 has one stage"):
        plan_restore("v1", 64, 64, offload=True)


def test_tiles_bound_a_large_photos_temporaries():
    """--fit tile: a photo 16x the tile's area needs far less than the same photo whole (the tiles are sampled one
    after another), and the plan says it was tiled."""
    from diffbody_jax.pipelines.tiles import TileConfig

    whole = plan_restore("v1", 256, 256, steps=1, variant="tiny")
    tiled = plan_restore("v1", 256, 256, steps=1, variant="tiny", tiles=TileConfig(64, 16))
    assert tiled.tile == 64 and "tiles 64" in tiled.row() and whole.tile is None
    print(f"temporaries: whole {whole.temporaries_gib * 2**10:.2f} MiB, tiled {tiled.temporaries_gib * 2**10:.2f} MiB")
    assert tiled.temporaries_gib < 0.5 * whole.temporaries_gib


class _Refused:
    """A lowered program whose compile XLA:TPU refuses, as it does one over a chip's memory."""

    def __init__(self, message: str):
        self.message = message

    def compile(self):
        raise jax.errors.JaxRuntimeError(self.message)


def test_a_program_refused_for_the_chips_memory_is_a_plan_that_does_not_fit():
    refusal = ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 21.50G of 15.75G hbm. Exceeded hbm "
               "capacity by 5.75G. ... the total memory required for HLO temporaries (12.25G) exceeds available HBM")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arguments = ({"w": jax.ShapeDtypeStruct((3, 5), jax.numpy.float32, sharding=one)},
                 jax.ShapeDtypeStruct((4, 2), jax.numpy.bfloat16, sharding=one))
    # arguments: 15 float32 + 8 bfloat16 numbers on the one device; temporaries as the refusal says
    assert plan_mod._memory(_Refused(refusal), arguments) == (15 * 4 + 8 * 2, 0, int(12.25 * GIB), False)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):
        plan_mod._memory(_Refused("INVALID_ARGUMENT: not about memory"), arguments)
