"""Runs clip_jax.train.train in a subprocess on a fixed synthetic stream.

  python tests/_train_worker.py WORKDIR TOTAL_STEPS PROCESS_ID NUM_PROCESSES
      PORT LOCAL_DEVICES [--allow_config_change] [--step_sleep=SECONDS]
      [--slow_commit_step=STEP] [--max_file_bytes=N]
      [overrides: key=python literal ...]

Every process feeds its own contiguous slice of the same global batches, so
a run over several processes must match a single-process run exactly. The
stream reports process p as having skipped p + 1 bad examples per batch
(`num_skipped`, restored with its state), so `data/skipped` at step s of a
run over k processes must be s * k * (k + 1) / 2.
--step_sleep slows each batch down (so a signal lands mid-run);
--slow_commit_step makes orbax wait 600 s before committing that
checkpoint (the temporary directory stays half-written until then);
--max_file_bytes makes writing a larger file fail as on a full disk
(RLIMIT_FSIZE: EFBIG).
Exits with the run's exit status. Used by test_multiprocess.py (each run
is a new process: resuming starts from disk).
"""

import ast
import os
import sys
import time


def synthetic_stream(config, process_id, num_processes, step_sleep=0.0):
  import numpy as np  # pylint: disable=g-import-not-at-top

  class Stream:
    """Batch k is a function of k alone; its state is the step count."""

    def __init__(self):
      self.index = 0

    @property
    def num_skipped(self) -> int:
      return self.index * (process_id + 1)

    def get_state(self) -> bytes:
      return str(self.index).encode()

    def set_state(self, state: bytes) -> None:
      self.index = int(state.decode())

    def __next__(self):
      time.sleep(step_sleep)
      rng = np.random.default_rng(self.index)
      self.index += 1
      n, size = config.batch_size, config.model.image.image_size
      length = config.model.text.context_length
      images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
      text = rng.integers(3, config.model.text.vocab_size,
                          size=(n, length)).astype(np.int32)
      rows = slice(process_id * n // num_processes,
                   (process_id + 1) * n // num_processes)
      return {"image": images[rows], "text": text[rows]}

  return Stream()


def slow_down_commit(step: int) -> None:
  """Makes orbax sleep before committing checkpoint `step` (its rename from
  the temporary directory), so a test can kill the process mid-write."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  cls = atomicity.AtomicRenameTemporaryPath
  finalize = cls.finalize

  async def slow_finalize(self):
    if os.path.basename(str(self._final_path)) == str(step):  # pylint: disable=protected-access
      print(f"worker: delaying the commit of checkpoint {step}", flush=True)
      time.sleep(600)
    await finalize(self)

  cls.finalize = slow_finalize


def main():
  workdir, total, pid, nproc, port, local_devices = sys.argv[1:7]
  options = [a for a in sys.argv[7:] if a.startswith("--")]
  overrides = [a for a in sys.argv[7:] if not a.startswith("--")]
  options = dict((a[2:].split("=", 1) + ["1"])[:2] for a in options)
  os.environ["XLA_FLAGS"] = (  # After the test's flags (subprocess_env).
      os.environ.get("XLA_FLAGS", "") +
      f" --xla_force_host_platform_device_count={local_devices}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  if int(nproc) > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=int(nproc), process_id=int(pid))
  from clip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file("configs/clip.py", "tiny,batch=32")
  config.total_steps = int(total)
  config.log_every_steps = 1
  config.schedule = "constant"
  # Overrides like mesh.fsdp=4 or "sharding_rules=[('.*', 'fsdp')]".
  config.update_from_flattened_dict({
      key: ast.literal_eval(value)
      for key, value in (item.split("=", 1) for item in overrides)})
  if "max_file_bytes" in options:
    import resource  # pylint: disable=g-import-not-at-top
    import signal  # pylint: disable=g-import-not-at-top
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill.
    limit = int(options["max_file_bytes"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  if "slow_commit_step" in options:
    slow_down_commit(int(options["slow_commit_step"]))
  stream = synthetic_stream(config, int(pid), int(nproc),
                            float(options.get("step_sleep", 0)))
  result = train.train(config, workdir, data=(stream, None),
                       allow_config_change="allow_config_change" in options)
  sys.exit(result.exit_code)


if __name__ == "__main__":
  main()
