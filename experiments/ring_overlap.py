"""Ring (sigmoid_chunked) before / after overlapping ppermute with compute.

  git show fa5e7d2:clip_jax/losses.py > /tmp/losses_before.py
  python experiments/ring_overlap.py /tmp/losses_before.py [N] [D] [reps]

Times forward + backward of sigmoid_chunked from both modules on 8 fake CPU
devices, alternating calls so machine noise hits both alike; prints the
median seconds of each and their ratio.
"""

import functools
import importlib.util
import statistics
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from clip_jax import losses  # noqa: E402
from clip_jax import sharding as sharding_lib  # noqa: E402


def main():
  path = sys.argv[1]
  n, d, reps = (int(x) for x in (sys.argv[2:] + ["4096", "512", "7"])[:3])
  spec = importlib.util.spec_from_file_location("losses_before", path)
  before = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(before)
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=8,
                                                               fsdp=1)))
  sharding = sharding_lib.batch_sharding(mesh)
  a, b = jax.random.normal(jax.random.key(0), (2, n, d))
  a, b = (jax.device_put(x / jnp.linalg.norm(x, axis=1, keepdims=True),
                         sharding) for x in (a, b))
  fns = {}
  for name, module in (("before", before), ("after", losses)):
    fn = jax.jit(jax.value_and_grad(functools.partial(
        module.sigmoid_chunked_loss, mesh=mesh), argnums=(0, 1, 2, 3)))
    jax.block_until_ready(fn(a, b, 10.0, -10.0))
    fns[name] = fn
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(a, b, 10.0, -10.0))
      times[name].append(time.perf_counter() - start)
  medians = {k: statistics.median(v) for k, v in times.items()}
  print(f"N={n} D={d} 8 devices, {reps} alternating reps: before "
        f"{medians['before']:.3f} s, after {medians['after']:.3f} s, "
        f"after/before {medians['after'] / medians['before']:.3f}")


if __name__ == "__main__":
  main()
