"""A run's programs compiled ahead of time for devices this host may not have (`lmjax compile`).

The same validation, task, state layout, shardings and jitted programs as `lmjax train`
(`lmjax.train.loop.jit_programs`), traced for abstract inputs on a mesh of the target devices (a
TPU slice described by libtpu, or this host's devices) and compiled by the target's XLA. Nothing
runs and nothing is allocated. The report gives XLA's memory per device against the device's
usable memory, a fit verdict, the analytic estimate beside it, model FLOPs per step and the
collectives of the train step, read from the compiled HLO.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

import flax.linen as nn
import jax
import numpy as np

from lmjax import tasks as tasks_lib
from lmjax.models import attention as attention_lib
from lmjax.parallel import mesh as mesh_lib
from lmjax.scaling.flops import flops_per_token
from lmjax.train import memory as memory_lib
from lmjax.train import state as state_lib
from lmjax.train.loop import jit_programs

GIB = 2**30
_UNITS = {'': 1, 'B': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
_EXHAUSTED = re.compile(r'\(([\d.]+)\s*([KMGT]?)i?B?\)\s*exceeds available HBM \(([\d.]+)\s*([KMGT]?)')
_COLLECTIVE = re.compile(r'=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|'
                         r'ragged-all-to-all|collective-permute|collective-broadcast)(-start)?\(')
_ARRAY = re.compile(r'\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128|f8\w*)'
                    r'\[([\d,]*)\]')
_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
             'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}


class OutOfMemory(Exception):
  """XLA refused to compile a program: it needs more memory than a device has."""

  def __init__(self, program: str, needed: float, available: float, message: str):
    super().__init__(message)
    self.program, self.needed, self.available = program, needed, available


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """XLA's memory analysis of one compiled program, bytes per device."""
  name: str
  arguments: float
  outputs: float
  aliased: float  # outputs that reuse a donated argument's buffer
  temporaries: float

  @property
  def total(self) -> float:
    return self.arguments + self.outputs - self.aliased + self.temporaries


@dataclasses.dataclass
class Report:
  """What `compile_run` found. `programs` is empty when XLA ran out of memory (`needed` set)."""
  target: str
  device_kind: str
  mesh: dict
  usable: float | None  # bytes per device, when known
  programs: list
  needed: float | None
  estimate: dict
  flops_per_step: float
  tokens_per_step: tuple
  collectives: dict  # kind -> (ops in the HLO, bytes they move per device)
  seconds: float
  executables: dict = dataclasses.field(default_factory=dict)

  @property
  def peak(self) -> float:
    """Bytes per device of the largest program (or what XLA said it needs)."""
    if self.needed is not None:
      return self.needed
    return max(p.total for p in self.programs)

  @property
  def fits(self) -> bool:
    return self.needed is None and (self.usable is None or self.peak <= self.usable)

  def verdict(self) -> str:
    if self.usable is None:
      return f'compiled: {self.peak / GIB:.2f} GiB per device (usable memory unknown)'
    if self.fits:
      return f'fits: {self.peak / GIB:.2f} of {self.usable / GIB:.2f} GiB per chip'
    return (f'does not fit: needs {self.peak / GIB:.2f} GiB of {self.usable / GIB:.2f} per chip '
            '(try: mesh.fsdp, model.remat=full, batch_size)')


def _size(value: str, unit: str) -> float:
  return float(value) * _UNITS[unit]


def parse_out_of_memory(message: str):
  """(needed, available) bytes from XLA's RESOURCE_EXHAUSTED message, or None."""
  match = _EXHAUSTED.search(message)
  if match is None:
    return None
  return _size(match.group(1), match.group(2)), _size(match.group(3), match.group(4))


def collectives(hlo_text: str) -> dict:
  """{kind: (count, bytes)} of the collectives in compiled HLO text. Bytes are each op's result
  per device (the larger array of an async start's (operand, result) pair). Ops inside loops
  (scanned layers, accumulation) appear once in the text and are counted once."""
  found = collections.defaultdict(lambda: [0, 0])
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if match is None:
      continue
    sizes = [_ITEMSIZE.get(dtype, 1) * int(np.prod([int(d) for d in dims.split(',') if d]))
             for dtype, dims in _ARRAY.findall(match.group(1))]
    nbytes = max(sizes, default=0) if match.group(3) else sum(sizes)
    found[match.group(2)][0] += 1
    found[match.group(2)][1] += nbytes
  return {kind: tuple(value) for kind, value in sorted(found.items())}


def _memory(name: str, compiled) -> ProgramMemory:
  analysis = compiled.memory_analysis()
  get = lambda field: float(getattr(analysis, field, 0) or 0)
  return ProgramMemory(name, get('argument_size_in_bytes'), get('output_size_in_bytes'),
                       get('alias_size_in_bytes'), get('temp_size_in_bytes'))


def _compile(name: str, jitted, *args):
  try:
    return jitted.trace(*args).lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    sizes = parse_out_of_memory(message) if 'RESOURCE_EXHAUSTED' in message else None
    if sizes is None:
      raise
    raise OutOfMemory(name, *sizes, message.strip().splitlines()[0]) from None


def _with_sharding(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def compile_run(config, devices, *, target: str = '', usable: float | None = None) -> Report:
  """Compiles `config`'s experience phases and train step for `devices`; see the module doc.
  `usable`: bytes of memory per device (the verdict's budget), when known."""
  start = time.perf_counter()
  mesh_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(config, devices)
  rules = mesh_lib.rules(config)
  programs, executables, needed = [], {}, None
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules[0])):
    attention_lib.check_available(config.model.attention)
    task = tasks_lib.from_config(config)  # under the mesh: `auto` dtypes resolve for its devices
    tx, schedule = task.optimizer(config)
    boxed = state_lib.abstract_state(task, tx, config.seed)
    state = state_lib.state_layout(task, tx, config.seed, mesh, rules)
    batch = _with_sharding(task.batch_spec(config), mesh_lib.batch_sharding(mesh))
    tokens = task.step_tokens(batch)
    phases, train_fn, _ = jit_programs(task, tx, schedule, mesh, state)
    aux = task.auxiliary_spec(mesh, rules[0])
    try:
      for name, phase_fn in phases:
        executables[name] = _compile(name, phase_fn, state, aux, batch)
        programs.append(_memory(name, executables[name]))
        batch = _with_sharding(jax.eval_shape(phase_fn, state, aux, batch)[0],
                               mesh_lib.batch_sharding(mesh))
      executables['train_step'] = _compile('train_step', train_fn, state, batch)
      programs.append(_memory('train_step', executables['train_step']))
    except OutOfMemory as e:
      needed, usable = e.needed, usable or e.available
  model_flops = flops_per_token(config.model, config.seq_len)['total']
  step = executables.get('train_step')
  return Report(
      target=target or f'{len(devices)} {devices[0].platform} devices',
      device_kind=devices[0].device_kind,
      mesh={k: v for k, v in mesh.shape.items() if v > 1} or {'data': 1},
      usable=usable, programs=programs, needed=needed,
      estimate=memory_lib.estimate(config, len(devices), task, boxed),
      flops_per_step=(tokens[0] + tokens[1] / 3) * model_flops, tokens_per_step=tokens,
      collectives=collectives(step.as_text()) if step is not None else {},
      seconds=time.perf_counter() - start, executables=executables)


def format_report(report: Report, config) -> str:
  """The report as `lmjax compile` prints it."""
  mib = lambda x: f'{x / GIB:8.2f} GiB' if x >= GIB / 10 else f'{x / 2**20:8.2f} MiB'
  mesh = ' x '.join(f'{axis}={size}' for axis, size in report.mesh.items())
  lines = [
      f'target: {report.target}, {report.device_kind}',
      f'run: task={config.task}, {report.estimate["param_count"] / 1e6:,.1f}M params, '
      f'sharding={config.sharding}, mesh {mesh}, remat={config.model.remat}, '
      f'attention={config.model.attention}',
      f'step: {report.tokens_per_step[0]:,} tokens trained'
      + (f' + {report.tokens_per_step[1]:,} forward only' if report.tokens_per_step[1] else '')
      + f', model FLOPs {report.flops_per_step:.3e} per step',
      'memory per chip (XLA):' if report.programs else 'memory per chip (XLA): not compiled',
  ]
  for program in report.programs:
    lines.append(f'  {program.name:<12} arguments {mib(program.arguments)}  temporaries '
                 f'{mib(program.temporaries)}  outputs {mib(program.outputs)}  (aliased '
                 f'{mib(program.aliased).strip()})  total {mib(program.total)}')
  estimate = report.estimate
  unit, scale = ('GiB', GIB) if estimate['total'] >= GIB / 10 else ('MiB', 2**20)
  lines.append(f'analytic estimate per chip ({unit}): ' + ', '.join(
      f'{name} {estimate[name] / scale:.2f}' for name in ('params', 'grads', 'optimizer',
                                                           'activations', 'total')))
  if report.collectives:
    lines.append('train step collectives (ops in the HLO, bytes per chip): ' + ', '.join(
        f'{kind} {count} ({nbytes / 2**20:,.1f} MiB)'
        for kind, (count, nbytes) in report.collectives.items()))
  elif report.programs:
    lines.append('train step collectives: none')
  lines.append(f'compiled in {report.seconds:.1f} s')
  lines.append(report.verdict())
  return '\n'.join(lines)


def save_executables(report: Report, path: str) -> None:
  """Writes the compiled programs (jax's serialized executables, pickled) to `path`."""
  import pickle  # pylint: disable=g-import-not-at-top
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  payload = {name: serialize_executable.serialize(compiled)
             for name, compiled in report.executables.items()}
  with open(path, 'wb') as f:
    pickle.dump(payload, f)
