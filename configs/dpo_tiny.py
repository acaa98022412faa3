"""Tiny DPO (LoRA; the reference is the base with the adapter off), for tests."""

import os

from lmjax.config import load_config

SFT_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sft_tiny.py')


def get_config():
  c = load_config(SFT_TINY)
  c.task = 'dpo'
  c.post.train_file = os.path.join(os.path.dirname(c.post.train_file), 'preference.jsonl')
  c.post.loss_type = 'sigmoid'
  c.post.beta = 0.1
  return c
