"""Tiny reward model (full fine-tuning + scalar head, Bradley-Terry loss), for tests."""

import os

from lmjax.config import load_config

SFT_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sft_tiny.py')


def get_config():
  c = load_config(SFT_TINY)
  c.task = 'reward'
  c.peft.method = 'none'
  c.post.train_file = os.path.join(os.path.dirname(c.post.train_file), 'preference.jsonl')
  c.post.center_coef = 0.01
  return c
