"""Mixtral-8x7B shape: 32 layers, d_model 4096, GQA 32/8, 8 experts of width 14336, top-2 (46.7B
parameters, 12.9B active); vocabulary 32k, RoPE theta 1e6. Expert parallel (`sharding=ep`): set
`mesh.expert` (8 divides the experts) and the other axes for your slice (docs/moe.md).

Set `data.tokenizer`, or let lmjax train one on the corpus.
"""

from lmjax.config import llama_preset


def get_config():
  c = llama_preset(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, mlp_dim=14336,
                   seq_len=4096, batch_size=1024, learning_rate=0.0003, large=True)
  c.model.rope_theta = 1e6
  c.sharding = 'ep'
  e = c.model.moe
  e.num_experts, e.experts_per_token, e.expert_mlp_dim = 8, 2, 14336
  e.aux_loss_coef = 0.02  # Mixtral's router_aux_loss_coef
  return c
