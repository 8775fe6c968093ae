"""A thin wrapper over orbax's CheckpointManager.

A checkpoint of step S lives in `workdir/checkpoints/S/` with two items:
  state  the train state pytree (step, params, optimiser state), sharded;
  data   the input iterator's state (grain, one file per process), optional.
Saves are asynchronous: training continues while the arrays are written.
orbax writes each checkpoint to a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoints intact, and
`keep` old checkpoints are removed only after a newer one is committed.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state, data_iterator=None) -> None:
    """Starts writing checkpoint `step` (returns before it is on disk).

    `data_iterator`: anything with get_state() -> bytes (a grain
    DataLoaderIterator) whose position is saved with the state.
    """
    if step in self.manager.all_steps():
      return
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      snapshot = _IteratorState(data_iterator.get_state())
      items["data"] = _grain_args()[0](snapshot)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs carrying their target sharding (for restore)."""
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
