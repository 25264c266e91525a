"""`training.plan`: what it reads from a compiled program (collectives, the gathered weights alive at once, gathers
outside layers) on hand-written scheduled HLO whose answers are counted by hand; the whole plan of a tiny phase on 8
forced devices is in tests/parallel/test_sharded_step.py."""

import numpy as np

from diffbody_jax.parallel.mesh import out_of_memory
from diffbody_jax.training import plan

# Two FSDP weights of f32[32, 8] (1024 bytes each, gathered from f32[4, 8] shards). In SEQUENTIAL the second is
# gathered after the first's last use; in EARLY both are gathered before either is used, and the first lives on
# through a bitcast until the last instruction.
SEQUENTIAL = """HloModule jit_step, is_scheduled=true

%fused (p: f32[32,8]) -> f32[8,8] {
  %p = f32[32,8]{1,0} parameter(0)
  ROOT %s = f32[8,8]{1,0} slice(f32[32,8]{1,0} %p), slice={[0:8], [0:8]}
}

ENTRY %main (w0: f32[4,8], w1: f32[4,8]) -> f32[8,8] {
  %w0 = f32[4,8]{1,0} parameter(0)
  %w1 = f32[4,8]{1,0} parameter(1)
  %all-gather.1 = f32[32,8]{1,0} all-gather(f32[4,8]{1,0} %w0), metadata={op_name="s/down_0/conv1/conv"}
  %fusion.1 = f32[8,8]{1,0} fusion(f32[32,8]{1,0} %all-gather.1), kind=kLoop, calls=%fused
  %all-gather.2 = f32[32,8]{1,0} all-gather(f32[4,8]{1,0} %w1), metadata={op_name="s/down_0/conv2/conv"}
  %fusion.2 = f32[8,8]{1,0} fusion(f32[32,8]{1,0} %all-gather.2), kind=kLoop, calls=%fused
  %all-reduce.1 = f32[8,8]{1,0} all-reduce(f32[8,8]{1,0} %fusion.2), channel_id=3, to_apply=%fused
  ROOT %add = f32[8,8]{1,0} add(f32[8,8]{1,0} %fusion.1, f32[8,8]{1,0} %all-reduce.1)
}
"""

EARLY = """HloModule jit_step, is_scheduled=true

ENTRY %main (w0: f32[4,8], w1: f32[4,8]) -> f32[8,8] {
  %w0 = f32[4,8]{1,0} parameter(0)
  %w1 = f32[4,8]{1,0} parameter(1)
  %all-gather.1 = f32[32,8]{1,0} all-gather(f32[4,8]{1,0} %w0), dimensions={0}, metadata={op_name="jit(step)/add"}
  %all-gather-start.2 = (f32[4,8]{1,0}, f32[32,8]{1,0}) all-gather-start(f32[4,8]{1,0} %w1), dimensions={0}
  %all-gather-done.2 = f32[32,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[32,8]{1,0}) %all-gather-start.2)
  %view = f32[8,32]{0,1} bitcast(f32[32,8]{1,0} %all-gather.1)
  %fusion.2 = f32[8,8]{1,0} fusion(f32[32,8]{1,0} %all-gather-done.2), kind=kLoop, calls=%fused
  %reduce-scatter.1 = f32[1,8]{1,0} reduce-scatter(f32[8,8]{1,0} %fusion.2), dimensions={0}, to_apply=%fused
  ROOT %fusion.1 = f32[8,8]{1,0} fusion(f32[8,32]{0,1} %view, f32[1,8]{1,0} %reduce-scatter.1), kind=kLoop
}
"""


def test_collectives_are_counted_by_kind():
    assert plan.collective_counts(SEQUENTIAL) == {"all-gather": 2, "reduce-scatter": 0, "all-reduce": 1,
                                                  "all-to-all": 0, "collective-permute": 0}
    counts = plan.collective_counts(EARLY)
    assert counts["all-gather"] == 2 and counts["reduce-scatter"] == 1  # an async start counts once


def test_gathers_alive_at_once():
    peak, names = plan.gathered_peak(SEQUENTIAL)
    assert peak == 32 * 8 * 4  # one weight at a time
    assert names == ["s/down_0/conv1/conv",
                     "s/down_0/conv2/conv"]
    peak, _ = plan.gathered_peak(EARLY)
    # the async gather's start holds its shard and the result (4x8 + 32x8 floats); both weights alive together
    assert peak == 32 * 8 * 4 + (4 * 8 + 32 * 8) * 4


def test_gathers_outside_a_layer_are_named():
    params = ["unet/down_0/conv1/kernel", "unet/down_0/conv2/kernel", "unet/conv_in/bias"]
    names = plan.gathered_peak(SEQUENTIAL)[1] + plan.gathered_peak(EARLY)[1]
    assert plan.gathers_outside_layers(names, params) == ["(no op_name)", "jit(step)/add"]


def test_largest_layer_sums_a_modules_own_params():
    params = {"unet": {"conv1": {"kernel": np.zeros((3, 3, 8, 16)), "bias": np.zeros(16)},
                      "norm": {"scale": np.zeros(2000)}}}
    assert plan.largest_layer(params) == ("unet/norm", 2000 * 4)
    params["unet"]["conv1"]["kernel"] = np.zeros((3, 3, 16, 16))
    assert plan.largest_layer(params) == ("unet/conv1", (3 * 3 * 16 * 16 + 16) * 4)


def test_only_gathers_of_weight_shapes_count_when_asked():
    """The partitioner gathers activations too: with the params' sizes given, only gathered arrays of those count."""
    gather = "%all-gather.9 = f32[64,8]{1,0} all-gather(f32[8,8]{1,0} %w0), dimensions={0}"
    activation = SEQUENTIAL.replace("%fusion.1 = f32[8,8]{1,0} fusion(",
                                    gather + "\n  %fusion.1 = f32[8,8]{1,0} fusion(f32[64,8]{1,0} %all-gather.9, ")
    assert plan.gathered_peak(activation)[0] == (32 * 8 + 64 * 8) * 4
    assert plan.gathered_peak(activation, {32 * 8})[0] == 32 * 8 * 4
    assert plan.gathered_peak(activation, {9})[0] == 0
    # an async start's tuple holds the shard and the result: only the weight-sized array counts
    assert plan.gathered_peak(EARLY, {32 * 8})[0] == 2 * 32 * 8 * 4


def test_xla_tpus_out_of_memory_refusal_gives_the_temporaries():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (51.34G) "
               "exceeds available HBM (15.75G).")
    assert out_of_memory(message) == int(51.34 * 2**30)
    assert out_of_memory(message.replace("51.34G", "812.5M")) == int(812.5 * 2**20)
    assert out_of_memory("INVALID_ARGUMENT: something else") is None
