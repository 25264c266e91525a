"""BPBreID body-part network: parity with a PyTorch twin in torchreid's key layout (on timm's HRNet),
checkpoint import / export, ImageNet backbone import, real-size coverage."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from diffbody_jax.interop.bodypart import (
    bodypart_from_state_dict,
)
from diffbody_jax.models.bodypart import BodyPartConfig, BodyPartNet
from diffbody_jax.models.hrnet import W32_INCRE
from tests.torch_ref import (
    bodypart_config,
    hrnet_config,
    nhwc_to_nchw,
    randomize_,
    randomize_batch_norm_stats_,
    state_dict_numpy,
    timm_hrnet_or_skip,
)

torch = pytest.importorskip("torch")
timm_hrnet = timm_hrnet_or_skip()
from tests.models.test_hrnet import timm_cfg  # noqa: E402

nn, F = torch.nn, torch.nn.functional
# timm's incre modules are always 32/64/128/256 planes wide, so the twin's tiny backbone uses them.
TINY = bodypart_config(hrnet=hrnet_config(incre_planes=W32_INCRE), num_identities=7)


def _linear_bn(i, o):
    return nn.ModuleDict({"layers": nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU())})


def _bn_classifier(d, n):
    return nn.ModuleDict({"bn": nn.BatchNorm1d(d), "classifier": nn.Linear(d, n, bias=False)})


class TwinBPBreID(nn.Module):
    """BPBreID's inference path written in PyTorch with torchreid's attribute names, on timm's HRNet."""

    def __init__(self, c: BodyPartConfig):
        super().__init__()
        self.c = c
        backbone = timm_hrnet.HighResolutionNetFeatures(timm_cfg(c.hrnet), feature_location="incre")
        feat = sum(4 * p for p in c.hrnet.incre_planes)
        backbone.cls_head = nn.Sequential(nn.Conv2d(feat, c.embed_dim, 1), nn.BatchNorm2d(c.embed_dim), nn.ReLU())
        self.backbone_appearance_feature_extractor = backbone
        spatial = c.embed_dim if c.dim_reduce == "before_pooling" else feat
        d = feat if c.dim_reduce == "none" else c.embed_dim
        k = c.num_parts
        if c.dim_reduce == "before_pooling":
            self.before_pooling_dim_reduce = nn.ModuleDict({"layers": nn.Sequential(
                nn.Conv2d(spatial, spatial, 1), nn.BatchNorm2d(spatial), nn.ReLU())})
        if c.dim_reduce == "after_pooling":
            for name in ("global", "foreground", "background", "parts"):
                setattr(self, f"{name}_after_pooling_dim_reduce", _linear_bn(spatial, d))
        self.pixel_classifier = nn.ModuleDict({"bn": nn.BatchNorm2d(spatial),
                                               "classifier": nn.Conv2d(spatial, k + 1, 1)})
        for name, width in (("global", d), ("background", d), ("foreground", d), ("concat_parts", k * d)):
            setattr(self, f"{name}_identity_classifier", _bn_classifier(width, c.num_identities))
        self.parts_identity_classifier = nn.ModuleList([_bn_classifier(d, c.num_identities) for _ in range(k)])

    def forward(self, x):
        c = self.c
        branches = self.backbone_appearance_feature_extractor(x)[1:]
        size = branches[0].shape[-2:]
        f = torch.cat([branches[0]] + [F.interpolate(b, size, mode="bilinear", align_corners=True)
                                       for b in branches[1:]], 1)
        if c.dim_reduce == "before_pooling":
            f = self.backbone_appearance_feature_extractor.cls_head(f)
        probs = self.pixel_classifier["classifier"](self.pixel_classifier["bn"](f)).softmax(1)
        bg, parts = probs[:, 0], probs[:, 1:]
        pooled = {
            "global": f.mean((2, 3)),
            "foreground": (parts.max(1).values[:, None] * f).mean((2, 3)),
            "background": (bg[:, None] * f).mean((2, 3)),
        }
        weighted = (parts[:, :, None] * f[:, None]).sum((-2, -1))
        if c.pooling == "gwap":
            pooled["parts"] = weighted / parts.sum((-2, -1)).clamp(min=1e-6)[..., None]
        else:
            pooled["parts"] = weighted / (f.shape[-2] * f.shape[-1])
        if c.dim_reduce == "after_pooling":
            for name, v in list(pooled.items()):
                layer = getattr(self, f"{name}_after_pooling_dim_reduce")["layers"]
                pooled[name] = layer(v.flatten(0, 1)).view(*v.shape[:-1], -1) if v.ndim == 3 else layer(v)
        bn_fg = self.foreground_identity_classifier["bn"](pooled["foreground"])
        return dict(
            part_probs=probs.permute(0, 2, 3, 1), foreground=1 - bg, visibility=parts.amax((2, 3)),
            part_features=pooled["parts"], part_embeddings=F.normalize(pooled["parts"], dim=-1),
            global_embedding=F.normalize(pooled["global"], dim=-1), foreground_embedding=F.normalize(bn_fg, dim=-1),
        )


class _FakeCfgNode(dict):
    """A dict subclass from a module the loader does not allow-list, as yacs' CfgNode is."""


def _twin(config: BodyPartConfig, seed: int) -> TwinBPBreID:
    twin = TwinBPBreID(config).eval()
    randomize_(twin, seed)
    randomize_batch_norm_stats_(twin, seed)
    return twin


@functools.cache
def _shapes(config: BodyPartConfig):
    return BodyPartNet(config=config).variable_shapes()


@pytest.mark.parametrize("dim_reduce,pooling", [
    ("after_pooling", "gwap"),
    pytest.param("before_pooling", "gap", marks=pytest.mark.slow),
    pytest.param("none", "gwap", marks=pytest.mark.slow),
])
def test_matches_pytorch_twin(dim_reduce, pooling, rng):
    config = dataclasses.replace(TINY, dim_reduce=dim_reduce, pooling=pooling)
    twin = _twin(config, seed=3)
    variables = bodypart_from_state_dict(state_dict_numpy(twin), config)
    x = rng.standard_normal((2, 96, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in twin(torch.from_numpy(nhwc_to_nchw(x))).items()}
    got = jax.jit(BodyPartNet(config=config).apply)(variables, x)._asdict()
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        assert np.abs(np.asarray(got[name]) - w).max() <= 1e-4, name
    np.testing.assert_allclose(np.asarray(got["part_probs"]).sum(-1), 1.0, atol=1e-5)
    # the foreground is 1 - P(background) of the twin's part probabilities
    np.testing.assert_allclose(np.asarray(got["foreground"]), 1.0 - want["part_probs"][..., 0], atol=1e-4)


@pytest.mark.slow  # ~17 s; differentiability is held by the part-loss gradient check, shapes by the twin test
def test_part_maps_are_probabilities_and_the_network_is_differentiable():
    net = BodyPartNet(config=bodypart_config())
    variables = net.init_variables(jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 64, 32, 3))
    out = net.apply(variables, x)
    assert out.part_probs.shape == (2, 16, 8, 6) and out.part_features.shape == (2, 5, 32)
    np.testing.assert_allclose(np.asarray(out.part_probs.sum(-1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.part_embeddings), axis=-1), 1.0, atol=1e-5)
    grad = jax.grad(lambda im: net.apply(variables, im).part_features.sum())(x)
    assert grad.shape == x.shape and bool(np.all(np.isfinite(grad))) and float(np.abs(grad).max()) > 0


