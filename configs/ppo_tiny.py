"""Tiny PPO with a toy reward (count of one token), for tests."""

import os

from lmjax.config import load_config

SFT_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sft_tiny.py')


def get_config():
  c = load_config(SFT_TINY)
  c.task = 'ppo'
  c.peft.method = 'none'
  c.steps = 2  # PPO iterations (rollout + ppo_epochs x minibatches updates)
  c.log_every = 1
  c.checkpoint_every = 2
  c.post.train_file = os.path.join(os.path.dirname(c.post.train_file), 'prompts.jsonl')
  c.post.toy_reward_token = 5  # no reward model: reward = count of token 5 in the response
  c.post.rollout_batch = 8
  c.post.group_size = 2
  c.post.minibatches = 2
  c.post.ppo_epochs = 2
  c.post.max_new_tokens = 8
  return c
