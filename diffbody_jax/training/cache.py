"""The `diffbody prepare` cache: a phase's frozen encodings (VAE latents of the clean crop and of the pose, depth
and normal maps, text embeddings), computed once per example and stored, so that training reads them instead of
running those encoders every step.

    prepare_cache(load_config("stage2_controlnet", [...]), "cache/stage2")     # training.prepare: the writer
    diffbody train --config configs/stage2_controlnet.py ... --config.data.cache=cache/stage2

Each process encodes its share of the manifest's records (round robin within each resolution bucket) as slices of
global batches on the run's mesh, with the frozen encoders sharded as in training, and writes its own
shards `shard-<p>-<k>.npz` of about 1 GiB each as it goes, and their list `index-<p>-of-<n>.json` (entries
"<record>/<field>"). The cache holds what does not change between epochs, so it
needs fixed crops (`data.random_crop=False`, centred as the pipeline centres them) and fixed captions
(`text.drop_prob=0`); degradations, and so I_ir, stay per step. `cache.json` records the phase, the model section,
the manifest, buckets and the fields; training refuses a cache made for anything else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from diffbody_jax.files import read_json


def fingerprint(config) -> dict:
    model = json.dumps(json.loads(config.model.to_json_best_effort()), sort_keys=True)
    return {"phase": config.phase, "model_sha1": hashlib.sha1(model.encode()).hexdigest(),
            "manifest": str(Path(config.data.manifest).absolute()), "buckets": [list(b) for b in config.data.buckets],
            "text": json.loads(config.text.to_json_best_effort()) if "text" in config else None}


def check_cacheable(config) -> None:
    from diffbody_jax.training.phases import get_phase

    if get_phase(config.phase).cache is None:
        raise ValueError(f"phase {config.phase!r} has no prepare cache (the diffusion phases have one; stage 0 has no "
                         "frozen encoder)")
    if config.data.random_crop:
        raise ValueError("a prepare cache holds one crop per example: set --config.data.random_crop=False")
    if config.data.get("colour_permutation", False):
        raise ValueError("a prepare cache holds each example's latents in its own colours: set "
                         "--config.data.colour_permutation=False")
    if "text" in config and float(config.text.drop_prob) > 0:
        raise ValueError("a prepare cache holds each caption's embeddings: set --config.text.drop_prob=0")


class EncodedCache:
    """The stored encodings of a `prepare_cache` folder, by record: `fill(batch)` adds them to a host batch.

    Only an index is read up front (`entries`: "<record>/<field>" -> its shard); each array is read from its
    shard when a batch asks for it, so a cache larger than the host's memory works."""

    def __init__(self, folder: str | Path, config):
        folder = Path(folder)
        meta_path = folder / "cache.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"config data.cache: {folder} has no cache.json (run `diffbody prepare`)")
        check_cacheable(config)
        meta = read_json(meta_path)
        want = fingerprint(config)
        for key, value in want.items():
            if meta.get(key) != value:
                raise ValueError(f"config data.cache: {meta_path} was prepared for {key}={meta.get(key)!r}, this run "
                                 f"has {value!r}; run `diffbody prepare` again")
        self.fields = tuple(meta["fields"])
        n = int(meta["processes"])
        shards = []
        for process in range(n):
            index = folder / f"index-{process:05d}-of-{n:05d}.json"
            if not index.exists():
                raise ValueError(f"config data.cache: {folder} lacks {index.name} (cache.json says {n} processes "
                                 "wrote it: was a prepare cut short?)")
            for name in read_json(index)["shards"]:
                if not (folder / name).exists():
                    raise ValueError(f"config data.cache: {index} names {name}, which is missing")
                shards.append(folder / name)
        self.shard_paths = shards
        self._entries = None

    @property
    def entries(self) -> dict:
        """"<record>/<field>" -> its shard (NpzFile: members are read on access), opened in the process asking."""
        if self._entries is None:
            self._entries = {key: z for z in map(np.load, self.shard_paths) for key in z.files}
        return self._entries

    def __getstate__(self):  # a data worker process reopens the shards itself
        return {**self.__dict__, "_entries": None}

    def __call__(self, batch: Mapping) -> dict:
        return self.fill(batch)

    def fill(self, batch: Mapping) -> dict:
        out = dict(batch)
        for field in self.fields:
            rows = []
            for record in np.asarray(batch["record"]).tolist():
                key = f"{record}/{field}"
                if key not in self.entries:
                    raise KeyError(f"config data.cache: no {field!r} for manifest record {record}")
                rows.append(self.entries[key][key])
            out[field] = np.stack(rows)
        return out
