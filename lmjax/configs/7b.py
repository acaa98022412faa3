"""LLaMA-2 7B shape; vocabulary 32k.

Set `data.tokenizer`, or let lmjax train one on the corpus.
"""

from lmjax.config import llama_preset


def get_config():
  return llama_preset(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32,
                      mlp_dim=11008, seq_len=4096, batch_size=1024, learning_rate=0.0003,
                      large=True)
