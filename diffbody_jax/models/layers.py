"""Building blocks shared by the UNet, ControlNet, joint UNet and VAE.

One implementation of each block; NHWC inside. Submodule names follow diffusers' attribute names with
list indices joined by "_" (`to_out_0`, `net_0`, `transformer_blocks_1`): they key the interop mapping
tables and saved checkpoints, so they never change.

Param kernels carry logical axis names (`nn.with_logical_partitioning`):
  embed     the model width of a Dense input or output
  heads     the concatenated attention heads (q/k/v outputs, out-projection input)
  mlp       the hidden width of a feed-forward or time-embedding MLP
  conv_in   a convolution's input channels
  conv_out  a convolution's output channels
  norm      the channels of a normalisation's scale and bias (and of BatchNorm's statistics)
  vocab     a token-embedding table's rows, or a classifier's classes
Activations are constrained at block boundaries (`constrain_image`, `constrain_tokens`) to the logical axes
(batch, height, width, channels) and (batch, length, embed), so that a mesh can shard activations as well as
params. Outside a mesh with logical axis rules the constraints do nothing.
`diffbody_jax.parallel` maps the names to mesh axes; the modules never name mesh axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.models.attention import attention_backend, target_platform
from diffbody_jax.models.stacked_blocks import STACKED

Array = jax.Array
Dtype = Any
Precision = Any


IMAGE_AXES = ("batch", "height", "width", "channels")
TOKEN_AXES = ("batch", "length", "embed")


def constrain_image(x: Array) -> Array:
    """Name an NHWC activation's axes for the sharding rules (a no-op without a mesh and rules)."""
    return nn.with_logical_constraint(x, IMAGE_AXES)


def constrain_tokens(x: Array) -> Array:
    """Name a [B, T, C] activation's axes for the sharding rules (a no-op without a mesh and rules)."""
    return nn.with_logical_constraint(x, TOKEN_AXES)


# ----------------------------------------------------------------------------------------- factories
# Small factories so that every Dense/Conv/Norm in the project gets the same dtype policy and
# logical axis names. `m` is the calling module: it carries dtype, param_dtype and precision.


# Rematerialisation: a module's `remat` field is False/"none" (keep activations), True/"full" (recompute each
# block in the backward pass) or a policy of jax.checkpoint_policies that saves some of them.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul/conv outputs, recompute the elementwise ops
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls only
}


def remat_block(cls, remat: bool | str, **kwargs):
    """`cls`, or `nn.remat(cls, policy=..., **kwargs)` as `remat` asks (see REMAT_POLICIES)."""
    if remat in (False, None, "none", ""):
        return cls
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected a bool or one of none, {', '.join(REMAT_POLICIES)}")
    return nn.remat(cls, policy=REMAT_POLICIES[name], **kwargs)


def dense(
    m: nn.Module, features: int, name: str, axes=("embed", "mlp"), use_bias: bool = True, kernel_init=None
) -> nn.Dense:
    kernel_init = nn.initializers.lecun_normal() if kernel_init is None else kernel_init
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        precision=m.precision,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
        name=name,
    )


# XLA:CPU runs a 3x3 convolution over a few spatial positions and many channels far below its matmul speed (a
# 2x2x512 conv: 26 ms against torch's 3.6 ms; bench/conv_paths.py). There the conv is the same sum written as one
# matmul over the stacked kh*kw shifted inputs ("im2col"): same params, same result within float rounding. Other
# backends and larger maps keep lax.conv, which is the fast path there.
IM2COL_MAX_POSITIONS = 64  # output H*W at or below which XLA:CPU takes the im2col path (bench/conv_paths.py)


def _im2col_conv(x: Array, kernel: Array, strides: tuple[int, int], padding, precision) -> Array:
    """NHWC x, HWIO kernel -> NHWC: the kh*kw shifted (strided) views of the padded input, concatenated on the
    channel axis in (dy, dx, c) order, times the kernel reshaped to [kh*kw*C_in, C_out]."""
    kh, kw, cin, cout = kernel.shape
    views = _shifted_views(x, kh, kw, strides, padding)
    patches = jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout), precision=precision)


def _shifted_views(x: Array, kh: int, kw: int, strides: tuple[int, int], padding) -> list[Array]:
    """The kh*kw (strided) views of the padded NHWC input that each kernel tap sees, in (dy, dx) order."""
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    b, h, w, c = x.shape
    sh, sw = strides
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    return [jax.lax.slice(x, (0, dy, dx, 0), (b, dy + (ho - 1) * sh + 1, dx + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            for dy in range(kh) for dx in range(kw)]


def _xla_conv(x: Array, kernel: Array, strides, padding, precision) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# 2016): each 2x2 block of outputs of a 3x3, stride-1 convolution is A^T [(G g G^T) * (B^T d B)] A over the 4x4
# input tile d around it, so the channel contraction becomes 16 matmuls over H*W/4 tiles instead of 9 over H*W
# positions: 2.25x fewer multiplications. XLA:CPU's own convolution runs a 3x3 at about the speed of its matmuls, so
# on large maps this is 1.3-2.3x faster (1x64x64, 320 -> 320: 50 -> 22 ms, torch 34; bench/conv_paths.py). Each of
# the 16 products is its own matmul: stacking them into one batched matmul cost a concatenation of the transformed
# input that ate the gain. The transforms add a few float32 roundings (max abs difference to lax.conv ~1e-5 at
# 320-1280 channels of unit inputs). XLA:CPU takes it for float32 / float64 on even maps larger than
# IM2COL_MAX_POSITIONS whose channels pass the thresholds below (few channels: the 16 small matmuls lose).
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # B^T: input tile transform
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))  # G: kernel transform
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))  # A^T: output transform
WINOGRAD_MIN_CHANNELS = 32  # both C_in and C_out at least this
WINOGRAD_MIN_CHANNEL_PRODUCT = 2048  # and C_in * C_out at least this (32 -> 32 at 4x32x32 is slower, 32 -> 64 faster)


def winograd_applies(x_shape, kernel_shape, strides, padding, dtype) -> bool:
    """Whether XLA:CPU's Conv2D runs as Winograd F(2x2, 3x3) (above): a 3x3 kernel at stride 1 with one pixel of
    padding on every side (the output the size of the input), an even H and W with more than IM2COL_MAX_POSITIONS
    positions, float32 or float64, and enough channels."""
    _, h, w, cin = x_shape
    kh, kw, _, cout = kernel_shape
    return ((kh, kw) == (3, 3) and tuple(strides) == (1, 1) and _hashable(padding) == ((1, 1), (1, 1))
            and h % 2 == 0 and w % 2 == 0 and h * w > IM2COL_MAX_POSITIONS
            and jnp.dtype(dtype) in (jnp.float32, jnp.float64)
            and min(cin, cout) >= WINOGRAD_MIN_CHANNELS and cin * cout >= WINOGRAD_MIN_CHANNEL_PRODUCT)


def _combine(coefficients, xs: list[Array]) -> Array:
    """sum_i c_i x_i over the nonzero c_i (the transforms' entries are 0, +-1, +-1/2: adds where they can be)."""
    out = None
    for c, x in zip(coefficients, xs, strict=True):
        if c == 0:
            continue
        term = x if c == 1 else -x if c == -1 else c * x
        out = term if out is None else out + term
    return out


def _winograd_input_tiles(x: Array) -> list[Array]:
    """The 16 components (a, b) of B^T d B, each [B, H/2, W/2, C], over the 4x4 tiles d at stride 2 of the NHWC
    input padded by one pixel. Row r of tile i is padded row 2i + r: with the padded rows paired ([H/2 + 1, 2]),
    that is pair i + r // 2, member r % 2, so every view is a plain slice (columns alike)."""
    b, h, w, c = x.shape
    th, tw = h // 2, w // 2
    pairs = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, th + 1, 2, tw + 1, 2, c)
    rows = [pairs[:, r // 2:r // 2 + th, r % 2] for r in range(4)]  # [B, th, W/2 + 1, 2, C]
    out = []
    for row_mix in (_combine(coefficients, rows) for coefficients in _WINOGRAD_BT):
        cols = [row_mix[:, :, s // 2:s // 2 + tw, s % 2] for s in range(4)]  # [B, th, tw, C]
        out += [_combine(coefficients, cols) for coefficients in _WINOGRAD_BT]
    return out


def _winograd_kernel(kernel: Array) -> list[Array]:
    """The 16 components (a, b) of G g G^T, each [C_in, C_out], of an HWIO 3x3 kernel."""
    rows = [_combine(coefficients, [kernel[r] for r in range(3)]) for coefficients in _WINOGRAD_G]  # [3, I, O]
    return [_combine(coefficients, [row[s] for s in range(3)]) for row in rows for coefficients in _WINOGRAD_G]


def _winograd_output(m: list[Array]) -> Array:
    """A^T M A from the 16 tile products (a, b), each [B, H/2, W/2, C_out], into the [B, H, W, C_out] output: tile
    (i, j)'s output (p, q) is pixel (2i + p, 2j + q)."""
    b, th, tw, c = m[0].shape
    rows = [[_combine(coefficients, [m[4 * a + col] for a in range(4)]) for col in range(4)]
            for coefficients in _WINOGRAD_AT]
    phases = [jnp.stack([_combine(coefficients, row) for coefficients in _WINOGRAD_AT], axis=3) for row in rows]
    return jnp.stack(phases, axis=2).reshape(b, 2 * th, 2 * tw, c)  # [B, th, p, tw, q, C] -> NHWC


# Row a of G g' for the kernel flipped in space (g'[r] = g[2 - r]) is row _WINOGRAD_FLIP[a] of G g.
_WINOGRAD_FLIP = (3, 1, 2, 0)


def _winograd_conv(x: Array, kernel: Array, precision, flipped: bool = False) -> Array:
    """A 3x3, stride-1, pad-1 convolution of NHWC x (even H, W) with an HWIO kernel by F(2x2, 3x3) (above).
    flipped: with the kernel flipped in space and its in and out channels swapped (a convolution's input gradient),
    from the kernel's own transform with its components permuted (_WINOGRAD_FLIP) and each matmul contracting
    C_out: flipping and transposing the kernel first cost a strided pass over the whole kernel per component."""
    u = _winograd_kernel(kernel)
    if flipped:
        u = [u[4 * _WINOGRAD_FLIP[a] + _WINOGRAD_FLIP[b]].T for a in range(4) for b in range(4)]
    products = [jnp.matmul(v, ui, precision=precision) for v, ui in zip(_winograd_input_tiles(x), u, strict=True)]
    return _winograd_output(products)


def _winograd_output_transpose(dy: Array) -> list[Array]:
    """The transpose of `_winograd_output`: the 16 components (a, b) of A dY A^T over the 2x2 output blocks dY of
    dy [B, H, W, C], each [B, H/2, W/2, C]."""
    b, h, w, c = dy.shape
    blocks = dy.reshape(b, h // 2, 2, w // 2, 2, c)
    rows = [[_combine([_WINOGRAD_AT[p][a] for p in range(2)], [blocks[:, :, p, :, q] for p in range(2)])
             for q in range(2)] for a in range(4)]
    return [_combine([_WINOGRAD_AT[q][col] for q in range(2)], rows[a]) for a in range(4) for col in range(4)]


def _winograd_kernel_transpose(du: list[Array]) -> Array:
    """The transpose of `_winograd_kernel`: G^T dU G from the 16 components (a, b), each [C_in, C_out], as an
    HWIO [3, 3, C_in, C_out] kernel."""
    rows = [[_combine([_WINOGRAD_G[a][r] for a in range(4)], [du[4 * a + col] for a in range(4)]) for col in range(4)]
            for r in range(3)]
    return jnp.stack([jnp.stack([_combine([_WINOGRAD_G[col][s] for col in range(4)], row) for s in range(3)])
                      for row in rows])


def _winograd_kernel_grad(x: Array, dy: Array, precision, acc) -> Array:
    """The kernel gradient of `_winograd_conv(x, kernel)` for the output cotangent dy: each linear step transposed,
    V_ab^T dM_ab contracted over batch and tiles between x's input tiles (recomputed, not kept) and dy's transposed
    output transform, then the kernel transform's transpose; 2.25x fewer multiplications than one matmul per tap
    (1x64x64, 320 -> 320: 51 -> 29 ms)."""
    du = [jnp.einsum("bhwc,bhwo->co", v, m, precision=precision, preferred_element_type=acc)
          for v, m in zip(_winograd_input_tiles(x), _winograd_output_transpose(dy), strict=True)]
    return _winograd_kernel_transpose(du)


# XLA:CPU derives a convolution's kernel gradient as another convolution whose window is the whole feature map and
# whose "features" are the batch: 1.3-2.4x slower than the same sum as one matmul per kernel tap (view^T dy, the
# contraction over batch and positions), e.g. [2, 32, 32, 320] -> 320: 51.7 -> 27.5 ms, torch 28.3
# (bench/conv_paths.py --backward). The input gradient is the transposed convolution, as fast as the forward; it
# and the forward run as Winograd where `winograd_applies`.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _cpu_conv(x: Array, kernel: Array, strides, padding, precision, winograd: bool) -> Array:
    """`lax.conv_general_dilated` over NHWC / HWIO (or Winograd's F(2x2, 3x3) if `winograd`) whose kernel gradient
    is kh*kw matmuls (above)."""
    return _cpu_conv_fwd(x, kernel, strides, padding, precision, winograd)[0]


def _cpu_conv_fwd(x, kernel, strides, padding, precision, winograd):
    y = _winograd_conv(x, kernel, precision) if winograd else _xla_conv(x, kernel, strides, padding, precision)
    return y, (x, kernel)


def _conv_input_grad(dy: Array, kernel: Array, x_shape, strides, padding, precision, winograd: bool) -> Array:
    """d(conv)/dx: for stride 1 and pads within the kernel, the forward convolution of dy (padded by kernel - 1 -
    pad) with the flipped kernel, its in and out channels swapped (Winograd's if `winograd`: the forward's 3x3 with
    pads of 1 gives pads of 1 again). XLA's own transpose (`linear_transpose`) leaves the
    swap to the convolution's dimension labels (HWOI), which XLA:CPU's fast (YNNPACK) convolution does not take:
    at the top level XLA moves the swap into the kernel's layout, but inside a loop body (a sampler's scan) it cannot,
    and the input gradient ran on the slow generic path (the guided sampling step, 2.2x slower in the scan than
    outside it; bench/guidance_step.py)."""
    kh, kw = kernel.shape[:2]
    (pt, pb), (pl, pr) = padding
    if tuple(strides) != (1, 1) or not all(0 <= p < k for p, k in ((pt, kh), (pb, kh), (pl, kw), (pr, kw))):
        return jax.linear_transpose(lambda x: _xla_conv(x, kernel, strides, padding, precision),
                                    jax.ShapeDtypeStruct(x_shape, dy.dtype))(dy)[0]
    if winograd:
        return _winograd_conv(dy, kernel, precision, flipped=True)
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return _xla_conv(dy, flipped, (1, 1), ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)), precision)


def _cpu_conv_bwd(strides, padding, precision, winograd, residuals, dy):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    dx = _conv_input_grad(dy, kernel, x.shape, strides, padding, precision, winograd)
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    if winograd:
        return dx, _winograd_kernel_grad(x, dy, precision, acc).astype(kernel.dtype)
    taps = [jnp.einsum("bhwc,bhwo->co", view, dy, precision=precision, preferred_element_type=acc)
            for view in _shifted_views(x, kh, kw, strides, padding)]
    return dx, jnp.stack(taps).reshape(kh, kw, cin, cout).astype(kernel.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _hashable(padding) -> tuple[tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in padding)


class Conv2D(nn.Module):
    """A 2-D convolution over NHWC with nn.Conv's params ("kernel" [kh, kw, C_in, C_out], "bias" [C_out]), so
    checkpoints and converters see no difference. On XLA:CPU small outputs (<= IM2COL_MAX_POSITIONS positions)
    run as im2col + one matmul (kernels above 1x1), the others as lax.conv_general_dilated with the kernel gradient
    as one matmul per tap and the input gradient as a convolution XLA:CPU's fast path takes inside loops too
    (`_cpu_conv`); other backends as lax.conv_general_dilated.

    `standardize_eps` (None: off) applies weight standardisation first, as MUSIQ's StdConv (BiT) does: each output
    channel's kernel minus its mean, divided by its unbiased standard deviation plus this epsilon."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    im2col: bool | None = None  # None: by backend and size (above); True / False force a path (tests, benches)
    winograd: bool | None = None  # None: XLA:CPU where `winograd_applies`; True / False force it (tests, benches)
    standardize_eps: float | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
        if self.standardize_eps is not None:  # HWIO: statistics over (H, W, I) per output channel
            centred = kernel - kernel.mean((0, 1, 2), keepdims=True)
            kernel = centred / (jnp.std(kernel, (0, 1, 2), keepdims=True, ddof=1) + self.standardize_eps)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        on_cpu = target_platform() == "cpu"
        use_im2col = self.im2col
        if use_im2col is None:
            (pt, pb), (pl, pr) = self.padding
            ho = (x.shape[1] + pt + pb - kh) // self.strides[0] + 1
            wo = (x.shape[2] + pl + pr - kw) // self.strides[1] + 1
            use_im2col = on_cpu and kh * kw > 1 and ho * wo <= IM2COL_MAX_POSITIONS
        use_winograd = self.winograd
        if use_winograd is None:
            use_winograd = on_cpu and not use_im2col and winograd_applies(x.shape, kernel.shape, self.strides,
                                                                          self.padding, x.dtype)
        elif use_winograd and not winograd_applies(x.shape, kernel.shape, self.strides, self.padding, x.dtype):
            raise ValueError(f"Conv2D {self.name}: winograd=True needs a 3x3 kernel at stride 1 with padding 1, an "
                             f"even map above {IM2COL_MAX_POSITIONS} positions, float32/64 and enough channels; got "
                             f"input {x.shape} {x.dtype}, kernel {kernel.shape}, stride {self.strides}, padding "
                             f"{self.padding}")
        if use_im2col:
            y = _im2col_conv(x, kernel, self.strides, self.padding, self.precision)
        elif on_cpu or use_winograd:
            y = _cpu_conv(x, kernel, tuple(self.strides), _hashable(self.padding), self.precision, bool(use_winograd))
        else:
            y = _xla_conv(x, kernel, self.strides, self.padding, self.precision)
        return y + bias if bias is not None else y


def conv(
    m: nn.Module,
    features: int,
    kernel: int,
    name: str | None,
    stride: int = 1,
    padding: int | None = None,
    zero_init: bool = False,
    use_bias: bool = True,
) -> Conv2D:
    """A 2-D conv over NHWC. `zero_init`: zero kernel (ControlNet outputs, widened inputs start with no effect)."""
    pad = kernel // 2 if padding is None else padding
    kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
    return Conv2D(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        use_bias=use_bias,
        padding=((pad, pad), (pad, pad)),
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        precision=m.precision,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def _position_sums(y: Array) -> Array:
    """[B, P, C] -> [B, C]: the sum over positions. At batch 1 it reduces [P, C] instead: XLA:CPU sends a reduction
    over the middle axis of [1, P, C] to a YNNPACK reduce that is 30x slower than the same sum over the leading axis
    of [P, C] ([1, 4096, 320]: 9.7 against 0.32 ms; docs/performance.md)."""
    if y.shape[0] == 1:
        return y[0].sum(axis=0)[None]
    return y.sum(axis=1)


def _group_mean(v: Array, groups: int, count: int) -> Array:
    """[B, C] channel sums -> [B, 1, C], each channel holding its group's mean (count: elements per group)."""
    b, c = v.shape
    g = v.reshape(b, groups, c // groups).sum(-1) / count
    return jnp.repeat(g, c // groups, axis=1)[:, None, :]


def _group_stats(y: Array, groups: int, epsilon: float) -> tuple[Array, Array]:
    """(mean, 1 / std), each [B, 1, C], of y [B, P, C] over each group's positions and channels (two-pass)."""
    count = y.shape[1] * (y.shape[-1] // groups)
    mean = _group_mean(_position_sums(y), groups, count)
    return mean, jax.lax.rsqrt(_group_mean(_position_sums(jnp.square(y - mean)), groups, count) + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(y: Array, scale: Array, bias: Array, groups: int, epsilon: float) -> Array:
    """(y - mean) / std * scale + bias over y [B, P, C] (float32 or wider), groups of C / groups channels.

    The backward is the closed form, x^ = (y - mean) / std, g = dout * scale:
    dy = (g - mean_group(g) - x^ mean_group(g x^)) / std, dscale = sum dout x^, dbias = sum dout, with x^ rebuilt
    from y and the [B, C] statistics: two reading passes over dout and one writing pass, where autodiff of the
    forward kept (y - mean) and ran more (docs/performance.md, "Training step: the backward pass")."""
    return _group_norm_fwd(y, scale, bias, groups, epsilon)[0]


def _group_norm_fwd(y, scale, bias, groups, epsilon):
    mean, inv_std = _group_stats(y, groups, epsilon)
    return (y - mean) * (inv_std * scale) + bias, (y, scale, mean, inv_std)


def _group_norm_bwd(groups, epsilon, residuals, dout):
    y, scale, mean, inv_std = residuals
    count = y.shape[1] * (y.shape[-1] // groups)
    x_hat = (y - mean) * inv_std
    d_scale_bc = _position_sums(dout * x_hat)  # [B, C]
    d_bias_bc = _position_sums(dout)
    # mean_group(g) and mean_group(g x^) from the per-channel sums, g = dout * scale
    g_mean = _group_mean(d_bias_bc * scale, groups, count)
    gx_mean = _group_mean(d_scale_bc * scale, groups, count)
    dy = (dout * scale - g_mean - x_hat * gx_mean) * inv_std
    return dy, d_scale_bc.sum(0), d_bias_bc.sum(0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """GroupNorm over the last axis of [B, ..., C], statistics in (at least) float32 with a two-pass variance.

    Written here instead of using nn.GroupNorm for speed: reducing first over the spatial axis (a
    contiguous column sum on NHWC data) and then over each group's channels runs 6x faster on XLA:CPU
    than nn.GroupNorm's joint reduction (0.54 vs 3.1 ms on [2, 64, 64, 128]) and keeps PyTorch's
    two-pass accuracy, which E[x^2] - E[x]^2 loses on activations with large means. Its gradient is the closed
    form (`_group_norm`).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm {self.name}: {c} channels do not split into {self.num_groups} groups")
        acc = jnp.promote_types(x.dtype, jnp.float32)  # float64 stays float64 (gradient checks)
        init = lambda fn: nn.with_logical_partitioning(fn, ("norm",))  # noqa: E731
        scale = self.param("scale", init(nn.initializers.ones_init()), (c,), self.param_dtype)
        bias = self.param("bias", init(nn.initializers.zeros_init()), (c,), self.param_dtype)
        out = _group_norm(x.reshape(b, -1, c).astype(acc), scale.astype(acc), bias.astype(acc), self.num_groups,
                          float(self.epsilon))
        return out.reshape(x.shape).astype(self.dtype)


def group_norm(m: nn.Module, groups: int, eps: float, name: str) -> GroupNorm:
    return GroupNorm(groups, eps, m.dtype, m.param_dtype, name=name)


def layer_norm(m: nn.Module, eps: float, name: str) -> Callable[[Array], Array]:
    """nn.LayerNorm over the last axis (params "scale", "bias" under `name`). On XLA:CPU it normalises [-1, C]:
    the gradient's sums over the leading axes of [1, P, C] (scale and bias at batch 1) went to the YNNPACK reduce
    that is 30x slower than a sum over the leading axis of [P, C] (`_position_sums`): forward + backward at
    [1, 4096, 320] 15-20 ms against 4 (docs/performance.md)."""
    norm = nn.LayerNorm(
        epsilon=eps,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )
    if target_platform() != "cpu":
        return norm
    return lambda x: norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)


# ---------------------------------------------------------------------------------- time embedding


def timestep_embedding(
    timesteps: Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
    scale: float = 1.0,
) -> Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, in float32.

    timesteps: [B]; returns [B, dim]. Operation order follows diffusers' `get_timestep_embedding` so that
    the frequencies round identically.
    """
    half = dim // 2
    exponent = (-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    args = scale * args
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class BatchNorm(nn.Module):
    """Inference-mode batch normalisation over the last axis, with stored statistics (HRNet, BPBreID).

    Variables as flax's nn.BatchNorm names them (params scale/bias, batch_stats mean/var), each with the logical
    axis "norm", so checkpoints map the same and the sharding rules see every leaf. Statistics in float32 at
    least. (nn.BatchNorm cannot name its batch_stats; the networks that use this are frozen feature extractors.)
    """

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        named = lambda init: nn.with_logical_partitioning(init, ("norm",))  # noqa: E731
        mean = self.variable("batch_stats", "mean", named(lambda s: jnp.zeros(s, jnp.float32)), (c,)).value
        var = self.variable("batch_stats", "var", named(lambda s: jnp.ones(s, jnp.float32)), (c,)).value
        scale = self.param("scale", named(nn.initializers.ones_init()), (c,), self.param_dtype)
        bias = self.param("bias", named(nn.initializers.zeros_init()), (c,), self.param_dtype)
        compute = jnp.promote_types(self.dtype, jnp.float32)
        y = (x.astype(compute) - mean.astype(compute)) * jax.lax.rsqrt(var.astype(compute) + self.epsilon)
        return (y * scale.astype(compute) + bias.astype(compute)).astype(self.dtype)


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP over a sinusoidal (or any) embedding: [B, D_in] -> [B, features]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = dense(self, self.features, "linear_1")(x)
        x = nn.silu(x)
        return dense(self, self.features, "linear_2", axes=("mlp", "embed"))(x)


# ----------------------------------------------------------------------------------------- resnets


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with an optional time-embedding shift and a 1x1 shortcut.

    x: [B, H, W, C_in]; temb: [B, T] or None (the VAE has no time input); returns [B, H, W, out_channels].
    The shortcut conv exists exactly when C_in != out_channels, as in diffusers.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        h = nn.silu(group_norm(self, self.groups, self.eps, "norm1")(x))
        h = conv(self, self.out_channels, 3, "conv1")(h)
        if temb is not None:
            t = dense(self, self.out_channels, "time_emb_proj", axes=("embed", "conv_out"))(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self, self.groups, self.eps, "norm2")(h))
        h = conv(self, self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self, self.out_channels, 1, "conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return constrain_image(out)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_channels].

    padding=0 pads one row and column at the bottom/right first (the VAE's layout), as diffusers does.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self, self.out_channels, 3, "conv", stride=2, padding=self.padding)(x)


def nearest_resize(x: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize of [B, H, W, C] to `size`, with PyTorch's `mode="nearest"` indexing.

    `jax.image.resize` samples at half-pixel centres, which picks different source pixels than
    `F.interpolate(mode="nearest")` whenever the ratio is not an integer; the UNet needs the latter
    for latents whose size is not a multiple of its total down-sampling factor.
    """
    for axis, out in zip((1, 2), size, strict=True):
        n = x.shape[axis]
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != n:
            scale = np.float32(n) / np.float32(out)
            idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), n - 1)
            x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


def bilinear_resize_align_corners(x: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of [B, H, W, C] with corner pixels aligned: `F.interpolate(mode="bilinear",
    align_corners=True)`, which HRNet heads use; `jax.image.resize` has only half-pixel centres."""
    for axis, out in zip((1, 2), size, strict=True):
        n = x.shape[axis]
        if out == n:
            continue
        src = np.arange(out, dtype=np.float64) * ((n - 1) / (out - 1) if out > 1 else 0.0)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1] * x.ndim
        shape[axis] = out
        w = jnp.asarray((src - lo).reshape(shape), x.dtype)
        x = jnp.take(x, jnp.asarray(lo), axis=axis) * (1 - w) + jnp.take(x, jnp.asarray(hi), axis=axis) * w
    return x


class Upsample2D(nn.Module):
    """Nearest x2 (or to `output_size`) then a 3x3 conv. x: [B, H, W, C] -> [B, H', W', out_channels]."""

    out_channels: int
    output_size: tuple[int, int] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        size = self.output_size or (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_resize(x, size)
        return conv(self, self.out_channels, 3, "conv")(x)


# --------------------------------------------------------------------------------------- attention
# The kernels (q, k, v -> out) and their registry live in models/attention.py; this is the layer around them.


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (no bias) and a biased output projection.

    x: [B, T, C] queries; context: [B, S, C_ctx] or None for self-attention; returns [B, T, out_features].
    `upcast` computes the attention in float32 whatever the compute dtype (SD2.1-768's setting).
    `qkv_bias` adds biases to the q/k/v projections (the VAE's and CLIP's attention have them).
    `out_bias` False drops the output projection's bias (IP-Adapter's Resampler).
    `causal` masks each query from later keys (CLIP's text tower).
    `ip_adapter` adds IP-Adapter's decoupled cross-attention: a second key/value pair (`to_k_ip`, `to_v_ip`)
    over image tokens ip_context [B, N, C_ctx], attended by the same queries; its output, times ip_scale
    (a scalar or [B]), is added to the main attention output before `to_out_0`.
    """

    heads: int
    head_dim: int
    out_features: int
    upcast: bool = False
    qkv_bias: bool = False
    out_bias: bool = True
    causal: bool = False
    ip_adapter: bool = False
    backend: str = "einsum"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(
        self, x: Array, context: Array | None = None, ip_context: Array | None = None, ip_scale: Array | float = 1.0
    ) -> Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        qkv_axes = ("embed", "heads")
        attend = attention_backend(self.backend)

        def project(name, t, bias=self.qkv_bias):
            t = dense(self, inner, name, qkv_axes, use_bias=bias)(t)
            t = t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
            return t.astype(jnp.promote_types(t.dtype, jnp.float32)) if self.upcast else t

        q = project("to_q", x)
        out = attend(q, project("to_k", context), project("to_v", context), is_causal=self.causal).astype(self.dtype)
        if self.ip_adapter and (ip_context is not None or self.is_initializing()):
            ip_context = context if ip_context is None else ip_context  # init: only the shapes matter
            ip = attend(q, project("to_k_ip", ip_context, False), project("to_v_ip", ip_context, False))
            scale = jnp.asarray(ip_scale, jnp.float32)
            scale = scale.reshape(-1, 1, 1, 1) if scale.ndim == 1 else scale
            out = (out + scale * ip).astype(self.dtype)
        elif ip_context is not None:
            raise ValueError(f"{self.name}: image tokens given to an attention built without ip_adapter=True")
        out = out.reshape(out.shape[0], out.shape[1], inner)
        return dense(self, self.out_features, "to_out_0", ("heads", "embed"), use_bias=self.out_bias)(out)


class GEGLU(nn.Module):
    """Dense to 2 x features, then value * GELU(gate) with exact GELU. x: [B, T, C] -> [B, T, features]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h, gate = jnp.split(dense(self, 2 * self.features, "proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class GEGLUFeedForward(nn.Module):
    """GEGLU to mult x C, then Dense back to C. x: [B, T, C] -> [B, T, C].

    `net_0` and `net_2` mirror diffusers' nn.Sequential(GEGLU, Dropout, Linear).
    """

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, self.dtype, self.param_dtype, self.precision, name="net_0")(x)
        return dense(self, dim, "net_2", ("mlp", "embed"))(h)


class GELU(nn.Module):
    """Dense then exact GELU: diffusers' GELU activation module. x: [B, T, C] -> [B, T, features]."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.gelu(dense(self, self.features, "proj", use_bias=self.use_bias)(x), approximate=False)


class MLP(nn.Module):
    """Dense, activation, Dense (children "fc1", "fc2"), with optional dropout after each: the two-layer MLP of
    CLIP's encoder layers and SwinIR's blocks. x: [..., C] -> [..., out_features or C]."""

    hidden: int
    activation: Callable[[Array], Array] = nn.gelu
    out_features: int | None = None
    dropout_rate: float = 0.0
    kernel_init: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        h = self.activation(dense(self, self.hidden, "fc1", ("embed", "mlp"), kernel_init=self.kernel_init)(x))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        out = dense(self, self.out_features or x.shape[-1], "fc2", ("mlp", "embed"), kernel_init=self.kernel_init)(h)
        return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class GELUFeedForward(nn.Module):
    """GELU to mult x C, then Dense back to C: diffusers' FeedForward(activation_fn="gelu").
    x: [B, T, C] -> [B, T, C]. `net_0` and `net_2` mirror its nn.Sequential(GELU, Dropout, Linear).
    """

    mult: int = 4
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = GELU(dim * self.mult, self.use_bias, name="net_0", **kw)(x)
        return dense(self, dim, "net_2", ("mlp", "embed"), use_bias=self.use_bias)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual.

    x: [B, T, C]; context: [B, S, C_ctx]; returns [B, T, C]. With `ip_adapter`, the cross-attention also
    attends to image tokens ip_context [B, N, C_ctx] (IP-Adapter; see `Attention`).
    """

    heads: int
    head_dim: int
    upcast_attention: bool = False
    attention_backend: str = "einsum"
    norm_eps: float = 1e-5
    ip_adapter: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def _attention(self, name: str, dim: int, ip_adapter: bool = False) -> Attention:
        return Attention(
            self.heads, self.head_dim, dim, upcast=self.upcast_attention, ip_adapter=ip_adapter,
            backend=self.attention_backend, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            name=name,
        )

    @nn.compact
    def __call__(
        self, x: Array, context: Array, ip_context: Array | None = None, ip_scale: Array | float = 1.0
    ) -> Array:
        dim = x.shape[-1]
        x = x + self._attention("attn1", dim)(layer_norm(self, self.norm_eps, "norm1")(x))
        attn2 = self._attention("attn2", dim, self.ip_adapter)
        x = x + attn2(layer_norm(self, self.norm_eps, "norm2")(x), context, ip_context, ip_scale)
        ff = GEGLUFeedForward(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name="ff")
        return constrain_tokens(x + ff(layer_norm(self, self.norm_eps, "norm3")(x)))


SCAN_STEP_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


class _ScanStep(BasicTransformerBlock):
    """One `BasicTransformerBlock` as an `nn.scan` step: the carry is the token stream, nothing is stacked out."""

    def __call__(self, x: Array, context: Array, ip_context: Array | None = None, ip_scale: Array | float = 1.0):
        return super().__call__(x, context, ip_context, ip_scale), None


class Transformer2D(nn.Module):
    """GroupNorm, projection in (Dense or 1x1 conv), `depth` transformer blocks, projection out, residual.

    x: [B, H, W, C]; context: [B, S, C_ctx]; ip_context: [B, N, C_ctx] image tokens (`ip_adapter` only);
    returns [B, H, W, C].

    `scan_blocks` (depth > 1): the blocks run as one `nn.scan`, so XLA compiles one block instead of `depth`; their
    params are then stacked under "transformer_blocks" with a leading depth axis (models/stacked_blocks.py converts
    to and from the file layout; the axis's logical name is "layers", which the sharding rules never split).
    """

    heads: int
    head_dim: int
    depth: int = 1
    use_linear_projection: bool = False
    groups: int = 32
    upcast_attention: bool = False
    attention_backend: str = "einsum"
    ip_adapter: bool = False
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(
        self, x: Array, context: Array, ip_context: Array | None = None, ip_scale: Array | float = 1.0
    ) -> Array:
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        residual = x
        x = group_norm(self, self.groups, 1e-6, "norm")(x)  # diffusers fixes this eps at 1e-6
        if self.use_linear_projection:
            x = dense(self, inner, "proj_in", ("conv_out", "embed"))(x.reshape(b, h * w, c))
        else:
            x = conv(self, inner, 1, "proj_in")(x).reshape(b, h * w, inner)
        block = dict(
            heads=self.heads, head_dim=self.head_dim, upcast_attention=self.upcast_attention,
            attention_backend=self.attention_backend, ip_adapter=self.ip_adapter, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision,
        )
        if self.scan_blocks and self.depth > 1:
            # the scan's backward keeps every residual of the step's linearisation, elementwise ones included
            # (unrolled, XLA fuses most of those away): keeping only the weight matmuls' outputs and recomputing the
            # rest needs less memory than the unrolled blocks (SDXL's UNet gradient at 128x128 latents: 12.97 GiB of
            # temporaries, against 23.94 saving everything and 18.82 unrolled; docs/scaling.md)
            step = nn.remat(_ScanStep, policy=SCAN_STEP_POLICY, prevent_cse=False)
            stack = nn.scan(
                step, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth,
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(**block, name=STACKED)(x, context, ip_context, ip_scale)
        else:
            for i in range(self.depth):
                x = BasicTransformerBlock(**block, name=f"transformer_blocks_{i}")(x, context, ip_context, ip_scale)
        if self.use_linear_projection:
            x = dense(self, c, "proj_out", ("embed", "conv_out"))(x).reshape(b, h, w, c)
        else:
            x = conv(self, c, 1, "proj_out")(x.reshape(b, h, w, inner))
        return constrain_image(x + residual)
