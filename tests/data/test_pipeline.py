"""The grain pipeline: buckets, crops, maps, determinism, exact resume, per-host slices."""

import json

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.data import degradations as deg
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.pipeline import (
    PAPER_BUCKETS,
    DataConfig,
    ShardInfo,
    cover_and_crop,
    make_dataset,
    nearest_bucket,
)

SMALL_BUCKETS = ((32, 32), (48, 32), (32, 48), (64, 32), (32, 64))  # the paper's ratios at 1/16 size


def test_nearest_bucket_by_aspect_ratio():
    assert PAPER_BUCKETS[nearest_bucket((1000, 1000), PAPER_BUCKETS)] == (512, 512)
    assert PAPER_BUCKETS[nearest_bucket((900, 600), PAPER_BUCKETS)] == (768, 512)  # portrait 3:2
    assert PAPER_BUCKETS[nearest_bucket((600, 900), PAPER_BUCKETS)] == (512, 768)  # landscape
    assert PAPER_BUCKETS[nearest_bucket((2000, 900), PAPER_BUCKETS)] == (1024, 512)
    assert PAPER_BUCKETS[nearest_bucket((300, 800), PAPER_BUCKETS)] == (512, 1024)


def test_cover_and_crop():
    resized, (top, left) = cover_and_crop((300, 512), (512, 768), None)
    assert resized[0] >= 512 and resized[1] >= 768 and min(resized[0] - 512, resized[1] - 768) == 0
    assert (top, left) == ((resized[0] - 512) // 2, (resized[1] - 768) // 2)
    for seed in range(5):
        resized, (top, left) = cover_and_crop((100, 37), (48, 32), np.random.default_rng(seed))
        assert 0 <= top <= resized[0] - 48 and 0 <= left <= resized[1] - 32


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    """24 random images in three aspect ratios, each with depth, normal, attention maps and keypoints."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        h, w = [(40, 40), (60, 40), (40, 60)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(root / f"{i}_d.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}_n.png")
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(root / f"{i}_a.png")
        kp = np.concatenate([rng.uniform(0, min(h, w), (17, 2)), np.full((17, 1), 0.9)], 1)
        rows.append({"image": f"{i}.png", "caption": f"person {i}", "depth": f"{i}_d.png",
                     "normal": f"{i}_n.png", "attention": f"{i}_a.png", "keypoints": kp.tolist()})
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_manifest(path)


def _config(**kw):
    fields = dict(batch_size=2, buckets=SMALL_BUCKETS, maps=("pose", "depth", "normal", "attention"))
    return DataConfig(**{**fields, **kw})


MIX = deg.table1_mixture("blur2-noise20-down4-jpeg50")


ONE_HOST = ShardInfo()


def _take(records, n, config=None, shard=ONE_HOST, seed=0, state=None, workers=0):
    it = iter(make_dataset(records, config or _config(), MIX, seed, shard, workers))
    if state is not None:
        it.set_state(state)
    return [next(it) for _ in range(n)], it


def test_batches_are_bucketed_and_shaped(toy_manifest):
    batches, _ = _take(toy_manifest, 12)
    buckets_seen = set()
    for b in batches:
        bucket = int(b["bucket"][0])
        assert (b["bucket"] == bucket).all()
        h, w = SMALL_BUCKETS[bucket]
        buckets_seen.add(bucket)
        assert b["target"].shape == b["degraded"].shape == b["pose"].shape == b["normal"].shape == (2, h, w, 3)
        assert b["depth"].shape == b["attention"].shape == (2, h, w, 1)
        assert b["low_res"].shape == (2, h // 4, w // 4, 3)
        assert b["target"].dtype == np.float32
        assert b["pose"].max() > 0  # rendered from the keypoints
        assert list(b["caption"]) == [f"person {r}" for r in b["record"]]
        np.testing.assert_array_equal(b["original_size"][:, 0] / b["original_size"][:, 1], (h / w, h / w))
    assert buckets_seen == {0, 1, 2}
    # One epoch (12 batches of 2 from 3 buckets of 8) shows every record exactly once.
    assert sorted(np.concatenate([b["record"] for b in batches])) == list(range(24))


def test_same_seed_same_batches_other_seed_differs(toy_manifest):
    a, _ = _take(toy_manifest, 3)
    b, _ = _take(toy_manifest, 3)
    c, _ = _take(toy_manifest, 3, seed=1)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x["record"], z["record"]) for x, z in zip(a, c, strict=True))


def test_resume_from_state_is_exact(toy_manifest):
    """Stop mid-way (into the second epoch), restore the state in a fresh pipeline: identical batches."""
    full, _ = _take(toy_manifest, 16)
    _, it = _take(toy_manifest, 13)
    state = it.get_state()
    resumed, _ = _take(toy_manifest, 3, state=state)
    for x, y in zip(full[13:], resumed, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert int(full[13]["epoch"][0]) == 1
    # The second epoch sees the records in another order with other crops and degradations.
    assert not np.array_equal(np.concatenate([b["record"] for b in full[12:16]]),
                              np.concatenate([b["record"] for b in full[:4]]))


def test_hosts_share_the_bucket_and_split_the_global_batch(toy_manifest):
    single, _ = _take(toy_manifest, 6, _config(batch_size=4))
    host0, _ = _take(toy_manifest, 6, shard=ShardInfo(0, 2))
    host1, _ = _take(toy_manifest, 6, shard=ShardInfo(1, 2))
    for g, a, b in zip(single, host0, host1, strict=True):
        assert (a["bucket"] == g["bucket"][0]).all() and (b["bucket"] == g["bucket"][0]).all()
        np.testing.assert_array_equal(np.concatenate([a["record"], b["record"]]), g["record"])
        np.testing.assert_array_equal(np.concatenate([a["target"], b["target"]]), g["target"])


def test_too_few_examples_for_a_batch(toy_manifest):
    with pytest.raises(ValueError, match=r"no bucket holds a global batch of 20 examples \(32x32: 8"):
        make_dataset(toy_manifest, _config(batch_size=10), MIX, 0, ShardInfo(0, 2))


def test_worker_processes_give_the_same_batches(toy_manifest):
    a, _ = _take(toy_manifest, 4)
    b, it = _take(toy_manifest, 4, workers=2)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["degraded"], y["degraded"])
    del it


def _centroid(image):
    w = np.asarray(image, np.float64).reshape(image.shape[0], image.shape[1], -1).sum(-1)
    ys, xs = np.mgrid[0:w.shape[0], 0:w.shape[1]]
    return np.array([(w * ys).sum(), (w * xs).sum()]) / w.sum()


def test_maps_and_keypoints_follow_the_crop_and_resize(tmp_path):
    """A marker disc drawn at a keypoint in the image, the depth and the attention map lands, in every output,
    where the resize-then-crop formula written here puts the keypoint; the pose map drawn from the keypoints
    puts its joint there too. Several epochs give several random crops."""
    from PIL import ImageDraw

    h, w, y, x, r = 72, 60, 40.0, 30.0, 5  # aspect 1.2 -> the 32x32 bucket: resized to 38x32, crop rows vary
    for name, mode in (("img.png", "RGB"), ("depth.png", "L"), ("attn.png", "L")):
        im = Image.new(mode, (w, h), 0)
        ImageDraw.Draw(im).ellipse([x - r, y - r, x + r, y + r], fill="white" if mode == "RGB" else 255)
        im.save(tmp_path / name)
    keypoints = np.zeros((17, 3))
    keypoints[0] = (x, y, 0.9)  # the nose alone is confident: the pose map is one joint disc
    row = {"image": "img.png", "caption": "marker", "depth": "depth.png", "attention": "attn.png",
           "keypoints": keypoints.tolist()}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    records = read_manifest(tmp_path / "m.jsonl")
    config = _config(batch_size=1, maps=("pose", "depth", "attention"))
    batches, _ = _take(records, 6, config)
    cover = max(32 / h, 32 / w)  # the cover resize keeps the aspect ratio, rounded to whole pixels
    scale = (round(h * cover) / h, round(w * cover) / w)
    tops = set()
    for b in batches:
        top, left = (int(v) for v in b["crop_top_left"][0])
        tops.add(top)
        want = np.array([(y + 0.5) * scale[0] - 0.5 - top, (x + 0.5) * scale[1] - 0.5 - left])
        for field in ("target", "depth", "attention", "pose"):
            got = _centroid(b[field][0])
            # resampled maps: sub-pixel; the pose joint is drawn at int(x), int(y) as DWPose draws: within 1 px
            assert np.abs(got - want).max() <= (1.0 if field == "pose" else 0.5), (field, got, want, top, left)
    assert len(tops) >= 2, tops


def test_colour_permutation_reorders_the_clean_channels_and_nothing_else(toy_manifest):
    plain, _ = _take(toy_manifest, 12)
    permuted, _ = _take(toy_manifest, 12, config=_config(colour_permutation=True))
    orders = set()
    for a, b in zip(plain, permuted, strict=True):
        np.testing.assert_array_equal(a["record"], b["record"])
        np.testing.assert_array_equal(a["depth"], b["depth"])  # maps are not permuted
        for x, y in zip(a["target"], b["target"], strict=True):
            order = [next(c for c in range(3) if np.array_equal(y[..., k], x[..., c])) for k in range(3)]
            assert sorted(order) == [0, 1, 2]
            orders.add(tuple(order))
    assert len(orders) >= 4, orders  # 24 draws of six orders


def test_a_record_that_fails_to_load_when_drawn_is_skipped_counted_and_logged(toy_manifest, tmp_path, caplog):
    """A file truncated after the manifest was read (headers only, as training reads it) is passed over: its slot
    takes the next record of its bucket, `skipped` counts it, a warning names it; every batch keeps its shape, and
    a resumed pipeline still draws what an uninterrupted one draws."""
    import dataclasses
    import shutil

    bad = toy_manifest[3]  # bucket of 40 x 40 photos, with records 0, 3, 6, ...
    copy = tmp_path / "3.png"
    shutil.copy(bad.image, copy)
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) // 2])  # a truncated PNG: the header reads, the pixels do not
    records = [dataclasses.replace(r, image=str(copy)) if r.line == bad.line else r for r in toy_manifest]
    with caplog.at_level("WARNING", logger="diffbody_jax.data.pipeline"):
        batches, _ = _take(records, 12)
    seen = np.concatenate([b["record"] for b in batches])
    skipped = np.concatenate([b["skipped"] for b in batches])
    assert 3 not in seen and skipped.sum() == 1 and len(seen) == 24
    slot = int(np.flatnonzero(skipped)[0])
    assert seen[slot] == 6  # the next record of its bucket
    assert any("3.png" in r.message and "skipped" in r.message for r in caplog.records)
    for b in batches:
        assert b["target"].shape[0] == 2 and (b["bucket"] == b["bucket"][0]).all()
    full, _ = _take(records, 16)
    _, it = _take(records, 13)
    resumed, _ = _take(records, 3, state=it.get_state())
    for x, y in zip(full[13:], resumed, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_auto_workers_use_spare_cores_only():
    from diffbody_jax.data.pipeline import auto_workers

    assert [auto_workers(c) for c in (1, 2, 4, 6, 8, 64, 224)] == [0, 0, 0, 3, 4, 16, 16]


class _RecordSquares:
    """A batch transform (as caption tokens and a prepare cache are): a pure function of the batch, picklable."""

    def __call__(self, batch):
        return {**batch, "squares": np.asarray(batch["record"], np.int64) ** 2}


def test_batch_transforms_run_in_the_workers_and_resume_with_the_iterator(toy_manifest):
    """A batch transform gives the same batches in worker processes as in this one, and a pipeline resumed from a
    saved position (with workers) continues exactly."""
    config = _config()
    one = iter(make_dataset(toy_manifest, config, MIX, 0, ONE_HOST, 0, [_RecordSquares()]))
    serial = [next(one) for _ in range(6)]
    it = iter(make_dataset(toy_manifest, config, MIX, 0, ONE_HOST, 2, [_RecordSquares()]))
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    del it
    resumed = iter(make_dataset(toy_manifest, config, MIX, 0, ONE_HOST, 2, [_RecordSquares()]))
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(3)]
    for x, y in zip(serial, first + rest, strict=True):
        np.testing.assert_array_equal(x["squares"], np.asarray(x["record"], np.int64) ** 2)
        for key in ("squares", "record", "degraded"):
            np.testing.assert_array_equal(x[key], y[key])
    del resumed
