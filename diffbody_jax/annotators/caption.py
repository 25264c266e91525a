"""Captions from a local transformers image-to-text folder (BLIP, as the v2 paper captioned its data, or any model
`AutoModelForImageTextToText` loads), for manifests whose captions are empty. Nothing is downloaded
(`local_files_only`): save the model and its processor into a folder first.

    captioner = Captioner("models/blip-image-captioning-large")
    captioner(image)   # -> "a man in a red coat standing on a street"

Greedy decoding (`max_new_tokens`, default 30), so a caption is a function of the image and the weights only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffbody_jax.annotators.base import AnnotatorError, as_uint8


class Captioner:
    def __init__(self, folder: str | os.PathLike, *, max_new_tokens: int = 30, prompt: str | None = None):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise AnnotatorError(f"captioner {folder}: no config.json there (a local transformers folder with the "
                                 "model and its processor, e.g. BLIP saved by save_pretrained)")
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as e:
            raise AnnotatorError(f"captioner {folder}: needs transformers and torch (the `torch` extra): {e}") from None
        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
        self.max_new_tokens, self.prompt = max_new_tokens, prompt

    def __call__(self, image: np.ndarray) -> str:
        rgb = as_uint8(image)
        kwargs = {"text": self.prompt} if self.prompt else {}
        inputs = self.processor(images=rgb[..., :3], return_tensors="pt", **kwargs)
        with self.torch.no_grad():
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
