"""The trainable-parameter count of each phase's default (paper) variant, by jax.eval_shape: equal to README's table
and to what the papers describe, from counts measured independently (../shared/reference/configs: the diffusers
models built on torch's meta device) plus the parts DiffBody adds."""

import re

import jax
import pytest
from flax import linen as nn

from diffbody_jax.config import load_config
from diffbody_jax.models.registry import build_model
from diffbody_jax.training.phases import get_phase
from tests.torch_ref import REPO

SD21_UNET = 865_910_724  # stabilityai/stable-diffusion-2-1-base unet, measured on the meta device
SD21_CONTROLNET = 364_228_240  # an SD2.1 ControlNet (3-channel pixel hint)
SDXL_CONTROLNET = 1_251_014_160
PIXEL_HINT_EMBEDDING = 1_086_480  # ControlNet's hint embedding 3 -> 16 -> 32 -> 96 -> 256 -> 320 (3x3 convs)
CONV_IN_4_MORE = 4 * 320 * 9  # conv_in widened by the pose latent's 4 channels


def _latent_embedding(channels: int) -> int:
    return channels * 320 * 9 + 320  # a 3x3 conv from the latent condition to the first block's width


PAPER = {
    # v2 stage 1 trains only the SD branch: one SD2.1 UNet, whose conv_in also sees the pose latent
    "stage1_joint_unet": SD21_UNET + CONV_IN_4_MORE,
    # seed 000: an SD2.1 ControlNet whose pixel hint is replaced by the 9-channel latent condition
    "v1_controlnet": SD21_CONTROLNET - PIXEL_HINT_EMBEDDING + _latent_embedding(9),
    # seed 002 Eq. 2: the same on c_r (4 channels), seeing the RGB branch's 8-channel input
    "stage1_controlnet": SD21_CONTROLNET - PIXEL_HINT_EMBEDDING + _latent_embedding(4) + CONV_IN_4_MORE,
    # Eq. 3: an SDXL ControlNet with one hint embedding per prior (I_ir, pose, depth, normal) and 4 fusion weights
    "stage2_controlnet": SDXL_CONTROLNET + 3 * PIXEL_HINT_EMBEDDING + 4,
    # Eq. 4: IP-Adapter-Plus-XL's Resampler (82,961,664) and 70 to_k_ip/to_v_ip pairs (340,787,200)
    "colour_adapter": 82_961_664 + 340_787_200,
}


def _readme_counts() -> dict[str, int]:
    out = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"\| [^|]+ \| `(\w+)\.py` \| [^|]*\(([\d,]+)\) \|", line)
        if m:
            out[m.group(1)] = int(m.group(2).replace(",", ""))
    return out


@pytest.mark.parametrize("phase", ["swinir", "v1_controlnet", "stage1_joint_unet", "stage1_controlnet",
                                   "stage2_controlnet", "colour_adapter"])
def test_trainable_count_matches_readme_and_paper(phase):
    config = load_config(phase)
    module = build_model(config.model)
    params = nn.unbox(module.abstract_variables())["params"]
    trainable, _ = get_phase(config.phase).trainable(config).count(params)
    assert _readme_counts()[phase] == trainable
    if phase in PAPER:
        assert trainable == PAPER[phase]
    jax.clear_caches()
