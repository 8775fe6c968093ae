"""Host -> device time of a batch as uint8 vs float32 (8 fake devices).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \\
      .venv/bin/python experiments/uint8_transfer.py

512 images of 224 x 224 through sharding.host_to_global; the median ratio
of 7 runs. On accelerators the bytes over PCIe / the host link shrink 4x
(config.data.uint8_images; the model normalises on the device).
"""

import time

import jax
import ml_collections
import numpy as np

from clip_jax import sharding as sharding_lib
from clip_jax.data import transforms


def main():
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1,
                                                               fsdp=1)))
  pixels = np.random.default_rng(0).integers(0, 256, (512, 224, 224, 3),
                                             dtype=np.uint8)
  floats = transforms.normalize(pixels)

  def seconds(x):
    start = time.perf_counter()
    jax.block_until_ready(sharding_lib.host_to_global(x, mesh))
    return time.perf_counter() - start

  ratios = [seconds(pixels) / seconds(floats) for _ in range(7)]
  print(f"bytes float32 / uint8: {floats.nbytes / pixels.nbytes:.1f}; "
        f"host_to_global time uint8 / float32, median of 7: "
        f"{np.median(ratios):.2f}")


if __name__ == "__main__":
  main()
