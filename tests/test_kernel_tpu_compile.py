"""Flash attention compiled for TPU (Mosaic through libtpu) on this CPU host, ahead of time.

Forward + backward with segment ids, GQA (8 q heads, 2 kv heads) and bf16, inside `shard_map`
over a TPU slice's devices (batch split over them), traced under `jax.set_mesh` so the kernels pick
their backend from the target devices. Each compile must contain the three Mosaic kernels
(forward, dq, dk/dv): the interpreter path would compile too, but with no Mosaic call.
The old kernel kept a head's whole K/V in VMEM and failed from seq 32768 (320 MiB of 128 MiB);
with streaming blocks the VMEM per program does not depend on the length.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmjax.kernels import flash_common, flash_tpu
from lmjax.kernels.flash_attention import flash_attention

pytest.importorskip('libtpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

HEADS, KV_HEADS = 8, 2


def _mesh(topology: str) -> Mesh:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform='tpu', topology_name=topology).devices
  return Mesh(np.asarray(devices), ('data',))


def compile_fwd_bwd(topology: str, seq_len: int, head_dim: int):
  """The compiled grad of sum(flash_attention) for one sequence per device."""
  mesh = _mesh(topology)
  batch = mesh.devices.size
  spec = PartitionSpec('data')
  arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                  sharding=NamedSharding(mesh, spec))

  def loss(q, k, v, seg):
    run = jax.shard_map(lambda *a: flash_attention(*a, causal=True), in_specs=(spec,) * 4,
                        out_specs=spec, check_vma=False)
    return jnp.sum(run(q, k, v, seg).astype(jnp.float32))

  q = arg((batch, seq_len, HEADS, head_dim), jnp.bfloat16)
  kv = arg((batch, seq_len, KV_HEADS, head_dim), jnp.bfloat16)
  with jax.set_mesh(mesh):
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
        q, kv, kv, arg((batch, seq_len), jnp.int32)).lower().compile()


@pytest.mark.parametrize('topology,seq_len,head_dim', [
    ('v5e:2x2', 128, 128),
    ('v5e:2x2', 1000, 128),
    ('v5e:2x2', 8192, 64),
    ('v5e:2x2', 8192, 128),
    ('v5e:2x2', 8192, 256),
    ('v5e:2x2', 32768, 128),
    ('v5p:2x2x1', 131072, 128),
])
def test_forward_backward_compiles_with_mosaic(topology, seq_len, head_dim):
  compiled = compile_fwd_bwd(topology, seq_len, head_dim)
  hlo = compiled.as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == 3, 'expected 3 Mosaic kernels'
  # Nothing quadratic in the length: an (L, L) score matrix per head would dwarf this bound.
  memory = compiled.memory_analysis()
  per_device_qkv = seq_len * (HEADS + 2 * KV_HEADS) * head_dim * 2
  assert memory.temp_size_in_bytes < 16 * per_device_qkv + (1 << 20)


def test_vmem_per_program_does_not_grow_with_length():
  tiling = lambda length: flash_common.make_tiling(
      jax.ShapeDtypeStruct((1, length, HEADS, 128), jnp.bfloat16),
      jax.ShapeDtypeStruct((1, length, KV_HEADS, 128), jnp.bfloat16), True, causal=True,
      window=0, backend='tpu', blocks=(None,) * 4)
  at_8k = flash_tpu.vmem_bytes_per_program(tiling(8192), 128, 2)
  at_128k = flash_tpu.vmem_bytes_per_program(tiling(131072), 128, 2)
  assert at_8k == at_128k
  assert max(at_8k.values()) < 16 * 2**20  # Mosaic's default scoped VMEM limit


def test_backend_and_check_available_follow_the_target():
  """On a CPU host, a TPU mesh set by `jax.set_mesh` selects Mosaic and refuses cuDNN."""
  from lmjax.models import attention  # pylint: disable=g-import-not-at-top
  assert flash_common.target_backend() == 'interpret'
  with pytest.raises(ValueError, match='cudnn needs a GPU target; the target is cpu'):
    attention.check_available('cudnn')
  with jax.set_mesh(_mesh('v5e:2x2')):
    assert flash_common.target_backend() == 'tpu'
    attention.check_available('pallas')
    with pytest.raises(ValueError, match='cudnn needs a GPU target; the target is tpu'):
      attention.check_available('cudnn')


@pytest.mark.parametrize('layout', ['fsdp_x_tensor', 'pipeline_x_fsdp'])
def test_tiny_train_step_with_pallas_compiles_for_tpu(layout):
  """A whole `tiny` train step with model.attention=pallas compiles for a v5e:2x2 slice: the
  kernels run under shard_map inside the sharded step and inside pipeline stages."""
  from lmjax.config import load_config  # pylint: disable=g-import-not-at-top
  from lmjax.parallel import topology  # pylint: disable=g-import-not-at-top
  from lmjax.train import aot  # pylint: disable=g-import-not-at-top
  config = load_config('tiny')
  config.model.attention = 'pallas'
  config.mesh.data = 1
  if layout == 'fsdp_x_tensor':
    config.sharding, config.mesh.fsdp, config.mesh.tensor = 'fsdp_tp', 2, 2
  else:
    config.sharding, config.mesh.fsdp, config.mesh.pipeline = 'fsdp', 2, 2
    config.model.scan_layers, config.pipeline_microbatches = True, 2
  report = aot.compile_run(config, topology.devices(topology.parse('v5e:2x2')))
  assert report.needed is None and [p.name for p in report.programs] == ['train_step']
  hlo = report.executables['train_step'].as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 3  # fwd, dq, dk/dv per layer body
