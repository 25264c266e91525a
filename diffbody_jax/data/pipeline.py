"""The training input pipeline: manifest -> bucketed, cropped, degraded, batched examples, on grain.

    records = read_manifest("data/train.jsonl", require=("pose",))
    dataset = make_dataset(records, DataConfig(batch_size=4), degradation, seed=0)
    iterator = iter(dataset)                     # a grain DatasetIterator
    batch = next(iterator)                       # dict of numpy arrays, one bucket per batch
    state = iterator.get_state()                 # save with the model; iterator.set_state(state) resumes

Each image goes to the resolution bucket whose aspect ratio is nearest (in log space), is resized to
cover it and cropped to it (randomly for training, centred otherwise); its maps and keypoints follow
the same resize and crop. A batch holds examples of one bucket.

Multi-host: every step, all hosts take the same bucket and each takes its own `batch_size` slice of one
global batch, so the per-host arrays assemble into one global array of a single shape. The shard index
and count come from grain's `ShardByJaxProcess` by default. The order of epoch e is a pure function of
(seed, e), and every random choice for an example (crop, degradation) of (seed, e, record), so a run
resumed from a saved iterator state sees exactly the batches it would have seen.

Batch layout (NHWC, float32 in [0, 1] unless stated):
  target        [B, H, W, 3]     the clean crop
  degraded      [B, H, W, 3]     the degraded image upsampled back to H x W (the restorer's input)
  low_res       [B, h, w, 3]     the degraded image at its own resolution
  pose, normal  [B, H, W, 3]     if requested (pose rendered from keypoints when no pose file is given)
  depth, attention, mask  [B, H, W, 1] if requested (mask: the person mask)
  parts         [B, H, W, 1]     if requested: body-part labels 0..5 (float32) drawn from the keypoints
                                 (data.body_parts), the body-part network's training target
  caption       [B] str;  bucket, record, epoch  [B] int32
  skipped       [B] int32        records passed over for this slot because their files failed to load (logged)
  original_size, crop_top_left  [B, 2] int32 (H, W) and (top, left): SDXL's size conditioning
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageOps

from diffbody_jax.data import degradations as deg
from diffbody_jax.data.body_parts import part_label_map
from diffbody_jax.data.manifest import KEYPOINT_MAPS, MAP_FIELDS, SINGLE_CHANNEL_MAPS, Record
from diffbody_jax.data.pose import PoseStyle, transform_keypoints

log = logging.getLogger(__name__)

# The five buckets of the DiffBody v2 paper, as (H, W): square, portrait and landscape.
PAPER_BUCKETS = ((512, 512), (768, 512), (512, 768), (1024, 512), (512, 1024))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """batch_size is per host; the global batch is batch_size * shard_count."""

    batch_size: int = 4
    buckets: tuple[tuple[int, int], ...] = PAPER_BUCKETS
    maps: tuple[str, ...] = ()  # which of pose, depth, normal, attention, mask, parts to produce
    random_crop: bool = True
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    pose_style: PoseStyle = PoseStyle()  # how keypoints become pose maps (the run's contract carries it)
    # Permute the clean image's RGB channels (one of the six orders, drawn per example) before degrading it: a few
    # photos then cover the colour wheel (the tiny zoo's SwinIR and VAE; docs/zoo.md). Maps are not permuted.
    colour_permutation: bool = False

    @classmethod
    def from_config(cls, config, **overrides) -> DataConfig:
        """A training config's `data` section (batch_size, buckets, maps, random_crop, shuffle, pose_style), read the
        same way by the engine and `diffbody prepare`; `overrides` replace fields (the per-host batch size, no crop
        or shuffle for a cache, the maps an annotator draws itself)."""
        data = config["data"]
        fields = dict(batch_size=int(data["batch_size"]), buckets=tuple(tuple(b) for b in data["buckets"]),
                      maps=tuple(data["maps"]), random_crop=bool(data["random_crop"]), shuffle=bool(data["shuffle"]),
                      pose_style=PoseStyle.from_dict(dict(data["pose_style"])) if "pose_style" in data else PoseStyle(),
                      colour_permutation=bool(data.get("colour_permutation", False)))
        return cls(**{**fields, **overrides})

    def __post_init__(self):
        known = (*MAP_FIELDS, *KEYPOINT_MAPS[1:])
        bad = sorted(set(self.maps) - set(known))
        if bad:
            raise ValueError(f"DataConfig.maps: unknown map(s) {bad} ({', '.join(known)})")
        if self.batch_size < 1 or not self.buckets:
            raise ValueError(f"DataConfig: batch_size {self.batch_size} and buckets {self.buckets} must be set")


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio H/W is nearest to `size`'s, in log space (ties: first)."""
    ratio = math.log(size[0] / size[1])
    return int(np.argmin([abs(ratio - math.log(h / w)) for h, w in buckets]))


def cover_and_crop(size: tuple[int, int], bucket: tuple[int, int], rng: np.random.Generator | None):
    """The resize (H', W') that covers `bucket` keeping the aspect ratio, and the crop's (top, left)."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    resized = (max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale)))
    spare = (resized[0] - bucket[0], resized[1] - bucket[1])
    if rng is None:
        top, left = spare[0] // 2, spare[1] // 2
    else:
        top, left = int(rng.integers(spare[0] + 1)), int(rng.integers(spare[1] + 1))
    return resized, (top, left)


# ------------------------------------------------------------------------------------------- order
@dataclasses.dataclass(frozen=True)
class ShardInfo:
    index: int = 0
    count: int = 1


class BucketedOrder(Sequence):
    """Position in this host's stream -> which record, bucket and epoch.

    Epoch e: shuffle each bucket's records, cut them into global batches (batch_size * shard count;
    leftovers wait for a later epoch's shuffle), shuffle the batches. Host h reads slice h of each.
    """

    def __init__(self, buckets_of_records: np.ndarray, batch_size: int, shard: ShardInfo, seed: int,
                 shuffle: bool, num_epochs: int | None, bucket_sizes: Sequence[tuple[int, int]]):
        self.buckets_of_records = np.asarray(buckets_of_records)
        self.batch_size, self.shard, self.seed, self.shuffle = batch_size, shard, seed, shuffle
        self.num_epochs = num_epochs
        self.global_batch = batch_size * shard.count
        counts = np.bincount(self.buckets_of_records, minlength=len(bucket_sizes))
        self.batches_per_epoch = int(sum(c // self.global_batch for c in counts))
        if self.batches_per_epoch == 0:
            listed = ", ".join(f"{h}x{w}: {c}" for (h, w), c in zip(bucket_sizes, counts, strict=True))
            raise ValueError(f"no bucket holds a global batch of {self.global_batch} examples ({listed})")
        self.per_epoch = self.batches_per_epoch * batch_size

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.per_epoch * self.num_epochs

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one order object lives as long as its data set)
    def epoch_batches(self, epoch: int) -> np.ndarray:
        """[batches_per_epoch, global_batch] record indices of one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in range(int(self.buckets_of_records.max()) + 1):
            members = np.flatnonzero(self.buckets_of_records == bucket)
            if self.shuffle:
                members = rng.permutation(members)
            usable = len(members) // self.global_batch * self.global_batch
            batches += list(members[:usable].reshape(-1, self.global_batch))
        order = rng.permutation(len(batches)) if self.shuffle else np.arange(len(batches))
        return np.stack([batches[i] for i in order])

    def __getitem__(self, position: int) -> dict[str, int]:
        if not 0 <= position < len(self):
            raise IndexError(position)
        epoch, within = divmod(position, self.per_epoch)
        batch, slot = divmod(within, self.batch_size)
        record = int(self.epoch_batches(epoch)[batch, self.shard.index * self.batch_size + slot])
        return {"record": record, "epoch": epoch}


# ----------------------------------------------------------------------------------------- loading
def _load_rgb(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"), np.float32) / 255.0


def _load_map(path: str, channels: int) -> np.ndarray:
    with Image.open(path) as opened:
        img = ImageOps.exif_transpose(opened)
        if channels == 1:
            arr = np.asarray(img, np.float32)
            arr = arr.mean(-1) if arr.ndim == 3 else arr  # RGB depth renders: the channel mean
            peak = 65535.0 if img.mode.startswith("I") else 255.0
            return (arr / peak)[..., None].astype(np.float32)
        return np.asarray(img.convert("RGB"), np.float32) / 255.0


def _resize_crop(image: np.ndarray, resized: tuple[int, int], crop: tuple[int, int], bucket, mode: str):
    out = deg.resize(image, resized, mode)
    return out[crop[0]: crop[0] + bucket[0], crop[1]: crop[1] + bucket[1]]


class UnreadableExample(ValueError):
    """A record whose files fail to load when drawn (truncated, corrupt, gone, changed size)."""


class ExampleLoader:
    """grain map transform: {"record", "epoch"} -> one example dict (see the module docstring).

    A record whose image or map fails to load when drawn (the training run validates headers only) is skipped:
    the slot takes the next record of the same bucket that loads (so the batch keeps its shape), the example's
    `skipped` field counts the records passed over for it, and each one is logged. Which record replaces it is a
    function of (seed, epoch, record), so a resumed run draws what an uninterrupted one draws."""

    def __init__(self, records: Sequence[Record], config: DataConfig, degradation, seed: int):
        self.records, self.config, self.degradation, self.seed = list(records), config, degradation, seed
        self.buckets = np.array([nearest_bucket(r.size, config.buckets) for r in self.records], np.int32)
        self.by_bucket = {int(b): np.flatnonzero(self.buckets == b) for b in np.unique(self.buckets)}

    def __call__(self, item: dict[str, int]) -> dict[str, Any]:
        index, epoch = int(item["record"]), int(item["epoch"])
        same = self.by_bucket[int(self.buckets[index])]
        start = int(np.searchsorted(same, index))
        for skipped in range(len(same)):
            candidate = int(same[(start + skipped) % len(same)])
            try:
                out = self.example(candidate, epoch)
            except UnreadableExample as e:
                log.warning("skipped: %s", e)
                continue
            out["skipped"] = np.int32(skipped)
            return out
        raise UnreadableExample(f"no record of bucket {self.config.buckets[self.buckets[index]]} loads "
                                f"({len(same)} tried)")

    def _load(self, record: Record, what: str, fn, *args):
        try:
            return fn(*args)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated and corrupt files
            raise UnreadableExample(f"{record.image} (manifest line {record.line}): {what}: "
                                    f"{type(e).__name__}: {e}") from e

    def example(self, index: int, epoch: int) -> dict[str, Any]:
        """Record `index`'s example in `epoch`; UnreadableExample when one of its files fails to load."""
        cfg = self.config
        record = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        bucket = cfg.buckets[self.buckets[index]]
        resized, crop = cover_and_crop(record.size, bucket, rng if cfg.random_crop else None)
        image = self._load(record, "image", _load_rgb, record.image)
        if image.shape[:2] != record.size:
            raise UnreadableExample(f"{record.image} (manifest line {record.line}): size {image.shape[:2]} changed "
                                    "since the manifest was read")
        target = _resize_crop(image, resized, crop, bucket, "area")
        if cfg.colour_permutation:
            target = np.ascontiguousarray(target[..., rng.permutation(3)])
        degraded = self.degradation(target, rng)
        out = {
            "target": target,
            "degraded": degraded.upsampled,
            "low_res": degraded.low_res,
            "caption": record.caption,
            "bucket": np.int32(self.buckets[index]),
            "record": np.int32(index),
            "epoch": np.int32(epoch),
            "original_size": np.asarray(record.size, np.int32),
            "crop_top_left": np.asarray(crop, np.int32),
        }
        for field in cfg.maps:
            if field in record.maps:
                channels = 1 if field in SINGLE_CHANNEL_MAPS else 3
                mode = "nearest" if field == "pose" else "area"
                loaded = self._load(record, field, _load_map, record.maps[field], channels)
                out[field] = _resize_crop(loaded, resized, crop, bucket, mode)
                if channels == 1 and out[field].ndim == 2:
                    out[field] = out[field][..., None]
            elif field in KEYPOINT_MAPS and record.keypoints is not None:
                scale = (resized[0] / record.size[0], resized[1] / record.size[1])
                kp = transform_keypoints(record.keypoints, scale, crop)
                if field == "pose":
                    out[field] = cfg.pose_style.render(kp, record.keypoint_format, bucket)
                else:
                    labels = part_label_map(kp, record.keypoint_format, bucket, cfg.pose_style.threshold)
                    out[field] = labels[..., None].astype(np.float32)
            else:
                raise ValueError(f"{record.image} (manifest line {record.line}): no '{field}' for this example")
        return out


def shard_from_jax(options: grain.sharding.ShardOptions | None = None) -> ShardInfo:
    """This host's slice: grain's ShardByJaxProcess (jax.process_index / process_count) by default."""
    options = options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return ShardInfo(options.shard_index, options.shard_count)


def auto_workers(cores: int | None = None) -> int:
    """Worker processes for `num_workers=-1`: one per two cores, at most 16, where the machine has more than 4
    (the training process keeps the rest for the device runtime and the host hooks); none on smaller machines."""
    cores = cores or os.cpu_count() or 1
    return min(16, cores // 2) if cores > 4 else 0


def make_dataset(
    records: Sequence[Record],
    config: DataConfig,
    degradation,
    seed: int,
    shard: ShardInfo | None = None,
    num_workers: int = 0,
    batch_transforms: Sequence = (),
) -> grain.IterDataset:
    """The batched, per-host grain data set. `num_workers` > 0 decodes and degrades in worker processes (-1:
    `auto_workers`). batch_transforms: functions of a batch (dict) -> batch, run after batching, in the workers
    when there are any (caption tokens, a prepare cache's arrays); each must be a pure function of its batch, so
    that the iterator's saved position is all a resume needs."""
    shard = shard or shard_from_jax()
    if num_workers < 0:
        num_workers = auto_workers()
    loader = ExampleLoader(records, config, degradation, seed)
    order = BucketedOrder(loader.buckets, config.batch_size, shard, seed, config.shuffle, config.num_epochs,
                          config.buckets)
    dataset = grain.MapDataset.source(order).map(loader).batch(config.batch_size, drop_remainder=True)
    for transform in batch_transforms:
        dataset = dataset.map(transform)
    dataset = dataset.to_iter_dataset()
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app nobody parsed them
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return dataset
