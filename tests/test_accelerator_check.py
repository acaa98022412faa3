"""tools/accelerator_check.py runs where only jax, flax, optax, orbax and numpy are installed (the
other packages made unimportable), and its figures are sane on this CPU in its quick mode."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_check_needs_only_the_jax_stack():
  env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, 'tests', 'minimal_runtime'),
             JAX_PLATFORMS='cpu', LMJAX_PEAK_FLOPS='1e11')
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'accelerator_check.py'),
                           '--quick'], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {line.rsplit(' | ', 1)[0].strip(): line.rsplit(' | ', 1)[1]
          for line in result.stdout.splitlines() if ' | ' in line}
  assert 'absent in this runtime' not in result.stdout + result.stderr
  # cuDNN needs a GPU; everything else ran
  assert {k for k, v in rows.items() if v.startswith('error')} == {
      'train 125m | cudnn, 2 x 128', 'attention | cudnn, 256 tokens'}, rows
  for impl in ('xla', 'pallas'):  # both attention paths train: the loss falls over the timed steps
    figures = rows[f'train 125m | {impl}, 2 x 128']
    first, last = (float(x) for x in figures.split('loss ')[1].split(' -> '))
    assert last < first - 0.3, figures
  difference = float(rows['attention | flash vs xla, 256 tokens'].split()[-1])
  assert difference < 3e-2  # bfloat16 outputs of the Pallas kernel against XLA
  assert float(rows['decode | 125m, batch 2, prompt 16, 16 new'].split()[2].replace(',', '')) > 0
