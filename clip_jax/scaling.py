"""Memory and communication of a CLIP training step, from formulas.

Pure arithmetic (no JAX): docs/scaling.md prints its tables from here and
tests/test_scaling.py checks the formulas against compiled programs at a
small size. Bytes are per device and per optimiser step unless named
otherwise. Collective bytes follow clip_jax.hlo's convention (the logical
buffer: the gathered array, the array before reduce-scatter, the array
all-reduced, the block permuted); `wire_bytes` converts them to what a ring
algorithm puts on the wire.

Symbols: N global batch, d devices, n = N / d rows per device, D embedding
width, P parameter count, f the FSDP axis size, k accum_steps.
"""

from __future__ import annotations

import dataclasses

F32 = 4


# --------------------------------------------------------------- parameters

def block_params(width: int, mlp_dim: int) -> int:
  """One pre-LN block: q, k, v, out (kernels + biases), MLP, two LayerNorms."""
  attention = 4 * width * width + 4 * width
  mlp = 2 * width * mlp_dim + mlp_dim + width
  return attention + mlp + 2 * 2 * width


def vit_params(width, depth, mlp_dim, patch_size, image_size,
               pool="cls", ln_pre=True) -> int:
  tokens = (image_size // patch_size) ** 2 + (pool == "cls")
  if pool != "cls":
    raise NotImplementedError(f"pool={pool!r}: only 'cls' is counted here.")
  embed = patch_size * patch_size * 3 * width + width + tokens * width
  return (embed + 2 * width * ln_pre + depth * block_params(width, mlp_dim) +
          2 * width)


def text_params(width, depth, mlp_dim, vocab_size, context_length) -> int:
  return ((vocab_size + context_length) * width +
          depth * block_params(width, mlp_dim) + 2 * width)


@dataclasses.dataclass(frozen=True)
class Tower:
  """The shape of a transformer tower, enough for memory and FLOPs."""
  width: int
  depth: int
  mlp_dim: int
  heads: int
  tokens: int  # Sequence length (image patches + class token, or context).
  params: int


def towers(model_config) -> tuple[Tower, Tower]:
  """(image, text) Towers of a config.model (variants resolved)."""
  from clip_jax.models import text, vit  # pylint: disable=g-import-not-at-top
  img_cfg, txt_cfg = model_config.image, model_config.text
  i = {**vit.VARIANTS[img_cfg.variant],
       **{k: img_cfg[k] for k in vit.VARIANTS["mu"] if img_cfg.get(k)}}
  t = {**text.VARIANTS[txt_cfg.variant],
       **{k: txt_cfg[k] for k in text.VARIANTS["mu"] if txt_cfg.get(k)}}
  image_tokens = (img_cfg.image_size // i["patch_size"]) ** 2 + 1
  image = Tower(i["width"], i["depth"], i["mlp_dim"], i["heads"], image_tokens,
                vit_params(i["width"], i["depth"], i["mlp_dim"],
                           i["patch_size"], img_cfg.image_size,
                           img_cfg.get("pool", "cls"),
                           bool(img_cfg.get("ln_pre", True))))
  txt = Tower(t["width"], t["depth"], t["mlp_dim"], t["heads"],
              txt_cfg.context_length,
              text_params(t["width"], t["depth"], t["mlp_dim"],
                          txt_cfg.vocab_size, txt_cfg.context_length))
  return image, txt


def clip_params(model_config) -> int:
  """All parameters: towers, both projections, logit scale (and bias)."""
  image, txt = towers(model_config)
  heads = (image.width + txt.width) * model_config.embed_dim
  scalars = 1 + (model_config.get("logit_bias_init") is not None)
  return image.params + txt.params + heads + scalars


# --------------------------------------------------------------- activations

def block_saved_elements(tower: Tower) -> int:
  """Elements one block keeps per example for its backward pass (no remat).

  Residual input and LN1 output, q, k, v, the attention output, the second
  residual and LN2 output (8 [L, width]); the MLP's hidden pre- and post-
  activation (2 [L, mlp]); the attention probabilities ([heads, L, L]).
  """
  length = tower.tokens
  return (8 * length * tower.width + 2 * length * tower.mlp_dim +
          tower.heads * length * length)


def tower_activation_bytes(tower: Tower, examples: int, dtype_bytes: int,
                           remat: bool) -> int:
  """Peak activation bytes of one tower's forward + backward.

  Without remat every block's saved elements are live at the start of the
  backward pass. With per-block remat only each block's input [L, width]
  is saved, plus one block's saved elements while it is recomputed. Both
  add one block's worth of gradients in flight during its backward.
  """
  per_block = block_saved_elements(tower)
  if remat:
    elements = tower.depth * tower.tokens * tower.width + 2 * per_block
  else:
    elements = (tower.depth + 1) * per_block
  return examples * elements * dtype_bytes


# ---------------------------------------------------------------------- loss

# The losses whose memory and communication this model counts (the paper
# settings); the others (multi_positive, vse_*) have their own HLO tests in
# tests/test_losses.py.
MODELLED_LOSSES = ("softmax", "sigmoid", "sigmoid_chunked")


def _check_modelled(loss: str) -> None:
  if loss not in MODELLED_LOSSES:
    raise ValueError(f"The scaling model counts the losses {MODELLED_LOSSES}"
                     f", not {loss!r}.")


def loss_temp_bytes(loss: str, n_global: int, embed_dim: int,
                    devices: int) -> int:
  """Per-device temporaries of the sharded loss's forward + backward.

  Gathered losses hold the gathered [N, D] embeddings and their [N, D]
  gradients (softmax: both modalities); every loss computes [n, n] blocks
  (softmax: two alive at once, the logits and their softmax-gradient;
  sigmoid: three, with an elementwise temporary; the ring's backward four,
  with the +-1 label block), and the ring two [n, D] blocks (the texts
  arriving and their gradient). Counted from the compiled programs' buffer
  assignment (tests/test_scaling.py holds them to it).
  """
  _check_modelled(loss)
  n = n_global // devices
  blocks = {"softmax": 2, "sigmoid": 3, "sigmoid_chunked": 4}[loss]
  blocks *= n * n * F32
  gathered = {"softmax": 4, "sigmoid": 2, "sigmoid_chunked": 0}[loss]
  ring = 2 * n * embed_dim * F32 if loss == "sigmoid_chunked" else 0
  return blocks + gathered * n_global * embed_dim * F32 + ring


def loss_collectives(loss: str, n_global: int, embed_dim: int,
                     devices: int) -> dict[str, tuple[int, int]]:
  """{kind: (count, bytes)} of the loss's embedding collectives (exact).

  The scalar all-reduces (loss value, scale and bias gradients) are left
  out. softmax gathers both modalities and reduce-scatters both gradients;
  sigmoid only the texts. The ring (sigmoid_chunked) sends its [n, D] texts
  d - 1 hops forward, then in the backward the texts again (d - 1 hops) and
  their gradient (d - 1 hops, one behind, plus one hop home).
  """
  _check_modelled(loss)
  n = n_global // devices
  full, block = n_global * embed_dim * F32, n * embed_dim * F32
  if loss == "sigmoid_chunked":
    hops = 3 * (devices - 1) + 1
    return {"collective-permute": (hops, hops * block)}
  modalities = {"softmax": 2, "sigmoid": 1}[loss]
  return {"all-gather": (modalities, modalities * full),
          "reduce-scatter": (modalities, modalities * full)}


def wire_bytes(kind: str, logical_bytes: float, group: int) -> float:
  """What a ring algorithm sends per device for a collective's buffer."""
  if kind == "all-reduce":
    return logical_bytes * 2 * (group - 1) / group
  if kind == "collective-permute":
    return logical_bytes
  return logical_bytes * (group - 1) / group


def ring_time(devices: int, n_per_device: int, embed_dim: int, *,
              hop_latency_s: float, link_bytes_per_s: float,
              flops_per_s: float, bidirectional: bool = False) -> dict:
  """Forward time of the ring loss: per hop max(compute, transfer) + latency.

  With overlap each hop costs max(block compute, block transfer) plus the
  hop's fixed latency; the sequential ring costs their sum. A bidirectional
  ring sends blocks both ways (two links, two blocks per step), so it needs
  ceil((d - 1) / 2) steps of up to twice the compute instead of d - 1.
  """
  block_flops = 2 * n_per_device * n_per_device * embed_dim
  transfer = n_per_device * embed_dim * F32 / link_bytes_per_s
  compute = block_flops / flops_per_s
  if bidirectional:  # Two blocks a step (one from each side), odd one last.
    blocks = [2] * ((devices - 1) // 2) + [1] * ((devices - 1) % 2)
  else:
    blocks = [1] * (devices - 1)
  steps = len(blocks)
  overlapped = sum(max(b * compute, transfer) + hop_latency_s
                   for b in blocks) + compute
  sequential = sum(b * compute + transfer + hop_latency_s
                   for b in blocks) + compute
  return {"hops": steps, "block_compute_s": compute, "hop_transfer_s":
          transfer, "overlapped_s": overlapped, "sequential_s": sequential,
          "latency_share": steps * hop_latency_s / overlapped}


# ----------------------------------------------------------- the whole step

@dataclasses.dataclass(frozen=True)
class Setting:
  """A training configuration at scale."""
  image: Tower
  text: Tower
  params: int
  embed_dim: int
  global_batch: int
  devices: int
  fsdp: int = 1  # FSDP axis size (params, grads and Adam state split f ways).
  accum_steps: int = 1
  remat: bool = False
  compute_bytes: int = 2  # bfloat16 activations.
  loss: str = "softmax"


def memory(s: Setting) -> dict[str, float]:
  """Per-device bytes of each part of the step, and their sum (`total`).

  float32 params, gradients and Adam's two moments, divided by f under
  FSDP (plus, under FSDP, the largest tower's params gathered at once, an
  upper bound XLA usually beats by gathering layer by layer); activations of
  one micro-batch (n / k examples); the loss over the whole global batch.
  """
  per_device = s.global_batch // s.devices
  micro = per_device // s.accum_steps
  params = s.params * F32 / s.fsdp
  gathered = 0 if s.fsdp == 1 else max(s.image.params, s.text.params) * F32
  activations = sum(
      tower_activation_bytes(t, micro, s.compute_bytes, s.remat)
      for t in (s.image, s.text))
  # GradCache keeps the whole local batch's embeddings and their gradients.
  cached = 4 * per_device * s.embed_dim * F32 if s.accum_steps > 1 else 0
  parts = {
      "params": params, "grads": params, "adam": 2 * params,
      "fsdp_gathered": gathered, "activations": activations,
      "embedding_cache": cached,
      "loss": loss_temp_bytes(s.loss, s.global_batch, s.embed_dim, s.devices),
  }
  parts["total"] = sum(parts.values())
  return parts


def communication(s: Setting) -> dict[str, dict]:
  """{collective: {count, bytes, wire_bytes}} per device per step.

  The loss's collectives; the data-parallel gradient all-reduce over the
  'data' axis (P / f float32 values); under FSDP, the parameter all-gathers
  and one reduce-scatter of the gradients over the 'fsdp' axis (TPU/GPU;
  XLA:CPU emits an all-reduce of the same bytes instead).
  """
  rows = {}
  for kind, (count, size) in loss_collectives(
      s.loss, s.global_batch, s.embed_dim, s.devices).items():
    rows[f"loss {kind}"] = dict(count=count, bytes=size,
                                wire_bytes=wire_bytes(kind, size, s.devices))
  grads = s.params * F32
  data_parallel = s.devices // s.fsdp
  if data_parallel > 1:
    shard = grads / s.fsdp
    rows["grad all-reduce (data axis)"] = dict(
        count=1, bytes=shard,
        wire_bytes=wire_bytes("all-reduce", shard, data_parallel))
  if s.fsdp > 1:
    # One gather when the whole batch is one pass (XLA keeps the gathered
    # params for the backward, as the compiled step shows); with k micro-
    # batches, one per pass unless XLA hoists it out of the loop.
    gathers = 1 if s.accum_steps == 1 else 2 * s.accum_steps
    rows["param all-gather (fsdp axis)"] = dict(
        count=gathers, bytes=gathers * grads,
        wire_bytes=gathers * wire_bytes("all-gather", grads, s.fsdp))
    rows["grad reduce-scatter (fsdp axis)"] = dict(
        count=1, bytes=grads,
        wire_bytes=wire_bytes("reduce-scatter", grads, s.fsdp))
  return rows


def smallest_fit(s: Setting, chip_bytes: float, headroom: float = 0.8):
  """The cheapest (fsdp, remat, accum_steps) whose memory fits the chip.

  Tries, in order of cost: more FSDP first (it only adds communication),
  then remat (a third more compute), then accumulation (k more passes of
  small matmuls); within `headroom` of the chip to leave room for XLA's
  own buffers. None if nothing fits.
  """
  per_device = s.global_batch // s.devices
  fsdps = [f for f in (1, 2, 4, 8, 16, 32, 64) if s.devices % f == 0]
  accums = [k for k in (1, 2, 4, 8, 16, 32) if per_device % k == 0]
  for remat in (False, True):
    for accum in accums:
      for fsdp in fsdps:
        trial = dataclasses.replace(s, fsdp=fsdp, remat=remat,
                                    accum_steps=accum)
        if memory(trial)["total"] <= headroom * chip_bytes:
          return trial
  return None


# ------------------------------------------------- the paper settings (docs)

GiB = 2**30
CHIPS = {  # name: (devices, bytes of memory per device)
    "v4-64 (32 chips, 32 GiB)": (32, 32 * GiB),
    "8x8 H100 (64 GPUs, 80 GB)": (64, 80e9),
}


def paper_setting(devices: int, loss: str = "softmax", **kw) -> Setting:
  """ViT-B/16 at 224 px + CLIP's base text tower, D=512, N=32,768."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  model = ml_collections.ConfigDict(dict(
      embed_dim=512, logit_bias_init=None,
      image=dict(variant="B/16", image_size=224, pool="cls"),
      text=dict(variant="base", vocab_size=49408, context_length=77)))
  image, text = towers(model)
  return Setting(image, text, clip_params(model), 512, 32768, devices,
                 loss=loss, **kw)


def _gib(x):
  return f"{x / GiB:.2f}"


def memory_table() -> str:
  keys = ("params", "grads", "adam", "fsdp_gathered", "activations",
          "embedding_cache", "loss", "total")
  lines = ["| cluster | fsdp | remat | accum | " + " | ".join(keys) +
           " | fits |", "|" + "---|" * (len(keys) + 5)]
  for name, (devices, chip) in CHIPS.items():
    for fsdp, remat, accum in ((1, False, 1), (1, True, 1), (1, False, 4),
                               (1, True, 4), (devices, False, 1),
                               (devices, True, 8)):
      s = paper_setting(devices, fsdp=fsdp, remat=remat, accum_steps=accum)
      m = memory(s)
      lines.append(f"| {name} | {fsdp} | {remat} | {accum} | " +
                   " | ".join(_gib(m[k]) for k in keys) +
                   f" | {'yes' if m['total'] <= 0.8 * chip else 'no'} |")
  return "\n".join(lines)


def communication_table() -> str:
  lines = ["| cluster | loss | fsdp | accum | collective | count | GiB | "
           "wire GiB |", "|---|---|---|---|---|---|---|---|"]
  for name, (devices, _) in CHIPS.items():
    for loss, fsdp, accum in (("softmax", 1, 1), ("sigmoid_chunked", 1, 1),
                              ("softmax", devices, 1),
                              ("softmax", devices, 4)):
      s = paper_setting(devices, loss=loss, fsdp=fsdp, accum_steps=accum)
      for kind, row in communication(s).items():
        lines.append(f"| {name} | {loss} | {fsdp} | {accum} | {kind} | "
                     f"{row['count']} | {_gib(row['bytes'])} | "
                     f"{_gib(row['wire_bytes'])} |")
  return "\n".join(lines)


def fit_table() -> str:
  lines = ["| cluster | chip memory | fsdp | remat | accum | total GiB |",
           "|---|---|---|---|---|---|"]
  for name, (devices, chip) in CHIPS.items():
    for memory_bytes in (16 * GiB, chip):
      s = smallest_fit(paper_setting(devices), memory_bytes)
      if s is None:
        lines.append(f"| {name} | {_gib(memory_bytes)} | - | - | - | "
                     "does not fit |")
        continue
      lines.append(f"| {name} | {_gib(memory_bytes)} | {s.fsdp} | "
                   f"{s.remat} | {s.accum_steps} | "
                   f"{_gib(memory(s)['total'])} |")
  return "\n".join(lines)


def ring_table(devices=1024, hop_latency_s=5e-6, link_bytes_per_s=45e9,
               flops_per_s=50e12) -> str:
  lines = ["| ring | hops | block compute | hop transfer | overlapped | "
           "sequential | latency share |", "|---|---|---|---|---|---|---|"]
  n = 32768 // devices
  for bidirectional in (False, True):
    r = ring_time(devices, n, 512, hop_latency_s=hop_latency_s,
                  link_bytes_per_s=link_bytes_per_s, flops_per_s=flops_per_s,
                  bidirectional=bidirectional)
    lines.append(
        f"| {'bidirectional' if bidirectional else 'one-way'} | {r['hops']} "
        f"| {r['block_compute_s'] * 1e6:.1f} us | "
        f"{r['hop_transfer_s'] * 1e6:.1f} us | "
        f"{r['overlapped_s'] * 1e3:.2f} ms | {r['sequential_s'] * 1e3:.2f} ms "
        f"| {100 * r['latency_share']:.0f}% |")
  return "\n".join(lines)


if __name__ == "__main__":
  s = paper_setting(32)
  print(f"params: {s.params:,} (image {s.image.params:,}, text "
        f"{s.text.params:,})\n")
  print(memory_table(), "\n")
  print(communication_table(), "\n")
  print(fit_table(), "\n")
  print(ring_table())


# ---------------------------------------------------------------- step time

def tower_forward_flops(tower: Tower, embed_params: int = 0) -> float:
  """Forward FLOPs per example: 2 x (matmul params) x tokens + attention.

  embed_params: parameters used by lookup, not matmul (token / position
  embeddings), left out of the 2 P L term. Attention adds q k^T and p v:
  2 x 2 x L^2 x width per block.
  """
  matmul = tower.params - embed_params
  return (2 * matmul * tower.tokens +
          4 * tower.tokens ** 2 * tower.width * tower.depth)


def step_seconds(s: Setting, peak_flops_per_s: float, mfu: float = 0.5,
                 vocab_size: int = 49408) -> float:
  """Compute time of one step: forward + backward (3x forward), one more
  forward with remat, and one more with exact accumulation (the embedding
  pass), at `mfu` of the cluster's peak. Communication is assumed hidden."""
  text_embed = (vocab_size + s.text.tokens) * s.text.width
  image_embed = s.image.tokens * s.image.width
  forward = (tower_forward_flops(s.image, image_embed) +
             tower_forward_flops(s.text, text_embed))
  passes = 3 + s.remat + (s.accum_steps > 1)
  return (passes * forward * s.global_batch /
          (s.devices * peak_flops_per_s * mfu))
