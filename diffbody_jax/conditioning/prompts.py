"""Prompts to what each UNet wants: CLIP tokenizers (local folders or built offline) and encoder helpers.

    tok = load_tokenizer("stable-diffusion-2-1-base/tokenizer")      # a local folder, never the hub
    tok = load_tokenizer(None, pad_token="!")                       # built from open-clip-torch's BPE file
    ids = tokenize(tok, ["a photo of a person"])                    # [B, 77] int32
    embeds = sd21_prompt_embeds(text_encoder, params, ids)          # [B, 77, 1024]

Padding follows diffusers' pipelines: SD2.1's tokenizer and SDXL's second tokenizer pad with "!" (id 0,
set in their special_tokens_map.json); SDXL's first tokenizer pads with <|endoftext|> (id 49407).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from diffbody_jax.models.unet import SDXLText

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_EXCLAIM, PAD_EOS = "!", EOS  # SD2.1 and SDXL's text_encoder_2 / SDXL's text_encoder
MAX_LENGTH = 77
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


# ------------------------------------------------------------------------------------ tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character map (the GPT-2 byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_vocab_from_bpe(bpe_gz: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the real CLIP tokenizer, derived from its BPE merges file.

    The vocabulary is the 256 byte characters, the same with the end-of-word mark, one token per merge
    (the first 48,894 merges), then <|startoftext|> and <|endoftext|>: 49,408 tokens.
    """
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def open_clip_bpe_path() -> Path:
    """The BPE file inside the installed open-clip-torch wheel, found without importing open_clip
    (importing it needs torchvision, which cannot sit beside the CPU torch build)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no tokenizer folder given and open-clip-torch is not installed: pass a local tokenizer folder, or "
            "`pip install --no-deps open-clip-torch` (it ships CLIP's BPE merges file)"
        )
    path = Path(spec.origin).parent / BPE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: open-clip-torch is installed but lacks {BPE_FILE}")
    return path


def _write_vocab_files(folder: Path, bpe_gz: str | os.PathLike) -> None:
    vocab, merges = clip_vocab_from_bpe(bpe_gz)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_clip_tokenizer_files(folder: str | os.PathLike, bpe_gz: str | os.PathLike, pad_token: str) -> Path:
    """Write vocab.json, merges.txt and the special-token files of a CLIPTokenizer folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_vocab_files(folder, bpe_gz)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True, **special}))
    return folder


@functools.lru_cache(maxsize=8)
def load_tokenizer(folder: str | None = None, pad_token: str | None = None):
    """A transformers CLIPTokenizer from a local folder (never the hub), or, when `folder` is None, the
    real CLIP tokenizer built offline from open-clip-torch's BPE file.

    A folder holding only tokenizer_config.json / special_tokens_map.json (like configs/diffusers/*/tokenizer)
    gets CLIP's vocab.json and merges.txt from the BPE file, and keeps its own special tokens.
    pad_token: override the folder's pad token ("!" or "<|endoftext|>"); required when building offline.
    """
    from transformers import CLIPTokenizer

    if folder is not None and not Path(folder).is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} not found")
    if folder is None and pad_token is None:
        raise ValueError('building the CLIP tokenizer offline needs pad_token: "!" (SD2.1, SDXL text_encoder_2) '
                         'or "<|endoftext|>" (SDXL text_encoder)')
    kwargs = {} if pad_token is None else {"pad_token": pad_token}
    if folder is not None and (Path(folder) / "vocab.json").exists() and (Path(folder) / "merges.txt").exists():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    # the vocabulary is written to a scratch folder that goes once the tokenizer has read it into memory
    with tempfile.TemporaryDirectory(prefix="clip_tokenizer_") as scratch:
        if folder is None:
            write_clip_tokenizer_files(scratch, open_clip_bpe_path(), pad_token)
        else:
            _write_vocab_files(Path(scratch), open_clip_bpe_path())
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                if (Path(folder) / name).exists():
                    (Path(scratch) / name).write_text((Path(folder) / name).read_text())
        return CLIPTokenizer.from_pretrained(scratch, local_files_only=True, **kwargs)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH, chunked: bool = False) -> np.ndarray:
    """Token ids, padded to `max_length` with the tokenizer's pad token.

    Default: [B, max_length]; a longer prompt is truncated (ending in EOS, as CLIP was trained) with a
    warning that names it. chunked=True instead splits every prompt into windows of max_length - 2 tokens,
    each wrapped in BOS ... EOS, and returns [B, n_chunks, max_length] (n_chunks the most any prompt
    needs; absent chunks are empty prompts). Encode each chunk and concatenate along the sequence axis:
    the UNet's cross-attention accepts any length.
    """
    prompts = list(prompts)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    body = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max_length - 2
    if not chunked:
        for p, ids in zip(prompts, body, strict=True):
            if len(ids) > width:
                shown = p if len(p) <= 80 else p[:77] + "..."
                log.warning("prompt truncated to %d tokens (%d dropped): %r", max_length, len(ids) - width, shown)
        windows = [[ids[:width]] for ids in body]
    else:
        windows = [[ids[i : i + width] for i in range(0, max(len(ids), 1), width)] for ids in body]
    n = max(len(w) for w in windows)
    out = np.full((len(prompts), n, max_length), pad, np.int32)
    for b, ws in enumerate(windows):
        for c in range(n):
            ids = [bos] + (ws[c] if c < len(ws) else []) + [eos]
            out[b, c, : len(ids)] = ids
    return out if chunked else out[:, 0]


# ----------------------------------------------------------------------------- encoder helpers
def _encode(encoder, params, ids):
    """Run a CLIP text encoder on [B, T] or chunked [B, n, T] ids; chunks are concatenated on T."""
    ids = jnp.asarray(ids)
    if ids.ndim == 2:
        return encoder.apply({"params": params}, ids)
    b, n, t = ids.shape
    out = encoder.apply({"params": params}, ids.reshape(b * n, t))
    seq = lambda x: x.reshape(b, n * t, *x.shape[2:])  # noqa: E731
    first = lambda x: x.reshape(b, n, *x.shape[1:])[:, 0]  # noqa: E731 - pooled: the first chunk's
    result = {
        "last_hidden_state": seq(out["last_hidden_state"]),
        "hidden_states": tuple(map(seq, out["hidden_states"])),
        "pooled": first(out["pooled"]),
    }
    if "text_embeds" in out:
        result["text_embeds"] = first(out["text_embeds"])
    return result


def sd21_prompt_embeds(encoder, params, ids) -> jnp.ndarray:
    """SD2.1's conditioning: the text encoder's last_hidden_state (after the final norm), [B, 77, 1024]."""
    return _encode(encoder, params, ids)["last_hidden_state"]


def sdxl_time_ids(original_size, crop_top_left, target_size, batch: int | None = None) -> jnp.ndarray:
    """SDXL's add_time_ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w), [B, 6] float32: the one
    builder training (per example: the photo's size and the crop's place) and restoring (the photo as the bucket
    holds it, no crop) call.

    Each argument is one (H, W) / (top, left) pair or a [B, 2] array of them (per example); `batch` broadcasts
    pairs to B rows (default: the arrays' batch, else 1)."""
    parts = [jnp.asarray(x, jnp.float32) for x in (original_size, crop_top_left, target_size)]
    if batch is None:
        batch = max((p.shape[0] for p in parts if p.ndim == 2), default=1)
    parts = [jnp.broadcast_to(p.reshape(-1, 2), (batch, 2)) for p in parts]
    return jnp.concatenate(parts, axis=-1)


def sdxl_prompt_embeds(
    encoder_1, params_1, ids_1, encoder_2, params_2, ids_2, *,
    original_size=(1024, 1024), crop_top_left=(0, 0), target_size=(1024, 1024),
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """SDXL's conditioning, as diffusers' pipeline builds it.

    Returns (prompt_embeds [B, 77, 768 + 1280]: both encoders' penultimate hidden states, concatenated;
    pooled [B, 1280]: the second encoder's projected EOS embedding; add_time_ids [B, 6]).
    """
    out_1 = _encode(encoder_1, params_1, ids_1)
    out_2 = _encode(encoder_2, params_2, ids_2)
    embeds = jnp.concatenate([out_1["hidden_states"][-2], out_2["hidden_states"][-2]], axis=-1)
    pooled = out_2["text_embeds"]
    return SDXLText(embeds, pooled, sdxl_time_ids(original_size, crop_top_left, target_size, embeds.shape[0]))


def sd21_conditioning(prompts: Sequence[str], tokenizer, encoder, params, chunked: bool = False) -> jnp.ndarray:
    """Prompts -> SD2.1's encoder_hidden_states [B, 77 (x chunks), 1024]."""
    return sd21_prompt_embeds(encoder, params, tokenize(tokenizer, prompts, chunked=chunked))


def sdxl_conditioning(prompts: Sequence[str], first, second, chunked: bool = False, **time_ids):
    """Prompts -> SDXL's `SDXLText(prompt_embeds [B, 77, 2048], text_embeds [B, 1280], time_ids [B, 6])`.

    first, second: (tokenizer, encoder, params) of text_encoder and text_encoder_2. time_ids: keyword
    overrides of original_size, crop_top_left and target_size (default 1024x1024, no crop).
    """
    (tok_1, enc_1, p_1), (tok_2, enc_2, p_2) = first, second
    ids_1 = tokenize(tok_1, prompts, chunked=chunked)
    ids_2 = tokenize(tok_2, prompts, chunked=chunked)
    return sdxl_prompt_embeds(enc_1, p_1, ids_1, enc_2, p_2, ids_2, **time_ids)
