"""Model properties: causality, document isolation, scan/remat equivalence, remat memory, masks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models import attention as attention_lib
from lmjax.models.transformer import ModelConfig, forward, init_params


def _inputs(batch=2, length=12, seed=1, vocab=64):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return tokens, positions, jnp.ones((batch, length), jnp.int32)


def test_future_tokens_never_reach_past_logits(tiny_model, tiny_params):
  cfg, params = tiny_model, tiny_params
  tokens, positions, segments = _inputs()
  t = 6
  # past tokens use ids < 32, future ones ids >= 32: the future's embedding rows get no gradient
  tokens = jnp.concatenate([tokens[:, :t] % 32, 32 + tokens[:, t:] % 32], axis=1)

  def past_logits(p):
    return forward(cfg, p, tokens, positions, segments)[:, :t].sum()

  grad_embed = jax.grad(past_logits)(params)['embed']
  assert np.abs(grad_embed[:32]).max() > 0
  np.testing.assert_array_equal(grad_embed[32:], 0.0)
  changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % 64)
  np.testing.assert_array_equal(forward(cfg, params, tokens, positions, segments)[:, :t],
                                forward(cfg, params, changed, positions, segments)[:, :t])


def test_packed_documents_are_isolated(tiny_model, tiny_params, packed_batch):
  cfg, params = tiny_model, tiny_params
  tokens, positions, segments = (packed_batch[k] for k in ('inputs', 'positions', 'segment_ids'))
  row, first = 0, 7  # row 0: a 7-token document, then the start of a 10-token one
  packed = forward(cfg, params, tokens, positions, segments)[row]
  other = forward(cfg, params, tokens.at[row, first:].set(0), positions, segments)[row]
  np.testing.assert_array_equal(packed[:first], other[:first])
  assert not np.allclose(packed[first:], other[first:], atol=1e-4)  # the edit did change doc 2
  doc2 = tokens[row:row + 1, first:]
  alone = forward(cfg, params, doc2, positions[row:row + 1, first:], jnp.ones_like(doc2))[0]
  np.testing.assert_allclose(packed[first:], alone, atol=1e-5)


def _stack_layers(params, num_layers):
  layers = [params.pop(f'layers_{i}') for i in range(num_layers)]
  return dict(params, layers=jax.tree.map(lambda *x: jnp.stack(x), *layers))


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scan_equals_unrolled_values_and_grads(tiny_model, tiny_params, remat):
  cfg, params = tiny_model, tiny_params
  scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat=remat)
  scan_params = _stack_layers(dict(params), cfg.num_layers)
  tokens, positions, segments = _inputs()
  loss = lambda cfg: lambda p: jnp.mean(forward(cfg, p, tokens, positions, segments) ** 2)
  value, grads = jax.value_and_grad(loss(cfg))(params)
  scan_value, scan_grads = jax.value_and_grad(loss(scan_cfg))(scan_params)
  np.testing.assert_allclose(value, scan_value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               _stack_layers(dict(grads), cfg.num_layers), scan_grads)


# Big enough that the activations the backward keeps dominate XLA's temporaries: 4 layers,
# 4 x 64 tokens. What each policy keeps per layer beyond `full` (the layer input): `minimal` the
# attention output (T x H x Dh); `dots_saveable` every matmul without batch dimensions (q, k, v,
# o, gate, up, down); `dots` those and the batched attention products (scores, attention output);
# `none` everything.
_REMAT_CFG = ModelConfig(vocab_size=64, num_layers=4, d_model=64, num_heads=4, num_kv_heads=2,
                         head_dim=16, mlp_dim=128)
_REMAT_POLICIES = ('none', 'dots', 'dots_saveable', 'minimal', 'full')  # most kept first


@pytest.mark.parametrize('scan', [True, False])
def test_remat_policies_keep_what_they_name(scan):
  """Every policy gives the gradient of no remat; with scanned layers XLA's temporaries of the
  compiled gradient fall strictly from none to dots to dots_saveable to minimal to full, and
  minimal keeps about one attention output per layer more than full (were a policy ignored, two
  of them would compile to the same program). Unrolled layers on CPU: XLA schedules the
  recomputation early, so only none > every policy holds there (checked)."""
  base = dataclasses.replace(_REMAT_CFG, scan_layers=scan)
  params = nn.unbox(init_params(base, jax.random.key(0)))
  batch, length = 4, 64
  tokens, positions, segments = _inputs(batch, length, vocab=base.vocab_size)
  temp, grads = {}, {}
  for remat in _REMAT_POLICIES:
    cfg = dataclasses.replace(base, remat=remat)
    loss = lambda p, cfg=cfg: jnp.mean(forward(cfg, p, tokens, positions, segments) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    grads[remat] = compiled(params)
  for remat in _REMAT_POLICIES[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads['none'], grads[remat])
    assert temp['none'] > temp[remat], temp
  if scan:
    assert [temp[r] for r in _REMAT_POLICIES] == sorted(temp.values(), reverse=True), temp
    assert len(set(temp.values())) == len(_REMAT_POLICIES), temp
    attention_outputs = base.num_layers * batch * length * base.num_heads * base.head_dim * 4
    assert temp['minimal'] - temp['full'] == pytest.approx(attention_outputs, rel=0.25), temp


def _naive_attention(q, k, v, mask):
  """Repeats K/V per query head and loops over nothing clever: an independent reference."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('blhd,bshd->bhls', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[:, None], scores, -np.inf)
  peak = np.max(np.where(np.isfinite(scores), scores, -1e30), axis=-1, keepdims=True)
  weights = np.where(mask[:, None], np.exp(scores - peak), 0.0)
  weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-30)
  return np.einsum('bhls,bshd->blhd', weights, v)


@pytest.mark.parametrize('heads,kv_heads,window', [(4, 4, 0), (4, 2, 0), (4, 1, 3), (2, 2, 5)])
def test_xla_attention_matches_naive(heads, kv_heads, window):
  rng = np.random.default_rng(0)
  b, length, dh = 2, 10, 8
  q = rng.normal(size=(b, length, heads, dh)).astype(np.float32)
  k = rng.normal(size=(b, length, kv_heads, dh)).astype(np.float32)
  v = rng.normal(size=(b, length, kv_heads, dh)).astype(np.float32)
  segments = np.array([[1] * 4 + [2] * 6, [0] * 3 + [1] * 7], np.int32)
  positions = np.array([list(range(4)) + list(range(6)), list(range(3)) + list(range(7))], np.int32)
  out = attention_lib.attention(q, k, v, segment_ids_BL=segments, positions_BL=positions,
                                sliding_window=window)
  i, j = np.arange(length)[:, None], np.arange(length)[None]
  mask = (segments[:, :, None] == segments[:, None, :]) & (j <= i)
  if window:
    mask &= (positions[:, :, None] - positions[:, None, :]) < window
  np.testing.assert_allclose(out, _naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_fully_masked_query_outputs_zero():
  q = jnp.ones((1, 2, 1, 4))
  k = v = jnp.ones((1, 3, 1, 4))
  mask = jnp.array([[[True, True, False], [False, False, False]]])
  out = attention_lib.xla_attention(q, k, v, mask)
  np.testing.assert_array_equal(out[0, 1], 0.0)
  assert np.all(np.isfinite(jax.grad(lambda q: attention_lib.xla_attention(q, k, v, mask).sum())(q)))


def test_tied_embeddings_share_the_table(tiny_model):
  cfg = dataclasses.replace(tiny_model, tie_embeddings=True)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  assert 'lm_head' not in params
  tokens, positions, segments = _inputs()
  logits = forward(cfg, params, tokens, positions, segments)
  hidden_grad = jax.grad(lambda p: forward(cfg, p, tokens, positions, segments).sum())(params)
  assert logits.shape == (2, 12, 64) and np.abs(hidden_grad['embed']).max() > 0


def test_bfloat16_compute_stays_close_to_float32(tiny_model, tiny_params):
  params = tiny_params
  tokens, positions, segments = _inputs()
  ref = forward(tiny_model, params, tokens, positions, segments)
  low = forward(dataclasses.replace(tiny_model, dtype=jnp.bfloat16), params, tokens, positions,
                segments)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, ref, atol=0.05)
