"""Caption policy: fallback for empty captions, dropped prompts at the asked rate, reproducible per example."""

import numpy as np
import pytest

from diffbody_jax.data.captions import CaptionPolicy


def test_fallback_and_drop_rate(seed):
    n = 4000
    captions = ["a person"] * (n // 2) + [""] * (n // 2)
    records, epochs = np.arange(n), np.zeros(n, int)
    prompts = CaptionPolicy(fallback="someone", drop_prob=0.1).prompts(captions, records, epochs, seed)
    dropped = np.mean([p == "" for p in prompts])
    assert abs(dropped - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n)  # 4 sigma of a binomial
    kept = [(c, p) for c, p in zip(captions, prompts, strict=True) if p]
    assert all(p == (c or "someone") for c, p in kept)
    assert CaptionPolicy().prompts(["", " x "], [0, 1], [0, 0], seed) == ["a photo of a person", "x"]


def test_the_same_example_gets_the_same_prompt_and_epochs_differ(seed):
    policy = CaptionPolicy(drop_prob=0.5)
    a = policy.prompts(["c"] * 200, range(200), [3] * 200, seed)
    b = policy.prompts(["c"] * 200, range(200), [3] * 200, seed)
    c = policy.prompts(["c"] * 200, range(200), [4] * 200, seed)
    assert a == b and a != c
    with pytest.raises(ValueError, match="drop probability 1.5"):
        CaptionPolicy(drop_prob=1.5)
