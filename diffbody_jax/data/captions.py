"""The prompt each training example is trained with: its manifest caption, a fallback, or none.

    policy = CaptionPolicy(fallback="a photo of a person", drop_prob=0.05)
    prompts = policy.prompts(batch["caption"], batch["record"], batch["epoch"], seed)

- An empty caption becomes `fallback` (manifests may leave captions out).
- With probability `drop_prob` an example's prompt is "" (the empty prompt): the unconditional examples that
  classifier-free guidance needs at inference. The draw is a function of (seed, epoch, record) only, like every
  other random choice of the pipeline, so a resumed run drops the same examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class CaptionPolicy:
    fallback: str = "a photo of a person"
    drop_prob: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"caption drop probability {self.drop_prob} must lie in [0, 1]")

    def prompts(self, captions: Sequence[str], records: Sequence[int], epochs: Sequence[int], seed: int) -> list[str]:
        out = []
        for caption, record, epoch in zip(captions, records, epochs, strict=True):
            draw = np.random.default_rng([seed, int(epoch), int(record), 2]).random()
            if draw < self.drop_prob:
                out.append("")
            else:
                caption = str(caption).strip()
                out.append(caption or self.fallback)
        return out
