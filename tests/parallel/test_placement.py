"""Where a restoration's weights lie (`parallel.sharding.resolve_placement`, `inference_shardings`): replicated, or
split by the training engine's FSDP rule when a copy would not leave room on a device. The split itself, on 8 forced
devices, is tested with the restorer in tests/pipelines/test_sharded_restore.py."""

import jax
import numpy as np
import pytest

from diffbody_jax.parallel import sharding


class FakeDevice:
    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": 0}


GB = 10**9


@pytest.mark.parametrize("count,limit,weights,want", [
    (8, 24 * GB, 15 * GB, "fsdp"),         # v2 in bfloat16 on 24 GB devices: over half of one
    (8, 80 * GB, 15 * GB, "replicated"),   # ... on 80 GB devices: a copy each leaves room
    (1, 24 * GB, 15 * GB, "replicated"),   # one device: nothing to split over
    (8, None, 15 * GB, "replicated"),      # a backend that reports no memory (CPU)
    (2, 10 * GB, 5 * GB, "replicated"),    # exactly half: still replicated
    (2, 10 * GB, 5 * GB + 1, "fsdp"),
])
def test_auto_splits_when_a_copy_takes_over_half_a_device(count, limit, weights, want):
    assert sharding.resolve_placement("auto", weights, [FakeDevice(limit)] * count) == want


def test_explicit_placements_are_kept_and_bad_ones_named():
    devices = [FakeDevice(None)] * 2
    assert sharding.resolve_placement("fsdp", 1, devices) == "fsdp"
    assert sharding.resolve_placement("replicated", 10**12, [FakeDevice(GB)] * 2) == "replicated"
    with pytest.raises(ValueError, match="params placement 'tensor'"):
        sharding.resolve_placement("tensor", 1, devices)


def test_cpu_reports_no_device_memory_and_the_tree_bytes_count_every_leaf():
    assert sharding.device_memory(jax.devices()[0]) is None or jax.default_backend() != "cpu"
    tree = {"a": np.zeros((3, 4), np.float32), "b": [jax.ShapeDtypeStruct((5,), jax.numpy.bfloat16)]}
    assert sharding.tree_bytes(tree) == 3 * 4 * 4 + 5 * 2


def test_shard_bytes_count_one_devices_part_of_each_leaf():
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "fsdp"))
    split = jax.sharding.NamedSharding(mesh, jax.P("fsdp", None))
    whole = jax.sharding.NamedSharding(mesh, jax.P())
    tree = {"w": jax.ShapeDtypeStruct((8, 3), np.float32, sharding=split),
            "b": jax.ShapeDtypeStruct((6,), jax.numpy.bfloat16, sharding=whole)}
    # w: rows 8 / 4 fsdp devices, 3 float32 each; b: whole on every device
    assert sharding.shard_bytes(tree) == 2 * 3 * 4 + 6 * 2
    # shardings given as a tree take the place of the leaves' own
    assert sharding.shard_bytes(tree, {"w": whole, "b": whole}) == 8 * 3 * 4 + 6 * 2


def test_one_device_meshes_replicate_everything():
    for placement in ("replicated", "fsdp"):
        mesh = sharding.inference_mesh(placement, jax.devices()[:1])
        shardings = sharding.inference_shardings({"w": np.zeros((1024, 1024))}, mesh)
        assert shardings["w"].is_fully_replicated, placement
