"""annotators.pool: an annotator over worker processes gives the annotations of the same annotator run in this
process, in the images' order; a bad spec fails when the pool is made, in this process."""

import numpy as np
import pytest

from diffbody_jax.annotators import Annotation, AnnotatorError
from diffbody_jax.annotators.mediapipe_pose import available
from diffbody_jax.annotators.pool import AnnotatorPool


def brightest_pixel(image: np.ndarray) -> Annotation:
    """A picklable stand-in annotator: one person whose 17 joints all sit on the image's brightest pixel."""
    y, x = np.unravel_index(np.argmax(image.sum(-1)), image.shape[:2])
    keypoints = np.tile(np.array([x, y, 1.0], np.float32), (1, 17, 1))
    return Annotation(coco17=keypoints, size=image.shape[:2], backend="brightest-pixel")


def test_workers_give_the_in_process_annotations_in_order(rng):
    images = list(rng.random((6, 24, 32, 3), dtype=np.float32))
    with AnnotatorPool(brightest_pixel, workers=0) as serial, AnnotatorPool(brightest_pixel, workers=2) as pool:
        expected, got = serial.map(images), pool.map(images)
    assert [a.coco17.tolist() for a in got] == [a.coco17.tolist() for a in expected]
    assert len({tuple(a.coco17[0, 0, :2]) for a in got}) > 1  # the images differ, so order is checked


def test_a_bad_spec_or_worker_count_fails_at_once():
    with pytest.raises(AnnotatorError, match="onnx-dwpose.*det"):
        AnnotatorPool("onnx-dwpose", workers=2)
    with pytest.raises(ValueError, match="workers=-1"):
        AnnotatorPool(brightest_pixel, workers=-1)


@pytest.mark.skipif(not available(), reason="mediapipe is not installed (the `annotators` extra)")
def test_mediapipe_from_its_spec_in_a_worker_finds_the_astronaut():
    from skimage import data

    image = data.astronaut().astype(np.float32) / 255
    with AnnotatorPool("mediapipe", workers=1) as pool, AnnotatorPool("mediapipe", workers=0) as serial:
        (got,), (expected,) = pool.map([image]), serial.map([image])
    assert got.num_persons == 1
    np.testing.assert_allclose(got.coco17, expected.coco17, atol=1e-4)
