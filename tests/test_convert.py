"""Converted checkpoints reproduce their reference implementations.

References (test-only dependencies, built with random weights, nothing
downloaded): transformers' CLIPModel / SiglipModel and CLIPImageProcessor,
open_clip's CLIP. Each is saved with its library's own save function,
converted into a clip_jax workdir, restored as the evaluator restores it,
and compared on the same inputs (max relative error <= 1e-4, float32).
"""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clip_jax import api, convert, tensor_files  # noqa: E402
from clip_jax.data import transforms  # noqa: E402

TOL = 1e-4


def max_rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def ours_outputs(workdir, images_nchw, tokens):
  """(zimg, ztxt, logits_per_image) of a converted workdir, restored as
  clip_jax.evaluate restores it."""
  config = api.load_run_config(workdir)
  model, params, _, _ = api.restore_params(config, workdir, None)
  images = np.transpose(images_nchw, (0, 2, 3, 1)).astype(np.float32)
  zimg, ztxt, out = model.apply({"params": params}, images,
                                np.asarray(tokens, np.int32))
  logits = np.asarray(zimg) @ np.asarray(ztxt).T * float(out["logit_scale"])
  if out["logit_bias"] is not None:
    logits = logits + float(out["logit_bias"])
  return np.asarray(zimg), np.asarray(ztxt), logits


def hf_outputs(model, images_nchw, tokens):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.asarray(tokens, np.int64)),
                pixel_values=torch.tensor(images_nchw))
  norm = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()
  return (norm(out.image_embeds), norm(out.text_embeds),
          out.logits_per_image.numpy())


def assert_same(ours, ref):
  for name, a, b in zip(("image", "text", "logits"), ours, ref):
    err = max_rel_err(a, b)
    assert err <= TOL, f"{name}: max relative error {err:.2e}"


def random_inputs(rng, batch, image_size, length, eos, pad_id=0):
  """Normal-noise images, token ids < eos, one EOS per text (at a random
  place), zero padding after it."""
  images = rng.normal(size=(batch, 3, image_size, image_size)).astype(
      np.float32)
  # Ids from 0: OpenAI CLIP's pad id 0 is also a real token ("!").
  tokens = rng.integers(0, eos, size=(batch, length))
  tokens[:, 1] = pad_id  # The pad id inside a text: attended, not masked.
  ends = rng.integers(2, length, size=batch)  # EOS, then zero padding.
  for row, end in enumerate(ends):
    tokens[row, end] = eos
    tokens[row, end + 1:] = 0
  return images, tokens


def small_clip_config(**text):
  text = dict(dict(vocab_size=99, max_position_embeddings=12), **text)
  return transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4,
                       hidden_act="quick_gelu", **text),
      vision_config=dict(hidden_size=48, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8,
                         hidden_act="quick_gelu"),
      projection_dim=24)


@pytest.mark.parametrize("eos_id", [98, 2])  # first-EOS / argmax pooling
def test_hf_clip_round_trip(tmp_path, eos_id):
  torch.manual_seed(0)
  ref = transformers.CLIPModel(small_clip_config(
      eos_token_id=eos_id, pad_token_id=1, bos_token_id=97)).eval()
  with torch.no_grad():  # Not the init value, so the scale is really read.
    ref.logit_scale.fill_(2.9)
  ref.save_pretrained(tmp_path / "hf")
  convert.convert("hf", str(tmp_path / "hf"), str(tmp_path / "run"))
  rng = np.random.default_rng(0)
  images, tokens = random_inputs(rng, 3, 32, 12, eos=98, pad_id=1)
  if eos_id == 2:  # argmax pooling: the highest id marks the end.
    tokens = np.where(tokens == 98, 98, np.minimum(tokens, 90))
  expected = hf_outputs(ref, images, tokens)
  assert_same(ours_outputs(str(tmp_path / "run"), images, tokens), expected)

  convert.export_hf(str(tmp_path / "run"), str(tmp_path / "back"))
  back = transformers.CLIPModel.from_pretrained(tmp_path / "back").eval()
  assert_same(hf_outputs(back, images, tokens), expected)


def test_hf_siglip(tmp_path):
  torch.manual_seed(1)
  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=90, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=10, pad_token_id=1,
                       eos_token_id=1, bos_token_id=None),
      vision_config=dict(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8))
  ref = transformers.SiglipModel(config).eval()
  with torch.no_grad():
    ref.logit_scale.fill_(2.1)
    ref.logit_bias.fill_(-3.5)
  ref.save_pretrained(tmp_path / "hf")
  cfg = convert.convert("hf", str(tmp_path / "hf"), str(tmp_path / "run"))
  assert cfg.model.ln_eps == pytest.approx(1e-6)
  assert cfg.data.eval_resize == "squash" and tuple(cfg.data.mean) == (
      0.5, 0.5, 0.5)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  tokens = rng.integers(2, 90, size=(3, 10))
  tokens[:, 6:] = 1  # SigLIP's sticky EOS / pad (id 1) to the end.
  assert_same(ours_outputs(str(tmp_path / "run"), images, tokens),
              hf_outputs(ref, images, tokens))


def open_clip_model(open_clip, *, quick_gelu, width=48, layers=2):
  return open_clip.CLIP(
      embed_dim=24,
      vision_cfg=dict(image_size=32, patch_size=8, width=width,
                      layers=layers, head_width=16, mlp_ratio=2),
      text_cfg=dict(context_length=12, vocab_size=99, width=32, heads=2,
                    layers=layers, mlp_ratio=2),
      quick_gelu=quick_gelu).eval()


def open_clip_outputs(model, images, tokens):
  with torch.no_grad():
    zimg = model.encode_image(torch.tensor(images), normalize=True)
    ztxt = model.encode_text(torch.tensor(np.asarray(tokens, np.int64)),
                             normalize=True)
    logits = model.logit_scale.exp() * zimg @ ztxt.T
  return zimg.numpy(), ztxt.numpy(), logits.numpy()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_open_clip(tmp_path, fmt):
  open_clip = pytest.importorskip("open_clip")
  torch.manual_seed(2)
  ref = open_clip_model(open_clip, quick_gelu=False)
  path = str(tmp_path / f"model.{fmt}")
  if fmt == "pt":
    torch.save(ref.state_dict(), path)
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  # Head counts are not in the weights (default width // 64).
  config = convert.convert("open_clip", path, str(tmp_path / "run"),
                           image_heads=3, text_heads=2)
  assert config.model.activation == "gelu_exact"  # open_clip's default.
  rng = np.random.default_rng(2)
  images, tokens = random_inputs(rng, 3, 32, 12, eos=98)
  assert_same(ours_outputs(str(tmp_path / "run"), images, tokens),
              open_clip_outputs(ref, images, tokens))


def test_openai_torchscript_archive(tmp_path):
  """OpenAI's .pt is a TorchScript archive; read without torch."""
  open_clip = pytest.importorskip("open_clip")
  torch.manual_seed(3)
  ref = open_clip_model(open_clip, quick_gelu=True, width=64)
  rng = np.random.default_rng(3)
  images, tokens = random_inputs(rng, 2, 32, 12, eos=98)
  # As OpenAI's archive: the whole model traced, every weight inside.
  scripted = torch.jit.trace_module(
      ref, {"encode_image": (torch.tensor(images),)}, check_trace=False)
  path = str(tmp_path / "ViT-tiny.pt")
  torch.jit.save(scripted, path)
  tensors = tensor_files.read_tensors(path)
  expected = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(tensors) >= set(expected) - {"attn_mask"}
  for name, value in expected.items():
    if name in tensors:
      np.testing.assert_array_equal(tensors[name], value, err_msg=name)
  convert.convert("openai", path, str(tmp_path / "run"), image_heads=4,
                  text_heads=2)
  assert_same(ours_outputs(str(tmp_path / "run"), images, tokens),
              open_clip_outputs(ref, images, tokens))


def test_real_b32_architecture():
  """ViT-B/32 (OpenAI's architecture, random weights), in memory."""
  open_clip = pytest.importorskip("open_clip")
  import jax
  torch.manual_seed(4)
  ref = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
  with torch.no_grad():  # OpenAI's trained value: the cap, 100, + rounding.
    ref.logit_scale.fill_(4.60517025)
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  model, params, data = convert.from_openai(tensors)
  config = convert.make_config(convert._scalars_into_config(model, params),
                               data, arch="B/32")
  assert config.model.image.variant == "B/32"
  assert config.model.text.variant == "base"
  from clip_jax.models import two_towers
  net = two_towers.build_run_model(config)
  convert.check_params_fit(net, config, params)
  rng = np.random.default_rng(4)
  images, tokens = random_inputs(rng, 2, 224, 77, eos=49407)
  zimg, ztxt, out = jax.jit(net.apply)(
      {"params": params}, np.transpose(images, (0, 2, 3, 1)),
      tokens.astype(np.int32))
  logits = np.asarray(zimg) @ np.asarray(ztxt).T * float(out["logit_scale"])
  assert_same((zimg, ztxt, logits), open_clip_outputs(ref, images, tokens))


@pytest.mark.parametrize("new_grid", [6, 3])
def test_resize_pos_embed_matches_open_clip(new_grid):
  """Position-embedding interpolation to another image size, as open_clip
  resizes a state dict for a model of another image size."""
  open_clip = pytest.importorskip("open_clip")
  torch.manual_seed(5)
  old = open_clip_model(open_clip, quick_gelu=True)  # 32 px: 4 x 4 patches.
  new = open_clip.CLIP(
      embed_dim=24, vision_cfg=dict(image_size=8 * new_grid, patch_size=8,
                                    width=48, layers=2, head_width=16,
                                    mlp_ratio=2),
      text_cfg=dict(context_length=12, vocab_size=99, width=32, heads=2,
                    layers=2, mlp_ratio=2))
  state = dict(old.state_dict())
  open_clip.model.resize_pos_embed(state, new)
  want = state["visual.positional_embedding"].numpy()
  pos = old.visual.positional_embedding.detach().numpy()
  ours = convert.resize_pos_embed(pos, new_grid, extra_tokens=1)
  assert ours.shape == want.shape == (1 + new_grid ** 2, 48)
  assert max_rel_err(ours, want) <= TOL


def test_preprocessing_matches_clip_image_processor():
  """eval_resize='shortest_side' + CLIP mean/std = CLIPImageProcessor with
  PIL (transformers 4's default and OpenAI's own preprocessing; the
  torchvision backend, transformers 5's default, resizes uint8 tensors and
  differs by one grey level in ~0.5% of pixels)."""
  from PIL import Image
  try:
    from transformers.models.clip.image_processing_pil_clip import (
      CLIPImageProcessorPil as Processor,
    )
  except ImportError:  # transformers 4: the PIL one is the default.
    Processor = transformers.CLIPImageProcessor
  processor = Processor(
      size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
  rng = np.random.default_rng(6)
  for shape in ((300, 400, 3), (500, 260, 3), (224, 224, 3), (97, 131, 3)):
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    image = Image.fromarray(pixels)
    want = processor(images=image, return_tensors="np")["pixel_values"][0]
    ours = transforms.normalize(
        transforms.preprocess_image(pixels, 224, eval_resize="shortest_side"))
    np.testing.assert_allclose(np.transpose(ours, (2, 0, 1)), want,
                               atol=1e-5, err_msg=str(shape))


def _saved_hf_clip(path, seed=0):
  torch.manual_seed(seed)
  ref = transformers.CLIPModel(small_clip_config(
      eos_token_id=98, pad_token_id=1, bos_token_id=97)).eval()
  ref.save_pretrained(path)
  return ref


def test_converted_run_is_evaluated_with_its_preprocessing(tmp_path):
  """clip_jax.load on a converted HF directory (with its
  preprocessor_config.json) embeds image files as HF does: the
  preprocessing is part of the converted config."""
  from PIL import Image
  from transformers.models.clip.image_processing_pil_clip import (
    CLIPImageProcessorPil,
  )

  import clip_jax
  ref = _saved_hf_clip(tmp_path / "hf", seed=7)
  processor = CLIPImageProcessorPil(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
      image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
  processor.save_pretrained(tmp_path / "hf")
  config = convert.convert("hf", str(tmp_path / "hf"), str(tmp_path / "run"))
  assert config.data.eval_resize == "shortest_side"
  assert tuple(config.data.mean) == pytest.approx((0.4, 0.5, 0.6))
  rng = np.random.default_rng(8)
  paths = []
  for i, shape in enumerate(((40, 57, 3), (70, 33, 3))):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(paths[-1])
  images = [Image.open(p) for p in paths]
  pixels = processor(images=images, return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    want = ref.get_image_features(pixel_values=pixels)
    want = getattr(want, "pooler_output", want)
  want = (want / want.norm(dim=-1, keepdim=True)).numpy()
  ours = clip_jax.load(str(tmp_path / "run")).encode_image(paths)
  assert max_rel_err(ours, want) <= TOL


def test_converted_run_fine_tunes_from_its_weights(tmp_path):
  """clip_jax.train resumes a converted workdir at step 0 with a new
  schedule: after two steps at a tiny learning rate the parameters are
  still the converted ones (a fresh init would be far from them)."""
  import jax

  from clip_jax import config as config_lib
  from clip_jax import train
  _saved_hf_clip(tmp_path / "hf", seed=9)
  run = str(tmp_path / "run")
  convert.convert("hf", str(tmp_path / "hf"), run)
  config = config_lib.load_config_file("configs/converted.py", run)
  config.data.source = "synthetic"
  config.batch_size, config.total_steps, config.warmup_steps = 8, 2, 0
  config.lr, config.wd, config.checkpoint_every_steps = 1e-8, 0.0, 2
  before = api.restore_params(config, run, 0)[1]
  rng = np.random.default_rng(0)
  batches = ({"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
              "text": rng.integers(2, 99, size=(8, 12)).astype(np.int32)}
             for _ in range(10))
  result = train.train(config, run, data=(batches, 1000),
                       allow_config_change=True)
  assert result.step == 2
  after = api.restore_params(config, run, 2)[1]
  diffs = jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
      before, after)
  assert max(jax.tree_util.tree_leaves(diffs)) < 1e-6
  assert max(jax.tree_util.tree_leaves(diffs)) > 0  # It did train.


def test_command_line_round_trip(tmp_path, capsys):
  ref = _saved_hf_clip(tmp_path / "hf", seed=10)
  run, back = str(tmp_path / "run"), str(tmp_path / "back")
  assert convert.main(["--from", "hf", "--in", str(tmp_path / "hf"),
                       "--out", run]) == 0
  assert convert.main(["--from", "hf", "--in", str(tmp_path / "hf"),
                       "--out", run]) == 2  # Never overwrites a run.
  assert "already holds a run" in capsys.readouterr().err
  assert convert.main(["--to", "hf", "--in", run, "--out", back]) == 0
  tensors = tensor_files.read_tensors(back)
  for name, value in ref.state_dict().items():
    if name in tensors:
      np.testing.assert_allclose(tensors[name], value.numpy(), rtol=1e-6,
                                 atol=1e-7, err_msg=name)
  assert set(tensors) == {n for n in ref.state_dict()
                          if not n.endswith("position_ids")}


def test_sharded_hf_weights_read_as_one(tmp_path):
  ref = _saved_hf_clip(tmp_path / "one", seed=11)
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  sharded = tensor_files.read_tensors(str(tmp_path / "sharded"))
  whole = tensor_files.read_tensors(str(tmp_path / "one"))
  assert sorted(sharded) == sorted(whole)
  for name, value in whole.items():
    np.testing.assert_array_equal(sharded[name], value, err_msg=name)


def test_runs_saved_before_eval_resize_still_resume():
  """data.eval_resize is new: a stored config without it resumes without
  --allow_config_change (it only changes evaluation)."""
  import ml_collections

  from clip_jax import config as config_lib
  from clip_jax import train
  new = config_lib.load_config_file("configs/clip.py", "tiny")
  stored = new.to_dict()
  del stored["data"]["eval_resize"]
  message = train.check_resume(
      new, ml_collections.ConfigDict(stored), workdir="w", step=1,
      mismatches=[], allow_change=False, schedules=None)
  assert "data.eval_resize" in message


def test_scanned_conversion_same_outputs(tmp_path):
  """--scan: the same model with stacked blocks (config.model.scan)."""
  ref = _saved_hf_clip(tmp_path / "hf", seed=12)
  convert.convert("hf", str(tmp_path / "hf"), str(tmp_path / "run"),
                  scan=True)
  config = api.load_run_config(str(tmp_path / "run"))
  assert config.model.scan
  rng = np.random.default_rng(12)
  images, tokens = random_inputs(rng, 2, 32, 12, eos=98, pad_id=1)
  expected = hf_outputs(ref, images, tokens)
  assert_same(ours_outputs(str(tmp_path / "run"), images, tokens), expected)
  convert.export_hf(str(tmp_path / "run"), str(tmp_path / "back"))
  back = transformers.CLIPModel.from_pretrained(tmp_path / "back").eval()
  assert_same(hf_outputs(back, images, tokens), expected)


def test_no_image_projection_needs_embed_dim_equal_to_width():
  from clip_jax import config as config_lib
  from clip_jax.models import two_towers
  config = config_lib.load_config_file("configs/clip.py", "tiny")
  config.model.image_projection = False
  config.model.embed_dim = 48
  with pytest.raises(ValueError, match="embed_dim equal to the image width"):
    two_towers.build_model(config.model)
  config.model.embed_dim = 32  # The 'mu' image tower's width.
  two_towers.build_model(config.model)


def test_converted_clip_reads_text_with_clip_bpe(tmp_path):
  """A converted CLIP with OpenAI's vocabulary embeds raw strings as the
  reference does: clip_jax.load tokenizes with clip_bpe (the converted
  config's tokenizer), the reference gets open_clip's token ids."""
  open_clip = pytest.importorskip("open_clip")
  import clip_jax
  torch.manual_seed(11)
  ref = transformers.CLIPModel(small_clip_config(
      vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
      pad_token_id=1, bos_token_id=49406)).eval()
  ref.save_pretrained(tmp_path / "hf")
  config = convert.convert("hf", str(tmp_path / "hf"), str(tmp_path / "run"))
  assert config.data.tokenizer == "clip_bpe"
  texts = ["a photo of a cat.", "Two DOGS, playing!", "", "naïve café 🎉"]
  tokens = open_clip.get_tokenizer("ViT-B-32")(texts)
  with torch.no_grad():
    want = ref.get_text_features(input_ids=tokens)
    want = getattr(want, "pooler_output", want)
  want = (want / want.norm(dim=-1, keepdim=True)).numpy()
  ours = clip_jax.load(str(tmp_path / "run")).encode_text(texts)
  assert max_rel_err(ours, want) <= TOL
