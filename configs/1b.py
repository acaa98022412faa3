"""LLaMA-shaped 1.1B with grouped-query attention (TinyLlama shape); vocabulary 32k. Set `data.tokenizer` or let lmjax train one."""

from lmjax.config import base_config


def get_config():
  c = base_config()
  c.steps = 100_000
  c.batch_size = 512
  c.seq_len = 2048
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.model.vocab_size = 32000
  c.model.num_layers = 22
  c.model.d_model = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 5632
  c.model.max_seq_len = 2048
  c.model.scan_layers = True
  c.model.remat = 'full'
  c.optimizer.learning_rate = 0.0004
  c.optimizer.warmup_steps = 2000
  return c
