"""JointUNet: equal to the plain UNet where it must be, and parity with a PyTorch twin assembled from diffusers
blocks for random fusion logits and per-branch weights."""

import copy

import jax
import numpy as np
import pytest

from diffbody_jax.interop.joint_unet import joint_unet_table
from diffbody_jax.interop.mapping import flatten_params, flax_to_torch, torch_to_flax
from diffbody_jax.models.joint_unet import JointUNet, JointUNetConfig, joint_unet_from_unet
from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.torch_ref import (
    nchw_to_nhwc,
    needs_torch,
    nhwc_to_nchw,
    optional,
    randomize_,
    state_dict_numpy,
    unet_diffusers_config,
)

torch = optional("torch")
diffusers = optional("diffusers")

SPLITS = [(0, 0), (1, 1), (2, 2), (1, 2)]
TOL = 1e-4


def _unet(in_channels=8):
    return UNet2DConditionModel(UNetConfig.from_dict({**unet_diffusers_config("tiny-sd21"),
                                                           "in_channels": in_channels}))


def _noisy_params(module, seed):
    """Init params with every leaf perturbed (zero biases and unit norms would hide a swapped tensor)."""
    params = module.init_params(jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


def _inputs(rng, batch, channels, h=8, w=8):
    x = rng.standard_normal((batch, h, w, channels)).astype(np.float32)
    return x, rng.integers(0, 1000, batch), rng.standard_normal((batch, 5, 24)).astype(np.float32)


@pytest.mark.parametrize("split", SPLITS)
def test_one_branch_is_the_plain_unet(split, rng):
    unet = _unet()
    unet_params = _noisy_params(unet, 0)
    joint = JointUNet(JointUNetConfig(unet.config, ("rgb",), *split))
    params, _ = joint_unet_from_unet(unet_params, joint, jax.random.key(1))
    x, t, ctx = _inputs(rng, 2, 8)
    want = jax.jit(unet.apply)({"params": unet_params}, x, t, ctx)
    got = jax.jit(joint.apply)({"params": params}, x, t, ctx)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("split", SPLITS)
def test_three_identical_branches_from_one_unet_each_equal_the_unet(split, rng):
    plain = _unet(in_channels=4)
    unet_params = _noisy_params(plain, 2)
    joint = JointUNet(JointUNetConfig.from_unet(plain.config, in_channels=8, copy_first_n_block=split[0],
                                                copy_last_n_block=split[1]))
    params, copied = joint_unet_from_unet(unet_params, joint, jax.random.key(3))
    assert "fusion_logits" not in copied and not np.asarray(params["fusion_logits"]).any()
    x, t, ctx = _inputs(rng, 2, 4)
    pose = rng.standard_normal(x.shape).astype(np.float32)
    branch_input = np.concatenate([x, pose], -1)  # the pose latent meets zero-initialised conv_in channels
    want = jax.jit(plain.apply)({"params": unet_params}, x, t, ctx)
    got = jax.jit(joint.apply)({"params": params}, np.concatenate([branch_input] * 3, -1), t, ctx)
    for b in range(3):
        np.testing.assert_allclose(got[..., 4 * b: 4 * b + 4], want, atol=2e-5, rtol=0)


def test_size_conditioning_starts_with_no_effect(rng):
    plain = _unet(in_channels=4)
    unet_params = _noisy_params(plain, 4)
    joint = JointUNet(JointUNetConfig.from_unet(plain.config, num_time_ids=8, addition_time_embed_dim=8,
                                                branches=("rgb",)))
    params, _ = joint_unet_from_unet(unet_params, joint, jax.random.key(5))
    x, t, ctx = _inputs(rng, 2, 4)
    ids = rng.uniform(0, 1024, (2, 8)).astype(np.float32)
    got = joint.apply({"params": params}, np.concatenate([x, x], -1), t, ctx, time_ids=ids)
    np.testing.assert_allclose(got, plain.apply({"params": unet_params}, x, t, ctx), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"time_ids: expected 8 values per example"):
        joint.apply({"params": params}, np.concatenate([x, x], -1), t, ctx, time_ids=ids[:, :6])


# ------------------------------------------------------------------------------ the PyTorch twin
if torch is not None:  # the PyTorch twin exists only with the torch extra

    class TorchJointUNet(torch.nn.Module):
        """The joint UNet of diffbody_jax/models/joint_unet.py assembled from diffusers' UNet blocks; its state dict
        keys are the documented export layout."""

        def __init__(self, config: dict, n_branches: int, n_first: int, n_last: int, num_time_ids: int = 0):
            super().__init__()
            from diffusers.models.embeddings import TimestepEmbedding, Timesteps

            unets = [diffusers.UNet2DConditionModel(**config) for _ in range(n_branches)]
            shared, n = unets[0], len(unets[0].down_blocks)
            self.n_first, self.n_last, self.n_blocks = n_first, n_last, n
            self.time_proj, self.time_embedding = shared.time_proj, shared.time_embedding
            if num_time_ids:
                self.add_time_proj = Timesteps(8, config.get("flip_sin_to_cos", True), config.get("freq_shift", 0))
                self.add_embedding = TimestepEmbedding(8 * num_time_ids, shared.time_embedding.linear_2.out_features)
            self.conv_in_branch = torch.nn.ModuleList([u.conv_in for u in unets])
            self.down_blocks_branch = torch.nn.ModuleList(
                [torch.nn.ModuleList(u.down_blocks[:n_first]) for u in unets])
            self.down_blocks = torch.nn.ModuleDict({str(j): shared.down_blocks[j] for j in range(n_first, n)})
            self.mid_block = shared.mid_block
            self.up_blocks = torch.nn.ModuleDict({str(j): shared.up_blocks[j] for j in range(n - n_last)})
            self.up_blocks_branch = torch.nn.ModuleList(
                [torch.nn.ModuleDict({str(j): u.up_blocks[j] for j in range(n - n_last, n)}) for u in unets])
            self.conv_norm_out_branch = torch.nn.ModuleList([copy.deepcopy(u.conv_norm_out) for u in unets])
            self.conv_out_branch = torch.nn.ModuleList([u.conv_out for u in unets])
            self.fusion_logits = torch.nn.Parameter(torch.zeros(n_branches))

        @staticmethod
        def _down(block, x, emb, ctx):
            if getattr(block, "has_cross_attention", False):
                return block(hidden_states=x, temb=emb, encoder_hidden_states=ctx)
            return block(hidden_states=x, temb=emb)

        @staticmethod
        def _up(block, x, skips, emb, ctx, size):
            kw = dict(hidden_states=x, res_hidden_states_tuple=tuple(skips), temb=emb, upsample_size=size)
            if getattr(block, "has_cross_attention", False):
                kw["encoder_hidden_states"] = ctx
            return block(**kw)

        def forward(self, sample, t, ctx, time_ids=None, down_residuals=None, mid_residual=None):
            emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
            if time_ids is not None:
                emb = emb + self.add_embedding(self.add_time_proj(time_ids.flatten()).reshape(sample.shape[0], -1))
            w = torch.softmax(self.fusion_logits, 0)
            nb = len(self.conv_in_branch)
            fuse = lambda ts: sum(w[b] * ts[b] for b in range(nb))  # noqa: E731
            hs, own = [], []
            for b, x in enumerate(sample.chunk(nb, dim=1)):
                h = self.conv_in_branch[b](x)
                skips = [h]
                for block in self.down_blocks_branch[b]:
                    h, res = self._down(block, h, emb, ctx)
                    skips += list(res)
                hs.append(h)
                own.append(skips)
            x, shared = fuse(hs), []
            for j in range(self.n_first, self.n_blocks):
                x, res = self._down(self.down_blocks[str(j)], x, emb, ctx)
                shared += list(res)
            trunk = [fuse([o[p] for o in own]) for p in range(len(own[0]))] + shared
            branch = [o + shared for o in own]
            if down_residuals is not None:
                trunk = [s + r for s, r in zip(trunk, down_residuals, strict=True)]
                branch = [[s + r for s, r in zip(bs, down_residuals, strict=True)] for bs in branch]
            x = self.mid_block(x, emb, encoder_hidden_states=ctx)
            if mid_residual is not None:
                x = x + mid_residual
            for j in range(self.n_blocks - self.n_last):
                block = self.up_blocks[str(j)]
                k = len(block.resnets)
                skips, trunk = trunk[-k:], trunk[:-k]
                x = self._up(block, x, skips, emb, ctx, trunk[-1].shape[2:] if trunk else None)
            outs = []
            for b in range(nb):
                h, rest = x, branch[b][: len(trunk)]  # the trunk consumed the rest
                for j in range(self.n_blocks - self.n_last, self.n_blocks):
                    block = self.up_blocks_branch[b][str(j)]
                    k = len(block.resnets)
                    skips, rest = rest[-k:], rest[:-k]
                    h = self._up(block, h, skips, emb, ctx, rest[-1].shape[2:] if rest else None)
                h = torch.nn.functional.silu(self.conv_norm_out_branch[b](h))
                outs.append(self.conv_out_branch[b](h))
            return torch.cat(outs, dim=1)


@needs_torch
@pytest.mark.parametrize("split,time_ids,residuals", [
    ((0, 0), 0, False), ((1, 1), 0, True), ((2, 2), 8, False), ((1, 2), 6, True)])
def test_parity_with_torch_twin(split, time_ids, residuals, rng):
    cfg = {**unet_diffusers_config("tiny-sd21"), "in_channels": 8}
    twin = TorchJointUNet(cfg, 3, *split, num_time_ids=time_ids).eval()
    randomize_(twin, seed=7)
    with torch.no_grad():
        twin.fusion_logits.copy_(torch.randn(3) * 2)  # unequal fusion weights
    ours_cfg = JointUNetConfig.from_unet(UNetConfig.from_dict(cfg), num_time_ids=time_ids,
                                         addition_time_embed_dim=8, copy_first_n_block=split[0],
                                         copy_last_n_block=split[1])
    ours = JointUNet(ours_cfg)
    params = torch_to_flax(state_dict_numpy(twin), joint_unet_table(ours_cfg), ours.param_shapes(), "twin")

    x = rng.standard_normal((2, 24, 8, 8)).astype(np.float32)
    t = rng.integers(0, 1000, 2)
    ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
    tkw, jkw = {}, {}
    if time_ids:
        ids = rng.uniform(0, 1024, (2, time_ids)).astype(np.float32)
        tkw["time_ids"], jkw["time_ids"] = torch.from_numpy(ids), ids
    if residuals:
        shapes = [(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4), (64, 2, 2), (64, 2, 2)]  # tiny-sd21's skips
        down = [rng.standard_normal((2, *s)).astype(np.float32) for s in shapes]
        mid = rng.standard_normal((2, 64, 2, 2)).astype(np.float32)
        tkw.update(down_residuals=[torch.from_numpy(d) for d in down], mid_residual=torch.from_numpy(mid))
        jkw.update(down_residuals=[nchw_to_nhwc(d) for d in down], mid_residual=nchw_to_nhwc(mid))
    with torch.no_grad():
        want = twin(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **tkw).numpy()
    got = nhwc_to_nchw(jax.jit(ours.apply)({"params": params}, nchw_to_nhwc(x), t, ctx, **jkw))
    assert got.shape == want.shape == (2, 12, 8, 8)
    assert want.std() > 0.1
    assert np.abs(got - want).max() <= TOL
    weights = ours.fusion_weights(params)
    assert list(weights) == ["rgb", "depth", "normal"] and max(weights.values()) - min(weights.values()) > 0.05


@pytest.mark.parametrize("split", SPLITS)
def test_state_dict_round_trip_is_bit_exact(split):
    ours_cfg = JointUNetConfig.from_unet(_unet(4).config, copy_first_n_block=split[0], copy_last_n_block=split[1])
    ours = JointUNet(ours_cfg)
    params = _noisy_params(ours, 8)
    table = joint_unet_table(ours_cfg)
    sd = flax_to_torch(params, table)
    if split == (1, 2):
        assert {"conv_in_branch.2.weight", "down_blocks_branch.1.0.resnets.0.conv1.weight",
                "down_blocks.1.resnets.0.conv1.weight", "up_blocks.0.resnets.0.conv1.weight",
                "up_blocks_branch.0.1.attentions.0.proj_in.weight", "conv_out_branch.1.bias",
                "conv_norm_out_branch.0.weight", "fusion_logits"} <= set(sd)
    back = torch_to_flax(sd, table, ours.param_shapes(), "sd", dtype=None)
    for (pa, a), (pb, b) in zip(flatten_params(params).items(), flatten_params(back).items(), strict=True):
        assert pa == pb and np.asarray(a).tobytes() == np.asarray(b).tobytes(), pa


def test_bad_input_channels_are_named(rng):
    joint = JointUNet(JointUNetConfig(_unet().config))
    params = joint.init_params(jax.random.key(0))
    x, t, ctx = _inputs(rng, 1, 16)
    with pytest.raises(ValueError, match=r"sample has 16 channels; expected 3 branches x 8 \(rgb, depth, normal\)"):
        joint.apply({"params": params}, x, t, ctx)
    with pytest.raises(ValueError, match=r"copy_last_n_block=4 is outside 0..3"):
        JointUNetConfig(_unet().config, copy_last_n_block=4)


def test_stage1_controlnet_steers_every_branch(rng):
    """The diffbody-v2-stage1 ControlNet sees the RGB branch's input and E(I_ir); its residuals fit the joint UNet,
    start at zero (output unchanged) and, once trained (here: random output convs), change every branch."""
    from diffbody_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_from_unet

    plain = _unet(in_channels=4)
    unet_params = _noisy_params(plain, 9)
    joint = JointUNet(JointUNetConfig.from_unet(plain.config))
    params, _ = joint_unet_from_unet(unet_params, joint, jax.random.key(0))
    cn = ControlNetModel(ControlNetConfig.from_unet(joint.config.unet, conditioning_channels=4,
                                                    conditioning_embedding_type="latent"))
    cn_params, _ = controlnet_from_unet(unet_params, cn, jax.random.key(1))

    x, t, ctx = _inputs(rng, 2, 24)
    i_ir = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)

    @jax.jit
    def steer(cn_params, x):
        res = cn.apply({"params": cn_params}, x[..., :8], t, ctx, i_ir)
        return joint.apply({"params": params}, x, t, ctx, down_residuals=res.down, mid_residual=res.mid)

    base = jax.jit(joint.apply)({"params": params}, x, t, ctx)
    np.testing.assert_allclose(steer(cn_params, x), base, atol=1e-5, rtol=0)  # one compiled graph vs another
    steered = steer(_noisy_params(cn, 10), x)  # "trained": random output convs
    for b in range(3):
        assert np.abs(steered[..., 4 * b: 4 * b + 4] - base[..., 4 * b: 4 * b + 4]).mean() > 1e-3
