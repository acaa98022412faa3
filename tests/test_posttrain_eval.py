"""Held-out evaluation of post-training runs (`lmjax train`, every eval_every steps): the metrics in
metrics.jsonl equal an independent numpy computation on the run's final params, and the data's
signal (chosen = a function that returns, rejected = a stub) is learnt well above chance."""

import json
import os

import jax
import numpy as np
import pytest

from lmjax import tasks
from lmjax.config import apply_overrides, load_config, validate
from lmjax.data import load_or_train_tokenizer
from lmjax.models.transformer import forward, forward_hidden
from lmjax.tasks import params as params_lib
from lmjax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['eval_every=10', 'eval_batches=3', 'post.eval_fraction=0.25', 'progress_bar=false',
          'checkpoint_every=1000', 'log_every=10']


def _run(tmp_path, name, overrides):
  config = load_config(os.path.join(ROOT, 'configs', f'{name}_tiny.py'))
  apply_overrides(config, COMMON + overrides)
  validate(config)
  workdir = str(tmp_path / name)
  summary = train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if r['split'] == 'eval']
  data = [r for r in records if r['split'] == 'data']
  task, params = tasks.load_task_params(workdir)
  tok = load_or_train_tokenizer(config.data, config.model.vocab_size)
  batches = task.make_eval_batches(config, tok)
  return config, summary, evals, data[0], task, params, batches


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


_forward = jax.jit(forward, static_argnums=0)


def _target_logps(cfg, params, batch, prefix=''):
  """(rows, positions) log p(target) of the rows under plain `params`, in numpy (float64)."""
  get = lambda k: batch[prefix + k]
  logits = np.asarray(_forward(cfg, params, get('inputs'), get('positions'), get('segment_ids')),
                      np.float64)
  logp = np.take_along_axis(_log_softmax(logits), get('targets')[..., None], -1)[..., 0]
  return logp * get('weights')


def test_reward_held_out_accuracy_and_margin(tmp_path):
  config, summary, evals, data, task, params, batches = _run(tmp_path, 'reward', ['steps=20'])
  assert [e['step'] for e in evals] == [10, 20] and data['data/kept'] == 36
  assert len(batches) == 3 and evals[-1]['pairs'] == 12
  model = params_lib.model_params(task, params)
  head = {k: np.asarray(v, np.float64) for k, v in params['trainable']['head'].items()}
  scores = {}
  for side in ('chosen', 'rejected'):
    out = []
    for b in batches:
      _, hidden = forward_hidden(task.model, model, b[f'{side}_inputs'], b[f'{side}_positions'],
                                 b[f'{side}_segment_ids'])
      last = (b[f'{side}_segment_ids'] > 0).sum(1) - 1
      out.append(np.asarray(hidden, np.float64)[np.arange(len(last)), last] @ head['w'] + head['b'])
    scores[side] = np.concatenate(out)
  diff = scores['chosen'] - scores['rejected']
  loss = np.mean(np.log1p(np.exp(-diff))) + config.post.center_coef * np.mean(
      (scores['chosen'] + scores['rejected'])**2)
  final = evals[-1]
  np.testing.assert_allclose([final['accuracy'], final['margin'], final['loss']],
                             [np.mean(diff > 0), np.mean(diff), loss], rtol=2e-4, atol=2e-5)
  assert final['accuracy'] >= 0.9 and summary['eval_accuracy'] == final['accuracy']


@pytest.mark.parametrize('loss_type', ['sigmoid'])
def test_dpo_held_out_implicit_rewards_and_log_probs(tmp_path, loss_type):
  config, _, evals, _, task, params, batches = _run(
      tmp_path, 'dpo', ['steps=20', 'optimizer.learning_rate=3e-3', f'post.loss_type={loss_type}'])
  policy = params_lib.model_params(task, params)
  reference = params_lib.reference_params(task, params)
  logps = {(who, side): np.concatenate([
      _target_logps(task.model, p, b, f'{side}_').sum(1) for b in batches])
           for who, p in (('policy', policy), ('ref', reference))
           for side in ('chosen', 'rejected')}
  beta = config.post.beta
  rc = beta * (logps['policy', 'chosen'] - logps['ref', 'chosen'])
  rr = beta * (logps['policy', 'rejected'] - logps['ref', 'rejected'])
  final = evals[-1]
  want = [np.mean(np.log1p(np.exp(-(rc - rr)))), np.mean(rc > rr), np.mean(rc - rr), np.mean(rc),
          np.mean(rr), np.mean(logps['policy', 'chosen']), np.mean(logps['policy', 'rejected'])]
  got = [final[k] for k in ('loss', 'accuracy', 'margin', 'chosen_reward', 'rejected_reward',
                            'chosen_logps', 'rejected_logps')]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert final['accuracy'] >= 0.9 and final['margin'] > evals[0]['margin'] > 0


def test_sft_held_out_response_loss_and_perplexity(tmp_path):
  _, _, evals, data, task, params, batches = _run(tmp_path, 'sft', ['steps=20'])
  assert data['data/records'] == 36
  decoding = task.decoding_params(params)
  nll = sum(-_target_logps(task.model, decoding, b).sum() for b in batches)
  tokens = sum(float(b['weights'].sum()) for b in batches)
  final = evals[-1]
  np.testing.assert_allclose([final['loss'], final['perplexity'], final['tokens']],
                             [nll / tokens, np.exp(nll / tokens), tokens], rtol=2e-4)
  assert final['loss'] < evals[0]['loss']



def test_ppo_held_out_greedy_reward_and_kl():
  """PPO / GRPO's held-out eval (`PpoTask.evaluate`) on a policy moved away from its reference:
  greedy completions decoded here one token at a time by full forward passes, their mean toy
  reward, k1 KL to the reference and length."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from lmjax.train.state import init_state  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.join(ROOT, 'configs', 'ppo_tiny.py'))
  apply_overrides(config, COMMON + ['eval_batches=1', 'post.kl_estimator=k1'])
  tok = load_or_train_tokenizer(config.data, config.model.vocab_size)
  task = tasks.from_config(config).bind(tok)
  batches = task.make_eval_batches(config, tok)
  assert len(batches) == 1 and batches[0]['prompt_tokens'].shape[0] == 8  # 12 held out
  params = nn.unbox(init_state(task, task.optimizer(config)[0], 0).params)
  leaves, treedef = jax.tree.flatten(params['trainable'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params['trainable'] = jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  policy, reference = task.decoding_params(params), params_lib.reference_params(task, params)
  n, temperature = config.post.max_new_tokens, config.post.temperature
  width = batches[0]['prompt_tokens'].shape[1] + n

  def logps(p, seq):  # right-padded to one width: causal attention ignores the padding
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(seq)] = seq
    logits = np.asarray(_forward(task.model, p, padded, np.arange(width)[None],
                                 np.ones((1, width), np.int32))[0], np.float64) / temperature
    return _log_softmax(logits)[:len(seq)]

  rows, responses, kls, lengths = [], [], [], []
  for b in batches:
    for tokens, segments in zip(b['prompt_tokens'], b['prompt_segment_ids']):
      seq = [int(t) for t, s in zip(tokens, segments) if s]
      prompt_len = len(seq)
      for _ in range(n):
        seq.append(int(np.argmax(logps(policy, seq)[-1])))
        if seq[-1] in task.stop_ids:
          break
      response = seq[prompt_len:]
      lp, lr = logps(policy, seq), logps(reference, seq)
      at = np.arange(prompt_len - 1, len(seq) - 1)
      kls.append(np.sum(lp[at, response] - lr[at, response]))
      rows.append(response)
      responses.extend(response)
      lengths.append(len(response))
  config.post.toy_reward_token = max(set(responses), key=responses.count)  # a token it produces
  task = tasks.from_config(config).bind(tok)
  got = task.evaluate(None, params, batches)
  scores = [sum(t == config.post.toy_reward_token for t in r) for r in rows]
  np.testing.assert_allclose([got['score'], got['kl'], got['response_length'], got['prompts']],
                             [np.mean(scores), np.mean(kls), np.mean(lengths), 8], atol=3e-4)
  assert abs(got['kl']) > 0.01 and got['score'] > 0  # the policy is not its reference


def _log1m_exp(x):
  return np.log(-np.expm1(x))


@pytest.mark.parametrize('loss_type', ['ipo', 'hinge', 'orpo', 'kto'])
def test_dpo_family_eval_metrics_equal_numpy(loss_type):
  """`eval_sums` + `eval_metrics` of each DPO-family loss on a policy moved off its reference
  (full fine-tuning: the reference is the frozen copy), against numpy log-probs."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from lmjax.config import base_config  # pylint: disable=g-import-not-at-top
  from lmjax.data import preference  # pylint: disable=g-import-not-at-top
  from lmjax.train.state import init_state  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.task, c.post.train_file, c.post.loss_type, c.post.beta = 'dpo', 'unused', loss_type, 0.5
  c.model.vocab_size, c.model.num_layers, c.model.d_model = 64, 2, 32
  c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim, c.model.dtype = 4, 2, 64, 'float32'
  task = tasks.from_config(c)
  params = nn.unbox(init_state(task, task.optimizer(c)[0], 0).params)
  leaves, treedef = jax.tree.flatten(params['trainable'])
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params['trainable'] = jax.tree.unflatten(treedef, [
      x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

  class Tok:
    bos_id, eos_id = 2, 3

    def encode(self, text):
      return [4 + ord(ch) % 60 for ch in text]

  pairs = [preference.encode_pair(Tok(), {'prompt': f'q{i}:', 'chosen': ' yes' * (i + 1),
                                          'rejected': ' no'}) for i in range(4)]
  batch = preference.pair_batch(pairs, 20)
  got = task.eval_metrics(jax.tree.map(float, jax.jit(task.eval_sums)(params, batch)))
  model = params_lib.model_params(task, params)
  lp, ref, count = {}, {}, {}
  for side in ('chosen', 'rejected'):
    lp[side] = _target_logps(task.model, model, batch, f'{side}_').sum(1)
    if loss_type != 'orpo':  # ORPO has no reference
      ref[side] = _target_logps(task.model, params['frozen']['ref'], batch, f'{side}_').sum(1)
    count[side] = batch[f'{side}_weights'].sum(1)
  beta = 0.5
  if loss_type == 'orpo':
    avg = {s: lp[s] / count[s] for s in lp}
    log_odds = (avg['chosen'] - _log1m_exp(avg['chosen'])) - (
        avg['rejected'] - _log1m_exp(avg['rejected']))
    loss = np.mean(-avg['chosen'] + beta * np.log1p(np.exp(-log_odds)))
    rc, rr = beta * avg['chosen'], beta * avg['rejected']
  else:
    rc, rr = beta * (lp['chosen'] - ref['chosen']), beta * (lp['rejected'] - ref['rejected'])
    h = (rc - rr) / beta
    if loss_type == 'ipo':
      loss = np.mean((h - 1 / (2 * beta))**2)
    elif loss_type == 'hinge':
      loss = np.mean(np.maximum(0.0, 1 - beta * h))
    else:  # kto on pairs: chosen rows desirable, rejected rows undesirable
      ratio = np.concatenate([rc, rr]) / beta
      z0 = max(0.0, np.mean(ratio))
      sig = lambda x: 1 / (1 + np.exp(-x))
      loss = np.mean(np.concatenate([1 - sig(beta * (ratio[:4] - z0)),
                                     1 - sig(beta * (z0 - ratio[4:]))]))
  want = {'loss': loss, 'accuracy': np.mean(rc > rr), 'margin': np.mean(rc - rr),
          'chosen_reward': np.mean(rc), 'rejected_reward': np.mean(rr),
          'chosen_logps': np.mean(lp['chosen']), 'rejected_logps': np.mean(lp['rejected']),
          'pairs': 4}
  np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4, atol=1e-5)
  assert 0 < want['accuracy'] < 1 or abs(want['margin']) > 1e-3  # not a degenerate batch
