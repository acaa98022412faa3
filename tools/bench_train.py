"""Training-step benchmark: tokens/s, step time, MFU and XLA's compiled memory for any config.

  python tools/bench_train.py --config=default [--config.KEY=VALUE ...] [--steps=10] [--torch]

`--steps=0` compiles only and prints XLA's memory analysis, e.g. LoRA vs full fine-tuning:
  python tools/bench_train.py --config=125m --steps=0 --config.task=sft \
      --config.post.train_file=tests/data/sft.jsonl --config.peft.method=lora

It times the same jitted, donated `train_step` the trainer runs, on synthetic batches (so the
input pipeline is not measured). `--torch` also times PyTorch with Hugging Face's
`LlamaForCausalLM` of the same shape (float32, AdamW) in a separate process, for a side-by-side
comparison on this machine.

For a mixture-of-experts config (`model.moe.num_experts` > 0) it also times the dense model with the
same active parameters (mlp_dim = (experts_per_token + num_shared_experts) x expert_mlp_dim) and
prints the dispatch overhead: the share of the MoE step beyond that dense step (routing, sorting,
gathers and scatters, grouped-matmul padding); MFU counts active FLOPs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from lmjax import config as config_lib
from lmjax.cli import split_overrides
from lmjax.parallel import mesh as mesh_lib
from lmjax.perf import peak_flops_per_device
from lmjax.scaling.flops import flops_per_token
from lmjax import tasks
from lmjax.train.loop import jit_programs
from lmjax.train.state import build_state


def synthetic_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, length = config.batch_size, config.seq_len
  tokens = rng.integers(0, config.model.vocab_size, size=(b, length + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
          'segment_ids': np.ones((b, length), np.int32), 'weights': np.ones((b, length), np.float32)}


def bench_lmjax(config, steps: int) -> dict:
  mesh = mesh_lib.make_mesh(config)
  task = tasks.from_config(config)
  tx, schedule = task.optimizer(config)
  rules = mesh_lib.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules[0])):
    create, abstract = build_state(task, tx, config.seed, mesh, rules)
    _, step_fn, _ = jit_programs(task, tx, schedule, mesh, abstract)
    batch = jax.device_put(synthetic_batch(config), mesh_lib.batch_sharding(mesh))
    start = time.perf_counter()
    compiled = step_fn.lower(abstract, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    result = {'impl': 'lmjax', 'compile_s': compile_s}
    if memory is not None:
      result['compiled_memory_mb'] = {
          'arguments': memory.argument_size_in_bytes / 2**20,
          'outputs': memory.output_size_in_bytes / 2**20,
          'temporaries': memory.temp_size_in_bytes / 2**20,
          'generated_code': memory.generated_code_size_in_bytes / 2**20}
    if steps <= 0:  # compile only: XLA's memory analysis without allocating the state
      return result
    state = create()
    for _ in range(2):  # warm up
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  tokens = config.batch_size * config.seq_len
  model_flops = flops_per_token(config.model, config.seq_len)['total']
  peak = peak_flops_per_device() * jax.device_count()
  result.update(step_s=step_s, tokens_per_s=tokens / step_s,
                mfu=tokens / step_s * model_flops / peak, model_gflops_per_token=model_flops / 1e9,
                peak_gflops=peak / 1e9)
  return result


_TORCH_SCRIPT = r'''
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
c = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=c['vocab'], hidden_size=c['d'], intermediate_size=c['f'],
                  num_hidden_layers=c['layers'], num_attention_heads=c['heads'],
                  num_key_value_heads=c['kv_heads'], max_position_embeddings=c['seq'],
                  tie_word_embeddings=c['tied'], attn_implementation='sdpa')
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randint(0, c['vocab'], (c['batch'], c['seq']))
times = []
for i in range(c['steps'] + 2):
  start = time.perf_counter()
  loss = model(input_ids=x, labels=x).loss
  loss.backward()
  opt.step()
  opt.zero_grad(set_to_none=True)
  if i >= 2:
    times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({'step_s': times[len(times) // 2]}))
'''


def bench_torch(config, steps: int) -> dict:
  m = config.model
  spec = {'vocab': m.vocab_size, 'd': m.d_model, 'f': m.mlp_dim, 'layers': m.num_layers,
          'heads': m.num_heads, 'kv_heads': m.num_kv_heads, 'seq': config.seq_len,
          'tied': m.tie_embeddings, 'batch': config.batch_size, 'steps': steps}
  out = subprocess.run([sys.executable, '-c', _TORCH_SCRIPT, json.dumps(spec)], check=True,
                       capture_output=True, text=True).stdout
  step_s = json.loads(out.strip().splitlines()[-1])['step_s']
  tokens = config.batch_size * config.seq_len
  model_flops = flops_per_token(config.model, config.seq_len)['total']
  return {'impl': 'torch+hf', 'step_s': step_s, 'tokens_per_s': tokens / step_s,
          'mfu': tokens / step_s * model_flops / (peak_flops_per_device() * jax.device_count())}


def dense_equivalent(config):
  """The dense config whose MLP has the MoE config's active feed-forward width."""
  dense = config_lib.from_json(config_lib.to_json(config))
  moe = dense.model.moe
  dense.model.mlp_dim = ((moe.experts_per_token + moe.num_shared_experts)
                         * (moe.expert_mlp_dim or dense.model.mlp_dim))
  dense.model.moe = config_lib.base_config().model.moe
  return dense


def main(argv=None) -> None:
  argv, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='default')
  parser.add_argument('--steps', type=int, default=10,
                      help='timed steps; 0 = compile only (memory analysis, nothing allocated)')
  parser.add_argument('--torch', action='store_true', help='also time PyTorch + HF Llama')
  args = parser.parse_args(argv)
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, overrides)
  mesh_lib.validate(config, jax.device_count())
  results = [bench_lmjax(config, args.steps)]
  if config.model.moe.num_experts and args.steps > 0:
    dense = bench_lmjax(dense_equivalent(config), args.steps)
    results.append(dict(dense, impl='dense-eq'))
    results[0]['dispatch_overhead'] = 1 - dense['step_s'] / results[0]['step_s']
  if args.torch:
    results.append(bench_torch(config, args.steps))
  print(f'config {args.config} {" ".join(overrides)}: {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, batch {config.batch_size} x seq {config.seq_len}')
  print(f'{"impl":10} {"step s":>8} {"tokens/s":>10} {"MFU":>7}')
  for r in results if args.steps > 0 else ():
    print(f'{r["impl"]:10} {r["step_s"]:8.3f} {r["tokens_per_s"]:10.0f} {100 * r["mfu"]:6.1f}%')
  if 'dispatch_overhead' in results[0]:
    print(f'MoE dispatch overhead vs the dense model of the same active parameters: '
          f'{100 * results[0]["dispatch_overhead"]:.1f}% of the MoE step')
  print(json.dumps(results[0], indent=2))


if __name__ == '__main__':
  main()
