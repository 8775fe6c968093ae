"""Sources: emoji catalogue/splits/rendering, folder/CSV/JSONL, WebDataset
conversion, TFDS (array_record, no TensorFlow), synthetic."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import pipeline, sources, transforms

needs_noto = pytest.mark.skipif(
    not os.path.exists(sources.NOTO_FONT),
    reason="needs fonts-noto-color-emoji (make install)")

# ------------------------------------------------------------------ emoji --


def _by_emoji():
  return {e.emoji: e for e in sources.emoji_catalogue()}


def test_catalogue_bases():
  catalogue = sources.emoji_catalogue()
  by_emoji = _by_emoji()
  assert len(catalogue) > 3500
  bases = {e.base for e in catalogue}
  assert 1800 < len(bases) < 2100
  tones = {chr(c) for c in range(0x1F3FB, 0x1F400)}
  for entry in catalogue:
    assert not tones & set(entry.base), entry  # A base has no skin tone.
    assert by_emoji[entry.base].base == entry.base
  # Known cases: plain removal, a base with U+FE0F, a differently built
  # couple, and a sequence whose base is a single code point.
  assert by_emoji["\U0001F44B\U0001F3FD"].base == "\U0001F44B"  # waving hand
  assert by_emoji["\u261D\U0001F3FC"].base == "\u261D\uFE0F"  # index up
  kiss = next(e for e in catalogue
              if e.name.startswith("kiss person person"))
  assert by_emoji[kiss.base].name == "kiss"
  women = by_emoji["\U0001F469\U0001F3FB\u200D\U0001F91D\u200D\U0001F469"
                   "\U0001F3FF"]
  assert by_emoji[women.base].name == "women holding hands"


def test_captions_from_names():
  assert sources.name_to_caption(":red_apple:") == "red apple"
  apple = _by_emoji()["\U0001F34E"]
  assert apple.name == "red apple" and apple.captions[0] == "red apple"
  thumbs = _by_emoji()["\U0001F44D"]
  assert thumbs.captions[0] == "thumbs up"
  assert "thumbsup" in thumbs.captions and len(thumbs.captions) > 1


def test_splits_are_deterministic_disjoint_and_follow_bases():
  rows, names = sources._emoji_splits()
  again, names_again = sources._emoji_splits()
  assert [(e.emoji, lab) for e, lab in rows["train"]] == [
      (e.emoji, lab) for e, lab in again["train"]]
  assert names == names_again
  train = {e.emoji for e, _ in rows["train"]}
  held = {e.emoji for e, _ in rows["heldout_concepts"]}
  assert not train & held
  assert train | held == {e.emoji for e, _ in rows["openmoji"]}
  assert rows["symbola"] == rows["openmoji"]  # Same rows, another font.
  # Same split for a base and all its variants, by an independent hash.
  by_emoji = _by_emoji()
  for e, _ in rows["train"] + rows["heldout_concepts"]:
    digest = hashlib.md5(by_emoji[e.base].name.encode()).hexdigest()
    assert (e.emoji in held) == (int(digest[:8], 16) < 0.1 * 2**32)
  train_bases = {e.base for e, _ in rows["train"]}
  held_bases = {e.base for e, _ in rows["heldout_concepts"]}
  assert not train_bases & held_bases
  fraction = len(held_bases) / (len(held_bases) + len(train_bases))
  assert 0.07 < fraction < 0.13
  # Labels point at the base's name.
  for split in ("train", "heldout_concepts", "openmoji", "symbola"):
    for e, label in rows[split]:
      assert names[split][label] == by_emoji[e.base].name


def test_class_names_leave_out_skin_tones():
  everything = sources.emoji_class_names("openmoji")
  held = sources.emoji_class_names("heldout_concepts")
  assert len(everything) == len({e.base for e in sources.emoji_catalogue()})
  assert len(set(everything)) == len(everything)
  assert not any("skin tone" in n for n in everything)
  assert set(held) < set(everything) and 100 < len(held) < 300
  assert all(sources.is_heldout(n) for n in held)
  with pytest.raises(ValueError, match="heldout_concepts"):
    sources.emoji_class_names("validation")


def _ink_box(pixels):
  ys, xs = np.nonzero((pixels < 245).any(-1))
  return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@needs_noto
@pytest.mark.parametrize("style", ["noto", "openmoji"])
def test_render_is_centred_and_not_blank(style):
  font = sources.load_emoji_font(style)
  pixels, reason = sources.render_emoji(font, "\U0001F34E", 64)  # red apple
  assert reason == "" and pixels.shape == (64, 64, 3)
  assert pixels.dtype == np.uint8
  assert (pixels[0] == 255).all() and (pixels[-1] == 255).all()  # Margins.
  red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100)
  assert red.mean() > 0.15  # The apple is red.
  x0, y0, x1, y1 = _ink_box(pixels)
  assert abs((x0 + x1) / 2 - 32) <= 1.5 and abs((y0 + y1) / 2 - 32) <= 1.5
  # Fixed scale: a small glyph stays smaller than a large one.
  small, _ = sources.render_emoji(font, "\u25AB\uFE0F", 64)  # small square
  sx0, _, sx1, _ = _ink_box(small)
  assert (sx1 - sx0) < 0.6 * (x1 - x0)


@needs_noto
def test_render_skips_what_the_font_cannot_draw():
  noto = sources.load_emoji_font("noto")
  assert sources.render_emoji(noto, "\U0010FFFD")[0] is None  # .notdef
  # Noto has no skin-toned 'people with bunny ears': two glyphs side by side.
  pixels, reason = sources.render_emoji(noto, "\U0001F46F\U0001F3FB")
  assert pixels is None and reason == "not a single glyph"
  # A flag Noto lacks (Sark) is drawn as its '?' flag: skipped too.
  assert sources.render_emoji(noto, "\U0001F1E8\U0001F1F6")[1] == (
      "unknown flag")
  assert sources.render_emoji(noto, "\U0001F1EB\U0001F1F7")[1] == ""


needs_symbola = pytest.mark.skipif(
    not os.path.exists(sources.SYMBOLA_FONT),
    reason="needs fonts-symbola (make install)")


@needs_symbola
def test_symbola_draws_black_line_art_and_skips_its_notdef_box():
  font = sources.load_emoji_font("symbola")
  apple, reason = sources.render_emoji(font, "\U0001F34E", 64, "black")
  assert reason == ""
  x0, y0, x1, y1 = _ink_box(apple)
  assert abs((x0 + x1) / 2 - 32) <= 1.5 and abs((y0 + y1) / 2 - 32) <= 1.5
  ink = apple[(apple < 245).any(-1)].astype(int)
  assert (ink.max(-1) - ink.min(-1) <= 2).all()  # Grey levels only.
  assert (ink < 64).all(-1).mean() > 0.3  # Drawn in black, not white.
  # Pillow's default text colour on RGB is white: nothing to see.
  assert sources.render_emoji(font, "\U0001F34E", 64)[1] == "blank"
  # A code point Symbola lacks is drawn as its .notdef box: skipped.
  assert sources.render_emoji(font, "\U0001FAE8", 64, "black")[1] == "notdef"
  # No skin tones: base and modifier side by side.
  assert sources.render_emoji(font, "\U0001F44D\U0001F3FD", 64,
                              "black")[1] == "not a single glyph"


@needs_noto
@needs_symbola
def test_prepare_emoji_once_into_the_cache(tmp_path, monkeypatch):
  root = sources.prepare_emoji(str(tmp_path), limit=5, verbose=False)
  with open(os.path.join(root, "manifest.json")) as f:
    manifest = json.load(f)
  for split in sources.EMOJI_SPLITS:
    source = sources.EmojiSource(root, split)
    assert len(source) + manifest["splits"][split]["skipped"] == 5
    record = source[0]
    assert record["image"].shape == (64, 64, 3)
    assert record["image"].dtype == np.uint8
    assert record["captions"] and record["id"].startswith(f"emoji/{split}/")
    names = sources.emoji_class_names(split)
    assert source.class_names == names
    assert 0 <= record["label"] < len(names)
  # A second call reuses the cache without drawing anything.
  monkeypatch.setattr(sources, "render_emoji", None)
  assert sources.prepare_emoji(str(tmp_path), limit=5) == root


def test_missing_noto_font_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(sources, "NOTO_FONT", str(tmp_path / "none.ttf"))
  with pytest.raises(FileNotFoundError,
                     match="apt-get install fonts-noto-color-emoji"):
    sources.prepare_emoji(str(tmp_path))


# ----------------------------------------------------------------- folder --


def _png(path, color, size=(12, 8)):
  Image.new("RGB", size, color).save(path)


def test_folder_source(tmp_path):
  _png(tmp_path / "a.png", "red")
  (tmp_path / "a.txt").write_text("a red thing\nsomething red\n")
  os.makedirs(tmp_path / "sub")
  _png(tmp_path / "sub" / "b.png", "blue")
  (tmp_path / "sub" / "b.txt").write_text("a blue thing")
  _png(tmp_path / "c.png", "green")  # No caption: kept, then skipped.
  source = sources.FileListSource(str(tmp_path))
  assert len(source) == 3
  records = {r["id"]: r for r in (source[i] for i in range(3))}
  assert records["a.png"]["captions"] == ["a red thing", "something red"]
  assert records[os.path.join("sub", "b.png")]["captions"] == ["a blue thing"]
  assert records["c.png"]["captions"] == []
  pixels = transforms.preprocess_image(records["a.png"]["image"], 4)
  assert (pixels == [255, 0, 0]).all()


def test_csv_and_jsonl_sources(tmp_path):
  os.makedirs(tmp_path / "img")
  _png(tmp_path / "img" / "x.png", "red")
  _png(tmp_path / "img" / "y.png", "blue")
  (tmp_path / "data.csv").write_text(
      'image,caption\nimg/x.png,a red square\nimg/y.png,"blue, square"\n')
  source = sources.FileListSource(str(tmp_path / "data.csv"))
  assert [source[i]["captions"] for i in range(2)] == [["a red square"],
                                                       ["blue, square"]]
  assert source[0]["image"] == str(tmp_path / "img" / "x.png")
  lines = [{"image": "img/x.png", "caption": "red"},
           {"image": str(tmp_path / "img" / "y.png"),
            "captions": ["blue", "navy"]}]
  (tmp_path / "data.jsonl").write_text(
      "\n".join(json.dumps(x) for x in lines) + "\n")
  source = sources.FileListSource(str(tmp_path / "data.jsonl"))
  assert source[0]["captions"] == ["red"]
  assert source[1]["captions"] == ["blue", "navy"]
  assert os.path.exists(source[0]["image"])
  with pytest.raises(ValueError, match="image,caption"):
    (tmp_path / "bad.csv").write_text("path,text\nx,y\n")
    sources.FileListSource(str(tmp_path / "bad.csv"))


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _png_bytes(color):
  buf = io.BytesIO()
  Image.new("RGB", (6, 6), color).save(buf, format="PNG")
  return buf.getvalue()


def test_convert_webdataset_shards(tmp_path):
  os.makedirs(tmp_path / "shards")
  with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
    _add(tar, "000000001.png", _png_bytes("red"))
    _add(tar, "000000001.txt", b"a red square")
    _add(tar, "000000001.json", b"{}")
    _add(tar, "000000002.jpg", _png_bytes("blue"))  # Mislabelled: kept.
    _add(tar, "000000002.txt", "a blue square \u2603".encode())
  with tarfile.open(tmp_path / "shards" / "00001.tar", "w") as tar:
    _add(tar, "dir/000000003.png", _png_bytes("green"))
    _add(tar, "dir/000000003.txt", b"green")
    _add(tar, "000000004.txt", b"no image")  # Skipped.
  sources.main(["convert-wds", "--input", str(tmp_path / "shards/*.tar"),
                "--output", str(tmp_path / "out")])
  source = sources.FileListSource(str(tmp_path / "out" / "data.jsonl"))
  assert len(source) == 3
  captions = sorted(source[i]["captions"][0] for i in range(3))
  assert captions == ["a blue square \u2603", "a red square", "green"]
  for i in range(3):
    assert transforms.preprocess_image(source[i]["image"], 6).shape == (
        6, 6, 3)


# ------------------------------------------------------------------- tfds --


def _tiny_builder(tfds):
  """A TFDS builder of a few captioned PNGs (no TensorFlow needed)."""

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=(
          tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "captions": tfds.features.Sequence(
                  {"text": tfds.features.Text()}),
              "label": tfds.features.ClassLabel(names=["red", "blue"]),
          })))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(6)}

    def _generate_examples(self, n):
      for i in range(n):
        color = ["red", "blue"][i % 2]
        yield i, {"image": io.BytesIO(_png_bytes(color)),
                  "captions": {"text": [f"{color} {i}", f"{color} square"]},
                  "label": i % 2}

  return TinyCaptions


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _tiny_builder(tfds)(data_dir=data_dir,
                      file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_reads_array_record_without_tensorflow(tfds_dir):
  import sys  # pylint: disable=g-import-not-at-top
  config = pipeline.default_data_config()
  config.update(source="tfds", tfds_name="tiny_captions", data_dir=tfds_dir,
                text_key="captions/text", label_key="label")
  source = sources.get_source(config, "train")
  assert len(source) == 6 and source.class_names == ["red", "blue"]
  for i in range(6):
    record = source[i]
    color = source.class_names[record["label"]]
    assert record["captions"][1] == f"{color} square"
    pixels = transforms.preprocess_image(record["image"], 6)
    expected = [255, 0, 0] if color == "red" else [0, 0, 255]
    assert (pixels == expected).all()
  assert "tensorflow" not in sys.modules


def test_tfds_mock_data_through_the_pipeline(tfds_dir):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = pipeline.default_data_config()
  config.update(source="tfds", tfds_name="tiny_captions", data_dir=tfds_dir,
                text_key="captions/text", image_size=8, context_length=8,
                prefetch=0)
  from clip_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.train(["red square", "blue square", "abc def"] * 5,
                            40)
  with tfds.testing.mock_data(num_examples=10):
    iterator = pipeline.make_dataset(
        config, split="train", batch_size_per_process=3, seed=0,
        tokenizer=tok, num_epochs=1)
    batches = list(iterator)
  assert len(batches) == 3  # 10 mock examples, batches of 3, 1 dropped.
  assert batches[0]["image"].shape == (3, 8, 8, 3)
  assert all(b["num_skipped"].sum() == 0 for b in batches)


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  config = pipeline.default_data_config()
  config.update(source="tfds", tfds_name="tiny_captions",
                data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="tfds build tiny_captions"):
    sources.get_source(config, "train")


# -------------------------------------------------------------- synthetic --


def test_synthetic_is_a_function_of_seed_and_index():
  a = sources.SyntheticSource(10, 8, 6, 50, seed=1)
  b = sources.SyntheticSource(10, 8, 6, 50, seed=1)
  c = sources.SyntheticSource(10, 8, 6, 50, seed=2)
  np.testing.assert_array_equal(a[3]["image"], b[3]["image"])
  np.testing.assert_array_equal(a[3]["tokens"], b[3]["tokens"])
  assert not np.array_equal(a[3]["image"], c[3]["image"])
  assert not np.array_equal(a[3]["image"], a[4]["image"])
  assert a[3]["tokens"].min() >= 3 and a[3]["tokens"].max() < 50


def test_unknown_source_lists_the_names():
  config = pipeline.default_data_config()
  config.source = "imagenet"
  with pytest.raises(ValueError,
                     match="'emoji', 'folder', 'shards', 'synthetic'"):
    sources.get_source(config, "train")


def test_convert_webdataset_refuses_paths_leaving_the_output(tmp_path):
  shard = tmp_path / "00000.tar"
  with tarfile.open(shard, "w") as tar:
    _add(tar, "../evil.png", _png_bytes("red"))
    _add(tar, "../evil.txt", b"escaped")
    _add(tar, "/tmp/abs.png", _png_bytes("red"))
    _add(tar, "/tmp/abs.txt", b"absolute")
    _add(tar, "ok.png", _png_bytes("blue"))
    _add(tar, "ok.txt", b"fine")
  result = sources.convert_wds(str(shard), str(tmp_path / "out"),
                               verbose=False)
  assert result.written == 1
  assert sorted(result.skipped["unsafe member path"]) == [
      "00000/../evil.png", "00000/../evil.txt", "00000//tmp/abs.png",
      "00000//tmp/abs.txt"]
  assert not (tmp_path / "evil.png").exists()
  written = {os.path.relpath(os.path.join(d, f), tmp_path)
             for d, _, files in os.walk(tmp_path) for f in files}
  assert written == {"00000.tar", "out/data.jsonl",
                     os.path.join("out", "images", "00000", "ok.png")}


def test_convert_webdataset_keeps_what_a_damaged_shard_holds(tmp_path):
  """A shard cut in the middle of its third sample's image: the first two
  samples are converted, the third is lost with the damage, which is
  reported with the shard; a file that is not a tar is reported too."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for i, color in enumerate(("red", "green", "blue")):
      _add(tar, f"{i}.png", _png_bytes(color) + bytes(2000))
      _add(tar, f"{i}.txt", f"sample {i}".encode())
  data = buf.getvalue()
  third_image = data.index(b"2.png")  # Its header; the data follows.
  (tmp_path / "a.tar").write_bytes(data[:third_image + 512 + 1000])
  (tmp_path / "b.tar").write_bytes(b"not a tar at all" * 100)
  result = sources.convert_wds(str(tmp_path / "*.tar"),
                               str(tmp_path / "out"), verbose=False)
  source = sources.FileListSource(result.path)
  assert [source[i]["captions"] for i in range(len(source))] == [
      ["sample 0"], ["sample 1"]]
  damaged = sorted(v for k, vs in result.skipped.items()
                   if k.startswith("damaged shard") for v in vs)
  assert damaged == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
