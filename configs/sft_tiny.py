"""Tiny supervised fine-tuning with LoRA, for tests: seconds on one CPU core (lmjax.tasks).

Model shape and tokenizer are those of the `tiny` preset (lmjax/configs/tiny.py), so
`--config.init_from` a tiny run works. The other *_tiny post-training configs in this folder start
from this one (by path: they, like the tests/data files they read, belong to the checkout).
"""

import os

from lmjax.config import load_config

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
                        'data')


def get_config():
  c = load_config('tiny')
  c.task = 'sft'
  c.steps = 6
  c.seq_len = 48
  c.log_every = 2
  c.eval_every = 1000
  c.eval_batches = 0
  c.checkpoint_every = 1000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = 'constant'
  c.optimizer.weight_decay = 0.0
  c.post.train_file = os.path.join(DATA_DIR, 'sft.jsonl')
  c.peft.method = 'lora'
  c.peft.rank = 4
  c.peft.alpha = 8.0
  return c
