"""CLIP-IQA (Wang, Chan and Loy, AAAI 2023, "Exploring CLIP for Assessing the Look and Feel of Images"): a
no-reference quality score from CLIP's ResNet-50, in JAX, batched and jitted.

    metric = CLIPIQA.from_file("RN50.pt")             # OpenAI's file or an open_clip RN50 state dict
    scores = metric(images)                           # [B, H, W, 3] RGB in [0, 1] -> [B] in (0, 1), higher is better

The paper's formula: an antonym prompt pair (t+, t-) = ("Good photo.", "Bad photo."); the image's and prompts'
CLIP embeddings x, t are L2-normalised; with CLIP's logit scale s (100), the score is the softmax of
(s cos(x, t+), s cos(x, t-)) at t+. The image is scored at its own size: the attention pool's positional embedding
is left out, as the paper does to avoid resizing. Images are normalised with CLIP's mean and std.

`prompts="pyiqa"` averages the scores of pyiqa's five pairs instead ("Good image" / "bad image", "Sharp image" /
"blurry image", "sharp edges" / "blurry edges", "High resolution image" / "low resolution image", "Noise-free image"
/ "noisy image"): the variant most restoration papers report through pyiqa's `clipiqa`. CLIP-IQA+ (learned prompts)
is not provided.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.conditioning.prompts import load_tokenizer, tokenize
from diffbody_jax.interop.clip_resnet import CLIPResNetCheckpoint, read_clip_resnet
from diffbody_jax.models.clip import CLIPTextModel
from diffbody_jax.models.clip_resnet import CLIPResNet

PAPER_PROMPTS = (("Good photo.", "Bad photo."),)
PYIQA_PROMPTS = (("Good image", "bad image"), ("Sharp image", "blurry image"), ("sharp edges", "blurry edges"),
                 ("High resolution image", "low resolution image"), ("Noise-free image", "noisy image"))
PROMPT_SETS = {"paper": PAPER_PROMPTS, "pyiqa": PYIQA_PROMPTS}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=(0,))
def _scores(net: CLIPResNet, variables, text_embeds, logit_scale, images):
    x = (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    image_embeds = _unit(net.apply(variables, x, pos_embedding=False))
    logits = logit_scale * image_embeds @ _unit(text_embeds).T  # [B, 2 * pairs]: (t+, t-) per pair
    pairs = jax.nn.softmax(logits.reshape(logits.shape[0], -1, 2), axis=-1)
    return pairs[..., 0].mean(-1)


class CLIPIQA:
    """CLIP-IQA with a ResNet CLIP (module docstring). prompts: "paper" (one pair) or "pyiqa" (five pairs)."""

    def __init__(self, checkpoint: CLIPResNetCheckpoint, prompts: str = "paper"):
        if prompts not in PROMPT_SETS:
            raise ValueError(f"CLIP-IQA prompts {prompts!r}; expected one of {sorted(PROMPT_SETS)}")
        self.checkpoint, self.prompts = checkpoint, PROMPT_SETS[prompts]
        self.net = CLIPResNet(checkpoint.vision)
        self.variables = jax.tree.map(jnp.asarray, checkpoint.vision_variables)
        texts = [t for pair in self.prompts for t in pair]
        ids = tokenize(load_tokenizer(None, pad_token="!"), texts, checkpoint.text.max_position_embeddings)
        text = CLIPTextModel(checkpoint.text)
        self.text_embeds = text.apply({"params": checkpoint.text_params}, jnp.asarray(ids))["text_embeds"]

    @classmethod
    def from_file(cls, path: str | os.PathLike, prompts: str = "paper") -> CLIPIQA:
        return cls(read_clip_resnet(path), prompts)

    def __call__(self, images) -> np.ndarray:
        """[B, H, W, 3] RGB in [0, 1] (H, W at least 32) -> [B] scores in (0, 1)."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 32:
            raise ValueError(f"CLIP-IQA: expected [B, H, W, 3] images of at least 32 px, got {images.shape}")
        return np.asarray(_scores(self.net, self.variables, self.text_embeds,
                                  jnp.float32(self.checkpoint.logit_scale), images))
