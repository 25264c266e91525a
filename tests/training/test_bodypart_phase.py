"""The body-part phase (configs/bodypart.py): the loss is label-smoothed cross-entropy at the pixel classifier's
resolution (float64 numpy), and a tiny run on the sample set's keypoint-drawn labels learns them and exports a
network `load_pretrained` reads back."""

import json

import jax
import numpy as np

from diffbody_jax.config import load_config
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.interop.pretrained import load_pretrained
from diffbody_jax.models.bodypart import BodyPartNet, preprocess
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.variables import random_variables
from diffbody_jax.training.engine import train
from diffbody_jax.training.losses import body_part_loss


def test_loss_is_smoothed_cross_entropy_at_the_classifier_resolution(rng):
    net = build_model(load_config("bodypart:variant=tiny").model)
    variables = random_variables(net, seed=int(rng.integers(1 << 30)))
    images = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    labels = rng.integers(0, 6, (2, 64, 64, 1)).astype(np.float32)
    eps = 0.1
    loss, metrics = jax.jit(lambda v, x, y: body_part_loss(net, v, x, y, label_smoothing=eps))(variables, images,
                                                                                              labels)
    probs = np.asarray(net.apply(variables, preprocess(images, net.config)).part_probs, np.float64)  # [2, 16, 8, 6]
    b, h, w, k = probs.shape
    rows = ((np.arange(h) + 0.5) * 64 / h).astype(int)  # nearest sampling at the classifier's pixel centres
    cols = ((np.arange(w) + 0.5) * 64 / w).astype(int)
    target = labels[:, rows][:, :, cols, 0].astype(int)
    smoothed = (1 - eps) * np.eye(k)[target] + eps / k
    want = -np.mean(np.sum(smoothed * np.log(probs), axis=-1))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["pixel_accuracy"]), np.mean(probs.argmax(-1) == target), atol=1e-6)


def test_a_tiny_run_learns_the_part_labels_and_exports_the_network(tmp_path):
    manifest = write_sample_set(tmp_path / "sample")
    config = load_config("bodypart:variant=tiny", [f"data.manifest={manifest}", "train.steps=60", "train.log_every=1",
                                                   "data.batch_size=4", "checkpoint.every=60",
                                                   "data.degradation=blur2-noise40"])
    result = train(config, tmp_path / "bodypart")
    rows = [json.loads(line) for line in (tmp_path / "bodypart" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.7 * first, (first, last)
    assert np.mean([r["foreground_iou"] for r in rows[-5:]]) > np.mean([r["foreground_iou"] for r in rows[:5]])
    module, variables = load_pretrained(result.export)
    assert isinstance(module, BodyPartNet) and set(variables) == {"params", "batch_stats"}
