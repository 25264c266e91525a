"""Tokenizers and prompt helpers: padding conventions, truncation, chunking, the offline CLIP vocab."""

import importlib.util
import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.conditioning import prompts
from diffbody_jax.interop.clip import clip_text_table
from diffbody_jax.interop.mapping import torch_to_flax
from diffbody_jax.models.clip import CLIPTextConfig, CLIPTextModel
from tests.torch_ref import needs_torch, optional, randomize_, state_dict_numpy

transformers = pytest.importorskip("transformers")  # every test here needs its tokenizer
torch = optional("torch")

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
    """A tiny byte-level BPE vocabulary: "!" (id 0), letters, letters ending a word, three merges."""
    chars = ["!"] + list(LETTERS)
    merges = ["a t</w>", "c at</w>", "o f</w>"]
    tokens = chars + [c + "</w>" for c in chars] + ["at</w>", "cat</w>", "of</w>", prompts.BOS, prompts.EOS]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": prompts.BOS, "eos_token": prompts.EOS, "unk_token": prompts.EOS, "pad_token": "!"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **special}))
    return tmp_path, {t: i for i, t in enumerate(tokens)}


def test_padding_conventions(tiny_tokenizer_dir):
    folder, vocab = tiny_tokenizer_dir
    bos, eos = vocab[prompts.BOS], vocab[prompts.EOS]
    exclaim = prompts.load_tokenizer(str(folder))  # the folder's special_tokens_map says "!"
    ids = prompts.tokenize(exclaim, ["a cat", "of"], max_length=8)
    assert ids.shape == (2, 8) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0], [bos, vocab["a</w>"], vocab["cat</w>"], eos, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [bos, vocab["of</w>"], eos, 0, 0, 0, 0, 0])
    endoftext = prompts.load_tokenizer(str(folder), pad_token=prompts.PAD_EOS)  # SDXL's first tokenizer
    np.testing.assert_array_equal(prompts.tokenize(endoftext, ["of"], max_length=6)[0],
                                  [bos, vocab["of</w>"], eos, eos, eos, eos])


def test_long_prompt_truncates_with_a_warning_naming_it(tiny_tokenizer_dir, caplog):
    folder, vocab = tiny_tokenizer_dir
    tok = prompts.load_tokenizer(str(folder))
    long = "cat " * 10
    with caplog.at_level(logging.WARNING):
        ids = prompts.tokenize(tok, [long, "cat"], max_length=6)
    assert "prompt truncated to 6 tokens (6 dropped)" in caplog.text and "cat cat" in caplog.text
    assert ids[0, -1] == vocab[prompts.EOS] and list(ids[0, 1:5]) == [vocab["cat</w>"]] * 4


def test_chunked_long_prompts(tiny_tokenizer_dir):
    folder, vocab = tiny_tokenizer_dir
    tok = prompts.load_tokenizer(str(folder))
    ids = prompts.tokenize(tok, ["cat " * 9, "of"], max_length=6, chunked=True)
    assert ids.shape == (2, 3, 6)  # 9 tokens in windows of 4
    bos, eos, cat = vocab[prompts.BOS], vocab[prompts.EOS], vocab["cat</w>"]
    np.testing.assert_array_equal(ids[0, 2], [bos, cat, eos, 0, 0, 0])
    np.testing.assert_array_equal(ids[1, 1], [bos, eos, 0, 0, 0, 0])  # an empty chunk for the short prompt


def test_missing_folder_is_named():
    with pytest.raises(FileNotFoundError, match="tokenizer folder /no/such/dir not found"):
        prompts.load_tokenizer("/no/such/dir")


needs_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                     reason="pip install --no-deps open-clip-torch")


@needs_torch
@needs_open_clip
def test_offline_clip_tokenizer_is_the_real_vocabulary(tmp_path):
    vocab, merges = prompts.clip_vocab_from_bpe(prompts.open_clip_bpe_path())
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab[prompts.BOS] == 49406 and vocab[prompts.EOS] == 49407
    tok = prompts.load_tokenizer(None, pad_token=prompts.PAD_EXCLAIM)
    ids = prompts.tokenize(tok, ["a photo of a cat"])
    np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 49407, 0])
    # The same files through transformers' fast (Rust) tokenizer give the same ids.
    folder = prompts.write_clip_tokenizer_files(tmp_path, prompts.open_clip_bpe_path(), prompts.PAD_EXCLAIM)
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    texts = ["A person in a red jacket, high quality!", "naïve café photo — 4k, 35mm", "hands, feet & face"]
    for text in texts:
        assert tok(text)["input_ids"] == fast(text)["input_ids"], text


def _tiny_encoder(arch, seed, hidden=32, projection=16):
    cfg = transformers.CLIPTextConfig(vocab_size=60, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=8,
                                      projection_dim=projection, bos_token_id=56, eos_token_id=57)
    ref = getattr(transformers, arch)(cfg).eval()
    randomize_(ref, seed)
    ours = CLIPTextModel(CLIPTextConfig.from_dict({**cfg.to_dict(), "architectures": [arch]}))
    return ref, ours, torch_to_flax(state_dict_numpy(ref), clip_text_table(ours.config), ours.param_shapes(), arch)


def _ids(rng, batch, length=8):
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        n = rng.integers(1, length - 2)
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = 56, rng.integers(2, 56, n), 57
    return ids


@needs_torch
def test_sdxl_prompt_embeds_as_diffusers_builds_them(rng):
    """Reference: diffusers' StableDiffusionXLPipeline.encode_prompt concatenates both encoders'
    hidden_states[-2] and takes the second encoder's projected text_embeds as pooled output."""
    ref1, enc1, p1 = _tiny_encoder("CLIPTextModel", 1, hidden=24)
    ref2, enc2, p2 = _tiny_encoder("CLIPTextModelWithProjection", 2)
    ids1, ids2 = _ids(rng, 2), _ids(rng, 2)
    embeds, pooled, time_ids = prompts.sdxl_prompt_embeds(
        enc1, p1, ids1, enc2, p2, ids2, original_size=(768, 512), crop_top_left=(4, 0), target_size=(1024, 1024))
    with torch.no_grad():
        h1 = ref1(torch.from_numpy(ids1).long(), output_hidden_states=True).hidden_states[-2]
        out2 = ref2(torch.from_numpy(ids2).long(), output_hidden_states=True)
    want = torch.cat([h1, out2.hidden_states[-2]], dim=-1).numpy()
    assert embeds.shape == (2, 8, 24 + 32)
    assert np.abs(np.asarray(embeds) - want).max() <= 1e-4
    assert np.abs(np.asarray(pooled) - out2.text_embeds.numpy()).max() <= 1e-4
    np.testing.assert_array_equal(np.asarray(time_ids), [[768, 512, 4, 0, 1024, 1024]] * 2)


@needs_torch
def test_sd21_embeds_and_chunked_encoding(rng):
    ref, enc, params = _tiny_encoder("CLIPTextModel", 3)
    ids = _ids(rng, 3)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert np.abs(np.asarray(prompts.sd21_prompt_embeds(enc, params, ids)) - want).max() <= 1e-4
    chunked = np.stack([ids, _ids(rng, 3)], axis=1)  # [B, 2 chunks, T]
    out = prompts.sd21_prompt_embeds(enc, params, jnp.asarray(chunked))
    assert out.shape == (3, 16, 32)
    np.testing.assert_allclose(np.asarray(out[:, :8]), want, atol=1e-4)


@needs_torch
def test_prompt_level_helpers(tiny_tokenizer_dir):
    folder, vocab = tiny_tokenizer_dir
    eos = vocab[prompts.EOS]
    cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
               bos_token_id=vocab[prompts.BOS], eos_token_id=eos)
    encoders = []
    for seed, arch in enumerate(["CLIPTextModel", "CLIPTextModelWithProjection"]):
        ref = getattr(transformers, arch)(transformers.CLIPTextConfig(**cfg)).eval()
        randomize_(ref, seed)
        ours = CLIPTextModel(CLIPTextConfig.from_dict({**ref.config.to_dict(), "architectures": [arch]}))
        params = torch_to_flax(state_dict_numpy(ref), clip_text_table(ours.config), ours.param_shapes(), arch)
        encoders.append((ref, ours, params))
    tok_bang = prompts.load_tokenizer(str(folder))
    tok_eos = prompts.load_tokenizer(str(folder), pad_token=prompts.PAD_EOS)
    texts = ["a cat", "of a cat at a"]
    (ref1, enc1, p1), (ref2, enc2, p2) = encoders
    sd21 = prompts.sd21_conditioning(texts, tok_bang, enc1, p1)
    with torch.no_grad():
        want = ref1(torch.from_numpy(prompts.tokenize(tok_bang, texts)).long()).last_hidden_state.numpy()
    assert sd21.shape == (2, 77, 32) and np.abs(np.asarray(sd21) - want).max() <= 1e-4
    embeds, pooled, time_ids = prompts.sdxl_conditioning(texts, (tok_eos, enc1, p1), (tok_bang, enc2, p2))
    assert embeds.shape == (2, 77, 64) and pooled.shape == (2, 16) and time_ids.shape == (2, 6)
    with torch.no_grad():
        out2 = ref2(torch.from_numpy(prompts.tokenize(tok_bang, texts)).long())
    assert np.abs(np.asarray(pooled) - out2.text_embeds.numpy()).max() <= 1e-4


@needs_open_clip
@pytest.mark.parametrize("folder,pad_id", [
    ("sd21-base/tokenizer", 0),            # "!" from special_tokens_map.json
    ("sdxl-base/tokenizer", 49407),        # <|endoftext|>
    ("sdxl-base/tokenizer_2", 0),          # "!"
])
def test_real_tokenizer_configs_pad_as_diffusers_pipelines(folder, pad_id):
    from tests.torch_ref import REPO

    tok = prompts.load_tokenizer(str(REPO / "configs/diffusers" / folder))
    ids = prompts.tokenize(tok, ["a photo of a cat"])
    assert ids.shape == (1, 77)
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert set(ids[0, 7:].tolist()) == {pad_id}
