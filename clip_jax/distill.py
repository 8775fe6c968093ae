"""Distillation from a frozen clip_jax teacher, inside the train step.

Config keys (`config.distill`, defaults in config.base_config;
teacher_workdir None = off, and the step is the plain contrastive one):
  teacher_workdir       a clip_jax workdir: a trained run, or what
                        `python -m clip_jax.convert` writes. Its model is
                        built from its config.json (as clip_jax.load does)
                        and its params restored onto this run's mesh with
                        this run's sharding_rules; they are frozen, passed
                        to the jitted step as an argument (not in the train
                        state, not checkpointed: read again on resume).
  teacher_step          its checkpoint; None = the latest at the run's
                        first start, recorded in its config.json so that
                        resumes read the same one (pin_teacher_step).
  feature_weight        weight of the feature term (0 = off).
  feature_loss          'cosine': mean over examples of 1 - cos(s, t);
                        'l2': mean over examples of ||s - t||^2 (summed over
                        dimensions). s: the student's normalised embedding,
                        through a learned bias-free projection to the
                        teacher's embed_dim when the two differ (params
                        'distill/{img,txt}_proj/kernel', trained with the
                        student; not re-normalised); t: the teacher's
                        normalised embedding. Summed over the two
                        modalities.
  relation_weight       weight of the relation term (0 = off).
  relation_temperature  None: each model's logits use its own logit scale
                        (the student's learnable one gets this term's
                        gradient too); a float T: both use 1 / T.

Both terms follow CLIP-KD (Yang et al. 2024, "CLIP-KD: An Empirical Study
of CLIP Model Distillation", CVPR): feature distillation (FD, an MSE
between embeddings with a linear projection when widths differ; their
F.mse_loss averages over the D dimensions where our 'l2' sums them, so
their weight 2000 is 2000 / D here; for unit vectors 'l2' of unprojected
embeddings is 2 x 'cosine') and contrastive relational distillation (CRD):
for each image, the softmax over the batch's texts of the teacher's logits
is the target of the student's, KL(teacher || student), and likewise for
each text over the images; the term is the sum of the two directions'
means over the global batch (TinyCLIP's affinity mimicking, Wu et al.
2023, "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight
Inheritance", ICCV, is the same two KLs). The total loss is contrastive +
feature_weight * feature + relation_weight * relation; each term is logged
unweighted ('distill/feature', 'distill/relation') beside
'contrastive_loss'.

Teacher and student read the same batch, so they must share the image
preprocessing (size, mean, std) and the tokenizer (name, vocabulary, case,
context length, EOS policy): `check_config` compares the two configs when
the run's config is validated and names the first difference.

Sharding. The feature term is per-example (GSPMD: local rows, a scalar
all-reduce). The relation term runs in shard_map like losses.softmax_loss:
each device all-gathers both models' embeddings and computes only its own
rows of the two similarity matrices, one [n, n] block at a time (log-sum-
exps streamed over column tiles, the cross term's scan rematerialised in the
backward pass); only scalars are all-reduced and the gradients of the
gathered student embeddings come back by reduce-scatter.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from clip_jax import config as config_lib
from clip_jax import losses

FEATURE_LOSSES = ("cosine", "l2")
PARAM_KEY = "distill"  # The projection's params: params['distill'].
# (teacher config key, what it is): the keys that must equal the
# student's, since one input pipeline feeds both models.
SHARED_INPUT_KEYS = (
    ("data.image_size", "image size"),
    ("data.mean", "pixel mean"),
    ("data.std", "pixel std"),
    ("data.tokenizer", "tokenizer"),
    ("data.lowercase", "tokenizer's lower-casing"),
    ("data.context_length", "context length"),
    ("data.eos_policy", "EOS policy"),
)


def enabled(config) -> bool:
  distill = config.get("distill") or {}
  return distill.get("teacher_workdir") is not None


def _workdir(config) -> str:
  return os.path.abspath(os.path.expanduser(config.distill.teacher_workdir))


def pin_teacher_step(config, stored):
  """`config` with distill.teacher_step made concrete, so that every
  segment of a run distils from one teacher checkpoint even while the
  teacher's workdir gains new ones (a teacher still training).

  `stored`: the run's saved config (None for a new run). A resume keeps
  the step its saved config recorded for the same teacher workdir; a new
  run (or a changed teacher) takes the teacher's latest checkpoint,
  process 0's listing (pretrained.source_step). An explicit
  teacher_step is kept as given.
  """
  if not enabled(config) or config.distill.get("teacher_step") is not None:
    return config
  from clip_jax import pretrained  # pylint: disable=g-import-not-at-top
  recorded = ((stored or {}).get("distill") or {})
  if (recorded.get("teacher_workdir") == config.distill.teacher_workdir
      and "teacher_step" in recorded):
    step = recorded["teacher_step"]  # None only for runs saved before this.
  else:
    step = pretrained.source_step(_workdir(config), None,
                                  key="config.distill.teacher_")
  pinned = config.copy_and_resolve_references()
  pinned.distill.teacher_step = step
  return pinned


def teacher_config(config):
  """The teacher's saved config (its WORKDIR/config.json)."""
  return config_lib.load(_workdir(config))


def _checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def _vocabulary_keys(data) -> tuple:
  """The keys that fix the token ids beyond the tokenizer's name."""
  if data.get("source") == "synthetic" or data.get("tokenizer") == "emoji":
    return (("data.vocab_size", "vocabulary size"),)  # Trained/drawn here.
  if data.get("tokenizer") == "clip_bpe":
    return (("data.bpe_path", "BPE merges file"),)
  return ()


def _as_json(value):
  return list(value) if isinstance(value, tuple) else value


def check_config(config) -> None:
  """ValueError naming the problem if config.distill is unusable: a bad
  value, a teacher workdir without config or checkpoint, or a teacher
  whose inputs differ from the student's."""
  if not enabled(config):
    return
  distill, given = config.distill, config.distill.teacher_workdir
  workdir = _workdir(config)
  if distill.feature_loss not in FEATURE_LOSSES:
    raise ValueError(f"config.distill.feature_loss={distill.feature_loss!r} "
                     f"is not one of {list(FEATURE_LOSSES)}.")
  for key in ("feature_weight", "relation_weight"):
    if distill[key] < 0:
      raise ValueError(f"config.distill.{key}={distill[key]} must be >= 0.")
  if distill.feature_weight == 0 and distill.relation_weight == 0:
    raise ValueError(
        f"config.distill.teacher_workdir={given!r} is set but both "
        "config.distill.feature_weight and relation_weight are 0; give one "
        "a positive weight, or set teacher_workdir=None to train alone.")
  temperature = distill.get("relation_temperature")
  if temperature is not None and temperature <= 0:
    raise ValueError(
        f"config.distill.relation_temperature={temperature} must be > 0, or "
        "None (each model's own logit scale).")
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise ValueError(
        f"config.distill.teacher_workdir={given!r} has no config.json; give "
        "a clip_jax workdir (a trained run, or the output of `python -m "
        "clip_jax.convert`).")
  steps = _checkpoint_steps(workdir)
  if not steps:
    raise ValueError(
        f"config.distill.teacher_workdir={given!r} has no checkpoint in "
        f"{os.path.join(workdir, 'checkpoints')}; train the teacher first.")
  step = distill.get("teacher_step")
  if step is not None and step not in steps:
    raise ValueError(
        f"config.distill.teacher_step={step} is not a checkpoint of "
        f"{given!r}; it has steps {steps} (None = the latest).")
  teacher = teacher_config(config)
  keys = SHARED_INPUT_KEYS + _vocabulary_keys(config.data)
  for key, what in keys:
    mine = _as_json(config_lib._get(config, key))  # pylint: disable=protected-access
    theirs = _as_json(config_lib._get(teacher, key))  # pylint: disable=protected-access
    if mine != theirs:
      raise ValueError(
          f"config.distill: the teacher {given!r} was trained with "
          f"{key}={theirs!r} but this run has config.{key}={mine!r} "
          f"({what}); teacher and student read the same batch, so they "
          f"must share it. Set config.{key}={theirs!r}, or distil from a "
          "teacher trained on this run's inputs.")


def projection_shape(config) -> tuple[int, int] | None:
  """(student embed_dim, teacher embed_dim) if the feature term needs a
  projection (the widths differ), else None."""
  if not enabled(config) or not config.distill.feature_weight:
    return None
  if not os.path.isfile(os.path.join(_workdir(config), "config.json")):
    raise ValueError(
        f"config.distill.teacher_workdir={config.distill.teacher_workdir!r} "
        "has no config.json: a distilled run's params include a projection "
        f"('{PARAM_KEY}/*_proj') whose width is the teacher's embed_dim, "
        "read from there. Put the teacher's config.json back there (it is "
        "the only file needed to load the student).")
  student = config.model.embed_dim
  teacher = teacher_config(config).model.embed_dim
  return None if student == teacher else (student, teacher)


def init_params(config, rng) -> dict:
  """{'distill': {'img_proj': {'kernel'}, 'txt_proj': {'kernel'}}} (lecun
  normal, as nn.Dense) when the feature term needs a projection, else {}.

  Drawn from a key folded off `rng`: the model's own init is unchanged.
  """
  shape = projection_shape(config)
  if shape is None:
    return {}
  keys = jax.random.split(jax.random.fold_in(rng, 0xD1571), 2)
  init = nn.initializers.lecun_normal()
  return {PARAM_KEY: {
      name: {"kernel": init(key, shape, jnp.float32)}
      for name, key in zip(("img_proj", "txt_proj"), keys)}}


# ------------------------------------------------------------ losses ----


def feature_distillation(student, teacher, kind: str, projection=None):
  """Mean over rows of 1 - cos(s, t) ('cosine') or ||s - t||^2 ('l2'),
  s = student @ projection (if given), float32. [N, Ds], [N, Dt]."""
  student, teacher = losses._f32(student, teacher)  # pylint: disable=protected-access
  if projection is not None:
    student = student @ jnp.asarray(projection, jnp.float32)
  if kind == "cosine":
    norm = jnp.sqrt(jnp.maximum(jnp.sum(student * student, axis=1), 1e-24))
    tnorm = jnp.sqrt(jnp.maximum(jnp.sum(teacher * teacher, axis=1), 1e-24))
    return jnp.mean(1.0 - jnp.sum(student * teacher, axis=1) / (norm * tnorm))
  if kind == "l2":
    return jnp.mean(jnp.sum(jnp.square(student - teacher), axis=1))
  raise ValueError(f"feature loss {kind!r} is not one of {FEATURE_LOSSES}.")


def _kl_rows_dense(student_logits, teacher_logits):
  """Sum over rows of KL(softmax(teacher row) || softmax(student row))."""
  log_t = jax.nn.log_softmax(teacher_logits, axis=1)
  log_s = jax.nn.log_softmax(student_logits, axis=1)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s))


def _kl_rows_tiled(queries, keys, scale, t_queries, t_keys, t_scale, tile):
  """Sum over this device's rows of KL(teacher row || student row), one
  [n, tile] block of logits at a time.

  KL_i = sum_j p_ij (t_ij - s_ij) - lse(t_i) + lse(s_i), p = softmax(t_i):
  the two log-sum-exps stream over tiles (losses._tiled_logsumexp, whose
  custom gradient recomputes the blocks) and so does the cross term, whose
  scan body is rematerialised so its backward keeps no [n, N] residual.
  """
  lse_s = losses._tiled_logsumexp(queries, keys, scale, tile)  # pylint: disable=protected-access
  lse_t = jax.lax.stop_gradient(
      losses._tiled_logsumexp(t_queries, t_keys, t_scale, tile))  # pylint: disable=protected-access

  @jax.checkpoint
  def step(total, blocks):
    block_keys, block_t_keys = blocks
    s = scale * (queries @ block_keys.T)
    t = t_scale * (t_queries @ block_t_keys.T)
    p = jnp.exp(t - lse_t[:, None])
    return total + jnp.sum(p * (t - s), axis=1), None

  cross, _ = jax.lax.scan(
      step, jnp.zeros_like(lse_t),  # Device-varying, like the rows.
      (losses._tiles(keys, tile), losses._tiles(t_keys, tile)))  # pylint: disable=protected-access
  return jnp.sum(cross - lse_t + lse_s)


def relation_distillation(zimg, ztxt, t_zimg, t_ztxt, scale, t_scale,
                          mesh=None):
  """CLIP-KD's CRD: KL(teacher || student) of the image->text softmax rows
  plus that of the text->image rows, each averaged over the N rows.

  zimg, ztxt: the student's [N, Ds] embeddings; t_zimg, t_ztxt: the
  teacher's [N, Dt] (no gradient); scale, t_scale: the logit multipliers.
  """
  zimg, ztxt, t_zimg, t_ztxt, scale, t_scale = losses._f32(  # pylint: disable=protected-access
      zimg, ztxt, t_zimg, t_ztxt, scale, t_scale)
  t_zimg, t_ztxt, t_scale = jax.lax.stop_gradient((t_zimg, t_ztxt, t_scale))
  n = zimg.shape[0]
  if mesh is None:
    student = scale * (zimg @ ztxt.T)
    teacher = t_scale * (t_zimg @ t_ztxt.T)
    return (_kl_rows_dense(student, teacher) +
            _kl_rows_dense(student.T, teacher.T)) / n
  losses._check_divisible(n, mesh)  # pylint: disable=protected-access

  def body(zimg, ztxt, t_zimg, t_ztxt, scale, t_scale, axes):
    # Varying scale: each device's scale gradient, summed by the cast's
    # transpose (a scalar all-reduce), as in losses.softmax_loss.
    scale, t_scale = jax.lax.pcast((scale, t_scale), axes, to="varying")
    gather = lambda x: jax.lax.all_gather(x, axes, tiled=True)
    tile = zimg.shape[0]
    local = (_kl_rows_tiled(zimg, gather(ztxt), scale, t_zimg,
                            gather(t_ztxt), t_scale, tile) +
             _kl_rows_tiled(ztxt, gather(zimg), scale, t_ztxt,
                            gather(t_zimg), t_scale, tile))
    return jax.lax.psum(local, axes) / n

  return losses._sharded(mesh, body, zimg, ztxt, t_zimg, t_ztxt, scale,  # pylint: disable=protected-access
                         t_scale)


# ------------------------------------------------ teacher and step ----


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its model, params on the mesh and where from."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  model: nn.Module
  params: dict
  shardings: dict


def load_teacher(config, mesh) -> Teacher:
  """The teacher of config.distill, restored onto `mesh`.

  Its model comes from its own config.json; its params are read (orbax,
  only the params, never its optimiser state) straight into the shardings
  this run's config.sharding_rules give them.
  """
  from clip_jax import optim, pretrained, train_state  # pylint: disable=g-import-not-at-top
  from clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  check_config(config)
  workdir = _workdir(config)
  teacher = teacher_config(config)
  model = two_towers.build_run_model(teacher)
  shapes = jax.eval_shape(lambda: train_state.init_model_params(
      model, teacher, jax.random.key(0)))
  shardings = sharding_lib.tree_shardings(shapes, mesh,
                                          config.sharding_rules)
  step = pretrained.source_step(workdir, config.distill.get("teacher_step"),
                                key="config.distill.teacher_")
  loaded = pretrained.load_params(workdir, step, ".*", shapes, shardings)
  params = jax.tree_util.tree_map_with_path(
      lambda path, _: loaded[optim.path_str(path)], shapes)
  return Teacher(workdir, step, teacher, model, params, shardings)


def make_extra_loss(config, teacher_model, mesh):
  """The train_state.ExtraLoss of config.distill; its `inputs` are the
  teacher's params."""
  from clip_jax import train_state  # pylint: disable=g-import-not-at-top
  distill = config.distill
  temperature = distill.get("relation_temperature")

  def targets(teacher_params, batch):
    zimg, ztxt, _ = teacher_model.apply(
        {"params": teacher_params}, batch["image"], batch["text"],
        train=False)
    return {"zimg": zimg, "ztxt": ztxt}

  def loss(params, zimg, ztxt, out, targets, teacher_params):
    total, terms = jnp.zeros((), jnp.float32), {}
    if distill.feature_weight:
      proj = params.get(PARAM_KEY)
      feature = sum(
          feature_distillation(
              z, targets[name], distill.feature_loss,
              None if proj is None else proj[f"{name[1:]}_proj"]["kernel"])
          for name, z in (("zimg", zimg), ("ztxt", ztxt)))
      total += distill.feature_weight * feature
      terms["distill/feature"] = feature
    if distill.relation_weight:
      if temperature is None:
        scale = out["logit_scale"]
        t_scale = train_state.scalars(teacher_model,
                                      teacher_params)["logit_scale"]
      else:
        scale = t_scale = jnp.float32(1.0 / temperature)
      relation = relation_distillation(zimg, ztxt, targets["zimg"],
                                       targets["ztxt"], scale, t_scale,
                                       mesh=mesh)
      total += distill.relation_weight * relation
      terms["distill/relation"] = relation
    return total, terms

  return train_state.ExtraLoss(targets=targets, loss=loss,
                               param_keys=(PARAM_KEY,))
