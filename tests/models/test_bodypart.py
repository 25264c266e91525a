"""BPBreID body-part network: parity with a PyTorch twin in torchreid's key layout (on timm's HRNet),
checkpoint import / export, ImageNet backbone import, real-size coverage."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from diffbody_jax.interop.bodypart import (
    backbone_from_imagenet,
    bodypart_from_state_dict,
    bodypart_state_dict,
    bodypart_table,
    imagenet_table,
    infer_config,
    load_bodypart,
    save_bodypart,
)
from diffbody_jax.interop.mapping import flatten_params, plan_import
from diffbody_jax.models.bodypart import BodyPartConfig, BodyPartNet
from diffbody_jax.models.hrnet import W32_INCRE, HRNetConfig
from tests.torch_ref import (
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
TINY = BodyPartConfig.tiny(hrnet=HRNetConfig.tiny(incre_planes=W32_INCRE), num_identities=7)


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


def test_part_maps_are_probabilities_and_the_network_is_differentiable():
    net = BodyPartNet(config=BodyPartConfig.tiny())
    variables = net.init_variables(jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 64, 32, 3))
    out = net.apply(variables, x)
    assert out.part_probs.shape == (2, 16, 8, 6) and out.part_features.shape == (2, 5, 32)
    np.testing.assert_allclose(np.asarray(out.part_probs.sum(-1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.part_embeddings), axis=-1), 1.0, atol=1e-5)
    grad = jax.grad(lambda im: net.apply(variables, im).part_features.sum())(x)
    assert grad.shape == x.shape and bool(np.all(np.isfinite(grad))) and float(np.abs(grad).max()) > 0


@pytest.mark.parametrize("suffix,wrap", [
    (".pth.tar", True),
    pytest.param(".pth", False, marks=pytest.mark.slow),
    pytest.param(".safetensors", False, marks=pytest.mark.slow),
])
def test_checkpoint_import_and_export(tmp_path, suffix, wrap):
    """torchreid's {"state_dict"} with DataParallel's module. prefix, a bare dict, or safetensors; the head
    is read from the file; export loads strictly into the twin, bit-exact."""
    twin = _twin(TINY, seed=5)
    path = tmp_path / f"bpbreid{suffix}"
    if suffix == ".safetensors":
        from diffbody_jax.interop.torch_files import write_safetensors

        write_safetensors(state_dict_numpy(twin), path)
    else:
        sd = {("module." if wrap else "") + k: v for k, v in twin.state_dict().items()}
        # torchreid also pickles its yacs config into the file: an object weights_only refuses.
        extra = {"epoch": 120, "rank1": np.float64(0.95), "config": _FakeCfgNode(model=_FakeCfgNode(name="bpbreid"))}
        torch.save({"state_dict": sd, **extra} if wrap else sd, path)
    base = BodyPartConfig.tiny(hrnet=TINY.hrnet)
    config, variables = load_bodypart(path, infer_config(state_dict_numpy(twin), base))
    assert config == TINY
    out = tmp_path / f"back{suffix}"
    save_bodypart(out, variables)
    fresh = TwinBPBreID(TINY)
    if suffix == ".safetensors":
        from diffbody_jax.interop.torch_files import read_state_dict

        back = {k: torch.from_numpy(np.array(v)) for k, v in read_state_dict(out).items()}
    else:
        back = torch.load(out, weights_only=True)["state_dict"]
    fresh.load_state_dict(back, strict=True)
    for key, value in twin.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[key], value), key


def test_wrong_checkpoint_names_the_problem():
    twin = _twin(TINY, seed=0)
    sd = state_dict_numpy(twin)
    sd["pixel_classifier.classifier.weight"] = sd["pixel_classifier.classifier.weight"][:4]
    with pytest.raises(ValueError, match="pixel_classifier.classifier.weight"):
        bodypart_from_state_dict(sd, TINY, "my.pth")
    with pytest.raises(ValueError, match="not a BPBreID state dict"):
        infer_config({"conv1.weight": np.zeros((1,))})


def test_imagenet_weights_fill_the_backbone_and_keep_the_head():
    ref = timm_hrnet.HighResolutionNet(timm_cfg(TINY.hrnet), num_classes=10, head="classification").eval()
    randomize_(ref, 7)
    sd = state_dict_numpy(ref)
    assert any(k.startswith("final_layer.") for k in sd) and any(k.startswith("classifier.") for k in sd)
    variables = BodyPartNet(config=TINY).init_variables(jax.random.key(0))
    loaded = backbone_from_imagenet(sd, variables)
    exported = bodypart_state_dict(loaded)
    for key, value in sd.items():
        mapped = f"backbone_appearance_feature_extractor.{key}"
        if mapped in exported and not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[mapped], value)
    n_backbone = len([k for k in exported if k.startswith("backbone_appearance_feature_extractor.")
                      and ".cls_head." not in k and not k.endswith("num_batches_tracked")])
    assert n_backbone == len([k for k in sd if k.split(".")[0] not in ("downsamp_modules", "final_layer", "classifier")
                              and not k.endswith("num_batches_tracked")])
    np.testing.assert_array_equal(loaded["params"]["pixel_classifier"]["classifier"]["kernel"],
                                  variables["params"]["pixel_classifier"]["classifier"]["kernel"])


def test_w32_coverage():
    """The published BPBreID (W32, K = 5, 512-d, 751 Market-1501 identities): every key maps; and timm's
    hrnet_w32 ImageNet classifier fills our backbone exactly."""
    config = BodyPartConfig.bpbreid(num_identities=751)
    with torch.device("meta"):
        twin = TwinBPBreID(config)
        imagenet = timm_hrnet.HighResolutionNet(timm_cfg(config.hrnet), num_classes=1000)
    shapes = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in flatten_params(_shapes(config)).items()}
    plan = plan_import(shapes, ours, bodypart_table(_shapes(config)), "bpbreid")
    assert len(plan) == len([k for k in shapes if not k.endswith("num_batches_tracked")])
    n_params = sum(p.numel() for p in twin.parameters())
    assert sum(int(np.prod(s)) for k, s in ours.items() if k.startswith("params/")) == n_params
    backbone = {c: {"backbone": t["backbone"]} for c, t in _shapes(config).items()}
    flat_backbone = {k: tuple(v.shape) for k, v in flatten_params(backbone).items()}
    plan_import({k: tuple(v.shape) for k, v in imagenet.state_dict().items()}, flat_backbone,
                imagenet_table(backbone), "hrnet_w32")
    print(f"BPBreID W32: {n_params:,} params")
