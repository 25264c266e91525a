"""MANIQA in JAX against pyiqa's MANIQA (its `archs/maniqa_arch.py` and `maniqa_swin.py`, imported without its
package), whose timm ViT-B/8 is swapped for a small timm ViT of the same kind (patch 8 at 224, ten blocks, width 64
in two heads): random networks in pyiqa's layout, saved and read by our converter, scored on random photos that take
each path (enlarged from 64 x 64, enlarged from 95 x 150 where torch's floor(95 * (225 / 95)) gives 224, cropped from
260 x 300), with both Swin residual scales. Bound 1e-4. The published architecture (timm's real ViT-B/8, on the meta
device) maps key for key."""

import types

import numpy as np
import pytest
import torch

from diffbody_jax.evaluation.maniqa import MANIQAMetric
from diffbody_jax.interop.maniqa import maniqa_config, maniqa_table, prepare_state
from diffbody_jax.interop.mapping import flatten_params, plan_import
from diffbody_jax.models.maniqa import MANIQAConfig, init_shapes
from tests.torch_ref import pyiqa_module, randomize_

TOL = 1e-4
TINY = dict(embed_dim=64, dim_mlp=128, num_heads=[2, 2])


@pytest.fixture(scope="module")
def maniqa_arch():
    module = pyiqa_module("archs.maniqa_arch")
    from timm.models import vision_transformer  # importable now: the reference's import brought timm in

    timm = module.timm
    module.tiny_vit = lambda heads: lambda name, pretrained: vision_transformer.VisionTransformer(
        img_size=224, patch_size=8, embed_dim=TINY["embed_dim"], depth=10, num_heads=heads, mlp_ratio=2.0)
    def real_vit(name, pretrained):  # nothing downloaded, no memory: the rest is small (and calls .item())
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False)

    module.real_vit = real_vit
    return module


def _reference(module, vit, **kwargs):
    module.timm = types.SimpleNamespace(create_model=vit)
    return module.MANIQA(pretrained=False, **kwargs).eval()


def random_maniqa(module, seed: int, scale: float = 0.8, vit_heads: int = 1):
    """pyiqa's MANIQA on the small ViT with random weights, its TABlocks' q and k shrunk (below). One ViT head of
    64 is what the converter assumes of a file (width / 64); more heads must be named to it."""
    net = _reference(module, module.tiny_vit(vit_heads), scale=scale, **TINY)
    randomize_(net, seed)
    with torch.no_grad():
        # unit-variance random weights over 784-token channels put the TABlocks' logits near +-50: a one-hot softmax
        # where float32 rounding (either side's) moves the score by 1e-3. Smaller q, k keep it well conditioned.
        for name, p in net.named_parameters():
            if name.startswith("tablock") and (".c_q." in name or ".c_k." in name):
                p.mul_(0.3)
    return net


@pytest.mark.parametrize("scale, sizes", [(0.8, ((64, 64), (95, 150), (260, 300))), (0.13, ((260, 300),))])
def test_maniqa_matches_pyiqa(maniqa_arch, scale, sizes, tmp_path, rng):
    net = random_maniqa(maniqa_arch, int(rng.integers(2**31)), scale, vit_heads=2)
    torch.save(net.state_dict(), tmp_path / "maniqa.pth")
    metric = MANIQAMetric.from_file(tmp_path / "maniqa.pth", scale=scale, vit_heads=2)
    for hw in sizes:
        photos = rng.uniform(0, 1, (2 if hw == sizes[-1] else 1, *hw, 3)).astype(np.float32)  # a batch: lax.map
        with torch.no_grad():
            want = net(torch.from_numpy(photos).permute(0, 3, 1, 2)).numpy()[:, 0]
        got = metric(photos)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=str(hw))


def test_the_published_maniqa_maps_key_for_key(maniqa_arch):
    net = _reference(maniqa_arch, maniqa_arch.real_vit)  # timm's ViT-B/8 on the meta device
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    fake = {k: np.empty(s, np.float32) for k, s in shapes.items()}  # shapes only: no memory is touched
    config = maniqa_config(fake, scale=0.13)
    assert config == MANIQAConfig(scale=0.13)
    ours = {k: tuple(v.shape) for k, v in flatten_params(init_shapes(config)).items()}
    prepared = {k: v.shape for k, v in prepare_state(fake, config).items()}
    plan = plan_import(prepared, ours, maniqa_table(config), "MANIQA (meta)")
    assert len(plan) == len(ours)
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(int(np.prod(prepared[k])) for k in plan)
    dropped = {k for k in shapes if k not in prepared and not k.endswith((".attn.qkv.weight", ".attn.qkv.bias"))}
    assert {".".join(k.split(".")[:3]) for k in dropped} == {"vit.blocks.10", "vit.blocks.11"}  # after the features
    skipped = {k for k in prepared if k not in plan and not k.endswith(("relative_position_index", "attn_mask"))}
    assert {k.rsplit(".", 1)[0] for k in skipped} == {
        "vit.norm", "vit.head", "swintransformer1.downsample", "swintransformer2.downsample"}


def test_a_vit_too_shallow_is_named(maniqa_arch, tmp_path):
    net = _reference(maniqa_arch, maniqa_arch.tiny_vit(1), **TINY)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("vit.blocks.9.")}
    torch.save(state, tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"shallow\.pth: the ViT has 9 blocks; MANIQA reads the tokens of blocks "
                                         r"\(6, 7, 8, 9\), so it needs at least 10"):
        MANIQAMetric.from_file(tmp_path / "shallow.pth")
