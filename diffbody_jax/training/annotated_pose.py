"""Pose maps drawn during training from an annotator on I_reg, instead of the manifest's keypoints.

With `data.pose_source = "annotator"` every step's batch gets `pose` [B, H, W, 3] in [0, 1]: the annotator's
keypoints on I_reg = clip(SwinIR(degraded), 0, 1) (the papers annotate the regressed image: DWPose(I_reg) in seed
000, MMPose(I_ir) in seed 002), drawn by `data.pose.render_pose` with the data pipeline's threshold, hands and face.
Phases without a SwinIR member (the joint UNet of stage 1 trains on clean images) annotate the clean target.

The annotators are host programs (mediapipe, onnxruntime), so this is a host hook: SwinIR runs jitted on this
process's first local device with its frozen params copied there once, the annotator on the host, over
`data.pose_workers` processes (`annotators.pool`). It costs one SwinIR forward and B annotator calls per step, which
the engine runs one step ahead, beside the device's step (`data.prefetch`); the manifest's keypoints (`diffbody
annotate --manifest`) cost none.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffbody_jax.annotators.pool import AnnotatorPool
from diffbody_jax.data.pipeline import auto_workers
from diffbody_jax.data.pose import PoseStyle
from diffbody_jax.models.swinir import swinir_regress

POSE_SOURCES = ("manifest", "annotator")


class AnnotatedPose:
    """Host hook: batch -> batch with `pose` drawn from `annotator` on `regress(batch[source])`.

    annotator: a spec ("backend[:key=value,...]") or a callable image -> Annotation (picklable when workers > 0);
    workers: annotator processes (0: in this process). Call `close()` to stop them.
    """

    def __init__(self, annotator, regress: Callable[[np.ndarray], np.ndarray] | None, *, source: str = "degraded",
                 style: PoseStyle = PoseStyle(), workers: int = 0):
        self.annotators = AnnotatorPool(annotator, workers)
        self.regress, self.source, self.style = regress, source, style
        self.empty = 0  # images with no person so far (their pose map is black)

    def __call__(self, batch: dict) -> dict:
        images = np.asarray(batch[self.source], np.float32)
        if self.regress is not None:
            images = np.asarray(self.regress(images))
        maps = []
        for image, annotation in zip(images, self.annotators.map(images), strict=True):
            self.empty += annotation.num_persons == 0
            maps.append(self.style.render(*annotation.keypoints, image.shape[:2]))
        return {**batch, "pose": np.stack(maps)}

    def close(self) -> None:
        self.annotators.close()


def swinir_regressor(group, frozen_params) -> Callable[[np.ndarray], np.ndarray]:
    """`swinir_regress` jitted on this process's first local device (params copied there once)."""
    params = jax.tree.map(np.asarray, multihost_utils.process_allgather(frozen_params["swinir"], tiled=True))
    device = jax.local_devices()[0]
    variables = jax.device_put({"params": params}, device)
    module = group.swinir
    run = jax.jit(lambda v, x: swinir_regress(module, v, x))
    return lambda x: np.asarray(run(variables, jax.device_put(x, device)))


def annotated_pose_hook(config, group, frozen_params) -> AnnotatedPose | None:
    """The hook for `config.data.pose_source`, or None when poses come from the manifest."""
    source = config.data.get("pose_source", "manifest")
    if source not in POSE_SOURCES:
        raise ValueError(f"data.pose_source={source!r}; expected one of {POSE_SOURCES}")
    if source == "manifest":
        return None
    annotator = config.data.get("annotator", "auto")
    workers = int(config.data.get("pose_workers", 0))
    workers = auto_workers() if workers == -1 else workers
    members = getattr(group, "members", {})
    style = pose_style_from(config)
    if "swinir" in members and "swinir" in frozen_params:
        return AnnotatedPose(annotator, swinir_regressor(group, frozen_params), style=style, workers=workers)
    return AnnotatedPose(annotator, None, source="target", style=style, workers=workers)


def pose_style_from(config) -> PoseStyle:
    """config.data.pose_style (threshold, hands, face) as a `PoseStyle`."""
    return PoseStyle.from_dict(dict(config.data.pose_style)) if "pose_style" in config.data else PoseStyle()
