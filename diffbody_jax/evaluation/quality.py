"""The metrics an evaluation reports, chosen by name, each with the weights it needs and the way it is better.

    metrics = MetricSet.from_names("psnr,ssim,lpips", MetricWeights(lpips_alex="alexnet-owt-7be5be79.pth"))
    metrics.notes                                  # one line per chosen metric left out (its weights missing)
    metrics.score(image, reference)                # {"psnr": 27.1, "ssim": 0.81, "lpips": 0.21}
    metrics.score_many([a, b, c], reference)       # the same for several images, as one batch
    metrics.prior_errors(depth, normal, reference) # v2: {"depth_l2": ..., "normal_l2": ...} with the estimators

What each name is (`METRICS`; `docs/evaluation.md` says which numbers compare with the papers'):
  psnr, ssim     on BT.601 luma (`evaluation.metrics`), higher is better;
  cpsnr, cssim   on RGB, higher is better;
  lpips          LPIPS v0.1 with AlexNet (`evaluation.lpips`), lower is better; needs a torchvision AlexNet file;
  lpips-vgg      the same with VGG16; needs a torchvision VGG16 file;
  clipiqa        CLIP-IQA (`evaluation.clip_iqa`), no reference, higher is better; needs a ResNet-50 CLIP file
                 (OpenAI's RN50.pt or an open_clip RN50 state dict); the paper's prompt pair, or pyiqa's five;
  maniqa         MANIQA (`evaluation.maniqa`), no reference, higher is better; needs a pyiqa MANIQA file (KonIQ's
                 by default: its Swin residual scale 0.8; PIPAL's file needs --maniqa-scale 0.13);
  musiq          MUSIQ (`evaluation.musiq`), no reference, higher is better; needs a pyiqa MUSIQ file (KonIQ's).
The linear layers of both LPIPS variants come from the lpips package's wheel unless a folder is given.

v2's prior errors (Tables 2-3 of the v2 paper, "the L2 loss between the generated depth / normal maps and the maps
inferred from the ground truth"): the mean squared difference over pixels (and the normal's three channels) between
stage 1's decoded depth (its channel mean) or normal map and the map the local estimator (`annotators.dense`) infers
from the reference, both in the manifests' [0, 1] encoding. The paper does not say mean or sum, nor squared or not:
we take the mean of squares (MSE), lower is better.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from diffbody_jax.evaluation.metrics import image_metrics


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    label: str
    higher_is_better: bool
    weights: str | None = None  # the MetricWeights field it needs, None: none


METRICS = {m.name: m for m in (
    Metric("psnr", "PSNR", True), Metric("ssim", "SSIM", True), Metric("cpsnr", "CPSNR", True),
    Metric("cssim", "CSSIM", True), Metric("lpips", "LPIPS", False, "lpips_alex"),
    Metric("lpips-vgg", "LPIPS-VGG", False, "lpips_vgg"), Metric("maniqa", "MANIQA", True, "maniqa"),
    Metric("clipiqa", "CLIP-IQA", True, "clip_rn50"), Metric("musiq", "MUSIQ", True, "musiq"),
)}
PRIOR_ERRORS = {"depth_l2": Metric("depth_l2", "depth L2", False, "depth_estimator"),
                "normal_l2": Metric("normal_l2", "normal L2", False, "normal_estimator")}
DEFAULT_METRICS = "psnr,ssim,cpsnr,cssim,lpips,maniqa,clipiqa,musiq"  # v2 Table 1's order
_CLASSIC = ("psnr", "ssim", "cpsnr", "cssim")
NO_REFERENCE = ("maniqa", "clipiqa", "musiq")


@dataclasses.dataclass(frozen=True)
class MetricWeights:
    """Local files the learned metrics read (None: that metric is left out, with a note)."""

    lpips_alex: str | None = None  # torchvision's AlexNet state dict (alexnet-owt-7be5be79.pth)
    lpips_vgg: str | None = None  # torchvision's VGG16 state dict (vgg16-397923af.pth)
    lpips_lin: str | None = None  # a folder with lpips' alex.pth / vgg.pth (None: the lpips package's own)
    clip_rn50: str | None = None  # OpenAI's RN50.pt or an open_clip RN50 state dict (CLIP-IQA)
    clipiqa_prompts: str = "paper"  # "paper": ("Good photo.", "Bad photo."); "pyiqa": its five pairs
    maniqa: str | None = None  # a pyiqa MANIQA file (ckpt_koniq10k.pt, MANIQA_PIPAL-*.pth, ckpt_kadid10k.pt)
    maniqa_scale: float = 0.8  # its Swin residual scale: 0.8 KonIQ and KADID, 0.13 PIPAL (not in the weights)
    musiq: str | None = None  # a pyiqa MUSIQ file (musiq_koniq_ckpt-*.pth; AVA's, SPAQ's, PaQ-2-PiQ's read too)
    depth_estimator: object = None  # annotators.dense.DepthEstimator (v2 prior errors)
    normal_estimator: object = None  # annotators.dense.NormalEstimator


def parse_names(spec: str) -> list[str]:
    """"psnr,ssim,lpips" -> names, in order; an unknown name raises ValueError listing the known ones."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics {spec!r}: unknown {unknown or 'empty'}; known: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


class MetricSet:
    """The chosen metrics that can run (`names`), their scorers, and a note for each left out (`notes`)."""

    def __init__(self, names: list[str], weights: MetricWeights = MetricWeights()):
        self.names, self.notes, self._learned = [], [], {}
        for name in names:
            metric = METRICS[name]
            path = getattr(weights, metric.weights) if metric.weights else None
            if metric.weights and path is None:
                flag = "--" + metric.weights.replace("_", "-")
                self.notes.append(f"{name}: left out, no weights ({flag} FILE)")
                continue
            if metric.weights:
                try:
                    self._learned[name] = _learned_metric(name, path, weights)
                except (OSError, ValueError) as e:  # a missing package, an unreadable or wrong file
                    self.notes.append(f"{name}: left out, {e}".splitlines()[0])
                    continue
            self.names.append(name)
        self.estimators = {"depth_l2": weights.depth_estimator, "normal_l2": weights.normal_estimator}
        self._estimated: dict[tuple, np.ndarray] = {}

    @classmethod
    def from_names(cls, spec: str, weights: MetricWeights = MetricWeights()) -> MetricSet:
        return cls(parse_names(spec), weights)

    @property
    def metrics(self) -> list[Metric]:
        return [METRICS[n] for n in self.names]

    def score(self, image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        """[H, W, 3] x 2 in [0, 1] -> {name: value} for every active metric."""
        return self.score_many([image], reference)[0]

    def score_many(self, images: list[np.ndarray], reference: np.ndarray) -> list[dict[str, float]]:
        """Several [H, W, 3] images of one reference's size, scored as one batch: [{name: value}] in their order."""
        a = np.stack([np.asarray(image, np.float32) for image in images])
        b = np.broadcast_to(np.asarray(reference, np.float32), a.shape)
        out = {}
        if any(n in _CLASSIC for n in self.names):
            classic = image_metrics(a, b)
            out.update({n: classic[n] for n in self.names if n in _CLASSIC})
        for name, metric in self._learned.items():
            out[name] = metric(a) if name in NO_REFERENCE else metric(a, b)
        return [{n: float(out[n][i]) for n in self.names} for i in range(len(images))]

    @property
    def prior_error_names(self) -> list[str]:
        return [n for n, e in self.estimators.items() if e is not None]

    def prior_errors(self, depth: np.ndarray | None, normal: np.ndarray | None,
                     reference: np.ndarray) -> dict[str, float]:
        """v2: MSE of stage 1's depth ([H, W, 1] or [H, W]) and normal ([H, W, 3]) maps against the estimators'
        maps of the reference ([H, W, 3] in [0, 1]); only for the estimators given."""
        out = {}
        for name, generated in (("depth_l2", depth), ("normal_l2", normal)):
            if self.estimators[name] is not None and generated is not None:
                target = self._estimate(name, reference)
                out[name] = float(np.mean(np.square(np.asarray(generated, np.float64).reshape(target.shape)
                                                    - target)))
        return out

    def _estimate(self, name: str, reference: np.ndarray) -> np.ndarray:
        """The estimator's map of a reference, once per reference: every mixture of a photo shares it."""
        reference = np.ascontiguousarray(reference)
        key = (name, reference.shape, hashlib.sha1(reference.tobytes()).hexdigest())
        if key not in self._estimated:
            self._estimated[key] = self.estimators[name](reference)
        return self._estimated[key]


def _learned_metric(name: str, path: str, weights: MetricWeights):
    """The scorer of a learned metric, imported only when chosen."""
    if name == "clipiqa":
        from diffbody_jax.evaluation.clip_iqa import CLIPIQA

        return CLIPIQA.from_file(path, weights.clipiqa_prompts)
    if name == "maniqa":
        from diffbody_jax.evaluation.maniqa import MANIQAMetric

        return MANIQAMetric.from_file(path, weights.maniqa_scale)
    if name == "musiq":
        from diffbody_jax.evaluation.musiq import MUSIQMetric

        return MUSIQMetric.from_file(path)
    return _lpips_metric(name, path, weights.lpips_lin)


def _lpips_metric(name: str, backbone_file: str, lin_folder: str | None):
    from diffbody_jax.evaluation.lpips import LPIPSMetric

    backbone = "vgg" if name == "lpips-vgg" else "alex"
    lin = Path(lin_folder) / f"{backbone}.pth" if lin_folder else None
    return LPIPSMetric.from_files(backbone, backbone_file, lin)
