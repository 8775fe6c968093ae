"""Benchmarks (not tests): print figures and write JSON.

  python -m clip_jax.bench [--config configs/demo.py] [--out runs/bench.json]

  train_step   examples/s the jitted train step consumes on a fixed batch
               (median over timed windows, after compilation);
  pipeline     examples/s the input pipeline produces for the same config,
               with the config's worker_count (median over windows);
  ratio        pipeline / train_step: above 1 the step is the bottleneck;
  train_loop   examples/s of the step fed by the pipeline, as training runs
               them: on a small machine both share the same cores, so this
               is below either figure alone, and 1 - train_loop / train_step
               is the share of the loop's time the input costs.
The machine is shared and noisy, so all are medians of several windows
measured in the same run, and the ratios are the figures to compare.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging

from clip_jax import config as config_lib
from clip_jax import losses, optim, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers

_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "Config[:args].")
_OUT = flags.DEFINE_string("out", "runs/bench.json", "JSON output path.")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows per figure.")
_STEPS = flags.DEFINE_integer("steps_per_window", 3, "Steps per window.")


def _median_rate(fn, examples_per_call: int, windows: int, calls: int):
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(calls):
      fn()
    rates.append(examples_per_call * calls / (time.perf_counter() - start))
  return statistics.median(rates), rates


def _make_step(config):
  """(jitted train step, initial state, mesh) of the config's model."""
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_run_model(config)
  tx, schedule = optim.make_optimizer(
      config, train_state.param_shapes(model, config), total_steps=10**6,
      warmup_steps=0)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  step = train_state.make_train_step(
      model, tx, losses.get_loss(config.loss), schedule, mesh, shardings,
      max_log_logit_scale=two_towers.max_log_logit_scale(config.model))
  return step, state, mesh


def _timed_steps(step, state, next_batch):
  """A no-argument function running one step on next_batch(), synced."""
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], next_batch())
    jax.block_until_ready(metrics)

  return one_step


def bench_train_step(config, windows: int, calls: int):
  step, state, mesh = _make_step(config)
  rng = np.random.default_rng(0)
  size, length = config.model.image.image_size, config.model.text.context_length
  batch = sharding_lib.host_to_global({
      "image": rng.normal(size=(config.batch_size, size, size, 3)).astype(
          np.float32),
      "text": rng.integers(3, config.model.text.vocab_size,
                           (config.batch_size, length)).astype(np.int32)},
                                      mesh)
  one_step = _timed_steps(step, state, lambda: batch)
  one_step()  # Compile.
  return _median_rate(one_step, config.batch_size, windows, calls)


def bench_train_loop(config, windows: int, calls: int):
  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  step, state, mesh = _make_step(config)
  iterator, _ = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=0)

  def next_batch():
    local = next(iterator)
    return sharding_lib.host_to_global(
        {k: local[k] for k in ("image", "text")}, mesh)

  one_step = _timed_steps(step, state, next_batch)
  with iterator:
    one_step()  # Compile, start the pipeline.
    return _median_rate(one_step, config.batch_size, windows, calls)


def bench_pipeline(config, windows: int, calls: int):
  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  iterator, _ = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=0)
  with iterator:  # Stops its prefetch thread before the next figure.
    next(iterator)  # Start workers, fill buffers.
    return _median_rate(lambda: next(iterator), config.batch_size, windows,
                        calls)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  path, _, arg = _CONFIG.value.partition(":")
  config = config_lib.load_config_file(path, arg or None)
  step_rate, step_all = bench_train_step(config, _WINDOWS.value, _STEPS.value)
  data_rate, data_all = bench_pipeline(config, _WINDOWS.value, _STEPS.value)
  loop_rate, loop_all = bench_train_loop(config, _WINDOWS.value, _STEPS.value)
  result = {
      "config": _CONFIG.value, "devices": jax.device_count(),
      "batch_size": config.batch_size,
      "train_step_examples_per_sec": step_rate,
      "train_step_windows": step_all,
      "pipeline_examples_per_sec": data_rate,
      "pipeline_windows": data_all,
      "pipeline_over_step": data_rate / step_rate,
      "train_loop_examples_per_sec": loop_rate,
      "train_loop_windows": loop_all,
      "input_share_of_loop_time": 1 - loop_rate / step_rate,
      "worker_count": config.data.worker_count,
  }
  print(f"train step: {step_rate:8.1f} examples/s (median of "
        f"{_WINDOWS.value} windows)")
  print(f"pipeline:   {data_rate:8.1f} examples/s "
        f"(worker_count={config.data.worker_count})")
  print(f"pipeline / step = {data_rate / step_rate:.2f} (target >= 2)")
  print(f"train loop: {loop_rate:8.1f} examples/s (step fed by the "
        f"pipeline on the same cores: the input costs "
        f"{100 * (1 - loop_rate / step_rate):.0f}% of the loop's time)")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
