"""CLIP text and vision towers: parity with transformers on tiny random configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop.clip import clip_text_table, clip_vision_table
from diffbody_jax.interop.mapping import torch_to_flax
from diffbody_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from tests.torch_ref import needs_torch, optional, randomize_, state_dict_numpy

torch = optional("torch")
transformers = optional("transformers")

TOL = 1e-4
TEXT = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
            max_position_embeddings=16, projection_dim=24, bos_token_id=118, eos_token_id=119, pad_token_id=1)


def _text_pair(arch, **overrides):
    cfg = transformers.CLIPTextConfig(**{**TEXT, **overrides})
    ref = getattr(transformers, arch)(cfg).eval()
    randomize_(ref, seed=1)
    ours = CLIPTextModel(CLIPTextConfig.from_dict({**cfg.to_dict(), "architectures": [arch]}))
    params = torch_to_flax(state_dict_numpy(ref), clip_text_table(ours.config), ours.param_shapes(), arch)
    return ref, ours, params


def _ids(rng, eos, batch=3, length=16, vocab=118):
    """Prompts of random lengths: BOS, tokens, EOS, then padding with id 0 (SD2.1's "!")."""
    ids = np.zeros((batch, length), np.int64)
    for b in range(batch):
        n = rng.integers(1, length - 2)
        ids[b, 0] = 118
        ids[b, 1:n + 1] = rng.integers(2, vocab, n)
        ids[b, n + 1] = eos
    return ids


@needs_torch
@pytest.mark.parametrize("arch,act,eos", [
    ("CLIPTextModel", "gelu", 119),                   # SD2.1's OpenCLIP-H tower: first EOS position
    ("CLIPTextModel", "quick_gelu", 2),               # SDXL's CLIP-L (legacy eos_token_id 2: argmax pooling)
    ("CLIPTextModelWithProjection", "gelu", 2),       # SDXL's bigG with projection
])
def test_text_parity(arch, act, eos, rng):
    ref, ours, params = _text_pair(arch, hidden_act=act, eos_token_id=eos)
    ids = _ids(rng, eos=119)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = jax.jit(lambda p, i: ours.apply({"params": p}, i))(params, jnp.asarray(ids))
    assert np.abs(np.asarray(got["last_hidden_state"]) - want.last_hidden_state.numpy()).max() <= TOL
    assert np.abs(np.asarray(got["hidden_states"][-2]) - want.hidden_states[-2].numpy()).max() <= TOL
    assert len(got["hidden_states"]) == len(want.hidden_states)
    if arch == "CLIPTextModel":
        assert np.abs(np.asarray(got["pooled"]) - want.pooler_output.numpy()).max() <= TOL
    else:
        assert np.abs(np.asarray(got["text_embeds"]) - want.text_embeds.numpy()).max() <= TOL


@needs_torch
def test_text_is_causal(rng):
    _, ours, params = _text_pair("CLIPTextModel")
    ids = _ids(rng, eos=119, batch=1)
    changed = ids.copy()
    changed[0, -1] = 7
    a = ours.apply({"params": params}, jnp.asarray(ids))["last_hidden_state"]
    b = ours.apply({"params": params}, jnp.asarray(changed))["last_hidden_state"]
    np.testing.assert_array_equal(np.asarray(a)[:, :-1], np.asarray(b)[:, :-1])


@needs_torch
def test_vision_parity(rng):
    cfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=3, image_size=28, patch_size=7, projection_dim=24,
                                        hidden_act="gelu")
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
    randomize_(ref, seed=2)
    ours = CLIPVisionModel(CLIPVisionConfig.from_dict(
        {**cfg.to_dict(), "architectures": ["CLIPVisionModelWithProjection"]}))
    params = torch_to_flax(state_dict_numpy(ref), clip_vision_table(ours.config), ours.param_shapes(), "vision")
    x = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), output_hidden_states=True)
    got = jax.jit(lambda p, x: ours.apply({"params": p}, x))(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(got["image_embeds"]) - want.image_embeds.numpy()).max() <= TOL
    assert np.abs(np.asarray(got["hidden_states"][-2]) - want.hidden_states[-2].numpy()).max() <= TOL
    assert np.abs(np.asarray(got["last_hidden_state"]) - want.last_hidden_state.numpy()).max() <= TOL


def test_config_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"te/config.json: CLIP text config fields not supported: rope_theta"):
        CLIPTextConfig.from_dict({**TEXT, "rope_theta": 1.0}, "te/config.json")
    with pytest.raises(ValueError, match="hidden_act='relu' not supported"):
        CLIPTextConfig.from_dict({**TEXT, "hidden_act": "relu"})
