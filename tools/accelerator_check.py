"""The first thing to run on a new GPU or TPU: one table of what the hardware gives lmjax.

  python tools/accelerator_check.py [--sections=train,attention,decode] [--quick]

On one chip, in about 8 minutes, it prints:
  - train: tokens/s and MFU of a 125m and a 1b model (bfloat16 compute, float32 params, seq 2048,
    AdamW) with each attention implementation (xla, pallas, cudnn);
  - attention: forward+backward time and TFLOP/s of lmjax's flash kernel, cuDNN and XLA at 4k, 8k
    and 16k tokens (head_dim 128, causal), and the kernel's largest difference from XLA;
  - decode: tokens/s of KV-cache decoding after a prefill.
A cell that fails shows the error's first line; the other cells still run.

It needs only jax, flax, optax, orbax and numpy: the batches are synthetic, and the train step is
the model's forward, the token cross-entropy and an optax AdamW update, jitted and donated (the
trainer's guards and data pipeline are left out; `tools/bench_train.py` times the trainer's own
step). `--quick` runs tiny shapes, for a smoke test on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/bench_attention.py

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import losses
from lmjax.config import base_config
from lmjax.inference.generate import SamplingConfig, decode, prefill
from lmjax.models.transformer import ModelConfig, forward, init_params
from lmjax.perf import peak_flops
from lmjax.scaling.flops import flops_per_token

ATTENTION = ('xla', 'pallas', 'cudnn')


def model_config(preset: str, attention: str, quick: bool) -> ModelConfig:
  """A preset's model (lmjax/configs/PRESET.py) in bfloat16 with `attention`."""
  if quick:
    model = base_config().model
    model.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=256,
                 vocab_size=512, max_seq_len=256)
  else:
    model = importlib.import_module(f'lmjax.configs.{preset}').get_config().model
  model.update(attention=attention, dtype='bfloat16', param_dtype='float32')
  return ModelConfig.from_config(model)


def _timed(fn, warmup: int, iters: int) -> float:
  """Median seconds of `fn()` (blocking) after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def train_row(preset: str, attention: str, batch: int, seq_len: int, quick: bool) -> dict:
  cfg = model_config(preset, attention, quick)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  tx = optax.adamw(3e-4, weight_decay=0.1)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len + 1)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  segments, weights = jnp.ones((batch, seq_len), jnp.int32), jnp.ones((batch, seq_len))

  def loss_fn(p):
    logits = forward(cfg, p, tokens[:, :-1], positions, segments)
    sums = losses.cross_entropy(logits, tokens[:, 1:], weights)
    return sums['loss'] / sums['weight']

  @jax.jit
  def step(p, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  state = [params, tx.init(params)]
  first = None

  def run():
    nonlocal first
    state[0], state[1], loss = step(*state)
    first = float(loss) if first is None else first
    return loss

  seconds = _timed(run, 2, 3 if quick else 5)
  tokens_per_s = batch * seq_len / seconds
  model_flops = flops_per_token(_as_config_group(cfg), seq_len)['total']
  peak, _ = peak_flops()
  return {'tokens/s': f'{tokens_per_s:,.0f}', 'MFU': f'{tokens_per_s * model_flops / peak:.1%}',
          'step': f'{seconds * 1e3:.1f} ms', 'loss': f'{first:.3f} -> {float(run()):.3f}'}


def _as_config_group(cfg: ModelConfig):
  """The `model` group `flops_per_token` reads, from a ModelConfig."""
  return argparse.Namespace(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})


def attention_row(impl: str, seq_len: int, quick: bool) -> dict:
  import bench_attention  # tools/bench_attention.py
  heads, head_dim = (4, 64) if quick else (16, 128)
  seconds = bench_attention.time_attention(impl, seq_len, head_dim=head_dim, num_heads=heads,
                                           num_kv_heads=heads, iters=3 if quick else 10)
  # causal: half the (L x L) scores; forward 2 matmuls, backward 5 (one recomputes the scores)
  flops = 2 * 2 * heads * seq_len**2 * head_dim * 0.5 * (1 + 2.5)
  return {'fwd+bwd': f'{seconds * 1e3:.2f} ms', 'TFLOP/s': f'{flops / seconds / 1e12:.1f}'}


def flash_difference(seq_len: int, quick: bool) -> dict:
  """Largest |flash - xla| of the outputs in bfloat16 at `seq_len` (the kernel on this device)."""
  from lmjax.models import attention as attention_lib
  heads, head_dim = (4, 64) if quick else (16, 128)
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, seq_len, heads, head_dim), jnp.bfloat16) for key in keys)
  segments = jnp.ones((1, seq_len), jnp.int32)
  positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
  out = {}
  for impl in ('pallas', 'xla'):
    fn = jax.jit(lambda q, k, v, impl=impl: attention_lib.attention(
        q, k, v, segment_ids_BL=segments, positions_BL=positions, impl=impl))
    out[impl] = np.asarray(fn(q, k, v), np.float32)
  return {'max |diff|': f'{np.max(np.abs(out["pallas"] - out["xla"])):.2e}'}


def decode_row(batch: int, prompt_len: int, new_tokens: int, quick: bool) -> dict:
  cfg = model_config('125m', 'xla', quick)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), tokens.shape)
  segments = jnp.ones_like(tokens)
  sampling = SamplingConfig(max_new_tokens=new_tokens)
  next_pos = jnp.full((batch,), prompt_len, jnp.int32)
  prefill_s = _timed(lambda: prefill(cfg, params, tokens, positions, segments,
                                     max_len=prompt_len + new_tokens), 1, 3)

  def run():
    logits, cache = prefill(cfg, params, tokens, positions, segments,
                            max_len=prompt_len + new_tokens)
    return decode(cfg, sampling, params, cache, logits, next_pos, tokens, segments,
                  jax.random.key(0))

  seconds = _timed(run, 1, 3) - prefill_s
  return {'decode tokens/s': f'{batch * new_tokens / seconds:,.0f}',
          'per token': f'{seconds / new_tokens * 1e3:.2f} ms', 'prefill': f'{prefill_s * 1e3:.1f} ms'}


def _cell(fn, *args) -> dict:
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return {'error': text[:100]}


def main(argv=None) -> list:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sections', default='train,attention,decode')
  parser.add_argument('--quick', action='store_true', help='tiny shapes (a CPU smoke test)')
  args = parser.parse_args(argv)
  sections = args.sections.split(',')
  device = jax.devices()[0]
  peak, source = peak_flops()
  print(f'device: {device.device_kind} ({device.platform}) x {jax.device_count()}, jax '
        f'{jax.__version__}; MFU peak {peak / 1e12:.1f} TFLOP/s ({source})')
  rows = []
  seq_len, batch = (128, 2) if args.quick else (2048, 8)
  if 'train' in sections:
    for preset in (('125m',) if args.quick else ('125m', '1b')):
      for impl in ATTENTION:
        rows.append((f'train {preset}', f'{impl}, {batch} x {seq_len}',
                     _cell(train_row, preset, impl, batch, seq_len, args.quick)))
  if 'attention' in sections:
    for length in ((256,) if args.quick else (4096, 8192, 16384)):
      for impl in ('flash', 'cudnn', 'xla'):
        rows.append(('attention', f'{impl}, {length} tokens',
                     _cell(attention_row, impl, length, args.quick)))
      rows.append(('attention', f'flash vs xla, {length} tokens',
                    _cell(flash_difference, length, args.quick)))
  if 'decode' in sections:
    shape = (2, 16, 16) if args.quick else (8, 128, 256)
    rows.append(('decode', f'125m, batch {shape[0]}, prompt {shape[1]}, {shape[2]} new',
                 _cell(decode_row, *shape, args.quick)))
  width = max(len(f'{a} | {b}') for a, b, _ in rows)
  for section, what, figures in rows:
    cells = ', '.join(f'{k} {v}' for k, v in figures.items())
    print(f'{section + " | " + what:<{width}} | {cells}')
  return rows


if __name__ == '__main__':
  main()
