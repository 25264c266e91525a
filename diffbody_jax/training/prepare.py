"""`diffbody prepare`: write a phase's `training.cache` folder (see there for what it holds and when it applies)."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffbody_jax.data.degradations import degradation_config, degradation_from_config
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.pipeline import DataConfig, ExampleLoader
from diffbody_jax.files import write_json
from diffbody_jax.parallel.sharding import batch_sharding, global_batch
from diffbody_jax.training.cache import check_cacheable, fingerprint
from diffbody_jax.training.engine import init_state, setup

log = logging.getLogger(__name__)


SHARD_BYTES = 2**30


class _ShardWriter:
    """This process's encodings, written as `shard-<p>-<k>.npz` files of about `limit` bytes as they fill (each
    atomically: a killed prepare leaves no half shard), so memory holds one shard whatever the data set's size;
    `close` writes the index `index-<p>-of-<n>.json` naming them (the readers' list)."""

    def __init__(self, out: Path, process: int, processes: int, limit: int):
        self.out, self.p, self.n, self.limit = out, process, processes, limit
        self.pending: dict[str, np.ndarray] = {}
        self.bytes, self.shards, self.fields = 0, [], set()
        self.peak_bytes = 0  # the most this writer held at once
        out.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, value: np.ndarray) -> None:
        self.pending[key] = value
        self.fields.add(key.split("/", 1)[1])
        self.bytes += value.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        if self.bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{self.p:05d}-{len(self.shards):05d}.npz"
        tmp = self.out / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **self.pending)
        tmp.replace(self.out / name)
        self.shards.append(name)
        self.pending, self.bytes = {}, 0

    def close(self) -> None:
        self.flush()
        write_json({"shards": self.shards}, self.out / f"index-{self.p:05d}-of-{self.n:05d}.json")


def prepare_cache(config, out_dir: str | Path, mesh=None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Encode every manifest record once with the phase's `cache` function; returns `out_dir`. shard_bytes: each
    process writes its encodings in files of about this size as it goes (its memory holds one)."""
    check_cacheable(config)
    out = Path(out_dir)
    s = setup(config, mesh)
    variables = init_state(s, config).variables()
    records = read_manifest(config.data.manifest, require=tuple(config.data.maps))
    data = DataConfig.from_config(config, batch_size=1, random_crop=False, shuffle=False)
    degradation = degradation_from_config(degradation_config(config))
    loader = ExampleLoader(records, data, degradation, int(config.train.seed))
    host_hook = s.phase.host(config) if s.phase.host is not None else None
    rows = batch_sharding(s.mesh)  # batch-major outputs split like the batch (a prefix spec: other axes replicated)
    fields_fn = jax.jit(lambda v, b: s.phase.cache(s.module, v, b), out_shardings=rows)
    p, n = jax.process_index(), jax.process_count()
    local = max(1, int(config.data.batch_size) // n)
    writer = _ShardWriter(out, p, n, shard_bytes)
    for bucket in range(len(data.buckets)):
        ids = np.flatnonzero(loader.buckets == bucket)
        if not len(ids):
            continue
        mine = ids[p::n]
        per_process = -(-len(ids) // n)  # every process runs the same number of global batches
        steps = -(-per_process // local)
        padded = np.resize(mine if len(mine) else ids[:1], steps * local)
        for step in range(steps):
            chunk = padded[step * local: (step + 1) * local]
            examples = [loader({"record": int(r), "epoch": 0}) for r in chunk]
            batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]
                     if not isinstance(examples[0][k], str)}
            batch["caption"] = [e["caption"] for e in examples]
            if host_hook is not None:
                batch = host_hook(batch)
            arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object}
            with jax.set_mesh(s.mesh):
                encoded = fields_fn(variables, global_batch(arrays, s.mesh))
            encoded = multihost_utils.global_array_to_host_local_array(
                encoded, s.mesh, {k: rows.spec for k in encoded})
            for i, record in enumerate(chunk):
                if step * local + i < len(mine):
                    for field, value in encoded.items():
                        writer.add(f"{int(record)}/{field}", np.array(value[i]))
    writer.close()
    if p == 0:
        write_json({**fingerprint(config), "fields": sorted(writer.fields), "processes": n,
                    "records": len(records)}, out / "cache.json")
    multihost_utils.sync_global_devices("prepare_cache")
    log.info("prepare: this process's records in %d shard(s) -> %s (at most %.1f MiB held at once)", len(writer.shards),
             out, writer.peak_bytes / 2**20)
    return out
