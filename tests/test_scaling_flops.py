"""Parameter and FLOP accounting (lmjax.scaling.flops) and `lmjax scaling flops`."""

import argparse

import flax.linen as nn
import jax
import numpy as np
import pytest

from lmjax import cli
from lmjax.commands import scaling as scaling_command
from lmjax.config import base_config
from lmjax.models.transformer import ModelConfig, init_params
from lmjax.scaling import flops


def small_config(tie=False):
  c = base_config()
  c.seq_len = 8
  m = c.model
  m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 100, 2, 16, 4, 2, 32
  m.tie_embeddings = tie
  return c


def run_command(module, argv):
  rest, overrides = cli.split_overrides(argv)
  parser = argparse.ArgumentParser()
  module.add_arguments(parser)
  args = parser.parse_args(rest)
  args.overrides = overrides
  return module.run(args)


def test_param_counts_match_hand_count():
  # d=16, 4 heads of 4, 2 kv heads, mlp 32, vocab 100, 2 layers.
  q = o = 16 * 4 * 4  # 256 each
  k_and_v = 2 * 16 * 2 * 4  # 256
  mlp = 3 * 16 * 32  # 1536 (gate, up, down)
  norms = 2 * 16
  per_layer = q + k_and_v + o + mlp + norms  # 2336
  non_embedding = 2 * per_layer + 16  # + final norm = 4688
  assert flops.param_counts(small_config().model) == {
      'total': 4688 + 2 * 100 * 16, 'embedding': 3200, 'non_embedding': 4688,
      'active': 4688 + 2 * 100 * 16, 'active_non_embedding': 4688}  # dense: all active
  assert flops.param_counts(small_config(tie=True).model) == {
      'total': 4688 + 100 * 16, 'embedding': 1600, 'non_embedding': non_embedding,
      'active': 4688 + 100 * 16, 'active_non_embedding': non_embedding}


def test_flops_per_token_match_hand_count():
  projections = 2 * 2 * (256 + 256 + 256 + 1536)  # 2 FLOPs per MAC, 2 layers: 9216
  attention = 2 * 2 * 2 * (4 * 4) * (8 + 1) / 2  # layers x (QK, AV) x 2 x H*Dh x mean keys: 576
  lm_head = 2 * 16 * 100  # 3200, also when tied
  for tie in (False, True):
    f = flops.flops_per_token(small_config(tie).model, seq_len=8)
    assert f['total'] == 3 * (projections + attention + lm_head) == 38976
    assert f['attention'] == 3 * attention and f['lm_head'] == 3 * lm_head
  assert flops.flops_per_token(small_config().model, 8)['six_n'] == 6 * 4688


@pytest.mark.parametrize('tie', [False, True])
def test_param_counts_match_the_model(tie):
  config = small_config(tie)
  params = nn.unbox(init_params(ModelConfig.from_config(config.model), jax.random.key(0)))
  real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert flops.param_counts(config.model)['total'] == real


def test_training_flops_of_a_run():
  c = small_config()
  c.steps, c.batch_size = 10, 4
  assert flops.training_flops(c) == 10 * 4 * 8 * 38976


def test_scaling_flops_command(tmp_path, capsys):
  path = tmp_path / 'small.py'
  path.write_text('from lmjax.config import base_config\n'
                  'def get_config():\n  c = base_config()\n  c.model.vocab_size = 100\n  return c\n')
  assert run_command(scaling_command, ['flops', f'--config={path}', '--config.model.d_model=128',
                                       '--config.model.num_heads=2',
                                       '--config.model.num_kv_heads=2']) == 0
  out = capsys.readouterr().out
  c = base_config()
  c.model.vocab_size, c.model.d_model, c.model.num_heads, c.model.num_kv_heads = 100, 128, 2, 2
  counts = flops.param_counts(c.model)
  assert f'{counts["non_embedding"]:,}' in out and f'{counts["total"]:,}' in out
  assert '6N' in out and 'lm_head' in out
