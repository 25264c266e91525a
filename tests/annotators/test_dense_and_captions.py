"""Depth and normal estimators on tiny ONNX models this test writes (1x1 convolutions with known weights), against
the same maps computed in float64 numpy from the module docstring's recipe; a tiny BLIP captioner saved to a local
folder whose language-model bias forces one word; `diffbody annotate --manifest` with all three fills a manifest
that validates. Missing files are named."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.annotators import AnnotatorError
from diffbody_jax.annotators.dense import DepthEstimator, NormalEstimator
from diffbody_jax.cli.main import main
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.sample_set import write_sample_set

IN_CI = os.environ.get("CI") == "true"
onnx = __import__("onnx") if IN_CI else pytest.importorskip("onnx")
if not IN_CI:
    pytest.importorskip("onnxruntime")


def _conv_model(path, weight, bias, hw, sigmoid=False):
    from onnx import TensorProto, helper, numpy_helper

    out_ch = weight.shape[0]
    dims = [1, 3, *hw] if hw else ["n", 3, "h", "w"]
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["conv" if sigmoid else "out"], kernel_shape=[1, 1])]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["conv"], ["out"]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, out_ch, *(hw or ["h", "w"])])],
        [numpy_helper.from_array(weight.reshape(out_ch, 3, 1, 1).astype(np.float32), "w"),
         numpy_helper.from_array(bias.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_depth_is_the_min_max_scaled_model_output(tmp_path, rng):
    w, b = rng.normal(size=(1, 3)), rng.normal(size=(1,))
    model = _conv_model(tmp_path / "depth.onnx", w, b, (16, 20))
    image = rng.uniform(0, 1, (16, 20, 3))
    x = (image - 0.5) / 0.5
    d = x @ w[0] + b[0]
    want = (d - d.min()) / (d.max() - d.min())
    got = DepthEstimator(model)(image.astype(np.float32))
    np.testing.assert_allclose(got, want, atol=1e-5)

    ramp = np.zeros((48, 60, 3), np.float32)
    ramp[..., 0] = np.linspace(0, 1, 60)[None]
    red = _conv_model(tmp_path / "red.onnx", np.array([[1.0, 0, 0]]), np.zeros(1), (16, 20))
    depth = DepthEstimator(red)(ramp)  # resized in and out: the image's size, still a ramp from 0 to 1
    assert depth.shape == (48, 60) and depth.min() == 0 and abs(depth.max() - 1) < 1e-6
    assert (np.diff(depth, axis=1) >= -1e-6).all() and np.ptp(depth, axis=0).max() < 1e-6


def test_normals_are_the_model_output_in_unit_range_at_any_size(tmp_path, rng):
    w, b = rng.normal(size=(3, 3)), rng.normal(size=(3,))
    image = rng.uniform(0, 1, (16, 20, 3))
    want = 1 / (1 + np.exp(-(image @ w.T + b)))
    fixed = NormalEstimator(_conv_model(tmp_path / "n.onnx", w, b, (16, 20), sigmoid=True))
    np.testing.assert_allclose(fixed(image.astype(np.float32)), want, atol=1e-5)
    dynamic = NormalEstimator(_conv_model(tmp_path / "nd.onnx", w, b, None, sigmoid=True), input_size=(8, 10))
    out = dynamic(rng.uniform(0, 1, (30, 44, 3)).astype(np.float32))
    assert out.shape == (30, 44, 3) and out.dtype == np.float32 and 0 < out.min() and out.max() < 1
    signed = NormalEstimator(_conv_model(tmp_path / "s.onnx", np.eye(3), np.zeros(3), (16, 20)), signed=True,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(signed(image.astype(np.float32)), image, atol=1e-5)  # [-1, 1] -> (n + 1) / 2


def test_missing_model_files_are_named(tmp_path):
    with pytest.raises(AnnotatorError, match=r"depth model .*nope\.onnx: no such file"):
        DepthEstimator(tmp_path / "nope.onnx")
    from diffbody_jax.annotators.caption import Captioner

    with pytest.raises(AnnotatorError, match="captioner .*: no config.json"):
        Captioner(tmp_path)


def _tiny_blip(folder):
    """A 1-layer BLIP whose language-model bias makes "person" the only word it says."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "person", "wall"]
    tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, encoder_hidden_size=32, bos_token_id=2, sep_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8))
    model = transformers.BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[vocab.index("person")] = 100.0
    image_processor = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32})
    transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


def test_annotate_manifest_adds_depth_normals_and_captions(tmp_path, rng, capsys):
    from diffbody_jax.annotators.caption import Captioner

    blip = _tiny_blip(tmp_path / "blip")
    assert Captioner(blip, max_new_tokens=3)(rng.uniform(0, 1, (40, 30, 3))) == "person person person"
    source = write_sample_set(tmp_path / "sample")
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rows[0]["caption"] = ""
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    depth = _conv_model(tmp_path / "depth.onnx", rng.normal(size=(1, 3)), rng.normal(size=(1,)), (16, 16))
    normal = _conv_model(tmp_path / "normal.onnx", rng.normal(size=(3, 3)), rng.normal(size=(3,)), (16, 16), True)
    out = tmp_path / "filled" / "train.jsonl"
    assert main(["annotate", "--manifest", str(source), "--out", str(out), "--backend", "none", "--depth", depth,
                 "--normal", normal, "--captioner", blip]) == 0
    assert "8 depth/normal map(s), 1 caption(s)" in capsys.readouterr().out
    filled = [json.loads(line) for line in out.read_text().splitlines()]
    assert filled[0]["caption"].startswith("person") and filled[1]["caption"] == rows[1]["caption"]
    assert filled[0]["keypoints"] == rows[0]["keypoints"]  # --backend none: keypoints untouched
    for record in read_manifest(out):  # validates: every map has its image's size
        assert Image.open(record.maps["depth"]).mode == "L" and Image.open(record.maps["normal"]).mode == "RGB"
