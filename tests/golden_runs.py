"""Golden loss trajectories: one tiny 10-step run per task and one pipelined layout.

`python tests/golden_runs.py record` writes tests/data/golden.json (recorded at commit 93631dd,
before the one-trainer restructuring); `python tests/golden_runs.py CASE WORKDIR` runs one case
and prints its per-step train losses as JSON (test_golden.py compares them exactly).
The pipelined case needs 2 devices: it runs with XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, 'data', 'golden.json')
POST = os.path.join(os.path.dirname(HERE), 'configs')  # the checkout's post-training configs
COMMON = ['steps=10', 'log_every=1', 'checkpoint_every=1000', 'eval_every=1000', 'seed=3']
CASES = {
    'pretrain': ('tiny', ['model.num_layers=2']),
    'sft': (os.path.join(POST, 'sft_tiny.py'), []),
    'reward': (os.path.join(POST, 'reward_tiny.py'), []),
    'dpo': (os.path.join(POST, 'dpo_tiny.py'), []),
    'kto': (os.path.join(POST, 'dpo_tiny.py'), ['post.loss_type=kto']),
    'ppo': (os.path.join(POST, 'ppo_tiny.py'), []),
    'grpo': (os.path.join(POST, 'ppo_tiny.py'), ['post.advantage=grpo']),
    'pipeline': ('tiny', ['model.scan_layers=true', 'mesh.data=1', 'mesh.pipeline=2',
                          'pipeline_microbatches=2']),
}
DEVICES = {'pipeline': 2}


def run_case(case: str, workdir: str) -> dict[int, float]:
  from lmjax.config import apply_overrides, load_config, validate  # pylint: disable=g-import-not-at-top
  from lmjax.train.loop import train  # pylint: disable=g-import-not-at-top
  preset, overrides = CASES[case]
  config = load_config(preset)
  apply_overrides(config, [*COMMON, 'progress_bar=false', *overrides])
  validate(config)
  train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in records if r['split'] == 'train'}


def run_in_subprocess(case: str, workdir: str) -> dict[int, float]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={DEVICES.get(case, 1)}'
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, os.path.abspath(__file__), case, workdir], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
  if out.returncode:
    raise RuntimeError(f'{case}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}')
  return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main(argv) -> None:
  if argv[1] == 'record':
    golden = {}
    for case in CASES:
      golden[case] = run_in_subprocess(case, tempfile.mkdtemp(prefix=f'golden-{case}-'))
      print(case, golden[case], flush=True)
    with open(GOLDEN, 'w', encoding='utf-8') as f:
      json.dump(golden, f, indent=1, sort_keys=True)
    return
  print(json.dumps(run_case(argv[1], argv[2])))


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(HERE))
  main(sys.argv)
