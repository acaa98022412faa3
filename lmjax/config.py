"""Config schema, command-line overrides and validation.

Every config file (the presets in `lmjax/configs/`, the examples in `configs/`) starts from
`base_config()` and changes values; it may not add keys.
`apply_overrides` parses `--config.KEY=VALUE` strings with the type of the existing value, and
`validate` checks cross-field consistency. Both raise `ConfigError` with a one-line message that
names the offending key, before anything is compiled.
"""

from __future__ import annotations

import ast
import collections
import importlib.resources
import importlib.util
import json
import os

try:
  import ml_collections
except ModuleNotFoundError:  # tools/accelerator_check.py's minimal runtime: schema defaults only
  ml_collections = None


# `expert`: MoE expert parallelism; `context`: the sequence split (ring attention)
MESH_AXES = ('data', 'fsdp', 'tensor', 'pipeline', 'expert', 'context')


class ConfigError(ValueError):
  """A bad config key or value; the message names the key."""


def _group():
  """A config group: an ml_collections ConfigDict. Where ml_collections is not installed (the
  accelerator check runs with jax, flax, optax, orbax and numpy only), a namespace that carries
  the schema's defaults to the model code; loading, overriding and validating configs need
  ml_collections."""
  return ml_collections.ConfigDict() if ml_collections is not None else _Defaults()


class _Defaults(dict):
  """Attribute access to a dict (the schema's defaults without ml_collections)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  __setattr__ = dict.__setitem__


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults. Config files override values, never add keys."""
  c = _group()
  c.seed = 0
  c.steps = 1000
  c.batch_size = 8  # global sequences per optimizer step
  c.seq_len = 256
  c.grad_accum_steps = 1
  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 8
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.init_from = ''  # a workdir or checkpoint directory to start the params from
  c.max_nonfinite_in_a_row = 10
  c.spike_sigmas = 0.0  # skip the update when loss > mean + k * std of recent losses; 0 = off
  c.spike_window = 100  # steps in the running loss statistics
  c.z_loss = 0.0
  c.progress_bar = True
  c.task = 'pretrain'  # pretrain | sft | reward | dpo | ppo (lmjax.tasks)

  c.model = _group()
  m = c.model
  m.vocab_size = 8192
  m.num_layers = 4
  m.d_model = 256
  m.num_heads = 4
  m.num_kv_heads = 4
  m.head_dim = 0  # 0 = d_model // num_heads
  m.mlp_dim = 704
  m.max_seq_len = 2048
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  m.sliding_window = 0  # 0 = full causal attention
  m.qkv_bias = False  # biases on the q/k/v projections (Qwen2)
  m.attention = 'xla'  # xla | pallas | cudnn
  m.scan_layers = False
  m.remat = 'none'  # none | full | dots | dots_saveable | minimal
  m.dtype = 'auto'  # compute dtype: auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16
  m.param_dtype = 'float32'
  m.init_std = 0.02
  m.rope_scaling = 'none'  # none | llama3 (Llama 3.1+ RoPE frequency scaling, factors below)
  m.rope_scaling_factor = 8.0
  m.rope_low_freq_factor = 1.0
  m.rope_high_freq_factor = 4.0
  m.rope_original_max_len = 8192  # context length the RoPE frequencies were trained for
  # training losses (pretrain, sft): > 0 = run the LM head + cross-entropy over this many tokens at
  # a time, recomputed in the backward pass, instead of holding the (batch, seq, vocab) float32
  # logits and their gradient; the same loss. 0 = off. Not with pipeline stages (mesh.pipeline)
  m.logits_chunk = 0
  m.context_parallel = 'ring'  # ring | allgather: attention under mesh.context > 1
  # mixture of experts (lmjax.models.moe, docs/moe.md); num_experts = 0 is a dense model and every
  # other moe key must then keep its default
  m.moe = _group()
  e = m.moe
  e.num_experts = 0  # routed experts per MoE layer; 0 = dense
  e.experts_per_token = 2  # top-k
  e.expert_mlp_dim = 0  # hidden size of one expert; 0 = model.mlp_dim
  e.num_shared_experts = 0  # experts every token passes through (one SwiGLU of this many x width)
  e.first_k_dense = 0  # the first k layers keep the dense MLP
  e.moe_every = 1  # after those, every n-th layer is MoE (the others dense)
  e.router = 'softmax_topk'  # softmax_topk | topk_softmax | sigmoid (DeepSeek-V3)
  e.renormalize = True  # rescale the k routing weights of a token to sum to 1
  e.dispatch = 'dropless'  # dropless (sort + ragged_dot) | capacity (fixed shapes, drops)
  e.capacity_factor = 1.25  # capacity: slots per expert = ceil(factor x tokens x k / experts)
  e.aux_loss_coef = 0.01  # Switch load-balancing loss
  e.z_loss_coef = 0.001  # router z-loss
  e.bias_update_rate = 0.0  # sigmoid router: aux-loss-free balancing bias step; 0 = off

  c.optimizer = _group()
  o = c.optimizer
  o.name = 'adamw'  # adamw | adafactor | lion | sgd
  o.learning_rate = 3e-3
  o.schedule = 'cosine'  # cosine | linear | wsd | constant
  o.warmup_steps = 100
  o.decay_fraction = 0.2  # wsd: fraction of steps spent decaying
  o.final_lr_fraction = 0.1
  o.weight_decay = 0.1
  o.decay_embeddings = False
  o.grad_clip = 1.0  # global-norm clipping; 0 = off
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8

  c.data = _group()
  d = c.data
  d.source = 'stdlib'  # stdlib | a glob of text files | a .jsonl path; mixtures: 'SRC@W,SRC@W'
  d.text_field = 'text'
  d.tokenizer = ''  # a SentencePiece model path; empty = train one on the corpus (cached)
  d.eval_fraction = 0.02
  d.on_bad_input = 'error'  # error | skip
  d.num_workers = 0

  c.mesh = _group()
  for axis in MESH_AXES:
    c.mesh[axis] = -1 if axis == 'data' else 1
  for axis in MESH_AXES:  # how much of each axis spans slices/hosts
    c.mesh[f'dcn_{axis}'] = 1
  c.sharding = 'dp_fsdp_tp'  # dp | zero1 | fsdp | fsdp_tp | dp_fsdp_tp (docs/parallelism.md)
  c.sharding_rules = ''  # overrides of the preset: 'embed=fsdp,mlp=tensor,act_len='
  c.pipeline_microbatches = 1  # GPipe micro-batches per (accumulation) micro-batch

  c.distributed = _group()
  c.distributed.coordinator = ''  # host:port of process 0; empty = auto-detect (TPU pod, SLURM)
  c.distributed.num_processes = 0  # 0 = from the environment
  c.distributed.process_id = -1  # -1 = from the environment
  c.distributed.heartbeat_timeout_s = 30  # a dead peer makes the others exit after about this
  c.distributed.initialization_timeout_s = 300

  c.peft = _group()  # parameter-efficient fine-tuning (lmjax.peft)
  p = c.peft
  # none (full fine-tuning) | lora | dora | vera | lora_fa (weight deltas, mergeable) |
  # bottleneck | prefix | prompt | p_tuning (in-model: not mergeable, `lmjax peft save` exports them)
  p.method = 'none'
  p.rank = 8
  p.alpha = 16.0
  p.rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank
  p.dropout = 0.0
  p.targets = 'all-linear'  # all-linear | attn | mlp | qv | a regex over 'layers_0/attn/q'
  p.lora_plus_ratio = 1.0  # LoRA+: B's learning rate = ratio x the base learning rate
  p.train_patterns = ''  # with adapters: regex of base leaves that also train (BitFit: 'scale')
  p.freeze_patterns = ''  # full fine-tuning: regex of base leaves kept frozen ('embed|layers_0/')
  # frozen base storage: float32 | bfloat16 | int8 | nf4 (QLoRA-style: matmul weights quantised in
  # blocks of 64 input rows with a float32 absmax scale, the rest bfloat16; lmjax.peft.quant;
  # low-rank methods only: lora | dora | vera | lora_fa)
  p.base_dtype = 'float32'
  p.seed = 0  # VeRA's shared random projections
  p.num_virtual_tokens = 8  # prefix / prompt / p_tuning: virtual tokens (prefix length)
  p.adapter_dim = 16  # bottleneck: adapter hidden size
  p.encoder_dim = 0  # p_tuning: prompt-encoder MLP hidden size (0 = model.d_model)

  c.post = _group()  # post-training tasks (lmjax.tasks)
  q = c.post
  q.train_file = ''  # JSONL: prompt/response or messages (sft); prompt/chosen/rejected (reward, dpo)
  # or, for dpo with loss_type=kto, unpaired prompt/completion/label (label true = desirable)
  q.pack = True  # sft: pack several examples per row
  q.fields = ''  # field mapping NAME=SOURCE,...: 'prompt=question,chosen=better' (docs/data.md)
  q.eval_file = ''  # held-out examples; empty = post.eval_fraction of train_file (eval_batches > 0)
  q.eval_fraction = 0.05  # share of train_file held out when there is no eval_file
  q.max_prompt_length = 0  # a prompt that does not fit is cut from the left to this; 0 = half a row
  q.chat_template = ''  # messages: '' = the tokenizer's own (tokenizer_config.json) or lmjax's
  q.beta = 0.1  # dpo/ipo/hinge/kto temperature; orpo: weight of the odds-ratio term
  q.loss_type = 'sigmoid'  # dpo: sigmoid | ipo | hinge | orpo | kto
  q.label_smoothing = 0.0  # dpo sigmoid: conservative DPO
  q.chosen_nll_coef = 0.0  # dpo/ipo/hinge: + coef x per-token NLL of chosen responses (RPO alpha)
  q.margin = 0.0  # reward: Bradley-Terry margin
  q.center_coef = 0.0  # reward: coefficient of (r_chosen + r_rejected)^2
  q.kto_desirable_weight = 1.0
  q.kto_undesirable_weight = 1.0
  q.reward_model = ''  # ppo: workdir of a reward model (task=reward)
  q.toy_reward_token = -1  # ppo without a reward model: reward = count of this token id
  q.rollout_batch = 8  # ppo: prompts x group_size sequences per rollout
  q.ppo_epochs = 2  # passes over each rollout
  q.minibatches = 2  # minibatches per pass
  q.kl_coef = 0.05  # initial KL penalty coefficient
  q.kl_estimator = 'k1'  # k1 | k2 | k3
  q.target_kl = 0.0  # > 0: adaptive KL coefficient towards this KL per sequence
  q.clip_eps = 0.2
  q.value_clip = 0.2
  q.value_coef = 0.5
  q.entropy_coef = 0.0
  q.gamma = 1.0
  q.lam = 0.95
  q.advantage = 'gae'  # gae (value head) | grpo (group-relative, no value head)
  q.group_size = 1  # samples per prompt (grpo needs > 1)
  q.max_new_tokens = 16
  q.temperature = 1.0
  q.whiten_advantages = True

  c.eval = _group()  # lm-evaluation-harness tasks during training
  c.eval.harness_tasks = ''  # comma-separated task / group names (or YAML paths); empty = off
  c.eval.harness_every = 0  # run them every N steps and at the last step; 0 = the last step only
  c.eval.harness_num_fewshot = 0
  c.eval.harness_limit = 0  # documents per task; 0 = all
  c.eval.harness_batch_size = 16  # rows per scoring batch
  c.eval.harness_include_path = ''  # a directory of task YAMLs (local tasks)

  c.sample = _group()
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 128
  c.sample.temperature = 0.0
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  c.sample.min_p = 0.0
  c.sample.repetition_penalty = 1.0
  c.sample.num_beams = 1  # > 1 = beam search
  c.sample.length_penalty = 1.0  # beam score = sum log-prob / length ** length_penalty
  return c


def llama_preset(*, num_layers: int, d_model: int, num_heads: int, num_kv_heads: int,
                 mlp_dim: int, seq_len: int, batch_size: int, learning_rate: float,
                 large: bool) -> ml_collections.ConfigDict:
  """A LLaMA-shaped pretraining preset (32k vocabulary, 100k steps, 2k warmup). `large` models
  scan their layers and remat them fully; smaller ones unroll and save only the dots."""
  c = base_config()
  c.steps, c.batch_size, c.seq_len = 100_000, batch_size, seq_len
  c.log_every, c.eval_every, c.checkpoint_every = 50, 1000, 1000
  m = c.model
  m.vocab_size, m.num_layers, m.d_model = 32000, num_layers, d_model
  m.num_heads, m.num_kv_heads, m.mlp_dim = num_heads, num_kv_heads, mlp_dim
  m.max_seq_len = max(seq_len, 2048)
  m.scan_layers, m.remat = large, 'full' if large else 'dots_saveable'
  c.optimizer.learning_rate, c.optimizer.warmup_steps = learning_rate, 2000
  return c


# PEFT methods: weight deltas (mergeable; `lmjax.peft.lora`) and in-model ones (`lmjax.peft.hooks`)
PEFT_LOW_RANK = ('lora', 'dora', 'vera', 'lora_fa')
PEFT_IN_MODEL = ('bottleneck', 'prefix', 'prompt', 'p_tuning')
_CHOICES = {
    'model.attention': ('xla', 'pallas', 'cudnn'),
    'model.remat': ('none', 'full', 'dots', 'dots_saveable', 'minimal'),
    'model.dtype': ('auto', 'float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'optimizer.name': ('adamw', 'adafactor', 'lion', 'sgd'),
    'optimizer.schedule': ('cosine', 'linear', 'wsd', 'constant'),
    'data.on_bad_input': ('error', 'skip'),
    'task': ('pretrain', 'sft', 'reward', 'dpo', 'ppo'),
    'peft.method': ('none',) + PEFT_LOW_RANK + PEFT_IN_MODEL,
    'peft.base_dtype': ('float32', 'bfloat16', 'int8', 'nf4'),
    'post.loss_type': ('sigmoid', 'ipo', 'hinge', 'orpo', 'kto'),
    'post.kl_estimator': ('k1', 'k2', 'k3'),
    'post.advantage': ('gae', 'grpo'),
    'sharding': ('dp', 'zero1', 'fsdp', 'fsdp_tp', 'dp_fsdp_tp', 'ep'),
    'model.moe.router': ('softmax_topk', 'topk_softmax', 'sigmoid'),
    'model.moe.dispatch': ('dropless', 'capacity'),
    'model.context_parallel': ('ring', 'allgather'),
}
_POSITIVE = ('steps', 'batch_size', 'seq_len', 'grad_accum_steps', 'log_every', 'eval_every',
             'checkpoint_every', 'keep_checkpoints', 'max_nonfinite_in_a_row', 'model.vocab_size',
             'model.num_layers', 'model.d_model', 'model.num_heads', 'model.num_kv_heads',
             'model.mlp_dim', 'model.max_seq_len', 'spike_window')
_NON_NEGATIVE = ('eval_batches', 'model.head_dim', 'model.sliding_window', 'model.logits_chunk',
                 'optimizer.warmup_steps', 'optimizer.learning_rate', 'optimizer.weight_decay',
                 'optimizer.grad_clip', 'spike_sigmas', 'z_loss', 'sample.max_new_tokens',
                 'sample.top_k', 'sample.temperature', 'eval.harness_every',
                 'eval.harness_num_fewshot', 'eval.harness_limit')


def load_config(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file: a preset name shipped in the package (`tiny` is
  `lmjax/configs/tiny.py`), a path to a `.py` file, or a workdir's resolved `config.json`."""
  if path.endswith('.json'):
    try:
      with open(path, encoding='utf-8') as f:
        return from_json(f.read())
    except OSError as e:
      raise ConfigError(f'--config: cannot read {path!r}: {e.strerror}') from None
  presets = _presets()
  if path in presets:  # a bare name (no directory, no `.py`) is a preset
    with importlib.resources.as_file(presets[path]) as file:
      return _load_config_file(str(file))
  if not os.path.isfile(path):
    raise ConfigError(f'--config: no such config file or preset: {path!r} (presets: '
                      f'{", ".join(sorted(presets))})')
  return _load_config_file(path)


def _presets() -> dict:
  """Preset name -> its file in the installed `lmjax.configs` package."""
  files = importlib.resources.files('lmjax.configs')
  return {f.name[:-3]: f for f in files.iterdir()
          if f.name.endswith('.py') and not f.name.startswith('_')}


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('_lmjax_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  check_schema(config)
  return config


def check_schema(config: ml_collections.ConfigDict) -> None:
  """Every key of `config` exists in the schema with a value of the schema's type."""
  _check_against(base_config(), config, prefix='')


def _check_against(schema, config, prefix):
  for key, value in config.items():
    name = prefix + key
    if key not in schema:
      raise ConfigError(f'{name}: unknown config key')
    expected = schema[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f'{name}: expected a group of keys, got {value!r}')
      _check_against(expected, value, name + '.')
    else:
      config[key] = _coerce(name, value, type(expected))


def _coerce(name, value, expected_type):
  if isinstance(value, expected_type) and not (expected_type is int and isinstance(value, bool)):
    return value
  if expected_type is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  raise ConfigError(f'{name}: expected {expected_type.__name__}, got {value!r}')


def _parse_value(name, text, expected_type):
  if expected_type is str:
    return text
  if expected_type is bool:
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ConfigError(f'{name}: expected bool, got {text!r}')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f'{name}: expected {expected_type.__name__}, got {text!r}') from None
  return _coerce(name, value, expected_type)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies `KEY=VALUE` strings (`model.d_model=512`) in place, typed by the schema."""
  for item in overrides:
    if '=' not in item:
      raise ConfigError(f'{item}: an override must look like --config.KEY=VALUE')
    name, text = item.split('=', 1)
    *parents, leaf = name.split('.')
    node = config
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f'{".".join(parents[:i + 1])}: unknown config group')
      node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      raise ConfigError(f'{name}: unknown config key')
    node[leaf] = _parse_value(name, text, type(node[leaf]))


def _get(config, name):
  node = config
  for part in name.split('.'):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Cross-field checks that need no devices; raises ConfigError naming the first bad key (the
  mesh checks against the devices at hand: `lmjax.parallel.mesh.validate`)."""
  check_schema(config)
  for name, choices in _CHOICES.items():
    if _get(config, name) not in choices:
      raise ConfigError(f'{name}: must be one of {", ".join(choices)}; got {_get(config, name)!r}')
  for name in _POSITIVE:
    if _get(config, name) <= 0:
      raise ConfigError(f'{name}: must be positive; got {_get(config, name)!r}')
  for name in _NON_NEGATIVE:
    if _get(config, name) < 0:
      raise ConfigError(f'{name}: must be non-negative; got {_get(config, name)!r}')
  m = config.model
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'model.num_kv_heads: {m.num_kv_heads} does not divide '
                      f'model.num_heads={m.num_heads}')
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f'model.num_heads: {m.num_heads} does not divide model.d_model={m.d_model} '
                      '(set model.head_dim)')
  if config.seq_len > m.max_seq_len:
    raise ConfigError(f'seq_len: {config.seq_len} exceeds model.max_seq_len={m.max_seq_len}')
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(f'grad_accum_steps: {config.grad_accum_steps} does not divide '
                      f'batch_size={config.batch_size}')
  if not 0.0 <= config.post.eval_fraction < 1.0:
    raise ConfigError(f'post.eval_fraction: must be in [0, 1); got {config.post.eval_fraction}')
  if config.post.max_prompt_length < 0:
    raise ConfigError(f'post.max_prompt_length: must be >= 0; got {config.post.max_prompt_length}')
  if not 0.0 <= config.data.eval_fraction < 1.0:
    raise ConfigError(f'data.eval_fraction: must be in [0, 1); got {config.data.eval_fraction}')
  if not 0.0 < config.sample.top_p <= 1.0:
    raise ConfigError(f'sample.top_p: must be in (0, 1]; got {config.sample.top_p}')
  if not 0.0 <= config.optimizer.decay_fraction <= 1.0:
    raise ConfigError('optimizer.decay_fraction: must be in [0, 1]')
  if config.eval.harness_tasks and config.eval.harness_batch_size <= 0:
    raise ConfigError(f'eval.harness_batch_size: must be positive; got '
                      f'{config.eval.harness_batch_size}')
  if config.optimizer.warmup_steps > config.steps:
    raise ConfigError(f'optimizer.warmup_steps: {config.optimizer.warmup_steps} exceeds '
                      f'steps={config.steps}')
  _validate_moe(config.model.moe, config.model.scan_layers)
  if (config.model.moe.num_experts and config.peft.method in PEFT_LOW_RANK
      and 'moe' in config.peft.targets):
    raise ConfigError(f'peft.targets: {config.peft.targets!r} names MoE weights; low-rank adapters '
                      'on experts are not supported (all-linear adapts attention and dense MLPs)')
  _validate_post(config)


def _validate_moe(e, scan_layers: bool) -> None:
  if e.num_experts == 0:
    defaults = base_config().model.moe
    for key, value in e.items():
      if value != defaults[key]:
        raise ConfigError(f'model.moe.{key}: set on a dense model; set model.moe.num_experts > 0 '
                          'for a mixture of experts (or leave this key at its default)')
    return
  if e.num_experts < 0:
    raise ConfigError(f'model.moe.num_experts: must be >= 0; got {e.num_experts}')
  if not 0 < e.experts_per_token <= e.num_experts:
    raise ConfigError(f'model.moe.experts_per_token: must be in [1, model.moe.num_experts='
                      f'{e.num_experts}]; got {e.experts_per_token}')
  for key in ('expert_mlp_dim', 'num_shared_experts', 'first_k_dense', 'bias_update_rate',
              'aux_loss_coef', 'z_loss_coef'):
    if e[key] < 0:
      raise ConfigError(f'model.moe.{key}: must be >= 0; got {e[key]}')
  if e.moe_every < 1:
    raise ConfigError(f'model.moe.moe_every: must be >= 1; got {e.moe_every}')
  if e.capacity_factor <= 0:
    raise ConfigError(f'model.moe.capacity_factor: must be positive; got {e.capacity_factor}')
  if scan_layers and (e.first_k_dense or e.moe_every > 1):
    raise ConfigError('model.moe.first_k_dense: scanned layers (model.scan_layers) must all be MoE '
                      '(first_k_dense=0, moe_every=1); unroll them to interleave dense layers')
  if e.bias_update_rate and e.router != 'sigmoid':
    raise ConfigError('model.moe.bias_update_rate: aux-loss-free balancing needs '
                      f'model.moe.router=sigmoid; got {e.router}')


def _validate_post(config) -> None:
  p, q = config.peft, config.post
  if p.method != 'none' and (p.rank <= 0 or p.alpha <= 0):
    raise ConfigError(f'peft.rank: rank and alpha must be positive; got {p.rank}, {p.alpha}')
  if not 0.0 <= p.dropout < 1.0:
    raise ConfigError(f'peft.dropout: must be in [0, 1); got {p.dropout}')
  if p.lora_plus_ratio <= 0:
    raise ConfigError(f'peft.lora_plus_ratio: must be positive; got {p.lora_plus_ratio}')
  if p.method in ('prefix', 'prompt', 'p_tuning') and p.num_virtual_tokens <= 0:
    raise ConfigError(f'peft.num_virtual_tokens: must be positive; got {p.num_virtual_tokens}')
  if p.method == 'bottleneck' and p.adapter_dim <= 0:
    raise ConfigError(f'peft.adapter_dim: must be positive; got {p.adapter_dim}')
  if p.method == 'p_tuning' and p.encoder_dim < 0:
    raise ConfigError(f'peft.encoder_dim: must be >= 0; got {p.encoder_dim}')
  if (p.base_dtype in ('int8', 'nf4') and config.task != 'pretrain'
      and p.method not in PEFT_LOW_RANK):
    raise ConfigError(f'peft.base_dtype: {p.base_dtype} (a quantised frozen base) needs a low-rank '
                      f'peft.method (lora, dora, vera or lora_fa); got {p.method}')
  if p.method in PEFT_IN_MODEL and config.task == 'ppo':
    raise ConfigError(f'peft.method: {p.method} is not supported by task=ppo (its rollouts decode '
                      'the plain model); use lora, dora, vera or lora_fa')
  if config.task in ('sft', 'reward', 'dpo') and not q.train_file:
    raise ConfigError(f'post.train_file: task={config.task} needs a JSONL file')
  if q.beta <= 0:
    raise ConfigError(f'post.beta: must be positive; got {q.beta}')
  if not 0.0 <= q.label_smoothing < 0.5:
    raise ConfigError(f'post.label_smoothing: must be in [0, 0.5); got {q.label_smoothing}')
  if q.chosen_nll_coef < 0:
    raise ConfigError(f'post.chosen_nll_coef: must be >= 0; got {q.chosen_nll_coef}')
  if config.task == 'ppo':
    if not q.reward_model and q.toy_reward_token < 0:
      raise ConfigError('post.reward_model: ppo needs a reward model (or post.toy_reward_token)')
    for name in ('rollout_batch', 'ppo_epochs', 'minibatches', 'group_size', 'max_new_tokens'):
      if q[name] <= 0:
        raise ConfigError(f'post.{name}: must be positive; got {q[name]}')
    if q.rollout_batch % q.minibatches:
      raise ConfigError(f'post.minibatches: {q.minibatches} does not divide '
                        f'post.rollout_batch={q.rollout_batch}')
    if q.advantage == 'grpo' and q.group_size < 2:
      raise ConfigError('post.group_size: grpo needs at least 2 samples per prompt')
    if q.rollout_batch % q.group_size:
      raise ConfigError(f'post.group_size: {q.group_size} does not divide '
                        f'post.rollout_batch={q.rollout_batch}')


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with a single `-1` filled by the remaining devices."""
  sizes = {axis: config.mesh.get(axis, 1) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f'mesh.{fill[1]}: only one mesh axis may be -1')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f'mesh.{axis}: must be positive or -1; got {size}')
  known = 1
  for size in sizes.values():
    known *= size if size > 0 else 1
  if fill:
    if num_devices % known:
      raise ConfigError(f'mesh.{fill[0]}: the other axes ({known}) do not divide the '
                        f'{num_devices} devices')
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f'mesh: axis sizes multiply to {known}, but there are {num_devices} devices')
  return sizes


def rows_per_step(config) -> tuple[str, int]:
  """(the key that sets it, the global rows of one step): PPO's are its rollouts."""
  if config.task == 'ppo':
    return 'post.rollout_batch', config.post.rollout_batch
  return 'batch_size', config.batch_size


def choices(name: str) -> tuple:
  """The allowed values of a config key (`'task'`, `'post.loss_type'`, ...)."""
  return _CHOICES[name]


def frozen(group: ml_collections.ConfigDict):
  """A hashable, read-only view of a config group (attribute access), e.g. for jit's static
  arguments: the schema stays the one definition of its keys and defaults."""
  items = sorted(group.to_dict().items())
  view = collections.namedtuple('ConfigView', [k for k, _ in items])
  return view(*(v for _, v in items))


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a config saved by `to_json`, checked against the current schema."""
  config = ml_collections.ConfigDict(json.loads(text))
  check_schema(config)
  merged = base_config()
  merged.update(config)
  return merged
