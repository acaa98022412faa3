"""IsoFLOP design (lmjax.scaling.isoflop, shapes) and `lmjax scaling design`."""

import json

import numpy as np

from lmjax import config as config_lib
from lmjax.commands import scaling as scaling_command
from lmjax.scaling import flops, isoflop, shapes
from tests.test_scaling_flops import run_command

BUDGETS = (1e15, 3e15, 1e16)


def point_config(base, point):
  config = base.copy_and_resolve_references()
  config_lib.apply_overrides(config, list(point.overrides))
  config_lib.validate(config)
  return config


def test_family_rule():
  shape = shapes.shape_for_layers(shapes.get_family('llama'), 8)
  assert (shape.d_model, shape.num_heads, shape.mlp_dim) == (512, 8, 1344)  # 8/3*512=1365 -> 1344
  assert all(s.d_model % 64 == 0 and s.mlp_dim % 64 == 0
             for s in shapes.ladder(shapes.get_family('llama')))


def test_points_meet_budget_span_a_decade_and_schedule_matches_run():
  base = config_lib.base_config()
  design = isoflop.design_isoflop(BUDGETS, base, family='llama', num_sizes=5, tolerance=0.05)
  assert len(design.points) == 15 and not design.dropped
  for budget in BUDGETS:
    points = [p for p in design.points if p.budget == budget]
    sizes = [p.non_embedding_params for p in points]
    assert 5 <= max(sizes) / min(sizes) <= 20  # about a decade
    ratios = sorted(p.tokens / p.non_embedding_params for p in points)
    assert ratios[0] < 20 < ratios[-1]  # brackets the Chinchilla optimum
  for p in design.points:
    config = point_config(base, p)
    achieved = flops.training_flops(config)  # independent of the design's own arithmetic
    assert abs(achieved / p.budget - 1) <= 0.05
    assert np.isclose(achieved, p.achieved_flops)
    assert config.steps == p.steps and config.optimizer.schedule == 'cosine'
    assert 0 < config.optimizer.warmup_steps < config.steps
    assert config.model.num_heads * 64 == config.model.d_model


def test_small_budgets_adjust_batch_or_drop_with_a_message():
  base = config_lib.base_config()
  base.batch_size, base.seq_len = 64, 256
  design = isoflop.design_isoflop([3e11], base, family='llama', num_sizes=5, tolerance=0.02,
                                  min_steps=20, min_batch=4)
  assert design.dropped and all('dropped' in m and 'budget' in m for m in design.dropped)
  assert any('batch 64 ->' in note for note in design.notes)
  for p in design.points:
    assert abs(p.achieved_flops / p.budget - 1) <= 0.02 and p.steps >= 20
    assert p.batch_size < 64


def test_fit_batch_and_steps():
  assert isoflop.fit_batch_and_steps(1000 * 8 * 10 * 7.0, 7.0, 8, 10, 0.05, 20, 1) == (8, 1000,
                                                                                      None)
  batch, steps, reason = isoflop.fit_batch_and_steps(30 * 8 * 10 * 7.0, 7.0, 8, 10, 0.05, 50, 1)
  assert (batch, steps, reason) == (4, 60, None)
  assert isoflop.fit_batch_and_steps(5 * 7.0 * 10, 7.0, 8, 10, 0.05, 50, 1)[2]


def test_design_command_writes_points(tmp_path, capsys):
  out = tmp_path / 'points.json'
  assert run_command(scaling_command, ['design', '--budgets=1e15,3e15,1e16', '--family=llama',
                                       '--seq_len=512', f'--out={out}']) == 0
  table = capsys.readouterr().out
  points = json.loads(out.read_text())['points']
  assert len(points) == 15 and all(p['name'] in table for p in points)
  assert all('seq_len=512' in p['overrides'] for p in points)
