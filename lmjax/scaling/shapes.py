"""Model-shape families: rules mapping a depth (and a width near the family's aspect ratio) to a
full model shape, and the ladder of shapes an IsoFLOP design picks its sizes from.

The rule of a family: d_model = multiple * round(aspect * layers / multiple), heads = d_model /
head_dim, mlp_dim = 8/3 d_model rounded to `multiple`. A ladder also admits widths within a factor
`aspect_tolerance` of the rule's, so that the sizes between two depths are covered finely enough
for a design to space its sizes geometrically.
"""

from __future__ import annotations

import dataclasses
import math

from lmjax.scaling import flops as flops_lib


@dataclasses.dataclass(frozen=True)
class ShapeFamily:
  name: str
  aspect: float  # d_model / num_layers
  head_dim: int
  multiple: int  # d_model and mlp_dim are multiples of this
  max_layers: int
  mlp_ratio: float = 8 / 3
  aspect_tolerance: float = 1.5  # widths within this factor of the rule's are in the ladder


FAMILIES = {
    'llama': ShapeFamily('llama', aspect=64, head_dim=64, multiple=64, max_layers=64),
    # CPU-sized models: narrow heads and a fine width grid so that small sizes are dense.
    'tiny': ShapeFamily('tiny', aspect=32, head_dim=16, multiple=16, max_layers=8,
                        aspect_tolerance=2.0),
}


@dataclasses.dataclass(frozen=True)
class Shape:
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int

  def overrides(self) -> list[str]:
    return [f'model.num_layers={self.num_layers}', f'model.d_model={self.d_model}',
            f'model.num_heads={self.num_heads}', f'model.num_kv_heads={self.num_heads}',
            'model.head_dim=0', f'model.mlp_dim={self.mlp_dim}']

  @property
  def label(self) -> str:
    return f'l{self.num_layers}_d{self.d_model}'


def get_family(name: str) -> ShapeFamily:
  if name not in FAMILIES:
    raise ValueError(f'unknown shape family {name!r}; known: {", ".join(FAMILIES)}')
  return FAMILIES[name]


def _round_to(value: float, multiple: int) -> int:
  return max(multiple, multiple * round(value / multiple))


def shape_with_width(family: ShapeFamily, num_layers: int, d_model: int) -> Shape:
  return Shape(num_layers=num_layers, d_model=d_model, num_heads=max(1, d_model // family.head_dim),
               mlp_dim=_round_to(family.mlp_ratio * d_model, family.multiple))


def shape_for_layers(family: ShapeFamily, num_layers: int) -> Shape:
  """The family's rule: width from depth."""
  return shape_with_width(family, num_layers, _round_to(family.aspect * num_layers,
                                                        family.multiple))


def ladder(family: ShapeFamily) -> list[Shape]:
  """Every shape of the family: each depth with the widths near its aspect ratio."""
  shapes = []
  for layers in range(1, family.max_layers + 1):
    ideal = family.aspect * layers
    low = max(family.multiple, math.ceil(ideal / family.aspect_tolerance / family.multiple)
              * family.multiple)
    high = max(low, int(ideal * family.aspect_tolerance // family.multiple) * family.multiple)
    widths = set(range(low, high + 1, family.multiple))
    widths.add(shape_for_layers(family, layers).d_model)
    shapes.extend(shape_with_width(family, layers, d) for d in sorted(widths)
                  if d % family.head_dim == 0)
  return shapes


def model_config_with_shape(base_model_config, shape: Shape):
  """A copy of the `model` config group with the shape's fields set."""
  model = base_model_config.copy_and_resolve_references()
  model.num_layers, model.d_model = shape.num_layers, shape.d_model
  model.num_heads = model.num_kv_heads = shape.num_heads
  model.head_dim, model.mlp_dim = 0, shape.mlp_dim
  return model


def shape_size(base_model_config, shape: Shape, seq_len: int) -> dict[str, float]:
  """Parameter counts and training FLOPs per token of a shape on top of a base model config."""
  model = model_config_with_shape(base_model_config, shape)
  counts = flops_lib.param_counts(model)
  return {'params': counts['total'], 'non_embedding_params': counts['non_embedding'],
          'flops_per_token': flops_lib.flops_per_token(model, seq_len)['total']}


def closeness_to_rule(family: ShapeFamily, shape: Shape) -> float:
  """|log| of the ratio between a shape's width and the rule's width for its depth (0 = on rule)."""
  return abs(math.log(shape.d_model / (family.aspect * shape.num_layers)))
