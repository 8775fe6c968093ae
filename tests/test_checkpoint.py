"""Save, resume in a new process: the following steps match an unbroken run.

(Pre-emption and crashes mid-save: test_preemption.py and test_train_cli.py.)
"""

import json
import os

import numpy as np
from test_multiprocess import read_losses, run_workers


def test_resume_in_new_process_matches_uninterrupted_run(tmp_path):
  run_workers(tmp_path / "straight", 6, 1, 8)
  # Stop after step 3 (the run's end writes a checkpoint), then a new process
  # on the same workdir extends the run (a config change: total_steps) and
  # continues to step 6. The schedule is constant: the lr does not jump.
  run_workers(tmp_path / "resumed", 3, 1, 8)
  assert os.path.isdir(tmp_path / "resumed" / "checkpoints" / "3")
  (output,) = run_workers(tmp_path / "resumed", 6, 1, 8,
                          "--allow_config_change")
  assert "Resuming from checkpoint 3" in output
  assert "total_steps: 3 -> 6" in output
  with open(tmp_path / "resumed" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
  straight, resumed = (read_losses(tmp_path / "straight"),
                       read_losses(tmp_path / "resumed"))
  assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
  # Bit-exact: same devices, same program, same data position.
  np.testing.assert_array_equal([resumed[s] for s in (4, 5, 6)],
                                [straight[s] for s in (4, 5, 6)])
