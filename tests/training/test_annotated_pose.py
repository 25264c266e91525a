"""data.pose_source=annotator: each step's pose maps come from an annotator on I_reg = clip(SwinIR(degraded)).

The hook's annotator sees exactly the regressed images (checked against the SwinIR module applied directly) and the
pose map is drawn where the annotator put the joints; a config with the switch builds the hook (mediapipe), a
manifest-pose config builds none, and a bad value names the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.annotators import Annotation, AnnotatorError
from diffbody_jax.annotators.mediapipe_pose import available
from diffbody_jax.config import load_config
from diffbody_jax.models.group import ModelGroup
from diffbody_jax.models.registry import build_model
from diffbody_jax.training.annotated_pose import AnnotatedPose, annotated_pose_hook, swinir_regressor


def _swinir_group():
    swinir = build_model(load_config("swinir:variant=tiny-diffbir").model)
    return ModelGroup(swinir=swinir), {"swinir": swinir.init_params(jax.random.key(3))}


def test_the_annotator_sees_i_reg_and_the_map_is_drawn_at_its_joints(rng):
    group, frozen = _swinir_group()
    degraded = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    seen = []
    joints = np.zeros((1, 17, 3), np.float32)
    joints[0, 5], joints[0, 6] = (20, 30, 0.9), (44, 30, 0.9)  # two shoulders, the rest invisible

    def annotator(image):
        seen.append(np.array(image))
        return Annotation(joints, image.shape[:2], backend="test")

    hook = AnnotatedPose(annotator, swinir_regressor(group, frozen))
    batch = hook({"degraded": degraded, "caption": ["a", "b"]})
    i_reg = np.clip(np.asarray(group.swinir.apply({"params": frozen["swinir"]}, jnp.asarray(degraded))), 0, 1)
    np.testing.assert_allclose(np.stack(seen), i_reg, atol=1e-5)
    pose = batch["pose"]
    assert pose.shape == (2, 64, 64, 3) and pose.dtype == np.float32 and batch["caption"] == ["a", "b"]
    for x, y in ((20, 30), (44, 30), (32, 30)):  # both shoulders and the limb between them are drawn
        assert pose[0, y, x].max() > 0.2, (x, y)
    assert pose[0, :15].max() == 0 and pose[0, 45:].max() == 0  # nothing far from them


def test_the_config_switch_builds_the_hook_and_refuses_bad_values():
    group, frozen = _swinir_group()
    config = load_config("v1_controlnet:variant=tiny")
    assert annotated_pose_hook(config, group, frozen) is None  # manifest poses: no hook
    with pytest.raises(ValueError, match="data.pose_source='keypoints'"):
        annotated_pose_hook(load_config("v1_controlnet:variant=tiny", ["data.pose_source='keypoints'"]), group, frozen)
    with pytest.raises(AnnotatorError, match="onnx-dwpose.*det"):
        annotated_pose_hook(load_config("v1_controlnet:variant=tiny", ["data.pose_source='annotator'",
                                                                        "data.annotator='onnx-dwpose'"]), group, frozen)
    if available():
        hook = annotated_pose_hook(load_config("v1_controlnet:variant=tiny", ["data.pose_source='annotator'"]),
                                   group, frozen)
        assert hook.regress is not None and hook.source == "degraded"
        from skimage import data

        out = hook({"degraded": data.astronaut()[None].astype(np.float32) / 255})
        assert out["pose"].shape == (1, 512, 512, 3)  # random SwinIR weights: whatever it finds is drawn


def test_attention_from_a_map_needs_the_map_in_data_maps():
    from diffbody_jax.training.phases import v1_switches

    with pytest.raises(ValueError, match="diffusion.attention=mask reads the data's 'mask' map: add it to data.maps"):
        v1_switches(load_config("v1_controlnet:variant=tiny", ["diffusion.attention='mask'"]))
    switches = v1_switches(load_config("v1_controlnet:variant=tiny", ["diffusion.attention='mask'",
                                                                         "data.maps=['pose', 'mask']"]))
    assert switches["attention"] == "mask"


@pytest.mark.slow  # ~2 minutes on 2 cold cores (the v1 step compiles)
@pytest.mark.skipif(not available(), reason="the annotators extra (mediapipe) is not installed")
def test_a_v1_run_with_annotated_pose_and_mask_attention(tmp_path):
    from diffbody_jax.annotators import default_annotator
    from diffbody_jax.data.sample_set import write_sample_set
    from diffbody_jax.training.engine import train

    manifest = write_sample_set(tmp_path / "sample", annotator=default_annotator())
    config = load_config("v1_controlnet:variant=tiny", [
        f"data.manifest={manifest}", "train.steps=2", "checkpoint.every=2", "data.maps=['pose', 'mask']",
        "data.pose_source='annotator'", "diffusion.attention='mask'"])
    result = train(config, tmp_path / "run")
    assert np.isfinite(result.metrics["loss"]) and 0 < result.metrics["attention_mean"] < 1
