"""The mediapipe backend (the `annotators` extra) on scikit-image's astronaut photo: the nose and shoulders land
inside the person mask, the nose in the upper half above the shoulders, the hips in the lower half (inside the
mask where they are in the image), left and right as COCO defines them (the person's own); flat grey has no
person; several sizes run."""

import warnings

import numpy as np
import pytest

from diffbody_jax.annotators import annotate
from diffbody_jax.annotators.mediapipe_pose import available

pytestmark = pytest.mark.skipif(not available(), reason="mediapipe is not installed (the `annotators` extra; "
                                                        "./dev installs it)")


def test_astronaut_joints_land_where_they_belong():
    from skimage import data

    image = data.astronaut()
    a = annotate(image, "mediapipe")
    h, w = a.size
    assert a.num_persons == 1 and (h, w) == image.shape[:2] and a.mask.shape == (h, w)
    joints = {name: a.coco17[0, i] for i, name in ((0, "nose"), (5, "left_shoulder"), (6, "right_shoulder"),
                                                    (11, "left_hip"), (12, "right_hip"))}
    for name in ("nose", "left_shoulder", "right_shoulder"):
        x, y, conf = joints[name]
        assert conf > 0.5 and a.mask[int(y), int(x)] > 0.5, (name, joints[name])
    # a portrait: the nose in the upper half, the shoulders below it (at about mid-height here), the hips lower
    assert joints["nose"][1] < h / 2
    assert joints["nose"][1] < min(joints["left_shoulder"][1], joints["right_shoulder"][1])
    for name in ("left_hip", "right_hip"):
        x, y, _ = joints[name]
        assert y > h / 2, (name, joints[name])
        if 0 <= x < w and 0 <= y < h:
            assert a.mask[int(y), int(x)] > 0.5, (name, joints[name])
    # the person faces the camera: their left shoulder is on the image's right
    assert joints["left_shoulder"][0] > joints["nose"][0] > joints["right_shoulder"][0]
    assert a.pose_map().shape == (h, w, 3) and a.pose_map().max() > 0


def test_flat_grey_has_no_person_and_several_sizes_run():
    with pytest.warns(UserWarning, match="no person found"):
        grey = annotate(np.full((200, 160, 3), 0.5, np.float32), "mediapipe")
    assert grey.num_persons == 0 and grey.pose_map().max() == 0
    from skimage import data

    photo = data.astronaut()
    for size in ((300, 200), (128, 256), (512, 384)):
        from PIL import Image

        resized = np.asarray(Image.fromarray(photo).resize(size[::-1]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = annotate(resized, "mediapipe")
        assert a.size == size and (a.mask is None or a.mask.shape == size)


def test_hands_asked_for_run_and_keep_the_layout():
    from skimage import data

    a = annotate(data.astronaut(), "mediapipe", hands=True)
    assert a.num_persons == 1 and a.hands.shape == (1, 2, 21, 3)  # (her gloved hands are not found: zeros)
    keypoints, fmt = a.keypoints
    assert fmt == "wholebody133" and np.array_equal(keypoints[:, :17], a.coco17)
