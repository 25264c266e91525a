"""The body-part network of DiffBody v1: BPBreID (Somers et al., WACV 2023) on an HRNet-W32 backbone.

    net = BodyPartNet(BodyPartConfig())  # the published BPBreID; configs/bodypart.py has the variants
    out = net.apply(variables, preprocess(image, net.config))  # image: [B, H, W, 3] RGB in [0, 1]
    out.part_probs   # [B, H/4, W/4, K + 1], channel 0 the background, summing to 1 per pixel
    out.foreground   # [B, H/4, W/4] = 1 - background probability: the body attention map before resizing

The backbone is HRNet with its "incre" Bottlenecks; the four branches are upsampled (bilinear, corners
aligned) to the 1/4-resolution branch and concatenated (1920 channels for W32). The part head classifies
every pixel into K parts plus background (BatchNorm, 1x1 conv, softmax over parts) and pools the feature
map under each part's soft attention (a weighted average: `pooling="gwap"`), giving one embedding per
part; a linear + BatchNorm + ReLU then reduces every pooled vector to `embed_dim` (torchreid's
`dim_reduce="after_pooling"`, the published setting).

Everything is a pure function of (variables, image): BatchNorm uses its stored statistics (collection
"batch_stats"), since in DiffBody the network is frozen and gradients flow through it to the image
(part-loss guidance, seed 000 Eq. 6). Submodule names follow torchreid's attribute names, so
`interop/bodypart.py` derives the PyTorch keys from the Flax paths.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.models.hrnet import W32_INCRE, ConvBN, HRModule, HRNet, HRNetConfig, batch_norm
from diffbody_jax.models.layers import Array, bilinear_resize_align_corners, conv, dense
from diffbody_jax.models.variables import ModelVariables

# The paper's five parts (seed 000, Sec. 3.4), as labels of channels 1..K (0 is background); what each
# channel means is fixed by the masks the checkpoint was trained on (BPBreID's "five_v" grouping).
FIVE_PARTS = ("head", "upper_body", "arms_hands", "legs", "feet")
DIM_REDUCE = ("after_pooling", "before_pooling", "none")
POOLING = ("gwap", "gap", "gmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GWAP_EPS = 1e-6  # torchreid clamps the attention mass from below before dividing


@dataclasses.dataclass(frozen=True)
class BodyPartConfig:
    """BPBreID's architecture and input convention.

    part_names: the K body parts (K = len); the classifier has K + 1 outputs, background first.
    dim_reduce: "after_pooling" (a Linear+BN+ReLU per embedding kind), "before_pooling" (the backbone's
      1x1 conv head reduces the feature map first) or "none" (embeddings keep the backbone width).
    embed_dim: the reduced width (torchreid's dim_reduce_output).
    pooling: part pooling under the attention maps: weighted average (gwap), average (gap) or max (gmp).
    num_identities: width of the training-time identity classifiers (0: none; a checkpoint trained on
      Market-1501 has 751). They only matter for a lossless round trip of a checkpoint.
    input_size: (H, W) the image is resized to; BPBreID trains on 384 x 128 person crops. None keeps the
      image size (rounded down to a multiple of 32).
    """

    hrnet: HRNetConfig = HRNetConfig(incre_planes=W32_INCRE)
    part_names: tuple[str, ...] = FIVE_PARTS
    dim_reduce: str = "after_pooling"
    embed_dim: int = 512
    pooling: str = "gwap"
    num_identities: int = 0
    shared_parts_id_classifier: bool = False
    input_size: tuple[int, int] | None = (384, 128)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.dim_reduce not in DIM_REDUCE:
            raise ValueError(f"BodyPartConfig: dim_reduce={self.dim_reduce!r}; supported: {DIM_REDUCE}")
        if self.pooling not in POOLING:
            raise ValueError(f"BodyPartConfig: pooling={self.pooling!r}; supported: {POOLING}")
        if not self.part_names:
            raise ValueError("BodyPartConfig: part_names is empty; the part head needs at least one part")
        if not self.hrnet.incre_planes:
            raise ValueError("BodyPartConfig: the backbone needs incre_planes (BPBreID's HRNet has the incre head)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> BodyPartConfig:
        """Inverse of `to_dict` (JSON lists accepted); unknown keys are refused by name."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown body-part network fields {unknown}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if "hrnet" in d:
            d["hrnet"] = HRNetConfig.from_dict(d["hrnet"], f"{source}.hrnet")
        return cls(**d)

    @property
    def num_parts(self) -> int:
        return len(self.part_names)

    @property
    def feature_dim(self) -> int:
        """Width of the concatenated backbone feature map."""
        return sum(self.hrnet.out_channels)

    @property
    def spatial_dim(self) -> int:
        """Width of the feature map the part head sees."""
        return self.embed_dim if self.dim_reduce == "before_pooling" else self.feature_dim

    @property
    def output_dim(self) -> int:
        """Width of the embeddings."""
        return self.feature_dim if self.dim_reduce == "none" else self.embed_dim


class BodyPartOutput(NamedTuple):
    """What the network sees in an image. Spatial maps are at the backbone's 1/4 resolution (h, w)."""

    part_probs: Array  # [B, h, w, K + 1] softmax over background (index 0) and the K parts
    foreground: Array  # [B, h, w] 1 - background probability, in [0, 1]
    visibility: Array  # [B, K] each part's largest probability over the image, in [0, 1]
    part_features: Array  # [B, K, D] pooled part embeddings (torchreid's "parts"), not normalised
    part_embeddings: Array  # [B, K, D] part_features / |part_features|
    global_embedding: Array  # [B, D] average-pooled map, reduced, L2-normalised ("globl")
    foreground_embedding: Array  # [B, D] foreground-pooled, reduced, BatchNorm'd, L2-normalised ("bn_foreg")


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(|x|, eps) over the last axis, as F.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class LinearBN(HRModule):
    """torch Sequential(Linear, BatchNorm1d, ReLU): children "0" and "1". x: [..., C] -> [..., features]."""

    features: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = dense(self, self.features, "0", axes=("embed", "mlp"))(x)
        return nn.relu(batch_norm(self, "1")(y))


class DimReduce(HRModule):
    """torchreid's Before/AfterPoolingDimReduceLayer: its Sequential is the child "layers"."""

    features: int = 0
    spatial: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        if self.spatial:
            return ConvBN(**kw, features=self.features, kernel=1, use_bias=True, name="layers")(x)
        return LinearBN(**kw, features=self.features, name="layers")(x)


class BNClassifier(HRModule):
    """BatchNorm1d "neck" then a bias-free linear identity classifier ("bn", "classifier").

    Returns (normalised-by-BN embedding, logits or None). The classifier exists only when num_classes > 0.
    """

    num_classes: int = 0

    @nn.compact
    def __call__(self, x: Array, logits: bool = False) -> tuple[Array, Array | None]:
        y = batch_norm(self, "bn")(x)
        if not self.num_classes or not (logits or self.is_initializing()):
            return y, None
        return y, dense(self, self.num_classes, "classifier", axes=("embed", "vocab"), use_bias=False)(y)


class PixelToPartClassifier(HRModule):
    """BatchNorm2d then a 1x1 conv to K + 1 part logits. x: [B, h, w, C] -> [B, h, w, K + 1]."""

    num_outputs: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return conv(self, self.num_outputs, 1, "classifier")(batch_norm(self, "bn")(x))


def pool_parts(features: Array, masks: Array, pooling: str) -> Array:
    """features [B, h, w, C], masks [B, h, w, M] -> [B, M, C] pooled under each mask."""
    if pooling == "gmp":
        return jnp.max(masks[..., :, None] * features[..., None, :], axis=(1, 2))
    total = jnp.einsum("bhwm,bhwc->bmc", masks, features)
    if pooling == "gap":
        return total / (features.shape[1] * features.shape[2])
    mass = jnp.maximum(jnp.sum(masks, axis=(1, 2)), GWAP_EPS)
    return total / mass[..., None]


class BodyPartNet(ModelVariables, HRModule):
    """[B, H, W, 3] ImageNet-normalised RGB (see `preprocess`) -> BodyPartOutput."""

    config: BodyPartConfig = BodyPartConfig()

    @nn.compact
    def __call__(self, image: Array, logits: bool = False) -> BodyPartOutput | tuple[BodyPartOutput, dict]:
        """With `logits`, also the identity-classifier scores {"global", "foreground", "background",
        "concat_parts", "parts"} (training only; needs num_identities > 0)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        init = self.is_initializing()
        _, *branches = HRNet(**kw, config=cfg.hrnet, name="backbone")(image)
        size = branches[0].shape[1:3]
        feats = jnp.concatenate([branches[0]] + [bilinear_resize_align_corners(b, size) for b in branches[1:]], -1)
        # torchreid builds the backbone's 1x1 conv head and the before-pooling reduction in every mode and
        # uses them only in some: unused ones are created at init (so checkpoints round-trip) and never run.
        cls_head = ConvBN(**kw, features=cfg.embed_dim, kernel=1, use_bias=True, name="backbone_cls_head")
        if cfg.dim_reduce == "before_pooling":
            feats = cls_head(feats)
            if init:
                DimReduce(**kw, features=cfg.embed_dim, spatial=True, name="before_pooling_dim_reduce")(feats)
        elif init:
            cls_head(feats)

        part_logits = PixelToPartClassifier(**kw, num_outputs=cfg.num_parts + 1, name="pixel_classifier")(feats)
        acc = jnp.promote_types(self.dtype, jnp.float32)  # head statistics in at least float32
        probs = jax.nn.softmax(part_logits.astype(acc), axis=-1)
        background, parts = probs[..., 0], probs[..., 1:]
        # BPBreID pools its foreground embedding under the strongest part; the attention map is 1 - background.
        feats = feats.astype(acc)
        pooled = {
            "global": jnp.mean(feats, axis=(1, 2)),
            "foreground": pool_parts(feats, jnp.max(parts, axis=-1, keepdims=True), "gap")[:, 0],
            "background": pool_parts(feats, background[..., None], "gap")[:, 0],
            "parts": pool_parts(feats, parts, cfg.pooling),
        }
        if cfg.dim_reduce == "after_pooling":
            pooled = {k: DimReduce(**kw, features=cfg.embed_dim, name=f"{k}_after_pooling_dim_reduce")(v)
                      for k, v in pooled.items()}
        pooled = {k: v.astype(acc) for k, v in pooled.items()}
        b, k, d = pooled["parts"].shape
        pooled["concat_parts"] = pooled["parts"].reshape(b, k * d)

        def classifier(name):
            return BNClassifier(**kw, num_classes=cfg.num_identities, name=f"{name}_identity_classifier")

        heads = {name: classifier(name)(pooled[name], logits)
                 for name in ("global", "background", "foreground", "concat_parts")}
        if cfg.shared_parts_id_classifier:
            bn_parts, part_scores = classifier("parts")(pooled["parts"], logits)
        else:
            per_part = [BNClassifier(**kw, num_classes=cfg.num_identities, name=f"parts_identity_classifier_{i}")(
                pooled["parts"][:, i], logits) for i in range(k)]
            bn_parts = jnp.stack([p[0] for p in per_part], 1)
            part_scores = None if per_part[0][1] is None else jnp.stack([p[1] for p in per_part], 1)
        out = BodyPartOutput(
            part_probs=probs,
            foreground=1.0 - background,
            visibility=jnp.max(parts, axis=(1, 2)),
            part_features=pooled["parts"],
            part_embeddings=l2_normalize(pooled["parts"]),
            global_embedding=l2_normalize(pooled["global"]),
            foreground_embedding=l2_normalize(heads["foreground"][0].astype(acc)),
        )
        if not logits:
            return out
        scores = {name: head[1] for name, head in heads.items()}
        scores["parts"] = part_scores
        scores["bn_parts"] = bn_parts
        return out, scores

    def dummy_inputs(self, batch: int = 1) -> dict[str, Array]:
        h, w = self.config.input_size or (64, 32)
        return {"image": jnp.zeros((batch, h, w, 3), self.dtype)}


def preprocess(image: Array, config: BodyPartConfig) -> Array:
    """RGB in [0, 1], [B, H, W, 3] (any size) -> the network's input: resized (bilinear, antialiased when
    shrinking; differentiable) to `config.input_size` and normalised with the ImageNet statistics."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"body-part network: expected RGB images [B, H, W, 3], got shape {image.shape}")
    b, h, w, _ = image.shape
    size = config.input_size or (max(32, h // 32 * 32), max(32, w // 32 * 32))
    if (h, w) != tuple(size):
        image = jax.image.resize(image, (b, *size, 3), "bilinear", antialias=True)
    mean = jnp.asarray(config.mean, image.dtype)
    std = jnp.asarray(config.std, image.dtype)
    return (image - mean) / std
