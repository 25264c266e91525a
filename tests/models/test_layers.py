"""Parity of the shared blocks with their diffusers counterparts (fp32, fresh random inputs)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop.layers import attention_rules, resnet_rules, transformer2d_rules
from diffbody_jax.interop.mapping import MappingTable, torch_to_flax
from diffbody_jax.models import attention, layers
from tests.torch_ref import nchw_to_nhwc, needs_torch, nhwc_to_nchw, optional, randomize_, state_dict_numpy

torch = optional("torch")
diffusers = optional("diffusers")

TOL = 1e-4


def _params(flax_module, torch_module, rules, *inputs):
    shapes = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), *inputs))["params"]
    return torch_to_flax(state_dict_numpy(torch_module), MappingTable(rules), shapes, "torch module")


@needs_torch
@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_diffusers(flip, shift, dim, rng):
    from diffusers.models.embeddings import get_timestep_embedding

    t = rng.uniform(0, 999, size=7).astype(np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    out = layers.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    # sin/cos of arguments up to ~1000 in float32: the two libraries' sin differ in the last ulp of the
    # argument's magnitude, so 1e-4 absolute is the honest bound.
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


@needs_torch
@pytest.mark.parametrize("size_in,size_out", [((4, 6), (8, 12)), ((3, 5), (7, 9)), ((4, 4), (5, 11)), ((5, 3), (5, 3))])
def test_nearest_resize_matches_torch_interpolate(size_in, size_out, rng):
    x = rng.standard_normal((2, 3, *size_in)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size_out, mode="nearest").numpy()
    out = layers.nearest_resize(jnp.asarray(nchw_to_nhwc(x)), size_out)
    np.testing.assert_array_equal(nhwc_to_nchw(out), ref)


@needs_torch
@pytest.mark.parametrize("c_in,c_out,with_temb", [(16, 16, True), (16, 32, True), (16, 32, False)])
def test_resnet_block_parity(c_in, c_out, with_temb, rng):
    from diffusers.models.resnet import ResnetBlock2D

    temb_channels = 24 if with_temb else None
    ref = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=temb_channels, groups=8, eps=1e-5).eval()
    randomize_(ref, seed=1)
    x = rng.standard_normal((2, c_in, 6, 5)).astype(np.float32)
    temb = rng.standard_normal((2, 24)).astype(np.float32) if with_temb else None
    ours = layers.ResnetBlock2D(c_out, groups=8, eps=1e-5)
    xj = jnp.asarray(nchw_to_nhwc(x))
    tj = None if temb is None else jnp.asarray(temb)
    params = _params(ours, ref, resnet_rules(), xj, tj)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), None if temb is None else torch.from_numpy(temb)).numpy()
    got = nhwc_to_nchw(ours.apply({"params": params}, xj, tj))
    assert np.abs(got - want).max() <= TOL


@needs_torch
@pytest.mark.parametrize("backend", ["einsum", "xla", "auto"])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_parity_heads_differ_from_head_dim(cross, backend, rng):
    from diffusers.models.attention_processor import Attention

    heads, head_dim, dim = 3, 8, 20  # 3 heads of 8 into a 20-wide model: no two sizes coincide
    ref = Attention(query_dim=dim, cross_attention_dim=12 if cross else None, heads=heads, dim_head=head_dim).eval()
    randomize_(ref, seed=2)
    x = rng.standard_normal((2, 10, dim)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 12)).astype(np.float32) if cross else None
    ours = layers.Attention(heads, head_dim, dim, backend=backend)
    ctx_j = None if ctx is None else jnp.asarray(ctx)
    params = _params(ours, ref, attention_rules(), jnp.asarray(x), ctx_j)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), None if ctx is None else torch.from_numpy(ctx)).numpy()
    got = np.asarray(ours.apply({"params": params}, jnp.asarray(x), ctx_j))
    assert np.abs(got - want).max() <= TOL


@needs_torch
@pytest.mark.parametrize("linear", [True, False])
def test_transformer2d_parity(linear, rng):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    heads, head_dim, c = 2, 12, 24
    ref = Transformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=c, num_layers=2, cross_attention_dim=10,
        norm_num_groups=8, use_linear_projection=linear,
    ).eval()
    randomize_(ref, seed=3)
    x = rng.standard_normal((2, c, 5, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 6, 10)).astype(np.float32)
    ours = layers.Transformer2D(heads, head_dim, depth=2, use_linear_projection=linear, groups=8)
    xj, cj = jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(ctx)
    params = _params(ours, ref, transformer2d_rules(linear), xj, cj)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    got = nhwc_to_nchw(ours.apply({"params": params}, xj, cj))
    assert np.abs(got - want).max() <= TOL


GROUP_NORM_CASES = [((2, 6, 5, 32), 8), ((2, 7, 24), 4), ((1, 3, 3, 16), 16)]


def _group_norm_inputs(rng, shape, mean: float, spread: float):
    """x [shape] around `mean`, and a scale near 1 and a bias near 0 over its channels, float32."""
    x = (rng.standard_normal(shape) * spread + mean).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    return x, scale, (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)


@needs_torch
@pytest.mark.parametrize("shape,groups", GROUP_NORM_CASES)
def test_group_norm_matches_torch_and_float64(shape, groups, rng):
    # Large mean relative to the spread: the case where a one-pass variance would lose digits.
    x, scale, bias = _group_norm_inputs(rng, shape, mean=40, spread=0.5)
    nc = np.moveaxis(x, -1, 1).copy()  # contiguous NCHW: torch's accurate kernel
    want = torch.nn.functional.group_norm(torch.from_numpy(nc), groups, torch.from_numpy(scale),
                                          torch.from_numpy(bias), eps=1e-5).numpy()
    got = layers.GroupNorm(groups, 1e-5).apply({"params": {"scale": scale, "bias": bias}}, jnp.asarray(x))
    assert np.abs(np.moveaxis(np.asarray(got), -1, 1) - want).max() <= TOL
    g = x.astype(np.float64).reshape(shape[0], -1, groups, shape[-1] // groups)
    exact = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
    exact = exact.reshape(shape) * scale + bias
    assert np.abs(np.asarray(got) - exact).max() <= TOL


@needs_torch
@pytest.mark.parametrize("shape,groups", GROUP_NORM_CASES)
def test_group_norm_gradients_match_torch_in_float64(shape, groups, rng):
    """GroupNorm's closed-form backward against torch's group_norm autograd in float64: input, scale and bias."""
    x, scale, bias = _group_norm_inputs(rng, shape, mean=3, spread=2)
    w = rng.standard_normal(shape).astype(np.float32)
    module = layers.GroupNorm(groups, 1e-5)
    dx, dp = jax.grad(lambda x, p: (module.apply({"params": p}, x) * w).sum(), argnums=(0, 1))(
        jnp.asarray(x), {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)})
    xt, st, bt = (torch.tensor(np.moveaxis(a, -1, 1) if a.ndim > 1 else a, dtype=torch.float64, requires_grad=True)
                  for a in (x, scale, bias))
    out = torch.nn.functional.group_norm(xt, groups, st, bt, eps=1e-5)
    (out * torch.tensor(np.moveaxis(w, -1, 1), dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(np.asarray(dx), np.moveaxis(xt.grad.numpy(), 1, -1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dp["scale"]), st.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dp["bias"]), bt.grad.numpy(), atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 12, 16), (3, 5, 8), (2, 3, 4, 16)])
def test_layer_norm_matches_torch_in_float64(shape, rng):
    """`layer_norm` (on CPU over [-1, C], batch 1 included) against torch's layer_norm in float64: output, and the
    gradients of input, scale and bias; the params keep nn.LayerNorm's names under the given name."""

    class Holder(nn.Module):
        dtype = jnp.float32
        param_dtype = jnp.float32

        @nn.compact
        def __call__(self, x):
            return layers.layer_norm(self, 1e-5, "norm1")(x)

    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    scale, bias = rng.standard_normal((2, shape[-1])).astype(np.float32)
    params = {"norm1": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    assert jax.tree.map(jnp.shape, nn.unbox(Holder().init(jax.random.key(0), jnp.asarray(x))["params"])) == \
        jax.tree.map(jnp.shape, params)
    out = Holder().apply({"params": params}, jnp.asarray(x))
    dx, dp = jax.grad(lambda x, p: (Holder().apply({"params": p}, x) * w).sum(), argnums=(0, 1))(jnp.asarray(x), params)
    xt, st, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, bias))
    ref = torch.nn.functional.layer_norm(xt, shape[-1:], st, bt, eps=1e-5)
    (ref * torch.tensor(w, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dp["norm1"]["scale"]), st.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dp["norm1"]["bias"]), bt.grad.numpy(), atol=1e-4)


def test_group_norm_names_bad_channel_count():
    with pytest.raises(ValueError, match="GroupNorm norm1: 12 channels do not split into 8 groups"):
        layers.GroupNorm(8, name="norm1").init(jax.random.key(0), jnp.ones((1, 2, 2, 12)))


def test_attention_backend_registry(rng, monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*registered"):
        attention.attention_backend("nope")
    calls = []

    def traced(q, k, v, *, is_causal=False, bias=None):
        calls.append(q.shape)
        return attention.attention_backend("einsum")(q, k, v, is_causal=is_causal, bias=bias)

    # the registry is restored after this test: no backend leaks into the others
    monkeypatch.setattr(attention, "_ATTENTION_BACKENDS", dict(attention._ATTENTION_BACKENDS))
    attention.register_attention_backend("test-traced", traced)
    x = jnp.asarray(rng.standard_normal((1, 6, 8)), jnp.float32)
    attn = layers.Attention(2, 4, 8, backend="test-traced")
    params = attn.init(jax.random.key(0), x)
    attn.apply(params, x)
    assert calls and calls[-1] == (1, 6, 2, 4)


@pytest.mark.parametrize("backend", ["xla", "auto"])
def test_causal_einsum_matches_jax(backend, rng):
    q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 3, 8)), jnp.float32) for _ in range(3))
    got = attention.einsum_attention(q, k, v, is_causal=True)
    want = attention.attention_backend(backend)(q, k, v, is_causal=True)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5
    # the first query sees only the first key
    np.testing.assert_allclose(np.asarray(got)[:, 0], np.asarray(v)[:, 0], atol=1e-6)


def test_logical_axis_names_on_kernels():
    x = jnp.zeros((1, 4, 4, 8))
    boxed = layers.ResnetBlock2D(16, groups=4).init(jax.random.key(0), x, jnp.zeros((1, 5)))["params"]
    assert boxed["conv1"]["kernel"].names == (None, None, "conv_in", "conv_out")
    assert boxed["time_emb_proj"]["kernel"].names == ("embed", "conv_out")
    assert boxed["norm1"]["scale"].names == ("norm",)


def test_chunked_attention_matches_einsum_with_gradients(rng):
    """Query blocks of 16 over 50 queries (a padded last block); values and gradients as the whole softmax."""
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 8)), jnp.float32) for n in (50, 37, 37))

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    chunked = lambda q, k, v: attention.chunked_attention(q, k, v, chunk=16)  # noqa: E731
    got = chunked(q, k, v)
    want = attention.einsum_attention(q, k, v)
    assert got.shape == want.shape and np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5
    g_got = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(lambda *a: loss(attention.einsum_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want, strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5


@pytest.mark.parametrize("backend", ["einsum", "chunked", "xla"])
def test_backends_take_an_additive_bias(backend, rng):
    """softmax(q k^T / sqrt(D) + bias) v in float64 numpy is the reference; the chunked backend cuts the bias
    into its query blocks (chunk 4 over 10 queries, so the last block is padded)."""
    b, t, s, n, d = 2, 10, 7, 3, 4
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((b, t, n, d), (b, s, n, d), (b, s, n, d)))
    bias = rng.standard_normal((1, n, t, s)).astype(np.float32)
    logits = np.einsum("btnd,bsnd->bnts", q.astype(np.float64), k) / np.sqrt(d) + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), v)
    fn = attention.attention_backend(backend)
    if backend == "chunked":
        fn = functools.partial(attention.chunked_attention, chunk=4)
    got = np.asarray(fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jnp.asarray(bias)))
    assert np.abs(got - want).max() <= 1e-5


@needs_torch
@pytest.mark.parametrize("size,kernel,stride,padding", [
    ((1, 1), 3, 1, 1), ((2, 3), 3, 1, 1), ((5, 4), 3, 2, 1), ((6, 6), 3, 2, 0), ((8, 8), 1, 1, 0), ((7, 9), 3, 1, 1)])
def test_conv_paths_match_torch_and_keep_nn_conv_params(size, kernel, stride, padding, rng):
    """Conv2D's im2col path and its lax.conv path against torch's conv2d (same kernel, same padding), forced each
    way; params are nn.Conv's (names and shapes), so checkpoints do not see which path runs."""
    import flax.linen as nn

    x = rng.standard_normal((2, *size, 24)).astype(np.float32)
    mods = {im2col: layers.Conv2D(16, (kernel, kernel), (stride, stride), ((padding, padding),) * 2, im2col=im2col)
            for im2col in (True, False)}
    params = mods[True].init(jax.random.key(0), x)
    reference = nn.Conv(16, (kernel, kernel), (stride, stride), ((padding, padding),) * 2).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference)
    kernel_t = torch.from_numpy(np.asarray(params["params"]["kernel"]).transpose(3, 2, 0, 1).copy())
    want = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), kernel_t,
                                      torch.from_numpy(np.array(params["params"]["bias"])), stride, padding)
    for im2col, module in mods.items():
        got = np.asarray(module.apply(params, x)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, err_msg=f"im2col={im2col}")


def _torch_conv_float64(x, params, w, stride, padding):
    """torch's conv2d of NHWC x with Conv2D's params in float64, and its autograd for the loss sum(y * w): (y NHWC,
    dx NHWC, d kernel HWIO)."""
    xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    kt = torch.tensor(np.asarray(params["params"]["kernel"]).transpose(3, 2, 0, 1), dtype=torch.float64,
                      requires_grad=True)
    bt = torch.tensor(np.asarray(params["params"]["bias"]), dtype=torch.float64)
    (pt, pb), (pl, pr) = padding
    yt = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (pl, pr, pt, pb)), kt, bt, stride=stride)
    (yt * torch.tensor(w.transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
    return (yt.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
            kt.grad.numpy().transpose(2, 3, 1, 0))


@needs_torch
@pytest.mark.parametrize("size,kernel,stride,padding", [
    ((12, 10), 3, 1, ((1, 1), (1, 1))), ((10, 11), 3, 1, ((0, 2), (2, 1))), ((9, 9), 1, 1, ((0, 0), (0, 0))),
    ((11, 12), 3, 2, ((0, 1), (0, 1))), ((9, 9), 3, 2, ((1, 1), (1, 1)))])
def test_conv_gradients_match_torch_in_float64(size, kernel, stride, padding, rng):
    """The gradients of Conv2D's lax.conv path (on XLA:CPU its kernel gradient is one matmul per tap and its input
    gradient a convolution with the flipped kernel at stride 1, `_cpu_conv`) against torch's conv2d autograd in
    float64, for stride 1 (uneven pads too) and the downsamplers' stride 2 (SD's VAE pads (0, 1))."""
    x = rng.standard_normal((2, *size, 12)).astype(np.float32)
    module = layers.Conv2D(8, (kernel, kernel), (stride, stride), padding, im2col=False)
    params = module.init(jax.random.key(0), x)
    y = module.apply(params, x)
    w = rng.standard_normal(y.shape).astype(np.float32)
    dx, dp = jax.grad(lambda x, p: (module.apply(p, x) * w).sum(), argnums=(0, 1))(x, params)

    _, want_dx, want_dk = _torch_conv_float64(x, params, w, stride, padding)
    np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dp["params"]["kernel"]), want_dk, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dp["params"]["bias"]), w.sum((0, 1, 2)), atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's convolution labels")
def test_conv_input_gradient_in_a_scan_keeps_the_kernel_layout_cpu_convolutions_take():
    """Inside a loop body (the guided sampler's scan) XLA:CPU cannot move a kernel's in/out swap into its layout,
    and a convolution labelled HWOI (01oi) runs on the slow generic path: the input gradient must be labelled HWIO."""
    module = layers.Conv2D(8, (3, 3), im2col=False)
    x = jnp.zeros((1, 16, 16, 4))
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    grad = jax.grad(lambda x, p: module.apply(p, x).sum())

    def scanned(x, p):
        return jax.lax.scan(lambda x, _: (grad(x, p)[..., :4], None), x, None, length=2)[0]

    text = jax.jit(scanned).lower(x, params).compile().as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=(\w+)->", text)
    assert labels and all(label.split("_")[1] == "01io" for label in labels), labels


def test_conv_takes_im2col_only_for_small_maps_on_cpu(monkeypatch):
    """The path choice: XLA:CPU and at most IM2COL_MAX_POSITIONS output positions (kernels above 1x1 only)."""
    seen = []
    monkeypatch.setattr(layers, "_im2col_conv", lambda *a: seen.append(a[0].shape) or jnp.zeros((1, 1, 1, 4)))
    for hw, kernel in (((8, 8), 3), ((9, 8), 3), ((2, 2), 1)):
        seen.clear()
        module = layers.Conv2D(4, (kernel, kernel), padding=((kernel // 2,) * 2,) * 2)
        jax.eval_shape(lambda m=module, s=hw: m.init(jax.random.key(0), jnp.zeros((1, *s, 3))))
        expected = jax.default_backend() == "cpu" and hw[0] * hw[1] <= layers.IM2COL_MAX_POSITIONS and kernel > 1
        assert bool(seen) == expected, (hw, kernel)


@needs_torch
@pytest.mark.parametrize("shape,c_out", [((2, 10, 8, 32), 64), ((1, 16, 12, 64), 32), ((3, 12, 12, 48), 48)])
def test_winograd_conv_matches_torch_in_float64(shape, c_out, rng):
    """Conv2D forced onto Winograd's F(2x2, 3x3) (forward, input and kernel gradients) against torch's conv2d and
    its autograd in float64: output within 1e-5, gradients within 1e-4."""
    x = rng.standard_normal(shape).astype(np.float32)
    module = layers.Conv2D(c_out, (3, 3), winograd=True)
    params = module.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.1, jnp.float32), params)
    y = module.apply(params, x)
    w = rng.standard_normal(y.shape).astype(np.float32)
    dx, dp = jax.grad(lambda x, p: (module.apply(p, x) * w).sum(), argnums=(0, 1))(x, params)

    want_y, want_dx, want_dk = _torch_conv_float64(x, params, w, 1, ((1, 1), (1, 1)))
    assert np.abs(np.asarray(y) - want_y).max() <= 1e-5
    np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dp["params"]["kernel"]), want_dk, atol=1e-4)


def test_conv_takes_winograd_where_it_applies_on_cpu(monkeypatch):
    """The path choice: XLA:CPU, a 3x3 kernel at stride 1 and padding 1, an even map above IM2COL_MAX_POSITIONS,
    float32 / float64, both channel counts and their product above the thresholds; forcing it elsewhere names the
    module and the shapes."""
    seen = []
    monkeypatch.setattr(layers, "_winograd_conv", lambda x, k, precision: seen.append(x.shape) or
                        jnp.zeros((*x.shape[:3], k.shape[-1]), x.dtype))
    cases = [  # (input shape, C_out, kernel, stride, padding, dtype, expected)
        ((1, 16, 16, 64), 64, 3, 1, 1, jnp.float32, True),
        ((4, 32, 32, 32), 64, 3, 1, 1, jnp.float32, True),
        ((4, 32, 32, 32), 32, 3, 1, 1, jnp.float32, False),  # product below WINOGRAD_MIN_CHANNEL_PRODUCT
        ((1, 64, 64, 4), 320, 3, 1, 1, jnp.float32, False),  # conv_in: too few input channels
        ((1, 8, 8, 64), 64, 3, 1, 1, jnp.float32, False),  # im2col's size
        ((1, 16, 15, 64), 64, 3, 1, 1, jnp.float32, False),  # odd width
        ((1, 16, 16, 64), 64, 3, 2, 1, jnp.float32, False),  # a downsampler
        ((1, 16, 16, 64), 64, 3, 1, 0, jnp.float32, False),
        ((1, 16, 16, 64), 64, 1, 1, 0, jnp.float32, False),
        ((1, 16, 16, 64), 64, 3, 1, 1, jnp.bfloat16, False),
    ]
    for shape, c_out, kernel, stride, pad, dtype, expected in cases:
        seen.clear()
        module = layers.Conv2D(c_out, (kernel, kernel), (stride, stride), ((pad, pad),) * 2, dtype=dtype)
        jax.eval_shape(lambda m=module, s=shape, d=dtype: m.init(jax.random.key(0), jnp.zeros(s, d)))
        assert bool(seen) == (expected and jax.default_backend() == "cpu"), (shape, c_out, kernel, stride, pad, dtype)
    with pytest.raises(ValueError, match=r"Conv2D forced.*winograd=True.*\(1, 16, 15, 64\)"):
        forced = layers.Conv2D(64, winograd=True, name="forced")
        jax.eval_shape(lambda: forced.init(jax.random.key(0), jnp.zeros((1, 16, 15, 64))))


@pytest.mark.parametrize("keys,group_elements,group", [(1024, None, 6), (1061, None, 6), (1024, 70 * 16 * 4, 3),
                                                        (1061, 1, 1)])
def test_key_blocked_attention_matches_float64_softmax(keys, group_elements, group, rng, monkeypatch):
    """Long key sequences take the key-blocked online softmax on XLA:CPU (1061: a partial last block), its
    (batch, head) pairs in one group of 6, two of 3 or six of 1; values against Softmax(q k^T / sqrt(D)) v in
    float64 numpy, gradients against jax.nn.dot_product_attention."""
    if group_elements is not None:
        monkeypatch.setattr(attention, "CPU_HEAD_GROUP_ELEMENTS", group_elements)
    assert attention._group_size(2, 3, 70, 16) == group
    q = rng.standard_normal((2, 70, 3, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, keys, 3, 16)).astype(np.float32) for _ in range(2))
    calls = []
    blocked = attention._key_blocked_attention
    monkeypatch.setattr(attention, "_key_blocked_attention", lambda *a: calls.append(1) or blocked(*a))
    got = np.asarray(attention.einsum_attention(q, k, v))
    assert calls == ([1] if jax.default_backend() == "cpu" else [])
    logits = np.einsum("btnd,bsnd->bnts", q.astype(np.float64), k.astype(np.float64)) / 4.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), v.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=1e-5)

    w = rng.standard_normal(q.shape).astype(np.float32)
    ours = jax.grad(lambda *a: (attention.einsum_attention(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: (jax.nn.dot_product_attention(*a, implementation="xla") * w).sum(),
                   argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    half = attention.einsum_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert half.dtype == jnp.bfloat16 and np.abs(np.asarray(half, np.float32) - want).max() < 0.05


@pytest.mark.parametrize("platform,shapes,dtype,bias,registered,want", [
    ("cpu", (8192, 8192, 64), "bfloat16", False, (), "einsum"),      # XLA:CPU's einsum is key-blocked
    ("gpu", (8192, 8192, 64), "bfloat16", False, (), "cudnn"),
    ("cuda", (8192, 8192, 64), "float16", False, (), "cudnn"),
    ("gpu", (8192, 8192, 64), "float32", False, (), "chunked"),      # cuDNN's flash kernel takes half precision only
    ("gpu", (8192, 8192, 64), "bfloat16", True, (), "chunked"),      # an additive bias: not through cuDNN here
    ("gpu", (4096, 4096, 512), "bfloat16", False, (), "chunked"),    # the VAE's one head of 512
    ("gpu", (8192, 8192, 60), "bfloat16", False, (), "chunked"),     # head size not a multiple of 8
    ("tpu", (8192, 8192, 64), "bfloat16", False, (), "chunked"),
    ("tpu", (8192, 8192, 64), "bfloat16", False, ("splash",), "splash"),
    ("gpu", (8192, 77, 64), "bfloat16", False, (), "einsum"),        # cross-attention to the prompt: small logits
    ("tpu", (1024, 1024, 64), "float32", False, (), "einsum"),       # 2^20 logits per head: still small
    ("tpu", (1025, 1024, 64), "float32", False, (), "chunked"),
])
def test_bounded_attention_resolves_per_platform(platform, shapes, dtype, bias, registered, want):
    t, s, d = shapes
    assert attention.resolve_bounded(platform, (1, t, 5, d), (1, s, 5, d), dtype, bias, registered) == want


def test_bounded_attention_runs_what_it_resolves(rng, monkeypatch):
    """Traced for a TPU (`compiling_for`, as a plan compiles for a TPU topology's devices) with a registered "splash"
    kernel, "bounded" calls it for long sequences and the einsum for short ones; on this CPU it is the einsum (equal
    to float64 numpy within 1e-5)."""
    monkeypatch.setattr(attention, "_ATTENTION_BACKENDS", dict(attention._ATTENTION_BACKENDS))
    calls = []
    attention.register_attention_backend("splash", lambda q, k, v, **kw: calls.append(q.shape) or
                                         attention.chunked_attention(q, k, v, **kw))
    q, k, v = (rng.standard_normal((1, 1100, 2, 8)).astype(np.float32) for _ in range(3))
    on_cpu = np.asarray(attention.attention_backend("bounded")(q, k, v))
    logits = np.einsum("btnd,bsnd->bnts", q.astype(np.float64), k) / np.sqrt(8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), v)
    assert calls == [] and np.abs(on_cpu - want).max() <= 1e-5
    with attention.compiling_for("tpu"):
        got = np.asarray(attention.attention_backend("bounded")(q, k, v))
        assert calls == [q.shape] and np.abs(got - want).max() <= 1e-5
        attention.attention_backend("bounded")(q[:, :100], k[:, :100], v[:, :100])
    assert calls == [q.shape] and attention.target_platform() == jax.default_backend()
