"""The quickstart: a small LLaMA-style model on the Python standard library, ~10 minutes on 2 CPU
cores (2.25M tokens; held-out loss ~3.4 nats/token, half of ln(vocab) is 3.8)."""

from lmjax.config import base_config


def get_config():
  c = base_config()
  c.steps = 550
  c.batch_size = 16
  c.seq_len = 256
  c.log_every = 20
  c.eval_every = 275
  c.eval_batches = 8
  c.checkpoint_every = 275
  c.data.eval_fraction = 0.05
  c.model.vocab_size = 2048
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 704
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  c.sample.prompt = 'def parse_args('
  c.sample.max_new_tokens = 160
  c.sample.temperature = 0.7  # greedy decoding of a model this small repeats itself
  c.sample.top_p = 0.95
  c.sample.repetition_penalty = 1.1
  return c
