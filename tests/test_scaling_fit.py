"""Scaling-law fits (lmjax.scaling.fit) and `lmjax scaling fit` on synthetic data."""

import csv
import json

import numpy as np
import pytest

from lmjax.commands import scaling as scaling_command
from lmjax.scaling import fit
from tests.test_scaling_flops import run_command

TRUTH = {'E': 1.69, 'A': 406.4, 'B': 410.7, 'alpha': 0.34, 'beta': 0.28}  # Hoffmann et al.
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def synthetic(noise=0.003, seed=0, sizes=9):
  """IsoFLOP runs from the parametric law: N spans 10^1.4 around sqrt(C / 120), D = C / 6N."""
  rng = np.random.default_rng(seed)
  budget = np.repeat(BUDGETS, sizes)
  n = np.concatenate([np.logspace(-0.7, 0.7, sizes) * np.sqrt(c / 120) for c in BUDGETS])
  d = budget / (6 * n)
  loss = fit.predict_loss(TRUTH, n, d) * np.exp(rng.normal(0, noise, len(n)))
  return n, d, loss, budget


def test_parametric_fit_recovers_the_law():
  n, d, loss, _ = synthetic()
  params = fit.fit_parametric(n, d, loss)
  assert params['E'] == pytest.approx(TRUTH['E'], rel=0.02)
  assert params['alpha'] == pytest.approx(TRUTH['alpha'], abs=0.03)
  assert params['beta'] == pytest.approx(TRUTH['beta'], abs=0.03)
  assert params['A'] == pytest.approx(TRUTH['A'], rel=0.3)
  assert params['B'] == pytest.approx(TRUTH['B'], rel=0.3)
  n_opt, d_opt = fit.optimal_allocation(params, 1e23)
  true_n, true_d = fit.optimal_allocation(TRUTH, 1e23)
  assert n_opt == pytest.approx(true_n, rel=0.15) and d_opt == pytest.approx(true_d, rel=0.15)
  assert 6 * n_opt * d_opt == pytest.approx(1e23)


def test_parametric_fit_is_exact_without_noise():
  n, d, loss, _ = synthetic(noise=0.0)
  params = fit.fit_parametric(n, d, loss)
  for key, value in TRUTH.items():
    assert params[key] == pytest.approx(value, rel=0.01), key


def test_bootstrap_intervals_contain_the_truth():
  n, d, loss, _ = synthetic(sizes=7, seed=1)
  params = fit.fit_parametric(n, d, loss)
  ci = fit.bootstrap_parametric(n, d, loss, params, num_samples=24, seed=0, target_flops=1e23)
  for key in ('E', 'alpha', 'beta', 'A', 'B'):
    assert ci[key][0] <= TRUTH[key] <= ci[key][1], (key, ci[key])
  true_n, _ = fit.optimal_allocation(TRUTH, 1e23)
  assert ci['N_opt'][0] < ci['N_opt'][1]
  assert ci['N_opt'][0] / 2 <= true_n <= ci['N_opt'][1] * 2


def test_approach2_recovers_known_exponents_despite_an_outlier():
  a, k = 0.45, 0.3  # N_opt = k C^a, so D_opt = C / (6 N_opt) has b = 1 - a
  rng = np.random.default_rng(0)
  rows = []
  for c in BUDGETS:
    for n in np.logspace(-0.6, 0.6, 7) * k * c ** a:
      loss = 2.0 + 0.04 * np.log(n / (k * c ** a)) ** 2 + rng.normal(0, 1e-4)
      rows.append((n, c / (6 * n), loss, c))
  rows[3] = rows[3][:2] + (rows[3][2] + 0.5,) + rows[3][3:]  # one diverged run
  n, d, loss, budget = map(np.array, zip(*rows))
  result = fit.fit_isoflop(n, d, loss, fit.group_budgets(budget * 1.02))
  assert result['a'] == pytest.approx(a, abs=0.01)
  assert result['b'] == pytest.approx(1 - a, abs=0.01)
  assert result['k_N'] == pytest.approx(k, rel=0.3)


def test_approach2_on_parametric_data_matches_the_implied_exponent():
  n, d, loss, budget = synthetic(seed=2)
  result = fit.fit_isoflop(n, d, loss, budget)
  implied = TRUTH['beta'] / (TRUTH['alpha'] + TRUTH['beta'])
  assert result['a'] == pytest.approx(implied, abs=0.03)
  assert result['b'] == pytest.approx(1 - implied, abs=0.03)
  ci = fit.bootstrap_isoflop(n, d, loss, budget, num_samples=30, seed=0)
  assert ci['a'][0] <= implied <= ci['a'][1]


def test_group_budgets_without_a_budget_column():
  flops = np.array([1e18, 1.03e18, 0.98e18, 1e19, 1.01e19, 3e19])
  groups = fit.group_budgets(flops)
  assert len(np.unique(groups)) == 3 and groups[0] == groups[1] == groups[2]


def write_csv(path, columns, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    writer.writerows(rows)


def test_fit_command_writes_fit_json_and_plots(tmp_path, capsys):
  n, d, loss, budget = synthetic(sizes=7)
  results = tmp_path / 'results.csv'
  write_csv(results, ['name', 'params', 'tokens', 'flops', 'eval_loss', 'budget'],
            [(f'r{i}', *row) for i, row in enumerate(zip(n, d, 6 * n * d, loss, budget))])
  out = tmp_path / 'fit'
  assert run_command(scaling_command, ['fit', str(results), f'--out={out}', '--bootstrap=8',
                                       '--target_flops=1e23']) == 0
  result = json.loads((out / 'fit.json').read_text())
  for key in ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b', 'ci', 'compute_optimal'):
    assert key in result, key
  assert set(result['ci']) >= {'E', 'alpha', 'beta', 'a', 'b', 'N_opt'}
  optimal = result['compute_optimal']
  assert optimal['target_flops'] == 1e23
  assert {'parametric', 'power_law'} <= set(optimal)
  for name in ('isoflop.png', 'power_laws.png', 'contours.png'):
    assert (out / name).stat().st_size > 1000, name
  assert 'alpha' in capsys.readouterr().out


def test_fit_command_on_published_style_table(tmp_path):
  """Only model size, FLOPs and a loss column, with other names: D = C / 6N, budgets grouped."""
  n, d, loss, _ = synthetic(sizes=5, seed=3)
  flops = 6 * n * d * np.exp(np.random.default_rng(0).normal(0, 0.01, len(n)))
  results = tmp_path / 'published.csv'
  write_csv(results, ['Model Size', 'Training FLOP', 'loss'], zip(n, flops, loss))
  out = tmp_path / 'fit'
  assert run_command(scaling_command, [
      'fit', str(results), '--params_column=Model Size', '--flops_column=Training FLOP',
      '--loss_column=loss', f'--out={out}']) == 0
  result = json.loads((out / 'fit.json').read_text())
  assert len(result['isoflop_minima']) == len(BUDGETS)
  assert result['alpha'] == pytest.approx(TRUTH['alpha'], abs=0.05)
