"""clip_jax.sweep: point names, generated commands, skip/resume, a real sweep.

The commands are checked against independent parsers: bash itself (the
printed TPU/SLURM lines are run by a shell whose `gcloud`, `srun` and
`python` print their arguments) and ml_collections' config_flags (the
values the trainer would see).
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from absl import flags
from ml_collections import config_flags
from subprocess_env import subprocess_env

from clip_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = os.path.join(ROOT, "configs", "clip.py")

# Overrides whose quoting can go wrong: commas, spaces, quotes, tuples,
# nested tuples, bools, a '$' the shell must not expand.
TRICKY = {
    "wd_exclude": "cls|pos, 'x' \"y\" $HOME",
    "data.random_resized_crop": (0.5, 1.0),
    "sharding_rules": (("a b,c", "fsdp"), (".*", "replicate")),
    "model.text.causal": False,
    "lr": 0.00025,
    "batch_size": 64,
}


def write_sweep_config(path, *, points, total_steps=4):
  path.write_text(textwrap.dedent(f"""
      from clip_jax import config as config_lib

      def get_config(arg=None):
        c = config_lib.load_config_file({CLIP!r}, "tiny,batch=16")
        c.total_steps = {total_steps}
        c.checkpoint_every_steps = 50
        c.log_every_steps = 2
        return c

      def get_sweep(arg=None):
        return {points!r}
      """))
  return str(path)


def parse_as_trainer(argv):
  """The config the trainer's flags would build from `argv` (after -m
  clip_jax.train), parsed by config_flags in a fresh flag registry."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=False,
                                  sys_argv=["prog"] + argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  flags.DEFINE_bool("distributed", False, "", flag_values=values)
  values(["prog"] + argv)
  return values


def shell_argv(line, *, functions):
  """Runs `line` in bash with `functions` (names) printing their argv."""
  prelude = "".join(
      f"{name}() {{ printf '%s\\0' {name} \"$@\"; }}; " for name in functions)
  out = subprocess.run(["bash", "-c", prelude + "cd() { :; }; " + line],
                       check=True, capture_output=True, text=True).stdout
  return out.split("\0")[:-1]


def test_point_names_are_stable_safe_and_distinct():
  a = sweep.point_name({"loss": "sigmoid", "batch_size": 64})
  assert a == "batch_size=64__loss=sigmoid"
  assert sweep.point_name({"batch_size": 64, "loss": "sigmoid"}) == a
  tricky = sweep.point_name(TRICKY)
  assert tricky == sweep.point_name(dict(reversed(list(TRICKY.items()))))
  assert all(c.isalnum() or c in "._=+-" for c in tricky), tricky
  assert len(tricky) <= sweep.MAX_NAME + 9
  # Values that sanitise to the same text still get different names.
  assert (sweep.point_name({"wd_exclude": "a b"})
          != sweep.point_name({"wd_exclude": "a,b"}))


def test_local_command_gives_the_trainer_the_override_values(tmp_path):
  config = write_sweep_config(tmp_path / "s.py", points=[TRICKY])
  argv = sweep.train_argv(config, "runs/x", TRICKY)
  back = shell_argv(shlex.join(argv), functions=["python"])
  assert back == argv
  parsed = parse_as_trainer(argv[3:])
  assert parsed.workdir == os.path.join("runs/x", sweep.point_name(TRICKY))
  c = parsed.config
  assert c.wd_exclude == TRICKY["wd_exclude"]
  assert tuple(c.data.random_resized_crop) == (0.5, 1.0)
  assert tuple(map(tuple, c.sharding_rules)) == TRICKY["sharding_rules"]
  assert c.model.text.causal is False
  assert (c.lr, c.batch_size) == (0.00025, 64)


def test_config_file_arguments_go_after_the_colon(tmp_path):
  argv = sweep.train_argv("configs/clip.py:tiny", "w",
                          {"arg.loss": "sigmoid", "arg.batch": 32, "lr": 1.0})
  assert argv[argv.index("--config") + 1] == (
      "configs/clip.py:tiny=true,loss=sigmoid,batch=32")
  with pytest.raises(sweep.SweepError, match="commas"):
    sweep.train_argv("c.py", "w", {"arg.model": "a,b"})


def test_tpu_command_round_trips_through_the_shell(tmp_path):
  config = write_sweep_config(tmp_path / "s.py", points=[TRICKY])
  argv = sweep.train_argv(config, "gs://b/x", TRICKY, python="python3",
                          distributed=True)
  line = sweep.tpu_command(argv, tpu_name="pod", zone="us-central2-b",
                           remote_dir="~/my clone")
  gcloud = shell_argv(line, functions=["gcloud"])
  assert gcloud[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod",
                        "--zone=us-central2-b", "--worker=all",
                        gcloud[8]]
  remote = gcloud[8]
  assert remote.startswith("--command=cd ~/'my clone' && ")
  # The remote shell runs the rest: exactly the trainer's argv.
  back = shell_argv(remote.split("&& ", 1)[1], functions=["python3"])
  assert back == argv and back[-1] == "--distributed"
  assert parse_as_trainer(back[3:]).config.wd_exclude == TRICKY["wd_exclude"]


def test_slurm_script_runs_one_point_per_array_task(tmp_path):
  points = [TRICKY, {"lr": 1e-3}]
  config = write_sweep_config(tmp_path / "s.py", points=points)
  argvs = [sweep.train_argv(config, "runs/x", p, distributed=True)
           for p in points]
  script = sweep.slurm_script(argvs, job_name="x", hosts=4, workdir="runs/x",
                              remote_dir="/shared/clip_jax")
  assert "#SBATCH --array=0-1" in script and "#SBATCH --nodes=4" in script
  path = tmp_path / "job.sh"
  path.write_text(script)
  subprocess.run(["bash", "-n", str(path)], check=True)
  for task, argv in enumerate(argvs):
    out = subprocess.run(
        ["bash", "-c", "srun() { printf '%s\\0' \"$@\"; }; cd() { :; }; "
         f"export SLURM_ARRAY_TASK_ID={task}; source {path}"],
        check=True, capture_output=True, text=True).stdout
    assert out.split("\0")[:-1] == argv


def test_print_commands_main(tmp_path, capsys):
  config = write_sweep_config(tmp_path / "s.py",
                              points=[{"lr": 1e-3}, {"lr": 2e-3}])
  assert sweep.main(["--config", config, "--workdir", "w",
                     "--print_commands", "--launcher=tpu",
                     "--tpu_name=p", "--zone=z"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and all("--worker=all" in ln for ln in lines)
  with pytest.raises(sweep.SweepError, match="--tpu_name"):
    sweep.main(["--config", config, "--workdir", "w", "--print_commands",
                "--launcher=tpu"])


def test_bad_overrides_fail_before_anything_runs(tmp_path):
  config = write_sweep_config(tmp_path / "s.py", points=[{"lrr": 1.0}])
  with pytest.raises(sweep.SweepError, match="'lrr'.*Did you mean 'lr'"):
    sweep.check_overrides(config, sweep.load_sweep(config))
  # logit_bias_init is a typed None (a placeholder) in the softmax recipe,
  # so a sweep can set it like any key.
  sweep.check_overrides(config, [{"model.logit_bias_init": -10.0}])
  with pytest.raises(sweep.SweepError, match="same name"):
    sweep.check_overrides(config, [{"lr": 1.0}, {"lr": 1.0}])


def test_grid_and_zip():
  assert sweep.product(a=[1, 2], b=["x"]) == [{"a": 1, "b": "x"},
                                              {"a": 2, "b": "x"}]
  assert sweep.zipped(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3},
                                              {"a": 2, "b": 4}]
  with pytest.raises(sweep.SweepError, match="one length"):
    sweep.zipped(a=[1], b=[1, 2])


def test_split_cores():
  assert sweep.split_cores([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
  assert sweep.split_cores([5, 7], 2) == [[5], [7]]
  with pytest.raises(sweep.SweepError, match="--parallel 3"):
    sweep.split_cores([0, 1], 3)


FAKE_TRAINER = """#!{python}
# Stands in for `python -m clip_jax.train`: logs its call and CPUs to
# WORKDIR/calls.jsonl and exits with the status listed in codes.json.
import json, os, sys
workdir = sys.argv[sys.argv.index("--workdir") + 1]
with open(os.path.join(workdir, "calls.jsonl"), "a") as f:
  f.write(json.dumps(dict(argv=sys.argv[1:],
                          cpus=sorted(os.sched_getaffinity(0)),
                          omp=os.environ.get("OMP_NUM_THREADS"))) + "\\n")
codes = json.load(open(os.path.join(os.path.dirname(workdir), "codes.json")))
sys.exit(codes.get(os.path.basename(workdir), 0))
"""


def fake_sweep(tmp_path, points, codes, parallel=1):
  fake = tmp_path / "fake_python"
  fake.write_text(FAKE_TRAINER.format(python=sys.executable))
  fake.chmod(0o755)
  workdir = tmp_path / "runs"
  workdir.mkdir(exist_ok=True)
  (workdir / "codes.json").write_text(json.dumps(codes))
  config = write_sweep_config(tmp_path / "s.py", points=points)
  return sweep.Sweep(config, str(workdir), points, parallel=parallel,
                     python=str(fake), stream=open(os.devnull, "w"))


def calls(tmp_path, overrides):
  path = tmp_path / "runs" / sweep.point_name(overrides) / "calls.jsonl"
  return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_rerun_skips_complete_points_and_reruns_the_rest(tmp_path):
  a, b, c = {"lr": 1e-3}, {"lr": 2e-3}, {"lr": 3e-3}
  names = {sweep.point_name(p): p for p in (a, b, c)}
  first = fake_sweep(tmp_path, [a, b, c], {sweep.point_name(b): 75})
  assert first.run() == sweep.EXIT_RESUMABLE
  assert [first.is_done(p) for p in (a, b, c)] == [True, False, True]
  # The same command again: only b runs, with the same argv (the trainer
  # resumes it from its checkpoint); now it completes.
  second = fake_sweep(tmp_path, [a, b, c], {})
  assert second.run() == 0
  assert [len(calls(tmp_path, p)) for p in (a, b, c)] == [1, 2, 1]
  assert calls(tmp_path, b)[0]["argv"] == calls(tmp_path, b)[1]["argv"]
  assert all(second.is_done(p) for p in names.values())


def test_failed_point_sets_the_exit_status(tmp_path):
  a, b = {"lr": 1e-3}, {"lr": 2e-3}
  assert fake_sweep(tmp_path, [a, b],
                    {sweep.point_name(a): 2}).run() == sweep.USAGE_ERROR
  assert fake_sweep(tmp_path, [a, b], {sweep.point_name(a): 1}).run() == 1


def test_a_point_killed_by_the_sweeps_own_stop_signal_is_stopped(tmp_path):
  """-SIGTERM (the signal came before the trainer's handler) counts as
  stopped early when the sweep passed the signal on, as a failure if not."""
  a, b = {"lr": 1e-3}, {"lr": 2e-3}
  s = fake_sweep(tmp_path, [a, b], {})
  codes = {sweep.point_name(a): -signal.SIGTERM}
  assert s.summarise(codes, left=1) == 1  # Nobody asked it to stop.
  s.stop_signal = "SIGTERM"
  assert s.summarise(codes, left=1) == sweep.EXIT_RESUMABLE
  assert s.summarise({sweep.point_name(a): -signal.SIGKILL}, left=1) == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_parallel_points_are_pinned_to_disjoint_cpus(tmp_path):
  points = [{"lr": 1e-3}, {"lr": 2e-3}, {"lr": 3e-3}, {"lr": 4e-3}]
  groups = sweep.split_cores(sorted(os.sched_getaffinity(0)), 2)
  assert fake_sweep(tmp_path, points, {}, parallel=2).run() == 0
  seen = [calls(tmp_path, p)[0] for p in points]
  assert all(s["cpus"] in groups for s in seen)
  assert {tuple(s["cpus"]) for s in seen} == {tuple(g) for g in groups}
  assert all(s["omp"] == str(len(s["cpus"])) for s in seen)


def _run_sweep(config, workdir, *extra):
  env = subprocess_env()
  return subprocess.Popen(
      [sys.executable, "-m", "clip_jax.sweep", "--config", config,
       "--workdir", workdir, *extra], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_steps(point_dir):
  path = os.path.join(point_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(ln)["step"] for ln in f if ln.strip()]


@pytest.mark.slow
def test_real_sweep_completes_and_a_half_finished_one_resumes(tmp_path):
  """Two tiny points: the first completes; the sweep is stopped (SIGTERM)
  while the second trains; the same command skips the first and resumes
  the second from its checkpoint to the end."""
  short, long = {"total_steps": 4}, {"total_steps": 200, "lr": 1e-3}
  config = write_sweep_config(tmp_path / "s.py", points=[short, long])
  workdir = str(tmp_path / "runs")
  long_dir = os.path.join(workdir, sweep.point_name(long))
  proc = _run_sweep(config, workdir)
  # A liveness bound, not a speed check: two trainer start-ups and 4 steps
  # took over 300 s once, on a CPU shared with two training runs.
  deadline = time.time() + 900
  while not [s for s in _logged_steps(long_dir) if s >= 4]:
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == sweep.EXIT_RESUMABLE, out
  short_dir = os.path.join(workdir, sweep.point_name(short))
  assert os.path.exists(os.path.join(short_dir, sweep.DONE_FILE))
  assert not os.path.exists(os.path.join(long_dir, sweep.DONE_FILE))
  assert _logged_steps(short_dir)[-1] == 4
  stopped_at = _logged_steps(long_dir)[-1]
  assert 4 <= stopped_at < 200
  short_log = open(os.path.join(short_dir, sweep.LOG_FILE)).read()

  proc = _run_sweep(config, workdir)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out
  assert "1 already complete, 1 to run" in out
  assert open(os.path.join(short_dir, sweep.LOG_FILE)).read() == short_log
  long_log = open(os.path.join(long_dir, sweep.LOG_FILE)).read()
  assert "Resuming from checkpoint" in long_log
  steps = _logged_steps(long_dir)
  assert steps[-1] == 200 and len(steps) == len(set(steps))


def test_the_python_trampoline_pins_like_taskset(tmp_path, monkeypatch):
  """Without taskset, the point still runs on its cores only."""
  cores = sorted(os.sched_getaffinity(0))[:1]
  argv = [sys.executable, "-c",
          "import os; print(sorted(os.sched_getaffinity(0)))"]
  for which in (None, "real"):
    if which is None:
      monkeypatch.setattr(sweep.shutil, "which", lambda name: None)
    out = subprocess.run(sweep.pinned_argv(argv, cores), check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == str(cores)
    monkeypatch.undo()
