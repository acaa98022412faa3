"""Log-likelihood requests per second of the harness backend's scorer, and its compile count.

Scores (context, continuation) token pairs of mixed lengths (multiple-choice-like: contexts of
`--min_context`..`--max_context` tokens, continuations of 1..`--max_continuation`) with the
quickstart model (`--config=default`, random init: speed does not depend on the weights), at
several batch sizes (rows per program), after one warm-up pass that compiles every bucket. Then
counts the programs compiled while scoring `--requests` mixed-length requests at `--rows`: the
goal is at most one per padding bucket.

  python tools/bench_harness.py [--config=default] [--batches=1,16,64] [--requests=1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import numpy as np

from lmjax.config import load_config
from lmjax.evaluation.loglikelihood import Scorer, bucket_width, token_scores
from lmjax.models.transformer import ModelConfig, init_params


def mixed_requests(n: int, vocab: int, min_context: int, max_context: int, max_continuation: int,
                   seed: int = 0) -> list[tuple[list[int], list[int]]]:
  rng = np.random.default_rng(seed)
  return [(list(rng.integers(4, vocab, rng.integers(min_context, max_context + 1))),
           list(rng.integers(4, vocab, rng.integers(1, max_continuation + 1))))
          for _ in range(n)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='default', help='a preset (the quickstart: default)')
  parser.add_argument('--batches', default='1,16,64', help='rows per program to compare')
  parser.add_argument('--timed', type=int, default=128, help='requests timed per batch size')
  parser.add_argument('--requests', type=int, default=1000, help='requests for the compile count')
  parser.add_argument('--rows', type=int, default=16, help='rows for the compile count')
  parser.add_argument('--min_context', type=int, default=16)
  parser.add_argument('--max_context', type=int, default=400)
  parser.add_argument('--max_continuation', type=int, default=16)
  args = parser.parse_args()

  config = load_config(args.config)
  model_cfg = ModelConfig.from_config(config.model)
  params = nn.unbox(init_params(model_cfg, jax.random.key(0)))
  lengths = (args.min_context, args.max_context, args.max_continuation)
  print(f'model {args.config}: {model_cfg.num_layers} layers, d_model {model_cfg.d_model}, '
        f'vocab {model_cfg.vocab_size}; {jax.device_count()} {jax.devices()[0].platform} '
        f'device(s); contexts {lengths[0]}-{lengths[1]} tokens, continuations 1-{lengths[2]}')

  timed = mixed_requests(args.timed, model_cfg.vocab_size, *lengths, seed=1)
  for rows in (int(b) for b in args.batches.split(',')):
    scorer = Scorer(model_cfg, params, rows=rows)
    start = time.perf_counter()
    scorer.loglikelihoods(timed)  # compiles each bucket it meets
    warm = time.perf_counter() - start
    start = time.perf_counter()
    scorer.loglikelihoods(timed)
    seconds = time.perf_counter() - start
    print(f'batch {rows:3d}: {len(timed) / seconds:8.1f} requests/s '
          f'({len(timed)} requests in {seconds:.2f}s; first pass with compiles {warm:.2f}s)')

  requests = mixed_requests(args.requests, model_cfg.vocab_size, *lengths, seed=2)
  scorer = Scorer(model_cfg, params, rows=args.rows + 1)  # shapes not compiled above
  before = token_scores._cache_size()  # pylint: disable=protected-access
  start = time.perf_counter()
  scorer.loglikelihoods(requests)
  seconds = time.perf_counter() - start
  compiles = token_scores._cache_size() - before  # pylint: disable=protected-access
  order = sorted(requests, key=lambda p: -(len(p[0]) + len(p[1])))
  used = {bucket_width(min(len(c) + len(t), scorer.max_length + 1) - 1, scorer.buckets)
          for c, t in (order[i] for i in range(0, len(order), scorer.rows))}
  print(f'{args.requests} mixed-length requests at batch {scorer.rows}: {compiles} compiles, '
        f'{len(used)} padding buckets used (of {len(scorer.buckets)}: {scorer.buckets}), '
        f'{args.requests / seconds:.1f} requests/s including compiles')


if __name__ == '__main__':
  main()
