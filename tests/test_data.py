"""Data: emoji splits and rendering, file sources, tokenizer, pipeline."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import pipeline, sources, tokenizer as tokenizer_lib
from clip_jax.data import transforms


# --- emoji -----------------------------------------------------------------

def test_emoji_splits_are_deterministic_disjoint_and_keep_variants_together():
  records, names = sources._emoji_records()  # pylint: disable=protected-access
  again, _ = sources._emoji_records()  # pylint: disable=protected-access
  assert records == again
  train = {e for e, _, _ in records["train"]}
  held = {e for e, _, _ in records["heldout_concepts"]}
  assert not train & held
  assert len(records["openmoji"]) == len(train) + len(held)
  assert 0.07 < len(names["heldout_concepts"]) / len(names["openmoji"]) < 0.13
  # Skin-tone variants are in their base emoji's split.
  thumbs = "\U0001F44D"
  for tone in range(0x1F3FB, 0x1F400):
    assert ((thumbs + chr(tone)) in train) == (thumbs in train)
  # Class lists leave skin-tone variants out.
  assert not any("skin tone" in n for n in names["openmoji"]
                 if n not in ("light skin tone", "medium-light skin tone",
                              "medium skin tone", "medium-dark skin tone",
                              "dark skin tone"))


def test_caption_from_name():
  assert sources.name_to_caption(":red_apple:") == "red apple"
  catalogue = {e: caps for e, _, caps in sources.emoji_catalogue()}
  assert catalogue["\U0001F34E"][0] == "red apple"
  assert "thumbsup" in catalogue["\U0001F44D"]  # Aliases are captions too.


@pytest.mark.skipif(not os.path.exists(sources.NOTO_FONT),
                    reason="fonts-noto-color-emoji not installed")
def test_rendering_is_centred_and_coloured(tmp_path):
  fonts = sources._fonts()  # pylint: disable=protected-access
  for font in fonts.values():
    pixels = sources.render_emoji(font, "\U0001F34E")  # Red apple.
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    ink = (pixels < 245).any(-1)
    ys, xs = np.nonzero(ink)
    assert abs((xs.min() + xs.max()) / 2 - 31.5) < 3
    assert abs((ys.min() + ys.max()) / 2 - 31.5) < 3
    red = pixels[..., 0].astype(int) - pixels[..., 1]
    assert (red > 80).sum() > 100  # A red apple, not a grey outline.
  root = sources.prepare_emoji(str(tmp_path), limit=4, verbose=False)
  images = np.load(os.path.join(root, "openmoji.npy"))
  with open(os.path.join(root, "openmoji.json")) as f:
    meta = json.load(f)
  assert images.shape[0] == len(meta["records"]) <= 4


# --- file sources, bad input -------------------------------------------------

def _write_images(folder, n, bad=()):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    path = os.path.join(folder, f"img{i}.png")
    if i in bad:
      with open(path, "wb") as f:
        f.write(b"not a png")
    else:
      Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(path)
    with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
      f.write(f"caption number {i}")


def _data_config(**kw):
  c = pipeline.default_data_config()
  c.update(dict(image_size=16, context_length=8, vocab_size=40), **kw)
  return c


def test_folder_csv_and_jsonl_sources_agree(tmp_path):
  _write_images(tmp_path / "imgs", 3)
  with open(tmp_path / "pairs.csv", "w") as f:
    f.write("image,caption\n" + "".join(
        f"imgs/img{i}.png,caption number {i}\n" for i in range(3)))
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for i in range(3):
      f.write(json.dumps({"image": f"imgs/img{i}.png",
                          "captions": [f"caption number {i}"]}) + "\n")
  loaded = [sources.FileListSource(str(p)) for p in
            (tmp_path / "imgs", tmp_path / "pairs.csv", tmp_path / "pairs.jsonl")]
  for src in loaded:
    assert len(src) == 3
    assert [os.path.basename(src[i]["image"]) for i in range(3)] == [
        "img0.png", "img1.png", "img2.png"]
    assert src[2]["captions"] == ["caption number 2"]
  with pytest.raises(ValueError, match="expected a folder, a .csv or a .jsonl"):
    sources.FileListSource(str(tmp_path / "pairs.txt"))


def _tokenizer(tmp_path):
  words = [f"caption number {i} word{i % 7}" for i in range(200)]
  return tokenizer_lib.train(words, 40, str(tmp_path / "tok.model"))


def test_bad_images_are_skipped_and_counted(tmp_path):
  _write_images(tmp_path / "imgs", 10, bad={3, 7})
  tok = _tokenizer(tmp_path)
  config = _data_config(source="folder", path=str(tmp_path / "imgs"),
                        tokenizer=str(tmp_path / "tok.model"))
  it, size = pipeline.make_train_iterator(config, global_batch_size=4, seed=0)
  assert size == 10 and tok.vocab_size <= 40
  batches = [next(it) for _ in range(8)]  # 32 good examples = 4 epochs.
  assert sum(int(b["num_skipped"].sum()) for b in batches) in (7, 8)
  assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)


def test_too_many_bad_images_stop_with_a_clear_error(tmp_path):
  _write_images(tmp_path / "imgs", 10, bad={1, 2, 3, 4, 5})
  _tokenizer(tmp_path)
  config = _data_config(source="folder", path=str(tmp_path / "imgs"),
                        tokenizer=str(tmp_path / "tok.model"),
                        max_skip_fraction=0.2)
  it, _ = pipeline.make_train_iterator(config, global_batch_size=2, seed=0)
  with pytest.raises(RuntimeError, match=r"could not be read .*img\d.png"):
    for _ in range(200):
      next(it)


# --- tokenizer ---------------------------------------------------------------

def test_tokenizer_eos_and_padding_policies(tmp_path):
  tok = _tokenizer(tmp_path)
  ids = tok.processor.encode("caption number 5")
  n = len(ids)
  eos = tok.encode(["Caption Number 5"], n + 3, "eos")[0]  # Lower-cased.
  np.testing.assert_array_equal(eos, ids + [1, 0, 0])
  last = tok.encode(["caption number 5"], n + 3, "last")[0]
  np.testing.assert_array_equal(last, ids + [1, 1, 1])
  short = tok.encode(["caption number 5"], 3, "eos")[0]
  np.testing.assert_array_equal(short, ids[:2] + [1])  # EOS survives.
  with pytest.raises(ValueError, match="has 40 tokens but the text tower's "
                     "embedding table has 30 rows"):
    tokenizer_lib.check_vocab(tok, 30)


def test_tokenizer_command_line(tmp_path):
  corpus = tmp_path / "captions.txt"
  corpus.write_text("\n".join(f"a red apple {i}" for i in range(100)))
  tokenizer_lib.main(["train", "--input", str(corpus), "--vocab_size", "30",
                      "--output", str(tmp_path / "cli.model")])
  assert tokenizer_lib.load(str(tmp_path / "cli.model")).vocab_size <= 30


# --- pipeline ----------------------------------------------------------------

def _synthetic(**kw):
  return _data_config(source="synthetic", synthetic_size=24, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_order_is_a_function_of_the_seed():
  a = _take(pipeline.make_train_iterator(_synthetic(), global_batch_size=4,
                                         seed=1)[0], 3)
  b = _take(pipeline.make_train_iterator(_synthetic(), global_batch_size=4,
                                         seed=1)[0], 3)
  c = _take(pipeline.make_train_iterator(_synthetic(), global_batch_size=4,
                                         seed=2)[0], 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["text"], y["text"])
  assert any(not np.array_equal(x["text"], z["text"]) for x, z in zip(a, c))


def test_process_shards_are_disjoint_and_cover_an_epoch():
  seen = []
  for index in range(3):
    it, _ = pipeline.make_train_iterator(
        _synthetic(), global_batch_size=12, seed=0, process_index=index,
        process_count=3)
    for batch in _take(it, 2):  # 2 x 4 rows x 3 processes = one epoch.
      seen.extend(tuple(t) for t in batch["text"])
  source = sources.SyntheticSource(24, 16, 8, 40)
  assert sorted(seen) == sorted(tuple(source[i]["tokens"]) for i in range(24))


def test_restoring_iterator_state_replays_the_same_batches():
  it, _ = pipeline.make_train_iterator(_synthetic(), global_batch_size=4,
                                       seed=0)
  _take(it, 5)  # Mid-epoch (6 batches per epoch).
  state = it.get_state()
  expected = _take(it, 4)
  fresh, _ = pipeline.make_train_iterator(_synthetic(), global_batch_size=4,
                                          seed=0)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 4)):
    np.testing.assert_array_equal(x["text"], y["text"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_eval_batches_pad_and_mask_the_last_batch():
  batches = list(pipeline.eval_batches(_synthetic(), "train", 10))
  assert [b["mask"].sum() for b in batches] == [10, 10, 4]
  assert all(len(b["mask"]) == 10 for b in batches)
  np.testing.assert_array_equal(batches[-1]["index"][:4], [20, 21, 22, 23])


def test_normalize_matches_formula():
  pixels = np.random.default_rng(0).integers(0, 256, (4, 4, 3), np.uint8)
  got = transforms.normalize(pixels)
  want = (pixels / 255.0 - np.array(transforms.CLIP_MEAN)) / np.array(
      transforms.CLIP_STD)
  np.testing.assert_allclose(got, want, rtol=1e-5)
