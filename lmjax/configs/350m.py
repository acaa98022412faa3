"""LLaMA-shaped 350M (GPT-3 Medium width and depth); vocabulary 32k.

Set `data.tokenizer`, or let lmjax train one on the corpus.
"""

from lmjax.config import llama_preset


def get_config():
  return llama_preset(num_layers=24, d_model=1024, num_heads=16, num_kv_heads=16,
                      mlp_dim=2816, seq_len=2048, batch_size=256, learning_rate=0.0003,
                      large=False)
