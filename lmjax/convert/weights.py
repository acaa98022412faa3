"""Reading Hugging Face checkpoints one tensor at a time, and writing `.safetensors` streamed.

Readers return host numpy arrays (bfloat16 as `ml_dtypes.bfloat16`), one tensor per call, so a
conversion never holds the whole source checkpoint in memory. Supported inputs:
  model.safetensors, model.safetensors.index.json (sharded)   always
  pytorch_model.bin, pytorch_model.bin.index.json (pickle)     only with allow_pickle=True, loaded
                                                               with torch.load(weights_only=True)
"""

from __future__ import annotations

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np

from lmjax.convert.hf_config import ConversionError

_SAFETENSORS_DTYPES = {
    np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
    np.dtype(ml_dtypes.bfloat16): 'BF16', np.dtype(np.float64): 'F64',
    np.dtype(np.int32): 'I32', np.dtype(np.int64): 'I64',
}


def _weight_map(hf_dir: str, index_name: str, single_name: str) -> dict[str, str] | None:
  """tensor name -> file, from an index (sharded) or a single file; None if neither exists."""
  index_path = os.path.join(hf_dir, index_name)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ConversionError(f'{index_path}: no weight_map in the index')
    return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
  single = os.path.join(hf_dir, single_name)
  return {'': single} if os.path.isfile(single) else None


class SafetensorsReader:
  """Tensors of a (possibly sharded) safetensors checkpoint, opened lazily with `safe_open`."""

  def __init__(self, weight_map: dict[str, str]):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._open = safe_open
    self._handles = {}
    if set(weight_map) == {''}:  # a single file: list its keys
      path = weight_map['']
      weight_map = {name: path for name in self._handle(path).keys()}
    self._weight_map = weight_map

  def _handle(self, path):
    if path not in self._handles:
      if not os.path.isfile(path):
        raise ConversionError(f'{path}: listed in the index but missing')
      # framework='flax' (not numpy) because numpy cannot represent bfloat16 safetensors; the
      # array lives on the host CPU device, so np.asarray below does not copy across devices.
      self._handles[path] = self._open(path, framework='flax', device='cpu')
    return self._handles[path]

  def names(self) -> list[str]:
    return list(self._weight_map)

  def get(self, name: str) -> np.ndarray:
    with jax.default_device(jax.devices('cpu')[0]):
      return np.asarray(self._handle(self._weight_map[name]).get_tensor(name))

  def close(self):
    self._handles.clear()


class TorchPickleReader:
  """Tensors of `pytorch_model.bin` shards; one shard is loaded (memory-mapped) at a time."""

  def __init__(self, weight_map: dict[str, str]):
    import torch  # pylint: disable=g-import-not-at-top
    self._torch = torch
    self._current_path, self._current = None, None
    if set(weight_map) == {''}:
      path = weight_map['']
      weight_map = {name: path for name in self._load(path)}
    self._weight_map = weight_map

  def _load(self, path):
    if path != self._current_path:
      self._current = None
      self._current = self._torch.load(path, map_location='cpu', weights_only=True, mmap=True)
      self._current_path = path
    return self._current

  def names(self) -> list[str]:
    return list(self._weight_map)

  def get(self, name: str) -> np.ndarray:
    tensor = self._load(self._weight_map[name])[name]
    if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return tensor.contiguous().view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()

  def close(self):
    self._current_path, self._current = None, None


def open_checkpoint(hf_dir: str, allow_pickle: bool = False):
  """A reader for the weights in `hf_dir`, preferring safetensors."""
  weight_map = _weight_map(hf_dir, 'model.safetensors.index.json', 'model.safetensors')
  if weight_map is not None:
    return SafetensorsReader(weight_map)
  weight_map = _weight_map(hf_dir, 'pytorch_model.bin.index.json', 'pytorch_model.bin')
  if weight_map is not None:
    if not allow_pickle:
      raise ConversionError(f'{hf_dir}: only pickle (.bin) weights found; pickle files can run '
                            'code when loaded, so they are refused unless --allow_pickle is '
                            'given (or convert them to safetensors first)')
    return TorchPickleReader(weight_map)
  raise ConversionError(f'{hf_dir}: no model.safetensors, model.safetensors.index.json or '
                        'pytorch_model.bin found')


def write_safetensors(path: str, tensors: list[tuple[str, tuple, np.dtype]], produce,
                      metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file tensor by tensor.

  `tensors` lists (name, shape, dtype) in file order; `produce(name)` returns that tensor as a
  numpy array when its turn comes, so only one tensor is materialised on the host at a time.
  """
  header, offset = {}, 0
  for name, shape, dtype in tensors:
    dtype = np.dtype(dtype)
    if dtype not in _SAFETENSORS_DTYPES:
      raise ConversionError(f'{name}: dtype {dtype} cannot be written to safetensors')
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {'dtype': _SAFETENSORS_DTYPES[dtype], 'shape': [int(s) for s in shape],
                    'data_offsets': [offset, offset + size]}
    offset += size
  header['__metadata__'] = dict(metadata or {'format': 'pt'})
  header_bytes = json.dumps(header, separators=(',', ':')).encode()
  header_bytes += b' ' * (-len(header_bytes) % 8)  # the data section starts 8-byte aligned
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(header_bytes)))
    f.write(header_bytes)
    for name, shape, dtype in tensors:
      array = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype))
      if array.shape != tuple(shape):
        raise ConversionError(f'{name}: produced shape {array.shape}, expected {tuple(shape)}')
      f.write(array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes())
  os.replace(tmp, path)
