"""Flash attention numerics in the Pallas interpreter (CPU) against a naive reference.

The interpreter runs the TPU tiling (`lmjax.kernels.flash_tpu`: the same kernels, block specs and
grid that Mosaic compiles), so these tests cover what a TPU runs. Shapes are small and blocks
32/64 so that several tiles, padded lengths and skipped tiles are exercised.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.kernels.flash_attention import flash_attention
from lmjax.kernels import flash_blocks


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
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  q = normal(batch, q_len, heads, head_dim)
  k = normal(batch, kv_len, kv_heads, head_dim)
  v = normal(batch, kv_len, kv_heads, head_dim)
  return q, k, v, normal(*q.shape)


def _packed_segments(seed, batch, length, max_docs=4):
  """Random packed documents: non-decreasing ids with random boundaries."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), max_docs - 1, replace=False))
    for c in cuts:
      seg[b, c:] += 1
  return jnp.asarray(seg)


def _run_both(q, k, v, do, seg=None, *, causal, window=0, block_q, block_k, **kw):
  """Returns (out, (dq, dk, dv)) for the kernel and for the reference."""
  if isinstance(seg, tuple):
    q_seg, kv_seg = seg
  else:
    q_seg = kv_seg = seg

  def kernel(q, k, v):
    return flash_attention(q, k, v, seg, causal=causal, sliding_window=window,
                           block_q=block_q, block_k=block_k, block_q_bwd=block_q,
                           block_k_bwd=block_k, interpret=True, **kw)

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


# (batch, length, heads, kv_heads, head_dim, causal, window, segments, block_q, block_k)
_CASES = [
    (2, 100, 4, 2, 64, True, 0, True, 32, 32),  # GQA, segments, length not a block multiple
    (1, 96, 2, 2, 128, True, 17, True, 32, 64),  # MHA, head_dim 128, window, bq != bk
    (1, 128, 4, 2, 64, False, 40, False, 32, 32),  # one-sided window without causality
]


@pytest.mark.parametrize('case', _CASES, ids=str)
def test_matches_reference_f32(case):
  b, length, h, kh, d, causal, window, with_seg, bq, bk = case
  q, k, v, do = _inputs(0, b, length, length, h, kh, d, jnp.float32)
  seg = _packed_segments(1, b, length) if with_seg else None
  got, want = _run_both(q, k, v, do, seg, causal=causal, window=window, block_q=bq, block_k=bk)
  assert got[0].shape == q.shape and got[0].dtype == jnp.float32
  _assert_close(got, want, 1e-5)


def test_matches_reference_bf16():
  q, k, v, do = _inputs(1, 2, 128, 128, 4, 2, 128, jnp.bfloat16)
  seg = _packed_segments(2, 2, 128)
  got, want = _run_both(q, k, v, do, seg, causal=True, block_q=32, block_k=64)
  assert got[0].dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in got[1])
  _assert_close(got, want, 2e-2)


def test_fully_masked_rows_cross_lengths():
  """(q, kv) segment ids with q_len != kv_len (non-causal); segment 1 of the queries has no key
  at all: its rows are 0 with zero gradients."""
  q, k, v, do = _inputs(5, 1, 72, 88, 2, 1, 64, jnp.float32)
  q_seg = jnp.asarray([[0] * 30 + [1] * 20 + [2] * 22], jnp.int32)
  kv_seg = jnp.asarray([[0] * 30 + [3] * 30 + [2] * 28], jnp.int32)
  got, want = _run_both(q, k, v, do, (q_seg, kv_seg), causal=False, block_q=32, block_k=32)
  _assert_close(got, want, 1e-5)
  out, (dq, _, _) = got
  dead = np.asarray(q_seg[0] == 1)
  assert np.all(np.asarray(out)[0, dead] == 0.0)
  assert np.all(np.asarray(dq)[0, dead] == 0.0)


def test_gpu_tiling_in_interpreter():
  """The Triton kernels' tiling (whole K/V per program, in-kernel loops) gives the reference."""
  q, k, v, do = _inputs(6, 1, 100, 100, 4, 2, 64, jnp.float32)
  seg = _packed_segments(3, 1, 100, max_docs=3)
  got, want = _run_both(q, k, v, do, seg, causal=True, window=40, block_q=32, block_k=32,
                        gpu_tiling=True)
  _assert_close(got, want, 1e-5)


@pytest.mark.parametrize('window', [0, 17])
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


def test_segment_tiles_are_skipped():
  """A kv tile whose segment ids share nothing with a q tile's is never read."""
  q, k, v, _ = _inputs(8, 1, 128, 128, 2, 1, 64, jnp.float32)
  seg = jnp.asarray([[1] * 64 + [2] * 64], jnp.int32)  # queries 64..127 never need keys < 64
  want = naive_attention(q, k, v, seg, seg, causal=False)
  k, v = k.at[:, :64].set(jnp.nan), v.at[:, :64].set(jnp.nan)
  out = jax.jit(lambda q, k, v: flash_attention(q, k, v, seg, causal=False, block_q=32,
                                                block_k=32, interpret=True))(q, k, v)
  np.testing.assert_allclose(out[:, 64:], want[:, 64:], rtol=1e-5, atol=1e-5)


def test_block_api_merged_over_four_blocks_equals_one_call():
  """Four kv blocks (offsets as traced values, merged with the online-softmax rule) give the
  whole causal, windowed, segmented attention: values and gradients."""
  q, k, v, do = _inputs(9, 1, 128, 128, 4, 2, 64, jnp.float32)
  seg = _packed_segments(4, 1, 128, max_docs=3)
  kw = dict(causal=True, sliding_window=70, block_q=32, block_k=32, block_q_bwd=32,
            block_k_bwd=32, backend='interpret')
  pieces = 4
  size = 128 // pieces

  def merged(q, k, v):
    k_blocks = k.reshape(1, pieces, size, *k.shape[2:]).swapaxes(0, 1)
    v_blocks = v.reshape(1, pieces, size, *v.shape[2:]).swapaxes(0, 1)
    seg_blocks = seg.reshape(1, pieces, size).swapaxes(0, 1)

    def step(carry, block):
      o, lse = carry
      index, k_b, v_b, seg_b = block
      o_b, lse_b = flash_blocks.attention_block(q, k_b, v_b, (seg, seg_b), q_offset=0,
                                                kv_offset=index * size, **kw)
      return flash_blocks.merge(o, lse, o_b, lse_b), None

    init = (jnp.zeros_like(q), jnp.full((1, 4, 128), -jnp.inf, jnp.float32))
    (o, _), _ = jax.lax.scan(step, init, (jnp.arange(pieces), k_blocks, v_blocks, seg_blocks))
    return o

  def whole(q, k, v):
    return naive_attention(q, k, v, seg, seg, causal=True, sliding_window=70)

  def out_and_grads(fn, *args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(do)

  got = jax.jit(lambda *a: out_and_grads(merged, *a))(q, k, v)
  want = jax.jit(lambda *a: out_and_grads(whole, *a))(q, k, v)
  _assert_close(got, want, 1e-5)


def test_block_api_lse_and_empty_rows():
  """lse is the row's log-sum-exp of the visible scaled scores; a kv block wholly in the future
  of its queries gives o = 0 and lse = -inf."""
  q, k, v, _ = _inputs(10, 1, 64, 64, 2, 2, 64, jnp.float32)
  run = jax.jit(lambda q, k, v, off: flash_blocks.attention_block(
      q, k, v, q_offset=0, kv_offset=off, causal=True, block_q=32, block_k=32,
      backend='interpret'))
  o, lse = run(q, k, v, 0)
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / 8.0
  s = jnp.where(jnp.tril(jnp.ones((64, 64), bool)), s, -jnp.inf)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(s, axis=-1), rtol=1e-5, atol=1e-5)
  o, lse = run(q, k, v, 64)
  assert np.all(np.asarray(o) == 0.0) and np.all(np.asarray(lse) == -np.inf)


def test_rejects_bad_arguments():
  q, k, v, _ = _inputs(9, 1, 64, 32, 4, 3, 64, jnp.float32)
  with pytest.raises(ValueError, match='num_kv_heads'):
    flash_attention(q, k, v, causal=False, interpret=True)
  q, k, v, _ = _inputs(9, 1, 64, 32, 4, 2, 64, jnp.float32)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    flash_attention(q, k, v, causal=True, interpret=True)
  with pytest.raises(ValueError, match='block_q=48'):
    flash_attention(q, k, v, causal=False, block_q=48, interpret=True)
  with pytest.raises(ValueError, match='block_k=64 must be a power of two >= 128 on backend tpu'):
    flash_attention(q, k, v, causal=False, block_k=64, backend='tpu')


def test_triton_exports_for_cuda_with_only_its_check_disabled():
  """The GPU kernels (forward and backward) serialise for CUDA on this CPU host; the Triton
  custom call is the only unstable one, so disabling exactly its check suffices."""
  from jax import export  # pylint: disable=g-import-not-at-top
  from lmjax.kernels import flash_gpu  # pylint: disable=g-import-not-at-top

  def loss(q, k, v, seg):
    out = flash_attention(q, k, v, seg, causal=True, backend='gpu')
    return out.astype(jnp.float32).sum()

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  with pytest.raises(ValueError, match='custom calls whose targets have no compatibility'):
    export.export(fn, platforms=['cuda'])(q, kv, kv, seg)
  exported = export.export(fn, platforms=['cuda'],
                           disabled_checks=flash_gpu.export_disabled_checks())(q, kv, kv, seg)
  assert exported.platforms == ('cuda',)
  assert exported.mlir_module().count('@__gpu$xla.gpu.triton') == 3  # fwd, dq, dk/dv


def test_model_attention_under_a_mesh_equals_xla():
  """`attention(impl='pallas')` on 4 CPU devices (fsdp x tensor rules: batch and heads split, the
  kernel inside shard_map; kv heads 2 split with the q heads, and 1 repeated per q head) equals
  `impl='xla'` in values and gradients (worker: tests/kernel_sharded_worker.py)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4 '
                       '--xla_backend_optimization_level=0')
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernel_sharded_worker.py')
  proc = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  diffs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert diffs['gqa_manual'] and diffs['mqa_repeated_manual']
  assert diffs['gqa'] < 1e-5 and diffs['mqa_repeated'] < 1e-5, diffs
