"""`diffbody annotate`: keypoints JSON, pose map and person mask per photo, from given keypoints (the sample set's)
and from mediapipe (when the `annotators` extra is installed); an unreadable file is named, exit 1."""

import json

import numpy as np
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
