"""Benchmark attention implementations: naive XLA, the Pallas flash kernel, cuDNN.

`time_attention(impl, seq_len, ...)` is the importable measurement (used by
`tools/accelerator_check.py`): seconds of one forward+backward of causal
attention on the local devices, impl in {'flash', 'cudnn', 'xla'}.

Prints one row per (backend, seq_len, head_dim, GQA ratio): forward ms,
forward+backward ms, achieved TFLOP/s for each, and peak memory of the compiled
forward+backward program (from ``compiled.memory_analysis()``).

FLOPs: forward = 4 * B * H * L * L * D (halved when causal: masked work is not
counted), backward = 2.5 x forward, so forward+backward = 3.5 x forward.
Peak memory is XLA's static estimate for the forward+backward program
(arguments + outputs + temporaries); the CPU backend reports no temporaries,
so on CPU it is only a lower bound.

Examples:
  python tools/bench_attention.py                       # GPU defaults
  python tools/bench_attention.py --seq_lens=128,256 --interpret   # CPU smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmjax.kernels.flash_attention import flash_attention  # noqa: E402


IMPLS = ("flash", "cudnn", "xla")


def time_attention(impl: str, seq_len: int, *, head_dim: int = 128,
                   num_heads: int = 16, num_kv_heads: int = 16, batch: int = 1,
                   dtype: str = "bfloat16", causal: bool = True,
                   iters: int = 10) -> float:
  """Median seconds of one jitted forward+backward (grads of q, k, v).

  impl: 'flash' (lmjax's Pallas kernels on this host's backend: Mosaic on
  TPU, Triton on GPU, the interpreter on CPU), 'cudnn'
  (`jax.nn.dot_product_attention`, GPU only) or 'xla' (einsum + softmax).
  Inputs are random normal (batch, seq_len, heads, head_dim) arrays.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: must be one of {', '.join(IMPLS)}")
  args = argparse.Namespace(causal=int(causal), sliding_window=0,
                            block_q=None, block_k=None, block_q_bwd=None,
                            block_k_bwd=None, interpret=False)
  fn = make_fn("pallas" if impl == "flash" else impl, args)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  dt = jnp.dtype(dtype)
  q = jax.random.normal(keys[0], (batch, seq_len, num_heads, head_dim), dt)
  k = jax.random.normal(keys[1], (batch, seq_len, num_kv_heads, head_dim), dt)
  v = jax.random.normal(keys[2], k.shape, dt)
  do = jax.random.normal(keys[3], q.shape, dt)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)

  compiled = jax.jit(fwd_bwd).lower(q, k, v, do).compile()
  return _time(compiled, (q, k, v, do), iters) * 1e-3


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
  on_cpu = jax.default_backend() == "cpu"
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--backends", default="xla,pallas,cudnn",
                 help="comma list of xla,pallas,cudnn (unavailable ones are "
                 "skipped)")
  p.add_argument("--seq_lens", type=_ints,
                 default=[128, 256] if on_cpu else
                 [512, 1024, 2048, 4096, 8192, 16384])
  p.add_argument("--head_dims", type=_ints, default=[64, 128])
  p.add_argument("--gqa_ratios", type=_ints, default=[1, 4],
                 help="num_heads / num_kv_heads")
  p.add_argument("--num_heads", type=int, default=4 if on_cpu else 16)
  p.add_argument("--batch", type=int, default=0,
                 help="0: choose so that batch * seq_len ~= --tokens")
  p.add_argument("--tokens", type=int, default=256 if on_cpu else 16384)
  p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16",
                 choices=["float32", "bfloat16"])
  p.add_argument("--causal", type=int, default=1)
  p.add_argument("--sliding_window", type=int, default=0)
  p.add_argument("--block_q", type=int, default=None)
  p.add_argument("--block_k", type=int, default=None)
  p.add_argument("--block_q_bwd", type=int, default=None)
  p.add_argument("--block_k_bwd", type=int, default=None)
  p.add_argument("--interpret", action="store_true",
                 help="run the Pallas kernel in interpret mode (CPU)")
  p.add_argument("--iters", type=int, default=2 if on_cpu else 20)
  p.add_argument("--max_xla_len", type=int, default=16384,
                 help="skip the naive XLA backend above this length")
  return p.parse_args(argv)


def naive_attention(q, k, v, *, causal, sliding_window):
  """Einsum + softmax; GQA by grouping query heads (no K/V repeat)."""
  b, l, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, l, kh, h // kh, d)
  s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k,
                 preferred_element_type=jnp.float32) / math.sqrt(d)
  i = jnp.arange(l)[:, None]
  j = jnp.arange(k.shape[1])[None, :]
  mask = jnp.ones((l, k.shape[1]), bool)
  if causal:
    mask &= j <= i
  if sliding_window:
    mask &= i - j < sliding_window
  s = jnp.where(mask, s, -1e30)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("bkgqs,bskd->bqkgd", p, v, preferred_element_type=jnp.float32)
  return o.reshape(b, l, h, d).astype(q.dtype)


def make_fn(backend: str, args):
  if backend == "xla":
    return lambda q, k, v: naive_attention(
        q, k, v, causal=bool(args.causal), sliding_window=args.sliding_window)
  if backend == "pallas":
    return lambda q, k, v: flash_attention(
        q, k, v, causal=bool(args.causal), sliding_window=args.sliding_window,
        block_q=args.block_q, block_k=args.block_k,
        block_q_bwd=args.block_q_bwd, block_k_bwd=args.block_k_bwd,
        interpret=True if args.interpret else None)  # else: the host's backend
  if backend == "cudnn":
    if args.sliding_window:
      return lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=bool(args.causal),
          local_window_size=(args.sliding_window - 1, 0),
          implementation="cudnn")
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=bool(args.causal), implementation="cudnn")
  raise ValueError(backend)


def _time(compiled, inputs, iters: int) -> float:
  jax.block_until_ready(compiled(*inputs))  # warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def _peak_bytes(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not available on every backend
    return None
  if m is None:
    return None
  peak = getattr(m, "peak_memory_in_bytes", 0) or 0
  if not peak:
    peak = (m.temp_size_in_bytes + m.argument_size_in_bytes
            + m.output_size_in_bytes - m.alias_size_in_bytes)
  return float(peak)


def bench_one(backend, args, batch, seq_len, head_dim, ratio):
  dtype = jnp.dtype(args.dtype)
  heads = args.num_heads
  kv_heads = max(1, heads // ratio)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq_len, kv_heads, head_dim), dtype)
  do = jax.random.normal(keys[3], q.shape, dtype)
  fn = make_fn(backend, args)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)

  fwd_c = jax.jit(fn).lower(q, k, v).compile()
  fb_c = jax.jit(fwd_bwd).lower(q, k, v, do).compile()
  fwd_ms = _time(fwd_c, (q, k, v), args.iters)
  fb_ms = _time(fb_c, (q, k, v, do), args.iters)

  flops = 4.0 * batch * heads * seq_len * seq_len * head_dim
  if args.causal:
    flops /= 2
  fwd_tflops = flops / (fwd_ms * 1e-3) / 1e12
  fb_tflops = 3.5 * flops / (fb_ms * 1e-3) / 1e12
  return fwd_ms, fb_ms, fwd_tflops, fb_tflops, _peak_bytes(fb_c)


def main(argv=None):
  args = parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  backends = []
  for b in args.backends.split(","):
    if b == "cudnn" and not on_gpu:
      continue
    if b == "pallas" and jax.default_backend() == "cpu" and not args.interpret:
      print("note: CPU backend, running the Pallas kernel in interpret mode")
    backends.append(b)

  print(f"device={jax.devices()[0].device_kind} dtype={args.dtype} "
        f"causal={bool(args.causal)} window={args.sliding_window} "
        f"heads={args.num_heads} blocks=({args.block_q},{args.block_k})")
  header = (f"{'backend':<8}{'L':>7}{'D':>5}{'H/KV':>6}{'B':>4}"
            f"{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd TF/s':>10}"
            f"{'f+b TF/s':>10}{'peak MiB':>10}")
  print(header)
  print("-" * len(header))
  for seq_len in args.seq_lens:
    batch = args.batch or max(1, args.tokens // seq_len)
    for head_dim in args.head_dims:
      for ratio in args.gqa_ratios:
        for backend in backends:
          prefix = (f"{backend:<8}{seq_len:>7}{head_dim:>5}{ratio:>6}"
                    f"{batch:>4}")
          if backend == "xla" and seq_len > args.max_xla_len:
            print(f"{prefix}  skipped (--max_xla_len)")
            continue
          try:
            fwd_ms, fb_ms, ftf, fbtf, peak = bench_one(
                backend, args, batch, seq_len, head_dim, ratio)
          except Exception as e:  # noqa: BLE001 - OOM, unsupported config...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"{prefix}  failed: {msg[:80]}")
            continue
          peak_s = "n/a" if peak is None else f"{peak / 2**20:.1f}"
          print(f"{prefix}{fwd_ms:>10.3f}{fb_ms:>12.3f}{ftf:>10.3f}"
                f"{fbtf:>10.3f}{peak_s:>10}", flush=True)


if __name__ == "__main__":
  main()
