"""Tiny ppo post-training run for tests: seconds on one CPU core (see lmjax.posttrain)."""

import os

from lmjax.config import base_config

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'data')


def get_config():
  c = base_config()
  c.task = 'ppo'
  c.steps = 6
  c.batch_size = 4
  c.seq_len = 48
  c.log_every = 2
  c.eval_every = 1000
  c.eval_batches = 0
  c.checkpoint_every = 1000
  c.progress_bar = False
  c.model.vocab_size = 384  # the tokenizer and model shape of configs/tiny.py (init_from it)
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 128
  c.model.max_seq_len = 256
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = 'constant'
  c.optimizer.weight_decay = 0.0
  c.sample.max_new_tokens = 16
  c.steps = 2  # PPO iterations (rollout + ppo_epochs x minibatches updates)
  c.log_every = 1
  c.checkpoint_every = 2
  c.post.train_file = os.path.join(_DATA, 'prompts.jsonl')  # {"prompt": ...} per line
  c.post.toy_reward_token = 5  # no reward model: reward = count of token 5 in the response
  c.post.rollout_batch = 8
  c.post.group_size = 2
  c.post.minibatches = 2
  c.post.ppo_epochs = 2
  c.post.max_new_tokens = 8
  c.peft.method = 'lora'
  c.peft.rank = 4
  c.peft.alpha = 8.0
  return c
