"""Seconds per training step spent on the annotated-pose hook (`data.pose_source=annotator`): in the training
process, in a pool of annotator processes, and prepared one batch ahead beside the device step.

    python bench/pose_overlap.py --batch 8 --size 512 --workers 2

The hook is the engine's own (`training.annotated_pose.AnnotatedPose`, SwinIR left out: it runs on the device) on
crops of the sample set's two photos. The device step is stood in for by a sleep of --device-s seconds (default:
the hook's own time in one process, where overlapping matters most): a GPU or TPU step holds no host core while
the host waits for it, and a sleep does the same. Rows, seconds per step over --steps steps:

- inline: the hook, then the step (the engine before issue 32: host + device);
- pool: the same with the annotator over --workers processes;
- prefetched: `data.prefetch.Prefetched` with the pool as its `prepare`, as the engine runs it now
  (max(host, device) when the host keeps up).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import load_report, median_time


class _Batches:
    """An endless iterator of the same host batch, with the grain-style state Prefetched asks for."""

    def __init__(self, batch: dict):
        self.batch, self.drawn = batch, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.drawn += 1
        return dict(self.batch)

    def get_state(self) -> dict:
        return {"drawn": self.drawn}

    def set_state(self, state: dict) -> None:
        self.drawn = state["drawn"]


def sample_batch(batch: int, size: int) -> dict:
    from PIL import Image

    from diffbody_jax.data.sample_set import SAMPLES, load_photo

    photos = [load_photo(sample[1]) for sample in SAMPLES]
    crops = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        image = Image.fromarray(photo if photo.dtype == np.uint8 else (np.clip(photo, 0, 1) * 255).astype(np.uint8))
        crop = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
        crops.append(crop[:, ::-1] if i // len(photos) % 2 else crop)  # mirrored every other round: no two alike
    return {"degraded": np.stack(crops)}


def per_step(hook, batch: dict, device_s: float, steps: int, prefetch: bool) -> float:
    from diffbody_jax.data.prefetch import Prefetched

    batches = Prefetched(_Batches(batch), prepare=hook) if prefetch else None
    next(batches) if prefetch else hook(batch)  # warm-up: the pool's workers build their annotators
    start = time.perf_counter()
    for _ in range(steps):
        if prefetch:
            next(batches)
        else:
            hook(batch)
        time.sleep(device_s)  # the device step
    elapsed = (time.perf_counter() - start) / steps
    if prefetch:
        batches.close()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--annotator", default="auto", help="annotator spec (diffbody annotate's)")
    p.add_argument("--batch", type=int, default=8, help="images per host batch (per process)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--device-s", type=float, help="the stand-in device step (default: the inline hook's time)")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    from diffbody_jax.training.annotated_pose import AnnotatedPose

    load_report("before")
    batch = sample_batch(args.batch, args.size)
    inline = AnnotatedPose(args.annotator, None, workers=0)
    pool = AnnotatedPose(args.annotator, None, workers=args.workers)
    try:
        host_inline = median_time(lambda: inline(batch), warmup=1, repeats=args.steps)
        host_pool = median_time(lambda: pool(batch), warmup=1, repeats=args.steps)
        device_s = args.device_s if args.device_s is not None else host_inline
        print(f"# {os.cpu_count()} cores; annotator {args.annotator!r}; batch {args.batch} at {args.size}x{args.size};"
              f" hook {host_inline:.3f} s in one process ({host_inline / args.batch:.3f} s per image), "
              f"{host_pool:.3f} s over {args.workers} workers; device step (a sleep) {device_s:.3f} s")
        print("| host side | seconds per step | against inline |\n|---|---|---|")
        rows = [("inline, one process", inline, False), (f"inline, pool of {args.workers}", pool, False),
                ("prefetched, one process", inline, True), (f"prefetched, pool of {args.workers}", pool, True)]
        base = None
        for name, hook, prefetch in rows:
            seconds = per_step(hook, batch, device_s, args.steps, prefetch)
            base = base or seconds
            print(f"| {name} | {seconds:.3f} | {base / seconds:.2f}x |", flush=True)
        print(f"# bound: max(host, device) = {max(host_pool, device_s):.3f} s with the pool")
    finally:
        inline.close()
        pool.close()
    load_report("after")


if __name__ == "__main__":
    main()
