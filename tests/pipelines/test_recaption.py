"""v2 with a captioner (`diffbody restore --recaption DIR`): stage 2 is conditioned on the caption of stage 1's I_res
(the paper's p' = LLaVA(I_res)), run as a second program after stage 1. The denoisers are stubbed
(`test_train_restore_inputs.captured`): only the wiring of text and images is under test here."""

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.conditioning.prompts import tokenize
from diffbody_jax.models.joint_unet import JointUNet
from diffbody_jax.models.stage2 import Stage2Model
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings
from tests.pipelines.test_train_restore_inputs import captured

STUBS = {JointUNet: lambda args: jnp.zeros(args[0].shape[:-1] + (args[0].shape[-1] // 2,)),
         Stage2Model: lambda args: 0.5 * args[0]}
SETTINGS = RestoreSettings(version="v2", steps=1, sampler="ddim", size=64)


def test_stage2_reads_the_caption_of_i_res(stand_in_weights, rng):
    seen = []

    def captioner(image):
        seen.append(image)
        return f"a person, caption {len(seen)}"

    degraded = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    pose = np.zeros_like(degraded)
    key = jax.random.key(int(rng.integers(1 << 30)))
    with captured(Stage2Model, stub=STUBS) as calls:
        restorer = Restorer(stand_in_weights, SETTINGS, captioner=captioner)
        out = restorer.restore(key, degraded, pose, ["the prompt", "the prompt"])
    jax.effects_barrier()
    assert out["caption"] == ["a person, caption 1", "a person, caption 2"]
    np.testing.assert_array_equal(np.stack(seen), out["i_res"])  # the captioner saw I_res
    (_, _, text, _, _), _ = calls["Stage2Model"]
    ids = {name: tokenize(tok, out["caption"]) for name, tok in restorer.tokenizers.items()}
    _, want = restorer.pipeline.encode_text(restorer.variables, ids, (64, 64))
    np.testing.assert_allclose(text.prompt_embeds, np.asarray(want.prompt_embeds), atol=1e-6)
    np.testing.assert_allclose(text.text_embeds, np.asarray(want.text_embeds), atol=1e-6)
