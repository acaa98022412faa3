"""Where metrics go: `metrics.jsonl`, TensorBoard event files and a progress bar (process 0 only)."""

from __future__ import annotations

import json
import os

import tqdm
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Writes one JSON object per event to `workdir/metrics.jsonl` and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True,
               progress_bar: bool = True):
    self.enabled = enabled
    self._file = self._tb = self._bar = None
    if not enabled:
      return
    self._file = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
    if progress_bar:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, **{k: _plain(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    for key, value in record.items():
      if key not in ('step', 'split') and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{split}/{key}', value, step)
    if self._bar is not None and split == 'train':
      self._bar.set_postfix(loss=f'{record["loss"]:.3f}',
                            tok_s=f'{record.get("tokens_per_second", 0):.0f}',
                            mfu=f'{100 * record.get("mfu", 0):.1f}%')
    elif self._bar is None and split == 'eval':
      print(f'step {step}: eval loss {record["loss"]:.4f} perplexity {record["perplexity"]:.2f}')

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if self._file:
      self._file.close()
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def _plain(value):
  """Numpy / JAX scalars to Python numbers for JSON."""
  if hasattr(value, 'item'):
    value = value.item()
  return value


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
