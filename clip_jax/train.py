r"""Trains a two-tower contrastive model.

  python -m clip_jax.train --config configs/clip.py:model=B/16,loss=sigmoid \
      --workdir runs/x [--config.lr=1e-3 ...]

A workdir that already has checkpoints resumes from the latest one. On
SIGTERM (pre-emption) the run writes a checkpoint of the current step and
exits. Multi-process runs (TPU pods, GPU clusters, or several local CPU
processes) call jax.distributed.initialize: automatically on clusters it
detects, or from --coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import signal
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import config as config_lib
from clip_jax import losses, optim, train_state
from clip_jax import metrics as metrics_lib
from clip_jax import sharding as sharding_lib
from clip_jax.evals import run as eval_run
from clip_jax.models import two_towers

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg'.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() (auto-detects TPU pods / SLURM).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "")


def init_distributed() -> None:
  if _COORDINATOR.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


class _Preemption:
  """Remembers a SIGTERM so the loop can checkpoint and stop cleanly."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. called from a test).
      pass

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def make_train_data(config):
  """The per-process training iterator and the dataset size (or None)."""
  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from clip_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if config.data.context_length != config.model.text.context_length:
    raise ValueError(
        f"config.data.context_length={config.data.context_length} differs "
        f"from config.model.text.context_length="
        f"{config.model.text.context_length}; set both to the same value.")
  tokenizer = pipeline.get_tokenizer(config.data)
  if tokenizer is not None:
    tokenizer_lib.check_vocab(tokenizer, config.model.text.vocab_size)
  return pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      tokenizer=tokenizer)


def train(config, workdir: str, *, data=None):
  """Runs (or resumes) training; returns the last logged metrics.

  `data` overrides the config's input with (iterator, dataset_size): an
  iterator of per-process numpy batches {'image', 'text'} (used by tests).
  """
  config_lib.validate(config, device_count=jax.device_count(),
                      process_count=jax.process_count())
  is_main = jax.process_index() == 0
  if is_main:
    config_lib.save(config, workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_model(config.model)
  loss_fn = losses.get_loss(config.loss)

  data_iter, dataset_size = (data if data is not None else
                             make_train_data(config))
  total_steps = config_lib.steps("total", config, batch_size=config.batch_size,
                                 dataset_size=dataset_size)
  warmup_steps = config_lib.steps("warmup", config,
                                  batch_size=config.batch_size,
                                  dataset_size=dataset_size, default=0)
  param_shapes = train_state.param_shapes(model, config)
  tx, schedule = optim.make_optimizer(config, param_shapes,
                                      total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  shapes, shardings, init = train_state.abstract_state(model, tx, config, mesh)
  eval_run.validate(config, dataset_size=dataset_size)  # Before compiling.

  ckpt = checkpoint_lib.Checkpointer(
      workdir, every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints)
  # Only a grain iterator has a checkpointable state.
  checkpointed_iter = data_iter if hasattr(data_iter, "get_state") else None
  writer = metrics_lib.MetricWriter(workdir, total_steps=total_steps,
                                    enabled=is_main)
  latest = ckpt.latest_step()
  if latest is not None:
    writer.log(f"Resuming from {ckpt.directory}/{latest}")
    state = ckpt.restore(
        latest, checkpoint_lib.abstract_with_shardings(shapes, shardings),
        checkpointed_iter)
  else:
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
  n_params = sum(int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(param_shapes))
  writer.log(f"{n_params:,} parameters; mesh {dict(mesh.shape)} over "
             f"{jax.device_count()} devices, {jax.process_count()} processes; "
             f"{total_steps} steps of {config.batch_size} examples.")

  step_fn = train_state.make_train_step(
      model, tx, loss_fn, schedule, mesh, shardings,
      max_log_logit_scale=two_towers.max_log_logit_scale(config.model),
      accum_steps=config.accum_steps, accum_mode=config.accum_mode)
  preemption = _Preemption()
  has_bias = config.model.get("logit_bias_init") is not None
  step = int(jax.device_get(state["step"]))
  last_metrics, skipped = {}, 0

  def run_evals(step):
    names = eval_run.due(config, step, total_steps,
                         dataset_size=dataset_size)
    if not names:
      return {}
    start = time.perf_counter()
    results = eval_run.run_all(config, model, state["params"], mesh, names)
    results["eval/seconds"] = time.perf_counter() - start
    writer.write(step, results)
    return results

  if step == 0:
    last_metrics.update(run_evals(0))
  window_start, window_steps = None, 0
  while step < total_steps:
    local_batch = next(data_iter)
    skipped += int(np.sum(local_batch.pop("num_skipped", 0)))
    batch = sharding_lib.host_to_global(
        {k: local_batch[k] for k in ("image", "text")}, mesh)
    state, metrics = step_fn(state, batch)
    step += 1
    window_steps += 1
    if window_start is None:
      # The first step includes compilation: time from its end onwards.
      jax.block_until_ready(metrics)
      window_start, window_steps = time.perf_counter(), 0
    if step % config.log_every_steps == 0 or step == total_steps:
      metrics = jax.device_get(metrics)  # The loop's only host sync.
      if not has_bias:
        metrics.pop("logit_bias")
      elapsed = time.perf_counter() - window_start
      if window_steps:
        metrics["examples_per_sec"] = (
            window_steps * config.batch_size / elapsed)
      metrics["data/skipped"] = skipped
      writer.write(step, metrics)
      last_metrics.update(metrics)
      window_start, window_steps = time.perf_counter(), 0
    evals = run_evals(step)
    if evals:
      last_metrics.update(evals)
      window_start, window_steps = time.perf_counter(), 0  # Not training.
    if ckpt.should_save(step) or step == total_steps or preemption.requested:
      ckpt.save(step, state, checkpointed_iter)
    if preemption.requested:
      writer.log(f"SIGTERM: saved checkpoint {step}, stopping.")
      break
  ckpt.close()
  writer.close()
  return last_metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  # orbax logs every save step at INFO; keep stdout for the run's metrics.
  logging.set_verbosity(logging.WARNING)
  init_distributed()
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
