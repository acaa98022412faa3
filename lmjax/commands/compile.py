"""`lmjax compile`: compile a run ahead of time for a TPU slice, here, and say whether it fits.

  lmjax compile --config=7b --topology=v5p-128 [--num_slices=2] [--config.KEY=VALUE ...]

The same config checks, state layout, shardings and jitted train step as `lmjax train`, compiled
by XLA:TPU through libtpu (`pip install -e ".[tpu]"`) on any host, accelerator or not. Prints
XLA's memory per chip against the chip's usable HBM, the analytic estimate beside it, model FLOPs
per step and the step's collectives, then `fits: ...` (exit 0) or `does not fit: ...` (exit 3).
"""

from __future__ import annotations

from lmjax.commands.common import add_config_arguments, config_from_args

EXIT_DOES_NOT_FIT = 3


def add_arguments(parser) -> None:
  add_config_arguments(parser)
  parser.add_argument('--topology', required=True,
                      help='TPU slice: v4-8, v5e-256 (or v5litepod-256), v5p-128, v6e-64, or '
                           "JAX's form v5p:4x4x4; v4/v5p suffixes count TensorCores (2 per chip)")
  parser.add_argument('--num_slices', type=int, default=1,
                      help='slices joined over DCN (set mesh.dcn_* to use them)')
  parser.add_argument('--save', default='', help='write the compiled programs to this file')


def run(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  try:  # the slice is described by libtpu directly; this host's own backend is not used
    jax.config.update('jax_platforms', 'cpu')
  except RuntimeError:  # backends already initialised (e.g. called from Python)
    pass
  from lmjax.parallel import topology as topology_lib  # pylint: disable=g-import-not-at-top
  from lmjax.train import aot  # pylint: disable=g-import-not-at-top
  topology = topology_lib.parse(args.topology, args.num_slices)
  config = config_from_args(args)
  devices = topology_lib.devices(topology)
  report = aot.compile_run(config, devices, target=topology.describe(),
                           usable=topology.usable_hbm_bytes)
  print(aot.format_report(report, config))
  if args.save and report.executables:
    aot.save_executables(report, args.save)
    print(f'saved the compiled programs to {args.save}')
  return 0 if report.fits else EXIT_DOES_NOT_FIT
