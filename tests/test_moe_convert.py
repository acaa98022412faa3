"""Mixtral <-> lmjax MoE conversion: logits equal transformers' on a random tiny model (float32),
and lmjax -> HF -> lmjax is exact. transformers 5 writes per-expert keys on disk (w1/w2/w3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lmjax.convert import ConversionError, export_hf, import_hf, model_config_from_hf
from lmjax.models import transformer


@pytest.fixture(scope='module')
def mixtral(tmp_path_factory):
  root = tmp_path_factory.mktemp('mixtral')
  torch.manual_seed(0)
  hf_cfg = transformers.MixtralConfig(
      vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
      max_position_embeddings=64, rope_theta=10000.0)
  model = transformers.MixtralForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # larger router weights than the init, so routing really varies
    for layer in model.model.layers:
      layer.mlp.gate.weight.mul_(20.0)
  model.save_pretrained(root / 'hf')
  return model, root


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def test_mixtral_logits_match_transformers_and_round_trip(mixtral):
  model, root = mixtral
  config, params = import_hf(str(root / 'hf'), str(root / 'wd'))
  assert config.model.moe.num_experts == 4 and config.model.moe.expert_mlp_dim == 24
  cfg = transformer.ModelConfig.from_config(config.model)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  logits = jax.jit(transformer.forward, static_argnums=0)(cfg, params, tokens, positions,
                                                          jnp.ones_like(tokens))
  np.testing.assert_allclose(logits, _hf_logits(model, tokens), atol=1e-4, rtol=0)
  export_hf(str(root / 'wd'), str(root / 'hf2'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(root / 'hf2')).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), atol=1e-6)
  _, params2 = import_hf(str(root / 'hf2'), str(root / 'wd2'))
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize('arch, field', [('DeepseekV3ForCausalLM', 'architectures'),
                                         ('Qwen2MoeForCausalLM', 'architectures')])
def test_unsupported_moe_variants_name_the_field(arch, field):
  hf = dict(architectures=[arch], hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=24, vocab_size=64, hidden_act='silu', num_experts=4)
  with pytest.raises(ConversionError, match=f'^{field}: {arch}'):
    model_config_from_hf(hf)
