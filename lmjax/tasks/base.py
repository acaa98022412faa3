"""The task contract: what the one train step (`lmjax.train.step`) and the one loop
(`lmjax.train.loop`) need from pretraining, SFT, reward models, the DPO family and PPO/GRPO.

A task is a frozen (hashable) description built once from the config (`lmjax.tasks.from_config`).
  setup        bind(tokenizer)           the task with what it needs from the tokenizer
  data         make_iterator(...)        checkpointable host batches (`get_state`/`set_state`)
               make_eval_batches(...)    held-out batches (may be empty)
               batch_spec(config)        {key: ShapeDtypeStruct} of one step's global batch, for
                                         compiling without data (`lmjax compile`)
  params       init_params(model, rng)   the state's params tree around freshly initialised (boxed)
                                         base params; split(params) -> (trainable, frozen) and
                                         join(trainable, frozen): only `trainable` is differentiated
                                         and has optimizer state
               decoding_params(params)   plain model params to decode or export with (adapters
                                         merged; in-model PEFT as a `peft` entry)
               place_base(params, base)  `params` with its base model replaced (`init_from`)
  loss         loss_sums(trainable, frozen, batch, rng) -> sums: 'loss' (differentiated), 'nll'
                                         (reported), 'z', 'weight' (the denominator), plus metric
                                         sums; the step divides everything by 'weight' once
               eval_sums(params, batch)  sums on a held-out batch ({'nll', 'weight'} at least)
               eval_metrics(totals)      held-out metrics from eval_sums summed over the batches
                                         (token tasks: loss, perplexity, tokens; preference tasks:
                                         loss, accuracy, margin, rewards, log-probs, pairs)
  experience   phases, experience(phase, state, aux, batch) -> (batch, stats, task_state): jitted
                                         programs the loop runs before each update (PPO: rollout,
                                         score); aux = load_auxiliary(mesh, rules) (PPO: the reward model)
                                         whose shapes auxiliary_spec(mesh, rules) gives
               updates = (epochs, minibatches): optimizer updates per step over the batch
  accounting   step_tokens(batch) -> (trained, forward_only) tokens per step, for MFU
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax.config import frozen
from lmjax.models.transformer import ModelConfig, init_params
from lmjax.optim import make_optimizer
from lmjax.peft import lora


def token_rows_spec(rows: int, length: int, prefix: str = '') -> dict:
  """The spec of packed token rows (what the pretraining and SFT iterators yield), keys prefixed."""
  dtypes = {'inputs': jnp.int32, 'targets': jnp.int32, 'segment_ids': jnp.int32,
            'positions': jnp.int32, 'weights': jnp.float32}
  return {f'{prefix}{key}': jax.ShapeDtypeStruct((rows, length), dtype)
          for key, dtype in dtypes.items()}


@dataclasses.dataclass(frozen=True)
class Task:
  """Defaults shared by every task; subclasses set `name` and implement data and loss."""
  model: ModelConfig
  peft: lora.PeftConfig
  post: Any  # `config.frozen(config.post)`: the post group as a hashable, read-only view
  z_loss: float = 0.0
  grad_accum_steps: int = 1
  spike_sigmas: float = 0.0
  spike_window: int = 100
  pipeline: tuple = (1, 1)  # (stages, micro-batches); stages > 1 = GPipe over mesh.pipeline

  name: ClassVar[str] = ''
  phases: ClassVar[tuple[str, ...]] = ()

  def bind(self, tokenizer) -> 'Task':
    """The task with what it needs from the tokenizer (PPO: the stop token)."""
    del tokenizer
    return self

  # --- data -----------------------------------------------------------------------------------
  def make_iterator(self, config, tokenizer, process_index: int = 0, process_count: int = 1):
    raise NotImplementedError

  def make_eval_batches(self, config, tokenizer, process_index: int = 0,
                        process_count: int = 1) -> list:
    del config, tokenizer, process_index, process_count
    return []

  def batch_spec(self, config) -> dict:
    return token_rows_spec(config.batch_size, config.seq_len)

  # --- params ---------------------------------------------------------------------------------
  def init_params(self, model_params, rng):
    del rng
    return model_params

  def abstract_params(self, mesh=None, rules=()):
    """Shapes and dtypes of the plain params tree: on one device, or laid out on `mesh` by the
    logical-axis `rules` (leaves without axis names, e.g. adapters, replicated)."""
    with nn.logical_axis_rules(()):
      boxed = jax.eval_shape(lambda: self.init_params(
          init_params(self.model, jax.random.key(0)), jax.random.key(0)))
    shapes = jax.tree.map(lambda x: getattr(x, 'value', x), boxed,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    if mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, shapes)
    else:
      shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, list(rules))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        shardings)

  def split(self, params):
    return params, {}

  def join(self, trainable, frozen):
    del frozen
    return trainable

  def decoding_params(self, params):
    return params

  def place_base(self, params, base):
    """`params` with its base model replaced by `base` (plain arrays, e.g. `init_from`), in
    `params`' dtypes and shardings."""
    return jax.tree.map(lambda n, o: jax.device_put(n.astype(o.dtype), o.sharding), base, params)

  # --- loss -----------------------------------------------------------------------------------
  def loss_sums(self, trainable, frozen, batch, rng) -> dict:
    raise NotImplementedError

  def eval_sums(self, params, batch) -> dict:
    sums = self.loss_sums(*self.split(params), batch, None)
    return {'nll': sums['nll'], 'weight': sums['weight']}

  def eval_metrics(self, totals: dict) -> dict:
    """Token-weighted mean loss, perplexity = exp(loss) and the token count."""
    loss = totals['nll'] / max(totals['weight'], 1.0)
    return {'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': totals['weight']}

  def evaluate(self, eval_fn, params, batches, to_device=lambda batch: batch, aux=None) -> dict:
    """`eval_metrics` of the `eval_fn(params, batch)` sums added over `batches` (`aux`: what
    `load_auxiliary` gave, for tasks that evaluate with it: PPO's reward model)."""
    del aux
    totals = {}
    for batch in batches:
      for key, value in jax.device_get(eval_fn(params, to_device(batch))).items():
        totals[key] = totals.get(key, 0.0) + float(value)
    return self.eval_metrics(totals)

  # --- experience (work before the update) ----------------------------------------------------
  @property
  def updates(self) -> tuple[int, int]:
    return 1, 1

  def init_task_state(self) -> dict:
    return {}

  def load_auxiliary(self, mesh, rules):
    """Read-only inputs of the experience phases, laid out on `mesh` (PPO: the reward model)."""
    del mesh, rules
    return None

  def auxiliary_spec(self, mesh, rules):
    """`load_auxiliary`'s result as ShapeDtypeStructs (for compiling without the files)."""
    del mesh, rules
    return None

  def experience(self, phase: str, state, aux, batch):
    raise NotImplementedError(f'{self.name}: no experience phase {phase!r}')

  # --- optimizer and accounting ---------------------------------------------------------------
  def optimizer(self, config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    epochs, minibatches = self.updates
    return make_optimizer(config.optimizer, config.steps, epochs * minibatches)

  def step_tokens(self, batch) -> tuple[int, int]:
    """(tokens run forward and backward, tokens run forward only) in one step on `batch` (the
    host batch of all processes' shape: rows x columns)."""
    rows, columns = batch['inputs'].shape
    return rows * columns, 0

  @classmethod
  def from_config(cls, config, model: ModelConfig, pipeline: tuple) -> 'Task':
    return cls(model=model, peft=lora.PeftConfig.from_config(config.peft),
               post=frozen(config.post), z_loss=config.z_loss,
               grad_accum_steps=config.grad_accum_steps, spike_sigmas=config.spike_sigmas,
               spike_window=config.spike_window, pipeline=pipeline)
