"""`diffbody annotate`: keypoints JSON, pose map and person mask per photo, from given keypoints (the sample set's)
and from mediapipe (when the `annotators` extra is installed); an unreadable file is named, exit 1."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.annotators.mediapipe_pose import available
from diffbody_jax.cli.main import main
from diffbody_jax.data.sample_set import write_sample_set


def test_annotate_writes_keypoints_pose_maps_and_masks(tmp_path, capsys):
    manifest = write_sample_set(tmp_path / "sample")
    (tmp_path / "sample" / "images" / "broken.png").write_text("not an image")
    rc = main(["annotate", str(tmp_path / "sample" / "images"), "--out", str(tmp_path / "kp"), "--backend",
               "keypoints-file", "--keypoints", str(manifest)])
    assert rc == 1 and "broken.png" in capsys.readouterr().err
    rows = {json.loads(line)["image"].split("/")[-1]: json.loads(line) for line in manifest.read_text().splitlines()}
    for name, row in rows.items():
        stem = name.rsplit(".", 1)[0]
        saved = json.loads((tmp_path / "kp" / f"{stem}.json").read_text())
        np.testing.assert_allclose(np.asarray(saved["keypoints"])[0], np.asarray(row["keypoints"]), atol=0.01)
        assert len(saved["openpose18"][0]) == 18
        pose = np.asarray(Image.open(tmp_path / "kp" / f"{stem}_pose.png"))
        assert pose.shape[:2] == Image.open(tmp_path / "sample" / "images" / name).size[::-1] and pose.max() > 0
    if available():
        assert main(["annotate", str(tmp_path / "sample" / "images" / "astronaut.png"), "--out",
                     str(tmp_path / "mp"), "--backend", "mediapipe"]) == 0
        mask = np.asarray(Image.open(tmp_path / "mp" / "astronaut_mask.png"))
        assert mask.shape[:2] == (512, 512) and 0.1 < (mask[..., 0] > 127).mean() < 0.9


@pytest.mark.skipif(not available() and os.environ.get("CI") != "true",
                    reason="the annotators extra (mediapipe) is not installed")
def test_annotate_manifest_fills_keypoints_and_masks_that_the_pipeline_reads(tmp_path, capsys):
    from diffbody_jax.data.degradations import table1_mixture
    from diffbody_jax.data.manifest import read_manifest
    from diffbody_jax.data.pipeline import DataConfig, ShardInfo, make_dataset

    source = write_sample_set(tmp_path / "sample")
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    hand_written = rows[1]["keypoints"]
    for row in (rows[0], rows[2]):
        del row["keypoints"], row["keypoint_format"]
    Image.fromarray(np.full((96, 128, 3), 128, np.uint8)).save(tmp_path / "sample" / "images" / "grey.png")
    rows.append({"image": "images/grey.png", "caption": "a grey wall"})
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "annotated" / "train.jsonl"
    assert main(["annotate", "--manifest", str(source), "--out", str(out), "--backend", "mediapipe"]) == 0
    captured = capsys.readouterr()
    assert "grey.png: no person found" in captured.err and "2 annotated, 2 kept" in captured.out
    filled = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in filled] == [r["caption"] for r in rows]
    assert filled[1]["keypoints"] == hand_written  # kept without --replace
    assert filled[4]["keypoints"] == []  # no person: an explicit empty list, which the data pipeline draws empty
    astronaut = np.asarray(filled[0]["keypoints"], np.float32)[0]
    mask = np.asarray(Image.open(out.parent / filled[0]["mask"]), np.float32) / 255.0
    assert mask.shape == (512, 512)
    nose, shoulders = astronaut[0], astronaut[5:7]
    for x, y, _ in (nose, *shoulders):  # the annotated joints lie on the annotated person
        assert mask[int(y), int(x)] > 0.5
    records = read_manifest(out)
    assert all(Path(r.maps["mask"]).is_file() for r in records)

    assert main(["annotate", "--manifest", str(source), "--out", str(out), "--backend", "mediapipe",
                 "--replace"]) == 0
    assert json.loads(out.read_text().splitlines()[1])["keypoints"] != hand_written

    astronauts = [r for r in records if Path(r.image).stem == "astronaut"]
    loader = make_dataset(astronauts, DataConfig(batch_size=1, buckets=((64, 64),), maps=("pose", "mask")),
                          table1_mixture("blur2-noise20-down4-jpeg50"), seed=0, shard=ShardInfo())
    batch = next(iter(loader))
    assert batch["mask"].shape == (1, 64, 64, 1) and 0.1 < batch["mask"].mean() < 0.9
    grey = [r for r in records if Path(r.image).stem == "grey"]
    assert grey[0].keypoints.shape == (0, 17, 3)
    loader = make_dataset(grey, DataConfig(batch_size=1, buckets=((64, 64),), maps=("pose",)),
                          table1_mixture("blur2-noise20-down4-jpeg50"), seed=0, shard=ShardInfo())
    assert next(iter(loader))["pose"].max() == 0  # the no-person line gives the empty pose map
