"""Sweep definitions: a base config plus named points, each a list of `KEY=VALUE` overrides.

A sweep file (`experiments/NAME.py`) defines `get_sweep()` returning a `Sweep` (or a dict with the
same fields). Points come from `grid` (the product of value lists, times seeds), `random_search`
(sampled values, times seeds) or `isoflop` (an IsoFLOP design). The base config is a preset name or
a path; a relative path is looked up next to the sweep file first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import os
import re
from typing import Any

import numpy as np

from lmjax import config as config_lib
from lmjax.scaling import isoflop as isoflop_lib


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  overrides: tuple[str, ...]
  info: tuple[tuple[str, Any], ...] = ()  # extra results.csv columns: budget, seed, swept values


@dataclasses.dataclass
class Sweep:
  config: str  # preset name or path of the base config
  points: list[Point]
  overrides: tuple[str, ...] = ()  # applied to every point, before the point's own
  notes: list[str] = dataclasses.field(default_factory=list)  # design messages to print

  def __post_init__(self):
    names = [p.name for p in self.points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f'sweep point names must be unique; repeated: {", ".join(duplicates)}')


def value_label(value) -> str:
  text = f'{value:g}' if isinstance(value, float) else str(value)
  return re.sub(r'[^A-Za-z0-9.+-]', '-', text)


def _point(assignment: dict[str, Any], seed, extra_info=()) -> Point:
  parts = [f'{key.split(".")[-1]}={value_label(v)}' for key, v in assignment.items()]
  overrides = [f'{key}={v}' for key, v in assignment.items()]
  info = [(key, v) for key, v in assignment.items()] + list(extra_info)
  if seed is not None:
    parts.append(f'seed={seed}')
    overrides.append(f'seed={seed}')
    info.append(('seed', seed))
  return Point(name='_'.join(parts), overrides=tuple(overrides), info=tuple(info))


def grid(axes: dict[str, list], seeds=(0,)) -> list[Point]:
  """Every combination of the axes' values, once per seed (seeds=None: no seed override)."""
  keys = list(axes)
  return [_point(dict(zip(keys, values)), seed)
          for values in itertools.product(*(axes[k] for k in keys))
          for seed in (seeds if seeds is not None else [None])]


def random_search(space: dict[str, Any], num_points: int, seeds=(0,), rng_seed=0) -> list[Point]:
  """`num_points` samples, once per seed. A key's space is a list (uniform choice) or a tuple
  (low, high) sampled log-uniformly when both are positive floats, else uniformly (ints stay ints)."""
  rng = np.random.default_rng(rng_seed)
  points = []
  for _ in range(num_points):
    assignment = {key: _sample(rng, spec) for key, spec in space.items()}
    points.extend(_point(assignment, seed) for seed in (seeds if seeds is not None else [None]))
  return points


def _sample(rng, spec):
  if isinstance(spec, list):
    return spec[rng.integers(len(spec))]
  low, high = spec
  if isinstance(low, int) and isinstance(high, int):
    return int(rng.integers(low, high + 1))
  if low > 0 and high > 0:
    return float(f'{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}')
  return float(f'{rng.uniform(low, high):.3g}')


def isoflop(config: str, budgets, family='llama', overrides=(), seeds=(0,), **design_kwargs):
  """(points, notes) of an IsoFLOP design on `config` with the common `overrides` applied."""
  base = load_base_config(config, overrides)
  design = isoflop_lib.design_isoflop(budgets, base, family=family, **design_kwargs)
  points = []
  for p in design.points:
    for seed in seeds:
      suffix = f'_seed={seed}' if len(seeds) > 1 else ''
      seed_override = (f'seed={seed}',) if seed is not None else ()
      points.append(Point(name=p.name + suffix, overrides=p.overrides + seed_override,
                          info=(('budget', p.budget), ('seed', seed))))
  return points, design.notes + design.dropped


def load_base_config(config: str, overrides=()):
  base = config_lib.load_config(config)
  config_lib.apply_overrides(base, list(overrides))
  return base


def point_config(sweep: Sweep, point: Point, extra_overrides=()):
  """The resolved config of a point: base, the sweep's overrides, the point's, then extras."""
  config = load_base_config(sweep.config, list(sweep.overrides) + list(point.overrides)
                            + list(extra_overrides))
  config_lib.validate(config)
  return config


def _resolve_config_path(config: str, sweep_dir: str) -> str:
  beside = os.path.join(sweep_dir, config)
  if os.path.isfile(beside):
    return os.path.abspath(beside)
  if os.path.isfile(config):
    return os.path.abspath(config)
  return config  # a preset name


def load_sweep(path: str) -> Sweep:
  """Runs `get_sweep()` of a sweep file and checks every point's config."""
  spec = importlib.util.spec_from_file_location('_lmjax_sweep', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path}: a sweep file must define get_sweep()')
  sweep = module.get_sweep()
  if isinstance(sweep, dict):
    sweep = Sweep(**sweep)
  sweep.config = _resolve_config_path(sweep.config, os.path.dirname(os.path.abspath(path)))
  sweep.overrides = tuple(sweep.overrides)
  return sweep
