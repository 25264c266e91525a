"""LPIPS in JAX against the lpips package itself (its LPIPS module: scaling layer, unit normalisation, linear layers,
spatial average), whose torchvision backbone is built here in torch from the same state-dict file (torchvision does
not install beside the CPU torch: lpips is imported past a stub, and its `tv.alexnet` / `tv.vgg16` hand it our
torch `features`). Random backbones in torchvision's layout with the lpips wheel's real linear layers, and with
random ones; both backbones; bound 1e-5."""

import types

import numpy as np
import pytest
import torch

from diffbody_jax.evaluation.lpips import LPIPSMetric
from diffbody_jax.interop.mapping import ConversionError
from tests.torch_ref import import_with_torchvision_stub

TOL = 1e-5


def _torchvision_features(backbone: str) -> torch.nn.Sequential:
    """torchvision's AlexNet / VGG16 `features`, written out as torchvision defines them."""
    nn = torch.nn
    if backbone == "alex":
        return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                             nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                             nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    layers, channels = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def lpips_module():
    try:
        return import_with_torchvision_stub("lpips")
    except ImportError as e:
        pytest.skip(f"the lpips package is the reference (pip install --no-deps lpips): {e}", allow_module_level=True)


def _reference(lpips_module, backbone: str, features: torch.nn.Sequential, lin_file):
    """lpips.LPIPS with `features` as its torchvision trunk and the linear layers of `lin_file`."""
    factory = lambda pretrained=True, **kw: types.SimpleNamespace(features=features)  # noqa: E731
    lpips_module.pretrained_networks.tv = types.SimpleNamespace(alexnet=factory, vgg16=factory)
    return lpips_module.LPIPS(net=backbone, model_path=str(lin_file), verbose=False).eval()


@pytest.mark.parametrize("backbone", ["alex", "vgg"])
@pytest.mark.parametrize("lins", ["packaged", "random"])
def test_lpips_matches_the_lpips_package(lpips_module, backbone, lins, tmp_path, rng):
    from diffbody_jax.interop.lpips import packaged_lin_weights

    torch.manual_seed(int(rng.integers(2**31)))
    features = _torchvision_features(backbone)
    backbone_file = tmp_path / f"{backbone}.pth"
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4, 3)  # torchvision's files carry the classifier: dropped
    torch.save(state, backbone_file)
    lin_file = packaged_lin_weights(backbone)
    if lins == "random":
        lin_file = tmp_path / "lin.pth"
        real = torch.load(packaged_lin_weights(backbone), map_location="cpu")
        torch.save({k: torch.rand(v.shape) * 0.1 for k, v in real.items()}, lin_file)

    a = rng.uniform(0, 1, (3, 64, 48, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    b[0] = rng.uniform(0, 1, b.shape[1:])  # one unrelated pair, two near ones
    ours = LPIPSMetric.from_files(backbone, backbone_file, lin_file)(a, b)
    with torch.no_grad():
        ref = _reference(lpips_module, backbone, features, lin_file)(
            torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2), normalize=True)
    ref = ref.reshape(-1).numpy()
    assert ours.shape == (3,)
    assert ref[0] > ref[1] and ref[0] > ref[2]  # the reference behaves: the unrelated pair is farther
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_a_wrong_backbone_file_is_named(tmp_path):
    features = _torchvision_features("alex")
    state = {f"features.{k}": v for k, v in features.state_dict().items() if k != "3.bias"}
    torch.save(state, tmp_path / "alex.pth")
    with pytest.raises(ConversionError, match=r"features/features_3/bias"):
        LPIPSMetric.from_files("alex", tmp_path / "alex.pth")
    with pytest.raises(ConversionError, match=r"alex.pth"):  # a VGG16 file given for AlexNet: every gap listed
        torch.save({f"features.{k}": v for k, v in _torchvision_features("vgg").state_dict().items()},
                   tmp_path / "alex.pth")
        LPIPSMetric.from_files("alex", tmp_path / "alex.pth")
