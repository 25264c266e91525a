"""One train step on 8 forced host devices (data=2, fsdp=4; data=2, fsdp=2, tensor=2) against one device.

XLA_FLAGS must be set before jax is imported, so the meshes run in the suite's one 8-device subprocess
(tests/eight_devices.py); it writes each mesh's post-step params and facts about their shardings, and this process
compares them.

Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 an entry whose gradient is ~1e-9 (rounding of a zero)
moves by up to lr with the sign of that rounding, which differs between reduction orders. So this test raises eps to
1e-2, where the update stays proportional to the gradient (a gradient error of 1e-3 would still move a param by
~1e-4) and a rounding difference dg moves a param by at most lr / eps * dg = 0.2 dg. (At eps = 1e-3 that factor was
2: one seed's conv_up2 gradient, 1.4e-3 after cancellation, differed by 6e-6 between reduction orders and its param by
1.02e-5.) Stochastic depth is off (with it on, gradients near zero differed by ~1e-6 between meshes; the
deterministic model's agree to 2e-9). Adam's first moment, (1 - b1) g, is compared as well.
"""

import json

import numpy as np
from jax.sharding import PartitionSpec as P

from tests.eight_devices import outputs


def test_one_step_on_8_devices_equals_one_device(eight_devices):
    folder, seed = eight_devices
    out = outputs(folder, "train_step")
    facts = json.loads(open(out + ".json").read())
    arrays = np.load(out + ".npz")
    for mesh in ("d2f4", "d2f2t2"):
        keys = [k for k in arrays.files if k.startswith("one:")]
        worst = max(float(np.abs(arrays[k] - arrays[k.replace("one:", f"{mesh}:")]).max()) for k in keys)
        assert worst <= 1e-5, (mesh, worst, f"seed {seed}")
        assert abs(facts[mesh]["loss"] - facts["one"]["loss"]) <= 1e-6
    # the qkv kernel [24, 72]: fsdp alone takes its largest axis; with tensor on the heads axis, fsdp takes the
    # other; the buffers are really split
    assert facts["d2f4"]["qkv_spec"] == str(P(None, "fsdp"))
    assert facts["d2f4"]["qkv_shard"] == [24, 72 // 4]
    assert facts["d2f2t2"]["qkv_spec"] == str(P("fsdp", "tensor"))
    assert facts["d2f2t2"]["qkv_shard"] == [24 // 2, 72 // 2]
    assert facts["d2f2t2"]["mu_spec"] == facts["d2f2t2"]["qkv_spec"]  # Adam's moment follows its param
    assert facts["one"]["qkv_shard"] == facts["one"]["qkv_shape"]
