"""`lmjax scaling fit`: from a results table to fit.json and plots.

Works on any CSV with a parameter column, a tokens column (or a FLOPs column, then D = C / 6N) and
a loss column; a `budget` column, when present, groups IsoFLOP runs, else runs with nearly equal
FLOPs are grouped.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lmjax.scaling import fit as fit_lib
from lmjax.scaling import plots as plots_lib
from lmjax.scaling import results as results_lib
from lmjax.scaling import shapes as shapes_lib


def fit_data(rows, loss_column='eval_loss', params_column='params', tokens_column='tokens',
             flops_column='flops', budget_column='budget') -> dict[str, np.ndarray]:
  """Arrays N, D, C, loss and budget groups of the usable rows (positive and finite)."""
  if not rows:
    raise ValueError('the results table is empty')
  for column in (loss_column, params_column):
    if column not in rows[0]:
      raise ValueError(f'no {column!r} column; columns are: {", ".join(rows[0])}')
  if tokens_column not in rows[0] and flops_column not in rows[0]:
    raise ValueError(f'need a {tokens_column!r} or a {flops_column!r} column')
  n = results_lib.numeric_column(rows, params_column)
  loss = results_lib.numeric_column(rows, loss_column)
  d = results_lib.numeric_column(rows, tokens_column)
  c = results_lib.numeric_column(rows, flops_column)
  d = np.where(np.isfinite(d), d, c / (6 * n))
  c = np.where(np.isfinite(c), c, 6 * n * d)
  budget = results_lib.numeric_column(rows, budget_column)
  keep = np.isfinite(n + d + c + loss) & (n > 0) & (d > 0) & (loss > 0)
  has_budget = np.all(np.isfinite(budget[keep]))
  groups = fit_lib.group_budgets(c[keep], budget[keep] if has_budget else None)
  return {'N': n[keep], 'D': d[keep], 'C': c[keep], 'loss': loss[keep], 'groups': groups}


def exact_candidates(family: str, base_config, size_key: str):
  """(sizes, flops_per_token) of every shape of a family on a base config."""
  sizes = [shapes_lib.shape_size(base_config.model, s, base_config.seq_len)
           for s in shapes_lib.ladder(shapes_lib.get_family(family))]
  key = 'non_embedding_params' if size_key == 'non_embedding_params' else 'params'
  return [s[key] for s in sizes], [s['flops_per_token'] for s in sizes]


def analyze(data, target_flops=1e21, bootstrap=0, seed=0, level=0.95, delta=1e-3,
            candidates=None) -> dict:
  """Approach 2 (with >= 2 budgets of >= 3 sizes) and approach 3 (with >= 6 rows) fits, their
  bootstrap intervals and the compute-optimal N, D at `target_flops`."""
  n, d, loss, groups = data['N'], data['D'], data['loss'], data['groups']
  result = {'rows': int(len(loss)), 'target_flops': target_flops, 'ci': {}, 'ci_level': level,
            'compute_optimal': {'target_flops': target_flops}}
  optimal = result['compute_optimal']
  if len(loss) >= 6:
    params = fit_lib.fit_parametric(n, d, loss, delta)
    result.update({k: params[k] for k in fit_lib.PARAM_NAMES})
    result['huber_objective'] = params['objective']
    result['theta'] = params['theta']
    n_opt, d_opt = fit_lib.optimal_allocation(params, target_flops)
    optimal['parametric'] = {'N': n_opt, 'D': d_opt}
    if candidates is not None:
      n_exact, d_exact = fit_lib.optimal_allocation_exact(params, target_flops, *candidates)
      optimal['parametric_exact_flops'] = {'N': n_exact, 'D': d_exact}
    if bootstrap:
      result['ci'].update(fit_lib.bootstrap_parametric(n, d, loss, params, bootstrap, seed, delta,
                                                       target_flops, level))
  isoflop = fit_lib.fit_isoflop(n, d, loss, groups)
  result['isoflop_minima'] = isoflop['minima']
  if 'a' in isoflop:
    result.update({k: isoflop[k] for k in ('a', 'b', 'k_N', 'k_D', 'budgets_used')})
    n_pl, d_pl = fit_lib.power_law_allocation(isoflop, target_flops)
    optimal['power_law'] = {'N': n_pl, 'D': d_pl}
    if bootstrap:
      result['ci'].update(fit_lib.bootstrap_isoflop(n, d, loss, groups, bootstrap, seed, level))
  return result


def write_outputs(result, data, out_dir, size_label='parameters N') -> list[str]:
  """fit.json and the plots that the fits allow; returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  written = [os.path.join(out_dir, 'fit.json')]
  with open(written[0], 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  if result['isoflop_minima']:
    written.append(os.path.join(out_dir, 'isoflop.png'))
    plots_lib.plot_isoflop(data['N'], data['loss'], data['groups'],
                           {'minima': result['isoflop_minima']}, written[-1], size_label)
  if 'a' in result:
    written.append(os.path.join(out_dir, 'power_laws.png'))
    plots_lib.plot_power_laws({k: result[k] for k in ('a', 'b', 'k_N', 'k_D', 'budgets_used')}
                              | {'minima': result['isoflop_minima']}, written[-1])
  if 'E' in result:
    written.append(os.path.join(out_dir, 'contours.png'))
    plots_lib.plot_contours({k: result[k] for k in fit_lib.PARAM_NAMES}, data['N'], data['D'],
                            data['loss'], written[-1], budgets=np.unique(data['groups']))
  return written


def format_result(result) -> str:
  lines = [f'{result["rows"]} runs']
  ci = result['ci']

  def show(key, fmt):
    interval = (f'  [{ci[key][0]:{fmt}}, {ci[key][1]:{fmt}}]' if key in ci else '')
    return f'  {key:<8}{result[key]:{fmt}}{interval}'

  if 'E' in result:
    lines.append('approach 3: L(N, D) = E + A / N^alpha + B / D^beta')
    lines += [show(k, '.4g') for k in fit_lib.PARAM_NAMES]
  if 'a' in result:
    lines.append(f'approach 2: N_opt ∝ C^a, D_opt ∝ C^b over {len(result["budgets_used"])} '
                 'budgets')
    lines += [show(k, '.4f') for k in ('a', 'b')]
  for m in result.get('isoflop_minima', []):
    lines.append(f'  C={m["budget"]:.3g}: N_opt={m["N_opt"]:.3g} D_opt={m["D_opt"]:.3g} '
                 f'loss={m["loss"]:.4f}' + ('' if m['interior'] else '  (outside sampled sizes)'))
  optimal = result['compute_optimal']
  lines.append(f'compute-optimal at C={optimal["target_flops"]:.3g}:')
  for method, values in optimal.items():
    if isinstance(values, dict):
      lines.append(f'  {method:<24}N={values["N"]:.4g}  D={values["D"]:.4g}  '
                   f'D/N={values["D"] / values["N"]:.1f}')
  return '\n'.join(lines)
