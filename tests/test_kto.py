"""Unpaired KTO: the prompt/completion/label loader, the loss with mismatched KL rows, the CLI."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import cli, losses
from lmjax.data import preference
from lmjax.data.sources import DataError
from lmjax.models.transformer import forward
from lmjax import tasks
from lmjax.tasks import preference as preference_tasks
from tests.test_posttrain import FakeTok, _config, _params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECORDS = [
    {'prompt': 'ab', 'completion': 'cd', 'label': True},
    {'prompt': 'xyz', 'completion': 'q', 'label': False},
    {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},
                  {'role': 'user', 'content': 'go'}], 'completion': 'ok!', 'label': True},
]


def _write(path, records):
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


def _kto_config(path, batch_size=3, seq_len=64, **post):
  config = _config('dpo', **{'loss_type': 'kto', 'train_file': path, **post})
  config.batch_size, config.seq_len = batch_size, seq_len
  return config


def _prompt(tok, record):
  """The prompt tokens, written out by hand (chat: rendered turns + the assistant header)."""
  if 'prompt' in record:
    return [tok.bos_id] + tok.encode(record['prompt'])
  tokens = [tok.bos_id]
  for m in record['messages']:
    tokens += tok.encode(f'<|{m["role"]}|>\n')
    tokens += tok.encode(m['content']) + ([tok.eos_id] if m['role'] == 'assistant'
                                          else tok.encode('\n'))
  return tokens + tok.encode('<|assistant|>\n')


def _check_row(batch, prefix, row, prompt, completion, length):
  tokens = prompt + completion
  n = len(tokens) - 1
  np.testing.assert_array_equal(batch[f'{prefix}inputs'][row, :n], tokens[:-1])
  np.testing.assert_array_equal(batch[f'{prefix}targets'][row, :n], tokens[1:])
  weights = [0] * (len(prompt) - 1) + [1] * len(completion) + [0] * (length - n)
  np.testing.assert_array_equal(batch[f'{prefix}weights'][row], weights)
  # the eos is an input too (its target is padding, weight 0)
  segments = [1] * len(tokens) + [0] * (length - len(tokens))
  np.testing.assert_array_equal(batch[f'{prefix}segment_ids'][row], segments)
  np.testing.assert_array_equal(batch[f'{prefix}positions'][row, :len(tokens)],
                                np.arange(len(tokens)))


def test_unpaired_rows_flags_and_mismatched_kl_rows():
  tok, length = FakeTok(), 64
  examples = [preference.encode_unpaired(tok, r) for r in RECORDS]
  batch = preference.unpaired_batch(examples, length + 1)
  assert set(batch) == {p + k for p in ('', 'kl_') for k in preference_tasks._ROW_KEYS} | {'desirable'}
  assert all(v.shape == (3, length) for k, v in batch.items() if k != 'desirable')
  np.testing.assert_array_equal(batch['desirable'], [1.0, 0.0, 1.0])
  assert batch['desirable'].dtype == np.float32
  prompts = [_prompt(tok, r) for r in RECORDS]
  completions = [tok.encode(r['completion']) + [tok.eos_id] for r in RECORDS]
  for i in range(3):
    _check_row(batch, '', i, prompts[i], completions[i], length)  # the earlier 'yo' turn: weight 0
    _check_row(batch, 'kl_', i, prompts[i], completions[(i + 1) % 3], length)
  # row 0's KL row by hand: [bos] a b | q eos
  a, b, q = tok.encode('abq')
  np.testing.assert_array_equal(batch['kl_inputs'][0, :5], [2, a, b, q, 3])
  np.testing.assert_array_equal(batch['kl_targets'][0, :4], [a, b, q, 3])
  np.testing.assert_array_equal(batch['kl_weights'][0, :5], [0, 0, 1, 1, 0])


def test_iterator_yields_kto_batches_for_an_unpaired_file(tmp_path):
  config = _kto_config(_write(tmp_path / 'kto.jsonl', RECORDS))
  batch = next(tasks.from_config(config).make_iterator(config, FakeTok()))
  assert batch['inputs'].shape == batch['kl_inputs'].shape == (3, config.seq_len)
  assert batch['desirable'].shape == (3,) and batch['desirable'].sum() == 2.0
  for i in range(3):  # KL row i: row i's prompt, row (i + 1)'s completion, in the shuffled order
    prompt = int(np.argmax(batch['weights'][i])) + 1  # inputs up to the first weighted target
    np.testing.assert_array_equal(batch['kl_inputs'][i, :prompt], batch['inputs'][i, :prompt])
    nxt = (i + 1) % 3
    np.testing.assert_array_equal(batch['kl_targets'][i][batch['kl_weights'][i] > 0],
                                  batch['targets'][nxt][batch['weights'][nxt] > 0])
  # a paired file under loss_type=kto keeps the pair layout
  paired = _write(tmp_path / 'pairs.jsonl', [{'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}] * 3)
  config = _kto_config(paired)
  batch = next(tasks.from_config(config).make_iterator(config, FakeTok()))
  assert 'chosen_inputs' in batch and 'desirable' not in batch


@pytest.mark.parametrize('lines, line, match', [
    ([RECORDS[0], {'prompt': 'a', 'completion': 'b', 'label': 'yes'}], 2, 'label'),
    ([RECORDS[0], RECORDS[1], {'prompt': 'a', 'completion': 'b', 'label': 1}], 3, 'label'),
    ([RECORDS[0], '', {'prompt': 'a', 'label': False}], 3, 'completion'),
    ([RECORDS[0], RECORDS[1], {'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}], 3, 'mix'),
    ([{'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}, RECORDS[0]], 2, 'mix'),
])
def test_bad_records_name_file_and_line(tmp_path, lines, line, match):
  path = _write(tmp_path / 'bad.jsonl', lines)
  with pytest.raises(DataError, match=f'{re.escape(path)}:{line}: .*{match}'):
    config = _kto_config(path)
    tasks.from_config(config).make_iterator(config, FakeTok())


def test_unpaired_file_needs_kto_and_two_rows(tmp_path):
  path = _write(tmp_path / 'kto.jsonl', RECORDS)
  config = _kto_config(path, loss_type='sigmoid')
  with pytest.raises(DataError, match='loss_type=kto'):
    tasks.from_config(config).make_iterator(config, FakeTok())
  config = _kto_config(path, batch_size=1)
  with pytest.raises(DataError, match='batch_size'):
    tasks.from_config(config).make_iterator(config, FakeTok())


def _logps(model_cfg, model, batch, prefix=''):
  """Sequence log-probs straight from the model forward (no lmjax.losses)."""
  logits = forward(model_cfg, model, batch[f'{prefix}inputs'], batch[f'{prefix}positions'],
                   batch[f'{prefix}segment_ids'])
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                             batch[f'{prefix}targets'][..., None], axis=-1)[..., 0]
  return jnp.sum(logp * batch[f'{prefix}weights'], axis=-1)


def _batch(rows=4, length=24):
  tok = FakeTok()
  records = [{'prompt': f'q{i}:' + 'x' * i, 'completion': ' good' * (1 + i % 2) if i % 2 else ' b',
              'label': i % 2 == 1} for i in range(rows)]
  examples = [preference.encode_unpaired(tok, r) for r in records]
  return {k: jnp.asarray(v) for k, v in preference.unpaired_batch(examples, length + 1).items()}


def test_kto_loss_uses_the_mismatched_kl_rows():
  config = _config('dpo', loss_type='kto', beta=0.5, kto_desirable_weight=1.5)
  task, params = _params(config)
  # the policy drifts; the reference is sharper: policy - reference > 0 on average, so z0 > 0
  leaves, tree = jax.tree.flatten(params['trainable'])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  ref = params['frozen']['ref']
  params = {'trainable': jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                                   for x, k in zip(leaves, keys)]),
            'frozen': {'ref': dict(ref, lm_head=4.0 * ref['lm_head'])}}
  batch = _batch()
  sums = jax.jit(lambda b: task.sums(params, b, None))(batch)

  policy, ref = params['trainable']['model'], params['frozen']['ref']
  pi, pi_ref = _logps(task.model, policy, batch), _logps(task.model, ref, batch)
  kl_mean = float(jnp.mean(_logps(task.model, policy, batch, 'kl_')
                           - _logps(task.model, ref, batch, 'kl_')))
  assert kl_mean > 0.1  # the reference point is not clipped: the test sees its value
  want, metrics = losses.kto_loss(pi, pi_ref, batch['desirable'], kl_mean, 0.5, 1.5, 1.0)
  assert float(sums['weight']) == 4.0
  assert float(sums['loss'] / sums['weight']) == pytest.approx(float(want), rel=1e-5)
  assert float(sums['kl_ref'] / sums['weight']) == pytest.approx(kl_mean, rel=1e-5)
  for key in ('chosen_reward', 'rejected_reward'):
    assert float(sums[key] / sums['weight']) == pytest.approx(float(metrics[key]), rel=1e-5,
                                                               abs=1e-6)
  # the matched rows' mean (the loss's default reference point) gives another loss
  default, _ = losses.kto_loss(pi, pi_ref, batch['desirable'], None, 0.5, 1.5, 1.0)
  assert abs(float(default) - float(want)) > 5e-4
  # without KL rows the default is used
  no_kl = {k: v for k, v in batch.items() if not k.startswith('kl_')}
  sums = jax.jit(lambda b: task.sums(params, b, None))(no_kl)
  assert float(sums['loss'] / sums['weight']) == pytest.approx(float(default), rel=1e-5)


def test_kto_lora_at_init_is_the_closed_form():
  config = _config('dpo', loss_type='kto', kto_desirable_weight=1.5, kto_undesirable_weight=0.5,
                   peft__method='lora', peft__rank=4)
  task, params = _params(config)
  batch = _batch(rows=6)
  sums = jax.jit(lambda b: task.sums(params, b, None))(batch)
  # policy == reference: r = 0, z0 = 0, each example costs w * (1 - sigmoid(0)) = w / 2
  desirable = np.asarray(batch['desirable'])
  assert desirable.sum() == 3
  want = np.mean(np.where(desirable > 0, 1.5, 0.5) * 0.5)
  assert float(sums['weight']) == 6.0
  assert float(sums['loss'] / sums['weight']) == pytest.approx(want, abs=1e-6)
  assert float(sums['kl_ref']) == 0.0
  grads = jax.grad(lambda t: task.sums({**params, 'trainable': t}, batch, None)['loss'])(
      params['trainable'])
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_kto_trains_through_the_cli(tmp_path):
  workdir = str(tmp_path / 'kto')
  rc = cli.main(['train', f'--config={ROOT}/configs/dpo_tiny.py', f'--workdir={workdir}',
                 '--no_sample', '--config.post.loss_type=kto',
                 f'--config.post.train_file={ROOT}/tests/data/kto.jsonl', '--config.steps=12',
                 '--config.log_every=1', '--config.optimizer.learning_rate=1e-2',
                 '--config.post.beta=0.5'])
  assert rc == 0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    train = [r for r in map(json.loads, f) if r['split'] == 'train']
  assert len(train) == 12
  assert train[0]['loss'] == pytest.approx(0.5, abs=1e-5)  # LoRA at init: policy == reference
  for key in ('kl_ref', 'chosen_reward', 'rejected_reward'):
    assert all(np.isfinite(r[key]) for r in train)
  last = train[-6:]  # the second epoch (24 examples, 4 per step)
  assert np.mean([r['loss'] for r in last]) < 0.5 - 0.01
  margin = np.mean([r['chosen_reward'] - r['rejected_reward'] for r in last])
  assert margin > 0.01
