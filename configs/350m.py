"""LLaMA-shaped 350M (GPT-3 Medium width and depth); vocabulary 32k. Set `data.tokenizer` or let lmjax train one."""

from lmjax.config import base_config


def get_config():
  c = base_config()
  c.steps = 100_000
  c.batch_size = 256
  c.seq_len = 2048
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.model.vocab_size = 32000
  c.model.num_layers = 24
  c.model.d_model = 1024
  c.model.num_heads = 16
  c.model.num_kv_heads = 16
  c.model.mlp_dim = 2816
  c.model.max_seq_len = 2048
  c.model.scan_layers = False
  c.model.remat = 'dots_saveable'
  c.optimizer.learning_rate = 0.0003
  c.optimizer.warmup_steps = 2000
  return c
