"""Scaling-law fits (Hoffmann et al. 2022, approaches 2 and 3) and compute-optimal allocation.

Approach 2: per FLOP budget, a robust parabola of loss against ln N (and ln D); its vertex is
N_opt(C) (D_opt(C)); then power laws N_opt = k_N C^a and D_opt = k_D C^b by a log-log linear fit.

Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted in log space as
log L = logsumexp(a - alpha ln N, b - beta ln D, e) with a = ln A, b = ln B, e = ln E, minimising
the Huber loss (delta 1e-3) of the log-loss residuals with L-BFGS-B started from the best points of
a grid of initialisations. Bootstrap intervals resample rows and refit.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import optimize, special

PARAM_NAMES = ('E', 'A', 'B', 'alpha', 'beta')
_GRID = {'a': np.arange(0, 26, 5.0), 'b': np.arange(0, 26, 5.0), 'e': np.arange(-1, 1.1, 0.5),
         'alpha': np.arange(0, 2.1, 0.5), 'beta': np.arange(0, 2.1, 0.5)}


# ---------------------------------------------------------------------------- approach 3


def _logsumexp_and_softmax(terms):
  """logsumexp over axis 0 and the softmax weights (plain numpy: this is the inner loop)."""
  top = terms.max(axis=0)
  exps = np.exp(terms - top)
  total = exps.sum(axis=0)
  return np.log(total) + top, exps / total


def _log_predictions(theta, log_n, log_d):
  a, b, e, alpha, beta = theta
  return _logsumexp_and_softmax(np.stack([a - alpha * log_n, b - beta * log_d,
                                          np.full_like(log_n, e)]))


def _huber_objective(theta, log_n, log_d, log_loss, delta):
  """Mean Huber loss of log-loss residuals (divided by delta) and its gradient."""
  prediction, weights = _log_predictions(theta, log_n, log_d)
  residual = prediction - log_loss
  value = np.mean(special.huber(delta, residual)) / delta
  slope = np.clip(residual, -delta, delta) / delta / len(residual)
  grad = np.array([np.sum(slope * weights[0]), np.sum(slope * weights[1]),
                   np.sum(slope * weights[2]), -np.sum(slope * weights[0] * log_n),
                   -np.sum(slope * weights[1] * log_d)])
  return value, grad


def _grid_objectives(log_n, log_d, log_loss, delta):
  grid = np.array(list(itertools.product(*(_GRID[k] for k in ('a', 'b', 'e', 'alpha', 'beta')))))
  a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid),
                                                                           len(log_n)))])
  residual = _logsumexp_and_softmax(terms)[0] - log_loss
  return grid, np.mean(special.huber(delta, residual), axis=1) / delta


def _minimise(theta0, log_n, log_d, log_loss, delta):
  bounds = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]
  return optimize.minimize(_huber_objective, theta0, args=(log_n, log_d, log_loss, delta),
                           jac=True, method='L-BFGS-B', bounds=bounds,
                           options={'maxiter': 2000, 'ftol': 1e-11, 'gtol': 1e-10})


def _theta_to_params(theta) -> dict[str, float]:
  a, b, e, alpha, beta = theta
  return {'E': float(np.exp(e)), 'A': float(np.exp(a)), 'B': float(np.exp(b)),
          'alpha': float(alpha), 'beta': float(beta)}


def fit_parametric(n, d, loss, delta=1e-3, num_starts=4, extra_starts=()) -> dict:
  """Approach 3 fit: {'E','A','B','alpha','beta','objective','theta'} from the best of L-BFGS-B
  runs started at the `num_starts` best grid points (and any `extra_starts` thetas)."""
  log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
  grid, objectives = _grid_objectives(log_n, log_d, log_loss, delta)
  starts = list(grid[np.argsort(objectives)[:num_starts]]) + [np.asarray(t) for t in extra_starts]
  best = min((_minimise(t, log_n, log_d, log_loss, delta) for t in starts), key=lambda r: r.fun)
  return dict(_theta_to_params(best.x), objective=float(best.fun), theta=best.x.tolist())


def predict_loss(params, n, d):
  return params['E'] + params['A'] / np.power(n, params['alpha']) + params['B'] / np.power(
      d, params['beta'])


def optimal_allocation(params, flops, flops_per_param_token=6.0) -> tuple[float, float]:
  """(N_opt, D_opt) minimising L(N, D) under flops = 6 N D (closed form)."""
  alpha, beta = params['alpha'], params['beta']
  g = (alpha * params['A'] / (beta * params['B'])) ** (1 / (alpha + beta))
  ratio = flops / flops_per_param_token
  n_opt = g * ratio ** (beta / (alpha + beta))
  return float(n_opt), float(ratio / n_opt)


def optimal_allocation_exact(params, flops, sizes, flops_per_token) -> tuple[float, float]:
  """(N, D) of the candidate model (sizes[i], flops_per_token[i]) with the lowest predicted loss
  when trained on D = flops / flops_per_token[i] tokens: the exact per-token FLOP accounting."""
  sizes, flops_per_token = np.asarray(sizes, float), np.asarray(flops_per_token, float)
  tokens = flops / flops_per_token
  best = int(np.argmin(predict_loss(params, sizes, tokens)))
  return float(sizes[best]), float(tokens[best])


def bootstrap_parametric(n, d, loss, fit, num_samples, seed=0, delta=1e-3, target_flops=None,
                         level=0.95) -> dict:
  """Percentile intervals {name: [low, high]} of the parameters (and of N_opt, D_opt at
  target_flops) over fits to rows resampled with replacement, each started from the full fit."""
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(num_samples):
    rows = rng.integers(0, len(loss), len(loss))
    refit = fit_parametric(n[rows], d[rows], loss[rows], delta, num_starts=0,
                           extra_starts=[fit['theta']])
    if target_flops:
      refit['N_opt'], refit['D_opt'] = optimal_allocation(refit, target_flops)
    samples.append(refit)
  return percentile_intervals(samples, level)


def percentile_intervals(samples: list[dict], level: float) -> dict:
  tail = 50 * (1 - level)
  names = [k for k, v in samples[0].items() if isinstance(v, float) and k != 'objective']
  return {k: [float(np.percentile([s[k] for s in samples], tail)),
              float(np.percentile([s[k] for s in samples], 100 - tail))] for k in names}


# ---------------------------------------------------------------------------- approach 2


def group_budgets(flops, budget=None, max_gap_decades=0.05):
  """A budget per row: the `budget` column when given, else runs whose FLOPs lie within
  max_gap_decades of each other (sorted) share the group's median FLOPs."""
  if budget is not None and np.all(np.isfinite(budget)):
    return np.asarray(budget, float)
  flops = np.asarray(flops, float)
  order = np.argsort(flops)
  log_sorted = np.log10(flops[order])
  starts = np.concatenate([[0], np.nonzero(np.diff(log_sorted) > max_gap_decades)[0] + 1,
                           [len(flops)]])
  groups = np.empty_like(flops)
  for lo, hi in zip(starts[:-1], starts[1:]):
    groups[order[lo:hi]] = np.median(flops[order[lo:hi]])
  return groups


def fit_parabola(x, y) -> np.ndarray:
  """Robust (soft-L1) least-squares parabola y = c2 x^2 + c1 x + c0; returns (c2, c1, c0)."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  initial = np.polyfit(x, y, 2)
  spread = 1.4826 * np.median(np.abs(np.polyval(initial, x) - y))
  result = optimize.least_squares(lambda c: np.polyval(c, x) - y, initial, loss='soft_l1',
                                  f_scale=max(spread, 1e-6 * np.mean(np.abs(y)), 1e-12))
  return result.x


def fit_power_law(c, y) -> tuple[float, float]:
  """y = k c^exponent by least squares in log-log space: (exponent, k)."""
  exponent, log_k = np.polyfit(np.log(c), np.log(y), 1)
  return float(exponent), float(np.exp(log_k))


def isoflop_minima(n, d, loss, groups) -> list[dict]:
  """Per budget with >= 3 sizes: the parabola vertices in ln N and ln D and the loss there."""
  minima = []
  for budget in np.unique(groups):
    rows = groups == budget
    if len(np.unique(n[rows])) < 3:
      continue
    coef_n, coef_d = fit_parabola(np.log(n[rows]), loss[rows]), fit_parabola(
        np.log(d[rows]), loss[rows])
    convex = coef_n[0] > 0 and coef_d[0] > 0
    x_n = -coef_n[1] / (2 * coef_n[0]) if convex else np.nan
    x_d = -coef_d[1] / (2 * coef_d[0]) if convex else np.nan
    interior = bool(convex and np.log(n[rows]).min() <= x_n <= np.log(n[rows]).max())
    minima.append({'budget': float(budget), 'N_opt': float(np.exp(x_n)),
                   'D_opt': float(np.exp(x_d)), 'loss': float(np.polyval(coef_n, x_n)),
                   'parabola_N': coef_n.tolist(), 'parabola_D': coef_d.tolist(),
                   'convex': bool(convex), 'interior': interior})
  return minima


def fit_isoflop(n, d, loss, groups) -> dict:
  """Approach 2: per-budget minima and, with >= 2 usable budgets, N_opt = k_N C^a,
  D_opt = k_D C^b. Budgets whose vertex lies outside the sampled sizes are left out of the power
  laws when at least two others remain."""
  minima = isoflop_minima(n, d, loss, groups)
  usable = [m for m in minima if m['interior']]
  if len(usable) < 2:
    usable = [m for m in minima if m['convex']]
  result = {'minima': minima, 'budgets_used': [m['budget'] for m in usable]}
  if len(usable) >= 2:
    budgets = np.array([m['budget'] for m in usable])
    result['a'], result['k_N'] = fit_power_law(budgets, [m['N_opt'] for m in usable])
    result['b'], result['k_D'] = fit_power_law(budgets, [m['D_opt'] for m in usable])
  return result


def bootstrap_isoflop(n, d, loss, groups, num_samples, seed=0, level=0.95) -> dict:
  """Percentile intervals of a and b over refits to rows resampled within each budget."""
  rng = np.random.default_rng(seed)
  members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
  samples = []
  for _ in range(num_samples):
    rows = np.concatenate([rng.choice(m, len(m)) for m in members])
    refit = fit_isoflop(n[rows], d[rows], loss[rows], groups[rows])
    if 'a' in refit:
      samples.append({'a': refit['a'], 'b': refit['b']})
  return percentile_intervals(samples, level) if samples else {}


def power_law_allocation(isoflop_fit, flops) -> tuple[float, float]:
  return (isoflop_fit['k_N'] * flops ** isoflop_fit['a'],
          isoflop_fit['k_D'] * flops ** isoflop_fit['b'])
