"""A tiny mixture-of-experts model (docs/moe.md): `tiny` with 8 experts of width 64, top-2, in
every layer; trains in seconds on one CPU core."""

from lmjax.configs.tiny import get_config as tiny_config


def get_config():
  c = tiny_config()
  e = c.model.moe
  e.num_experts = 8
  e.experts_per_token = 2
  e.expert_mlp_dim = 64  # 2 active experts x 64 = the dense tiny model's 128
  return c
