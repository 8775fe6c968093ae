r"""Sweeps: a config file's `get_sweep(arg)` expanded into training runs.

  python -m clip_jax.sweep --config configs/x.py[:arg] --workdir runs/x \
      [--parallel N] [--dry_run]
  python -m clip_jax.sweep --config ... --workdir ... --print_commands \
      [--launcher=local|tpu|slurm] [--tpu_name NAME --zone Z] [--hosts H]
  python -m clip_jax.sweep report runs/x [--x KEY] [--metric NAME]

A config file that defines `get_sweep(arg)` (arg: the same string its
`get_config(arg)` gets) returns a list of override dicts, one per point:
  {"loss": "sigmoid", "batch_size": 256, "seed": 1, "arg.model": "tiny"}
Dotted keys ('model.logit_bias_init') override config keys, exactly as
`--config.<key>=<value>` flags of clip_jax.train (each key must exist in the
config, with a value that is not None: command-line overrides cannot set or
unset None). Keys 'arg.<name>' are arguments of the config file itself,
merged into `path:arg` (no commas in their values). `product` and `zipped`
below build grids and zips; a list comprehension does the rest.

Each point runs `python -m clip_jax.train` in WORKDIR/<point name>, the name
made of its overrides (sorted, filesystem-safe, with a hash when that had
to drop characters: stable across runs and machines). The sweep writes
WORKDIR/sweep.json (every point: name, overrides, command) and, per point,
point.json (its overrides) and, when the trainer exits 0, DONE. Re-running
the same sweep skips points with DONE and re-runs the others with the same
command: the trainer resumes each from its latest checkpoint.

--parallel N runs N points at a time, each pinned (taskset -c) to its share
of this process's CPUs, with OMP/TF thread counts set to that share; XLA's
CPU thread pool sizes itself from the CPUs it may run on (checked: 1 vs 2
'XLAEigen' threads pinned to 1 vs 2 CPUs).

Exit status: 0 every point complete; 75 stopped early (SIGTERM / Ctrl-C to
the sweep is passed on to the running points, which checkpoint and exit 75;
no new point starts; a second Ctrl-C aborts): re-run the same command to
resume; 2 a user error
(bad sweep definition, or a point's config failed validation); 1 a point
failed otherwise (its log: WORKDIR/<point>/train.log).

Launchers (--print_commands prints, runs nothing):
  local  one `python -m clip_jax.train ...` line per point.
  tpu    per point, a `gcloud compute tpus tpu-vm ssh NAME --zone=Z
         --worker=all --command="cd DIR && python -m clip_jax.train ...
         --distributed"`: every TPU VM host runs the same command and
         jax.distributed.initialize() finds its peers.
  slurm  one sbatch array script: task i runs point i with `srun` (one task
         per host, --hosts nodes) and --distributed (JAX reads SLURM's
         environment).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading

from clip_jax import config as config_lib

USAGE_ERROR, EXIT_RESUMABLE = 2, 75  # As clip_jax.train.
DONE_FILE, POINT_FILE, SWEEP_FILE = "DONE", "point.json", "sweep.json"
LOG_FILE = "train.log"
ARG_PREFIX = "arg."
LAUNCHERS = ("local", "tpu", "slurm")
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
MAX_NAME = 96


class SweepError(ValueError):
  """A mistake in the sweep definition or the command line."""


# ------------------------------------------------------- definitions ----


def product(**axes) -> list[dict]:
  """Grid: product(lr=[1e-3, 1e-4], seed=[0, 1]) -> 4 override dicts."""
  keys = list(axes)
  return [dict(zip(keys, values))
          for values in itertools.product(*(axes[k] for k in keys))]


def zipped(**axes) -> list[dict]:
  """Zip: zipped(batch_size=[64, 128], lr=[1e-3, 2e-3]) -> 2 dicts."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f"zipped() needs lists of one length, got {lengths}.")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def split_config_spec(spec: str) -> tuple[str, str | None]:
  path, _, arg = spec.partition(":")
  return path, arg or None


def load_sweep(spec: str) -> list[dict]:
  """The override dicts of `get_sweep(arg)` in the config file `spec`."""
  import importlib.util
  path, arg = split_config_spec(spec)
  if not os.path.isfile(path):
    raise SweepError(f"Config file {path!r} not found; give the path of a "
                     ".py file defining get_config() and get_sweep().")
  name = "clip_jax_sweep_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} defines no get_sweep(arg); add one returning "
                     "a list of override dicts (see clip_jax/sweep.py).")
  points = module.get_sweep(arg)
  if not isinstance(points, (list, tuple)) or not points:
    raise SweepError(f"{path}: get_sweep({arg!r}) returned {points!r}; "
                     "expected a non-empty list of dicts.")
  for point in points:
    if not isinstance(point, dict) or not all(
        isinstance(k, str) and k for k in point):
      raise SweepError(f"{path}: sweep point {point!r} is not a dict of "
                       "config keys to values.")
  return [dict(p) for p in points]


# ------------------------------------------------------- point names ----


def _value_text(value) -> str:
  """A value as the trainer's --config.<key>= flag takes it."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return repr(_as_tuple(value))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _as_tuple(value):
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuple(v) for v in value)
  return value


def point_name(overrides: dict) -> str:
  """'batch_size=64,loss=sigmoid' made filesystem-safe; stable.

  Keys sorted; characters outside [A-Za-z0-9._=+-] become '_'; when that
  changed anything or the name is long, an 8-hex hash of the exact
  overrides is appended, so two different points never share a name.
  """
  if not overrides:
    return "default"
  parts = [f"{k}={_value_text(overrides[k])}" for k in sorted(overrides)]
  exact = ",".join(parts)
  safe = ",".join(_SAFE.sub("_", p) for p in parts).replace(",", "__")
  if safe.replace("__", ",") == exact and len(safe) <= MAX_NAME:
    return safe
  digest = hashlib.sha256(
      json.dumps(overrides, sort_keys=True, default=repr).encode()
  ).hexdigest()[:8]
  return f"{safe[:MAX_NAME]}-{digest}"


# ---------------------------------------------------------- commands ----


def _config_spec_with_args(spec: str, overrides: dict) -> str:
  path, arg = split_config_spec(spec)
  given = dict(item.split("=", 1) if "=" in item else (item, "true")
               for item in (arg or "").split(",") if item)
  for key, value in overrides.items():
    if key.startswith(ARG_PREFIX):
      text = _value_text(value)
      if "," in text:
        raise SweepError(
            f"Sweep override {key}={value!r}: config-file arguments cannot "
            "contain commas (the argument string is split on them); "
            "override the config key itself instead.")
      given[key[len(ARG_PREFIX):]] = text
  joined = ",".join(f"{k}={v}" for k, v in given.items())
  return f"{path}:{joined}" if joined else path


def train_argv(spec: str, workdir: str, overrides: dict, *,
               python: str = "python", distributed: bool = False
               ) -> list[str]:
  """The trainer's argv for one point (one element per argument)."""
  argv = [python, "-m", "clip_jax.train",
          "--config", _config_spec_with_args(spec, overrides),
          "--workdir", os.path.join(workdir, point_name(overrides))]
  argv += [f"--config.{k}={_value_text(v)}" for k, v in overrides.items()
           if not k.startswith(ARG_PREFIX)]
  if distributed:
    argv.append("--distributed")
  return argv


def _quote_dir(path: str) -> str:
  """shlex.quote, but a leading '~/' stays unquoted so the shell expands it."""
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:])
  return shlex.quote(path)


def tpu_command(argv: list[str], *, tpu_name: str, zone: str,
                remote_dir: str, project: str | None = None) -> str:
  """One gcloud line that runs `argv` on every host of a TPU VM pod."""
  remote = f"cd {_quote_dir(remote_dir)} && {shlex.join(argv)}"
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name,
            f"--zone={zone}", "--worker=all"]
  if project:
    gcloud.append(f"--project={project}")
  gcloud.append(f"--command={remote}")
  return shlex.join(gcloud)


def slurm_script(argvs: list[list[str]], *, job_name: str, hosts: int,
                 workdir: str, remote_dir: str) -> str:
  """An sbatch array script: task i runs point i, one srun task per host."""
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name={job_name}",
      f"#SBATCH --array=0-{len(argvs) - 1}",
      f"#SBATCH --nodes={hosts}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --output={workdir}/slurm-%A_%a.out",
      "# Exit status 75 = stopped early with a checkpoint: resubmit the",
      "# array (or `scontrol requeue`); complete points exit 0 at once.",
      "set -uo pipefail",
      f"cd {_quote_dir(remote_dir)}",
      'case "$SLURM_ARRAY_TASK_ID" in',
  ]
  for i, argv in enumerate(argvs):
    lines.append(f"  {i}) srun {shlex.join(argv)} ;;")
  lines += ['  *) echo "no sweep point $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
            "esac"]
  return "\n".join(lines) + "\n"


# -------------------------------------------------------- validation ----


def load_point_config(spec: str, overrides: dict):
  """The config of one point before its --config.* overrides (its
  config-file arguments applied); a failure names the point."""
  path, arg = split_config_spec(_config_spec_with_args(spec, overrides))
  try:
    return config_lib.load_config_file(os.path.abspath(path), arg)
  except (ValueError, KeyError, TypeError) as e:
    raise SweepError(f"Sweep point {point_name(overrides)}: get_config"
                     f"({arg!r}) of {path} failed: {e}") from e


def check_overrides(spec: str, points: list[dict]) -> None:
  """Every point's config loads and has its override keys; before any run.

  Catches a typo'd key or a None target in seconds rather than after the
  first points have trained.
  """
  names = {}
  for overrides in points:
    name = point_name(overrides)
    if name in names:
      raise SweepError(f"Sweep points {names[name]!r} and {overrides!r} "
                       f"have the same name {name!r} (the same overrides); "
                       "remove the duplicate.")
    names[name] = overrides
    config = load_point_config(spec, overrides)
    for key, value in overrides.items():
      if key.startswith(ARG_PREFIX):
        continue
      if value is None:
        raise SweepError(
            f"Sweep override {key}=None: command-line overrides cannot set "
            "None; make it a config-file argument ('arg.<name>') instead.")
      parent, _, leaf = key.rpartition(".")
      node = config_lib._get(config, parent) if parent else config  # pylint: disable=protected-access
      if not hasattr(node, "keys") or leaf not in node:
        valid = list(node.keys()) if hasattr(node, "keys") else []
        raise SweepError(
            f"Sweep override {key!r} is not a key of the config "
            f"{spec}.{config_lib._did_you_mean(leaf, valid)} "  # pylint: disable=protected-access
            "`python -m clip_jax.config show FILE` lists every key.")
      if hasattr(node, "get_type") and node.get_type(leaf) is type(None):
        raise SweepError(
            f"Sweep override {key}={value!r}: config.{key} is None in "
            f"{spec}, which command-line overrides cannot set; give it a "
            "value in get_config, or sweep a config-file argument.")


# ----------------------------------------------------------- running ----


def split_cores(cores: list[int], parts: int) -> list[list[int]]:
  """`cores` in `parts` contiguous groups whose sizes differ by at most 1."""
  if parts < 1 or parts > len(cores):
    raise SweepError(f"--parallel {parts}: expected 1 to {len(cores)} "
                     f"(this process may use {len(cores)} CPUs).")
  size, extra = divmod(len(cores), parts)
  groups, start = [], 0
  for i in range(parts):
    end = start + size + (i < extra)
    groups.append(cores[start:end])
    start = end
  return groups


def pinned_argv(argv: list[str], cores: list[int]) -> list[str]:
  """`argv` run on `cores` only: `taskset -c` (util-linux), else a Python
  trampoline. Not subprocess's preexec_fn: it forks a process that has
  JAX's threads running, which may deadlock."""
  taskset = shutil.which("taskset")
  cpu_list = ",".join(map(str, cores))
  if taskset:
    return [taskset, "-c", cpu_list] + argv
  return [sys.executable, "-c",
          "import os, sys; os.sched_setaffinity(0, {%s}); "
          "os.execvp(sys.argv[1], sys.argv[1:])" % cpu_list, *argv]


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pinned_env(env: dict, cores: list[int]) -> dict:
  """The environment of a point pinned to `cores`: thread pools of that
  size, and this clip_jax importable from any working directory."""
  env = dict(env)
  n = str(len(cores))
  env["PYTHONPATH"] = os.pathsep.join(
      [_REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env.update(OMP_NUM_THREADS=n, TF_NUM_INTRAOP_THREADS=n,
             TF_NUM_INTEROP_THREADS="1")
  return env


class Sweep:
  """Runs the points of a sweep locally; see the module docstring."""

  def __init__(self, spec: str, workdir: str, points: list[dict], *,
               parallel: int = 1, python: str = sys.executable,
               stream=None):
    self.spec, self.workdir, self.points = spec, workdir, points
    self.python, self.stream = python, stream or sys.stdout
    cores = sorted(os.sched_getaffinity(0))
    self.core_groups = split_cores(cores, parallel)
    self._lock = threading.RLock()  # The signal handler takes it too.
    self._running: dict[str, subprocess.Popen] = {}
    self.stop_signal = None

  def say(self, text: str) -> None:
    with self._lock:
      print(f"[sweep] {text}", file=self.stream, flush=True)

  def point_dir(self, overrides: dict) -> str:
    return os.path.join(self.workdir, point_name(overrides))

  def is_done(self, overrides: dict) -> bool:
    return os.path.exists(os.path.join(self.point_dir(overrides), DONE_FILE))

  def write_definition(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    record = {"config": self.spec, "points": [
        {"name": point_name(p), "overrides": p,
         "command": shlex.join(train_argv(self.spec, self.workdir, p))}
        for p in self.points]}
    with open(os.path.join(self.workdir, SWEEP_FILE), "w") as f:
      json.dump(record, f, indent=2, default=repr)

  def run_point(self, overrides: dict, cores: list[int]) -> int:
    """Runs (or resumes) one point; returns the trainer's exit status."""
    point_dir = self.point_dir(overrides)
    os.makedirs(point_dir, exist_ok=True)
    with open(os.path.join(point_dir, POINT_FILE), "w") as f:
      json.dump(overrides, f, indent=2, sort_keys=True, default=repr)
    argv = train_argv(self.spec, self.workdir, overrides, python=self.python)
    self.say(f"start {point_name(overrides)} on CPUs {cores}: "
             f"{shlex.join(argv)}")
    with open(os.path.join(point_dir, LOG_FILE), "a") as log:
      proc = subprocess.Popen(
          pinned_argv(argv, cores), stdout=log, stderr=subprocess.STDOUT,
          env=pinned_env(os.environ, cores))
      with self._lock:
        self._running[point_dir] = proc
        stopping = self.stop_signal is not None
      if stopping:  # The signal came while this one was starting.
        proc.send_signal(signal.SIGTERM)
      code = proc.wait()
      with self._lock:
        del self._running[point_dir]
    if code == 0:
      open(os.path.join(point_dir, DONE_FILE), "w").close()
    self.say(f"{point_name(overrides)} exited with status {code}"
             + ("" if code == 0 else f" (log: {point_dir}/{LOG_FILE})"))
    return code

  def _handle(self, signum, frame):
    del frame
    with self._lock:
      self.stop_signal = signal.Signals(signum).name
      running = list(self._running.values())
    # A second Ctrl-C stops the sweep at once (the points get it from the
    # terminal too, and abort without a checkpoint, as the trainer does).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for proc in running:  # Each checkpoints and exits 75.
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  def run(self) -> int:
    """Runs every unfinished point; returns the sweep's exit status."""
    self.write_definition()
    todo = [p for p in self.points if not self.is_done(p)]
    self.say(f"{len(self.points)} points, {len(self.points) - len(todo)} "
             f"already complete, {len(todo)} to run, "
             f"{len(self.core_groups)} at a time.")
    previous = {s: signal.signal(s, self._handle)
                for s in (signal.SIGTERM, signal.SIGINT)}
    codes, queue = {}, list(todo)

    def worker(cores):
      while True:
        with self._lock:
          if not queue or self.stop_signal is not None:
            return
          overrides = queue.pop(0)
        codes[point_name(overrides)] = self.run_point(overrides, cores)

    threads = [threading.Thread(target=worker, args=(g,), daemon=True)
               for g in self.core_groups]
    try:
      for t in threads:
        t.start()
      for t in threads:
        while t.is_alive():
          t.join(0.2)  # Short joins: the main thread must take signals.
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
    return self.summarise(codes, left=len(queue))

  def was_stopped(self, code: int) -> bool:
    """Whether a point's exit status means the sweep's stop signal ended it.

    A point checkpoints and exits 75; one that got the signal before its
    trainer installed the handler dies of it (-SIGTERM / -SIGINT), keeping
    its earlier checkpoints: stopped too, not failed. The same death with
    no stop signal sent is a failure.
    """
    killed_by_stop = (self.stop_signal is not None
                      and code in (-signal.SIGTERM, -signal.SIGINT))
    return code == EXIT_RESUMABLE or killed_by_stop

  def summarise(self, codes: dict, left: int) -> int:
    stopped = [n for n, c in codes.items() if self.was_stopped(c)]
    failed = {n: c for n, c in codes.items()
              if c != 0 and not self.was_stopped(c)}
    done = sum(self.is_done(p) for p in self.points)
    self.say(f"{done}/{len(self.points)} points complete; {len(stopped)} "
             f"stopped early, {len(failed)} failed, {left} not started.")
    if any(c == USAGE_ERROR for c in failed.values()):
      return USAGE_ERROR
    if failed:
      return 1
    if done < len(self.points):
      return EXIT_RESUMABLE  # Stopped early: the same command resumes.
    return 0


# ---------------------------------------------------------- commands ----


def print_commands(args, points: list[dict], stream=None) -> None:
  stream = stream or sys.stdout
  distributed = args.launcher != "local"
  argvs = [train_argv(args.config, args.workdir, p, python=args.python,
                      distributed=distributed) for p in points]
  if args.launcher == "local":
    for argv in argvs:
      print(shlex.join(argv), file=stream)
  elif args.launcher == "tpu":
    if not (args.tpu_name and args.zone):
      raise SweepError("--launcher=tpu needs --tpu_name and --zone.")
    for argv in argvs:
      print(tpu_command(argv, tpu_name=args.tpu_name, zone=args.zone,
                        remote_dir=args.remote_dir, project=args.project),
            file=stream)
  else:
    name = os.path.basename(os.path.normpath(args.workdir)) or "sweep"
    print(slurm_script(argvs, job_name=name, hosts=args.hosts,
                       workdir=args.workdir, remote_dir=args.remote_dir),
          file=stream, end="")


def run_main(argv) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.sweep",
      description="Run every point of a config file's get_sweep(), or print "
      "launch commands. `python -m clip_jax.sweep report WORKDIR` tabulates "
      "and plots a finished sweep.")
  parser.add_argument("--config", required=True,
                      help="config file defining get_sweep, with ':arg'")
  parser.add_argument("--workdir", required=True,
                      help="the sweep's folder; one sub-folder per point")
  parser.add_argument("--parallel", type=int, default=1,
                      help="points at a time, each on its share of the CPUs")
  parser.add_argument("--print_commands", action="store_true",
                      help="print the commands (see --launcher); run nothing")
  parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
  parser.add_argument("--tpu_name", help="TPU VM name (--launcher=tpu)")
  parser.add_argument("--zone", help="TPU zone (--launcher=tpu)")
  parser.add_argument("--project", help="GCP project (optional)")
  parser.add_argument("--hosts", type=int, default=1,
                      help="nodes per point (--launcher=slurm)")
  parser.add_argument("--remote_dir", default="~/clip_jax",
                      help="the clone's path on the TPU VMs / cluster")
  parser.add_argument("--python", default=None,
                      help="python to run (default: this one locally, "
                      "'python' in printed tpu/slurm commands)")
  args = parser.parse_args(argv)
  points = load_sweep(args.config)
  check_overrides(args.config, points)
  if args.print_commands:
    if args.python is None:
      args.python = sys.executable if args.launcher == "local" else "python"
    print_commands(args, points)
    return 0
  return Sweep(args.config, args.workdir, points, parallel=args.parallel,
               python=args.python or sys.executable).run()


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "report":
    from clip_jax import sweep_report  # pylint: disable=g-import-not-at-top
    return sweep_report.main(argv[1:])
  return run_main(argv)


if __name__ == "__main__":
  from clip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_plain(main)
