"""LLaMA-shaped 125M (GPT-3 Small width and depth); vocabulary 32k.

Set `data.tokenizer`, or let lmjax train one on the corpus.
"""

from lmjax.config import llama_preset


def get_config():
  return llama_preset(num_layers=12, d_model=768, num_heads=12, num_kv_heads=12,
                      mlp_dim=2048, seq_len=2048, batch_size=256, learning_rate=0.0006,
                      large=False)
