"""LLaMA-shaped 1.1B with grouped-query attention (TinyLlama shape); vocabulary 32k.

Set `data.tokenizer`, or let lmjax train one on the corpus.
"""

from lmjax.config import llama_preset


def get_config():
  return llama_preset(num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4,
                      mlp_dim=5632, seq_len=2048, batch_size=512, learning_rate=0.0004,
                      large=True)
