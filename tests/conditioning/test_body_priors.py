"""The body attention map I_attn (seed 000, Eq. 3) against torch's resampling of the network's foreground."""

import jax
import numpy as np
import pytest

from diffbody_jax.conditioning.body_priors import body_attention_map
from diffbody_jax.models.bodypart import BodyPartNet, preprocess
from diffbody_jax.models.variables import random_variables
from tests.torch_ref import bodypart_config

torch = pytest.importorskip("torch")


def test_attention_map_is_the_resized_foreground(rng):
    """I_attn = 1 - P(background) of the body-part net, resized bilinearly: at image size (upsampling) as
    torch's interpolate(align_corners=False), at latent size (downsampling) as torch's antialiased bilinear."""
    net = BodyPartNet(config=bodypart_config())
    variables = random_variables(net, seed=int(rng.integers(1 << 30)))
    image = rng.uniform(0, 1, (2, 96, 64, 3)).astype(np.float32)
    attn = jax.jit(lambda v, x: body_attention_map(net, v, x))(variables, image)
    assert attn.latent.shape == (2, 12, 8, 1) and attn.image.shape == (2, 96, 64, 1)
    probs = np.asarray(jax.jit(lambda v, x: net.apply(v, preprocess(x, net.config)).part_probs)(variables, image),
                       np.float64)
    foreground = torch.from_numpy(1.0 - probs[..., 0])[:, None]  # [B, 1, 16, 8]
    want_image = torch.nn.functional.interpolate(foreground, size=(96, 64), mode="bilinear", align_corners=False)
    want_latent = torch.nn.functional.interpolate(foreground, size=(12, 8), mode="bilinear", align_corners=False,
                                                  antialias=True)
    np.testing.assert_allclose(np.asarray(attn.image)[..., 0], want_image[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(attn.latent)[..., 0], want_latent[:, 0].numpy(), atol=1e-5)
    assert float(np.std(attn.image)) > 1e-3  # a map with structure, so the comparison means something
    with pytest.raises(ValueError, match="not a multiple of the latent factor 8"):
        body_attention_map(net, variables, image[:, :90])
