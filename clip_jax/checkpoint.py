"""A thin wrapper over orbax's CheckpointManager.

A checkpoint of step S lives in `workdir/checkpoints/S/` with two items:
  state  the train state pytree (step, params, optimiser state), sharded;
  data   the input iterator's state (grain, one file per process), optional.
Saves are asynchronous: training continues while the arrays are written.
orbax writes each checkpoint to a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoints intact, and
`keep` old checkpoints are removed only after a newer one is committed.
Half-written (temporary) step directories are never listed as steps, and
are deleted when the next run opens the directory.

An asynchronous write that fails (disk full, permissions) is reported by
orbax only in its log; `save` and `close` check for such failures and
raise CheckpointError naming the directory, so a run never trains on for
hours without checkpoints.
"""

from __future__ import annotations

import os
import uuid

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (the message names the path)."""


def probe_writable(directory: str) -> None:
  """Creates `directory` and writes, then deletes, a small file in it.

  Raises CheckpointError naming the path when that fails, so an unwritable
  workdir stops the run before any training.
  """
  probe = os.path.join(directory, f".write-probe-{uuid.uuid4().hex}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f"Cannot write to {directory} ({e.strerror or e}); the run needs a "
        "writable --workdir with free space.") from e


def _grain_args():
  import grain  # Only when an iterator is checkpointed.
  return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class _IteratorState:
  """Holds an iterator's state (bytes) for grain's per-process handler.

  The state is read when `save` is called, not when the asynchronous write
  happens, so it matches the saved train state even though the loop has
  moved on. One file per process: every host restores its own position.
  """

  def __init__(self, state: bytes | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    pass


class Checkpointer:
  """Periodic, keep-N, asynchronous checkpoints of (state, data iterator)."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    """The newest committed checkpoint (never a half-written one)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the step a pre-emption notice (on any
    process) is agreed to stop at; call it at every step (see
    clip_jax/preemption.py). Always False without jax.distributed."""
    return self.manager.reached_preemption(step)

  def _check_errors(self) -> None:
    """Raises CheckpointError if an earlier asynchronous write failed."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001  orbax re-raises the writer's.
      raise _write_error(self.directory, e) from e

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state, data_iterator=None) -> None:
    """Starts writing checkpoint `step` (returns before it is on disk).

    `data_iterator`: anything with get_state() -> bytes (a grain
    DataLoaderIterator) whose position is saved with the state.
    """
    self._check_errors()
    if step in self.manager.all_steps():
      return
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      snapshot = _IteratorState(data_iterator.get_state())
      items["data"] = _grain_args()[0](snapshot)
    try:
      # Also waits for the previous write, and raises if that failed.
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001  Any writer error, named.
      raise _write_error(self.directory, e) from e

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores `step` directly into the shardings of `abstract_state`.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with `.sharding` set;
    `data_iterator`, if given, is moved to the saved position (set_state).
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = _grain_args()[1](_IteratorState())
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      data_iterator.set_state(restored["data"].get_state())
    return restored["state"]

  def state_mismatches(self, step: int, state_shapes) -> list[str]:
    """How checkpoint `step`'s train state differs from `state_shapes` (a
    tree of arrays / ShapeDtypeStructs: params and optimiser state), from
    the checkpoint's metadata alone, parameters first: ['params/path:
    checkpoint (a, b), config (c, d)', 'opt/path: only in the checkpoint',
    ...]; empty if they fit."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    tree = ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.directory) / str(step) / "state").tree
    stored = _shapes_by_path(tree)
    wanted = _shapes_by_path(state_shapes)
    problems = []
    for path in sorted(set(stored) | set(wanted),
                       key=lambda p: (not p.startswith("params/"), p)):
      if path not in wanted:
        problems.append(f"{path}: only in the checkpoint")
      elif path not in stored:
        problems.append(f"{path}: not in the checkpoint")
      elif stored[path] != wanted[path]:
        problems.append(f"{path}: checkpoint {stored[path]}, config "
                        f"{wanted[path]}")
    return problems

  def wait(self) -> None:
    """Blocks until every started write is committed (or raises)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise _write_error(self.directory, e) from e
    self._check_errors()

  def close(self, *, raise_errors: bool = True) -> None:
    """Waits for the last write, then stops orbax's background threads.

    raise_errors=False (while another error propagates): a failed write is
    only logged, so it does not hide that error.
    """
    try:
      self.wait()
    except CheckpointError:
      if raise_errors:
        raise
      logging.exception("While stopping after an error:")
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001  Already reported by wait().
        if raise_errors:
          raise


def _write_error(directory: str, error: Exception) -> CheckpointError:
  first_line = (str(error).splitlines() or [type(error).__name__])[0]
  return CheckpointError(
      f"Writing a checkpoint to {directory} failed ({first_line[:300]}). "
      "Is the disk full or the directory not writable? The checkpoints "
      "already committed there are intact.")


def _shapes_by_path(tree) -> dict:
  def name(key):
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs carrying their target sharding (for restore)."""
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
