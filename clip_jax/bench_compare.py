r"""clip_jax's train step against open_clip's, same architecture, one run.

  python -m clip_jax.bench_compare [--models demo:256,b32:64] [--rounds 3] \
      [--out runs/bench_compare.json]

A benchmark, not runtime code: it imports torch and open_clip, which only
requirements-dev.txt pins (`make bench-compare` runs it in .venv, where
`make install` put them). Nothing else in clip_jax imports this module.

For each model (bench.STEP_MODELS: demo = configs/demo.py's towers, b32 =
ViT-B/32 with CLIP's 12 x 512 text tower), both programs train the same
architecture on the same random batch (float32, one device): open_clip's
CLIP (its VisionTransformer / TextTransformer with the same widths, depths,
heads, MLP widths, patch size, activation — 'gelu' is the tanh GELU on both
sides —, class token, ln_pre, EOS pooling, causal text mask) and ClipLoss,
torch.optim.AdamW with the config's lr, betas, eps and weight decay on the
>= 2-dim params, the config's gradient-norm clip, and the logit-scale clamp
after the update; clip_jax's jitted train step (bench.compiled_step). Torch
runs with as many intra-op threads as there are usable cores, the number
XLA:CPU's thread pool uses.

Each program runs in its own process (built once, then idle on a pipe while
the other runs). The two programs alternate `--rounds` times (jax, torch,
jax, torch, ...);
each turn is one untimed step, then the median examples/s of
`--turn_windows` windows of `--turn_steps` steps. The machine is shared, so
the figure to read is the ratio clip_jax / open_clip of each round, and
their median. The 1-minute load average is printed beside each round: on
a machine busier than its cores, torch's OpenMP threads lose much more than
XLA's thread pool, so only rounds at a load below the core count compare
the programs rather than their tolerance of a crowded machine.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics

import numpy as np
import torch
from absl import app, flags, logging

from clip_jax import bench, host_malloc

_MODELS = flags.DEFINE_list(
    "models", ["demo:256", "b32:64"],
    "name:batch pairs; names from bench.STEP_MODELS.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternations jax/torch.")
_WINDOWS = flags.DEFINE_integer("turn_windows", None,
                                "Windows per turn (default: demo 3, b32 1).")
_STEPS = flags.DEFINE_integer(
    "turn_steps", None, "Steps per window (default: demo 5, b32 1).")
_DEFAULT_WINDOWS = {"demo": (3, 5), "b32": (1, 1)}


def open_clip_model(model_config):
  """open_clip's CLIP with the architecture of a clip_jax config.model."""
  import open_clip  # pylint: disable=g-import-not-at-top

  from clip_jax.models import common, text, vit  # pylint: disable=g-import-not-at-top
  img = common.resolve_variant(model_config.image, vit.VARIANTS, "image")
  txt = common.resolve_variant(model_config.text, text.VARIANTS, "text")
  activation = model_config.activation
  act_kwargs = {"gelu": {"approximate": "tanh"}, "gelu_exact": None,
                "quick_gelu": None}[activation]
  if model_config.image.pool != "cls" or model_config.text.pool != "eos":
    raise ValueError("bench_compare builds CLIP-style towers only (image "
                     "pool 'cls', text pool 'eos').")
  vision = open_clip.CLIPVisionCfg(
      layers=img["depth"], width=img["width"],
      head_width=img["width"] // img["heads"],
      mlp_ratio=img["mlp_dim"] / img["width"], patch_size=img["patch_size"],
      image_size=model_config.image.image_size,
      no_ln_pre=not model_config.image.get("ln_pre", True),
      act_kwargs=act_kwargs)
  text_cfg = open_clip.CLIPTextCfg(
      context_length=model_config.text.context_length,
      vocab_size=model_config.text.vocab_size, width=txt["width"],
      heads=txt["heads"], layers=txt["depth"],
      mlp_ratio=txt["mlp_dim"] / txt["width"],
      pad_id=model_config.text.pad_id, eos_id=model_config.text.eos_id,
      pool_type="eos", no_causal_mask=not model_config.text.causal,
      act_kwargs=act_kwargs)
  return open_clip.CLIP(
      embed_dim=model_config.embed_dim, vision_cfg=vision, text_cfg=text_cfg,
      quick_gelu=activation == "quick_gelu",
      init_logit_scale=math.log(model_config.logit_scale_init))


def torch_step(config, images: np.ndarray, tokens: np.ndarray):
  """A no-argument function running one open_clip train step."""
  import open_clip  # pylint: disable=g-import-not-at-top
  model = open_clip_model(config.model).train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW(
      [{"params": decay, "weight_decay": config.wd},
       {"params": no_decay, "weight_decay": 0.0}],
      lr=config.lr, betas=(config.adam.b1, config.adam.b2),
      eps=config.adam.eps)
  loss_fn = open_clip.ClipLoss()
  cap = config.model.get("logit_scale_max")
  image_batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  text_batch = torch.from_numpy(tokens).long()

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    zimg, ztxt, scale = model(image_batch, text_batch)
    loss = loss_fn(zimg, ztxt, scale)
    loss.backward()
    if config.grad_clip_norm is not None:
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    optimizer.step()
    if cap is not None:
      with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(cap))
    return loss.item()  # As jax's step returns its loss, synced.

  return one_step, sum(p.numel() for p in model.parameters())


def _jax_turns(name: str, batch: int):
  """(a no-argument step function, facts) of clip_jax's compiled step."""
  config = bench.step_config(name, "", batch)
  compiled, state, jax_batch, compile_s, _ = bench.compiled_step(config)
  one_step = bench._timed_steps(compiled, state, lambda: jax_batch)  # pylint: disable=protected-access
  return one_step, {"compile_seconds": compile_s}


def _torch_turns(name: str, batch: int):
  config = bench.step_config(name, "", batch)
  arrays = bench.float_batch_arrays(config)  # The batch jax gets (seed 0).
  one_step, params = torch_step(config, arrays["image"], arrays["text"])
  return one_step, {"params": params}


def _worker(kind: str, name: str, batch: int, threads: int, conn):
  """Builds one program, then times a turn whenever asked (over conn).

  Each program lives in its own process, idle (blocked on the pipe) while
  the other runs: no thread pool of one spins beside the other's work.
  """
  logging.set_verbosity(logging.WARNING)
  if kind == "torch":
    torch.set_num_threads(threads)
  one_step, facts = (_jax_turns if kind == "jax" else _torch_turns)(name,
                                                                     batch)
  one_step()  # Warm-up (and, for jax, the first run of the compiled step).
  conn.send(facts)
  while (request := conn.recv()) is not None:
    windows, steps = request
    # Untimed: the first step after the other program's turn is not what
    # training sees (its steps run back to back). On the 2-core VM of the
    # README, clip_jax's B/32 step took 3.9 ex/s after 15 s idle and 6.6
    # back to back (open_clip's did not slow down).
    one_step()
    conn.send(bench._median_rate(one_step, batch, windows, steps)[0])  # pylint: disable=protected-access


def compare_model(name: str, batch: int, rounds: int, windows: int,
                  steps: int, threads: int) -> dict:
  """Alternating turns of clip_jax and open_clip on one model size."""
  context = multiprocessing.get_context("spawn")
  workers, facts = {}, {}
  for kind in ("jax", "torch"):
    parent, child = context.Pipe()
    process = context.Process(target=_worker,
                              args=(kind, name, batch, threads, child))
    process.start()
    child.close()  # A dead worker then ends recv() with EOFError, no hang.
    workers[kind] = (process, parent)
    facts[kind] = parent.recv()  # Built and warmed up, before the next.
  turns = []
  try:
    for r in range(rounds):
      rates = {}
      for kind in ("jax", "torch"):
        workers[kind][1].send((windows, steps))
        rates[kind] = workers[kind][1].recv()
      turns.append({"clip_jax": rates["jax"], "open_clip": rates["torch"],
                    "ratio": rates["jax"] / rates["torch"],
                    "load_average_1min": os.getloadavg()[0]})
      print(f"  {name} batch {batch} round {r + 1}: clip_jax "
            f"{rates['jax']:8.2f} ex/s, open_clip {rates['torch']:8.2f} "
            f"ex/s, ratio {rates['jax'] / rates['torch']:.2f} (load "
            f"average {os.getloadavg()[0]:.1f})", flush=True)
  finally:
    for process, conn in workers.values():
      conn.send(None)
      process.join(timeout=60)
  ratio = statistics.median(t["ratio"] for t in turns)
  print(f"{name} batch {batch}: clip_jax / open_clip = {ratio:.2f} (median "
        f"of {rounds} alternated rounds)", flush=True)
  return {"model": name, "batch_size": batch, "rounds": turns,
          "ratio_median": ratio,
          "jax_compile_seconds": facts["jax"]["compile_seconds"],
          "torch_params": facts["torch"]["params"], "windows": windows,
          "steps_per_window": steps}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import open_clip  # pylint: disable=g-import-not-at-top
  threads = len(os.sched_getaffinity(0))
  machine = {**bench.machine_description(), "torch": torch.__version__,
             "open_clip": open_clip.__version__, "torch_threads": threads}
  print(f"clip_jax vs open_clip {open_clip.__version__} (torch "
        f"{torch.__version__}, {threads} threads), float32, one device")
  results = []
  for item in _MODELS.value:
    name, _, batch = item.partition(":")
    if name not in bench.STEP_MODELS or not batch.isdigit():
      raise app.UsageError(
          f"--models item {item!r}: expected name:batch with a name from "
          f"{sorted(bench.STEP_MODELS)}, e.g. demo:256.")
    windows, steps = _DEFAULT_WINDOWS[name]
    results.append(compare_model(
        name, int(batch), _ROUNDS.value, _WINDOWS.value or windows,
        _STEPS.value or steps, threads))
  # --out is bench's flag (absl flags are global); default here:
  bench._write_json({"machine": machine, "models": results},  # pylint: disable=protected-access
                    bench._OUT.value or "runs/bench_compare.json")  # pylint: disable=protected-access


if __name__ == "__main__":
  host_malloc.reexec_if_wanted()  # As cli.run: huge-page host buffers.
  app.run(main)
