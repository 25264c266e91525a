"""Synthetic degradations for training pairs (numpy + OpenCV, CPU, for grain workers). HWC RGB float32 in [0, 1].

Two families, both deterministic given a `numpy.random.Generator`:

- `FixedMixture`: an explicit ordered list of operations with fixed parameters, e.g. the five mixtures
  of the DiffBody v2 paper's Table 1 (`TABLE1_MIXTURES`).
- `RealESRGANDegradation`: Real-ESRGAN's second-order pipeline (random blur kernels, resizes, noise and
  JPEG, twice, then a final sinc filter + resize and JPEG in random order), parameters drawn per image
  from the ranges of `RealESRGANConfig` (defaults: the published training settings).

Both return a `Degraded`: the low-resolution degraded image and its bicubic upsampling to the clean
image's size, which is what the restorer sees.

Noise sigmas are on the 0-255 scale, as the papers state them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import cv2
import ml_collections
import numpy as np
from scipy import special

_INTERPOLATION = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "nearest": cv2.INTER_NEAREST}


@dataclasses.dataclass(frozen=True)
class Degraded:
    """low_res: [h, w, 3] the degraded image; upsampled: [H, W, 3] its bicubic upsampling to the clean size."""

    low_res: np.ndarray
    upsampled: np.ndarray


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: expected an HWC image with 1 or 3 channels, got shape {image.shape}")
    return np.asarray(image, np.float32)


def quantize(image: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to 8-bit levels, as a saved photo would be."""
    return (np.clip(np.round(image * 255.0), 0, 255) / 255.0).astype(np.float32)


# ------------------------------------------------------------------------------------------ kernels
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    return np.meshgrid(ax, ax, indexing="xy")


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    """d^T Sigma^-1 d over a size x size grid, Sigma = R diag(sx^2, sy^2) R^T."""
    rot = np.array([[math.cos(rotation), -math.sin(rotation)], [math.sin(rotation), math.cos(rotation)]])
    inv = np.linalg.inv(rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T)
    xx, yy = _grid(size)
    d = np.stack([xx, yy], -1)
    return np.einsum("...i,ij,...j->...", d, inv, d)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0) -> np.ndarray:
    """Normalised (an)isotropic Gaussian kernel, [size, size]."""
    k = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, rotation))
    return (k / k.sum()).astype(np.float32)


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float):
    """exp(-0.5 (d^T S^-1 d)^beta): beta = 1 is the Gaussian, small beta heavier tails, large beta flatter."""
    k = np.exp(-0.5 * np.power(_quadratic_form(size, sigma_x, sigma_y, rotation), beta))
    return (k / k.sum()).astype(np.float32)


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float) -> np.ndarray:
    """1 / (1 + (d^T S^-1 d)^beta): a flat top with a soft shoulder."""
    k = 1.0 / (1.0 + np.power(_quadratic_form(size, sigma_x, sigma_y, rotation), beta))
    return (k / k.sum()).astype(np.float32)


def sinc_kernel(size: int, cutoff: float, pad_to: int = 0) -> np.ndarray:
    """Circular low-pass (2-D sinc, Bessel J1) kernel with angular cutoff in (0, pi]; ringing/overshoot."""
    xx, yy = _grid(size)
    r = np.hypot(xx, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[r == 0] = cutoff**2 / (4 * np.pi)
    k = k / k.sum()
    if pad_to > size:
        p = (pad_to - size) // 2
        k = np.pad(k, p)
    return k.astype(np.float32)


# -------------------------------------------------------------------------------------- operations
def blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel with `kernel`, reflecting at the border (OpenCV's BORDER_REFLECT_101)."""
    out = cv2.filter2D(image, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
    return out.reshape(image.shape)


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """Resize to (H, W) = `size`."""
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"resize: interpolation {interpolation!r} not in {sorted(_INTERPOLATION)}")
    h, w = max(1, int(size[0])), max(1, int(size[1]))
    return cv2.resize(image, (w, h), interpolation=_INTERPOLATION[interpolation]).reshape(h, w, image.shape[-1])


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator, gray: bool = False) -> np.ndarray:
    """Add N(0, (sigma/255)^2); `gray`: one noise field shared by the channels."""
    shape = image.shape[:2] + (1,) if gray else image.shape
    return (image + rng.standard_normal(shape).astype(np.float32) * (sigma / 255.0)).astype(np.float32)


def poisson_noise(image: np.ndarray, scale: float, rng: np.random.Generator, gray: bool = False) -> np.ndarray:
    """Shot noise: Poisson counts at the image's number of distinct 8-bit levels, times `scale`. `gray`: one
    noise field from the image's luma (ITU-R 601, as OpenCV's RGB2GRAY and Real-ESRGAN), shared by the channels."""
    base = image
    if gray and image.shape[-1] == 3:
        base = cv2.cvtColor(np.ascontiguousarray(image, np.float32), cv2.COLOR_RGB2GRAY)[..., None]
    levels = np.clip(np.round(base * 255.0), 0, 255) / 255.0
    vals = 2 ** math.ceil(math.log2(max(len(np.unique(levels)), 2)))
    noise = rng.poisson(levels * vals).astype(np.float32) / vals - levels
    return (image + noise * scale).astype(np.float32)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress at `quality` (OpenCV's libjpeg, 4:2:0) and decode."""
    q = int(np.clip(round(quality), 1, 100))
    u8 = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    gray = u8.shape[-1] == 1
    ok, buf = cv2.imencode(".jpg", u8[..., 0] if gray else u8[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError(f"jpeg: OpenCV could not encode a {u8.shape} image")
    out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    out = out[..., None] if gray else out[..., ::-1]
    return (out.astype(np.float32) / 255.0).reshape(image.shape)


def upsample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize to `size`, clipped to [0, 1] (bicubic overshoots at edges)."""
    return np.clip(resize(image, size, "bicubic"), 0.0, 1.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


# ---------------------------------------------------------------------------------- fixed mixtures
@dataclasses.dataclass(frozen=True)
class Op:
    """One fixed operation. kind: blur (sigma, kernel_size) | noise (sigma on 0-255, gray) |
    resize (scale, interpolation; the size is rounded down) | jpeg (quality)."""

    kind: str
    sigma: float = 0.0
    kernel_size: int = 0
    scale: float = 1.0
    interpolation: str = "bicubic"
    quality: int = 0
    gray: bool = False

    def __post_init__(self):
        if self.kind not in ("blur", "noise", "resize", "jpeg"):
            raise ValueError(f"degradation op kind {self.kind!r} unknown (blur, noise, resize, jpeg)")
        if self.kind == "blur" and (self.sigma <= 0 or self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"blur op needs sigma > 0 and an odd kernel_size, got {self}")
        if self.kind == "jpeg" and not 1 <= self.quality <= 100:
            raise ValueError(f"jpeg op needs quality in [1, 100], got {self.quality}")
        if self.kind == "resize" and self.scale <= 0:
            raise ValueError(f"resize op needs scale > 0, got {self.scale}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "blur":
            return blur(image, gaussian_kernel(self.kernel_size, self.sigma))
        if self.kind == "noise":
            return gaussian_noise(image, self.sigma, rng, self.gray)
        if self.kind == "resize":
            h, w = image.shape[:2]
            return resize(image, (int(h * self.scale), int(w * self.scale)), self.interpolation)
        return jpeg(image, self.quality)


@dataclasses.dataclass(frozen=True)
class FixedMixture:
    """Apply `ops` in order; quantize to 8 bits at the end; upsample bicubically back to the input size."""

    name: str
    ops: tuple[Op, ...]

    @property
    def scale(self) -> int:
        """The downscale factor of the low-resolution image (1 for a mixture without a resize)."""
        return round(1 / float(np.prod([op.scale for op in self.ops if op.kind == "resize"])))

    @classmethod
    def from_dicts(cls, name: str, ops: Sequence[dict[str, Any]]) -> FixedMixture:
        return cls(name, tuple(Op(**dict(op)) for op in ops))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Degraded:
        image = _check_image(image, f"mixture {self.name}")
        out = image
        for op in self.ops:
            out = op(out, rng)
        out = quantize(out)
        return Degraded(out, upsample(out, image.shape[:2]))


# Table 1 of the DiffBody v2 paper names the mixtures but not the blur kernel size or the order within
# a mixture. Ours follow the classical degradation model y = JPEG((x * k) down_s + n): blur, then the x4
# bicubic downsample, then the noise, then JPEG. The noise is added at low resolution, so "sigma 40" is
# sigma 40 in the degraded image (added before the downsample, bicubic would average it down to about 29).
# The kernel is 13x13: 2 * ceil(3 sigma) + 1 for sigma = 2, where the Gaussian has decayed to 1%.
TABLE1_KERNEL_SIZE = 13
_BLUR = dict(kind="blur", sigma=2.0, kernel_size=TABLE1_KERNEL_SIZE)
_DOWN4 = dict(kind="resize", scale=0.25, interpolation="bicubic")
TABLE1_MIXTURES: dict[str, list[dict[str, Any]]] = {
    "blur2-down4": [_BLUR, _DOWN4],
    "noise40-down4": [_DOWN4, dict(kind="noise", sigma=40.0)],
    "blur2-noise40": [_BLUR, dict(kind="noise", sigma=40.0)],
    "blur2-noise40-down4": [_BLUR, _DOWN4, dict(kind="noise", sigma=40.0)],
    "blur2-noise20-down4-jpeg50": [_BLUR, _DOWN4, dict(kind="noise", sigma=20.0), dict(kind="jpeg", quality=50)],
}


def table1_mixture(name: str) -> FixedMixture:
    if name not in TABLE1_MIXTURES:
        raise ValueError(f"unknown Table 1 mixture {name!r}; known: {sorted(TABLE1_MIXTURES)}")
    return FixedMixture.from_dicts(name, TABLE1_MIXTURES[name])


# ---------------------------------------------------------------------------- Real-ESRGAN pipeline
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@dataclasses.dataclass(frozen=True)
class BlurRanges:
    """One stage's random blur: kernel type probabilities, sigma/beta ranges, sinc probability."""

    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sigma: tuple[float, float] = (0.2, 3.0)
    betag: tuple[float, float] = (0.5, 4.0)
    betap: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1


@dataclasses.dataclass(frozen=True)
class StageRanges:
    """One degradation stage: blur, random resize (up/down/keep), Gaussian or Poisson noise, JPEG."""

    blur: BlurRanges = BlurRanges()
    blur_prob: float = 1.0
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma on 0-255
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)


@dataclasses.dataclass(frozen=True)
class RealESRGANConfig:
    """Real-ESRGAN's published training ranges (options/train_realesrgan_x4plus.yml)."""

    scale: int = 4
    kernel_range: tuple[int, ...] = tuple(2 * v + 1 for v in range(3, 11))  # odd sizes 7..21
    pad_to: int = 21
    first: StageRanges = StageRanges()
    second: StageRanges = StageRanges(
        blur=BlurRanges(sigma=(0.2, 1.5)),
        blur_prob=0.8,
        resize_prob=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )
    final_sinc_prob: float = 0.8

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RealESRGANConfig:
        """From a nested dict (as a ConfigDict's to_dict gives); lists become tuples."""
        tup = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731

        def stage(s: dict) -> StageRanges:
            s = {k: tup(v) for k, v in s.items()}
            if "blur" in s:
                s["blur"] = BlurRanges(**{k: tup(v) for k, v in dict(s["blur"]).items()})
            return StageRanges(**s)

        d = {k: tup(v) for k, v in dict(d).items()}
        for key in ("first", "second"):
            if key in d:
                d[key] = stage(dict(d[key]))
        return cls(**d)


def random_kernel(rng: np.random.Generator, ranges: BlurRanges, kernel_range: Sequence[int], pad_to: int):
    """One random blur kernel, padded to [pad_to, pad_to]."""
    size = int(rng.choice(kernel_range))
    if rng.uniform() < ranges.sinc_prob:
        cutoff = rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi)
        return sinc_kernel(size, cutoff, pad_to)
    probs = np.asarray(ranges.kernel_prob) / sum(ranges.kernel_prob)
    kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=probs))]
    sx = rng.uniform(*ranges.sigma)
    if kind.endswith("aniso"):
        sy, rot = rng.uniform(*ranges.sigma), rng.uniform(-np.pi, np.pi)
    else:
        sy, rot = sx, 0.0
    if kind in ("iso", "aniso"):
        k = gaussian_kernel(size, sx, sy, rot)
    else:
        lo, hi = ranges.betag if kind.startswith("generalized") else ranges.betap
        beta = rng.uniform(lo, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, hi)
        make = generalized_gaussian_kernel if kind.startswith("generalized") else plateau_kernel
        k = make(size, sx, sy, rot, beta)
    return np.pad(k, (pad_to - size) // 2)


class RealESRGANDegradation:
    """Real-ESRGAN's second-order degradation of one clean image (H and W divisible by `scale`)."""

    def __init__(self, config: RealESRGANConfig | None = None):
        self.config = config or RealESRGANConfig()

    @property
    def scale(self) -> int:
        return self.config.scale

    def _stage(self, image, rng, ranges: StageRanges, target_hw: tuple[int, int]):
        cfg = self.config
        if rng.uniform() < ranges.blur_prob:
            image = blur(image, random_kernel(rng, ranges.blur, cfg.kernel_range, cfg.pad_to))
        direction = rng.choice(3, p=np.asarray(ranges.resize_prob) / sum(ranges.resize_prob))
        factor = (rng.uniform(1.0, ranges.resize_range[1]) if direction == 0 else
                  rng.uniform(ranges.resize_range[0], 1.0) if direction == 1 else 1.0)
        mode = ("area", "bilinear", "bicubic")[int(rng.integers(3))]
        image = resize(image, (int(target_hw[0] * factor), int(target_hw[1] * factor)), mode)
        gray = rng.uniform() < ranges.gray_noise_prob
        if rng.uniform() < ranges.gaussian_noise_prob:
            image = gaussian_noise(image, rng.uniform(*ranges.noise_range), rng, gray)
        else:
            image = poisson_noise(image, rng.uniform(*ranges.poisson_scale_range), rng, gray)
        return np.clip(image, 0.0, 1.0)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Degraded:
        cfg = self.config
        image = _check_image(image, "Real-ESRGAN degradation")
        h, w = image.shape[:2]
        if h % cfg.scale or w % cfg.scale:
            raise ValueError(f"Real-ESRGAN degradation: image {h}x{w} is not divisible by scale {cfg.scale}")
        out = self._stage(image, rng, cfg.first, (h, w))
        out = jpeg(out, rng.uniform(*cfg.first.jpeg_range))
        # The second stage resizes relative to the target low resolution, as the reference does.
        out = self._stage(out, rng, cfg.second, (h // cfg.scale, w // cfg.scale))
        if rng.uniform() < cfg.final_sinc_prob:
            size = int(rng.choice(cfg.kernel_range))
            final_kernel = sinc_kernel(size, rng.uniform(np.pi / 3, np.pi), cfg.pad_to)
        else:
            final_kernel = None
        low = (h // cfg.scale, w // cfg.scale)
        quality = rng.uniform(*cfg.second.jpeg_range)
        mode = ("area", "bilinear", "bicubic")[int(rng.integers(3))]

        def resize_and_sinc(x):
            x = resize(x, low, mode)
            return x if final_kernel is None else blur(x, final_kernel)

        if rng.uniform() < 0.5:
            out = jpeg(np.clip(resize_and_sinc(out), 0, 1), quality)
        else:
            out = resize_and_sinc(jpeg(out, quality))
        out = quantize(out)
        return Degraded(out, upsample(out, (h, w)))


def degradation_config(config):
    """The `configs/degradation.py` config of a training config's data.degradation (a kind: real-esrgan or a
    mixture name), reduced to that kind: what the run degrades its inputs with, saved with its checkpoints."""
    from diffbody_jax.config import load_config

    kind = config["data"]["degradation"]
    full = load_config(f"degradation:kind={kind}")
    if kind == "real-esrgan":
        return ml_collections.ConfigDict({"kind": kind, "real_esrgan": full.real_esrgan.to_dict()})
    if kind not in full.mixtures:
        raise ValueError(f"config data.degradation={kind!r}: neither real-esrgan nor a mixture of "
                         f"configs/degradation.py ({sorted(full.mixtures)})")
    return ml_collections.ConfigDict({"kind": kind, "mixtures": {kind: full.mixtures[kind].to_dict()}})


def degradation_from_config(config) -> FixedMixture | RealESRGANDegradation:
    """The degradation a `configs/degradation.py` config names (`kind`), with its ranges or ops."""
    kind = config.kind
    if kind == "real-esrgan":
        return RealESRGANDegradation(RealESRGANConfig.from_dict(config.real_esrgan.to_dict()))
    if kind not in config.mixtures:
        raise ValueError(f"degradation kind {kind!r} is neither real-esrgan nor a mixture in the config")
    return FixedMixture.from_dicts(kind, [dict(op) for op in config.mixtures[kind].ops])
