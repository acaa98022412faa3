"""Chunked cross-entropy (`model.logits_chunk`): the same sums and gradients as the full logits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax import tasks
from lmjax.losses import chunked_cross_entropy, cross_entropy
from lmjax.models import transformer
from lmjax.parallel import mesh as mesh_lib
from lmjax.train import step as step_lib
from lmjax.train.state import init_state

TOL = dict(rtol=1e-5, atol=1e-5)


def _weights(rng, shape):
  """Non-uniform weights with about a quarter exactly zero."""
  return (rng.random(shape) * 2.0 * (rng.random(shape) > 0.25)).astype(np.float32)


def _full(hidden_BLD, w_DV, targets_BL, weights_BL, z_loss):
  logits_BLV = jnp.dot(hidden_BLD, w_DV.astype(hidden_BLD.dtype),
                       preferred_element_type=jnp.float32)
  return cross_entropy(logits_BLV, targets_BL, weights_BL, z_loss)


@pytest.mark.parametrize('chunk', [1, 5, 16, 39, 40, 1000])
def test_chunked_equals_full_values_and_grads(chunk):
  rng = np.random.default_rng(chunk)
  batch, length, d, vocab, z_loss = 3, 13, 16, 50, 0.1
  hidden = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, vocab)) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
  weights = jnp.asarray(_weights(rng, (batch, length)))

  full = _full(hidden, w, targets, weights, z_loss)
  chunked = jax.jit(chunked_cross_entropy, static_argnums=(4,))(hidden, w, targets, weights, chunk,
                                                                z_loss)
  assert set(chunked) == set(full)
  for key in full:
    np.testing.assert_allclose(chunked[key], full[key], err_msg=key, **TOL)
  assert float(full['z']) > 0 and float(full['weight']) < batch * length  # the test has teeth

  # A cotangent on every output, so nll, z and loss all carry gradient.
  def scalar(fn):
    return lambda h, w: sum(c * v for c, v in zip((1.0, 0.3, -0.2), (
        lambda s: (s['loss'], s['nll'], s['z']))(fn(h, w))))
  full_grads = jax.grad(scalar(lambda h, w: _full(h, w, targets, weights, z_loss)),
                        argnums=(0, 1))(hidden, w)
  chunked_grads = jax.jit(jax.grad(scalar(
      lambda h, w: chunked_cross_entropy(h, w, targets, weights, chunk, z_loss)),
                                   argnums=(0, 1)))(hidden, w)
  for name, g_full, g_chunked in zip(('hidden', 'w'), full_grads, chunked_grads):
    assert float(jnp.max(jnp.abs(g_full))) > 1e-3
    np.testing.assert_allclose(g_chunked, g_full, err_msg=name, **TOL)
  # Zero-weight tokens get no gradient.
  zero = np.asarray(weights) == 0
  assert np.all(np.asarray(chunked_grads[0])[zero] == 0)


def test_chunked_rejects_bad_chunk():
  with pytest.raises(ValueError, match='chunk'):
    chunked_cross_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((4, 8)), jnp.zeros((1, 2), jnp.int32),
                          jnp.ones((1, 2)), 0)


def test_chunked_bfloat16_close_to_full():
  """bfloat16 hidden states: the head matmul runs in bfloat16 with float32 accumulation in both."""
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 24, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(32, 64)) * 0.2, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 64, size=(2, 24)), jnp.int32)
  weights = jnp.asarray(_weights(rng, (2, 24)))
  full = _full(hidden, w, targets, weights, 1e-2)
  chunked = chunked_cross_entropy(hidden, w, targets, weights, 10, 1e-2)
  for key in full:
    np.testing.assert_allclose(chunked[key], full[key], rtol=1e-4, err_msg=key)
  g_full = jax.grad(lambda w: _full(hidden, w, targets, weights, 1e-2)['loss'])(w)
  g_chunked = jax.grad(lambda w: chunked_cross_entropy(hidden, w, targets, weights, 10,
                                                       1e-2)['loss'])(w)
  assert g_chunked.dtype == jnp.float32
  np.testing.assert_allclose(g_chunked, g_full, rtol=2e-2, atol=2e-3)


def _config(tie: bool, chunk: int):
  config = config_lib.load_config('tiny')
  config.batch_size, config.seq_len = 3, 21  # 63 tokens: not a multiple of the chunk
  config.z_loss = 0.05
  config.model.dtype = 'float32'
  config.model.tie_embeddings = tie
  config.model.logits_chunk = chunk
  mesh_lib.validate(config, num_devices=1)
  return config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, length, vocab = config.batch_size, config.seq_len, config.model.vocab_size
  tokens = rng.integers(0, vocab, size=(b, length + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
          'segment_ids': np.ones((b, length), np.int32), 'weights': _weights(rng, (b, length))}


def _two_steps(config):
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  state = init_state(task, tx, seed=0)
  state = state.replace(params=nn.unbox(state.params))
  fn = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b))
  metrics = []
  for seed in range(2):
    state, m = fn(state, _batch(config, seed))
    metrics.append(jax.device_get(m))
  evals = jax.jit(lambda p, b: step_lib.eval_step(task, p, b))(state.params, _batch(config, 5))
  return state, metrics, jax.device_get(evals)


@pytest.mark.parametrize('tie', [False, True])
def test_train_steps_chunked_equal_full(tie):
  full_state, full_metrics, full_eval = _two_steps(_config(tie, 0))
  chunked_state, chunked_metrics, chunked_eval = _two_steps(_config(tie, 16))
  assert ('lm_head' in full_state.params) == (not tie)
  for full, chunked in zip(full_metrics, chunked_metrics):
    assert int(full['skipped']) == 0
    for key in ('loss', 'z_loss', 'grad_norm', 'tokens'):
      np.testing.assert_allclose(chunked[key], full[key], err_msg=key, **TOL)
  for key in full_eval:
    np.testing.assert_allclose(chunked_eval[key], full_eval[key], err_msg=key, **TOL)
  flat_full = jax.tree_util.tree_leaves_with_path(full_state.params)
  flat_chunked = jax.tree.leaves(chunked_state.params)
  initial_task = tasks.from_config(_config(tie, 0))
  initial = jax.tree.leaves(nn.unbox(init_state(
      initial_task, initial_task.optimizer(_config(tie, 0))[0], seed=0).params))
  for (path, a), b, a0 in zip(flat_full, flat_chunked, initial):
    np.testing.assert_allclose(b, a, err_msg=jax.tree_util.keystr(path), **TOL)
    assert not np.array_equal(a, a0), jax.tree_util.keystr(path)  # every leaf moved


def test_sft_chunked_equals_full():
  """The SFT loss (LoRA adapters over a frozen base) with and without chunking."""
  grads, sums = [], []
  for chunk in (0, 16):
    config = _config(False, chunk)
    config.task, config.post.train_file, config.peft.method = 'sft', 'tests/data/sft.jsonl', 'lora'
    task = tasks.from_config(config)
    tx, _ = task.optimizer(config)
    params = nn.unbox(init_state(task, tx, seed=0).params)
    # LoRA's B starts at zero; move it so the adapters change the logits.
    params['trainable'] = jax.tree.map(lambda x: x + 0.01, params['trainable'])
    g, s = jax.jit(lambda p, b: step_lib.accumulated_grads(task, p, b))(params, _batch(config))
    grads.append(g)
    sums.append(s)
  for key in sums[0]:
    np.testing.assert_allclose(sums[1][key], sums[0][key], err_msg=key, **TOL)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads[1])):
    assert float(np.max(np.abs(a))) > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(b, a, err_msg=jax.tree_util.keystr(path), **TOL)


def test_logits_chunk_validation():
  config = config_lib.load_config('tiny')
  config.model.logits_chunk = -1
  with pytest.raises(config_lib.ConfigError, match='model.logits_chunk'):
    mesh_lib.validate(config, num_devices=1)
  assert config_lib.base_config().model.logits_chunk == 0
  assert transformer.ModelConfig.from_config(config_lib.base_config().model).logits_chunk == 0
  config.model.logits_chunk = 16
  config.mesh.pipeline, config.mesh.data = 2, 1
  with pytest.raises(config_lib.ConfigError, match='model.logits_chunk: not supported with pipe'):
    mesh_lib.validate(config, num_devices=2)
