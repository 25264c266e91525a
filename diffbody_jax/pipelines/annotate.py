"""Pose maps and person masks for restoration, from an annotator run on the regressed image.

The papers draw the pose condition from the regressed image, not the degraded input: DWPose(I_reg) in seed 000,
MMPose(I_ir) in seed 002. The restore command runs SwinIR first (`Restorer.regress`), annotates each photo's part
of I_reg on the host (a bucket's reflected border is left out, so no mirrored person is found there), and draws the
pose map and the person mask back into the bucket; then the whole pipeline runs with them.
"""

from __future__ import annotations

import numpy as np

from diffbody_jax.data.pose import PoseStyle, transform_keypoints


def pose_and_mask(annotator, i_reg: np.ndarray, inner: tuple[int, int, int, int], name: str | None = None,
                  style: PoseStyle = PoseStyle()):
    """i_reg [H, W, 3] in [0, 1] (a bucket or a padded photo); inner = (top, left, h, w): the photo inside it;
    style: how the keypoints are drawn (the model's training style).
    Returns (pose [H, W, 3] float32 in [0, 1], mask [H, W, 1] float32 in [0, 1] (zeros without one), annotation)."""
    top, left, h, w = inner
    annotation = annotator(np.ascontiguousarray(i_reg[top: top + h, left: left + w]), name=name)
    keypoints, fmt = annotation.keypoints
    keypoints = transform_keypoints(keypoints, (1.0, 1.0), (-top, -left))
    pose = style.render(keypoints, fmt, i_reg.shape[:2])
    mask = np.zeros((*i_reg.shape[:2], 1), np.float32)
    if annotation.mask is not None:
        mask[top: top + h, left: left + w, 0] = np.clip(annotation.mask, 0.0, 1.0)
    return pose, mask, annotation
