"""IsoFLOP design: for each FLOP budget, a set of model sizes around the expected optimum, each
trained for exactly the tokens the budget buys.

For a budget C, the expected optimum is the family's shape whose token count D = C / flops_per_token
is closest to `tokens_per_param` x N (Chinchilla: D ~ 20 N). Sizes are then spaced geometrically over
`span` (a decade by default) around it and snapped to the family's ladder. Each run gets
steps = D / (batch x seq_len) rounded, and a warmup + cosine schedule whose length is those steps.
A run whose achieved FLOPs (steps x batch x seq_len x flops_per_token) miss C by more than
`tolerance` gets a smaller batch (halved until it fits), or is dropped with a message.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lmjax.scaling import shapes as shapes_lib


@dataclasses.dataclass(frozen=True)
class DesignPoint:
  name: str
  budget: float
  shape: shapes_lib.Shape
  params: int
  non_embedding_params: int
  flops_per_token: float
  batch_size: int
  seq_len: int
  steps: int
  warmup_steps: int
  overrides: tuple[str, ...]

  @property
  def tokens(self) -> int:
    return self.steps * self.batch_size * self.seq_len

  @property
  def achieved_flops(self) -> float:
    return self.tokens * self.flops_per_token

  def to_dict(self) -> dict:
    return {'name': self.name, 'budget': self.budget, 'params': self.params,
            'non_embedding_params': self.non_embedding_params,
            'flops_per_token': self.flops_per_token, 'tokens': self.tokens,
            'batch_size': self.batch_size, 'seq_len': self.seq_len, 'steps': self.steps,
            'warmup_steps': self.warmup_steps, 'achieved_flops': self.achieved_flops,
            'overrides': list(self.overrides)}


@dataclasses.dataclass
class Design:
  points: list[DesignPoint]
  dropped: list[str]  # one message per dropped run
  notes: list[str]  # adjustments and truncated spans


def budget_label(budget: float) -> str:
  return f'{budget:.2g}'.replace('+', '')


def _sizes_of_ladder(base_model_config, ladder, seq_len):
  return [shapes_lib.shape_size(base_model_config, s, seq_len) for s in ladder]


def expected_optimum(budget, sizes, size_key, tokens_per_param) -> int:
  """Index of the ladder shape whose D = C / flops_per_token is nearest tokens_per_param x N."""
  gaps = [abs(math.log(budget / s['flops_per_token'] / (tokens_per_param * s[size_key])))
          for s in sizes]
  return int(np.argmin(gaps))


def pick_sizes(family, ladder, sizes, size_key, center_size, num_sizes, span) -> list[int]:
  """Ladder indices nearest (in log size) to sizes spaced geometrically over `span` around the
  center, each a shape not picked yet; ties go to the shape closest to the family's aspect ratio."""
  log_sizes = np.log([s[size_key] for s in sizes])
  targets = math.log(center_size) + np.log(span) * np.linspace(-0.5, 0.5, num_sizes)
  picked = []
  for target in targets:
    free = [i for i in range(len(ladder)) if i not in picked]
    if free:
      picked.append(min(free, key=lambda i: (round(abs(log_sizes[i] - target), 2),
                                             shapes_lib.closeness_to_rule(family, ladder[i]))))
  return sorted(picked, key=lambda i: log_sizes[i])


def fit_batch_and_steps(budget, flops_per_token, batch_size, seq_len, tolerance, min_steps,
                        min_batch):
  """(batch, steps, None) meeting the budget within tolerance with at least min_steps steps,
  halving the batch as needed; or (None, None, reason)."""
  batch = batch_size
  while True:
    steps = max(1, round(budget / (flops_per_token * batch * seq_len)))
    error = steps * batch * seq_len * flops_per_token / budget - 1
    if abs(error) <= tolerance and steps >= min_steps:
      return batch, steps, None
    if batch // 2 < min_batch:
      return None, None, (f'{steps} steps at batch {batch} miss the budget by {error:+.1%} '
                          f'(tolerance {tolerance:.0%}, at least {min_steps} steps)')
    batch //= 2


def design_isoflop(budgets, base_config, family='llama', num_sizes=5, span=10.0,
                   tokens_per_param=20.0, size_key='non_embedding_params', batch_size=None,
                   seq_len=None, tolerance=0.05, min_steps=20, min_batch=1,
                   warmup_fraction=0.1) -> Design:
  """An IsoFLOP design over `budgets` for models of `family` built on `base_config`."""
  family = shapes_lib.get_family(family) if isinstance(family, str) else family
  batch_size = batch_size or base_config.batch_size
  seq_len = seq_len or base_config.seq_len
  if seq_len > base_config.model.max_seq_len:
    raise ValueError(f'seq_len {seq_len} exceeds model.max_seq_len={base_config.model.max_seq_len}')
  ladder = shapes_lib.ladder(family)
  sizes = _sizes_of_ladder(base_config.model, ladder, seq_len)
  points, dropped, notes = [], [], []
  for budget in sorted(budgets):
    label = budget_label(budget)
    center = expected_optimum(budget, sizes, size_key, tokens_per_param)
    if center in (0, len(ladder) - 1):
      notes.append(f'budget {label}: the expected optimum is at the edge of the {family.name} '
                   'ladder; sizes cover only one side of it')
    picked = pick_sizes(family, ladder, sizes, size_key, sizes[center][size_key], num_sizes, span)
    if len(picked) < num_sizes:
      notes.append(f'budget {label}: {len(picked)} distinct sizes (asked for {num_sizes})')
    for i in picked:
      shape, size = ladder[i], sizes[i]
      name = f'c{label}_{shape.label}'
      batch, steps, reason = fit_batch_and_steps(budget, size['flops_per_token'], batch_size,
                                                 seq_len, tolerance, min_steps, min_batch)
      if reason:
        dropped.append(f'{name}: dropped: {reason}')
        continue
      if batch != batch_size:
        notes.append(f'{name}: batch {batch_size} -> {batch} to meet the budget')
      warmup = max(1, round(warmup_fraction * steps))
      overrides = tuple(shape.overrides()) + (
          f'batch_size={batch}', f'seq_len={seq_len}', f'steps={steps}',
          'optimizer.schedule=cosine', f'optimizer.warmup_steps={warmup}')
      points.append(DesignPoint(
          name=name, budget=float(budget), shape=shape, params=size['params'],
          non_embedding_params=size['non_embedding_params'],
          flops_per_token=size['flops_per_token'], batch_size=batch, seq_len=seq_len,
          steps=steps, warmup_steps=warmup, overrides=overrides))
  return Design(points=points, dropped=dropped, notes=notes)


def format_design(design: Design) -> str:
  header = (f'{"name":<24}{"budget":>9}{"layers":>7}{"d_model":>8}{"heads":>6}{"mlp":>6}'
            f'{"params":>12}{"non-emb":>12}{"tokens":>12}{"D/N":>7}{"batch":>6}{"steps":>7}'
            f'{"FLOPs/C":>9}')
  lines = [header]
  for p in design.points:
    lines.append(
        f'{p.name:<24}{p.budget:>9.2g}{p.shape.num_layers:>7}{p.shape.d_model:>8}'
        f'{p.shape.num_heads:>6}{p.shape.mlp_dim:>6}{p.params:>12,}{p.non_embedding_params:>12,}'
        f'{p.tokens:>12,}{p.tokens / p.non_embedding_params:>7.1f}{p.batch_size:>6}'
        f'{p.steps:>7}{p.achieved_flops / p.budget:>9.3f}')
  lines.extend(design.notes)
  lines.extend(design.dropped)
  return '\n'.join(lines)
