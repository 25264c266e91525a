"""CLIP-IQA against pyiqa's CLIP (its `archs/clip_model.py`, loaded alone past the torchvision stub: OpenAI's CLIP
with the attention pool's positional embedding made optional, which pyiqa's CLIP-IQA turns off): a small ResNet CLIP
with random weights (BatchNorm statistics included) saved as an OpenAI-layout state dict and read by our converter;
image embeddings with and without the positional embedding, text embeddings, and the scores of the paper's prompt
pair and of pyiqa's five pairs, computed as pyiqa's CLIPIQA.forward does. Bound 1e-4 (embeddings relative to their
scale). The real RN50's keys and shapes are checked on the meta device."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from diffbody_jax.conditioning.prompts import load_tokenizer, tokenize
from diffbody_jax.evaluation.clip_iqa import CLIP_MEAN, CLIP_STD, CLIPIQA, PAPER_PROMPTS, PYIQA_PROMPTS
from diffbody_jax.interop.clip_resnet import read_clip_resnet, text_config, vision_config, vision_table
from diffbody_jax.interop.mapping import flatten_params, plan_import
from diffbody_jax.models.clip_resnet import CLIPResNet, init_shapes
from tests.torch_ref import import_with_torchvision_stub

TOL = 1e-4
TINY = dict(embed_dim=64, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16, vision_patch_size=None,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
RN50 = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None,
            context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


@pytest.fixture(scope="module")
def pyiqa_clip():
    spec = importlib.util.find_spec("pyiqa")
    if spec is None:
        pytest.skip("pyiqa's CLIP is the reference (pip install --no-deps pyiqa)", allow_module_level=True)
    path = Path(spec.submodule_search_locations[0]) / "archs" / "clip_model.py"
    return import_with_torchvision_stub("pyiqa_clip_model", str(path))


def _random_clip(module, seed):
    torch.manual_seed(seed)
    model = module.CLIP(**TINY).eval()
    with torch.no_grad():  # CLIP zeroes each bn3 and keeps unit statistics: randomise so every path counts
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if "bn" in name or "downsample.1" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
        model.visual.attnpool.positional_embedding.normal_(0, 0.1)
    return model


def test_clip_iqa_matches_pyiqas_clip(pyiqa_clip, tmp_path, rng):
    model = _random_clip(pyiqa_clip, int(rng.integers(2**31)))
    torch.save(model.state_dict(), tmp_path / "rn.pt")
    checkpoint = read_clip_resnet(tmp_path / "rn.pt")
    assert checkpoint.vision.layers == (1, 2, 1, 1) and checkpoint.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)

    images = rng.uniform(0, 1, (2, 96, 80, 3)).astype(np.float32)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    net = CLIPResNet(checkpoint.vision)
    normalised = np.asarray(x.permute(0, 2, 3, 1))
    with torch.no_grad():
        want = model.encode_image(x, pos_embedding=False).numpy()
        square = x[..., :64, :64]
        want_pos = model.encode_image(square, pos_embedding=True).numpy()
    got = np.asarray(net.apply(checkpoint.vision_variables, normalised, pos_embedding=False))
    got_pos = np.asarray(net.apply(checkpoint.vision_variables, normalised[:, :64, :64], pos_embedding=True))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())
    np.testing.assert_allclose(got_pos, want_pos, rtol=0, atol=TOL * np.abs(want_pos).max())

    for prompts, name in ((PAPER_PROMPTS, "paper"), (PYIQA_PROMPTS, "pyiqa")):
        texts = [t for pair in prompts for t in pair]
        ids = torch.from_numpy(tokenize(load_tokenizer(None, pad_token="!"), texts).astype(np.int64))
        metric = CLIPIQA(checkpoint, prompts=name)
        with torch.no_grad():
            want_text = model.encode_text(ids).numpy()
            logits, _ = model(x, ids, pos_embedding=False)  # pyiqa's CLIPIQA.forward from here on
            want_scores = logits.reshape(logits.shape[0], -1, 2).softmax(dim=-1)[..., 0].mean(dim=1).numpy()
        np.testing.assert_allclose(np.asarray(metric.text_embeds), want_text, rtol=0,
                                   atol=TOL * np.abs(want_text).max())
        scores = metric(images)
        assert scores.shape == (2,)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=TOL)


def test_the_real_rn50_maps_key_for_key(pyiqa_clip):
    with torch.device("meta"):
        model = pyiqa_clip.CLIP(**RN50)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fake = {k: np.empty(s, np.float32) if len(s) else np.float32(0) for k, s in shapes.items()}  # shapes only
    config = vision_config({k: v for k, v in fake.items()})
    assert (config.layers, config.width, config.output_dim, config.heads, config.input_resolution) == \
        ((3, 4, 6, 3), 64, 1024, 32, 224)
    text = text_config(fake)
    assert (text.hidden_size, text.num_attention_heads, text.num_hidden_layers, text.projection_dim) == \
        (512, 8, 12, 1024)
    ours = {k: tuple(v.shape) for k, v in flatten_params(init_shapes(config)).items()}
    visual = {k: s for k, s in shapes.items() if k.startswith("visual.")}
    plan = plan_import(visual, ours, vision_table(init_shapes(config)), "RN50 (meta)")
    assert len(plan) == len(ours) == len([k for k in visual if not k.endswith("num_batches_tracked")])
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(int(np.prod(s)) for k, s in visual.items()
                                                             if not k.endswith("num_batches_tracked"))


def test_a_vit_clip_or_a_stray_key_is_refused(pyiqa_clip, tmp_path):
    model = _random_clip(pyiqa_clip, 0)
    state = model.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.attnpool")}, tmp_path / "vit.pt")
    with pytest.raises(ValueError, match=r"vit\.pt: not a ResNet CLIP checkpoint"):
        read_clip_resnet(tmp_path / "vit.pt")
    torch.save({**state, "transformer.extra.weight": torch.zeros(1)}, tmp_path / "stray.pt")
    with pytest.raises(ValueError, match=r"stray\.pt: keys of neither CLIP tower: \['transformer\.extra\.weight'\]"):
        read_clip_resnet(tmp_path / "stray.pt")
