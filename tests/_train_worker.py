"""Runs clip_jax.train.train in a subprocess on a fixed synthetic stream.

  python tests/_train_worker.py WORKDIR TOTAL_STEPS PROCESS_ID NUM_PROCESSES
      PORT LOCAL_DEVICES [overrides: key=python literal ...]

Every process feeds its own contiguous slice of the same global batches, so
a run over several processes must match a single-process run exactly.
Used by test_multiprocess.py and test_checkpoint.py (each run is a new
process, so resuming really starts from disk).
"""

import ast
import os
import sys


def synthetic_stream(config, process_id, num_processes):
  import numpy as np  # pylint: disable=g-import-not-at-top

  class Stream:
    """Batch k is a function of k alone; its state is the step count."""

    def __init__(self):
      self.index = 0

    def get_state(self) -> bytes:
      return str(self.index).encode()

    def set_state(self, state: bytes) -> None:
      self.index = int(state.decode())

    def __next__(self):
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


def main():
  workdir, total, pid, nproc, port, local_devices = sys.argv[1:7]
  os.environ["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={local_devices}")
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
      for key, value in (item.split("=", 1) for item in sys.argv[7:])})
  stream = synthetic_stream(config, int(pid), int(nproc))
  train.train(config, workdir, data=(stream, None))


if __name__ == "__main__":
  main()
