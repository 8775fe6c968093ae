r"""Trains a two-tower contrastive model.

  python -m clip_jax.train --config configs/clip.py:model=B/16,loss=sigmoid \
      --workdir runs/x [--config.lr=1e-3 ...] [--allow_config_change]

Multi-process runs (TPU pods, GPU clusters, or several local CPU processes)
call jax.distributed.initialize: automatically on clusters it detects
(--distributed), or from --coordinator_address/--num_processes/--process_id.

Resuming. A workdir that already has checkpoints resumes from the latest
committed one (a half-written checkpoint is never used). The stored and the
new config are compared first and their differences printed; keys in
config.RESUMABLE_KEYS (evals, logging and checkpoint cadence, data reading
speed) may change freely, any other change needs --allow_config_change, and
a change of parameter shapes always fails, naming the keys. Nothing is
written before these checks pass. Each run segment's config is kept in
workdir/configs/. The learning-rate schedule is a function of the step and
the total length: extending a run (total_* larger) recomputes it for the new
length from the resumed step on (the resume message shows the lr jump).

Stopping early. SIGTERM (pre-emption) or Ctrl-C makes every process stop at
one agreed step (clip_jax/preemption.py), write a checkpoint of it and exit
with status EXIT_RESUMABLE (75, sysexits' EX_TEMPFAIL): run the same command
again to resume. A second Ctrl-C aborts without a checkpoint. Exit statuses:
  0   the run is complete (also when re-run on a complete workdir);
  75  stopped early with a checkpoint: re-run the same command to resume;
  2   a user error (bad config or flag, missing file, a resume with a
      changed config): one line naming the key and the fix (clip_jax/cli.py;
      --verbose for the traceback); re-running will not help until fixed;
  1   any other error (unwritable workdir, too many consecutive non-finite
      steps, a bug), with its traceback.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from clip_jax import checkpoint as checkpoint_lib
from clip_jax import (
  cli,
  distill,
  lora,
  losses,
  optim,
  pretrained,
  slip,
  train_state,
)
from clip_jax import config as config_lib
from clip_jax import metrics as metrics_lib
from clip_jax import plot as plot_lib
from clip_jax import preemption as preemption_lib
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
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a workdir with a config that differs from the stored one in "
    "keys other than config.RESUMABLE_KEYS (parameter shapes must match).")

_EVAL_ZEROSHOT_FOLDER = flags.DEFINE_multi_string(
    "eval_zeroshot_folder", [],
    "PATH[:TEMPLATES]: add a zero-shot eval on the image folder "
    "PATH/<class>/*.png to config.evals (run at the start and the end), "
    "named zeroshot_<folder name>. Repeatable.")
EXIT_RESUMABLE = 75  # sysexits.h EX_TEMPFAIL: stopped early, re-run resumes.


def init_distributed() -> None:
  if _COORDINATOR.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
  """What `train` did: the last logged metrics and where it stopped."""
  metrics: dict
  step: int
  total_steps: int
  stopped_by: str | None = None  # The signal, if stopped early.

  @property
  def exit_code(self) -> int:
    return EXIT_RESUMABLE if self.step < self.total_steps else 0


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
      tokenizer=tokenizer, ssl_views=slip.view_options(config))


def check_resume(config, stored, *, workdir: str, step: int,
                 mismatches: list, allow_change: bool, schedules) -> str:
  """The message describing a resume, or a ValueError if it may not go on.

  `stored`: the config saved by the run (None if there is none);
  `mismatches`: checkpoint_lib.Checkpointer.state_mismatches;
  `schedules`: (old lr schedule, new lr schedule) or None, to show what a
  changed total length does to the learning rate at `step`.
  """
  diff = {} if stored is None else config_lib.config_diff(stored, config)
  shown = config_lib.format_diff(diff)
  if mismatches:
    what = ("its parameters have other shapes"
            if mismatches[0].startswith("params/") else
            "its optimiser state has another structure (config.freeze, "
            "the optimiser or its options changed)")
    raise ValueError(
        f"Cannot resume {workdir} (checkpoint {step}) with this config: "
        f"{what} ({'; '.join(mismatches[:3])}"
        f"{'; ...' if len(mismatches) > 3 else ''}). The config keys that "
        f"differ from the stored config.json:\n{shown or '  (none)'}\n"
        "Nothing was changed. Use the stored config (drop these overrides) "
        "or a new --workdir.")
  locked = {k: v for k, v in diff.items()
            if not config_lib.resumable_key(k)
            and not config_lib.new_key_at_default(k, *v)}
  if locked and not allow_change:
    raise ValueError(
        f"Resuming {workdir} (checkpoint {step}) with a changed config:\n"
        f"{config_lib.format_diff(locked)}\nThese keys change the training "
        "itself. Pass --allow_config_change to resume with them anyway, or "
        "drop the overrides. Nothing was changed.")
  message = f"Resuming from checkpoint {step} in {workdir}."
  if diff:
    message += f" Config changes since the last segment:\n{shown}"
  if schedules is not None:
    old_lr, new_lr = (float(s(step)) for s in schedules)
    if old_lr != new_lr:
      message += (f"\nThe lr schedule is recomputed for the new length: lr "
                  f"at step {step} goes from {old_lr:.3g} to {new_lr:.3g}.")
  return message


def _schedules(stored, config, *, total_steps, warmup_steps, dataset_size):
  """(stored run's lr schedule, this one's) if the length changed."""
  if stored is None:
    return None
  kw = dict(batch_size=config.batch_size, dataset_size=dataset_size)
  try:
    old_total = config_lib.steps("total", stored, **kw)
    old_warmup = config_lib.steps("warmup", stored, default=0, **kw)
    old = optim.make_schedule(stored, total_steps=old_total,
                              warmup_steps=old_warmup)
  except (ValueError, KeyError, AttributeError):
    return None
  new = optim.make_schedule(config, total_steps=total_steps,
                            warmup_steps=warmup_steps)
  return old, new


def _summed_over_processes(value: int) -> int:
  """A per-process counter's sum over processes (a collective)."""
  if jax.process_count() == 1:
    return int(value)
  gathered = multihost_utils.process_allgather(np.asarray(value, np.int64))
  return int(np.sum(gathered))


def _last_checkpoint_before(ckpt, step: int):
  steps = [s for s in ckpt.all_steps() if s <= step]
  return steps[-1] if steps else None


def train(config, workdir: str, *, data=None,
          allow_config_change: bool = False,
          resume_command: str | None = None) -> TrainResult:
  """Runs (or resumes) training to config's total length, or until a
  pre-emption notice / Ctrl-C (then the result's exit_code is
  EXIT_RESUMABLE). See the module docstring for the resume rules.

  `data` overrides the config's input with (iterator, dataset_size): an
  iterator of per-process numpy batches {'image', 'text'} (used by tests).
  `resume_command`: shown in the message after an early stop.
  """
  config_lib.validate(config, device_count=jax.device_count(),
                      process_count=jax.process_count())
  is_main = jax.process_index() == 0
  # Fails here, before any training, if the workdir cannot be written.
  checkpoint_lib.probe_writable(workdir)
  # The data first: a bad tokenizer or source fails before orbax starts
  # threads (whose shutdown could print beside the one-line error).
  data_iter, dataset_size = (data if data is not None else
                             make_train_data(config))
  try:
    ckpt = checkpoint_lib.Checkpointer(
        workdir, every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints)
  except BaseException:
    close = getattr(data_iter, "close", None)
    if close is not None:
      close()
    raise
  try:
    result = _train(config, workdir, ckpt, data_iter, dataset_size,
                    is_main=is_main, allow_config_change=allow_config_change,
                    resume_command=resume_command)
  except BaseException:
    _shut_down(data_iter, ckpt, raise_errors=False)  # Keep the first error.
    raise
  _shut_down(data_iter, ckpt, raise_errors=True)
  return result


def step_inputs(local_batch, config) -> dict:
  """The fields of a pipeline batch the train step reads: image, text,
  SLIP's views when the pipeline made them (slip.VIEWS_KEY) and, for a
  keyed loss (losses.KEYED_LOSSES), train_state.LOSS_KEY = the field
  config.loss_key names ('label' or 'caption_hash')."""
  inputs = {k: local_batch[k] for k in ("image", "text", slip.VIEWS_KEY)
            if k in local_batch}
  if config.loss in losses.KEYED_LOSSES:
    if config.loss_key not in local_batch:
      raise ValueError(
          f"config.loss={config.loss!r} takes its keys from the batch field "
          f"config.loss_key={config.loss_key!r}, which this data iterator "
          f"does not yield (it has {sorted(local_batch)}); use a clip_jax "
          "data pipeline or another config.loss_key.")
    inputs[train_state.LOSS_KEY] = np.asarray(
        local_batch[config.loss_key], np.int32)
  return inputs


def keyless_warning(inputs, config) -> str | None:
  """A warning when a keyed loss's batch has no key at all (every key -1:
  e.g. config.loss_key='label' on image-text data without labels), where
  the loss is plain softmax; None otherwise. The loop checks its first
  batch."""
  keys = inputs.get(train_state.LOSS_KEY)
  if keys is None or np.any(np.asarray(keys) >= 0):
    return None
  return (f"warning: config.loss={config.loss!r} keys its positives by the "
          f"batch field config.loss_key={config.loss_key!r}, which is -1 for "
          f"every example of this process's first batch (the data has no "
          "such field), so the loss is plain softmax. For image-text data "
          "use config.loss_key='caption_hash'.")


def _shut_down(data_iter, ckpt, *, raise_errors: bool) -> None:
  """Stops, in this order, the input pipeline's threads and worker
  processes, then orbax's last write and its threads: nothing may still
  run when the interpreter shuts down (a thread killed inside native code
  aborts the process)."""
  try:
    close = getattr(data_iter, "close", None)
    if close is not None:
      close()
  finally:
    ckpt.close(raise_errors=raise_errors)


def _train(config, workdir, ckpt, data_iter, dataset_size, *, is_main,
           allow_config_change, resume_command) -> TrainResult:
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_run_model(config)
  loss_fn = losses.loss_from_config(config)
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

  # Every check of a resume comes before anything is written.
  latest = ckpt.latest_step()
  stored = None
  if latest is not None:
    try:
      stored = config_lib.load(workdir)
    except FileNotFoundError:
      pass
  config = distill.pin_teacher_step(config, stored)
  if latest is not None:
    message = check_resume(
        config, stored, workdir=workdir, step=latest,
        mismatches=ckpt.state_mismatches(latest, shapes),
        allow_change=allow_config_change,
        schedules=_schedules(stored, config, total_steps=total_steps,
                             warmup_steps=warmup_steps,
                             dataset_size=dataset_size))
    if latest >= total_steps:  # Nothing to do: write nothing either.
      if is_main:
        print(message, flush=True)
        print(f"The run in {workdir} is already complete (checkpoint "
              f"{latest} of {total_steps} steps); nothing to do. To train "
              "longer, raise config.total_* with --allow_config_change.",
              flush=True)
      return TrainResult({}, latest, total_steps)
  if is_main:
    config_lib.save(config, workdir, start_step=latest or 0)
  writer = metrics_lib.MetricWriter(
      workdir, total_steps=total_steps, enabled=is_main,
      resume_step=-1 if latest is None else latest)
  try:
    if latest is not None:
      writer.log(message)
    return _loop(config, workdir, ckpt, writer, data_iter, dataset_size,
                 model=model, loss_fn=loss_fn, tx=tx, schedule=schedule,
                 mesh=mesh, shapes=shapes, shardings=shardings, init=init,
                 param_shapes=param_shapes, latest=latest,
                 total_steps=total_steps, resume_command=resume_command)
  finally:
    writer.close()


def _loop(config, workdir, ckpt, writer, data_iter, dataset_size, *, model,
          loss_fn, tx, schedule, mesh, shapes, shardings, init, param_shapes,
          latest, total_steps, resume_command) -> TrainResult:
  # Only a grain iterator has a checkpointable state.
  checkpointed_iter = data_iter if hasattr(data_iter, "get_state") else None
  if latest is not None:
    state = ckpt.restore(
        latest, checkpoint_lib.abstract_with_shardings(shapes, shardings),
        checkpointed_iter)
  else:
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
    if config.get("init") and config.init.get("workdir") is not None:
      # A new run only: config.init's params replace their fresh init.
      state = {**state, "params": pretrained.init_params(
          state["params"], config.init, shardings["params"])}
      source = pretrained.source_step(config.init.workdir, config.init.step)
      writer.log(f"Initialised the params matching {config.init.include!r} "
                 f"from {config.init.workdir} (checkpoint {source}).")
  n_params = sum(int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(param_shapes))
  writer.log(f"{n_params:,} parameters; mesh {dict(mesh.shape)} over "
             f"{jax.device_count()} devices, {jax.process_count()} processes; "
             f"{total_steps} steps of {config.batch_size} examples.")
  frozen = (optim.frozen_mask(param_shapes, optim.freeze_of(config))
            if optim.freeze_of(config) else None)
  if frozen is not None:
    trained, _ = lora.tree_size([x for x, f in zip(
        jax.tree_util.tree_leaves(param_shapes),
        jax.tree_util.tree_leaves(frozen)) if not f])
    opt_values, opt_bytes = lora.tree_size(shapes["opt"])
    writer.log(f"{trained:,} of them trained (config.freeze / config.lora); "
               f"optimiser state {opt_values:,} values, {opt_bytes:,} bytes.")

  # Extra loss terms, each with its step input (and that input's shardings).
  extras = []
  if distill.enabled(config):
    # Restored at every start, resumes included: not in the checkpoint.
    teacher = distill.load_teacher(config, mesh)
    extras.append((distill.make_extra_loss(config, teacher.model, mesh),
                   teacher.params, teacher.shardings))
    writer.log(f"Distilling from the teacher {teacher.workdir} (checkpoint "
               f"{teacher.step}, embed_dim "
               f"{teacher.config.model.embed_dim}).")
  if slip.enabled(config):
    extras.append((slip.make_extra_loss(model, config, mesh), None, None))
  extra_loss = train_state.combine_extra_losses([e for e, _, _ in extras])
  if len(extras) == 1:
    extra_inputs, extra_shardings = (extras[0][1],), extras[0][2]
  else:  # None or several: one tuple entry per extra loss.
    extra_inputs = (tuple(i for _, i, _ in extras),) if extras else ()
    extra_shardings = tuple(s for _, _, s in extras)
  step_fn = train_state.make_train_step(
      model, tx, loss_fn, schedule, mesh, shardings,
      max_log_logit_scale=two_towers.max_log_logit_scale(config.model),
      accum_steps=config.accum_steps, accum_mode=config.accum_mode,
      frozen=frozen,
      extra_loss=extra_loss,
      extra_input_shardings=extra_shardings if extra_loss else None)
  has_bias = config.model.get("logit_bias_init") is not None
  max_nonfinite = config.get("max_consecutive_nonfinite") or 0
  step = int(jax.device_get(state["step"]))
  last_metrics = {}
  # This process's bad examples: the data iterator's own count (restored
  # with its state, so a run total) or, for other iterators, a count of
  # this segment's batches.
  counted_skips = 0

  def local_skipped():
    return getattr(data_iter, "num_skipped", counted_skips)

  def refresh_curves():
    if writer.enabled:  # Process 0; never raises (see plot.write_curves).
      plot_lib.write_curves(workdir)

  def run_evals(step):
    names = eval_run.due(config, step, total_steps,
                         dataset_size=dataset_size)
    if not names:
      return {}
    start = time.perf_counter()
    results = eval_run.run_all(config, model, state["params"], mesh, names)
    results["eval/seconds"] = time.perf_counter() - start
    writer.write(step, results)
    refresh_curves()
    return results

  if step == 0:
    last_metrics.update(run_evals(0))
  stop = preemption_lib.StopRequest(ckpt.reached_preemption)
  window_start, window_steps = None, 0
  first_step = step  # 0, or the step resumed from.
  with stop:
    while step < total_steps:
      local_batch = next(data_iter)
      counted_skips += int(np.sum(local_batch.pop("num_skipped", 0)))
      inputs = step_inputs(local_batch, config)
      warning = keyless_warning(inputs, config) if step == first_step else None
      if warning:
        print(warning, flush=True)
      batch = sharding_lib.host_to_global(inputs, mesh)
      state, metrics = step_fn(state, batch, *extra_inputs)
      step += 1
      window_steps += 1
      if window_start is None:
        # The first step includes compilation: time from its end onwards.
        jax.block_until_ready(metrics)
        window_start, window_steps = time.perf_counter(), 0
      # Every process asks at every step; all get the same answer.
      stopping = stop.should_stop(step) and step < total_steps
      if (step % config.log_every_steps == 0 or step == total_steps
          or stopping):
        metrics = jax.device_get(metrics)  # The loop's only host sync.
        if not has_bias:
          metrics.pop("logit_bias", None)
        elapsed = time.perf_counter() - window_start
        if window_steps:
          metrics["examples_per_sec"] = (
              window_steps * config.batch_size / elapsed)
        metrics["data/skipped"] = _summed_over_processes(local_skipped())
        writer.write(step, metrics)
        last_metrics.update(metrics)
        window_start, window_steps = time.perf_counter(), 0
        bad_run = int(metrics.get("train/nonfinite_consecutive", 0))
        if max_nonfinite and bad_run >= max_nonfinite:
          ckpt.wait()
          good = _last_checkpoint_before(ckpt, step - bad_run)
          raise NonFiniteError(
              f"{bad_run} consecutive steps up to step {step} had a "
              "non-finite loss or gradient (config.max_consecutive_nonfinite"
              f"={max_nonfinite}; "
              f"{int(metrics.get('train/nonfinite_steps', bad_run))} in the "
              "whole run); their updates were skipped. The last checkpoint "
              "before them: "
              + (f"step {good} in {ckpt.directory}." if good is not None
                 else "none.")
              + " Lower config.lr or check the data before resuming.")
      if not stopping:
        evals = run_evals(step)
        if evals:
          last_metrics.update(evals)
          window_start, window_steps = time.perf_counter(), 0  # Not training.
      if ckpt.should_save(step) or step == total_steps or stopping:
        ckpt.save(step, state, checkpointed_iter)
      if stopping:
        ckpt.wait()
        command = resume_command or "the same command"
        writer.log(
            f"Stopped early ({stop.signal_name or 'pre-emption notice'}) at "
            f"step {step} of {total_steps}; checkpoint {step} is saved in "
            f"{ckpt.directory}. To resume, run {command} again (same "
            f"--workdir). Exit status {EXIT_RESUMABLE}.",
            all_processes=True)
        refresh_curves()
        return TrainResult(last_metrics, step, total_steps,
                           stop.signal_name or "pre-emption")
  refresh_curves()
  return TrainResult(last_metrics, step, total_steps)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  # orbax logs every save step at INFO; keep stdout for the run's metrics.
  logging.set_verbosity(logging.WARNING)
  init_distributed()
  config = _CONFIG.value
  for spec in _EVAL_ZEROSHOT_FOLDER.value:
    name, eval_config = cli.zeroshot_folder_eval(spec)
    config.evals[name] = eval_config
  command = shlex.join(["python", "-m", "clip_jax.train", *sys.argv[1:]])
  result = train(config, _WORKDIR.value,
                 allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                 resume_command=command)
  return result.exit_code  # app.run exits with it.


if __name__ == "__main__":
  cli.run(main)
