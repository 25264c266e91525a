"""`diffbody prepare`'s memory against the data set's size: the sample set and copies of it K times over.

    python bench/prepare_memory.py                       # tiny v1 at 512 x 512, copies 1 and 10, shards of 4 MiB
    python bench/prepare_memory.py --copies 1,10,30 --shard-mib 4

Each row is one child process running `training.prepare.prepare_cache` on the manifest written K times over (each
copy's lines are records of their own), reporting the records, the cache written (MiB on disk, shards), the most
the shard writer held at once and the child's peak RSS. The last row repeats the largest K with one shard as large
as the whole cache: what holding everything until the end costs, so the same measurement shows what bounded shards
save. (tracemalloc would count every numpy allocation, but it slowed the degradations tenfold.) Slow at 512: the
tiny VAE's latents are 1/2 of the image, so its mid-block attention spans 65,536 positions, about a minute of CPU per
record on a 2-core VM; `--size 256` is sixteen times cheaper there. Results: docs/training.md, "The prepare cache".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare_once(copies: int, shard_bytes: int, size: int) -> dict:
    sys.path.insert(0, str(REPO))
    from diffbody_jax.config import load_config
    from diffbody_jax.data.sample_set import write_sample_set
    from diffbody_jax.training import prepare

    writers = []

    class Recorded(prepare._ShardWriter):  # the writer prepare_cache makes, kept to read its peak
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    prepare._ShardWriter = Recorded

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = write_sample_set(tmp / "sample").read_text().splitlines()
        manifest = tmp / "sample" / "copies.jsonl"  # beside the images its paths name
        manifest.write_text("\n".join(lines * copies) + "\n")  # a record is its line: each copy is one more
        config = load_config("v1_controlnet:variant=tiny", [
            f"data.manifest={manifest}", "data.random_crop=False", "data.batch_size=2",
            f"data.buckets=[[{size}, {size}]]"])
        start = time.perf_counter()
        prepare.prepare_cache(config, tmp / "cache", shard_bytes=shard_bytes)
        seconds = time.perf_counter() - start
        files = list((tmp / "cache").glob("shard-*.npz"))
        return {"copies": copies, "records": copies * len(lines), "shard_mib": shard_bytes / 2**20,
                "cache_mib": sum(f.stat().st_size for f in files) / 2**20, "shards": len(files),
                "held_peak_mib": writers[0].peak_bytes / 2**20, "seconds": seconds,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", default="1,10")
    p.add_argument("--shard-mib", type=float, default=4.0)
    p.add_argument("--size", type=int, default=512, help="the one bucket, size x size pixels")
    p.add_argument("--child", help=argparse.SUPPRESS)  # "copies,shard_bytes"
    args = p.parse_args()
    if args.child:
        copies, shard_bytes = (int(x) for x in args.child.split(","))
        print("ROW " + json.dumps(prepare_once(copies, shard_bytes, args.size)), flush=True)
        return
    copies = [int(x) for x in args.copies.split(",")]
    runs = [(k, int(args.shard_mib * 2**20)) for k in copies] + [(copies[-1], 2**40)]
    print("| copies | records | shard bound MiB | cache MiB | shards | writer's peak MiB | peak RSS MiB | s |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for k, shard_bytes in runs:
        proc = subprocess.run([sys.executable, __file__, "--child", f"{k},{shard_bytes}", "--size", str(args.size)],
                              capture_output=True, text=True, cwd=REPO)
        rows = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not rows:
            print(f"| {k} | failed: {proc.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        r = json.loads(rows[-1][4:])
        bound = "none (one shard)" if shard_bytes == 2**40 else f"{r['shard_mib']:g}"
        print(f"| {k} | {r['records']} | {bound} | {r['cache_mib']:.1f} | {r['shards']} | "
              f"{r['held_peak_mib']:.1f} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
