"""QLoRA-style quantised frozen base (`peft.base_dtype = int8 | nf4`, lmjax.peft.quant)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lmjax import cli
from lmjax import tasks
from lmjax.config import ConfigError, base_config, validate
from lmjax.models.transformer import ModelConfig, init_params
from lmjax.models.transformer import forward as _forward
from lmjax.peft import quant
from lmjax.tasks import params as params_lib
from lmjax.train import step as step_lib
from lmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
forward = jax.jit(_forward, static_argnums=0)

# The NF4 table, written out independently of lmjax.peft.quant (QLoRA paper, appendix E).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def _weight(shape, seed=0):
  w = np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) * 0.02
  w[..., 0, :] *= 20.0  # outliers: a block absmax far from the typical value
  return w


def _np_blocks(w, lead, n_in, bs):
  """(lead, n_blocks, bs, n_out) float64 view of a weight."""
  n_out = int(np.prod(w.shape)) // (int(np.prod(lead, dtype=int)) * n_in)
  return w.astype(np.float64).reshape(tuple(lead) + (n_in // bs, bs, n_out))


# (path, shape, stacked, lead, n_in, block): unrolled and scanned q (D, H, Dh), o (H, Dh, D), and
# an MLP weight whose input size is a multiple of 64 (several blocks per column).
CASES = [
    (('layers_0', 'attn', 'q'), (32, 4, 8), False, (), 32, 32),
    (('layers', 'attn', 'o'), (3, 4, 32, 16), True, (3,), 128, 64),
    (('layers_1', 'mlp', 'down'), (192, 24), False, (), 192, 64),
]


@pytest.mark.parametrize('path,shape,stacked,lead,n_in,bs', CASES)
def test_int8_error_is_at_most_half_a_step(path, shape, stacked, lead, n_in, bs):
  w = _weight(shape)
  leaf = quant.quantize(jnp.asarray(w), 'int8', path, stacked)
  assert leaf['int8'].dtype == jnp.int8 and leaf['int8'].shape == shape
  assert leaf['absmax'].dtype == jnp.float32
  blocks = _np_blocks(w, lead, n_in, bs)
  scale = np.abs(blocks).max(axis=-2, keepdims=True) / 127.0  # numpy, per block and column
  np.testing.assert_allclose(np.asarray(leaf['absmax']).reshape(scale.shape), scale, rtol=1e-6)
  deq = np.asarray(quant.dequantize(leaf, path, stacked), np.float64).reshape(blocks.shape)
  err = np.abs(deq - blocks)
  assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-12), (err / scale).max()
  assert (err / scale).max() > 0.4  # the bound is tight: rounding really happens
  assert np.all(np.abs(np.asarray(leaf['int8'])) <= 127)
  assert np.asarray(leaf['int8']).astype(np.int32).max() == 127  # the absmax maps to +-127


@pytest.mark.parametrize('path,shape,stacked,lead,n_in,bs', CASES)
def test_nf4_maps_each_value_to_its_nearest_level(path, shape, stacked, lead, n_in, bs):
  w = _weight(shape, seed=1)
  leaf = quant.quantize(jnp.asarray(w), 'nf4', path, stacked)
  assert leaf['nf4'].dtype == jnp.uint8
  assert leaf['nf4'].shape == shape[:-1] + (shape[-1] // 2,)  # two codes a byte
  blocks = _np_blocks(w, lead, n_in, bs)
  absmax = np.abs(blocks).max(axis=-2, keepdims=True)
  x = blocks / absmax
  dist = np.abs(x[..., None] - NF4.astype(np.float64))
  want = NF4[np.argmin(dist, axis=-1)] * absmax
  two = np.sort(dist, axis=-1)[..., :2]
  clear = (two[..., 1] - two[..., 0]) > 1e-5  # not (numerically) halfway between two levels
  assert clear.mean() > 0.99
  deq = np.asarray(quant.dequantize(leaf, path, stacked), np.float64).reshape(blocks.shape)
  np.testing.assert_allclose(deq[clear], want[clear], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(np.asarray(leaf['absmax']).reshape(absmax.shape), absmax, rtol=1e-6)
  # every value is within half the widest NF4 gap of itself (a coarse, format-level bound)
  assert np.all(np.abs(deq - blocks) <= absmax * np.diff(NF4).max() / 2 * (1 + 1e-5))


def test_nf4_packing_round_trip():
  codes = np.asarray(jax.random.randint(jax.random.key(0), (3, 5, 8), 0, 16), np.uint8)
  packed = np.asarray(quant.pack_nibbles(jnp.asarray(codes)))
  assert packed.dtype == np.uint8 and packed.shape == (3, 5, 4)
  np.testing.assert_array_equal(packed, codes[..., 0::2] | (codes[..., 1::2] << 4))
  np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(jnp.asarray(packed))), codes)
  assert int(quant.pack_nibbles(jnp.array([3, 10]))[0]) == 3 + 16 * 10
  every = np.arange(256, dtype=np.uint8)  # every byte unpacks and packs back to itself
  np.testing.assert_array_equal(
      np.asarray(quant.pack_nibbles(quant.unpack_nibbles(jnp.asarray(every)))), every)


def _config(base_dtype='nf4', method='lora', scan=False, **kw):
  c = base_config()
  c.task = 'sft'
  c.post.train_file = 'unused.jsonl'
  c.steps = 10
  # d_model 64 (one block per q/k/v/gate/up column), mlp 128 (two blocks for down)
  c.model.vocab_size, c.model.num_layers, c.model.d_model = 64, 2, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 4, 2, 128
  c.model.dtype = 'float32'
  c.model.scan_layers = scan
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = 'constant'
  c.optimizer.learning_rate = 1e-2
  c.peft.method, c.peft.rank, c.peft.base_dtype = method, 4, base_dtype
  for k, v in kw.items():
    c.peft[k] = v
  return c


def _inputs(cfg, batch=2, length=8, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 1, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return tokens, positions, jnp.ones_like(tokens)


@pytest.mark.parametrize('base_dtype,scan', [('nf4', False), ('nf4', True), ('int8', True)])
def test_quantised_base_at_lora_init_is_the_dequantised_model(base_dtype, scan):
  config = _config(base_dtype, scan=scan)
  task = tasks.from_config(config)
  boxed_model = init_params(task.model, jax.random.key(0))
  params = nn.unbox(params_lib.build_params(task, boxed_model, jax.random.key(1)))
  float_model = nn.unbox(boxed_model)
  frozen = traverse_util.flatten_dict(params['frozen']['model'])
  # the matmul weights are quantised, embedding and norms are held in bfloat16
  code_dtype = jnp.uint8 if base_dtype == 'nf4' else jnp.int8
  quantised = {p[:-1] for p in frozen if p[-1] == base_dtype}
  matmuls = {p for p in traverse_util.flatten_dict(float_model)
             if p[-1] in ('q', 'k', 'v', 'o', 'gate', 'up', 'down', 'lm_head')}
  assert quantised == matmuls
  for path, x in frozen.items():
    want = {base_dtype: code_dtype, 'absmax': jnp.float32}.get(path[-1], jnp.bfloat16)
    assert x.dtype == want, path
  # the float model the quantised base stands for
  dequantised = jax.tree.map(lambda x: x.astype(jnp.float32),
                             quant.dequantize_tree(params['frozen']['model'], scan))
  assert jax.tree.structure(dequantised) == jax.tree.structure(float_model)
  inputs = _inputs(task.model)
  got = forward(task.model, params_lib.model_params(task, params), *inputs)
  np.testing.assert_array_equal(got, forward(task.model, dequantised, *inputs))
  # and close to the float model it was quantised from
  want = forward(task.model, float_model, *inputs)
  rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  print(f'{base_dtype} scan={scan}: relative logits error vs the float model {rel:.2e}')
  assert 0 < rel < (0.02 if base_dtype == 'int8' else 0.2), rel
  # the reference (adapters off) is the dequantised model too
  np.testing.assert_array_equal(
      forward(task.model, params_lib.reference_params(task, params), *inputs), got)


def _sft_batch(cfg, batch=2, length=8):
  tokens, positions, segments = _inputs(cfg, batch, length + 1)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions[:, :-1],
          'segment_ids': segments[:, :-1], 'weights': jnp.ones((batch, length))}


@pytest.mark.parametrize('method', ['lora', 'dora'])
def test_nf4_lora_steps_change_only_adapters_and_lower_the_loss(method):
  config = _config('nf4', method=method, scan=True)
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  state = init_state(task, tx, 0)
  state = state.replace(params=nn.unbox(state.params))
  first = jax.tree.map(np.asarray, state)
  fn = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b))
  batch = _sft_batch(task.model)
  losses = []
  for _ in range(6):
    state, metrics = fn(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
  assert set(state.params['trainable']) == {'adapters'}
  for got, want in zip(jax.tree.leaves(state.params['frozen']),
                       jax.tree.leaves(first.params['frozen'])):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)  # the quantised base never moves
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params['trainable'],
                         first.params['trainable'])
  flat = traverse_util.flatten_dict(changed)
  assert all(v for p, v in flat.items() if p[-1] != 'a' or method != 'lora_fa'), flat
  # optimizer state only for the adapters: nothing base-sized
  trainable_sizes = sum(x.size for x in jax.tree.leaves(state.params['trainable']))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * trainable_sizes


def test_quantised_base_needs_a_low_rank_method():
  for method in ('none', 'bottleneck', 'prefix'):
    with pytest.raises(ConfigError, match='peft.base_dtype'):
      validate(_config('nf4', method=method))
  with pytest.raises(ConfigError, match='peft.base_dtype'):
    validate(_config('int8', method='none'))
  for method in ('lora', 'dora', 'vera', 'lora_fa'):
    validate(_config('nf4', method=method))
  with pytest.raises(ConfigError, match='peft.base_dtype'):
    validate(_config('fp8'))


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [r for r in map(json.loads, f) if r['split'] == 'train']
  losses = {r['step']: r['loss'] for r in records}
  assert len(losses) == len(records), records  # no step trained twice
  return losses


def test_nf4_run_resumes_merges_and_starts_from_a_float_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  common = ['train', f'--config={ROOT}/configs/sft_tiny.py', f'--workdir={workdir}',
            '--config.peft.base_dtype=nf4', '--config.model.scan_layers=true',
            '--config.checkpoint_every=2', '--config.log_every=1']
  assert cli.main(common + ['--no_sample', '--config.steps=2']) == 0
  assert sorted(_train_losses(workdir)) == [1, 2]
  assert cli.main(common + ['--config.steps=4']) == 0  # resumes at step 2, samples at the end
  losses = _train_losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))
  # the restored run holds the quantised base
  task, params = tasks.load_task_params(workdir)
  frozen = traverse_util.flatten_dict(params['frozen']['model'])
  assert frozen[('layers', 'mlp', 'down', 'nf4')].dtype == jnp.uint8
  # merge: a float export equal to the adapted, dequantised model
  merged_dir = str(tmp_path / 'merged')
  assert cli.main(['peft', 'merge', f'--workdir={workdir}', f'--output={merged_dir}']) == 0
  merged = tasks.load_trained(merged_dir)[1]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(merged))
  inputs = _inputs(task.model)
  np.testing.assert_allclose(forward(task.model, merged, *inputs),
                             forward(task.model, params_lib.model_params(task, params), *inputs),
                             atol=1e-4)
  # init_from a float checkpoint (the merged export) quantises it into a fresh nf4 base
  second = str(tmp_path / 'second')
  assert cli.main(['train', f'--config={ROOT}/configs/sft_tiny.py', f'--workdir={second}',
                   '--config.peft.base_dtype=nf4', '--config.model.scan_layers=true',
                   f'--config.init_from={merged_dir}', '--no_sample', '--config.steps=1']) == 0
  task2, params2 = tasks.load_task_params(second)
  want = nn.unbox(params_lib.split_model(task2, merged)[1])
  for path, x in traverse_util.flatten_dict(params2['frozen']['model']).items():
    np.testing.assert_array_equal(x, traverse_util.flatten_dict(want)[path])


def test_dora_magnitudes_follow_the_quantised_base_at_build_and_init_from():
  """DoRA starts as the model it adapts: magnitudes are the column norms of the dequantised base,
  also after `init_from` replaces the base (place_model)."""
  config = _config('nf4', method='dora', scan=True)
  task = tasks.from_config(config)
  params = nn.unbox(params_lib.build_params(task, init_params(task.model, jax.random.key(0)),
                                            jax.random.key(1)))
  inputs = _inputs(task.model)

  def check(params):
    dequantised = jax.tree.map(lambda x: x.astype(jnp.float32),
                               quant.dequantize_tree(params['frozen']['model'], True))
    np.testing.assert_allclose(forward(task.model, params_lib.model_params(task, params), *inputs),
                               forward(task.model, dequantised, *inputs), atol=1e-5)

  check(params)
  loaded = nn.unbox(init_params(task.model, jax.random.key(7)))  # another float model
  placed = params_lib.place_model(task, params, loaded)
  assert placed['frozen']['model']['layers']['attn']['q']['nf4'].dtype == jnp.uint8
  assert not np.array_equal(placed['frozen']['model']['layers']['attn']['q']['nf4'],
                            params['frozen']['model']['layers']['attn']['q']['nf4'])
  check(placed)
