"""torchvision's AlexNet (the one-GPU variant of its `features`/`classifier` layout)."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from jtransfer.models.common import (ConvUnit, adaptive_avg_pool, compute_dtype, head, max_pool,
                                     tap, to_compute)


class AlexNet(nn.Module):
  """AlexNet: five conv units, adaptive 6x6 average pool, fc6, fc7, head.

  Attributes:
    num_classes: units of `head`.
    conv_widths: channels of conv1..conv5 (torchvision: 64, 192, 384, 256, 256).
    dense_widths: units of fc6, fc7 (torchvision: 4096, 4096).
    dropout: rate before fc6 and fc7, as torchvision.
  """
  num_classes: int = 1000
  conv_widths: tuple[int, ...] = (64, 192, 384, 256, 256)
  dense_widths: tuple[int, ...] = (4096, 4096)
  dropout: float = 0.5
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    w, d = self.conv_widths, self.dtype
    x = to_compute(self, x)
    x = max_pool(ConvUnit(w[0], 11, 4, 2, dtype=d, name="conv1")(x, train), 3, 2)
    x = max_pool(ConvUnit(w[1], 5, 1, 2, dtype=d, name="conv2")(x, train), 3, 2)
    x = ConvUnit(w[2], 3, 1, 1, dtype=d, name="conv3")(x, train)
    x = ConvUnit(w[3], 3, 1, 1, dtype=d, name="conv4")(x, train)
    x = max_pool(ConvUnit(w[4], 3, 1, 1, dtype=d, name="conv5")(x, train), 3, 2)
    tap(self, "last_conv", x)
    x = adaptive_avg_pool(x, (6, 6)).reshape(x.shape[0], -1)
    for i, width in enumerate(self.dense_widths):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(nn.Dense(width, dtype=compute_dtype(d), name=f"fc{6 + i}")(x))
      tap(self, f"fc{6 + i}_act", x)
    tap(self, "features", x)
    return head(self, x)


def alexnet(num_classes: int = 1000, **overrides) -> AlexNet:
  """torchvision AlexNet (61,100,840 params with 1000 classes)."""
  return AlexNet(num_classes=num_classes, **overrides)
