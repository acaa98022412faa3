"""LLaMA-2 7B shape; vocabulary 32k. Set `data.tokenizer` or let lmjax train one."""

from lmjax.config import base_config


def get_config():
  c = base_config()
  c.steps = 100_000
  c.batch_size = 1024
  c.seq_len = 4096
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.model.vocab_size = 32000
  c.model.num_layers = 32
  c.model.d_model = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.mlp_dim = 11008
  c.model.max_seq_len = 4096
  c.model.scan_layers = True
  c.model.remat = 'full'
  c.optimizer.learning_rate = 0.0003
  c.optimizer.warmup_steps = 2000
  return c
