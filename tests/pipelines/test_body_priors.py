"""The body attention map I_attn (seed 000, Eq. 3): shapes, range, jit."""

import jax
import numpy as np
import pytest

from diffbody_jax.models.bodypart import BodyPartConfig, BodyPartNet, preprocess
from diffbody_jax.pipelines.body_priors import body_attention_map


def test_attention_map_at_latent_and_image_resolution(rng):
    net = BodyPartNet(config=BodyPartConfig.tiny())
    variables = net.init_variables(jax.random.key(0))
    image = rng.uniform(0, 1, (2, 96, 64, 3)).astype(np.float32)
    attn = jax.jit(lambda v, x: body_attention_map(net, v, x))(variables, image)
    assert attn.latent.shape == (2, 12, 8, 1) and attn.image.shape == (2, 96, 64, 1)
    for m in attn:
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0 and float(m.std()) > 0
    # the network's own map (16 x 8 for a 64 x 32 input) resized: same mean up to resampling
    fg = net.apply(variables, preprocess(image, net.config)).foreground
    np.testing.assert_allclose(np.asarray(attn.image).mean((1, 2, 3)), np.asarray(fg).mean((1, 2)), atol=0.02)
    with pytest.raises(ValueError, match="not a multiple of the latent factor 8"):
        body_attention_map(net, variables, image[:, :90])
