"""Scaling-law plots as PNGs, drawn on matplotlib `Figure`s with the Agg canvas (no pyplot state).

`plot_isoflop`: loss against N per budget with the fitted parabolas and their minima.
`plot_power_laws`: N_opt(C) and D_opt(C) with the fitted power laws.
`plot_contours`: contours of the parametric L(N, D) with the runs, iso-FLOP lines and the
compute-optimal frontier.
"""

from __future__ import annotations

import numpy as np
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmjax.scaling import fit as fit_lib


def _figure(width=6.4, height=4.8, ncols=1):
  figure = Figure(figsize=(width * ncols, height))
  FigureCanvasAgg(figure)
  return figure, figure.subplots(1, ncols)


def _budget_colors(budgets):
  norm = mcolors.LogNorm(min(budgets), max(budgets) * 1.0001)
  return {b: cm.viridis(norm(b)) for b in budgets}


def plot_isoflop(n, loss, groups, isoflop_fit, path, size_label='parameters N'):
  figure, ax = _figure()
  budgets = sorted(np.unique(groups))
  colors = _budget_colors(budgets)
  minima = {m['budget']: m for m in isoflop_fit['minima']}
  for budget in budgets:
    rows = groups == budget
    ax.scatter(n[rows], loss[rows], color=colors[budget], s=18, label=f'C={budget:.2g}')
    if budget in minima:
      m = minima[budget]
      x = np.linspace(np.log(n[rows]).min(), np.log(n[rows]).max(), 100)
      ax.plot(np.exp(x), np.polyval(m['parabola_N'], x), color=colors[budget], lw=1)
      if m['convex']:
        ax.scatter([m['N_opt']], [m['loss']], color=colors[budget], marker='*', s=120,
                   edgecolor='black', zorder=3)
  ax.set_xscale('log')
  ax.set_xlabel(size_label)
  ax.set_ylabel('loss')
  ax.set_title('IsoFLOP curves (stars: parabola minima)')
  ax.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def plot_power_laws(isoflop_fit, path):
  figure, axes = _figure(ncols=2)
  used = [m for m in isoflop_fit['minima'] if m['budget'] in isoflop_fit['budgets_used']]
  budgets = np.array([m['budget'] for m in used])
  grid = np.logspace(np.log10(budgets.min()) - 0.5, np.log10(budgets.max()) + 0.5, 50)
  for ax, key, exponent, coefficient, label in (
      (axes[0], 'N_opt', 'a', 'k_N', 'N_opt'), (axes[1], 'D_opt', 'b', 'k_D', 'D_opt')):
    ax.scatter(budgets, [m[key] for m in used], color='C0', zorder=3)
    ax.plot(grid, isoflop_fit[coefficient] * grid ** isoflop_fit[exponent], color='C1',
            label=f'{label} ∝ C^{isoflop_fit[exponent]:.3f}')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('training FLOPs C')
    ax.set_ylabel(label)
    ax.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def plot_contours(params, n, d, loss, path, budgets=(), flops_per_param_token=6.0):
  figure, ax = _figure()
  log_n = np.linspace(np.log10(n.min()) - 0.5, np.log10(n.max()) + 0.5, 120)
  log_d = np.linspace(np.log10(d.min()) - 0.5, np.log10(d.max()) + 0.5, 120)
  grid_n, grid_d = np.meshgrid(10 ** log_n, 10 ** log_d)
  surface = fit_lib.predict_loss(params, grid_n, grid_d)
  levels = np.quantile(surface, np.linspace(0.02, 0.98, 15))
  contours = ax.contour(grid_n, grid_d, surface, levels=np.unique(levels), cmap='viridis_r',
                        linewidths=0.8)
  ax.clabel(contours, fontsize=6, fmt='%.3g')
  ax.scatter(n, d, c=loss, cmap='viridis_r', s=14, edgecolor='black', linewidth=0.3)
  frontier_c = flops_per_param_token * grid_n[0] * grid_d[:, 0].min()
  frontier = np.array([fit_lib.optimal_allocation(params, c, flops_per_param_token)
                       for c in np.geomspace(frontier_c.min(), (flops_per_param_token * grid_n
                                                                * grid_d).max(), 40)])
  ax.plot(frontier[:, 0], frontier[:, 1], color='red', lw=1.2, label='compute-optimal')
  for budget in budgets:
    ax.plot(grid_n[0], budget / (flops_per_param_token * grid_n[0]), color='gray', lw=0.6,
            ls='--')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlim(grid_n.min(), grid_n.max())
  ax.set_ylim(grid_d.min(), grid_d.max())
  ax.set_xlabel('parameters N')
  ax.set_ylabel('tokens D')
  ax.set_title(f'L = {params["E"]:.3g} + {params["A"]:.3g}/N^{params["alpha"]:.3f} + '
               f'{params["B"]:.3g}/D^{params["beta"]:.3f}', fontsize=9)
  ax.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
