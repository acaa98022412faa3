"""A tiny model for tests: trains in seconds on one CPU core."""

from lmjax.config import base_config


def get_config():
  c = base_config()
  c.steps = 20
  c.batch_size = 4
  c.seq_len = 64
  c.log_every = 5
  c.eval_every = 10
  c.eval_batches = 2
  c.checkpoint_every = 10
  c.progress_bar = False
  c.model.vocab_size = 384
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 128
  c.model.max_seq_len = 256
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.sample.max_new_tokens = 16
  return c
