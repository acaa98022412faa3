"""Post-training data and tasks: SFT masking and packing, reward head, DPO (PPO: test_ppo.py)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import tasks
from lmjax.config import base_config
from lmjax.data import preference, sft
from lmjax.models.transformer import forward, init_params
from lmjax.tasks import params as params_lib
from lmjax.tasks import preference as preference_tasks
from lmjax.train import step as step_lib
from lmjax.train.state import init_state


class FakeTok:
  bos_id, eos_id, pad_id = 2, 3, 0

  def encode(self, text):
    return [4 + ord(c) % 60 for c in text]


def _config(task, **post):
  c = base_config()
  c.task = task
  c.post.train_file = 'unused.jsonl'
  c.model.vocab_size, c.model.num_layers, c.model.d_model = 64, 2, 32
  c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 4, 2, 64
  c.model.dtype = 'float32'
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = 'constant'
  c.optimizer.learning_rate = 1e-2
  c.optimizer.weight_decay = 0.0
  for k, v in post.items():
    group, key = k.split('__') if '__' in k else ('post', k)
    c[group][key] = v
  return c


def _params(config):
  task = tasks.from_config(config)
  return task, nn.unbox(params_lib.build_params(task, init_params(task.model, jax.random.key(0)),
                                                jax.random.key(1)))


def test_sft_encoding_masks_prompt_and_packs():
  tok = FakeTok()
  tokens, mask = sft.encode_prompt_response(tok, 'ab', 'cd')
  assert tokens == [2, 4 + ord('a') % 60, 4 + ord('b') % 60, 4 + ord('c') % 60,
                    4 + ord('d') % 60, 3]
  assert mask == [0, 0, 0, 1, 1, 1]
  chat, chat_mask = sft.encode_messages(tok, [{'role': 'user', 'content': 'hi'},
                                              {'role': 'assistant', 'content': 'yo'}])
  assert chat[-3:] == tok.encode('yo') + [3] and chat_mask[-3:] == [1, 1, 1]
  assert sum(chat_mask) == 3
  examples = [encode for encode in (sft.encode_prompt_response(tok, 'ab', 'cd'),
                                    sft.encode_prompt_response(tok, 'x', 'yz'))]
  batch, used = sft.pack_examples(lambda i: examples[i % 2], 0, 1, 16, pack=True)
  assert used == 2
  np.testing.assert_array_equal(batch['segment_ids'][0, :12], [1] * 6 + [2] * 5 + [0])
  np.testing.assert_array_equal(batch['positions'][0, :11], list(range(6)) + list(range(5)))
  # targets weighted: response of example 1 (positions 2..4), never the boundary, then example 2
  np.testing.assert_array_equal(batch['weights'][0, :11], [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0])


def test_sft_loss_ignores_prompt_targets():
  config = _config('sft')
  task, params = _params(config)
  tokens, mask = sft.encode_prompt_response(FakeTok(), 'def f(x):', ' return x')
  batch, _ = sft.pack_examples(lambda i: (tokens, mask), 0, 2, 24, pack=False)
  loss = jax.jit(lambda b: task.sums(params, b, None)['loss'])
  base = float(loss(batch))
  prompt_pos = int(np.argmax(batch['weights'][0] == 0))  # a prompt target
  changed = dict(batch, targets=batch['targets'].copy())
  changed['targets'][0, prompt_pos] = (changed['targets'][0, prompt_pos] + 7) % 64
  assert float(loss(changed)) == base
  response_pos = int(np.argmax(batch['weights'][0] > 0))
  changed['targets'][0, response_pos] = (changed['targets'][0, response_pos] + 7) % 64
  assert float(loss(changed)) != base


def test_reward_head_reads_last_non_pad_token():
  hidden = jax.random.normal(jax.random.key(0), (2, 6, 4))
  segments = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
  head = {'w': jnp.arange(4.0), 'b': jnp.float32(0.5)}
  scores = preference_tasks.score_last_token(hidden, segments, head)
  np.testing.assert_allclose(scores, [hidden[0, 2] @ head['w'] + 0.5,
                                      hidden[1, 5] @ head['w'] + 0.5], rtol=1e-6)
  moved = hidden.at[0, 3:].set(100.0).at[0, :2].set(-5.0)  # padding and earlier tokens
  np.testing.assert_allclose(preference_tasks.score_last_token(moved, segments, head), scores)


def _pair_batch(rows=2, row_len=24):
  tok = FakeTok()
  pairs = [preference.encode_pair(tok, {'prompt': f'q{i}:', 'chosen': ' good answer',
                                        'rejected': ' bad'}) for i in range(rows)]
  return {k: jnp.asarray(v) for k, v in preference.pair_batch(pairs, row_len).items()}


@pytest.mark.parametrize('peft', ['none', 'lora'])
def test_dpo_starts_at_log2_and_raises_margin(peft):
  config = _config('dpo', peft__method=peft, peft__rank=4)
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  state = init_state(task, tx, 0)
  state = state.replace(params=nn.unbox(state.params))
  assert ('ref' in state.params['frozen']) == (peft == 'none')  # LoRA: no reference copy
  batch = _pair_batch()
  fn = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b))
  state, first = fn(state, batch)
  assert float(first['loss']) == pytest.approx(math.log(2.0), abs=1e-5)
  assert float(first['margin']) == pytest.approx(0.0, abs=1e-6)
  for _ in range(4):
    state, metrics = fn(state, batch)
  assert float(metrics['margin']) > 0.01
  assert float(metrics['loss']) < math.log(2.0)


def test_rpo_adds_the_chosen_per_token_nll():
  # At init with LoRA the policy is the reference: DPO is ln 2 and the RPO term is coef x the
  # chosen responses' mean per-token NLL, computed here from the model's own log-probs.
  config = _config('dpo', chosen_nll_coef=0.7, peft__method='lora', peft__rank=4)
  task, params = _params(config)
  batch = _pair_batch()
  sums = jax.jit(lambda b: task.sums(params, b, None))(batch)
  logits = forward(task.model, params_lib.model_params(task, params), batch['chosen_inputs'],
                   batch['chosen_positions'], batch['chosen_segment_ids'])
  logp_BL = np.asarray(jax.nn.log_softmax(logits))
  targets, weights = np.asarray(batch['chosen_targets']), np.asarray(batch['chosen_weights'])
  token_logp = np.take_along_axis(logp_BL, targets[..., None], -1)[..., 0]
  nll = np.mean(-(token_logp * weights).sum(-1) / weights.sum(-1))
  n = float(sums['weight'])
  assert float(sums['chosen_nll']) / n == pytest.approx(nll, rel=1e-5)
  assert float(sums['loss']) / n == pytest.approx(math.log(2.0) + 0.7 * nll, rel=1e-5)


def _mean_response_logps(task, params, batch):
  """Mean per-token log-prob of each chosen and of each rejected response, in float64 numpy."""
  out = []
  for side in ('chosen', 'rejected'):
    logits = forward(task.model, params_lib.model_params(task, params), batch[f'{side}_inputs'],
                     batch[f'{side}_positions'], batch[f'{side}_segment_ids'])
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    targets, weights = np.asarray(batch[f'{side}_targets']), np.asarray(batch[f'{side}_weights'])
    token = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    out.append((token * weights).sum(-1) / weights.sum(-1))
  return out


@pytest.mark.parametrize('loss_type', ['ipo', 'hinge', 'orpo', 'kto'])
def test_preference_variants_start_at_their_closed_form_and_descend(loss_type):
  """With LoRA (B = 0) the policy starts as the reference, every log-ratio h is 0: IPO's
  (h - 1/(2 beta))^2 is 1/(4 beta^2), hinge's max(0, 1 - beta h) is 1, KTO's 1 - sigmoid(0) is 1/2
  for desirable and undesirable rows alike. ORPO has no reference: mean chosen NLL - beta log
  sigmoid(log odds_c - log odds_r), odds = p / (1 - p) of the mean token probability, from the
  model's own log-probs. Then five steps on the batch lower the objective."""
  beta = 0.1
  config = _config('dpo', loss_type=loss_type, beta=beta, peft__method='lora', peft__rank=4)
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  state = init_state(task, tx, 0)
  state = state.replace(params=nn.unbox(state.params))
  batch = _pair_batch()
  if loss_type == 'orpo':
    chosen, rejected = _mean_response_logps(task, state.params, batch)
    log_odds = lambda a: a - np.log1p(-np.exp(a))
    log_sigmoid = -np.log1p(np.exp(-(log_odds(chosen) - log_odds(rejected))))
    want = float(np.mean(-chosen - beta * log_sigmoid))
  else:
    want = {'ipo': 1 / (4 * beta**2), 'hinge': 1.0, 'kto': 0.5}[loss_type]
  sums = jax.jit(lambda p: task.sums(p, batch, None))
  objective = lambda p: float(sums(p)['loss'] / sums(p)['weight'])
  start = objective(state.params)
  assert start == pytest.approx(want, rel=1e-5)
  fn = jax.jit(lambda s, b: step_lib.train_step(task, tx, schedule, s, b))
  for _ in range(5):
    state, _ = fn(state, batch)
  assert objective(state.params) < start - 1e-3 * abs(start)


def test_reward_task_loss():
  config = _config('reward', margin=0.0, center_coef=0.01)
  task, params = _params(config)
  sums = jax.jit(lambda b: task.sums(params, b, None))(_pair_batch())
  # the head starts at zero: every reward is 0, so the loss is log 2 per pair
  assert float(sums['loss'] / sums['weight']) == pytest.approx(math.log(2.0), abs=1e-6)


def test_chat_pair_scores_only_the_final_reply():
  # An earlier assistant turn is context: a DPO/ORPO/KTO log-prob must not include it.
  tok = FakeTok()
  record = {'messages': [{'role': 'user', 'content': 'hi'},
                         {'role': 'assistant', 'content': 'yo'},
                         {'role': 'user', 'content': 'and?'}],
            'chosen': 'ok', 'rejected': 'no way'}
  for (tokens, mask), reply in zip(preference.encode_pair(tok, record), ('ok', 'no way')):
    reply_tokens = tok.encode(reply) + [tok.eos_id]
    assert tokens[-len(reply_tokens):] == reply_tokens
    assert mask == [0] * (len(tokens) - len(reply_tokens)) + [1] * len(reply_tokens)
    full, full_mask = sft.encode_messages(tok, record['messages'] + [
        {'role': 'assistant', 'content': reply}])
    assert tokens == full and sum(full_mask) > sum(mask)  # SFT trains on every assistant turn
