"""Benchmarks (not tests): print figures and write JSON.

  python -m clip_jax.bench [step] [--config configs/demo.py] [--out ...]
  python -m clip_jax.bench step --model demo|b32 [--batch N] [--noloop]
  python -m clip_jax.bench ab --model demo --ab '{"flax": {}, "fused":
      {"set": {"model.attention": "fused_qkv"}}}' [--ab_rounds 5]
  python -m clip_jax.bench loss --global_batch 32768 --embed_dim 512 \
      --devices 8 [--repeats 3] [--check_batch 2048] [--out ...]
  python -m clip_jax.bench step32k --devices 8 [--accum_steps 4] \
      [--global_batch 32768] [--config configs/clip.py:tiny] \
      [--timed_steps 2]
  python -m clip_jax.bench memory --devices 8 [--config configs/demo.py] \
      [--variants baseline,remat_full,...] [--repeats 5] [--out ...]

`step` (the default):
  train_step   examples/s the jitted train step consumes on a fixed batch
               (median over timed windows, after compilation);
  pipeline     examples/s the input pipeline produces for the same config,
               with the config's worker_count (median over windows);
  ratio        pipeline / train_step: above 1 the step is the bottleneck;
  train_loop   examples/s of the step fed by the pipeline, as training runs
               them: on a small machine both share the same cores, so this
               is below either figure alone. Its windows (--loop_steps
               steps) alternate with windows of the step on a fixed batch
               for --loop_rounds rounds, and 1 - train_loop / that step
               figure is the share of the loop's time the input costs.
Every window (--steps_per_window steps; --loop_steps for the loop and the
step beside it) syncs once, after its last step, as clip_jax.train syncs
only at its log steps (so the host fetches and ships the next batch while
a step runs).
The machine is shared and noisy, so all are medians of several windows
measured in the same run, and the ratios are the figures to compare.
`step` also prints, for the train step: compile seconds, model FLOPs per
example from XLA's compiled cost analysis and from the analytic matmul
count (clip_jax.flops), the achieved model FLOP/s (analytic FLOPs x
examples/s), and its ratio to the float32 matmul peak timed in the same run
(a jitted [n, n] @ [n, n] jnp.dot, median of several calls); the JSON holds
a machine description (CPU model, cores, jax version, XLA_FLAGS).
--model picks a named size (STEP_MODELS: demo = configs/demo.py's towers,
b32 = CLIP ViT-B/32 with its 12 x 512 text tower, float32) instead of
--config; --batch overrides the batch size; --set key=value,... overrides
config keys (model.attention=fused_qkv); --xla_options passes XLA compile
options (JSON) to the train step's compilation; --noloop skips the pipeline
and loop figures (the default for b32, which has no local data).

`ab`: variants of one model's train step (--ab: config overrides and/or
XLA compile options per label), each compiled once, then timed in turn
for --ab_rounds rounds in one process: the median per-round ratio to the
first variant is the figure to read on a shared machine.

`patch`: the patch embedding alone (forward + kernel gradient): the strided
conv vs model.image.patch_embed='matmul', alternated for --ab_rounds rounds.

`profile`: a jax.profiler trace of --steps_per_window compiled steps;
the time of every thunk summed by the heaviest op its fusion wraps (dot,
convolution, transpose, reduce, gather, scatter, else elementwise).

`loss`: forward + backward of every registered loss (losses.LOSSES) on a
global batch of random unit embeddings split over --devices fake CPU devices:
seconds (median of --repeats calls after one warm-up), per-device temporary
memory from the compiled memory analysis, the collectives of the compiled
HLO (kind, count, bytes per device; see clip_jax.hlo), and agreement of the
value and gradients with a float64 NumPy dense loss at --check_batch. Each
target prints PASS or FAIL:
  memory     softmax: temp <= 1.1 x (its [n, N] logits block + its gathers);
             sigmoid: temp <= 1.1 x (4 [n, n] blocks + its gathers);
             sigmoid_chunked: temp <= 1.1 x 4 [n, n] blocks (n = N / d);
  no N x N   no array of N * N elements or more anywhere in the HLO;
  all-reduce every all-reduced array is smaller than one [n, D] block (the
             embedding gradients come back by reduce-scatter or the ring);
  dense      value and gradients within 1e-4 (relative to their largest
             entry) of the float64 NumPy loss.

`step32k`: real training steps (both towers, loss, backward, AdamW) at a
global batch of 32,768 with the tiny CLIP (32 px) and exact gradient
accumulation: seconds per step (median of --timed_steps after the first),
peak RSS, per-device memory from the compiled analysis, and the first
step's loss against a float64 NumPy dense loss (chunked) on the same
embeddings (PASS within 1e-4 relative).

`memory`: the memory levers, one at a time from a baseline (the config as
given: replicated params, mesh (devices, 1)), then a few combinations
(MEMORY_VARIANTS): FSDP params and optimiser state (mesh (1, d) and
(2, d/2), rule ('.*', 'fsdp')), model.remat_policy full / dots_saveable /
dots_with_no_batch_dims_saveable, bfloat16 compute, model.scan, and
accum_steps 2 / 4. Per variant, per device, from the compiled step's
memory analysis (exact compile-time figures): temp, argument, output and
aliased (donated) bytes, and peak = argument + temp + output - alias; and
milliseconds per step (median of --repeats steps after a warm-up one), and
the warm-up step's loss (equal across the variants that do not change the
math: a lever that changed the loss would be a bug).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from clip_jax import config as config_lib
from clip_jax import flops as flops_lib
from clip_jax import hlo as hlo_lib
from clip_jax import host_malloc, losses, numpy_losses, optim, train_state
from clip_jax import sharding as sharding_lib
from clip_jax.models import two_towers

_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "Config[:args].")
_OUT = flags.DEFINE_string(
    "out", None, "JSON output path (default runs/bench.json, or "
    "runs/bench_<command>.json for the other commands).")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows per figure.")
_STEPS = flags.DEFINE_integer("steps_per_window", 3, "Steps per window.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 32768,
                                     "loss: global batch N.")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 512, "loss: embedding width D.")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Fake CPU devices (set before JAX starts its backend); "
    "default: whatever XLA_FLAGS gives.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "loss: timed calls per loss; memory: timed steps per "
    "variant.")
_CHECK_BATCH = flags.DEFINE_integer(
    "check_batch", 2048, "loss: batch of the float64 dense agreement check.")
_LOSSES = flags.DEFINE_list("losses", None, "loss: names (default: all).")
_ACCUM = flags.DEFINE_integer("accum_steps", 4, "step32k: micro-batches.")
_VARIANTS = flags.DEFINE_list(
    "variants", None, "memory: MEMORY_VARIANTS names (default: all).")
_CPU_SCHEDULER = flags.DEFINE_enum(
    "cpu_scheduler", "memory", ["memory", "default"],
    "memory: compile with XLA:CPU's memory-optimised scheduler, which "
    "schedules remat's recomputation late as TPU/GPU schedulers do; "
    "default: XLA:CPU's default (concurrency-optimised) scheduler, which "
    "hoists unscanned recomputation into the forward pass, so remat saves "
    "no memory there.")
_TIMED_STEPS = flags.DEFINE_integer(
    "timed_steps", 2, "step32k: timed steps after the first (compiling) one.")
_MODEL = flags.DEFINE_enum(
    "model", None, ["demo", "b32"],
    "step: a named model size (STEP_MODELS) instead of --config.")
_BATCH = flags.DEFINE_integer("batch", None, "step: batch size override.")
_LOOP = flags.DEFINE_bool(
    "loop", None, "step: also time the input pipeline and the train loop "
    "(default: yes, except for --model b32).")
_LOOP_ROUNDS = flags.DEFINE_integer(
    "loop_rounds", 7, "step: alternated rounds of loop and step windows.",
    lower_bound=1)
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", 24, "step: steps per loop / step window (>> the prefetch "
    "depth).", lower_bound=1)
_SET = flags.DEFINE_list(
    "set", [], "step: config overrides key=value (e.g. "
    "model.attention=fused_qkv); values parsed as Python literals.")
_XLA_OPTIONS = flags.DEFINE_string(
    "xla_options", None, "step: JSON dict of XLA compile options for the "
    "train step, e.g. '{\"xla_cpu_scheduler_type\": "
    "\"CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED\"}'.")
_AB = flags.DEFINE_string(
    "ab", None, "ab: JSON {label: {'set': {key: value}, 'xla': {option: "
    "value}}}; the first label is the baseline.")
_ROUNDS = flags.DEFINE_integer("ab_rounds", 5, "ab: alternated rounds.")
_PEAK_N = flags.DEFINE_integer("peak_n", 2048,
                               "step: size n of the [n, n] matmul peak.")
_SCALE, _BIAS = 10.0, -10.0  # SigLIP's initial logit scale and bias.
_DENSE_RTOL = 1e-4
_FEW_BLOCKS = 4  # [n, n] blocks a tiled loss may hold: logits, their
# gradient, one elementwise temporary, and one being filled.


def _median_rate(fn, examples_per_call: int, windows: int, calls: int):
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(calls):
      fn()
    rates.append(examples_per_call * calls / (time.perf_counter() - start))
  return statistics.median(rates), rates


def _make_step(config):
  """(jitted train step, initial state, mesh) of the config's model."""
  mesh = sharding_lib.make_mesh(config.mesh)
  model = two_towers.build_run_model(config)
  tx, schedule = optim.make_optimizer(
      config, train_state.param_shapes(model, config), total_steps=10**6,
      warmup_steps=0)
  state, shardings = train_state.create_state(model, tx, config, mesh)
  step = train_state.make_train_step(
      model, tx, losses.get_loss(config.loss), schedule, mesh, shardings,
      max_log_logit_scale=two_towers.max_log_logit_scale(config.model),
      accum_steps=config.accum_steps, accum_mode=config.accum_mode)
  return step, state, mesh


def _timed_steps(step, state, next_batch):
  """A no-argument function running one step on next_batch(), synced."""
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], next_batch())
    jax.block_until_ready(metrics)

  return one_step


def _timed_window(step, holder: dict, next_batch, steps: int):
  """A no-argument function running `steps` steps on holder["state"],
  synced after the last only, as clip_jax.train's loop syncs only at its
  log steps: the host fetches and ships batch i + 1 while step i runs.
  Windows sharing a holder carry one state on (the step donates it)."""

  def window():
    for _ in range(steps):
      holder["state"], metrics = step(holder["state"], next_batch())
    jax.block_until_ready(metrics)

  return window


# Named sizes of `step --model`: (config file, its argument, overrides).
STEP_MODELS = {
    "demo": ("configs/demo.py", None, {}),
    "b32": ("configs/clip.py", "model=B/32", {"model.dtype": "float32"}),
}


def step_config(model: str | None, config_flag: str, batch: int | None):
  """The config `step` benchmarks: a STEP_MODELS size or a config file."""
  if model is not None:
    path, arg, overrides = STEP_MODELS[model]
  else:
    (path, _, arg), overrides = config_flag.partition(":"), {}
  config = with_overrides(config_lib.load_config_file(path, arg or None),
                          overrides)
  if batch is not None:
    config.batch_size = batch
  return config


def machine_description() -> dict:
  """What the figures were measured on."""
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), cpu)
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top

  import jaxlib  # pylint: disable=g-import-not-at-top
  return {
      "cpu_model": cpu, "cpu_count": os.cpu_count(),
      "cpus_usable": len(os.sched_getaffinity(0)),
      "platform": platform.platform(), "python": platform.python_version(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      # host_malloc: huge pages for host buffers, or not.
      "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
      "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
      "transparent_hugepage": host_malloc.thp_mode(),
  }


def matmul_peak_flops(n: int = 2048, repeats: int = 7) -> float:
  """float32 FLOP/s of a jitted [n, n] @ [n, n] (median of repeats)."""
  a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    seconds.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(seconds)


def float_batch_arrays(config, seed=0) -> dict:
  """Random normalised float32 images and tokens (NumPy, host)."""
  rng = np.random.default_rng(seed)
  size, length = config.model.image.image_size, config.model.text.context_length
  return {
      "image": rng.normal(size=(config.batch_size, size, size, 3)).astype(
          np.float32),
      "text": rng.integers(3, config.model.text.vocab_size,
                           (config.batch_size, length)).astype(np.int32)}


def float_batch(config, mesh, seed=0):
  """float_batch_arrays as a global batch on the mesh."""
  return sharding_lib.host_to_global(float_batch_arrays(config, seed), mesh)


def parse_overrides(items) -> dict:
  """['a.b=1', "c='x'"] -> {'a.b': 1, 'c': 'x'} (bare words stay strings)."""
  import ast  # pylint: disable=g-import-not-at-top
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--set {item!r}: expected key=value.")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return overrides


def compiled_step(config, compiler_options=None):
  """(compiled step, state, batch, compile seconds, compiled FLOPs/step).

  XLA's cost analysis counts one device's SPMD program: times the mesh
  size, it is what all devices execute (replicated work counted on each).
  """
  step, state, mesh = _make_step(config)
  batch = float_batch(config, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile(
      compiler_options=compiler_options or {})
  compile_s = time.perf_counter() - start
  flops = flops_lib.compiled_flops(compiled) * mesh.size
  return compiled, state, batch, compile_s, flops


def bench_train_step(config, windows: int, calls: int,
                     compiler_options=None):
  """(median examples/s, all windows, facts of the compiled step)."""
  compiled, state, batch, compile_s, flops = compiled_step(config,
                                                           compiler_options)
  window = _timed_window(compiled, {"state": state}, lambda: batch, calls)
  window()  # Warm-up.
  faults = _minor_page_faults()
  rate, rates = _median_rate(window, config.batch_size * calls, windows, 1)
  faults = (_minor_page_faults() - faults) / (windows * calls)
  return rate, rates, {"compile_seconds": compile_s,
                       "compiled_flops_per_step": flops,
                       "minor_page_faults_per_step": faults}


def _minor_page_faults() -> int:
  """This process's minor page faults so far (each maps a fresh page; the
  count per step shows whether host buffers sit on huge pages, host_malloc)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def pipeline_feed(config, mesh):
  """(the config's training iterator, a no-argument function returning its
  next batch as global arrays, as the train loop ships it)."""
  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  iterator, _ = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=0)

  def next_batch():
    local = next(iterator)
    return sharding_lib.host_to_global(
        {k: local[k] for k in ("image", "text")}, mesh)

  return iterator, next_batch


def bench_loop_against_step(config, rounds: int, steps: int):
  """({"step": rates, "loop": rates}): windows of `steps` train steps fed
  one fixed batch (the pipeline's first) and fed by the pipeline,
  alternated for `rounds` rounds in one process on one state, so that the
  shared machine's noise hits both alike. Windows much longer than the
  prefetch depth keep the batches the pipeline makes during a step window
  a small part of a loop window's input."""
  step, state, mesh = _make_step(config)
  iterator, next_batch = pipeline_feed(config, mesh)
  holder = {"state": state}
  with iterator:
    fixed = next_batch()
    windows = {name: _timed_window(step, holder, feed, steps)
               for name, feed in (("step", lambda: fixed),
                                  ("loop", next_batch))}
    for window in windows.values():  # Compile; start the pipeline.
      window()
    rates = {name: [] for name in windows}
    for _ in range(rounds):
      for name, window in windows.items():
        rates[name].append(_median_rate(window, steps * config.batch_size,
                                        1, 1)[0])
  return rates


def bench_pipeline(config, windows: int, calls: int):
  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  iterator, _ = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=0)
  with iterator:  # Stops its prefetch thread before the next figure.
    next(iterator)  # Start workers, fill buffers.
    return _median_rate(lambda: next(iterator), config.batch_size, windows,
                        calls)


def main_step():
  config = with_overrides(
      step_config(_MODEL.value, _CONFIG.value, _BATCH.value),
      parse_overrides(_SET.value))
  options = json.loads(_XLA_OPTIONS.value) if _XLA_OPTIONS.value else None
  name = _MODEL.value or _CONFIG.value
  loop = _LOOP.value if _LOOP.value is not None else _MODEL.value != "b32"
  n = config.batch_size
  peak = matmul_peak_flops(_PEAK_N.value)
  step_rate, step_all, facts = bench_train_step(config, _WINDOWS.value,
                                                _STEPS.value, options)
  peak_after = matmul_peak_flops(_PEAK_N.value)
  analytic = flops_lib.config_train_flops_per_example(config.model, n)
  per_example = analytic["total"]
  compiled_per_example = facts["compiled_flops_per_step"] / n
  achieved = per_example * step_rate
  peak = statistics.median([peak, peak_after])
  result = {
      "model": name, "batch_size": n, "machine": machine_description(),
      "overrides": _SET.value, "xla_options": options or {},
      "load_average_1min": os.getloadavg()[0],
      "train_step_examples_per_sec": step_rate,
      "train_step_windows": step_all,
      "compile_seconds": facts["compile_seconds"],
      "minor_page_faults_per_step": facts["minor_page_faults_per_step"],
      "flops_per_example_analytic": per_example,
      "flops_per_example_analytic_parts": analytic,
      "flops_per_example_compiled": compiled_per_example,
      "achieved_flops_per_sec": achieved,
      "matmul_peak_flops_per_sec": peak, "matmul_peak_n": _PEAK_N.value,
      "fraction_of_matmul_peak": achieved / peak,
  }
  print(f"{name}, batch {n}, {jax.device_count()} device(s), "
        f"{machine_description()['cpus_usable']} usable cores")
  print(f"train step: {step_rate:8.1f} examples/s (median of "
        f"{_WINDOWS.value} windows of {_STEPS.value} steps; compile "
        f"{facts['compile_seconds']:.1f} s)")
  print(f"host page faults: {facts['minor_page_faults_per_step']:.0f} per "
        f"step (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r})")
  print(f"model FLOPs/example: {per_example / 1e9:.4g} G analytic (matmuls), "
        f"{compiled_per_example / 1e9:.4g} G compiled cost analysis "
        f"(x{compiled_per_example / per_example:.3f})")
  print(f"achieved {achieved / 1e9:.1f} GFLOP/s = "
        f"{100 * achieved / peak:.0f}% of the matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s ([{_PEAK_N.value}]^2 jnp.dot, timed "
        "before and after)")
  if loop:
    data_rate, data_all = bench_pipeline(config, _WINDOWS.value, _STEPS.value)
    alternated = bench_loop_against_step(config, _LOOP_ROUNDS.value,
                                         _LOOP_STEPS.value)
    loop_rate = statistics.median(alternated["loop"])
    beside = statistics.median(alternated["step"])
    result.update({
        "pipeline_examples_per_sec": data_rate,
        "pipeline_windows": data_all,
        "pipeline_over_step": data_rate / step_rate,
        "train_loop_examples_per_sec": loop_rate,
        "train_loop_windows": alternated["loop"],
        "train_step_alternated_examples_per_sec": beside,
        "train_step_alternated_windows": alternated["step"],
        "input_share_of_loop_time": 1 - loop_rate / beside,
        "loop_rounds": _LOOP_ROUNDS.value, "loop_steps": _LOOP_STEPS.value,
        "worker_count": config.data.worker_count,
    })
    print(f"pipeline:   {data_rate:8.1f} examples/s "
          f"(worker_count={config.data.worker_count})")
    print(f"pipeline / step = {data_rate / step_rate:.2f} (target >= 2)")
    print(f"train loop: {loop_rate:8.1f} examples/s against the step's "
          f"{beside:.1f} (medians of {_LOOP_ROUNDS.value} alternated windows "
          f"of {_LOOP_STEPS.value} steps each; the pipeline shares the "
          f"cores): the input costs {100 * (1 - loop_rate / beside):.0f}% of "
          "the loop's time")
  _write_json(result, _OUT.value or "runs/bench.json")


def _write_json(result, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


def _batch_mesh(devices: int):
  """All devices on 'data': the loss sees the batch split d ways."""
  return sharding_lib.make_mesh(
      ml_collections.ConfigDict(dict(data=devices, fsdp=1)),
      jax.devices()[:devices])


def _unit_pairs(n: int, d: int, seed: int, sharding):
  """Random unit [n, d] image/text embeddings, correlated pairs, sharded."""
  def make(key):
    a, noise = jax.random.normal(key, (2, n, d), jnp.float32)
    b = a + 0.7 * noise
    unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
    return unit(a), unit(b)

  return jax.jit(make, out_shardings=(sharding, sharding))(
      jax.random.key(seed))


def _loss_grad_fn(name: str, mesh):
  return jax.jit(jax.value_and_grad(
      functools.partial(losses.get_loss(name), mesh=mesh),
      argnums=(0, 1, 2, 3)))


def dense_agreement(name, mesh, n, d):
  """Max error of value and grads vs float64 NumPy, relative to magnitude."""
  a, b = _unit_pairs(n, d, 1, sharding_lib.batch_sharding(mesh))
  value, grads = _loss_grad_fn(name, mesh)(a, b, jnp.float32(_SCALE),
                                           jnp.float32(_BIAS))
  a64, b64 = (np.asarray(x, np.float64) for x in (a, b))
  ref_value, ref_grads = numpy_losses.loss_and_grads(name, a64, b64, _SCALE,
                                                     _BIAS)
  errors = {"value": abs(float(value) - ref_value) / abs(ref_value)}
  for what, got, want in zip(("zimg", "ztxt", "scale", "bias"), grads,
                             ref_grads):
    magnitude = max(np.abs(want).max(), 1e-12)
    errors[what] = float(np.abs(np.asarray(got, np.float64) - want).max() /
                         magnitude) if np.any(want) else float(
                             np.abs(np.asarray(got)).max())
  return errors


def loss_targets(name, *, temp_bytes, shapes, collectives, n_global,
                 embed_dim, devices, dense_errors):
  """[(target, measured, limit, passed)] for one loss (see the docstring)."""
  n = n_global // devices
  block, gathered = 4 * n * n, 4 * n_global * embed_dim
  memory_limit = {
      "softmax": 1.1 * (4 * n * n_global + 2 * gathered),
      "sigmoid": 1.1 * (_FEW_BLOCKS * block + gathered),
      "sigmoid_chunked": 1.1 * _FEW_BLOCKS * block,
  }.get(name)
  biggest = max((int(np.prod(s)) for _, s in shapes), default=0)
  reduced = max((_elements(shape) for row in collectives
                 if row["kind"] == "all-reduce" for shape in row["shapes"]),
                default=0)
  worst_dense = max(dense_errors.values())
  targets = [
      ("no array of N*N elements", biggest, n_global * n_global - 1,
       biggest < n_global * n_global),
      ("all-reduced arrays < [n, D]", reduced, n * embed_dim - 1,
       reduced < n * embed_dim),
      ("dense float64 agreement", worst_dense, _DENSE_RTOL,
       worst_dense <= _DENSE_RTOL),
  ]
  if memory_limit is not None:
    targets.insert(0, ("temp memory per device (bytes)", temp_bytes,
                       memory_limit, temp_bytes <= memory_limit))
  return targets


def _elements(shape_text: str) -> int:
  dims = shape_text[shape_text.index("[") + 1:-1]
  return int(np.prod([int(x) for x in dims.split(",") if x]))


def bench_loss(name, mesh, n_global, embed_dim, repeats):
  """Compiled facts and median seconds of forward + backward of one loss."""
  sharding = sharding_lib.batch_sharding(mesh)
  fn = _loss_grad_fn(name, mesh)
  a, b = _unit_pairs(n_global, embed_dim, 0, sharding)
  compiled = fn.lower(a, b, jnp.float32(_SCALE), jnp.float32(_BIAS)).compile()
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  args = (a, b, jnp.float32(_SCALE), jnp.float32(_BIAS))
  jax.block_until_ready(compiled(*args))  # Warm-up.
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  return {
      "seconds_median": statistics.median(seconds), "seconds": seconds,
      "temp_bytes": int(memory.temp_size_in_bytes),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "collectives": hlo_lib.collectives(text, mesh.size),
      "shapes": sorted(hlo_lib.array_shapes(text)),
  }


def _mib(x):
  return f"{x / 2**20:9.1f}"


def main_loss():
  devices = jax.device_count()
  mesh = _batch_mesh(devices)
  n_global, embed_dim = _GLOBAL_BATCH.value, _EMBED_DIM.value
  check_mesh_batch = _CHECK_BATCH.value
  names = _LOSSES.value or sorted(losses.LOSSES)
  print(f"loss benchmark: N={n_global} D={embed_dim} devices={devices} "
        f"(n={n_global // devices} rows each), forward+backward, median of "
        f"{_REPEATS.value}; dense check at N={check_mesh_batch}")
  results, all_passed = {}, True
  for name in names:
    row = bench_loss(name, mesh, n_global, embed_dim, _REPEATS.value)
    row["dense_errors"] = dense_agreement(name, mesh, check_mesh_batch,
                                          embed_dim)
    targets = loss_targets(
        name, temp_bytes=row["temp_bytes"], shapes=row.pop("shapes"),
        collectives=row["collectives"], n_global=n_global,
        embed_dim=embed_dim, devices=devices,
        dense_errors=row["dense_errors"])
    row["targets"] = [dict(target=t, measured=m, limit=lim, passed=bool(ok))
                      for t, m, lim, ok in targets]
    results[name] = row
    print(f"\n{name}: {row['seconds_median']:.2f} s (runs "
          f"{', '.join(f'{x:.2f}' for x in row['seconds'])}), temp "
          f"{_mib(row['temp_bytes']).strip()} MiB/device")
    print(f"  {'collective':<20}{'count':>6}{'MiB/device':>12}"
          f"{'wire MiB':>10}  shapes")
    for c in row["collectives"]:
      print(f"  {c['kind']:<20}{c['count']:>6}{_mib(c['bytes']):>12}"
            f"{_mib(c['wire_bytes']):>10}  {' '.join(c['shapes'][:3])}")
    for t, m, lim, ok in targets:
      all_passed &= bool(ok)
      print(f"  {'PASS' if ok else 'FAIL'}  {t}: {m:.4g} (limit {lim:.4g})")
  _write_json({"global_batch": n_global, "embed_dim": embed_dim,
               "devices": devices, "check_batch": check_mesh_batch,
               "losses": results, "all_passed": all_passed},
              _OUT.value or "runs/bench_loss.json")
  return all_passed


def _rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main_step32k():
  """Real training steps at global batch 32,768 (tiny towers, 32 px)."""
  path, _, arg = _CONFIG.value.partition(":")
  if path == "configs/demo.py":  # The flag's default: use the tiny CLIP.
    path, arg = "configs/clip.py", "tiny"
  config = config_lib.load_config_file(path, arg or None)
  # The tiny recipe shrinks the batch; --global_batch sets it back.
  config.batch_size = _GLOBAL_BATCH.value
  config.mesh.data, config.mesh.fsdp = jax.device_count(), 1
  accum = config.accum_steps = _ACCUM.value
  step, state, mesh = _make_step(config)
  model = two_towers.build_run_model(config)  # For the reference below.
  rng = np.random.default_rng(0)
  n, size = config.batch_size, config.model.image.image_size
  length = config.model.text.context_length
  batch = sharding_lib.host_to_global({
      "image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
      "text": rng.integers(3, config.model.text.vocab_size,
                           (n, length)).astype(np.int32)}, mesh)
  print(f"step32k: N={n}, {size} px, loss={config.loss}, "
        f"accum_steps={accum}, {jax.device_count()} devices")
  # The dense reference: embeddings of the same batch under the params the
  # first step differentiates (its reported loss is at those params).
  zimg, ztxt, out = jax.jit(lambda p, b: train_state.embed(model, p, b))(
      state["params"], batch)
  a, b = (np.asarray(x, np.float64) for x in (zimg, ztxt))
  scale = float(out["logit_scale"])
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  seconds, first_loss = [], None
  for i in range(1 + _TIMED_STEPS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    metrics = jax.device_get(metrics)
    if i:
      seconds.append(time.perf_counter() - start)
    else:
      first_loss = float(metrics["loss"])
  if config.loss == "softmax":
    reference = numpy_losses.softmax_loss_chunked(a, b, scale)
  else:
    reference = numpy_losses.sigmoid_loss_chunked(a, b, scale,
                                                  float(out["logit_bias"]))
  error = abs(first_loss - reference) / abs(reference)
  result = {
      "global_batch": n, "image_size": size, "loss_name": config.loss,
      "accum_steps": accum, "devices": jax.device_count(),
      "compile_seconds": compile_s,
      "seconds_per_step_median": statistics.median(seconds),
      "seconds_per_step": seconds, "peak_rss_gib": _rss_gib(),
      "temp_bytes_per_device": int(memory.temp_size_in_bytes),
      "argument_bytes_per_device": int(memory.argument_size_in_bytes),
      "loss": first_loss, "dense_float64_loss": reference,
      "relative_error": error, "passed": bool(error <= _DENSE_RTOL),
  }
  print(f"  {result['seconds_per_step_median']:.1f} s/step (median of "
        f"{len(seconds)}; compile {compile_s:.0f} s), peak RSS "
        f"{result['peak_rss_gib']:.2f} GiB, per device: temp "
        f"{_mib(memory.temp_size_in_bytes).strip()} MiB, arguments "
        f"{_mib(memory.argument_size_in_bytes).strip()} MiB")
  print(f"  {'PASS' if result['passed'] else 'FAIL'}  loss {first_loss:.6f} "
        f"vs float64 dense {reference:.6f} (relative error {error:.2e}, "
        f"limit {_DENSE_RTOL})")
  _write_json(result, _OUT.value or "runs/bench_step32k.json")
  return result["passed"]

_FSDP_RULES = ((".*", "fsdp"),)


def memory_variants(devices: int) -> dict[str, dict]:
  """{name: config overrides (dotted key -> value)}, baseline first.

  One lever at a time from the baseline, then combinations. FSDP meshes
  depend on the device count: (1, d) and (2, d / 2).
  """
  fsdp_all = {"mesh.data": 1, "mesh.fsdp": devices,
              "sharding_rules": _FSDP_RULES}
  variants = {
      "baseline": {},
      f"fsdp_1x{devices}": fsdp_all,
      f"fsdp_2x{devices // 2}": {"mesh.data": 2, "mesh.fsdp": devices // 2,
                                 "sharding_rules": _FSDP_RULES},
      "remat_full": {"model.remat_policy": "full"},
      "remat_dots": {"model.remat_policy": "dots_saveable"},
      "remat_dots_no_batch": {
          "model.remat_policy": "dots_with_no_batch_dims_saveable"},
      "bfloat16": {"model.dtype": "bfloat16"},
      "scan": {"model.scan": True},
      "accum_2": {"accum_steps": 2},
      "accum_4": {"accum_steps": 4},
      "scan+remat_full": {"model.scan": True, "model.remat_policy": "full"},
      "remat_full+accum_4": {"model.remat_policy": "full", "accum_steps": 4},
      f"fsdp_1x{devices}+remat_full+bf16+accum_4": {
          **fsdp_all, "model.remat_policy": "full",
          "model.dtype": "bfloat16", "accum_steps": 4},
  }
  if devices < 4 or devices % 2:  # No (2, d/2) FSDP mesh to speak of.
    del variants[f"fsdp_2x{devices // 2}"]
  return variants


def with_overrides(config, overrides: dict):
  """A copy of config with each dotted key set to its value."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _random_batch(config, mesh, seed=0):
  """A global batch of the config's shapes: uint8 pixels (as training ships
  them, normalised in the step) and random tokens."""
  rng = np.random.default_rng(seed)
  n, size = config.batch_size, config.model.image.image_size
  length = config.model.text.context_length
  return sharding_lib.host_to_global({
      "image": rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8),
      "text": rng.integers(3, config.model.text.vocab_size,
                           (n, length)).astype(np.int32)}, mesh)


# XLA:CPU's memory-minimising scheduler (a DebugOptions field, per compile).
CPU_MEMORY_SCHEDULER = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def bench_memory(config, repeats: int, compiler_options=None) -> dict:
  """Per-device compiled memory and ms/step of one config's train step."""
  config_lib.validate(config, device_count=jax.device_count())
  step, state, mesh = _make_step(config)
  batch = _random_batch(config, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile(
      compiler_options=compiler_options or {})
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  state, metrics = compiled(state, batch)  # Warm-up.
  loss = float(jax.device_get(metrics["loss"]))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  figures = {
      "temp_bytes": int(memory.temp_size_in_bytes),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
  }
  # Donated state: its outputs reuse the argument buffers (alias).
  figures["peak_bytes"] = (figures["argument_bytes"] + figures["temp_bytes"] +
                           figures["output_bytes"] - figures["alias_bytes"])
  return {**figures, "mesh": dict(mesh.shape), "compile_seconds": compile_s,
          "ms_per_step_median": 1e3 * statistics.median(seconds),
          "ms_per_step": [1e3 * s for s in seconds], "first_loss": loss}


def main_memory():
  """The memory levers of bench_memory, as a table and JSON."""
  path, _, arg = _CONFIG.value.partition(":")
  base = config_lib.load_config_file(path, arg or None)
  base.mesh.data, base.mesh.fsdp = -1, 1
  devices = jax.device_count()
  variants = memory_variants(devices)
  names = _VARIANTS.value or list(variants)
  unknown = sorted(set(names) - set(variants))
  if unknown:
    raise app.UsageError(f"--variants {unknown} unknown; expected names "
                         f"from {', '.join(variants)}.")
  if names[0] != "baseline":
    names = ["baseline"] + [n for n in names if n != "baseline"]
  scheduler = _CPU_SCHEDULER.value
  options = (CPU_MEMORY_SCHEDULER if scheduler == "memory" and
             jax.default_backend() == "cpu" else {})
  print(f"memory levers: {_CONFIG.value}, batch {base.batch_size} over "
        f"{devices} devices, per device; ms/step median of "
        f"{_REPEATS.value} steps after a warm-up; XLA:CPU scheduler "
        f"{scheduler}")
  print(f"{'variant':<36}{'mesh':>6}{'temp':>8}{'args':>8}{'out':>8}"
        f"{'alias':>8}{'peak':>8}{'x base':>8}{'ms/step':>9}{'x base':>8}"
        f"{'loss':>10}")
  rows = {}
  for name in names:
    row = bench_memory(with_overrides(base, variants[name]), _REPEATS.value,
                       options)
    row["overrides"] = {k: list(v) if isinstance(v, tuple) else v
                        for k, v in variants[name].items()}
    rows[name] = row
    ref = rows["baseline"]
    mesh = f"{row['mesh']['data']}x{row['mesh']['fsdp']}"
    print(f"{name:<36}{mesh:>6}" + "".join(
        f"{row[k] / 2**20:8.1f}" for k in ("temp_bytes", "argument_bytes",
                                           "output_bytes", "alias_bytes",
                                           "peak_bytes")) +
          f"{row['peak_bytes'] / ref['peak_bytes']:8.2f}"
          f"{row['ms_per_step_median']:9.1f}"
          f"{row['ms_per_step_median'] / ref['ms_per_step_median']:8.2f}"
          f"{row['first_loss']:10.5f}", flush=True)
  print("(MiB per device; peak = args + temp + out - alias)")
  _write_json({"config": _CONFIG.value, "devices": devices,
               "batch_size": base.batch_size, "repeats": _REPEATS.value,
               "cpu_scheduler": scheduler, "compiler_options": options,
               "variants": rows}, _OUT.value or "runs/bench_memory.json")


def main_ab():
  """Variants of one model's train step, alternated in one process.

  Each variant (config overrides and/or XLA compile options) is compiled
  once; then every round times one window of --steps_per_window steps of
  each, in turn. Prints the median of the per-round ratios to the first
  variant: on a shared machine, the figure to trust.
  """
  variants = json.loads(_AB.value or '{"base": {}}')
  base_config = step_config(_MODEL.value, _CONFIG.value, _BATCH.value)
  n, steps = base_config.batch_size, _STEPS.value
  runs = {}
  for label, spec in variants.items():
    config = with_overrides(base_config, spec.get("set", {}))
    compiled, state, batch, compile_s, _ = compiled_step(config,
                                                         spec.get("xla"))
    runs[label] = _timed_steps(compiled, state, lambda b=batch: b)
    runs[label]()  # Warm-up.
    print(f"{label}: compiled in {compile_s:.1f} s", flush=True)
  rates = {label: [] for label in runs}
  for r in range(_ROUNDS.value):
    for label, one_step in runs.items():
      rates[label].append(_median_rate(one_step, n, 1, steps)[0])
    print(f"round {r + 1}: " + ", ".join(
        f"{k} {v[-1]:.1f}" for k, v in rates.items()) + f" ex/s (load "
          f"{os.getloadavg()[0]:.1f})", flush=True)
  base = next(iter(runs))
  result = {"model": _MODEL.value or _CONFIG.value, "batch_size": n,
            "machine": machine_description(), "variants": variants,
            "rates": rates, "ratio_median": {}}
  for label in runs:
    ratios = [a / b for a, b in zip(rates[label], rates[base])]
    result["ratio_median"][label] = statistics.median(ratios)
    print(f"{label:<16} median {statistics.median(rates[label]):8.1f} ex/s, "
          f"x{statistics.median(ratios):.3f} vs {base} (rounds "
          f"{', '.join(f'{x:.2f}' for x in ratios)})")
  _write_json(result, _OUT.value or "runs/bench_ab.json")


def main_profile():
  """Time shares of the compiled step by op category (jax.profiler)."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  config = with_overrides(
      step_config(_MODEL.value, _CONFIG.value, _BATCH.value),
      parse_overrides(_SET.value))
  options = json.loads(_XLA_OPTIONS.value) if _XLA_OPTIONS.value else None
  compiled, state, batch, _, _ = compiled_step(config, options)
  one_step = _timed_steps(compiled, state, lambda: batch)
  one_step()
  categories = hlo_lib.thunk_categories(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(_STEPS.value):
        one_step()
    path = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in categories:
      totals[categories[e["name"]]] += e.get("dur", 0)
  total = sum(totals.values())
  print(f"{_MODEL.value or _CONFIG.value}, batch {config.batch_size}: thunk "
        f"time by op ({_STEPS.value} steps; thunks may overlap)")
  for kind, micros in totals.most_common():
    print(f"  {kind:<12} {100 * micros / total:5.1f}%  "
          f"{micros / 1e3 / _STEPS.value:9.1f} ms/step")
  _write_json({"model": _MODEL.value or _CONFIG.value,
               "batch_size": config.batch_size,
               "ms_per_step": {k: v / 1e3 / _STEPS.value
                               for k, v in totals.items()}},
              _OUT.value or "runs/bench_profile.json")


def main_patch():
  """The patch embedding alone (forward + kernel gradient, jitted): conv vs
  matmul (vit.PATCH_EMBEDS), alternated for --ab_rounds rounds of
  --steps_per_window calls; a small-memory stand-in for `ab` on big towers.
  """
  from clip_jax.models import vit  # pylint: disable=g-import-not-at-top
  config = step_config(_MODEL.value, _CONFIG.value, _BATCH.value)
  tower = vit.build(config.model.image, activation="gelu",
                    dtype=jnp.float32, remat_policy="none", scan=False)
  images = jnp.asarray(float_batch_arrays(config)["image"])
  params = None
  fns = {}
  for kind in vit.PATCH_EMBEDS:
    if kind == "matmul":
      module = vit.MatmulPatchEmbed(tower.width, tower.patch_size,
                                    tower.patch_bias, jnp.float32)
    else:
      p = tower.patch_size
      module = nn.Conv(tower.width, (p, p), strides=(p, p), padding="VALID",
                       use_bias=tower.patch_bias)
    if params is None:  # Same params for both (same names and shapes).
      params = module.init(jax.random.key(0), images[:1])
    def loss(params, images, module=module):
      return jnp.sum(jnp.square(module.apply(params, images)))
    grad = jax.jit(jax.value_and_grad(loss))  # Params only, as training.
    jax.block_until_ready(grad(params, images))
    fns[kind] = lambda grad=grad, params=params: jax.block_until_ready(
        grad(params, images))
  rates = {k: [] for k in fns}
  for _ in range(_ROUNDS.value):
    for kind, fn in fns.items():
      rates[kind].append(_median_rate(fn, config.batch_size, 1,
                                      _STEPS.value)[0])
  ratios = [m / c for m, c in zip(rates["matmul"], rates["conv"])]
  conv, matmul = (statistics.median(rates[k]) for k in ("conv", "matmul"))
  print(f"patch embedding fwd + kernel grad, {_MODEL.value or _CONFIG.value}"
        f", batch {config.batch_size}: conv {conv:.1f}, "
        f"matmul {matmul:.1f} ex/s; matmul x"
        f"{statistics.median(ratios):.3f} vs conv (rounds "
        f"{', '.join(f'{x:.2f}' for x in ratios)}; load "
        f"{os.getloadavg()[0]:.1f})")


COMMANDS = {"step": main_step, "ab": main_ab, "profile": main_profile,
            "patch": main_patch,
            "loss": main_loss, "step32k": main_step32k, "memory": main_memory}


def main(argv):
  command = argv[1] if len(argv) > 1 else "step"
  if command not in COMMANDS or len(argv) > 2:
    raise app.UsageError(
        f"Unknown command {' '.join(argv[1:])!r}; expected one of "
        f"{', '.join(COMMANDS)} (default step).")
  if _DEVICES.value is not None:
    # Must precede the first use of the backend (nothing above touches it).
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  logging.set_verbosity(logging.WARNING)
  passed = COMMANDS[command]()
  if passed is False:
    raise SystemExit("some targets FAILED (see above)")


if __name__ == "__main__":
  host_malloc.reexec_if_wanted()  # As cli.run: huge-page host buffers.
  app.run(main)
