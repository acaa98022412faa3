"""Tests for the Pallas flash attention kernel (CPU, Pallas interpret mode).

Shapes are small and block sizes are 32/64 so that multiple tiles, padding of
non-multiple lengths and causal / sliding-window tile skipping are exercised
while the whole file stays fast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.kernels.flash_attention import flash_attention


def naive_attention(q, k, v, q_seg=None, kv_seg=None, *, causal=True,
                    sliding_window=0):
  """Independent float32 einsum + softmax reference (rows with no key -> 0)."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  _, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  i = jnp.arange(q_len)[:, None]
  j = jnp.arange(kv_len)[None, :]
  allowed = jnp.ones((q_len, kv_len), bool)
  if causal:
    allowed &= j <= i
  if sliding_window:
    allowed &= i - j < sliding_window
  allowed = allowed[None, None]
  if q_seg is not None:
    allowed = allowed & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
  s = jnp.where(allowed, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(allowed, jnp.exp(s - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
  kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32)
  do = jax.random.normal(kd, q.shape, jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), do.astype(dtype)


def _packed_segments(seed, batch, length, max_docs=4):
  """Random packed documents: non-decreasing ids with random boundaries."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), max_docs - 1, replace=False))
    for c in cuts:
      seg[b, c:] += 1
  return jnp.asarray(seg)


def _run_both(q, k, v, do, seg=None, *, causal, window=0, block_q, block_k):
  """Returns (out, (dq, dk, dv)) for the kernel and for the reference."""
  if isinstance(seg, tuple):
    q_seg, kv_seg = seg
  else:
    q_seg = kv_seg = seg

  def kernel(q, k, v):
    return flash_attention(q, k, v, seg, causal=causal, sliding_window=window,
                           block_q=block_q, block_k=block_k, interpret=True)

  def ref(q, k, v):
    return naive_attention(q, k, v, q_seg, kv_seg, causal=causal,
                           sliding_window=window)

  def out_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)

  # One jit per side: a single XLA compile instead of op-by-op dispatch (much
  # faster for interpret-mode kernels). The reference sees the same (possibly
  # bf16-rounded) inputs, in float32.
  got = jax.jit(lambda *a: out_and_grads(kernel, *a))(q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.jit(lambda *a: out_and_grads(ref, *a))(f32(q), f32(k), f32(v),
                                                      f32(do))
  return got, want


def _assert_close(got, want, tol):
  (out, grads), (ref_out, ref_grads) = got, want
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out,
                             rtol=tol, atol=tol, err_msg="output")
  for name, g, rg in zip("qkv", grads, ref_grads):
    assert bool(jnp.all(jnp.isfinite(g))), f"d{name} not finite"
    np.testing.assert_allclose(np.asarray(g, np.float32), rg,
                               rtol=tol, atol=tol, err_msg=f"d{name}")


# (batch, length, heads, kv_heads, head_dim, causal, block_q, block_k)
_SHAPES = [
    (2, 100, 4, 2, 64, True, 32, 32),  # GQA, length not a block multiple
    (1, 80, 3, 1, 64, False, 64, 32),  # MQA (odd group), non-causal, padded
    (1, 96, 2, 2, 128, True, 32, 64),  # MHA, head_dim 128, block_q != block_k
]


@pytest.mark.parametrize("shape", _SHAPES, ids=str)
def test_matches_reference_f32(shape):
  b, length, h, kh, d, causal, bq, bk = shape
  q, k, v, do = _inputs(0, b, length, length, h, kh, d, jnp.float32)
  got, want = _run_both(q, k, v, do, causal=causal, block_q=bq, block_k=bk)
  assert got[0].shape == q.shape and got[0].dtype == jnp.float32
  _assert_close(got, want, 1e-5)


def test_matches_reference_bf16():
  q, k, v, do = _inputs(1, 2, 128, 128, 4, 2, 128, jnp.bfloat16)
  got, want = _run_both(q, k, v, do, causal=True, block_q=32, block_k=64)
  assert got[0].dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in got[1])
  _assert_close(got, want, 2e-2)


def test_segment_ids():
  # Non-causal segments are covered by test_cross_lengths_with_segments.
  q, k, v, do = _inputs(2, 2, 112, 112, 4, 2, 64, jnp.float32)
  seg = _packed_segments(0, 2, 112)
  got, want = _run_both(q, k, v, do, seg, causal=True, block_q=32,
                        block_k=32)
  _assert_close(got, want, 1e-5)


def test_segment_ids_equal_separate_documents():
  """A packed sequence gives the same result as each document on its own."""
  q, k, v, _ = _inputs(3, 1, 96, 96, 2, 1, 64, jnp.float32)
  seg = jnp.asarray([[0] * 40 + [1] * 56], jnp.int32)
  kw = dict(causal=True, block_q=32, block_k=32, interpret=True)

  @jax.jit
  def run(q, k, v):
    packed = flash_attention(q, k, v, seg, **kw)
    first = flash_attention(q[:, :40], k[:, :40], v[:, :40], **kw)
    second = flash_attention(q[:, 40:], k[:, 40:], v[:, 40:], **kw)
    return packed, first, second

  packed, first, second = run(q, k, v)
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,window,with_seg",
                         [(True, 17, True), (False, 40, False)],
                         ids=["causal-segments", "noncausal"])
def test_sliding_window(causal, window, with_seg):
  q, k, v, do = _inputs(4, 1, 128, 128, 4, 2, 64, jnp.float32)
  seg = _packed_segments(1, 1, 128, max_docs=2) if with_seg else None
  got, want = _run_both(q, k, v, do, seg, causal=causal, window=window,
                        block_q=32, block_k=32)
  _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_fully_masked_rows_are_zero(causal):
  """Queries whose segment has no visible key: output 0, zero/finite grads."""
  length = 72
  q, k, v, do = _inputs(5, 1, length, length, 2, 1, 64, jnp.float32)
  q_seg = jnp.asarray([[0] * 30 + [1] * 20 + [2] * 22], jnp.int32)
  # Segment 1 never appears among the keys; segment 2 starts later in the keys
  # than in the queries, so with causal=True its first queries see nothing.
  kv_seg = jnp.asarray([[0] * 30 + [3] * 30 + [2] * 12], jnp.int32)
  got, want = _run_both(q, k, v, do, (q_seg, kv_seg), causal=causal,
                        block_q=32, block_k=32)
  _assert_close(got, want, 1e-5)
  out, (dq, _, _) = got
  dead = np.array(q_seg[0] == 1)
  if causal:
    dead |= np.asarray((q_seg[0] == 2) & (jnp.arange(length) < 60))
  assert np.all(np.asarray(out)[0, dead] == 0.0)
  assert np.all(np.asarray(dq)[0, dead] == 0.0)


def test_cross_lengths_with_segments():
  """Non-causal attention with q_len != kv_len and (q, kv) segment ids."""
  q, k, v, do = _inputs(6, 2, 50, 70, 4, 2, 64, jnp.float32)
  q_seg = _packed_segments(2, 2, 50, max_docs=3)
  kv_seg = _packed_segments(3, 2, 70, max_docs=3)
  got, want = _run_both(q, k, v, do, (q_seg, kv_seg), causal=False,
                        block_q=32, block_k=32)
  _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("window", [0, 17])
def test_masked_tiles_are_skipped(window):
  """Tiles that are fully masked are never read: poison them with NaN."""
  q, k, v, _ = _inputs(7, 1, 128, 128, 2, 1, 64, jnp.float32)
  if window:  # queries 96..127 only need keys >= 80: tiles [0, 64) unused
    rows, bad = slice(96, 128), slice(0, 64)
  else:  # causal: queries 0..31 only need the first key tile
    rows, bad = slice(0, 32), slice(32, 128)
  want = naive_attention(q, k, v, causal=True, sliding_window=window)
  k = k.at[:, bad].set(jnp.nan)
  v = v.at[:, bad].set(jnp.nan)
  out = jax.jit(lambda q, k, v: flash_attention(
      q, k, v, causal=True, sliding_window=window, block_q=32, block_k=32,
      interpret=True))(q, k, v)
  assert bool(jnp.all(jnp.isfinite(out[:, rows])))
  np.testing.assert_allclose(out[:, rows], want[:, rows], rtol=1e-5, atol=1e-5)


def test_default_blocks():
  """Default block sizes (clipped to the padded length) and backward blocks."""
  q, k, v, do = _inputs(8, 1, 200, 200, 2, 2, 64, jnp.float32)
  got, want = _run_both(q, k, v, do, causal=True, block_q=128, block_k=128)
  _assert_close(got, want, 1e-5)


def test_tpu_layout(monkeypatch):
  """The BHLD layout used on TPU gives the same results (run interpreted)."""
  from lmjax.kernels import flash_attention as fa_module
  monkeypatch.setattr(fa_module, "_FORCE_LAYOUT", "BHLD")
  q, k, v, do = _inputs(10, 1, 100, 100, 4, 2, 64, jnp.float32)
  seg = _packed_segments(4, 1, 100, max_docs=3)
  got, want = _run_both(q, k, v, do, seg, causal=True, window=40,
                        block_q=32, block_k=32)
  _assert_close(got, want, 1e-5)


def test_rejects_bad_arguments():
  q, k, v, _ = _inputs(9, 1, 64, 32, 4, 3, 64, jnp.float32)
  with pytest.raises(ValueError):  # 4 heads vs 3 kv heads
    flash_attention(q, k, v, causal=False, interpret=True)
  q, k, v, _ = _inputs(9, 1, 64, 32, 4, 2, 64, jnp.float32)
  with pytest.raises(ValueError):  # causal needs q_len == kv_len
    flash_attention(q, k, v, causal=True, interpret=True)
  with pytest.raises(ValueError):  # block must be a power of two
    flash_attention(q, k, v, causal=False, block_q=48, interpret=True)
