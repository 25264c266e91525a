"""`diffbody prepare` (tiny v1, stage 1 and stage 2): latents and text embeddings encoded once and read back give the
same loss as the encoders run in the step, on the same batch and key; a cache made for another config is refused."""

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


FIELDS = {
    "stage2_controlnet": ("latents", "prompt_embeds", "text_embeds"),
    "stage1_controlnet": ("context", "latents_depth", "latents_normal", "latents_pose", "latents_rgb"),
    "v1_controlnet": ("context", "latents_pose", "latents_rgb"),
}


@pytest.mark.slow  # ~140 s each on 2 cold cores (five jitted functions of a phase's group)
@pytest.mark.parametrize("phase", sorted(FIELDS))
def test_cached_and_in_step_encodings_give_the_same_loss(tmp_path, phase):
    manifest = write_sample_set(tmp_path / "sample", stand_in_priors=True)
    overrides = [f"data.manifest={manifest}", "data.random_crop=False", "data.batch_size=2"]
    config = load_config(f"{phase}:variant=tiny", overrides)
    prepare_cache(config, tmp_path / "cache")
    cache = EncodedCache(tmp_path / "cache", config)
    assert cache.fields == FIELDS[phase]
    assert len(cache.entries) == 4 * len(FIELDS[phase])  # every record of the manifest, not only full batches

    s = setup(config)
    variables = init_state(s, config).variables()
    spec = s.phase
    host = spec.host(config)(next(make_data_iterator(config, spec)))
    loss = jax.jit(spec.loss_fn(s.module, config))
    key = jax.random.key(4)
    with jax.set_mesh(s.mesh):
        in_step = float(loss(variables, global_batch(_loss_inputs(host, spec), s.mesh), key)[0])
        filled = cache.fill(host)
        cached = float(loss(variables, global_batch(_loss_inputs(filled, spec, cache.fields), s.mesh), key)[0])
    print(f"{phase}: loss in the step {in_step:.8f}, from the cache {cached:.8f}, "
          f"difference {abs(in_step - cached):.2e}")
    assert abs(in_step - cached) <= 1e-5 and in_step > 0

    other = load_config(f"{phase}:variant=tiny", [*overrides, "text.fallback='a person'"])
    with pytest.raises(ValueError, match="prepared for text="):
        EncodedCache(tmp_path / "cache", other)
    with pytest.raises(ValueError, match="random_crop=False"):
        EncodedCache(tmp_path / "cache", load_config(f"{phase}:variant=tiny", [f"data.manifest={manifest}"]))
    with pytest.raises(ValueError, match="colour_permutation=False"):
        permuted = load_config(f"{phase}:variant=tiny", [*overrides, "data.colour_permutation=True"])
        EncodedCache(tmp_path / "cache", permuted)


def test_a_cache_refuses_permuted_colours_before_encoding_anything():
    from diffbody_jax.training.cache import check_cacheable

    config = load_config("v1_controlnet:variant=tiny", ["data.random_crop=False", "text.drop_prob=0",
                                                         "data.colour_permutation=True"])
    with pytest.raises(ValueError, match="colour_permutation=False"):
        check_cacheable(config)


def test_a_prepare_writes_bounded_shards_as_it_goes_and_training_reads_them_all(tmp_path):
    """The writer flushes a shard whenever its arrays reach the bound (memory holds one shard, whatever the data
    set's size); the index lists every shard, and the training side's cache reads each record's arrays back."""
    import json

    import numpy as np

    from diffbody_jax.training.cache import fingerprint
    from diffbody_jax.training.prepare import _ShardWriter

    rng = np.random.default_rng(0)
    arrays = {f"{r}/latents": rng.standard_normal(250).astype(np.float32) for r in range(10)}  # 1000 bytes each
    writer = _ShardWriter(tmp_path, 0, 1, limit=2500)
    held = []
    for key, value in arrays.items():
        writer.add(key, value)
        held.append(writer.bytes)
    writer.close()
    assert max(held) < 2500 and writer.shards == [f"shard-00000-{k:05d}.npz" for k in range(4)]
    assert writer.peak_bytes == 3000  # three arrays reach the bound, then go to disk
    assert json.loads((tmp_path / "index-00000-of-00001.json").read_text())["shards"] == writer.shards
    assert [len(np.load(tmp_path / s).files) for s in writer.shards] == [3, 3, 3, 1]

    config = load_config("v1_controlnet:variant=tiny", ["data.manifest=m.jsonl", "data.random_crop=False"])
    (tmp_path / "cache.json").write_text(json.dumps({**fingerprint(config), "fields": ["latents"], "processes": 1,
                                                     "records": 10}))
    filled = EncodedCache(tmp_path, config).fill({"record": np.array([7, 2])})
    np.testing.assert_array_equal(filled["latents"], np.stack([arrays["7/latents"], arrays["2/latents"]]))
    (tmp_path / "shard-00000-00002.npz").unlink()
    with pytest.raises(ValueError, match="names shard-00000-00002.npz, which is missing"):
        EncodedCache(tmp_path, config)
