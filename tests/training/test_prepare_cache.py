"""`diffbody prepare` (stage 2, tiny): latents and SDXL text embeddings encoded once and read back give the same
loss as the encoders run in the step, on the same batch and key; a cache made for another config is refused."""

import jax
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.parallel.sharding import global_batch
from diffbody_jax.training.cache import EncodedCache
from diffbody_jax.training.engine import _loss_inputs, init_state, make_data_iterator, setup
from diffbody_jax.training.prepare import prepare_cache
from tests.torch_ref import optional

transformers = optional("transformers")
pytestmark = pytest.mark.skipif(transformers is None, reason="CLIP's tokenizers come from transformers")


@pytest.mark.slow  # ~140 s on 2 cold cores (five jitted functions of the stage-2 group)
def test_cached_and_in_step_encodings_give_the_same_loss(tmp_path):
    manifest = write_sample_set(tmp_path / "sample", stand_in_priors=True)
    config = load_config("stage2_controlnet:variant=tiny", [f"data.manifest={manifest}", "data.random_crop=False",
                                                            "data.batch_size=2"])
    prepare_cache(config, tmp_path / "cache")
    cache = EncodedCache(tmp_path / "cache", config)
    assert cache.fields == ("latents", "prompt_embeds", "text_embeds")
    assert len(cache.entries) == 4 * 3  # every record of the manifest, not only those of full batches

    s = setup(config)
    variables = init_state(s, config).variables()
    phase = s.phase
    host = phase.host(config)(next(make_data_iterator(config, phase)))
    loss = jax.jit(phase.loss_fn(s.module, config))
    key = jax.random.key(4)
    with jax.set_mesh(s.mesh):
        in_step = float(loss(variables, global_batch(_loss_inputs(host, phase), s.mesh), key)[0])
        filled = cache.fill(host)
        cached = float(loss(variables, global_batch(_loss_inputs(filled, phase, cache.fields), s.mesh), key)[0])
    print(f"loss in the step {in_step:.8f}, from the cache {cached:.8f}, difference {abs(in_step - cached):.2e}")
    assert abs(in_step - cached) <= 1e-5 and in_step > 0

    other = load_config("stage2_controlnet:variant=tiny", [f"data.manifest={manifest}", "data.random_crop=False",
                                                           "text.fallback='a person'"])
    with pytest.raises(ValueError, match="prepared for text="):
        EncodedCache(tmp_path / "cache", other)
    with pytest.raises(ValueError, match="random_crop=False"):
        EncodedCache(tmp_path / "cache", load_config("stage2_controlnet:variant=tiny", [f"data.manifest={manifest}"]))
