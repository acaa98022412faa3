"""Benchmark generation: prefill and decode tokens/s by batch size and length, with the KV cache
and without it (the full forward pass recomputed every step over a fixed P + N buffer).

Random params of the config's model (a preset name or config file, `--config.KEY=VALUE`
overrides), greedy decoding with no stop token, so every row generates exactly N tokens. Programs
are compiled ahead of time and not timed; each timing is the best of `--repeats` runs.

Without a cache every step runs the full forward pass over the same P + N buffer, so every step
costs the same: the baseline runs the first `--no_cache_steps` steps on that buffer and scales the
time to N steps (0 = run all N). Its tokens are checked against the cached ones (greedy agrees).

  python tools/bench_generate.py --config=tiny                    # CPU: well under a minute
  python tools/bench_generate.py --config=125m --batch_sizes=1,8,32 --lengths=256,1024,4096
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmjax import config as config_lib  # noqa: E402
from lmjax.cli import split_overrides  # noqa: E402
from lmjax.inference.generate import (  # noqa: E402
    SamplingConfig, decode, generate_without_cache, prefill)
from lmjax.models.transformer import ModelConfig, init_params  # noqa: E402


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x]


def parse_args(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = split_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='tiny', help='preset name or config file')
  p.add_argument('--batch_sizes', type=_ints, default=[1, 4])
  p.add_argument('--lengths', type=_ints, default=[256, 1024], help='new tokens per row')
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--no_cache_steps', type=int, default=16,
                 help='no-cache steps actually run, scaled to N (0 = all N steps)')
  args = p.parse_args(rest)
  args.overrides = overrides
  return args


def _best_time(fn, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def bench_one(model_cfg, params, batch: int, prompt_len: int, new_tokens: int, repeats: int,
              no_cache_steps: int) -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, model_cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
  positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), tokens.shape).copy()
  segments = np.ones_like(tokens)
  max_len = prompt_len + new_tokens
  cfg = SamplingConfig(max_new_tokens=new_tokens)
  next_pos = np.full((batch,), prompt_len, np.int32)
  key = jax.random.key(0)

  prefill_c = prefill.lower(model_cfg, params, tokens, positions, segments,
                            max_len=max_len).compile()
  logits, cache = prefill_c(params, tokens, positions, segments)
  decode_c = decode.lower(model_cfg, cfg, params, cache, logits, next_pos, tokens, segments,
                          key).compile()
  row = {'batch': batch, 'prompt': prompt_len, 'new': new_tokens}
  row['prefill_s'] = _best_time(lambda: prefill_c(params, tokens, positions, segments), repeats)

  decode_s, cached_tokens = float('inf'), None
  for _ in range(repeats):
    logits, cache = jax.block_until_ready(prefill_c(params, tokens, positions, segments))
    start = time.perf_counter()
    out = jax.block_until_ready(decode_c(params, cache, logits, next_pos, tokens, segments, key))
    decode_s = min(decode_s, time.perf_counter() - start)
    cached_tokens = np.asarray(out[0])
  row['decode_s'] = decode_s
  steps = min(no_cache_steps or new_tokens, new_tokens)
  nocache_c = generate_without_cache.lower(model_cfg, params, tokens, positions, segments,
                                           max_new_tokens=steps, buffer_len=new_tokens).compile()
  run = lambda: nocache_c(params, tokens, positions, segments)
  row['nocache_s'] = _best_time(run, repeats) * new_tokens / steps
  row['match'] = bool(np.array_equal(np.asarray(run()), cached_tokens[:, :steps]))
  return row


def main(argv=None) -> int:
  args = parse_args(argv)
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, args.overrides)
  model_cfg = ModelConfig.from_config(config.model)
  longest = args.prompt_len + max(args.lengths)
  model_cfg = dataclasses.replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, longest))
  params = nn.unbox(init_params(model_cfg, jax.random.key(0)))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f'# {args.config}: {num_params / 1e6:.2f}M params, d_model={model_cfg.d_model}, '
        f'layers={model_cfg.num_layers}, heads={model_cfg.num_heads}/{model_cfg.num_kv_heads} kv, '
        f'vocab={model_cfg.vocab_size}, dtype={np.dtype(model_cfg.dtype).name}, '
        f'backend={jax.default_backend()}')
  header = (f'{"batch":>5} {"prompt":>6} {"new":>5} {"prefill tok/s":>14} {"decode tok/s":>13} '
            f'{"no-cache tok/s":>15} {"speedup":>8} {"match":>6}')
  print(header)
  print('-' * len(header))
  for batch in args.batch_sizes:
    for new_tokens in args.lengths:
      row = bench_one(model_cfg, params, batch, args.prompt_len, new_tokens, args.repeats,
                      args.no_cache_steps)
      generated = batch * new_tokens
      decode_tps = generated / row['decode_s']
      nocache = f'{generated / row["nocache_s"]:.0f}'
      speedup = f'{row["nocache_s"] / row["decode_s"]:.1f}x'
      match = 'yes' if row['match'] else 'NO'
      print(f'{batch:>5} {args.prompt_len:>6} {new_tokens:>5} '
            f'{batch * args.prompt_len / row["prefill_s"]:>14.0f} {decode_tps:>13.0f} '
            f'{nocache:>15} {speedup:>8} {match:>6}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
