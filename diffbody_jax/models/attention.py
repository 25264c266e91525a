"""Attention kernels and their registry: the extension point for hardware kernels.

q, k, v: [B, T, N, D] -> [B, T, N, D]. A backend is any function of that signature, chosen by name through a
module's `attention_backend` field (configs: `model.attention_backend`):
  "einsum"        the default: plain XLA ops, fastest on CPU and a safe choice everywhere
  "chunked"       einsum over blocks of 1024 queries with remat: bounded memory for very long sequences
  "xla", "cudnn"  `jax.nn.dot_product_attention` with that implementation (cudnn: GPU, bf16/fp16)
  "auto"          `jax.nn.dot_product_attention` choosing for itself
  "bounded"       memory-bounded, resolved per platform at trace time (`resolve_bounded`): the einsum on CPU (its
                  XLA:CPU form is key-blocked above 1024 keys), cuDNN flash attention on GPU where cuDNN takes the
                  shapes (bf16/fp16, head size <= 128 and a multiple of 8, no additive bias), "splash" on TPU once a
                  kernel of that name is registered, "chunked" otherwise; attention whose logits are small (text
                  tokens, Swin windows) stays on the einsum everywhere
A TPU Pallas splash-attention kernel (or any other) plugs in with `register_attention_backend("splash", fn)`.
The `Attention` layer around them (projections, heads) is in models/layers.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

Array = jax.Array

AttentionFn = Callable[..., Array]  # (q, k, v, *, is_causal: bool, bias: Array | None) -> out


_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


def target_platform() -> str:
    """The platform the program being traced will run on: jax's default backend, or the one `compiling_for` names
    (a program compiled here for TPU devices of a topology, `parallel.mesh.target_devices`)."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str | None) -> Iterator[None]:
    """Trace for `platform` (cpu, gpu, tpu; None: the default backend): the kernels' per-platform choices (the
    key-blocked CPU attention, "bounded", the CPU's im2col convolutions) follow it."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


# XLA:CPU runs attention fastest with the heads moved ahead of the sequence axes (plain batched matmuls: 1.2-2x
# the einsum below on the UNets' shapes) and, over long key sequences, as the online softmax over blocks of keys of
# flash attention, which keeps each block's logits in cache ([1, 4096, 5, 64]: 373 -> 116 ms, torch's SDPA 115 ms;
# bench/attention_paths.py). Same math, float32 logits; other backends (GPU, TPU) keep the einsum form.
CPU_KEY_BLOCK = 256
CPU_BLOCKED_MIN_KEYS = 1024
# The backward pass recomputes each block's probabilities and runs four matmuls on them; blocks of 128 keys did
# best or within 3% of it over the UNets' shapes (measured before the head groups below; forward + backward at
# 64 / 128 / 256 / 512 keys: [4, 1024, 2, 16] 59 / 45 / 45 / 66 ms, [1, 4096, 5, 64] 1093 / 1117 / 1265 / 1682 ms;
# bench/attention_paths.py --backward).
CPU_BACKWARD_KEY_BLOCK = 128
# The (batch, head) pairs go through the key-blocked loops in groups whose queries hold at most this many elements
# (group x T x D): one head of 1024 x 64, four of the tiny UNet's 1024 x 16 (bench/attention_paths.py --backward).
CPU_HEAD_GROUP_ELEMENTS = 1 << 16


def _logits(q: Array, k: Array, acc) -> Array:
    """[B, N, T, S] float32 (or wider) q.k / sqrt(D) from head-major q [B, N, T, D] and k [B, N, S, D]. The scale
    multiplies q ([T, D]) rather than the logits ([T, S]): on XLA:CPU a scaled product is a dot fusion that reads a
    materialised [T, S] broadcast of the scale."""
    return jnp.matmul(_scaled_queries(q), k.swapaxes(-1, -2), preferred_element_type=acc)


def _scaled_queries(q: Array) -> Array:
    """q / sqrt(D) in q's dtype (D: the last axis)."""
    return (q * q.shape[-1] ** -0.5).astype(q.dtype)


def _head_groups(x: Array, group: int) -> Array:
    """[B, S, N, D] -> [B * N / group, group, S, D]: head-major, the (batch, head) pairs cut into groups."""
    b, s, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(-1, group, s, d)


def _from_head_groups(x: Array, b: int, n: int) -> Array:
    """The inverse of `_head_groups`: [B * N / group, group, S, D] -> [B, S, N, D]."""
    return x.reshape(b, n, *x.shape[2:]).transpose(0, 2, 1, 3)


def _key_blocks(x: Array, block: int) -> Array:
    """[G, S, D] -> [S / block, G, block, D], keys padded with zeros to a whole number of blocks."""
    g, s, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, (-s) % block), (0, 0)))
    return x.reshape(g, -1, block, d).swapaxes(0, 1)


def _unblock(x: Array, s: int) -> Array:
    """[S / block, G, block, D] -> [G, s, D] (the padding dropped)."""
    nb, g, block, d = x.shape
    return x.swapaxes(0, 1).reshape(g, nb * block, d)[:, :s]


def _key_mask(s: int, block: int) -> Array | None:
    """[S / block, block] mask of the real keys among the padded blocks; None when S fills whole blocks (the usual
    case: 1024, 4096 keys), so no mask pass runs."""
    if s % block == 0:
        return None
    return (jnp.arange(s + (-s) % block) < s).reshape(-1, block)


def _group_size(b: int, n: int, t: int, d: int) -> int:
    """(batch, head) pairs per group of the CPU attention's loop over heads: the most whose queries (group x T x D)
    stay within CPU_HEAD_GROUP_ELEMENTS, at least one, dividing B * N."""
    most = max(1, CPU_HEAD_GROUP_ELEMENTS // (t * d))
    return next(g for g in range(min(most, b * n), 0, -1) if (b * n) % g == 0)


def _key_blocked_forward(q: Array, k: Array, v: Array, block: int) -> tuple[Array, Array]:
    """(out [G, T, D], logsumexp [G, T] float32) for one group of heads (q [G, T, D], k and v [G, S, D]) by the
    running softmax over key blocks; q arrives scaled by 1 / sqrt(D)."""
    g, t, d = q.shape
    acc = jnp.promote_types(q.dtype, jnp.float32)

    def step(carry, xs):
        m, l, out = carry
        kb, vb, keep = xs
        logits = jnp.matmul(q, kb.swapaxes(-1, -2), preferred_element_type=acc)
        if keep is not None:
            logits = jnp.where(keep, logits, jnp.finfo(acc).min)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.exp(logits - m_new[..., None])
        scale = jnp.exp(m - m_new)
        l = l * scale + p.sum(-1)
        out = out * scale[..., None] + jnp.matmul(p.astype(v.dtype), vb, preferred_element_type=acc)
        return (m_new, l, out), None

    init = (jnp.full((g, t), -jnp.inf, acc), jnp.zeros((g, t), acc), jnp.zeros((g, t, d), acc))
    xs = (_key_blocks(k, block), _key_blocks(v, block), _key_mask(k.shape[1], block))
    (m, l, out), _ = jax.lax.scan(step, init, xs)
    return (out / l[..., None]).astype(v.dtype), m + jnp.log(l)


def _key_blocked_backward(q, k, v, out, lse, d_out, block: int):
    """(dq, dk, dv) for one group of heads, over blocks of `block` keys (q scaled by 1 / sqrt(D); dq is the
    gradient with respect to that scaled q).

    Each block works on the transposed probabilities P^T [G, block, T], so that every matmul contracts the minor
    axis of its left operand: dV = P^T dO, dK = dS^T Q, dQ^T += K^T dS^T. XLA:CPU runs a left operand contracted
    over its major axis (P^T dO with P [T, block]) as a generic dot outside its fast path, 3-5x slower per
    block at the tiny UNet's shapes (docs/performance.md)."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qa, dh = q.astype(acc), d_out.astype(acc)
    q_t, dh_t = qa.swapaxes(-1, -2), dh.swapaxes(-1, -2)  # [G, D, T]
    delta = jnp.sum(dh * out.astype(acc), axis=-1)[:, None, :]  # rowsum(dO * O) [G, 1, T]
    lse_t = lse[:, None, :]

    def step(dq_t, xs):
        kb, vb, keep = xs
        kb, vb = kb.astype(acc), vb.astype(acc)
        p_t = jnp.exp(jnp.matmul(kb, q_t) - lse_t)  # [G, block, T]
        if keep is not None:
            p_t = jnp.where(keep[:, None], p_t, 0.0)
        dv = jnp.matmul(p_t, dh)
        ds_t = p_t * (jnp.matmul(vb, dh_t) - delta)
        dk = jnp.matmul(ds_t, qa)
        dq_t = dq_t + jnp.matmul(kb.swapaxes(-1, -2), ds_t)
        return dq_t, (dk, dv)

    xs = (_key_blocks(k, block), _key_blocks(v, block), _key_mask(k.shape[1], block))
    dq_t, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(q_t), xs)
    s = k.shape[1]
    return dq_t.swapaxes(-1, -2), _unblock(dk, s), _unblock(dv, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _key_blocked_attention(q: Array, k: Array, v: Array, block: int) -> Array:
    """Softmax(q k^T / sqrt(D)) v as a running softmax over blocks of `block` keys (flash attention's recurrence):
    per block, m' = max(m, rowmax), l' = l e^(m - m') + sum e^(s - m'), acc' = acc e^(m - m') + e^(s - m') v;
    out = acc / l. Keys are padded to a whole block with logits at the float minimum (weight 0). q [B, T, N, D],
    k and v [B, S, N, D].

    The (batch, head) pairs run in a loop over groups (`_group_size`), each group's blocks small enough to stay in
    cache: all heads at once streamed every block's logits through memory in each of the softmax's passes
    ([2, 1024, 8, 64] forward: 61 -> 37 ms, torch's SDPA 32; docs/performance.md).

    Its gradient is flash attention's backward pass, not the scan's autodiff: the forward keeps only q, k, v, the
    output and the row logsumexp L, and the backward runs over the key blocks again, recomputing each block's
    probabilities P = exp(S - L): dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)), dQ += dS K / sqrt(D),
    dK = dS^T Q / sqrt(D). The scan's autodiff instead stacked every block's logits and masks for the backward
    (tiny-sd21's training step at 4x32x32: 96 MB of stacks per self-attention and a slower step, bench/README.md)."""
    return _key_blocked_fwd(q, k, v, block)[0]


def _key_blocked_fwd(q, k, v, block):
    """The output, and the residuals in head groups (scaled q, k, v, out, logsumexp), so the backward regroups
    only d_out."""
    b, t, n, d = q.shape
    group = _group_size(b, n, t, d)
    grouped = tuple(_head_groups(x, group) for x in (_scaled_queries(q), k, v))
    out, lse = jax.lax.map(lambda a: _key_blocked_forward(*a, block), grouped)
    return _from_head_groups(out, b, n), (*grouped, out, lse)


def _key_blocked_bwd(_forward_block, residuals, d_out):
    """Over blocks of CPU_BACKWARD_KEY_BLOCK keys, whatever block the forward used (only its outputs are kept)."""
    b, t, n, d = d_out.shape
    group = residuals[0].shape[1]
    grads = jax.lax.map(lambda a: _key_blocked_backward(*a, CPU_BACKWARD_KEY_BLOCK),
                        (*residuals, _head_groups(d_out, group)))
    dq, dk, dv = (_from_head_groups(x, b, n) for x in grads)
    dtypes = (x.dtype for x in residuals[:3])
    return tuple(g.astype(dt) for g, dt in zip((dq * d ** -0.5, dk, dv), dtypes, strict=True))


_key_blocked_attention.defvjp(_key_blocked_fwd, _key_blocked_bwd)


def einsum_attention(q: Array, k: Array, v: Array, *, is_causal: bool = False, bias: Array | None = None) -> Array:
    """Softmax(q k^T / sqrt(D) + bias) v with float32 logits, as plain XLA ops. q [B, T, N, D], k and v
    [B, S, N, D]; bias: additive, broadcastable to [B, N, T, S] (SwinIR's relative position bias and shifted-window
    mask). On XLA:CPU in head-major form, and key-blocked for S >= CPU_BLOCKED_MIN_KEYS without bias (above).

    The same math as `jax.nn.dot_product_attention(implementation="xla")`, without its grouped-query
    reshape to 5-D, whose transposes make it 2.2x slower on XLA:CPU ([2, 1024, 2, 64]: 25.8 vs 11.7 ms).
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)
    cpu = target_platform() == "cpu"
    if cpu and bias is None and not is_causal and k.shape[1] >= CPU_BLOCKED_MIN_KEYS:
        return _key_blocked_attention(q, k, v, CPU_KEY_BLOCK)
    if cpu:
        logits = _logits(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), acc)
    else:
        logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=acc) * (q.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + bias.astype(acc)
    if is_causal:
        t, s = logits.shape[-2:]
        keep = jnp.tril(jnp.ones((t, s), bool), k=s - t)
        logits = jnp.where(keep, logits, jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if cpu:
        return jnp.matmul(probs, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    return jnp.einsum("bnts,bsnd->btnd", probs, v)


def chunked_attention(q: Array, k: Array, v: Array, *, is_causal: bool = False, bias: Array | None = None,
                      chunk: int = 1024) -> Array:
    """`einsum_attention` over blocks of `chunk` queries, each block rematerialised in the backward pass, so
    the [T, S] matrix never exists whole: memory O(chunk * S) instead of O(T * S). For attention over
    large latents (the VAE's mid block on a 256 x 256 latent: a 16 GiB matrix per head in float32)."""
    b, t, n, d = q.shape
    if is_causal or t <= chunk:
        return einsum_attention(q, k, v, is_causal=is_causal, bias=bias)
    pad = (-t) % chunk
    blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, n, d).swapaxes(0, 1)
    if bias is None:
        out = jax.lax.map(jax.checkpoint(lambda qb: einsum_attention(qb, k, v)), blocks)
    else:  # the bias's query axis is cut into the same blocks
        full = jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1], t, k.shape[1]))
        full = jnp.pad(full, ((0, 0), (0, 0), (0, pad), (0, 0)))
        bias_blocks = full.reshape(full.shape[0], full.shape[1], -1, chunk, full.shape[-1]).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(jax.checkpoint(lambda a: einsum_attention(a[0], k, v, bias=a[1])), (blocks, bias_blocks))
    return out.swapaxes(0, 1).reshape(b, t + pad, n, d)[:, :t]


def _jax_attention(implementation):
    def fn(q, k, v, *, is_causal=False, bias=None):
        if bias is not None:
            bias = jnp.broadcast_to(bias, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])).astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=is_causal, implementation=implementation)

    return fn


# "bounded": below this many logits per head (query x key positions) the whole matrix is cheap to hold, so the
# plain einsum runs (cross-attention to 77 text tokens on a 128 x 64 latent: 0.6 M; SD2.1's self-attention there: 67 M)
SMALL_LOGITS = 2**20


def resolve_bounded(platform: str, q_shape, k_shape, dtype, has_bias: bool, registered=()) -> str:
    """The backend "bounded" runs for q [B, T, N, D] and k [B, S, N, D] of `dtype` on `platform` (jax's platform
    name: cpu, gpu, cuda, rocm, tpu); `registered`: the other backends' names (a "splash" kernel on TPU)."""
    t, s, d = q_shape[1], k_shape[1], q_shape[-1]
    if platform == "cpu" or t * s <= SMALL_LOGITS:
        return "einsum"
    if platform in ("gpu", "cuda") and not has_bias and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
            and d <= 128 and d % 8 == 0:
        return "cudnn"
    if platform == "tpu" and "splash" in registered:
        return "splash"
    return "chunked"


def bounded_attention(q: Array, k: Array, v: Array, *, is_causal: bool = False, bias: Array | None = None) -> Array:
    """Attention whose memory does not grow with T x S where that matrix is large: the backend `resolve_bounded`
    names for this platform and these shapes."""
    name = resolve_bounded(target_platform(), q.shape, k.shape, q.dtype, bias is not None, _ATTENTION_BACKENDS)
    return _ATTENTION_BACKENDS[name](q, k, v, is_causal=is_causal, bias=bias)


_ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "einsum": einsum_attention,
    "chunked": chunked_attention,
    "xla": _jax_attention("xla"),
    "cudnn": _jax_attention("cudnn"),
    "auto": _jax_attention(None),
    "bounded": bounded_attention,
}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make `fn(q, k, v, *, is_causal=False, bias=None)` ([B, T, N, D] each, softmax scale D**-0.5, bias additive
    and broadcastable to [B, N, T, S]) selectable by name."""
    _ATTENTION_BACKENDS[name] = fn


def attention_backend(name: str) -> AttentionFn:
    try:
        return _ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; registered: {sorted(_ATTENTION_BACKENDS)} "
            "(add one with diffbody_jax.models.attention.register_attention_backend)"
        ) from None


def backend_names() -> list[str]:
    """The registered backends' names (a command line's choices)."""
    return sorted(_ATTENTION_BACKENDS)
