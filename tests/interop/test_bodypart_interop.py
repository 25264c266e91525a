"""BPBreID checkpoints: torchreid's layouts in and out, errors, ImageNet backbone import, real-size coverage."""

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
from diffbody_jax.models.bodypart import BodyPartNet
from tests.models.test_bodypart import TINY, TwinBPBreID, _FakeCfgNode, _shapes, _twin  # noqa: F401
from tests.models.test_hrnet import timm_cfg
from tests.torch_ref import (
    bodypart_config,
    randomize_,
    state_dict_numpy,
    timm_hrnet_or_skip,
)

torch = pytest.importorskip("torch")
timm_hrnet = timm_hrnet_or_skip()


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
    base = bodypart_config(hrnet=TINY.hrnet)
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
    config = bodypart_config("bpbreid", num_identities=751)
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
