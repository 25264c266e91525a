"""Manifests: the sample set reads cleanly; every kind of bad line is named with its line number."""

import json

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.data.manifest import ManifestError, read_manifest
from diffbody_jax.data.sample_set import SAMPLES, write_sample_set


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory):
    pytest.importorskip("skimage")
    return write_sample_set(tmp_path_factory.mktemp("sample"))


def test_sample_set_reads(sample_manifest):
    records = read_manifest(sample_manifest, require=("pose",))
    assert [r.size for r in records] == [(512, 512), (512, 512), (512, 352), (300, 512)]
    assert len(records) == len(SAMPLES)
    assert all(r.caption and r.keypoints.shape == (1, 17, 3) for r in records)
    # Crops move the keypoints and zero the score of those that fall outside.
    portrait = records[2].keypoints[0]
    assert portrait[0, 0] == pytest.approx(218 - 80) and portrait[8, 2] == 0.0  # elbow at x=45 < 80


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_every_bad_line_is_named(tmp_path, rng):
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "small_depth.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        {"image": "ok.png", "caption": "fine"},  # 1
        "{not json",  # 2
        {"image": "ok.png"},  # 3 no caption
        {"image": "missing.png", "caption": "x"},  # 4
        {"image": "broken.png", "caption": "x"},  # 5
        {"image": "ok.png", "caption": "x", "depth": "small_depth.png"},  # 6 wrong size
        {"image": "ok.png", "caption": "x", "keypoints": [[1, 2, 3]] * 5},  # 7 wrong keypoint count
        {"image": "ok.png", "caption": "x", "colour": "red"},  # 8 unknown field
        {"image": "ok.png", "caption": "x", "normal": "nope.png"},  # 9 missing map
    ]
    manifest = tmp_path / "train.jsonl"
    _write(manifest, rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    problems = info.value.problems
    text = "\n".join(problems)
    assert not any(":1:" in p for p in problems)
    for line, fragment in [
        (2, "invalid JSON"), (3, "missing 'caption'"), (4, "missing.png': no such file"),
        (5, "broken.png': unreadable"), (6, "size 16x16 (WxH) differs from the image's 48x32"),
        (7, "coco17 needs [17, 3]"), (8, "unknown field(s) ['colour']"), (9, "normal 'nope.png': no such file"),
    ]:
        assert any(p.startswith(f"{manifest}:{line}:") and fragment in p for p in problems), (line, text)


def test_required_maps(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + 7).save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    _write(manifest, [{"image": "a.png", "caption": ""}])
    with pytest.raises(ManifestError, match=r"m.jsonl:1: missing 'depth', which this pipeline requires"):
        read_manifest(manifest, require=("depth",))
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        read_manifest(tmp_path / "none.jsonl")


def test_exif_orientation_is_applied(tmp_path, rng):
    from diffbody_jax.data.pipeline import _load_rgb

    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write portrait shots
    img.save(tmp_path / "phone.jpg", exif=exif)
    manifest = tmp_path / "m.jsonl"
    _write(manifest, [{"image": "phone.jpg", "caption": "portrait"}])
    for decode in (True, False):
        assert read_manifest(manifest, decode=decode)[0].size == (60, 40)
    assert _load_rgb(str(tmp_path / "phone.jpg")).shape == (60, 40, 3)


def test_threads_read_the_same_records_and_problems(tmp_path, rng):
    """workers > 1 validates lines on threads: the same records, in the file's order, and the same problems."""
    rows = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (8 + i, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"c{i}"})
    manifest = tmp_path / "m.jsonl"
    _write(manifest, rows)
    serial, threaded = read_manifest(manifest), read_manifest(manifest, workers=8, decode=False)
    assert [(r.line, r.image, r.size) for r in threaded] == [(r.line, r.image, r.size) for r in serial]
    _write(manifest, [*rows[:5], {"image": "missing.png", "caption": "x"}, *rows[5:], "{bad"])
    errors = []
    for workers in (1, 8):
        with pytest.raises(ManifestError) as info:
            read_manifest(manifest, workers=workers)
        errors.append(info.value.problems)
    assert errors[0] == errors[1] and [p.split(":")[1] for p in errors[0]] == ["6", "42"]
