"""Generation: KV-cache decoding against full forward passes, sampling filters, beam search."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lmjax.inference.generate import SamplingConfig, generate, left_pad, prefill, sample_tokens
from lmjax.models.transformer import ModelConfig, forward, forward_cached, init_params


def _model(num_kv_heads=2, vocab=64, init_std=0.5, seed=0, num_layers=1):
  cfg = ModelConfig(vocab_size=vocab, num_layers=num_layers, d_model=32, num_heads=4,
                    num_kv_heads=num_kv_heads, head_dim=8, mlp_dim=64, max_seq_len=128,
                    init_std=init_std)
  return cfg, nn.unbox(init_params(cfg, jax.random.key(seed)))


@functools.lru_cache(maxsize=None)
def _jitted_forward(cfg):
  return jax.jit(lambda params, tokens, positions, segments: forward(cfg, params, tokens,
                                                                      positions, segments))


def _full_logits(cfg, params, seq, width=32):
  """Logits of one sequence from a plain forward pass (no cache): (L, V). The sequence is
  right-padded to `width` (padding is segment 0 and comes after it) so one program serves all."""
  n = len(seq)
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :n] = seq
  segments = (np.arange(width) < n).astype(np.int32)[None]
  logits = _jitted_forward(cfg)(params, tokens, np.arange(width, dtype=np.int32)[None], segments)
  return np.asarray(logits[0, :n])


def _greedy_reference(cfg, params, prompt, n, stop_ids=()):
  seq, logps = list(prompt), []
  for _ in range(n):
    logits = _full_logits(cfg, params, seq)[-1]
    token = int(np.argmax(logits))
    logps.append(float(jax.nn.log_softmax(logits)[token]))
    seq.append(token)
    if token in stop_ids:
      break
  return seq[len(prompt):], logps


PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 6, 11, 12, 13, 14], [3]]


@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])  # MHA, GQA, MQA
def test_cached_logits_match_full_forward_every_step(num_kv_heads):
  cfg, params = _model(num_kv_heads, num_layers=2)
  steps = 6
  rng = np.random.default_rng(num_kv_heads)
  continuations = rng.integers(0, cfg.vocab_size, (len(PROMPTS), steps)).astype(np.int32)
  tokens, positions, segments = left_pad(PROMPTS)
  logits_BV, cache = prefill(cfg, params, tokens, positions, segments,
                             max_len=tokens.shape[1] + steps)
  pos_B = np.asarray([len(p) for p in PROMPTS], np.int32)
  step = jax.jit(lambda c, t, p: forward_cached(cfg, params, t[:, None], p[:, None],
                                                jnp.ones_like(t[:, None]), c))
  cached = [np.asarray(logits_BV)]
  for t in range(steps - 1):
    logits_B1V, cache = step(cache, continuations[:, t], pos_B + t)
    cached.append(np.asarray(logits_B1V[:, 0]))
  for row, prompt in enumerate(PROMPTS):
    full = _full_logits(cfg, params, prompt + list(continuations[row, :steps - 1]))
    for t in range(steps):
      np.testing.assert_allclose(cached[t][row], full[len(prompt) - 1 + t], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize('num_kv_heads', [4, 1])
def test_greedy_equals_stepwise_argmax_of_full_forwards(num_kv_heads):
  cfg, params = _model(num_kv_heads)
  out = generate(cfg, params, PROMPTS, SamplingConfig(max_new_tokens=8))
  for row, prompt in enumerate(PROMPTS):
    tokens, logps = _greedy_reference(cfg, params, prompt, 8)
    assert list(out['tokens'][row]) == tokens
    np.testing.assert_allclose(out['logprobs'][row], logps, atol=1e-4)
  assert not out['finished'].any() and list(out['lengths']) == [8, 8, 8]


def test_stop_token_ends_a_row_and_sets_finished():
  cfg, params = _model()
  free = generate(cfg, params, PROMPTS, SamplingConfig(max_new_tokens=8))
  stop = int(free['tokens'][0, 2])  # row 0 emits this at step 2 (or earlier)
  first = int(np.nonzero(free['tokens'][0] == stop)[0][0])
  out = generate(cfg, params, PROMPTS, SamplingConfig(max_new_tokens=8, stop_ids=(stop,)))
  assert out['finished'][0] and out['lengths'][0] == first + 1
  assert list(out['tokens'][0, :first + 1]) == list(free['tokens'][0, :first + 1])
  assert not out['tokens'][0, first + 1:].any() and not out['logprobs'][0, first + 1:].any()
  for row in range(len(PROMPTS)):
    ref, _ = _greedy_reference(cfg, params, PROMPTS[row], 8, (stop,))
    assert out['finished'][row] == (stop in ref) and out['lengths'][row] == len(ref)


def test_same_seed_same_output_different_seed_different():
  cfg, params = _model(init_std=0.02)  # flat distributions: samples vary a lot
  sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95, min_p=0.01,
                            repetition_penalty=1.3)
  a = generate(cfg, params, PROMPTS, sampling, seed=1)
  b = generate(cfg, params, PROMPTS, sampling, seed=1)
  c = generate(cfg, params, PROMPTS, sampling, seed=2)
  np.testing.assert_array_equal(a['tokens'], b['tokens'])
  np.testing.assert_array_equal(a['logprobs'], b['logprobs'])
  assert not np.array_equal(a['tokens'], c['tokens'])


def _probs(logits):
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max())
  return p / p.sum()


LOGITS = np.log(np.asarray([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.03, 0.02]))


@pytest.mark.parametrize('option, allowed', [
    (dict(top_k=3), [0, 1, 2]),
    (dict(top_p=0.6), [0, 1, 2]),  # 0.30 + 0.22 = 0.52 < 0.6 <= 0.68
    (dict(top_p=0.5), [0, 1]),
    (dict(min_p=0.25), [0, 1, 2, 3, 4]),  # p >= 0.25 * 0.30
    (dict(top_k=5, top_p=0.8), [0, 1, 2, 3]),
])
def test_truncated_sampling_support_and_frequencies(option, allowed):
  n = 40000
  order = np.random.default_rng(0).permutation(len(LOGITS))  # tokens not in sorted order
  logits = np.zeros(len(LOGITS), np.float32)
  logits[order] = LOGITS
  cfg = SamplingConfig(temperature=1.0, **option)
  tokens = np.asarray(sample_tokens(jnp.broadcast_to(jnp.asarray(logits), (n, len(logits))), cfg,
                                    jax.random.key(0)))
  allowed_ids = order[allowed]
  assert set(np.unique(tokens)) <= set(allowed_ids.tolist())
  expected = _probs(logits[allowed_ids])
  counts = np.asarray([(tokens == t).sum() for t in allowed_ids])
  assert stats.chisquare(counts, expected * n).pvalue > 1e-3


def test_temperature_sampling_frequencies_and_greedy_top_k():
  n = 40000
  logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, len(LOGITS)))
  tokens = np.asarray(sample_tokens(logits, SamplingConfig(temperature=0.7), jax.random.key(1)))
  counts = np.bincount(tokens, minlength=len(LOGITS))
  assert stats.chisquare(counts, _probs(LOGITS / 0.7) * n).pvalue > 1e-3
  greedy = sample_tokens(logits[:4], SamplingConfig(top_k=2), jax.random.key(1))
  assert list(np.asarray(greedy)) == [0, 0, 0, 0]


def test_repetition_penalty_demotes_seen_tokens():
  logits = jnp.asarray([[2.0, 1.9, -1.0]])
  seen = jnp.asarray([[True, False, False]])
  cfg = SamplingConfig(repetition_penalty=2.0)
  assert int(sample_tokens(logits, cfg, jax.random.key(0), seen)[0]) == 1


@pytest.mark.parametrize('stop_ids, length_penalty', [((), 1.0), ((3,), 0.0)])
def test_beam_width_one_is_greedy(stop_ids, length_penalty):
  cfg, params = _model(vocab=16)
  greedy = generate(cfg, params, PROMPTS[:2], SamplingConfig(max_new_tokens=6, stop_ids=stop_ids))
  beam = generate(cfg, params, PROMPTS[:2], SamplingConfig(
      max_new_tokens=6, stop_ids=stop_ids, num_beams=1, length_penalty=length_penalty))
  for key in ('tokens', 'finished', 'lengths'):
    np.testing.assert_array_equal(beam[key], greedy[key])
  np.testing.assert_allclose(beam['logprobs'], greedy['logprobs'], atol=1e-5)


def _exhaustive_best(cfg, params, prompt, n, stop_ids, length_penalty):
  """The best hypothesis among every continuation of up to n tokens (ending at a stop token or
  at n tokens), by full forward passes."""
  seqs = np.asarray(list(itertools.product(range(cfg.vocab_size), repeat=n)), np.int32)
  full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
  length = full.shape[1]
  logits = _jitted_forward(cfg)(params, full, np.broadcast_to(np.arange(length), full.shape),
                                np.ones_like(full))
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  step_logp = np.take_along_axis(logp[:, len(prompt) - 1:-1], seqs[:, :, None], axis=-1)[..., 0]
  best = {}
  for seq, lp in zip(seqs, step_logp):
    stops = [i for i, t in enumerate(seq) if t in stop_ids]
    k = stops[0] + 1 if stops else n
    hyp = tuple(seq[:k])
    best[hyp] = float(lp[:k].sum()) / k**length_penalty
  return max(best.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize('stop_ids, length_penalty', [((), 1.0), ((2,), 1.0), ((2, 4), 0.0),
                                                      ((1,), -0.5)])
def test_wide_beam_finds_the_exhaustive_optimum(stop_ids, length_penalty):
  cfg, params = _model(vocab=6, init_std=0.6, seed=3)
  prompts = [[1, 5, 3], [4]]
  out = generate(cfg, params, prompts, SamplingConfig(
      max_new_tokens=3, stop_ids=stop_ids, num_beams=40, length_penalty=length_penalty))
  for row, prompt in enumerate(prompts):
    hyp, score = _exhaustive_best(cfg, params, prompt, 3, stop_ids, length_penalty)
    n = int(out['lengths'][row])
    assert tuple(out['tokens'][row, :n]) == hyp
    assert not out['tokens'][row, n:].any()
    assert out['scores'][row] == pytest.approx(score, abs=1e-4)
    assert out['logprobs'][row, :n].sum() / n**length_penalty == pytest.approx(score, abs=1e-4)
    assert bool(out['finished'][row]) == (hyp[-1] in stop_ids)


def test_narrow_beam_is_no_worse_than_greedy():
  cfg, params = _model(vocab=16)
  sampling = dict(max_new_tokens=5, length_penalty=0.0)
  greedy = generate(cfg, params, PROMPTS, SamplingConfig(max_new_tokens=5))
  beam = generate(cfg, params, PROMPTS, SamplingConfig(num_beams=3, **sampling))
  assert np.all(beam['scores'] >= greedy['logprobs'].sum(axis=1) - 1e-5)
  np.testing.assert_allclose(beam['scores'], beam['logprobs'].sum(axis=1), atol=1e-5)


def test_sampling_config_rejects_bad_options():
  with pytest.raises(ValueError, match='top_p'):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match='beam search'):
    SamplingConfig(num_beams=2, temperature=1.0)
