"""Two processes joined by jax.distributed over loopback: ShardByJaxProcess gives each its slice."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

from diffbody_jax.data import degradations as deg
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.pipeline import DataConfig, ShardInfo, make_dataset
from tests.torch_ref import REPO

BUCKETS = ((32, 32), (48, 32), (32, 48))
HOST_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from diffbody_jax.data import degradations as deg
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.pipeline import DataConfig, make_dataset
config = DataConfig(batch_size=2, buckets=((32, 32), (48, 32), (32, 48)))
it = iter(make_dataset(read_manifest(sys.argv[3]), config, deg.table1_mixture("blur2-down4"), seed=5))
steps = [next(it) for _ in range(5)]
json.dump({"process": jax.process_index(), "records": [b["record"].tolist() for b in steps],
           "buckets": [b["bucket"].tolist() for b in steps]}, open(sys.argv[4], "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_read_disjoint_slices_of_the_same_global_batches(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        h, w = [(40, 40), (60, 40), (40, 60)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": str(i)}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(rows) + "\n")

    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOST_SCRIPT, address, str(i), str(manifest), str(tmp_path / f"{i}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    hosts = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert [h["process"] for h in hosts] == [0, 1]

    config = DataConfig(batch_size=4, buckets=BUCKETS)
    it = iter(make_dataset(read_manifest(manifest), config, deg.table1_mixture("blur2-down4"), 5, ShardInfo()))
    for step in range(5):
        g = next(it)
        assert hosts[0]["records"][step] + hosts[1]["records"][step] == g["record"].tolist()
        assert set(hosts[0]["buckets"][step] + hosts[1]["buckets"][step]) == {int(g["bucket"][0])}
