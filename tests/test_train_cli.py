"""`python -m clip_jax.train` as a user runs it, with real signals.

The emoji data through the real grain pipeline (and its DataIterator state
through the real Checkpointer): stopped with SIGTERM near step 10, or with
Ctrl-C (SIGINT to the whole process group, grain's workers included), the
run exits with status 75 after a checkpoint, and the same command resumes
to per-step losses equal, bit for bit, to an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from subprocess_env import subprocess_env

from clip_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_RESUMABLE = 75
TOTAL = 40  # Room for a signal at step 10 to land mid-run, even if fast.


def emoji_args(cache_dir, workdir, *extra):
  return [sys.executable, "-m", "clip_jax.train",
          "--config", "configs/clip.py:tiny,batch=32", "--workdir",
          str(workdir), f"--config.total_steps={TOTAL}",
          "--config.data.source=emoji", "--config.data.emoji_limit=64",
          f"--config.data.cache_dir={cache_dir}",
          "--config.data.tokenizer=emoji", "--config.data.vocab_size=64",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
          *extra]


def start(args, log):
  env = subprocess_env()
  with open(log, "a") as out:
    # A session of its own: its process group is what a terminal's Ctrl-C
    # reaches (the run and grain's worker processes).
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc, log, timeout=600):
  code = proc.wait(timeout=timeout)
  with open(log) as f:
    return code, f.read()


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records], [r["loss"] for r in records]


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory):
  if not os.path.exists(sources.NOTO_FONT):
    pytest.skip("needs fonts-noto-color-emoji (make install)")
  return tmp_path_factory.mktemp("emoji_cache")


@pytest.fixture(scope="module")
def straight(emoji_cache, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight") / "run"
  code, out = finish(start(emoji_args(emoji_cache, workdir),
                           f"{workdir}.log"), f"{workdir}.log")
  assert code == 0, out[-3000:]
  return losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("worker_count,how", [
    (0, "sigterm"), (2, "sigterm"), (2, "ctrl-c")])
def test_stopped_and_resumed_equals_uninterrupted(emoji_cache, straight,
                                                  tmp_path, worker_count,
                                                  how):
  workdir, log = tmp_path / "run", str(tmp_path / "run.log")
  args = emoji_args(emoji_cache, workdir,
                    f"--config.data.worker_count={worker_count}")
  proc = start(args, log)
  deadline = time.time() + 600
  while f"[step 10/{TOTAL}" not in open(log).read():
    assert proc.poll() is None and time.time() < deadline, (
        open(log).read()[-3000:])
    time.sleep(0.01)
  if how == "sigterm":
    proc.send_signal(signal.SIGTERM)
  else:
    os.killpg(proc.pid, signal.SIGINT)
  code, out = finish(proc, log)
  assert code == EXIT_RESUMABLE, out[-3000:]
  stopped = int(out.split("Stopped early (")[1].split(" at step ")[1]
                .split()[0])
  assert 10 <= stopped < TOTAL
  names = sorted(os.listdir(workdir / "checkpoints"))
  assert names == [str(stopped)], names
  assert "To resume, run python -m clip_jax.train" in out

  # The same command again (worker_count may change: it does not change
  # the batches) resumes the data stream where it stopped.
  other = 0 if worker_count else 2
  code, out = finish(start(emoji_args(
      emoji_cache, workdir, f"--config.data.worker_count={other}"), log), log)
  assert code == 0, out[-3000:]
  steps, resumed = losses(workdir)
  assert steps == list(range(1, TOTAL + 1))
  np.testing.assert_array_equal(resumed, straight[1])
