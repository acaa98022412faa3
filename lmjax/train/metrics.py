"""Where metrics go: `metrics.jsonl`, TensorBoard event files and a progress bar (process 0 only)."""

from __future__ import annotations

import json
import os

import jax
import tqdm
from tensorboardX import SummaryWriter


def throughput(steps: int, seconds: float, trained_tokens: int, forward_tokens: int,
               flops_per_token: float, peak_flops: float) -> dict:
  """tokens/s (tokens trained per second) and MFU over `steps` steps that took `seconds`:
  trained tokens count `flops_per_token` (forward + backward), forward-only tokens (reference,
  rollout and scoring passes) a third of it; MFU = achieved FLOP/s / `peak_flops`."""
  seconds = max(seconds, 1e-9)
  flops = steps * (trained_tokens + forward_tokens / 3) * flops_per_token
  return {'tokens_per_second': steps * trained_tokens / seconds,
          'mfu': flops / seconds / peak_flops}


class PhaseClock:
  """Wall time of each phase of a step (the task's experience phases, then 'update'), and totals
  over the steps after this process's first (which compiles every program)."""

  def __init__(self, phases, clock):
    self.phases = (*phases, 'update')
    self._clock = clock
    self.last = dict.fromkeys(self.phases, 0.0)
    self.totals = dict.fromkeys(self.phases, 0.0)
    self.steps = 0
    self._mark = clock()

  def start(self):
    self._mark = self._clock()

  def lap(self, phase: str, *outputs):
    """Ends `phase` once `outputs` are computed."""
    jax.block_until_ready(outputs)
    now = self._clock()
    self.last[phase], self._mark = now - self._mark, now

  def finish(self) -> dict:
    """Closes the step; its metrics."""
    if self.steps > 0:
      for phase in self.phases:
        self.totals[phase] += self.last[phase]
    self.steps += 1
    return {**{f'time/{p}_s': self.last[p] for p in self.phases},
            **{f'time/{p}_total_s': self.totals[p] for p in self.phases}}

  def summary(self) -> dict:
    """Totals and fractions after the first step (the first one alone if it is the only)."""
    first_only = self.steps == 1
    totals = self.last if first_only else self.totals
    overall = sum(totals.values())
    return {'timed_iterations': 1 if first_only else max(self.steps - 1, 0),
            'timing_includes_compile': first_only,
            **{f'time_{p}_s': totals[p] for p in self.phases},
            **{f'{p}_fraction': totals[p] / overall if overall > 0 else None for p in self.phases}}


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
      print(f'step {step}: eval ' + ', '.join(f'{k} {record[k]:.4f}' for k in (
          'loss', 'perplexity', 'accuracy', 'margin', 'score', 'kl') if k in record))

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
