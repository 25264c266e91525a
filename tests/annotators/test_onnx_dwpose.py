"""The onnx-dwpose backend on two tiny ONNX models this test writes itself (no download): a YOLOX-shaped detector
whose raw grid predictions encode two people's boxes, and a SimCC pose model whose peaks sit at known points of its
crop. The expected keypoints follow from the top-down convention written out here in float64 (box padded by 1.25,
widened to the model's aspect ratio, crop point -> image point), not from the backend's code path."""

import os

import numpy as np
import pytest

from diffbody_jax.annotators import AnnotatorError, get_annotator
from diffbody_jax.annotators.onnx_dwpose import available

onnx = pytest.importorskip("onnx") if os.environ.get("CI") != "true" else __import__("onnx")
pytestmark = pytest.mark.skipif(not available() and os.environ.get("CI") != "true",
                                reason="onnxruntime and rtmlib (the annotators extra) are not installed")

DET = 64  # the detector's square input
POSE_W, POSE_H = 24, 32  # the pose model's input
IMAGE_HW = (96, 128)
BOXES = np.array([[10, 20, 50, 90], [70, 10, 120, 80]], np.float64)  # x1, y1, x2, y2 in image pixels
NOSE_CROP = (12.0, 4.0)  # where the pose model puts the nose in its crop (x, y); every other point at the centre


def _model(inputs, outputs, nodes, initializers, path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(inputs[0], TensorProto.FLOAT, inputs[1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _constant_plus_input(name, value, out):
    """out = value + 0 * mean(input): a model whose output is `value` for any image."""
    from onnx import helper, numpy_helper

    return ([helper.make_node("ReduceMean", ["image"], [f"{name}_m"], keepdims=0),
             helper.make_node("Mul", [f"{name}_m", "zero"], [f"{name}_z"]),
             helper.make_node("Add", [f"{name}_c", f"{name}_z"], [out])],
            [numpy_helper.from_array(value.astype(np.float32), f"{name}_c")])


def _detector(path, ratio):
    from onnx import numpy_helper

    grids = [(s, DET // s) for s in (8, 16, 32)]
    raw = np.zeros((1, sum(n * n for _, n in grids), 85), np.float64)
    for box in BOXES * ratio:  # model-input pixels; both people on stride-8 anchors
        cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
        gx, gy = int(cx // 8), int(cy // 8)
        raw[0, gy * (DET // 8) + gx, :6] = (cx / 8 - gx, cy / 8 - gy, np.log(w / 8), np.log(h / 8), 1.0, 0.95)
    nodes, inits = _constant_plus_input("det", raw, "output")
    inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    return _model(("image", [1, 3, DET, DET]), [("output", list(raw.shape))], nodes, inits, path)


def _pose(path):
    from onnx import numpy_helper

    sx, sy = np.zeros((1, 133, 2 * POSE_W)), np.zeros((1, 133, 2 * POSE_H))
    sx[0, :, POSE_W], sy[0, :, POSE_H] = 0.9, 0.9  # the crop's centre (SimCC bins are half pixels)
    sx[0, 0], sy[0, 0] = 0, 0
    sx[0, 0, int(2 * NOSE_CROP[0])], sy[0, 0, int(2 * NOSE_CROP[1])] = 0.8, 0.8
    sx[0, 16, POSE_W], sy[0, 16, POSE_H] = 0.1, 0.1  # right ankle: below DWPose's 0.3 threshold
    nodes_x, inits_x = _constant_plus_input("sx", sx, "simcc_x")
    nodes_y, inits_y = _constant_plus_input("sy", sy, "simcc_y")
    inits = inits_x + inits_y + [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    return _model(("image", [1, 3, POSE_H, POSE_W]), [("simcc_x", list(sx.shape)), ("simcc_y", list(sy.shape))],
                  nodes_x + nodes_y, inits, path)


def _expected(box):
    """(centre, nose) in image pixels by the top-down convention, float64."""
    center = (box[:2] + box[2:]) / 2
    w, h = (box[2:] - box[:2]) * 1.25
    aspect = POSE_W / POSE_H
    scale = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    nose = center - scale / 2 + np.array(NOSE_CROP) / np.array([POSE_W, POSE_H]) * scale
    return center, nose


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dwpose")
    ratio = min(DET / IMAGE_HW[0], DET / IMAGE_HW[1])
    return str(_detector(folder / "det.onnx", ratio)), str(_pose(folder / "pose.onnx"))


def test_two_people_come_back_as_coco_wholebody_where_the_models_put_them(models, rng):
    annotator = get_annotator("onnx-dwpose", det=models[0], pose=models[1])
    image = rng.uniform(0, 1, (*IMAGE_HW, 3)).astype(np.float32)
    annotation = annotator(image)
    assert annotation.num_persons == 2 and annotation.size == IMAGE_HW and annotation.mask is None
    assert annotation.wholebody.shape == (2, 133, 3) and annotation.hands.shape == (2, 2, 21, 3)
    order = np.argsort(annotation.coco17[:, 5, 0])  # left person first
    for person, box in zip(annotation.wholebody[order], BOXES, strict=True):
        center, nose = _expected(box)
        np.testing.assert_allclose(person[0, :2], nose, atol=0.05)
        np.testing.assert_allclose(person[1:, :2], np.broadcast_to(center, (132, 2)), atol=0.05)
        np.testing.assert_allclose(person[[0, 1, 16], 2], [0.8, 0.9, 0.1], atol=1e-6)
    pose = annotation.pose_map()
    assert pose.shape == (*IMAGE_HW, 3)
    for box in BOXES:  # each person's nose is drawn
        _, nose = _expected(box)
        assert pose[int(nose[1]), int(nose[0])].max() > 0


def test_missing_files_are_named_and_nothing_is_downloaded(models, tmp_path):
    with pytest.raises(AnnotatorError, match="no det file given"):
        get_annotator("onnx-dwpose", pose=models[1])
    with pytest.raises(AnnotatorError, match=r"pose file .*missing\.onnx: no such file"):
        get_annotator("onnx-dwpose", det=models[0], pose=str(tmp_path / "missing.onnx"))


def test_no_detection_is_no_person_and_an_empty_pose_map(models, rng):
    annotator = get_annotator("onnx-dwpose", det=models[0], pose=models[1], score_threshold=0.99)  # boxes score 0.95
    annotation = annotator(rng.uniform(0, 1, (*IMAGE_HW, 3)).astype(np.float32))
    assert annotation.num_persons == 0 and annotation.pose_map().max() == 0
