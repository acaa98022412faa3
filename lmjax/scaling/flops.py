"""Exact parameter and FLOP accounting for the decoder in `lmjax.models.transformer`.

Training FLOPs per token = 3 x forward (the backward pass costs two forwards). The forward counts
2 FLOPs per multiply-add of every matmul: the attention and MLP projections, the LM head (also when
tied to the embedding, since the matmul still runs), and attention scores and values over the keys
each query actually sees: (L + 1) / 2 on average under a causal mask, fewer with a sliding window.
Norms, RoPE, softmax and the optimizer are not counted, as is customary for MFU.

A mixture-of-experts layer (`model.moe`) has every expert's parameters (`total`) but runs only the
router, its top-k experts and the shared experts per token (`active`): FLOPs per token, and so MFU,
count the active parameters, the router's (D x E) matmul included.
"""

from __future__ import annotations

from lmjax.models.moe import is_moe_layer


def _dims(m):
  head_dim = m.head_dim or m.d_model // m.num_heads
  return m.d_model, m.num_heads, m.num_kv_heads, head_dim, m.mlp_dim, m.vocab_size


def _ffn_params(model_config) -> tuple[int, int]:
  """(all, active per token) feed-forward parameters summed over the layers; the matmul ones."""
  d, f = model_config.d_model, model_config.mlp_dim
  moe = getattr(model_config, 'moe', None)
  total = active = 0
  for layer in range(model_config.num_layers):
    if moe is None or not is_moe_layer(moe, layer):
      total, active = total + 3 * d * f, active + 3 * d * f
      continue
    fe = moe.expert_mlp_dim or f
    router = d * moe.num_experts
    shared = 3 * d * fe * moe.num_shared_experts
    total += router + shared + 3 * d * fe * moe.num_experts
    active += router + shared + 3 * d * fe * moe.experts_per_token
  return total, active


def param_counts(model_config) -> dict[str, int]:
  """Parameter counts: `total`, `embedding` (token embedding and untied LM head), `non_embedding`,
  and `active` / `active_non_embedding` (those a token runs through: all but the unchosen experts;
  the same as total for a dense model)."""
  d, h, k, dh, f, v = _dims(model_config)
  per_layer = d * h * dh + 2 * d * k * dh + h * dh * d + 2 * d
  if getattr(model_config, 'qkv_bias', False):  # q/k/v projection biases (Qwen2)
    per_layer += h * dh + 2 * k * dh
  moe = getattr(model_config, 'moe', None)
  biases = 0
  if moe is not None and moe.router == 'sigmoid' and moe.bias_update_rate > 0:
    biases = moe.num_experts * sum(is_moe_layer(moe, i) for i in range(model_config.num_layers))
  ffn, ffn_active = _ffn_params(model_config)
  non_embedding = model_config.num_layers * per_layer + ffn + biases + d  # + final norm
  embedding = v * d * (1 if model_config.tie_embeddings else 2)
  active = non_embedding - ffn + ffn_active
  return {'total': embedding + non_embedding, 'embedding': embedding,
          'non_embedding': non_embedding, 'active': embedding + active,
          'active_non_embedding': active}


def mean_attended_keys(seq_len: int, sliding_window: int = 0) -> float:
  """Average number of keys a query attends under the causal (and sliding-window) mask."""
  if not sliding_window or sliding_window >= seq_len:
    return (seq_len + 1) / 2

  w = sliding_window
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_token(model_config, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token, by part, with the 6N approximation next to them (N: the active
  parameters of an MoE model)."""
  d, h, k, dh, f, v = _dims(model_config)
  layers = model_config.num_layers
  projections = 2 * (layers * (d * h * dh + 2 * d * k * dh + h * dh * d)
                     + _ffn_params(model_config)[1])
  attention = 2 * layers * 2 * h * dh * mean_attended_keys(seq_len, model_config.sliding_window)
  lm_head = 2 * d * v
  forward = projections + attention + lm_head
  n = param_counts(model_config)
  return {
      'forward': forward,
      'projections': 3 * projections,
      'attention': 3 * attention,
      'lm_head': 3 * lm_head,
      'total': 3 * forward,
      'six_n': 6 * n['active_non_embedding'],
      'six_n_with_embedding': 6 * n['active'],
  }


def training_flops(config) -> float:
  """Exact training FLOPs of a whole run: steps x batch x seq_len x flops per token."""
  tokens = config.steps * config.batch_size * config.seq_len
  return tokens * flops_per_token(config.model, config.seq_len)['total']


def format_report(config) -> str:
  """A table of parameter counts and per-token training FLOPs by part, next to 6N."""
  n = param_counts(config.model)
  f = flops_per_token(config.model, config.seq_len)
  lines = [f'parameters (seq_len={config.seq_len})',
           f'  {"total":<28}{n["total"]:>16,}',
           f'  {"embedding":<28}{n["embedding"]:>16,}',
           f'  {"non-embedding":<28}{n["non_embedding"]:>16,}',
           *([f'  {"active (per token)":<28}{n["active"]:>16,}',
              f'  {"active non-embedding":<28}{n["active_non_embedding"]:>16,}']
             if n['active'] != n['total'] else []),
           'training FLOPs per token (3 x forward)']
  for part in ('projections', 'attention', 'lm_head', 'total'):
    lines.append(f'  {part:<28}{f[part]:>16.4g}   {f[part] / f["total"]:6.1%}')
  for part, label in (('six_n', '6N (non-embedding N)'), ('six_n_with_embedding', '6N (total N)')):
    lines.append(f'  {label:<28}{f[part]:>16.4g}   {f[part] / f["total"]:6.1%} of exact')
  tokens = config.steps * config.batch_size * config.seq_len
  lines.append(f'run: {config.steps} steps x {config.batch_size} x {config.seq_len} = '
               f'{tokens:,} tokens, {training_flops(config):.4g} FLOPs')
  return '\n'.join(lines)
